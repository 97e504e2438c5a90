"""Quality benchmark: served-score NDCG@5 on valid, per data regime, config variant and seed.

    python bench/quality.py [--presets default,hard,cluster] [--variants two_tower,default]
                            [--model-seeds 7,8,9] [--work-dir DIR] [--data PREP_DIR]
                            [--steps N] [--batch-size N] [--train-rows N]
                            [--valid-queries 150] [--max-boxes N] [--seed 7] [--set k=v ...]
                            [--export-fit]

Data: each preset of `mmrecall generate` (data_prep.synth.PRESETS) is generated at the data
seed `--seed` and prepared once into WORK_DIR/data/<preset>-..., reused by later runs with
the same work directory and data flags. `--data PREP_DIR` uses one existing prep instead.

Variants are named Config override sets (VARIANTS), each with its own training budget:
  two_tower       the plain two-tower baseline: 1-layer transformer per tower, the 8
                  largest boxes, mean pooling, raw region features, cosine / 0.1, in-batch
                  softmax only, plain random batches, width 128, batch 128, dropout 0,
                  Adam 1e-3 (constant, no clipping), 800 steps; towers only (no matcher)
  default         the Config defaults and their steps
  b_towers, b_towers_plain, c_seed, d_full, d_tower
                  single changes of the default (towers alone; the plainest full model;
                  the default scored by its cross logit only, or by its towers only),
                  at the default budget
A variant spec may add changes to a name: `default+pooling=mean`,
`two_tower+hidden_size=64+pooled_size=64` (values as in `--set`); `--variants ablations`
runs ABLATIONS, one setting at a time between the default and the two-tower in both
directions plus the other settings the issue lists (temperature, cross_to_tower_gradient,
sampler, K, focal / listwise / dual-path instance losses, score weights, word2vec freezing,
steps).
`--steps` / `--batch-size` force one budget on every variant (e.g. a quick smoke run);
`--set` applies to every variant after its own overrides.

Every run reports the trained serving score's NDCG@5 ("ndcg@5", as the Estimator evaluates
it) unless its variant names another metric. `--export-fit` adds, per run, what `mmrecall
export` would serve, out of fold on the valid lists (export.list_fit.fit_lists): the first
stage with its tower weight fitted, and that first stage plus the fitted list stage (the
`rank` signature's scores); each gets its own row. Per preset and variant the table gives the mean, the
population std over model seeds, every seed's value and the wall time per run (training and
evaluation; threads follow the CPUs the process may use, e.g. `taskset -c 1`). A random
ranking row per preset gives the floor. The JSON (default bench/results/quality.json) is
rewritten after every run; finished runs are kept in their model directories
(bench_result.json, the directory named by the config's digest) and reused when the bench
is started again with the same work dir, or by another variant of the same config.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from data_prep import synth  # noqa: E402
from data_prep.manifest import PrepDir, PrepDirError  # noqa: E402
from estimator import input_fn as input_lib  # noqa: E402
from estimator import train  # noqa: E402
from estimator.config import Config, parse_assignments  # noqa: E402
from export import list_fit, score  # noqa: E402
from mmrecall_testing.bench_report import write_report  # noqa: E402

SERVED = "ndcg@5"
RESULT_FILE = "bench_result.json"
EXPORT_FIT_FILE = "bench_export_fit.json"
# With --export-fit, per run: the export's fit on the valid lists (export.list_fit.fit_lists).
EXPORT_FIT_METRICS = {
    "export/first_stage_fitted": "served first stage: tower weight fitted (out of fold)",
    "export/served": "served ranking: fitted first stage + list stage (out of fold)",
}

# The plain two-tower of the issue: what a one-minute baseline gets on the same data.
TWO_TOWER = {
    "text_layers": 1, "box_layers": 1, "max_boxes": 8, "pooling": "mean",
    "region_features": "raw", "serving_score": "tower", "temperature": 0.1,
    "loss_weights": {"softmax": 1.0}, "num_negatives": 0, "train_group_size": 0,
    "batch_by_boxes": False, "hidden_size": 128, "pooled_size": 128, "intermediate_size": 256,
    "batch_size": 128,
    "dropout": 0.0, "optimizer": "adam", "learning_rate": 1e-3, "warmup_steps": 0,
    "decay": "constant", "weight_decay": 0.0, "clip_norm": 0.0, "train_steps": 800,
}

# name -> (description, config overrides, metric key of the eval result)
VARIANTS = {
    "two_tower": ("plain two-tower baseline (towers only, 800 steps x 128)", TWO_TOWER, SERVED),
    "default": ("Config defaults", {}, SERVED),
    "b_towers": ("towers alone, in-batch softmax, dot-product score",
                 {"loss_weights": {"softmax": 1.0}, "num_negatives": 0,
                  "serving_score": "tower"}, SERVED),
    "b_towers_plain": ("towers alone as b_towers, plain random batches (no same-type runs)",
                       {"loss_weights": {"softmax": 1.0}, "num_negatives": 0,
                        "serving_score": "tower", "train_group_size": 0,
                        "batch_by_boxes": False}, SERVED),
    "c_seed": ("full model, random negatives, log-loss only, plain batches (plainest)",
               {"sampler": "random", "loss_weights": {"log_loss": 1.0},
                "serving_score": "cross", "train_group_size": 0, "batch_by_boxes": False},
               SERVED),
    "d_full": ("default config scored by its cross logit only", {}, "ndcg@5_cross"),
    "d_tower": ("default config scored by its towers' cosine only", {}, "ndcg@5_tower"),
}

# `--variants ablations`: one difference between the default and the two-tower at a time,
# in both directions, then the other settings the issue lists (spec syntax: variant_spec).
_TWO_TOWER_STEPS = [  # each moves one setting of the default to the two-tower's value
    "pooling=mean", "region_features=raw", "temperature=0.1", "dropout=0", "dropout=0.1",
    "optimizer=adam+warmup_steps=0+decay=constant+weight_decay=0+clip_norm=0",
    "train_group_size=0", "batch_by_boxes=false", 'loss_weights={"softmax":1}',
    "train_steps=800",
]
_DEFAULT_STEPS = [  # the reverse: each moves one setting of the two-tower to the default's
    "pooling=attention", "region_features=log1p", "temperature=0.05", "dropout=0.05",
    "optimizer=adamw+warmup_steps=100+decay=cosine+weight_decay=0.01+clip_norm=1",
    "train_group_size=8", "batch_by_boxes=true", "train_steps=2000",
    'loss_weights={"softmax":1,"log_loss":1}+num_negatives=4',
]
_OTHER_STEPS = [  # settings of the default the issue asks to ablate beyond the differences
    "hidden_size=64+pooled_size=64+intermediate_size=128", "max_boxes=0", "temperature=0.025",
    "temperature=0.2", "cross_to_tower_gradient=0",
    "cross_to_tower_gradient=1", "sampler=random", "sampler=mixed", "num_negatives=8",
    'loss_weights={"softmax":1,"focal":1}', 'loss_weights={"softmax":1,"cross_softmax":1}',
    'loss_weights={"softmax":1,"log_loss":0.3}',
    'loss_weights={"softmax":1,"log_loss":1,"instance":1}',
    'loss_weights={"softmax":1,"log_loss":1,"instance":0.3}', "serving_score=sum",
    "serving_score=cross", "batch_size=64", "trainable_embeddings=false",
    "train_steps=1000", "train_steps=4000",
]
ABLATIONS = ([f"default+{c}" for c in _TWO_TOWER_STEPS + _OTHER_STEPS]
             + [f"two_tower+{c}" for c in _DEFAULT_STEPS])


def variant_spec(spec: str):
    """(description, overrides, metric key) of a variant spec.

    A spec is a VARIANTS name, optionally followed by `+key=value` changes (values as in
    `--set`), e.g. `default+pooling=mean` or `two_tower+hidden_size=64+pooled_size=64`.

    Raises:
      ValueError: an unknown variant name or a malformed change.
    """
    name, *changes = spec.split("+")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known {sorted(VARIANTS)}")
    description, overrides, key = VARIANTS[name]
    if not changes:
        return VARIANTS[name]
    return (f"{name} with {', '.join(changes)}",
            dict(overrides, **parse_assignments(changes)), key)


def split_specs(text: str) -> List[str]:
    """Comma-separated specs; commas inside {...} or [...] (JSON values) do not split, and
    `ablations` expands to ABLATIONS."""
    specs, depth, current = [], 0, ""
    for char in text + ",":
        depth += (char in "{[") - (char in "}]")
        if char == "," and depth == 0:
            specs.extend(ABLATIONS if current == "ablations" else [current] if current else [])
            current = ""
        else:
            current += char
    return specs


def data_dir_name(preset: str, seed: int, train_rows, valid_queries: int, max_boxes) -> str:
    """The cache directory name of one generated + prepared data set (its data flags)."""
    rows = "preset" if train_rows is None else train_rows
    boxes = "prep" if max_boxes is None else max_boxes
    return f"{preset}-seed{seed}-rows{rows}-valid{valid_queries}-boxes{boxes}"


def generate_and_prep(work_dir: str, preset: str, seed: int, train_rows, valid_queries: int,
                      max_boxes) -> str:
    """Generates `preset` at data seed `seed` and prepares it, once; returns the prep path.

    Args:
      work_dir: the bench work directory; data goes to work_dir/data/<data_dir_name>/.
      preset: a key of data_prep.synth.PRESETS.
      seed: the generator seed.
      train_rows: train.tsv rows, or None for the preset's (generator's) own.
      valid_queries: candidate lists in valid.tsv.
      max_boxes: prep's box cap, or None for `mmrecall prep`'s default.
    Returns:
      The prep directory; an existing complete prep there is reused as is.
    """
    root = os.path.join(work_dir, "data",
                        data_dir_name(preset, seed, train_rows, valid_queries, max_boxes))
    raw, prep = os.path.join(root, "raw"), os.path.join(root, "prep")
    try:
        PrepDir(prep)
        return prep
    except (PrepDirError, OSError):
        pass
    overrides = dict(seed=seed, valid_queries=valid_queries, test_queries=0)
    if train_rows is not None:
        overrides["train_rows"] = train_rows
    synth.generate(synth.preset_config(preset, raw, **overrides))
    # Prepared beside the final path and renamed, so an interrupted prep is never reused.
    partial = prep + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    command = ["mmrecall", "prep", "--out", partial,
               "--train", os.path.join(raw, synth.TRAIN_FILE),
               "--valid", os.path.join(raw, synth.VALID_FILE),
               "--valid-answers", os.path.join(raw, synth.VALID_ANSWER_FILE), "--no-progress"]
    if max_boxes is not None:
        command += ["--max-boxes", str(max_boxes)]
    subprocess.run(command, check=True)
    shutil.rmtree(prep, ignore_errors=True)
    os.replace(partial, prep)
    return prep


def valid_labels(prep, cfg):
    """(labels int [P], query_ids int [P]) of the valid split in file order, read with the
    eval pipeline."""
    ds = input_lib.input_fn_builder(cfg, prep.split_files("valid"),
                                    tf.estimator.ModeKeys.EVAL, prep)()
    labels, qids = [], []
    for features, y in ds:
        labels.append(y.numpy())
        qids.append(features["query_id"].numpy())
    return np.concatenate(labels), np.concatenate(qids)


def ndcg_of_scores(scores, labels, query_ids) -> float:
    """Mean NDCG@5 of rows ranked by score within each query, by the organiser's scorer.

    Args:
      scores: float [P]; labels: int [P] (> 0 relevant); query_ids: int [P].
    Returns:
      export.score's NDCG@5 averaged over the queries with an answer; rows are the ids
      (ties keep row order).
    """
    scores, labels, query_ids = map(np.asarray, (scores, labels, query_ids))
    ranked, answers = {}, {}
    for q in dict.fromkeys(query_ids.tolist()):
        rows = np.nonzero(query_ids == q)[0]
        relevant = rows[labels[rows] > 0]
        if len(relevant):
            ranked[q] = rows[np.argsort(-scores[rows], kind="stable")].tolist()
            answers[q] = relevant.tolist()
    return score.mean_ndcg(ranked, answers) if answers else 0.0


def variant_config(name: str, seed: int, args, prep: PrepDir) -> Config:
    """The resolved Config of one run: defaults < variant < --set < --steps/--batch-size,
    with the bench's run settings (one evaluation, at the end)."""
    cfg = Config.from_dict(dict(variant_spec(name)[1], seed=seed)).with_overrides(args.set)
    forced = {"train_steps": args.steps, "batch_size": args.batch_size}
    cfg = Config.from_dict({k: v for k, v in forced.items() if v is not None}, cfg)
    cfg = Config.from_dict({"save_checkpoints_steps": cfg.train_steps,
                            "eval_throttle_secs": 0, "log_step_count_steps": 100,
                            "save_summary_steps": 100}, cfg)
    return train.resolve_config(cfg, prep)


