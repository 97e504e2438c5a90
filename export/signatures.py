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
                   num_boxes/image_h/image_w int64 [Q, C]
                   -> scores, first_stage_scores float32 [Q, C]
  embed_query      query string [B] -> embedding float32 [B, E], num_tokens int32 [B]
  embed_product    product fields [B] as serving_default -> embedding float32 [B, E],
                   num_boxes int32 [B] (boxes kept after the cap)
  score_dense      query string [B], features float32 [B, N, 2048], boxes float32 [B, N, 4],
                   class_labels int64 [B, N], num_boxes/image_h/image_w int64 [B]
                   -> score, cross_logit, tower_score float32 [B]
  embed_product_dense  the product fields of score_dense -> embedding, num_boxes

`rank` takes whole candidate lists. Lists shorter than the request's C are padded with
candidates whose num_boxes is 0 (send empty strings for boxes/features/class_labels and 0
for the ints: what TF Serving's batcher pads with); padding never reaches the model, and
gets estimator.list_stage.PADDING_SCORE in both outputs. `first_stage_scores` are the
pointwise model's scores (serving_default's `score`); `scores` are the list-aware scores of
the export's list stage (estimator.list_stage.prf_scores, on the z-score scale) when it has
one, else the first-stage scores.

Every signature checks its inputs' ranks and shapes against each other (check_inputs, with
the *_LAYOUT tables below) before anything reads them: a transposed field, a mismatched C
or B, or a wrong rank is refused with InvalidArgument naming the field and both shapes,
never scored against the wrong candidates. Each part of the graph checks what it reads
(`rank` its [Q, C] lists, the pair part its [B] fields, the query part its query, the
dense part its [B, N, ...] boxes), because a signature is fed at the part it starts from;
a query's count is checked against the products' where the two first meet. The graph's
input tensors have no static shape (the SignatureDefs show the layouts' shapes), so that
the checks hold for every client.
"""
from typing import Dict, Optional

import tensorflow as tf

from data_prep import schema
from data_prep import vocab as vocab_lib
from estimator import list_stage as list_lib
from estimator import outputs
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

# Output keys. The pair outputs are the model's own keys (estimator.outputs.SCORE,
# CROSS_LOGIT, TOWER_SCORE); these are the signatures' other ones.
PAIR_OUTPUTS = (outputs.SCORE, outputs.CROSS_LOGIT, outputs.TOWER_SCORE)
SCORES = "scores"
FIRST_STAGE_SCORES = "first_stage_scores"
EMBEDDING = "embedding"
NUM_TOKENS = "num_tokens"
NUM_BOXES = "num_boxes"


# Input layouts, by signature part: a dimension is a letter (tied across the inputs checked
# together: the first input holding it, num_boxes first, defines it) or a fixed size.
LIST_LAYOUT = dict({pg.NUM_BOXES_FIELD: ("Q", "C"), QUERY: ("Q",)},
                   **{f: ("Q", "C") for f in PRODUCT_B64_FIELDS + PRODUCT_INT_FIELDS})
PAIR_LAYOUT = {f: ("B",) for f in (pg.NUM_BOXES_FIELD,) + PRODUCT_B64_FIELDS + PRODUCT_INT_FIELDS}
DENSE_LAYOUT = dict({f: ("B",) for f in PRODUCT_INT_FIELDS},
                    **{pg.BOXES_FIELD: ("B", "N", schema.BOX_COORDS),
                       pg.FEATURES_FIELD: ("B", "N", schema.FEATURE_DIM),
                       pg.LABELS_FIELD: ("B", "N")})
QUERY_LAYOUT = {QUERY: ("B",)}
JOIN_LAYOUT = {pg.NUM_BOXES_FIELD: ("B",), QUERY: ("B",)}


def check_inputs(inputs: Dict[str, tf.Tensor], layouts: Dict[str, tuple]) -> Dict[str, tf.Tensor]:
    """Checks request inputs' ranks and shapes against each other before anything reads them.

    Each input must have its layout's rank, its fixed sizes, and each lettered dimension
    equal to that of the first input (in `layouts` order) holding the letter; otherwise the
    run fails with InvalidArgument "<field>: ..." followed by the field's shape and the
    shapes it was compared with, e.g. "features: shape (B, N, 2048) expected (B as in
    num_boxes, N as in boxes); shapes of features, num_boxes, boxes: [3 2048 4] [3] [3 4 4]".
    The ranks are checked first (a wrong rank would make the shape comparison itself fail
    with an unnamed error), at run time, and the inputs must have no static shape
    (unshaped placeholders, ServingGraph.build's entries): Grappler's constant folding
    trusts a static rank even where a gRPC or REST client feeds another one, and would fold
    the check away. The rank is Size(Shape(x)): Grappler folds Rank(x) when it can infer
    x's rank through a PlaceholderWithDefault's default, tying the constant by a control
    edge to x's op, which then runs (needing `rank`'s placeholders) even when fed.

    Args:
      inputs: {field: tensor}, a subset of `layouts`' keys (checked in `layouts` order).
      layouts: {field: layout}, e.g. {"num_boxes": ("B",), "boxes": ("B", "N", 4)}.
    Returns:
      {field: the input, given its layout's static shape, that runs only after every
      check}.
    """
    names = [k for k in layouts if k in inputs]

    def text(layout):       # no brackets: rank.field_message reads up to the first "]"
        return "(" + ", ".join(str(d) for d in layout) + ")"

    # int32 shapes: an Assert whose data are all int32 or string is a single op.
    shapes = {k: tf.shape(inputs[k]) for k in names}
    rank_checks = [tf.debugging.Assert(
        tf.equal(tf.size(shapes[k]), len(layouts[k])),
        [f"{k}: rank {len(layouts[k])} expected {text(layouts[k])}, got shape",
         shapes[k]], summarize=8, name=f"{k}_rank") for k in names]
    # Every op of the shape checks (slices of the shapes, comparisons) runs after the rank
    # checks: control edges, not an Identity of each shape.
    with tf.control_dependencies(rank_checks):
        shape_checks = _shape_checks(names, layouts, shapes, text)
    with tf.control_dependencies(rank_checks + shape_checks):
        # Past the checks the layout holds; EnsureShape records it in the graph, so that
        # Grappler's shape inference (and the ops it fuses on known shapes) sees it too.
        return {k: tf.ensure_shape(v, [d if isinstance(d, int) else None for d in layouts[k]])
                for k, v in inputs.items()}


def _shape_checks(names, layouts, shapes, text):
    """check_inputs' shape checks, built after its rank checks: one Assert per input with a
    fixed size or a dimension defined by another input."""
    shape_checks = []
    owner = {}                                       # letter -> (field, axis) defining it
    for k in names:
        expected, refs = [], []
        for axis, dim in enumerate(layouts[k]):
            if isinstance(dim, int):
                expected.append(tf.constant(dim, tf.int32))
                continue
            ref, ref_axis = owner.setdefault(dim, (k, axis))
            expected.append(shapes[ref][ref_axis])
            if ref != k and ref not in refs:
                refs.append(ref)
        if not refs and all(isinstance(d, str) for d in layouts[k]):
            continue                                 # defines all its dimensions: no check
        where = ", ".join(f"{d} as in {owner[d][0]}" for d in layouts[k]
                          if isinstance(d, str) and owner[d][0] != k)
        shape_checks.append(tf.debugging.Assert(
            tf.reduce_all(tf.equal(shapes[k], tf.stack(expected))),
            [f"{k}: shape {text(layouts[k])} expected" + (f" ({where})" if where else "") +
             f"; shapes of {', '.join([k] + refs)}:", shapes[k]] +
            [shapes[r] for r in refs], summarize=8, name=f"{k}_shape"))
    return shape_checks


class ServingGraph:
    """Builds the signatures' tensors in the current (TF1) graph.

    Args:
      ranker: an estimator.network.Ranker built in this graph.
      vocab_tokens: the vocabulary, index == id.
      max_tokens: the model's query token cap (Config.max_query_tokens).
      max_boxes: the box cap: each product keeps its `max_boxes` largest boxes by pixel
        area, in original order. Prep kept the largest `prep.max_boxes` and the input_fn
        the largest `Config.max_boxes` of those, which are the largest min(both) boxes, so
        the export passes that minimum.
      drop_leading_be: the prep manifest's flag.
      list_stage: the PRF settings of `rank`'s list-aware scores, or None for none
        (`scores` are then the first-stage scores).
    """

    def __init__(self, ranker, vocab_tokens, max_tokens: int, max_boxes: int,
                 drop_leading_be: bool, list_stage: Optional[list_lib.PrfParams] = None):
        self.ranker = ranker
        self.list_stage = list_stage
        self.max_tokens = int(max_tokens)
        self.max_boxes = int(max_boxes)
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
        """Raw queries string [B] -> (states [B, T, D], pooled [B, E], num_tokens int32 [B])."""
        token_ids, num_tokens = self.query_inputs(queries)
        states, pooled = self.ranker.encode_query(token_ids, num_tokens, training=False)
        return states, pooled, num_tokens

    def encode_product(self, products: pg.Products):
        """Preprocessed products -> (box states [B, N, D], pooled [B, E])."""
        states, pooled = self.ranker.encode_product(
            products.box_features, products.box_geometry, products.box_labels,
            products.num_boxes, training=False)
        return states, pooled

    def dense_products(self, fields: Dict[str, tf.Tensor]) -> pg.Products:
        """Decoded request fields (boxes [B, N, 4], features [B, N, F], ...) -> Products."""
        return pg.process_dense_products(
            fields[pg.BOXES_FIELD], fields[pg.FEATURES_FIELD], fields[pg.LABELS_FIELD],
            fields[pg.NUM_BOXES_FIELD], fields[pg.IMAGE_H_FIELD], fields[pg.IMAGE_W_FIELD],
            self.max_boxes)

    def list_outputs(self, first, embeddings, real, real_mask) -> Dict[str, tf.Tensor]:
        """`rank`'s outputs from the model's outputs on the real candidates.

        Args:
          first: float [R] first-stage scores of the R real candidates.
          embeddings: float [R, E] their product embeddings.
          real: int64 [R, 1] their positions in the flattened [Q*C] lists.
          real_mask: bool [Q, C], True for real candidates.
        Returns:
          {SCORES, FIRST_STAGE_SCORES: float32 [Q, C]}, PADDING_SCORE for padding.
        """
        list_shape = tf.shape(real_mask, out_type=tf.int64)                      # [2]: Q, C
        flat_size = list_shape[:1] * list_shape[1:]                              # [1]: Q*C
        first = tf.reshape(tf.scatter_nd(real, tf.cast(first, tf.float32), flat_size),
                           list_shape)                                           # [Q, C]
        first_stage = tf.where(real_mask, first, tf.fill(tf.shape(first),
                                                         list_lib.PADDING_SCORE))
        if self.list_stage is None:
            scores = first_stage
        else:
            width = tf.shape(embeddings, out_type=tf.int64)[1:]                  # [1]: E
            embeddings = tf.reshape(
                tf.scatter_nd(real, tf.cast(embeddings, tf.float32),
                              tf.concat([flat_size, width], 0)),
                tf.concat([list_shape, width], 0))                               # [Q, C, E]
            scores = list_lib.prf_scores(first, embeddings, real_mask, self.list_stage)
        return {SCORES: tf.identity(scores, name=SCORES),
                FIRST_STAGE_SCORES: tf.identity(first_stage, name=FIRST_STAGE_SCORES)}

    # --- signatures -----------------------------------------------------------------------
    def build(self) -> Dict[str, "tf.compat.v1.SignatureDef"]:
        """Creates the serving graph and returns the signature_def_map.

        The model is instantiated once. Signatures differ in where they feed it: `rank`
        feeds placeholders [Q, C] that are checked against each other, whose real
        candidates (num_boxes != 0) are gathered into row-aligned pairs, and whose pair
        scores and product embeddings are scattered back to [Q, C] for the list stage
        (list_outputs); the pair tensors (`pairs/*`) are the inputs of serving_default,
        embed_query and embed_product; the decoded padded box tensors and the ints
        (`dense/*`) are the inputs of the dense variants. Each of these parts checks the
        inputs it reads (check_inputs). A Session (TF Serving) or a pruned function (tf.saved_model.load)
        fed at an intermediate tensor skips everything upstream of it, so each signature
        runs only its own part, and the graph is a third of the size of one model copy
        per signature (which matters for tf.saved_model.load's pruning time).
        """
        ph = tf.compat.v1.placeholder
        info = tf.compat.v1.saved_model.utils.build_tensor_info

        def sig(inputs, outs, layouts):
            """A SignatureDef whose inputs show their layouts' shapes (-1 for a letter)."""
            input_infos = {}
            for k, v in inputs.items():
                input_infos[k] = info(v)
                input_infos[k].tensor_shape.CopyFrom(tf.TensorShape(
                    [d if isinstance(d, int) else None for d in layouts[k]]).as_proto())
            return tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
                inputs=input_infos, outputs={k: info(v) for k, v in outs.items()},
                method_name=tf.saved_model.PREDICT_METHOD_NAME)

        def entry(value, name):
            """The tensor an inner signature is fed at: a PlaceholderWithDefault of unknown
            shape, so that any client may feed it any shape and meet the runtime checks
            (check_inputs gives the checked tensor its static shape)."""
            return tf.compat.v1.placeholder_with_default(value, shape=None, name=name)

        # rank: Q queries x C candidates -> the real candidates' pairs (R of the Q*C).
        with tf.name_scope(RANK):
            # Unshaped, as the entries below: the SignatureDef shows the layouts' shapes.
            rank_query = ph(tf.string, None, name=QUERY)
            rank_fields = {f: ph(tf.string, None, name=f) for f in PRODUCT_B64_FIELDS}
            rank_fields.update({f: ph(tf.int64, None, name=f) for f in PRODUCT_INT_FIELDS})
            rank_checked = check_inputs(dict(rank_fields, **{QUERY: rank_query}), LIST_LAYOUT)
            checked_query = rank_checked.pop(QUERY)
            list_shape = tf.shape(rank_checked[pg.NUM_BOXES_FIELD])                # [2]: Q, C
            # Padding (num_boxes == 0) is left out before the model; a negative count is
            # not padding and reaches the model's own check.
            real_mask = tf.not_equal(rank_checked[pg.NUM_BOXES_FIELD], 0)         # [Q, C]
            real = tf.where(tf.reshape(real_mask, [-1]))                           # [R, 1]
            lists = dict(rank_checked, **{QUERY: tf.broadcast_to(checked_query[:, None],
                                                                 list_shape)})   # [Q, C]
            lists = {k: tf.reshape(v, [-1]) for k, v in lists.items()}            # [Q*C]
            # A gather copies every string (the features are most of a request's bytes):
            # only lists with padding need one.
            flat = tf.cond(tf.reduce_all(real_mask),
                           lambda: {k: tf.identity(v) for k, v in lists.items()},
                           lambda: {k: tf.gather_nd(v, real) for k, v in lists.items()})
            repeated_query = flat.pop(QUERY)                                       # [R]

        # Row-aligned pairs: serving_default, embed_query, embed_product feed here.
        with tf.name_scope("pairs"):
            query = entry(repeated_query, QUERY)
            fields = {f: entry(flat[f], f) for f in PRODUCT_B64_FIELDS + PRODUCT_INT_FIELDS}

            # Each part checks the inputs it reads, so that a signature fed here is checked
            # whichever parts it runs; the query's count is checked against the products'
            # where the two meet (joined, below).
            checked_pair_query = check_inputs({QUERY: query}, QUERY_LAYOUT)[QUERY]
            checked_fields = check_inputs(fields, PAIR_LAYOUT)

        # Decoded, padded boxes and the ints: the dense variants feed here.
        with tf.name_scope("decode"):
            decoded = pg.decode_b64_boxes(*(checked_fields[f] for f in PRODUCT_B64_FIELDS +
                                            PRODUCT_INT_FIELDS))
        with tf.name_scope("dense"):
            # The ints get entries of their own too: no tensor is checked by two
            # check_inputs calls, whose equal check ops Grappler's common subexpression
            # elimination would merge, losing one call's control dependencies.
            dense_inputs = {f: entry(value, f) for f, value in zip(PRODUCT_B64_FIELDS, decoded)}
            dense_inputs.update({f: entry(checked_fields[f], f) for f in PRODUCT_INT_FIELDS})
        with tf.name_scope("dense_checks"):
            checked_dense = check_inputs(dense_inputs, DENSE_LAYOUT)
            joined = check_inputs({pg.NUM_BOXES_FIELD: checked_dense[pg.NUM_BOXES_FIELD],
                                   QUERY: checked_pair_query}, JOIN_LAYOUT)

        with tf.name_scope("model") as model_scope:
            products = self.dense_products(checked_dense)
            token_ids, num_tokens = self.query_inputs(checked_pair_query)
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
            # The first op reading both a query and its product runs after the count check.
            with tf.control_dependencies(list(joined.values())):
                pair_q = [tf.identity(t) for t in (q_states, num_tokens, q_pooled)]
            out = self.ranker.score_pairs(pair_q[0], pair_q[1], pair_q[2], p_states,
                                          products.num_boxes, p_pooled, training=False)
            pair_outputs = {key: tf.identity(out[key], name=key) for key in PAIR_OUTPUTS}
            q_embedding = tf.identity(q_pooled, name=outputs.QUERY_EMBEDDING)
            p_embedding = tf.identity(p_pooled, name=outputs.PRODUCT_EMBEDDING)
            kept_boxes = tf.identity(products.num_boxes, name="kept_num_boxes")

        with tf.name_scope(RANK + "_out"):
            rank_outputs = self.list_outputs(out[outputs.SCORE], p_pooled, real, real_mask)

        pair_inputs = dict(fields, **{QUERY: query})
        rank_inputs = dict(rank_fields, **{QUERY: rank_query})
        query_fields = dict(PAIR_LAYOUT, **QUERY_LAYOUT)
        dense_fields = dict(DENSE_LAYOUT, **QUERY_LAYOUT)
        return {
            SERVING_DEFAULT: sig(pair_inputs, pair_outputs, query_fields),
            RANK: sig(rank_inputs, rank_outputs, LIST_LAYOUT),
            EMBED_QUERY: sig({QUERY: query}, {EMBEDDING: q_embedding, NUM_TOKENS: num_tokens},
                             QUERY_LAYOUT),
            EMBED_PRODUCT: sig(fields, {EMBEDDING: p_embedding, NUM_BOXES: kept_boxes},
                               PAIR_LAYOUT),
            SCORE_DENSE: sig(dict(dense_inputs, **{QUERY: query}), pair_outputs, dense_fields),
            EMBED_PRODUCT_DENSE: sig(dense_inputs, {EMBEDDING: p_embedding,
                                                    NUM_BOXES: kept_boxes}, DENSE_LAYOUT),
        }
