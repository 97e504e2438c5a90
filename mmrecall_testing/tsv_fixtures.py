"""Small competition-format TSVs for the data_prep tests, built with tsv.encode_row."""
import json
import os
from typing import Dict, List, Sequence

import numpy as np

from data_prep import schema, tsv

WORDS = ("red", "dress", "knives", "wooden", "storage", "box", "children", "shoes", "mice",
         "silk", "scarf", "women's", '"new"', "folding", "table", "winter", "jacket")


def random_row(rng: np.random.Generator, product_id: int, query_id: int, query: str = None,
               num_boxes: int = None, image_h: int = 800, image_w: int = 600) -> dict:
    """A valid row as a dict of encode_row arguments, with whole-pixel boxes in the image."""
    n = int(num_boxes if num_boxes is not None else rng.integers(1, 6))
    top = rng.integers(0, image_h // 2, n)
    left = rng.integers(0, image_w // 2, n)
    bottom = top + rng.integers(1, image_h // 2, n)
    right = left + rng.integers(1, image_w // 2, n)
    features = rng.random((n, schema.FEATURE_DIM), dtype=np.float32) * 3
    features[features < 1.0] = 0.0  # many exact zeros, as in the real data
    if query is None:
        query = " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))
    return dict(product_id=product_id, image_h=image_h, image_w=image_w,
                boxes=np.stack([top, left, bottom, right], 1).astype(np.float32),
                features=features, class_labels=rng.integers(0, schema.NUM_CLASSES, n),
                query=query, query_id=query_id)


def line(row: dict) -> str:
    return tsv.encode_row(**row)


def write_tsv(path: str, lines: Sequence[str], header: str = tsv.HEADER_LINE) -> str:
    """Writes a header and lines ("\\n"-terminated) and returns the path."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(header + "\n")
        for text in lines:
            f.write(text + "\n")
    return path


def train_rows(seed: int, count: int) -> List[dict]:
    rng = np.random.default_rng(seed)
    return [random_row(rng, 100_000_000 + i, 1000 + i // 2) for i in range(count)]


def grouped_rows(seed: int, num_queries: int, per_query: int, first_id: int = 103_000_000
                 ) -> List[dict]:
    """valid/test-like rows: `per_query` candidates per query, grouped by query_id."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(num_queries):
        query = " ".join(rng.choice(WORDS, 3))
        for c in range(per_query):
            rows.append(random_row(rng, first_id + q * per_query + c, 5000 + q, query))
    return rows


def answers_for(rows: List[dict], every: int = 3) -> Dict[str, List[int]]:
    """Every `every`-th candidate of each query is an answer."""
    out: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(str(r["query_id"]), [])
        if i % every == 0:
            out[str(r["query_id"])].append(r["product_id"])
    return out


def write_answers(path: str, answers: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(answers, f)
    return path


def read_dir_bytes(root: str, subdirs=("train", "valid", "test")) -> Dict[str, bytes]:
    """{relative path: bytes} of every record file under root/<subdir>."""
    out = {}
    for sub in subdirs:
        directory = os.path.join(root, sub)
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                with open(os.path.join(directory, name), "rb") as f:
                    out[f"{sub}/{name}"] = f.read()
    return out


def with_field(text_line: str, column: str, value: str) -> str:
    """A TSV line with one column's text replaced."""
    fields = text_line.split("\t")
    fields[schema.TSV_COLUMNS.index(column)] = value
    return "\t".join(fields)


def malformed_lines(rng: np.random.Generator) -> List[tuple]:
    """[(line, field, reason)] covering every way a row is rejected by parse_row."""
    def good(**kw):
        return random_row(rng, 100_000_001, 77, **kw)

    r = good(num_boxes=2)
    base = line(r)
    b64 = tsv.b64
    nan_features = r["features"].copy()
    nan_features[1, 5] = np.nan
    neg_features = r["features"].copy()
    neg_features[0, 0] = -0.5
    inf_boxes = r["boxes"].copy()
    inf_boxes[0, 1] = np.inf
    outside = r["boxes"].copy()
    outside[1, 2] = r["image_h"] + 5   # tolerance is 4 px
    flat = r["boxes"].copy()
    flat[0, 2] = flat[0, 0]            # top == bottom
    inverted = r["boxes"].copy()
    inverted[1, 1], inverted[1, 3] = inverted[1, 3] + 1, inverted[1, 1]
    return [
        ("\t".join(base.split("\t")[:-1]), "line", "column_count"),
        (base + "\textra", "line", "column_count"),
        ("", "line", "column_count"),
        (with_field(base, "product_id", "12a"), "product_id", "not_integer"),
        (with_field(base, "query_id", "9" * 20), "query_id", "not_integer"),
        (with_field(base, "product_id", "-3"), "product_id", "negative_id"),
        (with_field(base, "image_h", "0"), "image_h", "image_size"),
        (with_field(base, "image_w", "-600"), "image_w", "image_size"),
        (with_field(base, "num_boxes", "0"), "num_boxes", "num_boxes"),
        (with_field(base, "num_boxes", "3"), "boxes", "byte_length"),
        (with_field(base, "boxes", "abc"), "boxes", "base64"),
        (with_field(base, "features", "!!!!" + base.split("\t")[5][4:]), "features", "base64"),
        (with_field(base, "features", b64(r["features"][:1], "<f4")), "features", "byte_length"),
        (with_field(base, "class_labels", b64(r["class_labels"], "<i4")), "class_labels",
         "byte_length"),
        (with_field(base, "features", b64(nan_features, "<f4")), "features", "non_finite"),
        (with_field(base, "features", b64(neg_features, "<f4")), "features", "negative_feature"),
        (with_field(base, "boxes", b64(inf_boxes, "<f4")), "boxes", "non_finite"),
        (with_field(base, "class_labels", b64(np.array([3, 33]), "<i8")), "class_labels",
         "label_range"),
        (with_field(base, "class_labels", b64(np.array([-1, 3]), "<i8")), "class_labels",
         "label_range"),
        (with_field(base, "boxes", b64(outside, "<f4")), "boxes", "box_outside"),
        (with_field(base, "boxes", b64(flat, "<f4")), "boxes", "box_order"),
        (with_field(base, "boxes", b64(inverted, "<f4")), "boxes", "box_order"),
    ]
