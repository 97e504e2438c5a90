"""The list-aware second stage: re-scores a query's candidates knowing the whole list.

The products that answer one query tend to resemble each other while a list's negatives are
varied (the cluster hypothesis of information retrieval), so a candidate that looks like
the list's best-scored candidates is more likely an answer than its first-stage score alone
says. Pseudo-relevance feedback (PRF), per list, over its real candidates only:

    z0 = z(first-stage score)
    repeat `iterations` times:
        top      = the m candidates with the highest current score (ties: lower index first)
        centroid = mean of the top candidates' unit product embeddings
        score    = z0 + weight * z(cos(embedding, centroid))
    padded candidates get PADDING_SCORE.

z(x) = (x - mean) / std over the list's real candidates, and 0 for a list whose values are
all equal (std ~ 0: one candidate, or identical candidates). With weight 0 or iterations 0
the output is z0, which ranks exactly as the first stage. A temperature on the z-scores
would change no ranking (only the ratio `weight` sets matters), so there is none.

`prf_scores` is the in-graph version: stock TF ops, dynamic Q and C, so it runs inside the
served `rank` signature. `prf_scores_numpy` is its float64 twin, used for fitting.
`fit_prf` picks (weight, m, iterations) by NDCG@5 on labelled lists with k-fold
cross-validation over lists and reports out-of-fold NDCG@5 of the first stage and of PRF.

The learned list reranker (ListReranker, a masked set transformer over basis-free
per-candidate features and the candidates' pairwise cosines) is measured out of fold
against tuned PRF by `fit_reranker`; it is not yet part of the served graph.

Dimension legend: Q lists (one per query), C candidates per list (padded to the longest),
E product-embedding width, H the reranker's state width.
"""
import itertools
from typing import Dict, List, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from data_prep import schema

PADDING_SCORE = -1e9   # output for padded candidates: below any real score, still finite
# std at or below this fraction of (1 + |mean|) counts as "all values equal": float
# rounding leaves a tiny nonzero std for identical inputs, which must not be blown up.
_FLAT_STD = 1e-6
_NORM_EPS = 1e-12      # squared-norm floor of the L2 normalisations (tf.math.l2_normalize's)
_DISCOUNTS = 1.0 / np.log2(np.arange(schema.NDCG_K) + 2.0)   # [K]: 1, 1/log2(3), ...


class PrfParams(NamedTuple):
    """Settings of pseudo-relevance feedback.

    weight: the z-scored centroid similarity's weight (0 = first-stage ranking).
    m: candidates whose embeddings form the centroid (>= 1; a shorter list uses all).
    iterations: centroid recomputations (>= 0; 0 = first-stage ranking).
    """
    weight: float = 0.0
    m: int = 8
    iterations: int = 2

    def to_dict(self) -> Dict[str, float]:
        """A JSON-serialisable {"weight", "m", "iterations"} mapping."""
        return {"weight": float(self.weight), "m": int(self.m),
                "iterations": int(self.iterations)}

    @classmethod
    def from_dict(cls, values: Dict) -> "PrfParams":
        """The inverse of to_dict; unknown keys are an error."""
        unknown = set(values) - set(cls._fields)
        if unknown:
            raise ValueError(f"unknown PRF settings {sorted(unknown)}; known: {cls._fields}")
        return _checked(cls(**values))


def _checked(params: PrfParams) -> PrfParams:
    params = PrfParams(float(params.weight), int(params.m), int(params.iterations))
    if params.m < 1 or params.iterations < 0:
        raise ValueError(f"PRF needs m >= 1 and iterations >= 0, got {params}")
    return params


def prf_grid(weights: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
             ms: Sequence[int] = (3, 5, 8, 10, 15),
             iterations: Sequence[int] = (1, 2, 3, 4, 6)) -> List[PrfParams]:
    """The product of the settings as a list of PrfParams, weight 0 first and only once.

    Weight 0 ranks as the first stage whatever m and iterations are, so one such point
    stands for all; being first, it wins ties in fit_prf.
    """
    grid = [PrfParams(0.0, min(ms), 0)] if 0.0 in [float(w) for w in weights] else []
    grid += [_checked(PrfParams(w, m, it))
             for w, m, it in itertools.product(weights, ms, iterations) if float(w) != 0.0]
    return grid


DEFAULT_GRID = tuple(prf_grid())


