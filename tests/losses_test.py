"""Loss values against hand-computed numbers."""
import math

import numpy as np
import pytest
import tensorflow as tf

from estimator import losses


def _inputs(**kw):
    base = dict(pair_logits=tf.zeros([1]), pair_labels=tf.zeros([1]),
                pair_weights=tf.ones([1]), q_pooled=tf.eye(2), p_pooled=tf.eye(2),
                row_labels=tf.ones([2]), query_key=tf.constant([1, 2], tf.int64),
                product_id=tf.constant([10, 20], tf.int64), temperature=1.0)
    base.update(kw)
    return losses.LossInputs(**base)


def test_log_loss_weighted_mean():
    # logits 0 (label 1): log 2 = 0.693147; logit 2 (label 0): log(1 + e^2) = 2.126928;
    # third pair has weight 0 (an invalid negative) and is ignored.
    x = _inputs(pair_logits=tf.constant([0.0, 2.0, 50.0]),
                pair_labels=tf.constant([1.0, 0.0, 0.0]),
                pair_weights=tf.constant([1.0, 1.0, 0.0]))
    expected = (math.log(2) + math.log(1 + math.e ** 2)) / 2
    assert float(losses.log_loss(x)) == pytest.approx(expected, rel=1e-6)


def test_focal_hand_computed():
    # gamma 2. Label 1, logit 0: CE = log 2 = 0.693147, p_t = 0.5, factor 0.25 -> 0.173287.
    # Label 0, logit 2: CE = log(1 + e^2) = 2.126928, p_t = 1 / (1 + e^2) = 0.119203,
    # factor (1 - 0.119203)^2 = 0.775803 -> 1.650079. The weight-0 pair is ignored; the
    # mean is over the valid pairs' weight (2): 0.911683.
    x = _inputs(pair_logits=tf.constant([0.0, 2.0, 50.0]),
                pair_labels=tf.constant([1.0, 0.0, 0.0]),
                pair_weights=tf.constant([1.0, 1.0, 0.0]), focal_gamma=2.0)
    assert float(losses.focal(x)) == pytest.approx(0.911683, rel=1e-5)
    # gamma 0 is the log loss; a confident right answer weighs far less than under it.
    assert float(losses.focal(x._replace(focal_gamma=0.0))) == pytest.approx(
        float(losses.log_loss(x)), rel=1e-6)
    easy = x._replace(pair_logits=tf.constant([4.0, -4.0, 0.0]))
    assert float(losses.focal(easy)) < 1e-3 * float(losses.log_loss(easy))


def test_cross_losses_are_the_ones_reading_pair_logits():
    assert losses.CROSS_LOSSES == {"log_loss", "cross_softmax", "focal"}
    assert losses.CROSS_LOSSES < set(losses.LOSSES) and "softmax" in losses.LOSSES


def test_in_batch_softmax_hand_computed():
    # q = p = identity (2 x 2), temperature 0.5: logits [[2, 0], [0, 2]].
    # CE per row = -log(e^2 / (e^2 + 1)) = log(1 + e^-2) = 0.126928.
    x = _inputs(temperature=0.5)
    assert float(losses.in_batch_softmax(x)) == pytest.approx(math.log(1 + math.exp(-2)),
                                                              rel=1e-6)


def test_in_batch_softmax_ignores_duplicate_positives():
    # Rows 0 and 1 share the query key: each is the other's positive too, so neither column
    # enters the other's softmax and the loss is exactly 0 (one candidate left per row).
    x = _inputs(query_key=tf.constant([5, 5], tf.int64), q_pooled=tf.ones([2, 2]) / 1.4142,
                p_pooled=tf.ones([2, 2]) / 1.4142)
    assert float(losses.in_batch_softmax(x)) == pytest.approx(0.0, abs=1e-6)
    # Same product id in two rows: also removed.
    x = _inputs(product_id=tf.constant([10, 10], tf.int64), q_pooled=tf.ones([2, 2]),
                p_pooled=tf.ones([2, 2]))
    assert float(losses.in_batch_softmax(x)) == pytest.approx(0.0, abs=1e-6)


def test_in_batch_softmax_uses_negative_rows_only_as_candidates():
    # Row 1 is a negative of row 0's query (eval batch): only row 0 is a target; its
    # softmax is over both columns: logits [1, 1] -> log 2.
    x = _inputs(query_key=tf.constant([5, 5], tf.int64), row_labels=tf.constant([1.0, 0.0]),
                q_pooled=tf.constant([[1.0, 0.0], [0.0, 1.0]]),
                p_pooled=tf.constant([[1.0, 0.0], [1.0, 0.0]]))
    assert float(losses.in_batch_softmax(x)) == pytest.approx(math.log(2), rel=1e-6)


def test_weighted_losses_combine_and_skip_zero_weights():
    x = _inputs(pair_logits=tf.constant([0.0]), pair_labels=tf.constant([1.0]), temperature=0.5)
    total, parts = losses.weighted_losses({"log_loss": 2.0, "softmax": 0.0}, x)
    assert set(parts) == {"log_loss"}
    assert float(total) == pytest.approx(2 * math.log(2), rel=1e-6)
    total, parts = losses.weighted_losses({"log_loss": 1.0, "softmax": 3.0}, x)
    assert float(total) == pytest.approx(math.log(2) + 3 * math.log(1 + math.exp(-2)), rel=1e-6)


