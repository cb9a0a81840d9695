"""The server's in-memory directory of the registry, kept current from the registry's change log.

Every registered device is in memory, packed (compact.py: ~200 bytes a device), so that the
lookups of the request path -- by access token, PSK identity, certificate fingerprint, OSCORE kid,
(tenant, device) -- never wait for a database, on SQLite as on PostgreSQL.

Updates are incremental: the triggers of the registry number each change of a device or a
profile in the writing transaction (`registry_changes`, store.py and db.py), and the directory
reads the changes after the last number it applied and the current rows of the devices they
name -- the changed rows only, `BATCH` at a time -- whoever wrote them: the CLI, the admin API,
another node, another tool.  It reads everything again only at its first read, when more than
`FULL` changes (and half the fleet) wait, after a TRUNCATE, or when the log was pruned past it.

When to look: `changed()` (SQLite's `data_version` moved, or PostgreSQL's change counter), a
nudge (nudge.py), PostgreSQL's NOTIFY; the server calls `update()`, which reads in a worker thread
on a connection of its own and applies on the event loop, where the lookups are.  `refresh()` is
the same, synchronously (tests, tools, a change made on the caller's own connection).  After each
apply the directory tells its listeners which devices changed (None: any of them might have),
so that what they made from them (the ingest's targets, the fast lane's tables) is made again.
"""

from __future__ import annotations

import logging
import time
import types
import weakref
from collections import Counter
from typing import Any, Callable, Collection, Hashable, Iterator, Mapping, NamedTuple

import trio

from ..logs import Every
from ..profiles.spec import Profile
from ..stats import Sample, counter, gauge
from .compact import CACHE, CERT, KID, NAME, PSK, TOKEN, Fleet, Row, device_key
from .db import Db
from .store import _COLUMNS, Device, Registry

log = logging.getLogger("corem.registry")

#: changes read and applied at a time (each costs the event loop 2-5 us: a batch at most ~10 ms)
BATCH = 2000
#: read everything again when more changes than this (and than half the fleet) wait
FULL = 100_000
#: seconds a change stays in the log; a reader that fell further behind reads everything again
RETAIN = 3600
#: seconds between prunings of the log, and changes pruned per transaction (SQLite's write lock
#: is held for ~10 ms at a time, not for the seconds a million changes take)
PRUNE_EVERY, PRUNE_CHUNK = 300, 10_000
#: names per `IN (VALUES ...)` query
_NAMES_PER_QUERY = 400

Names = Collection[tuple[str, str]]


class Changes(NamedTuple):
    """What changed after `after` up to `seq`: each changed device's current row (None: removed)."""

    after: int
    seq: int
    devices: list[tuple[tuple[str, str], Row | None]]
    #: every stored profile, if any of them changed
    profiles: dict[str, Profile] | None
    #: more changes wait after `seq`
    more: bool


class Everything(NamedTuple):
    """The whole registry as of change `seq`, packed."""

    after: int
    seq: int
    fleet: Fleet
    profiles: dict[str, Profile]
    more: bool = False


class _View(Mapping[Any, Device]):
    """`by_name`, `by_token`, `by_psk_identity`: a key's device (walking it makes every device)."""

    def __init__(self, directory: Directory, kind: int) -> None:
        self._directory, self._kind = directory, kind

    def __getitem__(self, key: Any) -> Device:
        d = self._directory.fleet.find(self._kind, key)
        if d is None:
            raise KeyError(key)
        return d

    def __contains__(self, key: object) -> bool:
        try:
            return self._directory.fleet.find(self._kind, key) is not None
        except TypeError:  # (unhashable)
            return False

    def __len__(self) -> int:
        return self._directory.fleet.counts[self._kind]

    def __iter__(self) -> Iterator[Any]:
        for d in self._directory.fleet.devices():
            key = device_key(self._kind, d)
            if key is not None:
                yield key


