"""tf.data input pipelines over `mmrecall prep` TFRecord shards.

TRAIN: shuffled file list -> parallel interleaved reads -> repeat -> shuffle buffer ->
(optionally) runs of `train_group_size` rows sharing the query's last lemma, regrouped within
windows of `group_window` rows, and with `batch_by_boxes` each window's batches made of rows
of similar kept box counts (less padding) -> batch (drop remainder) -> parse the whole batch
at once in parallel -> prefetch.

EVAL / PREDICT: each file is read in order (rows of one query are contiguous and never split
across shards) and cut into whole queries with a `scan`; files are still read in parallel
(interleave over files, deterministic), and `eval_queries_per_batch` whole queries make one
batch, so every batch holds all candidates of its queries and ranking metrics are exact.

Parsing (`parse_batch`) is shared by both: `tf.io.parse_example` with the schema spec,
lemmas truncated to `max_query_tokens` and mapped to ids with the same in-graph table the
export uses (`data_prep.vocab.lookup_table`), region features decoded with
`tf.io.decode_raw`. Box cap: a product with more than `max_boxes` boxes keeps its
`max_boxes` largest by pixel area, in their original order (ties keep the earlier box), the
rule of prep's own cap and of the serving graph (data_prep.geometry.largest_box_indices).
Boxes are padded to the batch's largest kept count, tokens to the batch's longest query.
Counts go in F_NUM_TOKENS / F_NUM_BOXES.

The vocabulary, the compression and the shard list come from a data_prep.manifest.PrepDir;
the caps from a Config resolved against it (estimator.train.resolve_config).

Dimension legend: B batch, T tokens (<= max_query_tokens), N boxes kept (<= max_boxes),
M boxes of the records (prep's, before the max_boxes cap), F 2048, G 6.
"""
import glob
from typing import List, Sequence, Union

import tensorflow as tf

from data_prep import schema, vocab
from data_prep.manifest import PrepDir

TRAIN = tf.estimator.ModeKeys.TRAIN
EVAL = tf.estimator.ModeKeys.EVAL
PREDICT = tf.estimator.ModeKeys.PREDICT


def _resolve_files(files: Union[str, Sequence[str]]) -> List[str]:
    """A list of paths from a list (kept in order) or a glob pattern (sorted matches)."""
    resolved = sorted(glob.glob(files)) if isinstance(files, str) else list(files)
    if not resolved:
        raise ValueError(f"no input files match {files!r}")
    return resolved


# ---------------------------------------------------------------------------------------
def _dims(*sizes):
    # A dense shape for RaggedTensor.to_tensor (-1 = keep); pads and truncates to it.
    return tf.stack([tf.cast(s, tf.int64) for s in sizes])


def largest_boxes(boxes, num_boxes, max_boxes):
    """Which boxes the cap keeps: each row's `max_boxes` largest by pixel area, in order.

    The in-graph twin of data_prep.geometry.largest_box_indices (area in float64, ties keep
    the earlier box).

    Args:
      boxes: float32 [B, M, 4] pixel top, left, bottom, right (rows padded to M boxes).
      num_boxes: int32 [B] real boxes per row (<= M).
      max_boxes: python int, the cap.
    Returns:
      (index int32 [B, N] increasing indices into each row's boxes, 0 past the row's kept
      count; kept int32 [B] = min(num_boxes, max_boxes)), N = max(max(kept), 1).
    """
    b64 = tf.cast(boxes, tf.float64)
    area = (b64[:, :, 2] - b64[:, :, 0]) * (b64[:, :, 3] - b64[:, :, 1])    # [B, M]
    real = tf.sequence_mask(num_boxes, tf.shape(boxes)[1])                  # [B, M]
    area = tf.where(real, area, tf.fill(tf.shape(area), tf.constant(-float("inf"), tf.float64)))
    by_area = tf.argsort(-area, axis=1, stable=True)                        # [B, M]
    kept = tf.minimum(num_boxes, max_boxes)                                 # [B]
    n = tf.maximum(tf.reduce_max(kept), 1)
    kept_mask = tf.sequence_mask(kept, n)                                   # [B, N]
    m = tf.shape(boxes)[1]
    index = tf.sort(tf.where(kept_mask, by_area[:, :n], m), axis=1)         # kept first
    return tf.where(kept_mask, index, 0), kept


