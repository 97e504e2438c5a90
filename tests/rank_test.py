"""`mmrecall rank`: grouping, top-5 order, short lists, errors, atomic output.

The run through a real SavedModel (scores and top 5 equal to the Estimator's) is in
export_test.py, which already holds an export; the CLI run is in end_to_end_test.py."""
import errno
import os

import numpy as np
import pytest

from mmrecall_testing import tsv_fixtures
from export import rank, score


class StubScorer:
    """Scores a row by a per-product number, and records the batches it was given."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def score(self, fields):
        self.calls.append(len(fields["query"]))
        return np.array([self.table[(q, b)] for q, b in zip(fields["query"], fields["boxes"])],
                        np.float32)

    def score_lists(self, lists):
        """The scorer's list interface: one score() call over the lists' rows."""
        flat = {k: [v for l in lists for v in l[k]] for k in lists[0]}
        scores, out = self.score(flat), []
        for l in lists:
            out.append(scores[:len(l["query"])])
            scores = scores[len(l["query"]):]
        return out

    def close(self):
        pass


def _write(tmp_path, groups):
    """groups: [(query_id, query, [product ids])] -> a TSV; returns path and rows."""
    rng = np.random.default_rng(0)
    rows = []
    for qid, query, pids in groups:
        for pid in pids:
            rows.append(tsv_fixtures.random_row(rng, pid, qid, query, num_boxes=1))
    path = tsv_fixtures.write_tsv(str(tmp_path / "in.tsv"), [tsv_fixtures.line(r) for r in rows])
    return path, rows


def _stub(rows, score_of):
    lines = [tsv_fixtures.line(r).split("\t") for r in rows]
    return StubScorer({(l[7], l[4]): score_of(int(l[0])) for l in lines})


def _read(path):
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


def test_top5_by_score_in_file_order_for_ties(tmp_path):
    groups = [(7, "red dress", [11, 12, 13, 14, 15, 16, 17]),
              (3, "blue shoe", [21, 22, 23, 24, 25, 26])]
    path, rows = _write(tmp_path, groups)
    # Scores: product 16 best, then 12; 11, 13 and 14 tie (file order decides).
    scores = {11: 1.0, 12: 5.0, 13: 1.0, 14: 1.0, 15: 0.0, 16: 9.0, 17: -1.0,
              21: 0.1, 22: 0.2, 23: 0.3, 24: 0.4, 25: 0.5, 26: 0.6}
    stub = _stub(rows, scores.get)
    out = str(tmp_path / "sub.csv")
    stats = rank.rank_file("unused", path, out, scores_path=str(tmp_path / "s.tsv"),
                           batch_queries=1, scorer=stub)
    assert stats["queries"] == 2 and stats["candidates"] == 13
    assert stats["padded_queries"] == 0 and stats["rejected_rows"] == 0
    assert _read(out) == ["query-id,product1,product2,product3,product4,product5",
                          "7,16,12,11,13,14", "3,26,25,24,23,22"]
    assert stub.calls == [7, 6]  # one call per query with --batch-queries 1
    lines = _read(str(tmp_path / "s.tsv"))
    assert lines[0] == "query_id\tproduct_id\tscore" and len(lines) == 14
    assert "7\t16\t9" in lines


def test_batches_whole_queries(tmp_path):
    groups = [(q, f"query {q}", [100 * q + i for i in range(6)]) for q in range(1, 6)]
    path, rows = _write(tmp_path, groups)
    stub = _stub(rows, lambda pid: float(pid % 7))
    rank.rank_file("unused", path, str(tmp_path / "a.csv"), batch_queries=2, scorer=stub)
    assert stub.calls == [12, 12, 6]
    stub1 = _stub(rows, lambda pid: float(pid % 7))
    rank.rank_file("unused", path, str(tmp_path / "b.csv"), batch_queries=1, scorer=stub1)
    assert _read(str(tmp_path / "a.csv")) == _read(str(tmp_path / "b.csv"))


def test_short_lists_are_completed_with_other_queries_products(tmp_path):
    # Query 2 has 3 candidates (one repeated): 2 distinct ids -> 3 fillers in order of
    # first appearance in the file, skipping its own ids.
    groups = [(2, "lamp", [40, 41, 40]), (5, "sofa", [50, 51, 52, 53, 54, 55])]
    path, rows = _write(tmp_path, groups)
    stub = _stub(rows, lambda pid: float(pid))
    out = str(tmp_path / "sub.csv")
    stats = rank.rank_file("unused", path, out, scorer=stub)
    assert stats["padded_queries"] == 1
    lines = _read(out)
    assert lines[1] == "2,41,40,50,51,52"
    assert lines[2] == "5,55,54,53,52,51"
    # The organiser's checks accept it.
    answers = tsv_fixtures.write_answers(str(tmp_path / "a.json"), {"2": [40], "5": [55, 50]})
    assert score.score_files(answers, out)["queries"] == 2


def test_non_contiguous_query_is_an_error_and_leaves_no_output(tmp_path):
    groups = [(1, "a", [10, 11, 12, 13, 14]), (2, "b", [20, 21, 22, 23, 24]),
              (1, "a", [15])]
    path, rows = _write(tmp_path, groups)
    out = str(tmp_path / "sub.csv")
    with pytest.raises(rank.RankError, match=r"in.tsv:12: query_id: query_id 1 reappears after "
                                             r"other queries \(query_not_grouped\)"):
        rank.rank_file("unused", path, out, scorer=_stub(rows, float), on_bad_row="fail")
    assert not os.path.exists(out)
    assert os.listdir(str(tmp_path)) == ["in.tsv"]  # no temporary file left behind


def test_bad_header_and_columns(tmp_path):
    bad = tsv_fixtures.write_tsv(str(tmp_path / "h.tsv"), [], header="a\tb")
    with pytest.raises(rank.RankError, match="h.tsv:1: header"):
        list(rank.iter_query_groups(bad))
    cols = tsv_fixtures.write_tsv(str(tmp_path / "c.tsv"), ["1\t2\t3"])
    with pytest.raises(rank.RankError, match="c.tsv:2: line: 3 columns, expected 9"):
        list(rank.iter_query_groups(cols))


def test_resolve_model_dir_picks_newest_version(tmp_path):
    for v in ("5", "12", "temp-99"):
        os.makedirs(tmp_path / v)
        (tmp_path / v / "saved_model.pb").write_bytes(b"")
    assert rank.resolve_model_dir(str(tmp_path)) == str(tmp_path / "12")
    assert rank.resolve_model_dir(str(tmp_path / "5")) == str(tmp_path / "5")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no saved_model.pb"):
        rank.resolve_model_dir(str(tmp_path / "empty"))


class RejectingScorer(StubScorer):
    """Rejects every request that holds a given query text, as the graph does."""

    def __init__(self, table, bad_query):
        super().__init__(table)
        self.bad_query = bad_query

    def score(self, fields):
        import tensorflow as tf

        if self.bad_query in fields["query"]:
            raise tf.errors.InvalidArgumentError(
                None, None, "Graph execution error:\n\nassertion failed: [query: empty after "
                            "normalisation (no word left)] [Condition x > 0 did not hold]")
        return super().score(fields)


def test_rejected_row_is_named_by_line_and_field(tmp_path):
    groups = [(1, "red dress", [10, 11, 12, 13, 14]), (2, "?!", [20, 21, 22, 23, 24, 25])]
    path, rows = _write(tmp_path, groups)
    stub = _stub(rows, float)
    scorer = RejectingScorer(stub.table, "?!")
    out = str(tmp_path / "sub.csv")
    with pytest.raises(rank.RankError) as err:
        rank.rank_file("unused", path, out, batch_queries=2, scorer=scorer, on_bad_row="fail")
    # Line 7 = header + 5 rows of query 1 + the first row of query 2.
    assert str(err.value) == (f"{path}:7: query 2, product 20 rejected by the model: "
                              f"query: empty after normalisation (no word left)")
    assert not os.path.exists(out)


def test_invalid_utf8_query_is_named(tmp_path):
    path, _ = _write(tmp_path, [(1, "red dress", [10, 11])])
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[2] = lines[2].replace(b"red dress", b"r\xffd dress")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    with pytest.raises(rank.RankError, match=r"in.tsv:3: query: not UTF-8 .*\(encoding\)"):
        list(rank.iter_query_groups(path))


def test_pad_lists_pads_to_the_longest_with_padding_candidates():
    # Lists of 3 and 1 candidates -> C = 3; list 1's two padding slots hold "" and 0.
    lists = [{"query": ["red dress"] * 3, "boxes": ["b1", "b2", "b3"], "features": ["f1"] * 3,
              "class_labels": ["l"] * 3, "num_boxes": [1, 2, 3], "image_h": [5] * 3,
              "image_w": [7] * 3},
             {"query": ["shoe"], "boxes": ["b4"], "features": ["f4"], "class_labels": ["l4"],
              "num_boxes": [4], "image_h": [9], "image_w": [11]}]
    inputs = rank.pad_lists(lists)
    assert inputs["query"].tolist() == ["red dress", "shoe"]
    assert inputs["boxes"].tolist() == [["b1", "b2", "b3"], ["b4", b"", b""]]
    assert inputs["num_boxes"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert inputs["image_w"].dtype == np.int64 and inputs["image_w"].shape == (2, 3)


def test_a_row_with_no_box_is_an_error_naming_its_line(tmp_path):
    # num_boxes 0 marks padding in the rank signature, so a row must never send it.
    path, rows = _write(tmp_path, [(1, "red dress", [10, 11, 12])])
    lines = _read(path)
    fields = lines[2].split("\t")
    fields[3] = "0"
    with open(path, "w") as f:
        f.write("\n".join(lines[:2] + ["\t".join(fields)] + lines[3:]) + "\n")
    with pytest.raises(rank.RankError, match=r"in.tsv:3: num_boxes: 0 boxes, must be >= 1"):
        list(rank.iter_query_groups(path))


def _edit(path, edits):
    """Rewrites TSV lines: {line number: function of the tab-split fields -> fields}."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, change in edits.items():
        lines[number - 1] = "\t".join(change(lines[number - 1].split("\t")))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _column(name):
    from data_prep import schema

    return schema.TSV_COLUMNS.index(name)


