"""`BestNdcgExporter`: the training-time exporter that keeps the SavedModels of the best
validation NDCG@5 seen so far.

The command line (`mmrecall train`, mmrecall_cli/train.py) passes it to
`estimator.train.train(..., exporters=[...])`, which puts it in the EvalSpec; the estimator
package itself never imports export.
"""
import json
import os
import shutil
from typing import Optional, Tuple

import tensorflow as tf

from data_prep.manifest import PrepDir
from estimator import probe
from export import saved_model
from export import warmup


DEFAULT_NAME = "best_ndcg"
BEST_FILE = "best_metric.json"


def best_checkpoint(model_dir: str, name: str = DEFAULT_NAME) -> Optional[Tuple[str, dict]]:
    """The checkpoint of the best evaluation a BestNdcgExporter recorded in model_dir.

    Returns:
      (checkpoint prefix, the record of best_metric.json: value, metric, checkpoint,
      export), or None when no best export was kept. The prefix is the evaluated
      checkpoint while it exists, else the best SavedModel's own variables
      (`<version>/variables/variables`, the same variable names: the chief keeps only the
      newest checkpoints).
    """
    path = os.path.join(model_dir, "export", name, BEST_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        record = json.load(f)
    if tf.io.gfile.exists(record["checkpoint"] + ".index"):
        return record["checkpoint"], record
    variables = os.path.join(record["export"], "variables", "variables")
    if tf.io.gfile.exists(variables + ".index"):
        return variables, record
    return None


class BestNdcgExporter(tf.estimator.Exporter):
    """Exports a SavedModel whenever evaluation reaches a new best NDCG@5.

    Pass it to `tf.estimator.EvalSpec(exporters=...)`. Versions go to
    `<model_dir>/export/<name>/<timestamp>/`; the best value is kept in `best_metric.json`
    there, so a resumed training run does not export a worse model. Only the newest
    `exports_to_keep` versions (all of them successive bests) are kept.

    Each version carries its own list stage, fitted on the valid lists with its checkpoint
    (export.list_fit), as `mmrecall export` does: a best export is then servable as is.
    Measured cost: 3-4 s per export with the generated set's 100 valid lists of 30 (an
    export took 7-8 s with fitting, 4-6 s without, on 2 shared cores). run_train.sh's
    default run (3000 steps, 6 minutes) made 4 best exports: fitting there and in the
    final export added about 18 s, 5% of its wall time, under the 10% we allow. The cost
    grows with the valid split (one pass of the model over it, like an evaluation).
    Pass list_stage="off" to skip it.
    """

    def __init__(self, prep: PrepDir, name: str = DEFAULT_NAME, metric_key: str = "ndcg@5",
                 exports_to_keep: int = 2, model_name: str = warmup.DEFAULT_MODEL_NAME,
                 list_stage: Optional[str] = None):
        """Args:
          prep: the prep directory the model trains on (vocabulary and caps of the export).
          name: the export subdirectory under <model_dir>/export/.
          metric_key: the eval result compared (higher is better).
          exports_to_keep: how many of the newest best versions stay on disk.
          model_name: the model name written into the warm-up requests.
          list_stage: the exports' list stage (export.saved_model.export_saved_model's
            list_stage: "fit", "off" or a params file; default "fit", as the prep of a
            training run with evaluation has a labelled valid split).
        """
        self._prep = prep
        self._name = name
        self._metric_key = metric_key
        self._exports_to_keep = exports_to_keep
        self._model_name = model_name
        self._list_stage = list_stage

    @property
    def name(self) -> str:
        """The export subdirectory name."""
        return self._name

    def _metric(self, eval_result) -> Optional[float]:
        if self._metric_key in eval_result:
            return float(eval_result[self._metric_key])
        candidates = [k for k in eval_result if "ndcg" in k.lower()]
        if len(candidates) == 1:
            return float(eval_result[candidates[0]])
        tf.compat.v1.logging.warning(
            "BestNdcgExporter: metric %r not in eval results %s; not exporting",
            self._metric_key, sorted(eval_result))
        return None

    def export(self, estimator, export_path, checkpoint_path, eval_result,
               is_the_final_export):
        """Exports `checkpoint_path` when its metric beats the best so far.

        Returns:
          The new version directory, or None when nothing was exported.
        """
        value = self._metric(eval_result)
        if value is None:
            return None
        best_file = os.path.join(export_path, BEST_FILE)
        best = None
        if tf.io.gfile.exists(best_file):
            with tf.io.gfile.GFile(best_file) as f:
                best = json.load(f).get("value")
        if best is not None and value <= best:
            return None
        # A removed checkpoint is skipped; the next best one is exported as usual.
        path = probe.unless_removed(
            lambda: saved_model.export_saved_model(
                estimator.model_dir, self._prep, export_path, checkpoint=checkpoint_path,
                model_name=self._model_name, list_stage=self._list_stage),
            checkpoint_path, f"BestNdcgExporter ({self._metric_key} {value:.4f})")
        if path is None:
            return None
        with tf.io.gfile.GFile(best_file + ".tmp", "w") as f:
            json.dump({"value": value, "metric": self._metric_key,
                       "checkpoint": checkpoint_path, "export": path}, f)
        tf.io.gfile.rename(best_file + ".tmp", best_file, overwrite=True)
        versions = sorted(int(d) for d in os.listdir(export_path) if d.isdigit())
        for old in versions[:-self._exports_to_keep]:
            shutil.rmtree(os.path.join(export_path, str(old)), ignore_errors=True)
        return path
