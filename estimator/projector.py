"""The Embedding Projector's files: queries and their candidates in the towers' space.

`write_projector(model_dir, probe)` writes MODEL_DIR/projector/ (a TensorBoard run, so
`tensorboard --logdir MODEL_DIR` shows it under Projector):
  projector_config.pbtxt  one embedding, TENSOR_NAME, and its metadata file;
  embeddings.ckpt*, checkpoint
                          a checkpoint holding only TENSOR_NAME, float32 [P, E]: each
                          query's pooled embedding once, then the pooled product embedding
                          of each of its candidate rows (a checkpoint here also stops the
                          plugin from offering every variable of MODEL_DIR's checkpoints,
                          which it looks for one directory up);
  metadata.tsv            a header and one line per point: point (query / answer /
                          non-answer), query text, query id, product id, main class label
                          (the class of the product's largest box);
  events.out.tfevents.*   a text summary `projector/about` saying what the points are (the
                          projector plugin only looks in directories that hold events).
The probe bounds the points: at most MAX_POINTS, whole queries from the start of the valid
split (estimator.probe.first_queries). The directory is built under a temporary name and
replaces the previous one when complete; a rewrite removes what a killed one left.

Dimension legend: Q queries, R candidate rows, P = Q + R points, E pooled width.
"""
import glob
import os
import shutil
import time
from typing import List

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins import projector
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from data_prep import schema
from estimator.probe import Probe

SUBDIR = "projector"
# Enough points for clusters of ~100 queries with ~30 candidates each; t-SNE and UMAP in the
# browser stay interactive at this size.
MAX_POINTS = 4000
TENSOR_NAME = "valid/queries_and_products"
CHECKPOINT = "embeddings.ckpt"
METADATA_FILE = "metadata.tsv"
COLUMNS = ("point", "query", "query_id", "product_id", "class")


def class_name(class_id: int) -> str:
    """The competition's name of a box class id ("" for -1, no box)."""
    if class_id < 0:
        return ""
    names = schema.CLASS_NAMES
    return names[class_id] if class_id < len(names) else f"class {class_id}"


def _cell(text: str) -> str:
    return " ".join(str(text).split())        # no tabs or newlines inside a TSV cell


def points(probe: Probe):
    """(embeddings float32 [P, E], metadata rows [P] of len(COLUMNS) strings): each query
    (first row of its query id) then its candidate rows, in the probe's order."""
    vectors: List[np.ndarray] = []
    rows: List[List[str]] = []
    seen = set()
    for r, qid in enumerate(probe.query_ids.tolist()):
        text = _cell(probe.query_text[r])
        if qid not in seen:
            seen.add(qid)
            vectors.append(probe.query_embeddings[r])
            rows.append(["query", text, str(qid), "", ""])
        vectors.append(probe.product_embeddings[r])
        rows.append(["answer" if probe.labels[r] else "non-answer", text, str(qid),
                     str(int(probe.product_ids[r])), _cell(class_name(int(probe.main_class[r])))])
    return np.asarray(vectors, np.float32), rows


def _save_tensor(directory: str, vectors: np.ndarray) -> None:
    """Saves `vectors` as the checkpoint's only variable, TENSOR_NAME; the checkpoint state
    file names it relative to `directory`, which is renamed after."""
    with tf.Graph().as_default():
        variable = tf.compat.v1.Variable(vectors, name=TENSOR_NAME)
        saver = tf.compat.v1.train.Saver([variable])
        with tf.compat.v1.Session() as sess:
            sess.run(variable.initializer)
            saver.save(sess, os.path.join(directory, CHECKPOINT), write_state=False)
    tf.compat.v1.train.update_checkpoint_state(directory, CHECKPOINT)


def write_projector(model_dir: str, probe: Probe, step: int = 0) -> str:
    """Writes MODEL_DIR/projector/ from the probe; returns its path.

    Args:
      model_dir: the Estimator's model directory.
      probe: the valid split's first queries (estimator.probe.probe with max_points).
      step: the global step of the checkpoint the probe ran (filed with the text summary).
    """
    final = os.path.join(model_dir, SUBDIR)
    for stale in glob.glob(f"{final}.tmp-*") + glob.glob(f"{final}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)          # left by a killed run
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        vectors, rows = points(probe)
        _save_tensor(tmp, vectors)
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            f.write("\t".join(COLUMNS) + "\n")
            f.writelines("\t".join(row) + "\n" for row in rows)
        config = projector.ProjectorConfig()
        embedding = config.embeddings.add()
        embedding.tensor_name = TENSOR_NAME
        embedding.metadata_path = METADATA_FILE
        projector.visualize_embeddings(tmp, config)
        queries = sum(row[0] == "query" for row in rows)
        about = (f"{len(rows)} points of checkpoint step {step}: {queries} valid queries (the "
                 f"first in file order, whole lists, at most {MAX_POINTS} points) and their "
                 f"{len(rows) - queries} candidate rows, in the towers' pooled space. Colour "
                 f"by `point` (query / answer / non-answer); search by `query_id`.")
        writer = EventFileWriter(tmp, filename_suffix=".projector")
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                         summary=text_summary.text_pb("projector/about", about)))
        writer.close()
        old = f"{final}.old-{os.getpid()}"
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
