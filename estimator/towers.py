"""The two encoders: a text transformer over query lemmas and a DETR-style box transformer
over detected regions. Both are sized by the estimator.config.Config.

Dimension legend: B batch, T tokens, N boxes, F region-feature width (2048), G geometry
width (6), W word2vec width, V vocabulary, D model width, E pooled embedding width.

Each tower returns per-position states (for cross-attention) and a pooled, L2-normalised
embedding (for the in-batch softmax, hard-negative mining and retrieval serving).
"""
import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import layers


def _learned_embedding(rows, width, name, dtype):
    """An Embedding [rows, width] initialised like BERT's position table (stddev 0.02)."""
    return tf.keras.layers.Embedding(
        rows, width, embeddings_initializer=tf.keras.initializers.TruncatedNormal(stddev=0.02),
        name=name, dtype=dtype)


class _EncoderTower(layers.ConfigLayer):
    """The part both towers share: embedded inputs -> LayerNorm -> dropout -> encoder
    blocks -> pooling (cfg.pooling: attention or masked mean) -> projection -> L2
    normalisation.

    Subclasses name the Config field of their block count in _LAYERS, create their input
    layers in `_build_inputs` and call `_encode(...)` at the end of `call`.
    """

    _LAYERS = ""

    def _build_inputs(self, cfg, dtype):
        """Creates the layers that embed the tower's inputs into [B, L, D]."""
        raise NotImplementedError

    def build(self, input_shape):
        cfg, p = self.cfg, self.dtype_policy
        self._build_inputs(cfg, p)
        self.input_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="input_norm",
                                                             dtype=p)
        self.input_dropout = tf.keras.layers.Dropout(cfg.dropout, name="input_dropout", dtype=p)
        self.blocks = [
            layers.TransformerEncoderBlock(cfg.hidden_size, cfg.num_heads,
                                           cfg.intermediate_size, cfg.dropout,
                                           name=f"encoder_{i}", dtype=p)
            for i in range(getattr(cfg, self._LAYERS))]
        # Mean pooling has no weights: the attention pooling's are absent from its models.
        self.pooling = (layers.AttentionPooling(cfg.hidden_size, name="pooling", dtype=p)
                        if cfg.pooling == "attention" else layers.masked_mean)
        self.pooled_projection = tf.keras.layers.Dense(cfg.pooled_size,
                                                       name="pooled_projection", dtype=p)
        super().build(input_shape)

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
    """Word embedding (word2vec-initialised) + learned positions -> text_layers encoder blocks.

    Sized by cfg: word_embedding_size (W, must be > 0), hidden_size, pooled_size, num_heads,
    intermediate_size, text_layers, max_query_tokens, dropout, trainable_embeddings.

    call(token_ids [B, T] int32, num_tokens [B] int32) -> (states [B, T, D],
    pooled [B, E], diagnostics dict).
    """

    _LAYERS = "text_layers"

    def __init__(self, cfg, vocab_size, embeddings=None, **kwargs):
        """cfg: a resolved Config; vocab_size: V; embeddings: optional float32 [V, W]."""
        super().__init__(cfg, **kwargs)
        self.vocab_size = vocab_size
        self._embeddings = embeddings

    def _build_inputs(self, cfg, p):
        width = cfg.word_embedding_size
        if self._embeddings is not None:
            emb = np.asarray(self._embeddings, np.float32)
            if emb.shape != (self.vocab_size, width):
                raise ValueError(f"embeddings {emb.shape} != ({self.vocab_size}, {width})")
            init = tf.keras.initializers.Constant(emb)
        else:
            # The scale of L2-normalised word2vec rows of width W.
            init = tf.keras.initializers.RandomNormal(stddev=1.0 / np.sqrt(width))
        self.word_embedding = tf.keras.layers.Embedding(
            self.vocab_size, width, embeddings_initializer=init,
            trainable=cfg.trainable_embeddings, name="word_embedding", dtype=p)
        self.word_projection = tf.keras.layers.Dense(cfg.hidden_size, name="word_projection",
                                                     dtype=p)
        self.position_embedding = _learned_embedding(cfg.max_query_tokens, cfg.hidden_size,
                                                     "position_embedding", p)

    @tf.autograph.experimental.do_not_convert
    def call(self, token_ids, num_tokens, training=None):
        # Positions exist up to max_query_tokens only: longer inputs are truncated, as the
        # input_fn and the serving graph do.
        max_tokens = self.cfg.max_query_tokens
        token_ids = token_ids[:, :max_tokens]                                # [B, T]
        num_tokens = tf.minimum(num_tokens, max_tokens)                      # [B]
        t = tf.shape(token_ids)[1]
        mask = layers.sequence_mask(num_tokens, t)                           # [B, T]
        words = self.word_projection(self.word_embedding(token_ids))         # [B, T, D]
        positions = self.position_embedding(tf.range(t))                     # [T, D]
        return self._encode(words + positions[tf.newaxis], mask, training)  # [B, T, D]

    def get_config(self):
        return dict(super().get_config(), vocab_size=self.vocab_size)


