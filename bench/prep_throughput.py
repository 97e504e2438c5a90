"""Throughput of `mmrecall prep` against a decode-only baseline, measured in one run.

Generates its own competition-format TSV (random rows via tsv.encode_row), then times:
  decode  read the TSV line by line, split on tabs, base64-decode boxes/features/labels,
          np.frombuffer: the least any reader must do;
  prep_1  prep.run with 1 worker (in the main process);
  prep_2  prep.run with 2 worker processes.
Prep rates are over the shard-writing phase (workers started and warm, vocabulary/word2vec
excluded); end-to-end wall times are reported beside them. The three are interleaved
`--repeats` times and the best of each is reported (all runs are in the JSON).
Targets: prep_1 >= 0.5 x decode, prep_2 >= 1.7 x prep_1.

  python bench/prep_throughput.py [--rows 3000] [--json bench/results/prep_throughput.json]
"""
import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from data_prep import prep, schema, tsv

WORDS = ("red", "dress", "knives", "wooden", "storage", "box", "children", "shoes", "silk",
         "scarf", "women's", "folding", "table", "winter", "jacket", "sofa", "earrings",
         "casual", "low-top", "retro", "printing", "crocodile", "shawl", "sandals")


def generate(path: str, rows: int, seed: int) -> None:
    """Writes a train-like TSV: ~3.8 boxes per row, 80% of features exact zeros."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(tsv.HEADER_LINE + "\n")
        for i in range(rows):
            n = 1 + int(rng.poisson(2.8))
            top, left = rng.integers(0, 400, n), rng.integers(0, 400, n)
            boxes = np.stack([top, left, top + rng.integers(1, 400, n),
                              left + rng.integers(1, 400, n)], 1)
            features = rng.random((n, schema.FEATURE_DIM), dtype=np.float32) * 5
            features[features < 4] = 0
            query = " ".join(rng.choice(WORDS, int(rng.integers(2, 7))))
            f.write(tsv.encode_row(100_000_000 + i, 800, 800, boxes, features,
                                   rng.integers(0, schema.NUM_CLASSES, n), query,
                                   i // 3) + "\n")


def decode_only(path: str) -> dict:
    """Wall and CPU seconds to read, split and base64-decode every row (the baseline)."""
    start, cpu = time.perf_counter(), time.process_time()
    with open(path, "rb") as f:
        f.readline()
        for line in f:
            fields = line.rstrip(b"\n").split(b"\t")
            np.frombuffer(base64.b64decode(fields[4]), "<f4")
            np.frombuffer(base64.b64decode(fields[5]), "<f4")
            np.frombuffer(base64.b64decode(fields[6]), "<i8")
    return {"shards_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def time_prep(path: str, workers: int, rows_per_shard: int) -> dict:
    out = tempfile.mkdtemp(prefix=f"prep_bench_w{workers}_")
    try:
        start = time.perf_counter()
        result = prep.run(prep.PrepOptions(out=out, train=path, workers=workers,
                                           rows_per_shard=rows_per_shard, progress=False,
                                           w2v_epochs=1))
        wall = time.perf_counter() - start
        return {"wall_s": wall, **{f"{k}_s": v for k, v in result["seconds"].items()},
                "rows": result["manifest"]["splits"]["train"]["rows"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--rows-per-shard", type=int, default=256,
                   help="small, so the few rows still make enough shards for 2 workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs; best is reported")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "prep_throughput.json"))
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="prep_bench_")
    runs = {"decode": [], "prep_1": [], "prep_2": []}
    try:
        path = os.path.join(work, "train.tsv")
        generate(path, args.rows, args.seed)
        mb = os.path.getsize(path) / 1e6
        decode_only(path)  # warm the page cache
        # Interleaved repeats, best of each: the machine is shared, and the least disturbed
        # run is the closest to what the code costs.
        for _ in range(args.repeats):
            runs["decode"].append(decode_only(path))
            runs["prep_1"].append(time_prep(path, 1, args.rows_per_shard))
            runs["prep_2"].append(time_prep(path, 2, args.rows_per_shard))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def best(name):
        run = min(runs[name], key=lambda r: r["shards_s"])
        seconds = run["shards_s"]
        return {**run, "rows_per_s": args.rows / seconds, "mb_per_s": mb / seconds,
                "all_shards_s": [r["shards_s"] for r in runs[name]]}

    report = {
        "rows": args.rows, "tsv_mb": mb, "rows_per_shard": args.rows_per_shard,
        "repeats": args.repeats, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        "decode": best("decode"), "prep_1": best("prep_1"), "prep_2": best("prep_2"),
    }
    decode_s = report["decode"]["shards_s"]
    prep_1, prep_2 = report["prep_1"], report["prep_2"]
    report["ratio_prep1_vs_decode"] = decode_s / prep_1["shards_s"]
    report["ratio_prep2_vs_prep1"] = prep_1["shards_s"] / prep_2["shards_s"]
    report["targets_met"] = {"prep1_ge_half_decode": report["ratio_prep1_vs_decode"] >= 0.5,
                             "prep2_ge_1.7x_prep1": report["ratio_prep2_vs_prep1"] >= 1.7}
    # CPU seconds do not depend on how busy the shared machine is: per-row cost, and the
    # 2-worker speed-up the work allows on 2 free cores (workers share the chunk CPU, the
    # main process streams alongside).
    cpu_decode = min(r["cpu_s"] for r in runs["decode"])
    cpu_1 = min(r["shards_chunk_cpu_s"] for r in runs["prep_1"])
    cpu_2 = min(r["shards_chunk_cpu_s"] for r in runs["prep_2"])
    main_2 = min(r["shards_main_cpu_s"] for r in runs["prep_2"])
    report["cpu"] = {
        "decode_us_per_row": 1e6 * cpu_decode / args.rows,
        "prep_1_us_per_row": 1e6 * cpu_1 / args.rows,
        "prep_2_workers_us_per_row": 1e6 * cpu_2 / args.rows,
        "prep_2_main_us_per_row": 1e6 * main_2 / args.rows,
        "ratio_prep1_vs_decode": cpu_decode / cpu_1,
        "prep2_speedup_on_2_free_cores": cpu_1 / max(cpu_2 / 2, main_2),
    }
    for name in ("decode", "prep_1", "prep_2"):
        r = report[name]
        wall = f"   end to end {r['wall_s']:.1f} s (startup {r['startup_s']:.1f} s, vocab + " \
               f"word2vec + manifest {r['finalize_s']:.1f} s)" if "wall_s" in r else ""
        print(f"{name:7s} {r['rows_per_s']:7.0f} rows/s {r['mb_per_s']:7.1f} MB/s{wall}")
    print(f"prep_1 / decode = {report['ratio_prep1_vs_decode']:.2f} (target >= 0.5)   "
          f"prep_2 / prep_1 = {report['ratio_prep2_vs_prep1']:.2f} (target >= 1.7)   "
          f"load avg {report['load_avg_1m']:.1f} on {report['cpus']} cpus")
    c = report["cpu"]
    print(f"CPU per row: decode {c['decode_us_per_row']:.0f} us, prep_1 "
          f"{c['prep_1_us_per_row']:.0f} us, prep_2 workers {c['prep_2_workers_us_per_row']:.0f}"
          f" us + main {c['prep_2_main_us_per_row']:.0f} us -> decode / prep_1 = "
          f"{c['ratio_prep1_vs_decode']:.2f}, 2-worker speed-up on 2 free cores = "
          f"{c['prep2_speedup_on_2_free_cores']:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
