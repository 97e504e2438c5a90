"""Sample requests for every serving signature: the TF Serving warm-up file and the export's
self-check.

The model server replays `assets.extra/tf_serving_warmup_requests` (PredictionLog records)
before it serves a version; the export runs the same requests through the new graph first.

Dimension legend: B pairs, Q queries, C candidates per query, N boxes, F region feature
width (2048).
"""
import base64
from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from data_prep import schema, tsv
from export import product_graph as pg
from export import signatures as sig_lib

WARMUP_FILE = "tf_serving_warmup_requests"
DEFAULT_MODEL_NAME = "mmrecall"

Requests = Dict[str, Dict[str, np.ndarray]]   # {signature: {input key: numpy value}}


def _dense_fields(items) -> Dict[str, np.ndarray]:
    """Products (boxes [n, 4], features [n, F], labels [n]) -> score_dense's product inputs."""
    n = max(len(b) for b, _, _ in items)
    boxes = np.zeros([len(items), n, schema.BOX_COORDS], np.float32)
    feats = np.zeros([len(items), n, schema.FEATURE_DIM], np.float32)
    labels = np.zeros([len(items), n], np.int64)
    for i, (b, f, l) in enumerate(items):
        boxes[i, :len(b)], feats[i, :len(b)], labels[i, :len(b)] = b, f, l
    return {pg.BOXES_FIELD: boxes, pg.FEATURES_FIELD: feats, pg.LABELS_FIELD: labels}


def _image_fields(num_boxes: Sequence[int], image_h, image_w) -> Dict[str, np.ndarray]:
    """The int64 [B] product inputs."""
    return {pg.NUM_BOXES_FIELD: np.asarray(num_boxes, np.int64),
            pg.IMAGE_H_FIELD: np.asarray(image_h, np.int64),
            pg.IMAGE_W_FIELD: np.asarray(image_w, np.int64)}


def _requests(queries: np.ndarray, embed_queries: np.ndarray, b64: Dict[str, np.ndarray],
              rank_b64: Dict[str, np.ndarray], dense: Dict[str, np.ndarray]) -> Requests:
    """One request per signature from pair inputs (B rows) and one rank list (Q = 1)."""
    return {
        sig_lib.SERVING_DEFAULT: dict(b64, query=queries),
        sig_lib.RANK: dict({k: v[None] for k, v in rank_b64.items()}, query=queries[:1]),
        sig_lib.EMBED_QUERY: {"query": embed_queries},
        sig_lib.EMBED_PRODUCT: b64,
        sig_lib.SCORE_DENSE: dict(dense, query=queries),
        sig_lib.EMBED_PRODUCT_DENSE: dense,
    }


def sample_inputs(vocab_tokens: Sequence[str], seed: int = 0) -> Requests:
    """Small valid requests for every signature: {signature: {input: numpy value}}.

    The query uses the vocabulary's most frequent lemmas; products have 1-3 boxes inside an
    800x800 image with non-negative features, like the real data. Pair signatures get B = 2
    rows, `rank` two queries (Q = 2) with C = 3 candidates, the second list padded.
    """
    rng = np.random.default_rng(seed)
    words = list(vocab_tokens[2:5]) or ["item"]
    queries = np.array([" ".join(words), "Is a " + words[-1].upper() + "!"], dtype=object)

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
        out = {
            pg.BOXES_FIELD: np.array([tsv.b64(b, schema.TSV_BOXES_DTYPE) for b, _, _ in items],
                                     dtype=object),
            pg.FEATURES_FIELD: np.array([tsv.b64(f, schema.TSV_FEATURES_DTYPE)
                                         for _, f, _ in items], dtype=object),
            pg.LABELS_FIELD: np.array([tsv.b64(l, schema.TSV_LABELS_DTYPE)
                                       for _, _, l in items], dtype=object),
        }
        out.update(_image_fields([len(b) for b, _, _ in items], [800] * len(items),
                                 [800] * len(items)))
        return out

    pairs = products[:2]
    dense = dict(_dense_fields(pairs), **_image_fields([len(b) for b, _, _ in pairs],
                                                       [800] * 2, [800] * 2))
    requests = _requests(queries, queries, b64_fields(pairs), b64_fields(products), dense)
    # `rank` gets a second list, two candidates long, padded to C = 3 as the batcher pads
    # (empty strings, zeros), so that warm-up and the export's self-check run the padding.
    rank = requests[sig_lib.RANK]
    for key, value in rank.items():
        if key == sig_lib.QUERY:
            rank[key] = queries[:2]
        else:
            pad = np.zeros(1, value.dtype) if value.dtype != object else np.array([b""], object)
            rank[key] = np.stack([value[0], np.concatenate([value[0][[2, 0]], pad])])
    return requests


def sample_inputs_from_tsv(path: str, max_rows: int = 8) -> Requests:
    """Warm-up requests made of real rows: the first query group of a competition TSV.

    Pair signatures get the group's rows (B <= max_rows), `rank` the group as one list.

    Raises:
      ValueError: the file is not a competition TSV or has no data rows.
    """
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
    items = []
    for r in rows:
        k = int(r[pg.NUM_BOXES_FIELD])
        decoded = [np.frombuffer(base64.b64decode(r[field]), dtype).reshape(shape)
                   for field, dtype, shape in (
                       (pg.BOXES_FIELD, schema.TSV_BOXES_DTYPE, [k, schema.BOX_COORDS]),
                       (pg.FEATURES_FIELD, schema.TSV_FEATURES_DTYPE, [k, schema.FEATURE_DIM]),
                       (pg.LABELS_FIELD, schema.TSV_LABELS_DTYPE, [k]))]
        items.append(tuple(decoded))
    dense = dict(_dense_fields(items), **{f: ints(f) for f in sig_lib.PRODUCT_INT_FIELDS})
    queries = strings("query")
    return _requests(queries, queries[:1], b64, b64, dense)


def write_warmup(path: str, requests: Requests, model_name: str = DEFAULT_MODEL_NAME) -> int:
    """Writes TF Serving warm-up PredictionLog records (one Predict request per signature).

    Returns the number of records.
    """
    # tensorflow-serving-api is an optional dependency (extras "serving"/"test"): only
    # writing warm-up files needs it.
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