class BoxTower(_EncoderTower):
    """DETR-style region encoder.

    Each region's content (a DNN over its 2048-d feature), its metadata (relative geometry
    through an MLP, its class label through an embedding) are summed like DETR adds its
    positional encoding to the content, normalised, and passed through box_layers encoder
    blocks so that regions see each other and their relative positions.

    Sized by cfg: hidden_size, pooled_size, num_heads, intermediate_size, box_layers,
    box_hidden_size, geometry_hidden_size, dropout; cfg.region_features says whether the
    DNN sees log1p or raw features.

    call(box_features [B, N, F], box_geometry [B, N, G], box_labels [B, N] int32,
    num_boxes [B] int32) -> (states [B, N, D], pooled [B, E], diagnostics dict).
    """

    _LAYERS = "box_layers"

    def _build_inputs(self, cfg, p):
        self.feature_hidden = tf.keras.layers.Dense(cfg.box_hidden_size, activation="relu",
                                                    name="feature_hidden", dtype=p)
        self.feature_dropout = tf.keras.layers.Dropout(cfg.dropout, name="feature_dropout",
                                                       dtype=p)
        self.feature_out = tf.keras.layers.Dense(cfg.hidden_size, name="feature_out", dtype=p)
        self.geometry_hidden = tf.keras.layers.Dense(cfg.geometry_hidden_size,
                                                     activation="relu",
                                                     name="geometry_hidden", dtype=p)
        self.geometry_out = tf.keras.layers.Dense(cfg.hidden_size, name="geometry_out",
                                                  dtype=p)
        self.label_embedding = _learned_embedding(schema.NUM_CLASSES, cfg.hidden_size,
                                                  "label_embedding", p)

    @tf.autograph.experimental.do_not_convert
    def call(self, box_features, box_geometry, box_labels, num_boxes, training=None):
        n = tf.shape(box_features)[1]
        mask = layers.sequence_mask(num_boxes, n)                            # [B, N]
        # Region features are non-negative activations up to ~7 with a long tail: log1p
        # tames the tail without losing the many exact zeros ("raw" keeps them as given).
        if self.cfg.region_features == "log1p":
            box_features = tf.math.log1p(tf.maximum(box_features, 0.0))
        content = self.feature_hidden(box_features)                          # [B, N, H]
        content = self.feature_out(self.feature_dropout(content, training=training))  # [B,N,D]
        geometry = self.geometry_out(self.geometry_hidden(box_geometry))    # [B, N, D]
        labels = tf.clip_by_value(box_labels, 0, schema.NUM_CLASSES - 1)
        label_emb = self.label_embedding(labels)                             # [B, N, D]
        return self._encode(content + geometry + label_emb, mask, training)  # [B, N, D]
