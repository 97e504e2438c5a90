"""Small competition-format TSVs for the data_prep tests, built with tsv.encode_row, and
the kill-and-resume helpers of the prep fault tests (tests/faults_test.py, bench/faults.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

from data_prep import schema, tsv

WORDS = ("red", "dress", "knives", "wooden", "storage", "box", "children", "shoes", "mice",
         "silk", "scarf", "women's", '"new"', "folding", "table", "winter", "jacket")


def random_row(rng: np.random.Generator, product_id: int, query_id: int, query: str = None,
               num_boxes: int = None, image_h: int = 800, image_w: int = 600) -> dict:
    """A valid row as a dict of encode_row arguments, with whole-pixel boxes in the image."""
    n = int(num_boxes if num_boxes is not None else rng.integers(1, 6))
    top = rng.integers(0, image_h // 2, n)
    left = rng.integers(0, image_w // 2, n)
    bottom = top + rng.integers(1, image_h // 2, n)
    right = left + rng.integers(1, image_w // 2, n)
    features = rng.random((n, schema.FEATURE_DIM), dtype=np.float32) * 3
    features[features < 1.0] = 0.0  # many exact zeros, as in the real data
    if query is None:
        query = " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))
    return dict(product_id=product_id, image_h=image_h, image_w=image_w,
                boxes=np.stack([top, left, bottom, right], 1).astype(np.float32),
                features=features, class_labels=rng.integers(0, schema.NUM_CLASSES, n),
                query=query, query_id=query_id)


def line(row: dict) -> str:
    return tsv.encode_row(**row)


def write_tsv(path: str, lines: Sequence[str], header: str = tsv.HEADER_LINE) -> str:
    """Writes a header and lines ("\\n"-terminated) and returns the path."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(header + "\n")
        for text in lines:
            f.write(text + "\n")
    return path


