"""Serving latency: the SavedModel's `rank` signature vs the Estimator's own predict path.

One query with 30 candidates per request, CPU, in-process, on the same rows in the same run:

  saved_model_rank   tf.saved_model.load(EXPORT).signatures["rank"], raw TSV fields in
                     (base64 decoding, validation, query normalisation all in the graph).
  saved_model_score_dense  the `score_dense` signature on the same rows decoded by the
                     client (float tensors): isolates the cost of in-graph base64 decoding.
  saved_model_rank_session  the `rank` signature run by a tf.compat.v1 Session, the way
                     the TF Serving model server runs a SavedModel.
  estimator_predict  estimator.predict() of model_fn PREDICT on the same 30 rows, fed as
                     preprocessed features (numpy, as prep + input_fn produce them), one
                     batch per query inside a single predict() call (steady state; the
                     one-off graph build + restore is reported separately as setup_s).

Prints and writes JSON (default bench/results/serving.json). Without --model-dir/--data/
--export it builds a tiny world itself (generated data, prep, a randomly initialised
checkpoint of a small Config, an export), so it runs anywhere in about a minute:

    python bench/serving.py [--model-dir M --data PREP --export EXPORT --input valid.tsv]
                            [--candidates 30] [--iterations 200] [--out FILE]
"""
import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

CANDIDATES = 30


def _percentiles(seconds):
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3),
            "queries_per_s": round(1000.0 / float(ms.mean()), 2),
            "iterations": len(ms)}


def _tiny_world(root):
    """Generated data -> prep -> random checkpoint -> export. Returns paths."""
    import tensorflow as tf

    from data_prep import prep as prep_lib
    from data_prep import synth
    from estimator import config as config_lib
    from estimator import input_fn as input_lib
    from estimator import network
    from estimator import train as train_lib
    from export import export as export_lib

    gen = os.path.join(root, "gen")
    synth.generate(synth.SynthConfig(out_dir=gen, seed=1, train_rows=200, valid_queries=3,
                                     test_queries=1, candidates=CANDIDATES))
    prep = os.path.join(root, "prep")
    assert prep_lib.main(["--out", prep, "--train", f"{gen}/train.tsv", "--valid",
                          f"{gen}/valid.tsv", "--valid-answers", f"{gen}/valid_answer.json",
                          "--embedding-dim", "32", "--w2v-epochs", "1", "--no-progress"]) == 0
    cfg = train_lib.resolve_config(config_lib.Config(), prep)   # the default model size
    model_dir = os.path.join(root, "model")
    cfg.save(model_dir)
    with tf.Graph().as_default():
        ranker = network.build_ranker(cfg, len(input_lib.vocab_tokens(prep)))
        step = tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver(dict(ranker.variable_map(), global_step=step))
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, os.path.join(model_dir, "model.ckpt"), global_step=1)
    export = export_lib.export_saved_model(model_dir, prep, os.path.join(root, "export"))
    return model_dir, prep, export, f"{gen}/valid.tsv"


def _one_query(path, n):
    """The first query's rows (TSV column dicts), repeated up to n candidates."""
    from data_prep import schema

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
    out = {k: np.array([[r[k].encode() for r in rows]], dtype=object)
           for k in ("boxes", "features", "class_labels")}
    out.update({k: np.array([[int(r[k]) for r in rows]], np.int64)
                for k in ("num_boxes", "image_h", "image_w")})
    out["query"] = np.array([rows[0]["query"].encode()], dtype=object)
    return out


def _model_features(rows, cfg, prep_dir):
    """The rows as model_fn features, computed the way prep + the input_fn compute them."""
    from data_prep import geometry, schema, text, tsv
    from estimator import input_fn as input_lib

    manifest = input_lib.load_manifest(prep_dir)
    ids = {t: i for i, t in enumerate(input_lib.vocab_tokens(prep_dir))}
    prep_cap, model_cap = int(manifest["max_boxes"]), int(cfg.max_boxes)
    lines = ["\t".join(r[c] for c in schema.TSV_COLUMNS) for r in rows]
    try:
        parsed = [tsv.parse_row(line.encode("utf-8")) for line in lines]
    except TypeError:  # an older data_prep.tsv read str lines
        parsed = [tsv.parse_row(line) for line in lines]
    lemmas = text.normalize_query(rows[0]["query"], manifest.get("drop_leading_be", True))
    tokens = [ids.get(t, schema.UNK_ID) for t in lemmas][:cfg.max_query_tokens]
    kept = []
    for p in parsed:
        keep = geometry.largest_box_indices(p.boxes, prep_cap)[:model_cap]
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
    feats = np.zeros([len(rows), n, 2048], np.float32)
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


