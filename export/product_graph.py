"""In-graph product preprocessing: the competition's raw fields -> the model's box inputs.

Mirrors what prep does to a TSV row (base64 decoding, validation, clipping to the image with
`geometry.CLIP_TOLERANCE_PX`, the cap to the `max_boxes` largest boxes in original order,
`geometry.relative_geometry`), with core TensorFlow ops only, batched.

Two entry points:
  * `decode_b64_products`: base64 strings as they appear in the TSV (standard alphabet,
    '=' padding), one product per row. `tf.io.decode_raw` needs equal lengths across a
    batch, so rows are decoded with `fixed_length` = the longest row's byte count (the op
    zero-fills shorter rows) after their lengths have been checked against `num_boxes`.
  * `process_dense_products`: padded float tensors for clients that hold features in memory.

Every bad request fails with InvalidArgument whose message starts with the offending request
field (`boxes: ...`, `features: ...`), never a crash or a silent garbage score.

Dimension legend: B products, N boxes (padded request width), M kept boxes (min(N, max_boxes)),
F region feature width (2048), G geometry width (6).
"""
from typing import Dict, NamedTuple, Tuple

import tensorflow as tf

from data_prep import geometry
from data_prep import schema

# Request field names (the TSV column names, so a TSV row can be sent as is).
BOXES_FIELD = "boxes"
FEATURES_FIELD = "features"
LABELS_FIELD = "class_labels"
NUM_BOXES_FIELD = "num_boxes"
IMAGE_H_FIELD = "image_h"
IMAGE_W_FIELD = "image_w"
# Dense variant: `features` holds float32 [B, N, F] instead of base64 text.

_B64_PATTERN = "[A-Za-z0-9+/]*={0,2}"
_BOX_BYTES = schema.BOX_COORDS * schema.TSV_BOXES_DTYPE.itemsize          # 16
_FEATURE_BYTES = schema.FEATURE_DIM * schema.TSV_FEATURES_DTYPE.itemsize  # 8192
_LABEL_BYTES = schema.TSV_LABELS_DTYPE.itemsize                          # 8
# The features are nearly all of a request's text (8 KB a box); their string work is split
# into this many runs of rows, which run on separate cores (_b64_parts).
_FEATURE_PIECES = 2


class Products(NamedTuple):
    """Model-ready box inputs (see schema.F_*)."""
    box_features: tf.Tensor  # float32 [B, N, F], zero past num_boxes
    box_geometry: tf.Tensor  # float32 [B, N, G], zero past num_boxes
    box_labels: tf.Tensor    # int32 [B, N], zero past num_boxes
    num_boxes: tf.Tensor     # int32 [B], in [1, max_boxes]
    boxes: tf.Tensor         # float32 [B, N, 4] clipped pixel boxes, zero past num_boxes


def _assert(condition: tf.Tensor, message: str):
    """Fails with InvalidArgument "<message>" unless `condition` (bool, any shape) holds
    everywhere.

    One Assert op whose only data is the message: tf.debugging.assert_* wrap theirs in a
    cond (several ops, run on every request) to print the tensors, which the field-naming
    message does not need.
    """
    return tf.debugging.Assert(tf.reduce_all(condition), [message])


def _with_checks(checks, tensors):
    with tf.control_dependencies(checks):
        return [tf.identity(t) for t in tensors]


class _B64Parts(NamedTuple):
    """The check-free part of decoding one field (see _b64_parts)."""
    strings: tf.Tensor    # string [B], the request's rows
    is_text: tf.Tensor    # bool [B], the row is well-formed standard base64 text
    ok: tf.Tensor         # bool scalar, every row is base64 text or raw bytes of the length
    web_safe: Tuple[tf.Tensor, ...]  # string [B_i] per piece: text rows in the web-safe
                                     # alphabet, "" for raw rows; concatenated, [B]


