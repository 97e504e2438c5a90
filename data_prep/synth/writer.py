"""Writing the six files of a generated data set, streaming and atomically."""
import contextlib
import json
import os
import tempfile
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from data_prep.synth.config import SynthConfig
from data_prep.synth.plan import CandidateList, plan_eval, plan_train
from data_prep.synth.render import Prototypes, render_photos
from data_prep.synth.world import CLASS_NAMES, Product, Query
from data_prep.tsv import HEADER_LINE, encode_row

TRAIN_FILE = "train.tsv"
VALID_FILE = "valid.tsv"
VALID_ANSWER_FILE = "valid_answer.json"
TEST_FILE = "testB.tsv"
# The test lists' answers, as valid_answer.json: the competition kept them secret; a
# generated set has them so that a run can measure on lists never used for fitting.
TEST_ANSWER_FILE = "testB_answer.json"
LABELS_FILE = "multimodal_labels.txt"
LABELS_HEADER = "category_id\tcategory_name"


@contextlib.contextmanager
def _atomic_output(path: str):
    """Opens a temp file beside `path` for writing; renames it to `path` on success."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600; give the usual mode
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_tsv(path: str, rows: Iterable[Tuple[Query, Product]], protos: Prototypes,
              cfg: SynthConfig, max_boxes: int) -> int:
    """Streams (query, product) rows to a competition TSV at `path`; returns the row count."""
    count = 0
    with _atomic_output(path) as f:
        f.write(HEADER_LINE + "\n")
        for batch in _batches(rows, cfg.batch_rows):
            photos = render_photos(protos, [p for _, p in batch], cfg.seed, max_boxes,
                                   cfg.noise, boxes_mean=cfg.boxes_mean, shown=cfg.shown)
            lines = [encode_row(product.product_id, photo.image_h, photo.image_w,
                                photo.boxes, photo.features, photo.labels, query.text,
                                query.query_id)
                     for (query, product), photo in zip(batch, photos)]
            f.write("\n".join(lines) + "\n")
            count += len(batch)
    return count


def write_labels(path: str) -> None:
    """Writes multimodal_labels.txt: a header line, then `id<TAB>name` for the 33 classes."""
    with _atomic_output(path) as f:
        f.write(LABELS_HEADER + "\n")
        f.writelines(f"{i}\t{name}\n" for i, name in enumerate(CLASS_NAMES))


def _eval_rows(lists: Iterable[CandidateList],
               answers: Optional[Dict[str, List[int]]]) -> Iterator[Tuple[Query, Product]]:
    for cl in lists:
        if answers is not None:
            answers[str(cl.query.query_id)] = cl.answers
        for product in cl.products:
            yield cl.query, product


def generate(cfg: SynthConfig) -> Dict[str, int]:
    """Writes all six files into cfg.out_dir; returns rows written per TSV file."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    protos = Prototypes(cfg.seed)
    write_labels(os.path.join(cfg.out_dir, LABELS_FILE))
    counts = {TRAIN_FILE: write_tsv(os.path.join(cfg.out_dir, TRAIN_FILE), plan_train(cfg),
                                    protos, cfg, cfg.max_boxes_train)}
    lists = plan_eval(cfg)
    valid = (cl for split, cl in _take(lists, cfg.valid_queries))
    answers: Dict[str, List[int]] = {}
    counts[VALID_FILE] = write_tsv(os.path.join(cfg.out_dir, VALID_FILE),
                                   _eval_rows(valid, answers), protos, cfg, cfg.max_boxes_eval)
    with _atomic_output(os.path.join(cfg.out_dir, VALID_ANSWER_FILE)) as f:
        json.dump(answers, f)
    test = (cl for split, cl in _take(lists, cfg.test_queries))
    test_answers: Dict[str, List[int]] = {}
    counts[TEST_FILE] = write_tsv(os.path.join(cfg.out_dir, TEST_FILE),
                                  _eval_rows(test, test_answers), protos, cfg,
                                  cfg.max_boxes_eval)
    with _atomic_output(os.path.join(cfg.out_dir, TEST_ANSWER_FILE)) as f:
        json.dump(test_answers, f)
    return counts


def _take(items: Iterator, n: int) -> Iterator:
    for _ in range(n):
        yield next(items)

