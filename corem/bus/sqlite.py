"""The embedded default bus: an append-only SQLite log shaped like a Kafka topic.

Each record keeps its topic, key, value and headers, so what `corem telemetry tail` reads is what
the Kafka sink would have published.  WAL journal; `synchronous=FULL` by default, so a 2.04 means
the reading survives a crash of the process and of the machine (one fsync per batch, shared by every
reading in it).  `NORMAL` survives a crash of the process only and is faster.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import msgspec

from .base import BatchingSink, Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    offset      INTEGER PRIMARY KEY,
    topic       TEXT    NOT NULL,
    key         BLOB,
    value       BLOB    NOT NULL,
    headers     BLOB,
    appended_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_topic ON records (topic, offset);
"""

SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

_headers = msgspec.json.Encoder()


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    if synchronous not in SYNC_MODES:
        raise ValueError(f"store synchronous must be one of {', '.join(SYNC_MODES)}, got {synchronous!r}")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(SCHEMA)
    return conn


class EmbeddedBus(BatchingSink):
    name = "embedded"

    def __init__(self, path: Path, *, synchronous: str = "FULL", **kw) -> None:
        super().__init__(**kw)
        if synchronous not in SYNC_MODES:
            raise ValueError(f"store synchronous must be one of {', '.join(SYNC_MODES)}, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(self.path, self.synchronous)

    def write_batch(self, records: list[Record]) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError("embedded bus is not open")
        now = int(time.time() * 1000)
        enc = _headers.encode
        conn.execute("BEGIN")
        try:
            conn.executemany(
                "INSERT INTO records (topic, key, value, headers, appended_at) VALUES (?, ?, ?, ?, ?)",
                [(r.topic, r.key, r.value, enc(r.headers), now) for r in records],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class StoredRecord(NamedTuple):
    offset: int
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    appended_at: int


def read_records(
    path: Path, topic_prefix: str = "", after: int = 0, limit: int = 1000
) -> Iterator[StoredRecord]:
    """Records whose topic starts with `topic_prefix`, in offset order (read-only)."""
    if not Path(path).exists():
        return
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        escaped = topic_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = conn.execute(
            "SELECT offset, topic, key, value, headers, appended_at FROM records "
            "WHERE offset > ? AND topic LIKE ? ESCAPE '\\' ORDER BY offset LIMIT ?",
            (after, escaped + "%", limit),
        )
        for offset, topic, key, value, headers, appended_at in rows:
            yield StoredRecord(offset, topic, key, value, msgspec.json.decode(headers or b"{}"), appended_at)
    finally:
        conn.close()
