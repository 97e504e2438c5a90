"""The two encoders: a text transformer over query lemmas and a DETR-style box transformer
over detected regions.

Dimension legend: B batch, T tokens, N boxes, F region-feature width (2048), G geometry
width (6), W word2vec width, D model width, E pooled embedding width.

Each tower returns per-position states (for cross-attention) and a pooled, L2-normalised
embedding (for the in-batch softmax, hard-negative mining and retrieval serving).
"""
import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import layers


class _EncoderTower(tf.keras.layers.Layer):
    """The part both towers share: embedded inputs -> LayerNorm -> dropout -> N encoder
    blocks -> attention pooling -> projection -> L2 normalisation.

    Subclasses set hidden_size, pooled_size, num_heads, intermediate_size, num_layers and
    dropout, call `_build_encoder()` in `build` and `_encode(...)` at the end of `call`.
    """

    def _build_encoder(self):
        p = self.dtype_policy
        self.input_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="input_norm",
                                                             dtype=p)
        self.input_dropout = tf.keras.layers.Dropout(self.dropout, name="input_dropout", dtype=p)
        self.blocks = [
            layers.TransformerEncoderBlock(self.hidden_size, self.num_heads,
                                           self.intermediate_size, self.dropout,
                                           name=f"encoder_{i}", dtype=p)
            for i in range(self.num_layers)]
        self.pooling = layers.AttentionPooling(self.hidden_size, name="pooling", dtype=p)
        self.pooled_projection = tf.keras.layers.Dense(self.pooled_size,
                                                       name="pooled_projection", dtype=p)

    def _encode(self, x, mask, training):
        """x [B, L, D] summed input embeddings, mask [B, L] -> (states [B, L, D],
        pooled [B, E] float32 unit vectors, {"self_attention_entropy": [per block]})."""
        x = self.input_dropout(self.input_norm(x), training=training)
        entropies = []
        for block in self.blocks:
            x, probs = block(x, mask, training=training)                     # [B, L, D]
            entropies.append(layers.attention_entropy(probs, mask))
        pooled = self.pooled_projection(self.pooling(x, mask))               # [B, E]
        pooled = tf.math.l2_normalize(tf.cast(pooled, tf.float32), -1)
        return x, pooled, {"self_attention_entropy": entropies}


class TextTower(_EncoderTower):
    """Word embedding (word2vec-initialised) + learned positions -> N encoder blocks.

    call(token_ids [B, T] int32, num_tokens [B] int32) -> (states [B, T, D],
    pooled [B, E], diagnostics dict).
    """

    def __init__(self, vocab_size, word_embedding_size, hidden_size, pooled_size, num_heads,
                 intermediate_size, num_layers, max_tokens, dropout=0.0,
                 trainable_embeddings=True, embeddings=None, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.word_embedding_size = word_embedding_size
        self.hidden_size = hidden_size
        self.pooled_size = pooled_size
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.num_layers = num_layers
        self.max_tokens = max_tokens
        self.dropout = dropout
        self.trainable_embeddings = trainable_embeddings
        self._embeddings = embeddings

    def build(self, input_shape):
        if self._embeddings is not None:
            emb = np.asarray(self._embeddings, np.float32)
            if emb.shape != (self.vocab_size, self.word_embedding_size):
                raise ValueError(f"embeddings {emb.shape} != "
                                 f"({self.vocab_size}, {self.word_embedding_size})")
            init = tf.keras.initializers.Constant(emb)
        else:
            # The scale of L2-normalised word2vec rows of width W.
            init = tf.keras.initializers.RandomNormal(
                stddev=1.0 / np.sqrt(self.word_embedding_size))
        p = self.dtype_policy
        self.word_embedding = tf.keras.layers.Embedding(
            self.vocab_size, self.word_embedding_size, embeddings_initializer=init,
            trainable=self.trainable_embeddings, name="word_embedding", dtype=p)
        self.word_projection = tf.keras.layers.Dense(self.hidden_size, name="word_projection",
                                                     dtype=p)
        self.position_embedding = tf.keras.layers.Embedding(
            self.max_tokens, self.hidden_size,
            embeddings_initializer=tf.keras.initializers.TruncatedNormal(stddev=0.02),
            name="position_embedding", dtype=p)
        self._build_encoder()
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, token_ids, num_tokens, training=None):
        # Positions exist up to max_tokens only: longer inputs are truncated, as the
        # input_fn and the serving graph do.
        token_ids = token_ids[:, :self.max_tokens]                           # [B, T]
        num_tokens = tf.minimum(num_tokens, self.max_tokens)                 # [B]
        t = tf.shape(token_ids)[1]
        mask = layers.sequence_mask(num_tokens, t)                           # [B, T]
        words = self.word_projection(self.word_embedding(token_ids))         # [B, T, D]
        positions = self.position_embedding(tf.range(t))                     # [T, D]
        return self._encode(words + positions[tf.newaxis], mask, training)  # [B, T, D]

    def get_config(self):
        return dict(super().get_config(), vocab_size=self.vocab_size,
                    word_embedding_size=self.word_embedding_size,
                    hidden_size=self.hidden_size, pooled_size=self.pooled_size,
                    num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                    num_layers=self.num_layers, max_tokens=self.max_tokens,
                    dropout=self.dropout, trainable_embeddings=self.trainable_embeddings)


