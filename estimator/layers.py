"""Attention building blocks: masked attention, transformer encoder block, CAMP
cross-attention, gated fusion and attention pooling.

Dimension legend: B batch, L positions that attend (tokens T or boxes N), S key/value
positions, H heads, D model width, D/H head width.

Masks are float {0, 1} tensors (1 = real position). Every block multiplies attention
probabilities by the key mask after the softmax and renormalises, so a row whose keys are
all padding attends to nothing (zeros) instead of uniformly to the padding; padded positions
therefore never change the outputs at real positions. Softmaxes run in float32 so that the
blocks also work under a mixed_float16 policy.

The `call` methods of this package have no data-dependent Python control flow, so they are
marked `do_not_convert`: AutoGraph conversion of every layer call would make building the
Estimator graph several seconds slower for nothing.
"""
import dataclasses
import math

import tensorflow as tf

from estimator.config import Config

_NEG = -1e9


def masked_softmax(logits, mask, axis=-1):
    """Softmax over `axis` restricted to mask == 1; all-masked rows give zeros.

    Args:
      logits: float [..., S].
      mask: float or bool broadcastable to logits, 1 where allowed.
    Returns:
      float32 probabilities, same shape as logits.
    """
    logits = tf.cast(logits, tf.float32)
    mask = tf.cast(mask, tf.float32)
    probs = tf.nn.softmax(logits + (1.0 - mask) * _NEG, axis=axis) * mask
    return probs / tf.maximum(tf.reduce_sum(probs, axis=axis, keepdims=True), 1e-9)


def attention_entropy(probs, query_mask):
    """Mean entropy (nats) of attention rows at real query positions.

    Args:
      probs: float [B, H, L, S] attention probabilities.
      query_mask: float [B, L].
    Returns:
      float32 [B]: per-example mean over heads and real query positions.
    """
    ent = -tf.reduce_sum(probs * tf.math.log(probs + 1e-9), axis=-1)     # [B, H, L]
    ent = tf.reduce_mean(ent, axis=1)                                      # [B, L]
    query_mask = tf.cast(query_mask, tf.float32)
    return tf.reduce_sum(ent * query_mask, -1) / tf.maximum(tf.reduce_sum(query_mask, -1), 1.0)


def masked_mean(x, mask):
    """Mean over the real positions.

    Args:
      x: float [B, L, D].
      mask: float or bool [B, L], 1 at real positions.
    Returns:
      [B, D] in x's dtype; zeros for a row without real positions.
    """
    mask = tf.cast(mask, x.dtype)[:, :, tf.newaxis]                          # [B, L, 1]
    count = tf.maximum(tf.reduce_sum(mask, 1), tf.cast(1.0, x.dtype))       # [B, 1]
    return tf.reduce_sum(x * mask, 1) / count                                # [B, D]


class _SizedLayer(tf.keras.layers.Layer):
    """Base of this module's layers: get_config returns the attributes named in _SIZES."""

    _SIZES = ()

    def get_config(self):
        return dict(super().get_config(), **{name: getattr(self, name) for name in self._SIZES})


class _AttentionSized(_SizedLayer):
    """Base of the attention layers: sized by width D, heads H and dropout."""

    _SIZES = ("hidden_size", "num_heads", "dropout")

    def __init__(self, hidden_size, num_heads, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} % num_heads {num_heads} != 0")
        self.hidden_size, self.num_heads, self.dropout = hidden_size, num_heads, dropout


