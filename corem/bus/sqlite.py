"""The embedded default bus: an append-only SQLite log shaped like Kafka topics.

Records are stored the way Kafka stores them: in record batches.  Each group commit writes one
row per topic holding all of that topic's records (msgpack `[key, value, headers]` triples) and
the batch's base offset; record `i` of a batch has offset `base_offset + i`.  One INSERT per batch
instead of one per record keeps the writer thread almost entirely inside SQLite's C code, with the
GIL released, so it does not compete with the event loop (measured: per-record inserts made the
writer hold the GIL long enough to cut throughput by ~3x).

WAL journal; `synchronous=FULL` by default, so a 2.04 means the reading survives a crash of the
process and of the machine (one fsync per batch, shared by every reading in it).  `NORMAL`
survives a crash of the process only and is faster.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import msgspec

from ..wal import WRITER_BACKSTOP, defer_checkpoints
from .base import BatchingSink, Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    base_offset INTEGER PRIMARY KEY,
    topic       TEXT    NOT NULL,
    count       INTEGER NOT NULL,
    records     BLOB    NOT NULL,
    appended_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_topic ON batches (topic, base_offset);
"""

SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[tuple[bytes | None, bytes, dict[str, str]]]).decode


class EmbeddedBus(BatchingSink):
    name = "embedded"

    def __init__(self, path: Path, *, synchronous: str = "FULL", shared: bool = False, **kw) -> None:
        super().__init__(**kw)
        #: several writers on one file (`--workers`): offsets are taken under SQLite's write lock
        #: at commit, so the log stays one sequence in commit order (a device's readings come
        #: through one worker, so they keep their order in it)
        self.shared = shared
        if synchronous not in SYNC_MODES:
            raise ValueError(f"store synchronous must be one of {', '.join(SYNC_MODES)}, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._next_offset = 0

    def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():  # mode 0600 (SQLite gives its -wal and -shm the file's mode)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")  # validated in __init__
        # (copied by self.checkpointer, off the commit path; the log started again by
        # write_prepared's before_commit: corem/wal.py)
        defer_checkpoints(conn, WRITER_BACKSTOP)
        self.checkpointer.watch(self.path, self.synchronous)
        conn.executescript(SCHEMA)
        self._conn = conn
        self._next_offset = _next_offset(conn)

    def prepare(self, records: list[Record]) -> list[tuple[int, str, int, bytes, int]]:
        """Group by topic and encode each group as one batch row (runs on the event loop: cheap)."""
        by_topic: dict[str, list] = {}
        for r in records:
            group = by_topic.get(r.topic)
            if group is None:
                by_topic[r.topic] = group = []
            group.append((r.key, r.value, r.headers))
        now = int(time.time() * 1000)
        rows = []
        offset = self._next_offset
        for topic, group in by_topic.items():
            rows.append((offset, topic, len(group), _encode(group), now))
            offset += len(group)
        return rows

    def write_prepared(self, rows: list[tuple[int, str, int, bytes, int]]) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError("embedded bus is not open")
        self.checkpointer.before_commit(conn, self.path)
        conn.execute("BEGIN IMMEDIATE" if self.shared else "BEGIN")
        try:
            if self.shared:
                rows = _rebased(rows, _next_offset(conn))
            conn.executemany(
                "INSERT INTO batches (base_offset, topic, count, records, appended_at) VALUES (?, ?, ?, ?, ?)", rows
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        last = rows[-1]
        self._next_offset = last[0] + last[2]

    def close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _next_offset(conn: sqlite3.Connection) -> int:
    """The offset the next record gets: the last batch's end (found by the rowid, not a scan)."""
    row = conn.execute("SELECT base_offset + count FROM batches ORDER BY base_offset DESC LIMIT 1").fetchone()
    return row[0] if row else 1


def _rebased(rows: list[tuple[int, str, int, bytes, int]], base: int) -> list[tuple[int, str, int, bytes, int]]:
    """The rows with offsets from `base` on (another writer may have appended since `prepare`)."""
    shift = base - rows[0][0]
    return rows if shift == 0 else [(offset + shift, *rest) for offset, *rest in rows]  # type: ignore[misc]


class StoredRecord(NamedTuple):
    offset: int
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    appended_at: int


def like_prefix(prefix: str) -> str:
    """A LIKE pattern (with ESCAPE '\\') for the topics that start with `prefix`."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def read_records(
    path: Path, topic_prefix: str = "", after: int = 0, limit: int | None = None, *, newest: bool = False
) -> Iterator[StoredRecord]:
    """Records whose topic starts with `topic_prefix` and whose offset is > `after`, in offset
    order; with `newest`, only the last `limit` of them (read-only; safe while corem runs)."""
    if not Path(path).exists():
        return
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        where = "base_offset + count > ? AND topic LIKE ? ESCAPE '\\'"
        args = (after, like_prefix(topic_prefix))
        if newest and limit:
            # walk back from the end until `limit` records are covered
            rows, covered = [], 0
            for row in conn.execute(
                f"SELECT base_offset, topic, count, records, appended_at FROM batches WHERE {where} "
                "ORDER BY base_offset DESC",
                args,
            ):
                rows.append(row)
                covered += row[2]
                if covered >= limit:
                    break
            rows.reverse()
            records = [r for row in rows for r in _unpack(row, after)]
            yield from records[-limit:]
            return
        n = 0
        for row in conn.execute(
            f"SELECT base_offset, topic, count, records, appended_at FROM batches WHERE {where} "
            "ORDER BY base_offset",
            args,
        ):
            for r in _unpack(row, after):
                if limit is not None and n >= limit:
                    return
                n += 1
                yield r
    finally:
        conn.close()


def _unpack(row: tuple, after: int) -> Iterator[StoredRecord]:
    base, topic, _count, blob, appended_at = row
    for i, (key, value, headers) in enumerate(_decode(blob)):
        if base + i > after:
            yield StoredRecord(base + i, topic, key, value, headers, appended_at)
