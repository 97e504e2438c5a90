"""Serving latency: the SavedModel's `rank` signature vs the Estimator's own predict path.

One query with 30 candidates per request, CPU, in-process, on the same rows, in one run;
all cases are timed round-robin (each iteration runs every case once), so a busy machine
slows them alike and the ratios to the Estimator stay comparable:

  estimator_predict    estimator.predict() of model_fn PREDICT on the 30 rows fed as
                       preprocessed features (numpy, as prep + input_fn produce them), one
                       batch per query inside a single predict() call (steady state; the
                       one-off graph build + restore is reported as setup_s). The baseline.
  saved_model_rank     the `rank` signature run by a TF1 Session (the SavedModel loaded with
                       tf.compat.v1.saved_model.load), the way the TF Serving model server
                       runs it: raw TSV fields in (base64 text), everything in the graph.
  preprocessing_only   the same request, fetching only the model's inputs
                       (`preprocessed/*`: query normalisation, base64 decoding, validation,
                       box cap, geometry) instead of the scores.
  model_only           the scores with `preprocessed/*` fed: the exported model alone.
  saved_model_rank_raw_bytes / preprocessing_only_raw_bytes
                       as above with the binary fields as raw little-endian bytes (what the
                       REST API feeds for {"b64": ...} values, or a gRPC client can send).
  saved_model_score_dense  the `score_dense` signature on client-decoded float tensors.
  tf2_function_rank    the `rank` signature through tf.saved_model.load (a pruned
                       function; load_s is its load time). TF 2.15 formats every input's
                       repr when binding a TF1 signature's keyword arguments: a Python
                       client cost the model server does not pay. --skip-tf2 leaves it out.
  baseline_saved_model_rank, baseline_saved_model_rank_raw_bytes,
  baseline_preprocessing_only(_raw_bytes), baseline_tf2_function_rank
                       with --baseline-export: the same cases of another export (e.g. one
                       written by an older version of export/) in the same run.

`ratio_to_estimator` gives each case's p50 over the Estimator's p50. `split_p50_ms` splits
`rank` per input kind (base64 text, raw bytes; baseline_* too with --baseline-export) into
the in-graph preprocessing (the preprocessing_only p50) and the rest (model, list stage;
total minus preprocessing: feeding the model's inputs, as model_only does, adds a copy of
them that `rank` never makes). The load average at start and end is recorded (the machine
may be shared).

Prints and writes JSON (default bench/results/serving.json). Without --model-dir/--data/
--export it builds a tiny world itself (generated data, prep, a randomly initialised
checkpoint of the default Config, an export), so it runs anywhere in about a minute:

    python bench/serving.py [--model-dir M --data PREP --export EXPORT --input valid.tsv]
                            [--baseline-export OLD_EXPORT] [--candidates 30]
                            [--iterations 200] [--skip-tf2] [--out FILE]

Concurrent mode (--concurrent 1,2,4,8 [--lists-per-call 1,8] [--seconds 5]): N client
threads call `rank` on one TF1 Session for a bounded time, as the model server runs
concurrent requests; each run reports lists/s and the p50/p99 latency of a call
(bench/results/serving_concurrent.json). Calls of Q lists stand for what server-side
batching makes of Q one-list requests: the grid is what serving/batching_parameters.txt
is chosen from (docs/serving.md).
"""
import argparse
import base64
import itertools
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tensorflow as tf  # noqa: E402
import tensorflow_text  # noqa: E402,F401  (registers NormalizeUTF8, an op of the export)

from data_prep import prep as prep_lib  # noqa: E402
from data_prep import geometry, schema, synth, text, tsv  # noqa: E402
from data_prep.manifest import PrepDir  # noqa: E402
from estimator import outputs  # noqa: E402
from estimator import train as train_lib  # noqa: E402
from estimator.config import Config  # noqa: E402
from export import list_fit, rank, saved_model  # noqa: E402
from export import signatures as sig_lib  # noqa: E402
from mmrecall_testing import export_fixtures  # noqa: E402
from mmrecall_testing.bench_report import write_report  # noqa: E402

CANDIDATES = 30


def _percentiles(seconds):
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3),
            "queries_per_s": round(1000.0 / float(ms.mean()), 2),
            "iterations": len(ms)}


