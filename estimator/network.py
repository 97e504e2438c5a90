"""The Ranker: text tower, box tower and the CAMP matcher, with a stable public API.

The export builds the Ranker in a fresh graph and restores it from the Estimator's
checkpoints, so this module's API is a contract:

    ranker = build_ranker(cfg, vocab_size, embeddings=None)
    q_states, q_pooled = ranker.encode_query(token_ids, num_tokens, training=False)
    p_states, p_pooled = ranker.encode_product(box_features, box_geometry, box_labels,
                                               num_boxes, training=False)
    out = ranker.score_pairs(q_states, num_tokens, q_pooled,
                             p_states, num_boxes, p_pooled, training=False)
    out[outputs.SCORE], out[outputs.CROSS_LOGIT], out[outputs.TOWER_SCORE]  # float32 [B]

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
G 6, W word2vec width, V vocabulary, D model width, E pooled width.
"""
import contextlib
import dataclasses
import random
from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import layers, outputs, towers
from estimator.config import Config

SCOPE = "ranker"
# The [B] diagnostics of CampMatcher.call (score_pairs' outputs beside the scores).
MATCHER_DIAGNOSTICS = ("text_gate", "box_gate", "word_to_region_entropy",
                       "region_to_word_entropy")


class CampMatcher(layers.ConfigLayer):
    """CAMP-style matching of a (query, product) pair.

    Rounds of: words attend to regions and regions attend to words (cross-attention in both
    directions, computed from the same inputs), each modality fused with what it attended to
    by an adaptive gate. Then attention pooling per modality and an MLP over
    [v_q, v_p, v_q * v_p, |v_q - v_p|] -> one logit.

    Sized by cfg: hidden_size, num_heads, intermediate_size, cross_layers (rounds),
    matcher_hidden_size (H of the MLP), dropout.

    call(q_states [B, T, D], q_mask [B, T], p_states [B, N, D], p_mask [B, N]) ->
    (logit [B], diagnostics dict of [B] tensors).
    With q_index and p_index (int32 [P]) the pairs are (q_states[q_index[p]],
    p_states[p_index[p]]): states and masks hold one row per example, the first round's
    projections run once per example, and the outputs have P rows. After a call, `last_word_to_region` holds
    that call's word-to-region attention probabilities, float32 [B, T, N], averaged over
    rounds and heads (each real word's row sums to 1 over the real boxes).
    """

    def build(self, input_shape):
        cfg, p = self.cfg, self.dtype_policy
        rounds = range(cfg.cross_layers)
        args = (cfg.hidden_size, cfg.num_heads, cfg.dropout)
        self.word_to_region = [layers.CrossAttention(*args, name=f"word_to_region_{i}", dtype=p)
                               for i in rounds]
        self.region_to_word = [layers.CrossAttention(*args, name=f"region_to_word_{i}", dtype=p)
                               for i in rounds]
        fargs = (cfg.hidden_size, cfg.intermediate_size, cfg.dropout)
        self.text_fusion = [layers.GatedFusion(*fargs, name=f"text_fusion_{i}", dtype=p)
                            for i in rounds]
        self.box_fusion = [layers.GatedFusion(*fargs, name=f"box_fusion_{i}", dtype=p)
                           for i in rounds]
        self.text_pooling = layers.AttentionPooling(cfg.hidden_size, name="text_pooling",
                                                    dtype=p)
        self.box_pooling = layers.AttentionPooling(cfg.hidden_size, name="box_pooling",
                                                   dtype=p)
        self.mlp_hidden = tf.keras.layers.Dense(cfg.matcher_hidden_size, activation="gelu",
                                                name="mlp_hidden", dtype=p)
        self.mlp_dropout = tf.keras.layers.Dropout(cfg.dropout, name="mlp_dropout", dtype=p)
        self.mlp_out = tf.keras.layers.Dense(1, name="mlp_out", dtype=p)
        super().build(input_shape)

    @tf.autograph.experimental.do_not_convert
    def call(self, q_states, q_mask, p_states, p_mask, training=None, q_index=None,
             p_index=None):
        q, p = q_states, tf.cast(p_states, self.compute_dtype)
        q_mask = layers.pair_gather(q_mask, q_index)                          # [P, T]
        p_mask = layers.pair_gather(p_mask, p_index)                          # [P, N]
        gates_q, gates_p, ent_q, ent_p, word_to_region = [], [], [], [], []
        for i in range(self.cfg.cross_layers):
            q_att, q_probs = self.word_to_region[i](q, p, p_mask, training=training,
                                                    x_index=q_index,
                                                    context_index=p_index)   # [P, T, D]
            p_att, p_probs = self.region_to_word[i](p, q, q_mask, training=training,
                                                    x_index=p_index,
                                                    context_index=q_index)   # [P, N, D]
            word_to_region.append(q_probs)                                   # [B, H, T, N]
            q, q_gate = self.text_fusion[i](q, q_att, training=training, x_index=q_index)
            p, p_gate = self.box_fusion[i](p, p_att, training=training, x_index=p_index)
            q_index = p_index = None  # after the first round the states are per pair
            gates_q.append(_masked_mean(q_gate, q_mask))
            gates_p.append(_masked_mean(p_gate, p_mask))
            ent_q.append(layers.attention_entropy(q_probs, q_mask))
            ent_p.append(layers.attention_entropy(p_probs, p_mask))
        v_q = self.text_pooling(q, q_mask)                                   # [B, D]
        v_p = self.box_pooling(p, p_mask)                                    # [B, D]
        joint = tf.concat([v_q, v_p, v_q * v_p, tf.abs(v_q - v_p)], -1)      # [B, 4D]
        hidden = self.mlp_dropout(self.mlp_hidden(joint), training=training)  # [B, H]
        logit = tf.cast(tf.squeeze(self.mlp_out(hidden), -1), tf.float32)    # [B]
        diag = {key: tf.add_n(values) / len(values)                            # [B] each
                for key, values in zip(MATCHER_DIAGNOSTICS, (gates_q, gates_p, ent_q, ent_p))}
        # Only fetched by estimator.probe (pictures); unfetched, the session prunes it.
        self.last_word_to_region = tf.reduce_mean(
            tf.cast(tf.stack(word_to_region, 1), tf.float32), axis=[1, 2])     # [B, T, N]
        return logit, diag


