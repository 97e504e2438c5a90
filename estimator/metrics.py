"""NDCG@5 exactly as the KDD Cup 2020 organiser computes it, in-graph (the eval metric).

Per query, rank its candidates by score (descending; equal scores keep row order, the
order a stable sort gives), take the top 5, relevance r_i in {0, 1}:
    DCG@5  = sum_{i=1..5} r_i / log2(i + 1)
    IDCG@5 = sum_{i=1..min(#answers, 5)} 1 / log2(i + 1)
    NDCG@5 = DCG@5 / IDCG@5, averaged over queries that have at least one answer.
Queries with fewer than 5 candidates simply have fewer terms. A product listed twice in one
query's candidates takes one position, that of its best-ranked copy: the submission lists
distinct product ids (`mmrecall rank`, export.rank.top_k), so its later copies are left out
of the ranking, the DCG and the answer count alike.

It works on any batch made of whole queries (rows of one query need not be contiguous): it
compares every pair of rows of the batch, O(B^2), fine for eval batches. The numpy reference
is the organiser's scorer, export/score.py; a test keeps the two equal.

Dimension legend: B batch rows.
"""
import math

import tensorflow as tf

from data_prep import schema


def ndcg_per_query(scores, labels, query_ids, product_ids=None, k=schema.NDCG_K):
    """In-graph NDCG@k per query of a batch of whole queries.

    Args:
      scores: float [B]; labels: {0,1} [B] (any numeric dtype); query_ids: int [B].
      product_ids: int [B], or None when no product is listed twice in a query. A later
        copy (ranked below another row of its query with the same product id) is left out,
        as the submission lists distinct ids.
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
    above = tf.logical_and(same, beats)                                      # [B, B]
    if product_ids is None:
        kept = tf.ones_like(rel, tf.bool)
    else:
        copy = tf.equal(product_ids[:, tf.newaxis], product_ids[tf.newaxis, :])
        kept = tf.logical_not(tf.reduce_any(tf.logical_and(above, copy), 1))  # [B]
        above = tf.logical_and(above, kept[tf.newaxis, :])     # later copies hold no place
        rel = rel * tf.cast(kept, tf.float32)
    rank = tf.reduce_sum(tf.cast(above, tf.int32), 1)                        # [B], 0-based
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


def ndcg_metric(scores, labels, query_ids, product_ids=None, k=schema.NDCG_K):
    """tf.compat.v1 metric (value, update_op): NDCG@k averaged over queries (arguments as
    ndcg_per_query's; pass product_ids so that duplicates count as the scorer counts them)."""
    values, weights = ndcg_per_query(scores, labels, query_ids, product_ids, k)
    return tf.compat.v1.metrics.mean(values, weights=weights)
