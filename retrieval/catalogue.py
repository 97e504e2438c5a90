"""Product rows of competition TSVs: streamed for indexing, re-read by location for reranking.

A catalogue is one or more TSVs in the competition's format (train/valid/test files or a
product dump with the same header). Only the product columns are read: the query and
query_id columns are ignored, since a product appears with many queries. Every row is
validated as prep validates it (data_prep.tsv.parse_row) with those two columns replaced by
valid placeholders; a bad row is reported as a Reject (file, line, field, reason, detail)
and never embedded. The request sent to the model is the row's own TSV fields (base64 text
and integers), as `mmrecall rank` sends them, so a row's location (file, byte offset,
length) is enough to rebuild it later.
"""
import bisect
import os
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from data_prep import schema
from data_prep import tsv
from export import signatures as sig_lib

_COL = {name: i for i, name in enumerate(schema.TSV_COLUMNS)}
_QUERY_COLUMNS = (_COL["query"], _COL["query_id"])
_INT_FIELDS = ("num_boxes", "image_h", "image_w")
REJECTS_HEADER = "file\tline\tfield\treason\tdetail\n"


class CatalogueError(RuntimeError):
    """A catalogue file cannot be read, or changed since it was indexed."""


class Position(NamedTuple):
    """Where a stream stands: file index, byte offset in it, 1-based line number of the
    next line (the header is line 1)."""
    file: int
    offset: int
    line: int


class Product(NamedTuple):
    """One valid product row.

    Attributes:
      fields: {PRODUCT_FIELDS: value}: base64 text (bytes) or int.
      location: (file index, byte offset, byte length) of the line (its ending excluded).
      end: the stream position just after this line.
    """
    product_id: int
    fields: Dict[str, Union[bytes, int]]
    location: Tuple[int, int, int]
    end: Position


class Reject(NamedTuple):
    """A row left out: its file, line and the validator's field, reason and detail."""
    path: str
    line: int
    field: str
    reason: str
    detail: str

    def tsv_line(self) -> str:
        """The rejects-file line (REJECTS_HEADER's columns)."""
        return f"{self.path}\t{self.line}\t{self.field}\t{self.reason}\t{self.detail}\n"


class Duplicate(NamedTuple):
    """A row whose product id came earlier in the stream (embedded once, from its first)."""
    product_id: int


