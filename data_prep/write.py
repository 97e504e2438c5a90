"""One chunk of TSV lines -> one TFRecord shard plus its sidecars, atomically and resumably.

Layout inside a prep output directory DIR (k = shard index, 5 digits):
  DIR/<split>/part-0000k.tfrecord[.gz]     the records (schema.encode_example)
  DIR/state/<split>/part-0000k.json        sidecar: counts, lemma counts, query ids, and a
                                           fingerprint of input bytes + options
  DIR/state/<split>/part-0000k.rejects.tsv rejected lines of the chunk (no header)
  DIR/state/train/part-0000k.lemmas.txt    one line of space-joined lemmas per train record,
                                           the word2vec corpus

Every file is written under a temporary name and renamed when complete; the sidecar is
written last, so a shard counts as done only when its sidecar exists, its fingerprint
matches the current input bytes and options, and the shard has the recorded size. A shard's
bytes depend only on its chunk's bytes and the options, so a resumed run, another machine or
another worker count produce the same files.
"""
import collections
import dataclasses
import functools
import glob
import json
import os
import struct
import time
import zlib
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import google_crc32c
import numpy as np

from data_prep import geometry, schema, text, tsv

STATE_DIR = "state"
REJECTS_HEADER = b"line\tfield\treason\tdetail\traw_line\n"
# Caches normalised queries per process: valid/test repeat each query ~30 times in a row
# and train repeats many (3M rows, 1.35M distinct queries).
_QUERY_CACHE_SIZE = 1 << 16


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


def shard_file(split: str, index: int, gzip: bool) -> str:
    """Path of shard `index` of `split`, relative to the output directory."""
    return f"{split}/part-{index:05d}.tfrecord" + (".gz" if gzip else "")


def state_file(split: str, index: int, suffix: str) -> str:
    """Path of a sidecar (suffix "json", "rejects.tsv" or "lemmas.txt"), relative to DIR."""
    return f"{STATE_DIR}/{split}/part-{index:05d}.{suffix}"


def tmp_name(path: str) -> str:
    """A hidden temporary name beside path, unique to this host and process (two machines
    sharing DIR never write the same temporary file)."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.uname().nodename}-{os.getpid()}")


def remove_stale_temporaries(out_dir: str, split: str, owns) -> int:
    """Deletes temporary files left by a killed run for shards `owns(index)` is true of.

    Returns:
      The number of files removed.
    """
    removed = 0
    for directory in (os.path.join(out_dir, split), os.path.join(out_dir, STATE_DIR, split)):
        for path in glob.glob(os.path.join(directory, ".part-*.tmp-*")):
            index = int(os.path.basename(path)[len(".part-"):][:5])
            if owns(index):
                os.remove(path)
                removed += 1
    return removed


def write_atomic(path: str, data: bytes) -> None:
    """Writes data to path under a temporary name, then renames it into place."""
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
        "input_crc32c": input_crc32c,  # google_crc32c: 10x faster than zlib.crc32
        "answers_sha256": config.answers_sha256 if task.split == "valid" else "",
    }


def load_sidecar(out_dir: str, split: str, index: int) -> Optional[dict]:
    """The sidecar of a shard, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(out_dir, state_file(split, index, "json")), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(out_dir: str, sidecar: Optional[dict], fingerprint: Optional[dict] = None) -> bool:
    """Whether a sidecar describes a finished shard whose files are all present.

    Args:
      out_dir: the output directory.
      sidecar: from load_sidecar.
      fingerprint: when given, the sidecar must have been made from these input bytes and
        options.
    """
    if not sidecar or (fingerprint is not None and sidecar.get("fingerprint") != fingerprint):
        return False
    try:
        if os.path.getsize(os.path.join(out_dir, sidecar["file"])) != sidecar["bytes"]:
            return False
        return all(os.path.exists(os.path.join(out_dir, p)) for p in sidecar["sidecars"])
    except (OSError, KeyError, TypeError):
        return False


@functools.lru_cache(maxsize=1 << 18)
def _lemma(token: str) -> str:
    return text.lemmatize([token])[0]


