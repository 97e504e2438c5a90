"""engine.py: the answers file, the options' checks and settings (prep_test runs the engine
end to end through `mmrecall prep`)."""
import json

import pytest

from data_prep import engine


def _answers(tmp_path, obj):
    path = tmp_path / "answers.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_answers_accept_integer_and_digit_string_ids(tmp_path):
    path = _answers(tmp_path, {"5000": [1, "2", 2], "7": []})
    assert engine.load_answers(path) == {5000: frozenset({1, 2}), 7: frozenset()}


@pytest.mark.parametrize("obj, message", [
    ({"5000": [1, -2]}, "query '5000': -2 is not a non-negative integer id"),
    ({"5000": [True]}, "query '5000': True is not a non-negative integer id"),
    ({"x": [1]}, "query 'x': 'x' is not a non-negative integer id"),
    ({"5000": 3}, "query '5000': expected a list of product ids, got int"),
    ({}, "expected a non-empty JSON object"),
    ("[1]", "expected a non-empty JSON object"),
    ("{oops", "cannot read the answers file"),
])
def test_bad_answers_name_the_file_and_query(tmp_path, obj, message):
    path = _answers(tmp_path, obj)
    with pytest.raises(engine.PrepError, match=f"{path}: .*") as e:
        engine.load_answers(path)
    assert message in str(e.value)


def test_options_list_inputs_in_split_order_and_the_settings_merge_compares(tmp_path):
    train, test = tmp_path / "train.tsv", tmp_path / "test.tsv"
    train.write_text("")
    test.write_text("")
    options = engine.PrepOptions(out=str(tmp_path / "out"), test=str(test), train=str(train),
                                 max_boxes=9)
    options.validate()
    assert options.inputs() == [("train", str(train)), ("test", str(test))]
    assert options.settings() == {"rows_per_shard": 2048, "max_boxes": 9, "min_count": 1,
                                  "embedding_dim": 64, "w2v_epochs": 5, "gzip": False,
                                  "keep_leading_be": False}


@pytest.mark.parametrize("kwargs, message", [
    ({}, "nothing to do: give at least one of --train, --valid, --test"),
    ({"train": "T", "workers": 0}, "--workers must be >= 1, got 0"),
    ({"train": "T", "rows_per_shard": 0}, "--rows-per-shard must be >= 1, got 0"),
    ({"train": "T", "num_shards": 2, "shard_index": 2}, "--shard-index must be in 0..1, got 2"),
    ({"valid": "T"}, "--valid and --valid-answers go together"),
    ({"test": "missing.tsv"}, "missing.tsv: no such file"),
])
def test_inconsistent_options_are_refused(tmp_path, kwargs, message):
    (tmp_path / "T").write_text("")
    kwargs = {k: str(tmp_path / v) if k in ("train", "valid", "test") else v
              for k, v in kwargs.items()}
    with pytest.raises(engine.PrepError) as e:
        engine.PrepOptions(out=str(tmp_path / "out"), **kwargs).validate()
    assert message in str(e.value)


def test_partial_manifest_names_sort_by_machine():
    names = [engine.partial_manifest_name(i, 12) for i in (10, 2, 0)]
    assert names[2] == "manifest.part-00000-of-00012.json" and sorted(names) == names[::-1]
