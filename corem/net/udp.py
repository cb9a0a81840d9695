"""The UDP edge: the only code that touches a CoAP socket.

Trio's `await sock.recvfrom()` costs a trip through the scheduler per datagram.  Instead the edge
waits for readability once (`trio.lowlevel.wait_readable`) and then drains the non-blocking socket
in a batch (`batch.py`: recvmmsg), hands each datagram through the security layer to the sans-IO
endpoint, and sends what they queued at the end of the batch (sendmmsg).  Measured on a 2-core
machine: ~187k requests/s against ~74k for the naive loop (docs/architecture.md).  One exception:
behind corem's DTLS engine, the engine's answer to the batch's last datagram (a handshake's flight)
goes out as soon as the engine has it (`_send_early`, the engine's `eager`), with what the batch
queued before it: the device's next flight is on its way while the server finishes the batch.

Each datagram is received into a fresh `bytes` object, not a shared buffer, because the decoded
message's option values and payload are views into it and may outlive the batch (a request
waiting on the bus).

One drain loop for CoAP and CoAPS: the security layer (`security.py`: `PlainUdp`, or
`corem.dtls.DtlsServer`) turns datagrams into messages and messages into datagrams.  A
`FastLane` (corem/fastlane), when there is one, is a pre-filter in front of the Python path: on
plain CoAP it reads the socket itself (recvmmsg) and gives the edge the datagrams it does not
answer; behind corem's DTLS engine it does so too, opening and sealing the records of established
sessions itself; behind python-mbedtls it is offered each decrypted message first.  Which of these applies is decided
once, in the constructor; the loops themselves do not branch on it.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import trio

from ..coap.endpoint import Endpoint, Event
from ..coap.resources import Router
from ..stats import Sample, counter, fields, gauge
from .batch import reader, sender
from .busypoll import BusyPoll
from .limits import SourceLimiter
from .security import PlainUdp, SecurityLayer

if TYPE_CHECKING:
    from ..fastlane import FastLane

log = logging.getLogger("corem.net")

#: Datagrams handled per batch: per wake-up before yielding to other tasks (timers, the sink's
#: callbacks) -- or, while busy-polled batches follow one another, per batch (YIELD_AFTER).
BATCH = 256
#: While busy-polled batches follow one another (`BusyPoll`), the loop's other tasks (timers, the
#: sink's callbacks, other listeners) get it back once this much time has passed, seconds (by the
#: process's clock, not Trio's: a test's clock that stands still must not keep them from it).
YIELD_AFTER = 0.001
#: The longest the timer task sleeps (the security layer's and the lane's timers have no deadline
#: of their own to wait for).
TIMER_PERIOD = 0.1

#: an address as the socket module gives it: (host, port) or (host, port, flowinfo, scope_id)
Peer = Any
Datagrams = list[tuple[bytes, Peer]]


def _nothing(*args: object) -> None:
    return None


def _as_is(message: bytes, peer: Peer, now: float) -> tuple[bytes]:
    return (message,)


@dataclass(slots=True)
class EdgeStats:
    oversized: int = 0
    send_errors: int = 0
    datagrams_out: int = 0
    bytes_out: int = 0
    send_blocked: int = 0


#: EdgeStats field -> metric name
METRICS = {
    "oversized": "corem_coap_datagrams_oversized", "send_errors": "corem_coap_send_errors",
    "datagrams_out": "corem_coap_datagrams_sent", "bytes_out": "corem_coap_bytes_sent",
    "send_blocked": "corem_coap_send_blocked",
}


def bind_udp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket on host:port with 4 MB buffers; `reuse_port` joins (or starts) a
    SO_REUSEPORT group on that port (corem/workers/steer.py).

    No SO_REUSEADDR: on UDP it lets a second process bind the very port and take the fleet's
    datagrams (issue 26: a second `corem serve` answered every device 4.01).  A plain bind of a
    port another socket holds fails with EADDRINUSE, which the callers turn into one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        except OSError:
            pass
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def deliver(endpoint: Endpoint, router: Router, message: bytes, peer: Peer, now: float) -> None:
    """One CoAP message through the endpoint, and a request to its handler."""
    req = endpoint.receive(message, peer, now)
    if req is not None:
        response = router.dispatch(req)
        if response is not None:
            req.respond(response.code, response.options, response.payload)


class UdpEdge:
    """Drives one Endpoint from one UDP socket through a security layer; dispatches requests to a
    Router and the endpoint's events to `on_event`."""

    def __init__(
        self,
        sock: socket.socket,
        endpoint: Endpoint,
        router: Router,
        *,
        security: SecurityLayer | None = None,
        max_datagram: int = 1500,
        limiter: SourceLimiter | None = None,
        lane: FastLane | None = None,
        after_drain: Callable[[], object] | None = None,
        on_event: Callable[[Event], object] | None = None,
        busy_poll: BusyPoll | None = None,
    ) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.router = router
        self.security: SecurityLayer = security if security is not None else PlainUdp()
        self.max_datagram = max_datagram
        self.lane = lane
        #: called after each batch of datagrams is handled, before its answers go out: a sink
        #: that pipelines (Kafka) collects the delivery reports ready by then, so a busy server
        #: answers within one loop pass instead of at its sink's next timer
        self.after_drain = after_drain or _nothing
        #: receives message-layer events (ACK, RST, give-up of our CONs): observers need them
        self.on_event = on_event or _nothing
        #: after a batch that sent a handshake flight, poll the socket on the CPU for the answer
        #: (net/busypoll.py); None: straight back to sleep in epoll
        self.busy_poll = busy_poll
        self.stats = EdgeStats()
        #: datagrams ready for the wire (already encrypted for CoAPS) that the kernel did not take yet
        self._wire: Datagrams = []
        self._closed = False
        #: the batch's last datagram is with the security layer: what it answers may be sent at once
        self._eager = False
        self._read_socket = reader(sock)
        self._send = sender(sock)
        self._wire_up(lane, limiter)
        engine = getattr(self.security, "engine", None)  # (corem's DTLS engine: dtls/layer.py's EngineServer)
        if engine is not None and hasattr(engine, "eager"):
            engine.eager = self._send_early

    def _wire_up(self, lane: FastLane | None, limiter: SourceLimiter | None) -> None:
        """Choose, once, what the loops call: where datagrams come from, who is offered each
        message first, and where answers come from."""
        security, endpoint, handle = self.security, self.endpoint, self._handle
        self.limiter = limiter
        #: datagrams for the security layer; messages for the Python path; what the lane kept
        #: back during a batch; the messages to send; the lane's timers
        self._read: Callable[[float], Iterable[tuple[bytes, Peer]]] = self._read_limited
        self._receive: Callable[[bytes, Peer, float], Iterable[bytes]] = security.receive
        self._take: Callable[[bytes, Peer, float], None] = handle
        self._collect: Callable[[], Iterable[tuple[bytes, Peer]]] = tuple
        self._outgoing: Callable[[], Datagrams] = endpoint.datagrams_to_send
        self._tick_lane: Callable[[float], object] = _nothing
        if lane is None:
            if not security.transparent:
                self._decrypt_first()
            return
        self._tick_lane = lane.tick
        if security.transparent:
            # plain CoAP: the lane reads the socket, applies the size and rate limits to every
            # datagram, and sends its own answers (sendmmsg); the rest comes here
            fd = self.sock.fileno()
            self._read = lambda now: lane.drain(fd, now, BATCH)
            if lane.rate_limited:
                self.limiter = LaneLimits(lane)  # type: ignore[assignment]

            def outgoing() -> Datagrams:
                lane.send(fd)
                return endpoint.datagrams_to_send()
        elif self._lane_opens_records(lane, limiter):
            return
        else:
            # behind DTLS: the lane is offered each decrypted message, with its session's device
            device, offer, read = security.device, lane.offer, self._read_limited

            def read_batch(now: float) -> Datagrams:
                lane.begin()
                return read(now)

            self._read = read_batch
            self._decrypt_first()
            self._take = lambda message, peer, now: offer(message, peer, device(peer), now)
            self._collect = lane.collect

            def outgoing() -> Datagrams:
                return endpoint.datagrams_to_send() + lane.take_outbox()

        def outgoing_settled() -> Datagrams:
            lane.settle()
            return outgoing()

        self._outgoing = outgoing_settled

    def _lane_opens_records(self, lane: FastLane, limiter: SourceLimiter | None) -> bool:
        """Behind corem's DTLS engine (a security layer with `attach_lane`, C records): the lane
        reads the socket, opens the records of established sessions and seals its answers itself;
        the datagrams it leaves go through the security layer (then settled, then offered to the
        lane as behind any DTLS), the messages it decrypted but does not take go to the endpoint."""
        security, endpoint = self.security, self.endpoint
        attach = getattr(security, "attach_lane", None)
        if attach is None or not attach(lane):
            return False
        fd = self.sock.fileno()
        if limiter is not None:  # (the lane applies it to every datagram, as on plain CoAP)
            lane.limit(limiter.rate, limiter.burst, limiter.max_sources)
            self.limiter = LaneLimits(lane)  # type: ignore[assignment]
        decrypt, settle, device, offer = self._decrypt, security.settle, security.device, lane.offer
        touched = security.lane_touched  # type: ignore[attr-defined]
        drain, collect = lane.drain_records, lane.collect

        def read_records(now: float) -> Datagrams:
            datagrams, messages = drain(fd, now, BATCH, touched)
            if datagrams:
                decrypted = decrypt(datagrams, now)
                settle(now)
                if decrypted:  # (a handshake's datagrams decrypt to nothing: nothing offered, nothing to collect)
                    for message, peer in decrypted:
                        offer(message, peer, device(peer), now)
                    messages += collect()
            return messages

        def outgoing() -> Datagrams:
            lane.settle()
            lane.send_records(fd)
            return endpoint.datagrams_to_send() + lane.take_outbox()

        self._read = read_records
        self._receive = _as_is
        self._outgoing = outgoing
        log.info("coaps: the fast lane opens and seals the records of established sessions itself")
        return True

    def _decrypt(self, datagrams: Iterable[tuple[bytes, Peer]], now: float) -> Datagrams:
        """What a batch's datagrams decrypt to (maybe nothing), in order, each with its peer; the
        answer to the batch's last datagram may go at once (`_send_early`)."""
        receive = self.security.receive
        *before, (last, at) = datagrams  # (a copy of up to a batch of pointers: nothing beside the decrypting)
        messages = [(m, peer) for data, peer in before for m in receive(data, peer, now)]
        self._eager = True
        try:
            messages += [(m, at) for m in receive(last, at, now)]
        finally:
            self._eager = False
        return messages

    def _send_early(self) -> None:
        """The security layer has an answer to the batch's last datagram (a handshake's flight): sent
        now, with whatever it queued before, instead of at the batch's flush -- the peer's next flight
        is on its way while the rest of the batch is done (a finished handshake's bookkeeping, the
        flush).  Nothing comes later in the batch that could have gone in the same system call."""
        if self._eager and not self._closed:
            self._wire += self.security.datagrams_to_send()
            if self._wire:
                self._send_wire()

    def _decrypt_first(self) -> None:
        """Behind a security layer that is not transparent (DTLS), a batch is decrypted whole and
        settled (`SecurityLayer.settle`: its record numbers made durable) before any of its
        messages is handled; the loop then reads messages, and `_receive` passes them on."""
        read, decrypt, settle = self._read, self._decrypt, self.security.settle

        def read_messages(now: float) -> Datagrams:
            datagrams = read(now)
            if not datagrams:
                return []
            messages = decrypt(datagrams, now)
            settle(now)
            return messages

        self._read = read_messages
        self._receive = _as_is

    @property
    def dedup_entries(self) -> int:
        """Exchanges remembered for deduplication: the lane's when there is one (it remembers every
        request it sees, the Python path's included), else the endpoint's."""
        return len(self.lane) if self.lane is not None else self.endpoint.dedup_entries

    def metrics(self) -> Iterator[Sample]:
        """The edge's counters, its rate limit's, and how many exchanges are remembered."""
        yield from fields(self.stats, METRICS)
        yield gauge("corem_coap_dedup_entries", self.dedup_entries)
        limiter = self.limiter
        if limiter is not None:
            yield counter("corem_rate_limited_datagrams", limiter.dropped)
            yield counter("corem_rate_limit_exempted", limiter.exempted)
            yield gauge("corem_rate_limit_sources", len(limiter))
        busy = self.busy_poll
        if busy is not None:
            yield counter("corem_dtls_busy_polls", busy.answered, outcome="answered")
            yield counter("corem_dtls_busy_polls", busy.missed, outcome="missed")
            yield counter("corem_dtls_busy_poll_seconds", busy.seconds)

    @property
    def address(self) -> Peer:
        return self.sock.getsockname()

    async def serve(self) -> None:
        """Receive until cancelled.  After a batch that sent a handshake flight, `busy_poll` may
        find the device's answer waiting: the next batch is then read without sleeping in epoll
        (the other tasks still get the loop every YIELD_AFTER)."""
        sock = self.sock
        read, receive, take, collect = self._read, self._receive, self._take, self._collect
        handle = self._handle
        after_drain, flush = self.after_drain, self.flush
        current_time = trio.current_time
        wait_readable, checkpoint = trio.lowlevel.wait_readable, trio.lowlevel.checkpoint
        busy, fd, clock = self.busy_poll, sock.fileno(), time.perf_counter
        ready, yielded, flights = False, 0.0, 0
        while True:
            if not ready:
                await wait_readable(sock)
                yielded = clock() if busy is not None else 0.0
            elif clock() - yielded >= YIELD_AFTER:
                await checkpoint()
                yielded = clock()
            now = current_time()
            if busy is not None:
                flights = busy.flights()
            for data, peer in read(now):
                # plain CoAP: the datagram itself; CoAPS: what it decrypts to (maybe nothing)
                for message in receive(data, peer, now):
                    take(message, peer, now)
            for message, peer in collect():
                handle(message, peer, now)
            self._dispatch_events()
            after_drain()
            flush()
            ready = busy is not None and busy.flights() != flights and not self._closed and busy.poll(fd)

    def _read_limited(self, now: float) -> Datagrams:
        """The datagrams waiting (one batch), without the oversized ones and those over their
        source's rate that are not credentialed (counted by the limiter)."""
        got = self._read_socket(self.max_datagram + 1, BATCH)
        limit = self.max_datagram
        limiter = self.limiter
        allow = limiter.allow if limiter is not None else None
        credentialed = self.security.credentialed
        passed = []
        for data, peer in got:
            if len(data) > limit:
                self.stats.oversized += 1
            elif allow is None or allow(peer[0], now):
                passed.append((data, peer))
            elif credentialed(data, peer):
                limiter.excuse()  # type: ignore[union-attr]
                passed.append((data, peer))
        return passed

    def _handle(self, message: bytes, peer: Peer, now: float) -> None:
        deliver(self.endpoint, self.router, message, peer, now)

    def _dispatch_events(self) -> None:
        next_event, on_event = self.endpoint.next_event, self.on_event
        event = next_event()
        while event is not None:
            on_event(event)
            event = next_event()

    def flush(self) -> None:
        """Send what the security layer, the endpoint (and the lane) queued; what the kernel will
        not take waits for the next flush, in order."""
        if self._closed:
            return
        security = self.security
        wire = self._wire
        wire += security.datagrams_to_send()
        wrap = security.wrap
        for message, peer in self._outgoing():
            record = wrap(message, peer)
            if record is not None:
                wire.append((record, peer))
        if wire:
            self._send_wire()

    def _send_wire(self) -> None:
        """`_wire` to the kernel, in order, as far as it takes it; the rest waits for the next flush"""
        wire = self._wire
        taken, nbytes, errors, blocked = self._send(wire)
        stats = self.stats
        stats.datagrams_out += taken - errors
        stats.bytes_out += nbytes
        stats.send_errors += errors
        stats.send_blocked += blocked
        self._wire = wire[taken:] if taken < len(wire) else []

    async def run_timers(self) -> None:
        """Tick the endpoint when its next deadline passes, and the security layer and the lane
        at least every TIMER_PERIOD."""
        endpoint, security = self.endpoint, self.security
        while True:
            now = trio.current_time()
            deadline = endpoint.get_timer()
            wake = now + TIMER_PERIOD if deadline is None else min(deadline, now + TIMER_PERIOD)
            await trio.sleep_until(wake)
            now = trio.current_time()
            endpoint.tick(now)
            security.tick(now)
            self._tick_lane(now)
            self._dispatch_events()
            self.flush()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class LaneLimits:
    """The lane's rate limit, read like a `SourceLimiter` (`dropped`, `exempted`, `len`)."""

    def __init__(self, lane: FastLane) -> None:
        self._lane = lane

    @property
    def dropped(self) -> int:
        return int(self._lane.counters["dropped"])

    @property
    def exempted(self) -> int:
        return int(self._lane.counters["exempted"])

    def __len__(self) -> int:
        return int(self._lane.counters["sources"])
