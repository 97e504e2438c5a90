"""The optimiser of the model_fn: learning-rate schedule, Adam/AdamW, clipping, replicas.

    train_op = create_train_op(cfg, loss, global_step)

- Learning rate: linear warmup to `Config.learning_rate` over `warmup_steps`, then cosine,
  linear or constant decay to `min_learning_rate_ratio` of the peak at `train_steps`.
- tf.compat.v1 Adam (beta1 0.9, beta2 0.999, epsilon 1e-6); with `optimizer="adamw"` a
  decoupled weight decay (Loshchilov & Hutter) on kernels, applied before the Adam step.
- Global-norm clipping at `clip_norm`; under a distribution strategy the norm is that of the
  gradient summed over replicas, as one device would see it.
- `mixed_precision`: dynamic loss scaling around the optimiser.

Summaries: "learning_rate" and "gradient_norm" (when clipping).
"""
import math
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

# Name fragments of the variables that get no weight decay: biases, LayerNorm offsets and
# scales, and the word embedding (a dense decay of the large, sparsely updated table would
# cost more than its gradient).
NO_DECAY = ("/bias", "/beta", "/gamma", "/word_embedding/")


def learning_rate_schedule(cfg, global_step) -> tf.Tensor:
    """The learning rate at `global_step`.

    Args:
      cfg: estimator.config.Config (learning_rate, warmup_steps, decay,
        min_learning_rate_ratio, train_steps).
      global_step: int scalar tensor, the step being taken (0-based).
    Returns:
      float32 scalar: peak * (step + 1) / warmup_steps during warmup, then the decay from
      the peak to min_learning_rate_ratio * peak over the remaining train_steps, then flat.
    """
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


def decay_variables(variables: Sequence[tf.Variable]) -> List[tf.Variable]:
    """The variables that get decoupled weight decay: those whose name has no NO_DECAY part."""
    return [v for v in variables if not any(s in v.name for s in NO_DECAY)]


def replica_context() -> Tuple[Optional[tf.distribute.ReplicaContext], int]:
    """(replica context, replicas in sync); (None, 1) outside a distribution strategy."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None, 1
    ctx = tf.distribute.get_replica_context()
    return ctx, ctx.num_replicas_in_sync


def create_train_op(cfg, loss: tf.Tensor, global_step: tf.Variable) -> tf.Operation:
    """One optimiser step on every trainable variable, plus the UPDATE_OPS collection.

    Args:
      cfg: estimator.config.Config (schedule, optimizer, weight_decay, clip_norm,
        mixed_precision).
      loss: float32 scalar to minimise.
      global_step: the step variable; incremented by the step.
    Returns:
      The grouped train op.
    """
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
        ctx, replicas = replica_context()
        if replicas > 1:
            # Each replica holds its share of the gradient (the v1 optimiser scaled the loss
            # by 1/replicas) and apply_gradients sums the shares: clip on the norm of that
            # sum, as one device would.
            use_norm = tf.linalg.global_norm(
                ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(grads)))
        grads, norm = tf.clip_by_global_norm(grads, cfg.clip_norm, use_norm=use_norm)
        tf.compat.v1.summary.scalar("gradient_norm", norm)
    if cfg.optimizer == "adamw" and cfg.weight_decay > 0:
        # Decoupled weight decay: p -= lr * wd * p, after the gradients are computed and
        # before the Adam step, independent of the moments.
        with tf.control_dependencies(list(grads)), tf.name_scope("weight_decay"):
            decay = tf.group(*[v.assign_sub(lr * cfg.weight_decay * v)
                               for v in decay_variables(tvars)])
        with tf.control_dependencies([decay]):
            update = opt.apply_gradients(zip(grads, tvars), global_step=global_step)
    else:
        update = opt.apply_gradients(zip(grads, tvars), global_step=global_step)
    update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
    return tf.group(update, *update_ops)
