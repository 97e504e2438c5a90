"""The served list stage's settings: fitted on the prep's labelled valid lists with the very
model being exported.

`list_arrays` runs the checkpoint's Ranker over a split's TFRecords (whole queries, as the
Estimator evaluates) and gathers each query's candidates into padded lists: first-stage
scores and their two parts (the matcher's cross logit, the towers' score), product
embeddings and labels. `resolve_list_stage` turns the export's `list_stage` setting
("fit", "off", or a params JSON file) into what `rank` serves and the figures to record.
With "fit" (`fit_lists`), two choices are made on the labelled lists, each by k-fold
cross-validation with a guard (a gain of 2 standard errors for the weight, 2.5 for PRF)
that keeps the trained behaviour when the lists show no clear gain, each reported out of
fold:
  1. the first stage's tower weight (score = cross + w * tower, or the towers alone:
     estimator.list_stage.fit_tower_weight), so that on data where the matcher generalises
     worse (or better) than the towers the served score leans on the better part;
  2. PRF over that first stage (estimator.list_stage.fit_prf).

Dimension legend: Q lists (queries), C candidates per list (padded to the longest), E
product-embedding width.
"""
import json
import time
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from data_prep.manifest import PrepDir
from estimator import input_fn as input_lib
from estimator import list_stage as list_lib
from estimator import outputs, probe
from estimator.config import Config

FIT = "fit"
OFF = "off"
FIT_SPLIT = "valid"   # the split with answers (prep requires them for valid)
FOLDS = 5


class ListArrays(NamedTuple):
    """A split's candidate lists, padded to the longest (padding: mask False, zeros).

    query_ids int64 [Q]; product_ids int64 [Q, C]; scores float32 [Q, C] (first stage);
    embeddings float32 [Q, C, E]; labels int64 [Q, C] {0, 1}; mask bool [Q, C]; cross and
    tower float32 [Q, C] (the first stage's two parts), or None where not known.
    """
    query_ids: np.ndarray
    product_ids: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    cross: Optional[np.ndarray] = None
    tower: Optional[np.ndarray] = None


class Served(NamedTuple):
    """What `rank` serves: config (the model Config, its serving score and tower weight
    as fitted), list_stage (PrfParams, or None for the first stage alone) and record (for
    mmrecall_export.json)."""
    config: Config
    list_stage: Optional[list_lib.PrfParams]
    record: Dict


def _pairs(model_cfg: Config, prep: PrepDir, checkpoint: str, split: str) -> Dict[str, np.ndarray]:
    """Every row of the split scored by the checkpoint (estimator.probe.run_checkpoint's
    keys: query_id, product_id, label, score, query and product embeddings, ...)."""
    dataset_fn = input_lib.input_fn_builder(model_cfg, prep.split_files(split),
                                            tf.estimator.ModeKeys.EVAL, prep)
    return probe.run_checkpoint(model_cfg, len(prep.vocab_tokens()), checkpoint, dataset_fn,
                                source=f"{prep.path}: the {split} split")


def lists_from_pairs(query_ids, product_ids, scores, embeddings, labels, cross=None,
                     tower=None) -> ListArrays:
    """Rows [B] (and embeddings [B, E]; cross and tower [B] when given) -> padded lists,
    one per query in order of first appearance. A product repeated within a list counts
    once (its first row), as `mmrecall rank` and the organiser's scorer count it."""
    order: Dict[int, list] = {}
    for row, (qid, pid) in enumerate(zip(np.asarray(query_ids).tolist(),
                                         np.asarray(product_ids).tolist())):
        rows = order.setdefault(int(qid), [])
        if all(int(product_ids[r]) != pid for r in rows):
            rows.append(row)
    q, c = len(order), max(len(r) for r in order.values())
    embeddings = np.asarray(embeddings, np.float32)
    out = ListArrays(np.array(list(order), np.int64), np.zeros([q, c], np.int64),
                     np.zeros([q, c], np.float32),
                     np.zeros([q, c, embeddings.shape[1]], np.float32),
                     np.zeros([q, c], np.int64), np.zeros([q, c], bool),
                     None if cross is None else np.zeros([q, c], np.float32),
                     None if tower is None else np.zeros([q, c], np.float32))
    for i, rows in enumerate(order.values()):
        n = len(rows)
        out.product_ids[i, :n] = np.asarray(product_ids)[rows]
        out.scores[i, :n] = np.asarray(scores)[rows]
        for part, values in ((out.cross, cross), (out.tower, tower)):
            if values is not None:
                part[i, :n] = np.asarray(values)[rows]
        out.embeddings[i, :n] = embeddings[rows]
        out.labels[i, :n] = np.asarray(labels)[rows] > 0
        out.mask[i, :n] = True
    return out


