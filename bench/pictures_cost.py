"""What the TensorBoard pictures and projector add to a training run's wall time.

    python bench/pictures_cost.py --data PREP_DIR [--steps 600] [--set key=value ...]
                                  [--out bench/results/pictures_cost.json]

Trains once, as `mmrecall train` does (same exporters: eval line, pictures), with the
pictures exporter (estimator.pictures.PicturesExporter) timed at each call; the baseline is
the same run without those calls (total minus their sum). Reports the number of
evaluations, the seconds of each call (the final one also writes the Embedding Projector)
and `ratio` = added / baseline, in wall time and in the process's CPU time (`cpu_`: while
the exporter runs, training waits, so the process's CPU time is the exporter's; on a
machine shared with other jobs the CPU ratio is the steadier one). The added time is per evaluation, so a shorter run with as
many evaluations as run_train.sh's (3000 steps, a checkpoint every 500) gives an upper
bound of run_train.sh's ratio.
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
from estimator import pictures, progress  # noqa: E402
from estimator import train as train_lib  # noqa: E402
from estimator.config import Config  # noqa: E402
from mmrecall_testing.bench_report import write_report  # noqa: E402


class _Timed(tf.estimator.Exporter):
    """Wraps an exporter and records the seconds of each call."""

    def __init__(self, inner):
        self.inner, self.calls, self.cpu_calls = inner, [], []

    @property
    def name(self):
        return self.inner.name

    def export(self, *args, **kwargs):
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            return self.inner.export(*args, **kwargs)
        finally:
            self.calls.append(round(time.perf_counter() - start, 3))
            self.cpu_calls.append(round(time.process_time() - cpu_start, 3))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a `mmrecall prep` directory")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides (default: a checkpoint every steps / 6, no "
                             "eval throttle: run_train.sh's six evaluations)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "pictures_cost.json"))
    args = parser.parse_args(argv)
    prep = PrepDir(args.data)
    cfg = Config.from_dict({"train_steps": args.steps,
                            "save_checkpoints_steps": max(1, args.steps // 6),
                            "eval_throttle_secs": 0}).with_overrides(args.set)
    timed = _Timed(pictures.PicturesExporter(prep))
    with tempfile.TemporaryDirectory() as root:
        start, cpu_start = time.perf_counter(), time.process_time()
        train_lib.train(cfg, prep, os.path.join(root, "model"),
                        exporters=[progress.EvalLinePrinter(lambda line: None), timed])
        total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    added, cpu_added = sum(timed.calls), sum(timed.cpu_calls)
    report = {"steps": args.steps, "overrides": args.set, "evaluations": len(timed.calls),
              "call_seconds": timed.calls, "total_seconds": round(total, 2),
              "baseline_seconds": round(total - added, 2), "added_seconds": round(added, 2),
              "ratio": round(added / (total - added), 4),
              "cpu_call_seconds": timed.cpu_calls, "cpu_total_seconds": round(cpu_total, 2),
              "cpu_baseline_seconds": round(cpu_total - cpu_added, 2),
              "cpu_added_seconds": round(cpu_added, 2),
              "cpu_ratio": round(cpu_added / (cpu_total - cpu_added), 4)}
    print(json.dumps(report, indent=1))
    print("wrote", write_report(args.out, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
