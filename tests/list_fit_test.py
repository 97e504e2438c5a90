"""export.list_fit: the valid lists scored by the exported model equal the Estimator's
predictions, lists are padded and deduplicated as `rank` and the scorer count them, and the
list_stage setting resolves to what is served and recorded."""
import json
import os

import numpy as np
import pytest

from data_prep.manifest import PrepDir
from estimator import list_stage as list_lib
from estimator.config import Config
from export import list_fit
from export import saved_model
from mmrecall_testing import export_fixtures as fx

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("list_fit"))
    gen = fx.generate(os.path.join(root, "gen"), seed=11, valid_queries=7, candidates=9)
    prep_dir = PrepDir(fx.prep(gen, os.path.join(root, "prep")))
    model_dir = os.path.join(root, "model")
    ckpt = fx.random_checkpoint(model_dir, prep_dir, seed=3)
    _, model_cfg = saved_model.export_spec(Config.load(model_dir), prep_dir)
    with open(os.path.join(gen, "valid_answer.json")) as f:
        answers = {int(q): set(ids) for q, ids in json.load(f).items()}
    return dict(root=root, prep_dir=prep_dir, model_dir=model_dir, ckpt=ckpt,
                model_cfg=model_cfg, answers=answers,
                predictions=fx.estimator_predictions(model_dir, prep_dir))


def test_lists_from_pairs_pads_and_counts_a_repeated_product_once():
    # Rows of queries 4 and 2 interleaved; product 7 repeated in query 4 (second row dropped).
    qids = [4, 4, 2, 4, 4]
    pids = [7, 8, 5, 7, 9]
    scores = [0.5, 0.25, 1.0, 9.0, -1.0]
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    labels = [1, 0, 1, 1, 0]
    lists = list_fit.lists_from_pairs(qids, pids, scores, emb, labels)
    assert lists.cross is None and lists.tower is None
    parts = list_fit.lists_from_pairs(qids, pids, scores, emb, labels, cross=[1, 2, 3, 4, 5],
                                      tower=[-1, -2, -3, -4, -5])
    np.testing.assert_array_equal(parts.cross, [[1, 2, 5], [3, 0, 0]])
    np.testing.assert_array_equal(parts.tower, [[-1, -2, -5], [-3, 0, 0]])
    assert lists.query_ids.tolist() == [4, 2]
    assert lists.product_ids.tolist() == [[7, 8, 9], [5, 0, 0]]
    assert lists.mask.tolist() == [[True, True, True], [True, False, False]]
    np.testing.assert_array_equal(lists.scores, [[0.5, 0.25, -1.0], [1.0, 0, 0]])
    np.testing.assert_array_equal(lists.embeddings[0], emb[[0, 1, 4]])
    np.testing.assert_array_equal(lists.embeddings[1, 1:], 0.0)
    assert lists.labels.tolist() == [[1, 0, 0], [1, 0, 0]]


def test_list_arrays_equal_the_estimator_predictions(world):
    lists = list_fit.list_arrays(world["model_cfg"], world["prep_dir"], world["ckpt"])
    assert len(lists.query_ids) == 7
    assert lists.mask.sum() == len({k for k in world["predictions"]})
    for q, qid in enumerate(lists.query_ids):
        for c in np.flatnonzero(lists.mask[q]):
            pid = int(lists.product_ids[q, c])
            p = world["predictions"][(int(qid), pid)]
            assert abs(lists.scores[q, c] - p["score"]) < TOL
            np.testing.assert_allclose(lists.embeddings[q, c], p["product_embedding"],
                                       rtol=0, atol=TOL)
            assert lists.labels[q, c] == (pid in world["answers"][int(qid)])
    assert lists.labels.sum() > 0 and np.std(lists.scores[lists.mask]) > 1e-2
    # The served score is its two parts as the Config mixes them.
    weight = list_fit.trained_tower_weight(world["model_cfg"])
    np.testing.assert_allclose(
        list_lib.mixed_scores(lists.cross, lists.tower, weight)[lists.mask],
        lists.scores[lists.mask], rtol=0, atol=TOL)
    assert np.std(lists.cross[lists.mask]) > 1e-3 and np.std(lists.tower[lists.mask]) > 1e-3


