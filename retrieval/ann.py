"""Top-k by dot product over L2-normalised embeddings: exact, and approximate (ANN).

Kinds (index.json's "ann" records which, with its parameters):
  exact      brute force over the memory-mapped embeddings, block by block; used for
             catalogues below MIN_ANN_PRODUCTS, where an ANN index has too few points to train
  scann      ScaNN (scann==1.3.0): a k-means tree partition, anisotropic product
             quantisation (2 dims per 4-bit block) for scoring, exact re-scoring of the best
             `reorder` candidates
  faiss-ivf  faiss IndexIVFFlat: k-means partition, exact scores inside the searched lists

DEFAULT_KIND is the one bench/retrieval.py measured best (docs/retrieval.md): on 1M
product-tower-like vectors (E = 64, 2 cores) it reached recall@100 >= 0.95 of exact at the
lowest single-query latency.

The ANN libraries are optional (`pip install -e ".[retrieval]"`); they are imported only
when an index of their kind is built or loaded.
"""
import json
import os
import re
from typing import Dict, Optional, Tuple

import numpy as np

EXACT, SCANN, FAISS_IVF = "exact", "scann", "faiss-ivf"
KINDS = (EXACT, SCANN, FAISS_IVF)
DEFAULT_KIND = SCANN
MIN_ANN_PRODUCTS = 20000     # below: exact search (an ANN index would not pay off)
_EXACT_BLOCK = 1 << 18       # products scored at once by exact_top_k (64 MB at E = 64)


