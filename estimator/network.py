"""The Ranker: text tower, box tower and the CAMP matcher, with a stable public API.

The export engineer builds the Ranker in a fresh graph and restores it from our Estimator
checkpoints, so this module's API is a contract:

    ranker = build_ranker(cfg, vocab_size, embeddings=None)
    q_states, q_pooled = ranker.encode_query(token_ids, num_tokens, training=False)
    p_states, p_pooled = ranker.encode_product(box_features, box_geometry, box_labels,
                                               num_boxes, training=False)
    out = ranker.score_pairs(q_states, num_tokens, q_pooled,
                             p_states, num_boxes, p_pooled, training=False)
    out["score"], out["cross_logit"], out["tower_score"]   # each float32 [B]

`build_ranker` creates every variable at once, under the absolute name scope "ranker/"
(re-entered, never uniquified), with explicit layer names; names therefore depend only on
the configuration, not on what else the graph holds:
    ranker/text_tower/word_embedding/embeddings, ranker/box_tower/encoder_0/..., ...
`ranker.variable_map()` gives {checkpoint name: variable} for a name-based Saver. The only
requirement on the graph is that nothing else already created ops under "ranker/text_tower",
"ranker/box_tower" or "ranker/matcher" (a "ranker" scope or Keras layers of any name
elsewhere are fine). Restoring into a fresh graph:

    with tf.Graph().as_default():
        ranker = build_ranker(Config.load(model_dir), vocab_size)   # no embeddings needed
        ... ranker.encode_query / encode_product / score_pairs on your inputs ...
        saver = tf.compat.v1.train.Saver(var_list=ranker.variable_map())
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, tf.train.latest_checkpoint(model_dir))

Estimator checkpoints also hold global_step and the Adam slots; the map restores only the
model's variables. Mixed-precision training keeps float32 variables, so the same names and
dtypes restore with or without it.

Dimension legend: B batch (row-aligned pairs in score_pairs), T tokens, N boxes, F 2048,
G 6, D model width, E pooled width.
"""
import contextlib
import random
from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import layers, towers

SCOPE = "ranker"


