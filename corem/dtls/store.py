"""Offloaded DTLS sessions, kept in SQLite instead of in the process.

An idle session's Mbed TLS context serializes to ~0.9 KB.  Held as Python objects, each one
cost ~4 KB of RSS (object headers, dict slots and the heap fragmentation of interleaving them with
the ~40 KB live contexts that come and go), too much for a million idle devices.  Here the
serialized sessions live in a SQLite table and the server keeps only a set of 6- or 18-byte peer
keys, so a datagram from an unknown peer never costs a query.  The table is in the data dir,
mode 0600 (it holds session keys), and it survives a restart or a crash of corem: devices come
back to their session without a new handshake.

A full or failing disk never escapes as an exception: a write that fails is reported (`put` says
False, `errors` counts, `last_error` says why) and the caller keeps its sessions live; a session
read back while its row cannot be deleted is read with a SELECT and its row deleted later.
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import pickle
import socket
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

from ..bus.sqlite import CARRIED
from ..errors import StartRefused, StorageUnavailable
from ..c_twins import c_twin
from ..registry.db import Db, add_columns
from .engine.crypto import hmac_sha256

log = logging.getLogger("corem.dtls")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    peer      BLOB PRIMARY KEY,
    blob      BLOB NOT NULL,
    tenant    TEXT NOT NULL,
    device    TEXT NOT NULL,
    last_seen REAL NOT NULL  -- wall clock, seconds since the epoch
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_last_seen ON sessions (last_seen);
"""
#: added after the first release (a store made before it gains it at start): the highest record
#: number the session took from its device -- a restored session refuses every record at or
#: below it (`DtlsServer.settle`: replays of what the device sent after a checkpoint)
RX_TOP = ("rx_top", "INTEGER NOT NULL DEFAULT -1")

#: peer key, blob, tenant, device, last seen (wall clock), rx_top
Row = tuple[bytes, bytes, str, str, float, int]

#: (one node's store: SQLite, beside the embedded bus) The record marks of the fast lane's readings
#: -- each saved session's highest record number -- are written by the embedded bus, one pack a
#: batch, in the batch's own transaction (bus/sqlite.py `carry`, its table `carried`, which this
#: store's connection attaches as `bus`): a reading is never durable without the number of the
#: record that carried it, and it costs no commit of its own.  A pack is the lane's
#: `take_marks_packed` (per mark its key's length, the key, the top as 8 bytes big-endian).  This
#: store reads the packs past its place (`rx_folded`), folds them in C (`fold_packs`: each key's
#: highest top) into the sessions' rx_top, once per session however many packs it was in, and
#: moves its place past them -- every FOLD_EVERY packs, and in a `put` or a `take` before it
#: reads or replaces rows -- all in its own file's transaction; the bus deletes the rows below
#: that place in a later batch.  A save of a row (`put`) folds first, then writes its own top:
#: older marks of its peer never become a new session's floor.  (History: raising rx_top in place
#: at each commit was one UPDATE per session in the commit's path; a log row per mark one B-tree
#: insert each, ~10% of the CoAPS lane's time; a pack a commit in this store's own file, a second
#: commit a batch, ~10% again.)
MARKS_PACK = "CREATE TABLE IF NOT EXISTS rx_pack (marks BLOB NOT NULL)"
#: how far this store has read the bus's `carried` rows (one row)
RX_FOLDED = "CREATE TABLE IF NOT EXISTS rx_folded (upto INTEGER NOT NULL)"
#: (one node's store whose sink cannot carry the marks -- Kafka: a record is durable when the
#: brokers say so, in no transaction of corem's) the lane's packs in this store's own file instead,
#: a row a batch of datagrams, each an INSERT committed before that batch's readings are submitted
#: (`log_pack`); a fold reads the oldest and deletes them in its own transaction, so every row
#: here is a pack not folded yet (no place to keep).  One INSERT a batch: the UPDATE of every
#: session the batch touched, in one commit (`mark`), cost the CoAPS lane on Kafka ~2 us a reading.
OWN_PACKS = "CREATE TABLE IF NOT EXISTS rx_packs (n INTEGER PRIMARY KEY, blob BLOB NOT NULL)"
_FOLD_ROWS = ("UPDATE sessions SET rx_top = m.top FROM (SELECT peer, max(rx_top) AS top FROM rx_log GROUP BY peer) "
              "AS m WHERE sessions.peer = m.peer AND sessions.rx_top < m.top")
