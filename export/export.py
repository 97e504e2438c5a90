"""`mmrecall export`: a versioned TF Serving SavedModel from an Estimator checkpoint.

    mmrecall export --model-dir DIR --data PREP_DIR --export-dir OUT [--checkpoint CKPT]

writes OUT/<unix timestamp>/ with saved_model.pb, variables/ and
assets.extra/{tf_serving_warmup_requests, mmrecall_export.json}. The directory is built
under a temporary name and renamed when complete, so a model server polling OUT never sees
a half-written version.

The graph is TF1 (like the Estimator's own exports): the Ranker is rebuilt in a fresh graph
with `estimator.network.build_ranker` and restored from the checkpoint with a name-based
Saver; the signatures (export.signatures) wrap it with the in-graph preprocessing. The
vocabulary and the lemma table are in-graph constants, so the export has no loose paths.

`BestNdcgExporter` is a `tf.estimator.Exporter` for the training EvalSpec that keeps the
SavedModels of the best NDCG@5 seen so far.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import input_fn as input_lib
from export import product_graph as pg
from export import signatures as sig_lib

WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "mmrecall_export.json"
DEFAULT_MODEL_NAME = "mmrecall"


# --------------------------------------------------------------------------------------
# What the export needs from the prep output and the model directory.
@dataclasses.dataclass
class ExportSpec:
    vocab_tokens: List[str]
    max_tokens: int
    max_boxes: int          # prep's cap: the largest boxes, in original order
    model_max_boxes: int    # the model's cap: the first boxes after prep's
    drop_leading_be: bool
    word_embedding_size: int


def export_spec(cfg, data_dir: str) -> ExportSpec:
    """Collects vocabulary, caps and flags from a prep directory and a training Config."""
    manifest = input_lib.load_manifest(data_dir)
    tokens = input_lib.vocab_tokens(data_dir)
    width = cfg.word_embedding_size or int(manifest.get("embedding_dim", 0))
    if not width:
        # Training initialises the embedding from word2vec.npy, so its width is the model's.
        emb = np.load(os.path.join(data_dir, schema.EMBEDDINGS_FILE), mmap_mode="r")
        width = int(emb.shape[1])
    prep_max_boxes = int(manifest["max_boxes"])
    return ExportSpec(
        vocab_tokens=tokens,
        max_tokens=int(cfg.max_query_tokens),
        max_boxes=prep_max_boxes,
        # As estimator.input_fn: Config.max_boxes (filled from the manifest by train) caps
        # the first boxes of each product; a larger value has no effect.
        model_max_boxes=int(cfg.max_boxes or prep_max_boxes),
        drop_leading_be=bool(manifest.get("drop_leading_be", True)),
        word_embedding_size=width,
    )


def load_config(model_dir: str):
    from estimator import config as config_lib

    return config_lib.Config.load(model_dir)


# --------------------------------------------------------------------------------------
# Sample requests: the warm-up file and the export's self-check.
def sample_inputs(spec: ExportSpec, seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
    """Small valid requests for every signature: {signature: {input: numpy value}}.

    The query uses the vocabulary's most frequent lemmas; products have 1-3 boxes inside an
    800x800 image with non-negative features, like the real data.
    """
    rng = np.random.default_rng(seed)
    words = spec.vocab_tokens[2:5] or ["item"]
    queries = [" ".join(words), "Is a " + words[-1].upper() + "!"]

    def product(n):
        top = rng.integers(0, 300, n)
        left = rng.integers(0, 300, n)
        boxes = np.stack([top, left, top + rng.integers(50, 400, n),
                          left + rng.integers(50, 400, n)], 1).astype(np.float32)
        features = (rng.random((n, schema.FEATURE_DIM)) * (rng.random((n, schema.FEATURE_DIM))
                                                          > 0.5)).astype(np.float32)
        labels = rng.integers(0, schema.NUM_CLASSES, n).astype(np.int64)
        return boxes, features, labels

    products = [product(n) for n in (1, 3, 2)]

    def b64_fields(items):
        from data_prep import tsv

        return {
            pg.BOXES_FIELD: np.array([tsv.b64(b, schema.TSV_BOXES_DTYPE) for b, _, _ in items],
                                     dtype=object),
            pg.FEATURES_FIELD: np.array([tsv.b64(f, schema.TSV_FEATURES_DTYPE)
                                         for _, f, _ in items], dtype=object),
            pg.LABELS_FIELD: np.array([tsv.b64(l, schema.TSV_LABELS_DTYPE)
                                       for _, _, l in items], dtype=object),
            pg.NUM_BOXES_FIELD: np.array([len(b) for b, _, _ in items], np.int64),
            pg.IMAGE_H_FIELD: np.full([len(items)], 800, np.int64),
            pg.IMAGE_W_FIELD: np.full([len(items)], 800, np.int64),
        }

    def dense_fields(items):
        n = max(len(b) for b, _, _ in items)
        boxes = np.zeros([len(items), n, 4], np.float32)
        feats = np.zeros([len(items), n, schema.FEATURE_DIM], np.float32)
        labels = np.zeros([len(items), n], np.int64)
        for i, (b, f, l) in enumerate(items):
            boxes[i, :len(b)], feats[i, :len(b)], labels[i, :len(b)] = b, f, l
        return {
            pg.BOXES_FIELD: boxes, pg.FEATURES_FIELD: feats, pg.LABELS_FIELD: labels,
            pg.NUM_BOXES_FIELD: np.array([len(b) for b, _, _ in items], np.int64),
            pg.IMAGE_H_FIELD: np.full([len(items)], 800, np.int64),
            pg.IMAGE_W_FIELD: np.full([len(items)], 800, np.int64),
        }

    pair_products = products[:2]
    q2 = np.array(queries, dtype=object)
    b64_pairs = b64_fields(pair_products)
    rank_b64 = {k: v[None] for k, v in b64_fields(products).items()}
    dense_pairs = dense_fields(pair_products)
    q1 = np.array(queries[:1], dtype=object)
    return {
        sig_lib.SERVING_DEFAULT: dict(b64_pairs, query=q2),
        sig_lib.RANK: dict(rank_b64, query=q1),
        sig_lib.EMBED_QUERY: {"query": q2},
        sig_lib.EMBED_PRODUCT: b64_pairs,
        sig_lib.SCORE_DENSE: dict(dense_pairs, query=q2),
        sig_lib.EMBED_PRODUCT_DENSE: dense_pairs,
    }


def sample_inputs_from_tsv(path: str, max_rows: int = 8) -> Dict[str, Dict[str, np.ndarray]]:
    """Warm-up requests made of real rows: the first query group of a competition TSV."""
    import base64

    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if tuple(header) != schema.TSV_COLUMNS:
            raise ValueError(f"{path}: not a competition TSV (header {header[:3]}...)")
        for line in f:
            row = dict(zip(header, line.rstrip("\r\n").split("\t")))
            if rows and (row["query_id"] != rows[0]["query_id"] or len(rows) == max_rows):
                break
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no data rows")
    strings = lambda key: np.array([r[key].encode("utf-8") for r in rows], dtype=object)
    ints = lambda key: np.array([int(r[key]) for r in rows], np.int64)
    b64 = {f: strings(f) for f in sig_lib.PRODUCT_B64_FIELDS}
    b64.update({f: ints(f) for f in sig_lib.PRODUCT_INT_FIELDS})
    n = int(max(ints(pg.NUM_BOXES_FIELD)))
    dense = {pg.BOXES_FIELD: np.zeros([len(rows), n, schema.BOX_COORDS], np.float32),
             pg.FEATURES_FIELD: np.zeros([len(rows), n, schema.FEATURE_DIM], np.float32),
             pg.LABELS_FIELD: np.zeros([len(rows), n], np.int64)}
    for i, r in enumerate(rows):
        k = int(r[pg.NUM_BOXES_FIELD])
        for field, dtype in ((pg.BOXES_FIELD, schema.TSV_BOXES_DTYPE),
                             (pg.FEATURES_FIELD, schema.TSV_FEATURES_DTYPE),
                             (pg.LABELS_FIELD, schema.TSV_LABELS_DTYPE)):
            values = np.frombuffer(base64.b64decode(r[field]), dtype)
            dense[field][i, :k] = values.reshape(dense[field][i, :k].shape)
    dense.update({f: ints(f) for f in sig_lib.PRODUCT_INT_FIELDS})
    queries = strings("query")
    return {
        sig_lib.SERVING_DEFAULT: dict(b64, query=queries),
        sig_lib.RANK: dict({k: v[None] for k, v in b64.items()}, query=queries[:1]),
        sig_lib.EMBED_QUERY: {"query": queries[:1]},
        sig_lib.EMBED_PRODUCT: b64,
        sig_lib.SCORE_DENSE: dict(dense, query=queries),
        sig_lib.EMBED_PRODUCT_DENSE: dense,
    }


def write_warmup(path: str, requests: Dict[str, Dict[str, np.ndarray]],
                 model_name: str = DEFAULT_MODEL_NAME) -> int:
    """Writes TF Serving warm-up PredictionLog records (one Predict request per signature).

    Returns the number of records.
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            count += 1
    return count


