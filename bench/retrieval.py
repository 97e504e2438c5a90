"""Catalogue retrieval: exact vs ANN (ScaNN, faiss IVF) on 1M product embeddings, and the
in-graph exact search of the served retrieval SavedModel.

Embeddings. The product and query towers of a tiny export (random weights, the default
Config's pooled width E = 64) embed a generated catalogue with `mmrecall index` itself (so
the index path is exercised too) and the generated queries with `embed_query`. A Gaussian is
fitted to each set (mean and full covariance, plus 1e-4 on the diagonal) and --products
product and --queries query vectors are sampled from them and L2-normalised, as the towers'
outputs are. The result keeps the towers' anisotropy (a strong common direction: mean
cosine ~0.4 between products), which is harder for partitioning ANN indexes than isotropic
random vectors.

Figures (2 shared cores, everything in one process):
  exact            numpy brute force: single-query latency; the ground truth top 100
  scann, faiss-ivf ann.build with ann.default_params (and a small parameter sweep): build
                   time, resident memory added and bytes on disk, recall@10 and recall@100
                   of the exact top 10/100 over --queries queries, latency per single query
                   (p50, p99) and per batch of 64 queries (p50, p99 per batch)
  in_graph_exact   the served retrieval's added ops alone (matmul of a query embedding with
                   the [P, E] catalogue variable + top_k 100, TF1 Session) at 100k and 1M
                   products, single query and batch of 64; plus `embed_query` of the tiny
                   export (the query tower's share, a lower bound for a full-size tower)

Prints a table and writes JSON (default bench/results/retrieval.json):

    python bench/retrieval.py [--products 1000000] [--queries 1000] [--out FILE]
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tensorflow as tf  # noqa: E402

from data_prep.manifest import PrepDir  # noqa: E402
from export import list_fit, saved_model  # noqa: E402
from mmrecall_testing import export_fixtures as fx  # noqa: E402
from retrieval import ann  # noqa: E402
from retrieval import index as index_lib  # noqa: E402
from retrieval import model as model_lib  # noqa: E402
from retrieval import store  # noqa: E402
from mmrecall_testing.bench_report import write_report  # noqa: E402

WIDTH = 64            # the default Config's pooled_size
SINGLE_QUERIES = 300  # timed single-query searches per case
BATCHES = 15          # timed batches of 64 per case


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
               for f in fs) / 2 ** 20


def tower_embeddings(root: str):
    """Product embeddings [P0, E] (via `mmrecall index`) and query embeddings [Q0, E] of
    a tiny export's towers on a generated set."""
    gen = fx.generate(os.path.join(root, "gen"), train_rows=600, valid_queries=20,
                      test_queries=10, candidates=15)
    prep_dir = PrepDir(fx.prep(gen, os.path.join(root, "prep")))
    fx.random_checkpoint(os.path.join(root, "model"), prep_dir, pooled_size=WIDTH)
    export = saved_model.export_saved_model(os.path.join(root, "model"), prep_dir,
                                            os.path.join(root, "export"),
                                            list_stage=list_fit.OFF)
    products = [os.path.join(gen, f) for f in ("train.tsv", "valid.tsv", "testB.tsv")]
    model = model_lib.ExportModel(export)
    start = time.time()
    meta = index_lib.build_index(export, products, os.path.join(root, "index"), 64, 256,
                                 model=model)
    index_s = time.time() - start
    queries = sorted({r["query"] for p in products for r in fx.tsv_rows(p)})
    q_emb = model.embed_queries(queries)
    single = []
    for text in queries[:100]:
        t = time.perf_counter()
        model.embed_queries([text])
        single.append(time.perf_counter() - t)
    model.close()
    p_emb = np.asarray(store.Index(os.path.join(root, "index")).embeddings)
    return p_emb, q_emb, {"tiny_index_products": meta["count"], "tiny_index_s": index_s,
                          "tiny_queries": len(queries),
                          "embed_query_single_p50_ms": 1e3 * float(np.median(single))}


