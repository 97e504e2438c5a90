"""The Estimator model_fn: towers once per example, in-batch negatives, CAMP matching.

TRAIN: encode each row's query and product once; pick K negatives per positive among the
  batch's other products (sampler from the config, on the towers' pooled embeddings, no
  gradient through the choice); score all B * (1 + K) pairings in one batched matcher call;
  weighted losses (sigmoid CE on the cross logits, in-batch softmax on the pooled
  embeddings); warmup + decay learning rate, Adam/AdamW, global-norm clipping.
EVAL: the batch's own rows are the pairs (whole queries per batch, data labels 1/0); loss,
  NDCG@5 (organiser's definition), AUC, and the same losses as in training.
PREDICT: row-aligned scores (a row's score depends on that row only) plus the pooled
  embeddings of both towers and the id passthroughs. `labels` may be None.

Dimension legend: B batch rows, K negatives, P = B * (1 + K) scored pairs, E pooled width.
"""
import math

import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import losses, metrics, negatives, network

TRAIN = tf.estimator.ModeKeys.TRAIN
EVAL = tf.estimator.ModeKeys.EVAL
PREDICT = tf.estimator.ModeKeys.PREDICT

# Prediction keys (the export engineer's serving signature may reuse them).
P_SCORE = "score"
P_CROSS = "cross_logit"
P_TOWER = "tower_score"
P_QUERY_EMB = "query_embedding"
P_PRODUCT_EMB = "product_embedding"


def learning_rate_schedule(cfg, global_step):
    """Linear warmup to cfg.learning_rate over warmup_steps, then cosine/linear/constant decay
    to min_learning_rate_ratio * peak at train_steps."""
    step = tf.cast(global_step, tf.float32)
    peak = cfg.learning_rate
    warm = float(max(cfg.warmup_steps, 0))
    warmup = tf.minimum(1.0, (step + 1.0) / max(warm, 1.0)) if warm > 0 else 1.0
    span = float(max(cfg.train_steps - cfg.warmup_steps, 1))
    progress = tf.clip_by_value((step - warm) / span, 0.0, 1.0)
    floor = cfg.min_learning_rate_ratio
    if cfg.decay == "cosine":
        decay = floor + (1.0 - floor) * 0.5 * (1.0 + tf.cos(math.pi * progress))
    elif cfg.decay == "linear":
        decay = 1.0 - (1.0 - floor) * progress
    else:
        decay = 1.0
    return peak * warmup * decay


def _decay_variables(variables):
    """Variables that get weight decay: kernels, not biases, LayerNorm or the word embedding
    (a dense decay of the large, sparsely updated table would cost more than its gradient)."""
    skip = ("/bias", "/beta", "/gamma", "/word_embedding/")
    return [v for v in variables if not any(s in v.name for s in skip)]


