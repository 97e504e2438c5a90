"""End to end from the command line, as a user runs it:
generate -> prep -> train a few steps -> export (list stage fitted) -> rank -> score."""
import json
import os
import subprocess
import sys


def _run(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "mmrecall_cli"] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mmrecall {args[0]} failed:\n{proc.stderr[-4000:]}"
    return proc


def test_generate_prep_train_export_rank_score(tmp_path):
    root = str(tmp_path)
    _run(["generate", "--out", "gen", "--seed", "21", "--train-rows", "200",
          "--valid-queries", "4", "--test-queries", "2", "--candidates", "10",
          "--max-boxes-train", "12", "--max-boxes-eval", "10"], root)
    _run(["prep", "--out", "prep", "--train", "gen/train.tsv", "--valid", "gen/valid.tsv",
          "--valid-answers", "gen/valid_answer.json", "--test", "gen/testB.tsv",
          "--max-boxes", "6", "--embedding-dim", "8", "--w2v-epochs", "1", "--no-progress"],
         root)
    settings = dict(train_steps=3, hidden_size=16, pooled_size=8, num_heads=2,
                    intermediate_size=16, box_hidden_size=16, geometry_hidden_size=8,
                    matcher_hidden_size=8, batch_size=8, max_query_tokens=6,
                    save_checkpoints_steps=3, eval_throttle_secs=0, eval_queries_per_batch=2)
    _run(["train", "--data", "prep", "--model-dir", "model"] +
         [x for k, v in settings.items() for x in ("--set", f"{k}={v}")], root)
    out = _run(["export", "--model-dir", "model", "--data", "prep", "--export-dir", "export",
                "--warmup-tsv", "gen/valid.tsv"],
               root)
    printed = out.stdout.strip().splitlines()
    version = os.path.join(root, printed[-1])
    assert os.path.basename(version).isdigit() and os.path.isdir(version)
    # The list stage was fitted on the 4 valid lists (the prep has answers for them).
    assert printed[-2].startswith("first stage: ") and "list stage: " in printed[-2]
    assert "4 valid lists" in printed[-2]
    assert os.path.exists(os.path.join(version, "assets.extra", "tf_serving_warmup_requests"))

    _run(["rank", "--model", "export", "--input", "gen/valid.tsv", "--out", "submission.csv",
          "--scores", "scores.tsv", "--batch-queries", "3"], root)
    with open(os.path.join(root, "submission.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "query-id,product1,product2,product3,product4,product5"
    with open(os.path.join(root, "gen", "valid_answer.json")) as f:
        answers = json.load(f)
    assert sorted(l.split(",")[0] for l in lines[1:]) == sorted(answers)
    with open(os.path.join(root, "gen", "valid.tsv")) as f:
        rows = len(f.read().splitlines()) - 1
    with open(os.path.join(root, "scores.tsv")) as f:
        assert len(f.read().splitlines()) == 1 + rows

    result = _run(["score", "--answers", "gen/valid_answer.json",
                   "--submission", "submission.csv"], root)
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["queries"] == 4 and 0.0 <= metrics["ndcg@5"] <= 1.0

    # The test lists, ranked by the first stage alone, scored with the generated answers.
    _run(["rank", "--model", "export", "--input", "gen/testB.tsv", "--out", "test.csv",
          "--first-stage"], root)
    result = _run(["score", "--answers", "gen/testB_answer.json", "--submission", "test.csv"],
                  root)
    assert json.loads(result.stdout.strip().splitlines()[-1])["queries"] == 2

    # A malformed submission fails with a clear message.
    with open(os.path.join(root, "bad.csv"), "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    bad = subprocess.run([sys.executable, "-m", "mmrecall_cli", "score", "--answers",
                          "gen/valid_answer.json", "--submission", "bad.csv"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "answered queries missing" in bad.stderr
