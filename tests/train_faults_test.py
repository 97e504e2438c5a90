"""Training killed with SIGKILL at random points resumes from its last checkpoint to the
same end as an uninterrupted run.

The Estimator checkpoints the model and optimiser, not the input pipeline's position, so a
resumed run sees other batches after the restart than an uninterrupted one: the resumed
weights are not bit-identical to it. What must hold, and is checked: the rerun restores the
newest checkpoint (never restarts from scratch), trains exactly up to `train_steps`, keeps
the saved config, evaluates, and leaves no file of the killed run that breaks it.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import tensorflow as tf

from mmrecall_testing.model_fixtures import tiny_config, write_prep_dir

STEPS = 60


def _start(prep_dir, model_dir, cfg_path):
    cmd = [sys.executable, "-m", "mmrecall_cli", "train", "--data", prep_dir,
           "--model-dir", model_dir, "--config", cfg_path, "--no-export-best"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)


def _newest_step(model_dir):
    path = tf.train.latest_checkpoint(model_dir)
    return int(path.rsplit("-", 1)[1]) if path else 0


def test_kill_at_a_random_checkpoint_then_rerun_finishes_from_it(tmp_path):
    seed = random.randrange(1 << 16)          # a new kill point each run; shown on failure
    prep_dir = write_prep_dir(str(tmp_path / "prep"), num_train=160, num_valid_queries=4)
    cfg = tiny_config(train_steps=STEPS, save_checkpoints_steps=10, keep_checkpoint_max=10,
                      eval_throttle_secs=0)
    cfg_path = str(tmp_path / "cfg.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        f.write(cfg.to_json())
    model_dir = str(tmp_path / "model")

    kill_after = random.Random(seed).choice([10, 20, 30])    # a checkpoint to wait for
    proc = _start(prep_dir, model_dir, cfg_path)
    deadline = time.time() + 240
    while _newest_step(model_dir) < kill_after and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _newest_step(model_dir)
    assert 0 < killed_at < STEPS, (seed, killed_at)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)

    proc = _start(prep_dir, model_dir, cfg_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    restored = [line for line in out.splitlines() if "Restoring parameters from" in line]
    assert restored and restored[0].endswith(f"model.ckpt-{killed_at}"), (seed, out[-2000:])
    assert _newest_step(model_dir) == STEPS
    final = json.loads(out.rsplit("final eval: ", 1)[1].splitlines()[0])
    assert final["global_step"] == STEPS and 0.0 <= final["ndcg@5"] <= 1.0
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        assert json.load(f) == saved
