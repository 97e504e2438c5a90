"""NDCG@5 against hand-computed values (organiser's definition) and a numpy reference."""
import math

import numpy as np
import pytest
import tensorflow as tf

from estimator import metrics

L2, L3, L4, L5, L6 = (math.log2(i) for i in (2, 3, 4, 5, 6))


def _graph_ndcg(scores, labels, qids):
    values, weights = metrics.ndcg_per_query(tf.constant(scores, tf.float32),
                                             tf.constant(labels, tf.float32),
                                             tf.constant(qids, tf.int64))
    values, weights = values.numpy(), weights.numpy()
    return float((values * weights).sum() / weights.sum())


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
    assert metrics.ndcg_numpy(scores, labels, qids) == pytest.approx(expected, abs=1e-9)


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
    assert metrics.ndcg_numpy(scores, labels, qids) == pytest.approx(1 / L3, abs=1e-9)


def test_graph_equals_numpy_and_answer_form_on_random_lists():
    rng = np.random.RandomState(3)
    qids = np.repeat(np.arange(20), rng.randint(3, 12, size=20))
    scores = rng.normal(size=qids.size)
    labels = (rng.uniform(size=qids.size) < 0.3).astype(int)
    ref = metrics.ndcg_numpy(scores, labels, qids)
    assert _graph_ndcg(scores, labels, qids) == pytest.approx(ref, abs=1e-5)
    ranked, answers = {}, {}
    for q in np.unique(qids):
        rows = np.nonzero(qids == q)[0]
        ranked[q] = list(rows[np.argsort(-scores[rows], kind="stable")])
        if labels[rows].any():
            answers[q] = list(rows[labels[rows] > 0])
    assert metrics.ndcg_from_answers(ranked, answers) == pytest.approx(ref, abs=1e-9)


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
