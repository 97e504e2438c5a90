"""End-to-end training: a tiny data set is fitted, training resumes, the CLI works."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from data_prep.manifest import PrepDir
from estimator import input_fn, network, train
from estimator.config import CONFIG_FILE, Config
from export import score
from mmrecall_cli import train as train_cli
from mmrecall_testing.model_fixtures import tiny_config, write_prep_dir


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return PrepDir(write_prep_dir(str(tmp_path_factory.mktemp("prep")), num_train=240,
                                  num_valid_queries=12, candidates=8, answers=2))


class _LossRecorder(tf.compat.v1.train.SessionRunHook):
    """Records the training loss of every step."""

    def __init__(self):
        self.losses = []

    def before_run(self, run_context):
        return tf.compat.v1.train.SessionRunArgs(
            tf.compat.v1.get_default_graph().get_tensor_by_name("total_loss:0"))

    def after_run(self, run_context, run_values):
        self.losses.append(float(run_values.results))


class _RecordingExporter(tf.estimator.Exporter):
    """Stands in for the export module's best-NDCG@5 exporter."""

    def __init__(self):
        self.calls = []

    @property
    def name(self):
        return "recording"

    def export(self, estimator, export_path, checkpoint_path, eval_result, is_the_final_export):
        self.calls.append((checkpoint_path, dict(eval_result), is_the_final_export))
        return None


def _valid_random_ndcg(prep, cfg):
    """Mean NDCG@5 (the organiser's scorer) of 50 random rankings of the valid lists."""
    ds = input_fn.input_fn_builder(cfg, prep.split_files("valid"),
                                   tf.estimator.ModeKeys.EVAL, prep)()
    labels, qids = zip(*[(y.numpy(), f["query_id"].numpy()) for f, y in ds])
    labels, qids = np.concatenate(labels), np.concatenate(qids)
    lists = [rows for rows in (np.nonzero(qids == q)[0] for q in np.unique(qids))
             if labels[rows].any()]
    rng = np.random.RandomState(0)
    return np.mean([score.ndcg_at_5(rng.permutation(rows).tolist(),
                                    rows[labels[rows] > 0].tolist())
                    for _ in range(50) for rows in lists])


def test_resolve_config_fills_the_data_fields_from_the_prep(prep):
    cfg = train.resolve_config(Config(), prep)
    assert cfg.data_dir == prep.path
    assert cfg.word_embedding_size == prep.embedding_dim == 8
    assert cfg.max_boxes == prep.max_boxes == 4
    kept = train.resolve_config(Config(word_embedding_size=8, max_boxes=2), prep)
    assert kept.max_boxes == 2                          # a set cap is kept
    for cap in (0, 5, 99):                              # none, or above prep's 4: prep's
        assert train.resolve_config(Config(max_boxes=cap), prep).max_boxes == 4


def test_fits_a_tiny_data_set(prep, tmp_path):
    cfg = train.resolve_config(tiny_config(train_steps=100, save_checkpoints_steps=1000),
                               prep)
    model_dir = str(tmp_path / "model")
    recorder, exporter = _LossRecorder(), _RecordingExporter()
    after = train.train(cfg, prep, model_dir, exporters=[exporter], train_hooks=[recorder])
    assert len(exporter.calls) == 1
    checkpoint, eval_result, final = exporter.calls[0]
    assert checkpoint.endswith("model.ckpt-100") and final
    assert eval_result["ndcg@5"] == pytest.approx(after["ndcg@5"])
    assert after["global_step"] == 100
    losses = recorder.losses
    assert len(losses) == 100
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    # 2 answers among 8 candidates: a random ranking scores ~0.45 (computed, not assumed).
    random_ndcg = _valid_random_ndcg(prep, cfg)
    assert 0.3 < random_ndcg < 0.6
    assert after["ndcg@5"] > 0.85 and after["ndcg@5"] > random_ndcg + 0.3, (random_ndcg, after)
    saved = Config.load(model_dir)
    assert saved.train_steps == 100 and saved.word_embedding_size == 8
    events = tf.io.gfile.glob(os.path.join(model_dir, "events.out.tfevents.*"))
    tags = set()
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    for tag in ("learning_rate", "loss/log_loss", "loss/softmax", "matcher/text_gate",
                "matcher/word_to_region_entropy"):
        assert tag in tags, sorted(tags)


def test_same_seed_deterministic_runs_are_identical(prep, tmp_path):
    cfg = train.resolve_config(tiny_config(deterministic=True, dropout=0.1, batch_size=8,
                                           shuffle_buffer=64, train_group_size=4,
                                           group_window=16), prep)
    files = prep.split_files("train")

    def run(name, seed):
        run_cfg = Config.from_dict({"seed": seed}, cfg)
        model_dir = str(tmp_path / name)
        estimator = train.build_estimator(run_cfg, model_dir, prep)
        estimator.train(input_fn.input_fn_builder(run_cfg, files, tf.estimator.ModeKeys.TRAIN,
                                                  prep), max_steps=6)
        return {name: tf.train.load_variable(model_dir, name)
                for name, _ in tf.train.list_variables(model_dir)
                if name.startswith("ranker/") and "Adam" not in name}

    # (Another seed giving other weights is model_fn_test's.)
    first, second = run("a", 11), run("b", 11)
    assert len(first) > 50 and first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_resumes_from_checkpoint_and_continues_step_count(prep, tmp_path):
    model_dir = str(tmp_path / "model")
    argv = ["--data", prep.path, "--model-dir", model_dir, "--steps", "4",
            "--set", "hidden_size=24", "--set", "pooled_size=16", "--set",
            "intermediate_size=32", "--set", "box_hidden_size=32", "--set", "max_boxes=4",
            "--set", "batch_size=8", "--set", "save_checkpoints_steps=1000",
            "--set", "eval_throttle_secs=0", "--set", "eval_steps=1"]
    assert train_cli.main(argv) == 0
    assert tf.train.load_variable(model_dir, "global_step") == 4
    first = tf.train.load_variable(model_dir, "ranker/box_tower/feature_out/kernel")
    with open(os.path.join(model_dir, CONFIG_FILE)) as f:
        assert json.load(f)["hidden_size"] == 24
    # Second run: config comes back from config.json; only the step total changes.
    assert train_cli.main(["--data", prep.path, "--model-dir", model_dir, "--steps", "7"]) == 0
    assert tf.train.load_variable(model_dir, "global_step") == 7
    assert Config.load(model_dir).hidden_size == 24 and Config.load(model_dir).train_steps == 7
    second = tf.train.load_variable(model_dir, "ranker/box_tower/feature_out/kernel")
    assert first.shape == second.shape and not np.allclose(first, second)
    ckpt = tf.train.get_checkpoint_state(model_dir)
    assert ckpt.model_checkpoint_path.endswith("model.ckpt-7")


