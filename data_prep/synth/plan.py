"""Plans: which (query, product) rows each file holds. Cheap; photos are rendered later.

Train rows are positive (query, product) pairs. Valid and test hold candidate lists: a
query, its answers and hard negatives, part of them reused from a pool shared by all lists.
"""
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from data_prep.synth.config import STREAM_EVAL, STREAM_TRAIN, SynthConfig, stream_rng
from data_prep.synth.queries import make_query
from data_prep.synth.world import (
    PRODUCT_TYPES, TYPES_OF_CLASS, VISUAL_ATTRIBUTES, Product, Query, Spec, is_relevant,
    other_value, random_spec, type_cdf, types_in_use, value_bounds)

TRAIN_PRODUCT_BASE = 100_000_000
TRAIN_PRODUCT_SPAN = 3_000_000
TRAIN_QUERY_BASE = 1
VALID_QUERY_BASE = 1_000_000_001
TEST_QUERY_BASE = 2_000_000_001


class CandidateList(NamedTuple):
    """One valid/test query with its candidates."""
    query: Query
    products: List[Product]        # in file order, answers mixed among negatives
    answers: List[int]             # product ids


def positives(rng: np.random.Generator, query: Query, target: Spec, n: int,
              cluster: float) -> List[Spec]:
    """`n` products relevant to `query`; what they share beyond it follows `cluster`.

    Args:
      target: the product the query was written for; its unstated values are the list's
        common ones.
      cluster: in [-1, 1]. > 0: each unstated value is the target's with this probability;
        < 0: with probability -cluster an unstated value another positive already has is
        redrawn among the values none has (where one is left); 0: all values random.
    """
    if cluster == 0.0:
        return [random_spec(rng, query.type, query.mentioned) for _ in range(n)]
    unstated = [a for a, v in enumerate(query.mentioned) if v is None]
    specs: List[Spec] = []
    for _ in range(n):
        u = rng.random(len(query.mentioned))
        fixed = list(query.mentioned)
        for a in unstated:
            if u[a] < cluster:
                fixed[a] = target.value(a)
        spec = random_spec(rng, query.type, fixed)
        if cluster < 0:
            values = list(spec[1:])
            for a in unstated:
                used = {s.value(a) for s in specs}
                free = [v for v in range(*value_bounds(a, query.type)) if v not in used]
                if u[a] < -cluster and values[a] in used and free:
                    values[a] = free[int(rng.integers(len(free)))]
            spec = Spec(query.type, *values)
        specs.append(spec)
    return specs


def plan_train(cfg: SynthConfig) -> Iterator[Tuple[Query, Product]]:
    """Yields cfg.train_rows (query, positive product) pairs, ~1.8 products per query.

    Product ids are distinct, drawn from [100M, 100M + max(3M, rows)).
    """
    rng = stream_rng(cfg.seed, STREAM_TRAIN)
    types = type_cdf(cfg.product_types)
    span = max(TRAIN_PRODUCT_SPAN, cfg.train_rows)
    product_ids = TRAIN_PRODUCT_BASE + rng.choice(span, size=cfg.train_rows, replace=False)
    row, query_id = 0, TRAIN_QUERY_BASE
    while row < cfg.train_rows:
        target = random_spec(rng, types=types)
        query = make_query(rng, query_id, target, False, cfg.mention_scale, cfg.paraphrase)
        n = min(int(rng.geometric(0.55)), cfg.train_rows - row)
        for spec in positives(rng, query, target, n, cfg.cluster):
            yield query, Product(int(product_ids[row]), spec)
            row += 1
        query_id += 1