class CampMatcher(tf.keras.layers.Layer):
    """CAMP-style matching of a (query, product) pair.

    Rounds of: words attend to regions and regions attend to words (cross-attention in both
    directions, computed from the same inputs), each modality fused with what it attended to
    by an adaptive gate. Then attention pooling per modality and an MLP over
    [v_q, v_p, v_q * v_p, |v_q - v_p|] -> one logit.

    call(q_states [B, T, D], q_mask [B, T], p_states [B, N, D], p_mask [B, N]) ->
    (logit [B], diagnostics dict of [B] tensors).
    """

    def __init__(self, hidden_size, num_heads, intermediate_size, num_layers,
                 mlp_hidden_size, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.num_layers = num_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.dropout = dropout

    def build(self, input_shape):
        p = self.dtype_policy
        args = (self.hidden_size, self.num_heads, self.dropout)
        self.word_to_region = [layers.CrossAttention(*args, name=f"word_to_region_{i}", dtype=p)
                               for i in range(self.num_layers)]
        self.region_to_word = [layers.CrossAttention(*args, name=f"region_to_word_{i}", dtype=p)
                               for i in range(self.num_layers)]
        fargs = (self.hidden_size, self.intermediate_size, self.dropout)
        self.text_fusion = [layers.GatedFusion(*fargs, name=f"text_fusion_{i}", dtype=p)
                            for i in range(self.num_layers)]
        self.box_fusion = [layers.GatedFusion(*fargs, name=f"box_fusion_{i}", dtype=p)
                           for i in range(self.num_layers)]
        self.text_pooling = layers.AttentionPooling(self.hidden_size, name="text_pooling",
                                                    dtype=p)
        self.box_pooling = layers.AttentionPooling(self.hidden_size, name="box_pooling",
                                                   dtype=p)
        self.mlp_hidden = tf.keras.layers.Dense(self.mlp_hidden_size, activation="gelu",
                                                name="mlp_hidden", dtype=p)
        self.mlp_dropout = tf.keras.layers.Dropout(self.dropout, name="mlp_dropout", dtype=p)
        self.mlp_out = tf.keras.layers.Dense(1, name="mlp_out", dtype=p)
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, q_states, q_mask, p_states, p_mask, training=None):
        q, p = q_states, tf.cast(p_states, self.compute_dtype)
        gates_q, gates_p, ent_q, ent_p = [], [], [], []
        for i in range(self.num_layers):
            q_att, q_probs = self.word_to_region[i](q, p, p_mask, training=training)  # [B,T,D]
            p_att, p_probs = self.region_to_word[i](p, q, q_mask, training=training)  # [B,N,D]
            q, q_gate = self.text_fusion[i](q, q_att, training=training)     # [B, T, D]
            p, p_gate = self.box_fusion[i](p, p_att, training=training)      # [B, N, D]
            gates_q.append(_masked_mean(q_gate, q_mask))
            gates_p.append(_masked_mean(p_gate, p_mask))
            ent_q.append(layers.attention_entropy(q_probs, q_mask))
            ent_p.append(layers.attention_entropy(p_probs, p_mask))
        v_q = self.text_pooling(q, q_mask)                                   # [B, D]
        v_p = self.box_pooling(p, p_mask)                                    # [B, D]
        joint = tf.concat([v_q, v_p, v_q * v_p, tf.abs(v_q - v_p)], -1)      # [B, 4D]
        hidden = self.mlp_dropout(self.mlp_hidden(joint), training=training)  # [B, H]
        logit = tf.cast(tf.squeeze(self.mlp_out(hidden), -1), tf.float32)    # [B]
        diag = {
            "text_gate": tf.add_n(gates_q) / len(gates_q),
            "box_gate": tf.add_n(gates_p) / len(gates_p),
            "word_to_region_entropy": tf.add_n(ent_q) / len(ent_q),
            "region_to_word_entropy": tf.add_n(ent_p) / len(ent_p),
        }
        return logit, diag

    def get_config(self):
        return dict(super().get_config(), hidden_size=self.hidden_size,
                    num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                    num_layers=self.num_layers, mlp_hidden_size=self.mlp_hidden_size,
                    dropout=self.dropout)


def _masked_mean(x, mask):
    """[B, L, D], [B, L] -> [B]: mean over real positions and channels."""
    mask = tf.cast(mask, tf.float32)
    x = tf.reduce_mean(tf.cast(x, tf.float32), -1)                           # [B, L]
    return tf.reduce_sum(x * mask, -1) / tf.maximum(tf.reduce_sum(mask, -1), 1.0)


