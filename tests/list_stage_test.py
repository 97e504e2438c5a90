"""The list stage: PRF in-graph equals its numpy twin, padding never leaks, identical
candidates stay identical, NDCG@5 equals the organiser's scorer, and fitting is out-of-fold
and keeps the first stage when the list carries no signal."""
import os

import numpy as np
import pytest
import tensorflow as tf

from data_prep import schema
from estimator import list_stage as ls
from export import score as score_lib

TOL = 1e-5
PARAMS = [ls.PrfParams(1.0, 3, 2), ls.PrfParams(0.5, 1, 1), ls.PrfParams(2.5, 20, 3),
          ls.PrfParams(0.0, 4, 2), ls.PrfParams(1.0, 2, 0)]


def _random_lists(rng, q=7, c=11, e=5, lengths=None):
    """Random lists with lengths 1..C (padding filled with junk, NaN included)."""
    lengths = lengths if lengths is not None else rng.integers(1, c + 1, size=q)
    mask = np.arange(c)[np.newaxis, :] < np.asarray(lengths)[:, np.newaxis]     # [Q, C]
    scores = rng.normal(size=(q, c)).astype(np.float32)
    emb = rng.normal(size=(q, c, e)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    scores[~mask] = np.nan
    emb[~mask] = 1e30
    return scores, emb, mask


def _tf_eager(scores, emb, mask, params):
    return ls.prf_scores(tf.constant(scores), tf.constant(emb), tf.constant(mask),
                         params).numpy()


def _tf_graph(scores, emb, mask, params):
    """In a TF1 graph fed through placeholders of unknown Q, C, E (as in `rank`)."""
    with tf.Graph().as_default():
        s = tf.compat.v1.placeholder(tf.float32, [None, None])
        e = tf.compat.v1.placeholder(tf.float32, [None, None, None])
        m = tf.compat.v1.placeholder(tf.bool, [None, None])
        out = ls.prf_scores(s, e, m, params)
        with tf.compat.v1.Session() as sess:
            return sess.run(out, {s: scores, e: emb, m: mask})


@pytest.mark.parametrize("params", PARAMS)
def test_tf_equals_numpy_on_padded_random_lists(params):
    rng = np.random.default_rng(13)
    scores, emb, mask = _random_lists(rng, lengths=[1, 11, 4, 7, 2, 11, 9])
    expected = ls.prf_scores_numpy(scores, emb, mask, params)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(_tf_eager(scores, emb, mask, params), expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(_tf_graph(scores, emb, mask, params), expected, rtol=0, atol=TOL)
    assert (expected[~mask] == ls.PADDING_SCORE).all()


def test_hand_worked_example():
    # scores [3, 2, 1, 0]: mean 1.5, std sqrt(5/4) -> z0 = [1.342, 0.447, -0.447, -1.342].
    # m=1: the centroid is candidate 0's embedding e_x, cosines [1, 0, 1, 0] -> z [1, -1, 1, -1].
    # weight 1: [2.342, -0.553, 0.553, -2.342]; candidate 2 (like the top one) passes 1.
    scores = np.array([[3.0, 2.0, 1.0, 0.0]], np.float32)
    emb = np.array([[[1, 0], [0, 1], [1, 0], [0, 1]]], np.float32)
    mask = np.ones((1, 4), bool)
    z0 = np.array([3, 1, -1, -3]) / (2 * np.sqrt(1.25))
    expected = z0 + np.array([1, -1, 1, -1])
    params = ls.PrfParams(weight=1.0, m=1, iterations=1)
    np.testing.assert_allclose(ls.prf_scores_numpy(scores, emb, mask, params)[0], expected,
                               atol=1e-12)
    np.testing.assert_allclose(_tf_eager(scores, emb, mask, params)[0], expected, atol=TOL)
    # Iterating: the top is still candidate 0, so a second round changes nothing.
    np.testing.assert_allclose(
        ls.prf_scores_numpy(scores, emb, mask, params._replace(iterations=2))[0], expected,
        atol=1e-12)


@pytest.mark.parametrize("fn", [ls.prf_scores_numpy, _tf_eager, _tf_graph])
def test_padding_never_leaks_into_real_candidates(fn):
    rng = np.random.default_rng(3)
    scores, emb, mask = _random_lists(rng, lengths=[1, 5, 11, 3, 8, 2, 10])
    params = ls.PrfParams(1.5, 3, 3)
    reference = fn(scores, emb, mask, params)
    for junk in (0.0, 1e6, -1e6, np.inf, np.nan):
        other_scores, other_emb = scores.copy(), emb.copy()
        other_scores[~mask] = junk
        other_emb[~mask] = rng.normal(size=other_emb[~mask].shape) * 1e3 if junk == 0 else junk
        out = fn(other_scores, other_emb, mask, params)
        np.testing.assert_array_equal(out[mask], reference[mask])
        assert (out[~mask] == ls.PADDING_SCORE).all()


@pytest.mark.parametrize("fn", [ls.prf_scores_numpy, _tf_eager, _tf_graph])
def test_identical_candidates_get_identical_outputs(fn):
    c, e = 6, 4
    rng = np.random.default_rng(5)
    one_emb = rng.normal(size=e).astype(np.float32)
    scores = np.full((2, c), 0.3183, np.float32)
    emb = np.broadcast_to(one_emb, (2, c, e)).copy()
    mask = np.ones((2, c), bool)
    mask[1, 4:] = False            # and a shorter list of identical candidates
    scores[1, 4:], emb[1, 4:] = 9.0, -one_emb
    for params in PARAMS:
        out = fn(scores, emb, mask, params)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[0], np.full(c, out[0, 0]))
        np.testing.assert_array_equal(out[1, :4], np.full(4, out[1, 0]))


@pytest.mark.parametrize("fn", [ls.prf_scores_numpy, _tf_eager, _tf_graph])
def test_single_candidate_lists(fn):
    rng = np.random.default_rng(8)
    # C = 1; then a one-candidate list and an empty one beside a longer list.
    for lengths, c in (([1, 1, 1], 1), ([1, 0, 3], 3)):
        scores, emb, mask = _random_lists(rng, q=3, c=c, e=3, lengths=lengths)
        out = fn(scores, emb, mask, ls.PrfParams(2.0, 8, 3))
        assert np.isfinite(out).all()
        assert (out[~mask] == ls.PADDING_SCORE).all()
        np.testing.assert_array_equal(out[:, 0][np.array(lengths) == 1], 0.0)


def test_weight_zero_ranks_as_first_stage():
    rng = np.random.default_rng(21)
    scores, emb, mask = _random_lists(rng, q=9, c=12, e=4)
    labels = (rng.random(size=mask.shape) < 0.3) & mask
    out = ls.prf_scores_numpy(scores, emb, mask, ls.PrfParams(0.0, 3, 3))
    np.testing.assert_array_equal(ls.ndcg_per_list(out, labels, mask),
                                  ls.ndcg_per_list(scores, labels, mask))


def test_saved_model_round_trip(tmp_path):
    """PRF inside a SavedModel signature, loaded with tf.saved_model.load (as the server would)."""
    params = ls.PrfParams(1.0, 2, 2)
    path = str(tmp_path / "prf")
    with tf.Graph().as_default():
        s = tf.compat.v1.placeholder(tf.float32, [None, None], name="scores")
        e = tf.compat.v1.placeholder(tf.float32, [None, None, None], name="embeddings")
        m = tf.compat.v1.placeholder(tf.bool, [None, None], name="mask")
        out = ls.prf_scores(s, e, m, params)
        info = tf.compat.v1.saved_model.utils.build_tensor_info
        sig = tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
            inputs={"scores": info(s), "embeddings": info(e), "mask": info(m)},
            outputs={"scores": info(out)}, method_name=tf.saved_model.PREDICT_METHOD_NAME)
        builder = tf.compat.v1.saved_model.Builder(path)
        with tf.compat.v1.Session() as sess:
            builder.add_meta_graph_and_variables(sess, [tf.saved_model.SERVING],
                                                 signature_def_map={"rank": sig})
        builder.save()
    scores, emb, mask = _random_lists(np.random.default_rng(2), q=4, c=6, e=3)
    fn = tf.saved_model.load(path).signatures["rank"]
    got = fn(scores=tf.constant(scores), embeddings=tf.constant(emb), mask=tf.constant(mask))
    np.testing.assert_allclose(got["scores"].numpy(),
                               ls.prf_scores_numpy(scores, emb, mask, params), atol=TOL)