class BoxTower(_EncoderTower):
    """DETR-style region encoder.

    Each region's content (a DNN over its 2048-d feature), its metadata (relative geometry
    through an MLP, its class label through an embedding) are summed like DETR adds its
    positional encoding to the content, normalised, and passed through N encoder blocks so
    that regions see each other and their relative positions.

    call(box_features [B, N, F], box_geometry [B, N, G], box_labels [B, N] int32,
    num_boxes [B] int32) -> (states [B, N, D], pooled [B, E], diagnostics dict).
    """

    def __init__(self, hidden_size, pooled_size, num_heads, intermediate_size, num_layers,
                 box_hidden_size, geometry_hidden_size, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.pooled_size = pooled_size
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.num_layers = num_layers
        self.box_hidden_size = box_hidden_size
        self.geometry_hidden_size = geometry_hidden_size
        self.dropout = dropout

    def build(self, input_shape):
        p = self.dtype_policy
        self.feature_hidden = tf.keras.layers.Dense(self.box_hidden_size, activation="relu",
                                                    name="feature_hidden", dtype=p)
        self.feature_dropout = tf.keras.layers.Dropout(self.dropout, name="feature_dropout",
                                                       dtype=p)
        self.feature_out = tf.keras.layers.Dense(self.hidden_size, name="feature_out", dtype=p)
        self.geometry_hidden = tf.keras.layers.Dense(self.geometry_hidden_size,
                                                     activation="relu",
                                                     name="geometry_hidden", dtype=p)
        self.geometry_out = tf.keras.layers.Dense(self.hidden_size, name="geometry_out",
                                                  dtype=p)
        self.label_embedding = tf.keras.layers.Embedding(
            schema.NUM_CLASSES, self.hidden_size,
            embeddings_initializer=tf.keras.initializers.TruncatedNormal(stddev=0.02),
            name="label_embedding", dtype=p)
        self._build_encoder()
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, box_features, box_geometry, box_labels, num_boxes, training=None):
        n = tf.shape(box_features)[1]
        mask = layers.sequence_mask(num_boxes, n)                            # [B, N]
        # Region features are non-negative activations up to ~7 with a long tail: log1p
        # tames the tail without losing the many exact zeros.
        content = self.feature_hidden(tf.math.log1p(tf.maximum(box_features, 0.0)))
        content = self.feature_out(self.feature_dropout(content, training=training))  # [B,N,D]
        geometry = self.geometry_out(self.geometry_hidden(box_geometry))    # [B, N, D]
        labels = tf.clip_by_value(box_labels, 0, schema.NUM_CLASSES - 1)
        label_emb = self.label_embedding(labels)                             # [B, N, D]
        return self._encode(content + geometry + label_emb, mask, training)  # [B, N, D]

    def get_config(self):
        return dict(super().get_config(), hidden_size=self.hidden_size,
                    pooled_size=self.pooled_size, num_heads=self.num_heads,
                    intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                    box_hidden_size=self.box_hidden_size,
                    geometry_hidden_size=self.geometry_hidden_size, dropout=self.dropout)