def _time(fn, inputs, iterations, warmup, key):
    for _ in range(warmup):
        out = fn(**inputs)[key].numpy()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        out = fn(**inputs)[key].numpy()
        times.append(time.perf_counter() - t)
    return _percentiles(times), out


def bench_saved_model(export, rows, iterations, warmup=10):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from export import rank

    start = time.perf_counter()
    model = tf.saved_model.load(rank.resolve_model_dir(export))
    load_s = time.perf_counter() - start
    rank_inputs = {k: tf.constant(v) for k, v in _rank_inputs(rows).items()}
    rank_stats, scores = _time(model.signatures["rank"], rank_inputs, iterations, warmup,
                               "scores")
    dense_inputs = {k: tf.constant(v) for k, v in _dense_inputs(rows).items()}
    dense_stats, dense_scores = _time(model.signatures["score_dense"], dense_inputs,
                                      iterations, warmup, "score")
    assert np.allclose(dense_scores, scores[0], atol=1e-5)
    return dict(rank_stats, load_s=round(load_s, 2)), dense_stats, scores[0]


def bench_saved_model_session(export, rows, iterations, warmup=10):
    """The `rank` signature run by a TF1 Session, the way the TF Serving model server runs
    a SavedModel (no tf.function wrapping)."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from export import rank

    graph = tf.Graph()
    with graph.as_default():
        sess = tf.compat.v1.Session(graph=graph)
        start = time.perf_counter()
        meta = tf.compat.v1.saved_model.load(sess, [tf.saved_model.SERVING],
                                             rank.resolve_model_dir(export))
        load_s = time.perf_counter() - start
    sig = meta.signature_def["rank"]
    feed = {graph.get_tensor_by_name(sig.inputs[k].name): v
            for k, v in _rank_inputs(rows).items()}
    fetch = graph.get_tensor_by_name(sig.outputs["scores"].name)
    for _ in range(warmup):
        sess.run(fetch, feed)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        sess.run(fetch, feed)
        times.append(time.perf_counter() - t)
    sess.close()
    return dict(_percentiles(times), load_s=round(load_s, 2))


def bench_estimator(model_dir, prep_dir, rows, iterations, warmup=10):
    import tensorflow as tf

    from estimator import config as config_lib
    from estimator import train as train_lib

    cfg = config_lib.Config.load(model_dir)
    features = _model_features(rows, cfg, prep_dir)
    estimator = train_lib.build_estimator(cfg, model_dir, prep_dir, with_embeddings=False)

    def input_fn():
        return tf.data.Dataset.from_tensors(features).repeat(warmup + iterations)

    start = time.perf_counter()
    stream = estimator.predict(input_fn, yield_single_examples=False)
    first = next(stream)
    setup_s = time.perf_counter() - start
    times = []
    for i in range(warmup + iterations - 1):
        t = time.perf_counter()
        out = next(stream)
        if i >= warmup - 1:
            times.append(time.perf_counter() - t)
    return dict(_percentiles(times), setup_s=round(setup_s, 2)), first["score"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir")
    parser.add_argument("--data")
    parser.add_argument("--export")
    parser.add_argument("--input", help="a valid/test TSV (default: the tiny world's)")
    parser.add_argument("--candidates", type=int, default=CANDIDATES)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "serving.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir and args.data and args.export and args.input:
            model_dir, prep, export, input_path = args.model_dir, args.data, args.export, \
                args.input
            world = "given"
        else:
            model_dir, prep, export, input_path = _tiny_world(tmp)
            world = "tiny generated world, default Config, random weights"
        rows = _one_query(input_path, args.candidates)
        sm, sm_dense, sm_scores = bench_saved_model(export, rows, args.iterations)
        sm_session = bench_saved_model_session(export, rows, args.iterations)
        est, est_scores = bench_estimator(model_dir, prep, rows, args.iterations)
        import tensorflow as tf

        result = {
            "benchmark": "rank 1 query x %d candidates, CPU, in-process" % args.candidates,
            "saved_model_rank": sm,
            "estimator_predict": est,
            # Same model, client-side decoded float tensors: the difference to
            # saved_model_rank is the in-graph base64 decoding and validation.
            "saved_model_score_dense": sm_dense,
            # The same `rank` signature run by a TF1 Session, as the model server runs it.
            "saved_model_rank_session": sm_session,
            "max_abs_score_difference": float(np.max(np.abs(sm_scores - est_scores))),
            "world": world,
            "tensorflow": tf.__version__,
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "unix_time": int(time.time()),
        }
    text = json.dumps(result, indent=2)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
