"""Shapes with odd sizes (batch 13, tokens 7, boxes 5, width 24) and padding invariance."""
import numpy as np
import pytest
import tensorflow as tf

from estimator import layers

B, T, N, D, H = 13, 7, 5, 24, 4


def _x(shape, seed=0):
    return tf.constant(np.random.RandomState(seed).normal(size=shape).astype(np.float32))


def _mask(lengths, width):
    return layers.sequence_mask(tf.constant(lengths), width)


LENGTHS_T = np.random.RandomState(1).randint(1, T + 1, size=B)
LENGTHS_N = np.random.RandomState(2).randint(1, N + 1, size=B)


def test_masked_softmax_zero_outside_mask_and_all_masked_rows():
    probs = layers.masked_softmax(tf.constant([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]),
                                  tf.constant([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])).numpy()
    e = np.exp([1.0, 2.0])
    np.testing.assert_allclose(probs[0], [e[0] / e.sum(), e[1] / e.sum(), 0.0], rtol=1e-6)
    np.testing.assert_array_equal(probs[1], [0.0, 0.0, 0.0])


def test_attention_shapes():
    att = layers.MultiHeadAttention(D, H, name="att")
    out, probs = att(_x([B, T, D]), _x([B, N, 10]), _mask(LENGTHS_N, N))
    assert out.shape == (B, T, D)
    assert probs.shape == (B, H, T, N)
    np.testing.assert_allclose(probs.numpy().sum(-1), 1.0, rtol=1e-5)
    assert layers.attention_entropy(probs, _mask(LENGTHS_T, T)).shape == (B,)


def test_encoder_block_shapes_and_padding_invariance():
    block = layers.TransformerEncoderBlock(D, H, 32, dropout=0.0, name="block")
    x = _x([B, T, D])
    y, probs = block(x, _mask(LENGTHS_T, T))
    assert y.shape == (B, T, D) and probs.shape == (B, H, T, T)
    # Two more padded positions filled with garbage: real positions must not change.
    x_pad = tf.concat([x, 100.0 * _x([B, 2, D], seed=9)], 1)
    y_pad, _ = block(x_pad, _mask(LENGTHS_T, T + 2))
    m = _mask(LENGTHS_T, T).numpy()[..., None]
    np.testing.assert_allclose(y.numpy() * m, y_pad.numpy()[:, :T] * m, atol=1e-5)


def test_cross_attention_fusion_pooling_shapes_and_padding_invariance():
    cross = layers.CrossAttention(D, H, name="cross")
    fusion = layers.GatedFusion(D, 32, name="fusion")
    pool = layers.AttentionPooling(D, name="pool")
    q, ctx = _x([B, T, D]), _x([B, N, D], seed=1)
    att, probs = cross(q, ctx, _mask(LENGTHS_N, N))
    assert att.shape == (B, T, D) and probs.shape == (B, H, T, N)
    fused, gate = fusion(q, att)
    assert fused.shape == (B, T, D) and gate.shape == (B, T, D)
    assert float(tf.reduce_min(gate)) >= 0.0 and float(tf.reduce_max(gate)) <= 1.0
    pooled = pool(fused, _mask(LENGTHS_T, T))
    assert pooled.shape == (B, D)
    # Padded context boxes with garbage do not change what the words attend to.
    ctx_pad = tf.concat([ctx, 50.0 * _x([B, 3, D], seed=5)], 1)
    att_pad, _ = cross(q, ctx_pad, _mask(LENGTHS_N, N + 3))
    np.testing.assert_allclose(att.numpy(), att_pad.numpy(), atol=1e-5)
    # Padded positions of the pooled sequence do not change the pooled vector.
    fused_pad = tf.concat([fused, 50.0 * _x([B, 2, D], seed=6)], 1)
    np.testing.assert_allclose(pooled.numpy(), pool(fused_pad, _mask(LENGTHS_T, T + 2)).numpy(),
                               atol=1e-5)