def _tiny_world(root):
    """Generated data -> prep -> random checkpoint -> export (no list stage: `rank` serves
    the trained first stage, what the Estimator's SCORE is).

    Returns:
      (model_dir, PrepDir, export base dir, valid TSV path).
    """
    gen = os.path.join(root, "gen")
    synth.generate(synth.SynthConfig(out_dir=gen, seed=1, train_rows=200, valid_queries=3,
                                     test_queries=1, candidates=CANDIDATES))
    prep_path = os.path.join(root, "prep")
    assert prep_lib.main(["--out", prep_path, "--train", f"{gen}/train.tsv", "--valid",
                          f"{gen}/valid.tsv", "--valid-answers", f"{gen}/valid_answer.json",
                          "--embedding-dim", "32", "--w2v-epochs", "1", "--no-progress"]) == 0
    prep = PrepDir(prep_path)
    cfg = train_lib.resolve_config(Config(), prep)   # the default model size
    model_dir = os.path.join(root, "model")
    export_fixtures.write_random_checkpoint(cfg, model_dir, len(prep.vocab_tokens()))
    # No list stage: fitted on random weights it could serve any first stage (e.g. the
    # matcher's logit), so `rank` would score what the Estimator's SCORE does not.
    export = saved_model.export_saved_model(model_dir, prep, os.path.join(root, "export"),
                                            list_stage=list_fit.OFF)
    return model_dir, prep, export, f"{gen}/valid.tsv"


def _one_query(path, n):
    """The first query's rows (TSV column dicts), repeated up to n candidates."""
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert tuple(header) == schema.TSV_COLUMNS
        for line in f:
            row = dict(zip(header, line.rstrip("\n").split("\t")))
            if rows and row["query_id"] != rows[0]["query_id"]:
                break
            rows.append(row)
    return [rows[i % len(rows)] for i in range(n)]


def _rank_inputs(rows):
    """`rank` inputs for one query (Q = 1) and its rows as candidates (C = len(rows))."""
    out = {k: np.array([[r[k].encode() for r in rows]], dtype=object)
           for k in ("boxes", "features", "class_labels")}
    out.update({k: np.array([[int(r[k]) for r in rows]], np.int64)
                for k in ("num_boxes", "image_h", "image_w")})
    out["query"] = np.array([rows[0]["query"].encode()], dtype=object)
    return out


def _model_features(rows, cfg, prep):
    """The rows as model_fn features, computed the way prep + the input_fn compute them.

    Each product keeps its largest min(prep cap, Config.max_boxes) boxes by area: prep keeps
    the largest prep.max_boxes, the input_fn the largest Config.max_boxes of those.
    """
    ids = {t: i for i, t in enumerate(prep.vocab_tokens())}
    cap = min(prep.max_boxes, int(cfg.max_boxes))
    lines = ["\t".join(r[c] for c in schema.TSV_COLUMNS) for r in rows]
    parsed = [tsv.parse_row(line.encode("utf-8")) for line in lines]
    lemmas = text.normalize_query(rows[0]["query"], prep.manifest.get("drop_leading_be", True))
    tokens = [ids.get(t, schema.UNK_ID) for t in lemmas][:cfg.max_query_tokens]
    kept = []
    for p in parsed:
        keep = geometry.largest_box_indices(p.boxes, cap)
        kept.append((p.features[keep], geometry.relative_geometry(p.boxes[keep], p.image_h,
                                                                  p.image_w), p.labels[keep]))
    n = max(len(k[0]) for k in kept)
    b = len(rows)
    feats = np.zeros([b, n, schema.FEATURE_DIM], np.float32)
    geom = np.zeros([b, n, schema.GEOMETRY_DIM], np.float32)
    labels = np.zeros([b, n], np.int32)
    for i, (f, g, l) in enumerate(kept):
        feats[i, :len(f)], geom[i, :len(g)], labels[i, :len(l)] = f, g, l
    return {
        schema.F_TOKEN_IDS: np.tile(np.array([tokens], np.int32), [b, 1]),
        schema.F_NUM_TOKENS: np.full([b], len(tokens), np.int32),
        schema.F_BOX_FEATURES: feats, schema.F_BOX_GEOMETRY: geom,
        schema.F_BOX_LABELS: labels,
        schema.F_NUM_BOXES: np.array([len(k[0]) for k in kept], np.int32),
    }


