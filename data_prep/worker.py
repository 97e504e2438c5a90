"""A prep worker: one chunk of TSV lines -> one TFRecord shard plus its sidecars.

A worker reads its chunk's bytes itself (only the chunk's location travels between
processes), validates and normalises each row, writes the shard and its sidecars under
temporary names and renames them when complete (data_prep.shards holds the layout), the
sidecar last, with the shard's CRC32C computed as it was written. A shard's bytes depend
only on its chunk's bytes and the options, so a resumed run, another machine or another
worker count produce the same files. Workers never import TensorFlow.
"""
import collections
import dataclasses
import functools
import json
import os
import time
from typing import Dict, FrozenSet, List, Optional, Tuple

import google_crc32c

from data_prep import example_proto, geometry, schema, shards, text, tfrecord, tsv
from data_prep.tfrecord import RecordWriter


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    """Everything a worker needs besides the chunk (picklable, sent once per worker).

    Attributes:
      out_dir: the prep output directory.
      max_boxes: keep at most this many (largest) boxes per product.
      drop_leading_be: passed to text.normalize_query.
      gzip: write GZIP-compressed TFRecords.
      answers: valid answers, query_id -> product ids (empty for other splits).
      answers_sha256: digest of the answers file, part of valid shards' fingerprint.
    """
    out_dir: str
    max_boxes: int = 32
    drop_leading_be: bool = True
    gzip: bool = False
    answers: Dict[int, FrozenSet[int]] = dataclasses.field(default_factory=dict)
    answers_sha256: str = ""


@dataclasses.dataclass(frozen=True)
class ChunkTask:
    """Shard `chunk.index` of `split`, made from a byte range of the TSV file `source`."""
    split: str
    source: str
    chunk: tsv.LineChunk


def _fingerprint(task: ChunkTask, config: ShardConfig, input_crc32c: int,
                 input_bytes: int) -> dict:
    """What a shard's bytes depend on: the chunk's place, bytes (CRC32C) and the options."""
    chunk = task.chunk
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "normalization_version": text.NORMALIZATION_VERSION,
        "split": task.split,
        "max_boxes": config.max_boxes,
        "drop_leading_be": config.drop_leading_be,
        "compression": "GZIP" if config.gzip else "",
        "first_line": chunk.first_line,
        "num_lines": chunk.num_lines,
        "input_bytes": input_bytes,
        "input_crc32c": input_crc32c,
        "answers_sha256": config.answers_sha256 if task.split == "valid" else "",
    }


@functools.lru_cache(maxsize=1 << 18)
def _lemma(token: str) -> str:
    """text.lemmatize of one token, cached (a lookup lemma depends on the token alone)."""
    return text.lemmatize([token])[0]


@functools.lru_cache(maxsize=example_proto.QUERY_CACHE_SIZE)
def normalize(query: str, drop_leading_be: bool) -> Tuple[Tuple[str, ...], int]:
    """text.normalize_query and text.query_key, cached.

    spaCy's lookup lemma of a token depends on the token alone, so lemmas are cached per
    token: a spaCy Doc is built once per distinct token instead of once per query.
    A test keeps this equal to text.normalize_query.

    Returns:
      (lemmas, query key).
    """
    lemmas = [_lemma(t) for t in text.tokenize(query)]
    start = 0
    while drop_leading_be and start < len(lemmas) and lemmas[start] == text.BE_LEMMA:
        start += 1
    lemmas = tuple(lemmas[start:])
    return lemmas, text.query_key(lemmas)


def warm_up() -> None:
    """Loads the lemmatizer, so that timing and workers start warm."""
    text.normalize_query("warm up")


def clear_caches() -> None:
    """Empties this process's per-query and per-token caches, as a new worker process
    starts (for a benchmark comparing 1 worker in-process with a pool of new ones)."""
    normalize.cache_clear()
    _lemma.cache_clear()
    example_proto.clear_caches()


def _reject_line(line_no: int, error: tsv.RowError, raw: bytes) -> bytes:
    """One line of the rejects file: line number, field, reason, detail, the raw line."""
    detail = " ".join(error.detail.split())  # no tabs/newlines inside the detail column
    return f"{line_no}\t{error.field}\t{error.reason}\t{detail}\t".encode("utf-8") + raw + b"\n"


def _label(split: str, row: tsv.Row, answers: Dict[int, FrozenSet[int]]) -> Optional[int]:
    """The row's relevance: 1 for train, from the answers for valid, None (unknown) for test."""
    if split == "train":
        return 1  # every train row is a positive (query, product) pair
    if split == "valid":
        return int(row.product_id in answers.get(row.query_id, ()))
    return None


_READ_BUFFER = 1 << 18  # per-line work stays in the core's cache (lines are ~40 KB)


def _chunk_crc32c(path: str, offset: int, length: int) -> Tuple[int, int]:
    """(CRC32C, bytes read) of bytes [offset, offset + length) of path, read in blocks."""
    crc, done = 0, 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < length:
            block = f.read(min(1 << 20, length - done))
            if not block:
                break
            crc, done = google_crc32c.extend(crc, block), done + len(block)
    return crc, done


