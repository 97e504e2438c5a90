"""`mmrecall rank`: grouping, top-5 order, short lists, errors, atomic output.

The run through a real SavedModel (scores and top 5 equal to the Estimator's) is in
export_test.py, which already holds an export; the CLI run is in end_to_end_test.py."""
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
    assert stats == {"queries": 2, "candidates": 13, "padded_queries": 0}
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
    with pytest.raises(rank.RankError, match=r"in.tsv:12: rows of query 1 are not contiguous"):
        rank.rank_file("unused", path, out, scorer=_stub(rows, float))
    assert not os.path.exists(out)
    assert os.listdir(str(tmp_path)) == ["in.tsv"]  # no temporary file left behind


def test_bad_header_and_columns(tmp_path):
    bad = tsv_fixtures.write_tsv(str(tmp_path / "h.tsv"), [], header="a\tb")
    with pytest.raises(rank.RankError, match="h.tsv:1: header"):
        list(rank.iter_query_groups(bad))
    cols = tsv_fixtures.write_tsv(str(tmp_path / "c.tsv"), ["1\t2\t3"])
    with pytest.raises(rank.RankError, match="c.tsv:2: 3 columns"):
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
        rank.rank_file("unused", path, out, batch_queries=2, scorer=scorer)
    # Line 7 = header + 5 rows of query 1 + the first row of query 2.
    assert str(err.value) == (f"{path}:7: query 2, product 20 rejected by the model: "
                              f"query: empty after normalisation (no word left)")
    assert not os.path.exists(out)


def test_invalid_utf8_line_is_named(tmp_path):
    path, _ = _write(tmp_path, [(1, "red dress", [10, 11])])
    with open(path, "ab") as f:
        f.write(b"\xff\xfe broken\n")
    with pytest.raises(rank.RankError, match=r"in.tsv:4: not UTF-8"):
        list(rank.iter_query_groups(path))
