"""shards.py: shard and sidecar names, atomic writes, completeness, content checks, stale
temporaries."""
import errno
import json
import os

import pytest

from data_prep import shards, tfrecord


def test_names_of_shards_and_sidecars():
    assert shards.shard_file("valid", 7, gzip=False) == "valid/part-00007.tfrecord"
    assert shards.shard_file("train", 12345, gzip=True) == "train/part-12345.tfrecord.gz"
    assert shards.state_file("train", 3, "lemmas.txt") == "state/train/part-00003.lemmas.txt"
    head, tail = os.path.split(shards.tmp_name("/d/train/part-00001.tfrecord"))
    assert head == "/d/train" and tail.startswith(".part-00001.tfrecord.tmp-")
    assert tail.endswith(f"-{os.getpid()}")


def test_write_atomic_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    shards.write_json_atomic(str(path), {"b": 1, "a": [2]})
    assert path.read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    shards.write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["x.json"]


def test_a_shard_is_complete_only_with_its_size_sidecars_and_fingerprint(tmp_path):
    out = tmp_path
    (out / "train").mkdir()
    (out / "state" / "train").mkdir(parents=True)
    (out / "train" / "part-00000.tfrecord").write_bytes(b"12345")
    (out / "state" / "train" / "part-00000.rejects.tsv").write_bytes(b"")
    sidecar = {"file": "train/part-00000.tfrecord", "bytes": 5,
               "sidecars": ["state/train/part-00000.rejects.tsv"], "fingerprint": {"k": 1}}
    (out / shards.state_file("train", 0, "json")).write_text(json.dumps(sidecar))
    loaded = shards.load_sidecar(str(out), "train", 0)
    assert loaded == sidecar and shards.load_sidecar(str(out), "train", 1) is None
    assert shards.is_complete(str(out), loaded)
    assert shards.is_complete(str(out), loaded, {"k": 1})
    assert not shards.is_complete(str(out), loaded, {"k": 2})  # other input or options
    assert not shards.is_complete(str(out), dict(loaded, bytes=4))  # truncated shard
    assert not shards.is_complete(str(out), None)
    os.remove(out / "state" / "train" / "part-00000.rejects.tsv")
    assert not shards.is_complete(str(out), loaded)  # a sidecar file is missing


def test_stale_temporaries_of_owned_shards_are_removed(tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    for k in range(3):
        (out / "train" / f".part-{k:05d}.tfrecord.tmp-host-1").write_bytes(b"x")
    assert shards.remove_stale_temporaries(str(out), "train", lambda k: k % 2 == 0) == 2
    assert os.listdir(out / "train") == [".part-00001.tfrecord.tmp-host-1"]


def test_remove_temporaries_of_named_files_or_all(tmp_path):
    for name in (".vocab.tsv.tmp-h-1", ".manifest.json.tmp-h-2", ".word2vec.npy.tmp-h-3",
                 "vocab.tsv"):
        (tmp_path / name).write_bytes(b"x")
    assert shards.remove_temporaries(str(tmp_path), ["vocab.tsv", "manifest.json"]) == 2
    assert sorted(os.listdir(tmp_path)) == [".word2vec.npy.tmp-h-3", "vocab.tsv"]
    assert shards.remove_temporaries(str(tmp_path)) == 1
    assert os.listdir(tmp_path) == ["vocab.tsv"]
    assert shards.remove_temporaries(str(tmp_path / "absent")) == 0


def test_a_failed_atomic_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    real_replace = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e:
        shards.write_atomic(str(tmp_path / "x.json"), b"data")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "x.json"))
    assert os.listdir(tmp_path) == []


def test_verify_content_by_checksum_or_else_by_record_framing(tmp_path):
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "part-00000.tfrecord"
    with tfrecord.RecordWriter(str(path)) as writer:
        writer.write(b"record")
    sidecar = {"file": "train/part-00000.tfrecord", "crc32c": writer.crc32c}
    assert shards.verify_content(str(tmp_path), sidecar) is None
    assert shards.verify_content(str(tmp_path), {"file": sidecar["file"]}) is None
    data = bytearray(path.read_bytes())
    data[14] ^= 1  # inside the record
    path.write_bytes(bytes(data))
    assert "content does not match its checksum" in shards.verify_content(str(tmp_path),
                                                                          sidecar)
    assert shards.verify_content(str(tmp_path), {"file": sidecar["file"]}) == \
        f"{path}: record CRC mismatch at record offset 0"
