"""The DTLS record marks the embedded bus carries (bus/sqlite.py `carry`, dtls/store.py): a pack of
marks in each batch's own transaction, in the bus's file; the session store reads the packs past
its place into its rows (every FOLD_EVERY packs, or a save or a restore first) and the bus deletes
what it has read; a row saved again says the top itself.  The lane's C fold against its Python
twin."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corem.bus import EmbeddedBus, Record
from corem.dtls.store import FOLD_STEP, RX_TOP, SCHEMA, SessionStore, _fold_packs, _rx_log, _rx_pack
from corem.dtls import store as store_module
from corem.dtls.store import Marks, pack_marks
from corem.errors import StartRefused
from corem.registry.db import Db, add_columns

A, B = b"\x0a\x00\x00\x01\x16\x33", b"\x0a\x00\x00\x02\x16\x33"


def row(key: bytes, top: int) -> tuple[bytes, bytes, str, str, float, int]:
    return (key, b"sealed-state", "t", "d", 1.0, top)


class Carried:
    """A session store reading the marks an embedded bus carries, wired as `corem serve` wires
    them (dtls/layer.py `carry_marks`); `commit(marks)` is a batch of one reading with them."""

    def __init__(self, where: Path, bus: Path | None = None, shared: bool = False) -> None:
        self.bus = EmbeddedBus(bus or where.parent / "bus.db", synchronous="NORMAL", shared=shared)
        self.store = SessionStore(where)
        self.due: list[bytes] = []
        self.bus.carry(self._take, lambda: self.store.folded_upto)
        self.store.read_marks_from(self.bus.path, self.bus.carry_lock)
        self.bus.open()

    def _take(self) -> bytes:
        pack, self.due = b"".join(self.due), []
        return pack

    def commit(self, *marks: tuple[int, bytes]) -> None:
        self.due.append(pack_marks(list(marks)))
        self.bus.write_prepared(self.bus.prepare([Record("telemetry.raw.t", b"d", b"{}", {})]))

    def unread(self) -> int:
        """Packs carried and not folded yet."""
        return int(self.store.db.execute(
            "SELECT count(*) FROM bus.carried WHERE n > (SELECT upto FROM rx_folded)").fetchone()[0])

    def top(self, key: bytes) -> int:
        return int(self.store.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (key,)).fetchone()[0])

    def close(self) -> None:
        self.store.close()
        self.bus.close_sync()


class Logged:
    """A session store whose sink cannot carry the marks (Kafka): the packs in its own file
    (dtls/layer.py `carry_marks`, store.py `log_marks_here`); `commit(marks)` is a batch's pack,
    committed before its readings would be submitted."""

    def __init__(self, where: Path) -> None:
        self.store = SessionStore(where)
        self.store.log_marks_here()

    def commit(self, *marks: tuple[int, bytes]) -> None:
        if marks:
            assert self.store.log_pack(pack_marks(list(marks)))

    def unread(self) -> int:
        return int(self.store.db.execute("SELECT count(*) FROM rx_packs").fetchone()[0])

    def top(self, key: bytes) -> int:
        return int(self.store.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (key,)).fetchone()[0])

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def carried(tmp_path):
    made: list[Carried] = []

    def make(name: str = "s.db", **kw) -> Carried:
        made.append(Carried(tmp_path / name, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture(params=[Carried, Logged], ids=["carried by the bus", "logged by the store"])
def marks_log(tmp_path, request):
    """Either place the marks wait to be folded: the embedded bus's file, or the store's own."""
    made: list = []

    def make(name: str = "s.db"):
        made.append(request.param(tmp_path / name))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.mark.parametrize("action", ["save", "restore"])
def test_a_save_or_restore_comes_after_a_pack_the_bus_thread_took_never_between(carried, action):
    """Found in review: in a worker thread the bus took the lane's pack before its transaction
    began, so a save or a restore could run between the take and the commit.  A save of a new
    session at the same address (no Connection ID: the same key) was then given the old session's
    marks as its floor; a restore missed the marks of the session's last records, which a replay
    could then bring again.  Now the bus holds `carry_lock` from before its transaction to its
    commit, and saves and restores wait for it: they see the pack."""
    import threading

    c = carried()
    assert c.store.put([row(A, 29)])  # the old session, saved
    taken, go = threading.Event(), threading.Event()

    def take() -> bytes:  # the bus's carrier, held just after the take
        taken.set()
        assert go.wait(60)
        return pack_marks([(40, A)])  # the old session's last readings' mark

    c.bus._carrier = (take, lambda: c.store.folded_upto)
    failures: list[BaseException] = []

    def run(f) -> threading.Thread:
        def guarded() -> None:
            try:
                f()
            except BaseException as e:  # noqa: BLE001 - (seen by the test below)
                failures.append(e)
        t = threading.Thread(target=guarded)
        t.start()
        return t

    bus = run(lambda: c.bus.write_prepared(c.bus.prepare([Record("telemetry.raw.t", b"d", b"{}", {})])))
    assert taken.wait(60)
    restored: list[object] = []
    if action == "save":
        saver = run(lambda: failures.append(AssertionError("save failed")) if not c.store.put([row(A, 0)]) else None)
    else:
        saver = run(lambda: restored.append(c.store.take(A)))
    saver.join(0.5)  # (the old code saved or restored here, before the commit; now it waits for it)
    assert saver.is_alive()
    go.set()
    bus.join(60)
    saver.join(60)
    assert not failures and not bus.is_alive() and not saver.is_alive()
    if action == "save":
        c.store.fold_marks()
        assert c.top(A) == 0  # the new session's own top, not its predecessor's 40
    else:
        [taken] = restored
        assert taken is not None and taken[5] == 40  # the floor past the last record taken


def test_a_restore_reads_the_marks_not_folded_yet(marks_log):
    c = marks_log()
    assert c.store.put([row(A, 5), row(B, 5)])
    c.commit((9, A), (7, B))
    c.commit((12, A))
    assert c.unread() == 2  # (a row a batch, whatever the marks in it)
    taken = c.store.take(A)
    assert taken is not None and taken[5] == 12  # (the row said 5)
    assert c.unread() == 0 and c.top(B) == 7  # (folded first)
    assert c.store.take(A) is None


def test_the_marks_are_in_the_batchs_own_transaction(carried):
    """Another connection sees a batch's records and its marks together or neither: one file, one
    commit."""
    c = carried()
    seen = sqlite3.connect(c.bus.path, isolation_level=None)
    real = c.bus._conn
    views = []

    class Watching:  # (the bus's connection, looked at from outside between its statements)
        def execute(self, sql, *args):
            views.append(seen.execute("SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM carried)").fetchone())
            return real.execute(sql, *args)

        @property
        def in_transaction(self):
            return real.in_transaction

    c.bus._conn = Watching()
    c.commit((9, A))
    c.bus._conn = real
    assert set(views) == {(0, 0)}  # (nothing of either before the COMMIT)
    assert seen.execute("SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM carried)").fetchone() == (1, 1)
    seen.close()


def test_the_fold_raises_the_rows_passes_the_place_and_never_lowers(carried):
    c = carried()
    assert c.store.put([row(A, 20), row(B, 5)])
    c.commit((9, A), (7, B), (6, B), (3, b"no-such-session"))
    c.store.fold_marks()
    assert (c.top(A), c.top(B)) == (20, 7) and c.unread() == 0 and c.store.folded_upto == 1
    c.store.fold_marks()  # (nothing past the place: nothing to do)
    assert c.store.folded_upto == 1


def test_saving_a_row_again_drops_the_older_marks_of_its_peer(marks_log):
    """A new session of the same peer starts its numbers again: marks of the one before must not
    become its floor."""
    c = marks_log()
    assert c.store.put([row(A, 500)])
    c.commit((900, A), (3, B))
    assert c.store.put([row(A, 2)])  # (a new handshake, saved at its first record)
    c.store.fold_marks()
    taken = c.store.take(A)
    assert taken is not None and taken[5] == 2


def test_the_bus_deletes_what_the_store_read_but_never_its_newest_row(carried):
    """Row numbers only grow: a new row is always past the store's place, even after every row the
    store read was deleted."""
    c = carried()
    assert c.store.put([row(A, 0)])
    for top in (1, 2, 3):
        c.commit((top, A))
    c.store.fold_marks()
    assert c.store.folded_upto == 3
    c.commit((4, A))  # (this batch deletes the rows below 3)
    assert [n for (n,) in c.store.db.execute("SELECT n FROM bus.carried ORDER BY n")] == [3, 4]
    c.store.fold_marks()
    c.commit()  # (no marks: nothing carried, nothing deleted)
    c.commit((5, A))
    assert [n for (n,) in c.store.db.execute("SELECT n FROM bus.carried ORDER BY n")] == [4, 5]
    taken = c.store.take(A)
    assert taken is not None and taken[5] == 5


def test_a_new_process_folds_what_a_stopped_one_left(marks_log, tmp_path):
    first = marks_log()
    assert first.store.put([row(A, 1)])
    first.commit((40, A))
    first.close()  # (it stops before its store folded)
    again = type(first)(tmp_path / "s.db")
    try:
        assert again.unread() == 0 and again.top(A) == 40
    finally:
        again.close()


def test_a_bus_file_made_anew_is_read_from_its_start(carried, tmp_path):
    """The store's place is a row number of one bus file: one whose rows end below it (deleted
    and made again, or put back from a backup) is read whole, or its marks would be skipped."""
    first = carried()
    assert first.store.put([row(A, 1)])
    for top in range(2, 6):
        first.commit((top, A))
    first.store.fold_marks()
    assert first.store.folded_upto == 4
    first.close()
    for name in ("bus.db", "bus.db-wal", "bus.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    fresh = EmbeddedBus(tmp_path / "bus.db", synchronous="NORMAL")
    fresh.open()
    fresh._conn.execute("INSERT INTO carried (blob) VALUES (?)", (pack_marks([(70, A)]),))  # (n = 1)
    fresh.close_sync()
    again = Carried(tmp_path / "s.db")
    try:
        assert again.top(A) == 70 and again.store.folded_upto == 1
    finally:
        again.close()


def test_workers_read_one_bus_and_one_store(carried):
    """Workers: one bus file, one session store, each process's own connections; whichever folds,
    a restore anywhere reads every mark."""
    one = carried(shared=True)
    two = carried(shared=True)
    assert one.store.put([row(A, 1), row(B, 1)])
    one.commit((8, A))
    two.commit((9, B))
    two.store.fold_marks()
    one.commit((11, A))
    taken = one.store.take(A)
    assert taken is not None and taken[5] == 11
    assert two.top(B) == 9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["mark", "fold"]), st.integers(0, 2**48 - 1)), max_size=30))
def test_a_restore_always_reads_the_highest_mark(tmp_path_factory, steps):
    """Whatever the order of marks and folds, a restore's rx_top is the highest of the saved top
    and every mark since."""
    c = Carried(tmp_path_factory.mktemp("marks") / "s.db")
    try:
        assert c.store.put([row(A, 0)])
        highest = 0
        for what, top in steps:
            if what == "mark":
                c.commit((top, A))
                highest = max(highest, top)
            else:
                c.store.fold_marks()
        taken = c.store.take(A)
        assert taken is not None and taken[5] == highest
    finally:
        c.close()


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


def _old_store(where: Path, version: int) -> Db:
    """A session store as a corem of marks' log `version` left it (2: a row a mark, 3: packs in
    its own file), A's row at 5."""
    db = Db(where)
    db.schema(SCHEMA)
    db.migrate("dtls_sessions", (add_columns("sessions", (RX_TOP,)), _rx_log, _rx_pack)[:version])
    db.execute("INSERT INTO sessions (peer, blob, tenant, device, last_seen, rx_top) VALUES (?, ?, 't', 'd', 1.0, 5)",
               (A, b"sealed-state"))
    return db


