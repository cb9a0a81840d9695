"""The offloaded sessions' keys as fingerprints (corem/dtls/keyset.py): the C table and its Python
twin answer every sequence of operations the same, and the C one costs at most 22 bytes a key."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import given, settings, strategies as st

from corem.dtls import keyset
from corem.dtls.keyset import KeySetPy

C = keyset.KeySet if keyset.KeySet is not KeySetPy else None
needs_c = pytest.mark.skipif(C is None, reason="_keyset.c is not built (or COREM_PURE_PYTHON)")

_KEYS = st.binary(min_size=0, max_size=19)
_OPS = st.lists(st.tuples(st.sampled_from(["add", "discard", "update", "difference_update"]),
                          st.lists(_KEYS, min_size=1, max_size=6)), max_size=300)


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.lists(_KEYS, max_size=20), _OPS, st.lists(_KEYS, max_size=30))
def test_the_c_keyset_is_its_python_twin(initial, ops, probes):
    """Adds, discards (of keys in and not in the set: the table's backward shift), updates: the same
    members and the same length after every step, and against a plain set of the keys"""
    c, py, truth = C(initial), KeySetPy(initial), set(initial)
    for op, keys in ops:
        if op in ("add", "discard"):
            for k in keys:
                getattr(c, op)(k)
                getattr(py, op)(k)
                getattr(truth, op)(k)
        else:
            getattr(c, op)(keys)
            getattr(py, op)(keys)
            getattr(truth, op)(keys)
        assert len(c) == len(py) == len(truth)
    for k in [*probes, *truth, *initial]:
        assert (k in c) == (k in py) == (k in truth)


@needs_c
def test_many_keys_in_and_out_of_the_table():
    """100,000 session keys in, every other one out again (the table grows and shifts its runs
    back): exactly the rest remain, and nothing else is found"""
    keys = [os.urandom(7) for _ in range(100_000)]
    s = C(keys[:50_000])
    s.update(keys[50_000:])
    s.difference_update(keys[::2])
    assert len(s) == 50_000
    assert all(k in s for k in keys[1::2]) and not any(k in s for k in keys[::2])
    assert not any(os.urandom(8) in s for _ in range(10_000))


@needs_c
def test_the_c_keyset_costs_at_most_22_bytes_a_key():
    """(A Python set of the same keys: ~80 bytes each, the bytes objects included.)"""
    keys = [b"c" + os.urandom(6) for _ in range(100_000)]
    s = C(keys)
    assert sys.getsizeof(s) <= 22 * len(keys) + 1024
    assert sys.getsizeof(set(keys)) + sum(sys.getsizeof(k) for k in keys) > 70 * len(keys)


@pytest.mark.parametrize("make", [KeySetPy, *([C] if C else [])])
def test_only_bytes_are_session_keys(make):
    s = make()
    with pytest.raises(TypeError, match="a session key is bytes"):
        s.add("peer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a session key is bytes"):
        "peer" in s  # noqa: B015