# --- NDCG@5 ----------------------------------------------------------------------------------
def test_ndcg_hand_worked():
    # Answers at ranks 2 and 4 of 2 answers: (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3))
    #   = (0.6309 + 0.4307) / 1.6309 = 0.6509. Padding (score 9) is never ranked.
    scores = np.array([[4.0, 3.0, 2.0, 1.0, 0.5, 9.0]])
    labels = np.array([[0, 1, 0, 1, 0, 1]])
    mask = np.array([[True] * 5 + [False]])
    np.testing.assert_allclose(ls.ndcg_per_list(scores, labels, mask), [0.6509], atol=1e-4)
    # Ties keep candidate order: all equal scores rank 0, 1, 2, ... -> same as above.
    np.testing.assert_allclose(ls.ndcg_per_list(np.zeros((1, 6)), labels, mask), [0.6509],
                               atol=1e-4)


def test_ndcg_equals_the_organiser_scorer():
    rng = np.random.default_rng(7)
    q, c = 40, 13
    scores = rng.integers(0, 4, size=(q, c)).astype(np.float64)   # many ties
    labels = rng.random(size=(q, c)) < 0.25
    lengths = rng.integers(1, c + 1, size=q)
    mask = np.arange(c)[np.newaxis, :] < lengths[:, np.newaxis]
    labels[0, :lengths[0]] = False                                  # one list without answers
    ids = rng.permutation(q * c).reshape(q, c) + 1000
    ours = ls.ndcg_per_list(scores, labels, mask)
    for i in range(q):
        real = np.flatnonzero(mask[i])
        ranked = ids[i, real][np.argsort(-scores[i, real], kind="stable")]
        answers = ids[i, real][labels[i, real]]
        assert ours[i] == pytest.approx(score_lib.ndcg_at_5(ranked.tolist(), answers), abs=1e-12)
    assert schema.NDCG_K == 5


