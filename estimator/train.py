"""Training over a `mmrecall prep` directory: tf.estimator.train_and_evaluate.

    prep = PrepDir(path)
    metrics = train(resolve_config(cfg, prep), prep, model_dir, exporters=[...])

`resolve_config` fills the data-dependent Config fields from the prep (the only place they
are derived); `train` saves the resolved config to MODEL_DIR/config.json (on the chief also
as TensorBoard hparams and text, with the prep summary: estimator.run_summaries), resumes
from the latest checkpoint in MODEL_DIR and runs until the global step reaches
`train_steps` (a total, not an increment). Evaluation on the valid split (whole queries per
batch) runs at each checkpoint (at most every `eval_throttle_secs`) and at the end. The
`mmrecall train` command (mmrecall_cli.train) builds the Config with `config_from_args` and
wires in the export's best-NDCG@5 exporter.

Distributed: with TF_CONFIG set, `train_and_evaluate` runs the chief/worker/ps/evaluator
roles (see `mmrecall cluster-local`); each worker reads a disjoint share of the training
files, the chief writes checkpoints, and the evaluator keeps the best export.
"""
import os
from typing import Dict, List, Optional, Sequence

import tensorflow as tf

from data_prep.manifest import PrepDir
from estimator import input_fn as input_lib
from estimator import model_fn as model_lib
from estimator import run_summaries
from estimator.config import CONFIG_FILE, Config


def resolve_config(cfg: Config, prep: PrepDir) -> Config:
    """`cfg` with its data-dependent fields filled from the prep.

    data_dir becomes prep.path; word_embedding_size (W), when 0, becomes the prep's
    word2vec width; max_boxes (N cap) becomes the prep's box cap when 0 or above it (the
    records hold no more boxes than that). Other set values are kept.
    """
    values = {"data_dir": prep.path}
    if not cfg.word_embedding_size:
        values["word_embedding_size"] = prep.embedding_dim
    if not cfg.max_boxes or cfg.max_boxes > prep.max_boxes:
        values["max_boxes"] = prep.max_boxes
    return Config.from_dict(values, cfg)


def distribution_strategy(cfg: Config) -> Optional[tf.distribute.Strategy]:
    """The strategy of `cfg.distribute` (None without one); see the Config field."""
    if not cfg.distribute:
        return None
    # cfg.distribute == "mirrored" (validated): in-graph replicas on this machine's devices.
    devices = list(cfg.distribute_devices) or None
    cross_device_ops = None  # GPUs: the strategy's choice (NCCL all-reduce)
    if devices and all("cpu" in d.lower() for d in devices):
        # Several (logical) CPU devices: the default collective ring all-reduce hangs in
        # the Estimator's graph session; reduce on the first device and broadcast.
        cross_device_ops = tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)


def run_config(cfg: Config, model_dir: str) -> tf.estimator.RunConfig:
    """The RunConfig of `cfg`: seed, checkpoint and summary cadence, XLA, strategy."""
    session_config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    if cfg.xla:
        session_config.graph_options.optimizer_options.global_jit_level = (
            tf.compat.v1.OptimizerOptions.ON_1)
    strategy = distribution_strategy(cfg)
    return tf.estimator.RunConfig(
        model_dir=model_dir, tf_random_seed=cfg.seed,
        save_checkpoints_steps=cfg.save_checkpoints_steps,
        keep_checkpoint_max=cfg.keep_checkpoint_max,
        save_summary_steps=cfg.save_summary_steps,
        log_step_count_steps=cfg.log_step_count_steps,
        session_config=session_config,
        train_distribute=strategy, eval_distribute=strategy)


def build_estimator(cfg: Config, model_dir: str, prep: PrepDir,
                    with_embeddings: bool = True) -> tf.estimator.Estimator:
    """An Estimator for a resolved `cfg` over the prep's vocabulary.

    Args:
      cfg: a Config resolved against `prep` (resolve_config).
      model_dir: checkpoints and summaries.
      prep: gives the vocabulary size V and the word2vec vectors [V, W].
      with_embeddings: initialise the word embedding from word2vec when training starts
        from scratch (False: random, e.g. to restore a checkpoint right after).
    """
    vocab_size = prep.vocab_size or len(prep.vocab_tokens())
    embeddings = prep.embeddings() if with_embeddings else None
    return tf.estimator.Estimator(
        model_fn=model_lib.model_fn_builder(cfg, vocab_size, embeddings),
        config=run_config(cfg, model_dir))


def train(cfg: Config, prep: PrepDir, model_dir: str,
          exporters: Optional[Sequence[tf.estimator.Exporter]] = None,
          train_hooks: Optional[List[tf.estimator.SessionRunHook]] = None
          ) -> Optional[Dict[str, float]]:
    """Trains (resuming from model_dir) and evaluates on valid.

    Args:
      cfg: the configuration (its data fields are resolved from `prep` here).
      prep: the `mmrecall prep` output to train on.
      model_dir: checkpoints, summaries and config.json.
      exporters: tf.estimator.Exporter objects for the EvalSpec (e.g. the export's
        best-NDCG@5 exporter).
      train_hooks: extra SessionRunHooks for training.
    Returns:
      The final eval metrics {name: float} (the serialised-summary metrics of
      run_summaries.eval_picture_ops left out), or None when there is no valid split (or on
      a non-chief task).
    Raises:
      ValueError: the prep has no train split.
    """
    train_files = prep.split_files("train")
    if not train_files:
        raise ValueError(f"{prep.path}: no train split in the manifest")
    cfg = resolve_config(cfg, prep)
    cfg.save(model_dir)
    estimator = build_estimator(cfg, model_dir, prep)
    if estimator.config.is_chief:
        # HParams and text summaries once per run; filed under the step it resumes from.
        latest = tf.train.latest_checkpoint(model_dir)
        step = tf.train.load_variable(latest, "global_step") if latest else 0
        run_summaries.write_run_summaries(cfg, prep, model_dir, step=int(step))
    train_input = input_lib.input_fn_builder(cfg, train_files, tf.estimator.ModeKeys.TRAIN,
                                             prep)
    train_spec = tf.estimator.TrainSpec(train_input, max_steps=cfg.train_steps,
                                        hooks=list(train_hooks or []))
    valid_files = prep.split_files("valid")
    if not valid_files:
        estimator.train(train_input, max_steps=cfg.train_steps, hooks=train_spec.hooks)
        return None
    eval_input = input_lib.input_fn_builder(cfg, valid_files, tf.estimator.ModeKeys.EVAL, prep)
    eval_spec = tf.estimator.EvalSpec(
        eval_input, steps=cfg.eval_steps or None, name="valid",
        exporters=list(exporters or []), start_delay_secs=0,
        throttle_secs=cfg.eval_throttle_secs)
    result = tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
    if not result or not result[0]:
        return None
    return run_summaries.scalar_metrics(result[0])


def config_from_args(args) -> Config:
    """The Config of a `mmrecall train` command line.

    Precedence: defaults < MODEL_DIR/config.json (when resuming) < --config < --set <
    --steps.

    Args:
      args: a namespace with model_dir (str), config (JSON file path or None), set (list of
        "key=value" strings) and steps (int or None).
    """
    cfg = Config()
    existing = os.path.join(args.model_dir, CONFIG_FILE)
    if os.path.exists(existing):
        cfg = Config.load(existing, cfg)
    if args.config:
        cfg = Config.load(args.config, cfg)
    cfg = cfg.with_overrides(args.set)
    if args.steps is not None:
        cfg = Config.from_dict({"train_steps": args.steps}, cfg)
    return cfg
