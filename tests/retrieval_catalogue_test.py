"""retrieval.catalogue.IdSet, the seen-id set of `mmrecall index`: the same answers as a
Python set for any sequence of adds, updates and lookups, at about 8 bytes per id."""
import numpy as np
from hypothesis import given, settings, strategies as st

from retrieval import catalogue

_IDS = st.integers(min_value=-2 ** 63, max_value=2 ** 63 - 1)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "update"]),
                              st.lists(st.one_of(_IDS, st.integers(0, 20)), max_size=6)),
                    max_size=40),
       probes=st.lists(st.one_of(_IDS, st.integers(0, 20)), max_size=30),
       buffer=st.integers(1, 5))
def test_answers_as_a_python_set(ops, probes, buffer):
    ids, expected = catalogue.IdSet(buffer=buffer), set()
    for kind, values in ops:
        if kind == "add":
            for v in values:
                ids.add(v)
        else:
            ids.update(np.array(values, np.int64))
        expected.update(values)
        assert len(ids) == len(expected)
    for v in probes + sorted(expected):
        assert (v in ids) == (v in expected)


def test_an_id_array_costs_8_bytes_each():
    ids = catalogue.IdSet(np.arange(10 ** 6, dtype=np.int64) * 7, buffer=1024)
    for v in range(5000):
        ids.add(v * 7 + 1)                           # none is a multiple of 7: all new
    assert len(ids) == 10 ** 6 + 5000
    assert ids.nbytes == 8 * len(ids)                # len() merged the buffer
    assert 7 * 999_999 in ids and 7 * 4999 + 1 in ids and 7 * 5000 + 1 not in ids