def test_a_store_of_the_row_a_mark_log_is_folded_at_start(tmp_path):
    db = _old_store(tmp_path / "s.db", 2)
    db.executemany("INSERT INTO rx_log (peer, rx_top) VALUES (?, ?)", [(A, 9), (A, 30), (B, 4)])
    db.close()
    store = SessionStore(tmp_path / "s.db")
    assert store.db.columns("rx_log") == set() and store.db.columns("rx_pack") == set()
    taken = store.take(A)
    assert taken is not None and taken[5] == 30
    store.close()


def test_a_store_whose_own_file_held_the_packs_is_folded_at_start(tmp_path):
    """(a corem before the bus carried the marks) the packs of its own log raise its rows once, and
    the log is gone; a row that is no pack is passed over."""
    db = _old_store(tmp_path / "s.db", 3)
    assert db.columns("rx_pack") == {"marks"}
    db.execute("INSERT INTO rx_pack (marks) VALUES (?)", (pack_marks([(44, A), (2, B)]),))
    db.execute("INSERT INTO rx_pack (marks) VALUES (?)", (b"\x07not-a-pack",))
    db.execute("INSERT INTO rx_pack (marks) VALUES ('text, not a blob')")
    db.close()
    store = SessionStore(tmp_path / "s.db")
    assert store.db.columns("rx_pack") == set() and store.db.columns("rx_folded") == {"upto"}
    taken = store.take(A)
    assert taken is not None and taken[5] == 44
    store.close()