def train_rows(seed: int, count: int) -> List[dict]:
    rng = np.random.default_rng(seed)
    return [random_row(rng, 100_000_000 + i, 1000 + i // 2) for i in range(count)]


def grouped_rows(seed: int, num_queries: int, per_query: int, first_id: int = 103_000_000
                 ) -> List[dict]:
    """valid/test-like rows: `per_query` candidates per query, grouped by query_id."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(num_queries):
        query = " ".join(rng.choice(WORDS, 3))
        for c in range(per_query):
            rows.append(random_row(rng, first_id + q * per_query + c, 5000 + q, query))
    return rows


def answers_for(rows: List[dict], every: int = 3) -> Dict[str, List[int]]:
    """Every `every`-th candidate of each query is an answer."""
    out: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(str(r["query_id"]), [])
        if i % every == 0:
            out[str(r["query_id"])].append(r["product_id"])
    return out


def write_answers(path: str, answers: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(answers, f)
    return path


def read_dir_bytes(root: str, subdirs=("train", "valid", "test")) -> Dict[str, bytes]:
    """{relative path: bytes} of every record file under root/<subdir>."""
    out = {}
    for sub in subdirs:
        directory = os.path.join(root, sub)
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                with open(os.path.join(directory, name), "rb") as f:
                    out[f"{sub}/{name}"] = f.read()
    return out


def dir_files(root: str, skip_temporaries: bool = False) -> Dict[str, bytes]:
    """{path relative to root: bytes} of every file under root.

    Args:
      skip_temporaries: leave out hidden files (a run's temporaries are ".name.tmp-*").
    """
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            if skip_temporaries and name.startswith("."):
                continue
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def temporaries(root: str) -> List[str]:
    """Relative paths of the temporary files (data_prep.shards.tmp_name) under root."""
    return sorted(os.path.relpath(os.path.join(base, name), root)
                  for base, _, names in os.walk(root) for name in names if ".tmp-" in name)


def comparable(files: Dict[str, bytes]) -> Dict[str, bytes]:
    """The entries of dir_files() a resumed prep must reproduce byte for byte: shards,
    sidecars, rejects, vocabulary, word2vec vectors and the manifest (not temporaries, nor
    the gensim model pickle, which every finalize rewrites)."""
    return {k: v for k, v in files.items()
            if not os.path.basename(k).startswith(".") and not k.startswith("word2vec.model")}


def run_prep_killed(argv: Sequence[str], delay_s: float, cwd: str) -> bool:
    """Runs `python -m data_prep.prep ARGV` and SIGKILLs its process group after delay_s.

    Args:
      argv: the prep's arguments.
      delay_s: seconds after the start at which to kill it.
      cwd: the repository root (so that the project imports resolve).
    Returns:
      True when the kill landed before prep finished on its own.
    """
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.prep", *argv], cwd=cwd,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay_s)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def run_prep(argv: Sequence[str], cwd: str) -> float:
    """Runs `python -m data_prep.prep ARGV` to completion; returns its wall seconds.

    Raises:
      RuntimeError: prep failed (its stderr in the message).
    """
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "data_prep.prep", *argv], cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"prep exited {done.returncode}: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def kill_and_resume(argv: Sequence[str], out: str, delays_s: Sequence[float],
                    reference: Dict[str, bytes], cwd: str) -> List[str]:
    """One fault-injection case: prep into `out`, SIGKILLed after each of delays_s in turn
    (each a fresh start that resumes the last), then run to completion.

    Args:
      argv: the prep's arguments (with --out out).
      out: the output directory.
      delays_s: kill moments, seconds after each start.
      reference: comparable(dir_files()) of an uninterrupted run with the same inputs.
      cwd: the repository root.
    Returns:
      What differs from the reference ([] when the resumed output is byte-identical and no
      temporary file is left).
    """
    for delay in delays_s:
        run_prep_killed(argv, delay, cwd)
    run_prep(argv, cwd)
    got = comparable(dir_files(out))
    problems = [f"{name}: differs" for name in sorted(set(got) & set(reference))
                if got[name] != reference[name]]
    problems += [f"{name}: missing" for name in sorted(set(reference) - set(got))]
    problems += [f"{name}: unexpected" for name in sorted(set(got) - set(reference))]
    problems += [f"{name}: temporary left" for name in temporaries(out)]
    return problems


def prep_inputs(directory: str, seed: int, num_train: int = 40, queries: int = 6
                ) -> Dict[str, str]:
    """train/valid(+answers)/test TSVs with a few bad rows, for whole-prep runs.

    Returns:
      {"train", "valid", "answers", "test"}: file paths under directory.
    """
    train = [line(r) for r in train_rows(seed, num_train)]
    train.insert(3, with_field(train[3], "boxes", "@@"))
    valid_rows = grouped_rows(seed + 1, num_queries=queries, per_query=5)
    test_rows = grouped_rows(seed + 2, num_queries=queries, per_query=4, first_id=104_000_000)
    return {
        "train": write_tsv(os.path.join(directory, "train.tsv"), train),
        "valid": write_tsv(os.path.join(directory, "valid.tsv"), [line(r) for r in valid_rows]),
        "answers": write_answers(os.path.join(directory, "valid_answer.json"),
                                 answers_for(valid_rows)),
        "test": write_tsv(os.path.join(directory, "test.tsv"), [line(r) for r in test_rows]),
    }


def prep_argv(inputs: Dict[str, str], out: str, *extra: str) -> List[str]:
    """`mmrecall prep` arguments for prep_inputs(), small shards, no progress bar."""
    return ["--out", out, "--train", inputs["train"], "--valid", inputs["valid"],
            "--valid-answers", inputs["answers"], "--test", inputs["test"],
            "--rows-per-shard", "4", "--embedding-dim", "8", "--no-progress", *extra]


def with_field(text_line: str, column: str, value: str) -> str:
    """A TSV line with one column's text replaced."""
    fields = text_line.split("\t")
    fields[schema.TSV_COLUMNS.index(column)] = value
    return "\t".join(fields)


def malformed_lines(rng: np.random.Generator) -> List[tuple]:
    """[(line, field, reason)] covering every way a row is rejected by parse_row."""
    def good(**kw):
        return random_row(rng, 100_000_001, 77, **kw)

    r = good(num_boxes=2)
    base = line(r)
    b64 = tsv.b64
    nan_features = r["features"].copy()
    nan_features[1, 5] = np.nan
    neg_features = r["features"].copy()
    neg_features[0, 0] = -0.5
    inf_boxes = r["boxes"].copy()
    inf_boxes[0, 1] = np.inf
    outside = r["boxes"].copy()
    outside[1, 2] = r["image_h"] + 5   # tolerance is 4 px
    flat = r["boxes"].copy()
    flat[0, 2] = flat[0, 0]            # top == bottom
    inverted = r["boxes"].copy()
    inverted[1, 1], inverted[1, 3] = inverted[1, 3] + 1, inverted[1, 1]
    return [
        ("\t".join(base.split("\t")[:-1]), "line", "column_count"),
        (base + "\textra", "line", "column_count"),
        ("", "line", "column_count"),
        (with_field(base, "product_id", "12a"), "product_id", "not_integer"),
        (with_field(base, "query_id", "9" * 20), "query_id", "not_integer"),
        (with_field(base, "product_id", "-3"), "product_id", "negative_id"),
        (with_field(base, "image_h", "0"), "image_h", "image_size"),
        (with_field(base, "image_w", "-600"), "image_w", "image_size"),
        (with_field(base, "num_boxes", "0"), "num_boxes", "num_boxes"),
        (with_field(base, "num_boxes", "3"), "boxes", "byte_length"),
        (with_field(base, "boxes", "abc"), "boxes", "base64"),
        (with_field(base, "features", "!!!!" + base.split("\t")[5][4:]), "features", "base64"),
        (with_field(base, "features", b64(r["features"][:1], "<f4")), "features", "byte_length"),
        (with_field(base, "class_labels", b64(r["class_labels"], "<i4")), "class_labels",
         "byte_length"),
        (with_field(base, "features", b64(nan_features, "<f4")), "features", "non_finite"),
        (with_field(base, "features", b64(neg_features, "<f4")), "features", "negative_feature"),
        (with_field(base, "boxes", b64(inf_boxes, "<f4")), "boxes", "non_finite"),
        (with_field(base, "class_labels", b64(np.array([3, 33]), "<i8")), "class_labels",
         "label_range"),
        (with_field(base, "class_labels", b64(np.array([-1, 3]), "<i8")), "class_labels",
         "label_range"),
        (with_field(base, "boxes", b64(outside, "<f4")), "boxes", "box_outside"),
        (with_field(base, "boxes", b64(flat, "<f4")), "boxes", "box_order"),
        (with_field(base, "boxes", b64(inverted, "<f4")), "boxes", "box_order"),
    ]
