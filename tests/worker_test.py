"""worker.py: one chunk -> one shard + sidecars, rejects, the box cap, duplicates, resume
(checksums) and write failures."""
import errno
import os
import subprocess
import sys

import google_crc32c
import numpy as np
import pytest

from data_prep import geometry, schema, text, tfrecord, tsv, worker
from mmrecall_testing import tsv_fixtures as fx


def _run_chunk(tmp_path, split, lines, config=None, rows_per_chunk=1000):
    path = fx.write_tsv(str(tmp_path / f"{split}.tsv"), lines)
    config = config or worker.ShardConfig(out_dir=str(tmp_path / "out"))
    chunk, = tsv.iter_chunks(path, rows_per_chunk, group_by_query=split != "train")
    return worker.process_chunk(worker.ChunkTask(split, path, chunk), config), config


def _parse(path, compression=""):
    import tensorflow as tf

    spec = schema.tfrecord_feature_spec()
    return [{k: v.numpy() for k, v in tf.io.parse_single_example(r, spec).items()}
            for r in tf.data.TFRecordDataset(path, compression_type=compression)]


def test_round_trip_tsv_to_parsed_tensors(tmp_path):
    rng = np.random.default_rng(11)
    rows = [fx.random_row(rng, 103_000_000 + i, 42, query="Is children's DRESSES",
                          num_boxes=n, image_h=338, image_w=209) for i, n in enumerate([1, 4, 2])]
    answers = {42: frozenset({103_000_001})}
    config = worker.ShardConfig(out_dir=str(tmp_path / "out"), answers=answers)
    sidecar, _ = _run_chunk(tmp_path, "valid", [fx.line(r) for r in rows], config)
    assert sidecar["rows"] == 3 and sidecar["rejected"] == 0
    parsed = _parse(os.path.join(config.out_dir, sidecar["file"]))
    lemmas = ["child", "s", "dress"]  # "is" dropped, plural and case normalised
    for row, got, label in zip(rows, parsed, [0, 1, 0]):
        n = len(row["boxes"])
        assert got[schema.PRODUCT_ID] == row["product_id"] and got[schema.QUERY_ID] == 42
        assert (got[schema.IMAGE_H], got[schema.IMAGE_W], got[schema.NUM_BOXES]) == (338, 209, n)
        assert got[schema.QUERY].decode() == row["query"]
        assert [t.decode() for t in got[schema.QUERY_LEMMAS]] == lemmas
        assert got[schema.QUERY_KEY] == text.query_key(lemmas)
        np.testing.assert_array_equal(got[schema.BOXES].reshape(n, 4), row["boxes"])
        np.testing.assert_array_equal(
            got[schema.BOX_GEOMETRY].reshape(n, schema.GEOMETRY_DIM),
            geometry.relative_geometry(row["boxes"], 338, 209))
        np.testing.assert_array_equal(
            np.frombuffer(got[schema.BOX_FEATURES], "<f4").reshape(n, schema.FEATURE_DIM),
            row["features"])
        np.testing.assert_array_equal(got[schema.BOX_LABELS], row["class_labels"])
        assert got[schema.LABEL] == label
    assert sidecar["positives"] == [[42, 103_000_001]] and sidecar["queries"] == [42]


def test_bad_rows_are_rejected_with_line_and_reason_and_good_rows_kept(tmp_path):
    rng = np.random.default_rng(12)
    bad = fx.malformed_lines(rng)
    bad.append((fx.line(fx.random_row(rng, 5, 5, query="is ,, !")), "query", "empty_query"))
    good = [fx.line(r) for r in fx.train_rows(13, len(bad) + 1)]
    lines = [x for pair in zip(good, [b[0] for b in bad]) for x in pair] + [good[-1]]
    sidecar, config = _run_chunk(tmp_path, "train", lines)
    assert sidecar["rows"] == len(good) and sidecar["rejected"] == len(bad)
    reasons = {}
    for _, _, reason in bad:
        reasons[reason] = reasons.get(reason, 0) + 1
    assert sidecar["reject_reasons"] == reasons
    rejects = open(os.path.join(config.out_dir, sidecar["sidecars"][0]), "rb").read()
    got = [r.split(b"\t", 4) for r in rejects.split(b"\n")[:-1]]
    # bad line i sits at file line 2 (header is line 1) + 2 * i + 1
    assert [int(g[0]) for g in got] == [3 + 2 * i for i in range(len(bad))]
    assert [(g[1].decode(), g[2].decode()) for g in got] == [(f, r) for _, f, r in bad]
    assert [g[4].decode() for g in got] == [b[0] for b in bad]  # the raw line, unchanged
    ids = [p[schema.PRODUCT_ID] for p in _parse(os.path.join(config.out_dir, sidecar["file"]))]
    assert ids == [int(g.split("\t")[0]) for g in good]
    corpus = open(os.path.join(config.out_dir, sidecar["sidecars"][1])).read().splitlines()
    assert len(corpus) == len(good)