_MIRRORED_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf

# Two logical CPU devices stand in for two GPUs (must happen before TF initialises).
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from data_prep.manifest import PrepDir
from estimator import train
from estimator.config import Config

prep, model_dir = PrepDir(sys.argv[1]), sys.argv[2]
cfg = Config.from_json(sys.argv[3])


class ReplicaCopies(tf.compat.v1.train.SessionRunHook):
    # Largest |copy on /cpu:1 - copy on /cpu:0| over the mirrored variables, at the end.
    def begin(self):
        self.pairs = [(v.values[0].read_value(), v.values[1].read_value())
                      for v in tf.compat.v1.global_variables() if len(getattr(v, "values", ())) == 2]

    def end(self, session):
        diffs = [float(np.max(np.abs(a - b)) if np.size(a) else 0.0)
                 for a, b in session.run(self.pairs)]
        self.result = (len(diffs), max(diffs))


class Losses(tf.compat.v1.train.SessionRunHook):
    def begin(self):
        self.values = []
        self.loss = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.LOSSES)

    def before_run(self, run_context):
        return tf.compat.v1.train.SessionRunArgs(self.loss)

    def after_run(self, run_context, run_values):
        self.values.append(float(np.mean(run_values.results)))


copies, losses = ReplicaCopies(), Losses()
metrics = train.train(cfg, prep, model_dir, train_hooks=[copies, losses])
print("RESULT " + json.dumps({
    "metrics": {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0},
    "replica_copies": copies.result, "losses": losses.values}))
"""


def test_mirrored_strategy_on_two_logical_cpus(prep, tmp_path):
    """distribute=mirrored trains, evaluates and checkpoints the same variables."""
    model_dir = str(tmp_path / "mirrored")
    cfg = train.resolve_config(tiny_config(
        train_steps=6, save_checkpoints_steps=1000, batch_size=8, distribute="mirrored",
        distribute_devices=["/cpu:0", "/cpu:1"]), prep)
    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
    proc = subprocess.run([sys.executable, str(script), prep.path, model_dir, cfg.to_json()],
                          capture_output=True, text=True, timeout=240, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])

    # Trains: the global step advances, losses are finite, a checkpoint is written.
    assert tf.train.load_variable(model_dir, "global_step") == 6
    assert tf.train.latest_checkpoint(model_dir).endswith("model.ckpt-6")
    assert len(result["losses"]) == 6 and np.all(np.isfinite(result["losses"]))
    # Both replicas' copies stay identical (incl. the word2vec init of the embedding).
    count, max_diff = result["replica_copies"]
    assert count > 10 and max_diff < 1e-6, result["replica_copies"]
    # Evaluation (eval_distribute) gives NDCG@5 from the summed metric counters.
    assert result["metrics"]["global_step"] == 6
    assert 0.0 < result["metrics"]["ndcg@5"] <= 1.0 and np.isfinite(result["metrics"]["loss"])

    # Same variable names and shapes as without the strategy: the Ranker's map restores.
    saved = dict(tf.train.list_variables(model_dir))
    assert not [n for n in saved if "replica" in n], sorted(saved)
    with tf.Graph().as_default():
        ranker = network.build_ranker(cfg, prep.vocab_size)
        var_map = ranker.variable_map()
        for name, var in var_map.items():
            assert saved[name] == var.shape.as_list(), name
        with tf.compat.v1.Session() as sess:
            tf.compat.v1.train.Saver(var_list=var_map).restore(
                sess, tf.train.latest_checkpoint(model_dir))
            kernel = sess.run(var_map["ranker/box_tower/feature_out/kernel"])
    np.testing.assert_array_equal(
        kernel, tf.train.load_variable(model_dir, "ranker/box_tower/feature_out/kernel"))


def test_prep_without_train_split_is_refused_before_anything_is_written(prep, tmp_path):
    """A prep made without --train cannot be trained on: the error names the prep and the
    model directory is not created."""
    without_train = tmp_path / "prep"
    without_train.mkdir()
    manifest = dict(prep.manifest)
    manifest["splits"] = {k: v for k, v in manifest["splits"].items() if k != "train"}
    for name in os.listdir(prep.path):
        if name != "manifest.json":
            os.symlink(os.path.join(prep.path, name), without_train / name)
    (without_train / "manifest.json").write_text(json.dumps(manifest))
    model_dir = tmp_path / "model"
    with pytest.raises(ValueError, match="no train split"):
        train.train(tiny_config(), PrepDir(str(without_train)), str(model_dir))
    assert not model_dir.exists()