# --------------------------------------------------------------------------------------
def latest_checkpoint(model_dir: str, checkpoint: Optional[str] = None) -> str:
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


def _check_outputs(sess, sig_defs, requests) -> None:
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


def export_saved_model(model_dir: str, data_dir: str, export_dir: str,
                       checkpoint: Optional[str] = None, cfg=None,
                       model_name: str = DEFAULT_MODEL_NAME,
                       warmup_tsv: Optional[str] = None) -> str:
    """Writes a new SavedModel version and returns its directory.

    Args:
      model_dir: the Estimator model directory (config.json, checkpoints).
      data_dir: the `mmrecall prep` output the model was trained on (vocabulary, caps).
      export_dir: the base directory; the version goes into export_dir/<timestamp>/.
      checkpoint: a checkpoint prefix; default the latest in model_dir.
      cfg: the training Config; default model_dir/config.json.
      model_name: the model name written into the warm-up requests.
      warmup_tsv: a competition TSV whose first query group makes the warm-up requests
        (default: small generated requests built from the vocabulary).
    """
    from estimator import network

    cfg = cfg or load_config(model_dir)
    ckpt = latest_checkpoint(model_dir, checkpoint)
    spec = export_spec(cfg, data_dir)
    model_cfg = dataclasses.replace(cfg, word_embedding_size=spec.word_embedding_size)
    requests = sample_inputs_from_tsv(warmup_tsv) if warmup_tsv else sample_inputs(spec)
    tmp, final = _new_version_dir(export_dir)
    try:
        with tf.Graph().as_default() as graph:
            ranker = network.build_ranker(model_cfg, len(spec.vocab_tokens))
            serving = sig_lib.ServingGraph(ranker, spec.vocab_tokens, spec.max_tokens,
                                           spec.max_boxes, spec.drop_leading_be,
                                           spec.model_max_boxes)
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
        write_warmup(os.path.join(extra, WARMUP_FILE), requests, model_name)
        metadata = {
            "checkpoint": os.path.abspath(ckpt),
            "data_dir": os.path.abspath(data_dir),
            "max_tokens": spec.max_tokens,
            "max_boxes": spec.max_boxes,
            "model_max_boxes": spec.model_max_boxes,
            "drop_leading_be": spec.drop_leading_be,
            "vocab_size": len(spec.vocab_tokens),
            "signatures": list(sig_defs),
            "config": dataclasses.asdict(cfg),
        }
        with open(os.path.join(extra, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------------------
class BestNdcgExporter(tf.estimator.Exporter):
    """Exports a SavedModel whenever evaluation reaches a new best NDCG@5.

    Pass it to `tf.estimator.EvalSpec(exporters=...)`. Versions go to
    `<model_dir>/export/<name>/<timestamp>/`; the best value is kept in `best_metric.json`
    there, so a resumed training run does not export a worse model. Only the newest
    `exports_to_keep` versions (all of them successive bests) are kept.
    """

    def __init__(self, data_dir: str, name: str = "best_ndcg", metric_key: str = "ndcg@5",
                 exports_to_keep: int = 2, model_name: str = DEFAULT_MODEL_NAME):
        self._data_dir = data_dir
        self._name = name
        self._metric_key = metric_key
        self._exports_to_keep = exports_to_keep
        self._model_name = model_name

    @property
    def name(self) -> str:
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
        value = self._metric(eval_result)
        if value is None:
            return None
        best_file = os.path.join(export_path, "best_metric.json")
        best = None
        if tf.io.gfile.exists(best_file):
            with tf.io.gfile.GFile(best_file) as f:
                best = json.load(f).get("value")
        if best is not None and value <= best:
            return None
        path = export_saved_model(estimator.model_dir, self._data_dir, export_path,
                                  checkpoint=checkpoint_path, model_name=self._model_name)
        with tf.io.gfile.GFile(best_file + ".tmp", "w") as f:
            json.dump({"value": value, "metric": self._metric_key,
                       "checkpoint": checkpoint_path, "export": path}, f)
        tf.io.gfile.rename(best_file + ".tmp", best_file, overwrite=True)
        versions = sorted(int(d) for d in os.listdir(export_path) if d.isdigit())
        for old in versions[:-self._exports_to_keep]:
            shutil.rmtree(os.path.join(export_path, str(old)), ignore_errors=True)
        return path


# --------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall export", description="write a TF Serving SavedModel from a checkpoint")
    parser.add_argument("--model-dir", required=True, help="Estimator model directory")
    parser.add_argument("--data", required=True, help="the `mmrecall prep` output directory")
    parser.add_argument("--export-dir", required=True,
                        help="base directory; the version goes into EXPORT_DIR/<timestamp>/")
    parser.add_argument("--checkpoint", default=None, help="checkpoint prefix (default latest)")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                        help="model name used in the warm-up requests (models.config name)")
    parser.add_argument("--warmup-tsv", default=None,
                        help="competition TSV (e.g. valid.tsv): its first query group becomes "
                             "the warm-up requests (default: generated requests)")
    args = parser.parse_args(argv)
    path = export_saved_model(args.model_dir, args.data, args.export_dir, args.checkpoint,
                              model_name=args.model_name, warmup_tsv=args.warmup_tsv)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