def test_boxes_beyond_the_cap_keep_the_largest(tmp_path):
    rng = np.random.default_rng(14)
    row = fx.random_row(rng, 9, 9, num_boxes=5)
    row["boxes"] = np.array([[0, 0, 10, 10], [0, 0, 2, 2], [0, 0, 30, 30], [0, 0, 20, 20],
                             [0, 0, 1, 1]], np.float32)
    small = fx.random_row(rng, 10, 9, num_boxes=2)
    config = worker.ShardConfig(out_dir=str(tmp_path / "out"), max_boxes=3, gzip=True)
    sidecar, _ = _run_chunk(tmp_path, "test", [fx.line(row), fx.line(small)], config)
    assert sidecar["capped"] == 1 and sidecar["file"].endswith(".tfrecord.gz")
    got = _parse(os.path.join(config.out_dir, sidecar["file"]), "GZIP")
    keep = [0, 2, 3]  # areas 100, 900, 400 are the 3 largest, in original order
    np.testing.assert_array_equal(got[0][schema.BOXES].reshape(-1, 4), row["boxes"][keep])
    np.testing.assert_array_equal(
        np.frombuffer(got[0][schema.BOX_FEATURES], "<f4").reshape(3, -1), row["features"][keep])
    np.testing.assert_array_equal(got[0][schema.BOX_LABELS], row["class_labels"][keep])
    assert got[0][schema.LABEL] == schema.UNKNOWN_LABEL and got[1][schema.NUM_BOXES] == 2


def test_finished_shard_is_reused_only_while_its_fingerprint_and_size_match(tmp_path):
    lines = [fx.line(r) for r in fx.train_rows(15, 4)]
    first, config = _run_chunk(tmp_path, "train", lines)
    assert not first["skipped"]
    again, _ = _run_chunk(tmp_path, "train", lines, config)
    assert again["skipped"]
    changed, _ = _run_chunk(tmp_path, "train", lines,
                            worker.ShardConfig(out_dir=config.out_dir, max_boxes=2))
    assert not changed["skipped"]  # other options: rewritten
    shard = os.path.join(config.out_dir, changed["file"])
    with open(shard, "r+b") as f:
        f.truncate(100)
    repaired, _ = _run_chunk(tmp_path, "train", lines,
                             worker.ShardConfig(out_dir=config.out_dir, max_boxes=2))
    assert not repaired["skipped"] and os.path.getsize(shard) == changed["bytes"]


def test_fingerprint_holds_the_crc_of_the_whole_chunk(tmp_path):
    import google_crc32c
    lines = [fx.line(r) for r in fx.train_rows(19, 5)]
    sidecar, _ = _run_chunk(tmp_path, "train", lines)
    raw = ("\n".join(lines) + "\n").encode()
    assert sidecar["fingerprint"]["input_crc32c"] == google_crc32c.value(raw)
    assert sidecar["fingerprint"]["input_bytes"] == len(raw)


def test_a_chunk_that_shrank_after_chunking_is_refused_and_nothing_is_left(tmp_path):
    lines = [fx.line(r) for r in fx.train_rows(23, 4)]
    path = fx.write_tsv(str(tmp_path / "train.tsv"), lines)
    chunk, = tsv.iter_chunks(path, 100, group_by_query=False)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-len(lines[-1]) - 1])  # the last line is gone
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="3 lines and .* where 4"):
        worker.process_chunk(worker.ChunkTask("train", path, chunk), worker.ShardConfig(str(out)))
    assert os.listdir(out / "train") == []


def test_cached_normalize_equals_text_normalize_query():
    queries = ["Is are the dress is red", "is are", "children's KNIVES, mice & dresses",
               "BE quick", '"new" autumn/winter jacket', "", "ms. western-style shirts"]
    rng = np.random.default_rng(16)
    queries += [" ".join(rng.choice(fx.WORDS + ("is", "are", "Was"), 4)) for _ in range(50)]
    for query in queries:
        for drop in (True, False):
            lemmas, key = worker.normalize(query, drop)
            assert list(lemmas) == text.normalize_query(query, drop_leading_be=drop), query
            assert key == text.query_key(lemmas)


