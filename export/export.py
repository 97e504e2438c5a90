"""`mmrecall export`: a versioned TF Serving SavedModel from an Estimator checkpoint.

    mmrecall export --model-dir DIR --data PREP_DIR --export-dir OUT [--checkpoint CKPT|best]
                    [--model-name NAME] [--warmup-tsv valid.tsv] [--list-stage fit|off|FILE]

writes OUT/<unix timestamp>/ (export.saved_model), prints the list stage it serves with
its out-of-fold figures, then the version's path (the last line).
"""
import argparse
import json
import os
import sys
from typing import Optional, Sequence

from data_prep.manifest import PrepDir
from export import best_exporter
from export import list_fit
from export import saved_model
from export import warmup

BEST = "best"   # --checkpoint value: the best evaluated checkpoint (best_exporter)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command's flags (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="mmrecall export", description="write a TF Serving SavedModel from a checkpoint")
    parser.add_argument("--model-dir", required=True, help="Estimator model directory")
    parser.add_argument("--data", required=True, help="the `mmrecall prep` output directory")
    parser.add_argument("--export-dir", required=True,
                        help="base directory; the version goes into EXPORT_DIR/<timestamp>/")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint prefix (default latest), or 'best': the one of the "
                             "best valid NDCG@5 that training's best exporter kept "
                             "(MODEL_DIR/export/best_ndcg; the latest when none was kept)")
    parser.add_argument("--model-name", default=warmup.DEFAULT_MODEL_NAME,
                        help="model name used in the warm-up requests (models.config name)")
    parser.add_argument("--warmup-tsv", default=None,
                        help="competition TSV (e.g. valid.tsv): its first query group becomes "
                             "the warm-up requests (default: generated requests)")
    parser.add_argument("--list-stage", default=None,
                        help="the rank signature's list stage: 'fit' (on the prep's "
                             "labelled valid lists, 5-fold: the first stage's tower weight, "
                             "then pseudo-relevance feedback over it, each kept only if it "
                             "beats the trained behaviour by 2 (weight) or 2.5 (PRF) "
                             "standard errors), 'off' (the trained first stage), or a params "
                             "JSON file {weight, m, iterations} or an earlier export's "
                             "mmrecall_export.json (default: fit when the prep has a valid "
                             "split, else off)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Writes the SavedModel version and prints its directory; returns the exit status."""
    args = parse_args(argv)
    checkpoint = args.checkpoint
    if checkpoint == BEST:
        best = best_exporter.best_checkpoint(args.model_dir)
        if best is None:
            print(f"no best checkpoint or best export with its weights under "
                  f"{args.model_dir}/export/{best_exporter.DEFAULT_NAME}: exporting the latest "
                  f"checkpoint")
            checkpoint = None
        else:
            checkpoint, record = best
            print(f"best evaluated checkpoint: {record['checkpoint']} "
                  f"(valid {record['metric']} {record['value']:.4f}), from {checkpoint}")
    path = saved_model.export_saved_model(
        args.model_dir, PrepDir(args.data), args.export_dir, checkpoint,
        model_name=args.model_name, warmup_tsv=args.warmup_tsv, list_stage=args.list_stage)
    with open(os.path.join(path, "assets.extra", saved_model.METADATA_FILE),
              encoding="utf-8") as f:
        print(list_fit.describe(json.load(f)["list_stage"]))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
