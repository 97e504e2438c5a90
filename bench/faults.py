"""Fault-injection campaigns against `mmrecall prep`: cases tried / passed.

Generates small competition-format inputs (mmrecall_testing.tsv_fixtures.prep_inputs) and an
uninterrupted reference run per setting (1 or 2 workers, plain or --gzip), then, for each
case, a fresh output directory and one fault:
  kill  prep SIGKILLed 1-3 times at uniformly random moments within a full run's wall time
        (each restart resuming the last), then run to completion;
  flip  a finished prep with one byte of a random shard flipped (same size): `--verify` must
        report that file and change nothing, a rerun must rewrite it.
A case passes when the final output is byte-identical to the reference (shards, sidecars,
rejects, vocabulary, word2vec vectors, manifest) with no temporary file left, and `mmrecall
prep --verify` accepts it. tests/faults_test.py runs three kill cases of the same kind.

  python bench/faults.py [--cases 40] [--seed 0] [--json bench/results/faults.json]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from mmrecall_testing import tsv_fixtures as fx
from mmrecall_testing.bench_report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"1 worker": ["--workers", "1"], "2 workers": ["--workers", "2"],
            "1 worker gzip": ["--workers", "1", "--gzip"]}


def _verify(out: str) -> List[str]:
    """Problems `mmrecall prep --verify` prints for out (its stderr lines)."""
    done = subprocess.run([sys.executable, "-m", "data_prep.prep", "--verify", out], cwd=REPO,
                          capture_output=True, text=True)
    return done.stderr.strip().splitlines() if done.returncode else []


def kill_case(rng: np.random.Generator, argv: List[str], out: str, reference: Dict[str, bytes],
              seconds: float) -> dict:
    """One kill case; returns {"delays_s", "problems"}."""
    delays = rng.uniform(0.05, seconds, int(rng.integers(1, 4))).round(3).tolist()
    problems = fx.kill_and_resume(argv, out, delays, reference, REPO)
    return {"delays_s": delays, "problems": problems or _verify(out)}


def flip_case(rng: np.random.Generator, argv: List[str], out: str, reference_dir: str,
              reference: Dict[str, bytes]) -> dict:
    """One flip case; returns {"file", "offset", "problems"}."""
    shutil.copytree(reference_dir, out)
    record_files = sorted(name for name in reference if ".tfrecord" in name)
    name = record_files[int(rng.integers(len(record_files)))]
    path = os.path.join(out, name)
    data = bytearray(reference[name])
    offset = int(rng.integers(len(data)))
    data[offset] ^= 1 << int(rng.integers(8))
    with open(path, "wb") as f:
        f.write(bytes(data))
    problems = []
    before = fx.dir_files(out)
    reported = _verify(out)
    if len(reported) != 1 or path not in reported[0]:
        problems.append(f"--verify reported {reported}, expected one line naming {path}")
    if fx.dir_files(out) != before:
        problems.append("--verify changed the directory")
    fx.run_prep(argv, REPO)
    got = fx.comparable(fx.dir_files(out))
    problems += [f"{n}: differs after the rerun" for n in sorted(reference)
                 if got.get(n) != reference[n]]
    return {"file": name, "offset": offset, "problems": problems or _verify(out)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=40, help="cases per kind (kill, flip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "faults.json"))
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    work = tempfile.mkdtemp(prefix="faults_bench_")
    start = time.perf_counter()
    results = {"kill": [], "flip": []}
    try:
        inputs = fx.prep_inputs(work, args.seed)
        references = {}
        for name, extra in SETTINGS.items():
            ref_dir = os.path.join(work, f"reference {name}")
            seconds = fx.run_prep(fx.prep_argv(inputs, ref_dir, *extra), REPO)
            references[name] = (ref_dir, fx.comparable(fx.dir_files(ref_dir)), seconds)
        names = list(SETTINGS)
        for i in range(args.cases):
            for kind in ("kill", "flip"):
                setting = names[int(rng.integers(len(names)))]
                ref_dir, reference, seconds = references[setting]
                out = os.path.join(work, f"{kind}-{i}")
                argv_i = fx.prep_argv(inputs, out, *SETTINGS[setting])
                case = (kill_case(rng, argv_i, out, reference, seconds) if kind == "kill"
                        else flip_case(rng, argv_i, out, ref_dir, reference))
                results[kind].append({"setting": setting, **case})
                shutil.rmtree(out, ignore_errors=True)
                print(f"{kind} {i + 1}/{args.cases} ({setting}): "
                      f"{'ok' if not case['problems'] else case['problems']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": {kind: {"tried": len(cases), "passed": sum(not c["problems"] for c in cases)}
                    for kind, cases in results.items()},
        "cases": results,
    }
    print(json.dumps(report["summary"]))
    write_report(args.json, report)
    print(f"wrote {args.json}")
    return 0 if all(s["tried"] == s["passed"] for s in report["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