def run_once(cfg: Config, prep: PrepDir, model_dir: str) -> Dict:
    """Trains and evaluates `cfg` into model_dir, or reads the result a finished run of the
    same config left there.

    Returns:
      {"seed", "seconds" (wall time of training + evaluation), "train_steps", "batch_size",
      "eval": {metric: float}}.
    """
    path = os.path.join(model_dir, RESULT_FILE)
    config = json.loads(cfg.to_json())
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if result.get("config") == config:
            return result["run"]
    # A partial or different run would be resumed by the Estimator: start it afresh.
    shutil.rmtree(model_dir, ignore_errors=True)
    start = time.time()
    out = train.train(cfg, prep, model_dir)
    run = {"seed": cfg.seed, "seconds": round(time.time() - start, 1),
           "train_steps": cfg.train_steps, "batch_size": cfg.batch_size,
           "eval": {k: float(v) for k, v in out.items() if np.ndim(v) == 0}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"config": config, "run": run}, f, indent=2)
    return run


def export_fit(cfg: Config, prep: PrepDir, model_dir: str) -> Dict[str, float]:
    """What `mmrecall export` would serve from the run's final checkpoint, out of fold on
    the valid lists: {EXPORT_FIT_METRICS key: NDCG@5, "export/tower_weight": the weight
    chosen on all lists (inf: the towers alone)}; cached in the model dir."""
    path = os.path.join(model_dir, EXPORT_FIT_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    checkpoint = tf.train.latest_checkpoint(model_dir)
    lists = list_fit.list_arrays(cfg, prep, checkpoint)
    _, _, record = list_fit.fit_lists(lists, cfg)
    mix, prf = record["score_mix"], record["fit"]
    weight = mix["tower_weight"]
    figures = {"export/first_stage_fitted": mix["fitted_ndcg@5_out_of_fold"],
               "export/served": prf["prf_ndcg@5_out_of_fold"],
               "export/tower_weight": float("inf") if weight == "tower" else float(weight)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
    return figures


def summary_row(preset: str, name: str, runs: List[Dict], metric: str = "") -> Dict:
    """One table row: mean and population std of the variant's metric (or of `metric`, an
    EXPORT_FIT_METRICS key) over the seeds."""
    description, _, key = variant_spec(name)
    if metric:
        description, key = EXPORT_FIT_METRICS[metric], metric
        name = f"{name} [{metric}]"
    values = [r["eval"][key] for r in runs]
    return {"preset": preset, "variant": name, "description": description, "metric": key,
            "ndcg@5": float(np.mean(values)), "ndcg@5_std": float(np.std(values)),
            "per_seed": values, "seconds_per_run": round(float(np.mean(
                [r["seconds"] for r in runs])), 1), "runs": runs}


def markdown_table(rows: List[Dict]) -> str:
    """The rows as a markdown table (NDCG@5 mean, std, per seed, seconds per run)."""
    lines = ["| preset | variant | metric | NDCG@5 mean | std | per seed | s/run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = " ".join(f"{v:.3f}" for v in r.get("per_seed", []))
        lines.append(f"| {r['preset']} | {r['variant']} | {r.get('metric', '')} | "
                     f"{r['ndcg@5']:.4f} | {r.get('ndcg@5_std', 0.0):.4f} | {per_seed} | "
                     f"{r.get('seconds_per_run', 0.0)} |")
    return "\n".join(lines)


def save_report(args, data: Dict[str, Dict], rows: List[Dict]) -> None:
    """Writes the JSON report (after every run, so an interrupted bench keeps its results)."""
    report = {"argv": sys.argv[1:], "data_seed": args.seed, "model_seeds": args.model_seeds,
              "variants": {name: dict(zip(("description", "overrides", "metric"),
                                          variant_spec(name)))
                           for name in args.variant_names},
              "overrides": args.set, "data": data, "rows": rows}
    write_report(args.out, report, indent=2)


def parse_args(argv=None):
    """The bench's flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="default,hard,cluster",
                        help="comma-separated data_prep.synth presets: "
                             + ",".join(synth.PRESETS))
    parser.add_argument("--data", help="one existing prep directory instead of --presets")
    parser.add_argument("--work-dir", help="data cache and models (default: a temp dir)")
    parser.add_argument("--steps", type=int, help="train_steps of every variant "
                        "(default: each variant's own)")
    parser.add_argument("--batch-size", type=int, help="batch_size of every variant "
                        "(default: each variant's own)")
    parser.add_argument("--train-rows", type=int,
                        help="train.tsv rows (default: the preset's own)")
    parser.add_argument("--valid-queries", type=int, default=150)
    parser.add_argument("--max-boxes", type=int, help="prep's box cap "
                        "(default: `mmrecall prep`'s)")
    parser.add_argument("--seed", type=int, default=7, help="data generation seed")
    parser.add_argument("--model-seeds", default="7,8,9",
                        help="comma-separated Config.seed values; each variant trains once "
                             "per seed")
    parser.add_argument("--variants", default="two_tower,default",
                        help="comma-separated variant specs: a name of " + ",".join(VARIANTS)
                        + ", optionally with +key=value changes (default+pooling=mean); "
                        "`ablations` = the prepared list (ABLATIONS)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every variant")
    parser.add_argument("--export-fit", action="store_true",
                        help="also report what the export would serve: the first stage's "
                             "tower weight and the list stage fitted on the valid lists, "
                             "out of fold (export.list_fit.fit_lists)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "quality.json"))
    args = parser.parse_args(argv)
    args.variant_names = split_specs(args.variants)
    for spec in args.variant_names:
        try:
            Config.from_dict(variant_spec(spec)[1])
        except ValueError as e:
            parser.error(f"variant {spec!r}: {e}")
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(synth.PRESETS))
    if unknown:
        parser.error(f"unknown presets {unknown}")
    args.preset_names = ["data"] if args.data else presets
    args.seed_list = [int(x) for x in args.model_seeds.split(",") if x]
    return args


def main(argv=None):
    """Trains every (preset, variant, seed), prints the table, writes the JSON; returns 0."""
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="mmrecall-quality-")
    os.makedirs(work, exist_ok=True)
    data, rows = {}, []
    for preset in args.preset_names:
        path = args.data or generate_and_prep(work, preset, args.seed, args.train_rows,
                                              args.valid_queries, args.max_boxes)
        prep = PrepDir(path)
        labels, qids = valid_labels(prep, train.resolve_config(Config(), prep))
        rng = np.random.RandomState(args.seed)
        random_ndcg = float(np.mean([ndcg_of_scores(rng.uniform(size=labels.size), labels,
                                                    qids) for _ in range(20)]))
        data[preset] = {"prep": path, "train_rows": prep.split_rows("train"),
                        "valid_rows": int(labels.size),
                        "valid_queries": int(len(np.unique(qids)))}
        rows.append({"preset": preset, "variant": "random", "metric": SERVED,
                     "description": "random ranking (mean of 20)", "ndcg@5": random_ndcg})
        print(f"[{preset}] random ranking: NDCG@5 {random_ndcg:.4f}", flush=True)
        for name in args.variant_names:
            runs = []
            for seed in args.seed_list:
                cfg = variant_config(name, seed, args, prep)
                # Named by the config, so variants that train the same model share a run.
                digest = hashlib.sha1(cfg.to_json().encode()).hexdigest()[:12]
                model_dir = os.path.join(work, "models", preset, f"seed{seed}-{digest}")
                runs.append(run_once(cfg, prep, model_dir))
                fitted = ""
                if args.export_fit:
                    runs[-1]["eval"].update(export_fit(cfg, prep, model_dir))
                    fitted = "; export fit: " + ", ".join(
                        f"{k} {runs[-1]['eval'][k]:.4f}" for k in EXPORT_FIT_METRICS)
                print(f"[{preset}] {name} seed {seed}: NDCG@5 "
                      f"{runs[-1]['eval'][variant_spec(name)[2]]:.4f} in "
                      f"{runs[-1]['seconds']:.0f}s{fitted}", flush=True)
                save_report(args, data, rows + [summary_row(preset, name, runs)])
            metrics = [""] + (list(EXPORT_FIT_METRICS) if args.export_fit else [])
            for metric in metrics:
                rows.append(summary_row(preset, name, runs, metric))
                print(f"[{preset}] {rows[-1]['variant']}: NDCG@5 {rows[-1]['ndcg@5']:.4f} "
                      f"+- {rows[-1]['ndcg@5_std']:.4f} over {len(runs)} seed(s)", flush=True)
    save_report(args, data, rows)
    print("\n" + markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
