"""prep.py and engine.py: the `mmrecall prep` command end to end, its manifest, resume after
a kill or a corrupted shard, --verify, duplicate counts, worker-count independence, and the
errors and faults a user meets (each one line naming the path)."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import google_crc32c
import numpy as np
import pytest

from data_prep import prep, schema, shards, text, vocab
from data_prep.manifest import PrepDir
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
    m = PrepDir(str(single)).manifest
    assert m["schema_version"] == schema.SCHEMA_VERSION and m["compression"] == ""
    assert m["normalization_version"] == text.NORMALIZATION_VERSION
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
    for k, path in enumerate(PrepDir(str(single)).split_files("valid")):
        for r in tf.data.TFRecordDataset(path):
            ex = tf.io.parse_single_example(r, spec)
            q, p = int(ex[schema.QUERY_ID]), int(ex[schema.PRODUCT_ID])
            assert shard_of.setdefault(q, k) == k  # one shard per query
            labels[(q, p)] = int(ex[schema.LABEL])
    want = {(r["query_id"], r["product_id"]): int(r["product_id"] in
                                                   inputs["answer_map"][str(r["query_id"])])
            for i, r in enumerate(inputs["valid_rows"]) if i != 9}
    assert labels == want and len(set(shard_of.values())) > 1


def test_two_workers_write_the_same_bytes(single, inputs, tmp_path):
    assert prep.main(_args(inputs, tmp_path, "--workers", "2")) == 0
    want, got = fx.read_dir_bytes(str(single)), fx.read_dir_bytes(str(tmp_path))
    # train 25 lines / 6 -> 5 shards; valid 7-row queries -> 5; test 5-row queries -> 10+10
    assert got == want and len(want) == 5 + 5 + 2
    assert open(tmp_path / "vocab.tsv").read() == open(single / "vocab.tsv").read()


# Run in a subprocess: each chunk is delayed, so a SIGKILL lands mid-run.
_SLOW_PREP = """
import sys, time
from data_prep import prep, worker
slow = worker.process_chunk
worker.process_chunk = lambda *a, **k: (time.sleep(0.4), slow(*a, **k))[1]
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
    want, got = fx.dir_files(str(single)), fx.dir_files(str(tmp_path))
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


# --- resume verifies content; --verify ------------------------------------------------------
def _flip_byte(path, at=None):
    data = bytearray(open(path, "rb").read())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_manifest_records_each_shard_size_and_checksum(single):
    for split in ("train", "valid", "test"):
        for shard in PrepDir(str(single)).manifest["splits"][split]["shards"]:
            data = open(os.path.join(single, shard["file"]), "rb").read()
            assert shard["bytes"] == len(data)
            assert shard["crc32c"] == google_crc32c.value(data)


