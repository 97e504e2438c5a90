"""Tests of estimator/cluster_local.py: TF_CONFIG layout and clean process shutdown."""
import json
import os
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


def test_cli_requires_train_arguments(capsys):
    with pytest.raises(SystemExit):
        cluster_local.main(["--log-dir", "x"])
    assert "mmrecall train" in capsys.readouterr().err
