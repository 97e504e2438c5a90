"""Property-based fuzzing of the TSV row validator (data_prep.tsv.parse_row) and of a prep
worker around it, with `hypothesis`.

A valid row gets one random corruption: truncated or extended base64, a wrong box count,
NaN/inf in features or boxes, negative, huge or non-numeric integers, class ids out of
range, an extra or a missing tab, non-UTF-8 bytes or a BOM. Each case is worked out in
advance as either "accepted, with these decoded values" or "rejected, naming this field for
one of these reasons", and parse_row must agree: no exception other than RowError, no wrong
field. Through a worker, the corrupted line sits between two good ones, whose records must
come out byte-identical to those of a file without it.
"""
import os
import re
import tempfile

import numpy as np
from hypothesis import HealthCheck, event, given, settings, strategies as st

from data_prep import schema, tfrecord, tsv, worker
from mmrecall_testing import tsv_fixtures as fx

_COLUMN = {name: i for i, name in enumerate(schema.TSV_COLUMNS)}
_B64_COLUMNS = ("boxes", "features", "class_labels")
_INT64_MAX = 2 ** 63 - 1
_FAST = settings(max_examples=200, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

# Each mutation(row, draw) returns (the corrupted line as bytes, expectation), where an
# expectation is ("accept", {Row attribute: value parse_row must return}) or ("reject",
# field, {allowed reasons}).


def _fields(row: dict):
    return fx.line(row).encode("utf-8").split(b"\t")


def _truncate(row, draw):
    column = draw(st.sampled_from(_B64_COLUMNS))
    fields = _fields(row)
    cut = draw(st.integers(1, len(fields[_COLUMN[column]])))
    fields[_COLUMN[column]] = fields[_COLUMN[column]][:-cut]
    return b"\t".join(fields), ("reject", column, {"base64", "byte_length"})


def _extend(row, draw):
    column = draw(st.sampled_from(_B64_COLUMNS))
    suffix = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
                               min_size=1, max_size=12))
    fields = _fields(row)
    fields[_COLUMN[column]] += suffix.encode("ascii")
    return b"\t".join(fields), ("reject", column, {"base64", "byte_length"})


def _int_expectation(column: str, text: str, row: dict):
    if not re.fullmatch(r"-?[0-9]+", text) or abs(int(text)) > _INT64_MAX:
        return ("reject", column, {"not_integer"})
    value = int(text)
    if column in ("product_id", "query_id"):
        return ("reject", column, {"negative_id"}) if value < 0 else ("accept", {column: value})
    if column in ("image_h", "image_w"):
        if value <= 0:
            return ("reject", column, {"image_size"})
        return ("accept", {column: value})
    n = len(row["boxes"])  # num_boxes
    if value < 1:
        return ("reject", "num_boxes", {"num_boxes"})
    return ("accept", {}) if value == n else ("reject", "boxes", {"byte_length"})


def _integer(row, draw):
    column = draw(st.sampled_from(["product_id", "query_id", "image_h", "image_w",
                                        "num_boxes"]))
    original = int(row[column] if column != "num_boxes" else len(row["boxes"]))
    low = original if column in ("image_h", "image_w") else -2 ** 70  # never shrink the image
    text = draw(st.one_of(
        st.integers(low, 2 ** 70).map(str),
        st.integers(-5, 5).map(str),
        st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)),
                max_size=8)))
    if column in ("image_h", "image_w") and re.fullmatch(r"-?[0-9]+", text) and \
            0 < int(text) < original:
        text = str(original)  # a smaller image may put boxes outside it: not this property
    fields = _fields(row)
    fields[_COLUMN[column]] = text.encode("utf-8")
    return b"\t".join(fields), _int_expectation(column, text, row)


def _non_finite(row, draw):
    column = draw(st.sampled_from(["features", "boxes"]))
    value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    array = row[column].copy()
    array.flat[draw(st.integers(0, array.size - 1))] = value
    return fx.line(dict(row, **{column: array})).encode("utf-8"), \
        ("reject", column, {"non_finite"})


def _class_label(row, draw):
    value = draw(st.integers(-2 ** 63, _INT64_MAX))
    labels = np.array(row["class_labels"], np.int64)
    labels[draw(st.integers(0, len(labels) - 1))] = value
    line = fx.line(dict(row, class_labels=labels)).encode("utf-8")
    if 0 <= value < schema.NUM_CLASSES:
        return line, ("accept", {"labels": labels})
    return line, ("reject", "class_labels", {"label_range"})


