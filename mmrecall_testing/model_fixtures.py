"""Tiny data sets and configs for the estimator tests (and a fallback for the benchmarks).

`write_prep_dir` writes a directory shaped like a `mmrecall prep` output (manifest.json,
vocab.tsv, word2vec.npy, train/valid/test TFRecord shards) with `schema.encode_example`.

The synthetic world: a product has a colour and a type. Its boxes' 2048-d features are
non-negative, sparse mixtures of a type pattern and a colour pattern plus noise; the first
box's class label is the type's class. A query is "[filler] colour type". Valid lists hold
the answers (same colour and type), near misses (same type, other colour; same colour,
other type) and random products, so that colour and type must both be matched.
"""
import json
import os
from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from data_prep import geometry, schema, text
from estimator.config import Config

COLOURS = ["red", "blue", "green", "black", "white", "pink"]
TYPES = ["dress", "shoe", "bag", "shirt", "lamp", "sofa"]
TYPE_CLASS = [1, 4, 3, 0, 19, 9]
FILLERS = ["new", "style", "fashion", "ms", "summer"]


def tiny_config(**overrides):
    """A Config small enough for unit tests (width 24, one layer each)."""
    values = dict(hidden_size=24, pooled_size=16, num_heads=4, intermediate_size=32,
                  box_hidden_size=32, geometry_hidden_size=8, matcher_hidden_size=16,
                  text_layers=1, box_layers=1, cross_layers=1, word_embedding_size=8,
                  max_query_tokens=7, max_boxes=5, batch_size=16, num_negatives=4,
                  dropout=0.0, warmup_steps=10, learning_rate=3e-3, train_steps=50,
                  save_checkpoints_steps=1000, save_summary_steps=1000,
                  log_step_count_steps=1000, eval_queries_per_batch=3, shuffle_buffer=256,
                  num_parallel_reads=2, eval_throttle_secs=0)
    values.update(overrides)
    return Config.from_dict(values)


class World:
    """The fixed random patterns of the synthetic world."""

    def __init__(self, seed=0):
        rng = np.random.RandomState(seed)
        self.type_pattern = self._patterns(rng, len(TYPES))
        self.colour_pattern = self._patterns(rng, len(COLOURS))

    @staticmethod
    def _patterns(rng, count):
        pats = np.zeros((count, schema.FEATURE_DIM), np.float32)
        for i in range(count):
            idx = rng.choice(schema.FEATURE_DIM, 64, replace=False)
            pats[i, idx] = rng.uniform(1.0, 4.0, size=64)
        return pats

    def product(self, rng, colour, typ, max_boxes):
        """(boxes [n,4], geometry [n,6], features [n,F], labels [n], h, w)."""
        n = int(rng.randint(1, max_boxes + 1))
        h, w = 800, 800
        tops = rng.uniform(0, 400, n)
        lefts = rng.uniform(0, 400, n)
        boxes = np.stack([tops, lefts, tops + rng.uniform(50, 399, n),
                          lefts + rng.uniform(50, 399, n)], 1).astype(np.float32)
        boxes = np.round(boxes)
        geo = geometry.relative_geometry(boxes, h, w)
        feats = np.zeros((n, schema.FEATURE_DIM), np.float32)
        labels = np.full([n], 28, np.int64)
        for i in range(n):
            sparse = rng.uniform(size=schema.FEATURE_DIM) < 0.02
            noise = rng.uniform(0, 1, schema.FEATURE_DIM) * sparse
            if i == 0:
                feats[i] = (self.type_pattern[typ] + self.colour_pattern[colour]) \
                    * rng.uniform(0.7, 1.3) + noise
                labels[i] = TYPE_CLASS[typ]
            else:
                feats[i] = noise * 3.0
                labels[i] = rng.choice([28, 29, 30, 31, 32])
        return boxes, geo, feats.astype(np.float32), labels, h, w


def _query(rng, colour, typ):
    words = [COLOURS[colour], TYPES[typ]]
    if rng.uniform() < 0.5:
        words = [FILLERS[rng.randint(len(FILLERS))]] + words
    lemmas = list(words)  # our words are their own lemmas
    return " ".join(words), lemmas


