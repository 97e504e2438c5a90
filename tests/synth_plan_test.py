"""Tests of data_prep.synth.plan: answers are relevant, negatives hard, the shared pool."""
import collections
import itertools

import numpy as np

from data_prep.synth import SynthConfig, plan_eval, plan_train
from data_prep.synth.world import VISUAL_ATTRIBUTES, is_relevant, types_in_use


def test_negatives_are_hard_and_never_relevant():
    cfg = SynthConfig(out_dir="", seed=5, valid_queries=40, test_queries=10)
    one_off = same_type = negatives = 0
    reused = collections.Counter()
    for _, cl in plan_eval(cfg):
        query = cl.query
        answers = set(cl.answers)
        for product in cl.products:
            reused[product.product_id] += 1
            spec = product.spec
            differ = [a for a, v in enumerate(query.mentioned)
                      if v is not None and spec.value(a) != v]
            matches = spec.type == query.type and not differ
            assert matches == (product.product_id in answers)
            if product.product_id in answers:
                continue
            negatives += 1
            if spec.type == query.type:
                same_type += 1
                one_off += len(differ) == 1 and differ[0] in VISUAL_ATTRIBUTES
    assert same_type / negatives > 0.6
    assert one_off / negatives > 0.4
    # Some negatives are shared between lists (the pool), so appear more than once.
    assert sum(c > 1 for c in reused.values()) > 10


def test_no_pool_reuse_when_disabled():
    cfg = SynthConfig(out_dir="", seed=5, valid_queries=20, test_queries=5,
                            pool_reuse=0.0)
    ids = [p.product_id for _, cl in plan_eval(cfg) for p in cl.products]
    assert len(ids) == len(set(ids))



# ---------------------------------------------------------------------------------------
# Data-regime knobs.


def _unstated_agreement(cluster):
    """(answer-answer, answer-negative) rates of equal values the query leaves unsaid.

    Negatives here are those of the query's type, whose unsaid values are random.
    """
    cfg = SynthConfig(out_dir="", seed=5, valid_queries=80, test_queries=0, cluster=cluster)
    same_answers, same_negatives = [], []
    for _, cl in plan_eval(cfg):
        unsaid = [a for a, v in enumerate(cl.query.mentioned) if v is None]
        answers = [p.spec for p in cl.products if p.product_id in cl.answers]
        negatives = [p.spec for p in cl.products
                     if p.product_id not in cl.answers and p.spec.type == cl.query.type]
        for x, y in itertools.combinations(answers, 2):
            same_answers += [x.value(a) == y.value(a) for a in unsaid]
        for x, y in itertools.product(answers, negatives):
            same_negatives += [x.value(a) == y.value(a) for a in unsaid]
    return np.mean(same_answers), np.mean(same_negatives)


def test_cluster_makes_answers_share_unsaid_values_and_negative_cluster_spreads_them():
    # About 13% of random pairs agree on an unsaid value (3 to 15 values per attribute).
    off = _unstated_agreement(0.0)
    assert abs(off[0] - off[1]) < 0.05
    on = _unstated_agreement(0.8)     # 0.8^2 + (1 - 0.8^2) * 0.13 ~ 0.69
    assert on[0] > 0.5 and on[0] > on[1] + 0.4
    spread = _unstated_agreement(-1.0)
    assert spread[0] < 0.05 and spread[0] < spread[1] - 0.08


def test_cluster_keeps_answers_relevant():
    cfg = SynthConfig(out_dir="", seed=2, valid_queries=20, test_queries=0, cluster=-1.0)
    for _, cl in plan_eval(cfg):
        for p in cl.products:
            assert is_relevant(cl.query, p.spec) == (p.product_id in cl.answers)


def test_binding_gives_negatives_decoys_of_the_values_they_lack():
    def decoy_rate(binding):
        cfg = SynthConfig(out_dir="", seed=5, valid_queries=40, test_queries=0,
                          binding=binding)
        seen, found, negatives = set(), 0, 0
        for _, cl in plan_eval(cfg):
            for p in cl.products:
                pooled = p.product_id in seen   # made for an earlier list and its query
                seen.add(p.product_id)
                if p.product_id in cl.answers:
                    assert p.decoy is None
                    continue
                negatives += 1
                if p.decoy is None:
                    continue
                found += 1
                lacks = [cl.query.mentioned[a] if a in VISUAL_ATTRIBUTES
                         and cl.query.mentioned[a] != p.spec.value(a) else None
                         for a in range(len(p.decoy))]
                assert pooled or list(p.decoy) == lacks
        return found / negatives
    assert decoy_rate(0.0) == 0.0
    assert decoy_rate(0.8) > 0.6


def test_product_types_limits_the_nouns_in_use():
    cfg = SynthConfig(out_dir="", seed=3, train_rows=600, valid_queries=20, test_queries=0,
                      product_types=7)
    allowed = set(types_in_use(7))
    assert {p.spec.type for _, p in plan_train(cfg)} <= allowed
    assert {p.spec.type for _, cl in plan_eval(cfg) for p in cl.products} <= allowed
    everything = {p.spec.type for _, p in plan_train(SynthConfig(out_dir="", seed=3,
                                                                 train_rows=600))}
    assert len(everything) > 40