_RAISE = "UPDATE sessions SET rx_top = ? WHERE peer = ? AND rx_top < ?"
#: packs folded in one transaction (a step), and carried by the bus between two folds (~0.8 s of
#: bus commits under load).  A restore or a save folds what is there first, whatever its age, in
#: its own transaction on the event loop: up to FOLD_EVERY packs, each of every session with marks
#: due in its batch (~1 KB with 64 sessions).  A fold updates each session once however many packs
#: it reads, hence the spacing (measured in docs/benchmarks.md: 32 -> 256 packs, +3.9% readings/s;
#: 256 -> 1,024, a lower CoAPS p99 in every pair, readings/s unchanged)
FOLD_STEP = FOLD_EVERY = 1024


def _rx_log(db: Db) -> None:
    """Migration 2 of the session store: the marks' log, a row a mark (SQLite only: a shared store
    is marked at once)."""
    if not db.shared:
        db.execute("CREATE TABLE IF NOT EXISTS rx_log (peer BLOB NOT NULL, rx_top INTEGER NOT NULL)")


def _rx_pack(db: Db) -> None:
    """Migration 3: the log as packs (`MARKS_PACK`); what the row-a-mark log held is folded first."""
    if not db.shared:
        db.execute(_FOLD_ROWS)
        db.execute("DROP TABLE rx_log")
        db.execute(MARKS_PACK)


def _rx_carried(db: Db) -> None:
    """Migration 4: the packs are read from the bus's file (`rx_folded`, the place); what this
    store's own log held is folded first."""
    if not db.shared:
        packs = [m for (m,) in db.execute("SELECT marks FROM rx_pack WHERE typeof(marks) = 'blob'").fetchall()]
        db.executemany(_RAISE, _fold_readable(packs))
        db.execute("DROP TABLE rx_pack")
        db.execute(RX_FOLDED)
        db.execute("INSERT INTO rx_folded (upto) VALUES (0)")


def _rx_packs(db: Db) -> None:
    """Migration 6: this store's own log of packs, for a sink that cannot carry them (`OWN_PACKS`)."""
    if not db.shared:
        db.execute(OWN_PACKS)


def pack_marks(marks: list[tuple[int, bytes]]) -> bytes:
    """[(top, key)] as one pack, as the lane's `take_marks_packed` writes it (its twin)."""
    return b"".join(bytes((len(key),)) + key + top.to_bytes(8, "big", signed=True) for top, key in marks)


def _fold_packs(packs: Iterable[bytes]) -> list[tuple[int, bytes, int]]:
    """Each key's highest top over the packs, as (top, key, top) in the order keys first appear
    (the UPDATE's parameters); ValueError for a pack that is not one.  The twin of the lane's C
    `fold_marks`."""
    tops: dict[bytes, int] = {}
    for pack in packs:
        at, end = 0, len(pack)
        while at < end:
            stop = at + 9 + pack[at]
            if stop > end:
                raise ValueError(f"a marks pack: the entry at byte {at} runs past its end ({end} bytes)")
            key, top = bytes(pack[at + 1:stop - 8]), int.from_bytes(pack[stop - 8:stop], "big", signed=True)
            if key not in tops or tops[key] < top:
                tops[key] = top
            at = stop
    return [(top, key, top) for key, top in tops.items()]


fold_packs: Callable[[Iterable[bytes]], list[tuple[int, bytes, int]]] = (
    c_twin("corem.fastlane._lane", "fold_marks", None) or _fold_packs)


def _raised(row: Row | None, logged: list[int]) -> Row | None:
    """`row` with its rx_top raised to the highest of the marks `logged` for it."""
    if row is None or not logged or max(logged) <= row[5]:
        return row
    return (*row[:5], max(logged))


def _fold(db: Db, limit: int | None = None) -> tuple[int, int | None]:
    """(in the caller's write transaction, the bus attached) Fold the oldest `limit` packs past
    the place (all: None) into the sessions' rx_top and move the place past them: how many, and
    the new place (None: no pack to fold)."""
    (upto,) = db.execute("SELECT upto FROM rx_folded").fetchone()
    sql = "SELECT n, typeof(blob) = 'blob', blob FROM bus.carried WHERE n > ? ORDER BY n" + (
        f" LIMIT {limit}" if limit else "")
    packs = db.execute(sql, (upto,)).fetchall()
    if not packs:
        return 0, None
    _raise_rows(db, packs)
    db.execute("UPDATE rx_folded SET upto = ?", (packs[-1][0],))
    return len(packs), int(packs[-1][0])


