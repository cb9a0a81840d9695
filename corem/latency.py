"""How long a request waits for its answer: `corem_request_duration_seconds{transport,door}`.

From the datagram's receipt (the time the edge read its batch, `Request.received_at`) to its
answer being queued for the socket: for a reading, its decoding, the bus's commit and the 2.04.
The Python path measures it in `Endpoint._respond` (`Latency`, below); the C fast lane keeps the
same buckets for the readings it answers itself (corem/fastlane/_lane.c, `counters()["latency"]`),
and /metrics adds the two up (corem/metrics.py sums histograms of the same name, labels and
bounds).  `door` is the front door the request's path belongs to (`door_of`).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterator

from .stats import Histogram
from .token_path import PREFIX, TELEMETRY

NAME = "corem_request_duration_seconds"

#: the buckets' upper bounds, seconds (the C lane has the same: a test holds them equal).  A reading
#: waits for the bus's commit: ~1 ms as a rule, a few ms at p99, seconds only when the disk stalls.
BOUNDS: tuple[float, ...] = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
                             0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: the first segment of a path -> its front door (the `door` label); any other path is the user's
#: own resources (corem.coap.site), "site"; a request no route took (4.04, refused before routing) "none"
DOORS = {
    PREFIX[0]: "thingsboard",  # /api/v1/{token}/..., /api/v1/telemetry (x509), /api/v1/provision
    TELEMETRY: "corem",  # corem's own POST /telemetry (the device named by its DTLS session or OSCORE context)
    "ps": "emqx",
    "mqtt": "emqx",
    "v1": "drogue",  # Drogue Cloud's /v1/{channel}
    ".well-known": "discovery",
}
#: the fast lane's doors, by the index _lane.c counts them under
LANE_DOORS = ("thingsboard", "corem", "drogue")


def door_of(path: str) -> str:
    """The front door of a route's path pattern, e.g. "api/v1/{token}/telemetry" -> "thingsboard"."""
    return DOORS.get(path.strip("/").split("/")[0], "site")


class Latency:
    """Receive-to-answer durations by door: non-cumulative counts per bucket of BOUNDS (the last
    one +Inf) and their sum, as `Histogram`s labelled `door` (the mount adds `transport`)."""

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, door: str, seconds: float) -> None:
        counts = self.counts.get(door)
        if counts is None:
            counts = self.counts[door] = [0] * (len(BOUNDS) + 1)
            self.sums[door] = 0.0
        if seconds < 0.0:  # (a clock that went back: counted as instant)
            seconds = 0.0
        counts[bisect_left(BOUNDS, seconds)] += 1  # (le: a duration equal to a bound is in its bucket)
        self.sums[door] += seconds

    def metrics(self) -> Iterator[Histogram]:
        for door, counts in self.counts.items():
            yield Histogram(NAME, BOUNDS, list(counts), self.sums[door], (("door", door),))