def _setter(name, value):
    def change(fields):
        fields[_column(name)] = value
        return fields
    return change


def test_bad_rows_are_skipped_and_reported_and_every_query_keeps_its_line(tmp_path):
    # Query 1 (lines 2-7): line 3 has bad base64 and line 5 num_boxes 0; query 2 (lines
    # 8-12): every row bad (features cut short); query 3 (lines 13-18): fine; then a row
    # of query 1 again (line 19) and a row whose query_id is unreadable (line 20).
    groups = [(1, "red dress", [10, 11, 12, 13, 14, 15]), (2, "blue shoe", [20, 21, 22, 23, 24]),
              (3, "lamp", [30, 31, 32, 33, 34, 35]), (1, "red dress", [16]), (4, "x", [40])]
    path, rows = _write(tmp_path, groups)
    cut = _setter("features", "AAAA")
    _edit(path, {3: _setter("boxes", "not base64!"), 5: _setter("num_boxes", "0"),
                 8: cut, 9: cut, 10: cut, 11: cut, 12: cut, 20: _setter("query_id", "q4")})
    stub = _stub(rows, float)
    out = str(tmp_path / "sub.csv")
    stats = rank.rank_file("unused", path, out, scorer=stub)
    assert stats["rejected_rows"] == 9 and stats["unscored_queries"] == 1
    assert stats["reasons"] == {"base64": 1, "num_boxes": 1, "byte_length": 5,
                                "query_not_grouped": 1, "not_integer": 1}
    assert stats["rejects_path"] == str(tmp_path / "sub.rejects.tsv")
    rejects = [l.split("\t") for l in _read(stats["rejects_path"])]
    assert rejects[0] == list(rank.REJECTS_HEADER)
    assert [r[:5] for r in rejects[1:3]] == [["3", "1", "11", "boxes", "base64"],
                                             ["5", "1", "13", "num_boxes", "num_boxes"]]
    assert rejects[-2][:5] == ["19", "1", "16", "query_id", "query_not_grouped"]
    assert rejects[-1][:5] == ["20", "", "40", "query_id", "not_integer"]
    # Query 1 ranks its 4 good rows, then its first rejected one; query 2 lists its own
    # (unscored) candidates in file order; the organiser's checks accept the file.
    assert _read(out)[1:] == ["1,15,14,12,10,11", "2,20,21,22,23,24", "3,35,34,33,32,31"]
    answers = tsv_fixtures.write_answers(str(tmp_path / "a.json"),
                                         {"1": [10], "2": [20], "3": [30]})
    assert score.score_files(answers, out)["queries"] == 3
    assert stub.calls == [4 + 6]     # query 2 was never sent


