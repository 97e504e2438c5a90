"""What the model does, as pictures: attention heat maps and top-5 lists of fixed queries.

After each evaluation, `PicturesExporter` runs the evaluated checkpoint over the first
QUERIES valid queries (estimator.probe) and writes to MODEL_DIR/pictures/ (a TensorBoard
run), at the checkpoint's step, per query i:
  Images  `attention/query_<i>`: the matcher's word-to-region attention (mean over rounds
          and heads) of the query's HEATMAP_CANDIDATES best-scored candidates, one image
          each: a row per query token, a column per box (in the boxes' stored order), a
          brighter cell for more attention (0 dark to the image's largest weight bright).
          Drawn with numpy (matplotlib is not a dependency), so the axes' labels (tokens,
          box class labels) are in the card's description and in the text below.
  Text    `attention/query_<i>`: the same weights as one table per candidate, rows
          labelled with the tokens, columns with the boxes' class labels.
          `top5/query_<i>`: the query's five best candidates (score, main class) with a
          hit / miss mark each, and how many of its answers made the top five.
After the final evaluation it also writes the Embedding Projector (estimator.projector)
from one bounded pass that covers the pictures' queries as well.

Dimension legend: T tokens, N boxes.
"""
import os
import time
from typing import List, Sequence

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import summary as image_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from data_prep import schema
from data_prep.manifest import PrepDir
from estimator import probe as probe_lib
from estimator import projector
from estimator.config import Config

SUBDIR = "pictures"
QUERIES = 3                 # the fixed queries: the valid split's first, in file order
HEATMAP_CANDIDATES = 3      # heat maps per query: its best-scored candidates
CELL = 24                   # pixels per (token, box) cell, a 1-pixel gap included
# Viridis anchors, dark (no attention) to bright (the map's largest weight).
_COLOURS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                     [253, 231, 37]], np.float32)
_GAP = 255                  # white gaps between cells and around smaller maps


def heatmap(weights: np.ndarray, cell: int = CELL) -> np.ndarray:
    """A [t, n] weight matrix as an RGB image.

    Args:
      weights: float [t, n] >= 0 (t, n >= 1).
      cell: pixels per cell side, of which the last row and column are a white gap.
    Returns:
      uint8 [t * cell, n * cell, 3]; each cell is one colour, scaled from 0 (dark) to
      the matrix's largest weight (bright).
    """
    weights = np.asarray(weights, np.float32)
    top = float(weights.max()) if weights.size else 0.0
    level = weights / top if top > 0 else np.zeros_like(weights)         # [t, n] in [0, 1]
    anchors = np.linspace(0.0, 1.0, len(_COLOURS))
    rgb = np.stack([np.interp(level, anchors, _COLOURS[:, c]) for c in range(3)], -1)
    image = np.repeat(np.repeat(rgb, cell, 0), cell, 1).astype(np.uint8)  # [t*cell, n*cell, 3]
    image[cell - 1::cell, :, :] = _GAP
    image[:, cell - 1::cell, :] = _GAP
    return image


def _pad_to(images: Sequence[np.ndarray]) -> np.ndarray:
    """Images of different sizes as one uint8 [k, H, W, 3] batch, padded white."""
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    return np.stack([np.pad(i, [(0, h - i.shape[0]), (0, w - i.shape[1]), (0, 0)],
                            constant_values=_GAP) for i in images])


def query_rows(probe: probe_lib.Probe) -> List[np.ndarray]:
    """Per query (in order of first appearance): its rows, one per distinct product,
    best serving score first (ties keep the stored order)."""
    lists = {}
    for r, qid in enumerate(probe.query_ids.tolist()):
        lists.setdefault(qid, []).append(r)
    out = []
    for rows in lists.values():
        rows = np.asarray(rows)[np.argsort(-probe.scores[rows], kind="stable")]
        _, first = np.unique(probe.product_ids[rows], return_index=True)
        out.append(rows[np.sort(first)])
    return out


def top_candidates_markdown(probe: probe_lib.Probe, rows: np.ndarray,
                            k: int = schema.NDCG_K) -> str:
    """A markdown table of the list's k best rows with hit / miss marks.

    Args:
      probe: the probe; rows: one query's rows, best first (query_rows).
      k: rows shown.
    """
    r0 = rows[0]
    answers = int(probe.labels[rows].sum())
    hits = int(probe.labels[rows[:k]].sum())
    lines = [f"**{probe.query_text[r0]}** (query {probe.query_ids[r0]}): {hits} of its "
             f"{answers} answers in the top {k}, {len(rows)} candidates", "",
             "| rank | product | main class | score | answer? |", "|---|---|---|---|---|"]
    for rank, r in enumerate(rows[:k], 1):
        mark = "**hit**" if probe.labels[r] else "miss"
        lines.append(f"| {rank} | {probe.product_ids[r]} | "
                     f"{projector.class_name(int(probe.main_class[r]))} | "
                     f"{probe.scores[r]:.3f} | {mark} |")
    return "\n".join(lines)


def _box_label(class_id: int) -> str:
    return f"{class_id} {projector.class_name(class_id)}"


