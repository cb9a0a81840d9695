"""The diagnostics UI's charts: what an operator looks at, over the last hour, kept in the server.

Every INTERVAL seconds (on the wall clock's multiples of it, so that samples line up whoever takes
them) `History` reads the same counters /metrics shows (corem/metrics.py's `gather`) and keeps what
changed since the sample before: readings acknowledged, readings refused by reason (the payload's
rejections, the 4.01s, the bus's 5.03s), DTLS handshakes completed and failed by reason, and the
bus's backlog then (records taken and not yet acknowledged).  SIZE samples at most (a deque: the
oldest goes): one hour, a few hundred small dicts.

The counts come per process (`record({source: Totals})`): a source seen before gives what it
counted since; a new one (a worker started again, with counters from zero) all it counted.  So with
`--workers` the supervisor's front samples every worker at once and a restart neither subtracts nor
doubles anything; a worker that did not answer this time gives its counts at the next sample.

`GET /api/diagnostics/history` answers the ring and the interval under way (`current`, its counts
so far), which the page draws as rates (count / seconds) without a CDN or a script from elsewhere.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable

import trio

from ..metrics import Gathered, total
from ..stats import Histogram

log = logging.getLogger("corem.admin")

#: seconds between two samples, and samples kept (360 x 10 s: the last hour)
INTERVAL = 10.0
SIZE = 360
#: the bus's 5.03s, among the refusals' reasons
BUS_REFUSED = "bus_unavailable"


def _by(values: Gathered, name: str, label: str) -> dict[str, float]:
    """One family's samples added up by one label (e.g. rejections by reason, over every protocol)."""
    out: dict[str, float] = {}
    for labels, v in values.get(name, {}).items():
        if not isinstance(v, Histogram):
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


@dataclass
class Totals:
    """One process's counters as the charts read them (cumulative, but `backlog`, a gauge)."""

    readings: float = 0.0
    rejections: dict[str, float] = field(default_factory=dict)
    handshakes: float = 0.0
    handshake_failures: dict[str, float] = field(default_factory=dict)
    backlog: float = 0.0

    @classmethod
    def of(cls, values: Gathered) -> Totals:
        rejections = _by(values, "corem_protocol_payload_rejections", "reason")
        for reason, n in _by(values, "corem_auth_failures", "reason").items():
            rejections[reason] = rejections.get(reason, 0.0) + n
        refused = total(values, "corem_telemetry_bus_refusals")
        if refused:
            rejections[BUS_REFUSED] = rejections.get(BUS_REFUSED, 0.0) + refused
        return cls(readings=total(values, "corem_telemetry_points"), rejections=rejections,
                   handshakes=total(values, "corem_dtls_handshakes_completed"),
                   handshake_failures=_by(values, "corem_dtls_handshakes_failed", "reason"),
                   backlog=total(values, "corem_sink_pending"))


def _since(now: dict[str, float], before: dict[str, float] | None) -> dict[str, float]:
    out = {}
    for k, v in now.items():
        d = v - (before or {}).get(k, 0.0)
        if d > 0:
            out[k] = d
    return out


def _add(into: dict[str, Any], more: dict[str, Any]) -> None:
    into["readings"] += more["readings"]
    into["handshakes"] += more["handshakes"]
    into["backlog"] += more["backlog"]
    for key in ("rejections", "handshake_failures"):
        for reason, n in more[key].items():
            into[key][reason] = into[key].get(reason, 0) + n


class History:
    def __init__(self, interval: float = INTERVAL, size: int = SIZE, clock: Callable[[], float] = time.time) -> None:
        self.interval = interval
        self.clock = clock
        self.samples: deque[dict[str, Any]] = deque(maxlen=size)
        #: each source's totals at the last sample, and when that was
        self._last: dict[Hashable, Totals] = {}
        self._last_t: float | None = None

    def _counts(self, sources: dict[Hashable, Totals], t: float) -> dict[str, Any]:
        """What the sources counted since the last sample (a source not seen then: all it counted)."""
        out: dict[str, Any] = {"t": t, "seconds": t - self._last_t if self._last_t is not None else self.interval,
                               "readings": 0, "rejections": {}, "handshakes": 0, "handshake_failures": {},
                               "backlog": 0}
        for key, now in sources.items():
            before = self._last.get(key)
            _add(out, {
                "readings": max(0.0, now.readings - (before.readings if before else 0.0)),
                "handshakes": max(0.0, now.handshakes - (before.handshakes if before else 0.0)),
                "backlog": now.backlog,
                "rejections": _since(now.rejections, before.rejections if before else None),
                "handshake_failures": _since(now.handshake_failures, before.handshake_failures if before else None),
            })
        return out

    def record(self, sources: dict[Hashable, Totals], t: float | None = None) -> dict[str, Any]:
        """A sample: what each source counted since the last one; kept in the ring."""
        t = self.clock() if t is None else t
        sample = self._counts(sources, t)
        self.samples.append(sample)
        self._last.update(sources)  # (a source that did not answer keeps its last totals)
        self._last_t = t
        return sample

    def snapshot(self, sources: dict[Hashable, Totals] | None = None) -> dict[str, Any]:
        """The ring, oldest first, and (with `sources`, read now) the interval under way."""
        now = self.clock()
        current = self._counts(sources, now) if sources is not None and self._last_t is not None else None
        return {"interval": self.interval, "now": now, "samples": list(self.samples), "current": current}

    async def run(self, read: Callable[[], Awaitable[dict[Hashable, Totals]]]) -> None:
        """Sample `read()` now (the base) and then at every multiple of the interval."""
        while True:
            try:
                sources = await read()
            except Exception:  # (the charts must never end a server: logged, tried at the next one)
                log.exception("diagnostics history: could not read the counters")
            else:
                self.record(sources)
            now = self.clock()
            await trio.sleep(max(0.0, (math.floor(now / self.interval) + 1) * self.interval - now))