def test_on_bad_row_fail_exits_1_and_skip_exits_0_with_a_summary(tmp_path, monkeypatch, capsys):
    path, rows = _write(tmp_path, [(1, "red dress", [10, 11, 12, 13, 14, 15])])
    _edit(path, {4: _setter("image_h", "-3")})
    monkeypatch.setattr(rank, "SavedModelScorer", lambda *a, **k: _stub(rows, float))
    out = str(tmp_path / "sub.csv")
    args = ["--model", "unused", "--input", path, "--out", out]
    assert rank.main(args + ["--on-bad-row", "fail"]) == 1
    assert "in.tsv:4: image_h: -3 pixels, must be > 0 (image_size)" in capsys.readouterr().err
    assert not os.path.exists(out)
    rejects = str(tmp_path / "r.tsv")
    assert rank.main(args + ["--rejects", rejects]) == 0
    err = capsys.readouterr().err
    assert f"1 bad rows skipped (image_size 1); 0 queries left with no scored candidate -> " \
           f"{rejects}" in err
    assert len(_read(rejects)) == 2 and _read(out)[1] == "1,15,14,13,11,10"
    # A clean rerun leaves a rejects file with its header only (never an old run's rows).
    _write(tmp_path, [(1, "red dress", [10, 11, 12, 13, 14, 15])])
    assert rank.main(args + ["--rejects", rejects]) == 0
    assert _read(rejects) == ["\t".join(rank.REJECTS_HEADER)]


