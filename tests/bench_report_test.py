"""The benches' JSON result writer."""
import json
import os

from mmrecall_testing.bench_report import write_report


def test_report_is_written_whole_into_a_new_folder_and_replaces_an_old_one(tmp_path):
    path = tmp_path / "results" / "x.json"
    assert write_report(str(path), {"a": [1, 2]}) == str(path)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    write_report(str(path), {"b": 3}, indent=2)
    assert json.loads(path.read_text()) == {"b": 3}
    assert os.listdir(path.parent) == ["x.json"]          # no temporary left behind
