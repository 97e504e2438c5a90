"""A checkpoint's Ranker run over a split outside the Estimator, for figures and pictures.

`CheckpointRunner` builds the Ranker in a graph and session of its own once, then restores
any checkpoint of the same Config and runs it over a dataset of (features, labels) batches:
row-aligned scores, both towers' pooled embeddings and ids (and, on request, the matcher's
word-to-region attention and the query text). The export's list stage (export.list_fit)
scores the whole valid split with `run_checkpoint`, one runner used once.

`first_queries` is the dataset of a split's first whole queries in file order, bounded by
a number of queries and / or a number of projector points (each query and each of its rows
is one point), so the pictures (estimator.pictures) and the Embedding Projector
(estimator.projector) cost a bounded pass whatever the size of the split. `Prober` (for
many checkpoints) and `probe` (once) run it and add what the figures are labelled with.

Dimension legend: R rows (query, candidate) pairs, T tokens, N boxes, E pooled width.
"""
import functools
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from data_prep import schema, vocab
from data_prep.manifest import PrepDir
from estimator import input_fn as input_lib
from estimator import network, outputs
from estimator.config import Config

AREA = schema.GEOMETRY_FIELDS.index("area_rel")
QUERY_TEXT = "query_text"
WORD_TO_REGION = "word_to_region"


def checkpoint_removed(checkpoint: str) -> bool:
    """True when the checkpoint prefix's index file is gone: the chief keeps only its
    `keep_checkpoint_max` newest checkpoints, so one evaluated a while ago may have been
    removed by the time an exporter restores it."""
    return not tf.io.gfile.exists(checkpoint + ".index")


def unless_removed(run: Callable[[], object], checkpoint: str, what: str):
    """run()'s result; None, with a warning naming `what` and the checkpoint, when run()
    fails because the chief removed the checkpoint meanwhile (checkpoint_removed), so an
    evaluator's exporter does not kill the evaluator. Any other failure is raised."""
    try:
        return run()
    except (ValueError, tf.errors.NotFoundError):
        if not checkpoint_removed(checkpoint):
            raise
        tf.compat.v1.logging.warning(
            "%s: %s was removed by the chief before it could be used; skipped (raise "
            "keep_checkpoint_max or evaluate more often to keep it)", what, checkpoint)
        return None


