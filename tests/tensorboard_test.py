"""What `mmrecall train` leaves for TensorBoard, read back with its own EventAccumulator
and through TensorBoard's HTTP API.

One tiny `mmrecall train` run (6 steps, one eval) is shared by the tests: hparams (session
and metric config), text (config and prep), PR curve and histograms in the eval dir,
attention heat maps and top-5 lists in `pictures`, the Embedding Projector's files in
`projector`, and the progress / eval lines on stdout. The HTTP test serves the run's model
directory with TensorBoard's own WSGI app in-process (no port, no browser).
"""
import contextlib
import io
import json
import os
import re
import time

import numpy as np
import pytest
import tensorflow as tf
import werkzeug.test
from tensorboard import default, program
from tensorboard.backend import application
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from data_prep.manifest import PrepDir
from estimator import pictures, progress, projector, run_summaries
from estimator.config import Config
from mmrecall_cli import train as train_cli
from mmrecall_testing.model_fixtures import write_prep_dir

STEPS = 6


def _load(path):
    acc = event_accumulator.EventAccumulator(path, size_guidance={
        event_accumulator.TENSORS: 0, event_accumulator.HISTOGRAMS: 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `mmrecall train` of STEPS steps; its prep, model dir and stdout."""
    root = tmp_path_factory.mktemp("tb")
    # 5 valid queries x 7 candidates, 2 answers each: 10 positive and 25 negative rows.
    prep = PrepDir(write_prep_dir(str(root / "prep"), num_train=120, num_valid_queries=5,
                                  candidates=7, answers=2))
    model_dir = str(root / "runs" / "r1")
    argv = ["--data", prep.path, "--model-dir", model_dir, "--steps", str(STEPS),
            "--no-export-best"]
    for kv in ("hidden_size=24", "pooled_size=16", "intermediate_size=32",
               "box_hidden_size=32", "matcher_hidden_size=16", "geometry_hidden_size=8",
               "batch_size=8", "save_checkpoints_steps=1000", "eval_throttle_secs=0",
               "log_step_count_steps=2", "save_summary_steps=1000",
               "eval_queries_per_batch=3", "num_negatives=3"):
        argv += ["--set", kv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_cli.main(argv) == 0
    return {"prep": prep, "model_dir": model_dir, "stdout": out.getvalue(),
            "root": _load(model_dir),
            "eval": _load(os.path.join(model_dir, run_summaries.EVAL_DIR)),
            "pictures": _load(os.path.join(model_dir, pictures.SUBDIR))}


def _tensor(acc, tag):
    events = acc.Tensors(tag)
    assert len(events) == 1, (tag, len(events))
    return tensor_util.make_ndarray(events[0].tensor_proto)


def test_hparams_session_and_its_eval_metrics(run):
    content = run["root"].PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info"}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert metrics == {("eval_valid", t) for t in run_summaries.EVAL_METRICS}
    assert "hidden_size" in {h.name for h in experiment.hparam_infos}
    session = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    # One HParams row per model directory (run_train.sh names every one ".../model").
    assert session.group_name == os.path.abspath(run["model_dir"])
    hparams = session.hparams
    assert hparams["hidden_size"].number_value == 24          # from --set
    assert hparams["train_steps"].number_value == STEPS        # from --steps
    assert hparams["max_boxes"].number_value == run["prep"].max_boxes   # resolved
    assert hparams["sampler"].string_value == Config().sampler
    assert hparams["loss_weight/softmax"].number_value == 1.0
    assert hparams["loss_weight/focal"].number_value == 0.0
    assert hparams["mixed_precision"].WhichOneof("kind") == "bool_value"   # typed, not unset
    assert hparams["mixed_precision"].bool_value is False
    # The metrics the dashboard pairs with the session exist as scalars in eval_valid and
    # agree with what the command printed.
    final = json.loads(re.search(r"^final eval: (.*)$", run["stdout"], re.M).group(1))
    for tag in run_summaries.EVAL_METRICS:
        scalars = run["eval"].Scalars(tag)
        assert [s.step for s in scalars] == [STEPS], tag
        assert scalars[0].value == pytest.approx(final[tag], rel=1e-5), tag


def test_config_and_prep_as_text(run):
    assert set(run["root"].PluginTagToContent("text")) >= {"run/config", "run/prep"}
    config_md = _tensor(run["root"], "run/config").item().decode()
    assert config_md.startswith("```\n") and config_md.endswith("\n```")
    assert json.loads(config_md[4:-4]) == json.loads(Config.load(run["model_dir"]).to_json())
    prep_md = _tensor(run["root"], "run/prep").item().decode()
    prep = run["prep"]
    assert f"| train | {prep.split_rows('train')} | 0 |" in prep_md, prep_md
    assert f"| valid | {prep.split_rows('valid')} | 0 |" in prep_md, prep_md
    assert f"vocabulary {prep.vocab_size} entries" in prep_md
    assert f"box cap {prep.max_boxes}" in prep_md
    assert f"normalisation version {prep.normalization_version}" in prep_md


def test_pr_curve_counts_the_whole_valid_split(run):
    assert "pr_curve/score/0" in run["eval"].PluginTagToContent("pr_curves")
    curve = _tensor(run["eval"], "pr_curve/score/0")     # [6, thresholds]: tp fp tn fn p r
    assert curve.shape == (6, run_summaries.PR_THRESHOLDS)
    tp, fp, tn, fn, precision, recall = curve
    # Threshold 0 takes every row: 10 answers, 25 non-answers (see the fixture).
    assert (tp[0], fp[0], tn[0], fn[0]) == (10, 25, 0, 0)
    np.testing.assert_allclose(tp + fn, 10)
    np.testing.assert_allclose(fp + tn, 25)
    assert recall[0] == pytest.approx(1.0) and precision[0] == pytest.approx(10 / 35)
    assert np.all(np.diff(tp) <= 0)                      # fewer rows pass higher thresholds


def test_score_and_gate_histograms(run):
    tags = set(run["eval"].PluginTagToContent("histograms"))
    assert tags == {"scores/positive/0", "scores/negative/0", "gates/text/0", "gates/box/0"}
    for tag, bins in (("scores/positive/0", run_summaries.SCORE_BINS),
                      ("gates/box/0", run_summaries.GATE_BINS)):
        hist = _tensor(run["eval"], tag)                 # [bins, 3]: left, right, fraction
        assert hist.shape == (bins, 3)
        np.testing.assert_allclose(hist[:, 0], np.arange(bins) / bins, atol=1e-6)
        np.testing.assert_allclose(hist[:, 1], np.arange(1, bins + 1) / bins, atol=1e-6)
        assert hist[:, 2].sum() == pytest.approx(1.0, abs=1e-5), tag
    # The same probabilities the PR curve thresholds: the share of positives at or above
    # 0.5 is tp / 10 at threshold 0.5 (index 25 of 51), up to rows exactly at a threshold.
    positive = _tensor(run["eval"], "scores/positive/0")
    curve = _tensor(run["eval"], "pr_curve/score/0")
    assert positive[20:, 2].sum() == pytest.approx(curve[0, 25] / 10, abs=1e-5)


def test_progress_and_eval_lines(run):
    lines = run["stdout"].splitlines()
    steps = [l for l in lines if l.startswith("step ")]
    assert [l.split()[1] for l in steps] == ["2/6", "4/6", "6/6"], steps
    assert re.fullmatch(r"step 6/6 \(100\.0%\)  [0-9.]+ steps/s  elapsed \d+:\d\d:\d\d  "
                        r"eta 0:00:00", steps[-1]), steps[-1]
    evals = [l for l in lines if l.startswith("eval @ step ")]
    assert len(evals) == 1 and evals[0].startswith("eval @ step 6: ndcg@5 "), evals
    final = json.loads(re.search(r"^final eval: (.*)$", run["stdout"], re.M).group(1))
    assert f"ndcg@5 {final['ndcg@5']:.4f}" in evals[0]
    assert "pr_curve" not in evals[0] and "pr_curve/score" not in final


def test_progress_line_worked_by_hand():
    # 1850 steps left at 12.5 steps/s: 148 s = 0:02:28.
    assert progress.progress_line(150, 2000, 12.5, 12.0) == (
        "step 150/2000 (7.5%)  12.50 steps/s  elapsed 0:00:12  eta 0:02:28")
    assert progress.progress_line(0, 10, 0.0, 3725.0).endswith("elapsed 1:02:05  eta ?")


def test_progress_hook_rate_from_a_fake_clock():
    """The hook's arithmetic without a session: 4 steps in 2 fake seconds = 2 steps/s."""
    lines, now = [], [100.0]
    hook = progress.ProgressHook(10, 4, print_fn=lines.append, clock=lambda: now[0])
    hook._start = hook._last_time = 100.0                # what after_create_session sets
    hook._step = hook._last_step = 0
    now[0], hook._step = 102.0, 4
    hook._report()
    assert lines == ["step 4/10 (40.0%)  2.00 steps/s  elapsed 0:00:02  eta 0:00:03"]


def test_scalar_metrics_drops_serialised_summaries():
    out = run_summaries.scalar_metrics({"ndcg@5": np.float32(0.5), "global_step": np.int64(3),
                                        "pr_curve/score": b"\x0a\x00"})
    assert out == {"ndcg@5": 0.5, "global_step": 3.0}


def test_pictures_of_the_first_valid_queries(run):
    tags = set(run["pictures"].PluginTagToContent("text"))
    assert tags == {f"{kind}/query_{i}" for kind in ("top5", "attention")
                    for i in range(pictures.QUERIES)}
    images = set(run["pictures"].PluginTagToContent("images"))
    assert images == {f"attention/query_{i}/image_summary" for i in range(pictures.QUERIES)}
    for i in range(pictures.QUERIES):
        width, height, *pngs = _tensor(run["pictures"],
                                       f"attention/query_{i}/image_summary").tolist()
        assert len(pngs) == pictures.HEATMAP_CANDIDATES
        assert int(width) % pictures.CELL == 0 and int(height) % pictures.CELL == 0
        # 7 candidates per query, 2 of them answers (see the fixture): 5 marked rows.
        top5 = _tensor(run["pictures"], f"top5/query_{i}").item().decode()
        assert top5.count("| **hit** |") + top5.count("| miss |") == 5, top5
    assert [e.step for e in run["pictures"].Tensors("top5/query_0")] == [STEPS]


def test_projector_holds_the_valid_queries_and_their_candidates(run):
    path = os.path.join(run["model_dir"], projector.SUBDIR)
    with open(os.path.join(path, projector.METADATA_FILE), encoding="utf-8") as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    # 5 valid queries of 7 candidates, 2 answers each, all within the point bound.
    assert [r[0] for r in rows].count("query") == 5
    assert [r[0] for r in rows].count("answer") == 10
    assert [r[0] for r in rows].count("non-answer") == 25
    tensors = tf.train.load_checkpoint(path).get_tensor(projector.TENSOR_NAME)
    assert tensors.shape == (40, 16)                       # pooled_size=16 (--set)
    np.testing.assert_allclose(np.linalg.norm(tensors, axis=1), 1.0, atol=1e-3)


@pytest.fixture(scope="module")
def http(run):
    """A werkzeug client of TensorBoard's WSGI app over the run's model directory."""
    tb = program.TensorBoard(plugins=default.get_plugins())
    tb.configure(logdir=run["model_dir"], load_fast="false", reload_interval=0,
                 reload_task="blocking")
    data_provider, multiplexer = tb._make_data_provider()  # pylint: disable=protected-access
    app = application.TensorBoardWSGIApp(tb.flags, tb.plugin_loaders, data_provider,
                                         tb.assets_zip_provider, multiplexer)
    return werkzeug.test.Client(app)


def _json(client, route, **kwargs):
    response = client.get(route, **kwargs)
    assert response.status_code == 200, (route, response.status_code)
    return json.loads(response.get_data())


def test_http_api_lists_every_dashboard_with_this_runs_data(http):
    wanted = {"hparams", "projector", "images", "text", "pr_curves", "scalars",
              "histograms"}
    # The projector decides whether it is active in a background thread the first listing
    # starts; later listings report its answer.
    for _ in range(100):
        listing = _json(http, "/data/plugins_listing")
        if all(listing[name]["enabled"] for name in wanted):
            break
        time.sleep(0.1)
    assert {name for name in wanted if listing[name]["enabled"]} == wanted
    images = _json(http, "/data/plugin/images/tags")
    assert "attention/query_0/image_summary" in images[pictures.SUBDIR]
    text = _json(http, "/data/plugin/text/tags")
    assert {"run/config", "run/prep"} <= set(text["."])
    assert "top5/query_0" in text[pictures.SUBDIR]
    curves = _json(http, "/data/plugin/pr_curves/tags")
    assert "pr_curve/score/0" in curves[run_summaries.EVAL_DIR]
    assert projector.SUBDIR in _json(http, "/data/plugin/projector/runs")
    info = _json(http, "/data/plugin/projector/info", query_string={"run": projector.SUBDIR})
    assert [e["tensorName"] for e in info["embeddings"]] == [projector.TENSOR_NAME]
    tensor = http.get("/data/plugin/projector/tensor",
                      query_string={"run": projector.SUBDIR, "name": projector.TENSOR_NAME})
    assert tensor.status_code == 200 and len(tensor.get_data()) == 40 * 16 * 4  # float32
    metadata = http.get("/data/plugin/projector/metadata",
                        query_string={"run": projector.SUBDIR, "name": projector.TENSOR_NAME})
    lines = metadata.get_data(as_text=True).splitlines()
    assert lines[0].split("\t") == list(projector.COLUMNS) and len(lines) == 1 + 40
    experiment = _json(http, "/data/plugin/hparams/experiment",
                       query_string={"request": json.dumps({"experimentName": ""})})
    assert "hidden_size" in {h["name"] for h in experiment["hparamInfos"]}
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == set(
        run_summaries.EVAL_METRICS)
