"""Tests of data_prep.synth as a whole (writer and command line): the competition layout,
sizes, list structure, determinism and flags. The parts have their own tests:
synth_queries_test.py, synth_plan_test.py, synth_render_test.py.

The files are decoded here independently of data_prep.tsv (split on tabs, strict base64,
numpy frombuffer), so a layout mistake shared by the writer and the reader still shows.
Sizes are odd on purpose (13 candidates, 5 answers, 11 boxes at most).
"""
import base64
import collections
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from data_prep import schema, synth
from data_prep.synth.writer import TEST_ANSWER_FILE

TSV_FILES = (synth.TRAIN_FILE, synth.VALID_FILE, synth.TEST_FILE)


def _argv(out_dir, **flags):
    argv = ["--out", str(out_dir)]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


SMALL = dict(seed=7, train_rows=45, valid_queries=9, test_queries=5, candidates=13,
             answers=5, max_boxes_train=40, max_boxes_eval=11, batch_rows=16)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert synth.main(_argv(out, **SMALL)) == 0
    return out


def read_tsv(path):
    """Decodes a competition TSV: (header fields, list of row dicts with numpy arrays)."""
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = []
        for line in f:
            assert line.endswith("\n")
            fields = line[:-1].split("\t")
            assert len(fields) == 9, fields[:4]
            n = int(fields[3])
            arrays = {}
            for col, dtype, per_box in (("boxes", "<f4", 4), ("features", "<f4", 2048),
                                        ("class_labels", "<i8", 1)):
                text = fields[schema.TSV_COLUMNS.index(col)]
                assert len(text) % 4 == 0   # standard alphabet with '=' padding
                raw = base64.b64decode(text, validate=True)
                assert len(raw) == n * per_box * np.dtype(dtype).itemsize, col
                arrays[col] = np.frombuffer(raw, dtype).reshape(n, per_box)
            rows.append(dict(product_id=int(fields[0]), image_h=int(fields[1]),
                             image_w=int(fields[2]), num_boxes=n, boxes=arrays["boxes"],
                             features=arrays["features"],
                             labels=arrays["class_labels"].reshape(n), query=fields[7],
                             query_id=int(fields[8])))
    return header, rows


def _runs(values):
    """[(value, run length)] of consecutive equal values."""
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


# ---------------------------------------------------------------------------------------
# Layout.


def test_writes_exactly_the_six_files(small_set):
    assert sorted(os.listdir(small_set)) == sorted(
        TSV_FILES + (synth.VALID_ANSWER_FILE, TEST_ANSWER_FILE, synth.LABELS_FILE))
    # (no temp files left)


