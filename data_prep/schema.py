"""The one definition of every column, TFRecord feature and model input of mmrecall.

The TSV writer/reader, the TFRecord writer, the input_fn and the serving code all import
their names, dtypes and shapes from here, so they cannot drift apart.

Dimension legend, one meaning per letter across the project:
  B batch, T query tokens, N boxes, F region-feature width (2048), G geometry width (6),
  W word2vec width, D model width, E pooled width, K negatives, V vocabulary entries,
  Q queries, C candidates per query, P (query, product) pairs.
"""
from typing import Dict, Optional, Sequence

import numpy as np

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------------------
# Competition TSV layout (see shared/KDD_FORMAT.md).
TSV_COLUMNS = (
    "product_id", "image_h", "image_w", "num_boxes", "boxes", "features",
    "class_labels", "query", "query_id",
)
FEATURE_DIM = 2048          # F: width of one region feature vector
BOX_COORDS = 4              # top, left, bottom, right in pixels
NUM_CLASSES = 33            # ids 0..32 of multimodal_labels.txt
# multimodal_labels.txt: the detector's class names, by class id.
CLASS_NAMES = (
    "top clothes", "skirt & dress", "bottom clothes", "luggage, leather goods", "shoes",
    "accessories", "snacks, nuts, liquor and tea", "makeup, perfume, beauty tools",
    "bottle drink", "furniture", "stationery", "household electrical appliances",
    "home decoration", "household fabric", "kitchenware", "cleaning tools",
    "storage supplies", "vehicles, riding equipment", "outdoor product", "lighting", "toys",
    "underwear", "digital supplies", "bed linens", "baby products", "personal care",
    "sporting goods", "clothes (accessories, baby clothing)", "others", "human face", "arm",
    "hair", "hand",
)
TSV_BOXES_DTYPE = np.dtype("<f4")     # [N, 4]
TSV_FEATURES_DTYPE = np.dtype("<f4")  # [N, F]
TSV_LABELS_DTYPE = np.dtype("<i8")    # [N]
NDCG_K = 5                  # the metric's cutoff (NDCG@5) and the products per submission row
SUBMISSION_HEADER = ("query-id",) + tuple(f"product{i}" for i in range(1, NDCG_K + 1))

# ---------------------------------------------------------------------------------------
# Relative box geometry: one row of GEOMETRY_DIM floats per box (data_prep.geometry).
GEOMETRY_FIELDS = (
    "top_rel",      # top / image_h
    "left_rel",     # left / image_w
    "bottom_rel",   # bottom / image_h
    "right_rel",    # right / image_w
    "area_rel",     # box area / image area
    "log_aspect",   # log(box width / box height)
)
GEOMETRY_DIM = len(GEOMETRY_FIELDS)   # G

# ---------------------------------------------------------------------------------------
# Stored TFRecord features (tf.train.Example), written by data_prep.worker.
PRODUCT_ID = "product_id"        # int64 scalar
QUERY_ID = "query_id"            # int64 scalar
IMAGE_H = "image_h"              # int64 scalar, pixels
IMAGE_W = "image_w"              # int64 scalar, pixels
NUM_BOXES = "num_boxes"          # int64 scalar, boxes kept (after the cap)
QUERY = "query"                  # bytes scalar, the raw query text (UTF-8)
QUERY_LEMMAS = "query_lemmas"    # bytes [T], normalised tokens (data_prep.text)
QUERY_KEY = "query_key"          # int64 scalar, fingerprint of the normalised query
BOXES = "boxes"                  # float [N*4], pixel top, left, bottom, right (after clipping)
BOX_GEOMETRY = "box_geometry"    # float [N*G], relative geometry
BOX_FEATURES = "box_features"    # bytes scalar, little-endian float32 [N*F]
BOX_LABELS = "box_labels"        # int64 [N], class ids
LABEL = "label"                  # int64 scalar: 1 positive, 0 negative, -1 unknown (test)

UNKNOWN_LABEL = -1