def list_arrays(model_cfg: Config, prep: PrepDir, checkpoint: str,
                split: str = FIT_SPLIT) -> ListArrays:
    """The split's lists scored by the checkpoint's model (first stage, as served).

    Args:
      model_cfg: the resolved training Config (export.saved_model.export_spec's).
      prep: the prep the model was trained on; checkpoint: a checkpoint prefix.
      split: a prepared split with labels.
    Raises:
      ValueError: the split has no rows.
    """
    pairs = _pairs(model_cfg, prep, checkpoint, split)
    return lists_from_pairs(pairs["query_id"], pairs["product_id"], pairs[outputs.SCORE],
                            pairs[outputs.PRODUCT_EMBEDDING], pairs["label"],
                            pairs[outputs.CROSS_LOGIT], pairs[outputs.TOWER_SCORE])


def default_mode(prep: PrepDir) -> str:
    """FIT when the prep has a labelled valid split, else OFF."""
    return FIT if prep.split_files(FIT_SPLIT) else OFF


def load_params(path: str) -> Tuple[list_lib.PrfParams, Optional[Dict]]:
    """(PRF settings, serving score or None) from a JSON file: {"weight", "m",
    "iterations"}, or an mmrecall_export.json / `fit` record holding them under "params"
    and the served score under "serving" ({"serving_score", "tower_weight"})."""
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    values = values.get("list_stage", values)
    return (list_lib.PrfParams.from_dict(values.get("params", values)),
            values.get("serving"))


def trained_tower_weight(cfg: Config) -> float:
    """The tower weight of the Config's serving score: cross + w * tower ("sum"), 0
    ("cross") or list_stage.TOWER_ONLY ("tower")."""
    return {"cross": 0.0, "tower": list_lib.TOWER_ONLY}.get(cfg.serving_score,
                                                           float(cfg.tower_score_weight))


def with_tower_weight(cfg: Config, weight: float) -> Config:
    """`cfg` serving cross + weight * tower (TOWER_ONLY: the towers alone, 0: the cross
    logit alone); the model's variables are the same whatever the weight."""
    if np.isinf(weight):
        return Config.from_dict({"serving_score": "tower"}, cfg)
    if weight == 0.0:
        return Config.from_dict({"serving_score": "cross"}, cfg)
    return Config.from_dict({"serving_score": "sum", "tower_score_weight": float(weight)}, cfg)


def fit_lists(lists: ListArrays, model_cfg: Config, folds: int = FOLDS) -> Served:
    """Fits the served first stage's tower weight, then PRF over it, on labelled lists.

    The tower weight is fitted only for a model with a matcher whose lists carry both
    parts; otherwise the trained serving score stays. PRF's out-of-fold figure is over
    the first stage as fitted on all lists.

    Args:
      lists: ListArrays with labels (cross and tower to fit the weight).
      model_cfg: the resolved training Config.
      folds: cross-validation folds (capped at the number of labelled lists).
    Returns:
      Served with record {"mode": FIT, "params", "score_mix" (list_stage.MixFit.to_dict,
      or for a model without the choice its trained figures), "serving" ({"serving_score",
      "tower_weight"} of the served Config), "fit" (PrfFit.to_dict)}.
    Raises:
      ValueError: fewer than 2 labelled lists.
    """
    labelled = int(((lists.labels > 0) & lists.mask).any(1).sum())
    folds = min(folds, labelled)
    trained = trained_tower_weight(model_cfg)
    scores = lists.scores
    if model_cfg.uses_matcher and lists.cross is not None and lists.tower is not None:
        mix = list_lib.fit_tower_weight(lists.cross, lists.tower, lists.mask, lists.labels,
                                        trained, folds=folds, seed=0)
        scores = list_lib.mixed_scores(lists.cross, lists.tower, mix.tower_weight)
        served_cfg, mix_record = with_tower_weight(model_cfg, mix.tower_weight), mix.to_dict()
    else:
        first = float(list_lib.ndcg_per_list(scores, lists.labels, lists.mask)[
            ((lists.labels > 0) & lists.mask).any(1)].mean())
        served_cfg = model_cfg
        mix_record = {"tower_weight": "tower" if np.isinf(trained) else trained,
                      "trained_ndcg@5": first, "fitted_ndcg@5_out_of_fold": first,
                      "fitted": False}
    fit = list_lib.fit_prf(scores, lists.embeddings, lists.mask, lists.labels, folds=folds,
                           seed=0)
    record = {"mode": FIT, "params": fit.params.to_dict(), "score_mix": mix_record,
              "serving": _serving(served_cfg), "fit": fit.to_dict()}
    return Served(served_cfg, _served(fit.params), record)


