"""Training losses, weighted by `Config.loss_weights` (keys of LOSSES).

Each loss takes a `LossInputs` and returns a float32 scalar. Register new losses in LOSSES.

Dimension legend: B rows of the batch, P scored pairs, E pooled width.
"""
import collections
from typing import Callable, Dict

import tensorflow as tf

LossInputs = collections.namedtuple("LossInputs", [
    "pair_logits",    # float32 [P] cross-attention logits of the scored pairs
    "pair_labels",    # float32 [P] 1 positive / 0 negative
    "pair_weights",   # float32 [P] 0 for padded (invalid) pairs
    "q_pooled",       # float32 [B, E] L2-normalised query embeddings, one per batch row
    "p_pooled",       # float32 [B, E] L2-normalised product embeddings, one per batch row
    "row_labels",     # float32 [B] 1 where row b is a positive pair (all rows in training)
    "query_key",      # int64 [B]
    "product_id",     # int64 [B]
    "temperature",    # python float
    "pair_groups",    # int32 [P] the list a pair is ranked in: its positive's row (training)
                      # or its query (eval); None where no loss needs it
    "focal_gamma",    # python float, the focal loss's focusing exponent
    "instance_classes",  # python int C, hashed product classes of the "instance" loss
    "instance_sampled",  # python int, classes sampled per step by the "instance" loss
], defaults=(None, 2.0, 65536, 2048))


def log_loss(x: LossInputs):
    """Sigmoid cross-entropy on the cross logits, weighted mean over valid pairs."""
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=x.pair_labels, logits=x.pair_logits)
    w = x.pair_weights
    return tf.reduce_sum(ce * w) / tf.maximum(tf.reduce_sum(w), 1.0)


def focal(x: LossInputs):
    """Binary focal loss on the cross logits (Lin et al. 2017, without class weighting):
    (1 - p_t)^gamma * CE, where p_t is the probability given to the pair's true label, so
    pairs the matcher already gets right weigh less; weighted mean over valid pairs.
    gamma = 0 is log_loss."""
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=x.pair_labels, logits=x.pair_logits)
    p_t = tf.exp(-ce)                                                           # [P]
    w = x.pair_weights * tf.pow(1.0 - p_t, x.focal_gamma)
    return tf.reduce_sum(ce * w) / tf.maximum(tf.reduce_sum(x.pair_weights), 1.0)


def in_batch_softmax(x: LossInputs):
    """Contrastive loss of the towers: each positive row's query against all products of the
    batch, target = its own product.

    logits[i, j] = q_i . p_j / temperature. Columns j != i that are also positives of i's
    query (same query_key with row_labels[j] == 1) or the same product are removed from the
    softmax, so duplicates are not pushed apart. Rows that are not positives (eval batches
    with negatives) contribute only as candidates: there they act as hard negatives.
    Mean over positive rows.
    """
    logits = tf.matmul(x.q_pooled, x.p_pooled, transpose_b=True) / x.temperature  # [B, B]
    b = tf.shape(logits)[0]
    eye = tf.eye(b, dtype=tf.bool)
    pos_col = tf.cast(x.row_labels, tf.bool)[tf.newaxis, :]
    same_query = tf.equal(x.query_key[:, tf.newaxis], x.query_key[tf.newaxis, :])
    same_product = tf.equal(x.product_id[:, tf.newaxis], x.product_id[tf.newaxis, :])
    drop = tf.logical_and(tf.logical_not(eye),
                          tf.logical_or(tf.logical_and(same_query, pos_col), same_product))
    logits = tf.where(drop, tf.fill(tf.shape(logits), -1e9), logits)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.range(b), logits=logits)
    w = x.row_labels
    return tf.reduce_sum(ce * w) / tf.maximum(tf.reduce_sum(w), 1.0)


def cross_softmax(x: LossInputs):
    """Listwise loss of the matcher: each positive pair's cross logit against the negatives
    of its list (the K negatives chosen for it in training; its query's other candidates in
    eval), -log(e^pos / (e^pos + sum_neg e^neg)) = softplus(logsumexp(neg) - pos). Other
    positives of the list are left out of the denominator; a list without valid negatives
    adds 0. Mean over positive pairs.
    """
    if x.pair_groups is None:
        raise ValueError("cross_softmax needs LossInputs.pair_groups")
    logits, groups = x.pair_logits, x.pair_groups
    num_groups = tf.shape(logits)[0]  # group ids are < P
    is_neg = tf.logical_and(x.pair_labels < 0.5, x.pair_weights > 0)
    neg_logits = tf.where(is_neg, logits, tf.fill(tf.shape(logits), -1e9))
    peak = tf.math.unsorted_segment_max(neg_logits, groups, num_groups)       # [G]
    peak = tf.stop_gradient(tf.maximum(peak, -1e9))  # empty groups: lowest float -> -1e9
    total = tf.math.unsorted_segment_sum(
        tf.where(is_neg, tf.exp(logits - tf.gather(peak, groups)), tf.zeros_like(logits)),
        groups, num_groups)                                                    # [G]
    neg_lse = tf.where(total > 0, peak + tf.math.log(tf.maximum(total, 1e-30)),
                       tf.fill(tf.shape(total), -1e9))                         # [G]
    ce = tf.nn.softplus(tf.gather(neg_lse, groups) - logits)                  # [P]
    w = x.pair_labels * x.pair_weights
    return tf.reduce_sum(ce * w) / tf.maximum(tf.reduce_sum(w), 1.0)