# --- in-graph -------------------------------------------------------------------------------
def _zscore_tf(x, mask, count):
    """x float32 [Q, C] (finite), mask bool [Q, C], count float32 [Q, 1] >= 1 -> [Q, C]."""
    maskf = tf.cast(mask, tf.float32)
    mean = tf.reduce_sum(x * maskf, 1, keepdims=True) / count                  # [Q, 1]
    centred = (x - mean) * maskf
    std = tf.sqrt(tf.reduce_sum(tf.square(centred), 1, keepdims=True) / count)  # [Q, 1]
    flat = std <= _FLAT_STD * (1.0 + tf.abs(mean))
    return tf.where(flat, tf.zeros_like(centred), centred / tf.where(flat, tf.ones_like(std), std))


def _top_m_tf(current, mask, m):
    """bool [Q, C]: the m real candidates of highest current score, ties to lower index."""
    c = tf.shape(current)[1]
    idx = tf.range(c)
    higher = current[:, tf.newaxis, :] > current[:, :, tf.newaxis]           # [Q, C(i), C(j)]
    tied_earlier = tf.logical_and(tf.equal(current[:, tf.newaxis, :], current[:, :, tf.newaxis]),
                                  idx[tf.newaxis, :] < idx[:, tf.newaxis])    # [C(i), C(j)]
    above = tf.logical_and(tf.logical_or(higher, tied_earlier), mask[:, tf.newaxis, :])
    rank = tf.reduce_sum(tf.cast(above, tf.int32), -1)                         # [Q, C] 0-based
    return tf.logical_and(mask, rank < m)


def prf_scores(scores, embeddings, mask, params: PrfParams, name: str = "prf"):
    """Pseudo-relevance feedback in-graph (stock TF ops; graph or eager mode).

    Args:
      scores: float [Q, C] first-stage scores.
      embeddings: float [Q, C, E] product embeddings (L2-normalised by the model; they are
        normalised again, so any nonzero vectors work).
      mask: bool [Q, C], True for real candidates. Padded entries may hold anything,
        even NaN: they never reach a real candidate's output.
      params: PrfParams (Python numbers: they become graph constants).
      name: name scope.
    Returns:
      float32 [Q, C]: the re-scored lists (unitless, z-score scale); PADDING_SCORE where
      mask is False.
    """
    params = _checked(params)
    with tf.name_scope(name):
        mask = tf.cast(mask, tf.bool)
        scores = tf.where(mask, tf.cast(scores, tf.float32), 0.0)                      # [Q, C]
        embeddings = tf.where(mask[..., tf.newaxis], tf.cast(embeddings, tf.float32), 0.0)
        unit = tf.math.l2_normalize(embeddings, -1, epsilon=_NORM_EPS)                 # [Q, C, E]
        count = tf.maximum(tf.reduce_sum(tf.cast(mask, tf.float32), 1, keepdims=True), 1.0)
        base = _zscore_tf(scores, mask, count)                                         # [Q, C]
        current = base
        for _ in range(params.iterations if params.weight != 0.0 else 0):
            top = tf.cast(_top_m_tf(current, mask, params.m), tf.float32)              # [Q, C]
            centroid = tf.reduce_sum(unit * top[..., tf.newaxis], 1)                   # [Q, E]
            centroid = tf.math.l2_normalize(centroid, -1, epsilon=_NORM_EPS)
            cosine = tf.reduce_sum(unit * centroid[:, tf.newaxis, :], -1)              # [Q, C]
            current = base + params.weight * _zscore_tf(cosine, mask, count)
        return tf.where(mask, current, tf.fill(tf.shape(current), PADDING_SCORE))


# --- numpy twin -----------------------------------------------------------------------------
def _zscore_np(x, mask, count):
    mean = (x * mask).sum(1, keepdims=True) / count
    centred = (x - mean) * mask
    std = np.sqrt((centred ** 2).sum(1, keepdims=True) / count)
    flat = std <= _FLAT_STD * (1.0 + np.abs(mean))
    return np.where(flat, 0.0, centred / np.where(flat, 1.0, std))


def zscore_numpy(x, mask) -> np.ndarray:
    """z(x) per row over its masked entries: float [Q, C] x, bool [Q, C] mask -> float64
    [Q, C]; 0 for a row whose masked values are all equal (and at masked-out entries)."""
    maskf = np.asarray(mask, bool).astype(np.float64)
    count = np.maximum(maskf.sum(1, keepdims=True), 1.0)
    return _zscore_np(np.where(maskf > 0, np.asarray(x, np.float64), 0.0), maskf, count)