def test_a_row_that_is_no_pack_is_passed_over_and_the_marks_beside_it_folded(carried):
    c = carried()
    assert c.store.put([row(A, 0), row(B, 0)])
    c.commit((3, A))
    c.bus._conn.execute("INSERT INTO carried (blob) VALUES (?)", (b"\x07not-a-pack",))
    c.bus._conn.execute("INSERT INTO carried (blob) VALUES ('text, not a blob')")  # (SQLite keeps TEXT as TEXT)
    c.commit((5, B))
    c.store.fold_marks()
    assert (c.top(A), c.top(B)) == (3, 5) and c.unread() == 0 and c.store.errors == 0


def test_the_store_folds_step_by_step(marks_log, monkeypatch):
    """A long log (a process that stopped with many packs unread) is folded FOLD_STEP packs a
    transaction, every one of them."""
    c = marks_log()
    assert c.store.put([row(A, 0)])
    for top in range(1, 2 * FOLD_STEP + 4):
        c.commit((top, A))
    fold = store_module._fold if isinstance(c, Carried) else store_module._fold_own
    steps = []

    def step(db, limit=None):
        steps.append((limit, db.in_transaction))
        return fold(db, limit)

    monkeypatch.setattr(store_module, fold.__name__, step)
    c.store.fold_marks()
    assert c.unread() == 0 and c.top(A) == 2 * FOLD_STEP + 3
    assert steps == [(FOLD_STEP, True)] * 3  # (a step, a step, then 3: fewer than a step, the last)


