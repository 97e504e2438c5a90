"""The SavedModel export: equal to the Estimator's predictions, loadable by a process that
imports only tensorflow and tensorflow_text, servable (ops, warm-up, no loose files), and
strict about bad requests."""
import base64
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_text  # noqa: F401  (the graph's NormalizeUTF8 op)

from data_prep import schema
from export import export as export_lib
from export import signatures as sig_lib
from mmrecall_testing import export_fixtures as fx

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("export"))
    gen = fx.generate(os.path.join(root, "gen"))
    prep = fx.prep(gen, os.path.join(root, "prep"))
    model_dir = os.path.join(root, "model")
    fx.random_checkpoint(model_dir, prep)
    path = export_lib.export_saved_model(model_dir, prep, os.path.join(root, "export"))
    return dict(root=root, gen=gen, prep=prep, model_dir=model_dir, path=path,
                loaded=tf.saved_model.load(path),
                predictions=fx.estimator_predictions(model_dir, prep),
                rows=fx.tsv_rows(os.path.join(gen, "valid.tsv")))


def _call(world, signature, inputs):
    fn = world["loaded"].signatures[signature]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def _expected(world, rows, key):
    return np.array([world["predictions"][(int(r["query_id"]), int(r["product_id"]))][key]
                     for r in rows])


def test_version_directory_layout(world):
    assert os.path.basename(world["path"]).isdigit()
    names = set(os.listdir(world["path"]))
    assert {"saved_model.pb", "variables", "assets.extra"} <= names
    # No loose vocabulary/lemma files: tables are graph constants, so no assets at all.
    assert not os.listdir(os.path.join(world["path"], "assets")) if "assets" in names else True
    with open(os.path.join(world["path"], "saved_model.pb"), "rb") as f:
        assert world["prep"].encode() not in f.read()
    assert not [d for d in os.listdir(os.path.dirname(world["path"])) if d.startswith("temp-")]


def test_signatures_and_dtypes(world):
    sigs = world["loaded"].signatures
    assert set(sigs) == set(sig_lib.ALL_SIGNATURES)
    specs = sigs["serving_default"].structured_input_signature[1]
    assert specs["query"].dtype == tf.string and specs["boxes"].dtype == tf.string
    assert specs["num_boxes"].dtype == tf.int64 and specs["query"].shape.as_list() == [None]
    rank = sigs["rank"].structured_input_signature[1]
    assert rank["features"].shape.as_list() == [None, None]
    dense = sigs["score_dense"].structured_input_signature[1]
    assert dense["features"].shape.as_list() == [None, None, schema.FEATURE_DIM]
    assert dense["features"].dtype == tf.float32


def test_serving_default_equals_estimator_predict(world):
    rows = world["rows"]  # every valid row, one batch with varying box counts
    assert len(rows) == len(world["predictions"])
    out = _call(world, "serving_default", fx.request(rows))
    for key in ("score", "cross_logit", "tower_score"):
        expected = _expected(world, rows, key)
        np.testing.assert_allclose(out[key], expected, rtol=0, atol=TOL)
    # The comparison is between clearly different numbers, not constants.
    assert np.std(out["score"]) > 1e-2, out["score"]


def test_rank_signature_equals_estimator_predict(world):
    rows = world["rows"]
    by_query = {}
    for r in rows:
        by_query.setdefault(r["query_id"], []).append(r)
    groups = [g for g in by_query.values()]
    c = min(len(g) for g in groups)
    groups = [g[:c] for g in groups[:2]]          # Q = 2 queries x C candidates
    inputs = {k: np.stack([fx.request(g)[k] for g in groups])
              for k in ("boxes", "features", "class_labels", "num_boxes", "image_h", "image_w")}
    inputs["query"] = np.array([g[0]["query"].encode() for g in groups], dtype=object)
    scores = _call(world, "rank", inputs)["scores"]
    assert scores.shape == (2, c)
    for q, g in enumerate(groups):
        np.testing.assert_allclose(scores[q], _expected(world, g, "score"), rtol=0, atol=TOL)


