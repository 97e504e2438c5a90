"""The index directory: written in checksummed chunks, finished atomically, loaded for search.

A finished index (P products, E width):

  INDEX_DIR/index.json      written last: format, fingerprint, width, count, catalogue file
                            stamps, ANN kind and parameters, reject and duplicate counts
            ids.npy         int64 [P] product ids, in catalogue order (first occurrence)
            embeddings.npy  float32 [P, E] L2-normalised product embeddings
            locations.npy   int64 [P, 3] file index, byte offset, byte length of each row
            rejects.tsv     file, line, field, reason, detail of every row left out
            ann/            the ANN index files (ann.py)

While indexing, everything goes to INDEX_DIR.partial/: run.json (what the run is: model
fingerprint, catalogue stamps, chunk and batch sizes), then per chunk k of `chunk_rows`
products chunks/k.{ids,embeddings,locations}.npy and k.rejects.tsv, and last chunks/k.json
with their sha256 and the stream position after the chunk. A rerun of the same run keeps
the leading chunks whose json and checksums hold and streams on from the last one's
position; any other partial directory is removed (restart). Finishing concatenates the
chunks, builds the ANN index, writes index.json and renames the directory into place; an
older index at INDEX_DIR loses its index.json before it is removed, so there is never a
directory that looks complete but is not.
"""
import hashlib
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from retrieval import ann as ann_lib
from retrieval import catalogue

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
RUN_FILE = "run.json"
PARTIAL_SUFFIX = ".partial"
ANN_DIR = "ann"
_ARRAYS = ("ids", "embeddings", "locations")


class StoreError(RuntimeError):
    """An index directory is missing, incomplete or does not match the model or request."""