def _fold_own(db: Db, limit: int | None = None) -> tuple[int, None]:
    """(in the caller's write transaction) Fold the oldest `limit` packs of this store's own log
    (all: None) into the sessions' rx_top and delete them: how many (and no place: every row
    there is unread)."""
    packs = db.execute("SELECT n, typeof(blob) = 'blob', blob FROM rx_packs ORDER BY n"
                       + (f" LIMIT {limit}" if limit else "")).fetchall()
    if packs:
        _raise_rows(db, packs)
        db.execute("DELETE FROM rx_packs WHERE n <= ?", (packs[-1][0],))
    return len(packs), None


def _raise_rows(db: Db, packs: list[tuple[int, bool, bytes]]) -> None:
    """The rows' rx_top raised to the packs' marks ((n, is a blob, pack) as read; a row that is no
    blob -- not the lane's -- is passed over with the rest, unread)."""
    db.executemany(_RAISE, _fold_readable([pack for _, blob, pack in packs if blob]))


def _coalesced(pack: bytes) -> bytes:
    """One pack of each key's highest mark in `pack` (packs written as one): as long as the
    sessions it names, however many batches it stood for."""
    return pack_marks([(top, key) for top, key, _ in fold_packs([pack])])


def _fold_readable(packs: list[bytes]) -> list[tuple[int, bytes, int]]:
    """`fold_packs` of the packs, without any row that is not one (not the lane's: said, and
    dropped with the others by the fold)."""
    try:
        return fold_packs(packs)
    except ValueError as e:
        log.warning("dtls session store: a row of the marks' log is not a pack, dropped: %s", e)
    return fold_packs(pack for pack in packs if _is_pack(pack))


def _is_pack(pack: bytes) -> bool:
    try:
        fold_packs([pack])
    except ValueError:
        return False
    return True


class Marks(enum.Enum):
    """Where a store's lane record marks go (`SessionStore.marks`): one place, chosen once."""
    AT_ONCE = "at once"
    CARRIED = "carried by the bus"
    LOGGED = "logged in the store's file"


class Unsaved(enum.Enum):
    """Why `freeze` gave no blob."""

    #: Mbed TLS refused before touching the context (no application data since the handshake):
    #: the session stays live and is tried again at a later sweep
    NOT_YET = "not serializable yet"
    #: it failed after `mbedtls_ssl_context_save`, which resets the live context: the session is
    #: gone, and the device will do a new handshake
    LOST = "lost while serializing"


def _row(row: Any) -> Row | None:
    """A row as SQLite gave it (untyped), as a Row."""
    if row is None:
        return None
    peer, blob, tenant, device, last_seen, rx_top = row
    return bytes(peer), bytes(blob), str(tenant), str(device), float(last_seen), int(rx_top)


def freeze(buf: Any) -> bytes | Unsaved:
    """A session's Mbed TLS context as a blob (~0.9 KB; see the module docstring).

    Which `Unsaved` a refusal is comes from the context itself, not from the error: python-mbedtls
    2.10 raises a bare TypeError whose only trace of Mbed TLS's code is its text (no `.err`, no
    cause).  `mbedtls_ssl_context_save` resets the context it serialized (its state goes back to
    HELLO_REQUEST); one it refused before touching it (MBEDTLS_ERR_SSL_BAD_INPUT_DATA: no
    application record since the handshake) is still established -- which is what NOT_YET means."""
    try:
        body = pickle.dumps(buf)
    except TypeError:
        state = getattr(getattr(buf, "_handshake_state", None), "name", None)
        return Unsaved.NOT_YET if state == "HANDSHAKE_OVER" else Unsaved.LOST
    return hmac_sha256(_THIS_PROCESS, body) + body


