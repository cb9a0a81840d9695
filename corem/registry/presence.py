"""Presence shared by every worker and node: one row per device, transitions decided by atomic
statements, so that one online and one offline are published per real transition whichever
worker or node hears the device (corem/ingest/presence.py keeps the per-process view and calls
this from a worker thread, in batches).

Where it lives: with a PostgreSQL registry, in that database (every node shares it); with SQLite,
in `data_dir/presence.db` -- shared by the workers of one `corem serve`, and not the registry's
file, whose `PRAGMA data_version` counts every other connection's commit: a presence write there
would make every worker reload the whole directory.

The row:

- `online`, `changed_at`: the state and when it last changed (ms since the epoch);
- `last_seen`: the newest accepted reading any holder wrote (ms); holders write it at first sight,
  then at most every quarter threshold while they keep hearing the device, and exactly when they
  stop (their local view went stale) or stop serving;
- `holders`: how many processes hear the device now (a process adds itself when it first hears
  the device, and takes itself off when it has not heard it for the threshold, or stops);
- `stale_at`: when the row may be taken offline by anyone (`last_seen` + threshold + `margin`):
  the way out for a holder that died without taking itself off (a killed worker, a lost node);
- `claim`: a random number each transition writes, returned by the statement, so the process
  whose statement made the transition -- and only that one -- knows it did and publishes it.

Transitions:

- online: an upsert that sets online = 1; it made the transition if the row was offline or new
  (its `claim` came back).  Two holders hearing a device at once: one of the two upserts is first,
  the other finds it online.
- offline, the usual way: the last holder to stop hearing it takes itself off and, being the
  last (`holders <= 1`) with the shared `last_seen` as stale as its own, flips it in the same
  statement.  An old holder the device moved away from only takes itself off: the new holder
  still counts.  The offline comes exactly one threshold after the last reading, as with one
  process.
- offline, the way out: any process's sweep flips rows whose `stale_at` passed (`expire`).  The
  margin is larger than how late a live holder's `last_seen` can be (a quarter threshold and two
  sweeps) plus slack for clocks and a slow database, so it never fires while a live holder hears
  the device; a holder that was killed leaves its count behind, and its devices go offline this
  way, `margin` later than the usual way.  (A database slower than the slack for longer -- an
  outage -- can have the way out take a device a live holder hears; that holder's next write of
  `last_seen` finds the row offline and takes it online again: an extra pair, never a device left
  offline while it talks.)

Rows stay after a device goes offline (one per device ever heard); a removed device's row is not
removed with it (it is offline, and harmless).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..datafiles import PRESENCE_FILE
from .db import Db, is_url

#: the table's SQLite file in the data dir (with a PostgreSQL registry: in that database)
FILE = PRESENCE_FILE

SCHEMA = """
CREATE TABLE IF NOT EXISTS presence (
    tenant     TEXT NOT NULL,
    device     TEXT NOT NULL,
    online     INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    stale_at   INTEGER NOT NULL,
    changed_at INTEGER NOT NULL,
    holders    INTEGER NOT NULL,
    claim      INTEGER NOT NULL,
    PRIMARY KEY (tenant, device)
);
CREATE INDEX IF NOT EXISTS presence_stale ON presence (online, stale_at);
"""

#: heard: first sight here (`joined` 1: this process now counts as a holder) or a refresh of
#: `last_seen` (`joined` 0); the row goes online if it was not (a refresh that finds it offline
#: means the way out took it while this process heard the device: it is online again)
HEARD = """
INSERT INTO presence (tenant, device, online, last_seen, stale_at, changed_at, holders, claim)
VALUES (?, ?, 1, ?, ?, ?, 1, ?)
ON CONFLICT (tenant, device) DO UPDATE SET
    online = 1,
    holders = CASE WHEN presence.online = 0 THEN 1 ELSE presence.holders + ? END,
    changed_at = CASE WHEN presence.online = 0 THEN excluded.changed_at ELSE presence.changed_at END,
    claim = CASE WHEN presence.online = 0 THEN excluded.claim ELSE presence.claim END,
    last_seen = CASE WHEN excluded.last_seen > presence.last_seen THEN excluded.last_seen ELSE presence.last_seen END,
    stale_at = CASE WHEN excluded.stale_at > presence.stale_at THEN excluded.stale_at ELSE presence.stale_at END
RETURNING claim, last_seen
"""
#: left: this process no longer hears the device (quiet here for its threshold, or stopping);
#: the last holder flips it offline if the shared `last_seen` is past the threshold too (the
#: right-hand sides all read the row as it was)
LEFT = """
UPDATE presence SET
    holders = CASE WHEN holders > 1 THEN holders - 1 ELSE 0 END,
    online = CASE WHEN online = 1 AND holders <= 1 AND last_seen <= ? THEN 0 ELSE online END,
    changed_at = CASE WHEN online = 1 AND holders <= 1 AND last_seen <= ? THEN ? ELSE changed_at END,
    claim = CASE WHEN online = 1 AND holders <= 1 AND last_seen <= ? THEN ? ELSE claim END,
    last_seen = CASE WHEN ? > last_seen THEN ? ELSE last_seen END,
    stale_at = CASE WHEN ? > stale_at THEN ? ELSE stale_at END
