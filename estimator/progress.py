"""Readable progress for `mmrecall train`: one line per logging interval, one per eval.

    step 150/2000 (7.5%)  12.3 steps/s  elapsed 0:00:12  eta 0:02:30
    eval @ step 500: ndcg@5 0.8123  ndcg@5_cross 0.8010  ndcg@5_tower 0.7702  auc 0.9312 ...

`ProgressHook` is a SessionRunHook the chief adds to its training hooks (rate over the last
interval; ETA = remaining steps / that rate). `EvalLinePrinter` is an Exporter: the
Estimator calls every exporter of the EvalSpec after each evaluation with its results,
which is the one public callback there is; it exports nothing.
"""
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf

# The eval keys printed first, in this order; the other scalar keys follow sorted.
_EVAL_KEYS = ("ndcg@5", "ndcg@5_cross", "ndcg@5_tower", "auc", "loss")


def format_duration(seconds: float) -> str:
    """H:MM:SS of a non-negative number of seconds ("?" when not finite)."""
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, steps_per_sec: float, elapsed: float) -> str:
    """One progress line; the ETA assumes the current rate holds."""
    pct = 100.0 * step / total if total else 0.0
    eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    return (f"step {step}/{total} ({pct:.1f}%)  {steps_per_sec:.2f} steps/s  "
            f"elapsed {format_duration(elapsed)}  eta {format_duration(eta)}")


def eval_line(eval_result: Dict[str, object]) -> str:
    """One line of an evaluation's scalar results (4 decimals), headline metrics first."""
    scalars = {k: float(v) for k, v in eval_result.items()
               if k != "global_step" and not isinstance(v, bytes) and np.ndim(v) == 0}
    keys = [k for k in _EVAL_KEYS if k in scalars]
    keys += sorted(k for k in scalars if k not in _EVAL_KEYS)
    step = eval_result.get("global_step", "?")
    return f"eval @ step {step}: " + "  ".join(f"{k} {scalars[k]:.4f}" for k in keys)


class ProgressHook(tf.compat.v1.train.SessionRunHook):
    """Prints a progress line every `every_n_steps` global steps and at the end.

    Args:
      total_steps: the global step training stops at (Config.train_steps).
      every_n_steps: the interval (Config.log_step_count_steps).
      print_fn: where lines go (default: print to stdout, flushed).
      clock: seconds, monotonic (tests pass a fake).
    """

    def __init__(self, total_steps: int, every_n_steps: int,
                 print_fn: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self._total = int(total_steps)
        self._every = max(int(every_n_steps), 1)
        self._print = print_fn or (lambda line: print(line, file=sys.stdout, flush=True))
        self._clock = clock
        self._global_step = None
        self._start = self._last_time = 0.0
        self._last_step = self._step = None
        self._rate = 0.0

    def begin(self):
        self._global_step = tf.compat.v1.train.get_global_step()
        if self._global_step is None:
            raise RuntimeError("ProgressHook needs a global step")

    def after_create_session(self, session, coord):
        del coord
        self._step = self._last_step = int(session.run(self._global_step))
        self._start = self._last_time = self._clock()

    def before_run(self, run_context):
        return tf.compat.v1.train.SessionRunArgs(self._global_step)

    def after_run(self, run_context, run_values):
        # The fetched value may be read before or after this run's increment; once per
        # interval the exact step is read back (one small extra session run).
        self._step = int(run_values.results) + 1
        if self._step - self._last_step >= self._every:
            self._step = int(run_context.session.run(self._global_step))
            self._report()

    def end(self, session):
        self._step = int(session.run(self._global_step))
        if self._step is not None and self._step != self._last_step:
            self._report()

    def _report(self):
        now = self._clock()
        if now > self._last_time:
            self._rate = (self._step - self._last_step) / (now - self._last_time)
        self._print(progress_line(self._step, self._total, self._rate, now - self._start))
        self._last_step, self._last_time = self._step, now


class EvalLinePrinter(tf.estimator.Exporter):
    """An Exporter that prints `eval_line` of each evaluation and exports nothing."""

    def __init__(self, print_fn: Optional[Callable[[str], None]] = None):
        self._print = print_fn or (lambda line: print(line, file=sys.stdout, flush=True))

    @property
    def name(self):
        return "eval_line"

    def export(self, estimator, export_path, checkpoint_path, eval_result,
               is_the_final_export):
        del estimator, export_path, checkpoint_path, is_the_final_export
        self._print(eval_line(eval_result))
        return None
