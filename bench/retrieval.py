"""Catalogue retrieval: exact vs ANN (ScaNN, faiss IVF) on 1M product embeddings, and the
in-graph exact search of the served retrieval SavedModel.

Embeddings. The product and query towers of a tiny export (random weights, the default
Config's pooled width E, 128 today) embed a generated catalogue with `mmrecall index`
itself (so the index path is exercised too) and the generated queries with `embed_query`.
A Gaussian is fitted to each set (mean and full covariance, plus 1e-4 on the diagonal) and
--products product and --queries query vectors are sampled from them and L2-normalised, as
the towers' outputs are. The result keeps the towers' anisotropy (a strong common
direction: mean cosine 0.4-0.9 between products, by run), which is harder for partitioning
ANN indexes than isotropic random vectors.

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

End to end (--end-to-end RUN_DIR, a finished ./run_train.sh run directory; JSON default
bench/results/retrieval_end_to_end.json): the run's valid and test products as one
catalogue indexed by `mmrecall index` with the run's export, the test queries searched by
`mmrecall search --queries` and scored by `mmrecall score` (each a subprocess, as a user
runs them), five ways: reranked by the served ranking (`--rerank 100`), by the pair score
alone (`--first-stage`), and the towers alone (`--rerank 0`), all with the default query
expansion (retrieval/expansion.py), then the first and last again without it
(`--expand-weight 0`, the baseline); recall@100, each query's answers found among the 100
the index retrieves (retrieval.search.Searcher.retrieve, what the search reranks), averaged
over queries, with and without expansion. Beside them, the baseline of the same run: the
candidate-list NDCG@5 of the same model (RUN_DIR/test_score.txt and
test_first_stage_score.txt), which ranks only each query's ~30 given candidates.

    python bench/retrieval.py --end-to-end RUN_DIR [--data-dir DATA_DIR] [--out FILE]

Memory of `mmrecall index` (--memory RUN_DIR; JSON default bench/results/
retrieval_memory.json): catalogues of --memory-sizes product rows made by cycling the run's
TSV rows with fresh product ids (every row a distinct product), each indexed with the run's
export in a fresh process that reports its peak resident memory (ru_maxrss): exact search
at every size (the streaming part and the final concatenation), ScaNN at the largest (the
ANN build's share), the Beam path at the smallest when apache-beam is installed and it is
at most BEAM_MAX_PRODUCTS (the DirectRunner holds the shuffled rows in memory). The
baseline, measured in the same run, is a process that only loads the export; growth per
product is the slope between the sizes. Also the seen-id set's own bytes per product
(tracemalloc over a set of that many ids).

    python bench/retrieval.py --memory RUN_DIR [--memory-sizes 20000,100000]
                              [--memory-chunk-rows 65536] [--out FILE]
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tensorflow as tf  # noqa: E402

from mmrecall_testing import export_fixtures as fx  # noqa: E402
from retrieval import ann  # noqa: E402
from retrieval import catalogue as catalogue_lib  # noqa: E402
from retrieval import expansion as expansion_lib  # noqa: E402
from retrieval import index as index_lib  # noqa: E402
from retrieval import model as model_lib  # noqa: E402
from retrieval import search as search_lib  # noqa: E402
from retrieval import store  # noqa: E402
from mmrecall_testing.bench_report import write_report  # noqa: E402
from estimator.config import Config  # noqa: E402

WIDTH = Config().pooled_size  # E, the default retrieval width
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
    _, _, export = fx.tiny_export(root, gen_dir=gen, pooled_size=WIDTH)
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


def _child(args) -> subprocess.CompletedProcess:
    """Runs Python with args in a subprocess that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)


