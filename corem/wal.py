"""SQLite WAL checkpoints off the commit path.

SQLite checkpoints inside the COMMIT that takes the write-ahead log past 1,000 pages: it copies
those pages into the database and, at `synchronous` NORMAL or FULL, fsyncs the log and the
database first (measured here: 3-4 ms each).  Every reading waiting for that commit then waits
~7 ms more, and at 150k readings/s that commit comes every ~0.3 s: the plain lane's p99 was
9-11 ms at a p50 of 1.3 ms (issue 28, "the tail").

So the group-commit writers (the embedded bus, and the DTLS record marks written in its worker
thread) hand the copying to a `Checkpointer`: its own connection, in a worker thread, a PASSIVE
checkpoint every INTERVAL (writers go on while it copies and syncs).  Their own automatic
checkpoint is moved to BACKSTOP pages (`defer_checkpoints`), and it is still needed: the log
starts again from its beginning only when a checkpoint completed with no commit since, and with
a commit every millisecond the background pass seldom finds such a moment.  When the writer's
checkpoint comes, the background has copied and synced nearly everything, so it has little
left to do.  Measured (bench/load_bench.py's shape, the plain lane, a loaded machine): p99
10.7-11.2 ms -> 5.7-6.1 ms, readings/s unchanged.

Durability is unchanged: a checkpoint never decides what is committed, only when the log's
pages reach the database file, and SQLite syncs both before it lets the log be reused.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any, Callable, Protocol

import trio

log = logging.getLogger("corem.wal")

#: the writers' own automatic checkpoint, in pages (SQLite's default is 1,000): a bound on the
#: log's size should the background checkpointer fall behind or fail
BACKSTOP = 8000
#: seconds between two background passes (a pass with nothing to copy costs a thread hop)
INTERVAL = 0.025


class Executes(Protocol):
    def execute(self, sql: str, /) -> Any: ...


def defer_checkpoints(conn: Executes) -> None:
    """Have a writer's connection (sqlite3's, or the registry's `Db`) checkpoint by itself only
    past BACKSTOP pages."""
    conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP}")


#: work on a watched file from the checkpointer's connection before each pass (the DTLS marks'
#: fold: dtls/store.py), in its worker thread
Tidy = Callable[[sqlite3.Connection], None]


class Checkpointer:
    """PASSIVE checkpoints of some SQLite files in WAL mode, from connections of its own, in a
    worker thread (`run`).  A file is added with `watch` (before or while it runs)."""

    def __init__(self) -> None:
        self._files: list[tuple[Path, str, Tidy | None]] = []
        self._conns: dict[Path, sqlite3.Connection] = {}
        #: passes that ran, and passes that failed (a full disk, a lock held: the writers'
        #: BACKSTOP bounds the log meanwhile)
        self.passes = 0
        self.errors = 0

    def watch(self, path: Path, synchronous: str = "NORMAL", tidy: Tidy | None = None) -> None:
        """Checkpoint `path`, syncing as its writer does (`synchronous`: NORMAL or FULL sync a
        checkpoint alike; OFF syncs nothing), after `tidy` at each pass."""
        if all(p != path for p, _, _ in self._files):
            self._files.append((Path(path), synchronous, tidy))

    def __len__(self) -> int:
        return len(self._files)

    def pass_sync(self) -> None:
        """One PASSIVE checkpoint of each file (in a worker thread: it may fsync)."""
        for path, synchronous, tidy in list(self._files):
            try:
                conn = self._conns.get(path)
                if conn is None:
                    if not path.exists():
                        continue  # (its writer has not made it yet)
                    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.1)
                    conn.execute(f"PRAGMA synchronous={synchronous}")
                    self._conns[path] = conn
                if tidy is not None:
                    tidy(conn)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.passes += 1
            except sqlite3.Error as e:
                self.errors += 1
                log.debug("checkpoint of %s: %s", path, e)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    async def run(self, interval: float = INTERVAL) -> None:
        """Checkpoint every `interval` seconds until cancelled."""
        try:
            while True:
                await trio.sleep(interval)
                if self._files:
                    await trio.to_thread.run_sync(self.pass_sync, abandon_on_cancel=False)
        finally:
            self.close()