def l2_normalize_numpy(x) -> np.ndarray:
    """x / ||x|| over the last axis, as tf.math.l2_normalize (a zero vector stays zero)."""
    return x / np.sqrt(np.maximum((x ** 2).sum(-1, keepdims=True), _NORM_EPS))


def _top_m_np(current, mask, m):
    c = current.shape[1]
    idx = np.arange(c)
    higher = current[:, np.newaxis, :] > current[:, :, np.newaxis]             # [Q, C(i), C(j)]
    tied_earlier = ((current[:, np.newaxis, :] == current[:, :, np.newaxis])
                    & (idx[np.newaxis, :] < idx[:, np.newaxis]))
    rank = ((higher | tied_earlier) & mask[:, np.newaxis, :]).sum(-1)          # [Q, C]
    return mask & (rank < m)


def prf_scores_numpy(scores, embeddings, mask, params: PrfParams) -> np.ndarray:
    """The numpy (float64) twin of prf_scores: same arguments, float64 [Q, C] result."""
    params = _checked(params)
    mask = np.asarray(mask, bool)
    with np.errstate(invalid="ignore", over="ignore"):
        scores = np.where(mask, np.asarray(scores, np.float64), 0.0)
        embeddings = np.where(mask[..., np.newaxis], np.asarray(embeddings, np.float64), 0.0)
    unit = l2_normalize_numpy(embeddings)
    count = np.maximum(mask.sum(1, keepdims=True), 1).astype(np.float64)
    maskf = mask.astype(np.float64)
    base = _zscore_np(scores, maskf, count)
    current = base
    for _ in range(params.iterations if params.weight != 0.0 else 0):
        top = _top_m_np(current, mask, params.m).astype(np.float64)
        centroid = l2_normalize_numpy((unit * top[..., np.newaxis]).sum(1))            # [Q, E]
        cosine = (unit * centroid[:, np.newaxis, :]).sum(-1)                           # [Q, C]
        current = base + params.weight * _zscore_np(cosine, maskf, count)
    return np.where(mask, current, PADDING_SCORE)


# --- NDCG@5 and fitting ---------------------------------------------------------------------
def ndcg_per_list(scores, labels, mask) -> np.ndarray:
    """NDCG@K (K = schema.NDCG_K) of each list, as the organiser's scorer computes it.

    Candidates are ranked by score, descending, ties in candidate order (stable), padding
    last and never counted; binary relevance labels > 0.
    Args:
      scores: float [Q, C]; labels: number [Q, C]; mask: bool [Q, C].
    Returns:
      float64 [Q] in [0, 1]; 0 for a list without a positive.
    """
    mask = np.asarray(mask, bool)
    with np.errstate(invalid="ignore"):
        keyed = np.where(mask, -np.asarray(scores, np.float64), np.inf)
    order = np.argsort(keyed, axis=1, kind="stable")[:, :schema.NDCG_K]             # [Q, <=K]
    relevant = (np.asarray(labels) > 0) & mask
    dcg = (np.take_along_axis(relevant, order, 1) * _DISCOUNTS[:order.shape[1]]).sum(1)
    ideal = np.concatenate([[0.0], np.cumsum(_DISCOUNTS)])                          # [K + 1]
    n_relevant = relevant.sum(1)
    idcg = ideal[np.minimum(n_relevant, schema.NDCG_K)]
    return np.where(n_relevant > 0, dcg / np.where(n_relevant > 0, idcg, 1.0), 0.0)


class PrfFit(NamedTuple):
    """fit_prf's result.

    params: the setting chosen on all labelled lists (the one to serve).
    first_stage_ndcg: mean NDCG@5 of the first-stage scores (nothing fitted).
    prf_ndcg: out-of-fold mean NDCG@5 of PRF: each list scored with the setting chosen on
      the other folds.
    fold_params: the setting chosen for each held-out fold.
    grid_ndcg: [(params, mean NDCG@5 over all labelled lists)] for each grid point
      (in-sample: for reading, not for reporting).
    lists: number of labelled lists (those with at least one positive) used.
    """
    params: PrfParams
    first_stage_ndcg: float
    prf_ndcg: float
    fold_params: List[PrfParams]
    grid_ndcg: List
    lists: int

    def to_dict(self) -> Dict:
        """A JSON-serialisable form."""
        return {"params": self.params.to_dict(),
                "first_stage_ndcg@5": self.first_stage_ndcg,
                "prf_ndcg@5_out_of_fold": self.prf_ndcg,
                "fold_params": [p.to_dict() for p in self.fold_params],
                "grid_ndcg@5_in_sample": [dict(p.to_dict(), ndcg=v) for p, v in self.grid_ndcg],
                "lists": self.lists}


