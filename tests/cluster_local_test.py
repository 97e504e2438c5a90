"""Tests of estimator/cluster_local.py: TF_CONFIG layout and clean process shutdown."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from estimator import cluster_local


def test_cluster_spec_puts_chief_workers_and_ps_on_distinct_ports():
    ports = cluster_local.free_ports(4)
    assert len(set(ports)) == 4
    spec = cluster_local.cluster_spec(num_workers=2, num_ps=1, ports=ports)
    assert spec == {
        "chief": [f"localhost:{ports[0]}"],
        "worker": [f"localhost:{ports[1]}", f"localhost:{ports[2]}"],
        "ps": [f"localhost:{ports[3]}"],
    }
    with pytest.raises(ValueError):
        cluster_local.cluster_spec(num_workers=2, num_ps=1, ports=ports[:3])


def test_tf_config_is_what_run_config_reads():
    import tensorflow as tf

    spec = cluster_local.cluster_spec(1, 1, [1111, 2222, 3333])
    for task_type, index, is_chief, global_id in (("chief", 0, True, 0),
                                                  ("worker", 0, False, 1)):
        os.environ["TF_CONFIG"] = cluster_local.tf_config(spec, task_type, index)
        try:
            config = tf.estimator.RunConfig()
        finally:
            del os.environ["TF_CONFIG"]
        assert config.task_type == task_type
        assert config.is_chief == is_chief
        assert config.num_worker_replicas == 2
        assert config.num_ps_replicas == 1
        assert config.global_id_in_cluster == global_id
    evaluator = json.loads(cluster_local.tf_config(spec, "evaluator", 0))
    assert evaluator["task"] == {"type": "evaluator", "index": 0}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_stop_kills_a_process_that_ignores_sigterm_and_its_children(tmp_path):
    # A parent that ignores SIGTERM and starts a child sleeping forever, like a ps task.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    task = cluster_local.Task("ps", 0, process, str(tmp_path / "ps.log"))
    for _ in range(100):
        if (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text():
            break
        time.sleep(0.1)
    child_pid = int((tmp_path / "child.pid").read_text())
    cluster_local._stop(task, grace_seconds=1.0)
    assert process.poll() is not None
    for _ in range(50):
        if not _alive(child_pid):
            break
        time.sleep(0.1)
    assert not _alive(child_pid)


def _stand_in_start(ps_script: str, trainer_script: str):
    """A cluster_local._start that runs small Python scripts instead of `mmrecall train`:
    `ps_script` for ps tasks, `trainer_script` for the others."""
    def start(task_type, index, cluster, train_argv, log_dir, env_extra):
        script = ps_script if task_type == cluster_local.PS else trainer_script
        process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
        return cluster_local.Task(task_type, index, process,
                                  os.path.join(log_dir, f"{task_type}-{index}.log"))
    return start


def test_a_ps_that_exits_stops_the_cluster_and_fails_it(tmp_path, monkeypatch):
    # A ps that dies at start (as one did when config.json's temporary name was shared)
    # left the chief waiting for it until the timeout; now the launcher stops on it.
    monkeypatch.setattr(cluster_local, "_start", _stand_in_start(
        "import sys; sys.exit(3)", "import time; time.sleep(600)"))
    result = cluster_local.run_local_cluster(["--unused"], str(tmp_path), num_workers=1,
                                             timeout_seconds=120)
    assert result.exit_codes["ps:0"] == 3
    assert result.exit_codes["chief:0"] is None and result.exit_codes["worker:0"] is None
    assert not result.ok
    assert not [name for name, pid in result.pids.items() if _alive(pid)]


def test_a_cluster_whose_trainers_finish_is_ok_with_its_ps_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_local, "_start", _stand_in_start(
        "import time; time.sleep(600)", "import time; time.sleep(1)"))
    result = cluster_local.run_local_cluster(["--unused"], str(tmp_path), num_workers=1,
                                             timeout_seconds=120)
    assert result.exit_codes == {"ps:0": None, "chief:0": 0, "worker:0": 0, "evaluator:0": 0}
    assert result.ok


def test_cli_requires_train_arguments(capsys):
    with pytest.raises(SystemExit):
        cluster_local.main(["--log-dir", "x"])
    assert "mmrecall train" in capsys.readouterr().err


STEP_LINE = re.compile(r"loss = [0-9.eE+-]+, step = (\d+)")


def _logged_steps(log_path) -> list:
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return [int(m.group(1)) for m in STEP_LINE.finditer(f.read())]


def test_local_cluster_trains_from_both_workers_and_stops_everything(tmp_path):
    """chief + 1 worker + 1 ps + evaluator on generated data; nothing left running after."""
    import tensorflow as tf

    data, prep, model = tmp_path / "data", tmp_path / "prep", tmp_path / "model"
    subprocess.run([sys.executable, "-m", "mmrecall_cli", "generate", "--out", str(data),
                    "--train-rows", "400", "--valid-queries", "6", "--test-queries", "0",
                    "--seed", "3"], check=True, capture_output=True)
    # Several train shards, so each worker reads its own files.
    subprocess.run([sys.executable, "-m", "mmrecall_cli", "prep", "--out", str(prep),
                    "--train", str(data / "train.tsv"), "--valid", str(data / "valid.tsv"),
                    "--valid-answers", str(data / "valid_answer.json"),
                    "--rows-per-shard", "100", "--workers", "1"],
                   check=True, capture_output=True)
    steps = 240
    tiny = ["hidden_size=16", "pooled_size=16", "intermediate_size=32", "box_hidden_size=32",
            "num_heads=2", "batch_size=16", "save_checkpoints_steps=120",
            "eval_throttle_secs=5", "log_step_count_steps=20"]
    train_args = ["--data", str(prep), "--model-dir", str(model), "--steps", str(steps)]
    for item in tiny:
        train_args += ["--set", item]

    result = cluster_local.run_local_cluster(train_args, str(tmp_path / "logs"),
                                             num_workers=1, num_ps=1, evaluator=True,
                                             timeout_seconds=900)

    assert result.ok, result.exit_codes
    assert result.exit_codes["ps:0"] is None       # stopped by us, it never exits by itself
    assert set(result.exit_codes) == {"chief:0", "worker:0", "ps:0", "evaluator:0"}
    # Both trainers ran steps of the one shared global step.
    chief_steps = _logged_steps(tmp_path / "logs" / "chief-0.log")
    worker_steps = _logged_steps(tmp_path / "logs" / "worker-0.log")
    assert chief_steps and worker_steps
    assert max(worker_steps) > 0
    final = tf.train.latest_checkpoint(str(model))
    assert final is not None
    assert int(final.rsplit("-", 1)[1]) >= steps
    # The evaluator evaluated the final checkpoint and kept the best SavedModel.
    evaluator_log = (tmp_path / "logs" / "evaluator-0.log").read_text(errors="replace")
    assert f"Saving dict for global step {final.rsplit('-', 1)[1]}:" in evaluator_log
    best = list((model / "export" / "best_ndcg").glob("*/saved_model.pb"))
    assert best, evaluator_log[-2000:]
    # No process of the cluster is left.
    assert len(result.pids) == 4
    assert not [name for name, pid in result.pids.items() if _alive(pid)]
