"""`PrepDir`: a finished `mmrecall prep` directory, its manifest read and checked once.

Everything downstream of prep (training, the input pipeline, export, merge, benches) asks
a `PrepDir` what the prep made instead of reading `manifest.json` itself:

    prep = PrepDir(path)              # raises PrepDirError naming the file and the fix
    prep.split_files("train")         # absolute shard paths, empty shards left out
    prep.vocab_tokens()               # [V] tokens, index == id
    prep.embeddings()                 # float32 [V, W] word2vec rows, L2-normalised
    prep.embedding_dim, prep.max_boxes, prep.compression, prep.normalization_version
    prep.verify(content=False)        # [] or one line per missing / wrong-sized file

Dimension legend: V vocabulary entries, W word2vec width.
"""
import json
import os
from typing import List, Optional, Tuple

import numpy as np

from data_prep import schema, shards, text, vocab


class PrepDirError(ValueError):
    """The directory is not a finished prep this code can read (message names the path)."""


class PrepDir:
    """A finished prep directory (read-only). Vocabulary and embeddings load lazily, once."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.manifest = load_manifest(self.path)
        self._tokens: Optional[List[str]] = None
        self._embeddings: Optional[np.ndarray] = None

    def __repr__(self) -> str:
        return f"PrepDir({self.path!r})"

    # --- settings the prep was made with ----------------------------------------------------
    @property
    def compression(self) -> str:
        """"GZIP" or "" (TFRecordDataset's compression_type)."""
        return self.manifest.get("compression", "") or ""

    @property
    def max_boxes(self) -> int:
        """Prep's box cap: each product kept at most this many boxes, the largest by area."""
        return int(self.manifest["max_boxes"])

    @property
    def embedding_dim(self) -> int:
        """W, the word2vec width."""
        return int(self.manifest["embedding_dim"])

    @property
    def normalization_version(self) -> int:
        """The query normalisation rules' version (data_prep.text.NORMALIZATION_VERSION)."""
        return int(self.manifest.get("normalization_version", 1))

    @property
    def vocab_size(self) -> int:
        """V, rows of the vocabulary (0 when the prep had no train split)."""
        return int(self.manifest.get("vocab_size") or 0)

    # --- splits ---------------------------------------------------------------------------
    @property
    def splits(self) -> Tuple[str, ...]:
        """The prepared splits, in schema.SPLITS order."""
        return tuple(s for s in schema.SPLITS if s in self.manifest["splits"])

    def split_files(self, split: str) -> List[str]:
        """Absolute paths of a split's non-empty shards in shard order ([] if not prepared)."""
        entry = self.manifest["splits"].get(split)
        if not entry:
            return []
        return [os.path.join(self.path, s["file"]) for s in entry["shards"] if s["rows"]]

    def split_rows(self, split: str) -> int:
        """Rows written for a split (0 if not prepared)."""
        return int((self.manifest["splits"].get(split) or {}).get("rows", 0))

    def file_rows(self, files) -> Optional[int]:
        """Rows in these shard paths (as split_files gives them), or None when any path is
        not a shard of this prep."""
        rows = {os.path.join(self.path, s["file"]): int(s["rows"])
                for entry in self.manifest["splits"].values() if entry
                for s in entry["shards"]}
        if not all(f in rows for f in files):
            return None
        return sum(rows[f] for f in files)

    def verify(self, content: bool = True) -> List[str]:
        """Checks that the files the manifest lists are there as prep wrote them.

        Reads only, writes nothing. Every shard of every split (empty ones included) must
        exist with its recorded size; with `content`, its bytes must match the recorded
        CRC32C (a manifest without checksums: every record's TFRecord framing CRCs). The
        vocabulary, word2vec files and reject files the manifest names must exist.

        Args:
          content: also read every shard (slow for a large prep); False checks presence
            and sizes only.
        Returns:
          One line per problem, each naming the file and what to do; [] when all is well.
        """
        problems = []
        fix = f"rerun mmrecall prep with --out {self.path} (it rewrites what is wrong)"
        for split in self.splits:
            entry = self.manifest["splits"][split]
            for shard in entry["shards"]:
                path = os.path.join(self.path, shard["file"])
                if not os.path.isfile(path):
                    problems.append(f"{path}: missing ({split} shard listed by the "
                                    f"manifest); {fix}")
                    continue
                size = os.path.getsize(path)
                if "bytes" in shard and size != shard["bytes"]:
                    problems.append(f"{path}: {size} bytes, the manifest recorded "
                                    f"{shard['bytes']}; {fix}")
                    continue
                problem = shards.verify_content(self.path, shard) if content else None
                if problem:
                    problems.append(f"{problem}; {fix}")
            if entry.get("rejects_file"):
                problems += self._missing(entry["rejects_file"], fix)
        for key in ("vocab", "embeddings", "word2vec_model"):
            if self.manifest.get(key):
                problems += self._missing(self.manifest[key], fix)
        return problems

    def _missing(self, name: str, fix: str) -> List[str]:
        path = os.path.join(self.path, name)
        return [] if os.path.isfile(path) else [f"{path}: missing (listed by the manifest); "
                                                f"{fix}"]

    # --- vocabulary and word2vec -------------------------------------------------------------
    def vocab_tokens(self) -> List[str]:
        """The vocabulary, index == id, as the training and serving lookups use it.

        Raises:
          PrepDirError: the prep had no train split, so it built no vocabulary.
        """
        if self._tokens is None:
            name = self.manifest.get("vocab")
            if not name:
                raise PrepDirError(f"{self.path}: the prep built no vocabulary (it had no "
                                   f"--train); rerun mmrecall prep with the train split")
            self._tokens = [t for t, _ in vocab.load_vocab(os.path.join(self.path, name))]
        return list(self._tokens)

    def embeddings(self) -> np.ndarray:
        """float32 [V, W] word2vec vectors, rows aligned with vocab_tokens()."""
        if self._embeddings is None:
            name = self.manifest.get("embeddings")
            if not name:
                raise PrepDirError(f"{self.path}: the prep wrote no word2vec vectors (it had "
                                   f"no --train); rerun mmrecall prep with the train split")
            self._embeddings = np.load(os.path.join(self.path, name)).astype(np.float32)
        return self._embeddings


def load_manifest(out_dir: str) -> dict:
    """Reads and checks DIR/manifest.json of a finished prep.

    Raises:
      PrepDirError: no such directory, no manifest (prep unfinished), another schema or other
        query normalisation rules than text.NORMALIZATION_VERSION.
    """
    path = os.path.join(out_dir, schema.MANIFEST_FILE)
    if not os.path.isdir(out_dir):
        raise PrepDirError(f"{out_dir}: no such directory; give the --out of a finished "
                           f"mmrecall prep")
    if not os.path.exists(path):
        raise PrepDirError(f"{path}: missing; {out_dir} is not a finished prep (run mmrecall "
                           f"prep with --out {out_dir}; a rerun resumes)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise PrepDirError(f"{path}: unreadable ({e}); rerun mmrecall prep") from None
    if manifest.get("schema_version") != schema.SCHEMA_VERSION:
        raise PrepDirError(f"{path}: schema_version {manifest.get('schema_version')}, this "
                           f"code reads {schema.SCHEMA_VERSION}; rerun mmrecall prep")
    # Lemmas made by other normalisation rules than the export's in-graph ones would skew
    # serving from training. A manifest without the key was made under version 1.
    version = manifest.get("normalization_version", 1)
    if version != text.NORMALIZATION_VERSION:
        raise PrepDirError(f"{path}: queries were normalised by rules version {version}, this "
                           f"code (and its export) uses version {text.NORMALIZATION_VERSION}; "
                           f"rerun mmrecall prep with the same --out (it rewrites the shards)")
    return manifest
