"""manifest.py: PrepDir reads and checks a prep's manifest once and answers what it holds.

The prep directories here are written by hand (a manifest, vocab.tsv, word2vec.npy), so each
test states exactly the manifest it reads; prep_test checks a real prep's manifest.
"""
import json
import os

import numpy as np
import pytest

from data_prep import schema, text, tfrecord, vocab
from data_prep.manifest import PrepDir, PrepDirError, load_manifest

V, W = 5, 3  # vocabulary entries ([PAD], [UNK] and 3 lemmas), word2vec width


def _write_prep(root, **overrides):
    """A finished prep with train (shards of 4, 0 and 2 rows) and valid, gzip, W = 3."""
    root.mkdir(exist_ok=True)
    entries = vocab.build_vocab({"dress": 3, "red": 2, "silk": 1})
    vocab.save_vocab(entries, str(root / schema.VOCAB_FILE))
    np.save(root / schema.EMBEDDINGS_FILE, np.arange(V * W, dtype=np.float64).reshape(V, W))
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "normalization_version": text.NORMALIZATION_VERSION,
        "compression": "GZIP", "max_boxes": 7, "embedding_dim": W, "vocab_size": V,
        "vocab": schema.VOCAB_FILE, "embeddings": schema.EMBEDDINGS_FILE,
        "splits": {
            "train": {"rows": 6, "shards": [
                {"file": "train/part-00000.tfrecord.gz", "rows": 4},
                {"file": "train/part-00001.tfrecord.gz", "rows": 0},
                {"file": "train/part-00002.tfrecord.gz", "rows": 2}]},
            "valid": {"rows": 3, "shards": [{"file": "valid/part-00000.tfrecord.gz",
                                              "rows": 3}]},
        },
    }
    manifest.update(overrides)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    (root / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(root)


def test_settings_splits_and_files(tmp_path):
    prep = PrepDir(_write_prep(tmp_path / "p"))
    assert (prep.compression, prep.max_boxes, prep.embedding_dim, prep.vocab_size) == \
        ("GZIP", 7, W, V)
    assert prep.normalization_version == text.NORMALIZATION_VERSION
    assert prep.splits == ("train", "valid")  # schema.SPLITS order; no test split
    # absolute paths in shard order; the empty shard 1 is left out
    assert prep.split_files("train") == [os.path.join(prep.path, f"train/part-0000{k}.tfrecord.gz")
                                         for k in (0, 2)]
    assert (prep.split_rows("train"), prep.split_rows("valid")) == (6, 3)


def test_file_rows_counts_the_given_shards_and_knows_no_others(tmp_path):
    prep = PrepDir(_write_prep(tmp_path / "p"))
    train, valid = prep.split_files("train"), prep.split_files("valid")
    assert prep.file_rows(train) == 6 and prep.file_rows(train[1:]) == 2
    assert prep.file_rows(train[:1] + valid) == 7 and prep.file_rows([]) == 0
    assert prep.file_rows(train + [str(tmp_path / "elsewhere.tfrecord")]) is None


def test_an_absent_split_has_no_files_and_no_rows(tmp_path):
    prep = PrepDir(_write_prep(tmp_path / "p"))
    assert prep.split_files("test") == [] and prep.split_rows("test") == 0


def test_vocabulary_and_embeddings_are_aligned(tmp_path):
    prep = PrepDir(_write_prep(tmp_path / "p"))
    assert prep.vocab_tokens() == [schema.PAD_TOKEN, schema.UNK_TOKEN, "dress", "red", "silk"]
    emb = prep.embeddings()
    assert emb.shape == (V, W) and emb.dtype == np.float32  # [V, W], stored as float64 here
    np.testing.assert_array_equal(emb[4], [12, 13, 14])


def test_a_prep_without_train_has_no_vocabulary(tmp_path):
    prep = PrepDir(_write_prep(tmp_path / "p", vocab=None, embeddings=None, vocab_size=0))
    assert prep.vocab_size == 0
    with pytest.raises(PrepDirError, match="built no vocabulary.*--train"):
        prep.vocab_tokens()
    with pytest.raises(PrepDirError, match="no word2vec vectors.*--train"):
        prep.embeddings()


def test_a_missing_directory_or_manifest_is_refused(tmp_path):
    with pytest.raises(PrepDirError, match="nope: no such directory"):
        PrepDir(str(tmp_path / "nope"))
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(PrepDirError, match=f"{schema.MANIFEST_FILE}: missing; .* is not a "
                                           f"finished prep"):
        PrepDir(str(tmp_path / "unfinished"))


def test_an_unreadable_manifest_or_another_schema_is_refused(tmp_path):
    broken = _write_prep(tmp_path / "broken")
    with open(os.path.join(broken, schema.MANIFEST_FILE), "w") as f:
        f.write("{oops")
    with pytest.raises(PrepDirError, match="unreadable"):
        PrepDir(broken)
    other = _write_prep(tmp_path / "other", schema_version=schema.SCHEMA_VERSION + 1)
    with pytest.raises(PrepDirError, match=f"schema_version {schema.SCHEMA_VERSION + 1}, this "
                                           f"code reads {schema.SCHEMA_VERSION}"):
        load_manifest(other)


@pytest.mark.parametrize("recorded", [None, 1, 99])
def test_a_prep_made_by_other_normalisation_rules_is_refused(tmp_path, recorded):
    # None: a manifest written before the key existed, which means version 1.
    assert text.NORMALIZATION_VERSION not in (1, 99)
    out = _write_prep(tmp_path / "old", normalization_version=recorded)
    with pytest.raises(ValueError, match=f"{schema.MANIFEST_FILE}: queries were normalised by "
                                         f"rules version {recorded or 1}.*rerun mmrecall prep"):
        load_manifest(out)
    with pytest.raises(PrepDirError, match="rules version"):
        PrepDir(out)


def _write_shards(root, with_checksums):
    """Writes the shards _write_prep's manifest lists (gzip), recording size and CRC32C in
    the manifest when with_checksums (as prep does) and leaving them out otherwise (as prep
    did before it recorded them)."""
    manifest = json.loads((root / schema.MANIFEST_FILE).read_text())
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            path = root / shard["file"]
            path.parent.mkdir(exist_ok=True)
            with tfrecord.RecordWriter(str(path), gzip=True) as writer:
                for i in range(shard["rows"]):
                    writer.write(b"record %d" % i)
            if with_checksums:
                shard["bytes"], shard["crc32c"] = path.stat().st_size, writer.crc32c
    (root / schema.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("with_checksums", [True, False])
def test_verify_finds_nothing_wrong_with_an_intact_prep(tmp_path, with_checksums):
    root = tmp_path / "p"
    prep = _write_prep(root)
    _write_shards(root, with_checksums)
    assert PrepDir(prep).verify() == [] and PrepDir(prep).verify(content=False) == []


def test_verify_names_each_missing_changed_or_corrupt_file(tmp_path):
    root = tmp_path / "p"
    prep = _write_prep(root)
    _write_shards(root, with_checksums=True)
    os.remove(root / "train" / "part-00001.tfrecord.gz")
    with open(root / "train" / "part-00002.tfrecord.gz", "ab") as f:
        f.write(b"x")
    data = bytearray((root / "valid" / "part-00000.tfrecord.gz").read_bytes())
    data[-9] ^= 1  # inside the gzip trailer's CRC: same size, other bytes
    (root / "valid" / "part-00000.tfrecord.gz").write_bytes(bytes(data))
    os.remove(root / schema.VOCAB_FILE)
    problems = PrepDir(prep).verify()
    fix = f"rerun mmrecall prep with --out {prep} (it rewrites what is wrong)"
    assert len(problems) == 4
    assert problems[0] == (f"{prep}/train/part-00001.tfrecord.gz: missing (train shard listed "
                           f"by the manifest); {fix}")
    assert problems[1].startswith(f"{prep}/train/part-00002.tfrecord.gz: ") and \
        "bytes, the manifest recorded" in problems[1] and problems[1].endswith(fix)
    assert problems[2].startswith(f"{prep}/valid/part-00000.tfrecord.gz: content does not "
                                  f"match its checksum")
    assert problems[3] == f"{prep}/{schema.VOCAB_FILE}: missing (listed by the manifest); {fix}"
    # Presence and sizes only: the corrupt valid shard goes unnoticed.
    assert len(PrepDir(prep).verify(content=False)) == 3