class Ranker(tf.keras.Model):
    """Text tower + box tower + CAMP matcher. Build it with `build_ranker`.

    The serving score is chosen by `serving_score`: "cross" (matcher logit), "tower"
    (cosine of pooled embeddings / temperature) or "sum" (cross + w * tower).
    """

    def __init__(self, vocab_size, word_embedding_size, hidden_size=64, pooled_size=64,
                 num_heads=4, intermediate_size=128, text_layers=1, box_layers=1,
                 cross_layers=1, box_hidden_size=256, geometry_hidden_size=32,
                 matcher_hidden_size=64, max_query_tokens=16, dropout=0.1,
                 trainable_embeddings=True, serving_score="sum", tower_score_weight=1.0,
                 temperature=0.1, embeddings=None, dtype=None, name=SCOPE):
        super().__init__(name=name, dtype=dtype)
        self._settings = dict(
            vocab_size=vocab_size, word_embedding_size=word_embedding_size,
            hidden_size=hidden_size, pooled_size=pooled_size, num_heads=num_heads,
            intermediate_size=intermediate_size, text_layers=text_layers,
            box_layers=box_layers, cross_layers=cross_layers, box_hidden_size=box_hidden_size,
            geometry_hidden_size=geometry_hidden_size,
            matcher_hidden_size=matcher_hidden_size, max_query_tokens=max_query_tokens,
            dropout=dropout, trainable_embeddings=trainable_embeddings,
            serving_score=serving_score, tower_score_weight=tower_score_weight,
            temperature=temperature)
        if serving_score not in ("cross", "tower", "sum"):
            raise ValueError(f"serving_score {serving_score!r}")
        self.serving_score = serving_score
        self.tower_score_weight = float(tower_score_weight)
        self.temperature = float(temperature)
        self.text_tower = towers.TextTower(
            vocab_size, word_embedding_size, hidden_size, pooled_size, num_heads,
            intermediate_size, text_layers, max_query_tokens, dropout,
            trainable_embeddings, embeddings, name="text_tower", dtype=dtype)
        self.box_tower = towers.BoxTower(
            hidden_size, pooled_size, num_heads, intermediate_size, box_layers,
            box_hidden_size, geometry_hidden_size, dropout, name="box_tower", dtype=dtype)
        self.matcher = CampMatcher(hidden_size, num_heads, intermediate_size, cross_layers,
                                   matcher_hidden_size, dropout, name="matcher", dtype=dtype)
        # Diagnostics of the latest calls (tensors), for TensorBoard summaries.
        self.last_diagnostics: Dict[str, tf.Tensor] = {}

    # --- public API (contract) ----------------------------------------------------------
    def encode_query(self, token_ids, num_tokens, training=False):
        """token_ids int32 [B, T] (0 = pad), num_tokens int32 [B] ->
        (states [B, T, D], pooled [B, E] L2-normalised float32)."""
        states, pooled, diag = self.text_tower(tf.cast(token_ids, tf.int32),
                                               tf.cast(num_tokens, tf.int32),
                                               training=training)
        for i, e in enumerate(diag["self_attention_entropy"]):
            self.last_diagnostics[f"text_self_attention_entropy_{i}"] = e
        return states, pooled

    def encode_product(self, box_features, box_geometry, box_labels, num_boxes,
                       training=False):
        """box_features float32 [B, N, 2048], box_geometry float32 [B, N, 6], box_labels
        int32 [B, N], num_boxes int32 [B] -> (states [B, N, D], pooled [B, E])."""
        states, pooled, diag = self.box_tower(
            tf.cast(box_features, self.compute_dtype or tf.float32),
            tf.cast(box_geometry, self.compute_dtype or tf.float32),
            tf.cast(box_labels, tf.int32), tf.cast(num_boxes, tf.int32),
            training=training)
        for i, e in enumerate(diag["self_attention_entropy"]):
            self.last_diagnostics[f"box_self_attention_entropy_{i}"] = e
        return states, pooled

    def score_pairs(self, q_states, num_tokens, q_pooled, p_states, num_boxes, p_pooled,
                    training=False):
        """Scores row-aligned pairs (row b of the query inputs with row b of the product's).

        Args:
          q_states [B, T, D], num_tokens [B], q_pooled [B, E]: from encode_query.
          p_states [B, N, D], num_boxes [B], p_pooled [B, E]: from encode_product.
        Returns:
          dict of float32 [B]: "score" (the configured serving score), "cross_logit",
          "tower_score" (cosine / temperature), and diagnostics "text_gate", "box_gate",
          "word_to_region_entropy", "region_to_word_entropy".
        """
        q_mask = layers.sequence_mask(num_tokens, tf.shape(q_states)[1])      # [B, T]
        p_mask = layers.sequence_mask(num_boxes, tf.shape(p_states)[1])       # [B, N]
        cross, diag = self.matcher(q_states, q_mask, p_states, p_mask, training=training)
        tower = tf.reduce_sum(q_pooled * p_pooled, -1) / self.temperature      # [B]
        if self.serving_score == "cross":
            score = cross
        elif self.serving_score == "tower":
            score = tower
        else:
            score = cross + self.tower_score_weight * tower
        out = {"score": score, "cross_logit": cross, "tower_score": tower}
        out.update(diag)
        return out

    @tf.autograph.experimental.do_not_convert
    def call(self, features, training=False):
        """Keras entry point: a schema features dict of row-aligned pairs -> score_pairs."""
        q_states, q_pooled = self.encode_query(features[schema.F_TOKEN_IDS],
                                               features[schema.F_NUM_TOKENS], training)
        p_states, p_pooled = self.encode_product(
            features[schema.F_BOX_FEATURES], features[schema.F_BOX_GEOMETRY],
            features[schema.F_BOX_LABELS], features[schema.F_NUM_BOXES], training)
        return self.score_pairs(q_states, features[schema.F_NUM_TOKENS], q_pooled,
                                p_states, features[schema.F_NUM_BOXES], p_pooled, training)

    def get_config(self):
        return dict(self._settings)

    def variable_map(self) -> Dict[str, tf.Variable]:
        """{checkpoint name (variable op name): variable} for tf.compat.v1.train.Saver."""
        return {_var_name(v): v for v in self.variables}

    def build_variables(self):
        """Creates every variable with a dummy pass under the absolute scope "ranker/".

        Called by build_ranker. The dummy ops are never run in graph mode.
        """
        with tf.name_scope(SCOPE + "/"):
            t = self._settings["max_query_tokens"]
            q_states, q_pooled = self.encode_query(
                tf.zeros([1, t], tf.int32), tf.ones([1], tf.int32))
            p_states, p_pooled = self.encode_product(
                tf.zeros([1, 1, schema.FEATURE_DIM]), tf.zeros([1, 1, schema.GEOMETRY_DIM]),
                tf.zeros([1, 1], tf.int32), tf.ones([1], tf.int32))
            self.score_pairs(q_states, tf.ones([1], tf.int32), q_pooled, p_states,
                             tf.ones([1], tf.int32), p_pooled)
        self.last_diagnostics = {}


