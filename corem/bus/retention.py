"""Retention of the embedded bus (`data_dir/bus.db`): the oldest records go, as Kafka deletes its
oldest segments, once they are older than `bus_retention_age` or while the log is larger than
`bus_retention_size`.

Two settings, not one `bus_retention = "7d,2GiB"`: they are independent limits (Kafka's
`retention.ms` and `retention.bytes`), each with its own default and its own `off`, each one
plain TOML, environment and flag value with no grammar to learn; whichever is reached first
prunes.

The log is pruned from its start only, whole batches at a time (a batch is one row: one topic's
records of one group commit), so what stays is one dense run of offsets, as in a Kafka partition
whose log start offset moved: a reader positioned before it goes on at the first record kept.
The newest batch is never pruned, whatever the limits say: the next offset is read from it when
corem starts, and offsets are never handed out twice.  Nor, for size, is a batch younger than
`keep` (the endpoint's `exchange_lifetime`): a restart reads that long back to tell a device's
retransmission of a reading it stored from a new reading (bus/recovery.py), and a log cut there
would store the retransmission twice; the log then stays over its size until they age
(`corem_bus_prune_held_total`).  An age below it is refused at start (config.py `check`).

Pruning runs in the background (`Pruner.run`, in a worker thread) on a connection of its own, in
small transactions (at most `STEP_ROWS` batches and `STEP_BYTES` of records each, a pause between
them): the group-commit writer waits for the write lock at most one such step (milliseconds),
never for a whole catch-up.  The pruner's commits do not fsync (`synchronous=NORMAL`: a prune lost
to a power cut is done again) and leave the log's checkpoints to the bus's `Checkpointer`, as the
writer's do (corem/wal.py); deleted records are not overwritten on the pages SQLite frees
(`secure_delete=FAST`; Debian builds SQLite with it on, which would write every freed page again):
like the blocks of a deleted Kafka segment, they stay on disk until reused, in a file only its
owner reads (0600).

Size is the pages the log uses (SQLite's `page_count - freelist_count`), not the file's length:
SQLite does not give freed pages back to the file system, it reuses them, so once the log has
reached `bus_retention_size` the file stops growing there (plus what arrives between two checks);
a file that grew larger before (a bus with no retention) keeps its length until `VACUUM`.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import trio

from ..stats import Sample, counter, gauge
from ..wal import WRITER_BACKSTOP, defer_checkpoints

log = logging.getLogger("corem.bus")

#: seconds between two looks at the log's age and size
INTERVAL = 1.0
#: one prune transaction takes at most this many batches (rows) and this many bytes of records
STEP_ROWS = 256
STEP_BYTES = 2 * 1024 * 1024
#: seconds between two prune transactions while catching up: the writer takes the lock there
PAUSE = 0.01
#: a failing prune (a full disk cannot even delete) is logged at most this often
ERROR_LOG_INTERVAL = 60.0

_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_AMOUNT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_OFF = ("off", "none", "0", "")


def _amount(value: object, key: str, units: dict[str, int], what: str) -> float | None:
    """A number with one of `units` -> it times the unit's factor; `off` (or 0) -> None."""
    text = str(value).strip().lower()
    if text in _OFF:
        return None
    m = _AMOUNT_RE.fullmatch(text)
    if m is None or m.group(2) not in units:
        raise ValueError(f"{key}: {value!r} is not {what}, or 'off'")
    amount = float(m.group(1)) * units[m.group(2)]
    if not (0 < amount < math.inf):
        raise ValueError(f"{key}: {value!r} must be more than 0 (or 'off')")
    return amount


def parse_age(value: object, key: str = "bus_retention_age") -> float | None:
    """`7d`, `12h`, `30m`, `90s`, `2w` (a plain number is seconds) -> seconds; `off` (or 0) -> None."""
    return _amount(value, key, _AGE_UNITS, "an age: a number with s, m, h, d or w (e.g. 7d)")


def parse_size(value: object, key: str = "bus_retention_size") -> int | None:
    """`2GiB`, `500MB`, `1TiB`, `64KiB` (a plain number is bytes) -> bytes; `off` (or 0) -> None."""
    size = _amount(value, key, _SIZE_UNITS, "a size: a number with B, kB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 2GiB)")
    if size is None:
        return None
    if int(size) <= 0:  # (a fraction of a byte)
        raise ValueError(f"{key}: {value!r} must be more than 0 (or 'off')")
    return int(size)


@dataclass
class PruneStats:
    #: records pruned, by reason (`age`, `size`)
    records: dict[str, int] = field(default_factory=lambda: {"age": 0, "size": 0})
    batches: int = 0
    steps: int = 0
    errors: int = 0
    #: the log's pages in use, in bytes, at the last look
    size: int = 0
    #: the longest prune transaction so far, seconds
    longest_step: float = 0.0
    #: looks that found the log over its size with only batches younger than `keep` to prune
    held: int = 0


