"""example_proto.py: encode_record equals schema.encode_example byte for byte; varints."""
import numpy as np
import pytest

from data_prep import example_proto, schema


@pytest.mark.parametrize("num_boxes, label", [(1, 1), (5, 0), (0, None), (3, None)])
def test_encode_record_equals_schema_encode_example_byte_for_byte(num_boxes, label):
    rng = np.random.default_rng(num_boxes)
    args = dict(product_id=2 ** 40 + 3, query_id=7, image_h=800, image_w=600,
                query='"silk" scarf é', query_lemmas=["silk", "scarf", "é"] if num_boxes else [],
                query_key=2 ** 62 + 5, boxes=rng.random((num_boxes, 4), dtype=np.float32),
                box_geometry=rng.random((num_boxes, 6), dtype=np.float32),
                box_features=rng.random((num_boxes, schema.FEATURE_DIM), dtype=np.float32),
                box_labels=rng.integers(0, 33, num_boxes) if num_boxes != 3 else
                np.array([0, -2, 300]), label=label)
    assert example_proto.encode_record(**args) == schema.encode_example(**args)


def _read_varint(data, pos):
    value = shift = 0
    while True:
        value, pos, shift = value | (data[pos] & 0x7F) << shift, pos + 1, shift + 7
        if data[pos - 1] < 0x80:
            return value, pos


def test_key_order_is_the_order_schema_encode_example_writes():
    n = 1
    data = schema.encode_example(0, 0, 1, 1, "q", ["q"], 0, np.zeros((n, schema.BOX_COORDS)),
                                 np.zeros((n, schema.GEOMETRY_DIM)),
                                 np.zeros((n, schema.FEATURE_DIM)), np.zeros(n, np.int64))
    _, pos = _read_varint(data, 1)  # Example.features
    keys = []
    while pos < len(data):  # Features.feature map entries: key (field 1), value (field 2)
        entry_len, pos = _read_varint(data, pos + 1)
        key_len, key_pos = _read_varint(data, pos + 1)
        keys.append(data[key_pos:key_pos + key_len].decode())
        pos += entry_len
    assert tuple(keys) == example_proto.KEY_ORDER


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"),
    (16384, b"\x80\x80\x01"), (2 ** 21, b"\x80\x80\x80\x01"),
    (-1, b"\xff" * 9 + b"\x01"),  # int64 -1: ten bytes, as protobuf writes it
])
def test_varint_by_hand(value, encoded):
    assert example_proto._varint(value) == encoded


def test_decode_int64_scalars_reads_ids_back_from_a_record():
    rng = np.random.default_rng(3)
    record = example_proto.encode_record(
        product_id=2 ** 40 + 3, query_id=7, image_h=800, image_w=600, query="silk",
        query_lemmas=["silk"], query_key=2 ** 62 + 5, boxes=rng.random((2, 4), dtype=np.float32),
        box_geometry=rng.random((2, 6), dtype=np.float32),
        box_features=rng.random((2, schema.FEATURE_DIM), dtype=np.float32),
        box_labels=np.array([1, 2]), label=None)
    got = example_proto.decode_int64_scalars(
        record, [schema.PRODUCT_ID, schema.QUERY_ID, schema.LABEL, schema.QUERY, "absent"])
    # LABEL None is written as UNKNOWN_LABEL (-1, a ten-byte varint); QUERY holds bytes.
    assert got == {schema.PRODUCT_ID: 2 ** 40 + 3, schema.QUERY_ID: 7,
                   schema.LABEL: schema.UNKNOWN_LABEL}
    with pytest.raises(ValueError):
        example_proto.decode_int64_scalars(record[:-3], [schema.PRODUCT_ID])


@pytest.mark.parametrize("query, key", [("", 0), ("q", 127), ("x" * 125, 128),
                                        ("é" * 64, 2 ** 62 + 5), ("silk " * 60, 1)])
def test_query_entries_of_every_size_equal_schema_encode_example(query, key):
    # Query lengths around the 1- / 2-byte varint boundary (127, 128 bytes) and keys on
    # both sides of it; the entries are built from prefixes cached by size.
    example_proto.clear_caches()
    rng = np.random.default_rng(len(query))
    lemmas = query.split() or ["q"]
    args = dict(product_id=1, query_id=2, image_h=3, image_w=4, query=query,
                query_lemmas=lemmas, query_key=key, boxes=rng.random((2, 4), dtype=np.float32),
                box_geometry=rng.random((2, 6), dtype=np.float32),
                box_features=rng.random((2, schema.FEATURE_DIM), dtype=np.float32),
                box_labels=np.array([1, 2]), label=1)
    for _ in range(2):  # built, then cached
        assert example_proto.encode_record(**args) == schema.encode_example(**args)