@contextlib.contextmanager
def seeded_keras_layers(seed: int):
    """Within this block, Keras initializers and dropout left at seed=None take their seeds
    from a generator seeded with `seed`, so one Config.seed gives one set of initial weights.

    Unseeded, Keras 2.15 draws them from Python's global `random` (the graph-level
    tf_random_seed never reaches them). Keras reads this thread-local generator, the one
    `tf.keras.utils.set_random_seed` sets, when a layer first creates its weights or runs;
    the previous generator is restored on exit and no global state is touched.
    """
    from keras.src import backend as keras_backend

    holder = keras_backend._SEED_GENERATOR
    previous = getattr(holder, "generator", None)
    holder.generator = random.Random(seed)
    try:
        yield
    finally:
        holder.generator = previous


def _var_name(v) -> str:
    name = v.name
    return name[:-2] if name.endswith(":0") else name


def ranker_kwargs(cfg, vocab_size: int) -> dict:
    """Ranker constructor arguments from a Config."""
    return dict(
        vocab_size=vocab_size, word_embedding_size=cfg.word_embedding_size or 64,
        hidden_size=cfg.hidden_size, pooled_size=cfg.pooled_size, num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, text_layers=cfg.text_layers,
        box_layers=cfg.box_layers, cross_layers=cfg.cross_layers,
        box_hidden_size=cfg.box_hidden_size, geometry_hidden_size=cfg.geometry_hidden_size,
        matcher_hidden_size=cfg.matcher_hidden_size, max_query_tokens=cfg.max_query_tokens,
        dropout=cfg.dropout, trainable_embeddings=cfg.trainable_embeddings,
        serving_score=cfg.serving_score, tower_score_weight=cfg.tower_score_weight,
        temperature=cfg.temperature)


def build_ranker(cfg, vocab_size: int, embeddings: Optional[np.ndarray] = None) -> Ranker:
    """Builds a Ranker with all variables created (see the module docstring for names).

    Args:
      cfg: estimator.config.Config (word_embedding_size must be set, or embeddings given).
      vocab_size: V, rows of the word embedding (len(vocab.tsv)).
      embeddings: optional float32 [V, W] initial word vectors (word2vec.npy); None gives a
        random initialisation, e.g. when restoring from a checkpoint right after.
    Returns:
      A built Ranker.
    """
    kwargs = ranker_kwargs(cfg, vocab_size)
    if embeddings is not None:
        kwargs["word_embedding_size"] = int(np.shape(embeddings)[1])
    dtype = tf.keras.mixed_precision.Policy("mixed_float16") if cfg.mixed_precision else None
    ranker = Ranker(embeddings=embeddings, dtype=dtype, **kwargs)
    ranker.build_variables()
    return ranker