def _choose(per_list: np.ndarray, min_t: float) -> int:
    """The grid index to use, from per-list NDCG@5 [grid, lists] with the first stage at 0.

    The point of best mean (the earliest among equal ones), if its paired gain over the
    first stage is at least min_t standard errors; otherwise 0. The best of many grid points
    always gains a little on the lists it was chosen on, even when the lists carry no signal.
    """
    means = per_list.mean(1)
    best = int(np.flatnonzero(means >= means.max() - 1e-12)[0])
    gain = per_list[best] - per_list[0]                                       # [lists]
    if gain.size < 2:
        return best if gain.mean() > 0 and min_t <= 0 else 0
    stderr = gain.std(ddof=1) / np.sqrt(gain.size)
    return best if gain.mean() > 0 and gain.mean() >= min_t * stderr else 0


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """int [n]: the fold of each of n lists, dealt at random (seeded) into near-equal folds."""
    fold_of = np.empty(n, int)
    for f, members in enumerate(np.array_split(np.random.default_rng(seed).permutation(n),
                                               folds)):
        fold_of[members] = f
    return fold_of


def _labelled(scores, embeddings, mask, labels, folds):
    """The lists with at least one positive, as numpy arrays; checks there are >= folds.

    `scores` and `embeddings` may be any two per-list arrays [Q, C, ...]."""
    mask = np.asarray(mask, bool)
    labels = np.asarray(labels)
    keep = ((labels > 0) & mask).any(1)
    n = int(keep.sum())
    if folds < 2 or n < folds:
        raise ValueError(f"{folds}-fold cross-validation needs folds >= 2 and at least "
                         f"{folds} lists with a positive; got {n}")
    return (np.asarray(scores)[keep], np.asarray(embeddings)[keep], mask[keep],
            labels[keep] > 0)


def fit_prf(scores, embeddings, mask, labels, grid: Sequence[PrfParams] = DEFAULT_GRID,
            folds: int = 5, seed: int = 0, min_t: float = 2.5) -> PrfFit:
    """Chooses PRF settings by NDCG@5 with k-fold cross-validation over lists.

    Lists are dealt into `folds` folds at random (seeded). For each fold, the grid point
    of best mean NDCG@5 on the other folds scores the held-out fold, if its paired gain over
    the first stage (weight 0) there is at least `min_t` standard errors, else the first
    stage does; the out-of-fold NDCG@5 is the mean over every list of its held-out value.
    Ties go to the earlier grid point. Without the min_t test, lists that carry no list
    signal would still see the grid's luckiest point chosen and lose out of fold.
    Lists without a positive are left out (their NDCG is 0 whatever the ranking), as the
    organiser averages over answered queries.

    Args:
      scores: float [Q, C] first-stage scores; embeddings: float [Q, C, E];
      mask: bool [Q, C] real candidates; labels: {0, 1} [Q, C].
      grid: the PrfParams to choose from; must hold a weight-0 point (the first stage).
      folds: number of folds (2 <= folds <= labelled lists).
      seed: seed of the dealing of lists into folds.
      min_t: the gain (in standard errors, paired over the fitting lists) PRF needs to be
        chosen over the first stage; 0 takes the best mean.
    Returns:
      PrfFit.
    Raises:
      ValueError: no weight-0 point in the grid, or fewer labelled lists than folds.
    """
    grid = [_checked(PrfParams(*p)) for p in grid]
    if not any(p.weight == 0.0 for p in grid):
        raise ValueError("the grid must hold a weight-0 point, so that PRF is chosen only "
                         "when it beats the first stage")
    grid.sort(key=lambda p: p.weight != 0.0)   # stable: a weight-0 point first, index 0
    scores, embeddings, mask, labels = _labelled(scores, embeddings, mask, labels, folds)
    n = len(scores)

    # Lists are scored independently, so one pass over the grid serves every fold.
    per_list = np.stack([ndcg_per_list(prf_scores_numpy(scores, embeddings, mask, p),
                                       labels, mask) for p in grid])              # [grid, lists]
    chosen, held_out, fold_chosen = _cross_validate(per_list, folds, seed, min_t)
    return PrfFit(
        params=grid[chosen],
        first_stage_ndcg=float(ndcg_per_list(scores, labels, mask).mean()),
        prf_ndcg=float(held_out.mean()),
        fold_params=[grid[i] for i in fold_chosen],
        grid_ndcg=[(p, float(v)) for p, v in zip(grid, per_list.mean(1))],
        lists=n)