def attention_markdown(probe: probe_lib.Probe, rows: np.ndarray) -> str:
    """One markdown table per row: word-to-region weights, tokens x box class labels."""
    parts = [f"**{probe.query_text[rows[0]]}**: rows are the query's tokens, columns its "
             f"candidates' boxes (class id and label); each row sums to 1."]
    for rank, r in enumerate(rows, 1):
        weights = probe.word_to_region[r]                                  # [t, n]
        mark = "answer" if probe.labels[r] else "non-answer"
        parts += ["", f"candidate {rank}: product {probe.product_ids[r]} ({mark}, score "
                  f"{probe.scores[r]:.3f})", "",
                  "| token | " + " | ".join(_box_label(int(c)) for c in probe.box_labels[r])
                  + " |", "|---" * (weights.shape[1] + 1) + "|"]
        for token, line in zip(probe.tokens[r], weights):
            parts.append(f"| {token} | " + " | ".join(f"{w:.2f}" for w in line) + " |")
    return "\n".join(parts)


def axes_markdown(probe: probe_lib.Probe, rows: np.ndarray) -> str:
    """The heat maps' axis labels: the tokens (rows), then each image's boxes (columns)."""
    lines = [f"rows (tokens): {', '.join(probe.tokens[rows[0]])}"]
    for i, r in enumerate(rows, 1):
        lines.append(f"- image {i}, product {probe.product_ids[r]} "
                     f"({'answer' if probe.labels[r] else 'non-answer'}): columns (boxes) "
                     + ", ".join(_box_label(int(c)) for c in probe.box_labels[r]))
    return "\n".join(lines)


def summaries(probe: probe_lib.Probe, queries: int = QUERIES) -> List[summary_pb2.Summary]:
    """The image and text summaries of the probe's first `queries` queries."""
    out = []
    for i, rows in enumerate(query_rows(probe)[:queries]):
        out.append(text_summary.text_pb(f"top5/query_{i}", top_candidates_markdown(probe, rows),
                                        description="the query's best candidates"))
        shown = [r for r in rows[:HEATMAP_CANDIDATES] if probe.word_to_region is not None
                 and probe.word_to_region[r].size]
        if not shown:                  # a towers-only model, or a query without tokens
            continue
        shown = np.asarray(shown)
        legacy = image_summary.pb(
            f"attention/query_{i}", _pad_to([heatmap(probe.word_to_region[r]) for r in shown]),
            max_outputs=len(shown), description=axes_markdown(probe, shown))
        out.append(summary_pb2.Summary.FromString(legacy.SerializeToString()))
        out.append(text_summary.text_pb(f"attention/query_{i}",
                                        attention_markdown(probe, shown),
                                        description="word-to-region attention"))
    return out


def write_pictures(run_dir: str, probe: probe_lib.Probe, step: int,
                   queries: int = QUERIES) -> str:
    """Appends the summaries of `summaries` at `step` in a new event file in run_dir;
    returns its path."""
    os.makedirs(run_dir, exist_ok=True)
    writer = EventFileWriter(run_dir, filename_suffix=".pictures")
    now = time.time()
    for summary in summaries(probe, queries):
        writer.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary))
    writer.close()
    return writer._file_name  # pylint: disable=protected-access  (no public accessor)


class PicturesExporter(tf.estimator.Exporter):
    """An Exporter (called after each evaluation) that writes the pictures of the evaluated
    checkpoint, and after the final evaluation the Embedding Projector too; exports no
    model. Its probe graph is built at the first call and kept, so later calls only
    restore the checkpoint and run the queries.

    Args:
      prep: the prep the model trains on (its valid split is pictured).
      queries: the fixed queries pictured.
      projector_points: the projector's bound on points.
    """

    def __init__(self, prep: PrepDir, queries: int = QUERIES,
                 projector_points: int = projector.MAX_POINTS):
        self._prep = prep
        self._queries = queries
        self._points = projector_points
        self._prober = None

    @property
    def name(self):
        return SUBDIR

    def export(self, estimator, export_path, checkpoint_path, eval_result,
               is_the_final_export):
        del export_path
        model_dir = estimator.model_dir
        if self._prober is None:
            self._prober = probe_lib.Prober(
                Config.load(model_dir), self._prep,
                {SUBDIR: (self._queries, None), projector.SUBDIR: (None, self._points)})
        step = int(eval_result.get("global_step", 0))
        probe_lib.unless_removed(
            lambda: self._export(model_dir, checkpoint_path, step, is_the_final_export),
            checkpoint_path, "PicturesExporter")
        return None

    def _export(self, model_dir, checkpoint_path, step, is_the_final_export):
        if is_the_final_export:
            # One pass for both: the projector's queries start with the pictures' ones.
            probe = self._prober.probe(checkpoint_path, projector.SUBDIR)
            projector.write_projector(model_dir, probe, step)
            self._prober.close()
            self._prober = None
        else:
            probe = self._prober.probe(checkpoint_path, SUBDIR)
        write_pictures(os.path.join(model_dir, SUBDIR), probe, step, self._queries)
        return None