def test_serving_default_rows_in_any_order(world):
    # Queries are normalised once per distinct string and gathered back to their rows:
    # interleaved duplicates must still get their own row's tokens.
    rows = list(world["rows"])
    order = np.random.default_rng(3).permutation(len(rows))
    rows = [rows[i] for i in order]
    assert len({r["query"] for r in rows}) > 1
    out = _call(world, "serving_default", fx.request(rows))
    np.testing.assert_allclose(out["score"], _expected(world, rows, "score"), rtol=0, atol=TOL)
    q = _call(world, "embed_query", fx.request(rows, ("query",)))
    np.testing.assert_allclose(q["embedding"], np.stack(_expected(world, rows, "query_embedding")),
                               rtol=0, atol=TOL)


def _session(path):
    graph = tf.Graph()
    with graph.as_default():
        sess = tf.compat.v1.Session(graph=graph)
        meta = tf.compat.v1.saved_model.load(sess, [tf.saved_model.SERVING], path)
    return sess, meta


def test_preprocessed_tensors_are_the_model_inputs(world):
    # bench/serving.py fetches preprocessed/* (preprocessing alone) and feeds them (model
    # alone); feeding them must give the signature's scores.
    sess, meta = _session(world["path"])
    rows = world["rows"][:7]
    sig = meta.signature_def["serving_default"]
    feed = {sess.graph.get_tensor_by_name(sig.inputs[k].name): v
            for k, v in fx.request(rows).items()}
    score = sess.graph.get_tensor_by_name(sig.outputs["score"].name)
    names = (schema.F_TOKEN_IDS, schema.F_NUM_TOKENS, schema.F_BOX_FEATURES,
             schema.F_BOX_GEOMETRY, schema.F_BOX_LABELS, schema.F_NUM_BOXES)
    pre = {n: sess.graph.get_tensor_by_name(f"{sig_lib.PREPROCESSED}/{n}:0") for n in names}
    values = sess.run(pre, feed)
    assert values[schema.F_BOX_FEATURES].shape[2] == schema.FEATURE_DIM
    assert (values[schema.F_NUM_BOXES] <= fx.MODEL_MAX_BOXES).all()
    fed = dict(feed)
    fed.update({pre[n]: v for n, v in values.items()})
    fed[pre[schema.F_BOX_FEATURES]] = values[schema.F_BOX_FEATURES] * 0.0  # really used
    changed = sess.run(score, fed)
    fed[pre[schema.F_BOX_FEATURES]] = values[schema.F_BOX_FEATURES]
    np.testing.assert_allclose(sess.run(score, fed), _expected(world, rows, "score"),
                               rtol=0, atol=TOL)
    assert np.abs(changed - _expected(world, rows, "score")).max() > 1e-3
    sess.close()


def test_rank_file_with_session_loader_equals_estimator(world, tmp_path):
    # Without a loaded model, SavedModelScorer loads the version into a TF1 Session, as
    # the model server does (fast startup); the ranking is the Estimator's.
    from export import rank

    scorer = rank.SavedModelScorer(os.path.dirname(world["path"]))
    assert scorer.path == world["path"] and scorer._session is not None
    rows = world["rows"][:5]
    fields = {k: [r[k] if k not in rank.INT_FIELDS else int(r[k]) for r in rows]
              for k in rank.STRING_FIELDS + rank.INT_FIELDS}
    np.testing.assert_allclose(scorer.score(fields), _expected(world, rows, "score"),
                               rtol=0, atol=TOL)
    scorer.close()
    out, scores_file = str(tmp_path / "sub.csv"), str(tmp_path / "scores.tsv")
    rank.rank_file(world["path"], os.path.join(world["gen"], "valid.tsv"), out, scores_file,
                   batch_queries=3)
    with open(scores_file) as f:
        lines = f.read().splitlines()[1:]
    assert len(lines) == len(world["predictions"])
    for line in lines:
        qid, pid, value = line.split("\t")
        assert abs(float(value) - world["predictions"][(int(qid), int(pid))]["score"]) < TOL