def _cross_validate(per_list: np.ndarray, folds: int, seed: int, min_t: float):
    """k-fold choice over a grid whose point 0 is the baseline, from per-list NDCG@5.

    Args:
      per_list: float [grid, lists].
    Returns:
      (index chosen on all lists, float [lists] each list's NDCG@5 under the point chosen
      on the other folds, [folds] the index chosen for each held-out fold).
    """
    n = per_list.shape[1]
    fold_of = fold_assignment(n, folds, seed)
    held_out = np.empty(n)
    fold_chosen = []
    for f in range(folds):
        chosen = _choose(per_list[:, fold_of != f], min_t)
        held_out[fold_of == f] = per_list[chosen, fold_of == f]
        fold_chosen.append(chosen)
    return _choose(per_list, min_t), held_out, fold_chosen


# --- first-stage score mix -------------------------------------------------------------------
TOWER_ONLY = float("inf")   # a tower weight that serves the towers' score alone
DEFAULT_TOWER_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, TOWER_ONLY)


def mixed_scores(cross, tower, tower_weight: float) -> np.ndarray:
    """float64 [...]: cross + tower_weight * tower, or tower alone for TOWER_ONLY.

    Args:
      cross: float [...] the matcher's logits; tower: float [...] the towers' cosine /
        temperature; tower_weight: >= 0 or TOWER_ONLY.
    """
    tower = np.asarray(tower, np.float64)
    if np.isinf(tower_weight):
        return tower
    return np.asarray(cross, np.float64) + tower_weight * tower


class MixFit(NamedTuple):
    """fit_tower_weight's result.

    tower_weight: the weight chosen on all labelled lists (TOWER_ONLY: the towers alone).
    trained_ndcg: mean NDCG@5 with the weight the model was trained to serve.
    fitted_ndcg: out-of-fold mean NDCG@5: each list scored with the weight chosen on the
      other folds.
    fold_weights: the weight chosen for each held-out fold.
    grid_ndcg: [(weight, mean NDCG@5 over all labelled lists)] (in-sample).
    lists: labelled lists used.
    """
    tower_weight: float
    trained_ndcg: float
    fitted_ndcg: float
    fold_weights: List[float]
    grid_ndcg: List
    lists: int

    def to_dict(self) -> Dict:
        """A JSON-serialisable form (TOWER_ONLY as the string "tower")."""
        def name(w):
            return "tower" if np.isinf(w) else float(w)
        return {"tower_weight": name(self.tower_weight),
                "trained_ndcg@5": self.trained_ndcg,
                "fitted_ndcg@5_out_of_fold": self.fitted_ndcg,
                "fold_weights": [name(w) for w in self.fold_weights],
                "grid_ndcg@5_in_sample": [{"tower_weight": name(w), "ndcg": v}
                                          for w, v in self.grid_ndcg],
                "lists": self.lists}


def fit_tower_weight(cross, tower, mask, labels, trained_weight: float,
                     weights: Sequence[float] = DEFAULT_TOWER_WEIGHTS, folds: int = 5,
                     seed: int = 0, min_t: float = 2.0) -> MixFit:
    """Chooses the first stage's tower weight (score = cross + w * tower) by NDCG@5 with
    k-fold cross-validation over lists, as fit_prf chooses PRF settings.

    The weight the model was trained to serve is the baseline: another weight is chosen
    for a fold only when its paired gain over the baseline on the other folds is at least
    `min_t` standard errors. On data where the matcher generalises worse than the towers
    (or better) the served score leans on the better one, measured on labelled lists.

    Args:
      cross, tower: float [Q, C] the two scores of each candidate; mask: bool [Q, C] real
        candidates; labels: {0, 1} [Q, C].
      trained_weight: the configured weight (Config.tower_score_weight; TOWER_ONLY for a
        towers-only serving score).
      weights: the other weights to consider (>= 0 or TOWER_ONLY).
      folds, seed, min_t: as in fit_prf.
    Returns:
      MixFit.
    Raises:
      ValueError: a negative weight, or fewer labelled lists than folds.
    """
    grid = [float(trained_weight)] + [float(w) for w in weights
                                      if float(w) != float(trained_weight)]
    if min(grid) < 0:
        raise ValueError(f"tower weights must be >= 0: {grid}")
    cross, tower, mask, labels = _labelled(cross, tower, mask, labels, folds)
    per_list = np.stack([ndcg_per_list(mixed_scores(cross, tower, w), labels, mask)
                         for w in grid])                                         # [grid, lists]
    chosen, held_out, fold_chosen = _cross_validate(per_list, folds, seed, min_t)
    return MixFit(tower_weight=grid[chosen], trained_ndcg=float(per_list[0].mean()),
                  fitted_ndcg=float(held_out.mean()),
                  fold_weights=[grid[i] for i in fold_chosen],
                  grid_ndcg=[(w, float(v)) for w, v in zip(grid, per_list.mean(1))],
                  lists=len(cross))