def _mmrecall(*args: str) -> str:
    """Runs `mmrecall ARGS` as a user would (a subprocess); returns its stdout."""
    done = _child(["-m", "mmrecall_cli", *args])
    if done.returncode:
        raise RuntimeError(f"mmrecall {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def answer_recall(answers: dict, queries, retrieved: np.ndarray) -> float:
    """Mean over queries of the share of a query's answers among its retrieved ids.

    Args:
      answers: {query id (str): [answer product ids]}.
      queries: [(query id, text)] in the order of retrieved's rows.
      retrieved: int64 [Q, R] product ids.
    """
    shares = [len(set(map(int, answers[qid])) & set(row.tolist())) / len(answers[qid])
              for (qid, _), row in zip(queries, retrieved)]
    return float(np.mean(shares))


def end_to_end(run_dir: str, tmp: str, rerank: int = 100, data_dir: str = "") -> dict:
    """Catalogue search on a finished run_train.sh run (module docstring); its TSVs in
    data_dir (default RUN_DIR/data, where run_train.sh generates them)."""
    data = data_dir or os.path.join(run_dir, "data")
    export = os.path.join(run_dir, "export")
    catalogue_files = [os.path.join(data, "valid.tsv"), os.path.join(data, "testB.tsv")]
    test, answers_path = os.path.join(data, "testB.tsv"), os.path.join(data, "testB_answer.json")
    index_dir = os.path.join(tmp, "index")
    start = time.time()
    _mmrecall("index", "--model", export, "--products", *catalogue_files, "--out", index_dir,
              "--no-progress")
    index_s = time.time() - start
    meta = _read_json(os.path.join(index_dir, store.INDEX_FILE))
    print(f"index: {meta['count']} products ({meta['rejected']} rejected, {meta['duplicates']} "
          f"duplicate rows), ANN {meta['ann']['kind']}, {index_s:.1f} s", flush=True)
    off = ["--expand-weight", "0"]
    ways = {"reranked_served": ["--rerank", str(rerank)],
            "reranked_first_stage": ["--rerank", str(rerank), "--first-stage"],
            "towers_alone": ["--rerank", "0"],
            "reranked_served_no_expansion": ["--rerank", str(rerank)] + off,
            "towers_alone_no_expansion": ["--rerank", "0"] + off}
    ndcg, search_s = {}, {}
    for way, flags in ways.items():
        out = os.path.join(tmp, way + ".csv")
        start = time.time()
        _mmrecall("search", "--index", index_dir, "--model", export, "--queries", test,
                  "--out", out, *flags)
        search_s[way] = time.time() - start
        ndcg[way] = json.loads(_mmrecall("score", "--answers", answers_path,
                                         "--submission", out))["ndcg@5"]
        print(f"catalogue search, {way:22s} NDCG@5 {ndcg[way]:.4f} ({search_s[way]:.1f} s)",
              flush=True)
    queries = search_lib.read_queries(test)
    answers = _read_json(answers_path)
    recall_at = {}
    for name, expansion in (("expanded", expansion_lib.Expansion()),
                            ("no_expansion", expansion_lib.OFF)):
        searcher = search_lib.Searcher(index_dir, export, expansion=expansion)
        try:
            retrieved, _ = searcher.retrieve([t for _, t in queries], rerank)
        finally:
            searcher.close()
        recall_at[name] = answer_recall(answers, queries, retrieved)
    candidate_lists = {
        "served": _read_json(os.path.join(run_dir, "test_score.txt"))["ndcg@5"],
        "first_stage": _read_json(os.path.join(run_dir, "test_first_stage_score.txt"))["ndcg@5"]}
    print(f"recall@{rerank} of the answers {recall_at['expanded']:.4f} (without query "
          f"expansion {recall_at['no_expansion']:.4f}); candidate lists (same model): "
          f"served NDCG@5 {candidate_lists['served']:.4f}, first stage "
          f"{candidate_lists['first_stage']:.4f}", flush=True)
    return {"run_dir": os.path.abspath(run_dir), "catalogue_products": meta["count"],
            "catalogue_files": catalogue_files, "ann": meta["ann"]["kind"],
            "test_queries": len(queries), "index_s": index_s, "search_s": search_s,
            f"recall@{rerank}": recall_at["expanded"],
            f"recall@{rerank}_no_expansion": recall_at["no_expansion"],
            "expansion": expansion_lib.Expansion().to_dict(), "ndcg@5_catalogue": ndcg,
            "ndcg@5_candidate_lists": candidate_lists,
            "ratio_served_catalogue_to_candidate_lists":
                ndcg["reranked_served"] / candidate_lists["served"]}


_PEAK_RSS = ("import resource, sys\n"
             "from retrieval import index, model\n"
             "if sys.argv[1] == 'load':\n"
             "    model.ExportModel(sys.argv[2]).close(); status = 0\n"
             "else:\n"
             "    status = index.main(sys.argv[1:])\n"
             "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
             "sys.exit(status)\n")


def _peak_rss_mb(*args: str) -> float:
    """Peak resident memory (MB) of a fresh process running `mmrecall index ARGS` (or, with
    ARGS = ("load", EXPORT), only loading the export)."""
    done = _child(["-c", _PEAK_RSS, *args])
    if done.returncode:
        raise RuntimeError(f"index {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.split("PEAK_RSS_KB")[-1].split()[0]) / 1024


def cycled_catalogue(sources, rows: int, path: str) -> None:
    """Writes `rows` product rows (header first) cycling the sources' data rows, product id
    900000000 + row number: every row a distinct product."""
    with open(path, "wb") as out:
        with open(sources[0], "rb") as f:
            out.write(f.readline())
        written = 0
        while written < rows:
            for source in sources:
                with open(source, "rb") as f:
                    f.readline()
                    for line in f:
                        if written == rows:
                            return
                        out.write(b"%d\t" % (900000000 + written) + line.split(b"\t", 1)[1])
                        written += 1


def seen_set_bytes_per_id(n: int) -> dict:
    """Bytes per product of n int64 product ids kept as seen, added one at a time as
    catalogue.iter_rows adds them: catalogue.IdSet (what it keeps) against the Python set it
    kept before (the baseline). Peak traced bytes, so the IdSet's merge copies count."""
    import tracemalloc  # noqa: E402  # stdlib, only this figure needs it

    ids = np.arange(900000000, 900000000 + n, dtype=np.int64).tolist()
    out = {}
    for name, make in (("python_set", set), ("id_set", catalogue_lib.IdSet)):
        tracemalloc.start()
        seen = make()
        for product_id in ids:
            seen.add(product_id)
        out[name] = tracemalloc.get_traced_memory()[1] / n
        tracemalloc.stop()
        del seen
    return out


BEAM_MAX_PRODUCTS = 50000   # the DirectRunner holds the shuffled rows (~40 KB each) in memory


def index_memory(run_dir: str, tmp: str, sizes, chunk_rows: int = 65536,
                 data_dir: str = "") -> dict:
    """Peak RSS of `mmrecall index` at several catalogue sizes (module docstring); the
    run's TSVs in data_dir (default RUN_DIR/data)."""
    data = data_dir or os.path.join(run_dir, "data")
    export = os.path.join(run_dir, "export")
    sources = [os.path.join(data, f) for f in ("train.tsv", "valid.tsv", "testB.tsv")]
    sizes = sorted(sizes)
    result = {"load_only_mb": _peak_rss_mb("load", export), "chunk_rows": chunk_rows,
              "runs": []}
    print(f"load the export only: peak RSS {result['load_only_mb']:.0f} MB", flush=True)
    for size in sizes:
        path = os.path.join(tmp, f"catalogue_{size}.tsv")
        cycled_catalogue(sources, size, path)
        cases = [("local", "exact")] + ([("local", "scann")] if size == sizes[-1] else [])
        try:
            import apache_beam  # noqa: F401,E402  # optional: the Beam case runs if installed
            cases += [("beam", "exact")] if size == sizes[0] <= BEAM_MAX_PRODUCTS else []
        except ImportError:
            pass
        for runner, kind in cases:
            out = os.path.join(tmp, f"index_{size}_{runner}_{kind}")
            start = time.time()
            peak = _peak_rss_mb("--model", export, "--products", path, "--out", out,
                                "--ann", kind, "--no-progress", "--runner", runner,
                                "--chunk-rows", str(chunk_rows))
            row = {"products": size, "runner": runner, "ann": kind, "peak_rss_mb": peak,
                   "added_to_load_mb": peak - result["load_only_mb"],
                   "seconds": time.time() - start,
                   "catalogue_mb": os.path.getsize(path) / 2 ** 20}
            result["runs"].append(row)
            print(f"index {size:>7d} products, {runner:5s} {kind:5s}: peak RSS {peak:.0f} MB "
                  f"(+{row['added_to_load_mb']:.0f} over loading), {row['seconds']:.0f} s",
                  flush=True)
            shutil.rmtree(out)
        os.remove(path)
    exact = [r for r in result["runs"] if r["runner"] == "local" and r["ann"] == "exact"]
    if len(exact) > 1:
        result["exact_growth_bytes_per_product"] = (
            (exact[-1]["peak_rss_mb"] - exact[0]["peak_rss_mb"]) * 2 ** 20
            / (exact[-1]["products"] - exact[0]["products"]))
    result["seen_set_bytes_per_product"] = seen_set_bytes_per_id(sizes[-1])
    seen = result["seen_set_bytes_per_product"]
    print(f"growth {result.get('exact_growth_bytes_per_product', float('nan')):.0f} bytes per "
          f"product (exact); the seen ids alone {seen['id_set']:.1f} bytes per product "
          f"(a Python set: {seen['python_set']:.1f})", flush=True)
    return result


def _report(mode: str, fields: dict, started: float) -> dict:
    return {"bench": mode, **fields, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "total_s": time.time() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--end-to-end", metavar="RUN_DIR", default=None,
                        help="catalogue search on a finished ./run_train.sh run directory")
    parser.add_argument("--data-dir", default="",
                        help="the run's TSVs for --end-to-end and --memory (default "
                             "RUN_DIR/data; give the run's DATA_DIR when it had one)")
    parser.add_argument("--out", default=None,
                        help="JSON report (default bench/results/retrieval.json, or "
                             "retrieval_end_to_end.json with --end-to-end, "
                             "retrieval_memory.json with --memory)")
    parser.add_argument("--memory", metavar="RUN_DIR", default=None,
                        help="peak memory of `mmrecall index` on catalogues cycled from a "
                             "finished ./run_train.sh run's rows")
    parser.add_argument("--memory-sizes", default="20000,100000",
                        help="catalogue sizes (products) for --memory, comma-separated")
    parser.add_argument("--memory-chunk-rows", type=int, default=65536,
                        help="`mmrecall index --chunk-rows` for --memory (its default 65536; "
                             "a chunk's buffer is the bounded part that grows until full)")
    args = parser.parse_args(argv)
    if args.end_to_end or args.memory:
        started = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            if args.end_to_end:
                mode, fields = "retrieval_end_to_end", end_to_end(args.end_to_end, tmp,
                                                                  data_dir=args.data_dir)
            else:
                mode, fields = "retrieval_memory", index_memory(
                    args.memory, tmp, [int(n) for n in args.memory_sizes.split(",")],
                    args.memory_chunk_rows, args.data_dir)
            report = _report(mode, fields, started)
        out = args.out or os.path.join(HERE, "results", mode + ".json")
        write_report(out, report)
        print(f"-> {out} ({report['total_s']:.0f} s)")
        return 0
    args.out = args.out or os.path.join(HERE, "results", "retrieval.json")
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
                                      f"(random weights, E={WIDTH}), L2-normalised",
        "tiny_export": tiny, "exact": exact, "ann": results, "in_graph_exact": in_graph,
        "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
        "tensorflow": tf.__version__, "total_s": time.time() - started,
    }
    write_report(args.out, report)
    print(f"-> {args.out} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
