"""The serving signatures of the mmrecall SavedModel, built in a TF1 graph around a Ranker.

Every signature takes raw request data and runs the same in-graph preprocessing as prep
(export.text_graph, export.product_graph). Inputs are dense tensors only (TF Serving feeds
tensors by name; no ragged inputs). The leading dimension of every input is the batch
dimension, so TF Serving's server-side batching can concatenate requests; variable inner
dimensions (C candidates, N boxes) are padded by the batcher when
`pad_variable_length_inputs: true`, and the padded rows/boxes are either ignored thanks to
the counts (`num_boxes`) or are scored and dropped by the client (candidates).

Signatures (B pairs, Q queries, C candidates per query, N boxes, E pooled width):

  serving_default  query string [B], boxes/features/class_labels string [B] (base64, as in
                   the TSV), num_boxes/image_h/image_w int64 [B]
                   -> score, cross_logit, tower_score float32 [B]
  rank             query string [Q], boxes/features/class_labels string [Q, C],
                   num_boxes/image_h/image_w int64 [Q, C]   -> scores float32 [Q, C]
  embed_query      query string [B] -> embedding float32 [B, E], num_tokens int32 [B]
  embed_product    product fields [B] as serving_default -> embedding float32 [B, E],
                   num_boxes int32 [B] (boxes kept after the cap)
  score_dense      query string [B], features float32 [B, N, 2048], boxes float32 [B, N, 4],
                   class_labels int64 [B, N], num_boxes/image_h/image_w int64 [B]
                   -> score, cross_logit, tower_score float32 [B]
  embed_product_dense  the product fields of score_dense -> embedding, num_boxes
"""
from typing import Dict

import tensorflow as tf

from data_prep import schema
from export import product_graph as pg
from export import text_graph

SERVING_DEFAULT = "serving_default"
RANK = "rank"
EMBED_QUERY = "embed_query"
EMBED_PRODUCT = "embed_product"
SCORE_DENSE = "score_dense"
EMBED_PRODUCT_DENSE = "embed_product_dense"
# Name scope of the model's input tensors (schema.F_* names), e.g. "preprocessed/box_features:0".
PREPROCESSED = "preprocessed"
ALL_SIGNATURES = (SERVING_DEFAULT, RANK, EMBED_QUERY, EMBED_PRODUCT, SCORE_DENSE,
                  EMBED_PRODUCT_DENSE)

QUERY = text_graph.QUERY_FIELD
PRODUCT_B64_FIELDS = (pg.BOXES_FIELD, pg.FEATURES_FIELD, pg.LABELS_FIELD)
PRODUCT_INT_FIELDS = (pg.NUM_BOXES_FIELD, pg.IMAGE_H_FIELD, pg.IMAGE_W_FIELD)

# Output keys.
SCORE = "score"
CROSS_LOGIT = "cross_logit"
TOWER_SCORE = "tower_score"
SCORES = "scores"
EMBEDDING = "embedding"
NUM_TOKENS = "num_tokens"
NUM_BOXES = "num_boxes"


