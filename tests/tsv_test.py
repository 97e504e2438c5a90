"""tsv.py: header checks, chunking, and the validation of every field of a row."""
import binascii

import numpy as np
import pytest

from data_prep import schema, tsv
from mmrecall_testing import tsv_fixtures as fx


def test_parse_row_returns_the_encoded_values():
    rng = np.random.default_rng(3)
    row = fx.random_row(rng, 101, 7, query='women\'s "new" dress, 3/4 & more', num_boxes=5,
                        image_h=338, image_w=209)
    got = tsv.parse_row(fx.line(row).encode("utf-8"))
    assert (got.product_id, got.query_id, got.image_h, got.image_w) == (101, 7, 338, 209)
    assert got.query == row["query"]  # quotes are ordinary characters (QUOTE_NONE)
    np.testing.assert_array_equal(got.boxes, row["boxes"])
    np.testing.assert_array_equal(got.features, row["features"])
    np.testing.assert_array_equal(got.labels, row["class_labels"])
    assert got.features.shape == (5, schema.FEATURE_DIM) and got.labels.dtype == np.int64


def test_boxes_overshooting_within_tolerance_are_clipped():
    rng = np.random.default_rng(4)
    row = fx.random_row(rng, 1, 1, num_boxes=1, image_h=80, image_w=61)
    row["boxes"] = np.array([[-3.0, 2.0, 83.0, 64.0]], np.float32)  # 3 px over on 3 sides
    got = tsv.parse_row(fx.line(row).encode())
    np.testing.assert_array_equal(got.boxes, [[0.0, 2.0, 80.0, 61.0]])


@pytest.mark.parametrize("case", range(len(fx.malformed_lines(np.random.default_rng(0)))))
def test_every_malformed_row_is_rejected_with_field_and_reason(case):
    line, field, reason = fx.malformed_lines(np.random.default_rng(0))[case]
    with pytest.raises(tsv.RowError) as info:
        tsv.parse_row(line.encode("utf-8"))
    assert (info.value.field, info.value.reason) == (field, reason), info.value.detail


def test_query_that_is_not_utf8_is_rejected():
    line = fx.line(fx.random_row(np.random.default_rng(5), 1, 1, query="silk scarf"))
    raw = line.encode().replace(b"silk", b"s\xffk")
    with pytest.raises(tsv.RowError) as info:
        tsv.parse_row(raw)
    assert (info.value.field, info.value.reason) == ("query", "encoding")


@pytest.mark.parametrize("column", ["boxes", "features", "class_labels"])
def test_base64_not_in_whole_groups_of_four_is_rejected(column):
    # CPython's strict decoder accepts '=' after a complete 4-character group; the serving
    # graph does not, so prep must not either.
    assert binascii.a2b_base64(b"AAAA=", strict_mode=True) == b"\0\0\0"
    # 3 boxes: 48 B of boxes, 3 x 8192 B of features and 24 B of labels, all multiples of
    # 3 bytes, so each field is unpadded base64 and "=" makes it 4k + 1 characters long.
    base = fx.line(fx.random_row(np.random.default_rng(6), 1, 1, num_boxes=3))
    assert tsv.parse_row(base.encode()).boxes.shape == (3, 4)
    value = base.split("\t")[schema.TSV_COLUMNS.index(column)]
    assert not value.endswith("=")
    with pytest.raises(tsv.RowError) as info:
        tsv.parse_row(fx.with_field(base, column, value + "=").encode())
    assert (info.value.field, info.value.reason) == (column, "base64")
    assert "not a multiple of 4" in info.value.detail


# (field value, binascii's strict reason, which the reject detail must carry)
BAD_BASE64 = [
    ("AA==AAAA", "Excess data after padding"),
    ("AA=A", "Discontinuous padding not allowed"),
    ("-_-_", "Only base64 data is allowed"),
    ("A===", "number of data characters (1) cannot be 1 more than a multiple of 4"),
]


@pytest.mark.parametrize("value, why", BAD_BASE64)
def test_base64_reject_detail_names_the_problem(value, why):
    # The fast decoder only says "Non-base64 digit found"; the detail gives binascii's reason.
    base = fx.line(fx.random_row(np.random.default_rng(8), 1, 1, num_boxes=1))
    with pytest.raises(tsv.RowError) as info:
        tsv.parse_row(fx.with_field(base, "class_labels", value).encode())
    assert (info.value.field, info.value.reason) == ("class_labels", "base64")
    assert why in info.value.detail


def test_decoder_accepts_exactly_what_strict_binascii_accepts():
    # Whole 4-character groups (shorter ones never reach the decoder) over an alphabet with
    # every kind of character: valid, padding, web-safe, space, control, non-ASCII.
    rng = np.random.default_rng(9)
    alphabet = np.frombuffer(b"AQgw09+/=-_ \n\x00\xff.", np.uint8)
    fields = [memoryview(b"")] * len(schema.TSV_COLUMNS)
    for _ in range(20000):
        field = rng.choice(alphabet, 4 * int(rng.integers(1, 4))).tobytes()
        fields[schema.TSV_COLUMNS.index("boxes")] = memoryview(field)
        try:
            want = binascii.a2b_base64(field, strict_mode=True)
        except binascii.Error:
            with pytest.raises(tsv.RowError):
                tsv._array_field(fields, "boxes", np.dtype(np.uint8), 0, 1, 1)
            continue
        got = tsv._array_field(fields, "boxes", np.dtype(np.uint8), len(want), 1, len(want))
        assert got.tobytes() == want


