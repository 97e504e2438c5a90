"""What TensorBoard shows beyond the training scalars: run description and eval pictures.

Once per `train` call (chief only), `write_run_summaries` writes to MODEL_DIR:
  HParams:  the resolved Config's fields that tell runs apart (HPARAM_FIELDS, loss weights
            flattened to `loss_weight/<name>`) as the session of the MODEL_DIR run, with the
            eval metrics (EVAL_METRICS) looked up in its `eval_valid` subdirectory, where the
            Estimator's evaluator writes them. `tensorboard --logdir runs/` over several
            run_train.sh runs (or bench/quality.py runs) thus shows one table row per run.
  Text:     `run/config` (the config.json) and `run/prep` (the prep manifest summary: rows,
            rejects, duplicates and capped products per split, vocabulary size,
            normalisation version, box cap, word2vec width).
The writes go through tensorboard's own event writer (pure Python, no TF graph or eager
context needed) into their own event file beside the Estimator's.

In EVAL, `eval_picture_ops` gives streaming metric ops whose value is a serialised Summary
(the Estimator writes such values to the eval directory, tag `<key>/0`):
  pr_curves:  `pr_curve/score`: precision/recall of sigmoid(serving score) vs the labels.
  histograms: `scores/positive`, `scores/negative` (sigmoid(serving score) of answer and
              non-answer rows) and `gates/text`, `gates/box` (the matcher's per-pair mean
              gate), each as the fraction of rows per bin over the whole valid split.
"""
import os
import time
from typing import Dict, Tuple

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.pr_curve import summary as pr_curve_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from data_prep.manifest import PrepDir
from estimator import losses
from estimator.config import Config

# The Config fields that tell runs apart in the HParams table (paths, cadences and input
# parallelism are left out: they do not change the model).
HPARAM_FIELDS = (
    "hidden_size", "pooled_size", "num_heads", "intermediate_size", "text_layers",
    "box_layers", "cross_layers", "dropout", "pooling", "region_features",
    "trainable_embeddings", "serving_score", "tower_score_weight", "sampler",
    "num_negatives", "temperature", "focal_gamma", "cross_to_tower_gradient", "optimizer",
    "learning_rate", "warmup_steps", "decay", "weight_decay", "clip_norm", "batch_size",
    "train_group_size", "batch_by_boxes", "train_steps", "max_query_tokens", "max_boxes",
    "seed", "mixed_precision", "distribute")
# The eval scalars (tags in EVAL_DIR) the HParams dashboard pairs with each run.
EVAL_METRICS = ("ndcg@5", "ndcg@5_tower", "ndcg@5_cross", "auc", "loss")
EVAL_DIR = "eval_valid"          # tf.estimator's eval dir for EvalSpec(name="valid")
PR_THRESHOLDS = 51
SCORE_BINS = 40
GATE_BINS = 20


def hparams_of(cfg: Config) -> Dict[str, object]:
    """{name: bool | int | float | str} of the fields in HPARAM_FIELDS plus every
    `loss_weight/<loss>` (0.0 for a loss the config does not weight)."""
    values = {name: getattr(cfg, name) for name in HPARAM_FIELDS}
    values["distribute"] = cfg.distribute or "none"
    for name in sorted(losses.LOSSES):
        values[f"loss_weight/{name}"] = float(cfg.loss_weights.get(name, 0.0))
    return values


def prep_summary_markdown(prep: PrepDir) -> str:
    """The prep manifest as a markdown table per split plus one line of settings."""
    m = prep.manifest
    lines = ["| split | rows | rejected | duplicates | products capped |",
             "|---|---|---|---|---|"]
    for split in prep.splits:
        s = m["splits"][split]
        lines.append(f"| {split} | {s.get('rows', 0)} | {s.get('rejected', 0)} | "
                     f"{s.get('duplicates', 0)} | {s.get('capped', 0)} |")
    lines.append("")
    lines.append(f"prep `{prep.path}`: vocabulary {prep.vocab_size} entries, word2vec width "
                 f"{prep.embedding_dim}, box cap {prep.max_boxes}, normalisation version "
                 f"{prep.normalization_version}, compression {prep.compression or 'none'}")
    return "\n".join(lines)