# --- learned list reranker (second phase: measured out of fold, not yet served) -------------
class RerankerConfig(NamedTuple):
    """Settings of the learned list reranker (ListReranker) and of its training.

    hidden: width H of the per-candidate states; heads: attention heads (H % heads == 0);
    layers: attention blocks; steps: full-batch Adam steps; learning_rate; l2: weight decay
    of the weight matrices; seed: initial weights.
    """
    hidden: int = 8
    heads: int = 2
    layers: int = 1
    steps: int = 150
    learning_rate: float = 0.01
    l2: float = 1e-2
    seed: int = 0


# Centroid sizes of the PRF-like input features of the reranker.
_FEATURE_MS = (3, 8)
NUM_LIST_FEATURES = 3 + len(_FEATURE_MS)


def list_features(scores, embeddings, mask):
    """Per-candidate features that do not depend on the embedding basis, in-graph.

    Args:
      scores: float [Q, C]; embeddings: float [Q, C, E]; mask: bool [Q, C].
    Returns:
      (features float32 [Q, C, NUM_LIST_FEATURES], similarity float32 [Q, C, C], base
      float32 [Q, C]): features are z(score), the fraction of the list ranked above,
      z(mean cosine to the other candidates) and z(cosine to the centroid of the top m)
      for each m of _FEATURE_MS; similarity the candidates' pairwise cosines (0 for
      padding); base = z(score), the first-stage ranking. Padding is zeroed.
    """
    mask = tf.cast(mask, tf.bool)
    maskf = tf.cast(mask, tf.float32)
    scores = tf.where(mask, tf.cast(scores, tf.float32), 0.0)
    unit = tf.math.l2_normalize(
        tf.where(mask[..., tf.newaxis], tf.cast(embeddings, tf.float32), 0.0), -1,
        epsilon=_NORM_EPS)                                                        # [Q, C, E]
    count = tf.maximum(tf.reduce_sum(maskf, 1, keepdims=True), 1.0)              # [Q, 1]
    base = _zscore_tf(scores, mask, count)
    similarity = tf.einsum("qie,qje->qij", unit, unit)                           # [Q, C, C]
    others = tf.reduce_sum(similarity * maskf[:, tf.newaxis, :], -1) - tf.reduce_sum(
        tf.square(unit), -1)                                                     # [Q, C]
    mean_similarity = others / tf.maximum(count - 1.0, 1.0)
    columns = [base, 1.0 - _rank_fraction_tf(base, mask, count),
               _zscore_tf(mean_similarity, mask, count)]
    for m in _FEATURE_MS:
        top = tf.cast(_top_m_tf(base, mask, m), tf.float32)
        centroid = tf.math.l2_normalize(tf.reduce_sum(unit * top[..., tf.newaxis], 1), -1,
                                        epsilon=_NORM_EPS)                       # [Q, E]
        columns.append(_zscore_tf(tf.reduce_sum(unit * centroid[:, tf.newaxis, :], -1),
                                  mask, count))
    features = tf.stack(columns, -1) * maskf[..., tf.newaxis]  # [Q, C, NUM_LIST_FEATURES]
    return features, similarity * maskf[:, tf.newaxis, :] * maskf[:, :, tf.newaxis], base


def _rank_fraction_tf(values, mask, count):
    """float32 [Q, C]: the fraction of the list's real candidates ranked above (0 = top)."""
    above = tf.logical_and(values[:, tf.newaxis, :] > values[:, :, tf.newaxis],
                           mask[:, tf.newaxis, :])
    return tf.reduce_sum(tf.cast(above, tf.float32), -1) / count