def _split_by_bytes(length: tf.Tensor, pieces: int, *rows: tf.Tensor):
    """Splits each of `rows` (string [B]) into `pieces` consecutive runs of rows of about
    equal byte counts, as given by `length` int32 [B]. Returns one tuple of pieces per rows."""
    if pieces == 1:
        return [(r,) for r in rows]
    ends = tf.cumsum(tf.cast(length, tf.int64))                              # [B]
    total = tf.reduce_sum(tf.cast(length, tf.int64))
    targets = total * tf.range(1, pieces, dtype=tf.int64) // pieces          # [pieces - 1]
    cuts = tf.concat([[0], tf.searchsorted(ends, targets, side="right", out_type=tf.int64),
                      tf.shape(length, out_type=tf.int64)], axis=0)         # [pieces + 1]
    return [tuple(tf.split(r, cuts[1:] - cuts[:-1], num=pieces)) for r in rows]


def _b64_parts(strings: tf.Tensor, num_boxes: tf.Tensor, bytes_per_box: int,
               pieces: int = 1) -> _B64Parts:
    """The expensive, check-free part of reading base64 text or raw bytes [B].

    A row that is well-formed standard base64 text (as in the TSV) is decoded; any other row
    is taken as the raw bytes themselves (what TF Serving's REST API feeds for a
    `{"b64": ...}` JSON value, or what a gRPC client may send) and must then be exactly
    num_boxes x bytes_per_box long. Raw float32/int64 rows practically always hold bytes
    outside the base64 alphabet (zero bytes, exponent bytes 0x3f/0x40), and a raw row that
    does not is decoded and then fails the length check: the text reading always wins, so a
    wrong num_boxes can never turn base64 text into "raw" garbage.

    Nothing here can fail, so it runs without control dependencies: the alphabet scan
    (`regex_full_match`) and the alphabet mapping (`regex_replace`), each a pass over the
    text, depend only on the request, so they run in parallel with each other, with the
    other fields' and with the other checks. Only `DecodeBase64`, which fails (without
    naming a field) on a character outside its alphabet, must wait for the field's check
    (_decode_checked).

    Each op walks its rows one after the other on one thread; `pieces` > 1 splits the
    rows into runs of about equal bytes, each scanned, mapped and decoded by ops of its
    own, so that a large field (the features) uses several cores. Such a field is neither
    split nor mapped when every row has the raw length (a raw-bytes request), which would
    copy every string for nothing: its one scan stops at a raw row's first byte outside
    the alphabet. (For a small field the branch would cost more ops than the copies.)
    """
    length = tf.strings.length(strings)                                      # [B] int32
    raw_ok = tf.equal(tf.cast(length, tf.int64),
                      tf.cast(num_boxes, tf.int64) * bytes_per_box)          # [B]

    def some_text():
        # Rows of the raw length are blanked, so the mapping walks text only, without
        # waiting for the scan. Text of that length never has the right length when
        # decoded (4 base64 characters hold 3 bytes), so the blank decodes to the same
        # refusal (_check_lengths).
        text = tf.where(raw_ok, tf.fill(tf.shape(strings), ""), strings)
        alphabet_ok, web_safe = [], []
        for piece, piece_text in zip(*_split_by_bytes(length, pieces, strings, text)):
            alphabet_ok.append(tf.strings.regex_full_match(piece, _B64_PATTERN))
            # tf.io.decode_base64 reads the web-safe alphabet only.
            web_safe.append(tf.strings.regex_replace(
                tf.strings.regex_replace(piece_text, r"\+", "-"), "/", "_"))
        return [tf.concat(alphabet_ok, axis=0)] + web_safe

    def all_raw():
        # Every row blanked, as some_text() would; empty further pieces.
        blank = tf.fill(tf.shape(strings), "")
        return ([tf.strings.regex_full_match(strings, _B64_PATTERN), blank] +
                [blank[:0]] * (pieces - 1))

    alphabet_ok, *web_safe = (tf.cond(tf.reduce_all(raw_ok), all_raw, some_text)
                              if pieces > 1 else some_text())
    is_text = tf.logical_and(alphabet_ok, tf.equal(length % 4, 0))           # [B]
    ok = tf.reduce_all(tf.logical_or(is_text, raw_ok))
    return _B64Parts(strings, is_text, ok, tuple(web_safe))