def test_resolve_off_file_and_fit(world, tmp_path):
    args = (world["model_cfg"], world["prep_dir"], world["ckpt"])
    cfg = world["model_cfg"]
    assert list_fit.resolve_list_stage("off", *args) == (cfg, None,
                                                         {"mode": "off", "params": None})
    params_file = str(tmp_path / "p.json")
    with open(params_file, "w") as f:
        json.dump({"weight": 1.5, "m": 4, "iterations": 2}, f)
    served_cfg, params, record = list_fit.resolve_list_stage(params_file, *args)
    assert params == list_lib.PrfParams(1.5, 4, 2) and served_cfg == cfg
    assert record == {"mode": "file", "file": params_file, "params": params.to_dict(),
                      "serving": {"serving_score": cfg.serving_score,
                                  "tower_weight": cfg.tower_score_weight}}
    # An earlier export's record brings its served score along.
    with open(params_file, "w") as f:
        json.dump({"list_stage": {"params": params.to_dict(), "serving": {
            "serving_score": "sum", "tower_weight": 2.5}}}, f)
    served_cfg = list_fit.resolve_list_stage(params_file, *args).config
    assert (served_cfg.serving_score, served_cfg.tower_score_weight) == ("sum", 2.5)
    # A weight-0 setting ranks as the first stage: nothing is served.
    with open(params_file, "w") as f:
        json.dump({"weight": 0.0, "m": 4, "iterations": 2}, f)
    assert list_fit.resolve_list_stage(params_file, *args).list_stage is None
    with open(params_file, "w") as f:
        json.dump({"weight": 1.0, "k": 4}, f)
    with pytest.raises(ValueError, match="unknown PRF settings"):
        list_fit.resolve_list_stage(params_file, *args)

    # Default with a valid split: fit, out of fold over the 7 lists.
    served_cfg, params, record = list_fit.resolve_list_stage(None, *args, folds=3)
    fit = record["fit"]
    assert record["score_mix"]["lists"] == 7
    assert record["serving"] == {"serving_score": served_cfg.serving_score,
                                 "tower_weight": served_cfg.tower_score_weight}
    assert record["mode"] == "fit" and fit["lists"] == 7 and len(fit["fold_params"]) == 3
    assert record["params"] == fit["params"]
    assert (params is None) == (fit["params"]["weight"] == 0.0)
    assert 0.0 <= fit["prf_ndcg@5_out_of_fold"] <= 1.0
    line = list_fit.describe(record)
    assert line.startswith("first stage: ") and "list stage: " in line and "out-of-fold" in line
    assert "7 valid lists" in line


class _NoValid:
    path = "/prep/without/valid"

    @staticmethod
    def split_files(split):
        return []


def test_fit_needs_a_valid_split():
    assert list_fit.default_mode(_NoValid()) == list_fit.OFF
    assert list_fit.resolve_list_stage(None, None, _NoValid(), "ckpt").list_stage is None
    with pytest.raises(ValueError, match="needs the prep's valid split"):
        list_fit.resolve_list_stage("fit", None, _NoValid(), "ckpt")


def test_describe_each_mode():
    assert list_fit.describe({"mode": "off", "params": None}).startswith("list stage: off")
    assert "from p.json" in list_fit.describe({"mode": "file", "file": "p.json",
                                               "params": {"weight": 1.0, "m": 3,
                                                          "iterations": 1}})
    kept = {"mode": "fit", "params": {"weight": 0.0, "m": 3, "iterations": 0},
            "fit": {"lists": 9, "first_stage_ndcg@5": 0.5, "prf_ndcg@5_out_of_fold": 0.5},
            "score_mix": {"trained_ndcg@5": 0.4, "fitted_ndcg@5_out_of_fold": 0.5},
            "serving": {"serving_score": "sum", "tower_weight": 2.0}}
    line = list_fit.describe(kept)
    assert "2.5 standard errors" in line and "sum (tower weight 2)" in line


def _lists_whose_towers_rank_better(rng, q=40, c=12):
    labels = np.zeros((q, c), np.int64)
    labels[:, :3] = 1
    tower = labels + 0.3 * rng.normal(size=(q, c))
    cross = labels + 3.0 * rng.normal(size=(q, c))
    emb = rng.normal(size=(q, c, 4)).astype(np.float32)
    return list_fit.ListArrays(np.arange(q), np.arange(q * c).reshape(q, c), cross + tower,
                               emb, labels, np.ones((q, c), bool), cross, tower)


def test_fit_lists_serves_the_better_part_and_fits_prf_over_it():
    lists = _lists_whose_towers_rank_better(np.random.default_rng(3))
    cfg = Config(word_embedding_size=8, serving_score="sum", tower_score_weight=1.0)
    served = list_fit.fit_lists(lists, cfg)
    mix = served.record["score_mix"]
    assert list_fit.trained_tower_weight(served.config) > 1.0, mix
    assert mix["fitted_ndcg@5_out_of_fold"] > mix["trained_ndcg@5"] + 0.02
    # PRF is fitted over the fitted first stage, not the trained one.
    assert served.record["fit"]["first_stage_ndcg@5"] == pytest.approx(
        mix["grid_ndcg@5_in_sample"][[g["tower_weight"] for g in mix[
            "grid_ndcg@5_in_sample"]].index(mix["tower_weight"])]["ndcg"])
    # A towers-only model has no weight to fit: its trained score stays.
    towers = Config(word_embedding_size=8, serving_score="tower",
                    loss_weights={"softmax": 1.0}, num_negatives=0)
    served = list_fit.fit_lists(lists, towers)
    assert served.config == towers and served.record["score_mix"]["fitted"] is False


def test_tower_weight_round_trips_through_the_config():
    cfg = Config(word_embedding_size=8)
    for weight in (0.0, 0.5, 3.0, list_lib.TOWER_ONLY):
        assert list_fit.trained_tower_weight(list_fit.with_tower_weight(cfg, weight)) == weight
