"""estimator.pictures: heat-map pixels worked by hand, the top-5 table's order and marks,
the summaries' tags and image sizes for a hand-made probe, and the exporter's calls over
a run (pictures at each evaluation's step, the projector after the final one)."""
import os
import types

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from data_prep.manifest import PrepDir
from estimator import pictures, projector
from estimator.probe import Probe
from mmrecall_testing import export_fixtures as fx


def fake_probe(with_attention=True):
    """One query ("red dress", 2 tokens), 7 rows; product 11 listed twice. Scores put the
    rows in the order 2, 0, 5, 1(=11 again, dropped), 3, 4, 6; answers are rows 0 and 6.
    Row r has r % 3 + 1 boxes."""
    n = 7
    pids = np.array([10, 11, 12, 13, 14, 15, 11])
    boxes = [np.arange(r % 3 + 1) for r in range(n)]
    attention = [np.full([2, len(b)], 1.0 / len(b), np.float32) for b in boxes]
    return Probe(
        query_ids=np.full(n, 5), product_ids=pids, query_text=["red dress"] * n,
        tokens=[["red", "dress"]] * n, box_labels=boxes,
        main_class=np.array([1, 1, 4, 29, 0, 1, 1]), labels=np.array([1, 0, 0, 0, 0, 0, 1]),
        scores=np.array([0.9, 0.5, 1.0, 0.3, 0.2, 0.8, 0.1], np.float32),
        query_embeddings=np.zeros([n, 2], np.float32),
        product_embeddings=np.zeros([n, 2], np.float32),
        word_to_region=attention if with_attention else None)


def test_heatmap_pixels_worked_by_hand():
    # Largest weight 1.0: 0 -> the darkest anchor, 1 -> the brightest, 0.5 -> the middle
    # one (anchors at 0, .25, .5, .75, 1), 0.25 -> the second.
    image = pictures.heatmap(np.array([[0.0, 1.0], [0.5, 0.25]]), cell=3)
    assert image.shape == (6, 6, 3) and image.dtype == np.uint8
    colours = pictures._COLOURS.astype(np.uint8)
    np.testing.assert_array_equal(image[0, 0], colours[0])
    np.testing.assert_array_equal(image[1, 4], colours[4])
    np.testing.assert_array_equal(image[3, 0], colours[2])
    np.testing.assert_array_equal(image[4, 4], colours[1])
    assert (image[2] == 255).all() and (image[:, 5] == 255).all()    # the gaps


def test_query_rows_best_first_each_product_once():
    (rows,) = pictures.query_rows(fake_probe())
    assert rows.tolist() == [2, 0, 5, 1, 3, 4]                # row 6 repeats product 11


def test_top_candidates_marks_hits_and_misses():
    p = fake_probe()
    text = pictures.top_candidates_markdown(p, pictures.query_rows(p)[0])
    lines = text.splitlines()
    # One answer (row 0, second) of the two; the other answer's product is a repeat of 11.
    assert lines[0].startswith("**red dress** (query 5): 1 of its 1 answers in the top 5")
    table = [l for l in lines if l.startswith("| ") and l[2].isdigit()]
    assert [l.split(" | ")[1] for l in table] == ["12", "10", "15", "11", "13"]
    assert ["hit" in l for l in table] == [False, True, False, False, False]
    assert "| 2 | 10 | skirt & dress | 0.900 |" in table[1]


def test_summaries_tags_and_image_sizes():
    summaries = pictures.summaries(fake_probe(), queries=3)
    tags = [v.tag for s in summaries for v in s.value]
    assert tags == ["top5/query_0", "attention/query_0/image_summary", "attention/query_0"]
    image_value = summaries[1].value[0]
    assert image_value.metadata.plugin_data.plugin_name == "images"
    width, height, *pngs = tensor_util.make_ndarray(image_value.tensor).tolist()
    # Three heat maps (rows 2, 0, 5: 3, 1 and 3 boxes), padded to 2 tokens x 3 boxes.
    assert (int(width), int(height)) == (3 * pictures.CELL, 2 * pictures.CELL)
    assert len(pngs) == pictures.HEATMAP_CANDIDATES
    assert all(png.startswith(b"\x89PNG") for png in pngs)


def test_towers_only_model_gets_the_top5_text_only():
    summaries = pictures.summaries(fake_probe(with_attention=False))
    assert [v.tag for s in summaries for v in s.value] == ["top5/query_0"]


def test_exporter_pictures_each_evaluation_and_the_projector_after_the_last(tmp_path):
    root = str(tmp_path)
    gen = fx.generate(os.path.join(root, "gen"), seed=3, valid_queries=4, candidates=5)
    prep_dir = PrepDir(fx.prep(gen, os.path.join(root, "prep")))
    model_dir = os.path.join(root, "model")
    ckpt = fx.random_checkpoint(model_dir, prep_dir, seed=1)
    exporter = pictures.PicturesExporter(prep_dir, queries=2)
    estimator = types.SimpleNamespace(model_dir=model_dir)
    for step, final in ((10, False), (20, False), (30, True)):
        assert exporter.export(estimator, "unused", ckpt, {"global_step": step}, final) is None
        assert os.path.isdir(os.path.join(model_dir, projector.SUBDIR)) == final
    acc = event_accumulator.EventAccumulator(os.path.join(model_dir, pictures.SUBDIR))
    acc.Reload()
    assert set(acc.PluginTagToContent("text")) == {
        "top5/query_0", "top5/query_1", "attention/query_0", "attention/query_1"}
    assert [e.step for e in acc.Tensors("attention/query_1/image_summary")] == [10, 20, 30]
    # The same checkpoint each time: the final (projector) pass pictures the same lists.
    texts = [tensor_util.make_ndarray(e.tensor_proto).item()
             for e in acc.Tensors("top5/query_1")]
    assert texts[0] == texts[1] == texts[2]
    with open(os.path.join(model_dir, projector.SUBDIR, projector.METADATA_FILE)) as f:
        assert sum(line.startswith("query\t") for line in f) == 4    # 4 queries x (1 + 5)