def sample_like(x: np.ndarray, n: int, rng) -> np.ndarray:
    """n L2-normalised float32 rows from a Gaussian fitted to x [m, E]."""
    mean = x.mean(0)
    chol = np.linalg.cholesky(np.cov(x, rowvar=False) + 1e-4 * np.eye(x.shape[1]))
    out = np.empty([n, x.shape[1]], np.float32)
    for start in range(0, n, 1 << 17):
        z = rng.standard_normal([min(1 << 17, n - start), x.shape[1]]).astype(np.float32)
        block = mean + z @ chol.T.astype(np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_truth(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows [Q, k] (best first), block by block over queries."""
    out = np.empty([len(queries), k], np.int64)
    for start in range(0, len(queries), 100):
        s = queries[start:start + 100] @ db.T                                   # [100, P]
        top = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        out[start:start + 100] = np.take_along_axis(top, order, 1)
    return out


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k
                          for f, t in zip(found, truth)]))


def latencies(fn, inputs) -> dict:
    times = []
    for x in inputs:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return {"p50_ms": 1e3 * float(np.percentile(times, 50)),
            "p99_ms": 1e3 * float(np.percentile(times, 99)), "n": len(times)}


def bench_ann(kind: str, db, queries, truth, tmp: str, sweep) -> dict:
    ann_dir = os.path.join(tmp, kind)
    rss = _rss_mb()
    start = time.time()
    meta = ann.build(db, ann_dir, kind)
    build_s = time.time() - start
    searcher = ann.load(meta, ann_dir, db)
    result = {"params": meta["params"], "build_s": build_s,
              "rss_added_mb": _rss_mb() - rss, "disk_mb": _dir_mb(ann_dir), "settings": []}
    for override in sweep:
        searcher.params = dict(meta["params"], **override)
        if kind == ann.FAISS_IVF:
            searcher._impl.nprobe = int(searcher.params["nprobe"])
        found, _ = searcher.search(queries, 100)
        singles = latencies(lambda q: searcher.search(q, 100),
                            [queries[i:i + 1] for i in range(SINGLE_QUERIES)])
        batches = latencies(lambda q: searcher.search(q, 100),
                            [queries[i * 64:(i + 1) * 64] for i in range(BATCHES)])
        row = {"search_params": {k: searcher.params[k] for k in override} or "default",
               "recall@10": recall(found, truth, 10), "recall@100": recall(found, truth, 100),
               "single": singles, "batch64": batches}
        result["settings"].append(row)
        print(f"{kind:10s} {json.dumps(row['search_params']):42s} r@10 {row['recall@10']:.3f} "
              f"r@100 {row['recall@100']:.3f}  single p50 {singles['p50_ms']:.2f} ms "
              f"p99 {singles['p99_ms']:.2f} ms  batch64 p50 {batches['p50_ms']:.1f} ms",
              flush=True)
    return result


def bench_in_graph(db: np.ndarray, queries: np.ndarray, sizes) -> dict:
    """matmul + top_k(100) against a [P, E] variable in a TF1 Session."""
    out = {}
    for size in sizes:
        with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
            init = tf.compat.v1.placeholder(tf.float32, [size, db.shape[1]])
            catalogue = tf.compat.v1.Variable(init, trainable=False, use_resource=True)
            q = tf.compat.v1.placeholder(tf.float32, [None, db.shape[1]])
            top = tf.math.top_k(tf.matmul(q, catalogue, transpose_b=True), k=100)
            sess.run(catalogue.initializer, {init: db[:size]})
            sess.run(top, {q: queries[:64]})                      # warm-up
            singles = latencies(lambda x: sess.run(top, {q: x}),
                                [queries[i:i + 1] for i in range(50)])
            batches = latencies(lambda x: sess.run(top, {q: x}),
                                [queries[i * 64:(i + 1) * 64] for i in range(10)])
        out[str(size)] = {"single": singles, "batch64": batches}
        print(f"in-graph exact {size:>8d}: single p50 {singles['p50_ms']:.2f} ms p99 "
              f"{singles['p99_ms']:.2f} ms  batch64 p50 {batches['p50_ms']:.1f} ms", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "retrieval.json"))
    args = parser.parse_args(argv)
    if args.queries < 64 * BATCHES or args.queries < SINGLE_QUERIES:
        parser.error(f"--queries must be >= {max(64 * BATCHES, SINGLE_QUERIES)}")
    started = time.time()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        p_tower, q_tower, tiny = tower_embeddings(os.path.join(tmp, "tiny"))
        print(f"tower embeddings: {len(p_tower)} products, {len(q_tower)} queries "
              f"(mean product cosine {float((p_tower @ p_tower.T).mean()):.2f})", flush=True)
        db = sample_like(p_tower, args.products, rng)
        queries = sample_like(q_tower, args.queries, rng)
        start = time.time()
        truth = exact_truth(db, queries, 100)
        exact = {"truth_s": time.time() - start,
                 "single": latencies(lambda q: ann.exact_top_k(db, q, 100),
                                     [queries[i:i + 1] for i in range(20)])}
        print(f"exact numpy: single p50 {exact['single']['p50_ms']:.1f} ms", flush=True)
        results = {
            ann.SCANN: bench_ann(ann.SCANN, db, queries, truth, tmp, [
                {}, {"leaves_to_search": 200}, {"leaves_to_search": 100, "reorder": 1000}]),
            ann.FAISS_IVF: bench_ann(ann.FAISS_IVF, db, queries, truth, tmp, [
                {}, {"nprobe": 64}, {"nprobe": 250}]),
        }
        in_graph = bench_in_graph(db, queries, sorted({min(100_000, args.products),
                                                             args.products}))
    report = {
        "bench": "retrieval", "products": args.products, "queries": args.queries,
        "width": WIDTH, "embeddings": "Gaussian fitted to a tiny export's tower outputs "
                                      "(random weights, E=64), L2-normalised",
        "tiny_export": tiny, "exact": exact, "ann": results, "in_graph_exact": in_graph,
        "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
        "tensorflow": tf.__version__, "total_s": time.time() - started,
    }
    write_report(args.out, report)
    print(f"-> {args.out} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