def _masked_mean(x, mask):
    """[B, L, D], [B, L] -> [B]: mean over real positions and channels."""
    return tf.reduce_mean(layers.masked_mean(tf.cast(x, tf.float32), mask), -1)


class Ranker(tf.keras.Model):
    """Text tower + box tower + CAMP matcher. Build it with `build_ranker`.

    The serving score is chosen by cfg.serving_score: "cross" (matcher logit), "tower"
    (cosine of pooled embeddings / temperature) or "sum" (cross + tower_score_weight * tower).
    A towers-only config (Config.uses_matcher False) builds no matcher; score_pairs then
    returns zeros as the cross logit.
    """

    def __init__(self, cfg: Config, vocab_size: int, embeddings=None, dtype=None, name=SCOPE):
        """cfg: a resolved Config (word_embedding_size > 0); vocab_size: V; embeddings:
        optional float32 [V, W] initial word vectors; dtype: a Keras policy or None."""
        super().__init__(name=name, dtype=dtype)
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.text_tower = towers.TextTower(cfg, vocab_size, embeddings, name="text_tower",
                                           dtype=dtype)
        self.box_tower = towers.BoxTower(cfg, name="box_tower", dtype=dtype)
        # A towers-only config (cfg.uses_matcher False) builds no matcher (no matcher variables).
        self.matcher = (CampMatcher(cfg, name="matcher", dtype=dtype) if cfg.uses_matcher
                        else None)
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
                    training=False, q_index=None, p_index=None):
        """Scores row-aligned pairs (row b of the query inputs with row b of the product's).

        Args:
          q_states [B, T, D], num_tokens [B], q_pooled [B, E]: from encode_query.
          p_states [B, N, D], num_boxes [B], p_pooled [B, E]: from encode_product.
          q_index, p_index: optional int32 [P]: score the pairs (query q_index[p], product
            p_index[p]) instead of row b with row b (outputs then have P rows); the
            matcher's first projections then run once per example, not once per pair.
        Returns:
          dict of float32 [B]: outputs.SCORE (the configured serving score),
          outputs.CROSS_LOGIT, outputs.TOWER_SCORE (cosine / temperature), and diagnostics
          MATCHER_DIAGNOSTICS. A towers-only Ranker (no matcher) gives zeros for the cross
          logit and the diagnostics, so its outputs have the same keys.
        """
        cfg = self.cfg
        pair_q_pooled = layers.pair_gather(q_pooled, q_index)                 # [P, E]
        pair_p_pooled = layers.pair_gather(p_pooled, p_index)                 # [P, E]
        tower = tf.reduce_sum(pair_q_pooled * pair_p_pooled, -1) / float(cfg.temperature)
        if self.matcher is None:
            zeros = tf.zeros_like(tower)
            cross, diag = zeros, {key: zeros for key in MATCHER_DIAGNOSTICS}
        else:
            q_mask = layers.sequence_mask(num_tokens, tf.shape(q_states)[1])  # [B, T]
            p_mask = layers.sequence_mask(num_boxes, tf.shape(p_states)[1])   # [B, N]
            cross, diag = self.matcher(q_states, q_mask, p_states, p_mask, training=training,
                                       q_index=q_index, p_index=p_index)
        # cfg.serving_score is one of these three (Config.validate).
        if cfg.serving_score == "cross":
            score = cross
        elif cfg.serving_score == "tower":
            score = tower
        else:
            score = cross + float(cfg.tower_score_weight) * tower
        out = {outputs.SCORE: score, outputs.CROSS_LOGIT: cross, outputs.TOWER_SCORE: tower}
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
        return {"cfg": dataclasses.asdict(self.cfg), "vocab_size": self.vocab_size}

    def variable_map(self) -> Dict[str, tf.Variable]:
        """{checkpoint name (variable op name): variable} for tf.compat.v1.train.Saver."""
        return {_var_name(v): v for v in self.variables}

    def build_variables(self):
        """Creates every variable with a dummy pass under the absolute scope "ranker/".

        Called by build_ranker. The dummy ops are never run in graph mode.
        """
        with tf.name_scope(SCOPE + "/"):
            t = self.cfg.max_query_tokens
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