def test_a_bom_before_the_header_is_accepted(tmp_path):
    path, rows = _write(tmp_path, [(1, "red dress", [10, 11, 12, 13, 14])])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data)
    groups = list(rank.iter_query_groups(path))
    assert [g.product_ids for g in groups] == [[10, 11, 12, 13, 14]]


def test_rows_the_model_refuses_are_skipped_and_the_rest_scored(tmp_path):
    groups = [(1, "red dress", [10, 11, 12, 13, 14]), (2, "?!", [20, 21]),
              (3, "lamp", [30, 31, 32, 33, 34])]
    path, rows = _write(tmp_path, groups)
    stub = _stub(rows, float)
    out = str(tmp_path / "sub.csv")
    stats = rank.rank_file("unused", path, out, batch_queries=3,
                           scorer=RejectingScorer(stub.table, "?!"))
    assert stats["reasons"] == {rank.MODEL_REASON: 2} and stats["unscored_queries"] == 1
    rejects = [l.split("\t") for l in _read(stats["rejects_path"])[1:]]
    assert [r[:5] for r in rejects] == [["7", "2", "20", "query", "model"],
                                        ["8", "2", "21", "query", "model"]]
    assert rejects[0][5] == "query: empty after normalisation (no word left)"
    assert _read(out)[1:] == ["1,14,13,12,11,10", "2,20,21,10,11,12", "3,34,33,32,31,30"]


def test_missing_model_missing_input_and_unwritable_out_are_one_line_errors(
        tmp_path, monkeypatch, capsys):
    """Each fault is one line naming the path and what to do, exit 1, and no output."""
    path, rows = _write(tmp_path, [(1, "red dress", [10, 11, 12, 13, 14, 15])])
    out = str(tmp_path / "out" / "sub.csv")
    assert rank.main(["--model", str(tmp_path / "no-model"), "--input", path, "--out", out]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmrecall rank: {tmp_path / 'no-model'}: no such SavedModel")
    assert "\n" not in err and not os.path.exists(os.path.dirname(out))

    monkeypatch.setattr(rank, "SavedModelScorer", lambda *a, **k: _stub(rows, float))
    missing = str(tmp_path / "missing.tsv")
    assert rank.main(["--model", "unused", "--input", missing, "--out", out]) == 1
    assert capsys.readouterr().err.strip() == (
        f"mmrecall rank: {missing}: No such file or directory; check the path, then rerun")

    def read_only(*args, dir=None, **kwargs):           # a read-only --out disk
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(rank.tempfile, "mkstemp", read_only)
    assert rank.main(["--model", "unused", "--input", path, "--out", out]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmrecall rank: {tmp_path / 'out'}") and err.endswith(
        "Read-only file system; make it writable or choose another --out, then rerun")
    assert not os.path.exists(out)