def file_stamp(path: str) -> Dict[str, object]:
    """{path (absolute), size, mtime_ns}: enough to notice a file changed after indexing."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fields_of(values: List[bytes]) -> Dict[str, Union[bytes, int]]:
    fields: Dict[str, Union[bytes, int]] = {
        k: values[_COL[k]] for k in sig_lib.PRODUCT_B64_FIELDS}
    fields.update({k: int(values[_COL[k]]) for k in _INT_FIELDS})
    return fields


def validate_line(line: bytes) -> Tuple[int, Dict[str, Union[bytes, int]]]:
    """Validates one data line (no line ending) as a product row.

    Returns:
      (product_id, request fields).
    Raises:
      data_prep.tsv.RowError naming the field and reason of the first problem.
    """
    values = line.split(b"\t")
    if len(values) == len(schema.TSV_COLUMNS):
        # The query columns are not the product's: placeholders keep parse_row from
        # rejecting a product for its query (an undecodable query, a bad query_id).
        values[_QUERY_COLUMNS[0]], values[_QUERY_COLUMNS[1]] = b"q", b"0"
        row = tsv.parse_row(b"\t".join(values))
    else:
        row = tsv.parse_row(line)          # raises the column_count error
    return row.product_id, _fields_of(values)


class IdSet:
    """A set of int64 product ids at about 8 bytes each (a Python set of ints takes ~74).

    Ids live in a sorted int64 array; new ones collect in a small Python set that is merged
    into the array once it holds `buffer` ids, so membership is a binary search plus a set
    lookup, and memory is the array, one buffer, and during a merge one copy of the array.
    """

    def __init__(self, ids: Iterable[int] = (), buffer: int = 65536):
        self._sorted = np.zeros([0], np.int64)
        self._view = memoryview(self._sorted)
        self._recent: set = set()
        self._buffer = buffer
        self.update(ids)

    def __contains__(self, product_id: int) -> bool:
        if product_id in self._recent:
            return True
        # bisect over the array's buffer: a C loop, several times faster than a scalar
        # np.searchsorted call.
        i = bisect.bisect_left(self._view, product_id)
        return i < len(self._view) and self._view[i] == product_id

    def __len__(self) -> int:
        self._merge()
        return len(self._sorted)

    def add(self, product_id: int) -> None:
        """Adds one id (no effect if present)."""
        self._recent.add(int(product_id))
        if len(self._recent) >= self._buffer:
            self._merge()

    def update(self, ids: Iterable[int]) -> None:
        """Adds many ids (an int64 array or any iterable of ints)."""
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), np.int64)
        self._recent.update(np.unique(ids.reshape(-1)).tolist())
        self._merge()

    def _merge(self) -> None:
        # Inserting the sorted new ids copies the array once (peak: two arrays).
        new = np.sort(np.fromiter(self._recent, np.int64, len(self._recent)))
        position = np.searchsorted(self._sorted, new)
        present = position < len(self._sorted)
        present[present] = self._sorted[position[present]] == new[present]
        self._sorted = np.insert(self._sorted, position[~present], new[~present])
        self._view = memoryview(self._sorted)
        self._recent = set()

    @property
    def nbytes(self) -> int:
        """Bytes of the sorted array (the buffer's Python ints not counted)."""
        return int(self._sorted.nbytes)


def iter_rows(paths: Sequence[str], start: Optional[Position] = None,
              seen: Optional[IdSet] = None) -> Iterator[Union[Product, Reject, Duplicate]]:
    """Streams the product rows of the files, in file order, from `start` on.

    Holds one line at a time. Empty lines are skipped silently.

    Args:
      paths: catalogue TSVs (header checked).
      start: resume here (a Product.end from an earlier run over the same files).
      seen: product ids already emitted (an IdSet or a set, updated in place): their rows
        are Duplicates.
    Yields:
      Product, Reject or Duplicate, in line order.
    Raises:
      data_prep.tsv.TsvFormatError: a file is empty or its header is wrong.
    """
    start = start or Position(0, 0, 1)
    seen = IdSet() if seen is None else seen
    for file_index in range(start.file, len(paths)):
        path = paths[file_index]
        with open(path, "rb") as f:
            header = f.readline()
            tsv.check_header(path, header or None)
            offset, line_no = len(header), 1
            if file_index == start.file and start.offset > offset:
                f.seek(start.offset)
                offset, line_no = start.offset, start.line - 1
            for raw in f:
                line_no += 1
                line_start, offset = offset, offset + len(raw)
                line = raw.rstrip(b"\r\n")
                if not line:
                    continue
                try:
                    product_id, fields = validate_line(line)
                except tsv.RowError as e:
                    yield Reject(path, line_no, e.field, e.reason, e.detail)
                    continue
                if product_id in seen:
                    yield Duplicate(product_id)
                    continue
                seen.add(product_id)
                yield Product(product_id, fields, (file_index, line_start, len(line)),
                              Position(file_index, offset, line_no + 1))


class RowReader:
    """Re-reads indexed rows by location, checking the files did not change."""

    def __init__(self, stamps: Sequence[Dict[str, object]]):
        """Args:
          stamps: file_stamp() of each catalogue file, as recorded at indexing.
        Raises:
          CatalogueError: a file is missing or its size or modification time changed.
        """
        self._files = []
        for stamp in stamps:
            path = stamp["path"]
            if not os.path.exists(path):
                raise CatalogueError(f"{path}: catalogue file of the index is missing")
            now = file_stamp(path)
            if (now["size"], now["mtime_ns"]) != (stamp["size"], stamp["mtime_ns"]):
                raise CatalogueError(f"{path}: changed since it was indexed (size "
                                     f"{stamp['size']} -> {now['size']}); index it again")
            self._files.append(open(path, "rb"))

    def fields(self, product_id: int, location: Sequence[int]) -> Dict[str, Union[bytes, int]]:
        """The request fields of the row at location (file, offset, length).

        Raises:
          CatalogueError: the row there is not product_id's.
        """
        f = self._files[int(location[0])]
        f.seek(int(location[1]))
        values = f.read(int(location[2])).split(b"\t")
        if len(values) != len(schema.TSV_COLUMNS) or values[_COL["product_id"]] != \
                str(int(product_id)).encode():
            raise CatalogueError(f"{f.name}: byte {int(location[1])} is not the row of product "
                                 f"{int(product_id)}; index it again")
        return _fields_of(values)

    def close(self) -> None:
        """Closes the files."""
        for f in self._files:
            f.close()
