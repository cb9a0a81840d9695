"""What an OSCORE context must remember across restarts (RFC 8613 §7.5): which sender sequence
numbers corem has used, and whether the device's requests were ever accepted (then, after a
restart, the replay window is unknown and Echo re-establishes it; a context never used starts with
an empty window).

When more than one process serves the same contexts (`--workers`, or nodes sharing a PostgreSQL
registry), the replay window itself lives here (`top`, `bits`): each accepted request moves it in
one atomic statement (`accept`), so a request replayed to another worker or node -- whose address
steers it elsewhere -- finds its number already taken.  One process alone keeps its window in
memory (no write per request) and, after a restart, re-establishes it with Echo; it marks the row's
window unknown (`top` -1) when it starts using a context, so a later shared start asks Echo too.

Rows are keyed by a hash of the whole context input (secret, salt, IDs, ID context): a nonce is a
function of exactly that, so a device removed and added again with the same keys keeps its
numbers, and new keys start at 0.  Numbers are reserved in blocks with one atomic statement, so
workers and nodes sharing the registry never take the same block.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import StorageUnavailable
from .db import Db, add_columns
from .store import OscoreKeys

SCHEMA = """
CREATE TABLE IF NOT EXISTS oscore_state (
    context  TEXT PRIMARY KEY,
    seq_next INTEGER NOT NULL,
    used     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS oscore_window_epoch (
    one   INTEGER PRIMARY KEY CHECK (one = 1),
    epoch TEXT NOT NULL
);
"""
#: what says the shared windows' last moves may be lost (`OscoreState._check_epoch`): the machine's
#: boot (SQLite, whose unflushed commits a crash of the machine loses) or the PostgreSQL server's
#: start (a crash of the server, a failover)
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: columns added after the first release (a registry made before them gains them at start)
WINDOW_COLUMNS = (("top", "INTEGER NOT NULL DEFAULT -1"), ("bits", "INTEGER NOT NULL DEFAULT 0"))
#: numbered migrations (`Db.migrate`): 1 = the replay window's columns, added before there were versions
SCHEMA_MIGRATIONS = (add_columns("oscore_state", WINDOW_COLUMNS),)
#: RFC 8613 §7.4's default window (corem/oscore/context.py's WINDOW), and all of its bits set
WINDOW = 32
FULL = (1 << WINDOW) - 1

#: one atomic step of the shared window (RFC 8613 §7.4): the number is taken if it is above the
#: top, or within the window and not seen; otherwise no row changes and nothing is returned.  Every
#: SET expression reads the row as it was (SQL's rule, in SQLite and PostgreSQL alike).
_ACCEPT = (
    "UPDATE oscore_state SET "
    "bits = CASE WHEN ? > top THEN (CASE WHEN ? - top < {w} THEN ((bits << CAST(? - top AS INTEGER)) | 1) & {full} "
    "ELSE 1 END) ELSE bits | (CAST(1 AS BIGINT) << CAST(top - ? AS INTEGER)) END, "
    "top = CASE WHEN ? > top THEN ? ELSE top END, used = 1 "
    "WHERE context = ? AND top >= 0 AND (? > top OR (top - ? < {w} AND "
    "((bits >> CAST(top - ? AS INTEGER)) & 1) = 0)) RETURNING top"
).format(w=WINDOW, full=FULL)


def fingerprint(keys: OscoreKeys) -> str:
    h = hashlib.sha256()
    for part in (keys.secret, keys.salt, keys.sender_id, keys.recipient_id, keys.id_context or b""):
        h.update(len(part).to_bytes(2, "big") + part)
    h.update(b"\x01" if keys.id_context is not None else b"\x00")
    return h.hexdigest()


class OscoreState:
    def __init__(self, db: Db) -> None:
        self.db = db
        db.schema(SCHEMA)
        db.migrate("oscore_state", SCHEMA_MIGRATIONS)
        #: the shared window's statements run on a connection of their own that does not wait for
        #: the disk at each commit (SQLite: synchronous NORMAL, in WAL the commit is in the log once
        #: written, so a killed process loses nothing; PostgreSQL: synchronous_commit off, the
        #: server flushes within a fraction of a second).  Only a crash of the machine (or of
        #: PostgreSQL) can forget the last moves of a window -- measured on SQLite: 2.8 ms per
        #: request with a flush per commit, 14-45 us without (an idle and a busy machine).
        #: Sequence number reservations stay on `db`, flushed: a forgotten one would reuse a nonce.
        self._window_db: Db | None = None
        #: windows made unknown because the epoch that wrote them ended (`_check_epoch`)
        self.windows_forgotten = 0

    @property
    def _window(self) -> Db:
        """The window's connection, made at its first use (a process alone never uses it)."""
        if self._window_db is None:
            db = self.db
            window = db if str(db.where) == ":memory:" else Db(db.where)
            if window is not db:
                window.on_reconnect = self._unflushed
                self._unflushed(window)
            self._window_db = window
        return self._window_db

    def _unflushed(self, window: Db) -> None:
        """The window's connection, as it starts (or starts again after a lost PostgreSQL
        connection): commits that do not wait for the disk, and the windows forgotten if the
        epoch that wrote them ended (`_check_epoch`)."""
        window.execute("SET synchronous_commit TO off" if window.shared else "PRAGMA synchronous=NORMAL")
        self._check_epoch(window)

    def _check_epoch(self, window: Db) -> None:
        """The windows' moves are committed without a flush: a crash of the machine (SQLite) or of
        the PostgreSQL server may have lost the last of them, and a request taken in that gap would
        be taken again -- its answer sealed once more under its nonce (RFC 8613 §7.4, §B.1.2; found
        by a review).  So when the epoch that wrote them is not the one now (another boot, another
        start of the server: `BOOT_ID`, `pg_postmaster_start_time()`), every window is unknown
        (`top` -1: Echo starts it again, `start_window`).  A process that was only killed loses
        nothing committed and keeps its epoch; one whose epoch cannot be told forgets the windows
        at every start, as a process alone does."""
        try:
            if window.shared:
                now = str(window.execute("SELECT pg_postmaster_start_time()").fetchone()[0])
            else:
                now = BOOT_ID.read_text().strip() if BOOT_ID.exists() else ""
            window.execute("BEGIN IMMEDIATE" if not window.shared else "BEGIN")
            try:
                row = window.execute("SELECT epoch FROM oscore_window_epoch WHERE one = 1").fetchone()
                if row is None or row[0] != now or not now:
                    forgotten = window.execute("UPDATE oscore_state SET top = -1, bits = 0 WHERE top >= 0").rowcount
                    window.execute("INSERT INTO oscore_window_epoch (one, epoch) VALUES (1, ?) "
                                   "ON CONFLICT (one) DO UPDATE SET epoch = excluded.epoch", (now,))
                    self.windows_forgotten += max(forgotten, 0)
                window.execute("COMMIT")
            except BaseException:
                window.rollback()
                raise
        except window.Error as e:
            raise StorageUnavailable(f"storage: oscore replay window: {e}") from None

    def reserve(self, context: str, n: int) -> int:
        """The first of `n` sender sequence numbers now reserved for this process."""
        try:
            row = self.db.execute(
                "INSERT INTO oscore_state (context, seq_next) VALUES (?, ?) ON CONFLICT (context) "
                "DO UPDATE SET seq_next = oscore_state.seq_next + ? RETURNING seq_next", (context, n, n)).fetchone()
        except self.db.Error as e:  # no number may be used that is not stored first
            raise StorageUnavailable(f"storage: oscore sequence numbers: {e}") from None
        return int(row[0]) - n

    def used(self, context: str) -> bool:
        try:
            row = self.db.execute("SELECT used FROM oscore_state WHERE context = ?", (context,)).fetchone()
        except self.db.Error as e:  # (5.03, as for every other read and write of this state)
            raise StorageUnavailable(f"storage: oscore state: {e}") from None
        return bool(row and row[0])

    def mark_used(self, context: str) -> None:
        """A process that keeps its window in memory took its first request for this context: from
        now on a restart must not trust an empty window, nor a shared one (its top is unknown)."""
        try:
            self.db.execute("INSERT INTO oscore_state (context, seq_next, used, top, bits) VALUES (?, 0, 1, -1, 0) "
                            "ON CONFLICT (context) DO UPDATE SET used = 1, top = -1, bits = 0", (context,))
        except self.db.Error as e:
            raise StorageUnavailable(f"storage: oscore state: {e}") from None

    # -- the shared replay window (several processes) ------------------------------------------
    def window_known(self, context: str) -> bool:
        """Can the shared window be trusted?  Yes for a context never used (it starts empty, at
        top 0 here), or one whose window processes sharing it keep; no for one used by a process
        that kept its window in memory (then Echo starts it: `start_window`)."""
        try:
            self._window.execute("INSERT INTO oscore_state (context, seq_next, top) VALUES (?, 0, 0) "
                                 "ON CONFLICT (context) DO UPDATE SET top = 0 WHERE oscore_state.used = 0 "
                                 "AND oscore_state.top < 0", (context,))
            row = self._window.execute("SELECT top FROM oscore_state WHERE context = ?", (context,)).fetchone()
        except self._window.Error as e:
            raise StorageUnavailable(f"storage: oscore state: {e}") from None
        return row is not None and int(row[0]) >= 0

    def accept(self, context: str, seq: int) -> bool:
        """Take the device's request numbered `seq` (after it decrypted): False if this or any
        process sharing the window took it before, or it is older than the window covers.  A
        never-used context's window starts at top 0 with bit 0 clear (number 0 not yet taken)."""
        try:
            row = self._window.execute(_ACCEPT, (seq, seq, seq, seq, seq, seq, context, seq, seq, seq)).fetchone()
        except self._window.Error as e:
            raise StorageUnavailable(f"storage: oscore replay window: {e}") from None
        return row is not None

    def start_window(self, context: str, seq: int) -> bool:
        """Echo proved the request numbered `seq` fresh: nothing at or before it is taken again
        (False if another process already started the window past it)."""
        try:
            row = self._window.execute(
                "UPDATE oscore_state SET top = ?, bits = ?, used = 1 WHERE context = ? AND top < ? RETURNING top",
                (seq, FULL, context, seq)).fetchone()
        except self._window.Error as e:
            raise StorageUnavailable(f"storage: oscore replay window: {e}") from None
        return row is not None