# --- fitting ---------------------------------------------------------------------------------
def _regime(rng, signal, q=150, c=20, e=16, positives=3):
    """Lists whose positives share an embedding direction (signal) or not; a noisy first stage."""
    labels = np.zeros((q, c), bool)
    for i in range(q):
        labels[i, rng.choice(c, positives, replace=False)] = True
    emb = rng.normal(size=(q, c, e))
    if signal:
        emb[labels] += 2.0 * rng.normal(size=(q, 1, e)).repeat(c, 1)[labels]
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    scores = labels * 1.0 + rng.normal(scale=1.2, size=(q, c))
    lengths = rng.integers(c - 6, c + 1, size=q)
    mask = np.arange(c)[np.newaxis, :] < lengths[:, np.newaxis]
    return scores, emb, mask, labels & mask


def test_fit_gains_where_lists_carry_signal():
    fit = ls.fit_prf(*_regime(np.random.default_rng(0), signal=True), folds=5, seed=0)
    assert fit.lists > 140 and len(fit.fold_params) == 5
    assert fit.params.weight > 0
    assert fit.prf_ndcg >= fit.first_stage_ndcg + 0.05, fit.to_dict()


def test_fit_keeps_the_first_stage_without_list_signal():
    lists = _regime(np.random.default_rng(1), signal=False)
    fit = ls.fit_prf(*lists, folds=5, seed=0)
    assert fit.prf_ndcg >= fit.first_stage_ndcg - 0.005, fit.to_dict()
    assert fit.params.weight == 0.0
    # Taking the best grid point without the significance test loses out of fold here.
    loose = ls.fit_prf(*lists, folds=5, seed=0, min_t=0.0)
    assert any(p.weight > 0.0 for p in loose.fold_params)
    assert loose.prf_ndcg < fit.first_stage_ndcg - 0.005, loose.to_dict()