def test_session_scorer_names_a_rejected_field(world):
    from export import rank

    scorer = rank.SavedModelScorer(world["path"])
    rows = world["rows"][:2]
    fields = {k: [r[k] if k not in rank.INT_FIELDS else int(r[k]) for r in rows]
              for k in rank.STRING_FIELDS + rank.INT_FIELDS}
    fields["features"] = [fields["features"][0], "AAAA"]
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        scorer.score(fields)
    assert rank.field_message(err.value.message).startswith("features: decoded length")
    scorer.close()


def test_serving_bench_cases_agree(world):
    # bench/serving.py's SavedModel cases (without the Estimator) run and give equal scores.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "bench"))
    try:
        import serving as bench
    finally:
        sys.path.pop(0)
    valid = os.path.join(world["gen"], "valid.tsv")
    rows = bench._one_query(valid, 6)
    cases, extra = bench.saved_model_cases(world["path"], rows, skip_tf2=True)
    assert {"saved_model_rank", "preprocessing_only", "model_only",
            "saved_model_rank_raw_bytes"} <= set(cases)
    expected = _expected(world, rows, "score")
    for name in ("saved_model_rank", "saved_model_rank_raw_bytes", "model_only",
                 "saved_model_score_dense"):
        np.testing.assert_allclose(np.asarray(cases[name]()).reshape(-1), expected,
                                   rtol=0, atol=TOL)
    stats = bench.run_round_robin(cases, iterations=2, warmup=1)
    assert all(s["iterations"] == 2 and s["p50_ms"] > 0 for s in stats.values())
    assert extra["saved_model_rank"]["load_s"] >= 0


def _dense(rows):
    n = max(int(r["num_boxes"]) for r in rows) + 1   # one junk padding slot
    boxes = np.full([len(rows), n, 4], 7.0, np.float32)
    feats = np.full([len(rows), n, schema.FEATURE_DIM], 0.5, np.float32)
    labels = np.full([len(rows), n], 3, np.int64)
    for i, r in enumerate(rows):
        k = int(r["num_boxes"])
        boxes[i, :k] = np.frombuffer(base64.b64decode(r["boxes"]), "<f4").reshape(k, 4)
        feats[i, :k] = np.frombuffer(base64.b64decode(r["features"]), "<f4").reshape(k, -1)
        labels[i, :k] = np.frombuffer(base64.b64decode(r["class_labels"]), "<i8")
    req = fx.request(rows, ("query", "num_boxes", "image_h", "image_w"))
    req.update(boxes=boxes, features=feats, class_labels=labels)
    return req


def test_score_dense_equals_estimator_predict(world):
    rows = world["rows"][:13]
    out = _call(world, "score_dense", _dense(rows))
    np.testing.assert_allclose(out["score"], _expected(world, rows, "score"), rtol=0, atol=TOL)


def test_embeddings_equal_estimator_predict(world):
    rows = world["rows"][:11]
    q = _call(world, "embed_query", fx.request(rows, ("query",)))
    np.testing.assert_allclose(q["embedding"], np.stack(_expected(world, rows, "query_embedding")),
                               rtol=0, atol=TOL)
    p = _call(world, "embed_product", fx.request(rows, ("boxes", "features", "class_labels",
                                                        "num_boxes", "image_h", "image_w")))
    expected = np.stack(_expected(world, rows, "product_embedding"))
    np.testing.assert_allclose(p["embedding"], expected, rtol=0, atol=TOL)
    assert p["num_boxes"].max() <= fx.MODEL_MAX_BOXES
    pd = _call(world, "embed_product_dense", {k: v for k, v in _dense(rows).items()
                                              if k != "query"})
    np.testing.assert_allclose(pd["embedding"], expected, rtol=0, atol=TOL)


def _bad(rows, **changes):
    req = fx.request(rows)
    for key, (index, value) in changes.items():
        req[key] = req[key].copy()
        req[key][index] = value
    return req


