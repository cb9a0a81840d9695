"""Per-source rate limiting: a token bucket per source host, sans-IO.

Checked for every datagram before anything else (DTLS included), so a flooding address costs a
dict lookup, not a decode or a handshake.  Buckets are `(tokens, last)` tuples (no GC tracking)
in a dict bounded by `max_sources`; when full, the oldest-created bucket goes (which only makes
that source's next datagram start from a full bucket again).

Limits are per host, not per (host, port): a flooder changes ports freely.  A NAT gateway in front
of many devices shares one bucket, so set the rate for the busiest legitimate address.
"""

from __future__ import annotations


class SourceLimiter:
    __slots__ = ("rate", "burst", "max_sources", "_buckets", "dropped", "evicted")

    def __init__(self, rate: float, burst: float | None = None, max_sources: int = 100_000) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 datagrams/s, got {rate}")
        self.rate = rate
        self.burst = float(burst if burst is not None else 2 * rate)
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}
        self.dropped = 0
        self.evicted = 0

    def allow(self, host: str, now: float) -> bool:
        buckets = self._buckets
        bucket = buckets.get(host)
        if bucket is None:
            if len(buckets) >= self.max_sources:
                del buckets[next(iter(buckets))]
                self.evicted += 1
            tokens = self.burst
        else:
            tokens, last = bucket
            tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            buckets[host] = (tokens, now)
            self.dropped += 1
            return False
        buckets[host] = (tokens - 1.0, now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)