def test_out_of_fold_uses_held_out_choices():
    """The out-of-fold figure is rebuilt from each fold's own choice on its held-out lists."""
    scores, emb, mask, labels = _regime(np.random.default_rng(4), signal=True, q=30)
    grid = ls.prf_grid(weights=(0.0, 1.0, 3.0), ms=(2, 5), iterations=(1, 2))
    fit = ls.fit_prf(scores, emb, mask, labels, grid=grid, folds=3, seed=11)
    fold_of = np.empty(30, int)
    for f, members in enumerate(np.array_split(np.random.default_rng(11).permutation(30), 3)):
        fold_of[members] = f
    rebuilt = np.concatenate([ls.ndcg_per_list(
        ls.prf_scores_numpy(scores[fold_of == f], emb[fold_of == f], mask[fold_of == f], p),
        labels[fold_of == f], mask[fold_of == f]) for f, p in enumerate(fit.fold_params)])
    assert fit.prf_ndcg == pytest.approx(rebuilt.mean(), abs=1e-12)
    assert max(v for _, v in fit.grid_ndcg) == dict(fit.grid_ndcg)[fit.params]


def test_fit_argument_errors():
    scores, emb, mask, labels = _regime(np.random.default_rng(2), signal=True, q=4)
    with pytest.raises(ValueError, match="weight-0"):
        ls.fit_prf(scores, emb, mask, labels, grid=[ls.PrfParams(1.0, 3, 1)], folds=2)
    with pytest.raises(ValueError, match="at least 5 lists"):
        ls.fit_prf(scores, emb, mask, labels, folds=5)
    with pytest.raises(ValueError):
        ls.PrfParams.from_dict({"weight": 1.0, "m": 0, "iterations": 1})
    with pytest.raises(ValueError, match="unknown"):
        ls.PrfParams.from_dict({"weight": 1.0, "mm": 3})


def test_grid_has_one_first_stage_point_first():
    grid = ls.prf_grid(weights=(1.0, 0.0, 2.0), ms=(3, 8), iterations=(1, 2))
    assert grid[0].weight == 0.0 and sum(p.weight == 0.0 for p in grid) == 1
    assert len(grid) == 1 + 2 * 2 * 2
    assert ls.PrfParams.from_dict(grid[3].to_dict()) == grid[3]
    assert ls.DEFAULT_GRID[0].weight == 0.0


def test_bench_help():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "list_stage.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--answers" in out.stdout


# --- learned reranker ------------------------------------------------------------------------
def test_untrained_reranker_ranks_as_first_stage_and_padding_never_leaks():
    rng = np.random.default_rng(9)
    scores, emb, mask = _random_lists(rng, lengths=[1, 11, 4, 7, 2, 11, 9])
    model = ls.ListReranker(ls.RerankerConfig(hidden=6, heads=3, layers=2))
    z0 = ls.prf_scores_numpy(scores, emb, mask, ls.PrfParams(0.0))
    np.testing.assert_allclose(ls.rerank(model, scores, emb, mask), z0, atol=TOL)
    model.w_out.assign(tf.random.stateless_normal(model.w_out.shape, [1, 2]))
    model.similarity_scale.assign(tf.ones_like(model.similarity_scale))
    reference = ls.rerank(model, scores, emb, mask)
    assert np.isfinite(reference).all() and (reference[~mask] == ls.PADDING_SCORE).all()
    assert np.abs(reference - z0)[mask].max() > 1e-3       # the correction is live
    other_scores, other_emb = scores.copy(), emb.copy()
    other_scores[~mask], other_emb[~mask] = 1e6, -3.0
    np.testing.assert_allclose(ls.rerank(model, other_scores, other_emb, mask)[mask],
                               reference[mask], rtol=0, atol=1e-6)