def test_the_stores_write_transactions_never_lock_the_bus_file(carried):
    """The store reads the bus's packs through the bus file attached read-only: its own write
    transaction (a save, a take, a fold: BEGIN IMMEDIATE) takes no write lock on the bus, so the bus
    commits beside it -- attached read-write, every other process's bus commit waited for it (and
    it for them)."""
    c = carried()
    c.commit((5, A))
    store = c.store
    store.db.execute("BEGIN IMMEDIATE")
    try:
        other = sqlite3.connect(c.bus.path, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")  # (another worker's bus commit: "database is locked" before)
        other.execute("ROLLBACK")
        other.close()
        assert c.unread() == 1  # (and the store still reads it)
    finally:
        store.db.execute("ROLLBACK")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.db.execute("DELETE FROM bus.carried")


def test_the_stores_own_log_is_a_committed_pack_a_batch_and_a_fold_deletes_what_it_read(tmp_path):
    """(a sink that cannot carry them: Kafka) each pack is committed at once -- another connection
    sees it before the batch's readings would be submitted -- and a fold raises the rows and
    deletes the packs it read, raising nothing twice; a row that is no pack is passed over."""
    c = Logged(tmp_path / "s.db")
    assert c.store.put([row(A, 20), row(B, 5)])
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    c.commit((9, A), (7, B), (6, B), (3, b"no-such-session"))
    assert other.execute("SELECT count(*) FROM rx_packs").fetchone() == (1,)
    c.store.db.execute("INSERT INTO rx_packs (blob) VALUES (?)", (b"\x07not-a-pack",))
    c.commit((30, A))
    c.store.fold_marks()
    assert (c.top(A), c.top(B)) == (30, 7) and c.unread() == 0 and c.store.errors == 0
    other.close()
    c.close()


def test_marks_logged_by_a_run_on_kafka_are_folded_by_a_run_on_the_embedded_bus(tmp_path):
    """A process on Kafka stopped with packs in the store's own log; the next, on the embedded
    bus, reads the bus's packs from then on -- and folds those first, or a restore would miss
    them."""
    first = Logged(tmp_path / "s.db")
    assert first.store.put([row(A, 1)])
    first.commit((40, A))
    first.close()
    again = Carried(tmp_path / "s.db")
    try:
        assert again.top(A) == 40
        assert again.store.db.execute("SELECT count(*) FROM rx_packs").fetchone()[0] == 0
    finally:
        again.close()


def test_marks_are_logged_or_carried_in_one_place():
    store = SessionStore(":memory:")
    store.log_marks_here()
    with pytest.raises(RuntimeError):
        store.log_marks_here()
    with pytest.raises(RuntimeError):
        store.read_marks_from(Path(":memory:"), contextlib.nullcontext())


def test_marks_a_run_on_the_embedded_bus_left_unread_are_folded_by_a_run_on_kafka_and_never_again(tmp_path):
    """embedded bus -> Kafka -> embedded bus, each run stopping before its store folded: the Kafka
    run folds what the bus carried unread (or its restore would take records already durable
    again), and moves the place past it (or the next run on the bus would fold those old marks
    onto a new session of their peer, and refuse its records)."""
    first = Carried(tmp_path / "s.db")
    assert first.store.put([row(A, 5)])
    first.commit((900, A))
    first.close()
    second = SessionStore(tmp_path / "s.db")
    second.log_marks_here(bus=tmp_path / "bus.db")
    assert second.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (A,)).fetchone() == (900,)
    assert second.put([row(A, 2)])  # (a new session at A, saved at its first record)
    second.close()
    third = Carried(tmp_path / "s.db")
    try:
        assert third.top(A) == 2 and third.unread() == 0
    finally:
        third.close()