def parse_batch(serialized, table, max_query_tokens: int, max_boxes: int, with_labels=True):
    """Parses a batch of serialized tf.Examples into model features (and labels).

    Args:
      serialized: string [B].
      table: token -> id lookup table (vocab.lookup_table).
      max_query_tokens: T cap; max_boxes: N cap (the largest boxes by area are kept).
    Returns:
      features dict (schema.F_* keys), and if with_labels float32 labels [B].
    """
    p = tf.io.parse_example(serialized, schema.tfrecord_feature_spec())
    # Tokens: truncate, look up in-graph, pad to the batch's longest query (at least 1).
    lemmas = p[schema.QUERY_LEMMAS][:, :max_query_tokens]                  # ragged [B, None]
    ids = lemmas.with_flat_values(tf.cast(table.lookup(lemmas.flat_values), tf.int32))
    num_tokens = tf.cast(ids.row_lengths(), tf.int32)                       # [B]
    t = tf.maximum(tf.reduce_max(num_tokens), 1)
    token_ids = ids.to_tensor(default_value=schema.PAD_ID, shape=_dims(-1, t))   # [B, T]

    # Boxes: all of prep's (M per row at most), then the cap keeps the largest N.
    all_boxes = tf.cast(p[schema.NUM_BOXES], tf.int32)                       # [B]
    m = tf.maximum(tf.reduce_max(all_boxes), 1)
    # decode_raw zero-pads each row to m boxes: padding needs no ragged detour.
    feats = tf.io.decode_raw(p[schema.BOX_FEATURES], tf.float32, little_endian=True,
                             fixed_length=m * schema.FEATURE_DIM * 4)         # [B, M*F]
    box_features = tf.reshape(feats, [-1, m, schema.FEATURE_DIM])           # [B, M, F]
    geometry = p[schema.BOX_GEOMETRY].to_tensor(shape=_dims(-1, m * schema.GEOMETRY_DIM))
    box_geometry = tf.reshape(geometry, [-1, m, schema.GEOMETRY_DIM])       # [B, M, G]
    box_labels = tf.cast(p[schema.BOX_LABELS].to_tensor(shape=_dims(-1, m)), tf.int32)  # [B, M]
    pixel_boxes = tf.reshape(p[schema.BOXES].to_tensor(shape=_dims(-1, m * schema.BOX_COORDS)),
                             [-1, m, schema.BOX_COORDS])                     # [B, M, 4]
    index, num_boxes = largest_boxes(pixel_boxes, all_boxes, max_boxes)      # [B, N], [B]
    n = tf.shape(index)[1]

    def capped(x):
        return tf.gather(x, index, batch_dims=1)

    # Without a capped row (N == M) every row keeps its boxes in order: skip the gathers.
    box_features, box_geometry, box_labels = tf.cond(
        tf.equal(n, m), lambda: (box_features, box_geometry, box_labels),
        lambda: (capped(box_features), capped(box_geometry), capped(box_labels)))
    # Zero everything past each row's (capped) count, so dropped boxes leave no trace.
    box_mask = tf.sequence_mask(num_boxes, n)                                # [B, N]
    box_features *= tf.cast(box_mask, tf.float32)[:, :, tf.newaxis]
    box_geometry *= tf.cast(box_mask, tf.float32)[:, :, tf.newaxis]
    box_labels *= tf.cast(box_mask, tf.int32)

    features = {
        schema.F_TOKEN_IDS: token_ids,
        schema.F_NUM_TOKENS: num_tokens,
        schema.F_BOX_FEATURES: box_features,
        schema.F_BOX_GEOMETRY: box_geometry,
        schema.F_BOX_LABELS: box_labels,
        schema.F_NUM_BOXES: num_boxes,
        schema.F_QUERY_KEY: p[schema.QUERY_KEY],
        schema.F_PRODUCT_ID: p[schema.PRODUCT_ID],
        schema.F_QUERY_ID: p[schema.QUERY_ID],
    }
    if not with_labels:
        return features
    return features, tf.cast(p[schema.LABEL], tf.float32)


def _query_id_of(serialized):
    return tf.io.parse_single_example(
        serialized, {schema.QUERY_ID: tf.io.FixedLenFeature([], tf.int64)})[schema.QUERY_ID]