def test_rank_file_equals_estimator_ranking(world, tmp_path):
    from export import rank, score

    scorer = rank.SavedModelScorer(world["path"], loaded=world["loaded"])
    out, scores_file = str(tmp_path / "sub.csv"), str(tmp_path / "scores.tsv")
    rank.rank_file(world["path"], os.path.join(world["gen"], "valid.tsv"), out, scores_file,
                   batch_queries=2, scorer=scorer)
    predictions = world["predictions"]
    with open(scores_file) as f:
        lines = f.read().splitlines()[1:]
    assert len(lines) == len(predictions)
    for line in lines:
        qid, pid, value = line.split("\t")
        assert abs(float(value) - predictions[(int(qid), int(pid))]["score"]) < TOL
    by_query = {}
    for (qid, pid), p in predictions.items():
        by_query.setdefault(qid, []).append((-p["score"], pid))
    expected = {qid: [pid for _, pid in sorted(v)[:5]] for qid, v in by_query.items()}
    with open(out) as f:
        got = {int(l.split(",")[0]): [int(x) for x in l.split(",")[1:]]
               for l in f.read().splitlines()[1:]}
    assert got == expected
    result = score.score_files(os.path.join(world["gen"], "valid_answer.json"), out)
    assert result["queries"] == len(expected)


@pytest.mark.parametrize("changes, expected", [
    (dict(query=(1, b" ?! ")), "query: empty after normalisation"),
    (dict(query=(0, b"is are")), "query: empty after normalisation"),
    (dict(query=(2, b"r\xffd")), "query: not valid UTF-8"),
    (dict(boxes=(1, b"not base64!")), "boxes: neither standard base64 text"),
    (dict(features=(0, b"AAAA")), "features: decoded length"),
    (dict(num_boxes=(2, 1)), "boxes: decoded length"),
    (dict(num_boxes=(0, 0)), "num_boxes: must be >= 1"),
    (dict(image_h=(1, 5)), "boxes: outside the image"),   # checked before the box order
    (dict(image_w=(1, -3)), "image_w: must be > 0"),
    (dict(class_labels=(0, None)), "class_labels: class id outside"),
])
def test_bad_requests_fail_naming_the_field(world, changes, expected):
    rows = world["rows"][:3]
    if "class_labels" in changes:  # right length for row 0, ids out of range
        n = int(rows[0]["num_boxes"])
        changes["class_labels"] = (0, base64.b64encode(np.full(n, 77, "<i8").tobytes()))
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"\b{expected}"):
        _call(world, "serving_default", _bad(rows, **changes))


def test_rank_rejects_query_count_mismatch(world):
    rows = world["rows"][:2]
    inputs = {k: v[None] for k, v in fx.request(rows).items() if k != "query"}
    inputs["query"] = np.array([b"red dress", b"blue shoe"], dtype=object)
    with pytest.raises(tf.errors.InvalidArgumentError, match="query: one query per row"):
        _call(world, "rank", inputs)


def test_warmup_requests_are_prediction_logs_that_run(world):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(world["path"], "assets.extra", export_lib.WARMUP_FILE)
    seen = set()
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.name == export_lib.DEFAULT_MODEL_NAME
        name = request.model_spec.signature_name
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        for value in _call(world, name, inputs).values():
            if np.issubdtype(value.dtype, np.floating):
                assert np.isfinite(value).all()
        seen.add(name)
    assert seen == set(sig_lib.ALL_SIGNATURES)


