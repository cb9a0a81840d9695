"""Who may hold one of the bounded half-open DTLS handshakes: admission, fairness, expiry. Sans-IO.

A handshake past the cookie exchange costs the server a live Mbed TLS context (~43 KiB) until it
finishes or times out, so there are at most `capacity` of them (`dtls_max_handshakes`).  A bare
bound is a lockout: whoever fills it first -- one address pacing itself under the rate limit, or a
flood from a few hundred addresses whose hellos carry valid cookies (the cookie proves only that
the source address is real, not that it means well) -- keeps every new device out for as long as
it keeps refilling it.  So the slots are shared by source:

- **Quotas.** One address holds at most `per_address` half-open handshakes (2% of the table, at
  least 2), one network prefix -- IPv4 /24, IPv6 /64, what one subscriber or one site usually
  has -- at most `per_prefix` (10%, at least 8).  A prefix at its quota makes room for a newcomer
  inside it by evicting from its heaviest address; nobody else pays for it.  (Per address, not per
  peer: a flooder changes ports freely.  A NAT gateway in front of many devices gets 20 concurrent
  handshakes of 1,000; a PSK handshake takes two round trips, so that is hundreds a second.)
- **Eviction when full.** A newcomer from a source holding less than the heaviest evicts the
  oldest half-open handshake of the heaviest prefix (of its heaviest address), or inside its own
  prefix of the heaviest address.  "Less" means less than half (`_outweighs`): a source holding
  none takes a slot from one holding two or more, but sources holding about as much as each other
  never trade slots.  Measured, with "less by two" a flood from 20 prefixes refilling what expired
  evicted itself ~5 times per expiry, each eviction a new handshake's Mbed TLS work (~100 us); a
  newcomer is not helped by that.  Only half-open handshakes live here: an established session is
  never evicted.
- **Pressure.** While the table is at most half full a handshake has the whole `timeout`
  (`dtls_handshake_timeout`, 30 s); above that the timeout shrinks linearly with the fill, to
  `floor` when full.  The floor (5 s) is what a real device needs on a lossy link: after the
  cookie a PSK handshake is two round trips, and DTLS retransmits a lost flight after 1 s, then
  2 s (RFC 6347 §4.2.4.1), so 5 s survives two losses.  When the table is full and no source
  outweighs the newcomer, the newcomer is refused ("full"); against a flood from many addresses
  that each hold one slot, the shorter timeout is what keeps the table turning over.
- **Turnover, smoothly.** Expiry releases at most `capacity / floor` handshakes a second (a full
  table once per floor; at once, a fiftieth of the table: 0.1 s worth), oldest first.
  Handshakes a flood took at the same moment would otherwise all expire at the same tick, and the
  flood would take them back at once: measured, a refill of 500-1,000 admissions (~100 us of
  Mbed TLS work each) every 5 s stalled corem for long enough that its socket dropped 12k
  datagrams, a device's among them.  A handshake due waits at most one more floor for its turn.

The caller (DtlsServer in server.py; meant for the DTLS engine that replaces it too) asks
`consider` before it does any cryptography for a ClientHello that carries a cookie, so a refused
source costs a dictionary lookup, and `admit`s the peer only once Mbed TLS has found the cookie
valid; it drops a datagram that `repeats` the hello that took a slot before handing it to that
handshake, calls `release` when a handshake finishes or fails, and `expire(now)` on its timer.
(Measured on the development machine, a flood of cookie'd hellos: refusing one costs ~2 us,
admitting one ~100 us of Mbed TLS work, a repeat into a live handshake ~0.4 us instead of
~31 us.)  Peers are `(host, port, …)` tuples or anything hashable (then the whole peer is its own
address).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Generic, Hashable, Iterator, TypeVar

from ..coap.peers import source_host

Peer = Hashable
K = TypeVar("K", bound=Hashable)

#: refusal reasons (metric labels)
ADDRESS, PREFIX, FULL = "address", "prefix", "full"

#: see the module docstring
ADDRESS_SHARE, PREFIX_SHARE = 0.02, 0.10
FLOOR = 5.0


def prefix_of(address: Hashable) -> Hashable:
    """IPv4 -> its /24 ("192.0.2"), IPv6 -> its /64 (8 bytes), IPv4-mapped IPv6 as IPv4; anything
    that is not an address string is its own prefix."""
    if not isinstance(address, str):
        return address
    if ":" not in address:
        return address.rpartition(".")[0]  # dotted quad: the fast path, no parsing
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped).rpartition(".")[0]
    return ip.packed[:8]


class Tally(Generic[K]):
    """How many each key holds, with the heaviest key in O(1) (counts move by one at a time)."""

    __slots__ = ("counts", "_by_count", "_top")

    def __init__(self) -> None:
        self.counts: dict[K, int] = {}
        self._by_count: dict[int, dict[K, None]] = {}
        self._top = 0

    def get(self, key: K) -> int:
        return self.counts.get(key, 0)

    def add(self, key: K) -> None:
        counts, by_count = self.counts, self._by_count
        n = counts.get(key, 0)
        if n:
            self._unfile(key, n)
        n += 1
        counts[key] = n
        bucket = by_count.get(n)
        if bucket is None:
            by_count[n] = {key: None}
        else:
            bucket[key] = None
        if n > self._top:
            self._top = n

    def remove(self, key: K) -> None:
        counts, by_count = self.counts, self._by_count
        n = counts[key]
        self._unfile(key, n)
        if n == 1:
            del counts[key]
        else:
            counts[key] = n - 1
            by_count.setdefault(n - 1, {})[key] = None
        top = self._top
        while top and top not in by_count:
            top -= 1
        self._top = top

    def _unfile(self, key: K, n: int) -> None:
        bucket = self._by_count[n]
        del bucket[key]
        if not bucket:
            del self._by_count[n]

    def heaviest(self) -> tuple[K, int] | None:
        if not self._top:
            return None
        return next(iter(self._by_count[self._top])), self._top

    def __len__(self) -> int:
        return len(self.counts)


@dataclass(frozen=True, slots=True)
class Verdict:
    """`consider`'s answer: refused (`reason`), or admitted, evicting `evict` if it is not None."""

    reason: str | None = None
    evict: Peer | None = None