def _replica_context():
    """(replica context, replicas in sync); (None, 1) outside a distribution strategy."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None, 1
    ctx = tf.distribute.get_replica_context()
    return ctx, ctx.num_replicas_in_sync


def _train_op(cfg, loss, global_step):
    lr = learning_rate_schedule(cfg, global_step)
    tf.compat.v1.summary.scalar("learning_rate", lr)
    opt = tf.compat.v1.train.AdamOptimizer(lr, beta1=0.9, beta2=0.999, epsilon=1e-6)
    if cfg.mixed_precision:
        opt = tf.compat.v1.train.experimental.MixedPrecisionLossScaleOptimizer(opt, "dynamic")
    variables = tf.compat.v1.trainable_variables()
    grads_and_vars = [(g, v) for g, v in opt.compute_gradients(loss, variables)
                      if g is not None]
    grads, tvars = zip(*grads_and_vars)
    if cfg.clip_norm > 0:
        use_norm = None
        replica_ctx, replicas = _replica_context()
        if replicas > 1:
            # Under a strategy (Config.distribute) each replica holds its share of the
            # gradient (the v1 optimiser scaled the loss by 1/replicas) and apply_gradients
            # sums the shares: clip on the norm of that sum, as one device would.
            use_norm = tf.linalg.global_norm(
                replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(grads)))
        grads, norm = tf.clip_by_global_norm(grads, cfg.clip_norm, use_norm=use_norm)
        tf.compat.v1.summary.scalar("gradient_norm", norm)
    if cfg.optimizer == "adamw" and cfg.weight_decay > 0:
        # Decoupled weight decay (Loshchilov & Hutter): p -= lr * wd * p, applied after the
        # gradients are computed and before the Adam step, independent of the moments.
        with tf.control_dependencies(list(grads)):
            decay = tf.group(*[v.assign_sub(lr * cfg.weight_decay * v)
                               for v in _decay_variables(tvars)])
        with tf.control_dependencies([decay]):
            update = opt.apply_gradients(zip(grads, tvars), global_step=global_step)
    else:
        update = opt.apply_gradients(zip(grads, tvars), global_step=global_step)
    update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
    return tf.group(update, *update_ops)


def _scale_gradient(x, scale):
    """Identity forward; the backward pass multiplies the gradient by `scale`."""
    if scale == 1.0:
        return x
    return scale * x + (1.0 - scale) * tf.stop_gradient(x)


def _summaries(ranker, pair_out, parts, total):
    tf.compat.v1.summary.scalar("loss/total", total)
    for name, value in parts.items():
        tf.compat.v1.summary.scalar(f"loss/{name}", value)
    for key in ("text_gate", "box_gate", "word_to_region_entropy", "region_to_word_entropy"):
        tf.compat.v1.summary.scalar(f"matcher/{key}", tf.reduce_mean(pair_out[key]))
    for key, value in ranker.last_diagnostics.items():
        tf.compat.v1.summary.scalar(f"towers/{key}", tf.reduce_mean(value))


def model_fn_builder(cfg, vocab_size, embeddings=None):
    """Returns model_fn(features, labels, mode, params) for tf.estimator.Estimator.

    Args:
      cfg: estimator.config.Config.
      vocab_size: rows of the word embedding.
      embeddings: optional float32 [V, W] word2vec vectors; loaded into the embedding
        variable by the Scaffold's init_fn when training starts from scratch (kept out of
        the graph so checkpoints' meta graphs stay small).
    """
    if embeddings is not None:
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.shape[0] != vocab_size:
            raise ValueError(f"embeddings rows {embeddings.shape[0]} != vocab {vocab_size}")
        if cfg.word_embedding_size and cfg.word_embedding_size != embeddings.shape[1]:
            raise ValueError(f"word_embedding_size {cfg.word_embedding_size} != "
                             f"embeddings width {embeddings.shape[1]}")
        cfg = type(cfg).from_dict({"word_embedding_size": int(embeddings.shape[1])}, cfg)

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
                P_SCORE: out["score"], P_CROSS: out["cross_logit"],
                P_TOWER: out["tower_score"], P_QUERY_EMB: q_pooled,
                P_PRODUCT_EMB: p_pooled,
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
        if mode == TRAIN:
            # Every training row is a positive pair; add K in-batch negatives per row.
            neg_idx, neg_valid = negatives.sample_negatives(
                cfg.sampler, q_pooled, p_pooled, query_key, product_id, cfg.num_negatives,
                seed=cfg.seed)                                               # [B, K]
            pairs = negatives.build_pairs(q_states, num_tokens, q_pooled, p_states,
                                          num_boxes, p_pooled, neg_idx, neg_valid)  # P rows
            row_labels = tf.ones_like(num_tokens, tf.float32)                 # [B]
            pair_groups = pairs["query_index"]                                # [P]
            tf.compat.v1.summary.scalar("negatives/valid_fraction",
                                        tf.reduce_mean(tf.cast(neg_valid, tf.float32)))
        else:
            if labels is None:
                raise ValueError("EVAL needs labels")
            row_labels = tf.cast(tf.greater(tf.cast(labels, tf.float32), 0.5), tf.float32)
            pairs = {"q_states": q_states, "num_tokens": num_tokens, "q_pooled": q_pooled,
                     "p_states": p_states, "num_boxes": num_boxes, "p_pooled": p_pooled,
                     "labels": row_labels, "weights": tf.ones_like(row_labels)}
            list_id = features.get(schema.F_QUERY_ID, query_key)  # eval lists are queries
            pair_groups = tf.unique(list_id, out_idx=tf.int32).idx             # [B]
        g = cfg.cross_to_tower_gradient if training else 1.0
        out = ranker.score_pairs(_scale_gradient(pairs["q_states"], g), pairs["num_tokens"],
                                 pairs["q_pooled"], _scale_gradient(pairs["p_states"], g),
                                 pairs["num_boxes"], pairs["p_pooled"],
                                 training=training)                          # [P]
        loss_inputs = losses.LossInputs(
            pair_logits=out["cross_logit"], pair_labels=pairs["labels"],
            pair_weights=pairs["weights"], q_pooled=q_pooled, p_pooled=p_pooled,
            row_labels=row_labels, query_key=query_key, product_id=product_id,
            temperature=cfg.temperature, pair_groups=pair_groups)
        total, parts = losses.weighted_losses(cfg.loss_weights, loss_inputs)
        total = tf.identity(total, name="total_loss")

        if mode == TRAIN:
            _summaries(ranker, out, parts, total)
            if cfg.num_negatives > 0:
                # How often a chosen negative outranks its positive (serving score).
                grid = tf.reshape(out["score"], [-1, 1 + cfg.num_negatives])  # [B, 1 + K]
                beaten = tf.cast(grid[:, 1:] > grid[:, :1], tf.float32)
                tf.compat.v1.summary.scalar("negatives/beats_positive_fraction",
                                            tf.reduce_mean(beaten))
            global_step = tf.compat.v1.train.get_or_create_global_step()
            train_op = _train_op(cfg, total, global_step)
            scaffold = None
            if embeddings is not None:
                emb_var = ranker.text_tower.word_embedding.embeddings

                def make_init(_=None):
                    feed = tf.compat.v1.placeholder(tf.float32, embeddings.shape,
                                                    name="word2vec_init")
                    return feed, emb_var.assign(feed)

                replica_ctx, replicas = _replica_context()
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

        # EVAL
        query_id = features[schema.F_QUERY_ID]
        metric_ops = {
            "ndcg@5": metrics.ndcg_metric(out["score"], row_labels, query_id),
            "ndcg@5_cross": metrics.ndcg_metric(out["cross_logit"], row_labels, query_id),
            "ndcg@5_tower": metrics.ndcg_metric(out["tower_score"], row_labels, query_id),
            "auc": tf.compat.v1.metrics.auc(row_labels, tf.sigmoid(out["score"]),
                                            num_thresholds=1000,
                                            summation_method="careful_interpolation"),
            "matcher/text_gate": tf.compat.v1.metrics.mean(out["text_gate"]),
            "matcher/box_gate": tf.compat.v1.metrics.mean(out["box_gate"]),
            "matcher/word_to_region_entropy":
                tf.compat.v1.metrics.mean(out["word_to_region_entropy"]),
        }
        for name, value in parts.items():
            metric_ops[f"loss/{name}"] = tf.compat.v1.metrics.mean(value)
        return tf.estimator.EstimatorSpec(mode, loss=total, eval_metric_ops=metric_ops)

    return model_fn
