"""Device presence: online from the first accepted reading, offline after a quiet spell.

Transitions are records on `device.presence.{tenant}` (key = device id) that go through the same
sink as telemetry.  Online devices are kept in activity order, so the periodic sweep only looks at
the stale end and costs nothing for devices that keep talking.  Offline devices are not kept.

Presence is per device, not per process: with workers (`--workers N`) or nodes sharing a
PostgreSQL registry, a device that moves is heard by another process, and the spec's one online
and one offline per real transition must hold whichever process hears it.  So with a `table`
(corem/registry/presence.py: a row per device in the database the processes share) this view is
only what this process hears, and the table decides the transitions: `seen` notes a device heard
here for the first time (and, at most every quarter threshold, a newer last reading), `sweep`
notes the devices this process stopped hearing, and `run` writes both in a worker thread, in one
transaction per sweep, and publishes the transitions the table says this process made.  The hot
path stays a dict update: no database write per reading, none on the event loop.  Without a
table (unit tests, tools) the transitions are this process's own, published at once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from typing import Annotated, Callable, Iterator, Literal

import msgspec
import trio

from ..bus import topics
from ..bus.base import Record, Sink
from ..bus.headers import JSON, standard
from ..registry.presence import Batch, PresenceTable
from ..stats import Sample, counter, gauge

log = logging.getLogger("corem.presence")

#: a local entry's next refresh time when there is no table to refresh
_NEVER = float("inf")
#: seconds added to the way-out margin (corem/registry/presence.py) for clocks and a slow database
SLACK = 2.0


State = Literal["online", "offline"]


class PresenceEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a `device.presence.{tenant}` record (docs/schemas/presence-event.schema.json)."""

    tenant: str
    device: str
    state: State
    at: Annotated[int, msgspec.Meta(description="when corem noticed, ms since the Unix epoch")]
    last_seen: Annotated[int, msgspec.Meta(description="the device's last accepted reading, ms since the Unix epoch")]


_encode = msgspec.json.Encoder().encode


def presence_topic(tenant: str) -> str:
    return topics.presence(tenant)


