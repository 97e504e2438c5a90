"""Property-based fuzzing of the serving signatures (hypothesis) on one tiny export.

Every request is either scored with finite outputs, or refused with InvalidArgument whose
message starts with the request field at fault (`rank.field_message`), never a crash or
another error. A change of one row (pair signatures) or one candidate (`rank`) never
changes another's score: a valid change leaves the others' scores as they were, a refused
one returns no score at all. `rank` is compared on its first_stage_scores (the list stage
mixes a list's candidates by design).

Requests are fed to the loaded graph through the C API, as TF Serving's Session receives
them from a gRPC client: no Python-side shape check or dtype conversion. A wrong dtype is
refused by the TF runtime before any op runs ("Expects arg[i] to be int64 but float is
provided", the only refusal that cannot name the field: it comes before the graph).
The model is exported and loaded once per module; max_examples are small (under 60 s).
"""
import base64
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_text  # noqa: F401  (the graph's NormalizeUTF8 op)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep import schema, tsv
from estimator import list_stage as list_lib
from export import rank
from export import signatures as sig_lib
from mmrecall_testing import export_fixtures as fx

FIELDS = sig_lib.PRODUCT_B64_FIELDS + sig_lib.PRODUCT_INT_FIELDS + (sig_lib.QUERY,)
# Tolerance between a row's score alone and in a changed batch (float rounding may depend
# on the batch's shapes, never on another row's values).
TOL = 1e-5
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuzz"))
    gen = fx.generate(os.path.join(root, "gen"), valid_queries=2, test_queries=1,
                      candidates=4)
    _, _, path = fx.tiny_export(root, gen_dir=gen)
    graph = tf.Graph()
    with graph.as_default():
        sess = tf.compat.v1.Session(graph=graph)
        meta = tf.compat.v1.saved_model.load(sess, [tf.saved_model.SERVING], path)
    yield dict(sess=sess, meta=meta, rows=fx.tsv_rows(os.path.join(gen, "valid.tsv")))
    sess.close()


def _run(served, signature, inputs):
    """Runs a signature on raw numpy inputs through the C API: {output: array}."""
    sess, sig = served["sess"], served["meta"].signature_def[signature]
    graph = sess.graph
    names = sorted(sig.outputs)
    feed = {graph.get_tensor_by_name(sig.inputs[k].name).ref(): v for k, v in inputs.items()}
    fetch = [graph.get_tensor_by_name(sig.outputs[k].name) for k in names]
    return dict(zip(names, sess._do_run(None, [], fetch, feed, None, None)))


def _outcome(served, signature, inputs):
    """(outputs, None) when scored (every float output finite), or (None, field) when
    refused; any other failure fails the test."""
    try:
        out = _run(served, signature, inputs)
    except tf.errors.InvalidArgumentError as e:
        message = rank.field_message(e.message)
        if message.startswith("Expects arg["):                    # a dtype, see above
            return None, "dtype"
        field = message.split(":")[0]
        assert field in FIELDS, f"refused without naming a field: {e.message}"
        return None, field
    for key, value in out.items():
        if np.issubdtype(value.dtype, np.floating):
            assert np.isfinite(value).all(), f"{signature} {key} not finite: {value}"
    return out, None


def _pairs(served, n=3):
    return fx.request(served["rows"][:n])


def _dense(served, n=3):
    rows = served["rows"][:n]
    width = max(int(r["num_boxes"]) for r in rows)
    req = fx.request(rows, ("query", "num_boxes", "image_h", "image_w"))
    req["boxes"] = np.zeros([n, width, schema.BOX_COORDS], np.float32)
    req["features"] = np.zeros([n, width, schema.FEATURE_DIM], np.float32)
    req["class_labels"] = np.zeros([n, width], np.int64)
    for i, r in enumerate(rows):
        k = int(r["num_boxes"])
        req["boxes"][i, :k] = np.frombuffer(base64.b64decode(r["boxes"]), "<f4").reshape(k, 4)
        req["features"][i, :k] = np.frombuffer(base64.b64decode(r["features"]),
                                               "<f4").reshape(k, -1)
        req["class_labels"][i, :k] = np.frombuffer(base64.b64decode(r["class_labels"]), "<i8")
    return req


