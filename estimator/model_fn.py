"""The Estimator model_fn: towers once per example, in-batch negatives, CAMP matching.

TRAIN: encode each row's query and product once; pick K negatives per positive among the
  batch's other products (sampler from the config, on the towers' pooled embeddings, no
  gradient through the choice); score all B * (1 + K) pairings in one batched matcher call;
  weighted losses (sigmoid CE on the cross logits, in-batch softmax on the pooled
  embeddings); the optimiser step of estimator.optimization.
EVAL: the batch's own rows are the pairs (whole queries per batch, data labels 1/0); loss,
  NDCG@5 (organiser's definition), AUC, and the same losses as in training; plus a PR curve
  and score / gate histograms as serialised-summary metrics (estimator.run_summaries).
Towers only (Config.uses_matcher False: tower score served, no loss on cross logits): TRAIN
  samples no negatives and builds no pairs; EVAL reports no cross metrics.
PREDICT: row-aligned scores (a row's score depends on that row only) plus the pooled
  embeddings of both towers and the id passthroughs, under the estimator.outputs keys.
  `labels` may be None.

Dimension legend: B batch rows, T tokens, N boxes, D model width, E pooled width,
K negatives, P = B * (1 + K) scored pairs, V vocabulary, W word2vec width.
"""
import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import losses, metrics, negatives, network, optimization, outputs
from estimator import run_summaries

TRAIN = tf.estimator.ModeKeys.TRAIN
EVAL = tf.estimator.ModeKeys.EVAL
PREDICT = tf.estimator.ModeKeys.PREDICT


def _scale_gradient(x, scale):
    """Identity forward; the backward pass multiplies the gradient by `scale`."""
    if scale == 1.0:
        return x
    return scale * x + (1.0 - scale) * tf.stop_gradient(x)


def _summaries(ranker, pair_out, parts, total):
    tf.compat.v1.summary.scalar("loss/total", total)
    for name, value in parts.items():
        tf.compat.v1.summary.scalar(f"loss/{name}", value)
    for key in network.MATCHER_DIAGNOSTICS:
        if key in pair_out:  # absent for a towers-only model
            tf.compat.v1.summary.scalar(f"matcher/{key}", tf.reduce_mean(pair_out[key]))
    for key, value in ranker.last_diagnostics.items():
        tf.compat.v1.summary.scalar(f"towers/{key}", tf.reduce_mean(value))


