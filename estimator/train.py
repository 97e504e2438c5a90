"""`mmrecall train`: tf.estimator.train_and_evaluate over a `mmrecall prep` directory.

    mmrecall train --data PREP_DIR --model-dir DIR [--steps N] [--config f.json]
                   [--set key=value ...]

Config precedence: defaults < DIR/config.json (when resuming) < --config < --set < --steps.
The resolved config is written to DIR/config.json. Training resumes from the latest
checkpoint in DIR and runs until the global step reaches `train_steps` (a total, not an
increment). Evaluation on the valid split (whole queries per batch) runs at each checkpoint
(at most every `eval_throttle_secs`) and at the end; the final metrics are printed.

Distributed: with TF_CONFIG set, `train_and_evaluate` runs the chief/worker/ps/evaluator
roles (see `mmrecall cluster-local`); each worker reads a disjoint share of the training
files, the chief writes checkpoints, and the evaluator keeps the best export.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import input_fn as input_lib
from estimator import model_fn as model_lib
from estimator.config import CONFIG_FILE, Config


def load_embeddings(data_dir: str) -> np.ndarray:
    manifest = input_lib.load_manifest(data_dir)
    path = os.path.join(data_dir, manifest.get("embeddings", schema.EMBEDDINGS_FILE))
    return np.load(path).astype(np.float32)


def resolve_config(cfg: Config, data_dir: str) -> Config:
    """Fills the data-dependent fields (data_dir, word_embedding_size, max_boxes)."""
    manifest = input_lib.load_manifest(data_dir)
    values = {"data_dir": os.path.abspath(data_dir)}
    if not cfg.word_embedding_size:
        values["word_embedding_size"] = int(manifest["embedding_dim"])
    if not cfg.max_boxes:
        values["max_boxes"] = int(manifest.get("max_boxes", 0)) or 64
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


def build_estimator(cfg: Config, model_dir: str, data_dir: Optional[str] = None,
                    with_embeddings: bool = True) -> tf.estimator.Estimator:
    """An Estimator for `cfg` (vocabulary size and word2vec from the prep directory)."""
    data_dir = data_dir or cfg.data_dir
    manifest = input_lib.load_manifest(data_dir)
    vocab_size = int(manifest.get("vocab_size") or len(input_lib.vocab_tokens(data_dir)))
    embeddings = load_embeddings(data_dir) if with_embeddings else None
    return tf.estimator.Estimator(
        model_fn=model_lib.model_fn_builder(cfg, vocab_size, embeddings),
        config=run_config(cfg, model_dir))


def train(cfg: Config, data_dir: str, model_dir: str,
          exporters: Optional[Sequence[tf.estimator.Exporter]] = None,
          train_hooks: Optional[List[tf.estimator.SessionRunHook]] = None
          ) -> Optional[Dict[str, float]]:
    """Trains (resuming from model_dir) and evaluates on valid.

    Args:
      cfg: the configuration (data fields are resolved from data_dir).
      data_dir: a `mmrecall prep` output directory.
      model_dir: checkpoints, summaries and config.json.
      exporters: tf.estimator.Exporter objects for the EvalSpec (e.g. a best-NDCG@5
        BestExporter from the export module).
      train_hooks: extra SessionRunHooks for training.
    Returns:
      The final eval metrics {name: float}, or None when there is no valid split (or on a
      non-chief task).
    """
    cfg = resolve_config(cfg, data_dir)
    cfg.save(model_dir)
    estimator = build_estimator(cfg, model_dir, data_dir)
    train_files = input_lib.split_files(data_dir, "train")
    if not train_files:
        raise ValueError(f"{data_dir}: no train split in the manifest")
    train_input = input_lib.input_fn_builder(cfg, train_files, tf.estimator.ModeKeys.TRAIN,
                                             data_dir=data_dir)
    train_spec = tf.estimator.TrainSpec(train_input, max_steps=cfg.train_steps,
                                        hooks=list(train_hooks or []))
    valid_files = input_lib.split_files(data_dir, "valid")
    if not valid_files:
        estimator.train(train_input, max_steps=cfg.train_steps, hooks=train_spec.hooks)
        return None
    eval_input = input_lib.input_fn_builder(cfg, valid_files, tf.estimator.ModeKeys.EVAL,
                                            data_dir=data_dir)
    eval_spec = tf.estimator.EvalSpec(
        eval_input, steps=cfg.eval_steps or None, name="valid",
        exporters=list(exporters or []), start_delay_secs=0,
        throttle_secs=cfg.eval_throttle_secs)
    result = tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
    if not result or not result[0]:
        return None
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in result[0].items()}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="mmrecall train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a `mmrecall prep` output directory")
    parser.add_argument("--model-dir", required=True, help="checkpoints, summaries, config")
    parser.add_argument("--steps", type=int, default=None,
                        help="total training steps (overrides train_steps)")
    parser.add_argument("--config", default=None, help="a JSON file of config values")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value (JSON or a plain string); repeatable")
    parser.add_argument("--no-export-best", action="store_true",
                        help="do not keep the best SavedModel by valid NDCG@5 in "
                             "MODEL_DIR/export/best_ndcg/ (kept by default)")
    return parser.parse_args(argv)


def config_from_args(args) -> Config:
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


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.INFO)
    cfg = config_from_args(args)
    exporters = []
    if not args.no_export_best:
        from export.export import BestNdcgExporter  # export builds on estimator, not back

        exporters.append(BestNdcgExporter(args.data))
    metrics = train(cfg, args.data, args.model_dir, exporters=exporters)
    if metrics is not None:
        printable = {k: v for k, v in sorted(metrics.items()) if np.ndim(v) == 0}
        print("final eval: " + json.dumps(printable, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