def instance(x: LossInputs):
    """Dual-path instance loss (Zheng et al., "Dual-Path Convolutional Image-Text Embeddings
    with Instance Loss", 2017): every training product is its own class, and BOTH its
    product embedding and its query's embedding are classified into that class by one
    shared classifier, so the two towers meet at per-product prototypes, with negatives
    beyond the batch (the in-batch softmax sees only the batch's products).

    Classes are product_id mod C (C = x.instance_classes: hashing bounds the classifier
    at [C, E] whatever the catalogue's size). The classifier is cosine-based like the
    towers' score, logits = embedding . normalised prototype / temperature, and the softmax
    is sampled: each row is scored against the B prototypes of the batch's products plus
    x.instance_sampled uniformly drawn ones (with a uniform proposal the sampled softmax's
    log-Q correction is one constant and cancels); a candidate holding the row's own class
    other than its target column is masked (duplicates, accidental hits). Only the gathered
    prototypes get gradients: a step costs O(B * (B + sampled) * E), not O(B * C * E).

    Creates the variable "instance_loss/prototypes" [C, E] (trained and checkpointed, not
    exported). Mean over positive rows of the two paths' cross-entropies, averaged.
    """
    e = x.q_pooled.shape[-1]
    with tf.compat.v1.variable_scope("instance_loss", reuse=tf.compat.v1.AUTO_REUSE):
        prototypes = tf.compat.v1.get_variable(
            "prototypes", [x.instance_classes, e], tf.float32,
            initializer=tf.compat.v1.random_normal_initializer(stddev=1.0 / e ** 0.5))
    classes = tf.math.floormod(x.product_id, x.instance_classes)                   # [B]
    sampled = tf.random.uniform([x.instance_sampled], 0, x.instance_classes, tf.int64)
    w = x.row_labels
    paths = [prototype_cross_entropy(emb, classes, prototypes, sampled, x.temperature)
             for emb in (x.q_pooled, x.p_pooled)]                                 # 2 x [B]
    return 0.5 * tf.add_n([tf.reduce_sum(ce * w) for ce in paths]) / tf.maximum(
        tf.reduce_sum(w), 1.0)


def prototype_cross_entropy(embeddings, classes, prototypes, sampled, temperature):
    """Per-row cross-entropy of classifying `embeddings` into `classes` against the batch's
    classes plus `sampled` ones (the instance loss's sampled softmax).

    Args:
      embeddings: float32 [B, E], L2-normalised.
      classes: int64 [B] in [0, C), each row's target class.
      prototypes: float32 [C, E] class vectors (normalised here, after the gather).
      sampled: int64 [S] extra candidate classes.
      temperature: python float; logits are cosines / temperature.
    Returns:
      float32 [B]: -log softmax of row b's own column among the B + S candidates, where
      every other candidate holding class b's value (a duplicate product of the batch, a
      sampled accidental hit) is left out.
    """
    candidates = tf.concat([classes, sampled], 0)                                  # [B+S]
    columns = tf.math.l2_normalize(tf.gather(prototypes, candidates), axis=-1)    # [B+S, E]
    b = tf.shape(classes)[0]
    own = tf.one_hot(tf.range(b), tf.shape(candidates)[0], on_value=True, off_value=False)
    clash = tf.logical_and(tf.equal(classes[:, tf.newaxis], candidates[tf.newaxis, :]),
                           tf.logical_not(own))                                     # [B, B+S]
    logits = tf.matmul(embeddings, columns, transpose_b=True) / temperature       # [B, B+S]
    logits = tf.where(clash, tf.fill(tf.shape(logits), -1e9), logits)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.range(b), logits=logits)


LOSSES: Dict[str, Callable[[LossInputs], tf.Tensor]] = {
    "log_loss": log_loss,
    "softmax": in_batch_softmax,
    "cross_softmax": cross_softmax,
    "focal": focal,
    "instance": instance,
}
# The losses that read LossInputs.pair_logits (the matcher's): without one of them and with
# the tower score served, the model needs no matcher (Config.uses_matcher).
CROSS_LOSSES = frozenset({"log_loss", "cross_softmax", "focal"})


def weighted_losses(weights: Dict[str, float], inputs: LossInputs):
    """Returns (total scalar, {name: scalar}) over the losses with weight > 0."""
    with tf.name_scope("losses"):
        parts = {name: LOSSES[name](inputs) for name, w in sorted(weights.items()) if w > 0}
        total = tf.add_n([weights[name] * value for name, value in parts.items()])
    return total, parts
