"""`mmrecall train`: tf.estimator.train_and_evaluate over a `mmrecall prep` directory.

    mmrecall train --data PREP_DIR --model-dir DIR [--steps N] [--config f.json]
                   [--set key=value ...] [--no-export-best] [--no-pictures]

Config precedence: defaults < DIR/config.json (when resuming) < --config < --set < --steps
(estimator.train.config_from_args). The resolved config is written to DIR/config.json.
Training resumes from the latest checkpoint in DIR and runs until the global step reaches
`train_steps` (a total, not an increment). Evaluation on the valid split runs at each
checkpoint (at most every `eval_throttle_secs`) and at the end; each evaluation is printed
as one line ("eval @ step S: ndcg@5 ..."), and the final metrics as JSON. The chief prints
one progress line per `log_step_count_steps` (step / total, steps/s, elapsed, ETA;
estimator.progress). TensorBoard summaries: see estimator.run_summaries; unless
--no-pictures, each evaluation also writes attention heat maps and top-5 lists of fixed
valid queries to DIR/pictures/ and the final one the Embedding Projector's files to
DIR/projector/ (estimator.pictures). Unless --no-export-best, the best SavedModel by valid
NDCG@5 is kept in DIR/export/best_ndcg/ (export.best_exporter.BestNdcgExporter, wired in
here so that the estimator package does not depend on export).

Distributed: with TF_CONFIG set, `train_and_evaluate` runs the chief/worker/ps/evaluator
roles (see `mmrecall cluster-local`); each worker reads a disjoint share of the training
files, the chief writes checkpoints, and the evaluator keeps the best export.
"""
import argparse
import json
import sys
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from data_prep.manifest import PrepDir, PrepDirError
from estimator import pictures, progress
from estimator import train as train_lib
from export.best_exporter import BestNdcgExporter


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command's flags (see the module docstring)."""
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
    parser.add_argument("--no-pictures", action="store_true",
                        help="after each evaluation, do not write the attention heat maps "
                             "and top-5 lists of fixed valid queries (MODEL_DIR/pictures/), "
                             "nor after the last the Embedding Projector's files "
                             "(MODEL_DIR/projector/)")
    return parser.parse_args(argv)


def check_prep(path: str) -> Tuple[Optional[PrepDir], Optional[str]]:
    """Opens and checks the --data directory before anything is created.

    Every file the manifest lists must be there with its recorded size (its content is not
    read: `mmrecall prep --verify` does that), and there must be train rows.

    Returns:
      (the PrepDir, None), or (None, one line naming the path and what to do).
    """
    try:
        prep = PrepDir(path)
    except PrepDirError as e:
        return None, str(e)
    problems = prep.verify(content=False)
    if problems:
        more = (f" (and {len(problems) - 1} more; `mmrecall prep --verify {prep.path}` lists "
                f"them)") if len(problems) > 1 else ""
        return None, problems[0] + more
    if not prep.split_files("train"):
        return None, (f"{prep.path}: the prep has no train rows; rerun mmrecall prep with "
                      f"--train")
    return prep, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Trains and evaluates; prints "final eval: {json}" when there was an evaluation.

    Returns:
      0, or 1 after one line on stderr when --data is not a complete prep (checked before
      the model directory is touched).
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prep, problem = check_prep(args.data)
    if problem:
        print(f"mmrecall train: error: {problem}", file=sys.stderr)
        return 1
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.INFO)
    cfg = train_lib.config_from_args(args)
    # The best export first: the chief may remove an evaluated checkpoint meanwhile.
    exporters = [progress.EvalLinePrinter()]
    if not args.no_export_best:
        exporters.append(BestNdcgExporter(prep))
    if not args.no_pictures:
        exporters.append(pictures.PicturesExporter(prep))
    # Progress lines from the chief only (RunConfig reads TF_CONFIG).
    hooks = ([progress.ProgressHook(cfg.train_steps, cfg.log_step_count_steps)]
             if tf.estimator.RunConfig().is_chief else [])
    metrics = train_lib.train(cfg, prep, args.model_dir, exporters=exporters,
                              train_hooks=hooks)
    if metrics is not None:
        printable = {k: v for k, v in sorted(metrics.items()) if np.ndim(v) == 0}
        print("final eval: " + json.dumps(printable, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
