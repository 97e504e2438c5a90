"""geometry.py: relative box geometry, clipping and the box cap, checked against hand values."""
import numpy as np

from data_prep import geometry, schema


def test_relative_geometry_by_hand():
    # Image 200 high x 400 wide.
    # box 0: top 20, left 40, bottom 120, right 240 -> 100 high, 200 wide
    #   rel: 20/200=0.1, 40/400=0.1, 120/200=0.6, 240/400=0.6; area 20000/80000=0.25;
    #   log(200/100)=log 2
    # box 1: the whole image -> 0, 0, 1, 1, area 1, log(400/200)=log 2
    # box 2: 50 high x 10 wide at (0, 390) -> 0, 0.975, 0.25, 1, area 500/80000, log(0.2)
    boxes = np.array([[20, 40, 120, 240], [0, 0, 200, 400], [0, 390, 50, 400]], np.float32)
    got = geometry.relative_geometry(boxes, 200, 400)
    want = [[0.1, 0.1, 0.6, 0.6, 0.25, np.log(2)],
            [0, 0, 1, 1, 1, np.log(2)],
            [0, 0.975, 0.25, 1, 500 / 80000, np.log(0.2)]]
    assert got.shape == (3, schema.GEOMETRY_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_relative_geometry_is_the_float64_formula_rounded_once():
    # Bit for bit what the numpy formula in float64 gives (the serving graph mirrors it),
    # with odd sizes, degenerate boxes (the MIN_SIDE_PX floor) and integer input.
    rng = np.random.default_rng(13)
    top_left = rng.random((13, 2)) * 300
    boxes = np.concatenate([top_left, top_left + rng.random((13, 2)) * 200], 1)
    boxes[3, 2] = boxes[3, 0]  # zero height
    boxes[5, 3] = boxes[5, 1] + 1e-6
    for b, h, w in [(boxes.astype(np.float32), 337, 211), (boxes.astype(np.int64), 500, 500)]:
        f = b.astype(np.float64)
        height = np.maximum(f[:, 2] - f[:, 0], geometry.MIN_SIDE_PX)
        width = np.maximum(f[:, 3] - f[:, 1], geometry.MIN_SIDE_PX)
        want = np.stack([f[:, 0] / h, f[:, 1] / w, f[:, 2] / h, f[:, 3] / w,
                         height * width / (float(h) * float(w)), np.log(width / height)], 1)
        got = geometry.relative_geometry(b, h, w)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))
    assert geometry.relative_geometry(np.zeros((0, 4), np.float32), 5, 5).shape == (0, 6)


def test_clip_boxes_into_the_image():
    boxes = np.array([[-2, 3, 83, 61.5], [5, -0.5, 10, 20]], np.float32)
    np.testing.assert_array_equal(geometry.clip_boxes(boxes, 80, 61),
                                  [[0, 3, 80, 61], [5, 0, 10, 20]])


def test_largest_box_indices_keep_order_and_break_ties_by_index():
    # areas: 100, 4, 100, 400, 4 -> the 3 largest are 3, 0, 2 (0 before 2 on the tie),
    # returned in original order.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 2, 2], [5, 5, 15, 15], [0, 0, 20, 20],
                      [1, 1, 3, 3]], np.float32)
    np.testing.assert_array_equal(geometry.largest_box_indices(boxes, 3), [0, 2, 3])
    np.testing.assert_array_equal(geometry.largest_box_indices(boxes, 1), [3])
    np.testing.assert_array_equal(geometry.largest_box_indices(boxes, 9), [0, 1, 2, 3, 4])