class Presence:
    def __init__(
        self,
        sink: Sink,
        offline_after: float = 120.0,
        *,
        tenants: dict[str, float] | None = None,
        profiles: dict[str, float] | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        table: PresenceTable | None = None,
    ) -> None:
        for name, value in {"offline_after": offline_after, **(tenants or {}), **(profiles or {})}.items():
            if value <= 0:
                raise ValueError(f"presence threshold for {name} must be > 0, got {value}")
        self.sink = sink
        self.offline_after = offline_after
        #: thresholds overriding `offline_after`: a device's profile first, then its tenant
        #: (ThingsBoard's order: the more specific setting wins)
        self.tenants = dict(tenants or {})
        self.profiles = dict(profiles or {})
        self.wall_ms = wall_ms
        #: threshold -> {(tenant, device) -> (monotonic last seen, wall-clock ms last seen, wall-clock
        #: ms of its next refresh in the table)}, least recent first: one activity-ordered dict per
        #: threshold keeps the sweep at the stale ends
        self._by_threshold: dict[float, OrderedDict[tuple[str, str], tuple[float, int, float]]] = {
            t: OrderedDict() for t in {offline_after, *self.tenants.values(), *self.profiles.values()}
        }
        self._online = self._by_threshold[offline_after]
        self.online_by_tenant: Counter[str] = Counter()
        self.transitions: Counter[str] = Counter()
        self.publish_failures = 0
        #: the shared state (None: this process's transitions are the device's)
        self.table = table
        #: seconds between sweeps: a quarter of the shortest threshold, at most 1 s
        self.interval = min(1.0, self.shortest / 4)
        # what the next flush tells the table: heard first (wall ms, threshold), a refresh due
        # (threshold), stopped hearing (wall ms of the last reading, threshold, may flip offline)
        self._joined: dict[tuple[str, str], tuple[int, float]] = {}
        self._dirty: dict[tuple[str, str], float] = {}
        self._left: dict[tuple[str, str], tuple[int, float, bool]] = {}
        self._failed: Batch | None = None  # a batch the database refused, tried again with the next
        self._wake: trio.Event | None = None
        self.store_errors = 0

    def metrics(self) -> Iterator[Sample]:
        for tenant, n in sorted(self.online_by_tenant.items()):
            if n:
                yield gauge("corem_devices_online", n, tenant=tenant)
        for state, n in sorted(self.transitions.items()):
            yield counter("corem_presence_transitions", n, state=state)
        yield counter("corem_presence_publish_failures", self.publish_failures)
        if self.table is not None:
            yield counter("corem_presence_store_errors", self.store_errors)

    def threshold(self, tenant: str, profile: str | None = None) -> float:
        if profile is not None and profile in self.profiles:
            return self.profiles[profile]
        return self.tenants.get(tenant, self.offline_after)

    def seen(self, tenant: str, device: str, now: float, profile: str | None = None) -> None:
        """An accepted reading from the device."""
        key = (tenant, device)
        wall = self.wall_ms()
        by = self._by_threshold
        online = self._online if len(by) == 1 else by[self.threshold(tenant, profile)]
        entry = online.get(key)
        if entry is not None:
            if wall < entry[2]:
                online[key] = (now, wall, entry[2])
            else:  # (never without a table) the table's last_seen is a quarter threshold old
                threshold = self.threshold(tenant, profile)
                self._dirty[key] = threshold
                online[key] = (now, wall, wall + threshold * 250)
            online.move_to_end(key)
            return
        threshold = self.threshold(tenant, profile)
        online[key] = (now, wall, _NEVER if self.table is None else wall + threshold * 250)
        if len(by) > 1 and any(key in other for other in by.values() if other is not online):
            for other in by.values():  # its threshold changed (a new profile): it stays online
                if other is not online:
                    other.pop(key, None)
            return
        self.online_by_tenant[tenant] += 1
        if self.table is None:
            self._publish(tenant, device, "online", wall, wall)
            return
        self._joined.setdefault(key, (wall, threshold))
        if self._wake is not None:  # the table says soon whether this is the device's online
            self._wake.set()

    def sweep(self, now: float) -> int:
        """Mark offline every device quiet for longer than its threshold; returns how many.  With
        a table: they are quiet here, and the next flush tells the table (which decides)."""
        n = 0
        for threshold, online in self._by_threshold.items():
            limit = now - threshold
            while online:
                (tenant, device), (last, last_wall, _) = next(iter(online.items()))
                if last > limit:
                    break
                del online[(tenant, device)]
                self.online_by_tenant[tenant] -= 1
                if self.table is None:
                    self._publish(tenant, device, "offline", self.wall_ms(), last_wall)
                else:
                    self._left[(tenant, device)] = (last_wall, threshold, True)
                n += 1
        return n

    def is_online(self, tenant: str, device: str) -> bool:
        return any((tenant, device) in online for online in self._by_threshold.values())

    def last_seen(self) -> dict[tuple[str, str], int]:
        """Online devices -> wall-clock ms of their last accepted reading."""
        return {key: wall for online in self._by_threshold.values() for key, (_, wall, _) in online.items()}

    @property
    def shortest(self) -> float:
        return min(self._by_threshold)

    # -- the shared table ---------------------------------------------------------------------------
    def _stale_ms(self, threshold: float) -> int:
        """How long after a reading anyone may take the device offline (the table's way out): the
        threshold, plus how late a live holder's last_seen can be -- a quarter threshold between
        refreshes and two sweeps until one is written -- plus slack for clocks and the database."""
        return int((threshold * 1.25 + 2 * self.interval + SLACK) * 1000)

    def take_batch(self, release: bool = False) -> Batch:
        """What the table has not been told yet; `release`: this process stops, every device it
        hears leaves it without going offline (the others, or the way out, decide that)."""
        if release:
            for threshold, online in self._by_threshold.items():
                for key, (_, last_wall, _) in online.items():
                    self._left[key] = (last_wall, threshold, False)
                online.clear()
            self.online_by_tenant.clear()
        now = self.wall_ms()
        batch = Batch()
        for key, (wall, threshold) in self._joined.items():
            batch.joined[key] = (wall, wall + self._stale_ms(threshold))
        for key, threshold in self._dirty.items():
            entry = self._by_threshold[threshold].get(key)
            if entry is not None:
                batch.refreshed[key] = (entry[1], entry[1] + self._stale_ms(threshold))
        for key, (wall, threshold, flip) in self._left.items():
            # quiet here for the threshold (by the monotonic clock): no other holder's last_seen
            # newer than this may have it go offline
            limit = max(now - int(threshold * 1000), wall) if flip else -1
            batch.left[key] = (wall, limit, wall + self._stale_ms(threshold))
        self._joined, self._dirty, self._left = {}, {}, {}
        if self._failed is not None:
            batch, self._failed = self._failed.merge(batch), None
        return batch

    async def flush(self, release: bool = False, expire: bool = True) -> None:
        """Tell the table what changed here (in a worker thread) and publish the transitions it
        says this process made; `expire`: also take offline the devices of dead holders."""
        table = self.table
        assert table is not None
        batch = self.take_batch(release)

        def write() -> list[tuple[str, str, str, int]]:
            now = self.wall_ms()
            out = table.apply(batch, now) if batch else []
            return out + table.expire(now) if expire else out

        try:
            transitions = await trio.to_thread.run_sync(write)
        except Exception as e:  # noqa: BLE001 - the database's: tried again at the next sweep
            self._failed = batch  # (take_batch merged any earlier failed one into it)
            self.store_errors += 1
            if self.store_errors == 1 or self.store_errors % 100 == 0:
                log.warning("presence: the shared state could not be written (%s); trying again", e)
            return
        now = self.wall_ms()
        for tenant, device, state, last in transitions:
            self._publish(tenant, device, "online" if state == "online" else "offline",
                          last if state == "online" else now, last)

    async def run(self, clock: Callable[[], float] = trio.current_time) -> None:
        """Sweep every `interval` (and flush to the table, at once when a device is heard first),
        until cancelled; with a table, the devices heard here are released at the end."""
        if self.table is None:
            while True:
                await trio.sleep(self.interval)
                self.sweep(clock())
        self._wake = trio.Event()
        try:
            while True:
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                self.sweep(clock())
                await self.flush()
        finally:
            self._wake = None
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.flush(release=True, expire=False)
            self.table.close()

    def _publish(self, tenant: str, device: str, state: State, at: int, last_seen: int) -> None:
        self.transitions[state] += 1
        event = PresenceEvent(tenant=tenant, device=device, state=state, at=at, last_seen=last_seen)
        record = Record(presence_topic(tenant), device.encode(), _encode(event),
                        {"type": "presence", **standard(device, JSON, at)})
        if not self.sink.submit(record, self._published):
            self.publish_failures += 1

    def _published(self, ctx: object, error: BaseException | None) -> None:
        if error is not None:
            self.publish_failures += 1
