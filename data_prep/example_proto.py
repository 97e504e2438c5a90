"""One record of a shard: a tf.train.Example written directly in the protobuf wire format.

`encode_record` gives the bytes of `schema.encode_example`, byte for byte (a test checks it),
without building protobuf messages: prep workers then need neither protobuf nor TensorFlow,
and a row costs a few byte joins instead of a message per feature.

Dimension legend: N boxes, F region-feature width (2048), G geometry width (6).
"""
import functools
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from data_prep import schema

# Normalised queries and their encoded entries are cached per process: valid/test repeat
# each query for every candidate in a row, and train repeats many queries.
QUERY_CACHE_SIZE = 1 << 16

_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of an int64 (a negative one takes ten bytes)."""
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


@functools.lru_cache(maxsize=QUERY_CACHE_SIZE)
def _query_entries(query: str, lemmas: Tuple[str, ...], key: int) -> Tuple[bytes, ...]:
    """The entries of QUERY, QUERY_LEMMAS and QUERY_KEY, cached: queries repeat (and most
    of a new one's bytes come from the size-keyed _prefix cache)."""
    text, key_bytes = query.encode("utf-8"), _varint(key)
    return (_prefix(schema.QUERY, "bytes", len(text)) + text,
            _entry(schema.QUERY_LEMMAS, _bytes_feature([t.encode("utf-8") for t in lemmas])),
            _prefix(schema.QUERY_KEY, "int64", len(key_bytes)) + key_bytes)


def clear_caches() -> None:
    """Empties the caches of encoded entries (a new process starts without them)."""
    for cached in (_prefix, _scalar_entry, _query_entries):
        cached.cache_clear()


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


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    """(value, position after it) of the varint at data[pos]."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _len_fields(data: bytes, start: int, end: int) -> Iterator[Tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of a message in
    data[start:end]; varint fields are skipped, other wire types refused."""
    pos = start
    while pos < end:
        tag, pos = _read_varint(data, pos)
        if tag & 7 == 0:
            _, pos = _read_varint(data, pos)
            continue
        if tag & 7 != 2:
            raise ValueError(f"unexpected wire type {tag & 7}")
        size, pos = _read_varint(data, pos)
        if pos + size > end:
            raise ValueError("field runs past its message")
        yield tag >> 3, pos, pos + size
        pos += size


def decode_int64_scalars(record: bytes, keys: Sequence[str]) -> Dict[str, int]:
    """The first int64 value of each of `keys` in a serialised tf.train.Example.

    Reads only what it needs (no protobuf runtime), e.g. to recount (query_id, product_id)
    pairs of a shard without TensorFlow.

    Args:
      record: a serialised Example.
      keys: feature names holding an int64_list.
    Returns:
      {key: value} for the keys present with at least one value (int64, sign restored).
    Raises:
      ValueError: the bytes are not a well-formed Example.
    """
    wanted = {key.encode("utf-8"): key for key in keys}
    out: Dict[str, int] = {}
    for field, start, end in _len_fields(record, 0, len(record)):
        if field != 1:
            continue
        for _, entry_start, entry_end in _len_fields(record, start, end):  # map entries
            name, value = None, None
            for number, s, e in _len_fields(record, entry_start, entry_end):
                if number == 1:
                    name = record[s:e]
                elif number == 2:
                    value = (s, e)
            if name not in wanted or value is None:
                continue
            for kind, s, e in _len_fields(record, *value):
                if kind != 3:  # Feature.int64_list
                    continue
                for number, vs, ve in _len_fields(record, s, e):
                    if number == 1 and ve > vs:  # packed values
                        v, _ = _read_varint(record, vs)
                        out[wanted[name]] = v - (1 << 64) if v >= 1 << 63 else v
    return out
