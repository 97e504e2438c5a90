"""`mmrecall prep-merge`: joins the outputs of `mmrecall prep --shard-index i --num-shards n`.

Each machine wrote the shards k with k % n == i and a partial manifest. Merging gathers every
shard and its sidecars into one directory (hard links where possible, else copies), checks
that each shard of each split is there exactly once with the same settings, and runs
engine.finalize: the vocabulary, word2vec (trained once, on the merged corpus in shard order)
and the manifest come out the same as those of a one-machine run.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import time
from typing import Dict, List

from data_prep import engine, schema, shards, text
from data_prep.os_errors import os_error_line


def build_parser() -> argparse.ArgumentParser:
    """The `mmrecall prep-merge` argument parser."""
    p = argparse.ArgumentParser(
        prog="mmrecall prep-merge",
        description="Merge per-machine `mmrecall prep --shard-index i --num-shards n` outputs "
                    "into DIR and write its vocabulary, word2vec and manifest.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="merged output directory (may be one of the part directories)")
    p.add_argument("parts", nargs="+", metavar="PART_DIR",
                   help="directories holding partial outputs (may include DIR itself)")
    return p


def _load_partials(part_dirs: List[str]) -> Dict[int, dict]:
    """shard_index -> partial manifest (with its "dir"), checked for consistency."""
    partials: Dict[int, dict] = {}
    for directory in part_dirs:
        paths = sorted(glob.glob(os.path.join(directory, "manifest.part-*-of-*.json")))
        if not paths:
            raise engine.PrepError(f"{directory}: no partial manifest (manifest.part-*.json); "
                                   f"was prep run with --num-shards > 1 there?")
        for path in paths:
            with open(path, encoding="utf-8") as f:
                partial = json.load(f)
            partial["dir"], partial["path"] = directory, path
            index = partial["shard_index"]
            if index in partials and os.path.realpath(partials[index]["dir"]) != \
                    os.path.realpath(directory):
                raise engine.PrepError(f"{path}: shard index {index} also in "
                                       f"{partials[index]['path']}")
            partials[index] = partial
    first = next(iter(partials.values()))
    for partial in partials.values():
        for key in ("schema_version", "settings", "num_shards", "num_chunks", "sources"):
            if partial[key] != first[key]:
                raise engine.PrepError(f"{partial['path']}: {key} {partial[key]} differs from "
                                       f"{first['path']}: {first[key]}")
    missing = sorted(set(range(first["num_shards"])) - set(partials))
    if missing:
        raise engine.PrepError(f"missing the output of machine(s) {missing} of "
                               f"{first['num_shards']} (--shard-index values)")
    return partials


def _place(src: str, dst: str) -> None:
    """Makes dst a hard link to (or else a copy of) src, atomically."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = shards.tmp_name(dst)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem, or no hard links there
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def merge(out_dir: str, part_dirs: List[str]) -> dict:
    """Gathers the parts into out_dir and finalizes it; returns the manifest.

    Raises:
      engine.PrepError: a machine's output or a shard is missing, or settings differ.
    """
    partials = _load_partials(part_dirs)
    first = partials[0]
    num_shards = first["num_shards"]
    os.makedirs(os.path.join(out_dir, shards.STATE_DIR), exist_ok=True)
    for split, num_chunks in first["num_chunks"].items():
        # Temporaries of an earlier merge into out_dir that was killed or failed.
        shards.remove_stale_temporaries(out_dir, split, lambda k: True)
        for k in range(num_chunks):
            src_dir = partials[k % num_shards]["dir"]
            sidecar = shards.load_sidecar(src_dir, split, k)
            if not shards.is_complete(src_dir, sidecar):
                raise engine.PrepError(f"{src_dir}: shard {k} of {split} is missing or "
                                       f"incomplete; rerun that machine's prep")
            if "crc32c" not in sidecar:
                raise engine.PrepError(f"{src_dir}: shard {k} of {split} was written without "
                                       f"a checksum; rerun that machine's prep (it checks the "
                                       f"shard and records one)")
            version = sidecar["fingerprint"].get("normalization_version", 1)
            if version != text.NORMALIZATION_VERSION:
                raise engine.PrepError(f"{src_dir}: shard {k} of {split} has queries normalised "
                                       f"by rules version {version}, this code uses "
                                       f"{text.NORMALIZATION_VERSION}; rerun that machine's prep")
            # The sidecar json goes last: it is what marks the shard as complete.
            for rel in [sidecar["file"]] + sidecar["sidecars"] + \
                       [shards.state_file(split, k, "json")]:
                _place(os.path.join(src_dir, rel), os.path.join(out_dir, rel))
        if split == "valid":
            shards.remove_temporaries(os.path.join(out_dir, shards.STATE_DIR),
                                      [os.path.basename(engine.ANSWERS_STATE)])
            _place(os.path.join(first["dir"], engine.ANSWERS_STATE),
                   os.path.join(out_dir, engine.ANSWERS_STATE))
    options = engine.PrepOptions(out=out_dir, progress=False, **first["settings"])
    return engine.finalize(options, first["sources"], first["num_chunks"])


def main(argv=None) -> int:
    """`mmrecall prep-merge` entry point; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    start = time.perf_counter()
    try:
        manifest = merge(args.out, args.parts)
    except OSError as e:
        print(f"mmrecall prep-merge: error: {os_error_line(e, args.out)}", file=sys.stderr)
        return 1
    except (engine.PrepError, KeyError, ValueError) as e:
        print(f"mmrecall prep-merge: error: {e}", file=sys.stderr)
        return 1
    for split, entry in manifest["splits"].items():
        print(f"{split}: {len(entry['shards'])} shards, {entry['rows']} rows, "
              f"{entry['rejected']} rejected")
    print(f"vocabulary {manifest['vocab_size']} entries; manifest "
          f"{os.path.join(args.out, schema.MANIFEST_FILE)} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
