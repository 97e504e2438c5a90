"""estimator.probe: the first valid queries as the model scores them, with the TSV's own
query text and main box class, bounded by queries or points."""
import os

import numpy as np
import pytest

from data_prep import tsv
from data_prep.manifest import PrepDir
from estimator import probe as probe_lib
from estimator.config import Config
from mmrecall_testing import export_fixtures as fx

TOL = 1e-5
CANDIDATES = 9


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("probe"))
    gen = fx.generate(os.path.join(root, "gen"), seed=13, valid_queries=6,
                      candidates=CANDIDATES)
    prep_dir = PrepDir(fx.prep(gen, os.path.join(root, "prep")))
    model_dir = os.path.join(root, "model")
    ckpt = fx.random_checkpoint(model_dir, prep_dir, seed=5)
    with open(os.path.join(gen, "valid.tsv"), "rb") as f:
        next(f)
        rows = [tsv.parse_row(line.rstrip(b"\n")) for line in f if line.strip()]
    return dict(prep_dir=prep_dir, model_dir=model_dir, ckpt=ckpt,
                cfg=Config.load(model_dir), tsv={(r.query_id, r.product_id): r for r in rows},
                predictions=fx.estimator_predictions(model_dir, prep_dir))


def _probe(world, **bounds):
    return probe_lib.probe(world["cfg"], world["prep_dir"], world["ckpt"], **bounds)


def test_rows_match_the_estimator_and_the_tsv(world):
    p = _probe(world, max_queries=2)
    assert len(set(p.query_ids.tolist())) == 2
    assert len(p.query_ids) == 2 * CANDIDATES
    for r, (qid, pid) in enumerate(zip(p.query_ids.tolist(), p.product_ids.tolist())):
        pred = world["predictions"][(qid, pid)]
        assert p.scores[r] == pytest.approx(pred["score"], abs=TOL)
        np.testing.assert_allclose(p.query_embeddings[r], pred["query_embedding"], atol=TOL)
        np.testing.assert_allclose(p.product_embeddings[r], pred["product_embedding"],
                                   atol=TOL)
        row = world["tsv"][(qid, pid)]
        assert p.query_text[r] == row.query
        # The main class is the label of the largest box by pixel area.
        area = (row.boxes[:, 2] - row.boxes[:, 0]) * (row.boxes[:, 3] - row.boxes[:, 1])
        assert p.main_class[r] == row.labels[np.argmax(area)]
        # The boxes the model reads: the model's cap of the largest, in stored order.
        assert len(p.box_labels[r]) == min(len(row.labels), fx.MODEL_MAX_BOXES)
        assert 1 <= len(p.tokens[r]) <= world["cfg"].max_query_tokens


def test_attention_rows_are_distributions_over_the_boxes_read(world):
    p = _probe(world, max_queries=1)
    for r in range(len(p.query_ids)):
        weights = p.word_to_region[r]
        assert weights.shape == (len(p.tokens[r]), len(p.box_labels[r]))
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-4)


def test_point_bound_keeps_whole_queries(world):
    # Each query is 1 + 9 points: 25 points hold two whole queries, not a third one's part.
    p = _probe(world, max_points=25)
    assert len(set(p.query_ids.tolist())) == 2 and len(p.query_ids) == 2 * CANDIDATES
    # Both bounds: the tighter wins.
    assert len(set(_probe(world, max_queries=1, max_points=100).query_ids.tolist())) == 1


def test_nothing_within_the_bound_is_an_error_naming_the_split(world):
    with pytest.raises(ValueError, match="valid split.*has no rows"):
        _probe(world, max_points=5)


def test_concat_pads_the_trailing_axes():
    a, b = np.ones([2, 3], np.float32), 2 * np.ones([1, 5], np.float32)
    out = probe_lib._concat_padded([a, b])
    np.testing.assert_array_equal(out, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [2, 2, 2, 2, 2]])
