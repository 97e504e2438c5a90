"""In-graph NDCG@5 against hand-computed values (organiser's definition) and against the
organiser's scorer, export/score.py, the one numpy reference."""
import math

import numpy as np
import pytest
import tensorflow as tf

from estimator import metrics
from export import rank, score

L2, L3, L4, L5, L6 = (math.log2(i) for i in (2, 3, 4, 5, 6))


def _graph_ndcg(scores, labels, qids):
    values, weights = metrics.ndcg_per_query(tf.constant(scores, tf.float32),
                                             tf.constant(labels, tf.float32),
                                             tf.constant(qids, tf.int64))
    values, weights = values.numpy(), weights.numpy()
    return float((values * weights).sum() / weights.sum())


def _scorer_ndcg(scores, labels, qids):
    """The organiser's form: per query with answers, its rows ranked by score (ties in row
    order, a stable sort) scored by score.ndcg_at_5 against its answer rows; the mean."""
    scores, labels, qids = map(np.asarray, (scores, labels, qids))
    values = []
    for q in dict.fromkeys(qids.tolist()):
        rows = np.nonzero(qids == q)[0]
        answers = rows[labels[rows] > 0]
        if answers.size:
            ranked = rows[np.argsort(-scores[rows], kind="stable")]
            values.append(score.ndcg_at_5(ranked.tolist(), answers.tolist()))
    return float(np.mean(values))


def test_hand_computed_two_queries():
    # Query 7: 6 candidates, answers are rows 1 and 4. Scores rank rows 0,1,2,3,4,5 as
    #   row0 0.9, row1 0.8, row2 0.7, row3 0.6, row4 0.5, row5 0.1
    #   -> answers at ranks 2 and 5: DCG = 1/log2(3) + 1/log2(6) = 0.63093 + 0.38685 = 1.01778
    #   IDCG (2 answers) = 1 + 1/log2(3) = 1.63093 -> NDCG = 0.62405
    # Query 9: 3 candidates, answer row 8 ranked first: NDCG = 1.
    # Query 5: no answers -> not counted. Mean = (0.62405 + 1) / 2 = 0.81202.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.3, 0.2, 0.4, 0.5, 0.6]
    labels = [0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    qids = [7, 7, 7, 7, 7, 7, 9, 9, 9, 5, 5]
    q7 = (1 / L3 + 1 / L6) / (1 + 1 / L3)
    expected = (q7 + 1.0) / 2
    assert abs(expected - 0.812025) < 1e-5
    assert _graph_ndcg(scores, labels, qids) == pytest.approx(expected, abs=1e-6)
    assert _scorer_ndcg(scores, labels, qids) == pytest.approx(expected, abs=1e-9)


def test_only_top5_count_and_idcg_caps_at_5():
    # 7 candidates, 6 answers; the only negative is ranked 3rd, so the top 5 holds answers at
    # ranks 1,2,4,5: DCG = 1 + 1/log2(3) + 1/log2(5) + 1/log2(6)
    # IDCG = 5 ones = 1 + 1/log2(3) + 1/log2(4) + 1/log2(5) + 1/log2(6)
    scores = [7, 6, 5, 4, 3, 2, 1]
    labels = [1, 1, 0, 1, 1, 1, 1]
    qids = [1] * 7
    dcg = 1 + 1 / L3 + 1 / L5 + 1 / L6
    idcg = 1 + 1 / L3 + 1 / L4 + 1 / L5 + 1 / L6
    assert _graph_ndcg(scores, labels, qids) == pytest.approx(dcg / idcg, abs=1e-6)


def test_interleaved_rows_and_ties_follow_row_order():
    # Rows of a query need not be contiguous. Query 3's answer (row 2) ties with row 0 at
    # score 1.0: row order breaks the tie, so the answer is 2nd -> 1/log2(3) = 0.63093.
    scores = [1.0, 0.0, 1.0, 0.5]
    labels = [0, 1, 1, 0]
    qids = [3, 4, 3, 4]
    # query 4: answer row 1 (0.0) is below row 3 (0.5): 2nd -> 0.63093 as well.
    assert _graph_ndcg(scores, labels, qids) == pytest.approx(1 / L3, abs=1e-6)
    assert _scorer_ndcg(scores, labels, qids) == pytest.approx(1 / L3, abs=1e-9)


@pytest.mark.parametrize("seed, ties", [(3, False), (3, True), (4, True)])
def test_graph_equals_the_organisers_scorer_on_random_lists(seed, ties):
    rng = np.random.RandomState(seed)
    qids = np.repeat(np.arange(20), rng.randint(3, 12, size=20))
    rng.shuffle(qids)                                     # rows of a query interleaved
    scores = rng.normal(size=qids.size)
    if ties:
        scores = np.round(scores)                         # a few distinct values
    labels = (rng.uniform(size=qids.size) < 0.3).astype(int)
    ref = _scorer_ndcg(scores, labels, qids)
    assert 0.0 < ref < 1.0
    assert _graph_ndcg(scores, labels, qids) == pytest.approx(ref, abs=1e-5)


def test_streaming_metric_averages_over_queries_across_batches():
    with tf.Graph().as_default():
        scores = tf.compat.v1.placeholder(tf.float32, [None])
        labels = tf.compat.v1.placeholder(tf.float32, [None])
        qids = tf.compat.v1.placeholder(tf.int64, [None])
        value, update = metrics.ndcg_metric(scores, labels, qids)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.local_variables_initializer())
            # batch 1: one query, answer 1st -> 1.0; batch 2: two queries, 1.0 and
            # answer 2nd of 2 -> 1/log2(3). Mean over 3 queries.
            sess.run(update, {scores: [2, 1], labels: [1, 0], qids: [1, 1]})
            sess.run(update, {scores: [2, 1, 0, 5], labels: [1, 0, 1, 0], qids: [2, 2, 3, 3]})
            assert sess.run(value) == pytest.approx((1 + 1 + 1 / L3) / 3, abs=1e-6)