def test_warmup_requests_from_real_rows(world):
    requests = export_lib.sample_inputs_from_tsv(os.path.join(world["gen"], "valid.tsv"),
                                                 max_rows=4)
    assert set(requests) == set(sig_lib.ALL_SIGNATURES)
    rows = world["rows"][:4]
    for name in (sig_lib.SERVING_DEFAULT, sig_lib.SCORE_DENSE):
        out = _call(world, name, requests[name])
        np.testing.assert_allclose(out["score"], _expected(world, rows, "score"), rtol=0,
                                   atol=TOL)
    scores = _call(world, sig_lib.RANK, requests[sig_lib.RANK])["scores"]
    np.testing.assert_allclose(scores[0], _expected(world, rows, "score"), rtol=0, atol=TOL)


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry
    path, request_file = sys.argv[1], sys.argv[2]
    sm = saved_model_pb2.SavedModel()
    with open(path + "/saved_model.pb", "rb") as f:
        sm.ParseFromString(f.read())
    ops = {n.op for n in sm.meta_graphs[0].graph_def.node}
    for fn in sm.meta_graphs[0].graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    not_core = sorted(op for op in ops if op_def_registry.get(op) is None)
    import tensorflow_text  # registers the TF Text ops, as the model server links them
    model = tf.saved_model.load(path)
    with open(request_file) as f:
        req = json.load(f)
    inputs = {k: tf.constant(v, tf.int64 if k in ("num_boxes", "image_h", "image_w")
                             else tf.string) for k, v in req.items()}
    scores = model.signatures["serving_default"](**inputs)["score"].numpy().tolist()
    ours = sorted(m for m in sys.modules if m.split(".")[0] in
                  ("data_prep", "estimator", "export", "mmrecall_cli", "export_fixtures"))
    print(json.dumps({"not_core": not_core, "scores": scores, "project_modules": ours}))
""")


def test_loads_in_a_fresh_process_with_only_tensorflow_and_text(world, tmp_path):
    rows = world["rows"][:4]
    req = {k: [x.decode() if isinstance(x, bytes) else int(x) for x in v]
           for k, v in fx.request(rows).items()}
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(req))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, world["path"], str(request_file)],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The only ops outside core TensorFlow are TF Text ops that exist in TF Text 2.12.
    assert set(result["not_core"]) <= {"NormalizeUTF8"}, result["not_core"]
    assert result["project_modules"] == []
    np.testing.assert_allclose(result["scores"], _expected(world, rows, "score"),
                               rtol=0, atol=TOL)


class _FakeEstimator:
    def __init__(self, model_dir):
        self.model_dir = model_dir


def test_best_ndcg_exporter_keeps_only_improvements(tmp_path, monkeypatch):
    calls = []

    def fake_export(model_dir, data_dir, export_dir, checkpoint=None, **_):
        calls.append(checkpoint)
        path = os.path.join(export_dir, str(1000 + len(calls)))
        os.makedirs(path)
        return path

    monkeypatch.setattr(export_lib, "export_saved_model", fake_export)
    exporter = export_lib.BestNdcgExporter("prep", exports_to_keep=2)
    base = str(tmp_path / "export" / exporter.name)
    os.makedirs(base)
    est = _FakeEstimator(str(tmp_path))
    results = [("c1", 0.30), ("c2", 0.25), ("c3", 0.41), ("c4", 0.41), ("c5", 0.50)]
    returned = [exporter.export(est, base, ckpt, {"ndcg@5": v, "loss": 1.0}, False)
                for ckpt, v in results]
    assert calls == ["c1", "c3", "c5"]          # only strict improvements export
    assert [r is not None for r in returned] == [True, False, True, False, True]
    assert sorted(d for d in os.listdir(base) if d.isdigit()) == ["1002", "1003"]
    with open(os.path.join(base, "best_metric.json")) as f:
        assert json.load(f)["value"] == 0.50
    # A new exporter (resumed training) remembers the best value.
    again = export_lib.BestNdcgExporter("prep")
    assert again.export(est, base, "c6", {"ndcg@5": 0.45}, False) is None


def test_sample_serving_configs_parse():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "serving", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == export_lib.DEFAULT_MODEL_NAME and model.model_platform == "tensorflow"
    # BatchingParameters is not in tensorflow-serving-api; check the fields by name.
    known = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
             "num_batch_threads", "allowed_batch_sizes", "pad_variable_length_inputs",
             "thread_pool_name", "enable_large_batch_splitting"}
    fields = {}
    with open(os.path.join(root, "serving", "batching_parameters.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                key = line.split(":")[0].split("{")[0].strip()
                fields[key] = line
    assert set(fields) <= known, set(fields) - known
    assert fields["pad_variable_length_inputs"].replace(" ", "") == \
        "pad_variable_length_inputs:true"
