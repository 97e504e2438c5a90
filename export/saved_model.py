"""The SavedModel writer: a versioned TF Serving SavedModel from an Estimator checkpoint.

`export_saved_model` writes EXPORT_DIR/<unix timestamp>/ with saved_model.pb, variables/ and
assets.extra/{tf_serving_warmup_requests, mmrecall_export.json}. The directory is built
under a temporary name and renamed when complete, so a model server polling EXPORT_DIR
never sees a half-written version.

The `rank` signature's list stage (pseudo-relevance feedback, estimator.list_stage) is
fitted on the prep's labelled valid lists with the model being exported (export.list_fit),
unless switched off; its settings and out-of-fold figures are recorded in
mmrecall_export.json under "list_stage".

The graph is TF1 (like the Estimator's own exports): the Ranker is rebuilt in a fresh graph
with `estimator.network.build_ranker` and restored from the checkpoint with a name-based
Saver; the signatures (export.signatures) wrap it with the in-graph preprocessing. The
vocabulary and the lemma table are in-graph constants, so the export has no loose paths.
"""
import dataclasses
import json
import os
import shutil
import time
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from data_prep.manifest import PrepDir
from estimator import network
from estimator import train as train_lib
from estimator.config import Config
from export import list_fit
from export import signatures as sig_lib
from export import warmup

METADATA_FILE = "mmrecall_export.json"


@dataclasses.dataclass
class ExportSpec:
    """What the export needs from the prep directory and the training Config."""
    vocab_tokens: List[str]   # [V], index == id
    max_tokens: int           # the model's query token cap (Config.max_query_tokens)
    prep_max_boxes: int       # prep's cap: each product kept its largest boxes by area
    model_max_boxes: int      # the model's cap (Config.max_boxes), by the same rule
    drop_leading_be: bool     # the prep's query normalisation flag
    word_embedding_size: int  # W, the word2vec width of the model's embedding table

    @property
    def max_boxes(self) -> int:
        """The serving cap: the largest of the largest is the largest of the smaller cap."""
        return min(self.prep_max_boxes, self.model_max_boxes)


def export_spec(cfg: Config, prep: PrepDir) -> Tuple[ExportSpec, Config]:
    """The export's settings and the model's Config resolved against the prep.

    Returns:
      (ExportSpec, Config with word_embedding_size and max_boxes filled, as training had).
    """
    model_cfg = train_lib.resolve_config(cfg, prep)
    spec = ExportSpec(
        vocab_tokens=prep.vocab_tokens(),
        max_tokens=int(model_cfg.max_query_tokens),
        prep_max_boxes=prep.max_boxes,
        model_max_boxes=int(model_cfg.max_boxes),
        drop_leading_be=bool(prep.manifest.get("drop_leading_be", True)),
        word_embedding_size=int(model_cfg.word_embedding_size),
    )
    return spec, model_cfg


def latest_checkpoint(model_dir: str, checkpoint: Optional[str] = None) -> str:
    """`checkpoint`, or the newest checkpoint prefix in model_dir.

    Raises:
      FileNotFoundError: no checkpoint given and none in model_dir.
    """
    path = checkpoint or tf.train.latest_checkpoint(model_dir)
    if not path:
        raise FileNotFoundError(f"no checkpoint in {model_dir}")
    return path


def _new_version_dir(export_dir: str) -> Tuple[str, str]:
    """(temporary dir, final dir) for a new version; versions are unix timestamps."""
    os.makedirs(export_dir, exist_ok=True)
    version = int(time.time())
    existing = {int(d) for d in os.listdir(export_dir) if d.isdigit()}
    if existing:
        version = max(version, max(existing) + 1)
    final = os.path.join(export_dir, str(version))
    tmp = os.path.join(export_dir, f"temp-{version}-{os.getpid()}")
    return tmp, final