class _FeedForwardSized(_SizedLayer):
    """Base of the feed-forward layers: sized by width D, inner width and dropout."""

    _SIZES = ("hidden_size", "intermediate_size", "dropout")

    def __init__(self, hidden_size, intermediate_size, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.dropout = dropout


class MultiHeadAttention(_AttentionSized):
    """Scaled dot-product multi-head attention with a key mask.

    call(query [B, L, D], value [B, S, Dv], key_mask [B, S]) -> (output [B, L, D],
    probs [B, H, L, S]).

    Pairs by index: with query_index / value_index (int32 [P]) the rows attended are the
    pairs (query[query_index[p]], value[value_index[p]]), key_mask is per pair [P, S] and
    the outputs have P rows. query and value then hold one row per example: their
    projections run once per example and are gathered per pair (pair_gather), the same
    result as gathering the inputs first at a fraction of the cost.
    """

    def build(self, input_shape):
        d = self.hidden_size
        self.query_dense = tf.keras.layers.Dense(d, name="query", dtype=self.dtype_policy)
        self.key_dense = tf.keras.layers.Dense(d, name="key", dtype=self.dtype_policy)
        self.value_dense = tf.keras.layers.Dense(d, name="value", dtype=self.dtype_policy)
        self.output_dense = tf.keras.layers.Dense(d, name="output", dtype=self.dtype_policy)
        self.prob_dropout = tf.keras.layers.Dropout(self.dropout, name="prob_dropout",
                                                    dtype=self.dtype_policy)
        super().build(input_shape)

    def _split_heads(self, x):
        # [B, L, D] -> [B, H, L, D/H]
        b, l = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.reshape(x, [b, l, self.num_heads, self.hidden_size // self.num_heads])
        return tf.transpose(x, [0, 2, 1, 3])

    @tf.autograph.experimental.do_not_convert
    def call(self, query, value, key_mask, training=None, query_index=None, value_index=None):
        # Keras autocasts only the first argument under a mixed policy.
        value = tf.cast(value, self.compute_dtype)
        q = self._split_heads(pair_gather(self.query_dense(query), query_index))  # [B,H,L,D/H]
        k = self._split_heads(pair_gather(self.key_dense(value), value_index))    # [B,H,S,D/H]
        v = self._split_heads(pair_gather(self.value_dense(value), value_index))  # [B,H,S,D/H]
        logits = tf.matmul(q, k, transpose_b=True)                           # [B, H, L, S]
        logits *= 1.0 / math.sqrt(self.hidden_size // self.num_heads)
        probs = masked_softmax(logits, key_mask[:, tf.newaxis, tf.newaxis, :])  # [B, H, L, S]
        dropped = self.prob_dropout(probs, training=training)
        ctx = tf.matmul(tf.cast(dropped, v.dtype), v)                        # [B, H, L, D/H]
        ctx = tf.transpose(ctx, [0, 2, 1, 3])                                # [B, L, H, D/H]
        ctx = tf.reshape(ctx, [tf.shape(ctx)[0], tf.shape(ctx)[1], self.hidden_size])
        return self.output_dense(ctx), probs                                 # [B, L, D]


class FeedForward(_FeedForwardSized):
    """Dense(intermediate, gelu) -> Dense(hidden) with dropout: [B, L, D] -> [B, L, D]."""

    def build(self, input_shape):
        self.inner = tf.keras.layers.Dense(self.intermediate_size, activation="gelu",
                                           name="inner", dtype=self.dtype_policy)
        self.outer = tf.keras.layers.Dense(self.hidden_size, name="outer",
                                           dtype=self.dtype_policy)
        self.drop = tf.keras.layers.Dropout(self.dropout, name="dropout", dtype=self.dtype_policy)
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, x, training=None):
        return self.drop(self.outer(self.inner(x)), training=training)


class TransformerEncoderBlock(_AttentionSized):
    """Post-LN transformer encoder block (BERT layout) with a padding mask.

    call(x [B, L, D], mask [B, L]) -> (y [B, L, D], probs [B, H, L, L]).
    """

    _SIZES = _AttentionSized._SIZES + ("intermediate_size",)

    def __init__(self, hidden_size, num_heads, intermediate_size, dropout=0.0, **kwargs):
        super().__init__(hidden_size, num_heads, dropout, **kwargs)
        self.intermediate_size = intermediate_size

    def build(self, input_shape):
        self.attention = MultiHeadAttention(self.hidden_size, self.num_heads, self.dropout,
                                            name="self_attention", dtype=self.dtype_policy)
        self.attention_dropout = tf.keras.layers.Dropout(
            self.dropout, name="attention_dropout", dtype=self.dtype_policy)
        self.attention_norm = tf.keras.layers.LayerNormalization(
            epsilon=1e-6, name="attention_norm", dtype=self.dtype_policy)
        self.ffn = FeedForward(self.hidden_size, self.intermediate_size, self.dropout,
                               name="ffn", dtype=self.dtype_policy)
        self.ffn_norm = tf.keras.layers.LayerNormalization(
            epsilon=1e-6, name="ffn_norm", dtype=self.dtype_policy)
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, x, mask, training=None):
        attended, probs = self.attention(x, x, mask, training=training)     # [B, L, D]
        x = self.attention_norm(x + self.attention_dropout(attended, training=training))
        x = self.ffn_norm(x + self.ffn(x, training=training))                # [B, L, D]
        return x, probs


class CrossAttention(_AttentionSized):
    """One direction of CAMP cross-attention: each position of `x` attends to `context`.

    call(x [B, L, D], context [B, S, D], context_mask [B, S]) -> (attended [B, L, D],
    probs [B, H, L, S]). `attended` is what x "sees" of the other modality; the gated
    fusion decides how much of it to let in. x_index / context_index: pairs by index, as
    MultiHeadAttention's query_index / value_index (context_mask is then per pair).
    """

    def build(self, input_shape):
        self.attention = MultiHeadAttention(self.hidden_size, self.num_heads, self.dropout,
                                            name="attention", dtype=self.dtype_policy)
        self.drop = tf.keras.layers.Dropout(self.dropout, name="dropout", dtype=self.dtype_policy)
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, x, context, context_mask, training=None, x_index=None, context_index=None):
        attended, probs = self.attention(x, context, context_mask, training=training,
                                         query_index=x_index, value_index=context_index)
        return self.drop(attended, training=training), probs


class GatedFusion(_FeedForwardSized):
    """CAMP adaptive gating: fuse x with what it attended to in the other modality.

    gate = sigmoid(W [x; a; x*a] + b)       # [B, L, D], per position and channel
    y    = LayerNorm(x + gate * FFN(a))     # [B, L, D]

    A gate near 0 keeps x as it was (the other modality carries nothing useful for this
    position); near 1 lets the cross-modal message in. The gate bias starts at 0 (gate 0.5).

    call(x [B, L, D], attended [B, L, D]) -> (y [B, L, D], gate [B, L, D]).
    With x_index (int32 [P]) x holds one row per example and the pairs are
    (x[x_index[p]], attended[p]); outputs have P rows. The gate's x block, W_x x, then runs
    once per example and is gathered per pair (the same sum as the concatenated product,
    with a third fewer per-pair multiplications).
    """

    def build(self, input_shape):
        self.gate_dense = tf.keras.layers.Dense(self.hidden_size, name="gate",
                                                dtype=self.dtype_policy)
        self.message = FeedForward(self.hidden_size, self.intermediate_size, self.dropout,
                                   name="message", dtype=self.dtype_policy)
        self.norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="norm",
                                                       dtype=self.dtype_policy)
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, x, attended, training=None, x_index=None):
        attended = tf.cast(attended, self.compute_dtype)
        if x_index is None:
            gate = tf.sigmoid(self.gate_dense(tf.concat([x, attended, x * attended], -1)))
        else:
            gate = tf.sigmoid(self._gate_per_example_x(x, attended, x_index))
            x = pair_gather(x, x_index)                                      # [P, L, D]
        y = self.norm(x + gate * self.message(attended, training=training))  # [P, L, D]
        return y, gate

    def _gate_per_example_x(self, x, attended, x_index):
        """Gate logits [P, L, D] = W [x_p; a; x_p * a] + b with W_x x run per example."""
        if not self.gate_dense.built:
            # Built through a call so that its variables get the layer's own name scope.
            self.gate_dense(tf.zeros([1, 3 * self.hidden_size], self.compute_dtype))
        kernel = tf.cast(self.gate_dense.kernel, self.compute_dtype)             # [3D, D]
        w_x, w_a, w_xa = tf.split(kernel, 3, axis=0)                            # [D, D] each
        x_part = pair_gather(tf.tensordot(x, w_x, 1), x_index)                  # [P, L, D]
        x = pair_gather(x, x_index)
        logits = x_part + tf.tensordot(attended, w_a, 1) + tf.tensordot(x * attended, w_xa, 1)
        return tf.nn.bias_add(logits, tf.cast(self.gate_dense.bias, self.compute_dtype))


