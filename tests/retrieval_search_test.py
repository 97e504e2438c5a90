"""`mmrecall search` and the served retrieval SavedModel on a tiny export: the submission CSV
scored by export.score, reranking equal to the `rank` signature on the same list, the
fingerprint / width / unknown-id errors, and the served `retrieve` signature loaded in a
fresh process (tensorflow + tensorflow_text only) returning the Python exact search's top K,
and query expansion (retrieval by the expanded query, the fused rerank, the flags)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_prep import schema
from data_prep.manifest import PrepDir
from export import list_fit
from export import saved_model
from export import score as score_lib
from export import signatures as sig_lib
from mmrecall_testing import export_fixtures as fx
from retrieval import expansion as expansion_lib
from retrieval import index as index_lib
from retrieval import model as model_lib
from retrieval import search as search_lib
from retrieval import served
from retrieval import store

K = 7


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("retrieval_search"))
    gen = fx.generate(os.path.join(root, "gen"))
    prep_dir = PrepDir(fx.prep(gen, os.path.join(root, "prep")))
    exports = {}
    for seed in (0, 1):                  # seed 1: another product tower, same width
        model_dir = os.path.join(root, f"model{seed}")
        fx.random_checkpoint(model_dir, prep_dir, seed=seed)
        exports[seed] = saved_model.export_saved_model(
            model_dir, prep_dir, os.path.join(root, f"export{seed}"), list_stage=list_fit.OFF)
    # The checkpoint of seed 0 exported again: the same product tower.
    exports["again"] = saved_model.export_saved_model(
        os.path.join(root, "model0"), prep_dir, os.path.join(root, "export_again"),
        list_stage=list_fit.OFF)
    products = [os.path.join(gen, f) for f in ("valid.tsv", "testB.tsv")]
    index_dir = os.path.join(root, "index")
    index_lib.build_index(exports[0], products, index_dir, 16, 32)
    searcher = search_lib.Searcher(index_dir, exports[0])
    yield dict(root=root, gen=gen, exports=exports, products=products, index=index_dir,
               searcher=searcher)
    searcher.close()


def test_queries_file_gives_a_submission_that_score_reads(world, tmp_path):
    out = str(tmp_path / "sub.csv")
    queries = os.path.join(world["gen"], "valid.tsv")      # extra columns are ignored
    assert search_lib.main(["--index", world["index"], "--model", world["exports"][0],
                            "--queries", queries, "--out", out, "--rerank", "20"]) == 0
    with open(out, encoding="utf-8") as f:
        lines = [l.rstrip("\n").split(",") for l in f]
    assert tuple(lines[0]) == schema.SUBMISSION_HEADER
    expected_ids = list(dict.fromkeys(r["query_id"] for r in fx.tsv_rows(queries)))
    assert [l[0] for l in lines[1:]] == expected_ids
    assert all(len(set(l[1:])) == schema.NDCG_K for l in lines[1:])
    catalogue = set(store.Index(world["index"]).ids.tolist())
    assert all(int(p) in catalogue for l in lines[1:] for p in l[1:])
    result = score_lib.score_files(os.path.join(world["gen"], "valid_answer.json"), out)
    assert 0.0 <= result["ndcg@5"] <= 1.0 and result["queries"] == len(expected_ids)


def test_rerank_orders_candidates_by_the_rank_signature(world):
    searcher = search_lib.Searcher(world["index"], world["exports"][0],
                                   model=world["searcher"].model, expansion=expansion_lib.OFF)
    text = fx.tsv_rows(world["products"][0])[0]["query"]
    ids, retrieval_scores = searcher.retrieve([text], 12, exact=True)
    hits = searcher.search([text], k=5, rerank=12, exact=True)[0]
    # The same 12 candidates sent to `rank` by hand, in retrieval order.
    fields = searcher._fields(ids[0].tolist())
    fields[sig_lib.QUERY] = [text.encode()] * 12
    scores = searcher.model.score_lists([fields])[0]
    expected = [int(ids[0][i]) for i in np.argsort(-scores, kind="stable")[:5]]
    assert [h.product_id for h in hits] == expected
    np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:5], rtol=1e-6)
    # Without rerank: the retrieval order and scores.
    plain = searcher.search([text], k=5, rerank=0, exact=True)[0]
    assert [h.product_id for h in plain] == ids[0][:5].tolist()
    np.testing.assert_allclose([h.score for h in plain], retrieval_scores[0][:5], rtol=1e-6)


def test_expansion_retrieves_by_the_expanded_query_and_fuses_the_rerank(world):
    searcher = world["searcher"]
    assert searcher.expansion == expansion_lib.Expansion() and searcher.expansion.active
    index = store.Index(world["index"])
    texts = [r["query"] for r in fx.tsv_rows(world["products"][0])[::11]][:4]
    # By hand: the m nearest products' unit centroid, then q^ + weight * c^, exact search.
    query = searcher.model.embed_queries(texts)
    emb = np.asarray(index.embeddings)
    first = np.argsort(-(query @ emb.T), axis=1, kind="stable")[:, :searcher.expansion.m]
    centroid = emb[first].sum(1)
    centroid /= np.linalg.norm(centroid, axis=1, keepdims=True)
    expanded = (query / np.linalg.norm(query, axis=1, keepdims=True)
                + searcher.expansion.weight * centroid)
    ids, scores = searcher.retrieve(texts, 12, exact=True)
    expected = np.sort(expanded @ emb.T, axis=1)[:, ::-1][:, :12]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert ids.tolist() != search_lib.Searcher(
        world["index"], world["exports"][0], model=searcher.model,
        expansion=expansion_lib.OFF).retrieve(texts, 12, exact=True)[0].tolist()
    # The rerank: z(rank score) + weight * z(centroid similarity) over the 12 retrieved.
    hits = searcher.search(texts[:1], k=5, rerank=12, exact=True)[0]
    fields = searcher._fields(ids[0].tolist())
    fields[sig_lib.QUERY] = [texts[0].encode()] * 12
    served_scores = searcher.model.score_lists([fields])[0]
    similarity = emb[index.row_of(ids[0].tolist())].astype(np.float64) @ centroid[0]
    z = lambda x: (x - x.mean()) / x.std()
    fused = z(served_scores.astype(np.float64)) + searcher.expansion.weight * z(similarity)
    assert [h.product_id for h in hits] == [int(ids[0][i]) for i in
                                            np.argsort(-fused, kind="stable")[:5]]
    # z-scores are unit scale, so float32 inputs (two `rank` calls, two centroid sums) agree
    # to an absolute 1e-5, not a relative one near zero.
    np.testing.assert_allclose([h.score for h in hits], np.sort(fused)[::-1][:5],
                               rtol=1e-5, atol=1e-5)


def test_expansion_flags(world, capsys):
    common = ["--index", world["index"], "--model", world["exports"][0], "--query", "red dress",
              "--k", "3", "--exact"]
    assert search_lib.main(common + ["--rerank", "0"]) == 0
    expanded = capsys.readouterr().out
    assert search_lib.main(common + ["--rerank", "0", "--expand-weight", "0"]) == 0
    plain = capsys.readouterr().out
    ids, scores = search_lib.Searcher(world["index"], world["exports"][0],
                                      model=world["searcher"].model,
                                      expansion=expansion_lib.OFF).retrieve(["red dress"], 3,
                                                                            exact=True)
    assert [int(l.split("\t")[1]) for l in plain.strip().split("\n")[1:]] == ids[0].tolist()
    assert expanded != plain
    with pytest.raises(SystemExit) as e:
        search_lib.main(common + ["--expand-weight", "-1"])
    assert e.value.code == 2 and "weight >= 0" in capsys.readouterr().err


def test_single_query_prints_k_results(world, capsys):
    assert search_lib.main(["--index", world["index"], "--model", world["exports"][0],
                            "--query", "red dress", "--k", "3", "--rerank", "10"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0] == "rank\tproduct_id\tscore\tretrieval_score"
    assert [l.split("\t")[0] for l in lines[1:]] == ["1", "2", "3"]


def test_other_product_tower_is_refused_naming_both_fingerprints(world, capsys):
    index_fp = store.Index(world["index"]).fingerprint
    other = model_lib.ExportModel(world["exports"][1])
    try:
        other_fp = other.fingerprint
        assert other_fp != index_fp
        with pytest.raises(store.StoreError) as e:
            search_lib.Searcher(world["index"], world["exports"][1], model=other)
    finally:
        other.close()
    message = str(e.value)
    assert index_fp in message and other_fp in message and "\n" not in message
    assert search_lib.main(["--index", world["index"], "--model", world["exports"][1],
                            "--query", "red dress"]) == 1
    assert index_fp in capsys.readouterr().err


def test_a_new_export_of_the_same_checkpoint_searches_the_index(world):
    again = search_lib.Searcher(world["index"], world["exports"]["again"])
    try:
        assert again.model.path != world["searcher"].model.path
        assert again.model.fingerprint == store.Index(world["index"]).fingerprint
        text = ["red dress"]
        assert again.retrieve(text, 5, exact=True)[0].tolist() == \
            world["searcher"].retrieve(text, 5, exact=True)[0].tolist()
    finally:
        again.close()


def test_width_mismatch_unknown_id_and_unfinished_index_are_one_line_errors(world, tmp_path):
    index = store.Index(world["index"])
    with pytest.raises(store.StoreError, match=r"^width mismatch: .* holds \d+-wide .* "
                                                 r"makes 99-wide"):
        index.check_model(index.fingerprint, 99, "other_model")
    with pytest.raises(store.StoreError, match=r"^width mismatch"):
        index.search(np.zeros([1, index.width + 1], np.float32), 3)
    with pytest.raises(store.StoreError, match=r"^unknown product id 4242: not in the index"):
        index.row_of([int(index.ids[0]), 4242])
    with pytest.raises(store.StoreError, match="not a finished index"):
        store.Index(str(tmp_path))


def test_queries_file_errors(world, tmp_path):
    bad = tmp_path / "q.tsv"
    bad.write_text("query\tid\nred dress\t1\n", encoding="utf-8")
    with pytest.raises(search_lib.SearchError, match="`query` and `query_id`"):
        search_lib.read_queries(str(bad))
    ok = tmp_path / "ok.tsv"
    ok.write_text("query_id\tquery\textra\n7\tred dress\tx\n7\tred dress\ty\n8\tshoes\tz\n",
                  encoding="utf-8")
    assert search_lib.read_queries(str(ok)) == [("7", "red dress"), ("8", "shoes")]
    # A competition row's features column is far longer than the csv module's field limit.
    wide = tmp_path / "wide.tsv"
    wide.write_text("\ufeffquery_id\tfeatures\tquery\n9\t" + "A" * 300_000 + "\tblue lamp\n",
                    encoding="utf-8")
    assert search_lib.read_queries(str(wide)) == [("9", "blue lamp")]


def test_served_retrieval_in_a_fresh_process_equals_exact_python_search(world, tmp_path):
    path = served.export_served_retrieval(world["index"], world["exports"][0],
                                          str(tmp_path / "served"), k=K, version=3)
    assert os.path.basename(path) == "3"
    with open(os.path.join(path, "assets.extra", served.METADATA_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["fingerprint"] == store.Index(world["index"]).fingerprint
    assert meta["expansion"] == world["searcher"].expansion.to_dict()
    queries = [r["query"] for r in fx.tsv_rows(world["products"][0])[::9]] + ["red dress"]
    # What TF Serving does: the TF1 loader into a Session, then the signature's tensors.
    script = textwrap.dedent("""
        import json, sys
        import tensorflow as tf
        import tensorflow_text  # noqa: F401
        graph = tf.Graph()
        with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
            meta = tf.compat.v1.saved_model.load(sess, ["serve"], sys.argv[1])
            sig = meta.signature_def["retrieve"]
            ids, scores = sess.run(
                [sig.outputs["product_ids"].name, sig.outputs["scores"].name],
                {sig.inputs["query"].name: [q.encode() for q in json.loads(sys.argv[2])]})
        project = sorted(m for m in sys.modules
                         if m.split(".")[0] in ("retrieval", "export", "estimator", "data_prep"))
        print(json.dumps({"ids": ids.tolist(), "scores": scores.tolist(), "project": project}))
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", script, path, json.dumps(queries)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["project"] == []
    ids, scores = world["searcher"].retrieve(queries, K, exact=True)   # expanded, as served
    assert got["ids"] == ids.tolist()
    np.testing.assert_allclose(got["scores"], scores, atol=1e-5)


def test_served_retrieval_refuses_another_product_tower(world, tmp_path):
    with pytest.raises(store.StoreError, match="not the one that built the index"):
        served.export_served_retrieval(world["index"], world["exports"][1],
                                       str(tmp_path / "served"))
