"""TFRecord files written without TensorFlow, byte for byte as tf.io.TFRecordWriter does.

Each record is framed by its uint64 little-endian length, the length's masked CRC32C, the
record and the record's masked CRC32C; GZIP files use TensorFlow's zlib settings (a test
compares the two writers). `read_records` checks that framing while reading a file back, and
`file_crc32c` is the checksum prep records of a whole shard file.
"""
import gzip as gzip_lib
import struct
import zlib
from typing import BinaryIO, Iterator, Tuple

import google_crc32c

_U64, _U32 = struct.Struct("<Q"), struct.Struct("<I")


def masked_crc32c(data: bytes) -> bytes:
    """The 4-byte masked CRC32C that TFRecord framing stores after a length and a record."""
    crc = google_crc32c.value(data)
    return _U32.pack(((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF)


class CorruptRecordsError(ValueError):
    """A TFRecord file whose framing does not check out (message names the file and offset)."""


class RecordWriter:
    """Writes a TFRecord file as tf.io.TFRecordWriter(path, options) does; a context manager.

    Attributes:
      crc32c: CRC32C of the file's bytes written so far (compressed bytes for GZIP), final
        after close(); equals file_crc32c(path)[0].

    Args:
      path: the file to create.
      gzip: GZIP-compress it (TensorFlow's defaults: level 6, 15-bit window, memLevel 9).
    """

    def __init__(self, path: str, gzip: bool = False):
        self._file = open(path, "wb", buffering=1 << 20)
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                         16 + zlib.MAX_WBITS, 9) if gzip else None
        self.crc32c = 0

    def _put(self, data: bytes) -> None:
        # Checksummed on the way out: the file is never read back to get its checksum.
        self.crc32c = google_crc32c.extend(self.crc32c, data)
        self._file.write(data)

    def write(self, record: bytes) -> None:
        """Appends one record (any bytes, e.g. a serialised tf.train.Example)."""
        length = _U64.pack(len(record))
        for piece in (length + masked_crc32c(length), record, masked_crc32c(record)):
            self._put(self._deflate.compress(piece) if self._deflate else piece)

    def close(self) -> None:
        """Flushes the GZIP stream, if any, and closes the file."""
        if self._deflate is not None:
            self._put(self._deflate.flush())
            self._deflate = None
        self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_crc32c(path: str) -> Tuple[int, int]:
    """(CRC32C, size in bytes) of a whole file, read in 1 MB blocks."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 20):
            crc, size = google_crc32c.extend(crc, block), size + len(block)
    return crc, size


def _read_exactly(f: BinaryIO, n: int, path: str, offset: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptRecordsError(f"{path}: truncated {what} at record offset {offset} "
                                  f"({len(data)} of {n} bytes)")
    return data


def read_records(path: str, gzip: bool = False) -> Iterator[bytes]:
    """Reads a TFRecord file back, checking every length and record CRC.

    Args:
      path: the file.
      gzip: it is GZIP-compressed.
    Yields:
      Each record's bytes, in file order.
    Raises:
      CorruptRecordsError: a CRC mismatch, a truncated record or a broken GZIP stream,
        naming the file and the (uncompressed) offset of the bad record.
    """
    with (gzip_lib.open(path, "rb") if gzip else open(path, "rb", buffering=1 << 20)) as f:
        offset = 0
        try:
            while head := f.read(12):
                if len(head) != 12:
                    raise CorruptRecordsError(f"{path}: truncated length at record offset "
                                              f"{offset}")
                length = head[:8]
                if masked_crc32c(length) != head[8:]:
                    raise CorruptRecordsError(f"{path}: length CRC mismatch at record offset "
                                              f"{offset}")
                size = _U64.unpack(length)[0]
                record = _read_exactly(f, size, path, offset, "record")
                if masked_crc32c(record) != _read_exactly(f, 4, path, offset, "record CRC"):
                    raise CorruptRecordsError(f"{path}: record CRC mismatch at record offset "
                                              f"{offset}")
                offset += 16 + size
                yield record
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            if isinstance(e, OSError) and not isinstance(e, gzip_lib.BadGzipFile):
                raise
            raise CorruptRecordsError(f"{path}: broken GZIP stream near record offset "
                                      f"{offset} ({e})") from None
