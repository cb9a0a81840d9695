"""The embedded default bus: an append-only SQLite log shaped like Kafka topics.

Records are stored the way Kafka stores them: in record batches.  Each group commit writes one
row per topic holding all of that topic's records (msgpack `[key, value, headers]` triples) and
the batch's base offset; record `i` of a batch has offset `base_offset + i`.  One INSERT per batch
instead of one per record keeps the writer thread almost entirely inside SQLite's C code, with the
GIL released, so it does not compete with the event loop (measured: per-record inserts made the
writer hold the GIL long enough to cut throughput by ~3x).

WAL journal; `synchronous=FULL` by default, so a 2.04 means the reading survives a crash of the
process and of the machine (one fsync per batch, shared by every reading in it).  `NORMAL`
survives a crash of the process only and is faster: a commit appends to the log in the page
cache (~0.13 ms for 200 readings), so in a process that may run on one CPU only it is made on
the event loop (`commits_inline`).  Measured, the plain lane pinned to one core: 133k -> 162k
readings/s, p50 1.8 -> 1.4 ms; in a worker thread each batch cost ~4 thread switches and waits
for the GIL (the commit 0.13 ms, the round trip 0.5 ms).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import msgspec

from ..datafiles import into_wal, read_only_uri
from ..wal import WRITER_BACKSTOP, defer_checkpoints
from .base import AnyRecord, BatchingSink, PackedRecord, Record

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
#: what another layer must have durable with the records of the batch it belongs to (`carry`:
#: the DTLS record marks), a row a batch in the batch's own transaction; `n` only grows (the
#: newest row is never deleted, so a new row's number is past every number its reader has read)
CARRIED = "CREATE TABLE IF NOT EXISTS {schema}carried (n INTEGER PRIMARY KEY, blob BLOB NOT NULL)"

SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

#: the page size of a new bus file.  A batch row is one BLOB (~250 B a reading: ~60 KB at the lane's
#: ~230 readings a commit), written to the log a page at a time -- two `pwrite`s a page, its frame
#: header and the page: at SQLite's default 4 KB, ~0.29 calls a reading, 7% of the plain lane's CPU
#: (perf, 2026-12-07).  Measured: see docs/benchmarks.md, "The bus".
PAGE_SIZE = 16384

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
        #: commits that never wait for the disk (no fsync: NORMAL or OFF) nor for another writer's
        #: lock (not shared), where a worker thread cannot run beside the event loop (one CPU)
        self.inline = synchronous in ("OFF", "NORMAL") and not shared and one_cpu()
        #: `carry`: what to write with each batch, and below which number its reader is done
        self._carrier: tuple[Callable[[], bytes], Callable[[], int]] | None = None
        #: held from a take of the carrier's pack to the commit that writes it (`_write_in_transaction`)
        self.carry_lock = threading.Lock()
        self._unwritten = b""  # (taken for a batch whose transaction failed: written with the next)
        self._dropped_below = 0  # (carried rows below it deleted)

    def open(self) -> None:
        conn = self._connect()
        conn.execute(f"PRAGMA synchronous={self.synchronous}")  # validated in __init__
        # (copied by self.checkpointer, off the commit path; the log started again by
        # write_prepared's before_commit: corem/wal.py)
        defer_checkpoints(conn, WRITER_BACKSTOP)
        self.checkpointer.watch(self.path, self.synchronous)
        self._conn = conn
        self._next_offset = _next_offset(conn)

    #: the fast lane's records come packed: what this bus stores (`_batch`)
    packed = True

    def prepare(self, records: list[AnyRecord]) -> list[tuple[int, str, int, bytes, int]]:
        """Group by topic and encode each group as one batch row (runs on the event loop: cheap).
        A batch is nearly always one topic (one tenant's telemetry): then no grouping at all."""
        now = int(time.time() * 1000)
        offset = self._next_offset
        topic = records[0].topic
        if all(r.topic == topic for r in records):
            return [(offset, topic, len(records), _batch(records), now)]
        by_topic: dict[str, list[AnyRecord]] = {}
        for r in records:
            group = by_topic.get(r.topic)
            if group is None:
                by_topic[r.topic] = group = []
            group.append(r)
        rows = []
        for topic, group in by_topic.items():
            rows.append((offset, topic, len(group), _batch(group), now))
            offset += len(group)
        return rows

    def _connect(self) -> sqlite3.Connection:
        """A connection to the bus's file, made if need be (mode 0600, in WAL mode, its tables)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():  # mode 0600 (SQLite gives its -wal and -shm the file's mode)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        # (a new file's pages: PAGE_SIZE; a file with pages keeps its own -- SQLite fixes the size
        # at the first write, and in WAL mode never changes it)
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        into_wal(conn)
        conn.executescript(SCHEMA)
        conn.execute(CARRIED.format(schema=""))
        return conn

    def carry(self, take: Callable[[], bytes], done_below: Callable[[], int]) -> bool:
        """Write `take()` (unless empty) into each batch's own transaction, as a row of `carried`:
        what another layer must have durable no later than the records of that batch (the DTLS
        record marks of the lane's readings: dtls/layer.py `carry_marks`).  One file, one commit:
        a commit of their own in the session store's file cost ~10% of the CoAPS lane's rate.
        `take` runs where the batch is written (the event loop, or the worker thread), in its
        transaction after its records (under the write lock: `_write_in_transaction`); rows below
        `done_below()` -- read by their reader, which keeps its place in its own file -- are
        deleted in a later batch's transaction.  One carrier."""
        if self._carrier is not None:
            raise RuntimeError("embedded bus: one carrier at most")
        self._connect().close()  # (the file as the bus makes it, before its reader attaches it)
        self._carrier = (take, done_below)
        return True

    def commits_inline(self) -> bool:
        """On the event loop, unless the log is due to start again (`before_commit`: a
        checkpoint's and the restart's fsyncs)."""
        return self.inline and not self.checkpointer.restart_due(self.path)

    def write_prepared(self, rows: list[tuple[int, str, int, bytes, int]]) -> None:
        """One INSERT of every row: its own transaction, so one call into SQLite per batch, and in
        a worker thread one wait for the GIL after it (BEGIN, INSERT, COMMIT were three: the
        round trip to the thread 0.58 -> 0.51 ms a batch on one core)."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("embedded bus is not open")
        self.checkpointer.before_commit(conn, self.path)
        if self.shared or len(rows) > ROWS_PER_INSERT or self._carrier is not None:
            rows = self._write_in_transaction(conn, rows)
        else:
            conn.execute(_insert(len(rows)), [v for row in rows for v in row] if len(rows) > 1 else rows[0])
        last = rows[-1]
        self._next_offset = last[0] + last[2]

    def _write_in_transaction(self, conn: sqlite3.Connection,
                              rows: list[tuple[int, str, int, bytes, int]]) -> list[tuple[int, str, int, bytes, int]]:
        """Several writers (the offsets taken under the write lock), more rows than one statement
        takes, or a carrier's row to write with them (`carry`; and the carried rows below its
        reader's place deleted).  With a carrier, `carry_lock` is held from the take of its pack to
        the commit, and its reader's saves and restores take it too (dtls/store.py): each comes
        before the take or after the commit -- never between, where it would miss marks already
        taken (in a worker thread, found in review: a new session at an address given its
        predecessor's floor).  Not from before the records' INSERTs: the event loop's saves would
        wait for the whole batch's write.  (The reader attaches the bus read-only, so its own
        transactions never wait on this one's write lock: the two locks cannot cross.)"""
        conn.execute("BEGIN IMMEDIATE")
        carried, below = self._unwritten, 0
        carrying = False
        try:
            if self.shared:
                rows = _rebased(rows, _next_offset(conn))
            for i in range(0, len(rows), ROWS_PER_INSERT):
                chunk = rows[i:i + ROWS_PER_INSERT]
                conn.execute(_insert(len(chunk)), [v for row in chunk for v in row])
            if self._carrier is not None:
                take, done_below = self._carrier
                self.carry_lock.acquire()
                carrying = True
                self._unwritten = b""
                carried += take()  # (packs of marks: two written as one are one)
                below = done_below()
            deletes = bool(carried) and below > self._dropped_below
            if carried:
                conn.execute("INSERT INTO carried (blob) VALUES (?)", (carried,))
            if deletes:  # (the reader's place: never past the newest row, so `n` only grows)
                conn.execute("DELETE FROM carried WHERE n < ?", (below,))
            conn.execute("COMMIT")
        except BaseException:
            self._unwritten = carried  # (some may be of records submitted after this batch)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            if carrying:
                self.carry_lock.release()
        if deletes:
            self._dropped_below = below
        return rows

    def close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


#: batch rows one INSERT writes at most (5 parameters each; SQLite allows 32,766 since 3.32)
ROWS_PER_INSERT = 1000


@functools.lru_cache(maxsize=64)
def _insert(n: int) -> str:
    """The INSERT of `n` batch rows in one statement."""
    return ("INSERT INTO batches (base_offset, topic, count, records, appended_at) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?)"] * n))


def _batch(records: Sequence[AnyRecord]) -> bytes:
    """A batch row's records: the msgpack array of their `[key, value, headers]` triples, as
    msgspec writes the list -- its header, then each triple: a `PackedRecord`'s as it is, a
    `Record` without its topic encoded (msgspec writes a tuple as that array).  A batch without a
    `PackedRecord` (the lane off, TCP, the other doors) is one call, as it was before they existed."""
    if PackedRecord not in map(type, records):
        return _encode([r[1:] for r in records])
    n = len(records)
    parts = [r[1] if r.__class__ is PackedRecord else _encode(r[1:]) for r in records]
    # (the header joined with the rest: `head + b"".join(parts)` made the blob twice, and a blob
    # past malloc's mmap threshold -- a batch of arrays of points -- paid its page faults twice:
    # 721 µs against 36 µs for 2,560 records of 250 B)
    parts.insert(0, bytes((0x90 | n,)) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 0x10000
                                                       else b"\xdd" + n.to_bytes(4, "big")))
    return b"".join(parts)


def one_cpu() -> bool:
    """May this process run on one CPU only (its affinity: `taskset -c 0`, a one-CPU machine)?"""
    try:
        return len(os.sched_getaffinity(0)) == 1
    except AttributeError:  # (no sched_getaffinity: not Linux)
        return os.cpu_count() == 1


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
    conn = sqlite3.connect(read_only_uri(path), uri=True)
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
