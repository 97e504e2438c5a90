"""merge.py: prep split over 2 "machines", merged, equals a one-machine run."""
import json
import os

import pytest

from data_prep import merge, prep, shards
from data_prep.manifest import PrepDir
from mmrecall_testing import tsv_fixtures as fx


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tsv")
    train = [fx.line(r) for r in fx.train_rows(31, 17)]
    train[4] = fx.with_field(train[4], "num_boxes", "x")
    valid_rows = fx.grouped_rows(32, num_queries=4, per_query=3)
    return {
        "train": fx.write_tsv(str(d / "train.tsv"), train),
        "valid": fx.write_tsv(str(d / "valid.tsv"), [fx.line(r) for r in valid_rows]),
        "answers": fx.write_answers(str(d / "ans.json"), fx.answers_for(valid_rows)),
    }


def _args(inputs, out, *extra):
    return ["--out", str(out), "--train", inputs["train"], "--valid", inputs["valid"],
            "--valid-answers", inputs["answers"], "--rows-per-shard", "4", "--embedding-dim",
            "6", "--min-count", "2", "--no-progress", *extra]


def _without_paths(manifest):
    for entry in manifest["splits"].values():
        entry.pop("source")
    return manifest


def test_two_machines_merged_equal_one_machine(inputs, tmp_path):
    assert prep.main(_args(inputs, tmp_path / "one")) == 0
    for i in range(2):
        assert prep.main(_args(inputs, tmp_path / f"m{i}", "--shard-index", str(i),
                               "--num-shards", "2")) == 0
        assert not (tmp_path / f"m{i}" / "manifest.json").exists()
        assert not (tmp_path / f"m{i}" / "vocab.tsv").exists()
    # machine 0 did train shards 0, 2, 4 only
    assert sorted(os.listdir(tmp_path / "m0" / "train")) == \
        [f"part-{k:05d}.tfrecord" for k in (0, 2, 4)]
    assert merge.main(["--out", str(tmp_path / "merged"), str(tmp_path / "m0"),
                       str(tmp_path / "m1")]) == 0
    one, merged = tmp_path / "one", tmp_path / "merged"
    assert fx.read_dir_bytes(str(merged)) == fx.read_dir_bytes(str(one))
    for name in ("vocab.tsv", "word2vec.npy", "rejects/train.tsv", "rejects/valid.tsv"):
        assert (merged / name).read_bytes() == (one / name).read_bytes(), name
    m_one = _without_paths(PrepDir(str(one)).manifest)
    m_merged = _without_paths(PrepDir(str(merged)).manifest)
    assert m_merged == m_one and m_one["splits"]["train"]["rejected"] == 1


def test_merge_into_a_part_directory_and_missing_machine_error(inputs, tmp_path, capsys):
    for i in range(3):
        assert prep.main(_args(inputs, tmp_path / f"m{i}", "--shard-index", str(i),
                               "--num-shards", "3")) == 0
    parts = [str(tmp_path / f"m{i}") for i in range(3)]
    assert merge.main(["--out", parts[0], parts[0], parts[2]]) == 1
    assert "missing the output of machine(s) [1] of 3" in capsys.readouterr().err
    assert merge.main(["--out", parts[0], *parts]) == 0
    m = PrepDir(parts[0]).manifest
    assert [s["file"] for s in m["splits"]["train"]["shards"]] == \
        [f"train/part-{k:05d}.tfrecord" for k in range(5)]  # 18 lines / 4
    assert PrepDir(parts[0]).split_files("valid")


def _two_parts_one_sidecar_edited(inputs, tmp_path, part, split, index, edit):
    """Preps machines m0 and m1 of 2, then applies edit(sidecar dict) to one sidecar."""
    for i in range(2):
        assert prep.main(_args(inputs, tmp_path / f"m{i}", "--shard-index", str(i),
                               "--num-shards", "2")) == 0
    path = tmp_path / part / shards.state_file(split, index, "json")
    sidecar = json.loads(path.read_text())
    edit(sidecar)
    path.write_text(json.dumps(sidecar))


def _merge_two(tmp_path):
    return merge.main(["--out", str(tmp_path / "merged"), str(tmp_path / "m0"),
                       str(tmp_path / "m1")])


def test_a_part_made_by_other_normalisation_rules_is_refused(inputs, tmp_path, capsys):
    # as an older version of prep wrote
    _two_parts_one_sidecar_edited(inputs, tmp_path, "m1", "train", 3,
                                  lambda s: s["fingerprint"].update(normalization_version=1))
    assert _merge_two(tmp_path) == 1
    assert "shard 3 of train has queries normalised by rules version 1" in \
        capsys.readouterr().err
    assert not (tmp_path / "merged" / "manifest.json").exists()


def test_a_part_written_without_checksums_is_refused(inputs, tmp_path, capsys):
    # as prep wrote sidecars before it recorded checksums
    _two_parts_one_sidecar_edited(inputs, tmp_path, "m0", "valid", 0, lambda s: s.pop("crc32c"))
    assert _merge_two(tmp_path) == 1
    assert "shard 0 of valid was written without a checksum; rerun that machine's prep" in \
        capsys.readouterr().err
    assert prep.main(_args(inputs, tmp_path / "m0", "--shard-index", "0",
                           "--num-shards", "2")) == 0  # checks the shard, records it
    assert _merge_two(tmp_path) == 0
