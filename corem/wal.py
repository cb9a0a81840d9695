"""SQLite WAL checkpoints off the commit path.

SQLite checkpoints inside the COMMIT that takes the write-ahead log past 1,000 pages: it copies
those pages into the database and, at `synchronous` NORMAL or FULL, fsyncs the log and the
database first (measured here: 3-4 ms each).  Every reading waiting for that commit then waits
~7 ms more, and at 150k readings/s that commit comes every ~0.3 s: the plain lane's p99 was
9-11 ms at a p50 of 1.3 ms (issue 28, "the tail").

So the group-commit writers (the embedded bus, and the DTLS record marks written in its worker
thread; on Kafka, the DTLS session store's log of those marks, a commit a batch on the event
loop) hand the copying to their sink's `Checkpointer`: its own connection, in a thread of its
own, a PASSIVE checkpoint every BUSY_INTERVAL while there is something to copy (INTERVAL otherwise;
writers go on while it copies and syncs), and an fsync of the database file every
SYNC_INTERVAL.  Small passes, because a pass's copying preempts the event loop where the two
share a core (below).

The log starts again from its beginning only when a checkpoint completed with no commit since,
and with a commit every millisecond the background pass never finds such a moment: the log grew
to the writer's own automatic checkpoint (8,000 pages), which ran inside a COMMIT and, because a
pass that does not complete the log does not sync the database, synced everything copied since
the last restart there -- 15-35 ms, twice a second at 150k readings/s: the plain lane's p999 of
25 ms and part of its p99.  Now a background pass that finds the log past RESTART bytes tells
the writer (`restart_due`), and the writer completes the checkpoint itself between two of its
commits (`before_commit`, from its own connection: no commit can come in between), just after
that pass, with the database already synced by it: it copies and syncs the last few
milliseconds of the log only (measured: 1.3-1.9 ms), and its next commit starts the log again.
A writer's own automatic checkpoint is moved past that (`defer_checkpoints`: BACKSTOP, or
WRITER_BACKSTOP for a writer that calls `before_commit`), a bound on the log's size should the
background fall behind or fail, or readers keep old snapshots.

Durability is unchanged: a checkpoint never decides what is committed, only when the log's
pages reach the database file, and SQLite syncs both before it lets the log be reused.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import trio

log = logging.getLogger("corem.wal")

#: the writers' own automatic checkpoint, in bytes of log (SQLite's default is 1,000 pages): a
#: bound on the log's size should the background checkpointer fall behind or fail.  The limits are
#: bytes, each file's pages counted at its own page size (the bus's are 16 KiB, bus/sqlite.py
#: PAGE_SIZE; the session store's SQLite's 4 KiB): as pages, 16 KiB ones quadrupled them.
BACKSTOP = 8000 * 4096
#: the log's size, in bytes, from which a writer that calls `before_commit` completes the
#: checkpoint itself so that its next commit starts the log again (64 MiB: at the plain lane's ~52
#: MB/s, a restart every ~1.3 s; each costs the next batch ~2 ms)
RESTART = 64 << 20
#: such a writer's own automatic checkpoint: far past RESTART, only a bound
WRITER_BACKSTOP = 4 * RESTART
#: seconds between two background passes while the last one copied nothing, and while they
#: copy: short, so that each pass copies little.  At the plain lane's 165k readings/s, with 25 ms
#: between passes each copied and synced for 1-2 ms of CPU, preempting the event loop on its
#: core: in a trace, 51 of the loop's 54 passes over 1.5 ms (its p50 0.55 ms) overlapped a
#: checkpoint pass.  Each pass also syncs the log (SQLite's, before it copies: in a VM, an exit
#: or two), so shorter costs readings/s.  Measured, alternating runs on one core (the clean
#: ones): 25 ms 160-169k/s, p99 3.8-4.1 ms; 5 ms 141-160k/s, p99 3.2 ms (one 5.2); 2 ms
#: 137-147k/s, p99 3.2-3.7 ms (the loop's own p99 2.6 -> 1.4 ms)
INTERVAL = 0.025
BUSY_INTERVAL = 0.005
#: seconds between two fsyncs of a database file by the passes (each pass syncs the log itself)
SYNC_INTERVAL = 0.025


#: fdatasync where there is one (Linux), else fsync
_fdatasync = getattr(os, "fdatasync", os.fsync)


class Executes(Protocol):
    def execute(self, sql: str, /) -> Any: ...


def defer_checkpoints(conn: Executes, nbytes: int = BACKSTOP) -> None:
    """Have a writer's connection (sqlite3's, or the registry's `Db`) checkpoint by itself only
    past `nbytes` of log (BACKSTOP; WRITER_BACKSTOP for one that calls `Checkpointer.before_commit`),
    in its file's pages."""
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute(f"PRAGMA wal_autocheckpoint={max(1, int(nbytes) // page)}")


