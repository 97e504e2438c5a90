"""`mmrecall index` on a tiny export: the index directory, rejects and duplicates, resumption
after a kill (chunks kept, result identical), restart on a different run, the empty
catalogue, and exact top-k worked by hand."""
import json
import os
import shutil

import numpy as np
import pytest

from data_prep import schema
from mmrecall_testing import export_fixtures as fx
from retrieval import ann
from retrieval import catalogue
from retrieval import index as index_lib
from retrieval import model as model_lib
from retrieval import store

BATCH, CHUNK = 16, 48       # 3 batches a chunk; the tiny catalogue makes 5 chunks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("retrieval_index"))
    gen, _, path = fx.tiny_export(root)
    products = [os.path.join(gen, f) for f in ("train.tsv", "valid.tsv", "testB.tsv")]
    model = model_lib.ExportModel(path)
    full = os.path.join(root, "full")
    meta = index_lib.build_index(path, products, full, BATCH, CHUNK, model=model)
    yield dict(root=root, gen=gen, export=path, products=products, model=model, full=full,
               meta=meta)
    model.close()


def _distinct_ids(paths):
    ids = []
    for p in paths:
        for row in fx.tsv_rows(p):
            if int(row["product_id"]) not in ids:
                ids.append(int(row["product_id"]))
    return ids


def test_index_holds_each_product_once_with_its_tower_embedding(world):
    index = store.Index(world["full"])
    expected_ids = _distinct_ids(world["products"])
    assert index.ids.tolist() == expected_ids            # catalogue order, first occurrence
    assert len(index) == len(expected_ids) == world["meta"]["count"]
    assert world["meta"]["duplicates"] == sum(len(fx.tsv_rows(p)) for p in world["products"]) \
        - len(expected_ids)
    assert index.embeddings.dtype == np.float32
    assert index.embeddings.shape == (len(expected_ids), world["model"].width)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    # Row 7 re-read from its location and embedded alone: the stored embedding.
    reader = index.row_reader()
    fields = reader.fields(index.ids[7], index.locations[7])
    reader.close()
    alone = world["model"].embed_products({k: [v] for k, v in fields.items()})
    np.testing.assert_allclose(alone[0], index.embeddings[7], atol=1e-5)
    assert index.fingerprint == world["model"].fingerprint
    assert len(index.fingerprint) == 64
    assert world["meta"]["ann"]["kind"] == ann.EXACT    # far below MIN_ANN_PRODUCTS
    assert sorted(os.listdir(world["full"])) == sorted(
        ["ann", "embeddings.npy", "ids.npy", "index.json", "locations.npy", "rejects.tsv"])
    assert not os.path.exists(world["full"] + store.PARTIAL_SUFFIX)


def test_fingerprint_is_stable_across_loads(world):
    again = model_lib.ExportModel(world["export"])
    try:
        assert again.fingerprint == world["model"].fingerprint
    finally:
        again.close()


def test_bad_rows_are_rejected_with_line_field_reason(world, tmp_path):
    rows = open(world["products"][1], "rb").read().split(b"\n")
    good = rows[1].split(b"\t")
    bad_b64 = list(good)
    bad_b64[schema.TSV_COLUMNS.index("features")] = b"@@@@"
    bad_b64[0] = b"999000001"
    odd_query = list(good)     # an undecodable query: the product is still indexed
    odd_query[0] = b"999000002"
    odd_query[schema.TSV_COLUMNS.index("query")] = b"\xff\xfe"
    odd_query[schema.TSV_COLUMNS.index("query_id")] = b"not-an-id"
    path = str(tmp_path / "cat.tsv")
    with open(path, "wb") as f:
        f.write(b"\n".join([rows[0], rows[1], b"\t".join(bad_b64), b"\t".join(odd_query),
                            b"1\t2\t3", rows[1]]) + b"\n")
    meta = index_lib.build_index(world["export"], [path], str(tmp_path / "idx"), 4, 8,
                                 model=world["model"])
    assert meta["count"] == 2 and meta["rejected"] == 2 and meta["duplicates"] == 1
    assert meta["reject_reasons"] == {"base64": 1, "column_count": 1}
    with open(tmp_path / "idx" / "rejects.tsv", encoding="utf-8") as f:
        lines = [l.rstrip("\n").split("\t") for l in f]
    assert lines[0] == catalogue.REJECTS_HEADER.rstrip("\n").split("\t")
    assert [l[1:4] for l in lines[1:]] == [["3", "features", "base64"],
                                           ["5", "line", "column_count"]]
    assert store.Index(str(tmp_path / "idx")).ids.tolist() == [int(good[0]), 999000002]


class Killed(BaseException):
    """Stands for a kill: raised from inside the run, caught by nothing in it."""


def _killed_after_chunk(world, out: str, last: int) -> None:
    """Runs build_index on world's catalogue into out, killed once chunk `last` is written."""

    def kill(k, meta):
        if k == last:
            raise Killed()

    with pytest.raises(Killed):
        index_lib.build_index(world["export"], world["products"], out, BATCH, CHUNK,
                              model=world["model"], on_chunk=kill)