def test_a_bus_file_without_marks_is_no_error_for_a_run_on_kafka(tmp_path):
    bus = EmbeddedBus(tmp_path / "bus.db", synchronous="NORMAL")  # (made before it carried anything)
    bus.open()
    bus._conn.execute("DROP TABLE carried")
    bus.close_sync()
    store = SessionStore(tmp_path / "s.db")
    store.log_marks_here(bus=tmp_path / "bus.db")
    assert store.errors == 0 and store.last_error is None and store.marks is Marks.LOGGED
    store.close()


def test_a_pack_the_disk_refused_is_written_with_the_next_and_readiness_comes_back(tmp_path):
    """The pack of a batch whose INSERT failed (a full disk) is kept, coalesced -- each key's
    highest mark -- and written with the next pack; the store's error is cleared once a pack is
    written again (/readyz)."""
    c = Logged(tmp_path / "s.db")
    assert c.store.put([row(A, 0), row(B, 0)])
    db = c.store.db
    c.store.db = _Refusing(db)
    assert not c.store.log_pack(pack_marks([(7, A), (3, B)]))
    assert not c.store.log_pack(pack_marks([(9, A)]))
    assert c.store.last_error is not None and c.unread() == 0
    c.store.db = db
    assert c.store.log_pack(pack_marks([(4, B)]))
    assert c.store.last_error is None and c.unread() == 1
    [(pack,)] = db.execute("SELECT blob FROM rx_packs").fetchall()
    assert sorted((t, k) for t, k, _ in _fold_packs([bytes(pack)])) == [(4, B), (9, A)]
    c.store.fold_marks()
    assert (c.top(A), c.top(B)) == (9, 4)
    c.close()