class ListReranker(tf.Module):
    """A small set transformer over a list's candidates, masked for padding.

    Each candidate's features are embedded (width H), then `layers` blocks of multi-head
    self-attention whose logits are the learned query-key product plus a learned multiple
    (per head) of the candidates' cosine similarity, each followed by a two-layer MLP, both
    residual. The output adds a learned correction to z(first-stage score); the last layer
    starts at zero, so an untrained reranker ranks as the first stage.
    """

    def __init__(self, cfg: RerankerConfig, name: str = "list_reranker"):
        super().__init__(name=name)
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden {cfg.hidden} is not a multiple of heads {cfg.heads}")
        self.cfg = cfg
        h = cfg.hidden
        shapes = {"w_in": [NUM_LIST_FEATURES, h]}
        for i in range(cfg.layers):
            shapes.update({f"w_q{i}": [h, h], f"w_k{i}": [h, h], f"w_v{i}": [h, h],
                           f"w_o{i}": [h, h], f"w_1{i}": [h, h], f"w_2{i}": [h, h]})
        with self.name_scope:
            self.weights = {
                k: tf.Variable(tf.random.stateless_normal(
                    shape, [cfg.seed, j]) * (1.0 / np.sqrt(shape[0])), name=k)
                for j, (k, shape) in enumerate(sorted(shapes.items()))}
            self.b_in = tf.Variable(tf.zeros([h]), name="b_in")
            self.similarity_scale = tf.Variable(tf.zeros([cfg.layers, cfg.heads]),
                                                name="similarity_scale")
            self.w_out = tf.Variable(tf.zeros([h, 1]), name="w_out")

    def __call__(self, features, similarity, mask, base):
        """features [Q, C, NUM_LIST_FEATURES], similarity [Q, C, C], mask bool [Q, C],
        base [Q, C] (list_features' outputs) -> scores float32 [Q, C], PADDING_SCORE
        for padding."""
        cfg, w = self.cfg, self.weights
        d = cfg.hidden // cfg.heads
        q_size, c_size = tf.shape(features)[0], tf.shape(features)[1]
        maskf = tf.cast(mask, tf.float32)[..., tf.newaxis]                       # [Q, C, 1]
        state = tf.nn.relu(tf.einsum("qcf,fh->qch", features, w["w_in"]) + self.b_in) * maskf

        def split(x):   # [Q, C, H] -> [Q, heads, C, d]
            return tf.transpose(tf.reshape(x, [q_size, c_size, cfg.heads, d]), [0, 2, 1, 3])

        key_mask = tf.cast(mask, tf.bool)[:, tf.newaxis, tf.newaxis, :]         # [Q, 1, 1, C]
        for i in range(cfg.layers):
            q, k, v = (split(tf.einsum("qch,hk->qck", state, w[f"w_{n}{i}"])) for n in "qkv")
            logits = (tf.einsum("qaid,qajd->qaij", q, k) / np.sqrt(d)
                      + self.similarity_scale[i][tf.newaxis, :, tf.newaxis, tf.newaxis]
                      * similarity[:, tf.newaxis])                                # [Q, heads, C, C]
            attention = tf.nn.softmax(tf.where(key_mask, logits, PADDING_SCORE), -1)
            mixed = tf.reshape(tf.transpose(tf.einsum("qaij,qajd->qaid", attention, v),
                                            [0, 2, 1, 3]), [q_size, c_size, cfg.hidden])
            state = state + tf.einsum("qch,hk->qck", mixed, w[f"w_o{i}"]) * maskf
            hidden = tf.nn.relu(tf.einsum("qch,hk->qck", state, w[f"w_1{i}"]))
            state = state + tf.einsum("qch,hk->qck", hidden, w[f"w_2{i}"]) * maskf
        out = base + tf.einsum("qch,ho->qco", state, self.w_out)[..., 0]
        return tf.where(tf.cast(mask, tf.bool), out, tf.fill(tf.shape(out), PADDING_SCORE))


def _listnet_loss(scores, labels, mask):
    """Mean over lists of the cross-entropy between the softmax of the scores over the real
    candidates and the labels spread evenly over the positives. [Q, C] each -> scalar."""
    labels = tf.cast(labels, tf.float32) * tf.cast(mask, tf.float32)
    target = labels / tf.maximum(tf.reduce_sum(labels, 1, keepdims=True), 1.0)
    log_p = tf.nn.log_softmax(scores, -1)         # padding holds PADDING_SCORE: p = 0
    return -tf.reduce_mean(tf.reduce_sum(target * tf.where(tf.cast(mask, tf.bool), log_p, 0.0),
                                         1))


