"""In-batch negative samplers: pick, for each positive pair of a batch, K other products.

Sampling happens *after* the towers (on their outputs) and *before* cross-attention, so the
towers run once per example and no pair can see another pair inside the matcher.

A sampler maps (q_pooled [B, E], p_pooled [B, E], allowed [B, B] bool, K, seed) to
`scores [B, B]` whose top-K allowed columns per row are the negatives; `sample_negatives`
does the masking and top-K. Register new samplers in SAMPLERS.

Dimension legend: B batch, E pooled width, K negatives per positive.
"""
from typing import Callable, Dict

import tensorflow as tf

_MASKED = -3.0e38


def allowed_pairings(query_key, product_id):
    """bool [B, B]: may product j be a negative for the query of row i?

    False when j's query is the same normalised query as i's (then j's product is a positive
    of i's query too) or j's product is i's product (including j == i).
    """
    same_query = tf.equal(query_key[:, tf.newaxis], query_key[tf.newaxis, :])
    same_product = tf.equal(product_id[:, tf.newaxis], product_id[tf.newaxis, :])
    return tf.logical_not(tf.logical_or(same_query, same_product))


def _random_scores(q_pooled, p_pooled, seed):
    b = tf.shape(q_pooled)[0]
    return tf.random.uniform([b, b], seed=seed)


def _hard_scores(q_pooled, p_pooled, seed):
    # The most similar products by the towers' own embeddings, chosen without gradient:
    # "sample negatives in the embedding space".
    return tf.stop_gradient(tf.matmul(q_pooled, p_pooled, transpose_b=True))   # [B, B]


def _mixed_scores(q_pooled, p_pooled, seed):
    # Hard with noise: cosine plus uniform jitter of 0.1, so that near-ties (and possible
    # false negatives that look exactly like the positive) do not always win.
    b = tf.shape(q_pooled)[0]
    jitter = 0.1 * tf.random.uniform([b, b], seed=seed)
    return _hard_scores(q_pooled, p_pooled, seed) + jitter


SAMPLERS: Dict[str, Callable] = {
    "random": _random_scores,
    "hard": _hard_scores,
    "mixed": _mixed_scores,
}


def sample_negatives(sampler, q_pooled, p_pooled, query_key, product_id, num_negatives,
                     seed=None):
    """Chooses K negatives per row among the other products of the batch.

    Args:
      sampler: a key of SAMPLERS.
      q_pooled, p_pooled: float [B, E] tower embeddings (row i = positive pair i).
      query_key, product_id: int64 [B].
      num_negatives: K (python int); if fewer than K products are allowed for a row the
        extra slots are marked invalid.
      seed: op seed for the random samplers.
    Returns:
      (indices int32 [B, K] into the batch, valid bool [B, K]).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known {sorted(SAMPLERS)}")
    with tf.name_scope("negatives"):
        allowed = allowed_pairings(query_key, product_id)                      # [B, B]
        scores = tf.cast(SAMPLERS[sampler](q_pooled, p_pooled, seed), tf.float32)  # [B, B]
        scores = tf.where(allowed, scores, tf.fill(tf.shape(scores), _MASKED))
        b = tf.shape(scores)[0]
        k = tf.minimum(num_negatives, b)
        top, indices = tf.math.top_k(scores, k=k)                              # [B, k]
        valid = tf.gather(allowed, indices, batch_dims=1)                      # [B, k]
        # Pad to exactly K columns when the batch is smaller than K.
        pad = num_negatives - k
        indices = tf.pad(indices, [[0, 0], [0, pad]])
        valid = tf.pad(valid, [[0, 0], [0, pad]], constant_values=False)
    indices.set_shape([None, num_negatives])
    valid.set_shape([None, num_negatives])
    del top
    return indices, valid


def pair_indices(neg_indices, neg_valid):
    """Row-aligned (query, product) pairs as indices: each positive followed by its K negatives.

    Args:
      neg_indices: int32 [B, K] from sample_negatives; neg_valid: bool [B, K].
    Returns:
      dict with P = B * (1 + K) rows (row b*(1+K) is positive b): query_index int32 [P]
      and product_index int32 [P] (rows of the batch), labels float32 [P] (1 positive,
      0 negative), weights float32 [P] (0 for an invalid negative slot).
    """
    with tf.name_scope("pairs"):
        b = tf.shape(neg_indices)[0]
        k = neg_indices.shape[1]
        own = tf.range(b, dtype=tf.int32)[:, tf.newaxis]                     # [B, 1]
        product_idx = tf.reshape(tf.concat([own, neg_indices], 1), [-1])    # [P]
        query_idx = tf.reshape(tf.tile(own, [1, 1 + k]), [-1])              # [P]
        labels = tf.reshape(tf.concat([tf.ones([b, 1]), tf.zeros([b, k])], 1), [-1])  # [P]
        weights = tf.reshape(tf.concat([tf.ones([b, 1]), tf.cast(neg_valid, tf.float32)], 1),
                             [-1])                                           # [P]
    return {"query_index": query_idx, "product_index": product_idx, "labels": labels,
            "weights": weights}


def build_pairs(q_states, num_tokens, q_pooled, p_states, num_boxes, p_pooled, neg_indices,
                neg_valid):
    """pair_indices plus every per-example tensor gathered per pair.

    The matcher can take the per-example states with the indices instead (the round-0
    projections then run once per example, see layers.MultiHeadAttention): prefer that in
    training, where P = B * (1 + K) gathered [P, T, D] and [P, N, D] cost (1 + K) times
    the projections of the examples.

    Args:
      q_states [B, T, D], num_tokens [B], q_pooled [B, E]; p_states [B, N, D],
      num_boxes [B], p_pooled [B, E]; neg_indices int32 [B, K]; neg_valid bool [B, K].
    Returns:
      pair_indices' dict plus q_states [P, T, D], num_tokens [P], q_pooled [P, E],
      p_states [P, N, D], num_boxes [P], p_pooled [P, E].
    """
    pairs = pair_indices(neg_indices, neg_valid)
    query_idx, product_idx = pairs["query_index"], pairs["product_index"]
    with tf.name_scope("pairs"):
        pairs.update({
            "q_states": tf.gather(q_states, query_idx),                      # [P, T, D]
            "num_tokens": tf.gather(num_tokens, query_idx),                  # [P]
            "q_pooled": tf.gather(q_pooled, query_idx),                      # [P, E]
            "p_states": tf.gather(p_states, product_idx),                    # [P, N, D]
            "num_boxes": tf.gather(num_boxes, product_idx),                  # [P]
            "p_pooled": tf.gather(p_pooled, product_idx),                    # [P, E]
        })
    return pairs
