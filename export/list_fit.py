"""The served list stage's settings: fitted on the prep's labelled valid lists with the very
model being exported.

`list_arrays` runs the checkpoint's Ranker over a split's TFRecords (whole queries, as the
Estimator evaluates) and gathers each query's candidates into padded lists: first-stage
scores, product embeddings and labels. `resolve_list_stage` turns the export's
`list_stage` setting ("fit", "off", or a params JSON file) into the PRF settings to serve
and the figures to record: with "fit", estimator.list_stage.fit_prf chooses them by k-fold
cross-validation over the lists and reports out-of-fold NDCG@5; its 2-standard-error guard
leaves the first stage alone when the lists carry no list signal.

Dimension legend: Q lists (queries), C candidates per list (padded to the longest), E
product-embedding width.
"""
import json
import time
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from data_prep import schema
from data_prep.manifest import PrepDir
from estimator import input_fn as input_lib
from estimator import list_stage as list_lib
from estimator import network
from estimator import outputs
from estimator.config import Config

FIT = "fit"
OFF = "off"
FIT_SPLIT = "valid"   # the split with answers (prep requires them for valid)
FOLDS = 5


class ListArrays(NamedTuple):
    """A split's candidate lists, padded to the longest (padding: mask False, zeros).

    query_ids int64 [Q]; product_ids int64 [Q, C]; scores float32 [Q, C] (first stage);
    embeddings float32 [Q, C, E]; labels int64 [Q, C] {0, 1}; mask bool [Q, C].
    """
    query_ids: np.ndarray
    product_ids: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def _pairs(model_cfg: Config, prep: PrepDir, checkpoint: str, split: str) -> Dict[str, np.ndarray]:
    """Every row of the split scored by the checkpoint: {key: [B] or [B, E] numpy}."""
    with tf.Graph().as_default() as graph:
        ranker = network.build_ranker(model_cfg, len(prep.vocab_tokens()))
        dataset = input_lib.input_fn_builder(model_cfg, prep.split_files(split),
                                             tf.estimator.ModeKeys.EVAL, prep)()
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        features, labels = iterator.get_next()
        q_states, q_pooled = ranker.encode_query(
            features[schema.F_TOKEN_IDS], features[schema.F_NUM_TOKENS], training=False)
        p_states, p_pooled = ranker.encode_product(
            features[schema.F_BOX_FEATURES], features[schema.F_BOX_GEOMETRY],
            features[schema.F_BOX_LABELS], features[schema.F_NUM_BOXES], training=False)
        out = ranker.score_pairs(q_states, features[schema.F_NUM_TOKENS], q_pooled, p_states,
                                 features[schema.F_NUM_BOXES], p_pooled, training=False)
        fetches = {"query_id": features[schema.F_QUERY_ID],
                   "product_id": features[schema.F_PRODUCT_ID],
                   "score": tf.cast(out[outputs.SCORE], tf.float32),
                   "embedding": tf.cast(p_pooled, tf.float32), "label": labels}
        saver = tf.compat.v1.train.Saver(var_list=ranker.variable_map())
        batches = []
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run([tf.compat.v1.tables_initializer(), iterator.initializer])
            saver.restore(sess, checkpoint)
            while True:
                try:
                    batches.append(sess.run(fetches))
                except tf.errors.OutOfRangeError:
                    break
    if not batches:
        raise ValueError(f"{prep.path}: the {split} split has no rows")
    return {k: np.concatenate([b[k] for b in batches]) for k in fetches}


def lists_from_pairs(query_ids, product_ids, scores, embeddings, labels) -> ListArrays:
    """Rows [B] (and embeddings [B, E]) -> padded lists, one per query in order of first
    appearance. A product repeated within a list counts once (its first row), as
    `mmrecall rank` and the organiser's scorer count it."""
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
                     np.zeros([q, c], np.int64), np.zeros([q, c], bool))
    for i, rows in enumerate(order.values()):
        n = len(rows)
        out.product_ids[i, :n] = np.asarray(product_ids)[rows]
        out.scores[i, :n] = np.asarray(scores)[rows]
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
    return lists_from_pairs(pairs["query_id"], pairs["product_id"], pairs["score"],
                            pairs["embedding"], pairs["label"])


def default_mode(prep: PrepDir) -> str:
    """FIT when the prep has a labelled valid split, else OFF."""
    return FIT if prep.split_files(FIT_SPLIT) else OFF


def load_params(path: str) -> list_lib.PrfParams:
    """PRF settings from a JSON file: {"weight", "m", "iterations"}, or an
    mmrecall_export.json / `fit` record holding them under "params"."""
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    values = values.get("list_stage", values)
    return list_lib.PrfParams.from_dict(values.get("params", values))


def resolve_list_stage(setting: Optional[str], model_cfg: Config, prep: PrepDir,
                       checkpoint: str, folds: int = FOLDS
                       ) -> Tuple[Optional[list_lib.PrfParams], Dict]:
    """The PRF settings `rank` serves and the record for mmrecall_export.json.

    Args:
      setting: FIT, OFF, a path to a params JSON file, or None for default_mode(prep).
      model_cfg, prep, checkpoint: the model being exported (FIT scores the valid lists
        with it).
      folds: cross-validation folds of FIT (capped at the number of labelled lists).
    Returns:
      (PrfParams, or None when `rank` serves the first stage: OFF, or a fit whose guard
      kept the first stage; {"mode", "params", and for FIT "fit" (estimator.list_stage.
      PrfFit.to_dict: out-of-fold NDCG@5 of first stage and PRF) and "fit_seconds"}).
    Raises:
      ValueError: FIT without a labelled valid split or with fewer than 2 labelled lists.
    """
    setting = setting or default_mode(prep)
    if setting == OFF:
        return None, {"mode": OFF, "params": None}
    if setting != FIT:
        params = load_params(setting)
        return _served(params), {"mode": "file", "file": setting, "params": params.to_dict()}
    if not prep.split_files(FIT_SPLIT):
        raise ValueError(f"{prep.path}: list_stage={FIT!r} needs the prep's {FIT_SPLIT} "
                         f"split (with answers); pass {OFF!r} or a params file")
    start = time.perf_counter()
    lists = list_arrays(model_cfg, prep, checkpoint)
    labelled = int(((lists.labels > 0) & lists.mask).any(1).sum())
    fit = list_lib.fit_prf(lists.scores, lists.embeddings, lists.mask, lists.labels,
                           folds=min(folds, labelled), seed=0)
    record = {"mode": FIT, "params": fit.params.to_dict(), "fit": fit.to_dict(),
              "fit_seconds": round(time.perf_counter() - start, 2)}
    return _served(fit.params), record


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
    fit = record["fit"]
    served = ("PRF " + json.dumps(params)) if _served(list_lib.PrfParams.from_dict(params)) \
        else "none (PRF did not beat the first stage by 2 standard errors)"
    return (f"list stage: {served}; fitted on {fit['lists']} valid lists, out-of-fold "
            f"NDCG@5 first stage {fit['first_stage_ndcg@5']:.4f}, PRF "
            f"{fit['prf_ndcg@5_out_of_fold']:.4f}")
