"""In-batch negative sampling: never a query's own product or a product of the same query."""
import numpy as np
import pytest
import tensorflow as tf

from estimator import negatives


def _batch(b=13, e=8, seed=0, keys=None, pids=None):
    rng = np.random.RandomState(seed)
    q = rng.normal(size=(b, e)).astype(np.float32)
    p = rng.normal(size=(b, e)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    keys = rng.randint(0, 4, size=b) if keys is None else np.asarray(keys)
    pids = rng.randint(0, 9, size=b) if pids is None else np.asarray(pids)
    return q, p, keys.astype(np.int64), pids.astype(np.int64)


@pytest.mark.parametrize("sampler", sorted(negatives.SAMPLERS))
def test_negatives_never_share_query_key_or_product(sampler):
    for seed in range(5):
        # Few distinct keys and product ids: many forbidden pairings.
        q, p, keys, pids = _batch(seed=seed)
        idx, valid = negatives.sample_negatives(sampler, q, p, keys, pids, 4, seed=seed)
        idx, valid = idx.numpy(), valid.numpy()
        assert idx.shape == (13, 4)
        for i in range(13):
            allowed = {j for j in range(13) if keys[j] != keys[i] and pids[j] != pids[i]}
            chosen = [j for j, ok in zip(idx[i], valid[i]) if ok]
            assert set(chosen) <= allowed
            assert len(set(chosen)) == len(chosen)            # no repeats
            assert len(chosen) == min(4, len(allowed))        # as many as possible


def test_too_few_candidates_are_marked_invalid():
    # All rows but one share the query key: rows 0..3 can only pair with row 4 and vice
    # versa (4 candidates for row 4).
    q, p, keys, pids = _batch(b=5, keys=[1, 1, 1, 1, 2], pids=[0, 1, 2, 3, 4])
    idx, valid = negatives.sample_negatives("random", q, p, keys, pids, 6)
    idx, valid = idx.numpy(), valid.numpy()
    assert idx.shape == (5, 6)
    assert valid[:4].sum(axis=1).tolist() == [1, 1, 1, 1]
    assert valid[4].sum() == 4
    for i in range(4):
        assert idx[i][valid[i]].tolist() == [4]


def test_hard_sampler_picks_most_similar_allowed_products():
    q, p, keys, pids = _batch(b=13, keys=np.arange(13), pids=np.arange(13))
    idx, valid = negatives.sample_negatives("hard", q, p, keys, pids, 3)
    sims = q @ p.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.argsort(-sims, axis=1)[:, :3]
    np.testing.assert_array_equal(np.sort(idx.numpy(), 1), np.sort(expected, 1))
    assert valid.numpy().all()


def test_hard_sampler_has_no_gradient_through_the_choice():
    q, p, keys, pids = _batch()
    q, p = tf.Variable(q), tf.Variable(p)
    with tf.GradientTape() as tape:
        scores = negatives.SAMPLERS["hard"](q, p, None)
        total = tf.reduce_sum(scores)
    assert tape.gradient(total, [q, p]) == [None, None]


def test_build_pairs_layout():
    b, k = 3, 2
    q_states = tf.reshape(tf.range(b * 4 * 5, dtype=tf.float32), [b, 4, 5])
    p_states = -tf.reshape(tf.range(b * 6 * 5, dtype=tf.float32), [b, 6, 5])
    idx = tf.constant([[1, 2], [2, 0], [0, 1]])
    valid = tf.constant([[True, False], [True, True], [True, True]])
    pairs = negatives.build_pairs(q_states, tf.constant([1, 2, 3]), tf.eye(3),
                                  p_states, tf.constant([4, 5, 6]), 2 * tf.eye(3), idx, valid)
    assert pairs["q_states"].shape == (b * (1 + k), 4, 5)
    assert pairs["p_states"].shape == (b * (1 + k), 6, 5)
    assert pairs["labels"].numpy().tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert pairs["weights"].numpy().tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1]
    assert pairs["num_tokens"].numpy().tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert pairs["num_boxes"].numpy().tolist() == [4, 5, 6, 5, 6, 4, 6, 4, 5]
    np.testing.assert_array_equal(pairs["p_states"][4], p_states[2])


def test_pair_indices_layout_matches_build_pairs():
    idx = tf.constant([[1, 2], [2, 0], [0, 1]])
    valid = tf.constant([[True, False], [True, True], [True, True]])
    pairs = negatives.pair_indices(idx, valid)
    # Each row's own product first, then its negatives; the query repeated 1 + K times.
    assert pairs["query_index"].numpy().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert pairs["product_index"].numpy().tolist() == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert pairs["labels"].numpy().tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert pairs["weights"].numpy().tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1]
    q_states = tf.reshape(tf.range(3 * 4 * 5, dtype=tf.float32), [3, 4, 5])
    p_states = -tf.reshape(tf.range(3 * 6 * 5, dtype=tf.float32), [3, 6, 5])
    gathered = negatives.build_pairs(q_states, tf.constant([1, 2, 3]), tf.eye(3), p_states,
                                     tf.constant([4, 5, 6]), 2 * tf.eye(3), idx, valid)
    np.testing.assert_array_equal(gathered["q_states"].numpy(),
                                  q_states.numpy()[pairs["query_index"].numpy()])
    np.testing.assert_array_equal(gathered["p_states"].numpy(),
                                  p_states.numpy()[pairs["product_index"].numpy()])
