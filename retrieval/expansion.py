"""Query expansion for catalogue search: pseudo-relevance feedback on the retrieval side.

A query's answers resemble each other, and its few nearest products are mostly answers, so a
query moved towards them finds more answers than the query alone (average query expansion,
"alpha-QE" of image retrieval). Per query, with unit query embedding q^ and unit catalogue
embeddings p:

    first pass   the m products with the highest q^ . p
    centroid     c^ = unit mean of their embeddings                      [E]
    retrieval    score(p) = (q^ + weight * c^) . p = cos(q, p) + weight * cos(c, p)
    rerank       score(p) = z(served score) + weight * z(c^ . p)   over the reranked list

z() z-scores over the list (estimator.list_stage.zscore_numpy), so the reranked list keeps
the model's served score (pair score and list stage) and adds the same centroid similarity
the retrieval used, at the same weight. weight 0 (or m 0) turns expansion off: retrieval by
q . p and the served score alone, as before expansion existed.

Defaults (weight 1, m 3) are the middle of a plateau measured on the valid queries of two
generated regimes (default and cluster): weight 1-2 with m 3-4 all gained about +0.026
recall@100 of the answers and +0.015 NDCG@5 of the towers' order; m 1 or weight 3 gained
less. `bench/retrieval.py --end-to-end` reports search with and without it.

`expand_in_graph` is the same retrieval step in TensorFlow ops, for the served retrieval
SavedModel (retrieval/served.py).
"""
import argparse
from typing import NamedTuple

import numpy as np

from estimator import list_stage


class Expansion(NamedTuple):
    """weight: the centroid's weight (0 = off); m: first-pass products in the centroid."""
    weight: float = 1.0
    m: int = 3

    @property
    def active(self) -> bool:
        """True when expansion changes anything (weight and m both nonzero)."""
        return self.weight != 0.0 and self.m > 0

    def to_dict(self) -> dict:
        """A JSON-serialisable {"weight", "m"} mapping."""
        return {"weight": float(self.weight), "m": int(self.m)}


OFF = Expansion(weight=0.0, m=0)


def checked(expansion: Expansion) -> Expansion:
    """The expansion itself; ValueError for a negative or non-finite weight, or m < 0."""
    if not np.isfinite(expansion.weight) or expansion.weight < 0 or expansion.m < 0:
        raise ValueError(f"query expansion needs weight >= 0 and m >= 0, got weight "
                         f"{expansion.weight}, m {expansion.m}")
    return expansion


def centroids(embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Unit mean embedding of each query's first-pass products.

    Args:
      embeddings: float32 [P, E] catalogue embeddings (array or memory map).
      rows: int64 [B, m] catalogue rows, best first; -1 where the index found fewer.
    Returns:
      float32 [B, E]; a zero row for a query with no product found.
    """
    rows = np.asarray(rows, np.int64)
    found = (rows >= 0).astype(np.float32)[..., np.newaxis]                          # [B, m, 1]
    vectors = np.asarray(embeddings[np.maximum(rows, 0).reshape(-1)], np.float32)
    vectors = vectors.reshape(rows.shape + (-1,)) * found                             # [B, m, E]
    return list_stage.l2_normalize_numpy(vectors.sum(1)).astype(np.float32)


def expanded_queries(queries: np.ndarray, centroid: np.ndarray, weight: float) -> np.ndarray:
    """q^ + weight * c^: float32 [B, E] from query embeddings [B, E] and centroids [B, E]."""
    unit = list_stage.l2_normalize_numpy(np.asarray(queries, np.float32))
    return (unit + weight * centroid).astype(np.float32)


def fused_scores(served: np.ndarray, candidates: np.ndarray, centroid: np.ndarray,
                 weight: float) -> np.ndarray:
    """z(served) + weight * z(candidate . centroid) over one reranked list.

    Args:
      served: float [C] the `rank` signature's scores of the list.
      candidates: float32 [C, E] the candidates' catalogue embeddings (unit, as indexed).
      centroid: float32 [E] the query's centroid (centroids()).
      weight: the expansion weight.
    Returns:
      float64 [C]; a constant input contributes 0 (z of a flat list).
    """
    served = np.asarray(served, np.float64)[np.newaxis]
    similarity = (np.asarray(candidates, np.float64) @ np.asarray(centroid, np.float64))[
        np.newaxis]
    mask = np.ones_like(served, bool)
    return (list_stage.zscore_numpy(served, mask)
            + weight * list_stage.zscore_numpy(similarity, mask))[0]


def add_arguments(parser: argparse.ArgumentParser, prefix: str, whose: str) -> None:
    """Adds --{prefix}expand-weight and --{prefix}expand-m (defaults: Expansion()) to a
    command line; `whose` names the retrieval they set in the help."""
    default = Expansion()
    parser.add_argument(f"--{prefix}expand-weight", type=float, default=default.weight,
                        help=f"{whose} query expansion: weight of the centroid of the first "
                             f"pass's nearest products (default {default.weight:g}; 0 turns "
                             f"it off)")
    parser.add_argument(f"--{prefix}expand-m", type=int, default=default.m,
                        help=f"{whose} query expansion: products in that centroid (default "
                             f"{default.m})")


def from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   prefix: str) -> Expansion:
    """The checked Expansion of add_arguments' flags; a bad value is a usage error (exit 2)."""
    name = prefix.replace("-", "_")
    try:
        return checked(Expansion(getattr(args, f"{name}expand_weight"),
                                 getattr(args, f"{name}expand_m")))
    except ValueError as e:
        parser.error(str(e))


def expand_in_graph(query, catalogue, expansion: Expansion):
    """The retrieval step in TF ops: query [B, E] float32, catalogue [P, E] float32 ->
    expanded query [B, E] (q^ + weight * c^), or `query` unchanged when expansion is off.

    The first pass is an exact top m over the catalogue (the served retrieval is exact).
    """
    import tensorflow as tf

    if not checked(expansion).active:
        return query
    scores = tf.matmul(query, catalogue, transpose_b=True)                          # [B, P]
    m = min(int(expansion.m), int(catalogue.shape[0]))
    top = tf.math.top_k(scores, k=m, sorted=True).indices                           # [B, m]
    centroid = tf.math.l2_normalize(
        tf.reduce_sum(tf.gather(catalogue, top), axis=1), axis=-1)                  # [B, E]
    return tf.math.l2_normalize(query, axis=-1) + expansion.weight * centroid
