"""The SavedModel export: equal to the Estimator's predictions, loadable by a process that
imports only tensorflow and tensorflow_text, servable (ops, warm-up, no loose files), and
strict about bad requests. `rank` with a list stage: padding left out and never leaking,
lists of 1..C candidates, shapes checked against each other, scores equal to the list
stage's numpy twin on the Estimator's first-stage scores and embeddings."""
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
from data_prep.manifest import PrepDir
from estimator import list_stage as list_lib
from estimator.config import Config
from export import best_exporter
from export import export as export_lib
from export import list_fit
from export import saved_model
from export import signatures as sig_lib
from export import warmup
from mmrecall_testing import export_fixtures as fx

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("export"))
    gen = fx.generate(os.path.join(root, "gen"))
    prep = fx.prep(gen, os.path.join(root, "prep"))
    prep_dir = PrepDir(prep)
    model_dir = os.path.join(root, "model")
    fx.random_checkpoint(model_dir, prep_dir)
    # No list stage here: `rank`'s scores are the first stage's, as the Estimator's.
    path = saved_model.export_saved_model(model_dir, prep_dir, os.path.join(root, "export"),
                                          list_stage=list_fit.OFF)
    return dict(root=root, gen=gen, prep=prep, prep_dir=prep_dir, model_dir=model_dir,
                path=path, loaded=tf.saved_model.load(path),
                predictions=fx.estimator_predictions(model_dir, prep_dir),
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


def test_serving_box_cap_is_the_smaller_of_prep_and_model_caps(world):
    # Prep keeps its 6 largest boxes, the input_fn the 4 largest of those: the 4 largest.
    spec, model_cfg = saved_model.export_spec(Config.load(world["model_dir"]),
                                              world["prep_dir"])
    assert (spec.prep_max_boxes, spec.model_max_boxes) == (fx.PREP_MAX_BOXES,
                                                           fx.MODEL_MAX_BOXES)
    assert spec.max_boxes == fx.MODEL_MAX_BOXES
    assert model_cfg.word_embedding_size == world["prep_dir"].embedding_dim
    # A model cap above prep's leaves prep's.
    wide = Config.from_dict({"max_boxes": 10}, Config.load(world["model_dir"]))
    assert saved_model.export_spec(wide, world["prep_dir"])[0].max_boxes == fx.PREP_MAX_BOXES
    with open(os.path.join(world["path"], "assets.extra", saved_model.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert (metadata["max_boxes"], metadata["model_max_boxes"]) == (fx.PREP_MAX_BOXES,
                                                                     fx.MODEL_MAX_BOXES)


def test_signatures_and_dtypes(world):
    sigs = world["loaded"].signatures
    assert set(sigs) == set(sig_lib.ALL_SIGNATURES)
    specs = sigs["serving_default"].structured_input_signature[1]
    assert specs["query"].dtype == tf.string and specs["boxes"].dtype == tf.string
    assert specs["num_boxes"].dtype == tf.int64
    assert sigs["score_dense"].structured_input_signature[1]["features"].dtype == tf.float32
    # The SignatureDef (what TF Serving's metadata API shows) documents the layouts; the
    # graph tensors are unshaped and checked at run time.
    _, meta = _session(world["path"])

    def shape(signature, key):
        return tf.TensorShape(meta.signature_def[signature].inputs[key].tensor_shape).as_list()

    assert shape("serving_default", "query") == [None]
    assert shape("rank", "features") == [None, None]
    assert shape("score_dense", "features") == [None, None, schema.FEATURE_DIM]


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
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"query: shape \(Q\) expected \(Q as in num_boxes\)"):
        _call(world, "rank", inputs)


# ---------------------------------------------------------------------------------------
# Every other signature checks its inputs' ranks and shapes against each other first.
# Their inputs have no static shape, so a Python Session client feeds them anything, as a
# gRPC or REST client may (tf.saved_model.load's functions check the SignatureDef shapes
# in Python first).

@pytest.fixture(scope="module")
def served(world):
    sess, meta = _session(world["path"])
    yield sess, meta
    sess.close()


def _run_signature(served, signature, inputs):
    sess, meta = served
    sig = meta.signature_def[signature]
    feed = {sess.graph.get_tensor_by_name(sig.inputs[k].name): v for k, v in inputs.items()}
    return sess.run({k: sess.graph.get_tensor_by_name(v.name) for k, v in sig.outputs.items()},
                    feed)


def _pair_inputs(world, signature):
    rows = world["rows"][:3]
    dense = signature in (sig_lib.SCORE_DENSE, sig_lib.EMBED_PRODUCT_DENSE)
    inputs = _dense(rows) if dense else fx.request(rows)
    if signature in (sig_lib.EMBED_PRODUCT, sig_lib.EMBED_PRODUCT_DENSE):
        inputs.pop("query")
    if signature == sig_lib.EMBED_QUERY:
        inputs = {"query": inputs["query"]}
    return inputs


def _2_32_plus(v):
    v = v.copy()
    v[0] += 2 ** 32             # int32 would read it as v[0] boxes, a valid count
    return v


# (signature, field, change, expected message). Before the checks: "model/mul_2:
# Incompatible shapes: [3,1] vs. [4,1]", "decode/Equal_1: Incompatible shapes",
# "Unique: unique expects a 1D vector", attention MatMul batch mismatches, ... (no field),
# a transposed dense `boxes` reported as a class_labels box-dimension problem without the
# shapes, and 2**32 + n boxes scored as n boxes.
BAD_SHAPES = [
    (sig_lib.SERVING_DEFAULT, "query", lambda v: v[:2], "query: shape (B) expected (B as in "
     "num_boxes); shapes of query, num_boxes: [2] [3]"),
    (sig_lib.SERVING_DEFAULT, "image_w", lambda v: np.concatenate([v, v[:1]]),
     "image_w: shape (B) expected (B as in num_boxes); shapes of image_w, num_boxes: [4] [3]"),
    (sig_lib.SERVING_DEFAULT, "boxes", lambda v: v[:2], "boxes: shape (B) expected"),
    (sig_lib.SERVING_DEFAULT, "num_boxes", lambda v: v[None],
     "num_boxes: rank 1 expected (B), got shape [1 3]"),
    (sig_lib.SERVING_DEFAULT, "query", lambda v: v[0], "query: rank 1 expected (B), got shape []"),
    (sig_lib.SERVING_DEFAULT, "num_boxes", _2_32_plus, "num_boxes: must be <= 2147483647"),
    (sig_lib.EMBED_QUERY, "query", lambda v: v[:, None],
     "query: rank 1 expected (B), got shape [3 1]"),
    (sig_lib.EMBED_PRODUCT, "image_h", lambda v: v[:2], "image_h: shape (B) expected (B as in "
     "num_boxes); shapes of image_h, num_boxes: [2] [3]"),
    (sig_lib.EMBED_PRODUCT, "features", lambda v: v[:, None], "features: rank 1 expected"),
    (sig_lib.EMBED_PRODUCT, "num_boxes", _2_32_plus, "num_boxes: must be <= 2147483647"),
    (sig_lib.SCORE_DENSE, "features", lambda v: np.ascontiguousarray(v.transpose(0, 2, 1)),
     "features: shape (B, N, 2048) expected (B as in num_boxes, N as in boxes); shapes of "
     "features, num_boxes, boxes: [3 2048 5] [3] [3 5 4]"),
    (sig_lib.SCORE_DENSE, "class_labels", lambda v: v[:, :-1], "class_labels: shape (B, N) "
     "expected (B as in num_boxes, N as in boxes); shapes of class_labels, num_boxes, boxes: "
     "[3 4] [3] [3 5 4]"),
    (sig_lib.SCORE_DENSE, "query", lambda v: v[:2], "query: shape (B) expected"),
    (sig_lib.SCORE_DENSE, "boxes", lambda v: np.concatenate([v, v[..., :1]], 2),
     "boxes: shape (B, N, 4) expected (B as in num_boxes); shapes of boxes, num_boxes: "
     "[3 5 5] [3]"),
    (sig_lib.SCORE_DENSE, "num_boxes", _2_32_plus, "num_boxes: "),
    (sig_lib.EMBED_PRODUCT_DENSE, "class_labels", lambda v: v[..., None],
     "class_labels: rank 2 expected (B, N), got shape [3 5 1]"),
    (sig_lib.EMBED_PRODUCT_DENSE, "image_w", lambda v: v[:2], "image_w: shape (B) expected"),
]


@pytest.mark.parametrize("signature, field, change, expected", BAD_SHAPES,
                         ids=[f"{s}-{f}-{i}" for i, (s, f, _, _) in enumerate(BAD_SHAPES)])
def test_signatures_refuse_inconsistent_inputs_naming_the_field(world, served, signature,
                                                                field, change, expected):
    from export import rank

    inputs = _pair_inputs(world, signature)
    _run_signature(served, signature, inputs)                    # valid as sent
    inputs[field] = change(inputs[field])
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _run_signature(served, signature, inputs)
    assert rank.field_message(err.value.message).startswith(expected), err.value.message


def test_transposed_dense_boxes_name_a_field_and_the_shapes(world, served):
    # Which of the disagreeing fields is reported is up to the executor; each names itself
    # and prints its shape and the shapes it was compared with.
    from export import rank

    inputs = _pair_inputs(world, sig_lib.SCORE_DENSE)
    inputs["boxes"] = np.ascontiguousarray(inputs["boxes"].transpose(1, 0, 2))   # [N, B, 4]
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _run_signature(served, sig_lib.SCORE_DENSE, inputs)
    message = rank.field_message(err.value.message)
    assert message.split(":")[0] in ("boxes", "features", "class_labels"), message
    assert "[5 3 4]" in message, message


# ---------------------------------------------------------------------------------------
# `rank`: padding, list stage, shape checks.

PRF = list_lib.PrfParams(weight=2.0, m=3, iterations=2)
PRODUCT_FIELDS = sig_lib.PRODUCT_B64_FIELDS + sig_lib.PRODUCT_INT_FIELDS


@pytest.fixture(scope="module")
def listed(world):
    """The world's model exported by `mmrecall export` with a PRF list stage from a file."""
    import contextlib
    import io

    from export import export as export_cli

    params_file = os.path.join(world["root"], "prf.json")
    with open(params_file, "w") as f:
        json.dump(PRF.to_dict(), f)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert export_cli.main(["--model-dir", world["model_dir"], "--data", world["prep"],
                                "--export-dir", os.path.join(world["root"], "export_prf"),
                                "--list-stage", params_file]) == 0
    printed = stdout.getvalue().splitlines()
    sess, meta = _session(printed[-1])
    yield dict(path=printed[-1], printed=printed, sess=sess, meta=meta)
    sess.close()


def _groups(world):
    """The valid rows by query, in file order: [[row dict]]."""
    by_query = {}
    for r in world["rows"]:
        by_query.setdefault(r["query_id"], []).append(r)
    return list(by_query.values())


def _list_fields(rows):
    """One list's fields {field: [C] values} for rank.pad_lists."""
    return {k: [int(r[k]) if k in sig_lib.PRODUCT_INT_FIELDS else r[k].encode() for r in rows]
            for k in PRODUCT_FIELDS + (sig_lib.QUERY,)}


def _rank_session(listed, inputs):
    sig = listed["meta"].signature_def[sig_lib.RANK]
    graph = listed["sess"].graph
    feed = {graph.get_tensor_by_name(sig.inputs[k].name): v for k, v in inputs.items()}
    fetch = {k: graph.get_tensor_by_name(v.name) for k, v in sig.outputs.items()}
    return listed["sess"].run(fetch, feed)


def test_rank_without_list_stage_serves_first_stage_scores_and_pads(world):
    from export import rank

    groups = _groups(world)
    lists = [groups[0][:3], groups[1][:5], groups[2][:1]]       # C = 5, padded
    out = _call(world, sig_lib.RANK, rank.pad_lists([_list_fields(l) for l in lists]))
    np.testing.assert_array_equal(out[sig_lib.SCORES], out[sig_lib.FIRST_STAGE_SCORES])
    assert out[sig_lib.SCORES].shape == (3, 5)
    for q, rows in enumerate(lists):
        np.testing.assert_allclose(out[sig_lib.SCORES][q, :len(rows)],
                                   _expected(world, rows, "score"), rtol=0, atol=TOL)
        assert (out[sig_lib.SCORES][q, len(rows):] == list_lib.PADDING_SCORE).all()
    with open(os.path.join(world["path"], "assets.extra", saved_model.METADATA_FILE)) as f:
        assert json.load(f)["list_stage"] == {"mode": "off", "params": None}


def test_export_records_and_prints_the_list_stage(listed):
    with open(os.path.join(listed["path"], "assets.extra", saved_model.METADATA_FILE)) as f:
        record = json.load(f)["list_stage"]
    assert record["mode"] == "file" and record["params"] == PRF.to_dict()
    assert listed["printed"][-2].startswith("list stage: PRF")
    assert os.path.basename(listed["printed"][-1]).isdigit()
    # A params file may be an earlier export's metadata.
    params, serving = list_fit.load_params(os.path.join(listed["path"], "assets.extra",
                                                        saved_model.METADATA_FILE))
    assert params == PRF and serving == record["serving"]


def test_rank_list_stage_equals_the_numpy_twin_for_lists_of_1_to_c(world, listed):
    from export import rank

    group = max(_groups(world), key=len)
    c = len(group)
    lists = [group[:n] for n in range(1, c + 1)]                 # Q = C lists, 1..C long
    out = _rank_session(listed, rank.pad_lists([_list_fields(l) for l in lists]))
    mask = np.arange(c)[np.newaxis, :] < np.arange(1, c + 1)[:, np.newaxis]     # [Q, C]
    first = np.zeros([c, c])
    emb = np.zeros([c, c, len(_expected(world, group[:1], "product_embedding")[0])])
    for q, rows in enumerate(lists):
        first[q, :q + 1] = _expected(world, rows, "score")
        emb[q, :q + 1] = np.stack(_expected(world, rows, "product_embedding"))
    np.testing.assert_allclose(np.where(mask, out[sig_lib.FIRST_STAGE_SCORES], 0.0),
                               np.where(mask, first, 0.0), rtol=0, atol=TOL)
    expected = list_lib.prf_scores_numpy(first, emb, mask, PRF)
    np.testing.assert_allclose(out[sig_lib.SCORES], expected, rtol=0, atol=1e-4)
    assert np.ptp(expected[-1]) > 0.1            # a real re-scoring, not a constant
    assert np.abs(np.argsort(-expected[-1]) - np.argsort(-first[-1])).max() > 0
    # Each list alone (C = its length, C = 1 included) scores as inside the padded batch.
    for q, rows in enumerate(lists):
        alone = _rank_session(listed, rank.pad_lists([_list_fields(rows)]))[sig_lib.SCORES]
        np.testing.assert_allclose(alone[0], out[sig_lib.SCORES][q, :q + 1], rtol=0, atol=1e-4)


def test_rank_padding_never_leaks_into_real_scores(world, listed):
    from export import rank

    rows = _groups(world)[0][:4]
    padded = rank.pad_lists([_list_fields(rows), _list_fields(rows[:2])])    # list 1 padded
    base = _rank_session(listed, padded)
    junk = {k: v.copy() for k, v in padded.items()}
    junk["boxes"][1, 2:] = b"not base64!"
    junk["features"][1, 2:] = rows[0]["features"].encode()
    junk["image_h"][1, 2:] = 5
    junk["image_w"][1, 2:] = -3
    changed = _rank_session(listed, junk)
    for key in (sig_lib.SCORES, sig_lib.FIRST_STAGE_SCORES):
        np.testing.assert_array_equal(changed[key], base[key])
        assert (base[key][1, 2:] == list_lib.PADDING_SCORE).all()
    # A real candidate with num_boxes 0 is padding too, so it cannot move list 0's others.
    alone = _rank_session(listed, rank.pad_lists([_list_fields(rows[:2])]))
    np.testing.assert_allclose(base[sig_lib.SCORES][1, :2], alone[sig_lib.SCORES][0], rtol=0,
                               atol=1e-5)


def test_rank_list_stage_changes_nothing_for_identical_candidates(world, listed):
    from export import rank

    rows = [_groups(world)[0][1]] * 5
    out = _rank_session(listed, rank.pad_lists([_list_fields(rows)]))
    first, scores = out[sig_lib.FIRST_STAGE_SCORES][0], out[sig_lib.SCORES][0]
    # The model's float rounding may differ by a row's position in the batch; the list
    # stage treats such a list as flat: every candidate gets exactly the same score.
    assert np.ptp(first) < 1e-5 and np.ptp(scores) == 0
    ids = list(range(5))
    assert rank.top_k(ids, scores) == ids           # ties keep file order


def _rank_inputs(world, q=2, c=3):
    from export import rank

    groups = _groups(world)
    return rank.pad_lists([_list_fields(g[:c]) for g in groups[:q]])


@pytest.mark.parametrize("field, change, shapes", [
    ("features", lambda v: v.T.copy(), "[3 2] [2 3]"),                     # transposed
    ("image_h", lambda v: np.concatenate([v, v[:, :1]], 1), "[2 4] [2 3]"),  # C + 1
    ("class_labels", lambda v: v[:, :2].copy(), "[2 2] [2 3]"),            # C - 1
    ("num_boxes", lambda v: v.T.copy(), "[3 2] [2 3]"),   # the reference itself
    ("query", lambda v: v[:1].copy(), "[1] [2 3]"),
])
def test_rank_refuses_inconsistent_shapes_naming_the_field(world, field, change, shapes):
    from export import rank

    inputs = _rank_inputs(world)
    inputs[field] = change(inputs[field])
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _call(world, sig_lib.RANK, inputs)
    message = rank.field_message(err.value.message)
    if field == "num_boxes":   # every other field now disagrees with num_boxes: any one
        assert "num_boxes:" in message and message.endswith(" [3 2]"), message
        return
    assert message.startswith(f"{field}: ") and message.endswith(shapes), message


def test_rank_refuses_a_wrong_rank_naming_the_field(world):
    # The Python client checks a placeholder's rank; a gRPC or REST client does not. Feed
    # through an import whose input is an unshaped placeholder, as the model server does.
    from export import rank

    inputs = _rank_inputs(world)
    _, meta = _session(world["path"])
    sig = meta.signature_def[sig_lib.RANK]
    for field, value in (("boxes", inputs["boxes"].reshape(-1)),
                         ("query", inputs["query"][:, None]),
                         ("num_boxes", inputs["num_boxes"][None])):
        with tf.Graph().as_default() as graph:
            loose = tf.compat.v1.placeholder(sig.inputs[field].dtype, None)
            tf.compat.v1.train.import_meta_graph(meta, input_map={sig.inputs[field].name: loose},
                                                 import_scope="m")
            feed = {graph.get_tensor_by_name("m/" + sig.inputs[k].name): v
                    for k, v in inputs.items() if k != field}
            feed[loose] = value
            fetch = graph.get_tensor_by_name("m/" + sig.outputs[sig_lib.SCORES].name)
            with tf.compat.v1.Session(graph=graph) as sess:
                sess.run([tf.compat.v1.tables_initializer(),
                          tf.compat.v1.global_variables_initializer()])
                with pytest.raises(tf.errors.InvalidArgumentError) as err:
                    sess.run(fetch, feed)
        message = rank.field_message(err.value.message)
        assert message.startswith(f"{field}: rank ") and \
            message.endswith(str(list(value.shape)).replace(",", "")), message


def test_rank_file_first_stage_flag(world, listed, tmp_path):
    from export import rank

    valid = os.path.join(world["gen"], "valid.tsv")
    scores = {}
    for name, flags in (("first", ["--first-stage"]), ("served", [])):
        out, scores_file = str(tmp_path / f"{name}.csv"), str(tmp_path / f"{name}.tsv")
        assert rank.main(["--model", listed["path"], "--input", valid, "--out", out,
                          "--scores", scores_file, "--batch-queries", "2"] + flags) == 0
        with open(scores_file) as f:
            scores[name] = {(int(q), int(p)): float(v) for q, p, v in
                            (l.split("\t") for l in f.read().splitlines()[1:])}
    for key, value in scores["first"].items():
        assert abs(value - world["predictions"][key]["score"]) < TOL
    # The served scores are the list stage's: z-scored per list (mean 0), unlike the first.
    by_query = {}
    for (qid, _), value in scores["served"].items():
        by_query.setdefault(qid, []).append(value)
    assert all(abs(np.mean(v)) < 1e-3 for v in by_query.values())
    assert max(abs(scores["served"][k] - scores["first"][k]) for k in scores["first"]) > 0.1


def test_warmup_requests_are_prediction_logs_that_run(world):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(world["path"], "assets.extra", warmup.WARMUP_FILE)
    seen = set()
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.name == warmup.DEFAULT_MODEL_NAME
        name = request.model_spec.signature_name
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        for value in _call(world, name, inputs).values():
            if np.issubdtype(value.dtype, np.floating):
                assert np.isfinite(value).all()
        seen.add(name)
    assert seen == set(sig_lib.ALL_SIGNATURES)


def test_warmup_requests_from_real_rows(world):
    requests = warmup.sample_inputs_from_tsv(os.path.join(world["gen"], "valid.tsv"),
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
    paths, request_file = sys.argv[1:3], sys.argv[3]
    not_core = set()
    for path in paths:
        sm = saved_model_pb2.SavedModel()
        with open(path + "/saved_model.pb", "rb") as f:
            sm.ParseFromString(f.read())
        ops = {n.op for n in sm.meta_graphs[0].graph_def.node}
        for fn in sm.meta_graphs[0].graph_def.library.function:
            ops |= {n.op for n in fn.node_def}
        not_core |= {op for op in ops if op_def_registry.get(op) is None}
    import tensorflow_text  # registers the TF Text ops, as the model server links them
    with open(request_file) as f:
        req = json.load(f)
    def tensors(values):
        return {k: tf.constant(v, tf.int64 if k in ("num_boxes", "image_h", "image_w")
                               else tf.string) for k, v in values.items()}
    scores = tf.saved_model.load(paths[0]).signatures["serving_default"](
        **tensors(req["pairs"]))["score"].numpy().tolist()
    rank = tf.saved_model.load(paths[1]).signatures["rank"](**tensors(req["rank"]))
    ours = sorted(m for m in sys.modules if m.split(".")[0] in
                  ("data_prep", "estimator", "export", "mmrecall_cli",
                   "mmrecall_testing"))
    print(json.dumps({"not_core": sorted(not_core), "scores": scores,
                      "rank": {k: v.numpy().tolist() for k, v in rank.items()},
                      "project_modules": ours}))
""")


def _jsonable(inputs):
    return {k: np.vectorize(lambda x: x.decode() if isinstance(x, bytes) else int(x),
                            otypes=[object])(v).tolist() for k, v in inputs.items()}


def test_loads_in_a_fresh_process_with_only_tensorflow_and_text(world, listed, tmp_path):
    # Pairs through serving_default of the plain export; padded lists through `rank` of
    # the export with a list stage.
    from export import rank

    rows = world["rows"][:4]
    group = _groups(world)[0]
    rank_inputs = rank.pad_lists([_list_fields(group[:4]), _list_fields(group[:2])])
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps({"pairs": _jsonable(fx.request(rows)),
                                        "rank": _jsonable(rank_inputs)}))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, world["path"], listed["path"],
                           str(request_file)],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The only ops outside core TensorFlow are TF Text ops that exist in TF Text 2.12.
    assert set(result["not_core"]) <= {"NormalizeUTF8"}, result["not_core"]
    assert result["project_modules"] == []
    np.testing.assert_allclose(result["scores"], _expected(world, rows, "score"),
                               rtol=0, atol=TOL)
    in_process = _rank_session(listed, rank_inputs)
    for key in (sig_lib.SCORES, sig_lib.FIRST_STAGE_SCORES):
        np.testing.assert_allclose(result["rank"][key], in_process[key], rtol=0, atol=1e-5)
    assert result["rank"][sig_lib.SCORES][1][2:] == [list_lib.PADDING_SCORE] * 2


class _FakeEstimator:
    def __init__(self, model_dir):
        self.model_dir = model_dir


def test_best_ndcg_exporter_keeps_only_improvements(tmp_path, monkeypatch):
    calls = []

    prep = object()   # handed through to the export, never read by the exporter

    stages = []

    def fake_export(model_dir, prep_dir, export_dir, checkpoint=None, list_stage="unset", **_):
        assert prep_dir is prep
        calls.append(checkpoint)
        stages.append(list_stage)
        path = os.path.join(export_dir, str(1000 + len(calls)))
        os.makedirs(path)
        return path

    monkeypatch.setattr(saved_model, "export_saved_model", fake_export)
    exporter = best_exporter.BestNdcgExporter(prep, exports_to_keep=2)
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
    again = best_exporter.BestNdcgExporter(prep)
    assert again.export(est, base, "c6", {"ndcg@5": 0.45}, False) is None
    # The list stage setting reaches every export (None: fit on the prep's valid lists).
    off = best_exporter.BestNdcgExporter(prep, list_stage="off")
    assert off.export(est, base, "c7", {"ndcg@5": 0.9}, False) is not None
    assert stages == [None, None, None, "off"]


def test_best_ndcg_exporter_survives_a_checkpoint_the_chief_removed(tmp_path, monkeypatch):
    def failing_export(*args, **kwargs):
        raise ValueError("The passed save_path is not a valid checkpoint")

    monkeypatch.setattr(saved_model, "export_saved_model", failing_export)
    exporter = best_exporter.BestNdcgExporter(object())
    base = str(tmp_path / "export" / exporter.name)
    os.makedirs(base)
    est = _FakeEstimator(str(tmp_path))
    gone = str(tmp_path / "model.ckpt-5")
    assert exporter.export(est, base, gone, {"ndcg@5": 0.5}, False) is None
    assert not os.path.exists(os.path.join(base, "best_metric.json"))
    # A checkpoint that is still there fails loudly: the error is not a removal.
    present = str(tmp_path / "model.ckpt-6")
    open(present + ".index", "w").close()
    with pytest.raises(ValueError, match="not a valid checkpoint"):
        exporter.export(est, base, present, {"ndcg@5": 0.6}, False)


def test_sample_serving_configs_parse():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "serving", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == warmup.DEFAULT_MODEL_NAME and model.model_platform == "tensorflow"
    # BatchingParameters is not in tensorflow-serving-api; check the fields by name.
    known = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
             "num_batch_threads", "allowed_batch_sizes", "pad_variable_length_inputs",
             "thread_pool_name", "enable_large_batch_splitting", "max_execution_batch_size"}
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


def _weights(prefix):
    reader = tf.train.load_checkpoint(prefix)
    names = sorted(n for n in reader.get_variable_to_shape_map() if n.startswith("ranker/"))
    assert names
    return {n: reader.get_tensor(n) for n in names}


def test_export_checkpoint_best_serves_the_best_evaluated_weights(world, tmp_path, capsys):
    model_dir = str(tmp_path / "model")
    fx.random_checkpoint(model_dir, world["prep_dir"], seed=0)
    best_dir = os.path.join(model_dir, "export", best_exporter.DEFAULT_NAME)
    best = saved_model.export_saved_model(model_dir, world["prep_dir"], best_dir,
                                          list_stage=list_fit.OFF)
    record = {"value": 0.5, "metric": "ndcg@5", "export": best,
              "checkpoint": os.path.join(model_dir, "model.ckpt-0")}   # removed by the chief
    with open(os.path.join(best_dir, best_exporter.BEST_FILE), "w") as f:
        json.dump(record, f)
    latest = fx.random_checkpoint(model_dir, world["prep_dir"], seed=1)  # training went on
    prefix, got = best_exporter.best_checkpoint(model_dir)
    assert prefix == os.path.join(best, "variables", "variables") and got == record

    out = str(tmp_path / "served")
    assert export_lib.main(["--model-dir", model_dir, "--data", world["prep"], "--export-dir",
                            out, "--checkpoint", "best", "--list-stage", "off"]) == 0
    assert "valid ndcg@5 0.5000" in capsys.readouterr().out
    (version,) = os.listdir(out)
    served = _weights(os.path.join(out, version, "variables", "variables"))
    expected, newer = _weights(prefix), _weights(latest)
    assert served.keys() == expected.keys()
    assert all(np.array_equal(served[n], expected[n]) for n in served)
    assert any(not np.array_equal(served[n], newer[n]) for n in served)

    # While the evaluated checkpoint exists it is the one used; without a record, none.
    record["checkpoint"] = latest
    with open(os.path.join(best_dir, best_exporter.BEST_FILE), "w") as f:
        json.dump(record, f)
    assert best_exporter.best_checkpoint(model_dir)[0] == latest
    assert best_exporter.best_checkpoint(str(tmp_path / "elsewhere")) is None
