"""prep.py: the `mmrecall prep` command end to end, its manifest, resume after a kill,
worker-count independence and the errors a user meets."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_prep import prep, schema, vocab
from mmrecall_testing import tsv_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """train (with 2 bad rows), valid (5 queries x 7, answers incl. one missing), test."""
    d = tmp_path_factory.mktemp("tsv")
    train = [fx.line(r) for r in fx.train_rows(22, 23)]
    train.insert(5, fx.with_field(train[5], "boxes", "@@"))
    train.insert(17, "\t".join(train[17].split("\t")[:4]))
    valid_rows = fx.grouped_rows(23, num_queries=5, per_query=7)
    valid = [fx.line(r) for r in valid_rows]
    valid[9] = fx.with_field(valid[9], "image_h", "0")
    answers = fx.answers_for(valid_rows)
    answers["5001"].append(999)  # an answer that is not among the candidates
    test_rows = fx.grouped_rows(24, num_queries=4, per_query=5, first_id=104_000_000)
    return {
        "train": fx.write_tsv(str(d / "train.tsv"), train),
        "valid": fx.write_tsv(str(d / "valid.tsv"), valid),
        "answers": fx.write_answers(str(d / "valid_answer.json"), answers),
        "test": fx.write_tsv(str(d / "testB.tsv"), [fx.line(r) for r in test_rows]),
        "valid_rows": valid_rows, "answer_map": answers,
    }


def _args(inputs, out, *extra):
    return ["--out", str(out), "--train", inputs["train"], "--valid", inputs["valid"],
            "--valid-answers", inputs["answers"], "--test", inputs["test"],
            "--rows-per-shard", "6", "--embedding-dim", "8", "--no-progress", *extra]


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert prep.main(_args(inputs, out)) == 0
    return out


def test_manifest_describes_every_split(single, inputs):
    m = prep.load_manifest(str(single))
    assert m["schema_version"] == schema.SCHEMA_VERSION and m["compression"] == ""
    assert (m["max_boxes"], m["drop_leading_be"], m["embedding_dim"]) == (32, True, 8)
    train, valid, test = (m["splits"][s] for s in ("train", "valid", "test"))
    assert (train["rows"], train["rejected"]) == (23, 2)
    assert train["reject_reasons"] == {"base64": 1, "column_count": 1}
    assert [s["file"] for s in train["shards"]] == [f"train/part-{k:05d}.tfrecord"
                                                    for k in range(5)]  # 25 lines / 6
    assert sum(s["rows"] for s in train["shards"]) == 23
    assert (valid["rows"], valid["rejected"], valid["queries"]) == (34, 1, 5)
    answers = {(int(q), p) for q, ps in inputs["answer_map"].items() for p in ps}
    kept = {(r["query_id"], r["product_id"]) for i, r in enumerate(inputs["valid_rows"])
            if i != 9}
    assert valid["positives"] == len(answers & kept)
    assert valid["answers_missing"] == len(answers - kept) >= 1
    assert (test["rows"], test["queries"], test["rejected"]) == (20, 4, 0)
    assert m["vocab_size"] == len(vocab.load_vocab(os.path.join(single, m["vocab"])))
    emb = np.load(os.path.join(single, m["embeddings"]))
    assert emb.shape == (m["vocab_size"], 8) and emb.dtype == np.float32
    rejects = open(os.path.join(single, train["rejects_file"])).read().splitlines()
    assert rejects[0].startswith("line\tfield\treason") and \
        [r.split("\t")[:3] for r in rejects[1:]] == [["7", "boxes", "base64"],
                                                     ["19", "line", "column_count"]]


def test_valid_shards_hold_whole_queries_with_labels_from_answers(single, inputs):
    import tensorflow as tf

    spec = schema.tfrecord_feature_spec()
    shard_of, labels = {}, {}
    for k, path in enumerate(prep.split_files(str(single), "valid")):
        for r in tf.data.TFRecordDataset(path):
            ex = tf.io.parse_single_example(r, spec)
            q, p = int(ex[schema.QUERY_ID]), int(ex[schema.PRODUCT_ID])
            assert shard_of.setdefault(q, k) == k  # one shard per query
            labels[(q, p)] = int(ex[schema.LABEL])
    want = {(r["query_id"], r["product_id"]): int(r["product_id"] in
                                                   inputs["answer_map"][str(r["query_id"])])
            for i, r in enumerate(inputs["valid_rows"]) if i != 9}
    assert labels == want and len(set(shard_of.values())) > 1


def _dir_files(root):
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_two_workers_write_the_same_bytes(single, inputs, tmp_path):
    assert prep.main(_args(inputs, tmp_path, "--workers", "2")) == 0
    want, got = fx.read_dir_bytes(str(single)), fx.read_dir_bytes(str(tmp_path))
    # train 25 lines / 6 -> 5 shards; valid 7-row queries -> 5; test 5-row queries -> 10+10
    assert got == want and len(want) == 5 + 5 + 2
    assert open(tmp_path / "vocab.tsv").read() == open(single / "vocab.tsv").read()


# Run in a subprocess: each chunk is delayed, so a SIGKILL lands mid-run.
_SLOW_PREP = """
import sys, time
from data_prep import prep, write
slow = write.process_chunk
write.process_chunk = lambda *a, **k: (time.sleep(0.4), slow(*a, **k))[1]
sys.exit(prep.main(sys.argv[1:]))
"""


def test_rerun_after_sigkill_gives_the_same_files(single, inputs, tmp_path):
    sidecar = tmp_path / "state" / "train" / "part-00000.json"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREP, *_args(inputs, tmp_path)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not sidecar.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sidecar.exists() and not (tmp_path / "manifest.json").exists()
    done = sorted(os.listdir(tmp_path / "train"))
    assert "part-00004.tfrecord" not in done  # killed mid-run, not after
    assert prep.main(_args(inputs, tmp_path)) == 0
    want, got = _dir_files(single), _dir_files(tmp_path)
    want = {k: v for k, v in want.items() if not k.startswith(".")}
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith(".tfrecord") or name.startswith("state") or name.endswith(".tsv"):
            assert got[name] == want[name], name
    same = ["manifest.json", "word2vec.npy"]
    assert all(got[n] == want[n] for n in same)


def _file(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("setup, message", [
    (lambda d, i: ["--train", _file(d / "e.tsv", "")], "e.tsv: file is empty"),
    (lambda d, i: ["--test", _file(d / "h.tsv", "product_id\timage_w\n")],
     "h.tsv:1: header column 2 is 'image_w', expected 'image_h'"),
    (lambda d, i: ["--valid", i["valid"], "--valid-answers",
                   _file(d / "a.json", '{"5000": [1, "x"]}')],
     "a.json: query '5000': 'x' is not a non-negative integer id"),
    (lambda d, i: ["--valid", i["valid"], "--valid-answers", _file(d / "b.json", "[1, 2]")],
     "b.json: expected"),
    (lambda d, i: ["--valid", i["valid"], "--valid-answers", _file(d / "c.json", "{oops")],
     "c.json: cannot read the answers file"),
    (lambda d, i: ["--valid", i["valid"]], "--valid and --valid-answers go together"),
    (lambda d, i: ["--train", str(d / "nope.tsv")], "nope.tsv: no such file"),
])
def test_bad_inputs_fail_with_a_message_naming_the_file(tmp_path, inputs, capsys, setup,
                                                        message):
    args = setup(tmp_path, inputs)
    assert prep.main(["--out", str(tmp_path / "out"), "--no-progress", *args]) == 1
    assert message in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    assert prep.main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--rows-per-shard", "--max-boxes", "--gzip", "--shard-index", "--workers"):
        assert option in out


@pytest.mark.parametrize("recorded", [None, 1, 99])
def test_a_prep_made_by_other_normalisation_rules_is_refused(single, tmp_path, recorded):
    import json
    import shutil

    from data_prep import text
    out = tmp_path / "old"
    shutil.copytree(single, out)
    manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
    assert manifest["normalization_version"] == text.NORMALIZATION_VERSION
    if recorded is None:
        del manifest["normalization_version"]  # written before the key existed: version 1
    else:
        manifest["normalization_version"] = recorded
    (out / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{schema.MANIFEST_FILE}: queries were normalised by "
                                         f"rules version {recorded or 1}.*rerun mmrecall prep"):
        prep.load_manifest(str(out))
    with pytest.raises(ValueError, match="rules version"):
        prep.split_files(str(out), "train")
