"""`mmrecall index --runner beam` (retrieval/beam_embed.py) on a tiny export: the same index
directory as the local path (ids, locations, rejects, counts, fingerprint; embeddings within
float tolerance), bad rows counted and not fatal, byte ranges cut mid-line, the empty
catalogue, shards read back in catalogue order, the CLI switch."""
import json
import os

import numpy as np
import pytest

from data_prep import schema
from mmrecall_testing import export_fixtures as fx
from retrieval import beam_embed
from retrieval import index as index_lib
from retrieval import model as model_lib
from retrieval import store

BATCH, CHUNK = 16, 48       # the catalogue makes several chunks and batches


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("retrieval_beam"))
    gen, _, export = fx.tiny_export(root)
    # A catalogue with bad rows among good ones and a product repeated across files.
    rows = open(os.path.join(gen, "valid.tsv"), "rb").read().split(b"\n")
    bad_b64 = rows[2].split(b"\t")
    bad_b64[schema.TSV_COLUMNS.index("features")] = b"@@@@"
    bad_b64[schema.TSV_COLUMNS.index("product_id")] = b"999000001"
    dirty = os.path.join(root, "dirty.tsv")
    with open(dirty, "wb") as f:
        f.write(b"\n".join(rows[:4] + [b"\t".join(bad_b64), b"1\t2\t3", b""] + rows[4:]))
    products = [os.path.join(gen, "train.tsv"), dirty, os.path.join(gen, "testB.tsv")]
    local = os.path.join(root, "local")
    meta = index_lib.build_index(export, products, local, BATCH, CHUNK)
    yield dict(root=root, export=export, products=products, local=local, meta=meta)


def _index_files(path):
    index = store.Index(path)
    with open(os.path.join(path, "rejects.tsv"), encoding="utf-8") as f:
        rejects = f.read()
    return index, rejects


def test_beam_index_equals_the_local_index(world, tmp_path):
    out = str(tmp_path / "beam")
    # Ranges of 5000 bytes cut most rows in two: each row must still be read exactly once.
    meta = beam_embed.build_index(world["export"], world["products"], out, BATCH, CHUNK,
                                  range_bytes=5000)
    assert len(beam_embed.file_ranges(world["products"], 5000)) > 3 * len(world["products"])
    local, local_rejects = _index_files(world["local"])
    beam, beam_rejects = _index_files(out)
    assert beam.ids.tolist() == local.ids.tolist()
    np.testing.assert_array_equal(beam.locations, local.locations)
    np.testing.assert_allclose(beam.embeddings, local.embeddings, atol=1e-5)
    assert beam_rejects == local_rejects
    assert beam.fingerprint == local.fingerprint
    drop = ("resumed_chunks", "restarted")
    assert {k: v for k, v in meta.items() if k not in drop} == \
        {k: v for k, v in world["meta"].items() if k not in drop}
    assert sorted(os.listdir(out)) == sorted(os.listdir(world["local"]))
    assert not os.path.exists(out + beam_embed.SHARDS_SUFFIX)
    assert not os.path.exists(out + store.PARTIAL_SUFFIX)


def test_bad_rows_are_counted_not_fatal(world):
    meta = world["meta"]       # the local path's counts, which the test above matches
    assert meta["rejected"] == 2
    assert meta["reject_reasons"] == {"base64": 1, "column_count": 1}
    assert meta["duplicates"] > 0
    assert 999000001 not in store.Index(world["local"]).ids.tolist()


def test_empty_catalogue_is_an_error_and_leaves_nothing(world, tmp_path):
    path = fx.rejects_only_catalogue(str(tmp_path / "empty.tsv"))
    out = str(tmp_path / "idx")
    with pytest.raises(store.StoreError, match=fx.EMPTY_CATALOGUE_ERROR):
        beam_embed.build_index(world["export"], [path], out, BATCH, CHUNK)
    assert sorted(os.listdir(tmp_path)) == ["empty.tsv"]


def test_worker_with_another_export_stops(world):
    handler = beam_embed.ProductTowerHandler(world["export"], "0" * 64, BATCH)
    with pytest.raises(model_lib.ModelError, match="0000000000000000 on the launcher"):
        handler.load_model()


def test_first_row_keeps_the_earliest_location_and_counts_rows():
    combine = beam_embed.FirstRow()
    a = combine.add_input(combine.create_accumulator(), ((1, 50, 9), "late"))
    b = combine.add_input(combine.add_input(combine.create_accumulator(), ((0, 70, 9), "x")),
                          ((0, 10, 9), "first"))
    assert combine.extract_output(combine.merge_accumulators([a, b])) == \
        (((0, 10, 9), "first"), 3)


def test_shards_are_read_in_catalogue_order_and_a_rewritten_one_counts_once(tmp_path):
    shards, paths = str(tmp_path / "shards"), [str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]
    os.makedirs(shards)
    for path in paths:
        with open(path, "wb") as f:
            f.write(b"header\nrow one\nrow two\n")      # line 3 starts at byte 15
    emb = np.eye(3, dtype=np.float32)
    # (id, (file, offset, length), duplicate rows, embedding)
    retried = [(7, (1, 7, 7), 0, emb[0]), (5, (0, 15, 7), 2, emb[1])]
    write = beam_embed.WriteShard(shards)
    write.process(retried)
    write.process(retried)                                # a retried bundle's second shard
    write.process([(6, (0, 7, 7), 1, emb[2])])
    beam_embed.WriteShard(shards, rejects=True).process(
        [(1, 15, "line", "column_count", "3 columns"), (0, 15, "features", "base64", "x")])
    ids, locations, embeddings, duplicates, rejects = beam_embed.read_shards(shards, paths)
    assert ids.tolist() == [6, 5, 7]                      # by (file, offset)
    assert locations.tolist() == [[0, 7, 7], [0, 15, 7], [1, 7, 7]]
    np.testing.assert_array_equal(embeddings(np.array([2, 0])), emb[[0, 2]])
    assert duplicates == 3                                # 1 + 2 + 0, the retry once
    assert [(r.path, r.line, r.reason) for r in rejects] == [
        (paths[0], 3, "base64"), (paths[1], 3, "column_count")]


def test_cli_runner_beam_with_beam_args(world, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert index_lib.main(["--model", world["export"], "--products", world["products"][1],
                           "--out", out, "--batch-size", "8", "--no-progress",
                           "--runner", "beam", "--beam-args=--runner=DirectRunner"]) == 0
    assert "products" in capsys.readouterr().out
    with open(os.path.join(out, store.INDEX_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["rejected"] == 2 and meta["fingerprint"] == world["meta"]["fingerprint"]