def whole_queries(records: tf.data.Dataset) -> tf.data.Dataset:
    """Cuts an ordered stream of serialized records into one element per query.

    Rows of a query must be contiguous. Each output element is string [rows of the query].
    """
    sentinel = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(-1, tf.int64),
                                             tf.constant(True)))
    keyed = records.map(lambda s: (s, _query_id_of(s), tf.constant(False))).concatenate(sentinel)

    def step(state, element):
        buf, current = state
        record, qid, is_end = element
        boundary = tf.logical_or(is_end, tf.logical_and(tf.size(buf) > 0,
                                                        tf.not_equal(qid, current)))
        out = tf.cond(boundary, lambda: buf, lambda: tf.zeros([0], tf.string))
        new_buf = tf.cond(boundary, lambda: tf.reshape(record, [1]),
                          lambda: tf.concat([buf, tf.reshape(record, [1])], 0))
        return (new_buf, qid), out

    init = (tf.zeros([0], tf.string), tf.constant(-1, tf.int64))
    return keyed.scan(init, step).filter(lambda out: tf.size(out) > 0)


def _last_lemma_buckets(serialized, buckets):
    """int64 [R] bucket ids from each record's last query lemma (usually the product type).

    serialized: string [R] records. A query without lemmas hashes the empty string.
    """
    lemmas = tf.io.parse_example(
        serialized, {schema.QUERY_LEMMAS: tf.io.RaggedFeature(tf.string)})[schema.QUERY_LEMMAS]
    padded = tf.concat([[""], lemmas.flat_values], 0)     # index 0: the empty query's ""
    last = tf.gather(padded, tf.where(lemmas.row_lengths() > 0, lemmas.row_limits(), 0))
    return tf.strings.to_hash_bucket_fast(last, buckets)


def group_by_last_lemma(records: tf.data.Dataset, group_size: int, window: int,
                        buckets: int = 1 << 16) -> tf.data.Dataset:
    """Regroups a shuffled record stream so that runs of `group_size` consecutive records
    share their query's last lemma (product type) where the window allows.

    A training batch then holds B / group_size such runs: its in-batch negatives include
    products of the same type as the positive, the near misses that candidate lists are
    full of ("negatives from similar queries, same last word").

    Records are regrouped within consecutive windows of `window` records; each window ends
    with its leftover rows of rarer types, in shorter runs. Every record therefore comes out
    within its own window, once: regrouping over the unbounded stream would hold a rare
    type's rows until `group_size` of them had come by, epochs later, and then emit copies
    of one row side by side. With `window` a multiple of the batch size and the batch size a
    multiple of `group_size`, full runs never straddle batches.

    Args:
      records: string [] serialized examples (an unbatched stream).
      group_size: rows per run.
      window: records regrouped together.
    Returns:
      string [] serialized examples, the same multiset per window, reordered.
    """
    def regroup(chunk):                                     # string [<= window]
        keyed = tf.data.Dataset.from_tensor_slices((chunk, _last_lemma_buckets(chunk, buckets)))
        return keyed.group_by_window(
            key_func=lambda record, key: key,
            reduce_func=lambda key, run: run.batch(group_size),
            window_size=group_size).unbatch().map(lambda record, key: record)

    return records.batch(window).flat_map(regroup)


