"""The UDP edge: the only code that touches a CoAP socket.

Trio's `await sock.recvfrom()` costs a trip through the scheduler per datagram.  Instead the edge
waits for readability once (`trio.lowlevel.wait_readable`) and then drains the non-blocking socket
in a batch with plain `recvfrom` calls, feeding each datagram to the sans-IO endpoint, and sends the
outbox at the end of the batch.  Measured on a 2-core machine: ~187k requests/s against ~74k for
the naive loop (docs/architecture.md).

Each datagram is received into a fresh `bytes` object (`recvfrom`, not `recvfrom_into` a shared
buffer) because the decoded message's option values and payload are views into it and may outlive
the batch (a request waiting on the bus).

For CoAPS the same edge carries a `DtlsServer` between the socket and the endpoint: datagrams are
decrypted before the endpoint sees them, and what the endpoint sends is encrypted on the way out.

The edge can carry a `FastLane` (corem/fastlane) that answers the common telemetry request in C.
On plain CoAP it reads the socket itself (recvmmsg), gives the edge the other datagrams, which take
the path above, and applies the limits (size, rate per source) to every datagram; behind DTLS it
gets the decrypted messages instead of the endpoint, and its answers are encrypted here.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING, Callable

import trio

from ..coap.endpoint import Endpoint, Request
from ..coap.resources import Router
from ..dtls import DtlsServer
from .limits import SourceLimiter

try:  # one recvmmsg/sendmmsg per 64 datagrams (corem/fastlane/_lane.c), else recvfrom/sendto each
    from ..fastlane._lane import recv_many, send_many
except ImportError:  # pragma: no cover - only without a C compiler
    recv_many = send_many = None

if TYPE_CHECKING:
    from ..fastlane import FastLane

log = logging.getLogger("corem.net")

#: Datagrams handled per wake-up before yielding to other tasks (timers, the sink's callbacks).
BATCH = 256


class EdgeStats:
    __slots__ = ("oversized", "send_errors", "datagrams_out", "bytes_out", "send_blocked")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


def bind_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        except OSError:
            pass
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def deliver(
    endpoint: Endpoint, router: Router, message: bytes, peer: tuple, now: float,
    on_event: Callable[[object], None] | None = None,
) -> None:
    """One CoAP message through the endpoint: a request to its handler, an event to `on_event`."""
    event = endpoint.receive(message, peer, now)
    if type(event) is Request:
        response = router.dispatch(event)
        if response is not None:
            endpoint.respond(event, response.code, response.options, response.payload)
    elif event is not None and on_event is not None:
        on_event(event)


class UdpEdge:
    """Drives one Endpoint from one UDP socket; dispatches requests to a Router."""

    def __init__(
        self,
        sock: socket.socket,
        endpoint: Endpoint,
        router: Router,
        *,
        max_datagram: int = 1500,
        dtls: DtlsServer | None = None,
        limiter: SourceLimiter | None = None,
        lane: FastLane | None = None,
        after_drain: Callable[[], object] | None = None,
        exempt: Callable[[bytes, tuple], bool] | None = None,
    ) -> None:
        self.sock = sock
        #: called after each batch of datagrams is handled, before its answers go out: a sink
        #: that pipelines (Kafka) collects the delivery reports ready by then, so a busy server
        #: answers within one loop pass instead of at its sink's next timer
        self.after_drain = after_drain
        #: over its source's rate, a datagram this says yes to goes through (an established DTLS
        #: session, a known token: see net/limits.py); behind DTLS, live sessions are always exempt
        self.exempt = exempt if dtls is None else (lambda data, peer: peer in dtls.sessions)
        self.endpoint = endpoint
        self.router = router
        self.max_datagram = max_datagram
        self.dtls = dtls
        self.lane = lane
        if dtls is not None:
            dtls.on_new_session = self._new_session
        #: rate limit per source: the lane's own when it reads the socket (it sees every datagram first)
        self.limiter = limiter if lane is None or not lane.rate_limited else _LaneLimits(lane)
        #: receives message-layer events (ACK, RST, give-up of our CONs): observers need them
        self.on_event: Callable[[object], None] | None = None
        self.stats = EdgeStats()
        #: datagrams ready for the wire (already encrypted for CoAPS) that the kernel did not take yet
        self._wire: list[tuple[bytes, tuple]] = []
        self._closed = False

    @property
    def dedup_entries(self) -> int:
        """Exchanges remembered for deduplication: the lane's when there is one (it remembers every
        request it sees, the Python path's included), else the endpoint's."""
        return len(self.lane) if self.lane is not None else self.endpoint.dedup_entries

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()

    async def serve(self) -> None:
        """Receive until cancelled."""
        lane = self.lane
        if lane is not None and self.dtls is None:
            await self._serve_lane(lane)
            return
        sock = self.sock
        read = self._reader()
        endpoint = self.endpoint
        handle = self._handle
        limit = self.max_datagram
        bufsize = limit + 1
        dtls = self.dtls
        allow = self.limiter.allow if self.limiter is not None else None
        exempt = self.exempt
        # behind DTLS the lane takes the decrypted messages it can answer and leaves the rest
        take = handle if lane is None else lane.receive_plain
        after_drain = self.after_drain
        current_time = trio.current_time
        wait_readable = trio.lowlevel.wait_readable
        while True:
            await wait_readable(sock)
            now = current_time()
            if lane is not None:
                lane.refresh()
            for data, peer in read(bufsize, BATCH):
                if len(data) > limit:
                    self.stats.oversized += 1
                    continue
                if allow is not None and not allow(peer[0], now):
                    if exempt is None or not exempt(data, peer):
                        continue  # over its rate: dropped before any work (counted by the limiter)
                    self.limiter.excuse()
                # plain CoAP: the datagram itself; CoAPS: what it decrypts to (maybe nothing).
                # (A 1-tuple per datagram: measured within noise, <1%, of two copied branches.)
                for message in (data,) if dtls is None else dtls.receive(data, peer, now):
                    take(message, peer, now)
            if lane is not None:
                for message, peer in lane.collect():
                    handle(message, peer, now)
            if after_drain is not None:
                after_drain()
            if endpoint.outbox or (dtls is not None and dtls.outbox) or lane is not None:
                self.flush()

    def _reader(self) -> Callable[[int, int], list[tuple[bytes, tuple]]]:
        """`read(bufsize, budget)`: the datagrams waiting, up to `budget` (recvmmsg when the C
        helpers are built, else recvfrom calls)."""
        sock = self.sock
        if recv_many is not None:
            fd = sock.fileno()
            return lambda bufsize, budget: recv_many(fd, bufsize, budget)
        recvfrom = sock.recvfrom

        def read(bufsize: int, budget: int) -> list[tuple[bytes, tuple]]:
            got = []
            for _ in range(budget):
                try:
                    got.append(recvfrom(bufsize))
                except BlockingIOError:
                    break
                except OSError as e:  # e.g. ECONNREFUSED from an ICMP error: nothing to read
                    if e.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        raise
            return got

        return read

    async def _serve_lane(self, lane: FastLane) -> None:
        """The lane reads the socket and keeps the common requests; the rest go to the endpoint."""
        sock = self.sock
        fd = sock.fileno()
        handle = self._handle
        after_drain = self.after_drain
        current_time = trio.current_time
        wait_readable = trio.lowlevel.wait_readable
        while True:
            await wait_readable(sock)
            now = current_time()
            for data, peer in lane.drain(fd, now, BATCH):
                handle(data, peer, now)
            if after_drain is not None:
                after_drain()
            self.flush()

    def _new_session(self, peer: tuple, now: float) -> None:
        """A DTLS handshake completed: the peer's message IDs are scoped to its new session."""
        self.endpoint.new_session(peer, now)
        if self.lane is not None:
            self.lane.new_session(peer, now)

    def _handle(self, message: bytes, peer: tuple, now: float) -> None:
        deliver(self.endpoint, self.router, message, peer, now, self.on_event)

    def flush(self) -> None:
        """Send what the endpoint (and DTLS) queued; what the kernel will not take waits for the
        next flush, in order."""
        if self._closed:
            return
        endpoint = self.endpoint
        dtls = self.dtls
        lane = self.lane
        if lane is not None:
            lane.account(self.stats)
            if dtls is None:
                lane.send(self.sock.fileno())
        if dtls is None:
            wire = endpoint.outbox
            if self._wire:
                self._wire += wire
                wire = self._wire
            endpoint.outbox = []
        else:
            wire = self._wire
            if dtls.outbox:
                wire += dtls.outbox
                dtls.outbox = []
            wrap = dtls.wrap
            plain = endpoint.take_outbox()
            if lane is not None:
                plain += lane.take_outbox()
            for plaintext, peer in plain:
                record = wrap(plaintext, peer)
                if record is not None:
                    wire.append((record, peer))
        if not wire:
            return
        stats = self.stats
        if send_many is not None:
            taken, nbytes, errors, blocked = send_many(self.sock.fileno(), wire)
            stats.datagrams_out += taken - errors
            stats.bytes_out += nbytes
            stats.send_errors += errors
            stats.send_blocked += blocked
        else:
            sendto = self.sock.sendto
            taken = 0
            for data, peer in wire:
                try:
                    sendto(data, peer)
                except BlockingIOError:
                    stats.send_blocked += 1
                    break
                except OSError as e:
                    stats.send_errors += 1
                    log.debug("send to %s failed: %s", peer, e)
                else:
                    stats.datagrams_out += 1
                    stats.bytes_out += len(data)
                taken += 1
        self._wire = wire[taken:] if taken < len(wire) else []

    async def run_timers(self) -> None:
        """Tick the endpoint when its next deadline passes (at least every 100 ms)."""
        endpoint = self.endpoint
        while True:
            now = trio.current_time()
            deadline = endpoint.next_deadline()
            wake = now + 0.1 if deadline is None else min(deadline, now + 0.1)
            await trio.sleep_until(wake)
            now = trio.current_time()
            events = endpoint.tick(now)
            if events and self.on_event is not None:
                for event in events:
                    self.on_event(event)
            if self.dtls is not None:
                self.dtls.tick(now)
                if self.dtls.outbox:
                    self.flush()
            if self.lane is not None:
                self.lane.tick(now)
                self.flush()
            elif endpoint.outbox or self._wire:
                self.flush()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class _LaneLimits:
    """The lane's rate limit, shaped like `SourceLimiter` for the metrics (`dropped`, `exempted`, `len`)."""

    def __init__(self, lane: FastLane) -> None:
        self._lane = lane

    @property
    def dropped(self) -> int:
        return self._lane.counters["dropped"]

    @property
    def exempted(self) -> int:
        return self._lane.counters["exempted"]

    def __len__(self) -> int:
        return self._lane.counters["sources"]