class ServingGraph:
    """Builds the signatures' tensors in the current (TF1) graph.

    Args:
      ranker: an estimator.network.Ranker built in this graph.
      vocab_tokens: the vocabulary, index == id.
      max_tokens: the model's query token cap (Config.max_query_tokens).
      max_boxes: the box cap applied by prep (manifest max_boxes: the largest boxes).
      drop_leading_be: the prep manifest's flag.
      model_max_boxes: Config.max_boxes; the input_fn keeps the first that many of prep's.
    """

    def __init__(self, ranker, vocab_tokens, max_tokens: int, max_boxes: int,
                 drop_leading_be: bool, model_max_boxes: int = 0):
        from data_prep import vocab as vocab_lib

        self.ranker = ranker
        self.max_tokens = int(max_tokens)
        self.max_boxes = int(max_boxes)
        self.model_max_boxes = int(model_max_boxes or 0)
        self.normalizer = text_graph.QueryNormalizer(drop_leading_be)
        self.vocab_table = vocab_lib.lookup_table(list(vocab_tokens))

    # --- building blocks ----------------------------------------------------------------
    def query_inputs(self, queries):
        """Raw queries [B] -> (token_ids int32 [B, T], num_tokens int32 [B]).

        Each distinct query string is normalised once (`rank` repeats its query for every
        candidate, and a client batching pairs repeats it too), then rows are gathered back;
        integer results, so equal to normalising every row.
        """
        unique, row_of = tf.unique(queries)
        token_ids, num_tokens = text_graph.query_token_ids(unique, self.normalizer,
                                                           self.vocab_table, self.max_tokens)
        return tf.gather(token_ids, row_of), tf.gather(num_tokens, row_of)

    def encode_query(self, queries):
        token_ids, num_tokens = self.query_inputs(queries)
        states, pooled = self.ranker.encode_query(token_ids, num_tokens, training=False)
        return states, pooled, num_tokens

    def encode_product(self, products: pg.Products):
        states, pooled = self.ranker.encode_product(
            products.box_features, products.box_geometry, products.box_labels,
            products.num_boxes, training=False)
        return states, pooled

    def dense_products(self, fields: Dict[str, tf.Tensor]) -> pg.Products:
        return pg.process_dense_products(
            fields[pg.BOXES_FIELD], fields[pg.FEATURES_FIELD], fields[pg.LABELS_FIELD],
            fields[pg.NUM_BOXES_FIELD], fields[pg.IMAGE_H_FIELD], fields[pg.IMAGE_W_FIELD],
            self.max_boxes, self.model_max_boxes)

    # --- signatures -----------------------------------------------------------------------
    def build(self) -> Dict[str, "tf.compat.v1.SignatureDef"]:
        """Creates the serving graph and returns the signature_def_map.

        The model is instantiated once. Signatures differ in where they feed it: `rank`
        feeds placeholders [Q, C] that are flattened into row-aligned pairs; the pair
        tensors (`pairs/*`) are the inputs of serving_default, embed_query and
        embed_product; the decoded padded box tensors (`dense/*`) are the inputs of the
        dense variants. A Session (TF Serving) or a pruned function (tf.saved_model.load)
        fed at an intermediate tensor skips everything upstream of it, so each signature
        runs only its own part, and the graph is a third of the size of one model copy
        per signature (which matters for tf.saved_model.load's pruning time).
        """
        ph = tf.compat.v1.placeholder
        info = tf.compat.v1.saved_model.utils.build_tensor_info

        def sig(inputs, outputs):
            return tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
                inputs={k: info(v) for k, v in inputs.items()},
                outputs={k: info(v) for k, v in outputs.items()},
                method_name=tf.saved_model.PREDICT_METHOD_NAME)

        def entry(value, name, shape):
            """A named, shaped identity: the tensor an inner signature is fed at."""
            out = tf.identity(value, name=name)
            out.set_shape(shape)
            return out

        # rank: Q queries x C candidates -> pairs.
        with tf.name_scope(RANK):
            rank_query = ph(tf.string, [None], name=QUERY)
            rank_fields = {f: ph(tf.string, [None, None], name=f) for f in PRODUCT_B64_FIELDS}
            rank_fields.update({f: ph(tf.int64, [None, None], name=f)
                                for f in PRODUCT_INT_FIELDS})
            num_candidates = tf.shape(rank_fields[pg.NUM_BOXES_FIELD])[1]
            check = tf.debugging.assert_equal(
                tf.shape(rank_query)[0], tf.shape(rank_fields[pg.NUM_BOXES_FIELD])[0],
                message="query: one query per row of the candidate fields expected")
            with tf.control_dependencies([check]):
                repeated_query = tf.repeat(rank_query, num_candidates)         # [Q*C]
            flat = {k: tf.reshape(v, [-1]) for k, v in rank_fields.items()}   # [Q*C]

        # Row-aligned pairs: serving_default, embed_query, embed_product feed here.
        with tf.name_scope("pairs"):
            query = entry(repeated_query, QUERY, [None])
            fields = {f: entry(flat[f], f, [None]) for f in PRODUCT_B64_FIELDS + PRODUCT_INT_FIELDS}

        # Decoded, padded boxes: the dense variants feed here.
        with tf.name_scope("decode"):
            decoded = pg.decode_b64_boxes(
                fields[pg.BOXES_FIELD], fields[pg.FEATURES_FIELD], fields[pg.LABELS_FIELD],
                fields[pg.NUM_BOXES_FIELD], fields[pg.IMAGE_H_FIELD], fields[pg.IMAGE_W_FIELD])
        with tf.name_scope("dense"):
            dense = {
                pg.BOXES_FIELD: entry(decoded[0], pg.BOXES_FIELD,
                                      [None, None, schema.BOX_COORDS]),
                pg.FEATURES_FIELD: entry(decoded[1], pg.FEATURES_FIELD,
                                         [None, None, schema.FEATURE_DIM]),
                pg.LABELS_FIELD: entry(decoded[2], pg.LABELS_FIELD, [None, None]),
            }
        dense_inputs = dict(dense, **{f: fields[f] for f in PRODUCT_INT_FIELDS})

        with tf.name_scope("model") as model_scope:
            products = self.dense_products(dense_inputs)
            token_ids, num_tokens = self.query_inputs(query)
        # The model's inputs, named: fetching them measures the preprocessing alone, feeding
        # them the model alone (bench/serving.py), as schema.F_* features.
        with tf.name_scope(PREPROCESSED):
            token_ids = tf.identity(token_ids, name=schema.F_TOKEN_IDS)
            num_tokens = tf.identity(num_tokens, name=schema.F_NUM_TOKENS)
            products = products._replace(
                box_features=tf.identity(products.box_features, name=schema.F_BOX_FEATURES),
                box_geometry=tf.identity(products.box_geometry, name=schema.F_BOX_GEOMETRY),
                box_labels=tf.identity(products.box_labels, name=schema.F_BOX_LABELS),
                num_boxes=tf.identity(products.num_boxes, name=schema.F_NUM_BOXES))
        with tf.name_scope(model_scope):   # re-entered: "model/", not "model_1/"
            q_states, q_pooled = self.ranker.encode_query(token_ids, num_tokens,
                                                          training=False)
            p_states, p_pooled = self.encode_product(products)
            out = self.ranker.score_pairs(q_states, num_tokens, q_pooled, p_states,
                                          products.num_boxes, p_pooled, training=False)
            pair_outputs = {SCORE: tf.identity(out["score"], name=SCORE),
                            CROSS_LOGIT: tf.identity(out["cross_logit"], name=CROSS_LOGIT),
                            TOWER_SCORE: tf.identity(out["tower_score"], name=TOWER_SCORE)}
            scores = tf.reshape(out["score"], [tf.shape(rank_query)[0], num_candidates],
                                name=SCORES)
            q_embedding = tf.identity(q_pooled, name="query_embedding")
            p_embedding = tf.identity(p_pooled, name="product_embedding")
            kept_boxes = tf.identity(products.num_boxes, name="kept_num_boxes")

        pair_inputs = dict(fields, **{QUERY: query})
        return {
            SERVING_DEFAULT: sig(pair_inputs, pair_outputs),
            RANK: sig(dict(rank_fields, **{QUERY: rank_query}), {SCORES: scores}),
            EMBED_QUERY: sig({QUERY: query}, {EMBEDDING: q_embedding, NUM_TOKENS: num_tokens}),
            EMBED_PRODUCT: sig(fields, {EMBEDDING: p_embedding, NUM_BOXES: kept_boxes}),
            SCORE_DENSE: sig(dict(dense_inputs, **{QUERY: query}), pair_outputs),
            EMBED_PRODUCT_DENSE: sig(dense_inputs, {EMBEDDING: p_embedding,
                                                    NUM_BOXES: kept_boxes}),
        }