def thaw(blob: bytes, patch: Callable[[bytes], bytes] | None = None) -> Any | None:
    """The live context again (a `TLSWrappedBuffer`), or None if the blob does not restore.
    Only a blob this process froze is unpickled: its tag (HMAC-SHA256 under a key drawn at start,
    `_THIS_PROCESS`) is checked first, then `patch` (`step_sequence`) applied to what it covers.
    Pickle runs code: a row another process wrote -- a worker, the process before a restart,
    whoever can write the data dir's file -- is a lost session, never code (found in review of
    the deprecated engine: its rows were unpickled as read)."""
    tag, body = blob[:32], blob[32:]
    if len(blob) <= 32 or not hmac.compare_digest(tag, hmac_sha256(_THIS_PROCESS, body)):
        return None
    try:
        return pickle.loads(patch(body) if patch is not None else body)
    except Exception:  # noqa: BLE001 - Mbed TLS raises its own types; a bad blob is a lost session
        return None


#: the key of `freeze`'s tags: this process's own, so what another wrote never unpickles here
_THIS_PROCESS = os.urandom(32)


#: record sequence numbers given per millisecond of wall clock at most (see `step_sequence`)
SEQUENCE_PER_MS = 16
_CONNECTION = b"\x8c\nconnection\x94"  # the pickled state's key before the saved context


def step_sequence(blob: bytes, wall: float) -> bytes:
    """The blob with its next outgoing record number moved up to 16 x (milliseconds since the
    epoch), if that is more.

    A session saved at a checkpoint and restored after a crash would number its records from the
    checkpoint on, and the peer has seen higher numbers since: DTLS replay protection drops
    those records (RFC 6347 4.1.2.6), so the device would hear nothing until it handshakes
    again.  Numbers tied to the clock are past any this session sent before, at any restore,
    as long as it sent fewer than 16 records per millisecond; 2^48 lasts until the year 2527.

    Mbed TLS 2.28's saved context (`mbedtls_ssl_context_save`) ends with the outgoing counter
    (epoch, 2 bytes; number, 6), the MTU (2) and the ALPN name (1 length byte, 0: CoAP uses
    none).  A blob of another shape is returned as it is."""
    at = blob.find(_CONNECTION)
    if at < 0:
        return blob
    op = at + len(_CONNECTION)
    if blob[op:op + 1] == b"C":
        start, length = op + 2, blob[op + 1]
    elif blob[op:op + 1] == b"B":
        start, length = op + 5, int.from_bytes(blob[op + 1:op + 5], "little")
    else:
        return blob
    end = start + length
    if length < 11 or end > len(blob) or blob[end - 1] != 0:
        return blob
    counter = end - 11
    number = int.from_bytes(blob[counter + 2:counter + 8], "big")
    stepped = min(int(wall * 1000) * SEQUENCE_PER_MS, (1 << 48) - 1)
    if stepped <= number:
        return blob
    return blob[:counter + 2] + stepped.to_bytes(6, "big") + blob[counter + 8:]


