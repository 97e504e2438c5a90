"""Training throughput: examples/s the model consumes vs examples/s the input pipeline feeds.

    python bench/train_throughput.py --data PREP_DIR [--steps 200] [--warmup 20]
                                     [--set key=value ...] [--out bench/results/...json]

Without --data a small prep-shaped directory is written with
mmrecall_testing/model_fixtures.py.
Measures, in the same process and with the same config:
  model:    tf.estimator training steps/s after `warmup` steps (hook timing), reported as
            positives/s (batch_size per step) and scored pairs/s (batch_size * (1 + K));
  pipeline: the TRAIN input_fn alone (parse, lookup, decode, pad), batches/s -> examples/s.
The pipeline must feed at least 5x what the model consumes (`ratio` in the JSON).
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tensorflow as tf  # noqa: E402

from data_prep.manifest import PrepDir  # noqa: E402
from estimator import input_fn as input_lib  # noqa: E402
from estimator import train  # noqa: E402
from estimator.config import Config  # noqa: E402
from mmrecall_testing.model_fixtures import write_prep_dir  # noqa: E402
from mmrecall_testing.bench_report import write_report  # noqa: E402


class _Timer(tf.compat.v1.train.SessionRunHook):
    """Times the training steps after the first `warmup` ones."""

    def __init__(self, warmup):
        self.warmup, self.count, self.start = warmup, 0, None

    def after_run(self, run_context, run_values):
        self.count += 1
        if self.count == self.warmup:
            self.start = time.perf_counter()

    def end(self, session):
        self.seconds = time.perf_counter() - self.start
        self.timed_steps = self.count - self.warmup


def measure_pipeline(cfg, prep, batches, warmup=5):
    """Examples/s of the TRAIN input_fn alone, over `batches` batches after `warmup`."""
    ds = input_lib.input_fn_builder(cfg, prep.split_files("train"),
                                    tf.estimator.ModeKeys.TRAIN, prep)()
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        features, _ = next(it)
    seconds = time.perf_counter() - start
    return batches * cfg.batch_size / seconds


def main(argv=None):
    """Measures both rates, prints and writes the JSON; 1 when the pipeline is too slow."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--pipeline-batches", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "train_throughput.json"))
    args = parser.parse_args(argv)

    data = args.data or write_prep_dir(tempfile.mkdtemp(prefix="mmrecall-tp-"), num_train=2000,
                                       num_valid_queries=0, max_boxes=10, embedding_dim=64)
    prep = PrepDir(data)
    cfg = Config().with_overrides(args.set)
    cfg = Config.from_dict({"train_steps": args.steps + args.warmup,
                            "save_checkpoints_steps": 10 ** 9, "save_summary_steps": 10 ** 9,
                            "log_step_count_steps": 10 ** 9}, cfg)
    cfg = train.resolve_config(cfg, prep)

    model_dir = tempfile.mkdtemp(prefix="mmrecall-tp-model-")
    est = train.build_estimator(cfg, model_dir, prep)
    timer = _Timer(args.warmup)
    est.train(input_lib.input_fn_builder(cfg, prep.split_files("train"),
                                         tf.estimator.ModeKeys.TRAIN, prep),
              max_steps=cfg.train_steps, hooks=[timer])
    steps_per_s = timer.timed_steps / timer.seconds
    model_eps = steps_per_s * cfg.batch_size
    pipeline_eps = measure_pipeline(cfg, prep, args.pipeline_batches)
    report = {
        "data": data, "batch_size": cfg.batch_size, "num_negatives": cfg.num_negatives,
        "sampler": cfg.sampler, "max_boxes": cfg.max_boxes, "hidden_size": cfg.hidden_size,
        "model_steps_per_s": round(steps_per_s, 3),
        "model_positives_per_s": round(model_eps, 1),
        "model_pairs_per_s": round(model_eps * (1 + cfg.num_negatives), 1),
        "pipeline_examples_per_s": round(pipeline_eps, 1),
        "ratio": round(pipeline_eps / model_eps, 2),
        "ok": pipeline_eps >= 5 * model_eps,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    write_report(args.out, report, indent=2)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