def test_labels_file(small_set):
    with open(small_set / synth.LABELS_FILE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + schema.NUM_CLASSES
    assert not lines[0].split("\t")[0].isdigit()   # a header, not data
    pairs = [line.split("\t") for line in lines[1:]]
    assert [int(i) for i, _ in pairs] == list(range(schema.NUM_CLASSES))
    names = dict((int(i), name) for i, name in pairs)
    assert (names[4], names[14], names[22], names[28], names[29], names[32]) == (
        "shoes", "kitchenware", "digital supplies", "others", "human face", "hand")
    assert len(set(names.values())) == schema.NUM_CLASSES


@pytest.mark.parametrize("name", TSV_FILES)
def test_tsv_decodes_with_the_competition_layout(small_set, name):
    header, rows = read_tsv(small_set / name)
    assert header == list(schema.TSV_COLUMNS)
    assert rows
    zeros = nonzeros = 0
    for row in rows:
        h, w, boxes = row["image_h"], row["image_w"], row["boxes"]
        assert h > 0 and w > 0 and row["num_boxes"] >= 1
        assert np.array_equal(boxes, np.round(boxes))                    # whole pixels
        top, left, bottom, right = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (bottom <= h).all() and (right <= w).all()
        assert (top < bottom).all() and (left < right).all()
        assert ((row["labels"] >= 0) & (row["labels"] < schema.NUM_CLASSES)).all()
        feats = row["features"]
        assert np.isfinite(feats).all() and (feats >= 0).all()
        zeros += int((feats == 0).sum())
        nonzeros += int((feats > 0).sum())
        assert row["query"] and row["query"] == row["query"].strip()
    # Many exact zeros, as in the real detector features, but not only zeros.
    assert 0.3 < zeros / (zeros + nonzeros) < 0.98
    ids = [r["product_id"] for r in rows]
    if name == synth.TRAIN_FILE:
        assert all(100_000_000 <= i < 103_000_000 for i in ids)
        assert len(set(ids)) == len(ids)
    else:
        assert all(i >= 103_000_000 for i in ids)


def test_sizes_follow_flags(small_set):
    _, train = read_tsv(small_set / synth.TRAIN_FILE)
    assert len(train) == SMALL["train_rows"]
    assert max(r["num_boxes"] for r in train) <= SMALL["max_boxes_train"]
    for name, queries in ((synth.VALID_FILE, SMALL["valid_queries"]),
                          (synth.TEST_FILE, SMALL["test_queries"])):
        _, rows = read_tsv(small_set / name)
        sizes = collections.Counter(r["query_id"] for r in rows)
        assert len(sizes) == queries
        assert max(sizes.values()) == SMALL["candidates"]
        assert min(sizes.values()) > SMALL["answers"]
        # Most lists have exactly --candidates products (a few are shorter).
        assert sum(s == SMALL["candidates"] for s in sizes.values()) >= queries / 2
        assert max(r["num_boxes"] for r in rows) <= SMALL["max_boxes_eval"]


def test_empty_splits_write_a_header_only(tmp_path):
    assert synth.main(_argv(tmp_path, train_rows=0, valid_queries=0, test_queries=1,
                            candidates=9)) == 0
    for name in (synth.TRAIN_FILE, synth.VALID_FILE):
        header, rows = read_tsv(tmp_path / name)
        assert header == list(schema.TSV_COLUMNS) and rows == []
    with open(tmp_path / synth.VALID_ANSWER_FILE) as f:
        assert json.load(f) == {}
    assert len(read_tsv(tmp_path / synth.TEST_FILE)[1]) <= 9


# ---------------------------------------------------------------------------------------
# Valid / test structure.


@pytest.mark.parametrize("name", (synth.VALID_FILE, synth.TEST_FILE))
def test_rows_are_grouped_by_query(small_set, name):
    _, rows = read_tsv(small_set / name)
    runs = _runs([r["query_id"] for r in rows])
    assert len(runs) == len({q for q, _ in runs})
    for query_id, _ in runs:   # one query text per query id
        assert len({r["query"] for r in rows if r["query_id"] == query_id}) == 1


@pytest.mark.parametrize("tsv_file, answer_file", [
    (synth.VALID_FILE, synth.VALID_ANSWER_FILE),
    (synth.TEST_FILE, TEST_ANSWER_FILE),
])
def test_answers_are_in_their_list_and_mostly_the_flag(small_set, tsv_file, answer_file):
    _, valid = read_tsv(small_set / synth.VALID_FILE)
    _, test = read_tsv(small_set / synth.TEST_FILE)
    rows = valid if tsv_file == synth.VALID_FILE else test
    with open(small_set / answer_file) as f:
        answers = json.load(f)
    lists = collections.defaultdict(list)
    for r in rows:
        lists[r["query_id"]].append(r["product_id"])
    assert sorted(answers) == sorted(str(q) for q in lists)
    positions = []
    for query_id, ids in answers.items():
        assert all(type(i) is int for i in ids)
        assert len(set(ids)) == len(ids) and 2 <= len(ids) <= SMALL["answers"]
        candidates = lists[int(query_id)]
        assert set(ids) <= set(candidates)
        positions += [candidates.index(i) for i in ids]
    exact = sum(len(ids) == SMALL["answers"] for ids in answers.values())
    assert exact >= len(answers) / 2
    # Answers are mixed among the candidates, not written first.
    assert np.mean(positions) > SMALL["answers"]
    # The real artefact: an answer appears in one candidate list only.
    appearances = collections.Counter(r["product_id"] for r in valid + test)
    assert all(appearances[i] == 1 for ids in answers.values() for i in ids)


# ---------------------------------------------------------------------------------------
# Determinism.


TINY = dict(train_rows=11, valid_queries=2, test_queries=2, candidates=9, batch_rows=4)


def _file_bytes(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_deterministic_for_a_seed_and_different_for_another(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert synth.main(_argv(tmp_path / name, seed=seed, **TINY)) == 0
    a, b, c = (_file_bytes(tmp_path / n) for n in "abc")
    assert a == b
    for name in TSV_FILES:
        assert a[name] != c[name]


def _digest(directory):
    """sha256 over the sorted file names and bytes of a directory, without the test answers
    (written later than the pinned files; their content is checked above)."""
    h = hashlib.sha256()
    for name, data in _file_bytes(directory).items():
        if name == TEST_ANSWER_FILE:
            continue
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()


# Digests of two small data sets: a seed and flags must always give the same bytes (numpy's
# generators and float arithmetic are stable for a pinned numpy).
PINNED = {
    "small": "b291c86bd6bfacf869f85c6402727fd7f208bd9227aa18bfe57b0e9148150c8a",
    "tiny_flags": "c0c58328c18d1da89e80bc77d4348de266de2a927badcec101e7a3588334c0a2",
}


def test_generated_bytes_are_pinned(small_set, tmp_path):
    assert _digest(small_set) == PINNED["small"]
    assert synth.main(_argv(tmp_path, seed=3, noise=0.5, pool_reuse=0.3, **TINY)) == 0
    assert _digest(tmp_path) == PINNED["tiny_flags"]


# ---------------------------------------------------------------------------------------
# Command line.


@pytest.mark.parametrize("flags", [
    ["--train-rows", "-1"],
    ["--valid-queries", "many"],
    ["--candidates", "6", "--answers", "6"],
    ["--noise", "-0.5"],
    ["--pool-reuse", "1.5"],
    ["--seed", "-3"],
    ["--preset", "medium"],
    ["--cluster", "1.5"],
    ["--product-types", "0"],
    ["--shown", "2"],
    ["--boxes-mean", "-1"],
])
def test_bad_flags_are_argparse_errors(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth.config_from_args(["--out", str(tmp_path)] + flags)
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_out_is_required_and_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth.config_from_args([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        synth.config_from_args(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--out", "--seed", "--train-rows", "--valid-queries", "--test-queries",
                 "--candidates", "--answers", "--noise", "--preset", "--mention-scale",
                 "--shown", "--binding", "--cluster", "--boxes-mean", "--product-types",
                 "--paraphrase"):
        assert flag in usage
    for name in synth.PRESETS:
        assert f"\n  {name} " in usage


def test_config_from_args_fills_the_dataclass(tmp_path):
    cfg = synth.config_from_args(_argv(tmp_path, **SMALL))
    assert cfg == synth.SynthConfig(out_dir=str(tmp_path), **SMALL)


@pytest.mark.parametrize("name", sorted(synth.PRESETS))
def test_presets_parse_and_flags_override_them(tmp_path, name):
    cfg = synth.config_from_args(["--out", str(tmp_path), "--preset", name])
    assert cfg == synth.preset_config(name, str(tmp_path))
    assert cfg == dataclasses.replace(synth.SynthConfig(out_dir=str(tmp_path)),
                                      **synth.PRESETS[name].settings)
    cfg = synth.config_from_args(["--noise", "0.25", "--out", str(tmp_path), "--preset", name,
                                  "--train-rows", "17"])
    assert (cfg.noise, cfg.train_rows) == (0.25, 17)
    # Every preset writes a small data set.
    out = tmp_path / "gen"
    assert synth.main(_argv(out, preset=name, seed=3, **TINY)) == 0
    assert len(read_tsv(out / synth.TRAIN_FILE)[1]) == TINY["train_rows"]


def test_default_preset_is_no_preset(tmp_path):
    assert synth.config_from_args(_argv(tmp_path, preset="default")) == \
        synth.config_from_args(_argv(tmp_path))
    assert synth.main(_argv(tmp_path, preset="default", **SMALL)) == 0
    assert _digest(tmp_path) == PINNED["small"]


def test_package_docstring_lists_every_preset_and_its_settings():
    lines = {line.split()[0]: line for line in synth.__doc__.splitlines()
             if line.startswith("  ") and line.split()[0] in synth.PRESETS}
    assert sorted(lines) == sorted(synth.PRESETS)
    for name, preset in synth.PRESETS.items():
        block = synth.__doc__[synth.__doc__.index(lines[name]):]
        for field, value in preset.settings.items():
            assert f"{field} {value}" in block[:200], (name, field)