def test_resume_after_a_kill_keeps_chunks_and_gives_the_same_index(world, tmp_path):
    out = str(tmp_path / "idx")
    _killed_after_chunk(world, out, 2)
    # Nothing that looks complete; the search error says how to go on.
    assert not os.path.exists(out)
    with pytest.raises(store.StoreError, match="interrupted.*resume"):
        store.Index(out)
    chunks = os.path.join(out + store.PARTIAL_SUFFIX, "chunks")
    assert sorted(n for n in os.listdir(chunks) if n.endswith(".json")) == [
        "00000.json", "00001.json", "00002.json"]
    # A chunk cut short by the kill: data written, json not yet.
    shutil.copy(os.path.join(chunks, "00002.ids.npy"), os.path.join(chunks, "00003.ids.npy"))

    meta = index_lib.build_index(world["export"], world["products"], out, BATCH, CHUNK,
                                 model=world["model"])
    assert meta["resumed_chunks"] == 3 and not meta["restarted"]
    full, resumed = store.Index(world["full"]), store.Index(out)
    assert np.array_equal(full.ids, resumed.ids)
    assert np.array_equal(np.asarray(full.embeddings), np.asarray(resumed.embeddings))
    assert np.array_equal(np.asarray(full.locations), np.asarray(resumed.locations))
    assert (meta["count"], meta["duplicates"]) == (world["meta"]["count"],
                                                   world["meta"]["duplicates"])


def test_corrupt_chunk_is_redone_and_other_runs_restart(world, tmp_path):
    out = str(tmp_path / "idx")
    _killed_after_chunk(world, out, 3)
    chunk1 = os.path.join(out + store.PARTIAL_SUFFIX, "chunks", "00001.embeddings.npy")
    with open(chunk1, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")                # checksum no longer holds: chunks 1.. redone
    meta = index_lib.build_index(world["export"], world["products"], out, BATCH, CHUNK,
                                 model=world["model"])
    assert meta["resumed_chunks"] == 1
    assert np.array_equal(np.asarray(store.Index(out).embeddings),
                          np.asarray(store.Index(world["full"]).embeddings))

    _killed_after_chunk(world, str(tmp_path / "b"), 3)
    # Another chunk size is another run: the partial directory is started again.
    meta = index_lib.build_index(world["export"], world["products"], str(tmp_path / "b"),
                                 BATCH, 2 * CHUNK, model=world["model"])
    assert meta["restarted"] and meta["resumed_chunks"] == 0
    assert store.Index(str(tmp_path / "b")).ids.tolist() == store.Index(world["full"]).ids.tolist()


def test_rerun_replaces_a_finished_index(world, tmp_path):
    out = str(tmp_path / "idx")
    index_lib.build_index(world["export"], world["products"][2:], out, BATCH, CHUNK,
                          model=world["model"])
    small = len(store.Index(out))
    index_lib.build_index(world["export"], world["products"][1:], out, BATCH, CHUNK,
                          model=world["model"])
    assert len(store.Index(out)) > small
    assert not os.path.exists(out + store.PARTIAL_SUFFIX)


def test_empty_catalogue_is_an_error_and_leaves_nothing(world, tmp_path):
    path = fx.rejects_only_catalogue(str(tmp_path / "empty.tsv"))
    out = str(tmp_path / "idx")
    with pytest.raises(store.StoreError, match=fx.EMPTY_CATALOGUE_ERROR):
        index_lib.build_index(world["export"], [path], out, BATCH, CHUNK, model=world["model"])
    assert not os.path.exists(out) and not os.path.exists(out + store.PARTIAL_SUFFIX)
    assert index_lib.main(["--model", world["export"], "--products", path, "--out", out,
                           "--no-progress"]) == 1


def test_cli_writes_the_index(world, tmp_path, capsys):
    out = str(tmp_path / "idx")
    assert index_lib.main(["--model", world["export"], "--products", world["products"][2],
                           "--out", out, "--batch-size", "8", "--chunk-rows", "16",
                           "--no-progress"]) == 0
    assert "products" in capsys.readouterr().out
    with open(os.path.join(out, store.INDEX_FILE), encoding="utf-8") as f:
        assert json.load(f)["count"] == len(_distinct_ids(world["products"][2:]))


def test_exact_top_k_by_hand(monkeypatch):
    emb = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.6, 0.8]], np.float32)
    q = np.array([[0.8, 0.6]], np.float32)
    # Scores 0.8, 0.6, 0.96, 0.96: rows 2 and 3 tie (lower row first), then 0, then 1.
    rows, scores = ann.exact_top_k(emb, q, 3)
    assert rows.tolist() == [[2, 3, 0]]
    np.testing.assert_allclose(scores, [[0.96, 0.96, 0.8]], rtol=1e-6)
    monkeypatch.setattr(ann, "_EXACT_BLOCK", 3)       # blocks 0..2, 3: the same answer
    assert ann.exact_top_k(emb, q, 3)[0].tolist() == [[2, 3, 0]]


@pytest.mark.parametrize("kind", [ann.SCANN, ann.FAISS_IVF])
def test_ann_index_finds_most_exact_neighbours(kind, tmp_path):
    pytest.importorskip({ann.SCANN: "scann", ann.FAISS_IVF: "faiss"}[kind])
    rng = np.random.default_rng(3)
    emb = rng.standard_normal([4000, 16]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = emb[:50] + 0.1 * rng.standard_normal([50, 16]).astype(np.float32)
    # Generous search parameters: this checks the plumbing (row mapping, save, load after
    # the directory moved, as the index's rename does), not the library's recall.
    params = {ann.SCANN: {"num_leaves": 40, "leaves_to_search": 20},
              ann.FAISS_IVF: {"nlist": 40, "nprobe": 20}}[kind]
    meta = ann.build(emb, str(tmp_path / "built"), kind, params)
    os.rename(tmp_path / "built", tmp_path / "ann")
    searcher = ann.load(meta, str(tmp_path / "ann"), emb)
    rows, _ = searcher.search(queries, 10)
    exact, _ = ann.exact_top_k(emb, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
    assert recall > 0.9, recall
    one, _ = searcher.search(queries[:1], 10)           # the single-query path
    assert one.shape == (1, 10)