@pytest.mark.parametrize("value, reason", [
    (-0.0, None), (3e38, None), (np.inf, "non_finite"), (-np.inf, "non_finite"),
    (np.nan, "non_finite"), (-np.nan, "non_finite"), (-1e-45, "negative_feature"),
])
def test_feature_values_finite_and_not_below_zero(value, reason):
    row = fx.random_row(np.random.default_rng(7), 1, 1, num_boxes=2)
    row["features"][1, 7] = value
    if reason is None:
        got = tsv.parse_row(fx.line(row).encode())
        assert got.features.view(np.uint32)[1, 7] == np.float32(value).view(np.uint32)
    else:
        with pytest.raises(tsv.RowError) as info:
            tsv.parse_row(fx.line(row).encode())
        assert (info.value.field, info.value.reason) == ("features", reason)


@pytest.mark.parametrize("line, start, end, want", [
    (b"1\t2\t3\t4\tb\tf\tc\tq q\t42\n", 0, None, b"42"),
    (b"1\t2\t3\t4\tb\tf\tc\tq q\t42\r\r\n", 0, None, b"42"),
    (b"1\t2\t3\t4\tb\tf\tc\tq q\t42", 0, None, b"42"),    # last line, no newline
    (b"1\t2\t3\t4\tb\tf\tc\t42\n", 0, None, None),        # 8 columns
    (b"1\t2\t3\t4\tb\tf\tc\tq\t9\t42\n", 0, None, None),  # 10 columns
    (b"1\t2\t3\t4\tb\tf\tc\tq\t4x2\n", 0, None, None),
    (b"1\t2\t3\t4\tb\tf\tc\tq\t\n", 0, None, None),
    (b"x\t\t\n1\t2\t3\t4\tb\tf\tc\tq\t7\n\t5", 4, 22, b"7"),  # a line inside a buffer
])
def test_query_id_of_reads_only_well_formed_lines(line, start, end, want):
    assert tsv._query_id_of(line, start, end) == want


@pytest.mark.parametrize("read_size", [1000, 7919, 100_000])
def test_chunks_do_not_depend_on_how_the_file_is_read(tmp_path, monkeypatch, read_size):
    rows = fx.grouped_rows(8, num_queries=6, per_query=3)
    lines = [fx.line(r) for r in rows]
    lines.insert(7, "garbage\tline")
    path = tmp_path / "valid.tsv"
    path.write_bytes(("\r\n".join([tsv.HEADER_LINE] + lines)).encode())  # no final EOL
    want = {group: list(tsv.iter_chunks(str(path), 4, group)) for group in (True, False)}
    # q0 q1 | q2 (with the garbage line) | q3 q4 | q5: a chunk ends at the first new query
    # after 4 lines.
    assert [c.num_lines for c in want[True]] == [6, 4, 6, 3]
    monkeypatch.setattr(tsv, "_READ_SIZE", read_size)  # lines now span reads
    for group in (True, False):
        assert list(tsv.iter_chunks(str(path), 4, group)) == want[group]


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    (tsv.HEADER_LINE + "\n", "no data rows"),
    ("product_id\timage_h\tnum_boxes\n", "header column 3 is 'num_boxes', expected 'image_w'"),
    (tsv.HEADER_LINE.replace("\tquery_id", "") + "\n", "'query_id' is missing"),
    ("1\t2\t3\n", "no header line"),
])
def test_file_level_errors_name_the_file_and_column(tmp_path, content, message):
    path = tmp_path / "valid.tsv"
    path.write_text(content)
    with pytest.raises(tsv.TsvFormatError) as info:
        list(tsv.iter_chunks(str(path), 10, group_by_query=True))
    assert str(path) in str(info.value) and message in str(info.value)


def _chunk_lines(path, chunks):
    data = open(path, "rb").read()
    return [data[c.offset:c.offset + c.length].split(b"\n")[:-1] for c in chunks]


def test_train_chunks_are_fixed_runs_of_lines(tmp_path):
    lines = [fx.line(r) for r in fx.train_rows(1, 11)]
    path = fx.write_tsv(str(tmp_path / "train.tsv"), lines)
    chunks = list(tsv.iter_chunks(path, 4, group_by_query=False))
    assert [(c.index, c.first_line, c.num_lines) for c in chunks] == \
        [(0, 2, 4), (1, 6, 4), (2, 10, 3)]
    got = [l.decode() for part in _chunk_lines(path, chunks) for l in part]
    assert got == lines


def test_grouped_chunks_break_only_between_queries(tmp_path):
    rows = fx.grouped_rows(2, num_queries=5, per_query=3)
    lines = [fx.line(r) for r in rows]
    lines.insert(4, "garbage line")  # unreadable query_id: never starts a chunk
    path = fx.write_tsv(str(tmp_path / "valid.tsv"), lines)
    chunks = list(tsv.iter_chunks(path, 4, group_by_query=True))
    # 4 rows reached inside query 2 -> the chunk ends after it: [q0 q1(+garbage)], ...
    assert [c.num_lines for c in chunks] == [7, 6, 3]
    seen = []
    for part in _chunk_lines(path, chunks):
        qids = {l.rsplit(b"\t", 1)[1] for l in part if l != b"garbage line"}
        assert not qids & set(seen)
        seen += qids


def test_a_query_reappearing_later_is_flagged(tmp_path):
    rows = fx.grouped_rows(3, num_queries=3, per_query=2)
    rows.append(dict(rows[0], product_id=1))  # query 0 again, after queries 1 and 2
    path = fx.write_tsv(str(tmp_path / "test.tsv"), [fx.line(r) for r in rows])
    chunks = list(tsv.iter_chunks(path, 100, group_by_query=True))
    assert len(chunks) == 1
    (line_no, detail), = chunks[0].ungrouped
    assert line_no == 8 and "first seen at line 2" in detail