class AttentionPooling(_SizedLayer):
    """Masked attention pooling: score_l = w^T tanh(W x_l); y = sum_l softmax(score)_l x_l.

    call(x [B, L, D], mask [B, L]) -> y [B, D] (zeros for a row without real positions).
    """

    _SIZES = ("hidden_size",)

    def __init__(self, hidden_size, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size

    def build(self, input_shape):
        self.proj = tf.keras.layers.Dense(self.hidden_size, activation="tanh", name="proj",
                                          dtype=self.dtype_policy)
        self.score = tf.keras.layers.Dense(1, use_bias=False, name="score",
                                           dtype=self.dtype_policy)
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, x, mask, training=None):
        del training
        logits = tf.squeeze(self.score(self.proj(x)), -1)                   # [B, L]
        weights = masked_softmax(logits, mask)                               # [B, L]
        return tf.einsum("bl,bld->bd", tf.cast(weights, x.dtype), x)        # [B, D]


class ConfigLayer(tf.keras.layers.Layer):
    """Base of the layers sized by the whole Config (the towers and the matcher).

    `self.cfg` is the estimator.config.Config; get_config/from_config round-trip it as a
    plain dict.
    """

    def __init__(self, cfg: Config, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg

    def get_config(self):
        return dict(super().get_config(), cfg=dataclasses.asdict(self.cfg))

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["cfg"] = Config.from_dict(config["cfg"])
        return cls(**config)


def pair_gather(x, index):
    """Rows of x [B, ...] for each pair: x[index] [P, ...]; x itself when index is None."""
    if index is None:
        return x
    return tf.gather(x, index, name="pair_gather")


def sequence_mask(lengths, maxlen):
    """float32 [B, L] mask, 1 for the first `lengths[b]` positions."""
    return tf.sequence_mask(lengths, maxlen, dtype=tf.float32)
