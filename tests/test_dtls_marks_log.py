"""The DTLS record marks' log (dtls/store.py): marks appended at each bus commit, a pack a row, are
what a restore reads until their writer folds them into the rows (every FOLD_EVERY packs, or a save or
a restore first); a row saved again says the top itself.  The lane's C fold against its Python twin."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corem.dtls.store import SessionStore, _fold_packs, fold_marks, pack_marks
from corem.dtls.store import FOLD_EVERY, RX_TOP, SCHEMA, _rx_log
from corem.registry.db import Db, add_columns

A, B = b"\x0a\x00\x00\x01\x16\x33", b"\x0a\x00\x00\x02\x16\x33"


def row(key: bytes, top: int) -> tuple[bytes, bytes, str, str, float, int]:
    return (key, b"sealed-state", "t", "d", 1.0, top)


def logged(store: SessionStore) -> int:
    return int(store.db.execute("SELECT count(*) FROM rx_pack").fetchone()[0])


def test_a_restore_reads_the_marks_not_folded_yet_and_takes_them(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    assert store.put([row(A, 5), row(B, 5)])
    assert store.log_marks(pack_marks([(9, A), (7, B)])) and store.log_marks(pack_marks([(12, A)]))
    assert logged(store) == 2  # (a row a write, whatever the marks in it)
    taken = store.take(A)
    assert taken is not None and taken[5] == 12  # (the row said 5)
    assert logged(store) == 0  # (folded first: B's row says 7 now)
    assert store.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (B,)).fetchone()[0] == 7
    assert store.take(A) is None


def test_the_fold_raises_the_rows_and_empties_the_log_and_never_lowers(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    assert store.put([row(A, 20), row(B, 5)])
    assert store.log_marks(pack_marks([(9, A), (7, B), (6, B), (3, b"no-such-session")]))
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
    assert store.log_marks(pack_marks([(900, A), (3, B)]))
    assert store.put([row(A, 2)])  # (a new handshake, saved at its first record)
    fold_marks(store.db)
    taken = store.take(A)
    assert taken is not None and taken[5] == 2
    assert logged(store) == 0


def test_a_new_process_folds_what_a_stopped_one_left(tmp_path):
    first = SessionStore(tmp_path / "s.db")
    assert first.put([row(A, 1)]) and first.log_marks(pack_marks([(40, A)]))
    first.close()  # (it stops before its checkpointer folded)
    again = SessionStore(tmp_path / "s.db")
    assert logged(again) == 0
    assert again.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (A,)).fetchone()[0] == 40


def test_a_fold_from_another_connection_between_marks_and_take(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)  # (another writer's: a worker's)
    assert store.put([row(A, 1)]) and store.log_marks(pack_marks([(8, A)]))
    fold_marks(other)
    assert store.log_marks(pack_marks([(11, A)]))
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
            assert store.log_marks(pack_marks([(top, A)]))
            highest = max(highest, top)
        else:
            fold_marks(store.db)
    taken = store.take(A)
    assert taken is not None and taken[5] == highest
    store.close()


marks_lists = st.lists(st.tuples(st.integers(-1, 2**63 - 1), st.binary(max_size=20)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(marks_lists, max_size=5), st.lists(st.binary(max_size=30), max_size=2))
def test_the_c_fold_is_its_python_twin_for_packs_and_for_bytes_that_are_not(packs, junk):
    """Each key's highest top, in the order keys first appear, from C and from Python alike; bytes
    that are not a pack refused by both, with the same reason."""
    _lane = pytest.importorskip("corem.fastlane._lane")
    packed = [pack_marks(marks) for marks in packs]
    expected = {}
    for marks in packs:
        for top, key in marks:
            expected[key] = max(top, expected.get(key, top))
    assert _lane.fold_marks(packed) == _fold_packs(packed) == [(t, k, t) for k, t in expected.items()]
    for extra in junk:
        try:
            want = _fold_packs([*packed, extra])
        except ValueError as e:
            with pytest.raises(ValueError) as c_error:
                _lane.fold_marks([*packed, extra])
            assert str(c_error.value) == str(e)
        else:
            assert _lane.fold_marks([*packed, extra]) == want


def test_a_store_of_the_row_a_mark_log_is_folded_when_it_moves_to_packs(tmp_path):
    """A session store written by a corem whose log held a row a mark (version 2): at start its
    marks raise the rows, and the log is the packs' from then on."""
    where = tmp_path / "s.db"
    db = Db(where)
    db.schema(SCHEMA)
    db.migrate("dtls_sessions", (add_columns("sessions", (RX_TOP,)), _rx_log))
    db.execute("INSERT INTO sessions (peer, blob, tenant, device, last_seen, rx_top) VALUES (?, ?, 't', 'd', 1.0, 5)",
               (A, b"sealed-state"))
    db.executemany("INSERT INTO rx_log (peer, rx_top) VALUES (?, ?)", [(A, 9), (A, 30), (B, 4)])
    db.close()
    store = SessionStore(where)
    assert store.db.columns("rx_log") == set() and logged(store) == 0
    taken = store.take(A)
    assert taken is not None and taken[5] == 30


def test_the_writer_folds_every_so_many_appends_and_a_row_that_is_no_pack_is_dropped(tmp_path):
    """The appender folds the log itself (no other connection's lock to wait for), every
    FOLD_EVERY packs; a row that is not a pack (not the lane's) is dropped by the fold, the marks
    beside it folded."""
    store = SessionStore(tmp_path / "s.db")
    assert store.put([row(A, 0), row(B, 0)])
    store.db.execute("INSERT INTO rx_pack (marks) VALUES (?)", (b"\x07not-a-pack",))
    store.db.execute("INSERT INTO rx_pack (marks) VALUES ('text, not a blob')")  # (SQLite keeps TEXT as TEXT)
    for top in range(1, FOLD_EVERY):
        assert store.log_marks(pack_marks([(top, A)]))
    assert logged(store) == FOLD_EVERY + 1  # (the writer's own FOLD_EVERY - 1, and the two stray rows)
    assert store.log_marks(pack_marks([(5, B)]))
    assert logged(store) == 0
    tops = dict(store.db.execute("SELECT peer, rx_top FROM sessions").fetchall())
    assert tops == {A: FOLD_EVERY - 1, B: 5} and store.errors == 0
    assert store.take(A) is not None  # (a restore reads no stray row either)


def test_a_save_waits_for_the_marks_writer_instead_of_failing(tmp_path):
    """A save folds the log (a read) before it writes: it takes the write lock first, so a pack the
    marks' writer (another connection) commits meanwhile makes it wait, not fail."""
    store = SessionStore(tmp_path / "s.db")
    writer = SessionStore(tmp_path / "s.db")
    assert store.put([row(A, 1)])
    real = store.db.executemany
    appended = []

    def executemany(sql, args):  # (the writer appends between the save's fold and its upsert)
        if not appended and sql.startswith("INSERT INTO"):
            appended.append(writer.log_marks(pack_marks([(9, B)])))
        return real(sql, args)

    store.db.executemany = executemany  # type: ignore[method-assign]
    writer.db.execute("PRAGMA busy_timeout = 200")  # (it waits for the save's lock, then gives up)
    assert store.put([row(A, 2)]) and store.errors == 0
    assert appended == [False]  # (the save held the write lock: the append waited, then gave up)