def test_a_flipped_byte_is_reported_by_verify_and_rewritten_by_a_rerun(single, inputs, tmp_path,
                                                                       capsys):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    shard = out / "train" / "part-00002.tfrecord"
    _flip_byte(shard)  # same size: only a checksum tells
    before = fx.dir_files(str(out))
    assert prep.main(["--verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(shard) in err[0] and "does not match its checksum" in err[0]
    assert fx.dir_files(str(out)) == before  # --verify writes nothing

    assert prep.main(_args(inputs, out)) == 0
    summary = capsys.readouterr().out
    assert "train: 23 rows kept, 2 rejected, 1 shards written, 4 reused, 1 rewritten" in summary
    assert f"rewritten: {shard}: content does not match its checksum" in summary
    assert fx.comparable(fx.dir_files(str(out))) == fx.comparable(fx.dir_files(str(single)))
    assert prep.main(["--verify", str(out)]) == 0


def test_shards_without_recorded_checksums_are_checked_by_their_records(single, inputs, tmp_path,
                                                                        capsys):
    """Sidecars of the previous format (no crc32c, no duplicates): intact shards are reused
    and get both recorded; one with a corrupt record is rewritten."""
    out = tmp_path / "out"
    shutil.copytree(single, out)
    for sidecar in (out / "state").glob("*/part-*.json"):
        obj = json.loads(sidecar.read_text())
        del obj["crc32c"], obj["duplicates"]
        sidecar.write_text(json.dumps(obj, sort_keys=True))
    _flip_byte(out / "valid" / "part-00001.tfrecord")
    assert prep.main(_args(inputs, out)) == 0
    summary = capsys.readouterr().out
    assert "train: 23 rows kept, 2 rejected, 0 shards written, 5 reused" in summary
    assert "valid: 34 rows kept, 1 rejected, 1 shards written, 4 reused, 1 rewritten" in summary
    assert f"rewritten: {out}/valid/part-00001.tfrecord: record CRC mismatch at record " \
        f"offset" in summary
    assert fx.comparable(fx.dir_files(str(out))) == fx.comparable(fx.dir_files(str(single)))


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.remove(d / "test" / "part-00001.tfrecord"),
     "test/part-00001.tfrecord: missing (test shard listed by the manifest)"),
    (lambda d: open(d / "valid" / "part-00000.tfrecord", "ab").write(b"x"),
     "valid/part-00000.tfrecord: "),
    (lambda d: os.remove(d / "word2vec.npy"), "word2vec.npy: missing"),
    (lambda d: os.remove(d / "manifest.json"), "manifest.json: missing"),
])
def test_verify_names_each_problem(single, tmp_path, capsys, damage, message):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    damage(out)
    before = fx.dir_files(str(out))
    assert prep.main(["--verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert fx.dir_files(str(out)) == before


# --- duplicates -----------------------------------------------------------------------------
def test_duplicate_products_within_a_candidate_list_are_counted_and_kept(tmp_path, capsys):
    rows = fx.grouped_rows(31, num_queries=3, per_query=4)
    lines = [fx.line(r) for r in rows]
    lines.insert(2, lines[1])   # query 5000: product listed twice in a row
    lines.insert(8, lines[5])   # query 5001: its first product again, later in the list
    valid = fx.write_tsv(str(tmp_path / "valid.tsv"), lines)
    answers = fx.write_answers(str(tmp_path / "a.json"), fx.answers_for(rows))
    test = fx.write_tsv(str(tmp_path / "test.tsv"), [fx.line(r) for r in rows])
    out = tmp_path / "out"
    assert prep.main(["--out", str(out), "--valid", valid, "--valid-answers", answers,
                      "--test", test, "--no-progress"]) == 0
    m = PrepDir(str(out)).manifest["splits"]
    assert (m["valid"]["rows"], m["valid"]["duplicates"]) == (14, 2)   # both kept
    assert (m["test"]["rows"], m["test"]["duplicates"]) == (12, 0)
    summary = capsys.readouterr().out
    assert "2 duplicate product rows within candidate lists (kept)" in summary


# --- faults: one line naming the path, nothing left behind ----------------------------------
def test_a_missing_input_creates_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert prep.main(["--out", str(out), "--train", str(tmp_path / "absent.tsv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mmrecall prep: error: {tmp_path / 'absent.tsv'}: no such file"]
    assert not out.exists()


def test_a_read_only_output_directory_is_one_line(inputs, tmp_path, monkeypatch, capsys):
    # Tests run as root, which writes through file modes: the refusal is injected.
    out = tmp_path / "ro"
    real_makedirs = os.makedirs

    def read_only(path, *a, **k):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_makedirs(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", read_only)
    assert prep.main(_args(inputs, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmrecall prep: error: {out}")
    assert "Read-only file system; make it writable or choose another --out" in err[0]


# Workers are spawned processes: they import this script as __mp_main__, so the fault is
# injected there too. Every 3rd shard file of the run hits a full disk mid-write.
_FULL_DISK_PREP = """
import errno, itertools, sys
from data_prep import prep, tfrecord
_opened = itertools.count()
_init = tfrecord.RecordWriter.__init__
def _init_full(self, *a, **k):
    _init(self, *a, **k)
    self.full = next(_opened) % 3 == 2
_put = tfrecord.RecordWriter._put
def _put_full(self, data):
    if self.full:
        raise OSError(errno.ENOSPC, "No space left on device")
    _put(self, data)
tfrecord.RecordWriter.__init__, tfrecord.RecordWriter._put = _init_full, _put_full
if __name__ == "__main__":
    sys.exit(prep.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_disk_full_in_a_worker_is_one_line_and_a_rerun_finishes(single, inputs, tmp_path,
                                                                  workers):
    script = tmp_path / "full_disk_prep.py"
    script.write_text(_FULL_DISK_PREP)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), *_args(inputs, out, "--workers",
                                                                  workers)],
                          cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 1
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert err[0].startswith(f"mmrecall prep: error: {out}/train/part-000")
    assert err[0].endswith(".tfrecord: No space left on device; free space on that disk (or "
                           "choose another --out) and rerun: it resumes")
    assert not (out / "manifest.json").exists()
    assert prep.main(_args(inputs, out)) == 0
    assert fx.temporaries(str(out)) == []
    assert fx.comparable(fx.dir_files(str(out))) == fx.comparable(fx.dir_files(str(single)))


def test_disk_full_while_finalizing_leaves_nothing_after_the_rerun(single, inputs, tmp_path,
                                                                    monkeypatch, capsys):
    real = shards.write_atomic

    def full_at_word2vec(path, data):
        if path.endswith(schema.EMBEDDINGS_FILE):  # as a kill mid-write would leave it
            with open(shards.tmp_name(path), "wb") as f:
                f.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, data)

    out = tmp_path / "out"
    monkeypatch.setattr(shards, "write_atomic", full_at_word2vec)
    assert prep.main(_args(inputs, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"mmrecall prep: error: {out / schema.EMBEDDINGS_FILE}: No space left "
                       f"on device; free space on that disk (or choose another --out) and "
                       f"rerun: it resumes")
    assert fx.temporaries(str(out)) == [f".{schema.EMBEDDINGS_FILE}.tmp-{os.uname().nodename}-"
                                        f"{os.getpid()}"]
    monkeypatch.setattr(shards, "write_atomic", real)
    assert prep.main(_args(inputs, out)) == 0
    assert fx.temporaries(str(out)) == []
    assert fx.comparable(fx.dir_files(str(out))) == fx.comparable(fx.dir_files(str(single)))


def test_stale_temporaries_of_every_kind_are_removed_by_a_rerun(single, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    os.remove(out / "manifest.json")
    left = [".manifest.json.tmp-h-1", ".vocab.tsv.tmp-h-1", ".word2vec.npy.tmp-h-1",
            "rejects/.train.tsv.tmp-h-1", "state/.valid.answers.json.tmp-h-1",
            "train/.part-00001.tfrecord.tmp-h-1", "state/valid/.part-00002.json.tmp-h-1"]
    for rel in left:
        (out / rel).write_bytes(b"partial")
    assert sorted(fx.temporaries(str(out))) == sorted(left)
    assert prep.main(_args(inputs, out)) == 0
    assert fx.temporaries(str(out)) == []