def test_pooling_of_empty_row_is_zero():
    pool = layers.AttentionPooling(D, name="pool")
    out = pool(_x([2, 3, D]), tf.constant([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(out.numpy()[1], np.zeros(D))


def test_masked_mean_hand_computed_and_padding_ignored():
    x = tf.constant([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]],
                     [[5.0, -1.0], [7.0, 7.0], [9.0, 9.0]]])
    out = layers.masked_mean(x, tf.constant([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])).numpy()
    # Row 0: mean of the first two positions; row 1 has no real position: zeros.
    np.testing.assert_allclose(out, [[2.0, 4.0], [0.0, 0.0]])
    # Odd sizes: equal to the numpy masked mean, whatever the padding holds.
    x, mask = _x([B, T, D]), _mask(LENGTHS_T, T)
    want = [x.numpy()[b, :LENGTHS_T[b]].mean(0) for b in range(B)]
    np.testing.assert_allclose(layers.masked_mean(x, mask).numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [
    layers.MultiHeadAttention(D, H, 0.1), layers.TransformerEncoderBlock(D, H, 32, 0.1),
    layers.CrossAttention(D, H, 0.1), layers.GatedFusion(D, 32, 0.1),
    layers.AttentionPooling(D), layers.FeedForward(D, 32, 0.1)])
def test_get_config_round_trips(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


# Pairs by index: K = 3 partners per example, P = 13 * 4 = 52 pairs.
PAIR_Q = np.repeat(np.arange(B), 4).astype(np.int32)
PAIR_P = np.random.RandomState(3).randint(0, B, size=B * 4).astype(np.int32)


def _values_and_gradients(layer, inputs, run):
    """(outputs, d(sum of outputs * fixed weights) / d(variables and inputs)) of run()."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        outs = run()
        total = tf.add_n([tf.reduce_sum(o * _x(o.shape, seed=7 + i)) for i, o in enumerate(outs)])
    grads = tape.gradient(total, layer.trainable_variables + inputs)
    return [o.numpy() for o in outs], [tf.convert_to_tensor(g).numpy() for g in grads]


def _assert_same(got, want):
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cross_attention_with_pair_indices_equals_gathering_first():
    cross = layers.CrossAttention(D, H, name="cross")
    q, ctx = _x([B, T, D]), _x([B, N, D], seed=1)
    mask = tf.gather(_mask(LENGTHS_N, N), PAIR_P)                          # [P, N]
    cross(q, ctx, _mask(LENGTHS_N, N))                                       # builds
    want = _values_and_gradients(cross, [q, ctx], lambda: cross(
        tf.gather(q, PAIR_Q), tf.gather(ctx, PAIR_P), mask))
    got = _values_and_gradients(cross, [q, ctx], lambda: cross(
        q, ctx, mask, x_index=PAIR_Q, context_index=PAIR_P))
    assert got[0][0].shape == (B * 4, T, D) and got[0][1].shape == (B * 4, H, T, N)
    _assert_same(got[0] + got[1], want[0] + want[1])
    # The index path must not be a gather-first in disguise of the wrong rows.
    wrong = cross(q, ctx, mask, x_index=PAIR_P, context_index=PAIR_Q)[0].numpy()
    assert np.abs(wrong - want[0][0]).max() > 1e-3


def test_gated_fusion_with_pair_index_equals_gathering_first_and_the_concat_form():
    fusion = layers.GatedFusion(D, 32, name="fusion")
    x, attended = _x([B, T, D]), _x([B * 4, T, D], seed=2)
    fusion(tf.gather(x, PAIR_Q), attended)                                   # builds
    xg = tf.gather(x, PAIR_Q).numpy()
    a = attended.numpy()
    # The gate of the docstring, W applied to the concatenation [x; a; x*a].
    kernel, bias = fusion.gate_dense.kernel.numpy(), fusion.gate_dense.bias.numpy()
    want_gate = 1.0 / (1.0 + np.exp(-(np.concatenate([xg, a, xg * a], -1) @ kernel + bias)))
    want = _values_and_gradients(fusion, [x, attended], lambda: fusion(
        tf.gather(x, PAIR_Q), attended))
    got = _values_and_gradients(fusion, [x, attended], lambda: fusion(
        x, attended, x_index=PAIR_Q))
    np.testing.assert_allclose(got[0][1], want_gate, rtol=1e-5, atol=1e-5)
    _assert_same(got[0] + got[1], want[0] + want[1])
    assert [v.name for v in fusion.trainable_variables].count("fusion/gate/kernel:0") == 1