def _dense_inputs(rows):
    """score_dense inputs: the same rows decoded client-side into padded float tensors."""
    n = max(int(r["num_boxes"]) for r in rows)
    boxes = np.zeros([len(rows), n, 4], np.float32)
    feats = np.zeros([len(rows), n, schema.FEATURE_DIM], np.float32)
    labels = np.zeros([len(rows), n], np.int64)
    for i, r in enumerate(rows):
        k = int(r["num_boxes"])
        boxes[i, :k] = np.frombuffer(base64.b64decode(r["boxes"]), "<f4").reshape(k, 4)
        feats[i, :k] = np.frombuffer(base64.b64decode(r["features"]), "<f4").reshape(k, -1)
        labels[i, :k] = np.frombuffer(base64.b64decode(r["class_labels"]), "<i8")
    return {"query": np.array([r["query"].encode() for r in rows], dtype=object),
            "boxes": boxes, "features": feats, "class_labels": labels,
            "num_boxes": np.array([int(r["num_boxes"]) for r in rows], np.int64),
            "image_h": np.array([int(r["image_h"]) for r in rows], np.int64),
            "image_w": np.array([int(r["image_w"]) for r in rows], np.int64)}


def _raw_bytes_inputs(rows):
    """_rank_inputs with the binary fields as raw bytes instead of base64 text."""
    out = _rank_inputs(rows)
    for k in ("boxes", "features", "class_labels"):
        out[k] = np.array([[base64.b64decode(r[k]) for r in rows]], dtype=object)
    return out


def _session(export):
    """(session, meta_graph, load seconds) of the newest version, loaded as the model server
    loads it."""
    graph = tf.Graph()
    with graph.as_default():
        sess = tf.compat.v1.Session(graph=graph)
        start = time.perf_counter()
        meta = tf.compat.v1.saved_model.load(sess, [tf.saved_model.SERVING],
                                             rank.resolve_model_dir(export))
        load_s = time.perf_counter() - start
    return sess, meta, load_s


def _signature_case(sess, meta, signature, inputs, output):
    """A callable running `signature` on `inputs` in the Session, returning `output`."""
    graph = sess.graph
    sig = meta.signature_def[signature]
    feed = {graph.get_tensor_by_name(sig.inputs[k].name): v for k, v in inputs.items()}
    fetch = graph.get_tensor_by_name(sig.outputs[output].name)
    return lambda: sess.run(fetch, feed)


def _preprocessed(graph):
    """{schema.F_* name: tensor} of the model's inputs, or None for an export without them."""
    names = (schema.F_TOKEN_IDS, schema.F_NUM_TOKENS, schema.F_BOX_FEATURES,
             schema.F_BOX_GEOMETRY, schema.F_BOX_LABELS, schema.F_NUM_BOXES)
    try:
        return {n: graph.get_tensor_by_name(f"{sig_lib.PREPROCESSED}/{n}:0") for n in names}
    except KeyError:
        return None


def saved_model_cases(export, rows, skip_tf2=False, prefix=""):
    """{case name: callable returning the scores (or the model inputs)}, {name: extra}."""
    sess, meta, load_s = _session(export)
    rank_inputs, raw_inputs = _rank_inputs(rows), _raw_bytes_inputs(rows)
    cases = {prefix + "saved_model_rank": _signature_case(sess, meta, "rank", rank_inputs,
                                                           "scores")}
    cases[prefix + "saved_model_rank_raw_bytes"] = _signature_case(sess, meta, "rank",
                                                                   raw_inputs, "scores")
    extra = {prefix + "saved_model_rank": {"load_s": round(load_s, 2)}}
    _preprocessing_cases(cases, sess, meta, rank_inputs, raw_inputs, prefix)
    if not prefix:
        _more_session_cases(cases, sess, meta, rows, rank_inputs)
    if not skip_tf2:
        start = time.perf_counter()
        model = tf.saved_model.load(rank.resolve_model_dir(export))
        extra[prefix + "tf2_function_rank"] = {"load_s": round(time.perf_counter() - start, 2)}
        fn = model.signatures["rank"]
        tensors = {k: tf.constant(v) for k, v in rank_inputs.items()}
        cases[prefix + "tf2_function_rank"] = lambda: fn(**tensors)["scores"].numpy()
    return cases, extra


def _preprocessing_cases(cases, sess, meta, rank_inputs, raw_inputs, prefix):
    """preprocessing_only(_raw_bytes) cases of an export that names its model inputs."""
    pre = _preprocessed(sess.graph)
    if pre is None:
        return
    sig = meta.signature_def["rank"]
    for suffix, inputs in (("", rank_inputs), ("_raw_bytes", raw_inputs)):
        feed = {sess.graph.get_tensor_by_name(sig.inputs[k].name): v
                for k, v in inputs.items()}
        cases[prefix + "preprocessing_only" + suffix] = (
            lambda feed=feed: sess.run(pre, feed))


