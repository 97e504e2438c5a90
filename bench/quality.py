"""Quality benchmark: NDCG@5 on valid of five rankers under one data set and one budget.

    python bench/quality.py [--data PREP_DIR] [--steps 1500] [--batch-size 64]
                            [--train-rows 20000] [--valid-queries 150] [--set k=v ...]

Without --data, a data set is generated (`mmrecall generate`) and prepared (`mmrecall prep`)
into a temporary directory. Rows of the table:
  (a) random ranking (mean over 20 random scorings)
  (b) towers alone: dot product of pooled embeddings, trained with the in-batch softmax only
      (same batching as the default: runs of same-type queries); b_towers_plain: the same
      with plain random batches
  (c) full model, the seed's setting: random in-batch negatives, log-loss only, cross score,
      plain random batches
  (d) full model, default config (hard negatives + both losses + same-type runs in
      batches), cross-attention score
  (e) (d)'s model scored by cross score + tower score (the default serving score)
Every trained variant gets the same steps, batch size and seeds. Runs differ by several
points of NDCG@5 from one model seed to the next, so compare variants over several seeds
(`--model-seeds 7,8,9`): each row reports the mean, the spread and every seed's value. Prints a
table and writes JSON (default bench/results/quality.json) after every run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from estimator import input_fn as input_lib  # noqa: E402
from estimator import metrics, train  # noqa: E402
from estimator.config import Config  # noqa: E402

# name -> (description, config overrides, metric key of the eval result)
VARIANTS = {
    "b_towers": ("towers alone, in-batch softmax, dot-product score",
                 {"loss_weights": {"softmax": 1.0}, "num_negatives": 0,
                  "serving_score": "tower"}, "ndcg@5_tower"),
    "b_towers_plain": ("towers alone as (b), plain random batches (no same-type runs)",
                       {"loss_weights": {"softmax": 1.0}, "num_negatives": 0,
                        "serving_score": "tower", "train_group_size": 0}, "ndcg@5_tower"),
    "c_seed": ("full model, random negatives, log-loss only, plain batches (seed design)",
               {"sampler": "random", "loss_weights": {"log_loss": 1.0},
                "serving_score": "cross", "train_group_size": 0}, "ndcg@5_cross"),
    "d_full": ("full model = default config (hard negatives, both losses), cross score",
               {"sampler": "hard", "loss_weights": {"log_loss": 1.0, "softmax": 1.0},
                "serving_score": "sum"}, "ndcg@5_cross"),
}
# (e) is read from (d)'s run: its serving score "sum" = cross + tower.
E_FROM = ("d_full", "ndcg@5")


def generate_and_prep(work_dir, train_rows, valid_queries, seed, max_boxes):
    raw, prep = os.path.join(work_dir, "raw"), os.path.join(work_dir, "prep")
    subprocess.run(["mmrecall", "generate", "--out", raw, "--seed", str(seed),
                    "--train-rows", str(train_rows), "--valid-queries", str(valid_queries),
                    "--test-queries", "0"], check=True)
    subprocess.run(["mmrecall", "prep", "--out", prep,
                    "--train", os.path.join(raw, "train.tsv"),
                    "--valid", os.path.join(raw, "valid.tsv"),
                    "--valid-answers", os.path.join(raw, "valid_answer.json"),
                    "--max-boxes", str(max_boxes), "--no-progress"], check=True)
    return prep


def valid_labels(data_dir, cfg):
    """(labels, query_ids) of the valid split in file order, read with the eval pipeline."""
    import tensorflow as tf

    ds = input_lib.input_fn_builder(cfg, input_lib.split_files(data_dir, "valid"),
                                    tf.estimator.ModeKeys.EVAL, data_dir=data_dir)()
    labels, qids = [], []
    for features, y in ds:
        labels.append(y.numpy())
        qids.append(features["query_id"].numpy())
    return np.concatenate(labels), np.concatenate(qids)


def _summary_row(name, description, key, runs):
    """One table row: mean and population std of `key` over the seeds' eval results."""
    values = [float(r["eval"][key]) for r in runs]
    return {"variant": name, "description": description, "metric": key,
            "ndcg@5": float(np.mean(values)), "ndcg@5_std": float(np.std(values)),
            "per_seed": values, "seconds": round(sum(r["seconds"] for r in runs), 1),
            "runs": runs}


