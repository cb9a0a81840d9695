"""The DTLS record marks' log (dtls/store.py): marks appended at each bus commit are what a restore
reads until the checkpointer folds them into the rows; a row saved again says the top itself."""

from __future__ import annotations

import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from corem.dtls.store import SessionStore, fold_marks

A, B = b"\x0a\x00\x00\x01\x16\x33", b"\x0a\x00\x00\x02\x16\x33"


def row(key: bytes, top: int) -> tuple[bytes, bytes, str, str, float, int]:
    return (key, b"sealed-state", "t", "d", 1.0, top)


def logged(store: SessionStore) -> int:
    return int(store.db.execute("SELECT count(*) FROM rx_log").fetchone()[0])


def test_a_restore_reads_the_marks_not_folded_yet_and_takes_them(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    assert store.put([row(A, 5), row(B, 5)])
    assert store.log_marks([(9, A), (7, B)]) and store.log_marks([(12, A)])
    assert logged(store) == 3
    taken = store.take(A)
    assert taken is not None and taken[5] == 12  # (the row said 5)
    assert logged(store) == 1  # (A's went with it; B's wait for the fold)
    assert store.take(A) is None


def test_the_fold_raises_the_rows_and_empties_the_log_and_never_lowers(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    assert store.put([row(A, 20), row(B, 5)])
    assert store.log_marks([(9, A), (7, B), (6, B), (3, b"no-such-session")])
    fold_marks(store.db)
    tops = dict(store.db.execute("SELECT peer, rx_top FROM sessions").fetchall())
    assert tops == {A: 20, B: 7} and logged(store) == 0
    fold_marks(store.db)  # (an empty log: nothing to do)
    assert logged(store) == 0


def test_saving_a_row_again_drops_the_older_marks_of_its_peer(tmp_path):
    """A new session of the same peer starts its numbers again: marks of the one before must not
    become its floor."""
    store = SessionStore(tmp_path / "s.db")
    assert store.put([row(A, 500)])
    assert store.log_marks([(900, A), (3, B)])
    assert store.put([row(A, 2)])  # (a new handshake, saved at its first record)
    fold_marks(store.db)
    taken = store.take(A)
    assert taken is not None and taken[5] == 2
    assert logged(store) == 0


def test_a_new_process_folds_what_a_stopped_one_left(tmp_path):
    first = SessionStore(tmp_path / "s.db")
    assert first.put([row(A, 1)]) and first.log_marks([(40, A)])
    first.close()  # (it stops before its checkpointer folded)
    again = SessionStore(tmp_path / "s.db")
    assert logged(again) == 0
    assert again.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (A,)).fetchone()[0] == 40


def test_a_fold_from_another_connection_between_marks_and_take(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)  # (the checkpointer's own)
    assert store.put([row(A, 1)]) and store.log_marks([(8, A)])
    fold_marks(other)
    assert store.log_marks([(11, A)])
    taken = store.take(A)
    assert taken is not None and taken[5] == 11
    other.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["mark", "fold"]), st.integers(0, 2**48 - 1)), max_size=30))
def test_a_restore_always_reads_the_highest_mark(tmp_path_factory, steps):
    """Whatever the order of marks and folds, a restore's rx_top is the highest of the saved top
    and every mark since."""
    store = SessionStore(tmp_path_factory.mktemp("marks") / "s.db")
    assert store.put([row(A, 0)])
    highest = 0
    for what, top in steps:
        if what == "mark":
            assert store.log_marks([(top, A)])
            highest = max(highest, top)
        else:
            fold_marks(store.db)
    taken = store.take(A)
    assert taken is not None and taken[5] == highest
    store.close()