class _EvalPlanner:
    """Builds valid and test candidate lists, sharing one pool of negatives across both."""

    NEGATIVE_KINDS = ("one_off", "same_type", "same_class", "random")
    NEGATIVE_PROBS = (0.55, 0.2, 0.1, 0.15)

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.rng = stream_rng(cfg.seed, STREAM_EVAL)
        self.next_product_id = TRAIN_PRODUCT_BASE + max(TRAIN_PRODUCT_SPAN, cfg.train_rows)
        self.pool: List[Product] = []
        self.pool_by_type: Dict[int, List[Product]] = {}
        self.types = type_cdf(cfg.product_types)
        self.types_in_use = frozenset(types_in_use(cfg.product_types))

    def candidate_list(self, query_id: int) -> CandidateList:
        """The next list: answers and negatives in random order, the new negatives pooled."""
        rng, cfg = self.rng, self.cfg
        n_answers, n_candidates = self._list_sizes()
        target = random_spec(rng, types=self.types)
        query = make_query(rng, query_id, target, True, cfg.mention_scale, cfg.paraphrase)
        fresh = positives(rng, query, target, n_answers, cfg.cluster)
        reused: List[Product] = []
        kinds = rng.choice(len(self.NEGATIVE_KINDS), size=n_candidates - n_answers,
                           p=self.NEGATIVE_PROBS)
        for kind in kinds:
            pooled = self._from_pool(query, self.NEGATIVE_KINDS[kind], reused)
            if pooled is not None:
                reused.append(pooled)
            else:
                fresh.append(self._negative(query, self.NEGATIVE_KINDS[kind]))
        ids = self._new_ids(len(fresh))   # random order, so ids do not reveal answers
        new_products = [Product(i, s, None if k < n_answers else self._decoy(query, s))
                        for k, (i, s) in enumerate(zip(ids, fresh))]
        products = new_products + reused
        products = [products[i] for i in rng.permutation(len(products))]
        for p in new_products[n_answers:]:
            self.pool.append(p)
            self.pool_by_type.setdefault(p.spec.type, []).append(p)
        return CandidateList(query, products, [p.product_id for p in new_products[:n_answers]])

    def _list_sizes(self) -> Tuple[int, int]:
        rng, cfg = self.rng, self.cfg
        n_answers = cfg.answers
        if cfg.answers > 2 and rng.random() < 0.1:
            n_answers = int(rng.integers(2, cfg.answers))
        n_candidates = cfg.candidates
        if rng.random() < 0.15:
            low = max(n_answers + 2, min(8, cfg.candidates), cfg.candidates // 4)
            n_candidates = int(rng.integers(min(low, cfg.candidates), cfg.candidates + 1))
        return n_answers, max(n_candidates, n_answers + 1)

    def _new_ids(self, n: int) -> List[int]:
        gaps = self.rng.integers(1, 8, size=n)
        ids = self.next_product_id + np.cumsum(gaps)
        self.next_product_id = int(ids[-1]) + 1 if n else self.next_product_id
        return [int(i) for i in self.rng.permutation(ids)]

    def _decoy(self, query: Query, spec: Spec) -> Optional[Tuple[Optional[int], ...]]:
        """With P = cfg.binding, the query's stated visual values `spec` lacks (or None)."""
        if self.cfg.binding <= 0.0 or self.rng.random() >= self.cfg.binding:
            return None
        lacking = [a for a in VISUAL_ATTRIBUTES
                   if query.mentioned[a] is not None and spec.value(a) != query.mentioned[a]]
        if not lacking:
            return None
        return tuple(query.mentioned[a] if a in lacking else None
                     for a in range(len(query.mentioned)))

    def _negative(self, query: Query, kind: str) -> Spec:
        rng = self.rng
        if kind == "same_class":
            others = [t for t in TYPES_OF_CLASS[PRODUCT_TYPES[query.type].class_id]
                      if t != query.type and t in self.types_in_use]
            if others:
                return random_spec(rng, others[int(rng.integers(len(others)))])
            kind = "random"
        if kind in ("same_type", "random"):
            for _ in range(20):
                spec = random_spec(rng, query.type if kind == "same_type" else None,
                                   types=self.types)
                if not is_relevant(query, spec):
                    return spec
        # one_off: an answer with exactly one mentioned colour/material/style changed.
        said = [a for a in VISUAL_ATTRIBUTES if query.mentioned[a] is not None]
        changed = said[int(rng.integers(len(said)))]
        values = list(query.mentioned)
        values[changed] = other_value(rng, changed, query.mentioned[changed], query.type)
        return random_spec(rng, query.type, values)

    def _from_pool(self, query: Query, kind: str, taken: List[Product]) -> Optional[Product]:
        if kind not in ("same_type", "random") or self.rng.random() >= self.cfg.pool_reuse:
            return None
        pool = self.pool_by_type.get(query.type, []) if kind == "same_type" else self.pool
        if not pool:
            return None
        product = pool[int(self.rng.integers(len(pool)))]
        if is_relevant(query, product.spec) or product in taken:
            return None
        return product


def plan_eval(cfg: SynthConfig) -> Iterator[Tuple[str, CandidateList]]:
    """Yields ("valid", list) for cfg.valid_queries lists, then ("test", list) likewise."""
    planner = _EvalPlanner(cfg)
    for i in range(cfg.valid_queries):
        yield "valid", planner.candidate_list(VALID_QUERY_BASE + i)
    for i in range(cfg.test_queries):
        yield "test", planner.candidate_list(TEST_QUERY_BASE + i)