class _ChunkLines:
    """Iterates over a chunk's lines as (line, end of its text: "\n" and a "\r" before it
    excluded), holding one line at a time; counts the lines and bytes read and their CRC32C
    (that of the whole chunk)."""

    def __init__(self, f, length: int):
        self._file, self._left = f, length
        self.lines = self.bytes = self.crc32c = 0

    def __iter__(self):
        while self._left > 0:
            line = self._file.readline(self._left)
            if not line:
                return  # the file shrank; the caller compares the counts
            self._left -= len(line)
            self.lines += 1
            self.bytes += len(line)
            self.crc32c = google_crc32c.extend(self.crc32c, line)
            end = len(line) - line.endswith(b"\n")
            yield line, end - (line[end - 1:end] == b"\r" if end else 0)


def _write_sidecar(out_dir: str, split: str, index: int, sidecar: dict) -> None:
    shards.write_atomic(os.path.join(out_dir, shards.state_file(split, index, "json")),
                        json.dumps(sidecar, sort_keys=True).encode("utf-8"))


_PAIR_KEYS = (schema.QUERY_ID, schema.PRODUCT_ID)


def _upgraded_sidecar(config: ShardConfig, split: str,
                      old: dict) -> Tuple[Optional[dict], str]:
    """A sidecar written before shard checksums and duplicate counts were recorded, with
    both added from the shard itself after every record's framing CRCs checked out.

    Returns:
      (the sidecar, also written back, ""), or (None, what is wrong) when a record is
      corrupt.
    """
    path = os.path.join(config.out_dir, old["file"])
    seen, duplicates = set(), 0
    try:
        for record in tfrecord.read_records(path, config.gzip):
            if split != "train":
                ids = example_proto.decode_int64_scalars(record, _PAIR_KEYS)
                pair = (ids.get(schema.QUERY_ID), ids.get(schema.PRODUCT_ID))
                duplicates += pair in seen
                seen.add(pair)
    except tfrecord.CorruptRecordsError as e:
        return None, str(e)
    except ValueError as e:  # framing intact, but not an Example prep writes
        return None, f"{path}: undecodable record ({e})"
    sidecar = dict(old, crc32c=tfrecord.file_crc32c(path)[0], duplicates=duplicates)
    _write_sidecar(config.out_dir, split, old["index"], sidecar)
    return sidecar, ""


def process_chunk(task: ChunkTask, config: ShardConfig) -> dict:
    """Turns one chunk of TSV lines into its shard and sidecars (or reuses a finished one).

    A finished shard is reused only when its input bytes and options are unchanged and its
    bytes match the CRC32C recorded when it was written; otherwise it is written again.

    Args:
      task: the split, source file and chunk.
      config: the shard options.
    Returns:
      The shard's sidecar dict, plus "skipped": True when a finished shard was reused and
      "rewritten": what was wrong with the finished shard that was replaced (else None).
    Raises:
      OSError: writing failed (e.g. ENOSPC); its filename names the file (the shard when
        the system gave none). The shard's temporary file is removed.
    """
    chunk = task.chunk
    old = shards.load_sidecar(config.out_dir, task.split, chunk.index)
    fingerprint, rewritten = None, None
    if old is not None:  # a rerun: reuse the shard if its input and options are unchanged
        fingerprint = _fingerprint(task, config, *_chunk_crc32c(task.source, chunk.offset,
                                                                 chunk.length))
        if shards.is_complete(config.out_dir, old, fingerprint):
            if "crc32c" in old:
                rewritten = shards.verify_content(config.out_dir, old)
                if rewritten is None:
                    return dict(old, skipped=True, rewritten=None)
            else:
                reused, rewritten = _upgraded_sidecar(config, task.split, old)
                if reused is not None:
                    return dict(reused, skipped=True, rewritten=None)

    rel = shards.shard_file(task.split, chunk.index, config.gzip)
    path = os.path.join(config.out_dir, rel)
    tmp = shards.tmp_name(path)
    try:
        sidecar = _write_shard(task, config, rel, tmp, fingerprint)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # A failed write() names no file; a pool re-raises this in the parent, so the
        # message must carry the path itself.
        named = path if e.filename in (None, tmp) else e.filename
        raise OSError(e.errno, e.strerror or str(e), named) from None
    return dict(sidecar, skipped=False, rewritten=rewritten)