def _graph_ndcg_with_products(scores, labels, qids, pids):
    values, weights = metrics.ndcg_per_query(tf.constant(scores, tf.float32),
                                             tf.constant(labels, tf.float32),
                                             tf.constant(qids, tf.int64),
                                             tf.constant(pids, tf.int64))
    values, weights = values.numpy(), weights.numpy()
    return float((values * weights).sum() / weights.sum())


def _submission_ndcg(scores, labels, qids, pids):
    """What `mmrecall rank` + export.score give: per query the 5 best distinct product ids
    (rank.top_k), scored against the query's answered product ids."""
    scores, labels, qids, pids = map(np.asarray, (scores, labels, qids, pids))
    values = []
    for q in dict.fromkeys(qids.tolist()):
        rows = np.nonzero(qids == q)[0]
        answers = set(pids[rows][labels[rows] > 0].tolist())
        if answers:
            values.append(score.ndcg_at_5(rank.top_k(pids[rows], scores[rows]), answers))
    return float(np.mean(values))


def test_duplicate_products_take_one_position():
    # One query: rows (pid, score, label) = (7, 0.9, 0), (7, 0.8, 0), (8, 0.7, 1),
    # (8, 0.6, 1), (9, 0.5, 0). Distinct ranking 7, 8, 9: the answer 8 is 2nd, and counts
    # once: NDCG = (1/log2(3)) / 1 = 0.63093. Counting every row, 8 would be 3rd and 4th:
    # (1/log2(4) + 1/log2(5)) / (1 + 1/log2(3)) = 0.61315.
    args = ([0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 1, 1, 0], [1] * 5)
    assert _graph_ndcg_with_products(*args, [7, 7, 8, 8, 9]) == pytest.approx(1 / L3, abs=1e-6)
    assert _submission_ndcg(*args, [7, 7, 8, 8, 9]) == pytest.approx(1 / L3, abs=1e-9)
    assert _graph_ndcg(*args) == pytest.approx((1 / L4 + 1 / L5) / (1 + 1 / L3), abs=1e-6)


@pytest.mark.parametrize("seed", [5, 6, 7, 8])
def test_graph_equals_rank_and_score_on_random_lists_with_duplicates_and_ties(seed):
    rng = np.random.RandomState(seed)
    qids = np.repeat(np.arange(15), rng.randint(2, 14, size=15))
    rng.shuffle(qids)                                     # rows of a query interleaved
    pids = rng.randint(0, 6, size=qids.size) + 100 * qids  # ~half the rows are copies
    scores = np.round(rng.normal(size=qids.size) * 2) / 2   # ties, exact in float32
    # An answer is a product: every copy of it carries the label.
    answered = {p for p in set(pids.tolist()) if rng.uniform() < 0.35}
    labels = np.array([int(p) in answered for p in pids], int)
    assert len(set(zip(qids.tolist(), pids.tolist()))) < qids.size   # duplicates present
    ref = _submission_ndcg(scores, labels, qids, pids)
    assert 0.0 < ref < 1.0
    assert _graph_ndcg_with_products(scores, labels, qids, pids) == pytest.approx(ref, abs=1e-5)
