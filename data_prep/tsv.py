"""The competition TSV format: encoding rows (generator, tests) and reading them (prep).

Reading follows `csv.QUOTE_NONE` semantics: a line is split on tabs only, quotes are
ordinary characters (queries contain them), and lines end at "\n" only.

Reasons a row is rejected (RowError.reason), with the field named:
  column_count (line), not_integer, negative_id (product_id/query_id), image_size,
  num_boxes (< 1), base64, byte_length (boxes/features/class_labels), non_finite,
  negative_feature, label_range, box_outside (beyond CLIP_TOLERANCE_PX), box_order,
  encoding (query not UTF-8); and, raised by the prep worker: empty_query (no token after
  normalisation), query_not_grouped (valid/test query_id reappearing after other queries).
"""
import base64
import binascii
import dataclasses
import math
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pybase64

from data_prep import geometry, schema

HEADER_LINE = "\t".join(schema.TSV_COLUMNS)


def b64(array: np.ndarray, dtype: np.dtype) -> str:
    """Standard base64 (with '=' padding) of an array's little-endian bytes."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def encode_row(product_id: int, image_h: int, image_w: int, boxes: np.ndarray,
               features: np.ndarray, class_labels: Sequence[int], query: str,
               query_id: int) -> str:
    """Formats one TSV data line (no trailing newline) in the competition's column order.

    Args:
      boxes: float [N, 4] pixel top, left, bottom, right.
      features: float [N, F] region features.
      class_labels: int [N] class ids.
      query: query text; must not contain a tab or newline.
    """
    n = int(np.shape(boxes)[0])
    if "\t" in query or "\n" in query or "\r" in query:
        raise ValueError(f"query {query!r} contains a tab or line break")
    return "\t".join([
        str(int(product_id)), str(int(image_h)), str(int(image_w)), str(n),
        b64(boxes, schema.TSV_BOXES_DTYPE),
        b64(features, schema.TSV_FEATURES_DTYPE),
        b64(np.asarray(class_labels), schema.TSV_LABELS_DTYPE),
        query, str(int(query_id)),
    ])


# ---------------------------------------------------------------------------------------
# Reading: header check, streaming line chunks, row parsing and validation.
_COL = {name: i for i, name in enumerate(schema.TSV_COLUMNS)}
_INT_RE = re.compile(r"-?[0-9]+\Z")
_INT_BYTES_RE = re.compile(rb"-?[0-9]+\Z")
_INT64_MAX = 2 ** 63 - 1
_BOX_BYTES = schema.BOX_COORDS * schema.TSV_BOXES_DTYPE.itemsize          # 16 per box
_FEATURE_BYTES = schema.FEATURE_DIM * schema.TSV_FEATURES_DTYPE.itemsize  # 8192 per box
_LABEL_BYTES = schema.TSV_LABELS_DTYPE.itemsize                           # 8 per box


class TsvFormatError(ValueError):
    """A whole-file problem (empty file, bad header): the file cannot be read at all."""


class RowError(ValueError):
    """One data row is malformed.

    Attributes:
      field: the TSV column at fault, or "line" for the row as a whole.
      reason: a short stable code counted in the reject summary (e.g. "base64").
      detail: a human-readable explanation (no tabs or newlines).
    """

    def __init__(self, field: str, reason: str, detail: str):
        super().__init__(f"{field}: {reason}: {detail}")
        self.field, self.reason, self.detail = field, reason, detail


@dataclasses.dataclass
class Row:
    """One validated TSV row; boxes are clipped into the image, nothing else is changed.

    Attributes:
      boxes: float32 [N, 4] pixel top, left, bottom, right.
      features: float32 [N, F] region features, >= 0.
      labels: int64 [N] class ids in 0..32.
    """
    product_id: int
    image_h: int
    image_w: int
    boxes: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    query: str
    query_id: int


def check_header(path: str, first_line: Optional[bytes]) -> None:
    """Raises TsvFormatError naming the file (and column) unless first_line is HEADER_LINE.

    Args:
      path: the file, for the message.
      first_line: the file's first line (bytes, line ending included or not), or None
        when the file is empty.
    """
    if first_line is None or not first_line.strip(b"\r\n"):
        raise TsvFormatError(f"{path}: file is empty; expected the header line {HEADER_LINE!r}")
    text = first_line.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
    if text == HEADER_LINE:
        return
    got = text.split("\t")
    if got and _INT_RE.match(got[0]):
        raise TsvFormatError(f"{path}:1: no header line (the first line looks like data); "
                             f"expected {HEADER_LINE!r}")
    for i, want in enumerate(schema.TSV_COLUMNS):
        if i >= len(got):
            raise TsvFormatError(f"{path}:1: header column {i + 1} {want!r} is missing "
                                 f"(header has {len(got)} columns)")
        if got[i] != want:
            where = f"found at column {got.index(want) + 1}" if want in got else "missing"
            raise TsvFormatError(f"{path}:1: header column {i + 1} is {got[i]!r}, expected "
                                 f"{want!r} ({where})")
    raise TsvFormatError(f"{path}:1: header has {len(got)} columns, expected "
                         f"{len(schema.TSV_COLUMNS)}: unexpected {got[len(schema.TSV_COLUMNS)]!r}")


@dataclasses.dataclass(frozen=True)
class LineChunk:
    """A run of consecutive data lines of a TSV file, located by byte range.

    Attributes:
      index: chunk number k (0-based) in file order; chunk k becomes shard k.
      offset, length: byte range of the lines in the file (line endings included).
      first_line: 1-based file line number of the first line (the header is line 1).
      num_lines: number of lines in the chunk.
      ungrouped: {line number: detail} of lines whose query_id reappears after other
        queries (only when grouping by query); the worker rejects them.
    """
    index: int
    offset: int
    length: int
    first_line: int
    num_lines: int
    ungrouped: Tuple[Tuple[int, str], ...] = ()


_NUM_TABS = len(schema.TSV_COLUMNS) - 1
_READ_SIZE = 1 << 20  # bytes per read while cutting chunks


def _query_id_of(line: bytes, start: int = 0, end: Optional[int] = None) -> Optional[bytes]:
    """The query_id field of the well-formed line line[start:end], else None.

    Cheap: no copy of the line, and find()s (memchr) from tab to tab rather than a count
    over the whole ~40 KB line.
    """
    end = len(line) if end is None else end
    while end > start and line[end - 1] in b"\r\n":
        end -= 1
    tabs, last, pos = 0, -1, line.find(b"\t", start, end)
    while pos >= 0:
        tabs += 1
        if tabs > _NUM_TABS:
            return None
        last, pos = pos, line.find(b"\t", pos + 1, end)
    if tabs != _NUM_TABS:
        return None
    qid = line[last + 1:end]
    return qid if qid.isdigit() else None


def _lines(f) -> Iterator[Tuple[bytes, int, int]]:
    """(buffer, start, end) of each line of binary file f from its position on.

    The line is buffer[start:end], "\n" included (the last line may lack it). Lines are
    found in large reads and not copied, except one that spans two reads.
    """
    carry = b""
    while block := f.read(_READ_SIZE):
        pos = 0
        if carry:
            newline = block.find(b"\n")
            if newline < 0:
                carry += block
                continue
            line, carry, pos = carry + block[:newline + 1], b"", newline + 1
            yield line, 0, len(line)
        while (newline := block.find(b"\n", pos)) >= 0:
            yield block, pos, newline + 1
            pos = newline + 1
        carry = block[pos:]
    if carry:
        yield carry, 0, len(carry)


def iter_chunks(path: str, rows_per_chunk: int, group_by_query: bool) -> Iterator[LineChunk]:
    """Streams a TSV file into chunks of data lines, after checking its header.

    Reads the file in large blocks, holding about one at a time. A chunk holds
    `rows_per_chunk` lines; with `group_by_query` it is extended until the query_id changes,
    so that all rows of a query land in one chunk. Lines whose query_id is unreadable never
    start a new chunk.

    Raises:
      TsvFormatError: empty file, bad header or no data line.
    """
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    with open(path, "rb") as f:
        header = f.readline()
        check_header(path, header or None)
        offset = len(header)
        line_no = 1
        index, start, start_line, count = 0, offset, 2, 0
        ungrouped: List[Tuple[int, str]] = []
        current: Optional[bytes] = None
        first_seen: Dict[bytes, int] = {}
        for buffer, line_start, line_end in _lines(f):
            line_no += 1
            qid = _query_id_of(buffer, line_start, line_end) if group_by_query else None
            if group_by_query and qid is not None and qid != current:
                if qid in first_seen:
                    ungrouped.append((line_no, f"query_id {qid.decode()} reappears after other "
                                               f"queries (first seen at line {first_seen[qid]})"))
                else:
                    if count >= rows_per_chunk:
                        yield LineChunk(index, start, offset - start, start_line, count,
                                        tuple(ungrouped))
                        index, start, start_line, count, ungrouped = \
                            index + 1, offset, line_no, 0, []
                    first_seen[qid] = line_no
                    current = qid
            elif not group_by_query and count >= rows_per_chunk:
                yield LineChunk(index, start, offset - start, start_line, count, ())
                index, start, start_line, count = index + 1, offset, line_no, 0
            count += 1
            offset += line_end - line_start
        if count:
            yield LineChunk(index, start, offset - start, start_line, count, tuple(ungrouped))
        elif index == 0:
            raise TsvFormatError(f"{path}: no data rows after the header")


def _int_field(fields: List[memoryview], name: str) -> int:
    raw = fields[_COL[name]]
    if not _INT_BYTES_RE.match(raw):
        raise RowError(name, "not_integer", f"{raw.tobytes()[:40]!r} is not an integer")
    value = int(raw.tobytes())
    if abs(value) > _INT64_MAX:
        raise RowError(name, "not_integer", f"{value} is outside the int64 range")
    return value


def _array_field(fields: List[memoryview], name: str, dtype: np.dtype, nbytes: int,
                 per_box: int, num_boxes: int) -> np.ndarray:
    field = fields[_COL[name]]
    # Strict mode still accepts '=' after a complete group ("AAAA="); the serving graph
    # does not, so padded base64 must come in whole 4-character groups.
    if len(field) % 4:
        raise RowError(name, "base64", f"invalid base64 (length {len(field)} is not a "
                                       f"multiple of 4)")
    try:
        raw = pybase64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as e:
        # pybase64 accepts exactly what strict binascii accepts, but says only "Non-base64
        # digit found"; binascii names the problem (padding, excess data, ...).
        raise RowError(name, "base64", f"invalid base64 ({_b64_problem(field) or e})") from None
    if len(raw) != nbytes:
        raise RowError(name, "byte_length", f"{len(raw)} bytes decoded, expected {nbytes} "
                                            f"({per_box} per box x {num_boxes} boxes)")
    return np.frombuffer(raw, dtype)


def _b64_problem(field) -> str:
    """binascii's strict reason why `field` is not base64 ("" if it accepts it)."""
    try:
        binascii.a2b_base64(field, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        return str(e)
    return ""


def _split_fields(data: bytes, start: int, end: int) -> List[memoryview]:
    """The tab-separated fields of data[start:end] as zero-copy views.

    A row is ~40 KB of base64; views let the decoder read it in place instead of copying
    it twice (line, then fields).
    """
    view = memoryview(data)
    fields = []
    for _ in range(len(schema.TSV_COLUMNS) - 1):
        tab = data.find(b"\t", start, end)
        if tab < 0:
            break
        fields.append(view[start:tab])
        start = tab + 1
    fields.append(view[start:end])
    extra = data.count(b"\t", start, end)
    if extra:
        raise RowError("line", "column_count", f"{len(fields) + extra} columns, expected "
                                               f"{len(schema.TSV_COLUMNS)}")
    return fields


def parse_row(data: bytes, start: int = 0, end: Optional[int] = None) -> Row:
    """Parses and validates one TSV data line, data[start:end] (line ending removed).

    Works on bytes: only the query needs decoding (UTF-8), every other field must be ASCII
    digits or base64, which the checks below enforce.
    Checks, in order: column count; integer fields; positive image size; num_boxes >= 1;
    base64 that decodes to num_boxes x (16 B boxes, 8192 B features, 8 B labels); finite
    features >= 0; labels in 0..32; finite boxes inside the image up to
    geometry.CLIP_TOLERANCE_PX (then clipped) with top < bottom and left < right; a UTF-8
    query. Whether the query normalises to any token is checked by the caller.

    Args:
      data: bytes holding the line (a whole chunk may be passed with start/end).
      start, end: the line's byte range (default: all of data).
    Raises:
      RowError: naming the field and reason of the first problem found.
    """
    fields = _split_fields(data, start, len(data) if end is None else end)
    if len(fields) != len(schema.TSV_COLUMNS):
        raise RowError("line", "column_count",
                       f"{len(fields)} columns, expected {len(schema.TSV_COLUMNS)}")
    product_id = _int_field(fields, "product_id")
    query_id = _int_field(fields, "query_id")
    for name, value in (("product_id", product_id), ("query_id", query_id)):
        if value < 0:
            raise RowError(name, "negative_id", f"{value} < 0")
    image_h = _int_field(fields, "image_h")
    image_w = _int_field(fields, "image_w")
    for name, value in (("image_h", image_h), ("image_w", image_w)):
        if value <= 0:
            raise RowError(name, "image_size", f"{value} pixels, must be > 0")
    n = _int_field(fields, "num_boxes")
    if n < 1:
        raise RowError("num_boxes", "num_boxes", f"{n} boxes, must be >= 1")
    boxes = _array_field(fields, "boxes", schema.TSV_BOXES_DTYPE, n * _BOX_BYTES,
                         _BOX_BYTES, n).reshape(n, schema.BOX_COORDS)
    features = _array_field(fields, "features", schema.TSV_FEATURES_DTYPE, n * _FEATURE_BYTES,
                            _FEATURE_BYTES, n).reshape(n, schema.FEATURE_DIM)
    labels = _array_field(fields, "class_labels", schema.TSV_LABELS_DTYPE, n * _LABEL_BYTES,
                          _LABEL_BYTES, n)
    _check_features(features)
    label_list = labels.tolist()
    if min(label_list) < 0 or max(label_list) >= schema.NUM_CLASSES:
        bad = next(c for c in label_list if not 0 <= c < schema.NUM_CLASSES)
        raise RowError("class_labels", "label_range",
                       f"class id {bad} outside 0..{schema.NUM_CLASSES - 1}")
    boxes = _checked_boxes(boxes, image_h, image_w)
    try:
        query = str(fields[_COL["query"]], "utf-8")
    except UnicodeDecodeError as e:
        raise RowError("query", "encoding",
                       f"not UTF-8 ({e.reason} at byte {e.start})") from None
    return Row(product_id, image_h, image_w, boxes, features, labels, query, query_id)


# Finite floats >= +0 are exactly those whose bits, read as uint32, are below +inf's.
_POSITIVE_INF_BITS = 0x7F800000


def _check_features(features: np.ndarray) -> None:
    """Raises RowError unless every float32 feature is finite and >= 0 (-0.0 included)."""
    # One integer reduction; the float checks run only when it finds something (or -0.0).
    if features.size and int(features.view("<u4").max()) < _POSITIVE_INF_BITS:
        return
    # min/max are NaN when any value is NaN; two reductions beat a full isfinite mask.
    low, high = float(features.min()), float(features.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise RowError("features", "non_finite", "NaN or infinite value")
    if low < 0:
        raise RowError("features", "negative_feature", f"minimum value {low} < 0")


def _checked_boxes(boxes: np.ndarray, image_h: int, image_w: int) -> np.ndarray:
    """Validates pixel boxes [N, 4] and returns them clipped into the image."""
    tol = geometry.CLIP_TOLERANCE_PX
    inside = True
    # A handful of boxes: plain Python floats are faster than numpy's per-call overhead.
    for i, (top, left, bottom, right) in enumerate(boxes.tolist()):
        if not all(map(math.isfinite, (top, left, bottom, right))):
            raise RowError("boxes", "non_finite", f"box {i} has a NaN or infinite coordinate")
        low, high_y, high_x = min(top, left), max(top, bottom), max(left, right)
        if low < -tol or high_y > image_h + tol or high_x > image_w + tol:
            raise RowError("boxes", "box_outside",
                           f"box {i} {[top, left, bottom, right]} is more than {tol:g} px "
                           f"outside the {image_h}x{image_w} image")
        inside = inside and low >= 0 and high_y <= image_h and high_x <= image_w
    clipped = boxes if inside else geometry.clip_boxes(boxes, image_h, image_w)
    for i, (top, left, bottom, right) in enumerate(clipped.tolist()):
        if not (top < bottom and left < right):
            raise RowError("boxes", "box_order",
                           f"box {i} {[top, left, bottom, right]} (after clipping) needs "
                           f"top < bottom and left < right")
    return clipped