def _more_session_cases(cases, sess, meta, rows, rank_inputs):
    cases["saved_model_score_dense"] = _signature_case(sess, meta, "score_dense",
                                                       _dense_inputs(rows), outputs.SCORE)
    pre = _preprocessed(sess.graph)
    if pre is not None:
        sig = meta.signature_def["rank"]
        feed = {sess.graph.get_tensor_by_name(sig.inputs[k].name): v
                for k, v in rank_inputs.items()}
        model_feed = dict(feed)
        model_feed.update({pre[k]: v for k, v in sess.run(pre, feed).items()})
        fetch = sess.graph.get_tensor_by_name(sig.outputs["scores"].name)
        cases["model_only"] = lambda: sess.run(fetch, model_feed)


def estimator_case(model_dir, prep, rows, batches):
    """(callable returning the next batch's scores, setup seconds, first scores).

    estimator.predict() is a generator that keeps its graph as the default graph of the
    thread stepping it, so it is stepped in a thread of its own (a queue round trip,
    ~0.1 ms, is part of each measurement) and the other cases keep an eager main thread.
    """
    cfg = Config.load(model_dir)
    features = _model_features(rows, cfg, prep)
    estimator = train_lib.build_estimator(cfg, model_dir, prep, with_embeddings=False)

    def input_fn():
        return tf.data.Dataset.from_tensors(features).repeat(batches + 1)

    requests, results = queue.Queue(), queue.Queue()

    def worker():
        try:
            stream = estimator.predict(input_fn, yield_single_examples=False)
            while requests.get():
                results.put(next(stream)[outputs.SCORE])
        except BaseException as e:  # surfaced in the main thread
            results.put(e)

    def step():
        requests.put(True)
        out = results.get()
        if isinstance(out, BaseException):
            raise out
        return out

    threading.Thread(target=worker, daemon=True).start()
    start = time.perf_counter()
    first = step()
    setup_s = time.perf_counter() - start
    return step, setup_s, first


def _split(stats) -> dict:
    """{"base64" | "raw_bytes" (| "baseline_..."): {"preprocessing", "model", "total"}} p50
    ms of `rank`."""
    out = {}
    for (kind, suffix), prefix in itertools.product(
            (("base64", ""), ("raw_bytes", "_raw_bytes")), ("", "baseline_")):
        total = stats.get(prefix + "saved_model_rank" + suffix)
        pre = stats.get(prefix + "preprocessing_only" + suffix)
        if total and pre:
            out[prefix + kind] = {"preprocessing": pre["p50_ms"],
                                  "model": round(total["p50_ms"] - pre["p50_ms"], 3),
                                  "total": total["p50_ms"]}
    return out


def run_round_robin(cases, iterations, warmup):
    """Times every case once per iteration, in turn. Returns {name: stats}."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times = {name: [] for name in cases}
    for _ in range(iterations):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: _percentiles(t) for name, t in times.items()}


def run_concurrent(sess, meta, rows, threads: int, lists_per_call: int, seconds: float):
    """N client threads calling `rank` on one Session for a bounded time, as the model server
    runs concurrent requests (one Session, many callers).

    Args:
      rows: one query's candidate rows (C = len(rows)); each call sends `lists_per_call`
        copies of that list (Q = lists_per_call), what a batch of that many requests is.
      threads: client threads; seconds: how long every thread keeps calling.
    Returns:
      {"threads", "lists_per_call", "calls", "lists_per_s", "p50_ms", "p99_ms"} (latency of
      one call as its client sees it).
    """
    one = _rank_inputs(rows)
    inputs = {k: np.repeat(v, lists_per_call, axis=0) for k, v in one.items()}
    call = _signature_case(sess, meta, "rank", inputs, "scores")
    call()                                                   # warm
    latencies = [[] for _ in range(threads)]
    start = time.perf_counter()
    deadline = start + seconds

    def client(mine):
        while time.perf_counter() < deadline:
            begin = time.perf_counter()
            call()
            mine.append(time.perf_counter() - begin)

    workers = [threading.Thread(target=client, args=(l,)) for l in latencies]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    ms = np.concatenate([np.asarray(l) for l in latencies]) * 1000.0
    return {"threads": threads, "lists_per_call": lists_per_call, "calls": int(ms.size),
            "lists_per_s": round(ms.size * lists_per_call / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def concurrent_main(args) -> dict:
    """--concurrent: the grid of client threads x lists per call, on one loaded Session."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.export and args.input:
            export, input_path, world = args.export, args.input, "given"
        else:
            _, _, export, input_path = _tiny_world(tmp)
            world = "tiny generated world, default Config, random weights"
        rows = _one_query(input_path, args.candidates)
        sess, meta, _ = _session(export)
        runs = [run_concurrent(sess, meta, rows, threads, per_call, args.seconds)
                for per_call in args.lists_per_call for threads in args.concurrent]
        sess.close()
    return {"benchmark": f"rank, {args.candidates} candidates per list, N client threads on "
                         f"one TF1 Session, {args.seconds:g} s per run, CPU, in-process",
            "runs": runs, "world": world, "tensorflow": tf.__version__,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "unix_time": int(time.time())}