def write_prep_dir(path: str, num_train: int = 400, num_valid_queries: int = 12,
                   num_test_queries: int = 0, candidates: int = 8, answers: int = 2,
                   max_boxes: int = 4, embedding_dim: int = 8, train_shards: int = 2,
                   valid_shards: int = 2, compression: str = "", seed: int = 0) -> str:
    """Writes a prep-shaped directory; returns `path`.

    Valid/test shards hold whole queries (rows of a query contiguous, never split).
    """
    rng = np.random.RandomState(seed)
    world = World(seed)
    os.makedirs(path, exist_ok=True)
    tokens = [schema.PAD_TOKEN, schema.UNK_TOKEN] + COLOURS + TYPES + FILLERS
    with open(os.path.join(path, schema.VOCAB_FILE), "w", encoding="utf-8") as f:
        for i, t in enumerate(tokens):
            f.write(f"{t}\t{0 if i < 2 else 100 - i}\n")
    emb = rng.normal(size=(len(tokens), embedding_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.save(os.path.join(path, schema.EMBEDDINGS_FILE), emb)

    next_pid = [100_000_000]

    def example(colour, typ, qid, label, query=None):
        boxes, geo, feats, labels, h, w = world.product(rng, colour, typ, max_boxes)
        raw, lemmas = query
        pid = next_pid[0]
        next_pid[0] += 1
        return schema.encode_example(pid, qid, h, w, raw, lemmas, text.query_key(lemmas),
                                     boxes, geo, feats, labels, label)

    options = tf.io.TFRecordOptions(compression_type=compression or None)
    ext = ".tfrecord" + (".gz" if compression else "")
    splits: Dict[str, dict] = {}

    def write_split(name, groups, shards):
        os.makedirs(os.path.join(path, name), exist_ok=True)
        per = [groups[i::shards] for i in range(shards)]
        info = {"shards": [], "rows": 0}
        for s, chunk in enumerate(per):
            rel = f"{name}/part-{s:05d}{ext}"
            rows = 0
            with tf.io.TFRecordWriter(os.path.join(path, rel), options) as w:
                for group in chunk:
                    for rec in group:
                        w.write(rec)
                        rows += 1
            info["shards"].append({"file": rel, "rows": rows})
            info["rows"] += rows
        splits[name] = info

    train = []
    for i in range(num_train):
        c, t = rng.randint(len(COLOURS)), rng.randint(len(TYPES))
        train.append([example(c, t, 1_000_000 + i, 1, _query(rng, c, t))])
    write_split("train", train, train_shards)

    def candidate_lists(nq, qid0, label_known):
        groups = []
        for qi in range(nq):
            c, t = rng.randint(len(COLOURS)), rng.randint(len(TYPES))
            query = _query(rng, c, t)
            rows = []
            for _ in range(answers):
                rows.append((c, t, 1))
            while len(rows) < candidates:
                kind = len(rows) % 3
                if kind == 0:
                    oc = (c + rng.randint(1, len(COLOURS))) % len(COLOURS)
                    rows.append((oc, t, 0))
                elif kind == 1:
                    ot = (t + rng.randint(1, len(TYPES))) % len(TYPES)
                    rows.append((c, ot, 0))
                else:
                    oc = (c + rng.randint(1, len(COLOURS))) % len(COLOURS)
                    ot = (t + rng.randint(1, len(TYPES))) % len(TYPES)
                    rows.append((oc, ot, 0))
            order = rng.permutation(len(rows))
            groups.append([example(rows[j][0], rows[j][1], qid0 + qi,
                                   rows[j][2] if label_known else None, query) for j in order])
        return groups

    if num_valid_queries:
        write_split("valid", candidate_lists(num_valid_queries, 2_000_000, True), valid_shards)
    if num_test_queries:
        write_split("test", candidate_lists(num_test_queries, 3_000_000, False), 1)
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "normalization_version": text.NORMALIZATION_VERSION, "compression": compression,
        "max_boxes": max_boxes, "vocab": schema.VOCAB_FILE,
        "embeddings": schema.EMBEDDINGS_FILE, "embedding_dim": embedding_dim,
        "vocab_size": len(tokens), "splits": splits,
    }
    with open(os.path.join(path, schema.MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return path


def random_batch(batch=13, tokens=7, boxes=5, vocab_size=20, seed=0,
                 num_tokens: Optional[np.ndarray] = None, num_boxes: Optional[np.ndarray] = None):
    """A numpy features dict with padded positions filled with garbage (not zeros), so
    that tests catch code that reads past the counts."""
    rng = np.random.RandomState(seed)
    nt = rng.randint(1, tokens + 1, size=batch) if num_tokens is None else num_tokens
    nb = rng.randint(1, boxes + 1, size=batch) if num_boxes is None else num_boxes
    return {
        schema.F_TOKEN_IDS: rng.randint(2, vocab_size, size=(batch, tokens)).astype(np.int32),
        schema.F_NUM_TOKENS: np.asarray(nt, np.int32),
        schema.F_BOX_FEATURES:
            rng.uniform(0, 3, (batch, boxes, schema.FEATURE_DIM)).astype(np.float32),
        schema.F_BOX_GEOMETRY:
            rng.uniform(0, 1, (batch, boxes, schema.GEOMETRY_DIM)).astype(np.float32),
        schema.F_BOX_LABELS: rng.randint(0, schema.NUM_CLASSES, (batch, boxes)).astype(np.int32),
        schema.F_NUM_BOXES: np.asarray(nb, np.int32),
        schema.F_QUERY_KEY: rng.randint(0, 5, size=batch).astype(np.int64),
        schema.F_PRODUCT_ID: np.arange(batch, dtype=np.int64) + 100,
        schema.F_QUERY_ID: rng.randint(0, 4, size=batch).astype(np.int64),
    }