@functools.lru_cache(maxsize=_QUERY_CACHE_SIZE)
def normalize(query: str, drop_leading_be: bool) -> Tuple[Tuple[str, ...], int]:
    """text.normalize_query and text.query_key, cached.

    spaCy's lookup lemma of a token depends on the token alone, so lemmas are cached per
    token too: building a spaCy Doc per query was the largest cost after decoding.
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


# ---------------------------------------------------------------------------------------
# Record encoding. Building a tf.train.Example message costs ~100-200 us per row (every
# feature is a message copied into the map); writing the protobuf wire format directly costs
# a few us. The output is byte-identical to schema.encode_example (a test checks it).
_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if 0 < value < 0x200000:  # lengths of box features and lists: 2-3 bytes, no loop
        if value < 0x4000:
            return bytes(((value & 0x7F) | 0x80, value >> 7))
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    value &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


# Tags of the length-delimited fields used: field 1 (0x0A) is Example.features,
# Features.feature entries, an entry's key, and every *List.value; field 2 (0x12) is an
# entry's value and Feature.float_list; field 3 (0x1A) is Feature.int64_list; Feature.bytes_list
# is field 1.
_F1, _F2, _F3 = b"\x0a", b"\x12", b"\x1a"

# The feature keys in the order schema.encode_example's protobuf runtime serialises its
# feature map (a test checks it). Fixed here, so that workers need neither protobuf nor
# TensorFlow and a shard's bytes do not depend on the runtime's map order.
KEY_ORDER = (schema.LABEL, schema.QUERY_KEY, schema.BOX_FEATURES, schema.IMAGE_H,
             schema.IMAGE_W, schema.QUERY_LEMMAS, schema.PRODUCT_ID, schema.BOXES,
             schema.QUERY_ID, schema.QUERY, schema.BOX_GEOMETRY, schema.BOX_LABELS,
             schema.NUM_BOXES)
_HEADS = {key: _len_field(_F1, key.encode("utf-8")) for key in KEY_ORDER}  # entry key fields
_FEATURES_AT = KEY_ORDER.index(schema.BOX_FEATURES)


def _entry(key: str, feature: bytes) -> bytes:
    """A Features.feature map entry: key and serialised Feature."""
    head = _HEADS[key]
    value_len = _varint(len(feature))
    return b"".join([_F1, _varint(len(head) + 1 + len(value_len) + len(feature)), head, _F2,
                     value_len, feature])


def _int64_feature(packed: bytes) -> bytes:
    """Feature.int64_list of packed varints."""
    return _len_field(_F3, _len_field(_F1, packed) if packed else b"")


def _float_feature(packed: bytes) -> bytes:
    """Feature.float_list of packed little-endian float32s."""
    return _len_field(_F2, _len_field(_F1, packed) if packed else b"")


def _bytes_feature(values: Sequence[bytes]) -> bytes:
    return _len_field(_F1, b"".join([_len_field(_F1, v) for v in values]))


_KINDS = {"int64": _int64_feature, "float": _float_feature,
          "bytes": lambda value: _bytes_feature([value])}


@functools.lru_cache(maxsize=1 << 12)
def _prefix(key: str, kind: str, size: int) -> bytes:
    """The bytes of key's map entry that precede its packed values, for a Feature of `kind`
    ("int64", "float", or "bytes" with one value) whose packed values take `size` bytes.

    Only the sizes vary from row to row, so an entry is _prefix(...) + packed values.
    """
    entry = _entry(key, _KINDS[kind](bytes(size)))
    return entry[:len(entry) - size]


@functools.lru_cache(maxsize=1 << 12)
def _scalar_entry(key: str, value: int) -> bytes:
    """Entries of the few-valued scalars (image size, box count, label), cached."""
    return _entry(key, _int64_feature(_varint(value)))


@functools.lru_cache(maxsize=_QUERY_CACHE_SIZE)
def _query_entries(query: str, lemmas: Tuple[str, ...], key: int) -> Tuple[bytes, ...]:
    """The entries of QUERY, QUERY_LEMMAS and QUERY_KEY, cached: queries repeat."""
    return (_entry(schema.QUERY, _bytes_feature([query.encode("utf-8")])),
            _entry(schema.QUERY_LEMMAS, _bytes_feature([t.encode("utf-8") for t in lemmas])),
            _entry(schema.QUERY_KEY, _int64_feature(_varint(key))))


def _packed_int64s(values: np.ndarray) -> bytes:
    values = np.asarray(values, np.int64).tolist()
    if values and 0 <= min(values) and max(values) < 0x80:  # class ids: one byte each
        return bytes(values)
    return b"".join([_varint(v) for v in values])


_LE_F32 = np.dtype("<f4")


def _packed_floats(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, _LE_F32).tobytes()


def encode_record(product_id: int, query_id: int, image_h: int, image_w: int, query: str,
                  query_lemmas: Sequence[str], query_key: int, boxes: np.ndarray,
                  box_geometry: np.ndarray, box_features: np.ndarray, box_labels: np.ndarray,
                  label: Optional[int] = None) -> bytes:
    """schema.encode_example, byte for byte, written directly in the protobuf wire format.

    Args and returns as schema.encode_example (boxes [N, 4], box_geometry [N, G],
    box_features [N, F] float32, box_labels [N]).
    """
    n = int(boxes.shape[0])
    if box_geometry.shape != (n, schema.GEOMETRY_DIM) or \
            box_features.shape != (n, schema.FEATURE_DIM) or np.shape(box_labels) != (n,):
        raise ValueError(
            f"inconsistent box arrays: boxes {boxes.shape}, geometry {box_geometry.shape}, "
            f"features {box_features.shape}, labels {np.shape(box_labels)}")
    query_entry, lemmas_entry, key_entry = _query_entries(query, tuple(query_lemmas),
                                                          int(query_key))
    # A byte view, not a copy: the final join copies the 32 KB once.
    features = np.ascontiguousarray(box_features, _LE_F32).reshape(-1).view(np.uint8)
    product, query_no = _varint(int(product_id)), _varint(int(query_id))
    box_bytes, geometry_bytes = _packed_floats(boxes), _packed_floats(box_geometry)
    labels = _packed_int64s(box_labels)
    entries = {
        schema.LABEL: _scalar_entry(schema.LABEL, schema.UNKNOWN_LABEL if label is None
                                    else int(label)),
        schema.QUERY_KEY: key_entry,
        schema.BOX_FEATURES: _prefix(schema.BOX_FEATURES, "bytes", len(features)),
        schema.IMAGE_H: _scalar_entry(schema.IMAGE_H, int(image_h)),
        schema.IMAGE_W: _scalar_entry(schema.IMAGE_W, int(image_w)),
        schema.QUERY_LEMMAS: lemmas_entry,
        schema.PRODUCT_ID: _prefix(schema.PRODUCT_ID, "int64", len(product)) + product,
        schema.BOXES: _prefix(schema.BOXES, "float", len(box_bytes)) + box_bytes,
        schema.QUERY_ID: _prefix(schema.QUERY_ID, "int64", len(query_no)) + query_no,
        schema.QUERY: query_entry,
        schema.BOX_GEOMETRY: _prefix(schema.BOX_GEOMETRY, "float", len(geometry_bytes)) +
        geometry_bytes,
        schema.BOX_LABELS: _prefix(schema.BOX_LABELS, "int64", len(labels)) + labels,
        schema.NUM_BOXES: _scalar_entry(schema.NUM_BOXES, n),
    }
    pieces = [entries[key] for key in KEY_ORDER]
    pieces.insert(_FEATURES_AT + 1, features)
    size = sum(map(len, pieces))
    return b"".join([_F1, _varint(size)] + pieces)


# ---------------------------------------------------------------------------------------
# TFRecord files, written without TensorFlow: tf.io.TFRecordWriter's format (each record
# framed by its uint64 length and masked CRC32Cs) and its GZIP settings, byte for byte (a
# test compares the two).
_U64, _U32 = struct.Struct("<Q"), struct.Struct("<I")


def masked_crc32c(data: bytes) -> bytes:
    """The 4-byte masked CRC32C that TFRecord framing stores after a length and a record."""
    crc = google_crc32c.value(data)
    return _U32.pack(((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF)


class RecordWriter:
    """Writes a TFRecord file as tf.io.TFRecordWriter(path, options) does; a context manager.

    Args:
      path: the file to create.
      gzip: GZIP-compress it (TensorFlow's defaults: level 6, 15-bit window, memLevel 9).
    """

    def __init__(self, path: str, gzip: bool = False):
        self._file = open(path, "wb", buffering=1 << 20)
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                         16 + zlib.MAX_WBITS, 9) if gzip else None

    def write(self, record: bytes) -> None:
        length = _U64.pack(len(record))
        for piece in (length + masked_crc32c(length), record, masked_crc32c(record)):
            self._file.write(self._deflate.compress(piece) if self._deflate else piece)

    def close(self) -> None:
        if self._deflate is not None:
            self._file.write(self._deflate.flush())
            self._deflate = None
        self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def warm_up() -> None:
    """Loads the lemmatizer, so that timing and workers start warm."""
    text.normalize_query("warm up")


def _reject_line(line_no: int, error: tsv.RowError, raw: bytes) -> bytes:
    detail = " ".join(error.detail.split())  # no tabs/newlines inside the detail column
    return f"{line_no}\t{error.field}\t{error.reason}\t{detail}\t".encode("utf-8") + raw + b"\n"


def _label(split: str, row: tsv.Row, answers: Dict[int, FrozenSet[int]]) -> Optional[int]:
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


def process_chunk(task: ChunkTask, config: ShardConfig) -> dict:
    """Turns one chunk of TSV lines into its shard and sidecars (or reuses a finished one).

    Args:
      task: the split, source file and chunk.
      config: the shard options.
    Returns:
      The shard's sidecar dict, plus "skipped": True when a finished shard was reused.
    """
    chunk = task.chunk
    old = load_sidecar(config.out_dir, task.split, chunk.index)
    if old is not None:  # a rerun: reuse the shard if its input and options are unchanged
        fingerprint = _fingerprint(task, config, *_chunk_crc32c(task.source, chunk.offset,
                                                                 chunk.length))
        if is_complete(config.out_dir, old, fingerprint):
            return dict(old, skipped=True)

    rel = shard_file(task.split, chunk.index, config.gzip)
    path = os.path.join(config.out_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(os.path.join(config.out_dir, STATE_DIR, task.split), exist_ok=True)
    ungrouped = dict(chunk.ungrouped)
    reasons: Dict[str, int] = collections.Counter()
    rejects: List[bytes] = []
    corpus: List[str] = []
    lemma_counts: Dict[str, int] = collections.Counter()
    queries: Dict[int, None] = {}   # ordered set of query ids with kept rows
    positives: List[List[int]] = []
    rows = capped = 0
    tmp = tmp_name(path)
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
            writer.write(encode_record(
                product_id=row.product_id, query_id=row.query_id, image_h=row.image_h,
                image_w=row.image_w, query=row.query, query_lemmas=lemmas, query_key=key,
                boxes=boxes, box_geometry=geometry.relative_geometry(boxes, row.image_h,
                                                                     row.image_w),
                box_features=features, box_labels=labels, label=label))
            rows += 1
            queries[row.query_id] = None
            if label == 1 and task.split == "valid":
                positives.append([row.query_id, row.product_id])
            if task.split == "train":
                corpus.append(" ".join(lemmas) + "\n")
                lemma_counts.update(lemmas)
    fresh = _fingerprint(task, config, lines.crc32c, lines.bytes)
    if (lines.lines, lines.bytes) != (chunk.num_lines, chunk.length) or (
            old is not None and fresh != fingerprint):
        os.remove(tmp)
        raise RuntimeError(f"{task.source}: lines {chunk.first_line}.. changed while prep ran "
                           f"({lines.lines} lines and {lines.bytes} bytes where "
                           f"{chunk.num_lines} and {chunk.length} were)")
    fingerprint = fresh
    os.replace(tmp, path)

    sidecars = [state_file(task.split, chunk.index, "rejects.tsv")]
    write_atomic(os.path.join(config.out_dir, sidecars[0]), b"".join(rejects))
    if task.split == "train":
        sidecars.append(state_file(task.split, chunk.index, "lemmas.txt"))
        write_atomic(os.path.join(config.out_dir, sidecars[1]),
                      "".join(corpus).encode("utf-8"))
    sidecar = {
        "file": rel,
        "bytes": os.path.getsize(path),
        "index": chunk.index,
        "rows": rows,
        "rejected": sum(reasons.values()),
        "reject_reasons": dict(sorted(reasons.items())),
        "capped": capped,
        "queries": list(queries) if task.split != "train" else [],
        "positives": positives,
        "lemma_counts": dict(sorted(lemma_counts.items())),
        "sidecars": sidecars,
        "fingerprint": fingerprint,
    }
    write_atomic(os.path.join(config.out_dir, state_file(task.split, chunk.index, "json")),
                  json.dumps(sidecar, sort_keys=True).encode("utf-8"))
    return dict(sidecar, skipped=False)


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
