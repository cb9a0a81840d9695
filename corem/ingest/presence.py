"""Device presence: online from the first accepted reading, offline after a quiet spell.

Transitions are records on `device.presence.{tenant}` (key = device id) that go through the same
sink as telemetry.  Online devices are kept in activity order, so the periodic sweep only looks at
the stale end and costs nothing for devices that keep talking.  Offline devices are not kept.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import Callable, Iterator

import msgspec

from ..bus.base import Record, Sink
from ..stats import Sample, counter, gauge


class PresenceEvent(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    device: str
    state: str  # "online" | "offline"
    at: int  # ms since the epoch, when corem noticed
    last_seen: int  # ms since the epoch, the last accepted reading


_encode = msgspec.json.Encoder().encode


def presence_topic(tenant: str) -> str:
    return "device.presence." + tenant


class Presence:
    def __init__(
        self,
        sink: Sink,
        offline_after: float = 120.0,
        *,
        tenants: dict[str, float] | None = None,
        profiles: dict[str, float] | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
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
        #: threshold -> {(tenant, device) -> (monotonic last seen, wall-clock ms last seen)}, least
        #: recent first: one activity-ordered dict per threshold keeps the sweep at the stale ends
        self._by_threshold: dict[float, OrderedDict[tuple[str, str], tuple[float, int]]] = {
            t: OrderedDict() for t in {offline_after, *self.tenants.values(), *self.profiles.values()}
        }
        self._online = self._by_threshold[offline_after]
        self.online_by_tenant: Counter[str] = Counter()
        self.transitions: Counter[str] = Counter()
        self.publish_failures = 0

    def metrics(self) -> Iterator[Sample]:
        for tenant, n in sorted(self.online_by_tenant.items()):
            if n:
                yield gauge("corem_devices_online", n, tenant=tenant)
        for state, n in sorted(self.transitions.items()):
            yield counter("corem_presence_transitions", n, state=state)
        yield counter("corem_presence_publish_failures", self.publish_failures)

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
        if key in online:
            online[key] = (now, wall)
            online.move_to_end(key)
            return
        online[key] = (now, wall)
        if len(by) > 1 and any(key in other for other in by.values() if other is not online):
            for other in by.values():  # its threshold changed (a new profile): it stays online
                if other is not online:
                    other.pop(key, None)
            return
        self.online_by_tenant[tenant] += 1
        self._publish(tenant, device, "online", wall, wall)

    def sweep(self, now: float) -> int:
        """Mark offline every device quiet for longer than its threshold; returns how many."""
        n = 0
        for threshold, online in self._by_threshold.items():
            limit = now - threshold
            while online:
                (tenant, device), (last, last_wall) = next(iter(online.items()))
                if last > limit:
                    break
                del online[(tenant, device)]
                self.online_by_tenant[tenant] -= 1
                self._publish(tenant, device, "offline", self.wall_ms(), last_wall)
                n += 1
        return n

    def is_online(self, tenant: str, device: str) -> bool:
        return any((tenant, device) in online for online in self._by_threshold.values())

    def last_seen(self) -> dict[tuple[str, str], int]:
        """Online devices -> wall-clock ms of their last accepted reading."""
        return {key: wall for online in self._by_threshold.values() for key, (_, wall) in online.items()}

    @property
    def shortest(self) -> float:
        return min(self._by_threshold)

    def _publish(self, tenant: str, device: str, state: str, at: int, last_seen: int) -> None:
        self.transitions[state] += 1
        event = PresenceEvent(tenant=tenant, device=device, state=state, at=at, last_seen=last_seen)
        record = Record(presence_topic(tenant), device.encode(), _encode(event), {"type": "presence"})
        if not self.sink.submit(record, self._published):
            self.publish_failures += 1

    def _published(self, ctx: object, error: BaseException | None) -> None:
        if error is not None:
            self.publish_failures += 1