def test_crlf_lines_and_a_missing_final_newline_give_the_same_records(tmp_path):
    lines = [fx.line(r) for r in fx.train_rows(17, 3)]
    lf, _ = _run_chunk(tmp_path, "train", lines)
    crlf_path = tmp_path / "crlf.tsv"
    crlf_path.write_bytes(("\r\n".join([tsv.HEADER_LINE] + lines)).encode())  # no final EOL
    config = worker.ShardConfig(out_dir=str(tmp_path / "crlf_out"))
    chunk, = tsv.iter_chunks(str(crlf_path), 10, group_by_query=False)
    crlf = worker.process_chunk(worker.ChunkTask("train", str(crlf_path), chunk), config)
    assert (crlf["rows"], crlf["rejected"]) == (3, 0)
    assert open(os.path.join(config.out_dir, crlf["file"]), "rb").read() == \
        open(os.path.join(str(tmp_path / "out"), lf["file"]), "rb").read()


def test_writing_a_shard_does_not_import_tensorflow(tmp_path):
    # Workers frame TFRecords themselves so that they start without loading TensorFlow.
    path = fx.write_tsv(str(tmp_path / "train.tsv"), [fx.line(r) for r in fx.train_rows(19, 3)])
    code = (f"import sys\n"
            f"from data_prep import tsv, worker\n"
            f"chunk, = tsv.iter_chunks({path!r}, 10, group_by_query=False)\n"
            f"config = worker.ShardConfig(out_dir={str(tmp_path / 'out')!r}, gzip=True)\n"
            f"sidecar = worker.process_chunk(worker.ChunkTask('train', {path!r}, chunk), config)\n"
            f"assert sidecar['rows'] == 3, sidecar\n"
            f"assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_sidecar_records_the_shard_checksum_and_duplicate_products(tmp_path):
    rows = fx.grouped_rows(41, num_queries=2, per_query=3)
    lines = [fx.line(r) for r in rows]
    lines[1:1] = [lines[0], lines[0]]  # query 5000's first product twice more
    sidecar, config = _run_chunk(tmp_path, "test", lines)
    data = open(os.path.join(config.out_dir, sidecar["file"]), "rb").read()
    assert sidecar["crc32c"] == google_crc32c.value(data) and sidecar["bytes"] == len(data)
    assert (sidecar["rows"], sidecar["duplicates"]) == (8, 2)  # kept, and counted


def test_a_flipped_byte_is_rewritten_with_the_reason(tmp_path):
    lines = [fx.line(r) for r in fx.train_rows(42, 3)]
    first, config = _run_chunk(tmp_path, "train", lines)
    shard = os.path.join(config.out_dir, first["file"])
    data = bytearray(open(shard, "rb").read())
    data[100] ^= 0x10
    open(shard, "wb").write(bytes(data))
    again, _ = _run_chunk(tmp_path, "train", lines, config)
    assert not again["skipped"] and again["rewritten"].startswith(
        f"{shard}: content does not match its checksum")
    assert open(shard, "rb").read() != bytes(data) and again["crc32c"] == first["crc32c"]
    assert _run_chunk(tmp_path, "train", lines, config)[0]["rewritten"] is None


def test_disk_full_names_the_shard_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tfrecord.RecordWriter, "_put", full)
    with pytest.raises(OSError) as e:
        _run_chunk(tmp_path, "train", [fx.line(r) for r in fx.train_rows(43, 2)])
    shard = str(tmp_path / "out" / "train" / "part-00000.tfrecord")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, shard)
    assert os.listdir(tmp_path / "out" / "train") == []


def test_clear_caches_leaves_a_fresh_process_state_and_the_same_shard(tmp_path):
    rng = np.random.default_rng(21)
    lines = [fx.line(fx.random_row(rng, 1000 + i, 7, query=f"red silk dress {i % 2}",
                                   num_boxes=2)) for i in range(4)]
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    first, config = _run_chunk(tmp_path / "a", "train", lines)
    assert worker.normalize.cache_info().currsize > 0
    worker.clear_caches()
    assert worker.normalize.cache_info().currsize == 0
    assert worker._lemma.cache_info().currsize == 0
    again, again_config = _run_chunk(tmp_path / "b", "train", lines)
    with open(os.path.join(config.out_dir, first["file"]), "rb") as a, \
            open(os.path.join(again_config.out_dir, again["file"]), "rb") as b:
        assert a.read() == b.read()
