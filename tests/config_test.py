"""Tests for estimator.config: JSON round trip, overrides, validation, CLI precedence."""
import json
import os
import subprocess
import sys

import pytest

from estimator import train
from estimator.config import CONFIG_FILE, Config
from mmrecall_cli import train as train_cli


def test_json_round_trip_keeps_every_field(tmp_path):
    cfg = Config(hidden_size=48, num_heads=3, sampler="random",
                 loss_weights={"log_loss": 0.5, "softmax": 2.0}, xla=True)
    path = cfg.save(str(tmp_path))
    assert os.path.basename(path) == CONFIG_FILE
    assert Config.load(str(tmp_path)) == cfg
    assert Config.from_json(cfg.to_json()) == cfg


def test_overrides_parse_json_and_fall_back_to_strings():
    cfg = Config().with_overrides(["learning_rate=3e-4", "sampler=random", "xla=true",
                                   'loss_weights={"softmax": 1.0}', "num_negatives=7"])
    assert cfg.learning_rate == 3e-4
    assert cfg.sampler == "random"
    assert cfg.xla is True
    assert cfg.loss_weights == {"softmax": 1.0}
    assert cfg.num_negatives == 7


@pytest.mark.parametrize("bad", [
    ["no_such_key=1"], ["sampler=nearest"], ["loss_weights={\"hinge\": 1}"],
    ["pooling=max"], ["region_features=sqrt"], ["focal_gamma=-1"],
    ["hidden_size=30", "num_heads=4"], ["serving_score=max"], ["temperature=0"],
    ['loss_weights={"softmax": 0}'], ["novalue"], ["distribute=horovod"],
    ['distribute_devices=["/gpu:0"]'], ["distribute=mirrored", "distribute_devices=/gpu:0"],
    ['distribute=mirrored', 'distribute_devices=[""]'],
])
def test_bad_settings_raise(bad):
    with pytest.raises(ValueError):
        Config().with_overrides(bad)


def test_cli_precedence_defaults_model_dir_file_set_steps(tmp_path):
    model_dir = tmp_path / "model"
    Config(hidden_size=32, learning_rate=0.5, batch_size=8).save(str(model_dir))
    file_cfg = tmp_path / "f.json"
    file_cfg.write_text(json.dumps({"learning_rate": 0.25, "train_steps": 9}))
    args = train_cli.parse_args(["--data", "x", "--model-dir", str(model_dir), "--config",
                                 str(file_cfg), "--set", "batch_size=4", "--steps", "11"])
    cfg = train.config_from_args(args)
    assert cfg.hidden_size == 32          # from the existing model dir
    assert cfg.learning_rate == 0.25      # --config beats the model dir
    assert cfg.batch_size == 4            # --set beats --config
    assert cfg.train_steps == 11          # --steps beats everything
    assert cfg.dropout == Config().dropout


def test_distribute_fields_and_strategy():
    assert Config().distribute == "" and Config().distribute_devices == []
    assert train.distribution_strategy(Config()) is None
    assert train.run_config(Config(), "m").train_distribute is None
    cfg = Config().with_overrides(["distribute=mirrored", 'distribute_devices=["/cpu:0"]'])
    assert cfg.distribute_devices == ["/cpu:0"]
    assert Config.from_json(cfg.to_json()) == cfg
    run = train.run_config(cfg, "m")
    assert run.train_distribute is run.eval_distribute
    assert run.train_distribute.num_replicas_in_sync == 1


def test_knob_defaults_and_values():
    cfg = Config()
    assert (cfg.pooling, cfg.region_features, cfg.focal_gamma) == ("attention", "log1p", 2.0)
    cfg = Config().with_overrides(["pooling=mean", "region_features=raw", "focal_gamma=0.5",
                                   'loss_weights={"focal": 1.0}'])
    assert (cfg.pooling, cfg.region_features, cfg.focal_gamma) == ("mean", "raw", 0.5)
    assert Config.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("serving_score,loss_weights,uses_matcher", [
    ("sum", {"log_loss": 1.0, "softmax": 1.0}, True),    # the default
    ("tower", {"softmax": 1.0}, False),                  # towers only
    ("tower", {"softmax": 1.0, "log_loss": 0.0}, False),  # a zero weight is no loss
    ("tower", {"softmax": 1.0, "focal": 0.1}, True),     # a cross loss needs the matcher
    ("tower", {"softmax": 1.0, "cross_softmax": 1.0}, True),
    ("cross", {"softmax": 1.0}, True),                   # a served cross logit needs it
    ("sum", {"softmax": 1.0}, True),
])
def test_uses_matcher(serving_score, loss_weights, uses_matcher):
    cfg = Config(serving_score=serving_score, loss_weights=loss_weights)
    assert cfg.uses_matcher is uses_matcher


def test_concurrent_saves_into_one_model_dir_all_succeed(tmp_path):
    # Every task of a cluster (chief, workers, ps, evaluator) is a process that saves
    # config.json into the shared model dir at start; a shared temporary name made one
    # task's rename fail.
    script = ("import sys\n"
              "from estimator.config import Config\n"
              "for _ in range(200):\n"
              "    Config(seed=int(sys.argv[2])).save(sys.argv[1])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tasks = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(seed)],
                              cwd=root, stderr=subprocess.PIPE) for seed in range(4)]
    errors = [t.communicate()[1].decode() for t in tasks]
    assert [t.returncode for t in tasks] == [0] * 4, errors
    assert Config.load(str(tmp_path)).seed in range(4)
    assert os.listdir(tmp_path) == ["config.json"]          # no temporary left behind
