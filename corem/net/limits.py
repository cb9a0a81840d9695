"""Per-source rate limiting: a token bucket per source host, sans-IO.

Checked for every datagram before anything else (DTLS included), so a flooding address costs a
dict lookup, not a decode or a handshake.  Buckets are `(tokens, last)` tuples (no GC tracking)
in a dict bounded by `max_sources`; when full, the oldest-created bucket goes (which only makes
that source's next datagram start from a full bucket again).

Limits are per host, not per (host, port): a flooder changes ports freely.  A NAT gateway in front
of many devices shares one bucket, so what is over the rate is looked at once more before it is
dropped: a datagram of an established DTLS session, or a request that names its device by a known
token, goes through (`excuse`: counted as exempted, not dropped).  Floods and junk carry neither.
Networks named in `rate_limit_exempt` (your own gateways) are never limited; that is looked up only
for a source over its rate, too.
"""

from __future__ import annotations

import ipaddress
import itertools

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str, key: str = "rate_limit_exempt") -> list[Network]:
    """`10.0.0.0/8,2001:db8::/32` -> networks (ValueError naming the one that is not)."""
    nets = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{key}: {item!r} is not an IPv4 or IPv6 network (CIDR)") from None
    return nets


def lane_networks(nets: list[Network]) -> list[tuple[bytes, int]]:
    """The networks as the C lane compares them: 16 address bytes (IPv4 mapped) and a prefix length."""
    out = []
    for net in nets:
        if net.version == 4:
            out.append((b"\0" * 10 + b"\xff\xff" + net.network_address.packed, net.prefixlen + 96))
        else:
            out.append((net.network_address.packed, net.prefixlen))
    return out


class SourceLimiter:
    __slots__ = ("rate", "burst", "max_sources", "_buckets", "dropped", "evicted", "exempted", "_networks")

    def __init__(self, rate: float, burst: float | None = None, max_sources: int = 100_000,
                 exempt_networks: list[Network] | None = None) -> None:
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
        self.exempted = 0
        self._networks = list(exempt_networks or ())

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
            if self._networks and self._exempt(host):
                self.exempted += 1
                return True
            self.dropped += 1
            return False
        buckets[host] = (tokens - 1.0, now)
        return True

    def retune(self, rate: float, max_sources: int, exempt_networks: list[Network]) -> None:
        """SIGHUP's limits (corem/reload.py), in place: the buckets stay, so no source starts again
        from a full one -- but when fewer sources are tracked now, the oldest go, as when full."""
        if rate <= 0 or max_sources < 1:
            raise ValueError(f"rate must be > 0 and max_sources >= 1, got {rate} and {max_sources}")
        self.rate, self.burst = rate, float(2 * rate)
        self.max_sources = max_sources
        excess = len(self._buckets) - max_sources
        if excess > 0:  # (the oldest at once: deleting the first one by one walks the gaps, quadratic)
            self._buckets = dict(itertools.islice(self._buckets.items(), excess, None))
            self.evicted += excess
        self._networks = list(exempt_networks)

    def _exempt(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._networks)

    def excuse(self) -> None:
        """The datagram `allow` just refused goes through after all (see the module docstring)."""
        self.dropped -= 1
        self.exempted += 1

    def __len__(self) -> int:
        return len(self._buckets)
