"""`mmrecall prep`: the command line of the prep engine (data_prep/engine.py).

Competition TSV files -> validated, sharded TFRecords, the lemma vocabulary, word2vec
vectors and a manifest; `--help` lists every option. With --shard-index i --num-shards n a
machine does every n-th chunk of rows and `mmrecall prep-merge` (data_prep/merge.py)
finishes the job. `mmrecall prep --verify DIR` checks a finished prep (every shard's size and
checksum, the vocabulary and word2vec files) without writing anything.

Every failure ends as one line on stderr naming the file and what to do, exit status 1.
"""
import argparse
import dataclasses
import os
import sys
import time

from data_prep import engine, schema, tsv
from data_prep.manifest import PrepDir, PrepDirError
from data_prep.os_errors import os_error_line


def build_parser() -> argparse.ArgumentParser:
    """The `mmrecall prep` argument parser; its destinations are PrepOptions field names."""
    p = argparse.ArgumentParser(
        prog="mmrecall prep",
        description="Validate competition TSV files and write sharded TFRecords "
                    "(DIR/<split>/part-NNNNN.tfrecord), the lemma vocabulary (DIR/vocab.tsv), "
                    "word2vec vectors (DIR/word2vec.npy) and DIR/manifest.json. Bad rows are "
                    "counted and kept in DIR/rejects/<split>.tsv. A rerun resumes: finished "
                    "shards whose input is unchanged and whose bytes match the checksum "
                    "recorded when they were written are kept, the others rewritten.")
    p.add_argument("--out", metavar="DIR", help="output directory (required unless --verify)")
    p.add_argument("--verify", metavar="DIR",
                   help="only check the finished prep in DIR: every shard the manifest lists "
                        "(size and checksum) and the vocabulary/word2vec files; writes "
                        "nothing, prints one line per problem, exits 1 on any")
    p.add_argument("--train", metavar="TSV", help="train.tsv (positive pairs, label 1)")
    p.add_argument("--valid", metavar="TSV", help="valid.tsv (needs --valid-answers)")
    p.add_argument("--valid-answers", metavar="JSON",
                   help='valid_answer.json: {"query_id": [product_id, ...]}')
    p.add_argument("--test", metavar="TSV", help="testA/testB.tsv (label unknown, -1)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1: in the main process)")
    p.add_argument("--rows-per-shard", type=int, default=2048,
                   help="TSV lines per shard (valid/test shards end at a query boundary)")
    p.add_argument("--max-boxes", type=int, default=32,
                   help="keep at most this many boxes per product, the largest (default 32)")
    p.add_argument("--min-count", type=int, default=1,
                   help="vocabulary and word2vec keep lemmas seen this often (default 1)")
    p.add_argument("--embedding-dim", type=int, default=64, help="word2vec width W")
    p.add_argument("--w2v-epochs", type=int, default=5, help="word2vec training epochs")
    p.add_argument("--gzip", action="store_true", help="GZIP-compressed .tfrecord.gz shards")
    p.add_argument("--keep-leading-be", action="store_true",
                   help='keep leading "is/are/be" tokens of queries (dropped by default)')
    p.add_argument("--shard-index", type=int, default=0,
                   help="this machine's index i: do chunks k with k %% n == i")
    p.add_argument("--num-shards", type=int, default=1,
                   help="number of machines n; with n > 1 finish with `mmrecall prep-merge`")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    return p


def options_from_args(args: argparse.Namespace) -> engine.PrepOptions:
    """The engine's options from parsed command-line arguments (unknown names ignored)."""
    names = {f.name for f in dataclasses.fields(engine.PrepOptions)}
    return engine.PrepOptions(**{k: v for k, v in vars(args).items() if k in names})


def _print_first_rejects(source: str, rejects_path: str) -> None:
    """Prints the first rejected lines of a split as `source:line: field: reason: detail`."""
    with open(rejects_path, "rb") as f:
        f.readline()  # header
        for _, line in zip(range(engine.EXAMPLES_SHOWN), f):
            line_no, field, reason, detail, _ = line.decode("utf-8", "replace").split("\t", 4)
            print(f"  {source}:{line_no}: {field}: {reason}: {detail}")


def print_summary(result: dict, out_dir: str, seconds: float) -> None:
    """Prints one line per split: rows kept, rejected by reason, capped, duplicates, shards;
    and one line per finished shard that was rewritten because its check failed."""
    manifest = result["manifest"]
    for split, s in result["splits"].items():
        line = (f"{split}: {s.get('rows', 0)} rows kept, {s.get('rejected', 0)} rejected, "
                f"{s.get('written', 0)} shards written, {s.get('skipped', 0)} reused")
        if s.get("rewritten"):
            line += f", {s['rewritten']} rewritten (failed their check)"
        if manifest:
            m = manifest["splits"][split]
            if m["reject_reasons"]:
                line += " (" + ", ".join(f"{r}: {n}" for r, n in m["reject_reasons"].items()) + ")"
            line += f"; {m['capped']} products capped at {manifest['max_boxes']} boxes"
            if m.get("duplicates"):
                line += (f"; {m['duplicates']} duplicate product rows within candidate lists "
                         f"(kept)")
            if m["rejected"]:
                line += f"; rejects in {os.path.join(out_dir, m['rejects_file'])}"
        print(line)
        for why in s.get("rewritten_why", ()):
            print(f"  rewritten: {why}")
        if manifest and manifest["splits"][split]["rejected"]:
            _print_first_rejects(manifest["splits"][split]["source"],
                                 os.path.join(out_dir, manifest["splits"][split]["rejects_file"]))
    rows = sum(s.get("rows", 0) + s.get("rejected", 0) for s in result["splits"].values())
    shard_s = result["seconds"]["shards"]
    print(f"{rows} lines in {seconds:.1f} s ({rows / max(shard_s, 1e-9):.0f} lines/s while "
          f"writing shards)")
    if manifest:
        print(f"vocabulary {manifest['vocab_size']} entries; manifest "
              f"{os.path.join(out_dir, schema.MANIFEST_FILE)}")
    else:
        print(f"partial output written; finish with `mmrecall prep-merge --out {out_dir} ...`")


def verify(directory: str) -> int:
    """`mmrecall prep --verify DIR`: prints one line per problem; the exit status."""
    try:
        problems = PrepDir(directory).verify(content=True)
    except PrepDirError as e:
        problems = [str(e)]
    except OSError as e:
        problems = [os_error_line(e, directory)]
    for problem in problems:
        print(f"mmrecall prep --verify: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{directory}: every shard, checksum and vocabulary/word2vec file checks out")
    return 0


def main(argv=None) -> int:
    """`mmrecall prep` entry point; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.verify is None and args.out is None:
            parser.error("the following arguments are required: --out (or --verify DIR)")
    except SystemExit as e:  # --help or a usage error (already printed)
        return int(e.code or 0)
    if args.verify is not None:
        return verify(args.verify)
    options = options_from_args(args)
    start = time.perf_counter()
    try:
        result = engine.run(options)
    except (engine.PrepError, tsv.TsvFormatError) as e:
        print(f"mmrecall prep: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, read-only --out, ...; raised in a worker or here
        print(f"mmrecall prep: error: {os_error_line(e, options.out)}", file=sys.stderr)
        return 1
    print_summary(result, options.out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