def _tabs(row, draw):
    line = fx.line(row).encode("utf-8")
    tabs = [i for i, b in enumerate(line) if b == 9]
    if draw(st.booleans()):  # an extra tab anywhere
        at = draw(st.integers(0, len(line)))
        return line[:at] + b"\t" + line[at:], ("reject", "line", {"column_count"})
    at = draw(st.sampled_from(tabs))  # a missing one
    return line[:at] + line[at + 1:], ("reject", "line", {"column_count"})


def _query_bytes(row, draw):
    bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82",
                                     b"\xf8\x88\x80\x80\x80"]))
    fields = _fields(row)
    query = fields[_COLUMN["query"]]
    at = draw(st.integers(0, len(query)))
    fields[_COLUMN["query"]] = query[:at] + bad + query[at:]
    return b"\t".join(fields), ("reject", "query", {"encoding"})


def _bom(row, draw):
    bom = "\ufeff".encode("utf-8")
    if draw(st.booleans()):  # before the first field: the product id is no integer
        return bom + fx.line(row).encode("utf-8"), ("reject", "product_id", {"not_integer"})
    query = "\ufeff" + row["query"]
    return fx.line(dict(row, query=query)).encode("utf-8"), ("accept", {"query": query})


_MUTATIONS = [_truncate, _extend, _integer, _non_finite, _class_label, _tabs, _query_bytes,
              _bom]


@st.composite
def corrupted_rows(draw):
    """(the valid row, its corrupted line as bytes, the expectation)."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    row = fx.random_row(rng, draw(st.integers(0, 10 ** 12)), draw(st.integers(0, 10 ** 6)),
                        num_boxes=draw(st.integers(1, 3)))
    mutate = draw(st.sampled_from(_MUTATIONS))
    line, expect = mutate(row, draw)
    event(f"{mutate.__name__[1:]}: {expect[0]}")  # --hypothesis-show-statistics
    return row, line, expect


def _check_accepted(row: dict, got: tsv.Row, changes: dict) -> None:
    want = {"product_id": row["product_id"], "query_id": row["query_id"],
            "image_h": row["image_h"], "image_w": row["image_w"], "query": row["query"],
            "boxes": row["boxes"], "features": row["features"],
            "labels": np.asarray(row["class_labels"], np.int64), **changes}
    for name, value in want.items():
        np.testing.assert_array_equal(getattr(got, name), value, err_msg=name)


@_FAST
@given(corrupted_rows())
def test_a_corrupted_row_is_accepted_as_decoded_or_rejected_with_its_field(case):
    row, line, expect = case
    try:
        got = tsv.parse_row(line)
    except tsv.RowError as e:
        assert expect[0] == "reject", f"rejected {e} but expected {expect}"
        assert (e.field, e.reason in expect[2]) == (expect[1], True), (e, expect)
        assert "\t" not in e.detail and "\n" not in e.detail
        return
    assert expect[0] == "accept", f"accepted, expected {expect}"
    _check_accepted(row, got, expect[1])


def _records(directory: str, lines) -> tuple:
    """(records, sidecar) of a train chunk of `lines` written by a worker into directory."""
    path = os.path.join(directory, "train.tsv")
    with open(path, "wb") as f:
        f.write(tsv.HEADER_LINE.encode("utf-8") + b"\n" + b"".join(x + b"\n" for x in lines))
    chunk, = tsv.iter_chunks(path, 100, group_by_query=False)
    config = worker.ShardConfig(out_dir=os.path.join(directory, "out"))
    sidecar = worker.process_chunk(worker.ChunkTask("train", path, chunk), config)
    records = list(tfrecord.read_records(os.path.join(config.out_dir, sidecar["file"])))
    return records, sidecar


_NEIGHBOURS = [fx.line(r).encode("utf-8") for r in fx.train_rows(5, 2)]


@_FAST
@given(corrupted_rows())
def test_a_corrupted_row_never_changes_its_neighbours_records(case):
    _, line, expect = case
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        baseline, _ = _records(a, _NEIGHBOURS)
        records, sidecar = _records(b, [_NEIGHBOURS[0], line, _NEIGHBOURS[1]])
        rejects = open(os.path.join(b, "out", sidecar["sidecars"][0]), "rb").read()
    if expect[0] == "reject":
        assert records == baseline and sidecar["rejected"] == 1
        line_no, field, reason = rejects.split(b"\t")[:3]
        assert (int(line_no), field.decode()) == (3, expect[1]) and reason.decode() in expect[2]
    elif sidecar["rejected"]:  # parse_row accepts it; only normalisation may still refuse
        assert records == baseline and b"\tquery\tempty_query\t" in rejects
    else:
        assert len(records) == 3 and [records[0], records[2]] == baseline
