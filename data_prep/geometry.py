"""Relative box geometry: position and size normalised by the image, and aspect ratio.

The serving graph mirrors `relative_geometry` with TensorFlow ops (export/), and a test
keeps the two equal.
"""
import numpy as np

from data_prep import schema

# A degenerate (zero-width or zero-height) box would give an infinite log aspect.
MIN_SIDE_PX = 1e-3


def relative_geometry(boxes: np.ndarray, image_h: float, image_w: float) -> np.ndarray:
    """Computes the schema.GEOMETRY_FIELDS of each box.

    Args:
      boxes: float [N, 4] pixel top, left, bottom, right (validated: inside the image,
        top < bottom, left < right).
      image_h, image_w: image size in pixels, > 0.
    Returns:
      float32 [N, G]: top/h, left/w, bottom/h, right/w, area/(h*w),
      log(box width / box height).
    """
    h, w = float(image_h), float(image_w)
    rows = []
    # A handful of boxes: Python floats (IEEE doubles, as numpy's float64) avoid numpy's
    # per-call overhead; np.log keeps the logarithm numpy's.
    boxes = np.asarray(boxes, np.float64).reshape(-1, schema.BOX_COORDS)
    for top, left, bottom, right in boxes.tolist():
        height = max(bottom - top, MIN_SIDE_PX)
        width = max(right - left, MIN_SIDE_PX)
        rows.append((top / h, left / w, bottom / h, right / w, (height * width) / (h * w),
                     width / height))
    out = np.array(rows, np.float64).reshape(-1, schema.GEOMETRY_DIM)
    np.log(out[:, 5], out=out[:, 5])
    return out.astype(np.float32)


# Boxes may overshoot the image by this much (detector rounding) and are clipped; a box
# further outside is rejected as nonsense.
CLIP_TOLERANCE_PX = 4.0


def clip_boxes(boxes: np.ndarray, image_h: float, image_w: float) -> np.ndarray:
    """Clips pixel top, left, bottom, right boxes [N, 4] into [0, h] x [0, w] (float32)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, schema.BOX_COORDS)
    limits = np.array([image_h, image_w, image_h, image_w], np.float32)
    return np.clip(boxes, 0.0, limits)


def largest_box_indices(boxes: np.ndarray, max_boxes: int) -> np.ndarray:
    """Indices of the `max_boxes` largest boxes by pixel area, in their original order.

    Ties keep the earlier box. The serving graph mirrors this rule.

    Args:
      boxes: float [N, 4] pixel top, left, bottom, right.
      max_boxes: the cap, > 0.
    Returns:
      int64 [min(N, max_boxes)] increasing indices into boxes.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, schema.BOX_COORDS)
    if len(boxes) <= max_boxes:
        return np.arange(len(boxes), dtype=np.int64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.lexsort((np.arange(len(boxes)), -area))  # by area desc, then index asc
    return np.sort(order[:max_boxes]).astype(np.int64)