def default_params(kind: str, count: int) -> Dict[str, object]:
    """Parameters of a `kind` index over `count` products (what bench/retrieval.py tuned)."""
    if kind == SCANN:
        # 2 sqrt(P) leaves (~500 products each at 1M), a fifth of them searched, the best
        # 2000 by quantised score re-scored exactly: recall@100 ~0.97 at 1M, 0.3 ms (bench).
        leaves = max(16, min(4000, int(2 * np.sqrt(count))))
        return {"num_leaves": leaves, "leaves_to_search": max(8, leaves // 5),
                "reorder": 2000, "training_sample_size": min(count, 250000)}
    if kind == FAISS_IVF:
        # 2 sqrt(P) lists, 1/16 of them probed: recall@100 ~0.95 at 1M, 0.8 ms (bench).
        nlist = max(16, min(8192, int(2 * np.sqrt(count))))
        return {"nlist": nlist, "nprobe": max(4, nlist // 16),
                "training_sample_size": min(count, 100000)}
    return {}


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product, reading the embeddings block by block.

    Args:
      embeddings: float32 [P, E] (a memory map is fine: memory stays one block).
      queries: float32 [B, E].
      k: neighbours, <= P.
    Returns:
      (rows int64 [B, k], scores float32 [B, k]), best first; equal scores: lower row
      first (except among ties for the k-th place inside one block: any of them).
    """
    best_rows = np.zeros([len(queries), 0], np.int64)
    best_scores = np.zeros([len(queries), 0], np.float32)
    for start in range(0, len(embeddings), _EXACT_BLOCK):
        block = np.asarray(embeddings[start:start + _EXACT_BLOCK], np.float32)
        scores = queries @ block.T                                              # [B, blk]
        rows = np.broadcast_to(np.arange(start, start + len(block), dtype=np.int64),
                               scores.shape)
        if scores.shape[1] > k:
            # The block's k best (argpartition: linear); sorting waits for the merge.
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores = np.take_along_axis(scores, part, axis=1)
            rows = np.take_along_axis(rows, part, axis=1)
        scores = np.concatenate([best_scores, scores], axis=1)                  # [B, <= 2k]
        rows = np.concatenate([best_rows, rows], axis=1)
        # Sorted by (-score, row): equal scores keep the lower row first.
        order = np.lexsort((rows, -scores), axis=1)[:, :k]
        best_rows = np.take_along_axis(rows, order, axis=1)
        best_scores = np.take_along_axis(scores, order, axis=1)
    return best_rows, best_scores


class AnnIndex:
    """A built or loaded index of one kind."""

    def __init__(self, kind: str, params: Dict[str, object], embeddings: np.ndarray,
                 impl=None):
        self.kind, self.params, self._embeddings, self._impl = kind, params, embeddings, impl

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """float32 queries [B, E] -> (rows int64 [B, k], scores float32 [B, k]), best first.

        An ANN index may find fewer than k: missing entries are row -1, score -inf.
        """
        queries = np.ascontiguousarray(queries, np.float32)
        if self.kind == EXACT:
            return exact_top_k(self._embeddings, queries, k)
        if self.kind == FAISS_IVF:
            scores, rows = self._impl.search(queries, k)
            return rows.astype(np.int64), np.where(rows < 0, -np.inf, scores).astype(np.float32)
        reorder = max(int(self.params["reorder"]), k)
        if len(queries) == 1:
            rows, scores = self._impl.search(
                queries[0], final_num_neighbors=k, pre_reorder_num_neighbors=reorder,
                leaves_to_search=int(self.params["leaves_to_search"]))
            rows, scores = rows[None], scores[None]
        else:
            rows, scores = self._impl.search_batched_parallel(
                queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder,
                leaves_to_search=int(self.params["leaves_to_search"]))
        rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return rows, scores


def build(embeddings: np.ndarray, ann_dir: str, kind: Optional[str] = None,
          params: Optional[Dict[str, object]] = None, seed: int = 0) -> Dict[str, object]:
    """Builds and saves an index of the embeddings.

    Args:
      embeddings: float32 [P, E] L2-normalised.
      ann_dir: directory to write (created).
      kind: one of KINDS; default DEFAULT_KIND, or EXACT below MIN_ANN_PRODUCTS.
      params: overrides of default_params(kind, P).
    Returns:
      {"kind", "params"}: what load() needs, kept in index.json.
    """
    count = len(embeddings)
    kind = kind or (DEFAULT_KIND if count >= MIN_ANN_PRODUCTS else EXACT)
    if kind not in KINDS:
        raise ValueError(f"unknown ANN kind {kind!r}; one of {KINDS}")
    params = dict(default_params(kind, count), **(params or {}))
    os.makedirs(ann_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == FAISS_IVF:
        import faiss  # optional dependency: only for this kind of index

        data = np.ascontiguousarray(embeddings, np.float32)
        quantizer = faiss.IndexFlatIP(data.shape[1])
        index = faiss.IndexIVFFlat(quantizer, data.shape[1], int(params["nlist"]),
                                   faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(rng.choice(count, int(params["training_sample_size"]), replace=False))
        index.train(data[sample])
        index.add(data)
        faiss.write_index(index, os.path.join(ann_dir, "faiss.index"))
    elif kind == SCANN:
        import scann  # optional dependency: only for this kind of index

        data = np.ascontiguousarray(embeddings, np.float32)
        searcher = scann.scann_ops_pybind.builder(data, 100, "dot_product").tree(
            num_leaves=int(params["num_leaves"]),
            num_leaves_to_search=int(params["leaves_to_search"]),
            training_sample_size=int(params["training_sample_size"])).score_ah(
            2, anisotropic_quantization_threshold=0.2).reorder(int(params["reorder"])).build()
        searcher.serialize(ann_dir)
    with open(os.path.join(ann_dir, "params.json"), "w", encoding="utf-8") as f:
        json.dump({"kind": kind, "params": params}, f, sort_keys=True)
    return {"kind": kind, "params": params}


def load(meta: Dict[str, object], ann_dir: str, embeddings: np.ndarray) -> AnnIndex:
    """The AnnIndex that build() described with `meta` ({"kind", "params"})."""
    kind, params = meta["kind"], meta["params"]
    if kind == FAISS_IVF:
        import faiss  # optional dependency: only for this kind of index

        index = faiss.read_index(os.path.join(ann_dir, "faiss.index"))
        index.nprobe = int(params["nprobe"])
        return AnnIndex(kind, params, embeddings, index)
    if kind == SCANN:
        from scann.scann_ops.py import scann_ops_pybind  # optional dependency: this kind only

        # scann 1.3.0 writes absolute asset paths into scann_assets.pbtxt, which break when
        # the index directory is renamed into place or moved: point them into ann_dir.
        with open(os.path.join(ann_dir, "scann_assets.pbtxt"), encoding="utf-8") as f:
            assets = re.sub(r'asset_path: "(?:[^"]*/)?([^"/]+)"',
                            lambda m: f'asset_path: "{os.path.join(ann_dir, m.group(1))}"',
                            f.read())
        return AnnIndex(kind, params, embeddings, scann_ops_pybind.ScannSearcher(
            scann_ops_pybind.scann_pybind.ScannNumpy(ann_dir, assets), None))
    return AnnIndex(EXACT, params, embeddings)