def build_ranker(cfg: Config, vocab_size: int,
                 embeddings: Optional[np.ndarray] = None) -> Ranker:
    """Builds a Ranker with all variables created (see the module docstring for names).

    Args:
      cfg: a resolved estimator.config.Config (estimator.train.resolve_config sets
        word_embedding_size to the prep's word2vec width W).
      vocab_size: V, rows of the word embedding (len(vocab.tsv)).
      embeddings: optional float32 [V, W] initial word vectors (word2vec.npy); None gives a
        random initialisation, e.g. when restoring from a checkpoint right after. When given
        and cfg.word_embedding_size is 0, W is their width.
    Returns:
      A built Ranker.
    Raises:
      ValueError: cfg.word_embedding_size is 0 and no embeddings are given (an unresolved
        config), or the embeddings are not [V, cfg.word_embedding_size].
    """
    if not cfg.word_embedding_size:
        if embeddings is None:
            raise ValueError("cfg.word_embedding_size is 0: resolve the config against its "
                             "prep directory first (estimator.train.resolve_config)")
        cfg = dataclasses.replace(cfg, word_embedding_size=int(np.shape(embeddings)[1]))
    dtype = tf.keras.mixed_precision.Policy("mixed_float16") if cfg.mixed_precision else None
    ranker = Ranker(cfg, vocab_size, embeddings=embeddings, dtype=dtype)
    ranker.build_variables()
    return ranker