def window_order(keys, boxes, group_size: int, batch_size: int, seed=None):
    """The order in which a window's records are batched: runs of same-key records, batches
    of similar box counts, batches in random order.

    Records are sorted by key, then box count (random among ties); each key's records are
    cut into runs of `group_size` (the last run of a key may be shorter); the full runs, then
    the short ones, each sorted by their largest box count (random among ties), are
    concatenated, so that with batch_size a multiple of group_size no full run straddles two
    batches; the full batches of `batch_size` records so formed are shuffled (a trailing
    partial batch stays last).
    A batch is padded to its largest box count, so batches of similar counts carry little
    padding; runs keep the same-key neighbours of group_by_last_lemma.

    Args:
      keys: int64 [W] run keys (last-lemma buckets; all equal for no runs).
      boxes: int32 [W] box counts the model will see (after the cap).
      group_size: records per run (1: each record is its own run).
      batch_size: records per batch.
      seed: op seed of the tie-breaking and batch shuffling.
    Returns:
      int32 [W], a permutation of range(W).
    """
    with tf.name_scope("window_order"):
        w = tf.size(boxes)
        pos = tf.range(w)

        def stable_by(order, values):
            return tf.gather(order, tf.argsort(tf.gather(values, order), stable=True))

        order = tf.argsort(tf.random.uniform([w], seed=seed))                # random ties
        order = stable_by(stable_by(order, boxes), keys)                     # key, boxes
        sorted_keys, sorted_boxes = tf.gather(keys, order), tf.gather(boxes, order)
        key_start = tf.concat([[True], tf.not_equal(sorted_keys[1:], sorted_keys[:-1])], 0)
        key_id = tf.cumsum(tf.cast(key_start, tf.int32)) - 1
        first = tf.math.unsorted_segment_min(pos, key_id, tf.reduce_max(key_id) + 1)
        run_start = tf.equal((pos - tf.gather(first, key_id)) % group_size, 0)
        run_id = tf.cumsum(tf.cast(run_start, tf.int32)) - 1                 # [W]
        num_runs = tf.reduce_max(run_id) + 1
        run_boxes = tf.math.unsorted_segment_max(sorted_boxes, run_id, num_runs)  # [R]
        run_short = tf.math.unsorted_segment_sum(tf.ones_like(run_id), run_id,
                                                 num_runs) < group_size        # [R]
        run_order = stable_by(tf.argsort(tf.random.uniform([num_runs], seed=seed)),
                              run_boxes)
        run_order = stable_by(run_order, tf.cast(run_short, tf.int32))     # full runs first
        run_rank = tf.math.invert_permutation(run_order)                     # [R]
        place = (tf.cast(tf.gather(run_rank, run_id), tf.int64) * tf.cast(w, tf.int64)
                 + tf.cast(pos, tf.int64))
        order = tf.gather(order, tf.argsort(place))                          # [W]
        full = w // batch_size
        batches = tf.random.shuffle(tf.range(full), seed=seed)
        shuffled = tf.reshape(tf.gather(tf.reshape(order[:full * batch_size],
                                                   [full, batch_size]), batches), [-1])
        return tf.concat([shuffled, order[full * batch_size:]], 0)


def batch_by_boxes(records: tf.data.Dataset, group_size: int, window: int, batch_size: int,
                   max_boxes: int, seed=None, buckets: int = 1 << 16) -> tf.data.Dataset:
    """Reorders a shuffled record stream, window by window, with window_order: batches of
    similar box counts (little padding), runs of `group_size` records sharing their
    query's last lemma (as group_by_last_lemma) when group_size > 1.

    Args:
      records: string [] serialized examples (an unbatched stream).
      group_size: rows per same-lemma run; <= 1 for none.
      window: records reordered together (a multiple of batch_size keeps batches whole).
      batch_size: records per training batch.
      max_boxes: the model's box cap (> 0).
      seed: op seed of the reordering.
    Returns:
      string [] serialized examples, the same multiset per window, reordered.
    """
    def reorder(chunk):                                      # string [<= window]
        boxes = tf.io.parse_example(chunk, {schema.NUM_BOXES: tf.io.FixedLenFeature(
            [], tf.int64)})[schema.NUM_BOXES]
        boxes = tf.cast(tf.minimum(boxes, max_boxes), tf.int32)
        if group_size > 1:
            keys = _last_lemma_buckets(chunk, buckets)
        else:
            keys = tf.zeros_like(boxes, tf.int64)
        return tf.gather(chunk, window_order(keys, boxes, max(1, group_size), batch_size,
                                             seed))

    return records.batch(window).map(reorder).unbatch()