def _decode_checked(parts: _B64Parts, num_boxes: tf.Tensor, bytes_per_box: int, field: str,
                    after) -> Tuple[tf.Tensor, tf.Operation]:
    """Base64 check, decoding and length check of one field, run after the ops `after`.

    Returns (raw little-endian bytes [B], the field's last check). Fails naming `field`.
    """
    with tf.control_dependencies(after):
        b64_check = _assert(
            parts.ok,
            f"{field}: neither standard base64 text (alphabet A-Z a-z 0-9 + /, '=' "
            f"padding, length a multiple of 4) nor num_boxes x {bytes_per_box} raw bytes")

    def text():
        return tf.concat([tf.io.decode_base64(w) for w in parts.web_safe], axis=0)  # [B]

    def mixed():
        return tf.where(parts.is_text, text(), parts.strings)

    with tf.control_dependencies([b64_check]):
        if len(parts.web_safe) == 1:
            decoded = mixed()
        else:
            # A field read in pieces is large: a string select copies every string, so it
            # runs only for a request of both kinds, and no DecodeBase64 for raw rows.
            kind = (tf.cast(tf.reduce_any(parts.is_text), tf.int32) +
                    tf.cast(tf.reduce_all(parts.is_text), tf.int32))  # 0 raw, 1 both, 2 text
            decoded = tf.switch_case(kind, [lambda: tf.identity(parts.strings), mixed, text])
            decoded.set_shape(parts.strings.shape)
        length_check = _check_lengths(decoded, num_boxes, bytes_per_box, field)
    return decoded, length_check


def _check_lengths(decoded: tf.Tensor, num_boxes: tf.Tensor, bytes_per_box: int,
                   field: str) -> tf.Operation:
    expected = tf.cast(num_boxes, tf.int64) * bytes_per_box
    actual = tf.cast(tf.strings.length(decoded), tf.int64)
    return _assert(
        tf.equal(actual, expected),
        f"{field}: decoded length (bytes) does not match num_boxes x {bytes_per_box} bytes "
        f"per box")


def _decode_padded(decoded: tf.Tensor, dtype, bytes_per_box: int, max_n: tf.Tensor,
                   inner_shape) -> tf.Tensor:
    """Equal-length decode of rows of different lengths: zero-fills up to the longest."""
    fixed = tf.cast(tf.maximum(max_n, 1) * bytes_per_box, tf.int32)
    values = tf.io.decode_raw(decoded, dtype, little_endian=True, fixed_length=fixed)
    return tf.reshape(values, tf.concat([[tf.shape(decoded)[0], tf.maximum(max_n, 1)],
                                         tf.constant(inner_shape, tf.int32)], axis=0))


# Box counts are int32 in the graph; a larger request count must be refused before the
# cast, which would wrap 2**32 + n around to n.
_MAX_NUM_BOXES = 2 ** 31 - 1


def _common_checks(num_boxes, image_h, image_w, max_n=None):
    """Checks of the count and image fields; returns (num_boxes as int32, checks).

    The count is range-checked in its request dtype (int64), and cast only after the checks.
    """
    checks = [
        _assert(num_boxes > 0, f"{NUM_BOXES_FIELD}: must be >= 1"),
        _assert(num_boxes <= tf.constant(_MAX_NUM_BOXES, num_boxes.dtype),
                f"{NUM_BOXES_FIELD}: must be <= {_MAX_NUM_BOXES}"),
        _assert(image_h > 0, f"{IMAGE_H_FIELD}: must be > 0"),
        _assert(image_w > 0, f"{IMAGE_W_FIELD}: must be > 0"),
    ]
    if max_n is not None:
        checks.append(_assert(
            tf.cast(num_boxes, tf.int64) <= tf.cast(max_n, tf.int64),
            f"{NUM_BOXES_FIELD}: larger than the padded box dimension of the inputs"))
    with tf.control_dependencies(checks[:2]):
        return tf.cast(num_boxes, tf.int32), checks