def test_reranker_learns_list_signal_out_of_fold():
    lists = _regime(np.random.default_rng(100), signal=True, q=60)
    fit = ls.fit_reranker(*lists, cfg=ls.RerankerConfig(steps=100), folds=3, seed=0)
    assert fit.lists == 60
    assert fit.reranker_ndcg >= fit.first_stage_ndcg + 0.05, fit.to_dict()


def test_reranker_guard_keeps_the_first_stage_without_list_signal():
    lists = _regime(np.random.default_rng(1), signal=False, q=40)
    fit = ls.fit_reranker(*lists, cfg=ls.RerankerConfig(steps=60), folds=2, seed=0)
    assert fit.reranker_ndcg >= fit.first_stage_ndcg - 0.005, fit.to_dict()


def _two_scores(rng, q=60, c=20, answers=4, tower_noise=0.5, cross_noise=3.0):
    """Lists whose towers' score tells answers apart better than the matcher's."""
    labels = np.zeros((q, c), np.int64)
    labels[:, :answers] = 1
    truth = labels.astype(np.float64)
    tower = truth + tower_noise * rng.normal(size=(q, c))
    cross = truth + cross_noise * rng.normal(size=(q, c))
    return cross, tower, np.ones((q, c), bool), labels


def test_tower_weight_leans_on_the_better_score_out_of_fold():
    cross, tower, mask, labels = _two_scores(np.random.default_rng(5))
    fit = ls.fit_tower_weight(cross, tower, mask, labels, trained_weight=1.0)
    assert fit.tower_weight > 1.0, fit.to_dict()
    assert fit.fitted_ndcg > fit.trained_ndcg + 0.02, fit.to_dict()
    # And the other way round: a good matcher pulls the weight below the trained one.
    fit = ls.fit_tower_weight(tower, cross, mask, labels, trained_weight=1.0)
    assert fit.tower_weight < 1.0 and fit.fitted_ndcg > fit.trained_ndcg, fit.to_dict()


def test_tower_weight_keeps_the_trained_weight_without_evidence():
    rng = np.random.default_rng(6)
    cross, tower, mask, labels = _two_scores(rng, tower_noise=1.0, cross_noise=1.0)
    cross = tower + 1e-3 * rng.normal(size=tower.shape)     # the same ranking either way
    fit = ls.fit_tower_weight(cross, tower, mask, labels, trained_weight=0.5)
    assert fit.tower_weight == 0.5 and fit.fold_weights == [0.5] * 5
    assert fit.fitted_ndcg == pytest.approx(fit.trained_ndcg, abs=1e-12)


def test_tower_only_weight_scores_the_towers_alone():
    rng = np.random.default_rng(7)
    cross, tower = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    np.testing.assert_array_equal(ls.mixed_scores(cross, tower, ls.TOWER_ONLY), tower)
    np.testing.assert_allclose(ls.mixed_scores(cross, tower, 2.0), cross + 2.0 * tower)
    cross, tower, mask, labels = _two_scores(rng, cross_noise=50.0)
    fit = ls.fit_tower_weight(cross, tower, mask, labels, trained_weight=ls.TOWER_ONLY)
    record = fit.to_dict()
    assert record["tower_weight"] == "tower" and record["grid_ndcg@5_in_sample"][0][
        "tower_weight"] == "tower"
    with pytest.raises(ValueError, match=">= 0"):
        ls.fit_tower_weight(cross, tower, mask, labels, trained_weight=-1.0)