def main(argv=None) -> int:
    """Runs the cases, prints the JSON report and writes it to --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir")
    parser.add_argument("--data")
    parser.add_argument("--export")
    parser.add_argument("--input", help="a valid/test TSV (default: the tiny world's)")
    parser.add_argument("--candidates", type=int, default=CANDIDATES)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--baseline-export",
                        help="also time the rank signature of this export (e.g. an older one)")
    parser.add_argument("--skip-tf2", action="store_true",
                        help="leave out the tf.saved_model.load path (saves its load time)")
    parser.add_argument("--concurrent", type=lambda v: [int(x) for x in v.split(",")],
                        help="concurrent mode: client thread counts, e.g. 1,2,4,8 (only the "
                             "rank signature; --export/--input or the tiny world)")
    parser.add_argument("--lists-per-call", type=lambda v: [int(x) for x in v.split(",")],
                        default=[1], help="concurrent mode: lists per rank call, e.g. 1,4,16")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="concurrent mode: seconds per run")
    parser.add_argument("--out", default=None,
                        help="JSON report (default bench/results/serving.json, "
                             "serving_concurrent.json in concurrent mode)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.concurrent:
        _write_report(concurrent_main(args),
                      args.out or os.path.join(results, "serving_concurrent.json"))
        return 0
    args.out = args.out or os.path.join(results, "serving.json")

    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir and args.data and args.export and args.input:
            model_dir, prep, export, input_path = (args.model_dir, PrepDir(args.data),
                                                   args.export, args.input)
            world = "given"
        else:
            model_dir, prep, export, input_path = _tiny_world(tmp)
            world = "tiny generated world, default Config, random weights"
        rows = _one_query(input_path, args.candidates)
        cases, extra = saved_model_cases(export, rows, skip_tf2=args.skip_tf2)
        if args.baseline_export:
            more, more_extra = saved_model_cases(args.baseline_export, rows,
                                                 skip_tf2=args.skip_tf2, prefix="baseline_")
            cases.update(more)
            extra.update(more_extra)
        warmup = 10
        est_fn, setup_s, est_scores = estimator_case(model_dir, prep, rows,
                                                     2 * warmup + args.iterations + 1)
        cases = dict({"estimator_predict": est_fn}, **cases)
        extra["estimator_predict"] = {"setup_s": round(setup_s, 2)}
        # Every score output of the same rows agrees with the Estimator's.
        differences = {}
        for name, fn in cases.items():
            if "preprocessing" in name or name == "estimator_predict":
                continue
            scores = np.asarray(fn()).reshape(-1)
            differences[name] = float(np.max(np.abs(scores - est_scores)))
        stats = run_round_robin(cases, args.iterations, warmup)
        base = stats["estimator_predict"]["p50_ms"]
        result = {
            "benchmark": "rank 1 query x %d candidates, CPU, in-process, round-robin"
                         % args.candidates,
        }
        for name, value in stats.items():
            result[name] = dict(value, **extra.get(name, {}))
        result["ratio_to_estimator"] = {
            name: round(value["p50_ms"] / base, 2) for name, value in stats.items()
            if name != "estimator_predict"}
        result["split_p50_ms"] = _split(stats)
        result.update({
            "max_abs_score_difference": differences,
            "world": world,
            "tensorflow": tf.__version__,
            "cpus": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "unix_time": int(time.time()),
        })
    _write_report(result, args.out)
    return 0


def _write_report(result: dict, path: str) -> None:
    """Prints the JSON report and writes it to `path`."""
    print(json.dumps(result, indent=2))
    write_report(path, result, indent=2)


if __name__ == "__main__":
    sys.exit(main())