def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class ChunkWriter:
    """The partial directory of one indexing run: resumable chunks."""

    def __init__(self, out_dir: str, run: dict):
        """Opens INDEX_DIR.partial for `run`, keeping the valid chunks of the same run.

        Args:
          out_dir: the final index directory.
          run: what identifies the run (fingerprint, catalogue stamps, sizes; JSON).
        """
        self.out_dir = out_dir
        self.path = out_dir.rstrip("/") + PARTIAL_SUFFIX
        self.chunks: List[dict] = []
        self.restarted = False
        if os.path.isdir(self.path) and _read_json(os.path.join(self.path, RUN_FILE)) != run:
            shutil.rmtree(self.path)
            self.restarted = True
        os.makedirs(os.path.join(self.path, "chunks"), exist_ok=True)
        _write_json(os.path.join(self.path, RUN_FILE), run)
        while True:
            meta = _read_json(self._file(len(self.chunks), "json"))
            if meta is None or not all(
                    os.path.exists(self._file(len(self.chunks), name)) and
                    _sha256(self._file(len(self.chunks), name)) == digest
                    for name, digest in meta["sha256"].items()):
                break
            self.chunks.append(meta)
        # Anything after the last valid chunk is a chunk cut short: gone.
        for name in os.listdir(os.path.join(self.path, "chunks")):
            if int(name.split(".")[0]) >= len(self.chunks):
                os.remove(os.path.join(self.path, "chunks", name))

    def _file(self, k: int, name: str) -> str:
        ext = "json" if name == "json" else ("tsv" if name == "rejects" else "npy")
        suffix = "" if name == "json" else "." + name
        return os.path.join(self.path, "chunks", f"{k:05d}{suffix}.{ext}")

    @property
    def position(self) -> Optional[catalogue.Position]:
        """The stream position after the last kept chunk (None: start)."""
        return catalogue.Position(*self.chunks[-1]["end"]) if self.chunks else None

    def seen_ids(self) -> catalogue.IdSet:
        """Product ids of the kept chunks."""
        seen = catalogue.IdSet()
        for k in range(len(self.chunks)):
            seen.update(np.load(self._file(k, "ids")))
        return seen

    def write(self, ids: np.ndarray, embeddings: np.ndarray, locations: np.ndarray,
              rejects: Sequence[catalogue.Reject], duplicates: int,
              end: catalogue.Position) -> dict:
        """Writes chunk k = len(chunks); its json last, so a chunk is complete or absent.

        Args:
          ids: int64 [C]; embeddings: float32 [C, E]; locations: int64 [C, 3].
          rejects: rows rejected since the previous chunk; duplicates: their count of
          duplicate rows; end: the stream position after the chunk.
        """
        k = len(self.chunks)
        arrays = {"ids": np.asarray(ids, np.int64), "embeddings": np.asarray(embeddings,
                                                                               np.float32),
                  "locations": np.asarray(locations, np.int64)}
        digests = {}
        for name, value in arrays.items():
            np.save(self._file(k, name), value)
            digests[name] = _sha256(self._file(k, name))
        with open(self._file(k, "rejects"), "w", encoding="utf-8") as f:
            f.writelines(r.tsv_line() for r in rejects)
        digests["rejects"] = _sha256(self._file(k, "rejects"))
        reasons: Dict[str, int] = {}
        for r in rejects:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        meta = {"rows": int(len(ids)), "rejected": len(rejects), "reasons": reasons,
                "duplicates": int(duplicates), "end": list(end), "sha256": digests}
        _write_json(self._file(k, "json"), meta)
        self.chunks.append(meta)
        return meta

    def finish(self, index_meta: dict, build_ann) -> str:
        """Concatenates the chunks, builds the ANN index, writes index.json and renames the
        partial directory to the index directory.

        Args:
          index_meta: index.json's fields so far (fingerprint, width, catalogue, ...).
          build_ann: fn(embeddings float32 [P, E] memmap, ann_dir) -> {ANN kind, params}.
        Returns:
          The index directory.
        Raises:
          StoreError: no product at all (an empty catalogue).
        """
        count = sum(c["rows"] for c in self.chunks)
        rejected = sum(c["rejected"] for c in self.chunks)
        if count == 0:
            shutil.rmtree(self.path)
            raise StoreError(f"empty catalogue: no valid product row "
                              f"({rejected} rejected); nothing indexed")
        width = int(index_meta["width"])
        shapes = {"ids": (count,), "embeddings": (count, width), "locations": (count, 3)}
        dtypes = {"ids": np.int64, "embeddings": np.float32, "locations": np.int64}
        for name in _ARRAYS:
            # Chunk by chunk into a memory-mapped .npy: memory stays one chunk.
            out = np.lib.format.open_memmap(os.path.join(self.path, name + ".npy"), mode="w+",
                                            dtype=dtypes[name], shape=shapes[name])
            row = 0
            for k in range(len(self.chunks)):
                part = np.load(self._file(k, name))
                out[row:row + len(part)] = part
                row += len(part)
            out.flush()
            del out
        with open(os.path.join(self.path, "rejects.tsv"), "w", encoding="utf-8") as out:
            out.write(catalogue.REJECTS_HEADER)
            for k in range(len(self.chunks)):
                with open(self._file(k, "rejects"), encoding="utf-8") as f:
                    shutil.copyfileobj(f, out)
        reasons: Dict[str, int] = {}
        for c in self.chunks:
            for reason, n in c["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
        embeddings = np.load(os.path.join(self.path, "embeddings.npy"), mmap_mode="r")
        ann_meta = build_ann(embeddings, os.path.join(self.path, ANN_DIR))
        del embeddings
        shutil.rmtree(os.path.join(self.path, "chunks"))
        os.remove(os.path.join(self.path, RUN_FILE))
        meta = dict(index_meta, format=FORMAT_VERSION, count=count, rejected=rejected,
                    reject_reasons=reasons,
                    duplicates=sum(c["duplicates"] for c in self.chunks), ann=ann_meta)
        _write_json(os.path.join(self.path, INDEX_FILE), meta)
        if os.path.exists(self.out_dir):
            old_meta = os.path.join(self.out_dir, INDEX_FILE)
            if os.path.exists(old_meta):
                os.remove(old_meta)        # first: the old index no longer looks complete
            shutil.rmtree(self.out_dir)
        os.replace(self.path, self.out_dir)
        return self.out_dir


class Index:
    """A finished index, embeddings memory-mapped."""

    def __init__(self, path: str):
        """Raises:
          StoreError: no finished index there (or an unknown format).
        """
        self.path = path
        self.meta = _read_json(os.path.join(path, INDEX_FILE))
        if self.meta is None:
            partial = os.path.isdir(path.rstrip("/") + PARTIAL_SUFFIX)
            raise StoreError(f"{path}: not a finished index (no {INDEX_FILE})" +
                              ("; an indexing run was interrupted: rerun `mmrecall index` to "
                               "resume it" if partial else ""))
        if self.meta.get("format") != FORMAT_VERSION:
            raise StoreError(f"{path}: index format {self.meta.get('format')}, this version "
                              f"reads {FORMAT_VERSION}; index again")
        self.ids = np.load(os.path.join(path, "ids.npy"))                        # [P]
        self.embeddings = np.load(os.path.join(path, "embeddings.npy"), mmap_mode="r")
        self.locations = np.load(os.path.join(path, "locations.npy"), mmap_mode="r")
        self._rows = None
        self._ann = None

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    def __len__(self) -> int:
        return int(self.meta["count"])

    def check_model(self, fingerprint: str, width: int, model_path: str) -> None:
        """Raises StoreError unless the model's product tower built this index."""
        if width != self.width:
            raise StoreError(f"width mismatch: the index {self.path} holds {self.width}-wide "
                              f"embeddings, the model {model_path} makes {width}-wide ones")
        if fingerprint != self.fingerprint:
            raise StoreError(
                f"the model's product tower is not the one that built the index: index "
                f"{self.path} fingerprint {self.fingerprint}, model {model_path} fingerprint "
                f"{fingerprint}; index the catalogue again with this model")

    def row_of(self, product_ids: Sequence[int]) -> np.ndarray:
        """Product ids [n] -> their row numbers int64 [n].

        Raises:
          StoreError: an id is not in the index.
        """
        if self._rows is None:
            self._rows = {int(p): i for i, p in enumerate(self.ids.tolist())}
        rows = []
        for p in product_ids:
            if int(p) not in self._rows:
                raise StoreError(f"unknown product id {int(p)}: not in the index {self.path} "
                                  f"({len(self)} products)")
            rows.append(self._rows[int(p)])
        return np.asarray(rows, np.int64)

    def ann(self):
        """The ANN searcher (ann.load)."""
        if self._ann is None:
            self._ann = ann_lib.load(self.meta["ann"], os.path.join(self.path, ANN_DIR),
                                     self.embeddings)
        return self._ann

    def search(self, queries: np.ndarray, k: int, exact: bool = False
               ) -> Tuple[np.ndarray, np.ndarray]:
        """Nearest products by dot product.

        Args:
          queries: float32 [B, E] query embeddings.
          k: neighbours per query (capped at the catalogue size).
          exact: brute force instead of the ANN index.
        Returns:
          (rows int64 [B, k'], scores float32 [B, k']), best first, k' = min(k, P).
        """
        queries = np.ascontiguousarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.width:
            raise StoreError(f"width mismatch: queries {queries.shape}, index width "
                              f"{self.width}")
        k = min(int(k), len(self))
        if exact:
            return ann_lib.exact_top_k(self.embeddings, queries, k)
        return self.ann().search(queries, k)

    def row_reader(self) -> catalogue.RowReader:
        """A reader of the indexed rows (checks the catalogue files are unchanged)."""
        return catalogue.RowReader(self.meta["catalogue"])
