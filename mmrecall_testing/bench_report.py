"""The benches' result files: one JSON document per run, written atomically."""
import json
import os

from data_prep import shards


def write_report(path: str, report: dict, indent: int = 1) -> str:
    """Writes `report` as JSON to `path` (its folder is created) through
    data_prep.shards.write_atomic, so an interrupted bench never leaves a truncated result.

    Returns:
      the absolute path written.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shards.write_atomic(path, (json.dumps(report, indent=indent) + "\n").encode("utf-8"))
    return path
