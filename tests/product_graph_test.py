"""export.product_graph equals prep's reading of a TSV row (data_prep.tsv.parse_row, the box
cap of data_prep.geometry.largest_box_indices, data_prep.geometry) and rejects what prep
rejects, naming the field."""
import base64

import numpy as np
import pytest
import tensorflow as tf

from data_prep import geometry, schema, tsv
from export import product_graph as pg

MAX_BOXES = 4


def _row(rng, n, image_h=800, image_w=600, overshoot=False, ties=False):
    top = rng.integers(0, image_h // 2, n).astype(np.float32)
    left = rng.integers(0, image_w // 2, n).astype(np.float32)
    bottom = top + rng.integers(1, image_h // 2, n)
    right = left + rng.integers(1, image_w // 2, n)
    boxes = np.stack([top, left, bottom, right], 1).astype(np.float32)
    if overshoot:  # within the clip tolerance: clipped, not rejected
        boxes[0] = [-3, -geometry.CLIP_TOLERANCE_PX, image_h + 2.5, image_w + 4]
    if ties and n >= 3:  # equal areas: the earlier box wins
        boxes[1] = [0, 0, 10, 10]
        boxes[2] = [5, 5, 15, 15]
    features = rng.random((n, schema.FEATURE_DIM), dtype=np.float32) * 3
    features[features < 1.0] = 0.0
    labels = rng.integers(0, schema.NUM_CLASSES, n)
    return dict(product_id=1, image_h=image_h, image_w=image_w, boxes=boxes,
                features=features, class_labels=labels, query="red dress", query_id=2)


def _parse(line: str):
    """prep's row reader (it takes the raw bytes of a line)."""
    return tsv.parse_row(line.encode("utf-8"))


def _fields(rows):
    """TSV lines -> request fields (what a client sends: the TSV columns as they are)."""
    cols = [tsv.encode_row(**r).split("\t") for r in rows]
    idx = {c: i for i, c in enumerate(schema.TSV_COLUMNS)}
    out = {c: tf.constant([line[idx[c]] for line in cols]) for c in
           ("boxes", "features", "class_labels")}
    out.update({c: tf.constant([int(line[idx[c]]) for line in cols], tf.int64)
                for c in ("num_boxes", "image_h", "image_w")})
    return out


def _decode(fields, max_boxes=MAX_BOXES):
    return pg.decode_b64_products(fields["boxes"], fields["features"], fields["class_labels"],
                                  fields["num_boxes"], fields["image_h"], fields["image_w"],
                                  max_boxes)


def _expected(row, max_boxes=MAX_BOXES, model_max_boxes=0):
    """What prep stores and the input_fn feeds for this row (numpy reference): prep keeps
    the max_boxes largest boxes, the input_fn the model_max_boxes largest of those."""
    parsed = _parse(tsv.encode_row(**row))              # validated, boxes clipped
    keep = geometry.largest_box_indices(parsed.boxes, max_boxes)
    boxes, feats, labels = parsed.boxes[keep], parsed.features[keep], parsed.labels[keep]
    if model_max_boxes:
        keep = geometry.largest_box_indices(boxes, model_max_boxes)
        boxes, feats, labels = boxes[keep], feats[keep], labels[keep]
    geom = geometry.relative_geometry(boxes, parsed.image_h, parsed.image_w)
    return boxes, feats, labels, geom


def _assert_matches(out, rows, **caps):
    for i, row in enumerate(rows):
        boxes, feats, labels, geom = _expected(row, **caps)
        k = len(boxes)
        assert int(out.num_boxes[i]) == k
        np.testing.assert_array_equal(out.boxes[i, :k].numpy(), boxes)
        np.testing.assert_array_equal(out.box_features[i, :k].numpy(), feats)
        np.testing.assert_array_equal(out.box_labels[i, :k].numpy(), labels)
        np.testing.assert_allclose(out.box_geometry[i, :k].numpy(), geom, rtol=0, atol=1e-7)
        # Padding past the count is zero, as in the input_fn.
        assert not out.box_features[i, k:].numpy().any()
        assert not out.box_geometry[i, k:].numpy().any()
        assert not out.box_labels[i, k:].numpy().any()


def test_b64_rows_match_prep_including_cap_clip_and_ties():
    rng = np.random.default_rng(7)
    rows = [_row(rng, 1), _row(rng, 7, overshoot=True, ties=True), _row(rng, 3, 338, 209),
            _row(rng, 5, 80, 61, ties=True), _row(rng, 4, overshoot=True)]
    out = _decode(_fields(rows))
    assert out.box_features.shape[1] == MAX_BOXES
    assert out.box_labels.dtype == tf.int32 and out.num_boxes.dtype == tf.int32
    _assert_matches(out, rows)


def test_ties_keep_the_earlier_box():
    # Boxes 1 and 2 have equal areas (100 px^2); with a cap of 2 and box 0 the largest,
    # prep keeps boxes 0 and 1.
    rng = np.random.default_rng(3)
    row = _row(rng, 3, ties=True)
    row["boxes"][0] = [0, 0, 400, 300]
    out = _decode(_fields([row]), max_boxes=2)
    np.testing.assert_array_equal(out.boxes[0].numpy(), row["boxes"][:2])


def test_one_cap_of_the_smaller_size_equals_prep_then_model_cap():
    # Prep keeps the 5 largest boxes, the input_fn the 3 largest of those; serving applies
    # one cap of min(5, 3) = 3. Row 0's boxes grow with their index, so the 3 largest are
    # not the first 3 of prep's.
    rng = np.random.default_rng(5)
    rows = [_row(rng, 7, overshoot=True), _row(rng, 2), _row(rng, 6)]
    rows[2]["boxes"] = np.array([[0, 0, 10 * (i + 1), 10 * (i + 1)] for i in range(6)],
                                np.float32)
    out = _decode(_fields(rows), max_boxes=min(5, 3))
    assert out.box_features.shape[1] == 3
    _assert_matches(out, rows, max_boxes=5, model_max_boxes=3)
    np.testing.assert_array_equal(out.boxes[2].numpy(), rows[2]["boxes"][3:])


def _dense_arrays(rows, n, junk):
    """rows as dense request arrays padded to n boxes, the padding filled with junk
    (boxes, features, labels values)."""
    boxes = np.full([len(rows), n, 4], junk[0], np.float32)
    feats = np.full([len(rows), n, schema.FEATURE_DIM], junk[1], np.float32)
    labels = np.full([len(rows), n], junk[2], np.int64)
    for i, r in enumerate(rows):
        k = len(r["boxes"])
        boxes[i, :k], feats[i, :k], labels[i, :k] = r["boxes"], r["features"], r["class_labels"]
    return boxes, feats, labels


def _process_dense(rows, boxes, feats, labels, max_boxes=MAX_BOXES):
    ints = {c: tf.constant([len(r["boxes"]) if c == "num_boxes" else r[c] for r in rows],
                           tf.int64) for c in ("num_boxes", "image_h", "image_w")}
    return pg.process_dense_products(tf.constant(boxes), tf.constant(feats), tf.constant(labels),
                                     ints["num_boxes"], ints["image_h"], ints["image_w"],
                                     max_boxes)


def test_dense_variant_equals_b64():
    rng = np.random.default_rng(9)
    rows = [_row(rng, 6, overshoot=True), _row(rng, 2, 338, 209)]
    # More padding than needed (9 boxes), with junk that must not matter.
    dense = _process_dense(rows, *_dense_arrays(rows, 9, (123.0, -5.0, 99)))
    _assert_matches(dense, rows)
    b64 = _decode(_fields(rows))
    for a, b in zip(dense, b64):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _b64(array, dtype):
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


# (what to change in a valid 3-box row, the field the error must name, prep's reason)
BAD_REQUESTS = {
    "boxes_not_base64": (lambda f: f.update(boxes=f["boxes"][:-4] + "!!!="), "boxes"),
    "features_bad_length": (lambda f: f.update(features=f["features"] + "A"), "features"),
    # The web-safe alphabet is not the TSV's (the graph maps + / to - _ internally).
    "features_web_safe_alphabet": (lambda f: f.update(features="-_-_" + f["features"][4:]),
                                   "features"),
    "labels_not_base64": (lambda f: f.update(class_labels="@@@@" + f["class_labels"]),
                          "class_labels"),
    "boxes_short": (lambda f: f.update(boxes=_b64(np.zeros([2, 4]), "<f4")), "boxes"),
    "features_long": (lambda f: f.update(features=_b64(np.zeros([4, 2048]), "<f4")),
                      "features"),
    "labels_as_int32": (lambda f: f.update(class_labels=_b64(np.zeros([3]), "<i4")),
                        "class_labels"),
    "num_boxes_zero": (lambda f: f.update(num_boxes=0), "num_boxes"),
    # 3 boxes of base64 text are 64 characters, as long as 4 boxes of raw bytes: still an
    # error, never a misreading of the text as raw bytes.
    "num_boxes_mismatch": (lambda f: f.update(num_boxes=4), "boxes"),
    "image_h_zero": (lambda f: f.update(image_h=0), "image_h"),
    "image_w_negative": (lambda f: f.update(image_w=-600), "image_w"),
    "box_outside": (lambda f: f.update(boxes=_b64([[0, 0, 10, 10], [0, 0, 805, 10],
                                                   [1, 1, 2, 2]], "<f4")), "boxes"),
    "box_inverted": (lambda f: f.update(boxes=_b64([[0, 0, 10, 10], [20, 0, 10, 10],
                                                    [1, 1, 2, 2]], "<f4")), "boxes"),
    "box_nan": (lambda f: f.update(boxes=_b64([[0, 0, 10, 10], [np.nan, 0, 10, 10],
                                               [1, 1, 2, 2]], "<f4")), "boxes"),
    "label_out_of_range": (lambda f: f.update(class_labels=_b64([0, 33, 1], "<i8")),
                           "class_labels"),
    "feature_nan": (lambda f: f.update(features=_b64(np.full([3, 2048], np.nan), "<f4")),
                    "features"),
    "feature_negative": (lambda f: f.update(features=_b64(-np.ones([3, 2048]), "<f4")),
                         "features"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_naming_the_field(case):
    change, field = BAD_REQUESTS[case]
    rng = np.random.default_rng(1)
    good = tsv.encode_row(**_row(rng, 3)).split("\t")
    values = dict(zip(schema.TSV_COLUMNS, good))
    for c in ("num_boxes", "image_h", "image_w"):
        values[c] = int(values[c])
    change(values)
    # Prep rejects the same row, naming the same field.
    line = "\t".join(str(values[c]) for c in schema.TSV_COLUMNS)
    with pytest.raises(tsv.RowError) as prep_error:
        _parse(line)
    assert prep_error.value.field == field
    # A good row in the same batch does not hide the bad one.
    other = dict(zip(schema.TSV_COLUMNS, good))
    fields = {c: tf.constant([other[c], values[c]]) for c in ("boxes", "features",
                                                              "class_labels")}
    fields.update({c: tf.constant([int(other[c]), values[c]], tf.int64)
                   for c in ("num_boxes", "image_h", "image_w")})
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"\b{field}: "):
        _decode(fields)


def test_dense_num_boxes_beyond_padding_is_rejected():
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_boxes: larger than"):
        pg.process_dense_products(
            tf.zeros([1, 2, 4]), tf.zeros([1, 2, schema.FEATURE_DIM]), tf.zeros([1, 2], tf.int64),
            tf.constant([3], tf.int64), tf.constant([800], tf.int64),
            tf.constant([800], tf.int64), MAX_BOXES)


def test_serving_is_stricter_than_python_about_trailing_padding():
    # CPython's a2b_base64(strict_mode=True) accepts "=" after a complete 4-character group
    # ("AAAA=" decodes to 3 bytes); no encoder writes that, and the graph rejects it.
    rng = np.random.default_rng(2)
    fields = _fields([_row(rng, 2)])
    fields["boxes"] = tf.strings.join([fields["boxes"], "="])
    with pytest.raises(tf.errors.InvalidArgumentError, match="boxes: neither standard base64 text"):
        _decode(fields)


def test_raw_bytes_rows_equal_base64_rows():
    # TF Serving's REST API turns {"b64": "<TSV field>"} into the raw bytes: accepted too,
    # row by row, with the same result.
    rng = np.random.default_rng(4)
    rows = [_row(rng, 3), _row(rng, 5, overshoot=True), _row(rng, 1)]
    fields = _fields(rows)
    mixed = dict(fields)
    for key in ("boxes", "features", "class_labels"):
        values = [base64.b64decode(v) if i != 1 else v
                  for i, v in enumerate(fields[key].numpy())]
        mixed[key] = tf.constant(values)
    for a, b in zip(_decode(fields), _decode(mixed)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_raw_bytes_of_the_wrong_length_are_rejected():
    rng = np.random.default_rng(6)
    row = _row(rng, 3)
    fields = _fields([row])
    fields["features"] = tf.constant([row["features"][:2].astype("<f4").tobytes()])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="features: neither standard base64 text .* nor num_boxes x 8192 "
                             "raw bytes"):
        _decode(fields)


def test_dense_without_cap_zeroes_junk_padding():
    # Every row has at most max_boxes boxes, so the cap keeps all boxes in order (the graph
    # then masks instead of gathering); junk past num_boxes must still come out as zeros.
    rng = np.random.default_rng(12)
    rows = [_row(rng, 3, overshoot=True), _row(rng, 1, 338, 209), _row(rng, 2)]
    n = 5
    out = _process_dense(rows, *_dense_arrays(rows, n, (55.0, 7.0, 5)), max_boxes=8)
    assert out.box_features.shape[1] == n
    _assert_matches(out, rows, max_boxes=8)


# Two problems in one request: the error is the one prep reports first (its field order:
# boxes, features, class_labels), however the graph schedules its string work.
TWO_PROBLEMS = [
    (dict(boxes="AAAA", features="not base64!"), "boxes"),
    (dict(features="@@@@", class_labels="AAAA"), "features"),
    (dict(features="AAAA", class_labels="@@@@"), "features"),
    (dict(boxes="!!!!", features="AAAA", class_labels="AAAA"), "boxes"),
]


@pytest.mark.parametrize("changes, field", TWO_PROBLEMS)
def test_several_problems_report_preps_first(changes, field):
    # Run as the model server runs the SavedModel: a TF1 graph in a Session, where ops
    # without dependencies run in parallel (eagerly, ops would just run in program order).
    rng = np.random.default_rng(8)
    good = dict(zip(schema.TSV_COLUMNS, tsv.encode_row(**_row(rng, 3)).split("\t")))
    bad = dict(good, **changes)
    with tf.Graph().as_default():
        fields = {c: tf.constant([good[c], bad[c]]) for c in ("boxes", "features",
                                                              "class_labels")}
        fields.update({c: tf.constant([int(good[c])] * 2, tf.int64)
                       for c in ("num_boxes", "image_h", "image_w")})
        out = _decode(fields)
        with tf.compat.v1.Session() as sess:
            for _ in range(10):  # a race between the fields' checks would make this flaky
                with pytest.raises(tf.errors.InvalidArgumentError, match=rf"\b{field}: "):
                    sess.run(out.box_features)


@pytest.mark.parametrize("lengths, pieces", [([], 2), ([5], 2), ([4, 2, 6, 1], 2),
                                             ([4, 2, 6, 1], 3), ([7, 7, 7, 7, 7], 4)])
def test_split_by_bytes_keeps_order_and_balances_bytes(lengths, pieces):
    rows = tf.constant([chr(97 + i) * n for i, n in enumerate(lengths)], tf.string)
    parts = pg._split_by_bytes(tf.strings.length(rows), pieces, rows, rows)
    assert len(parts) == 2 and all(len(p) == pieces for p in parts)
    # Consecutive runs: concatenated they are the rows, in order.
    np.testing.assert_array_equal(tf.concat(parts[0], 0).numpy(), rows.numpy())
    # Run j ends after the rows whose cumulative bytes are <= j/pieces of the total, e.g.
    # [4, 2, 6, 1] in 2: total 13, target 13 // 2 = 6, cumulative 4, 6, 12, 13 -> the
    # first run is rows 0-1, the second rows 2-3.
    total, ends = sum(lengths), np.cumsum(lengths)
    sizes = [int(tf.size(p)) for p in parts[0]]
    want = np.diff([0] + [int(np.searchsorted(ends, total * j // pieces, side="right"))
                          for j in range(1, pieces)] + [len(lengths)])
    np.testing.assert_array_equal(sizes, want)
    if lengths == [4, 2, 6, 1] and pieces == 2:
        assert sizes == [2, 2]


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_features_decoded_in_pieces_equal_prep_and_name_a_bad_row_in_any_piece(
        monkeypatch, pieces):
    # The features' string work runs in `pieces` runs of rows: every run decodes as prep
    # does, and a bad row in the last run is still refused naming the field.
    monkeypatch.setattr(pg, "_FEATURE_PIECES", pieces)
    rng = np.random.default_rng(13)
    rows = [_row(rng, n) for n in (1, 4, 2, 3, 1)]
    _assert_matches(_decode(_fields(rows)), rows)
    fields = _fields(rows)
    values = list(fields["features"].numpy())
    values[-1] = b"!!!!" + values[-1][4:]
    fields["features"] = tf.constant(values)
    with pytest.raises(tf.errors.InvalidArgumentError, match="features: neither standard"):
        _decode(fields)


@pytest.mark.parametrize("values, message", [
    ([-0.0], None), ([3e38], None), ([np.inf], "not finite"), ([-np.inf], "not finite"),
    ([np.nan], "not finite"), ([-1e-45], "negative value"),
    # Both problems in one box: finiteness is reported first, as prep does.
    ([-1.0, np.nan], "not finite"), ([-1.0, np.inf], "not finite"),
])
def test_feature_values_as_prep_including_negative_zero(values, message):
    # -0.0 has the sign bit set, like a negative value, and +inf's bits follow the largest
    # finite value's: the graph's one-reduction test lets neither through unchecked.
    rng = np.random.default_rng(14)
    rows = [_row(rng, 2), _row(rng, 3)]
    rows[1]["features"][1, 5:5 + len(values)] = values
    line = tsv.encode_row(**rows[1])
    if message is None:
        _parse(line)                                       # prep accepts the row
        _assert_matches(_decode(_fields(rows)), rows)
        return
    with pytest.raises(tsv.RowError):
        _parse(line)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"features: {message}"):
        _decode(_fields(rows))


def test_dense_padding_junk_never_fails_the_feature_checks():
    # NaN, -inf and negative values past num_boxes are ignored and come out as +0.0.
    rng = np.random.default_rng(15)
    rows = [_row(rng, 2), _row(rng, 1)]
    boxes, feats, labels = _dense_arrays(rows, 3, (0.0, np.nan, 0))
    feats[1, 1:, :7] = [-np.inf, -1.0, 0.0, -0.0, np.inf, 1.0, np.nan]
    out = _process_dense(rows, boxes, feats, labels)
    _assert_matches(out, rows)
    assert not np.signbit(out.box_features.numpy()[0, 2:]).any()
    assert not np.signbit(out.box_features.numpy()[1, 1:]).any()


def _session_run(build, arrays):
    """build(*placeholders) run in a TF1 Session on `arrays`, as the model server runs the
    SavedModel: every branch of the graph is built and the one taken chosen at run time
    (eagerly, only the branch the values pick would be built)."""
    with tf.Graph().as_default():
        phs = [tf.compat.v1.placeholder(tf.as_dtype(a.dtype) if a.dtype != object
                                        else tf.string, [None] * a.ndim) for a in arrays]
        out = build(*phs)
        with tf.compat.v1.Session() as sess:
            return sess.run(out, dict(zip(phs, arrays)))


def _field_arrays(fields):
    keys = ("boxes", "features", "class_labels", "num_boxes", "image_h", "image_w")
    return [np.array(list(fields[k].numpy()), dtype=object) if fields[k].dtype == tf.string
            else fields[k].numpy() for k in keys]


@pytest.mark.parametrize("raw_rows", [(), (0, 1, 2, 3), (1, 3)])
def test_text_raw_and_mixed_requests_equal_prep_in_a_session(raw_rows):
    # All text, all raw bytes (the features are then neither split nor mapped), both kinds.
    rng = np.random.default_rng(16)
    rows = [_row(rng, 3), _row(rng, 5, overshoot=True), _row(rng, 1), _row(rng, 2)]
    arrays = _field_arrays(_fields(rows))
    for a in arrays[:3]:
        for i in raw_rows:
            a[i] = base64.b64decode(a[i])
    out = _session_run(lambda *f: pg.decode_b64_products(*f, MAX_BOXES), arrays)
    _assert_matches(pg.Products(*(tf.constant(v) for v in out)), rows)


@pytest.mark.parametrize("field, other_rows_raw", [
    ("features", True), ("features", False), ("class_labels", True), ("boxes", False)])
def test_raw_length_rows_that_read_as_base64_are_refused_in_a_session(field, other_rows_raw):
    # num_boxes x bytes of base64 alphabet ("AAAA..."): the text reading wins, and text of
    # that length decodes to the wrong length, whether the other rows are raw or text.
    rng = np.random.default_rng(17)
    arrays = _field_arrays(_fields([_row(rng, 3), _row(rng, 2)]))
    keys = ("boxes", "features", "class_labels")
    if other_rows_raw:
        for a in arrays[:3]:
            a[0] = base64.b64decode(a[0])
    width = {"boxes": 16, "features": 8192, "class_labels": 8}[field]
    arrays[keys.index(field)][1] = b"A" * (2 * width)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{field}: decoded length \(bytes\) does not match"):
        _session_run(lambda *f: pg.decode_b64_products(*f, MAX_BOXES), arrays)


@pytest.mark.parametrize("junk, max_boxes", [(0.0, 8), (-0.0, 8), (np.nan, 8), (0.0, 2)])
def test_dense_padding_in_a_session_comes_out_as_positive_zero(junk, max_boxes):
    # +0.0 padding without a cap is passed as is; other padding is zeroed; a cap gathers.
    rng = np.random.default_rng(18)
    rows = [_row(rng, 3), _row(rng, 1)]
    boxes, feats, labels = _dense_arrays(rows, 4, (0.0, junk, 0))
    ints = [np.array([len(r["boxes"]) if c == "num_boxes" else r[c] for r in rows], np.int64)
            for c in ("num_boxes", "image_h", "image_w")]
    out = pg.Products(*(tf.constant(v) for v in _session_run(
        lambda *a: pg.process_dense_products(*a, max_boxes), [boxes, feats, labels] + ints)))
    _assert_matches(out, rows, max_boxes=max_boxes)
    assert not np.signbit(out.box_features.numpy()).any()