def decode_b64_boxes(boxes: tf.Tensor, features: tf.Tensor, class_labels: tf.Tensor,
                     num_boxes: tf.Tensor, image_h: tf.Tensor, image_w: tf.Tensor):
    """Decodes TSV base64 fields into padded arrays, checking them against num_boxes.

    Args:
      boxes: string [B], base64 of little-endian float32 [num_boxes, 4] pixel
        top, left, bottom, right.
      features: string [B], base64 of little-endian float32 [num_boxes, 2048].
      class_labels: string [B], base64 of little-endian int64 [num_boxes].
      num_boxes, image_h, image_w: int [B].
      Each of the three string fields may instead hold the raw little-endian bytes (see
      _decode_b64), row by row.
    Returns:
      (boxes float32 [B, N, 4], features float32 [B, N, F], class_labels int64 [B, N]),
      N = the batch's largest num_boxes, zero past each row's count.
    """
    num_boxes, checks = _common_checks(num_boxes, image_h, image_w)
    fields = ((BOXES_FIELD, boxes, _BOX_BYTES), (FEATURES_FIELD, features, _FEATURE_BYTES),
              (LABELS_FIELD, class_labels, _LABEL_BYTES))
    # The heavy string work of the three fields has no control dependencies (it cannot
    # fail) and runs in parallel; the checks run one after the other, in prep's order
    # (data_prep.tsv.parse_row), so a request with several problems reports the one prep
    # would.
    parts = {field: _b64_parts(value, num_boxes, width,
                               _FEATURE_PIECES if field == FEATURES_FIELD else 1)
             for field, value, width in fields}
    raw = {}
    for field, _, width in fields:
        raw[field], length_check = _decode_checked(parts[field], num_boxes, width, field,
                                                   checks)
        checks = [length_check]
    with tf.control_dependencies(checks):
        max_n = tf.reduce_max(num_boxes)
        box_values = _decode_padded(raw[BOXES_FIELD], tf.float32, _BOX_BYTES, max_n,
                                    [schema.BOX_COORDS])
        feature_values = _decode_padded(raw[FEATURES_FIELD], tf.float32, _FEATURE_BYTES, max_n,
                                        [schema.FEATURE_DIM])
        label_values = _decode_padded(raw[LABELS_FIELD], tf.int64, _LABEL_BYTES, max_n, [])
    return box_values, feature_values, label_values


def decode_b64_products(boxes: tf.Tensor, features: tf.Tensor, class_labels: tf.Tensor,
                        num_boxes: tf.Tensor, image_h: tf.Tensor, image_w: tf.Tensor,
                        max_boxes: int) -> Products:
    """Decodes and preprocesses products given as TSV fields (see decode_b64_boxes).

    Args:
      max_boxes: keep the `max_boxes` largest boxes by pixel area, in original order (the
        serving cap: the smaller of prep's and the model's, see ServingGraph).
    Returns:
      Products, boxes padded to the batch's largest kept count (at most max_boxes).
    """
    box_values, feature_values, label_values = decode_b64_boxes(
        boxes, features, class_labels, num_boxes, image_h, image_w)
    return process_dense_products(box_values, feature_values, label_values, num_boxes,
                                  image_h, image_w, max_boxes)


def process_dense_products(boxes: tf.Tensor, features: tf.Tensor, class_labels: tf.Tensor,
                           num_boxes: tf.Tensor, image_h: tf.Tensor, image_w: tf.Tensor,
                           max_boxes: int) -> Products:
    """Preprocesses padded dense products (values past num_boxes are ignored).

    Args:
      boxes: float32 [B, N, 4] pixel top, left, bottom, right.
      features: float32 [B, N, F].
      class_labels: int [B, N].
      num_boxes, image_h, image_w: int [B].
      max_boxes: as in decode_b64_products.
    Returns:
      Products, boxes padded to min(N, max_boxes).
    """
    num_boxes, checks = _common_checks(num_boxes, image_h, image_w, max_n=tf.shape(boxes)[1])
    checks.append(_assert(tf.equal(tf.shape(features)[1], tf.shape(boxes)[1]),
                          f"{FEATURES_FIELD}: box dimension differs from {BOXES_FIELD}'s"))
    checks.append(_assert(tf.equal(tf.shape(class_labels)[1], tf.shape(boxes)[1]),
                          f"{LABELS_FIELD}: box dimension differs from {BOXES_FIELD}'s"))
    boxes, features, class_labels = _with_checks(
        checks, [tf.cast(boxes, tf.float32), tf.cast(features, tf.float32),
                 tf.cast(class_labels, tf.int64)])
    return _process(boxes, features, class_labels, num_boxes, image_h, image_w, max_boxes)