def train_reranker(scores, embeddings, mask, labels,
                   cfg: RerankerConfig = RerankerConfig()) -> ListReranker:
    """Trains a ListReranker on labelled lists (full batch, Adam, ListNet loss).

    Args:
      scores: float [Q, C]; embeddings: float [Q, C, E]; mask: bool [Q, C];
      labels: {0, 1} [Q, C]; cfg: RerankerConfig.
    Returns:
      the trained ListReranker (eager; call it on list_features' outputs).
    """
    features, similarity, base = list_features(scores, embeddings, mask)
    mask = tf.constant(np.asarray(mask, bool))
    labels = tf.constant(np.asarray(labels, np.float32))
    model = ListReranker(cfg)
    optimizer = tf.keras.optimizers.Adam(cfg.learning_rate)
    matrices = [v for k, v in sorted(model.weights.items())] + [model.w_out]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = (_listnet_loss(model(features, similarity, mask, base), labels, mask)
                    + cfg.l2 * tf.add_n([tf.reduce_sum(tf.square(m)) for m in matrices]))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for _ in range(cfg.steps):
        step()
    return model


def rerank(model: ListReranker, scores, embeddings, mask) -> np.ndarray:
    """A trained ListReranker's scores float32 [Q, C] for lists [Q, C] / [Q, C, E]."""
    features, similarity, base = list_features(scores, embeddings, mask)
    return model(features, similarity, tf.constant(np.asarray(mask, bool)), base).numpy()


class RerankerFit(NamedTuple):
    """fit_reranker's result: out-of-fold mean NDCG@5 of the first stage, of tuned PRF and
    of the learned reranker on the same folds, and the number of labelled lists."""
    first_stage_ndcg: float
    prf_ndcg: float
    reranker_ndcg: float
    lists: int

    def to_dict(self) -> Dict:
        """A JSON-serialisable form."""
        return {"first_stage_ndcg@5": self.first_stage_ndcg,
                "prf_ndcg@5_out_of_fold": self.prf_ndcg,
                "reranker_ndcg@5_out_of_fold": self.reranker_ndcg, "lists": self.lists}


def fit_reranker(scores, embeddings, mask, labels, cfg: RerankerConfig = RerankerConfig(),
                 folds: int = 5, seed: int = 0, grid: Sequence[PrfParams] = DEFAULT_GRID,
                 min_t: float = 2.0, validation_fraction: float = 0.25) -> RerankerFit:
    """Out-of-fold NDCG@5 of the learned reranker next to tuned PRF on the same folds.

    For each fold a reranker is trained on (1 - validation_fraction) of the other folds'
    lists; it ranks the held-out fold if its paired gain over the first stage on the
    remaining validation lists is at least min_t standard errors, otherwise the first stage
    does (the guard fit_prf applies to its grid). PRF is fitted by fit_prf on the same folds.
    Args: as fit_prf, plus cfg (RerankerConfig) and validation_fraction (in (0, 1)).
    Returns:
      RerankerFit.
    """
    prf = fit_prf(scores, embeddings, mask, labels, grid=grid, folds=folds, seed=seed,
                  min_t=min_t)
    scores, embeddings, mask, labels = _labelled(scores, embeddings, mask, labels, folds)
    fold_of = fold_assignment(len(scores), folds, seed)
    first_stage = ndcg_per_list(scores, labels, mask)                           # [lists]
    held_out = first_stage.copy()
    rng = np.random.default_rng(seed + 1)
    for f in range(folds):
        fitting = np.flatnonzero(fold_of != f)
        validation = rng.random(len(fitting)) < validation_fraction
        train, check = fitting[~validation], fitting[validation]
        model = train_reranker(scores[train], embeddings[train], mask[train], labels[train], cfg)
        gain = ndcg_per_list(rerank(model, scores[check], embeddings[check], mask[check]),
                             labels[check], mask[check]) - first_stage[check]
        if _choose(np.stack([np.zeros_like(gain), gain]), min_t) == 1:
            test = fold_of == f
            held_out[test] = ndcg_per_list(rerank(model, scores[test], embeddings[test],
                                                  mask[test]), labels[test], mask[test])
    return RerankerFit(prf.first_stage_ndcg, prf.prf_ndcg, float(held_out.mean()), prf.lists)