def write_run_summaries(cfg: Config, prep: PrepDir, model_dir: str, step: int = 0) -> str:
    """Writes the run's hparams and text summaries into a new event file in `model_dir`.

    Args:
      cfg: the resolved Config of this run.
      prep: the prep it trains on.
      model_dir: the Estimator's model directory (created if missing).
      step: the step the summaries are filed under (the global step a resumed run starts
        from, so a resume is told apart in the Text dashboard).
    Returns:
      The event file's path.
    """
    os.makedirs(model_dir, exist_ok=True)
    writer = EventFileWriter(model_dir, filename_suffix=".run")
    hparams = hparams_of(cfg)
    config_pb = hp.hparams_config_pb(
        hparams=[hp.HParam(name) for name in hparams],
        metrics=[hp.Metric(tag, group=EVAL_DIR, display_name=f"valid {tag}")
                 for tag in EVAL_METRICS])
    # The trial id (the HParams table's group) is the model directory's absolute path: one
    # row per directory, even for run_train.sh's runs that are all named ".../model".
    session_pb = hp.hparams_pb(hparams, trial_id=os.path.abspath(model_dir))
    config_text = text_summary.text_pb("run/config", "```\n" + cfg.to_json() + "\n```",
                                       description="MODEL_DIR/config.json of this run")
    prep_text = text_summary.text_pb("run/prep", prep_summary_markdown(prep),
                                     description="the prep manifest's summary")
    now = time.time()
    for summary in (config_pb, session_pb, config_text, prep_text):
        writer.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary))
    writer.close()
    return writer._file_name  # pylint: disable=protected-access  (no public accessor)


def _streaming_histogram(name: str, values: tf.Tensor, weights: tf.Tensor,
                         bins: int) -> Tuple[tf.Tensor, tf.Operation]:
    """A streaming histogram of `values` in [0, 1] as a serialised histogram summary.

    Args:
      name: the summary tag.
      values: float [R] in [0, 1] (clipped).
      weights: float [R], 1 for rows to count, 0 for rows to leave out.
      bins: number of equal-width bins.
    Returns:
      (string scalar: a Summary whose tensor is [bins, 3] = (left edge, right edge,
      fraction of the counted rows in the bin), update op) — a tf.compat.v1 metric pair.
    """
    values = tf.clip_by_value(tf.cast(tf.reshape(values, [-1]), tf.float32), 0.0, 1.0)
    index = tf.minimum(tf.cast(values * bins, tf.int32), bins - 1)           # [R]
    one_hot = tf.one_hot(index, bins, dtype=tf.float32)                        # [R, bins]
    weights = tf.reshape(tf.cast(weights, tf.float32), [-1, 1])                # [R, 1]
    count = tf.reduce_sum(weights)                                             # []
    batch_fraction = tf.math.divide_no_nan(tf.reduce_sum(one_hot * weights, 0), count)
    # The batches' fractions [bins] averaged with their row counts as weights is the
    # fraction over the whole split; mean_tensor keeps those sums in local metric variables
    # (summed over replicas under a strategy).
    fraction, update = tf.compat.v1.metrics.mean_tensor(
        batch_fraction, weights=tf.fill([bins], count))                       # [bins]
    edges = np.linspace(0.0, 1.0, bins + 1, dtype=np.float32)
    tensor = tf.stack([tf.constant(edges[:-1]), tf.constant(edges[1:]), fraction], axis=1)
    summary = tf.compat.v1.summary.tensor_summary(
        name.replace("/", "_"), tensor, collections=[],
        summary_metadata=histogram_metadata.create_summary_metadata(
            display_name=name, description="fraction of valid rows per bin"))
    return summary, update


def eval_picture_ops(probabilities: tf.Tensor, labels: tf.Tensor,
                     gates: Dict[str, tf.Tensor]) -> Dict[str, Tuple[tf.Tensor, tf.Operation]]:
    """EVAL metric ops whose values are serialised PR-curve and histogram summaries.

    Args:
      probabilities: float [B] sigmoid of the serving score.
      labels: float [B] in {0, 1}.
      gates: {"text": [B], "box": [B]} the matcher's mean gates ({} for a towers-only
        model).
    Returns:
      {eval metric key: (summary string, update op)}; keys are the dashboards' tags.
    """
    ops = {"pr_curve/score": pr_curve_summary.streaming_op(
        "pr_curve_score", labels=tf.cast(labels, tf.bool), predictions=probabilities,
        num_thresholds=PR_THRESHOLDS, metrics_collections=[],
        display_name="pr_curve/score",
        description="sigmoid(serving score) against the valid labels")}
    ops["scores/positive"] = _streaming_histogram("scores/positive", probabilities, labels,
                                                  SCORE_BINS)
    ops["scores/negative"] = _streaming_histogram("scores/negative", probabilities,
                                                  1.0 - labels, SCORE_BINS)
    for key, value in gates.items():
        ops[f"gates/{key}"] = _streaming_histogram(f"gates/{key}", value,
                                                   tf.ones_like(value), GATE_BINS)
    return ops


def scalar_metrics(eval_result: Dict[str, object]) -> Dict[str, object]:
    """The eval result without the serialised-summary values (bytes), floats for scalars."""
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in eval_result.items()
            if not isinstance(v, bytes)}