def _process(boxes, features, labels, num_boxes, image_h, image_w, max_boxes) -> Products:
    """Validation, clipping, cap and geometry of padded boxes.

    Args:
      boxes: float32 [B, N, 4]; features float32 [B, N, F]; labels int64 [B, N];
      num_boxes int32 [B] (<= N); image_h, image_w int [B].
    """
    n_pad = tf.shape(boxes)[1]
    valid = tf.sequence_mask(num_boxes, n_pad)                             # [B, N]
    valid4 = tf.broadcast_to(valid[:, :, None], tf.shape(boxes))           # [B, N, 4]
    h = tf.cast(image_h, tf.float32)[:, None, None]
    w = tf.cast(image_w, tf.float32)[:, None, None]
    limits = tf.concat([h, w, h, w], axis=2)                               # [B, 1, 4]
    tol = geometry.CLIP_TOLERANCE_PX
    masked_boxes = tf.where(valid4, boxes, tf.zeros_like(boxes))
    inside = tf.logical_and(masked_boxes >= -tol, masked_boxes <= limits + tol)
    clipped = tf.clip_by_value(masked_boxes, 0.0, limits)                  # as np.clip, float32
    top, left, bottom, right = tf.unstack(clipped, axis=2)
    ordered = tf.logical_or(tf.logical_not(valid),
                            tf.logical_and(top < bottom, left < right))
    labels_ok = tf.logical_or(tf.logical_not(valid),
                              tf.logical_and(labels >= 0, labels < schema.NUM_CLASSES))
    invalid = tf.logical_not(valid)
    box_finite, box_not_negative, padding_zero = _feature_checks(features, valid)
    # (condition, message) in prep's order (data_prep.tsv.parse_row); chained below so the
    # first failing one is reported.
    conditions = [
        (tf.logical_or(tf.logical_not(valid4), tf.math.is_finite(boxes)),
         f"{BOXES_FIELD}: not finite"),
        (tf.logical_or(invalid, box_finite), f"{FEATURES_FIELD}: not finite"),
        (tf.logical_or(invalid, box_not_negative),
         f"{FEATURES_FIELD}: negative value (region features are >= 0)"),
        (labels_ok, f"{LABELS_FIELD}: class id outside [0, {schema.NUM_CLASSES})"),
        (tf.logical_or(tf.logical_not(valid4), inside),
         f"{BOXES_FIELD}: outside the image by more than {geometry.CLIP_TOLERANCE_PX:g} px"),
        (ordered, f"{BOXES_FIELD}: need top < bottom and left < right (after clipping)"),
    ]
    checks = []
    for condition, message in conditions:
        with tf.control_dependencies(checks):
            checks = [_assert(condition, message)]
    with tf.control_dependencies(checks):
        clipped = tf.identity(clipped)

    # Cap: the max_boxes largest (pixel area, float64 as numpy) in original order; ties keep
    # the earlier box (stable sort), padding sorts last.
    c64 = tf.cast(clipped, tf.float64)
    area = (c64[:, :, 2] - c64[:, :, 0]) * (c64[:, :, 3] - c64[:, :, 1])  # [B, N]
    area = tf.where(valid, area, tf.fill(tf.shape(area), tf.constant(-float("inf"), tf.float64)))
    by_area = tf.argsort(-area, axis=1, stable=True)                      # [B, N]
    kept_n = tf.minimum(num_boxes, max_boxes)                              # [B]
    k_pad = tf.minimum(n_pad, max_boxes)
    top_m = by_area[:, :k_pad]                                             # [B, M]
    kept = tf.sequence_mask(kept_n, k_pad)                                 # [B, M]
    # Put the kept indices back in original order; dropped slots sort to the end.
    index = tf.sort(tf.where(kept, top_m, tf.fill(tf.shape(top_m), n_pad)), axis=1)
    index = tf.where(kept, index, tf.zeros_like(index))                    # [B, M]

    kept_boxes = tf.gather(clipped, index, batch_dims=1)                   # [B, M, 4]
    kept_labels = tf.gather(labels, index, batch_dims=1)                   # [B, M]
    geometry_rows = _relative_geometry(kept_boxes, image_h, image_w)       # [B, M, G]

    # Features [B, N, F]. With no cap (M == N: every box kept, in order) the gather is the
    # identity and only the padding must be zeroed, one pass instead of two; and when the
    # padding already holds +0.0 only (its bits are 0: decoded requests, which decode_raw
    # zero-fills, and most dense ones) not even that. All three give the same values (kept
    # features are finite and >= 0).
    no_cap = tf.cast(tf.equal(k_pad, n_pad), tf.int32)
    how = no_cap + no_cap * tf.cast(padding_zero, tf.int32)     # 0 cap, 1 zero, 2 as is
    kept_features = tf.switch_case(how, [
        lambda: tf.where(kept[:, :, None], tf.gather(features, index, batch_dims=1),
                         tf.zeros([], features.dtype)),
        lambda: tf.where(kept[:, :, None], features, tf.zeros([], features.dtype)),
        lambda: tf.identity(features)])                                    # [B, M, F]
    kept_features.set_shape([None, None, features.shape[2]])

    keep_f = tf.cast(kept, tf.float32)
    return Products(
        box_features=kept_features,
        box_geometry=geometry_rows * keep_f[:, :, None],
        box_labels=tf.cast(kept_labels, tf.int32) * tf.cast(kept, tf.int32),
        num_boxes=kept_n,
        boxes=kept_boxes * keep_f[:, :, None],
    )