def _write_shard(task: ChunkTask, config: ShardConfig, rel: str, tmp: str,
                 expected: Optional[dict]) -> dict:
    """Writes the shard `rel` (through `tmp`) and its sidecars; returns the sidecar.

    Args:
      expected: the fingerprint a rerun computed before rewriting (None on a first run);
        the input must not have changed since.
    """
    chunk = task.chunk
    path = os.path.join(config.out_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(os.path.join(config.out_dir, shards.STATE_DIR, task.split), exist_ok=True)
    ungrouped = dict(chunk.ungrouped)
    reasons: Dict[str, int] = collections.Counter()
    rejects: List[bytes] = []
    corpus: List[str] = []
    lemma_counts: Dict[str, int] = collections.Counter()
    queries: Dict[int, None] = {}   # ordered set of query ids with kept rows
    positives: List[List[int]] = []
    pairs = set()                   # (query_id, product_id) kept, for duplicate counting
    rows = capped = duplicates = 0
    with open(task.source, "rb", buffering=_READ_BUFFER) as source, \
            RecordWriter(tmp, config.gzip) as writer:
        source.seek(chunk.offset)
        lines = _ChunkLines(source, chunk.length)
        for line_no, (line, text_end) in enumerate(lines, chunk.first_line):
            try:
                if line_no in ungrouped:
                    raise tsv.RowError("query_id", "query_not_grouped", ungrouped[line_no])
                row = tsv.parse_row(line, 0, text_end)
                lemmas, key = normalize(row.query, config.drop_leading_be)
                if not lemmas:
                    raise tsv.RowError("query", "empty_query",
                                       f"{row.query[:60]!r} has no tokens after normalisation")
            except tsv.RowError as e:
                reasons[e.reason] += 1
                rejects.append(_reject_line(line_no, e, line.rstrip(b"\n")))
                continue
            boxes, features, labels = row.boxes, row.features, row.labels
            if len(boxes) > config.max_boxes:
                keep = geometry.largest_box_indices(boxes, config.max_boxes)
                boxes, features, labels = boxes[keep], features[keep], labels[keep]
                capped += 1
            label = _label(task.split, row, config.answers)
            writer.write(example_proto.encode_record(
                product_id=row.product_id, query_id=row.query_id, image_h=row.image_h,
                image_w=row.image_w, query=row.query, query_lemmas=lemmas, query_key=key,
                boxes=boxes, box_geometry=geometry.relative_geometry(boxes, row.image_h,
                                                                     row.image_w),
                box_features=features, box_labels=labels, label=label))
            rows += 1
            queries[row.query_id] = None
            if task.split == "train":
                corpus.append(" ".join(lemmas) + "\n")
                lemma_counts.update(lemmas)
            else:
                # A candidate list (one query's rows) lies within one chunk, so duplicates
                # within a list are all seen here. They are kept, as the TSV has them.
                pair = (row.query_id, row.product_id)
                duplicates += pair in pairs
                pairs.add(pair)
            if label == 1 and task.split == "valid":
                positives.append([row.query_id, row.product_id])
    fresh = _fingerprint(task, config, lines.crc32c, lines.bytes)
    if (lines.lines, lines.bytes) != (chunk.num_lines, chunk.length) or (
            expected is not None and fresh != expected):
        os.remove(tmp)
        raise RuntimeError(f"{task.source}: lines {chunk.first_line}.. changed while prep ran "
                           f"({lines.lines} lines and {lines.bytes} bytes where "
                           f"{chunk.num_lines} and {chunk.length} were)")
    os.replace(tmp, path)

    sidecars = [shards.state_file(task.split, chunk.index, "rejects.tsv")]
    shards.write_atomic(os.path.join(config.out_dir, sidecars[0]), b"".join(rejects))
    if task.split == "train":
        sidecars.append(shards.state_file(task.split, chunk.index, "lemmas.txt"))
        shards.write_atomic(os.path.join(config.out_dir, sidecars[1]),
                            "".join(corpus).encode("utf-8"))
    sidecar = {
        "file": rel,
        "bytes": os.path.getsize(path),
        "crc32c": writer.crc32c,
        "index": chunk.index,
        "rows": rows,
        "rejected": sum(reasons.values()),
        "reject_reasons": dict(sorted(reasons.items())),
        "capped": capped,
        "duplicates": duplicates,
        "queries": list(queries) if task.split != "train" else [],
        "positives": positives,
        "lemma_counts": dict(sorted(lemma_counts.items())),
        "sidecars": sidecars,
        "fingerprint": fresh,
    }
    _write_sidecar(config.out_dir, task.split, chunk.index, sidecar)
    return sidecar


# Pool plumbing: the config is sent once per worker, not once per task.
_WORKER_CONFIG: Optional[ShardConfig] = None


def init_worker(config: ShardConfig, barrier=None) -> None:
    """multiprocessing.Pool initializer: stores the config, warms up, waits at `barrier`."""
    global _WORKER_CONFIG
    _WORKER_CONFIG = config
    warm_up()
    if barrier is not None:
        barrier.wait()


def process_chunk_timed(task: ChunkTask, config: ShardConfig) -> dict:
    """process_chunk, adding "cpu_s": the CPU seconds it took in this process."""
    start = time.process_time()
    result = process_chunk(task, config)
    return dict(result, cpu_s=time.process_time() - start)


def process_chunk_in_worker(task: ChunkTask) -> dict:
    """process_chunk_timed with the config given to init_worker."""
    return process_chunk_timed(task, _WORKER_CONFIG)
