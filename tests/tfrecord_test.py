"""tfrecord.py: RecordWriter writes what tf.io.TFRecordWriter writes; the masked CRC32C;
reading back with framing checks; the whole-file checksum."""
import google_crc32c
import numpy as np
import pytest

from data_prep import tfrecord


@pytest.mark.parametrize("compression", ["", "GZIP"])
@pytest.mark.parametrize("sizes", [[], [0], [3, 70_001, 0, 129, 16_385]])
def test_record_writer_writes_what_tf_writes_byte_for_byte(tmp_path, compression, sizes):
    import tensorflow as tf

    rng = np.random.default_rng(len(sizes))
    records = [rng.integers(0, 4, size, np.uint8).tobytes() for size in sizes]  # compressible
    with tfrecord.RecordWriter(str(tmp_path / "ours"), gzip=compression == "GZIP") as writer:
        for record in records:
            writer.write(record)
    with tf.io.TFRecordWriter(str(tmp_path / "tf"),
                              tf.io.TFRecordOptions(compression_type=compression)) as writer:
        for record in records:
            writer.write(record)
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "tf").read_bytes()
    got = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours"), compression)]
    assert got == records


def test_masked_crc32c_by_hand():
    # CRC32C("123456789") = 0xE3069283 (the standard check value); masked:
    # rotate right by 15 -> 0x2507C60D, + 0xA282EAD8 -> 0xC78AB0E5 (mod 2^32), little-endian.
    assert tfrecord.masked_crc32c(b"123456789") == bytes.fromhex("e5b08ac7")


@pytest.mark.parametrize("gzip", [False, True])
def test_read_records_returns_what_was_written_and_the_writer_checksums_the_file(tmp_path,
                                                                                 gzip):
    records = [b"", b"a" * 7, bytes(range(256)) * 5]
    path = str(tmp_path / "r")
    with tfrecord.RecordWriter(path, gzip=gzip) as writer:
        for record in records:
            writer.write(record)
    data = open(path, "rb").read()
    assert tfrecord.file_crc32c(path) == (google_crc32c.value(data), len(data))
    assert writer.crc32c == google_crc32c.value(data)
    assert list(tfrecord.read_records(path, gzip)) == records


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:3] + bytes([d[3] ^ 1]) + d[4:], "length CRC mismatch at record offset 0"),
    (lambda d: d[:-6] + bytes([d[-6] ^ 1]) + d[-5:], "record CRC mismatch at record offset 23"),
    (lambda d: d[:-2], "truncated record CRC at record offset 23"),
    (lambda d: d + b"\0" * 5, "truncated length at record offset"),
])
def test_read_records_names_the_file_and_offset_of_a_bad_record(tmp_path, damage, message):
    # Two records of 7 and 3 bytes: the second starts at 8 + 4 + 7 + 4 = 23.
    path = str(tmp_path / "r")
    with tfrecord.RecordWriter(path) as writer:
        writer.write(b"1234567")
        writer.write(b"abc")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(tfrecord.CorruptRecordsError, match=f"{path}: {message}"):
        list(tfrecord.read_records(path))


def test_read_records_refuses_a_broken_gzip_stream(tmp_path):
    path = str(tmp_path / "r.gz")
    with tfrecord.RecordWriter(path, gzip=True) as writer:
        writer.write(b"x" * 1000)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(tfrecord.CorruptRecordsError, match=path):
        list(tfrecord.read_records(path, gzip=True))
