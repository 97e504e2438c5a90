"""retrieval.expansion: centroids with missing neighbours, the expanded query, the fused
rerank score, the in-graph step equal to numpy, and the argument checks."""
import numpy as np
import pytest
import tensorflow as tf

from retrieval import expansion as expansion_lib


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def catalogue():
    rng = np.random.default_rng(3)
    return _unit(rng.normal(size=[40, 8])).astype(np.float32)


def test_centroid_is_the_unit_mean_of_found_rows_and_zero_when_none(catalogue):
    rows = np.array([[3, 7, 1], [5, -1, -1], [-1, -1, -1]])
    got = expansion_lib.centroids(catalogue, rows)
    np.testing.assert_allclose(got[0], _unit(catalogue[[3, 7, 1]].sum(0)), rtol=1e-6)
    np.testing.assert_allclose(got[1], catalogue[5], rtol=1e-6)     # -1: not found, left out
    assert not got[2].any()


def test_expanded_query_is_unit_query_plus_weighted_centroid(catalogue):
    query = np.array([[3.0, 0, 0, 0, 4.0, 0, 0, 0]], np.float32)
    centroid = expansion_lib.centroids(catalogue, np.array([[0, 1, 2]]))
    got = expansion_lib.expanded_queries(query, centroid, 1.5)
    np.testing.assert_allclose(got, query / 5.0 + 1.5 * centroid, rtol=1e-6)
    np.testing.assert_allclose(expansion_lib.expanded_queries(query, centroid, 0.0), query / 5.0)


def test_fused_scores_add_weighted_z_scores_and_ignore_a_flat_input(catalogue):
    served = np.array([2.0, -1.0, 0.5, 3.0])
    candidates, centroid = catalogue[:4], _unit(catalogue[10])
    similarity = candidates @ centroid
    z = lambda x: (x - x.mean()) / x.std()
    np.testing.assert_allclose(expansion_lib.fused_scores(served, candidates, centroid, 0.7),
                               z(served) + 0.7 * z(similarity), rtol=1e-6)
    # A constant served score (one candidate, or a tie everywhere) leaves the similarity.
    np.testing.assert_allclose(
        expansion_lib.fused_scores(np.full(4, 9.0), candidates, centroid, 2.0),
        2.0 * z(similarity), rtol=1e-6)


@pytest.mark.parametrize("expansion", [expansion_lib.Expansion(1.0, 3),
                                       expansion_lib.Expansion(2.5, 1),
                                       expansion_lib.Expansion(1.0, 100)])
def test_in_graph_expansion_equals_numpy(catalogue, expansion):
    rng = np.random.default_rng(5)
    queries = rng.normal(size=[6, 8]).astype(np.float32)
    first = np.argsort(-(queries @ catalogue.T), axis=1, kind="stable")[:, :expansion.m]
    expected = expansion_lib.expanded_queries(
        queries, expansion_lib.centroids(catalogue, first), expansion.weight)
    got = expansion_lib.expand_in_graph(tf.constant(queries), tf.constant(catalogue), expansion)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_off_and_bad_settings(catalogue):
    query = tf.constant(np.ones([1, 8], np.float32))
    assert expansion_lib.expand_in_graph(query, tf.constant(catalogue),
                                         expansion_lib.OFF) is query
    assert not expansion_lib.OFF.active and not expansion_lib.Expansion(1.0, 0).active
    assert expansion_lib.Expansion().active
    for bad in (expansion_lib.Expansion(-0.5, 3), expansion_lib.Expansion(1.0, -1),
                expansion_lib.Expansion(float("nan"), 3)):
        with pytest.raises(ValueError, match="weight >= 0 and m >= 0"):
            expansion_lib.checked(bad)
