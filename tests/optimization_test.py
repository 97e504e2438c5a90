"""The optimiser: learning-rate schedule values, weight-decay variable selection, one step."""
import numpy as np
import pytest
import tensorflow as tf

from estimator import optimization
from mmrecall_testing.model_fixtures import tiny_config


def _lr(cfg, steps):
    return [float(optimization.learning_rate_schedule(cfg, tf.constant(s))) for s in steps]


def test_learning_rate_warmup_then_decay_to_floor():
    cfg = tiny_config(learning_rate=1e-3, warmup_steps=10, train_steps=110, decay="cosine",
                      min_learning_rate_ratio=0.1)
    lr = _lr(cfg, (0, 4, 9, 60, 110, 500))
    # warmup: (step + 1) / 10 of the peak; cosine half way (step 60): 0.1 + 0.9 * 0.5 = 0.55
    np.testing.assert_allclose(lr, [1e-4, 5e-4, 1e-3, 0.55e-3, 1e-4, 1e-4], rtol=1e-5)


@pytest.mark.parametrize("decay, halfway", [("linear", 0.55e-3), ("constant", 1e-3)])
def test_linear_and_constant_decay(decay, halfway):
    cfg = tiny_config(learning_rate=1e-3, warmup_steps=10, train_steps=110, decay=decay,
                      min_learning_rate_ratio=0.1)
    # linear half way (step 60): 1 - 0.9 * 0.5 = 0.55 of the peak; constant stays at it.
    end = 1e-4 if decay == "linear" else 1e-3
    np.testing.assert_allclose(_lr(cfg, (9, 60, 110)), [1e-3, halfway, end], rtol=1e-5)


def test_no_warmup_starts_at_the_peak():
    cfg = tiny_config(learning_rate=2e-3, warmup_steps=0, train_steps=100, decay="cosine",
                      min_learning_rate_ratio=0.0)
    # cosine over 100 steps: step 0 -> 1, step 50 -> 0.5, step 100 -> 0.
    np.testing.assert_allclose(_lr(cfg, (0, 50, 100)), [2e-3, 1e-3, 0.0], atol=1e-9)


def test_decay_variables_skip_biases_layer_norm_and_word_embedding():
    with tf.Graph().as_default():
        names = ["ranker/box_tower/feature_out/kernel", "ranker/box_tower/feature_out/bias",
                 "ranker/text_tower/input_norm/gamma", "ranker/text_tower/input_norm/beta",
                 "ranker/text_tower/word_embedding/embeddings",
                 "ranker/text_tower/position_embedding/embeddings",
                 "ranker/matcher/mlp_out/kernel"]
        variables = [tf.compat.v1.get_variable(n, [2]) for n in names]
        chosen = [v.name[:-2] for v in optimization.decay_variables(variables)]
    assert chosen == ["ranker/box_tower/feature_out/kernel",
                      "ranker/text_tower/position_embedding/embeddings",
                      "ranker/matcher/mlp_out/kernel"]


def test_replica_context_outside_a_strategy():
    assert optimization.replica_context() == (None, 1)


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_train_op_steps_and_decays_only_kernels(optimizer):
    # Zero gradient: Adam moves nothing, so only the decoupled decay changes the values:
    # p <- p - lr * wd * p, with lr at step 0 = 1e-3 * (0 + 1) / 1 (warmup of one step).
    cfg = tiny_config(optimizer=optimizer, weight_decay=0.5, learning_rate=1e-3,
                      warmup_steps=1, clip_norm=1.0)
    with tf.Graph().as_default():
        kernel = tf.compat.v1.get_variable("dense/kernel", initializer=[1.0, 2.0])
        bias = tf.compat.v1.get_variable("dense/bias", initializer=[1.0, 2.0])
        loss = 0.0 * tf.reduce_sum(kernel + bias)
        step = tf.compat.v1.train.get_or_create_global_step()
        train_op = optimization.create_train_op(cfg, loss, step)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(train_op)
            k, b, s = sess.run([kernel, bias, step])
    factor = 1.0 - 1e-3 * 0.5 if optimizer == "adamw" else 1.0
    np.testing.assert_allclose(k, [factor, 2.0 * factor], rtol=1e-6)
    np.testing.assert_allclose(b, [1.0, 2.0], rtol=1e-6)
    assert s == 1
