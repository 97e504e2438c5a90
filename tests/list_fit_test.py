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


def test_resolve_off_file_and_fit(world, tmp_path):
    args = (world["model_cfg"], world["prep_dir"], world["ckpt"])
    assert list_fit.resolve_list_stage("off", *args) == (None, {"mode": "off", "params": None})
    params_file = str(tmp_path / "p.json")
    with open(params_file, "w") as f:
        json.dump({"weight": 1.5, "m": 4, "iterations": 2}, f)
    params, record = list_fit.resolve_list_stage(params_file, *args)
    assert params == list_lib.PrfParams(1.5, 4, 2)
    assert record == {"mode": "file", "file": params_file, "params": params.to_dict()}
    # A weight-0 setting ranks as the first stage: nothing is served.
    with open(params_file, "w") as f:
        json.dump({"weight": 0.0, "m": 4, "iterations": 2}, f)
    assert list_fit.resolve_list_stage(params_file, *args)[0] is None
    with open(params_file, "w") as f:
        json.dump({"weight": 1.0, "k": 4}, f)
    with pytest.raises(ValueError, match="unknown PRF settings"):
        list_fit.resolve_list_stage(params_file, *args)

    # Default with a valid split: fit, out of fold over the 7 lists.
    params, record = list_fit.resolve_list_stage(None, *args, folds=3)
    fit = record["fit"]
    assert record["mode"] == "fit" and fit["lists"] == 7 and len(fit["fold_params"]) == 3
    assert record["params"] == fit["params"]
    assert (params is None) == (fit["params"]["weight"] == 0.0)
    assert 0.0 <= fit["prf_ndcg@5_out_of_fold"] <= 1.0
    line = list_fit.describe(record)
    assert line.startswith("list stage: ") and "out-of-fold" in line
    assert "7 valid lists" in line


class _NoValid:
    path = "/prep/without/valid"

    @staticmethod
    def split_files(split):
        return []


def test_fit_needs_a_valid_split():
    assert list_fit.default_mode(_NoValid()) == list_fit.OFF
    assert list_fit.resolve_list_stage(None, None, _NoValid(), "ckpt")[0] is None
    with pytest.raises(ValueError, match="needs the prep's valid split"):
        list_fit.resolve_list_stage("fit", None, _NoValid(), "ckpt")


def test_describe_each_mode():
    assert list_fit.describe({"mode": "off", "params": None}).startswith("list stage: off")
    assert "from p.json" in list_fit.describe({"mode": "file", "file": "p.json",
                                               "params": {"weight": 1.0, "m": 3,
                                                          "iterations": 1}})
    kept = {"mode": "fit", "params": {"weight": 0.0, "m": 3, "iterations": 0},
            "fit": {"lists": 9, "first_stage_ndcg@5": 0.5, "prf_ndcg@5_out_of_fold": 0.5}}
    assert "2 standard errors" in list_fit.describe(kept)
