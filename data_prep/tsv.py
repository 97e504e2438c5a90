"""The competition TSV format: encoding rows (generator, tests) and reading them (prep)."""
import base64
from typing import Sequence

import numpy as np

from data_prep import schema

HEADER_LINE = "\t".join(schema.TSV_COLUMNS)


def b64(array: np.ndarray, dtype: np.dtype) -> str:
    """Standard base64 (with '=' padding) of an array's little-endian bytes."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def encode_row(product_id: int, image_h: int, image_w: int, boxes: np.ndarray,
               features: np.ndarray, class_labels: Sequence[int], query: str,
               query_id: int) -> str:
    """Formats one TSV data line (no trailing newline) in the competition's column order.

    Args:
      boxes: float [N, 4] pixel top, left, bottom, right.
      features: float [N, 2048] region features.
      class_labels: int [N] class ids.
      query: query text; must not contain a tab or newline.
    """
    n = int(np.shape(boxes)[0])
    if "\t" in query or "\n" in query or "\r" in query:
        raise ValueError(f"query {query!r} contains a tab or line break")
    return "\t".join([
        str(int(product_id)), str(int(image_h)), str(int(image_w)), str(n),
        b64(boxes, schema.TSV_BOXES_DTYPE),
        b64(features, schema.TSV_FEATURES_DTYPE),
        b64(np.asarray(class_labels), schema.TSV_LABELS_DTYPE),
        query, str(int(query_id)),
    ])