class CheckpointRunner:
    """The Ranker in a graph and session of its own, built once, then restored from any
    checkpoint of the same Config and run (inference mode) over one of its datasets.

    Args:
      cfg: the resolved training Config; vocab_size: V.
      dataset_fns: {name: () -> a finite dataset of (features, labels) with schema.F_*
        features and labels float32 [B], or of ((features, labels), query text string
        [B])}; called inside the runner's graph; all of one element structure.
      with_attention: also fetch the matcher's word-to-region attention (no-op for a
        towers-only model).
    Use as a context manager, or call close().
    """

    def __init__(self, cfg: Config, vocab_size: int,
                 dataset_fns: Dict[str, Callable[[], tf.data.Dataset]],
                 with_attention: bool = False):
        self._graph = tf.Graph()
        with self._graph.as_default():
            ranker = network.build_ranker(cfg, vocab_size)
            datasets = {name: fn() for name, fn in dataset_fns.items()}
            first = next(iter(datasets.values()))
            iterator = tf.compat.v1.data.Iterator.from_structure(
                tf.compat.v1.data.get_output_types(first),
                tf.compat.v1.data.get_output_shapes(first))
            self._inits = {name: iterator.make_initializer(ds) for name, ds in datasets.items()}
            self._fetches = _fetches(ranker, iterator.get_next(), with_attention)
            self._saver = tf.compat.v1.train.Saver(var_list=ranker.variable_map())
            tables = tf.compat.v1.tables_initializer()
        # Threads of its own: in a training process the shared inter-op pool can be held by
        # the paused training input pipeline, which stalled this session's runs for seconds.
        self._sess = tf.compat.v1.Session(graph=self._graph, config=tf.compat.v1.ConfigProto(
            use_per_session_threads=True))
        self._sess.run(tables)

    def run(self, checkpoint: str, dataset: str,
            source: str = "the dataset") -> Dict[str, np.ndarray]:
        """Every row of the named dataset through the checkpoint's Ranker.

        Args:
          checkpoint: a checkpoint prefix holding the Ranker's variables.
          dataset: a name of `dataset_fns`.
          source: what the dataset is, for the error message.
        Returns:
          {key: numpy [R, ...]}: "query_id", "product_id" int64 [R]; "label" float32 [R];
          outputs.SCORE, outputs.CROSS_LOGIT, outputs.TOWER_SCORE float32 [R] (the
          served score and its two parts); outputs.QUERY_EMBEDDING, outputs.PRODUCT_EMBEDDING
          float32 [R, E]; F_TOKEN_IDS [R, T], F_NUM_TOKENS [R], F_BOX_LABELS [R, N],
          F_NUM_BOXES [R], "box_area" float32 [R, N] (relative area, 0 past a row's
          boxes); QUERY_TEXT bytes [R] when the dataset has it; WORD_TO_REGION float32
          [R, T, N] when asked for. T and N are the largest over the batches (zero
          padding).
        Raises:
          ValueError: the dataset is empty ("<source> has no rows").
        """
        batches = []
        with self._graph.as_default():
            self._saver.restore(self._sess, checkpoint)
            self._sess.run(self._inits[dataset])
            while True:
                try:
                    batches.append(self._sess.run(self._fetches))
                except tf.errors.OutOfRangeError:
                    break
        if not batches:
            raise ValueError(f"{source} has no rows")
        return {k: _concat_padded([b[k] for b in batches]) for k in self._fetches}

    def close(self) -> None:
        self._sess.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fetches(ranker: network.Ranker, element, with_attention: bool) -> Dict[str, tf.Tensor]:
    """The tensors CheckpointRunner.run fetches, for a dataset element."""
    query_text = None
    if isinstance(element[0], tuple):
        (features, labels), query_text = element
    else:
        features, labels = element
    num_tokens, num_boxes = features[schema.F_NUM_TOKENS], features[schema.F_NUM_BOXES]
    q_states, q_pooled = ranker.encode_query(features[schema.F_TOKEN_IDS], num_tokens,
                                             training=False)
    p_states, p_pooled = ranker.encode_product(
        features[schema.F_BOX_FEATURES], features[schema.F_BOX_GEOMETRY],
        features[schema.F_BOX_LABELS], num_boxes, training=False)
    out = ranker.score_pairs(q_states, num_tokens, q_pooled, p_states, num_boxes, p_pooled,
                             training=False)
    fetches = {"query_id": features[schema.F_QUERY_ID],
               "product_id": features[schema.F_PRODUCT_ID], "label": labels,
               outputs.SCORE: tf.cast(out[outputs.SCORE], tf.float32),
               outputs.CROSS_LOGIT: tf.cast(out[outputs.CROSS_LOGIT], tf.float32),
               outputs.TOWER_SCORE: tf.cast(out[outputs.TOWER_SCORE], tf.float32),
               outputs.QUERY_EMBEDDING: tf.cast(q_pooled, tf.float32),
               outputs.PRODUCT_EMBEDDING: tf.cast(p_pooled, tf.float32)}
    for key in (schema.F_TOKEN_IDS, schema.F_NUM_TOKENS, schema.F_BOX_LABELS,
                schema.F_NUM_BOXES):
        fetches[key] = features[key]
    fetches["box_area"] = features[schema.F_BOX_GEOMETRY][:, :, AREA]          # [B, N]
    if query_text is not None:
        fetches[QUERY_TEXT] = query_text
    if with_attention and ranker.matcher is not None:
        fetches[WORD_TO_REGION] = ranker.matcher.last_word_to_region          # [B, T, N]
    return fetches


def run_checkpoint(cfg: Config, vocab_size: int, checkpoint: str,
                   dataset_fn: Callable[[], tf.data.Dataset], with_attention: bool = False,
                   source: str = "the dataset") -> Dict[str, np.ndarray]:
    """One CheckpointRunner.run over `dataset_fn`'s dataset (see CheckpointRunner)."""
    with CheckpointRunner(cfg, vocab_size, {"data": dataset_fn}, with_attention) as runner:
        return runner.run(checkpoint, "data", source)


def _concat_padded(arrays: List[np.ndarray]) -> np.ndarray:
    """Concatenates along axis 0, zero-padding the other axes to the largest size."""
    shape = np.max([a.shape for a in arrays], axis=0)
    padded = [np.pad(a, [(0, 0)] + [(0, s - d) for s, d in zip(shape[1:], a.shape[1:])])
              for a in arrays]
    return np.concatenate(padded)


def first_queries(cfg: Config, prep: PrepDir, split: str, max_queries: Optional[int] = None,
                  max_points: Optional[int] = None) -> tf.data.Dataset:
    """The split's first whole queries, in file order, as ((features, labels), query text).

    Args:
      cfg: a resolved Config (token and box caps, eval_queries_per_batch).
      prep: the prep; split: a split with labels.
      max_queries: at most this many queries (None: no bound).
      max_points: only the queries that, counting one point per query and one per row,
        fit in this many points altogether (None: no bound).
    Returns:
      A dataset of batches of eval_queries_per_batch whole queries; features as the
      input_fn's (schema.F_*), labels float32 [B], query text string [B].
    """
    tokens = prep.vocab_tokens()
    compression = prep.compression

    def read(path):
        return input_lib.whole_queries(
            tf.data.TFRecordDataset(path, compression_type=compression))

    ds = tf.data.Dataset.from_tensor_slices(prep.split_files(split)).flat_map(read)
    if max_queries is not None:
        ds = ds.take(max_queries)
    if max_points is not None:
        def count(used, rows):                                   # rows: string [rows]
            used += tf.cast(tf.size(rows), tf.int64) + 1
            return used, (rows, used)

        def fits(rows, used):
            del rows
            return used <= max_points

        def drop_count(rows, used):
            del used
            return rows

        ds = ds.scan(tf.constant(0, tf.int64), count).take_while(fits).map(drop_count)
    ds = ds.ragged_batch(max(1, cfg.eval_queries_per_batch)).map(lambda r: r.flat_values)
    table = vocab.lookup_table(tokens)

    def parse(serialized):
        text = tf.io.parse_example(
            serialized, {schema.QUERY: tf.io.FixedLenFeature([], tf.string)})[schema.QUERY]
        return input_lib.parse_batch(serialized, table, cfg.max_query_tokens,
                                     cfg.max_boxes), text

    return ds.map(parse)


