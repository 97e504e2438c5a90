"""`mmrecall score`: NDCG@5 of a submission CSV, as the organiser's evaluator computes it.

Per query, the binary relevance r_i of the 5 submitted ids gives
  DCG@5  = sum_i r_i / log2(i + 1)                  (i = 1..5; (2^r - 1) = r for binary r)
  IDCG@5 = the DCG of min(#answers, 5) relevant ids in front
  NDCG@5 = DCG@5 / IDCG@5,
and the score is the mean over every query of the answer file (see shared/KDD_FORMAT.md).

The organiser's checks are applied before scoring: the exact header, 6 comma-separated fields
per line, all-digit ids, 5 distinct product ids, no query twice, every answered query present.
All problems are reported together, each naming its line.
"""
import argparse
import json
import math
import sys
from typing import Collection, Dict, List, Sequence

from data_prep import schema

# 1, 1/log2(3), ..., 1/log2(6)
_DISCOUNTS = [1.0 / math.log2(i + 2) for i in range(schema.NDCG_K)]
MAX_REPORTED_PROBLEMS = 20


class SubmissionError(ValueError):
    """A malformed submission; `problems` lists "line N: ..." messages."""

    def __init__(self, path: str, problems: List[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        text = f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


def ndcg_at_5(ranked_ids: Sequence[int], answers: Collection[int]) -> float:
    """NDCG@5 of one query.

    Args:
      ranked_ids: predicted product ids, best first (only the first 5 count).
      answers: the query's relevant product ids.
    Returns:
      DCG@5 / IDCG@5 in [0, 1]; 0.0 when there are no answers.
    """
    relevant = {int(a) for a in answers}
    ideal = sum(_DISCOUNTS[:min(len(relevant), schema.NDCG_K)])
    if ideal == 0.0:
        return 0.0
    dcg = sum(d for d, pid in zip(_DISCOUNTS, ranked_ids) if int(pid) in relevant)
    return dcg / ideal


def read_answers(path: str) -> Dict[int, List[int]]:
    """Reads `valid_answer.json`: {"<query_id>": [product_id, ...]} -> {query_id: [ids]}."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object query_id -> [product ids]")
    return {int(q): [int(p) for p in ids] for q, ids in raw.items()}


def read_submission(path: str, answers: Dict[int, Collection[int]]) -> Dict[int, List[int]]:
    """Reads and checks a submission CSV.

    Returns:
      {query_id: [5 product ids]}.
    Raises:
      SubmissionError listing every problem found, each with its line number.
    """
    problems: List[str] = []
    ranked: Dict[int, List[int]] = {}
    first_line: Dict[int, int] = {}
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    expected_header = ",".join(schema.SUBMISSION_HEADER)
    if not lines:
        raise SubmissionError(path, ["line 1: empty file, expected the header "
                                     f"{expected_header!r}"])
    if lines[0].strip() != expected_header:
        problems.append(f"line 1: header {lines[0].strip()!r}, expected {expected_header!r}")
    for line_no, line in enumerate(lines[1:], start=2):
        line = line.strip()
        if not line:
            continue  # blank lines (e.g. a trailing one) carry no prediction
        fields = [x.strip() for x in line.split(",")]
        if len(fields) != 1 + schema.NDCG_K:
            problems.append(f"line {line_no}: {len(fields)} fields, expected query-id and "
                            f"{schema.NDCG_K} product ids")
            continue
        qid, pids = fields[0], fields[1:]
        bad = [x for x in fields if not x.isdigit() or not x.isascii()]
        if bad:
            problems.append(f"line {line_no}: ids must be all digits, got {bad}")
            continue
        if len(set(int(p) for p in pids)) != schema.NDCG_K:
            problems.append(f"line {line_no}: query {qid}: product ids are not "
                            f"{schema.NDCG_K} distinct ids")
            continue
        q = int(qid)
        if q in ranked:
            problems.append(f"line {line_no}: query {qid} already given on line {first_line[q]}")
            continue
        ranked[q] = [int(p) for p in pids]
        first_line[q] = line_no
    missing = sorted(set(answers) - set(ranked))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        problems.append(f"line {len(lines) + 1}: end of file, {len(missing)} answered "
                        f"queries missing: {shown}")
    if problems:
        raise SubmissionError(path, problems)
    return ranked


def mean_ndcg(ranked: Dict[int, Sequence[int]], answers: Dict[int, Collection[int]]) -> float:
    """Mean NDCG@5 over the queries of `answers` (0 for an answered query not ranked)."""
    if not answers:
        raise ValueError("no answered queries")
    return sum(ndcg_at_5(ranked.get(q, ()), a) for q, a in answers.items()) / len(answers)


def score_files(answers_path: str, submission_path: str) -> Dict[str, float]:
    """Checks and scores a submission file; returns {"ndcg@5": ..., "queries": ...}."""
    answers = read_answers(answers_path)
    ranked = read_submission(submission_path, answers)
    return {"ndcg@5": mean_ndcg(ranked, answers), "queries": len(answers)}


def main(argv=None) -> int:
    """`mmrecall score`: prints {"ndcg@5", "queries"} as JSON; 1 on an invalid submission."""
    parser = argparse.ArgumentParser(
        prog="mmrecall score", description="NDCG@5 of a submission CSV, as the organiser did.")
    parser.add_argument("--answers", required=True, help="valid_answer.json")
    parser.add_argument("--submission", required=True, help="submission CSV")
    args = parser.parse_args(argv)
    try:
        result = score_files(args.answers, args.submission)
    except SubmissionError as e:
        print(f"mmrecall score: invalid submission: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
