"""`mmrecall train` (mmrecall_cli/train.py): flags -> Config, the prep, the best-NDCG@5
exporter wired in from the command layer, the final line, and a bad --data refused in one
line before anything is created. Training itself is stubbed
(estimator/train.py's tests train; end_to_end_test.py runs the command)."""
import json
import os

import pytest

import mmrecall_cli
from data_prep.manifest import PrepDir
from estimator import pictures, progress
from export.best_exporter import BestNdcgExporter
from mmrecall_cli import train as cli_train
from mmrecall_testing import model_fixtures


@pytest.fixture
def prep_path(tmp_path):
    return model_fixtures.write_prep_dir(str(tmp_path / "prep"), num_train=20,
                                         num_valid_queries=2)


def _stub_train(monkeypatch, result):
    calls = []

    def fake_train(cfg, prep, model_dir, exporters=None, train_hooks=None):
        calls.append(dict(cfg=cfg, prep=prep, model_dir=model_dir, exporters=exporters,
                          train_hooks=train_hooks))
        return result

    monkeypatch.setattr(cli_train.train_lib, "train", fake_train)
    return calls


def test_dispatch_names_the_command_module():
    assert mmrecall_cli.SUBCOMMANDS["train"][0] == "mmrecall_cli.train"


def test_main_wires_the_best_exporter_and_prints_final_eval(prep_path, tmp_path, monkeypatch,
                                                             capsys):
    calls = _stub_train(monkeypatch, {"ndcg@5": 0.5, "loss": 1.25, "per_step": [1.0, 2.0]})
    model_dir = str(tmp_path / "model")
    assert cli_train.main(["--data", prep_path, "--model-dir", model_dir, "--steps", "7",
                           "--set", "batch_size=4"]) == 0
    (call,) = calls
    assert isinstance(call["prep"], PrepDir) and call["prep"].path == prep_path
    assert call["model_dir"] == model_dir
    assert (call["cfg"].train_steps, call["cfg"].batch_size) == (7, 4)
    printer, exporter, drawer = call["exporters"]
    assert isinstance(printer, progress.EvalLinePrinter)    # one line per evaluation
    # The best export before the pictures: the chief may remove the checkpoint meanwhile.
    assert isinstance(exporter, BestNdcgExporter) and exporter.name == "best_ndcg"
    assert isinstance(drawer, pictures.PicturesExporter)    # TensorBoard pictures, projector
    (hook,) = call["train_hooks"]                             # the chief prints progress
    assert isinstance(hook, progress.ProgressHook)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("final eval: ")
    # Scalars only, sorted keys.
    assert json.loads(line[len("final eval: "):]) == {"loss": 1.25, "ndcg@5": 0.5}


def test_no_export_best_and_no_valid_split(prep_path, tmp_path, monkeypatch, capsys):
    calls = _stub_train(monkeypatch, None)
    assert cli_train.main(["--data", prep_path, "--model-dir", str(tmp_path / "m"),
                           "--no-export-best"]) == 0
    assert [type(e) for e in calls[0]["exporters"]] == [progress.EvalLinePrinter,
                                                       pictures.PicturesExporter]
    assert cli_train.main(["--data", prep_path, "--model-dir", str(tmp_path / "m"),
                           "--no-export-best", "--no-pictures"]) == 0
    assert [type(e) for e in calls[1]["exporters"]] == [progress.EvalLinePrinter]
    assert "final eval" not in capsys.readouterr().out


def _damage_empty(prep_path, tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return str(path), f"{path}/manifest.json: missing; {path} is not a finished prep"


def _damage_shard(prep_path, tmp_path):
    shard = os.path.join(prep_path, "train", "part-00001.tfrecord")
    os.remove(shard)
    return prep_path, f"{shard}: missing (train shard listed by the manifest); rerun mmrecall prep"


def _damage_valid_shard_and_vocab(prep_path, tmp_path):
    os.remove(os.path.join(prep_path, "vocab.tsv"))
    os.remove(os.path.join(prep_path, "valid", "part-00000.tfrecord"))
    return prep_path, (f"{prep_path}/valid/part-00000.tfrecord: missing (valid shard listed "
                       f"by the manifest)")


@pytest.mark.parametrize("damage", [
    lambda p, t: (str(t / "absent"), f"{t / 'absent'}: no such directory; give the --out of "
                                     f"a finished mmrecall prep"),
    _damage_empty, _damage_shard, _damage_valid_shard_and_vocab,
])
def test_a_bad_prep_is_one_line_before_anything_is_created(prep_path, tmp_path, monkeypatch,
                                                           capsys, damage):
    calls = _stub_train(monkeypatch, None)
    data, message = damage(prep_path, tmp_path)
    model_dir = tmp_path / "m"
    assert cli_train.main(["--data", data, "--model-dir", str(model_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmrecall train: error: {message}"), err
    assert calls == [] and not model_dir.exists()


def test_two_problems_are_one_line_pointing_at_verify(prep_path, tmp_path, monkeypatch, capsys):
    _stub_train(monkeypatch, None)
    for name in ("vocab.tsv", "word2vec.npy"):
        os.remove(os.path.join(prep_path, name))
    assert cli_train.main(["--data", prep_path, "--model-dir", str(tmp_path / "m")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"(and 1 more; `mmrecall prep --verify {prep_path}` lists them)")
