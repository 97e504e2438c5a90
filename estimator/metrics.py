"""NDCG@5 exactly as the KDD Cup 2020 organiser computes it, in-graph and in numpy.

Per query, rank its candidates by score (descending; equal scores keep row order, the
order a stable sort gives), take the top 5, relevance r_i in {0, 1}:
    DCG@5  = sum_{i=1..5} r_i / log2(i + 1)
    IDCG@5 = sum_{i=1..min(#answers, 5)} 1 / log2(i + 1)
    NDCG@5 = DCG@5 / IDCG@5, averaged over queries that have at least one answer.
Queries with fewer than 5 candidates simply have fewer terms.

The in-graph version works on any batch made of whole queries (rows of one query need not
be contiguous): it compares every pair of rows of the batch, O(B^2), fine for eval batches.
"""
import math
from typing import Dict, Iterable, Sequence

import numpy as np
import tensorflow as tf

K = 5


def ndcg_per_query(scores, labels, query_ids, k=K):
    """In-graph NDCG@k per query of a batch of whole queries.

    Args:
      scores: float [B]; labels: {0,1} [B] (any numeric dtype); query_ids: int [B].
    Returns:
      (values float32 [B], weights float32 [B]): the query's NDCG@k at the query's first row
      of the batch and weight 1 there if the query has an answer; 0 elsewhere. Feed both to
      a weighted mean to average over queries.
    """
    scores = tf.cast(scores, tf.float32)
    rel = tf.cast(tf.greater(tf.cast(labels, tf.float32), 0.5), tf.float32)   # [B]
    b = tf.shape(scores)[0]
    same = tf.equal(query_ids[:, tf.newaxis], query_ids[tf.newaxis, :])      # [B, B] (i, j)
    idx = tf.range(b)
    earlier = idx[tf.newaxis, :] < idx[:, tf.newaxis]                        # j < i
    beats = tf.logical_or(scores[tf.newaxis, :] > scores[:, tf.newaxis],
                          tf.logical_and(tf.equal(scores[tf.newaxis, :], scores[:, tf.newaxis]),
                                         earlier))                           # j ranks above i
    rank = tf.reduce_sum(tf.cast(tf.logical_and(same, beats), tf.int32), 1)  # [B], 0-based
    discount = 1.0 / (tf.math.log(tf.cast(rank, tf.float32) + 2.0) / math.log(2.0))
    gain = rel * discount * tf.cast(rank < k, tf.float32)                    # [B]
    samef = tf.cast(same, tf.float32)
    dcg = tf.linalg.matvec(samef, gain)                                      # [B] per row's query
    answers = tf.linalg.matvec(samef, rel)                                   # [B]
    ideal_terms = 1.0 / (tf.math.log(tf.range(k, dtype=tf.float32) + 2.0) / math.log(2.0))
    ideal_cum = tf.concat([[0.0], tf.cumsum(ideal_terms)], 0)                # [k + 1]
    idcg = tf.gather(ideal_cum, tf.cast(tf.minimum(answers, float(k)), tf.int32))
    first = tf.logical_not(tf.reduce_any(tf.logical_and(same, earlier), 1))  # first row of q
    weights = tf.cast(tf.logical_and(first, answers > 0), tf.float32)
    values = tf.where(weights > 0, dcg / tf.maximum(idcg, 1e-9), tf.zeros_like(dcg))
    return values, weights


def ndcg_metric(scores, labels, query_ids, k=K):
    """tf.compat.v1 metric (value, update_op): NDCG@k averaged over queries."""
    values, weights = ndcg_per_query(scores, labels, query_ids, k)
    return tf.compat.v1.metrics.mean(values, weights=weights)


def ndcg_numpy(scores: Sequence[float], labels: Sequence[int], query_ids: Sequence[int],
               k: int = K) -> float:
    """Reference NDCG@k (mean over queries with answers), ties broken by row order."""
    scores, labels, query_ids = map(np.asarray, (scores, labels, query_ids))
    values = []
    for q in dict.fromkeys(query_ids.tolist()):
        rows = np.nonzero(query_ids == q)[0]
        n_ans = int((labels[rows] > 0).sum())
        if n_ans == 0:
            continue
        order = rows[np.argsort(-scores[rows], kind="stable")][:k]
        dcg = sum(float(labels[r] > 0) / math.log2(i + 2) for i, r in enumerate(order))
        idcg = sum(1.0 / math.log2(i + 2) for i in range(min(n_ans, k)))
        values.append(dcg / idcg)
    return float(np.mean(values)) if values else 0.0


def ndcg_from_answers(ranked: Dict[int, Iterable[int]], answers: Dict[int, Iterable[int]],
                      k: int = K) -> float:
    """The organiser's form: {query_id: ranked product ids}, {query_id: answer ids}."""
    values = []
    for q, ans in answers.items():
        ans = set(ans)
        top = list(ranked.get(q, []))[:k]
        dcg = sum(1.0 / math.log2(i + 2) for i, p in enumerate(top) if p in ans)
        idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(ans), k)))
        values.append(dcg / idcg if idcg else 0.0)
    return float(np.mean(values)) if values else 0.0
