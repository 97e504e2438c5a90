"""`mmrecall`: one command, one subcommand per stage of the pipeline.

Each subcommand exposes `main(argv)` in the module that owns its stage; a command that
joins several packages lives here instead (`train`: the estimator's training loop with
export's best-NDCG exporter, mmrecall_cli/train.py). This file only dispatches, importing
the command's module by name when it runs so that `mmrecall --help` stays fast.
"""
import importlib
import os
import sys

# name -> (module, one-line summary)
SUBCOMMANDS = {
    "generate": ("data_prep.synth", "write a generated data set in the competition's exact format"),
    "prep": ("data_prep.prep", "competition TSV files -> validated, sharded TFRecords + vocabulary + word2vec"),
    "prep-merge": ("data_prep.merge", "merge per-machine prep outputs and train word2vec once"),
    "train": ("mmrecall_cli.train", "train_and_evaluate the ranker (NDCG@5 to TensorBoard)"),
    "cluster-local": ("estimator.cluster_local", "run `train` as a local TF_CONFIG cluster (chief, worker, ps, evaluator)"),
    "export": ("export.export", "write a TF Serving SavedModel (with a fitted list stage)"),
    "rank": ("export.rank", "rank candidate lists with a SavedModel into the submission CSV"),
    "score": ("export.score", "score a submission CSV with NDCG@5 as the organiser did"),
    "index": ("retrieval.index", "embed a catalogue with an export's product tower into a resumable index (ids, embeddings, ANN)"),
    "search": ("retrieval.search", "retrieve a query's products from an index and rerank them with the export (or write the submission CSV)"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: mmrecall <command> [options]   (mmrecall <command> --help for details)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """`mmrecall <command> [options]`: runs the command's `main(options)`; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mmrecall: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