def _write_report(args, data, base, labels, qids, rows):
    """Writes the JSON (after every variant, so a partial run keeps its results)."""
    report = {"data": data, "steps": args.steps, "batch_size": args.batch_size,
              "valid_rows": int(labels.size), "valid_queries": int(len(np.unique(qids))),
              "overrides": args.set, "base_config": json.loads(base.to_json()), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="an existing prep directory (else generate + prep)")
    parser.add_argument("--work-dir", help="where to put data and models (default: temp)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--valid-queries", type=int, default=150)
    parser.add_argument("--max-boxes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7, help="data generation seed")
    parser.add_argument("--model-seeds", default="7",
                        help="comma-separated Config.seed values; each variant trains once per "
                             "seed and reports the mean")
    parser.add_argument("--variants", default="d_full,b_towers,c_seed,b_towers_plain",
                        help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every variant")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "quality.json"))
    args = parser.parse_args(argv)

    work = args.work_dir or tempfile.mkdtemp(prefix="mmrecall-quality-")
    os.makedirs(work, exist_ok=True)
    data = args.data or generate_and_prep(work, args.train_rows, args.valid_queries,
                                          args.seed, args.max_boxes)
    base = Config().with_overrides(args.set)
    base = Config.from_dict({"train_steps": args.steps, "batch_size": args.batch_size,
                             "save_checkpoints_steps": args.steps, "eval_throttle_secs": 0,
                             "seed": args.seed, "log_step_count_steps": 100,
                             "save_summary_steps": 100}, base)
    base = train.resolve_config(base, data)

    labels, qids = valid_labels(data, base)
    rng = np.random.RandomState(args.seed)
    random_ndcg = float(np.mean([metrics.ndcg_numpy(rng.uniform(size=labels.size), labels, qids)
                                 for _ in range(20)]))
    rows = [{"variant": "a_random", "description": "random ranking (mean of 20)",
             "ndcg@5": random_ndcg, "seconds": 0.0}]
    _write_report(args, data, base, labels, qids, rows)
    print(f"(a) random ranking: NDCG@5 {random_ndcg:.4f}", flush=True)

    seeds = [int(x) for x in args.model_seeds.split(",") if x]
    for name in [v for v in args.variants.split(",") if v]:
        description, overrides, key = VARIANTS[name]
        runs = []
        for seed in seeds:
            cfg = Config.from_dict(dict(overrides, seed=seed), base)
            model_dir = os.path.join(work, "models", name if len(seeds) == 1 else
                                     f"{name}-seed{seed}")
            start = time.time()
            out = train.train(cfg, data, model_dir)
            runs.append({"seed": seed, "seconds": round(time.time() - start, 1),
                         "eval": {k: v for k, v in out.items() if np.ndim(v) == 0}})
            print(f"({name}) seed {seed}: NDCG@5 {out[key]:.4f} in {runs[-1]['seconds']:.0f}s",
                  flush=True)
        rows.append(_summary_row(name, description, key, runs))
        print(f"({name}) {description}: NDCG@5 {rows[-1]['ndcg@5']:.4f} "
              f"+- {rows[-1]['ndcg@5_std']:.4f} over {len(runs)} seed(s)", flush=True)
        if name == E_FROM[0]:
            rows.append(_summary_row("e_full_sum", "(d)'s model, cross score + tower score",
                                     E_FROM[1], runs))
        _write_report(args, data, base, labels, qids, rows)

    print("\n| variant | description | NDCG@5 (mean) | std | per seed | seconds |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        per_seed = " ".join(f"{v:.3f}" for v in r.get("per_seed", []))
        print(f"| {r['variant']} | {r['description']} | {r['ndcg@5']:.4f} | "
              f"{r.get('ndcg@5_std', 0.0):.4f} | {per_seed} | {r['seconds']} |")
    _write_report(args, data, base, labels, qids, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