INTS = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 100, 2 ** 31 - 1, 2 ** 31, 2 ** 32,
                                  2 ** 32 + 2, 2 ** 63 - 1, -2 ** 63]),
                 st.integers(-2 ** 63, 2 ** 63 - 1))
STRINGS = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=48).map(base64.b64encode),                  # valid text, any length
    st.text(max_size=24).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"", b"====", b"AAAA", b"not base64!", b"\xff\xfe"]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -0.0, -1.0, 1e30, 5000.0]))


def _value_change(field):
    """A strategy for one row's new value of `field` in a pair request."""
    return INTS if field in sig_lib.PRODUCT_INT_FIELDS else STRINGS


@FUZZ
@given(data=st.data())
def test_pair_request_with_one_row_changed_scores_the_others_as_before_or_is_refused(
        served, data):
    signature = data.draw(st.sampled_from([sig_lib.SERVING_DEFAULT, sig_lib.EMBED_PRODUCT,
                                           sig_lib.EMBED_QUERY]))
    inputs = _pairs(served)
    if signature == sig_lib.EMBED_PRODUCT:
        inputs.pop(sig_lib.QUERY)
    if signature == sig_lib.EMBED_QUERY:
        inputs = {sig_lib.QUERY: inputs[sig_lib.QUERY]}
    base, refused = _outcome(served, signature, inputs)
    assert refused is None
    field = data.draw(st.sampled_from(sorted(inputs)))
    row = data.draw(st.integers(0, 2))
    changed = {k: v.copy() for k, v in inputs.items()}
    changed[field][row] = data.draw(_value_change(field))
    out, refused = _outcome(served, signature, changed)
    if out is not None:
        others = [i for i in range(3) if i != row]
        for key, value in out.items():
            np.testing.assert_allclose(value[others], base[key][others], rtol=0, atol=TOL)
    if signature == sig_lib.SERVING_DEFAULT:      # every field of the row is in the request
        accepted = _prep_accepts(changed, row)
        if accepted is not None:
            # Serving agrees with prep's validator; prep's worker also refuses a query with
            # no word left, which the validator leaves to it.
            assert (out is not None) == accepted or (refused == sig_lib.QUERY and accepted), \
                (field, changed[field][row], refused)


def _prep_accepts(inputs, row):
    """Whether data_prep.tsv.parse_row accepts the request's row as a TSV line; None when
    the serving graph may read it otherwise (raw bytes of the right length, or a value a
    TSV line cannot hold: a tab or newline)."""
    values = {k: inputs[k][row] for k in FIELDS}
    for k in sig_lib.PRODUCT_B64_FIELDS:
        per_box = {"boxes": 16, "features": 8192, "class_labels": 8}[k]
        if len(values[k]) == int(values["num_boxes"]) * per_box:
            return None
    text = {k: v if isinstance(v, bytes) else str(int(v)).encode() for k, v in values.items()}
    if any(c in v for v in text.values() for c in (b"\t", b"\n", b"\r")):
        return None
    text.update(product_id=b"1", query_id=b"2")
    try:
        tsv.parse_row(b"\t".join(text[c] for c in schema.TSV_COLUMNS))
        return True
    except tsv.RowError:
        return False


def _reshape(value, how):
    if how == "drop_row":
        return value[:-1]
    if how == "add_row":
        return np.concatenate([value, value[:1]])
    if how == "add_axis":
        return value[:, None]
    if how == "scalar":
        return value[0]
    if how == "transpose":
        return np.ascontiguousarray(np.swapaxes(value, 0, 1)) if value.ndim > 1 else value
    return value[..., :-1] if value.ndim > 1 else value                    # "cut_inner"


DTYPES = {np.int64: [np.float32, np.int32, object], np.object_: [np.float32, np.int64],
          np.float32: [np.float64, np.int64, object]}
# The fields other fields' dimensions are compared with: a change of theirs is reported
# by whichever disagreeing field the executor checks first.
REFERENCES = (sig_lib.pg.NUM_BOXES_FIELD, sig_lib.pg.BOXES_FIELD)


