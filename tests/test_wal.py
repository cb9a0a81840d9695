"""WAL checkpoints off the commit path (corem/wal.py): the writers' commits leave the copying to a
Checkpointer, which copies from its own connection; the log stays bounded either way."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import trio

from corem.bus.base import Record
from corem.bus.sqlite import EmbeddedBus, read_records
from corem import wal
from corem.wal import BACKSTOP, Checkpointer, defer_checkpoints

PAGE = 4096
ROW = os.urandom(3000)  # (a row a little under a page: pages written = rows, roughly)


def writer(path: Path, deferred: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    if deferred:
        defer_checkpoints(conn)
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, b BLOB)")
    return conn


def commit_rows(conn: sqlite3.Connection, n: int, per_commit: int = 10) -> None:
    for _ in range(0, n, per_commit):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (b) VALUES (?)", [(ROW,)] * per_commit)
        conn.execute("COMMIT")


def pages_in_database(path: Path) -> int:
    return path.stat().st_size // PAGE


def test_a_deferred_writer_leaves_the_copying_to_the_checkpointer(tmp_path):
    default, deferred = tmp_path / "default.db", tmp_path / "deferred.db"
    a, b = writer(default, False), writer(deferred, True)
    commit_rows(a, 1500)
    commit_rows(b, 1500)
    # SQLite's own checkpoint (at 1,000 pages, inside a COMMIT) copied pages into the database;
    # the deferred writer's commits copied none
    assert pages_in_database(default) > 500
    assert pages_in_database(deferred) < 10
    checkpointer = Checkpointer()
    checkpointer.watch(deferred)
    checkpointer.pass_sync()
    assert checkpointer.passes == 1 and checkpointer.errors == 0
    assert pages_in_database(deferred) > 1400  # (copied by the checkpointer's own connection)
    # everything backfilled: the writer's next commit starts the log again from its beginning
    wal_before = (tmp_path / "deferred.db-wal").stat().st_size
    commit_rows(b, 500)
    assert (tmp_path / "deferred.db-wal").stat().st_size <= wal_before
    assert b.execute("SELECT count(*) FROM t").fetchone()[0] == 2000
    checkpointer.close()


def test_without_its_checkpointer_a_deferred_writer_still_bounds_the_log(tmp_path):
    path = tmp_path / "alone.db"
    conn = writer(path, True)
    commit_rows(conn, BACKSTOP // PAGE + 600, per_commit=50)
    # the backstop checkpoint ran in the commit that took the log past BACKSTOP frames, and the
    # log started again from its beginning: it never grew past that commit (without the backstop
    # it would hold all ~8,700 frames)
    assert pages_in_database(path) > BACKSTOP // PAGE * 0.9
    frame = PAGE + 24
    assert (path.with_name("alone.db-wal")).stat().st_size <= 32 + (BACKSTOP // PAGE + 60) * frame


def test_a_pass_says_whether_it_copied_anything(tmp_path):
    # (the checkpointer's thread passes every BUSY_INTERVAL while they copy, INTERVAL otherwise)
    path = tmp_path / "w.db"
    conn = writer(path, True)
    checkpointer = Checkpointer()
    checkpointer.watch(path)
    commit_rows(conn, 50)
    assert checkpointer.pass_sync() is True
    assert checkpointer.pass_sync() is False  # (nothing committed since)
    commit_rows(conn, 10)
    assert checkpointer.pass_sync() is True
    checkpointer.close()


def test_a_file_not_made_yet_is_skipped_and_a_broken_one_counted(tmp_path):
    checkpointer = Checkpointer()
    checkpointer.watch(tmp_path / "later.db")
    checkpointer.pass_sync()
    assert checkpointer.passes == 0 and checkpointer.errors == 0
    (tmp_path / "broken.db").write_bytes(b"not a database" * 100)
    checkpointer.watch(tmp_path / "broken.db")
    checkpointer.pass_sync()
    assert checkpointer.errors == 1


def test_the_embedded_bus_commits_without_copying_and_its_checkpointer_copies(tmp_path):
    path = tmp_path / "bus.db"
    bus = EmbeddedBus(path, synchronous="NORMAL", max_batch=50)
    done: list[BaseException | None] = []
    value = os.urandom(1500)

    async def main() -> None:
        # (a failure detector, not a timing: the whole test takes ~1 s on an idle machine)
        with trio.fail_after(60):
            await run()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            assert len(bus.checkpointer) == 1  # (the bus file, watched when it was opened)
            for i in range(3000):
                while not bus.submit(Record("telemetry.raw.t", b"d", value, {}), lambda ctx, e: done.append(e)):
                    await trio.sleep(0.001)
                if i % 200 == 0:
                    await trio.sleep(0)
            while len(done) < 3000:
                await trio.sleep(0.01)
            passes = bus.checkpointer.passes
            while bus.checkpointer.passes < passes + 2:  # (one more pass after the last commit)
                await trio.sleep(0.01)
            # ~1,100 pages written, past SQLite's default checkpoint but under the writer's
            # backstop: what the database file holds, the background checkpointer copied
            assert pages_in_database(path) > 1000
            await bus.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert done == [None] * 3000
    assert sum(1 for _ in read_records(path)) == 3000


def test_past_restart_pages_the_bus_completes_the_checkpoint_itself_and_starts_its_log_again(tmp_path, monkeypatch):
    # A pass that cannot copy the whole log (here a reader's snapshot stops it; under load, the
    # commits that come while it copies) finds it past RESTART: the writer completes the
    # checkpoint before its next commit, which starts the log again from its beginning.
    monkeypatch.setattr(wal, "RESTART", 200 * PAGE)  # (bytes: ~800 KB of log)
    path = tmp_path / "bus.db"
    bus = EmbeddedBus(path, synchronous="NORMAL")
    bus.open()
    value = os.urandom(3000)

    def commit(n: int) -> None:
        bus.write_prepared(bus.prepare([Record("telemetry.raw.t", b"d", value, {})] * n))

    commit(300)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM batches").fetchone()  # (its snapshot: the first 300)
    commit(100)
    bus.checkpointer.pass_sync()
    assert bus.checkpointer.restart_due(path)
    reader.execute("COMMIT")
    wal_file = path.with_name("bus.db-wal")
    size = wal_file.stat().st_size
    commit(50)  # completes the checkpoint first, then starts the log again
    assert bus.checkpointer.restarts == 1 and not bus.checkpointer.restart_due(path)
    assert wal_file.stat().st_size == size
    assert pages_in_database(path) >= 400 * len(value) // PAGE  # (all of the log copied)
    bus.checkpointer.close()
    bus.close_sync()
    assert sum(1 for _ in read_records(path)) == 450


def test_a_writer_that_does_not_complete_the_checkpoint_grows_its_log(tmp_path, monkeypatch):
    # the control of the test above: the same writes without the writer's completing checkpoint
    monkeypatch.setattr(wal, "RESTART", 200 * PAGE)  # (bytes: ~800 KB of log)
    path = tmp_path / "w.db"
    conn = writer(path, True)
    checkpointer = Checkpointer()
    checkpointer.watch(path)
    commit_rows(conn, 300)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()
    commit_rows(conn, 100)
    checkpointer.pass_sync()
    reader.execute("COMMIT")
    size = path.with_name("w.db-wal").stat().st_size
    commit_rows(conn, 50)
    assert path.with_name("w.db-wal").stat().st_size > size
    checkpointer.close()


def test_a_checkpoint_that_fails_before_a_commit_does_not_fail_the_commit(tmp_path):
    path = tmp_path / "bus.db"
    bus = EmbeddedBus(path, synchronous="NORMAL")
    bus.open()

    class Refusing:
        def execute(self, sql, *args):
            if "wal_checkpoint" in sql:
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

    real = bus._conn
    bus._conn = Refusing()  # type: ignore[assignment]
    bus.checkpointer._due.add(path)
    bus.write_prepared(bus.prepare([Record("telemetry.raw.t", b"d", b"{}", {})]))
    assert bus.checkpointer.errors == 1 and bus.checkpointer.restarts == 0
    bus._conn = real
    bus.close_sync()
    assert sum(1 for _ in read_records(path)) == 1


def test_a_checkpointer_without_files_sleeps_until_one_is_watched_then_copies_it(tmp_path):
    """A Kafka sink's checkpointer has no file until a DTLS session store logs its marks: its
    thread sleeps meanwhile (no pass every interval for nothing), and wakes for the file."""
    import threading
    import time

    class Counting(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            self.waits = 0

        def wait(self, timeout=None):
            self.waits += 1
            return super().wait(timeout)

    checkpointer, stop = Checkpointer(), Counting()
    thread = threading.Thread(target=checkpointer._loop, args=(0.001, 0.001, stop), daemon=True)
    thread.start()
    try:
        time.sleep(0.3)  # (a thread polling every millisecond would wait ~300 times)
        assert stop.waits <= 2
        path = tmp_path / "w.db"
        conn = writer(path, True)
        commit_rows(conn, 200)
        checkpointer.watch(path)
        for _ in range(6000):  # (woken by the watch; the bound only ends a test that would hang)
            if checkpointer.passes:
                break
            time.sleep(0.01)
        assert pages_in_database(path) > 150 and checkpointer.errors == 0
    finally:
        stop.set()
        checkpointer._wake.set()
        thread.join()
        checkpointer.close()