class Probe(NamedTuple):
    """The rows of a split's first queries as the model sees and scores them.

    query_ids, product_ids int64 [R]; query_text list of R str; tokens list of R lists of
    str (the vocabulary entries the model reads, truncated at the token cap); box_labels
    list of R int arrays [n_r] (the boxes the model reads, after the box cap); main_class
    int64 [R] (the class of the row's largest box by area, -1 without boxes); labels int64
    [R] {0, 1}; scores float32 [R] (serving score); query_embeddings,
    product_embeddings float32 [R, E] (L2-normalised); word_to_region list of R float32
    [t_r, n_r] (mean over rounds and heads) or None for a towers-only model.
    """
    query_ids: np.ndarray
    product_ids: np.ndarray
    query_text: List[str]
    tokens: List[List[str]]
    box_labels: List[np.ndarray]
    main_class: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    query_embeddings: np.ndarray
    product_embeddings: np.ndarray
    word_to_region: Optional[List[np.ndarray]]


class Prober:
    """Probes of one model's checkpoints over a split's first queries, under named bounds;
    the graph is built once (CheckpointRunner).

    Args:
      cfg: the resolved training Config; prep: the prep; split: a split with labels.
      bounds: {name: (max_queries, max_points)} (see first_queries).
    """

    def __init__(self, cfg: Config, prep: PrepDir, bounds: Dict[str, Tuple[Optional[int],
                                                                          Optional[int]]],
                 split: str = "valid"):
        self._vocab = prep.vocab_tokens()
        self._source = {name: f"{prep.path}: the first queries of the {split} split (at most "
                              f"{q} queries, {p} points)" for name, (q, p) in bounds.items()}
        self._runner = CheckpointRunner(
            cfg, len(self._vocab),
            {name: functools.partial(first_queries, cfg, prep, split, q, p)
             for name, (q, p) in bounds.items()}, with_attention=True)

    def probe(self, checkpoint: str, bound: str) -> Probe:
        """The Probe of `checkpoint` under the named bound.

        Raises:
          ValueError: no query fits the bound (or the split is empty).
        """
        return _probe_of(self._runner.run(checkpoint, bound, self._source[bound]),
                         self._vocab)

    def close(self) -> None:
        self._runner.close()


def probe(cfg: Config, prep: PrepDir, checkpoint: str, split: str = "valid",
          max_queries: Optional[int] = None, max_points: Optional[int] = None) -> Probe:
    """Runs the checkpoint once over the split's first queries (see `first_queries`).

    Raises:
      ValueError: no query fits the bounds (or the split is empty).
    """
    prober = Prober(cfg, prep, {"once": (max_queries, max_points)}, split)
    try:
        return prober.probe(checkpoint, "once")
    finally:
        prober.close()


def _probe_of(rows: Dict[str, np.ndarray], vocab_tokens: List[str]) -> Probe:
    """CheckpointRunner.run's rows as a Probe."""
    num_tokens, num_boxes = rows[schema.F_NUM_TOKENS], rows[schema.F_NUM_BOXES]
    tokens = [[vocab_tokens[i] for i in ids[:t]]
              for ids, t in zip(rows[schema.F_TOKEN_IDS], num_tokens)]
    box_labels = [labels[:n] for labels, n in zip(rows[schema.F_BOX_LABELS], num_boxes)]
    largest = np.argmax(rows["box_area"], axis=1)                                # [R]
    main_class = np.where(num_boxes > 0,
                          rows[schema.F_BOX_LABELS][np.arange(len(largest)), largest], -1)
    attention = rows.get(WORD_TO_REGION)
    return Probe(
        query_ids=rows["query_id"].astype(np.int64),
        product_ids=rows["product_id"].astype(np.int64),
        query_text=[t.decode("utf-8") for t in rows[QUERY_TEXT]],
        tokens=tokens, box_labels=box_labels, main_class=main_class.astype(np.int64),
        labels=(rows["label"] > 0.5).astype(np.int64), scores=rows[outputs.SCORE],
        query_embeddings=rows[outputs.QUERY_EMBEDDING],
        product_embeddings=rows[outputs.PRODUCT_EMBEDDING],
        word_to_region=None if attention is None else [
            a[:t, :n] for a, t, n in zip(attention, num_tokens, num_boxes)])
