"""List stage: first stage vs pseudo-relevance feedback (PRF) vs the learned list reranker,
NDCG@5 out of fold on labelled lists, per data regime of `mmrecall generate`.

Regimes, end to end (generate -> prep -> train -> export with the list stage fitted):

    python bench/list_stage.py --presets cluster,nocluster,default --steps 3000 --seeds 1,2
                               [--reranker] [--set key=value ...] [--work DIR]
                               [--out bench/results/list_stage.json]

For each preset and seed: `mmrecall generate --preset P --seed S`, prep, `mmrecall train`
for --steps steps (one evaluation, no best export), `mmrecall export` with
--list-stage fit. Reported per run and averaged per preset:

  valid first_stage_ndcg@5      the first stage on the valid lists (nothing fitted)
  valid prf_ndcg@5_out_of_fold  PRF, each list scored with the setting chosen on the other
                                folds (the export's own fit: export.list_fit)
  valid reranker_ndcg@5_out_of_fold  with --reranker: the learned reranker on the same folds
                                (estimator.list_stage.fit_reranker)
  test first_stage_ndcg@5       the served export's first_stage_scores on the test lists,
                                which nothing was trained or fitted on (testB_answer.json)
  test served_ndcg@5            the served export's `scores` (PRF as fitted on valid, or
                                the first stage when the guard kept it)
  test reranker_ndcg@5          with --reranker: a reranker trained on all valid lists

One export, without training:

    python bench/list_stage.py --model EXPORT_DIR --input valid.tsv --answers valid_answer.json
                               [--folds 5] [--seed 0] [--min-t 2] [--save-arrays A.npz]
                               [--reranker]
    python bench/list_stage.py --arrays A.npz --answers valid_answer.json ...   # refit

sends each query's list to the SavedModel's `rank` signature (first_stage_scores) and
`embed_product` (embeddings), and fits PRF (and the reranker) out of fold on those lists.

Prints a table and writes JSON (default bench/results/list_stage.json).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from data_prep import prep as prep_lib  # noqa: E402
from data_prep import synth  # noqa: E402
from data_prep.manifest import PrepDir  # noqa: E402
from data_prep.synth.writer import TEST_ANSWER_FILE  # noqa: E402
from estimator import list_stage  # noqa: E402
from estimator.config import Config  # noqa: E402
from export import list_fit  # noqa: E402
from export import rank as rank_lib  # noqa: E402
from export import saved_model  # noqa: E402
from export import score as score_lib  # noqa: E402
from export import signatures as sig_lib  # noqa: E402
from mmrecall_cli import train as train_cli  # noqa: E402
from mmrecall_testing.bench_report import write_report  # noqa: E402


def list_arrays(model_path, input_path, answers):
    """Runs the SavedModel's `rank` (and `embed_product`) over every query group of a TSV.

    Returns:
      dict of numpy arrays (export.list_fit.ListArrays fields): scores float32 [Q, C]
      (first stage), served float32 [Q, C] (`rank`'s scores), embeddings float32 [Q, C, E],
      mask bool [Q, C], labels int64 [Q, C], query_ids int64 [Q], product_ids int64 [Q, C];
      and "seconds" (model calls).
    """
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the graph's NormalizeUTF8 op

    loaded = tf.saved_model.load(rank_lib.resolve_model_dir(model_path))
    rank_fn = loaded.signatures[sig_lib.RANK]
    embed_fn = loaded.signatures[sig_lib.EMBED_PRODUCT]
    rows = {k: [] for k in ("query_id", "product_id", "score", "served", "embedding", "label")}
    spent = 0.0
    for group in rank_lib.iter_query_groups(input_path):
        inputs = {k: tf.constant(v) for k, v in rank_lib.pad_lists([group.fields]).items()}
        start = time.perf_counter()
        out = rank_fn(**inputs)
        products = {k: v[0] for k, v in inputs.items() if k != sig_lib.QUERY}
        embeddings = embed_fn(**products)[sig_lib.EMBEDDING].numpy()                # [C, E]
        spent += time.perf_counter() - start
        rows["query_id"] += [group.query_id] * len(group.product_ids)
        rows["product_id"] += group.product_ids
        rows["score"].append(out[sig_lib.FIRST_STAGE_SCORES].numpy()[0])
        rows["served"].append(out[sig_lib.SCORES].numpy()[0])
        rows["embedding"].append(embeddings)
        rows["label"] += [int(p in answers.get(group.query_id, ())) for p in group.product_ids]
    if not rows["query_id"]:
        sys.exit(f"{input_path}: no data rows")
    lists = list_fit.lists_from_pairs(rows["query_id"], rows["product_id"],
                                      np.concatenate(rows["score"]),
                                      np.concatenate(rows["embedding"]), rows["label"])
    served_of = {}   # (query id, product id) -> served score; a repeated product: its first
    for key, value in zip(zip(rows["query_id"], rows["product_id"]),
                          np.concatenate(rows["served"])):
        served_of.setdefault(key, value)
    served = np.array([[served_of.get((int(q), int(p)), 0.0) for p in pids]
                       for q, pids in zip(lists.query_ids, lists.product_ids)], np.float32)
    return dict(lists._asdict(), served=np.where(lists.mask, served, list_stage.PADDING_SCORE),
                seconds=np.float64(spent))


def organiser_ndcg(arrays, answers, key="scores"):
    """The ranking of arrays[key] as `mmrecall rank` + `mmrecall score` would score it."""
    ranked = {}
    for qid, pids, scores, mask in zip(arrays["query_ids"], arrays["product_ids"],
                                       arrays[key], arrays["mask"]):
        ranked[int(qid)] = rank_lib.top_k(pids[mask].tolist(), scores[mask])
    return score_lib.mean_ndcg(ranked, answers)


def _ndcg(scores, arrays) -> float:
    return float(list_stage.ndcg_per_list(scores, arrays["labels"], arrays["mask"]).mean())


# --- one export -----------------------------------------------------------------------------
def fit_arrays(arrays, answers, folds, seed, min_t, reranker):
    """PRF (and the reranker) out of fold on labelled lists: the result dict."""
    start = time.perf_counter()
    fit = list_stage.fit_prf(arrays["scores"], arrays["embeddings"], arrays["mask"],
                             arrays["labels"], folds=folds, seed=seed, min_t=min_t)
    result = dict(fit.to_dict(), fit_seconds=time.perf_counter() - start)
    if reranker:
        result["reranker_ndcg@5_out_of_fold"] = list_stage.fit_reranker(
            arrays["scores"], arrays["embeddings"], arrays["mask"], arrays["labels"],
            folds=folds, seed=seed, min_t=min_t).reranker_ndcg
        result["reranker_config"] = list_stage.RerankerConfig()._asdict()
    answered = {q: a for q, a in answers.items() if q in set(arrays["query_ids"].tolist())}
    result["organiser_first_stage_ndcg@5"] = organiser_ndcg(arrays, answered)
    result.update(queries=int(len(arrays["query_ids"])),
                  max_candidates=int(arrays["mask"].shape[1]),
                  embedding_width=int(arrays["embeddings"].shape[-1]),
                  folds=folds, seed=seed, min_t=min_t)
    return result


def print_one(result):
    print(f"{'ranking':<40} NDCG@5")
    print(f"{'first stage (array metric)':<40} {result['first_stage_ndcg@5']:.4f}")
    print(f"{'first stage (organiser scorer)':<40} {result['organiser_first_stage_ndcg@5']:.4f}")
    print(f"{'PRF, out of fold':<40} {result['prf_ndcg@5_out_of_fold']:.4f}")
    if "reranker_ndcg@5_out_of_fold" in result:
        print(f"{'learned reranker, out of fold':<40} "
              f"{result['reranker_ndcg@5_out_of_fold']:.4f}")
    print(f"chosen on all {result['lists']} lists: {result['params']}; per fold: "
          f"{result['fold_params']}")


# --- regimes, end to end --------------------------------------------------------------------
def run_regime(preset, seed, steps, work, sets, reranker, folds=list_fit.FOLDS):
    """generate -> prep -> train -> export (list stage fitted) -> figures for one run.

    Steps already done in `work` (a finished file or directory) are reused.
    Returns:
      {"preset", "seed", "steps", "valid": {...}, "test": {...}, "params", "seconds"}.
    """
    start = time.perf_counter()
    run = os.path.join(work, f"{preset}-seed{seed}")
    gen, prep, model_dir = (os.path.join(run, d) for d in ("gen", "prep", "model"))
    if not os.path.exists(os.path.join(gen, TEST_ANSWER_FILE)):
        assert synth.main(["--out", gen, "--preset", preset, "--seed", str(seed)]) == 0
    if not os.path.exists(os.path.join(prep, "manifest.json")):
        assert prep_lib.main([
            "--out", prep, "--train", os.path.join(gen, synth.TRAIN_FILE),
            "--valid", os.path.join(gen, synth.VALID_FILE),
            "--valid-answers", os.path.join(gen, synth.VALID_ANSWER_FILE),
            "--test", os.path.join(gen, synth.TEST_FILE), "--no-progress"]) == 0
    train_sets = [f"seed={seed}", f"save_checkpoints_steps={steps}", "eval_throttle_secs=0"]
    argv = ["--data", prep, "--model-dir", model_dir, "--steps", str(steps), "--no-export-best"]
    assert train_cli.main(argv + [x for s in train_sets + list(sets) for x in ("--set", s)]) == 0
    prep_dir = PrepDir(prep)
    export = saved_model.export_saved_model(model_dir, prep_dir, os.path.join(run, "export"),
                                            list_stage=list_fit.FIT)
    with open(os.path.join(export, "assets.extra", saved_model.METADATA_FILE)) as f:
        record = json.load(f)["list_stage"]

    valid = {"first_stage_ndcg@5": record["fit"]["first_stage_ndcg@5"],
             "prf_ndcg@5_out_of_fold": record["fit"]["prf_ndcg@5_out_of_fold"],
             "lists": record["fit"]["lists"]}
    test_answers = score_lib.read_answers(os.path.join(gen, TEST_ANSWER_FILE))
    test = list_arrays(export, os.path.join(gen, synth.TEST_FILE), test_answers)
    test_figures = {"first_stage_ndcg@5": _ndcg(test["scores"], test),
                    "served_ndcg@5": _ndcg(test["served"], test),
                    "organiser_served_ndcg@5": organiser_ndcg(test, test_answers, "served"),
                    "lists": int(len(test["query_ids"]))}
    if reranker:
        _, model_cfg = saved_model.export_spec(Config.load(model_dir), prep_dir)
        lists = list_fit.list_arrays(model_cfg, prep_dir, saved_model.latest_checkpoint(model_dir))
        valid["reranker_ndcg@5_out_of_fold"] = list_stage.fit_reranker(
            lists.scores, lists.embeddings, lists.mask, lists.labels, folds=folds).reranker_ndcg
        model = list_stage.train_reranker(lists.scores, lists.embeddings, lists.mask,
                                          lists.labels)
        test_figures["reranker_ndcg@5"] = _ndcg(
            list_stage.rerank(model, test["scores"], test["embeddings"], test["mask"]), test)
    return {"preset": preset, "seed": seed, "steps": steps, "valid": valid,
            "test": test_figures, "params": record["params"], "export": export,
            "seconds": round(time.perf_counter() - start, 1)}


COLUMNS = (("valid", "first_stage_ndcg@5", "valid first"),
           ("valid", "prf_ndcg@5_out_of_fold", "valid PRF oof"),
           ("valid", "reranker_ndcg@5_out_of_fold", "valid rerank oof"),
           ("test", "first_stage_ndcg@5", "test first"),
           ("test", "served_ndcg@5", "test served"),
           ("test", "reranker_ndcg@5", "test rerank"))


def summarise(runs):
    """{preset: {"split/figure": mean over seeds}} of the figures every run has."""
    out = {}
    for preset in dict.fromkeys(r["preset"] for r in runs):
        mine = [r for r in runs if r["preset"] == preset]
        out[preset] = {f"{split}/{key}": float(np.mean([r[split][key] for r in mine]))
                       for split, key, _ in COLUMNS if all(key in r[split] for r in mine)}
        out[preset]["seeds"] = [r["seed"] for r in mine]
    return out


def print_regimes(summary):
    shown = [c for c in COLUMNS if any(f"{c[0]}/{c[1]}" in s for s in summary.values())]
    print(f"{'preset':<11}" + "".join(f"{label:>17}" for _, _, label in shown))
    for preset, figures in summary.items():
        print(f"{preset:<11}" + "".join(
            f"{figures[f'{s}/{k}']:>17.4f}" if f"{s}/{k}" in figures else f"{'-':>17}"
            for s, k, _ in shown))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="first stage vs PRF vs learned reranker NDCG@5, out of fold, per regime "
                    "(--presets) or for one export (--model/--input or --arrays)")
    parser.add_argument("--presets", help="comma-separated `mmrecall generate` presets: run "
                                          "each end to end")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per run")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training config override for every run; repeatable")
    parser.add_argument("--work", default=os.path.join(HERE, "results", "list_stage_runs"),
                        help="run directories (data, prep, model, export); reused")
    parser.add_argument("--model", help="SavedModel directory or its export base (newest)")
    parser.add_argument("--input", help="competition TSV with answered queries (valid)")
    parser.add_argument("--answers", help="the TSV's answers JSON")
    parser.add_argument("--arrays", help="use arrays saved by --save-arrays instead of a model")
    parser.add_argument("--save-arrays", help="save the model's scores and embeddings (.npz)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds (default 0)")
    parser.add_argument("--min-t", type=float, default=2.0,
                        help="standard errors of gain PRF needs over the first stage (default 2)")
    parser.add_argument("--reranker", action="store_true",
                        help="also train and measure the learned list reranker")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "list_stage.json"),
                        help="JSON result file (default bench/results/list_stage.json)")
    args = parser.parse_args(argv)

    if args.presets:
        unknown = sorted(set(args.presets.split(",")) - set(synth.PRESETS))
        if unknown:
            parser.error(f"unknown presets {unknown}; known: {sorted(synth.PRESETS)}")
        runs = [run_regime(p, int(s), args.steps, args.work, args.set, args.reranker,
                           args.folds)
                for p in args.presets.split(",") for s in args.seeds.split(",")]
        result = {"runs": runs, "summary": summarise(runs), "steps": args.steps,
                  "sets": args.set}
        print_regimes(result["summary"])
    else:
        if not args.answers or bool(args.arrays) == bool(args.model and args.input):
            parser.error("give --presets, or --answers with either --model and --input, "
                         "or --arrays")
        answers = score_lib.read_answers(args.answers)
        if args.arrays:
            with np.load(args.arrays) as saved:
                arrays = dict(saved)
        else:
            arrays = list_arrays(args.model, args.input, answers)
            if args.save_arrays:
                np.savez(args.save_arrays, **arrays)
        result = dict(fit_arrays(arrays, answers, args.folds, args.seed, args.min_t,
                                 args.reranker),
                      model_seconds=float(arrays["seconds"]), model=args.model,
                      input=args.input, arrays=args.arrays)
        print_one(result)
    write_report(args.out, result, indent=2)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