def peer_key(peer: object) -> bytes:
    """A compact key for an address: packed IP + port (6 bytes for IPv4, 18 for IPv6)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except (OSError, TypeError):
            return repr(peer).encode()
        return packed + int(port).to_bytes(2, "big")
    return repr(peer).encode()


_UPSERT = ("INSERT INTO {t} (peer, blob, tenant, device, last_seen, rx_top) VALUES (?, ?, ?, ?, ?, ?) "
           "ON CONFLICT (peer) DO UPDATE SET blob = excluded.blob, tenant = excluded.tenant, "
           "device = excluded.device, last_seen = excluded.last_seen, rx_top = excluded.rx_top")
_COLUMNS = "peer, blob, tenant, device, last_seen, rx_top"
#: (a shared store) the process that saved a row: its marks raise only rows it saved (`mark_held`),
#: and its saves replace only rows it saved -- a row another node saved since it took the session
#: (a device that moved there) is that node's, and an older copy written over it would hand the next
#: restore a lower rx_top (records taken there would be taken again: found by a review).  The copy
#: here then ends at its next marks, which find no row of its own.  (Still open: a save made between
#: another node's take of the row and that node's first save of it lands.)
OWNER = ("owner", "BLOB")
_UPSERT_OWNED = ("INSERT INTO {t} (peer, blob, tenant, device, last_seen, rx_top, owner) VALUES (?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT (peer) DO UPDATE SET blob = excluded.blob, tenant = excluded.tenant, "
                 "device = excluded.device, last_seen = excluded.last_seen, rx_top = excluded.rx_top, "
                 "owner = excluded.owner WHERE {t}.owner = excluded.owner")


class SessionStore:
    """Saved sessions by peer key: SQLite in the data dir (one node), or PostgreSQL (`shared`:
    several nodes, each restoring what another saved), through the registry's `Db` (which makes a
    lost PostgreSQL connection again).  In PostgreSQL the table is `corem_dtls_sessions`: it may
    share a database with the registry."""

    def __init__(self, where: Path | str = ":memory:") -> None:
        self.db = Db(where)
        #: every node reads and writes the same sessions: a peer this process never saw may have one
        self.shared = self.db.shared
        self.table = "corem_dtls_sessions" if self.shared else "sessions"
        if not self.shared:
            self.db.execute("PRAGMA synchronous=NORMAL")  # a lost session costs one handshake, no data
        self.db.schema(SCHEMA.replace("sessions", self.table))
        self.db.migrate("dtls_sessions", (add_columns(self.table, (RX_TOP,)),  # 1: rx_top, from before versions
                                          _rx_log, _rx_pack, _rx_carried,
                                          add_columns(self.table, (OWNER,)),  # 5: owner (`mark_held`)
                                          _rx_packs))
        #: this process, in the rows it saves to a shared store (a node's workers are processes too)
        self.owner = os.urandom(8)
        self.errors = 0  # writes the disk (or the database) refused
        self.last_error: str | None = None  # the latest one's reason, until a write works again
        self._stale: set[bytes] = set()  # rows read back that could not be deleted yet
        #: where the lane's record marks go: AT_ONCE, written to the rows as they come (a shared
        #: store, one in memory, a store before its sink is known); CARRIED, by the embedded bus
        #: in its batches' commits (`read_marks_from`), folded from its file; LOGGED, in this
        #: store's own file (`log_marks_here`: a sink that cannot carry them), folded from there
        self.marks = Marks.AT_ONCE
        #: (CARRIED) the bus's `carried` rows below this are folded
        self.folded_upto = 0
        #: called before each pack's commit (`log_marks_here`: the checkpointer's `before_commit`)
        self._before_log: Callable[[], None] | None = None
        #: marks whose pack the disk refused, written with the next one (`log_pack`)
        self._unlogged = b""
        #: held by the bus from its take of a pack to its commit (`read_marks_from`'s `carrying`):
        #: a save or a restore waits for it, so it folds every mark taken before it (found in
        #: review: in a worker thread a pack taken, not yet committed, came after a new session's
        #: save and became its floor; a restore missed a session's last marks).  An in-process lock:
        #: the bus file's own write lock would have the event loop wait for every commit other
        #: workers' processes make to it (seconds, measured, under SQLite's busy backoff)
        self._carrying: AbstractContextManager[Any] = nullcontext()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self.db.execute(sql.format(t=self.table), args)

    def put(self, rows: list[Row]) -> bool:
        """Store sessions (replacing older ones for the same peer), in one transaction; False if
        the disk would not take them (nothing is stored then)."""
        if not rows:
            return True
        try:
            with self._carrying:  # (not between the bus's take of a pack and its commit)
                # (a write lock first: the fold reads before it writes, and a read transaction another
                # connection -- the marks' writer -- commits past cannot be upgraded: "database is locked")
                self._run("BEGIN" if self.shared else "BEGIN IMMEDIATE")
                # (folded first: the rows say the sessions' tops now, and older marks of their peers
                # would only lag, or, a new session's, be a previous one's)
                _count, upto = self._fold_some()
                unlogged = self._fold_unlogged()
                if self.shared:
                    self.db.executemany(_UPSERT_OWNED.format(t=self.table), [(*row, self.owner) for row in rows])
                else:
                    self.db.executemany(_UPSERT.format(t=self.table), rows)
                self._run("COMMIT")
        except self.db.Error as e:
            self._failed(e)
            return False
        self._folded(upto)
        self._unlogged_folded(unlogged)
        self._stale.difference_update(row[0] for row in rows)
        self._ok()
        return True

    def peek(self, key: bytes) -> Row | None:
        """(a shared store) The row of `key`, left where it is: a node opens it before it takes it
        (`take_unchanged`), so that one that cannot open it -- a wrong `dtls_state_key` -- never
        takes it from the node that can, nor puts it back as its own."""
        try:
            return _row(self._run(f"SELECT {_COLUMNS} FROM {{t}} WHERE peer = ?", (key,)).fetchone())
        except self.db.Error as e:
            self._failed(e)
            return None

    def take_unchanged(self, key: bytes, blob: bytes) -> Row | None:
        """(a shared store) Remove and return the row of `key` if its state is still `blob` (what
        `peek` read and the caller opened); None if another node took or saved it since.  Its
        rx_top is the row's now (its owner may have raised it since the peek)."""
        try:
            return _row(self._run(f"DELETE FROM {{t}} WHERE peer = ? AND blob = ? RETURNING {_COLUMNS}",
                                  (key, blob)).fetchone())
        except self.db.Error as e:
            self._failed(e)
            return None

    def take(self, key: bytes) -> Row | None:
        """Remove and return the session of `key` (if its row cannot be deleted now, it is read
        and deleted at the next write that works), its rx_top raised to the marks logged for it
        and not folded yet (taken with it: a later session of the peer starts again)."""
        if self.shared:
            try:
                row = self._run(f"DELETE FROM {{t}} WHERE peer = ? RETURNING {_COLUMNS}", (key,)).fetchone()
            except self.db.Error as e:
                return self._read_instead(key, e)
            return _row(row)
        try:
            with self._carrying:  # (not between the bus's take of a pack and its commit)
                self._run("BEGIN IMMEDIATE")  # (another process's fold is before or after, not between)
                # (the marks not folded yet: a later session of the peer starts again)
                _count, upto = self._fold_some()
                unlogged = self._fold_unlogged()
                row = self._run(f"DELETE FROM {{t}} WHERE peer = ? RETURNING {_COLUMNS}", (key,)).fetchone()
                self._run("COMMIT")
        except self.db.Error as e:
            return self._read_instead(key, e)
        self._folded(upto)
        self._unlogged_folded(unlogged)
        return _row(row)

    def _fold_unlogged(self) -> bytes:
        """(in `put`'s or `take`'s write transaction) The marks of packs the disk refused
        (`log_pack`) into the rows first, as the logged ones: written after a row saved now, an
        older session's would become a new one's floor.  What was folded (`_unlogged_folded`)."""
        unlogged = self._unlogged
        if unlogged:
            self.db.executemany(_RAISE, fold_packs([unlogged]))
        return unlogged

    def _unlogged_folded(self, unlogged: bytes) -> None:
        """(the transaction committed) those marks are in the rows: not to be written again"""
        if unlogged and self._unlogged is unlogged:
            self._unlogged = b""

    def _read_instead(self, key: bytes, e: BaseException) -> Row | None:
        """(`take` when the disk refused) the row read, its deletion left for later."""
        self._failed(e)
        try:
            row = self._run(f"SELECT {_COLUMNS} FROM {{t}} WHERE peer = ?", (key,)).fetchone()
            pending = self._pending_packs()
            packs = [] if pending is None else [m for (m,) in self._run(pending)]
            logged = [top for top, k, _ in _fold_readable([*packs, self._unlogged]) if k == key]
        except self.db.Error:
            return None
        if row is not None:
            self._stale.add(key)
        return _raised(_row(row), logged)

    def read_marks_from(self, bus: Path, carrying: AbstractContextManager[Any]) -> None:
        """(one node's store) The embedded bus in `bus` carries the lane's marks from now on
        (bus/sqlite.py `carry`): its file attached, what it holds past this store's place folded
        now (what a process that stopped left there).  A bus file whose rows end below the place is
        another than the one read before (made anew, or put back): all its rows are read.
        `carrying`: the bus's `carry_lock`, which saves and restores take from now on (required:
        without it the race it closes comes back unseen).  What a run on a sink that cannot carry
        them logged in this store's own file (`log_marks_here`) is folded first."""
        if self.shared or self.marks is not Marks.AT_ONCE:
            raise RuntimeError("dtls session store: marks are read from one embedded bus, by one node's store")
        # (what a run on a sink that cannot carry them logged here: never read again once the bus is)
        self._must_fold(_fold_own, self.db.where)
        self._carrying = carrying
        if str(bus) == ":memory:":  # (a bus of its own in memory, which no other process writes: the fuzz
            # target writes its rows through this connection, thousands of runs with no disk I/O)
            self.db.execute("ATTACH DATABASE ':memory:' AS bus")
            self.db.execute(CARRIED.format(schema="bus."))
        else:
            # the file and its `carried` as the bus made them (`carry`), attached read-only: the
            # store's own write transactions (a save, a take, a fold: BEGIN IMMEDIATE) would
            # otherwise take the bus file's write lock too, waiting for -- and holding up -- every
            # process's bus commits
            self.db.attach_read_only(bus, "bus")
        self.marks = Marks.CARRIED
        self.folded_upto = self._place_in_bus()
        self.fold_marks()

    def _place_in_bus(self) -> int:
        """(the bus attached) This store's place in its `carried` rows: a bus file whose rows end
        below it is another than the one read before (made anew, or put back), read whole."""
        self._run("BEGIN IMMEDIATE")
        try:
            (newest,) = self._run("SELECT coalesce(max(n), 0) FROM bus.carried").fetchone()
            (upto,) = self._run("SELECT upto FROM rx_folded").fetchone()
            if newest < upto:
                log.warning("dtls session store: the bus's record marks end at %d, below the %d read before "
                            "(a new or restored bus file): all of them are read", newest, upto)
                self._run("UPDATE rx_folded SET upto = 0")
                upto = 0
            self._run("COMMIT")
        except BaseException:
            self.db.rollback()
            raise
        return int(upto)

    def log_marks_here(self, before_commit: Callable[[], None] | None = None, bus: Path | None = None) -> None:
        """(one node's store) The lane's packs are logged in this store's own file from now on
        (`log_pack`: its sink cannot carry them); what a process that stopped left here is folded
        now, and first what the embedded bus in `bus` carried and this store had not read (a run
        on it before this one, on Kafka: its marks would otherwise be skipped by a restore now, and
        raise a later session of their peer when a run on the bus read them again).
        `before_commit`: called before each pack's commit (the WAL checkpointer's)."""
        if self.shared or self.marks is not Marks.AT_ONCE:
            raise RuntimeError("dtls session store: marks are logged in one place, by one node's store")
        if bus is not None and bus.exists():
            try:
                self.db.attach_read_only(bus, "bus")
                try:
                    if self._run("SELECT 1 FROM bus.sqlite_master WHERE name = 'carried'").fetchone():
                        self.folded_upto = self._place_in_bus()
                        self._must_fold(_fold, bus)  # (never read again once detached)
                finally:
                    if self.db.in_transaction:
                        self.db.rollback()
                    self.db.execute("DETACH DATABASE bus")
            except self.db.Error as e:  # (a file that is no database, one that cannot be read)
                raise StartRefused(f"dtls session store: the record marks in {bus} could not be read "
                                   f"({type(e).__name__}: {e}); corem does not start without them (a "
                                   "file no run on the embedded bus wrote may be moved away)") from e
        self.marks = Marks.LOGGED
        self._before_log = before_commit
        self.fold_marks()

    def log_pack(self, pack: bytes) -> bool:
        """Commit one pack of the lane's marks here (`log_marks_here`), before the readings of the
        records it marks are submitted.  False if the disk refused (the caller counts it): the
        pack is then kept, coalesced, and written with the next one that is logged."""
        pack = self._unlogged + pack
        try:
            if self._before_log is not None:
                self._before_log()
            self._run("INSERT INTO rx_packs (blob) VALUES (?)", (pack,))
        except self.db.Error as e:
            self._failed(e)
            self._unlogged = _coalesced(pack)
            return False
        self._unlogged = b""
        if self.last_error is not None:  # (written again: /readyz says so)
            self._ok()
        return True

    def fold_marks(self) -> None:
        """Fold the packs not folded yet -- the bus's past this store's place, or this store's own
        log -- FOLD_STEP a transaction (a failed fold is counted; the packs wait for the next one)."""
        if self.marks is Marks.CARRIED:
            self._fold_steps(_fold)
        elif self.marks is Marks.LOGGED:
            self._fold_steps(_fold_own)

    def _fold_steps(self, fold: Callable[[Db, int], tuple[int, int | None]]) -> bool:
        """`fold(db, FOLD_STEP)` a write transaction, until a step folds fewer than FOLD_STEP
        packs; the bus's place moves once each step committed.  False if a step failed (counted:
        the packs wait for the next fold)."""
        while True:
            try:
                self._run("BEGIN IMMEDIATE")
                count, upto = fold(self.db, FOLD_STEP)
                self._run("COMMIT")
            except self.db.Error as e:
                self._failed(e)
                return False
            self._folded(upto)
            if count < FOLD_STEP:
                return True

    def _must_fold(self, fold: Callable[[Db, int], tuple[int, int | None]], where: object) -> None:
        """(at start) Fold the packs of the place the other mode keeps them (`fold`), which no fold
        of this run reads again: all of them, or corem does not start (a restore would forget
        them: the replays of records already durable would be taken)."""
        if not self._fold_steps(fold):
            raise StartRefused(f"dtls session store: the record marks in {where} could not be folded "
                               f"({self.last_error}); corem does not start without them")

    def _fold_some(self) -> tuple[int, int | None]:
        """(in a write transaction) Fold every pack not folded yet: how many, and the bus's new
        place (None: none, or not the bus's)."""
        if self.marks is Marks.CARRIED:
            return _fold(self.db)
        if self.marks is Marks.LOGGED:
            return _fold_own(self.db)
        return 0, None

    def _pending_packs(self) -> str | None:
        """The query of the packs not folded yet (None: no marks are carried nor logged)."""
        if self.marks is Marks.CARRIED:
            return "SELECT blob FROM bus.carried WHERE n > (SELECT upto FROM rx_folded) AND typeof(blob) = 'blob'"
        if self.marks is Marks.LOGGED:
            return "SELECT blob FROM rx_packs WHERE typeof(blob) = 'blob'"
        return None

    def _folded(self, upto: int | None) -> None:
        """(a fold committed) the bus may delete its rows below `upto`."""
        if upto is not None:
            self.folded_upto = upto

    def mark(self, marks: list[tuple[int, bytes]]) -> bool:
        """Record (rx_top, peer key) for saved sessions that took records, in one transaction,
        before those records are handled (DtlsServer.settle); False if the disk refused."""
        try:
            self._run("BEGIN")
            # (only ever up: a save may have written a newer number since these were noted --
            # layer._put writes the lane's marks before a save, whatever their age)
            self.db.executemany(f"UPDATE {self.table} SET rx_top = ? WHERE peer = ? AND rx_top < ?",
                                [(top, key, top) for top, key in marks])
            self._run("COMMIT")
        except self.db.Error as e:
            self._failed(e)
            return False
        return True

    def mark_held(self, marks: list[tuple[int, bytes]]) -> set[bytes] | None:
        """(a shared store) `mark` the rows this process saved, saying which keys have none any
        more: another node took the session (a restore there deletes the row, and its next save
        writes the row as its own) or ended it.  The caller's copy must end too: what it took from
        then on could be replayed to the other node, whose window starts at the row's rx_top.
        None if the database refused (nothing known)."""
        try:
            found = self.db.each_returning(
                f"UPDATE {self.table} SET rx_top = CASE WHEN rx_top < ? THEN ? ELSE rx_top END "
                "WHERE peer = ? AND owner = ? RETURNING peer", [(top, top, key, self.owner) for top, key in marks])
        except self.db.Error as e:
            self._failed(e)
            return None
        return {key for (_, key), rows in zip(marks, found) if not rows}

    def discard(self, key: bytes) -> None:
        try:
            self._run("DELETE FROM {t} WHERE peer = ?", (key,))
        except self.db.Error as e:
            self._failed(e)
            self._stale.add(key)

    def _failed(self, error: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        self.db.rollback()

    def _ok(self) -> None:
        """A write worked: the rows that could not be deleted before go now."""
        self.last_error = None
        if self._stale:
            stale, self._stale = self._stale, set()
            for key in stale:
                self.discard(key)

    def keys(self) -> list[bytes]:
        """Every saved session's key (one node's store: the set it restores from; a shared
        store is asked per peer instead, so this is for tests and the shutdown count)."""
        return [bytes(k) for (k,) in self._run("SELECT peer FROM {t}")]

    def expire(self, before: float) -> list[bytes]:
        """Forget sessions idle since before `before` (wall clock); return their keys (none while
        the disk refuses: they are forgotten at a later sweep)."""
        try:
            return [bytes(k) for (k,) in self._run("DELETE FROM {t} WHERE last_seen < ? RETURNING peer",
                                                   (before,))]
        except self.db.Error as e:
            self._failed(e)
            return []

    def blob_sizes(self) -> list[int]:
        return [n for (n,) in self._run("SELECT length(blob) FROM {t}")]

    def blobs(self) -> list[bytes]:
        return [bytes(b) for (b,) in self._run("SELECT blob FROM {t}")]

    def __len__(self) -> int:
        return int(self._run("SELECT count(*) FROM {t}").fetchone()[0])

    def close(self) -> None:
        self.db.close()
