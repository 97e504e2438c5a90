"""The benches' result files: one JSON document per run, written atomically."""
import json
import os


def write_report(path: str, report: dict, indent: int = 1) -> str:
    """Writes `report` as JSON to `path` (its folder is created), under a temporary name
    renamed when complete, so an interrupted bench never leaves a truncated result.

    Returns:
      the absolute path written.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)
    return path