# float32 bits read as uint32: finite values >= +0 are exactly those below +inf's bits;
# -0.0 is the sign bit alone, and every negative value (or -inf, or a NaN with the sign
# bit) is above it.
_POSITIVE_INF_BITS = 0x7F800000
_NEGATIVE_ZERO_BITS = 0x80000000


def _feature_checks(features: tf.Tensor, valid: tf.Tensor):
    """Per box: are its features all finite, and none below zero (-0.0 is not)?

    One integer reduction over the features' bits answers both for the rule, a box of
    finite values >= +0 (as prep's tsv._check_features); the finiteness check over the
    floats runs only when a valid box has a value at or beyond +inf's bits (a non-finite
    or negative value, or -0.0). The sign is read from the bits, not a float comparison,
    which the CPU's flush-to-zero mode would let a negative denormal (-1e-45) through,
    unlike prep.

    Args:
      features: float32 [B, N, F]; valid: bool [B, N], the boxes that count.
    Returns:
      (finite, not_negative), bool [B, N] each; not_negative is meaningful for finite
      boxes only (finiteness is checked, and reported, first); and padding_zero, bool
      scalar: every value past the valid boxes is +0.0 (from the same reduction).
    """
    bits_max = tf.reduce_max(tf.bitcast(features, tf.uint32), axis=2)      # [B, N]
    not_negative = bits_max <= tf.constant(_NEGATIVE_ZERO_BITS, tf.uint32)
    suspect = tf.reduce_any(tf.logical_and(
        valid, bits_max >= tf.constant(_POSITIVE_INF_BITS, tf.uint32)))
    finite = tf.cond(suspect,
                     lambda: tf.reduce_all(tf.math.is_finite(features), axis=2),
                     lambda: tf.ones_like(valid))
    padding_zero = tf.reduce_all(tf.logical_or(valid, tf.equal(bits_max, 0)))
    return finite, not_negative, padding_zero


def _relative_geometry(boxes: tf.Tensor, image_h: tf.Tensor, image_w: tf.Tensor) -> tf.Tensor:
    """`geometry.relative_geometry` batched: float32 [B, N, 4] -> float32 [B, N, G].

    Computed in float64 from the float32 boxes, as numpy does, then cast.
    """
    b = tf.cast(boxes, tf.float64)
    top, left, bottom, right = tf.unstack(b, axis=2)
    h = tf.cast(image_h, tf.float64)[:, None]
    w = tf.cast(image_w, tf.float64)[:, None]
    height = tf.maximum(bottom - top, geometry.MIN_SIDE_PX)
    width = tf.maximum(right - left, geometry.MIN_SIDE_PX)
    out = tf.stack([top / h, left / w, bottom / h, right / w,
                    (height * width) / (h * w), tf.math.log(width / height)], axis=2)
    return tf.cast(out, tf.float32)


def products_as_features(products: Products) -> Dict[str, tf.Tensor]:
    """The schema.F_* model inputs of products."""
    return {
        schema.F_BOX_FEATURES: products.box_features,
        schema.F_BOX_GEOMETRY: products.box_geometry,
        schema.F_BOX_LABELS: products.box_labels,
        schema.F_NUM_BOXES: products.num_boxes,
    }