def model_fn_builder(cfg, vocab_size, embeddings=None):
    """Returns model_fn(features, labels, mode, params) for tf.estimator.Estimator.

    Args:
      cfg: a resolved estimator.config.Config (word_embedding_size = W > 0).
      vocab_size: V, rows of the word embedding.
      embeddings: optional float32 [V, W] word2vec vectors; loaded into the embedding
        variable by the Scaffold's init_fn when training starts from scratch (kept out of
        the graph so checkpoints' meta graphs stay small).
    Raises:
      ValueError: embeddings of another shape than [V, W].
    """
    if embeddings is not None:
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.shape != (vocab_size, cfg.word_embedding_size):
            raise ValueError(f"embeddings {embeddings.shape} != (vocab_size {vocab_size}, "
                             f"word_embedding_size {cfg.word_embedding_size})")

    def model_fn(features, labels, mode, params=None):
        del params
        with network.seeded_keras_layers(cfg.seed):
            return build_spec(features, labels, mode)

    def build_spec(features, labels, mode):
        training = mode == TRAIN
        ranker = network.build_ranker(cfg, vocab_size)
        num_tokens = tf.cast(features[schema.F_NUM_TOKENS], tf.int32)        # [B]
        num_boxes = tf.cast(features[schema.F_NUM_BOXES], tf.int32)          # [B]
        q_states, q_pooled = ranker.encode_query(features[schema.F_TOKEN_IDS], num_tokens,
                                                 training)                   # [B,T,D] [B,E]
        p_states, p_pooled = ranker.encode_product(
            features[schema.F_BOX_FEATURES], features[schema.F_BOX_GEOMETRY],
            features[schema.F_BOX_LABELS], num_boxes, training)              # [B,N,D] [B,E]

        if mode == PREDICT:
            out = ranker.score_pairs(q_states, num_tokens, q_pooled, p_states, num_boxes,
                                     p_pooled, training=False)
            predictions = {
                outputs.SCORE: out[outputs.SCORE],
                outputs.CROSS_LOGIT: out[outputs.CROSS_LOGIT],
                outputs.TOWER_SCORE: out[outputs.TOWER_SCORE],
                outputs.QUERY_EMBEDDING: q_pooled, outputs.PRODUCT_EMBEDDING: p_pooled,
            }
            for key in (schema.F_PRODUCT_ID, schema.F_QUERY_ID):
                if key in features:
                    predictions[key] = features[key]
            return tf.estimator.EstimatorSpec(
                mode, predictions=predictions,
                export_outputs={"serving_default":
                                tf.estimator.export.PredictOutput(predictions)})

        query_key = features[schema.F_QUERY_KEY]
        product_id = features[schema.F_PRODUCT_ID]
        with_matcher = ranker.matcher is not None
        if mode == TRAIN and not with_matcher:
            # Towers only: the tower losses need the [B, E] embeddings alone, so no negatives
            # are sampled and no [P, N, D] pair tensors are formed.
            row_labels = tf.ones_like(num_tokens, tf.float32)                 # [B]
            pairs, pair_groups, out = {}, None, {}
        elif mode == TRAIN:
            # Every training row is a positive pair; add K in-batch negatives per row.
            neg_idx, neg_valid = negatives.sample_negatives(
                cfg.sampler, q_pooled, p_pooled, query_key, product_id, cfg.num_negatives,
                seed=cfg.seed)                                               # [B, K]
            pairs = negatives.pair_indices(neg_idx, neg_valid)                # P rows
            row_labels = tf.ones_like(num_tokens, tf.float32)                 # [B]
            pair_groups = pairs["query_index"]                                # [P]
            tf.compat.v1.summary.scalar("negatives/valid_fraction",
                                        tf.reduce_mean(tf.cast(neg_valid, tf.float32)))
        else:
            if labels is None:
                raise ValueError("EVAL needs labels")
            row_labels = tf.cast(tf.greater(tf.cast(labels, tf.float32), 0.5), tf.float32)
            pairs = {"labels": row_labels, "weights": tf.ones_like(row_labels)}  # P = B
            list_id = features.get(schema.F_QUERY_ID, query_key)  # eval lists are queries
            pair_groups = tf.unique(list_id, out_idx=tf.int32).idx             # [B]
        if pairs:
            g = cfg.cross_to_tower_gradient if training else 1.0
            # Per-example states with pair indices (TRAIN) or none (EVAL: row b with row b).
            out = ranker.score_pairs(_scale_gradient(q_states, g), num_tokens, q_pooled,
                                     _scale_gradient(p_states, g), num_boxes, p_pooled,
                                     training=training, q_index=pairs.get("query_index"),
                                     p_index=pairs.get("product_index"))     # [P]
        loss_inputs = losses.LossInputs(
            pair_logits=out.get(outputs.CROSS_LOGIT), pair_labels=pairs.get("labels"),
            pair_weights=pairs.get("weights"), q_pooled=q_pooled, p_pooled=p_pooled,
            row_labels=row_labels, query_key=query_key, product_id=product_id,
            temperature=cfg.temperature, pair_groups=pair_groups,
            focal_gamma=cfg.focal_gamma, instance_classes=cfg.instance_classes,
            instance_sampled=cfg.instance_sampled)
        total, parts = losses.weighted_losses(cfg.loss_weights, loss_inputs)
        total = tf.identity(total, name="total_loss")

        if mode == TRAIN:
            _summaries(ranker, out, parts, total)
            if with_matcher and cfg.num_negatives > 0:
                # How often a chosen negative outranks its positive (serving score).
                grid = tf.reshape(out[outputs.SCORE], [-1, 1 + cfg.num_negatives])  # [B, 1 + K]
                beaten = tf.cast(grid[:, 1:] > grid[:, :1], tf.float32)
                tf.compat.v1.summary.scalar("negatives/beats_positive_fraction",
                                            tf.reduce_mean(beaten))
            global_step = tf.compat.v1.train.get_or_create_global_step()
            train_op = optimization.create_train_op(cfg, total, global_step)
            scaffold = None
            if embeddings is not None:
                emb_var = ranker.text_tower.word_embedding.embeddings

                def make_init(_=None):
                    feed = tf.compat.v1.placeholder(tf.float32, embeddings.shape,
                                                    name="word2vec_init")
                    return feed, emb_var.assign(feed)

                replica_ctx, replicas = optimization.replica_context()
                if replicas > 1:
                    # In a replica, assigning a mirrored variable sets that replica's copy
                    # only, and the Estimator runs replica 0's init_fn: assign every copy.
                    placeholder, assign = replica_ctx.merge_call(make_init)
                else:
                    placeholder, assign = make_init()

                def init_fn(_, session):
                    session.run(assign, {placeholder: embeddings})

                scaffold = tf.compat.v1.train.Scaffold(init_fn=init_fn)
            return tf.estimator.EstimatorSpec(mode, loss=total, train_op=train_op,
                                              scaffold=scaffold)

        # EVAL. NDCG@5 ranks distinct products, as `mmrecall rank` and the scorer do: a
        # product listed twice in one query takes one position.
        query_id = features[schema.F_QUERY_ID]

        def ndcg(scores):
            return metrics.ndcg_metric(scores, row_labels, query_id, product_id)

        metric_ops = {
            "ndcg@5": ndcg(out[outputs.SCORE]),
            "ndcg@5_tower": ndcg(out[outputs.TOWER_SCORE]),
            "auc": tf.compat.v1.metrics.auc(row_labels, tf.sigmoid(out[outputs.SCORE]),
                                            num_thresholds=1000,
                                            summation_method="careful_interpolation"),
        }
        if with_matcher:
            metric_ops["ndcg@5_cross"] = ndcg(out[outputs.CROSS_LOGIT])
            for key in ("text_gate", "box_gate", "word_to_region_entropy"):
                metric_ops[f"matcher/{key}"] = tf.compat.v1.metrics.mean(out[key])
        for name, value in parts.items():
            metric_ops[f"loss/{name}"] = tf.compat.v1.metrics.mean(value)
        # PR curve and histograms for TensorBoard: values are serialised summaries, which
        # the Estimator writes to the eval directory (and train.train drops from its result).
        # Left out under a distribution strategy: a string value per replica cannot be
        # reduced (the Estimator fetches the replicas' values as one).
        if not tf.distribute.has_strategy():
            gates = {"text": out["text_gate"], "box": out["box_gate"]} if with_matcher else {}
            metric_ops.update(run_summaries.eval_picture_ops(tf.sigmoid(out[outputs.SCORE]),
                                                             row_labels, gates))
        return tf.estimator.EstimatorSpec(mode, loss=total, eval_metric_ops=metric_ops)

    return model_fn