def _check_outputs(sess, sig_defs, requests: warmup.Requests) -> None:
    """Runs every sample request through its signature; outputs must be finite."""
    graph = sess.graph
    for name, sig in sig_defs.items():
        feed = {graph.get_tensor_by_name(sig.inputs[k].name): v
                for k, v in requests[name].items()}
        fetches = {k: graph.get_tensor_by_name(v.name) for k, v in sig.outputs.items()}
        for key, value in sess.run(fetches, feed).items():
            if np.issubdtype(np.asarray(value).dtype, np.floating) and \
                    not np.isfinite(value).all():
                raise RuntimeError(f"export self-check: signature {name} output {key} "
                                   f"is not finite: {value}")


def export_saved_model(model_dir: str, prep: PrepDir, export_dir: str,
                       checkpoint: Optional[str] = None, cfg: Optional[Config] = None,
                       model_name: str = warmup.DEFAULT_MODEL_NAME,
                       warmup_tsv: Optional[str] = None,
                       list_stage: Optional[str] = None) -> str:
    """Writes a new SavedModel version and returns its directory.

    Args:
      model_dir: the Estimator model directory (config.json, checkpoints).
      prep: the `mmrecall prep` output the model was trained on (vocabulary, caps).
      export_dir: the base directory; the version goes into export_dir/<timestamp>/.
      checkpoint: a checkpoint prefix; default the latest in model_dir.
      cfg: the training Config; default model_dir/config.json.
      model_name: the model name written into the warm-up requests.
      warmup_tsv: a competition TSV whose first query group makes the warm-up requests
        (default: small generated requests built from the vocabulary).
      list_stage: `rank`'s list stage: "fit" (fit the first stage's tower weight, then
        PRF, on the prep's valid lists: export.list_fit.fit_lists), "off" (rank's scores
        are the trained first-stage scores), or the path of a params JSON file
        ({"weight", "m", "iterations"}, or an earlier export's mmrecall_export.json);
        default "fit" when the prep has a valid split, else "off".
    Raises:
      ValueError: list_stage "fit" without a valid split, or a bad params file.
    """
    cfg = cfg or Config.load(model_dir)
    ckpt = latest_checkpoint(model_dir, checkpoint)
    spec, model_cfg = export_spec(cfg, prep)
    served = list_fit.resolve_list_stage(list_stage, model_cfg, prep, ckpt)
    model_cfg, prf_params, list_record = served.config, served.list_stage, served.record
    requests = (warmup.sample_inputs_from_tsv(warmup_tsv) if warmup_tsv
                else warmup.sample_inputs(spec.vocab_tokens))
    tmp, final = _new_version_dir(export_dir)
    try:
        with tf.Graph().as_default() as graph:
            ranker = network.build_ranker(model_cfg, len(spec.vocab_tokens))
            serving = sig_lib.ServingGraph(ranker, spec.vocab_tokens, spec.max_tokens,
                                           spec.max_boxes, spec.drop_leading_be,
                                           list_stage=prf_params)
            sig_defs = serving.build()
            saver = tf.compat.v1.train.Saver(var_list=ranker.variable_map(), sharded=True)
            init_tables = tf.compat.v1.tables_initializer()
            with tf.compat.v1.Session(graph=graph) as sess:
                sess.run(init_tables)
                saver.restore(sess, ckpt)
                _check_outputs(sess, sig_defs, requests)
                builder = tf.compat.v1.saved_model.Builder(tmp)
                builder.add_meta_graph_and_variables(
                    sess, [tf.saved_model.SERVING], signature_def_map=sig_defs,
                    main_op=init_tables, saver=saver, strip_default_attrs=True,
                    clear_devices=True)
                builder.save()
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        warmup.write_warmup(os.path.join(extra, warmup.WARMUP_FILE), requests, model_name)
        metadata = {
            "checkpoint": os.path.abspath(ckpt),
            "data_dir": prep.path,
            "max_tokens": spec.max_tokens,
            "max_boxes": spec.prep_max_boxes,
            "model_max_boxes": spec.model_max_boxes,
            "drop_leading_be": spec.drop_leading_be,
            "vocab_size": len(spec.vocab_tokens),
            "signatures": list(sig_defs),
            "list_stage": list_record,
            "config": dataclasses.asdict(cfg),
        }
        with open(os.path.join(extra, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