def input_fn_builder(cfg, files, mode, prep: PrepDir, compression=None, num_epochs=None):
    """Returns an Estimator input_fn over TFRecord shards.

    Args:
      cfg: a resolved estimator.config.Config (batch sizes, caps, parallelism, seed;
        max_boxes > 0, see estimator.train.resolve_config).
      files: a list of TFRecord paths (e.g. prep.split_files("train")) or a glob pattern.
      mode: a tf.estimator.ModeKeys value.
      prep: the prep the files belong to; gives the vocabulary and the compression.
      compression: "GZIP" or "" (default: the prep's).
      num_epochs: TRAIN repeats forever by default; EVAL/PREDICT read once.
    Returns:
      input_fn(params=None, config=None, input_context=None) -> tf.data.Dataset yielding
      (features, labels) in TRAIN/EVAL and features in PREDICT. In TRAIN, files are sharded
      by `input_context` when a distribution strategy passes one, else by the RunConfig's
      worker index under a TF_CONFIG cluster (with fewer files than workers, by record
      position within each file), so no example is read twice per epoch; each worker
      shuffles with its own seed.
    Raises:
      ValueError: no files, or cfg.max_boxes is 0 (an unresolved config).
    """
    files = _resolve_files(files)
    if compression is None:
        compression = prep.compression
    if cfg.max_boxes < 1:
        raise ValueError("cfg.max_boxes is 0: resolve the config against its prep directory "
                         "first (estimator.train.resolve_config)")
    max_boxes = cfg.max_boxes
    tokens = prep.vocab_tokens()
    parallel = tf.data.AUTOTUNE if cfg.num_parallel_calls < 0 else cfg.num_parallel_calls
    prefetch = tf.data.AUTOTUNE if cfg.prefetch_batches < 0 else cfg.prefetch_batches

    def input_fn(params=None, config=None, input_context=None):
        del params
        table = vocab.lookup_table(tokens)
        num_shards, shard = 1, 0
        if input_context is not None:
            num_shards = input_context.num_input_pipelines
            shard = input_context.input_pipeline_id
        elif config is not None and mode == TRAIN and config.num_worker_replicas > 1:
            num_shards, shard = config.num_worker_replicas, config.global_id_in_cluster or 0
        seed = cfg.seed + shard
        shard_files = mode == TRAIN and num_shards > 1 and len(files) >= num_shards
        own_files = files[shard::num_shards] if shard_files else files
        ds = tf.data.Dataset.from_tensor_slices(own_files)

        # Fewer files than workers: each worker takes every num_shards-th record of each
        # file, by position, so the workers' examples stay disjoint whatever their file order.
        shard_records = mode == TRAIN and num_shards > 1 and not shard_files

        def read(path):
            records = tf.data.TFRecordDataset(path, compression_type=compression,
                                              buffer_size=1 << 20)
            return records.shard(num_shards, shard) if shard_records else records

        if mode == TRAIN:
            ds = ds.shuffle(len(own_files), seed=seed, reshuffle_each_iteration=True)
            ds = ds.interleave(read, cycle_length=max(1, min(cfg.num_parallel_reads,
                                                             len(own_files))),
                               block_length=16, num_parallel_calls=parallel,
                               deterministic=cfg.deterministic)
            # Repeat whole interleaved passes: interleaving an endless file list lets a
            # non-deterministic parallel interleave open a file's next epoch beside its
            # current one, so rows of one epoch would come out twice before others once.
            ds = ds.repeat(num_epochs)
            ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
            window = max(1, -(-cfg.group_window // cfg.batch_size)) * cfg.batch_size
            if cfg.batch_by_boxes:
                # At most one pass over the worker's rows per window: sorting a window of
                # several passes would put a row's copies side by side in one batch.
                rows = prep.file_rows(own_files)
                if rows is not None and shard_records:
                    rows //= num_shards
                if rows is not None:
                    window = min(window, max(1, rows // cfg.batch_size) * cfg.batch_size)
                ds = batch_by_boxes(ds, cfg.train_group_size, window, cfg.batch_size,
                                    max_boxes, seed=seed)
            elif cfg.train_group_size > 1:
                ds = group_by_last_lemma(ds, cfg.train_group_size, window)
            ds = ds.batch(cfg.batch_size, drop_remainder=True)
            ds = ds.map(lambda s: parse_batch(s, table, cfg.max_query_tokens, max_boxes),
                        num_parallel_calls=parallel, deterministic=cfg.deterministic)
        else:
            ds = ds.interleave(lambda path: whole_queries(read(path)),
                               cycle_length=max(1, cfg.num_parallel_reads),
                               num_parallel_calls=parallel, deterministic=True)
            if num_epochs:
                ds = ds.repeat(num_epochs)
            ds = ds.ragged_batch(max(1, cfg.eval_queries_per_batch))
            ds = ds.map(lambda r: r.flat_values)                              # [B] whole queries
            with_labels = mode == EVAL
            ds = ds.map(lambda s: parse_batch(s, table, cfg.max_query_tokens, max_boxes,
                                              with_labels=with_labels),
                        num_parallel_calls=parallel, deterministic=True)
        options = tf.data.Options()
        options.deterministic = mode != TRAIN or cfg.deterministic
        ds = ds.with_options(options)
        return ds.prefetch(prefetch)

    return input_fn