class _Refusing:
    """The store's `Db` whose INSERTs fail as on a full disk."""

    def __init__(self, db) -> None:
        self._db = db
        self.Error = db.Error

    def execute(self, sql, args=()):
        if sql.startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, args)

    def __getattr__(self, name):
        return getattr(self._db, name)


@pytest.mark.parametrize("direction", ["embedded bus, then Kafka", "Kafka, then the embedded bus"])
def test_a_start_that_cannot_fold_the_other_modes_marks_does_not_start(tmp_path, monkeypatch, direction):
    """The marks one mode left unread (the bus's, or the store's own log) are read by no fold of a
    run in the other mode after its start: if that one fold fails, corem does not start -- a
    restore would take records already durable again, and a later run in the first mode would put
    old marks on a new session."""
    first = Carried(tmp_path / "s.db") if direction.startswith("embedded") else Logged(tmp_path / "s.db")
    assert first.store.put([row(A, 5)])
    first.commit((900, A))
    first.close()

    def failing(db, limit=None):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store_module, "_fold" if direction.startswith("embedded") else "_fold_own", failing)
    with pytest.raises(StartRefused, match="record marks in .*could not be folded.*disk I/O error"):
        if direction.startswith("embedded"):
            SessionStore(tmp_path / "s.db").log_marks_here(bus=tmp_path / "bus.db")
        else:
            Carried(tmp_path / "s.db")
    monkeypatch.undo()
    again = SessionStore(tmp_path / "s.db")  # (the disk well again: the next start folds them)
    taken = again.take(A)
    assert taken is not None and taken[5] == 5  # (not yet: folding waits for a mode's start)
    again.put([taken])
    if direction.startswith("embedded"):
        again.log_marks_here(bus=tmp_path / "bus.db")
    else:
        again.read_marks_from(tmp_path / "bus.db", contextlib.nullcontext())
    taken = again.take(A)
    assert taken is not None and taken[5] == 900
    again.close()


def test_a_bus_file_that_is_no_database_stops_a_start_on_kafka_with_one_line(tmp_path):
    (tmp_path / "bus.db").write_bytes(b"not a database, " * 100)
    store = SessionStore(tmp_path / "s.db")
    with pytest.raises(StartRefused, match=r"record marks in .*bus\.db could not be read"):
        store.log_marks_here(bus=tmp_path / "bus.db")
    assert store.put([row(A, 1)])  # (the store itself goes on working: detached, no transaction left)
    store.close()


def test_a_refused_pack_never_becomes_a_later_sessions_floor(tmp_path):
    """A pack the disk refused is kept (`log_pack`); a new session of its peer saved meanwhile
    (a handshake at the same address, its first record) folds it first, so that pack's marks --
    the old session's -- are in the row it replaces, not written after it (found in review:
    written with the next pack, the old 700 became the new session's floor)."""
    c = Logged(tmp_path / "s.db")
    assert c.store.put([row(A, 0), row(B, 0)])
    db = c.store.db
    c.store.db = _Refusing(db)
    assert not c.store.log_pack(pack_marks([(700, A)]))
    c.store.db = db
    assert c.store.put([row(A, 2)])  # (the new session at A)
    assert c.store.log_pack(pack_marks([(5, B)]))
    c.store.fold_marks()
    assert (c.top(A), c.top(B)) == (2, 5)
    # and a restore reads a refused pack's marks
    c.store.db = _Refusing(db)
    assert not c.store.log_pack(pack_marks([(800, B)]))
    c.store.db = db
    taken = c.store.take(B)
    assert taken is not None and taken[5] == 800
    c.close()


def test_corem_serve_on_kafka_refuses_to_start_in_one_line_on_a_bus_file_it_cannot_read(tmp_path):
    """The store's refusal at start reaches the operator as one line and status 2, naming the file
    (not a traceback out of Trio's nurseries)."""
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "bus.db").write_bytes(b"not a database, " * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "corem", "serve", "--data-dir", str(data), "--bus", "kafka://127.0.0.1:1",
         "--coap", "off", "--coaps", "127.0.0.1:0", "--http", "off", "--log-level", "warning"],
        capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith("corem: dtls session store: the record marks in") and "bus.db" in last
    assert "Traceback" not in proc.stderr
