"""Tests of export.score: NDCG@5 against values worked out by hand, and the organiser's checks."""
import json
import math
import os

import pytest

from export import score

# Discounts 1/log2(i + 1), i = 1..5:
#   1, 1/log2(3) = 0.6309298, 1/log2(4) = 0.5, 1/log2(5) = 0.4306766, 1/log2(6) = 0.3868528


def test_ndcg_perfect_and_zero():
    # Two answers ranked first and second: DCG = 1 + 0.6309 = IDCG -> 1.
    assert score.ndcg_at_5([7, 8, 1, 2, 3], {7, 8}) == pytest.approx(1.0)
    # No answer in the five: DCG = 0.
    assert score.ndcg_at_5([1, 2, 3, 4, 5], {9}) == 0.0
    # No answers at all: defined as 0 (IDCG = 0).
    assert score.ndcg_at_5([1, 2, 3, 4, 5], set()) == 0.0


def test_ndcg_six_answers_hits_at_1_and_3():
    # r = 1 0 1 0 0: DCG = 1 + 1/log2(4) = 1.5.
    # 6 answers -> IDCG = 1 + 0.6309298 + 0.5 + 0.4306766 + 0.3868528 = 2.9484592.
    # NDCG = 1.5 / 2.9484592 = 0.5087403.
    got = score.ndcg_at_5([1, 2, 3, 4, 5], {1, 3, 9, 10, 11, 12})
    assert got == pytest.approx(0.5087403, abs=1e-7)


def test_ndcg_single_answer_second():
    # r = 0 1 0 0 0 with one answer: DCG = 0.6309298, IDCG = 1.
    assert score.ndcg_at_5([1, 2, 3, 4, 5], [2]) == pytest.approx(0.6309298, abs=1e-7)


def test_ndcg_two_answers_last():
    # r = 0 0 0 1 1: DCG = 0.4306766 + 0.3868528 = 0.8175294; IDCG = 1.6309298.
    # NDCG = 0.8175294 / 1.6309298 = 0.5012659.
    assert score.ndcg_at_5([1, 2, 3, 4, 5], [5, 4]) == pytest.approx(0.5012659, abs=1e-7)


def test_ndcg_only_first_five_count():
    # The sixth id is an answer but is not among the five scored positions.
    assert score.ndcg_at_5([1, 2, 3, 4, 5, 6], [6]) == 0.0


def _write(tmp_path, name, text):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


HEADER = "query-id,product1,product2,product3,product4,product5\n"


def _answers(tmp_path):
    return _write(tmp_path, "answers.json", json.dumps({"11": [1, 2], "12": [5, 4, 3, 2, 1, 0]}))


def test_score_files_mean_over_answer_queries(tmp_path):
    # Query 11: r = 1 1 0 0 0 with 2 answers -> 1.0.
    # Query 12: r = 0 0 1 0 0 (only 3 relevant), 6 answers -> IDCG 2.9484592,
    #   NDCG = 0.5 / 2.9484592 = 0.1695801.  Mean = (1 + 0.1695801) / 2 = 0.5847901.
    # Query 99 has no answers and is ignored, as the organiser does.
    sub = _write(tmp_path, "sub.csv", HEADER + "11,1,2,7,8,9\n12,9,8,3,7,6\n99,1,2,3,4,5\n")
    result = score.score_files(_answers(tmp_path), sub)
    assert result["queries"] == 2
    assert result["ndcg@5"] == pytest.approx(0.5847901, abs=1e-7)


@pytest.mark.parametrize("body, problem", [
    ("query,p1,p2,p3,p4,p5\n11,1,2,7,8,9\n12,9,8,3,7,6\n", "line 1: header"),
    (HEADER + "11,1,2,7,8\n12,9,8,3,7,6\n", "line 2: 5 fields"),
    (HEADER + "11,1,2,7,8,8\n12,9,8,3,7,6\n", "line 2: query 11: product ids are not 5 distinct"),
    (HEADER + "11,1,2,7,8,x9\n12,9,8,3,7,6\n", "line 2: ids must be all digits"),
    (HEADER + "11,1,2,7,8,-9\n12,9,8,3,7,6\n", "line 2: ids must be all digits"),
    (HEADER + "11,1,2,7,8,9\n", "answered queries missing: 12"),
    (HEADER + "11,1,2,7,8,9\n12,9,8,3,7,6\n11,1,2,3,4,5\n", "line 4: query 11 already given on line 2"),
])
def test_malformed_submissions_are_rejected_naming_the_line(tmp_path, body, problem):
    sub = _write(tmp_path, "sub.csv", body)
    with pytest.raises(score.SubmissionError) as err:
        score.score_files(_answers(tmp_path), sub)
    assert problem in str(err.value)


def test_cli_exit_codes(tmp_path, capsys):
    answers = _answers(tmp_path)
    good = _write(tmp_path, "good.csv", HEADER + "11,1,2,7,8,9\n12,5,4,3,2,1\n")
    assert score.main(["--answers", answers, "--submission", good]) == 0
    out = json.loads(capsys.readouterr().out)
    # Query 12: r = 1 1 1 1 1 -> 1.0; query 11 -> 1.0.
    assert out["ndcg@5"] == pytest.approx(1.0)
    bad = _write(tmp_path, "bad.csv", HEADER + "11,1,2,7,8,9\n")
    assert score.main(["--answers", answers, "--submission", bad]) == 1
    assert "missing: 12" in capsys.readouterr().err


def test_discounts_match_formula():
    # Guard against an off-by-one in the discount table.
    assert score.ndcg_at_5([9, 9, 9, 9, 1], [1]) == pytest.approx(1 / math.log2(6))