def _serving(cfg: Config) -> Dict:
    return {"serving_score": cfg.serving_score, "tower_weight": cfg.tower_score_weight}


def resolve_list_stage(setting: Optional[str], model_cfg: Config, prep: PrepDir,
                       checkpoint: str, folds: int = FOLDS) -> Served:
    """What `rank` serves and the record for mmrecall_export.json.

    Args:
      setting: FIT, OFF, a path to a params JSON file, or None for default_mode(prep).
      model_cfg, prep, checkpoint: the model being exported (FIT scores the valid lists
        with it).
      folds: cross-validation folds of FIT (capped at the number of labelled lists).
    Returns:
      Served: OFF serves the trained first stage alone; a params file its PRF settings
      (and the serving score it records under "serving", if any) over the trained first
      stage; FIT what fit_lists chooses, with "fit_seconds" in the record.
    Raises:
      ValueError: FIT without a labelled valid split or with fewer than 2 labelled lists.
    """
    setting = setting or default_mode(prep)
    if setting == OFF:
        return Served(model_cfg, None, {"mode": OFF, "params": None})
    if setting != FIT:
        params, serving = load_params(setting)
        cfg = model_cfg if serving is None else Config.from_dict(
            {"serving_score": serving["serving_score"],
             "tower_score_weight": serving["tower_weight"]}, model_cfg)
        return Served(cfg, _served(params), {"mode": "file", "file": setting,
                                             "params": params.to_dict(),
                                             "serving": _serving(cfg)})
    if not prep.split_files(FIT_SPLIT):
        raise ValueError(f"{prep.path}: list_stage={FIT!r} needs the prep's {FIT_SPLIT} "
                         f"split (with answers); pass {OFF!r} or a params file")
    start = time.perf_counter()
    served = fit_lists(list_arrays(model_cfg, prep, checkpoint), model_cfg, folds)
    served.record["fit_seconds"] = round(time.perf_counter() - start, 2)
    return served


def _served(params: list_lib.PrfParams) -> Optional[list_lib.PrfParams]:
    """None for settings that rank as the first stage (weight or iterations 0)."""
    return None if params.weight == 0.0 or params.iterations == 0 else params


def describe(record: Dict) -> str:
    """One line for `mmrecall export`: the list stage served and its figures."""
    mode, params = record.get("mode"), record.get("params")
    if mode == OFF:
        return "list stage: off (rank's scores are the first-stage scores)"
    if mode == "file":
        return f"list stage: PRF {params} from {record['file']}"
    fit, mix, serving = record["fit"], record["score_mix"], record["serving"]
    served = ("PRF " + json.dumps(params)) if _served(list_lib.PrfParams.from_dict(params)) \
        else "none (PRF did not beat the first stage by 2.5 standard errors)"
    first = serving["serving_score"] + (f" (tower weight {serving['tower_weight']:g})"
                                        if serving["serving_score"] == "sum" else "")
    return (f"first stage: {first}; list stage: {served}; fitted on {fit['lists']} valid "
            f"lists, out-of-fold NDCG@5 trained first stage {mix['trained_ndcg@5']:.4f}, "
            f"fitted first stage {mix['fitted_ndcg@5_out_of_fold']:.4f}, with PRF "
            f"{fit['prf_ndcg@5_out_of_fold']:.4f}")