class Directory:
    """The registry as the server serves it: lookups by name and credentials (module docstring)."""

    def __init__(self, registry: Registry, *, cache: int = CACHE, hasher: Callable[[Hashable], int] = hash) -> None:
        self.registry = registry
        self._hasher, self._cache = hasher, cache
        self.fleet = Fleet(hasher, cache)
        #: the stored profiles by name (the built-in `default` is not among them)
        self.profiles: dict[str, Profile] = {}
        #: the last change applied; -1 before the first read
        self.seq = -1
        self._version: int | None = None
        #: whole reads, and devices changed since
        self.reloads = 0
        self.updates = 0
        self._listeners: list[Callable[[], Callable[[Names | None], None] | None]] = []
        self._reader: Db | None = None
        self._updating: trio.Lock | None = None
        self._pruned_at = time.monotonic()
        self._look_warning = Every()  # (`_could_not`)
        self.by_name = _View(self, NAME)
        self.by_token = _View(self, TOKEN)
        self.by_psk_identity = _View(self, PSK)

    # -- lookups (on the event loop) ---------------------------------------------------------------
    def named(self, tenant: str, device: str) -> Device | None:
        return self.fleet.find(NAME, (tenant, device))

    def token_device(self, token: str) -> Device | None:
        """The device with this access token."""
        return self.fleet.find(TOKEN, token)

    def knows_token(self, token: bytes) -> bool:
        """Is this (a Uri-Path segment's bytes) a registered access token? (the fast lane's `known`)"""
        try:
            text = token.decode()
        except UnicodeDecodeError:
            return False
        return self.fleet.find(TOKEN, text) is not None

    def psk_device(self, identity: str) -> Device | None:
        """The device presenting this PSK identity."""
        return self.fleet.find(PSK, identity)

    def cert_device(self, sha256: str) -> Device | None:
        """The device whose certificate has this SHA-256 fingerprint."""
        return self.fleet.find(CERT, sha256)

    def oscore_device(self, kid_context: bytes | None, kid: bytes) -> Device | None:
        """The device whose OSCORE context has this kid (and kid context)."""
        return self.fleet.find(KID, f"{(kid_context or b'').hex()}/{kid.hex()}")

    def __len__(self) -> int:
        return len(self.fleet)

    def tenants(self) -> set[str]:
        """The tenants that have devices."""
        return set(self.fleet.tenants)

    def profile_counts(self) -> Counter[str]:
        """Devices per profile name."""
        return Counter(self.fleet.profiles)

    def metrics(self) -> Iterator[Sample]:
        yield gauge("corem_registry_devices", len(self.fleet))
        yield gauge("corem_registry_devices_with_token", self.fleet.counts[TOKEN])
        yield counter("corem_registry_reads", self.reloads)
        yield counter("corem_registry_changes", self.updates)

    # -- changes -----------------------------------------------------------------------------------
    def listen(self, changed: Callable[[Names | None], None]) -> None:
        """Call `changed(names)` after each apply: the (tenant, device) names that changed, or None
        when any device may have (everything read again, or a profile changed).  A method is held
        weakly: its object's end ends the listening."""
        self._listeners = [ref for ref in self._listeners if ref() is not None]  # (the ended ones go)
        if isinstance(changed, types.MethodType):
            self._listeners.append(weakref.WeakMethod(changed))
        else:
            self._listeners.append(lambda: changed)

    def changed(self) -> bool:
        """Has anything been written since the last look? (cheap: no log read)"""
        return self.seq < 0 or self.registry.data_version() != self._version

    def refresh(self, force: bool = False) -> bool:
        """Apply what changed, synchronously, read on the registry's own connection; True if
        anything was read.  `force`: look even if `changed` says no (a change made on this
        connection, which SQLite's `data_version` does not count)."""
        if not force and not self.changed():
            return False
        version = self.registry.data_version()
        while True:
            plan = self.read(self.registry.db)
            if self.apply(plan) and not plan.more:
                break
        self._version = version
        return True

    async def update(self, force: bool = False) -> None:
        """`refresh` off the event loop: read in a worker thread on a connection of its own, applied
        on the loop a batch at a time; one update at a time.  Prunes the log now and then."""
        if self._updating is None:
            self._updating = trio.Lock()
        async with self._updating:
            if time.monotonic() - self._pruned_at > PRUNE_EVERY:
                self._pruned_at = time.monotonic()
                await trio.to_thread.run_sync(self._prune_quietly)
            while True:
                try:  # (on the registry's own connection: a database that went away is not the end)
                    if not (force or self.changed()):
                        break
                    version = self.registry.data_version()
                except Exception as e:  # noqa: BLE001 - the driver's: PostgreSQL restarted, failed over, cut
                    self._could_not("look for changes", e)
                    return
                force = False
                reloads, updates, began = self.reloads, self.updates, time.monotonic()
                while True:
                    try:
                        plan = await trio.to_thread.run_sync(self.read, self._reader_db())
                    except Exception as e:  # busy, away, or a row no reader expects: the next look tries again
                        # (never the poll's end: one row another tool wrote must not stop the server)
                        self._could_not("read its changes", e)
                        return
                    if self.apply(plan) and not plan.more:
                        break
                    await trio.sleep(0)  # (between batches: the requests waiting meanwhile)
                self._version = version
                if self.reloads != reloads:
                    log.info("registry read: %d devices, %d with tokens, %d with PSK identities, %d profiles (%.2f s)",
                             len(self.fleet), self.fleet.counts[TOKEN], self.fleet.counts[PSK], len(self.profiles),
                             time.monotonic() - began)
                elif self.updates != updates:
                    log.info("registry changed: %d devices (%d registered)", self.updates - updates, len(self.fleet))

    def _could_not(self, what: str, e: Exception) -> None:
        """A look that failed (a PostgreSQL restart ended every node before: the error left the
        poll): one warning every 60 s at most, the connections made anew at the next look, what
        was read before still served."""
        if self._look_warning.due():
            log.warning("registry: could not %s (%s: %s); trying again at the next look (this warning at most "
                        "once a minute)", what, type(e).__name__, e)
        self.close()

    def _reader_db(self) -> Db:
        if self._reader is None:
            self._reader = self.registry.db.reopen()
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def read(self, db: Db) -> Changes | Everything:
        """What changed after the last apply, read on `db` (any thread: writes nothing here)."""
        after = self.seq
        if after < 0:
            return self._read_all(db, after)
        db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ" if db.shared else "BEGIN")  # (one snapshot)
        try:
            pruned = db.execute("SELECT pruned FROM registry_log").fetchone()[0]
            top = db.execute("SELECT max(seq) FROM registry_changes").fetchone()[0] or 0
            if pruned > after or top - after > max(FULL, len(self.fleet) // 2):
                db.execute("COMMIT")
                return self._read_all(db, after)
            log_rows = db.execute("SELECT seq, tenant, device FROM registry_changes WHERE seq > ? ORDER BY seq LIMIT ?",
                                  (after, BATCH + 1)).fetchall()
            more = len(log_rows) > BATCH
            log_rows = log_rows[:BATCH]
            if any(t is None and d is None for _, t, d in log_rows):  # a TRUNCATE (PostgreSQL)
                db.execute("COMMIT")
                return self._read_all(db, after)
            names = list(dict.fromkeys((t, d) for _, t, d in log_rows if t is not None))
            current: dict[tuple[str, str], Row] = {}
            for i in range(0, len(names), _NAMES_PER_QUERY):
                chunk = names[i:i + _NAMES_PER_QUERY]
                values = ", ".join(["(?, ?)"] * len(chunk))
                for r in db.execute(f"SELECT {_COLUMNS} FROM devices WHERE (tenant, device) IN (VALUES {values})",
                                    [part for name in chunk for part in name]):
                    current[r[0], r[1]] = r
            profiles = Registry.reading(db).list_profiles() if any(t is None for _, t, _ in log_rows) else None
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
        seq = log_rows[-1][0] if log_rows else after
        return Changes(after, seq, [(name, current.get(name)) for name in names], profiles, more)

    def _read_all(self, db: Db, after: int) -> Everything:
        fleet = Fleet(self._hasher, self._cache)
        db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ" if db.shared else "BEGIN")
        try:
            seq = db.execute("SELECT coalesce(max(seq), 0) FROM registry_changes").fetchone()[0]
            for r in db.stream(f"SELECT {_COLUMNS} FROM devices"):
                fleet.put(r, new=True)
            profiles = Registry.reading(db).list_profiles()
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
        return Everything(after, int(seq), fleet, profiles)

    def apply(self, plan: Changes | Everything) -> bool:
        """Make `plan` (from `read`) current, on the event loop; False if it is stale (another
        apply came first: read again)."""
        if plan.after != self.seq:
            return False
        if isinstance(plan, Everything):
            self.fleet, self.profiles, self.seq = plan.fleet, plan.profiles, plan.seq
            self.reloads += 1
            self._tell(None)
            return True
        fleet = self.fleet
        for name, r in plan.devices:
            if r is None:
                fleet.remove(name)
            else:
                fleet.put(r)
        self.seq = plan.seq
        self.updates += len(plan.devices)
        if plan.profiles is not None and plan.profiles != self.profiles:
            self.profiles = plan.profiles
            self._tell(None)
        elif plan.devices:
            self._tell([name for name, _ in plan.devices])
        return True

    def _tell(self, names: Names | None) -> None:
        alive = []
        for ref in self._listeners:
            changed = ref()
            if changed is not None:
                changed(names)
                alive.append(ref)
        self._listeners = alive

    # -- the log's length --------------------------------------------------------------------------
    def prune(self, db: Db, retain: float = RETAIN) -> int:
        """Drop the changes older than `retain` seconds, PRUNE_CHUNK per transaction; how many.
        `registry_log.pruned` says how far, in the same transaction as each chunk."""
        cutoff = int(time.time() - retain)
        top = db.execute("SELECT max(seq) FROM registry_changes WHERE at < ?", (cutoff,)).fetchone()[0]
        n = 0
        while top is not None:
            db.execute("BEGIN" if db.shared else "BEGIN IMMEDIATE")
            try:
                low = db.execute("SELECT min(seq) FROM registry_changes").fetchone()[0]
                upto = top if low is None else min(top, low + PRUNE_CHUNK - 1)
                n += db.execute("DELETE FROM registry_changes WHERE seq <= ?", (upto,)).rowcount
                db.execute("UPDATE registry_log SET pruned = ? WHERE one = 1 AND pruned < ?", (upto, upto))
                db.execute("COMMIT")
            except BaseException:
                db.rollback()
                raise
            if upto >= top:
                break
        return n

    def _prune_quietly(self) -> None:
        try:
            n = self.prune(self._reader_db())
        except Exception as e:  # noqa: BLE001 - the database's: busy or away; the next time will do
            log.warning("registry: could not prune the change log (%s)", e)
            return
        if n:
            log.debug("registry: pruned %d changes older than %d s from the log", n, RETAIN)