WHERE tenant = ? AND device = ?
RETURNING claim, last_seen
"""
EXPIRE = """
UPDATE presence SET online = 0, holders = 0, changed_at = ?, claim = ?
WHERE online = 1 AND stale_at <= ?
RETURNING tenant, device, last_seen
"""

Key = tuple[str, str]


@dataclass
class Batch:
    """What one process has to tell the table since its last flush (ms since the epoch)."""

    #: first sight here: key -> (first reading, stale_at)
    joined: dict[Key, tuple[int, int]] = field(default_factory=dict)
    #: a newer `last_seen` while still hearing: key -> (last reading, stale_at)
    refreshed: dict[Key, tuple[int, int]] = field(default_factory=dict)
    #: no longer heard here: key -> (last reading, offline limit or -1 to never flip, stale_at)
    left: dict[Key, tuple[int, int, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.joined or self.refreshed or self.left)

    def merge(self, later: Batch) -> Batch:
        """This batch (which failed) followed by `later`, as one batch to try again."""
        out = Batch(dict(self.joined), dict(self.refreshed), dict(self.left))
        for key, value in later.joined.items():
            if key in out.left:  # it left, then came back: it still holds the device
                del out.left[key]
                out.refreshed[key] = value
            else:
                out.joined.setdefault(key, value)
        out.refreshed.update(later.refreshed)
        out.left.update(later.left)
        return out


#: (tenant, device, "online" | "offline", last_seen ms)
Transition = tuple[str, str, str, int]


def _claim() -> int:
    return random.getrandbits(62)


def open_table(registry: Path | str, data: Path) -> PresenceTable:
    """The presence table next to the registry: in its PostgreSQL database, else `data/presence.db`."""
    return PresenceTable(Db(registry if is_url(registry) else data / FILE))


class PresenceTable:
    def __init__(self, db: Db) -> None:
        """`db`: the database to keep it in (schema made now, on this connection); writes go
        through a connection of their own, made by `open` in the thread that writes."""
        self.db = db
        db.schema(SCHEMA)
        self._writer: Db | None = None

    def open(self) -> None:
        if self._writer is None:
            self._writer = self.db.reopen()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.db.close()

    def apply(self, batch: Batch, now: int) -> list[Transition]:
        """Write `batch` in one transaction; the transitions this process made, to publish.
        Raises the database's errors (nothing of the batch is written then)."""
        self.open()
        db = self._writer
        assert db is not None
        # a device's join before its refresh before its leave; within each, one order of rows for
        # every process (fewer PostgreSQL deadlocks between two nodes' batches: one is rolled
        # back and tried again at the next sweep)
        heard = [(k, 1, v) for k, v in sorted(batch.joined.items())] + [
            (k, 0, v) for k, v in sorted(batch.refreshed.items())]
        left = sorted(batch.left.items())
        claims = [_claim() for _ in range(len(heard) + len(left))]
        out: list[Transition] = []
        db.execute("BEGIN" if db.shared else "BEGIN IMMEDIATE")
        try:
            done = db.each_returning(HEARD, [(t, d, last, stale_at, now, claim, joined)
                                             for ((t, d), joined, (last, stale_at)), claim in zip(heard, claims)])
            for ((tenant, device), _, _), claim, rows in zip(heard, claims, done):
                if rows and rows[0][0] == claim:
                    out.append((tenant, device, "online", int(rows[0][1])))
            claims = claims[len(heard):]
            done = db.each_returning(LEFT, [(limit, limit, now, limit, claim, last, last, stale_at, stale_at, t, d)
                                            for ((t, d), (last, limit, stale_at)), claim in zip(left, claims)])
            for ((tenant, device), _), claim, rows in zip(left, claims, done):
                if rows and rows[0][0] == claim:
                    out.append((tenant, device, "offline", int(rows[0][1])))
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
        return out

    def expire(self, now: int) -> list[Transition]:
        """Take offline the rows whose `stale_at` passed (their holders died): one statement, so
        of all the processes sweeping, each row is taken by one."""
        self.open()
        db = self._writer
        assert db is not None
        rows = db.execute(EXPIRE, (now, _claim(), now)).fetchall()
        return [(str(t), str(d), "offline", int(last)) for t, d, last in rows]

    def online(self) -> dict[Key, int]:
        """Devices online in the table -> last_seen (for tests and tools)."""
        rows = self.db.execute("SELECT tenant, device, last_seen FROM presence WHERE online = 1").fetchall()
        return {(str(t), str(d)): int(last) for t, d, last in rows}