class Checkpointer:
    """PASSIVE checkpoints of some SQLite files in WAL mode, from connections of its own, in a
    worker thread (`run`).  A file is added with `watch` (before or while it runs)."""

    def __init__(self) -> None:
        self._files: list[tuple[Path, str]] = []
        self._conns: dict[Path, sqlite3.Connection] = {}
        #: each database file, open for its fsync after a pass (None: synchronous OFF)
        self._fds: dict[Path, int | None] = {}
        #: the files whose log a pass found past RESTART bytes: their writer completes the
        #: checkpoint before its next commit (`before_commit`)
        self._due: set[Path] = set()
        #: each file's page size (the limits are bytes: RESTART), once fixed (`_page_size`)
        self._pages: dict[Path, int] = {}
        #: frames copied by each file's last pass (a pass that copied nothing syncs nothing), and
        #: when its database file was last synced (time.monotonic())
        self._copied: dict[Path, int] = {}
        self._synced: dict[Path, float] = {}
        #: passes that ran, and passes that failed (a full disk, a lock held: the writers'
        #: BACKSTOP bounds the log meanwhile); checkpoints a writer completed itself
        self.passes = 0
        self.errors = 0
        self.restarts = 0
        #: set by `watch` (and at the stop): the thread sleeps on it while it has no file (a
        #: Kafka sink's checkpointer, until a DTLS session store logs marks: no pass 40 times a
        #: second for nothing)
        self._wake = threading.Event()

    def watch(self, path: Path, synchronous: str = "NORMAL") -> None:
        """Checkpoint `path`, syncing as its writer does (`synchronous`: NORMAL or FULL sync a
        checkpoint alike; OFF syncs nothing)."""
        if all(p != path for p, _ in self._files):
            self._files.append((Path(path), synchronous))
            self._wake.set()

    def __len__(self) -> int:
        return len(self._files)

    def pass_sync(self) -> bool:
        """One PASSIVE checkpoint of each file (in a worker thread: it may fsync); True if it
        copied anything."""
        busy = False
        for path, synchronous in list(self._files):
            try:
                conn = self._conns.get(path)
                if conn is None:
                    if not path.exists():
                        continue  # (its writer has not made it yet)
                    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.1)
                    conn.execute(f"PRAGMA synchronous={synchronous}")
                    self._conns[path] = conn
                    self._fds[path] = None if synchronous == "OFF" else os.open(path, os.O_RDONLY)
                _busy, log_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                log_bytes = log_pages * self._page_size(path, conn, log_pages)
                # a pass that leaves frames behind (a commit came meanwhile: nearly always) does
                # not sync the database; sync what it copied now, or the pass that completes the
                # log syncs everything copied since the last restart, in a writer's commit
                fd = self._fds.get(path)
                if copied != self._copied.get(path):
                    busy = True
                    now = time.monotonic()
                    if fd is not None and (now - self._synced.get(path, 0.0) >= SYNC_INTERVAL or log_bytes >= RESTART):
                        _fdatasync(fd)
                        self._synced[path] = now
                self._copied[path] = copied
                if log_bytes >= RESTART:
                    self._due.add(path)
                self.passes += 1
            except (sqlite3.Error, OSError) as e:  # (OSError: the database file's fsync)
                self.errors += 1
                log.debug("checkpoint of %s: %s", path, e)
        return busy

    def _page_size(self, path: Path, conn: sqlite3.Connection, log_pages: int) -> int:
        """`path`'s page size, read once its log has frames (a file its writer has just made has
        none yet: SQLite's default until its first write fixes it)."""
        page = self._pages.get(path)
        if page is None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            if log_pages:
                self._pages[path] = page
        return page

    def restart_due(self, path: Path) -> bool:
        """Has a pass found `path`'s log past RESTART bytes since its writer last completed it?"""
        return path in self._due

    def before_commit(self, conn: Executes, path: Path) -> None:
        """From `path`'s writer, in its thread, before a commit: complete the checkpoint if a
        pass found the log past RESTART, so that this commit starts the log again (see the
        module docstring).  Nothing is appended meanwhile: the writer is the one appending (with
        `--workers`, one of several: the log then starts again only when the others' commits
        leave it a moment, and WRITER_BACKSTOP bounds it meanwhile, as for a shared bus)."""
        if path not in self._due:
            return
        self._due.discard(path)
        try:
            busy, log_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:  # (the commit goes on: a checkpoint only moves pages)
            self.errors += 1
            log.debug("checkpoint of %s before a commit: %s", path, e)
            return
        if not busy and copied == log_pages:
            self.restarts += 1

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._due.clear()
        self._pages.clear()
        self._copied.clear()
        self._synced.clear()

    async def run(self, interval: float = INTERVAL, busy_interval: float = BUSY_INTERVAL) -> None:
        """Checkpoint every `interval` seconds until cancelled, every `busy_interval` while the
        passes copy, in a thread of its own (hundreds of passes a second: no trip through the
        event loop for each)."""
        stop = threading.Event()
        thread = threading.Thread(target=self._loop, args=(interval, busy_interval, stop), name="corem-checkpointer",
                                  daemon=True)
        thread.start()
        try:
            await trio.sleep_forever()
        finally:
            stop.set()
            self._wake.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)
            self.close()

    def _loop(self, interval: float, busy_interval: float, stop: threading.Event) -> None:
        busy = False
        while not stop.wait(busy_interval if busy else interval):
            if not self._files:
                self._wake.wait()  # (until a file is watched, or the stop)
                continue
            try:
                busy = self.pass_sync()
            except Exception:  # noqa: BLE001 - (a bug must not end the checkpoints: logged, counted)
                self.errors += 1
                log.exception("checkpoint pass failed")
                busy = False
