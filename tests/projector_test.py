"""estimator.projector: points and metadata of a hand-made probe, the files the projector
plugin reads, and an atomic replacement of an earlier directory."""
import os

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.plugins import projector as projector_api

from estimator import projector
from estimator.probe import Probe


def fake_probe():
    """Query 7 ("red\tdress", a tab to escape) with products 70 (answer) and 71; query 8
    with product 70 again (not an answer there). E = 3: queries have e0 / e1, products
    have their id / 100 in every component."""
    pids = np.array([70, 71, 70])
    return Probe(
        query_ids=np.array([7, 7, 8]), product_ids=pids,
        query_text=["red\tdress", "red\tdress", "blue hat"],
        tokens=[["red", "dress"]] * 2 + [["blue", "hat"]],
        box_labels=[np.array([1, 4]), np.array([29]), np.array([1, 4])],
        main_class=np.array([4, 29, -1]), labels=np.array([1, 0, 0]),
        scores=np.array([0.5, 0.1, -0.2], np.float32),
        query_embeddings=np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32),
        product_embeddings=np.repeat(pids[:, None] / 100.0, 3, 1).astype(np.float32),
        word_to_region=None)


def test_points_put_each_query_before_its_rows():
    vectors, rows = projector.points(fake_probe())
    np.testing.assert_allclose(vectors, [[1, 0, 0], [.7, .7, .7], [.71, .71, .71],
                                         [0, 1, 0], [.7, .7, .7]])
    assert rows == [["query", "red dress", "7", "", ""],
                    ["answer", "red dress", "7", "70", "shoes"],
                    ["non-answer", "red dress", "7", "71", "human face"],
                    ["query", "blue hat", "8", "", ""],
                    ["non-answer", "blue hat", "8", "70", ""]]


def test_written_files_are_what_the_plugin_reads(tmp_path):
    model_dir = str(tmp_path)
    path = projector.write_projector(model_dir, fake_probe(), step=12)
    assert path == os.path.join(model_dir, projector.SUBDIR)
    with open(os.path.join(path, "projector_config.pbtxt")) as f:
        config = text_format.Parse(f.read(), projector_api.ProjectorConfig())
    (embedding,) = config.embeddings
    assert embedding.tensor_name == projector.TENSOR_NAME
    # The plugin reads the directory's latest checkpoint: only the points' tensor in it.
    reader = tf.train.load_checkpoint(path)
    assert reader.get_variable_to_shape_map() == {projector.TENSOR_NAME: [5, 3]}
    np.testing.assert_array_equal(reader.get_tensor(projector.TENSOR_NAME),
                                  projector.points(fake_probe())[0])
    with open(os.path.join(path, embedding.metadata_path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].split("\t") == list(projector.COLUMNS)
    assert len(lines) == 1 + 5 and all(len(l.split("\t")) == 5 for l in lines)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(path))


def test_rewrite_replaces_the_directory_and_leaves_no_temporaries(tmp_path):
    model_dir = str(tmp_path)
    first = projector.write_projector(model_dir, fake_probe())
    open(os.path.join(first, "stale.txt"), "w").close()
    os.makedirs(os.path.join(model_dir, "projector.tmp-999999", "half"))   # a killed write
    projector.write_projector(model_dir, fake_probe())
    assert os.listdir(model_dir) == [projector.SUBDIR]
    assert "stale.txt" not in os.listdir(first)
    # The checkpoint state names the checkpoint inside the final directory.
    assert tf.train.latest_checkpoint(first) == os.path.join(first, projector.CHECKPOINT)


def test_class_names():
    assert projector.class_name(0) == "top clothes"
    assert projector.class_name(32) == "hand"
    assert projector.class_name(-1) == ""