def test_cross_softmax_hand_computed():
    # List 0: positive logit 1, a valid negative 2 and an invalid one (weight 0) at 50:
    #   softplus(2 - 1) = log(1 + e). List 1: positive 0, negative 0: log 2.
    x = _inputs(pair_logits=tf.constant([1.0, 2.0, 50.0, 0.0, 0.0]),
                pair_labels=tf.constant([1.0, 0.0, 0.0, 1.0, 0.0]),
                pair_weights=tf.constant([1.0, 1.0, 0.0, 1.0, 1.0]),
                pair_groups=tf.constant([0, 0, 0, 1, 1]))
    expected = (math.log(1 + math.e) + math.log(2)) / 2
    assert float(losses.cross_softmax(x)) == pytest.approx(expected, rel=1e-6)


def test_cross_softmax_leaves_other_positives_out_and_empty_lists_add_zero():
    # One list, two positives (0 and 5) and one negative (0): each positive is ranked
    # against the negative only: log 2 and log(1 + e^-5). List 1 has no negative: loss 0.
    x = _inputs(pair_logits=tf.constant([0.0, 5.0, 0.0, -3.0]),
                pair_labels=tf.constant([1.0, 1.0, 0.0, 1.0]),
                pair_weights=tf.ones([4]), pair_groups=tf.constant([0, 0, 0, 1]))
    expected = (math.log(2) + math.log(1 + math.exp(-5)) + 0.0) / 3
    assert float(losses.cross_softmax(x)) == pytest.approx(expected, rel=1e-6)


def test_cross_softmax_is_stable_for_large_logits_and_pushes_the_right_way():
    logits = tf.Variable([1000.0, 1001.0, -1000.0])
    x = dict(pair_labels=tf.constant([1.0, 0.0, 0.0]), pair_weights=tf.ones([3]),
             pair_groups=tf.constant([0, 0, 0]))
    with tf.GradientTape() as tape:
        loss = losses.cross_softmax(_inputs(pair_logits=logits, **x))
    grad = tape.gradient(loss, logits).numpy()
    assert float(loss) == pytest.approx(math.log(1 + math.e), rel=1e-5)
    assert grad[0] < 0 < grad[1] and np.isfinite(grad).all()


def test_cross_softmax_needs_groups():
    with pytest.raises(ValueError, match="pair_groups"):
        losses.cross_softmax(_inputs())


def test_prototype_cross_entropy_hand_computed():
    # Row 0 (class 0) sees columns [class 0 (own), class 1, sampled 1, sampled 2]; row 1
    # (class 1) sees [class 0, own, sampled 1 (its class again: masked), sampled 2].
    prototypes = tf.constant([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # normalised inside
    emb = tf.constant([[1.0, 0.0], [0.6, 0.8]])
    ce = losses.prototype_cross_entropy(emb, tf.constant([0, 1], tf.int64), prototypes,
                                        tf.constant([1, 2], tf.int64), temperature=0.5)
    r = 2 ** -0.5
    row0 = np.array([1.0, 0.0, 0.0, r]) / 0.5
    row1 = np.array([0.6, 0.8, 0.6 * r + 0.8 * r]) / 0.5   # own column at index 1
    expected = [np.log(np.exp(row0).sum()) - row0[0], np.log(np.exp(row1).sum()) - row1[1]]
    np.testing.assert_allclose(ce.numpy(), expected, rtol=1e-5)


def test_instance_loss_trains_prototypes_and_both_towers():
    # Both paths read the shared prototypes: gradients reach q, p and only the gathered
    # prototype rows, and a few steps of SGD lower the loss.
    tf.random.set_seed(3)
    with tf.Graph().as_default():
        q = tf.Variable(np.random.RandomState(0).randn(4, 8).astype(np.float32))
        p = tf.Variable(np.random.RandomState(1).randn(4, 8).astype(np.float32))
        x = _inputs(q_pooled=tf.math.l2_normalize(q, -1), p_pooled=tf.math.l2_normalize(p, -1),
                    row_labels=tf.ones([4]), product_id=tf.constant([5, 6, 7, 8], tf.int64),
                    query_key=tf.constant([1, 2, 3, 4], tf.int64), temperature=0.1,
                    instance_classes=1000, instance_sampled=16)
        loss = losses.instance(x)
        prototypes = [v for v in tf.compat.v1.global_variables() if "prototypes" in v.name]
        assert len(prototypes) == 1 and prototypes[0].shape == (1000, 8)
        grads = tf.gradients(loss, [q, p, prototypes[0]])
        assert isinstance(grads[2], tf.IndexedSlices)  # sparse: gathered rows only
        train = tf.compat.v1.train.GradientDescentOptimizer(0.5).minimize(loss)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            gq, gp = sess.run(grads[:2])
            assert np.abs(gq).sum() > 0 and np.abs(gp).sum() > 0
            first = np.mean([sess.run(loss) for _ in range(5)])
            for _ in range(200):
                sess.run(train)
            last = np.mean([sess.run(loss) for _ in range(5)])
    assert last < 0.5 * first, (first, last)