@FUZZ
@given(data=st.data())
def test_every_signature_refuses_a_wrong_shape_or_dtype_naming_the_field(served, data):
    signature = data.draw(st.sampled_from([s for s in sig_lib.ALL_SIGNATURES]))
    if signature == sig_lib.RANK:
        inputs = rank.pad_lists([_list(served, 0), _list(served, 1)])
    elif signature in (sig_lib.SCORE_DENSE, sig_lib.EMBED_PRODUCT_DENSE):
        inputs = _dense(served)
    else:
        inputs = _pairs(served)
    if signature in (sig_lib.EMBED_PRODUCT, sig_lib.EMBED_PRODUCT_DENSE):
        inputs.pop(sig_lib.QUERY)
    if signature == sig_lib.EMBED_QUERY:
        inputs = {sig_lib.QUERY: inputs[sig_lib.QUERY]}
    field = data.draw(st.sampled_from(sorted(inputs)))
    value = inputs[field]
    reshaped = data.draw(st.booleans())
    if reshaped:
        how = data.draw(st.sampled_from(["drop_row", "add_row", "add_axis", "scalar",
                                         "transpose", "cut_inner"]))
        inputs[field] = _reshape(value, how)
    else:
        dtype = data.draw(st.sampled_from(DTYPES[value.dtype.type]))
        inputs[field] = np.zeros(value.shape, dtype) if dtype is not object else \
            np.full(value.shape, b"1", dtype=object)
    out, refused = _outcome(served, signature, inputs)
    if out is not None:
        # Scored only when every layout still holds: the shape is unchanged, or the query
        # of embed_query (its only input) has another length.
        assert reshaped and (inputs[field].shape == value.shape or (
            signature == sig_lib.EMBED_QUERY and inputs[field].ndim == 1))
    elif not reshaped:
        assert refused == "dtype"
    else:
        assert refused == field or field in REFERENCES, (field, refused)


def _list(served, q):
    """The q-th valid query's candidates as rank.pad_lists input."""
    by_query = {}
    for r in served["rows"]:
        by_query.setdefault(r["query_id"], []).append(r)
    rows = list(by_query.values())[q]
    return {k: [int(r[k]) if k in sig_lib.PRODUCT_INT_FIELDS else r[k].encode()
                for r in rows] for k in FIELDS}


@FUZZ
@given(data=st.data())
def test_rank_with_one_candidate_changed_keeps_the_others_first_stage_scores(served, data):
    inputs = rank.pad_lists([_list(served, 0), _list(served, 1)])          # [2, C]
    base, refused = _outcome(served, sig_lib.RANK, inputs)
    assert refused is None
    q = data.draw(st.integers(0, 1))
    c = data.draw(st.integers(0, inputs["num_boxes"].shape[1] - 1))
    field = data.draw(st.sampled_from(sig_lib.PRODUCT_B64_FIELDS + sig_lib.PRODUCT_INT_FIELDS))
    changed = {k: v.copy() for k, v in inputs.items()}
    changed[field][q, c] = data.draw(_value_change(field))
    out, refused = _outcome(served, sig_lib.RANK, changed)
    if out is not None:
        first = out[sig_lib.FIRST_STAGE_SCORES]
        mask = np.ones(first.shape, bool)
        mask[q, c] = False
        np.testing.assert_allclose(first[mask], base[sig_lib.FIRST_STAGE_SCORES][mask],
                                   rtol=0, atol=TOL)
        if changed["num_boxes"][q, c] == 0:       # now padding
            assert first[q, c] == list_lib.PADDING_SCORE


@FUZZ
@given(data=st.data())
def test_dense_request_with_one_box_value_changed_is_scored_alone_or_refused(served, data):
    inputs = _dense(served)
    base, refused = _outcome(served, sig_lib.SCORE_DENSE, inputs)
    assert refused is None
    row = data.draw(st.integers(0, 2))
    field = data.draw(st.sampled_from(["boxes", "features", "class_labels", "num_boxes",
                                       "image_h", "image_w"]))
    changed = {k: v.copy() for k, v in inputs.items()}
    target = changed[field][row]
    if field in sig_lib.PRODUCT_INT_FIELDS:
        changed[field][row] = data.draw(INTS)
    else:
        index = tuple(data.draw(st.integers(0, n - 1)) for n in target.shape)
        target[index] = data.draw(INTS.map(lambda v: v % 97 - 40) if field == "class_labels"
                                  else FLOATS)
    out, refused = _outcome(served, sig_lib.SCORE_DENSE, changed)
    if out is not None:
        others = [i for i in range(3) if i != row]
        for key, value in out.items():
            np.testing.assert_allclose(value[others], base[key][others], rtol=0, atol=TOL)