class Pruner:
    """Keeps bus.db within its retention; one per data dir (the process that holds its lock)."""

    def __init__(self, path: Path, *, age: float | None, size: int | None, clock: Callable[[], float] = time.time,
                 step_rows: int = STEP_ROWS, step_bytes: int = STEP_BYTES, keep: float = 0.0) -> None:
        self.path = Path(path)
        self.age = age
        self.size = size
        #: seconds of the newest records the size limit never prunes (the recovery window)
        self.keep = keep
        self.clock = clock
        self.step_rows = step_rows
        self.step_bytes = step_bytes
        self.stats = PruneStats()
        self._conn: sqlite3.Connection | None = None
        self._logged_at = -math.inf

    @property
    def enabled(self) -> bool:
        return self.age is not None or self.size is not None

    # -- in a worker thread ----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self.path.exists():  # (the bus makes it; nothing to prune before)
                return None
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA secure_delete=FAST")
            defer_checkpoints(conn, WRITER_BACKSTOP)  # (the bus's checkpointer copies the log: corem/wal.py)
            self._conn = conn
        return self._conn

    def used_bytes(self) -> int:
        """The pages the log uses, in bytes (not the file's length: freed pages are reused)."""
        conn = self._connect()
        if conn is None:
            return 0
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])

    def step(self) -> int:
        """One small transaction: prune the oldest batches that break a limit.  Returns the
        records pruned (0: the log is within its retention, or only its newest batch is left)."""
        conn = self._connect()
        if conn is None:
            return 0
        self.stats.size = used = self.used_bytes()
        if not self.enabled:
            return 0
        excess = 0 if self.size is None else used - self.size
        # a batch's records take whole pages (overflow pages: the page less its 4-byte link): what
        # deleting it frees, not its length -- counted in bytes, 16 KB pages over-pruned by ~20%
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        now = self.clock()
        cutoff_ms = None if self.age is None else int((now - self.age) * 1000)
        kept_ms = int((now - self.keep) * 1000)
        rows = conn.execute(
            "SELECT base_offset, count, appended_at, length(records) FROM batches ORDER BY base_offset LIMIT ?",
            (self.step_rows,)).fetchall()
        newest = conn.execute("SELECT MAX(base_offset) FROM batches").fetchone()[0]
        last = None  # the last batch of the prefix to prune
        records = {"age": 0, "size": 0}
        freed = 0
        for base, count, appended_at, length in rows:
            if base == newest or freed >= self.step_bytes:
                break
            if cutoff_ms is not None and appended_at < cutoff_ms:
                reason = "age"
            elif excess > freed and appended_at < kept_ms:
                reason = "size"
            else:
                if excess > freed and last is None:
                    self.stats.held += 1
                break
            last = base
            records[reason] += count
            freed += -(-length // (page - 4)) * page
        if last is None:
            return 0
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute("DELETE FROM batches WHERE base_offset <= ?", (last,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        took = time.perf_counter() - started
        stats = self.stats
        stats.steps += 1
        stats.batches += cur.rowcount
        stats.longest_step = max(stats.longest_step, took)
        for reason, n in records.items():
            stats.records[reason] += n
        stats.size = self.used_bytes()  # (what the gauge shows: the log as this step left it)
        return records["age"] + records["size"]

    def prune(self) -> int:
        """Steps until the log is within its retention (for tests and tools; the server uses `run`)."""
        total = 0
        while n := self.step():
            total += n
        return total

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- on the event loop -----------------------------------------------------------------------
    async def run(self) -> None:
        """Look every INTERVAL; prune step by step with a PAUSE between steps (the writer's turn).
        With both limits off it only measures the log (`corem_bus_size_bytes`)."""
        try:
            while True:
                try:
                    while await trio.to_thread.run_sync(self.step):
                        await trio.sleep(PAUSE)
                except sqlite3.Error as e:  # a full or failing disk: tried again at the next look
                    self.stats.errors += 1
                    self.close()
                    now = time.monotonic()
                    if now - self._logged_at >= ERROR_LOG_INTERVAL:
                        self._logged_at = now
                        log.warning("bus retention: could not prune %s (%s); trying again", self.path, e)
                await trio.sleep(INTERVAL)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close)

    def metrics(self) -> Iterator[Sample]:
        for reason, n in self.stats.records.items():
            yield counter("corem_bus_pruned_records", n, reason=reason)
        yield counter("corem_bus_prune_errors", self.stats.errors)
        yield counter("corem_bus_prune_held", self.stats.held)
        yield gauge("corem_bus_size_bytes", self.stats.size)