def tfrecord_feature_spec() -> Dict[str, object]:
    """Returns the `tf.io.parse_example` spec of the stored TFRecord features.

    Variable-length features parse as `tf.io.RaggedFeature` (rank-1 per example), so a
    batch parses to ragged tensors of shape [B, None].
    """
    import tensorflow as tf

    return {
        PRODUCT_ID: tf.io.FixedLenFeature([], tf.int64),
        QUERY_ID: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_H: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_W: tf.io.FixedLenFeature([], tf.int64),
        NUM_BOXES: tf.io.FixedLenFeature([], tf.int64),
        QUERY: tf.io.FixedLenFeature([], tf.string),
        QUERY_LEMMAS: tf.io.RaggedFeature(tf.string),
        QUERY_KEY: tf.io.FixedLenFeature([], tf.int64),
        BOXES: tf.io.RaggedFeature(tf.float32),
        BOX_GEOMETRY: tf.io.RaggedFeature(tf.float32),
        BOX_FEATURES: tf.io.FixedLenFeature([], tf.string),
        BOX_LABELS: tf.io.RaggedFeature(tf.int64),
        LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=UNKNOWN_LABEL),
    }


def encode_example(
    product_id: int,
    query_id: int,
    image_h: int,
    image_w: int,
    query: str,
    query_lemmas: Sequence[str],
    query_key: int,
    boxes: np.ndarray,
    box_geometry: np.ndarray,
    box_features: np.ndarray,
    box_labels: np.ndarray,
    label: Optional[int] = None,
) -> bytes:
    """Serialises one (query, product) row as a tf.train.Example.

    Args:
      product_id, query_id: ids from the TSV.
      image_h, image_w: image size in pixels.
      query: raw query text.
      query_lemmas: normalised tokens of `query` (data_prep.text.normalize_query).
      query_key: int64 fingerprint of the normalised query (data_prep.text.query_key).
      boxes: float32 [N, 4] pixel top, left, bottom, right.
      box_geometry: float32 [N, G] relative geometry (data_prep.geometry).
      box_features: float32 [N, F] region features.
      box_labels: int [N] class ids.
      label: 1/0 relevance, or None when unknown.
    Returns:
      The serialised tf.train.Example bytes.
    """
    import tensorflow as tf

    n = int(boxes.shape[0])
    if box_geometry.shape != (n, GEOMETRY_DIM) or box_features.shape != (n, FEATURE_DIM) \
            or np.shape(box_labels) != (n,):
        raise ValueError(
            f"inconsistent box arrays: boxes {boxes.shape}, geometry {box_geometry.shape}, "
            f"features {box_features.shape}, labels {np.shape(box_labels)}")

    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    def floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    def byts(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    feature = {
        PRODUCT_ID: ints([int(product_id)]),
        QUERY_ID: ints([int(query_id)]),
        IMAGE_H: ints([int(image_h)]),
        IMAGE_W: ints([int(image_w)]),
        NUM_BOXES: ints([n]),
        QUERY: byts([query.encode("utf-8")]),
        QUERY_LEMMAS: byts([t.encode("utf-8") for t in query_lemmas]),
        QUERY_KEY: ints([int(query_key)]),
        BOXES: floats(np.asarray(boxes, np.float32).reshape(-1)),
        BOX_GEOMETRY: floats(np.asarray(box_geometry, np.float32).reshape(-1)),
        BOX_FEATURES: byts([np.ascontiguousarray(box_features, dtype="<f4").tobytes()]),
        BOX_LABELS: ints(np.asarray(box_labels, np.int64).reshape(-1)),
        LABEL: ints([UNKNOWN_LABEL if label is None else int(label)]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# ---------------------------------------------------------------------------------------
# Model inputs: the `features` dict that model_fn receives, from the input_fn in training
# and from the serving receivers in the export. Padded dense tensors plus counts.
F_TOKEN_IDS = "token_ids"          # int32 [B, T], 0 = padding, 1 = unknown word
F_NUM_TOKENS = "num_tokens"        # int32 [B]
F_BOX_FEATURES = "box_features"    # float32 [B, N, F]
F_BOX_GEOMETRY = "box_geometry"    # float32 [B, N, G]
F_BOX_LABELS = "box_labels"        # int32 [B, N]
F_NUM_BOXES = "num_boxes"          # int32 [B]
F_QUERY_KEY = "query_key"          # int64 [B], equal for equal normalised queries
F_PRODUCT_ID = "product_id"        # int64 [B]
F_QUERY_ID = "query_id"            # int64 [B]
# labels passed to model_fn: float32 [B], 1 positive / 0 negative (absent in PREDICT).

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"

# Files inside a `mmrecall prep` output directory.
MANIFEST_FILE = "manifest.json"
VOCAB_FILE = "vocab.tsv"              # token<TAB>count per line; line i is id i
EMBEDDINGS_FILE = "word2vec.npy"      # float32 [V, W], rows aligned with vocab.tsv, L2-normalised
SPLITS = ("train", "valid", "test")