ADMIT = Verdict()
#: the refusals, made once (a flood is refused hundreds of thousands of times a minute)
_REFUSED = {reason: Verdict(reason) for reason in (ADDRESS, PREFIX, FULL)}


def _outweighs(theirs: int, ours: int) -> bool:
    """Whether a source holding `theirs` slots gives one up to a newcomer holding `ours`: when
    that leaves the newcomer holding no more than half of what the other still holds."""
    return theirs > 2 * ours + 1


#: a slot is a tuple (a handshake's slot is made and dropped once a handshake: no object of a
#: class of its own): when it was taken, the peer's address and prefix, the datagram that took it
_STARTED: Final = 0
_HELLO: Final = 3
_Slot = tuple[float, Hashable, Hashable, bytes]


class HandshakeSlots:
    """The half-open handshakes: who holds them, since when, and who may take one."""

    def __init__(self, capacity: int, timeout: float = 30.0, floor: float = FLOOR, *,
                 per_address: int | None = None, per_prefix: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.timeout = timeout
        self.floor = min(floor, timeout)
        self.per_address = min(capacity, per_address or max(2, int(capacity * ADDRESS_SHARE)))
        prefix_share = per_prefix or max(8, int(capacity * PREFIX_SHARE))
        self.per_prefix = min(capacity, max(self.per_address, prefix_share))
        #: peer -> slot, oldest admission first
        self._slots: OrderedDict[Peer, _Slot] = OrderedDict()
        #: each address's peers, oldest first (a few each: a dict keeps their order)
        self._by_address: dict[Hashable, dict[Peer, None]] = {}
        #: `consider`'s last (peer, verdict), until the slots change (None)
        self._considered: tuple[Peer, Verdict] | None = None
        #: slots per prefix, and per address inside each prefix
        self._prefixes: Tally[Hashable] = Tally()
        self._addresses: dict[Hashable, Tally[Hashable]] = {}
        self.evicted = 0
        #: expiry's budget (see "Turnover" above): handshakes it may release now, and when that was
        self._turnover_rate = capacity / self.floor
        self._turnover_burst = max(1.0, capacity / 50)
        self._turnover = self._turnover_burst
        self._turnover_at: float | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, peer: Peer) -> bool:
        return peer in self._slots

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._slots)

    def held(self, address: Hashable) -> int:
        """Half-open handshakes `address` holds."""
        peers = self._by_address.get(address)
        return 0 if peers is None else len(peers)

    def held_by_prefix(self, address: Hashable) -> int:
        return self._prefixes.get(prefix_of(address))

    def current_timeout(self) -> float:
        """The whole timeout up to half full, then shrinking linearly to the floor when full."""
        fill = len(self._slots) / self.capacity
        if fill <= 0.5:
            return self.timeout
        return self.timeout - (self.timeout - self.floor) * min(1.0, (fill - 0.5) * 2)

    # -- admission -----------------------------------------------------------------------------
    def consider(self, peer: Peer, now: float) -> Verdict:
        """May `peer` start a handshake now, and at whose expense?  Changes nothing."""
        if peer in self._slots:
            return ADMIT  # (the caller steps an existing handshake instead; admitting is a no-op)
        address = source_host(peer)
        verdict = self._consider(peer, address, prefix_of(address))
        # (remembered until the slots change: the hello that asks is admitted right after, `admit`)
        self._considered = (peer, verdict)
        return verdict

    def _consider(self, peer: Peer, address: Hashable, prefix: Hashable) -> Verdict:
        peers = self._by_address.get(address)
        mine = 0 if peers is None else len(peers)
        if mine >= self.per_address:
            return _REFUSED[ADDRESS]
        ours = self._prefixes.counts.get(prefix, 0)
        if ours >= self.per_prefix:
            victim = self._heaviest_in(prefix, mine)
            return _REFUSED[PREFIX] if victim is None else Verdict(evict=victim)
        if len(self._slots) < self.capacity:
            return ADMIT
        top = self._prefixes.heaviest()
        if top is not None and top[0] != prefix and _outweighs(top[1], ours):
            victim = self._heaviest_in(top[0], -1)
            if victim is not None:
                return Verdict(evict=victim)
        if ours:
            victim = self._heaviest_in(prefix, mine)
            if victim is not None:
                return Verdict(evict=victim)
        return _REFUSED[FULL]

    def _heaviest_in(self, prefix: Hashable, mine: int) -> Peer | None:
        """The oldest peer of the prefix's heaviest address, if that address `_outweighs` `mine`."""
        tally = self._addresses.get(prefix)
        top = None if tally is None else tally.heaviest()
        if top is None or not _outweighs(top[1], mine):
            return None
        return next(iter(self._by_address[top[0]]))

    def admit(self, peer: Peer, now: float, verdict: Verdict | None = None, hello: bytes = b"") -> Verdict:
        """Take a slot for `peer` (its cookie was valid) as `verdict` (by default: `consider`
        again) says, remembering the datagram that took it (`repeats`).  Returns the verdict: the
        caller drops the handshake of `evict`, if any."""
        if peer in self._slots:
            return ADMIT if verdict is None else verdict
        address = source_host(peer)
        prefix = prefix_of(address)
        if verdict is None:
            considered = self._considered
            # (`consider` just said it, and nothing changed since: the usual hello, asked then admitted)
            verdict = considered[1] if considered is not None and considered[0] == peer else \
                self._consider(peer, address, prefix)
        if verdict.reason is not None:
            return verdict
        if verdict.evict is not None:
            self.release(verdict.evict)
            self.evicted += 1
        self._considered = None
        self._slots[peer] = (now, address, prefix, hello)
        peers = self._by_address.get(address)
        if peers is None:
            self._by_address[address] = {peer: None}
        else:
            peers[peer] = None
        self._prefixes.add(prefix)
        tally = self._addresses.get(prefix)
        if tally is None:
            tally = self._addresses[prefix] = Tally()
        tally.add(address)
        return verdict

    def repeats(self, peer: Peer, datagram: bytes) -> bool:
        """Whether `datagram` is, byte for byte, the one that took `peer`'s slot.  A flooder resends
        its cookie'd hello to keep its slot or take it back; to its handshake that is a replayed
        record (a real client's retransmission has a new record number), which the TLS engine
        would drop after ~30 us of work.  Checked first, it costs a comparison."""
        slot = self._slots.get(peer)
        return slot is not None and slot[_HELLO] == datagram

    def release(self, peer: Peer) -> bool:
        """The handshake finished, failed or was dropped: its slot is free.  False if it had none."""
        slot = self._slots.pop(peer, None)
        if slot is None:
            return False
        self._considered = None
        _, address, prefix, _ = slot
        peers = self._by_address[address]
        del peers[peer]
        if not peers:
            del self._by_address[address]
        self._prefixes.remove(prefix)
        tally = self._addresses[prefix]
        tally.remove(address)
        if not tally:
            del self._addresses[prefix]
        return True

    # -- time ----------------------------------------------------------------------------------
    def expire(self, now: float) -> list[Peer]:
        """Release and return the handshakes older than the current timeout (read once, at the
        fill before this sweep), oldest first, as many as the turnover budget allows."""
        timeout = self.current_timeout()
        budget = self._turnover_burst if self._turnover_at is None else min(
            self._turnover_burst, self._turnover + max(0.0, now - self._turnover_at) * self._turnover_rate)
        out = []
        slots = self._slots
        while slots and budget >= 1.0:
            peer, slot = next(iter(slots.items()))
            if now - slot[_STARTED] <= timeout:
                break
            self.release(peer)
            out.append(peer)
            budget -= 1.0
        self._turnover, self._turnover_at = budget, now
        return out
