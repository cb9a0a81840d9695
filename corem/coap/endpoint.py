"""The CoAP message layer (RFC 7252 §4), sans-IO.

An `Endpoint` owns no socket and no clock, and has one way out for each thing (the shape of
aioquic's `QuicConnection`): the edge feeds it datagrams with `receive(data, peer, now)`, which
returns a new `Request` or None; a handler answers through the request (`req.respond(...)`);
what happened to our own confirmable messages comes from `next_event()` as frozen `Event`s; the
datagrams to send come from `datagrams_to_send()`; the edge calls `tick(now)` when `get_timer()`
passes.  It deduplicates requests per (peer, message id), piggybacks
responses that come within `piggyback_timeout`, otherwise sends an empty ACK and a separate
confirmable response that it retransmits with exponential back-off until it is acknowledged,
reset, or given up.

Timers with a constant duration (piggyback, deduplication lifetime) are FIFO queues: arrival order
is deadline order, so no heap is needed for them.  Only retransmissions, whose first timeout is
randomised, use a heap.

Memory shape matters for speed: at 100k requests/s the deduplication cache holds hundreds of
thousands of entries, and every object the cyclic GC tracks is rescanned by each collection
(measured: half of the per-request CPU).  So only unanswered exchanges are `Request` objects; an
answered one is replaced by a `(received_at, reply, size)` tuple and the piggyback queue holds
`(received_at, key)` tuples, which CPython stops tracking once it sees they hold only atomic values.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from ..codec import Code, Message, MessageFormatError, Options, Type, code_str, decode, encode
from ..codec.options import PROXY_OPTIONS, UNDERSTOOD_CRITICAL, option_label, unrecognized
from ..latency import Latency
from ..stats import Histogram, Sample, counter, fields, gauge
from .blockwise import fitted
from .message_ids import MAX_BUSY, MessageIds
from .peers import Peer
from .response import Response

#: On plain UDP (`Params.limit_error_size`), an answer from a door whose routes need no credentials
#: (`OPEN_DOORS`) is at most this many times the size of its request (RFC 7252 §11.3): a forged
#: source address gets no more than that reflected at it.  A larger representation goes out as
#: Block2 (RFC 7959) in the largest block that fits; the client asks for the rest, block by block.
AMPLIFICATION_FACTOR = 3
#: the doors (corem/latency.py's labels) whose routes answer without credentials: discovery, the
#: users' own resources (corem.coap.site), Efento's time (/t)
OPEN_DOORS = frozenset({"discovery", "site", "efento"})

#: an exchange: (peer, message id)
Key = tuple[Peer, int]

CON, NON, ACK, RST = Type.CON, Type.NON, Type.ACK, Type.RST

#: How a message-level security layer seals an answer: (code, options, payload) -> the outer message's.
Protect = Callable[[int, "Options | None", bytes], "tuple[int, Options, bytes]"]

# Request states
PENDING = 0  # received, handler has not answered, still inside the piggyback window
SEPARATE = 1  # empty ACK sent; the answer will be a separate response
DONE = 2  # answered


@dataclass(frozen=True)
class Params:
    """Transmission parameters (RFC 7252 §4.8) and the bounds of this endpoint's state."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    piggyback_timeout: float = 0.5
    #: How long a (peer, message id) is remembered for deduplication (EXCHANGE_LIFETIME, §4.8.2).
    exchange_lifetime: float = 247.0
    #: Bound on remembered exchanges: the oldest is forgotten first (and counted) beyond it.
    dedup_max_entries: int = 100_000
    #: Bound on separate responses waiting for their ACK.
    max_outstanding: int = 10_000
    #: Cut error answers to the size of the request, and bound the answers of `OPEN_DOORS` to
    #: AMPLIFICATION_FACTOR times it: on for plain UDP, whose source addresses can be forged; off
    #: behind DTLS, whose handshake (cookie exchange) proved the peer's address (and OSCORE's
    #: answers are never bounded: they answer a request only the device's key could seal).  On,
    #: an observer's notifications are bounded too until it acknowledges one (corem/coap/observe.py).
    limit_error_size: bool = True

    def __post_init__(self) -> None:
        for name in ("ack_timeout", "piggyback_timeout", "exchange_lifetime"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ack_random_factor < 1:
            raise ValueError(f"ack_random_factor must be >= 1, got {self.ack_random_factor}")
        for name in ("max_retransmit", "dedup_max_entries", "max_outstanding"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_outstanding > MAX_BUSY:  # (so that a message ID is always found: message_ids.py)
            raise ValueError(f"max_outstanding must be <= {MAX_BUSY}, got {self.max_outstanding}")


def fit_error(size: int, mid: int, token: bytes, code: int, options: Options | None, payload: bytes) -> bytes:
    """An error's diagnostic payload, cut so that the message is no larger than the request it
    answers (`size` bytes): a forged source address must not turn corem into an amplifier (RFC 7252
    §11.3).  The endpoint cuts its error answers so, and corem/coap/observe.py an error notification
    to an observer whose address is not verified."""
    overhead = len(encode(Message(ACK, code, mid, token, options, b"x"))) - 1
    room = size - overhead
    return payload[:room] if room > 0 else b""


class Request:
    """One incoming request and the state of its exchange; the handle a handler answers through."""

    __slots__ = (
        "endpoint", "peer", "key", "message", "mid", "token", "confirmable", "received_at", "state", "reply", "app",
        "size", "echo", "identity", "protect", "door", "unmet",
    )

    def __init__(
        self, endpoint: Endpoint, peer: Peer, key: Key, message: Message, received_at: float, size: int = 0
    ) -> None:
        #: the endpoint that received it: only it may answer (CoAP and CoAPS have one each)
        self.endpoint = endpoint
        self.peer = peer
        self.key = key
        self.message: Message | None = message
        self.mid = message.mid
        self.token = message.token
        self.confirmable = message.type == CON
        self.received_at = received_at
        self.state = PENDING
        #: What a duplicate of this request gets: the piggybacked response or the empty ACK.
        self.reply: bytes | None = None
        #: Whatever the application attaches to the exchange while it is open (e.g. the device).
        self.app: Any = None
        #: Bytes the request took on the wire: an error answer is never larger (no amplification).
        self.size = size
        #: Options every answer to this request carries, whoever sends it (e.g. Block1, RFC 7959 §2.3).
        self.echo: Options | None = None
        #: The device a message-level security context authenticated (OSCORE), or None.
        self.identity: Any = None
        #: Seals every answer (OSCORE): (code, options, payload) -> the outer (code, options, payload).
        self.protect: Protect | None = None
        #: The front door whose route took it (the Router sets it; corem/latency.py): its metric label.
        self.door = "none"
        #: A condition (If-Match / If-None-Match) the Router found not to hold, answered (4.12) once
        #: the request's device is identified -- not before a 4.01 (corem/coap/conditional.py).
        self.unmet: str | None = None

    @property
    def answered(self) -> bool:
        """Has the exchange had its answer (from a handler, or from the endpoint itself)?"""
        return self.state == DONE

    def respond(
        self, code: int, options: Options | None = None, payload: bytes = b"", *,
        now: float | None = None, context: Any = None,
    ) -> None:
        """Answer this request: piggybacked in the ACK if still possible, else separately.

        `now` only matters for a separate response (its retransmission clock); without it the
        latest time the endpoint was given (by `receive` or `tick`) is used.  `context` comes back
        on the separate response's `Acked` / `Reset` / `GaveUp` event.
        """
        self.endpoint._respond(self, code, options, payload, now, context)

    def final(self, code: int, options: Options | None, payload: bytes) -> tuple[int, Options | None, bytes]:
        """The answer as it goes out, whichever message layer sends it: with the options every
        answer carries (`echo`), then sealed (`protect`)."""
        if self.echo:
            options = sorted([*(options or []), *self.echo], key=lambda o: o[0])
        if self.protect is not None:
            return self.protect(code, options, payload)
        return code, options, payload

    def __repr__(self) -> str:
        return f"Request({self.peer!r} mid={self.mid} state={self.state})"


class Outgoing:
    """A confirmable message of ours awaiting its ACK."""

    __slots__ = ("peer", "mid", "token", "data", "timeout", "tries", "done", "context")

    def __init__(
        self, peer: Peer, mid: int, token: bytes, data: bytes, timeout: float, context: Any
    ) -> None:
        self.peer = peer
        self.mid = mid
        self.token = token
        self.data = data
        self.timeout = timeout
        self.tries = 0
        self.done = False
        self.context = context


@dataclass(frozen=True, slots=True)
class Event:
    """Something the message layer tells the application, from `Endpoint.next_event()`."""

    peer: Peer
    mid: int


@dataclass(frozen=True, slots=True)
class Outcome(Event):
    """How one of our confirmable messages ended; `context` is what it was sent with."""

    token: bytes
    context: Any

    @classmethod
    def of(cls, out: Outgoing) -> Outcome:
        return cls(out.peer, out.mid, out.token, out.context)


@dataclass(frozen=True, slots=True)
class Acked(Outcome):
    """The peer acknowledged one of our confirmable messages."""


@dataclass(frozen=True, slots=True)
class Reset(Outcome):
    """The peer rejected one of our confirmable messages with RST (e.g. an observer going away)."""


@dataclass(frozen=True, slots=True)
class GaveUp(Outcome):
    """MAX_RETRANSMIT retransmissions went unanswered."""


@dataclass(frozen=True, slots=True)
class StrayReset(Event):
    """A RST that matches no message of ours awaiting ACK (it may answer a NON one)."""


@dataclass(slots=True)
class Stats:
    """Plain counters, read by `Endpoint.metrics` at scrape time (no locks on the hot path)."""

    datagrams_in: int = 0
    bytes_in: int = 0
    requests: int = 0
    duplicates: int = 0
    format_errors: int = 0
    pings: int = 0
    bad_options: int = 0
    proxy_refused: int = 0
    retransmissions: int = 0
    gave_up: int = 0
    resets: int = 0
    dedup_evictions: int = 0
    outstanding_refused: int = 0
    #: exchanges read back from the bus at start (`remember`), and their retransmissions answered
    recovered: int = 0
    recovered_answers: int = 0
    #: messages sent, indexed by code (0..255)
    responses: list[int] = field(default_factory=lambda: [0] * 256)


#: Stats field -> metric name (corem/metrics.py has their help texts)
METRICS = {
    "datagrams_in": "corem_coap_datagrams_received", "bytes_in": "corem_coap_bytes_received",
    "requests": "corem_coap_requests", "duplicates": "corem_coap_duplicates",
    "format_errors": "corem_coap_format_errors", "pings": "corem_coap_pings",
    "bad_options": "corem_coap_bad_options", "proxy_refused": "corem_coap_proxy_refused",
    "retransmissions": "corem_coap_retransmissions", "gave_up": "corem_coap_gave_up",
    "resets": "corem_coap_resets_received", "dedup_evictions": "corem_coap_dedup_evictions",
    "outstanding_refused": "corem_coap_outstanding_refused",
    "recovered": "corem_coap_dedup_recovered", "recovered_answers": "corem_coap_recovered_answers",
}

class RecoveredReply:
    """The reply slot of an exchange read back from the bus (`Endpoint.remember`): its answer, a
    2.04, is made when a retransmission comes, with the exchange's token -- the retransmission's,
    as only a request with that token is one (`answers`)."""

    __slots__ = ("token",)

    def __init__(self, token: bytes | None) -> None:
        #: the request's token, or None when the bus record did not name it (its older header)
        self.token = token

    def answers(self, token: bytes) -> bool:
        """Is a request with `token` this exchange's retransmission?  A retransmission is the same
        message again, its token unchanged (RFC 7252 §4.2, §5.3.1): one with another token reuses
        the peer and message id -- a device that rebooted and starts its ids where it did before --
        and is a new request.  (An unknown token answers any, as before the header named it.)"""
        return self.token is None or self.token == token


#: An exchange of a bus record that did not name its token
RECOVERED = RecoveredReply(None)


_KNOWN_CRITICAL = UNDERSTOOD_CRITICAL


class Endpoint:
    """One CoAP endpoint's message layer; see the module docstring for how it is driven."""

    #: The transport its exchanges are named by in bus records (corem/bus/recovery.py): "udp", or
    #: "dtls" (the server sets it); None for one without retransmissions (TCP: `StreamEndpoint`).
    transport: str | None = "udp"

    def __init__(
        self,
        params: Params | None = None,
        *,
        rng: Callable[[], float] = random.random,
        known_critical: Iterable[int] = _KNOWN_CRITICAL,
    ) -> None:
        self.params = params or Params()
        self._rng = rng
        self._known_critical = frozenset(known_critical)
        self._outbox: list[tuple[bytes, Peer]] = []
        self._events: deque[Event] = deque()
        #: (peer, mid) -> Request while unanswered, then (received_at, reply bytes or None, request size)
        self._dedup: OrderedDict[tuple[Peer, int], Request | tuple[float, bytes | RecoveredReply | None, int]] = \
            OrderedDict()
        #: (received_at, key) of confirmable requests, oldest first
        self._piggyback: deque[tuple[float, tuple[Peer, int]]] = deque()
        self._outstanding: dict[tuple[Peer, int], Outgoing] = {}
        #: peer -> when its current security association (DTLS session) began, oldest first
        self._sessions: OrderedDict[Peer, float] = OrderedDict()
        #: a DTLS session with a Connection ID that moved (RFC 9146 §6, `moved`): old address ->
        #: (its current one, when), and new -> (the one before it, when); EXCHANGE_LIFETIME each
        self._forward: dict[Peer, tuple[Peer, float]] = {}
        self._previous: dict[Peer, tuple[Peer, float]] = {}
        self._retx: list[tuple[float, int, Outgoing]] = []
        self._seq = 0
        #: the IDs of our own messages, sequential and random (one owner: corem/coap/message_ids.py)
        self.mids = MessageIds(self.params.exchange_lifetime, int(rng() * 0x10000))
        self.stats = Stats()
        #: receive-to-answer durations by door (corem/latency.py), measured once `clock` is set --
        #: the clock of the `now` the edge gives (the server sets trio's); none without it (sans-IO)
        self.latency = Latency()
        self.clock: Callable[[], float] | None = None

    # -- input -----------------------------------------------------------------------------
    def receive(self, data: bytes, peer: Peer, now: float) -> Request | None:
        """Process one datagram: a new Request for the application, or None (a duplicate, an ACK
        or RST -- whose event `next_event` gives --, a ping, something refused)."""
        stats = self.stats
        self._now_hint = now
        stats.datagrams_in += 1
        stats.bytes_in += len(data)
        try:
            msg = decode(data)
        except MessageFormatError as e:
            stats.format_errors += 1
            if e.mtype == CON and e.mid is not None:
                # a rejected CON is answered with RST (§4.2); never larger than what came in
                self.send(bytes((0x70, 0, e.mid >> 8, e.mid & 0xFF)), peer, 0)
            return None
        mtype = msg.type
        code = msg.code
        if 1 <= code <= 31:
            if mtype == CON or mtype == NON:
                return self._request(msg, peer, now, len(data))
            stats.format_errors += 1  # (a request in an ACK: no such message, RFC 7252 §4.3 Table 1)
            return None
        if mtype == ACK or mtype == RST:
            out = self._outstanding.pop((peer, msg.mid), None)
            if out is None and self._previous:
                earlier = self._earlier(peer, msg.mid, self._outstanding)
                if earlier is not None:  # (an ACK from where the session moved to)
                    out = self._outstanding.pop(earlier)
            if out is None:
                if mtype == RST:
                    self._events.append(StrayReset(peer, msg.mid))
                return None
            self.mids.free(out.mid)
            out.done = True
            if mtype == RST:
                stats.resets += 1
                self._events.append(Reset.of(out))
            else:
                self._events.append(Acked.of(out))
            return None
        if code == 0:
            if mtype == CON:  # CoAP ping (§4.3)
                stats.pings += 1
                self.send(bytes((0x70, 0, msg.mid >> 8, msg.mid & 0xFF)), peer, 0)
            return None
        # a response we did not ask for: reject a CON with RST, ignore a NON
        if mtype == CON:
            self.send(bytes((0x70, 0, msg.mid >> 8, msg.mid & 0xFF)), peer, 0)
        return None

    def _request(self, msg: Message, peer: Peer, now: float, size: int) -> Request | None:
        key = (peer, msg.mid)
        dedup = self._dedup
        seen = dedup.get(key)
        if seen is not None and self._before_session(peer, seen.received_at if isinstance(seen, Request) else seen[0]):
            del dedup[key]  # from the peer's previous session: not a duplicate of this one
            seen = None
        if seen is None and self._previous:
            earlier = self._earlier(peer, msg.mid, dedup)
            if earlier is not None:  # sent before its session moved here: the same exchange
                seen = dedup[earlier]
                if self._before_session(earlier[0], seen.received_at if isinstance(seen, Request) else seen[0]):
                    seen = None  # (another device's, at that address before this session began)
        if seen is not None and type(seen) is tuple and isinstance(seen[1], RecoveredReply) \
                and not seen[1].answers(msg.token):
            # committed before a restart under another token: not its retransmission but a new
            # request reusing the peer and message id (RecoveredReply.answers): served, not answered 2.04
            # from a reading that is not this one (its device would take that 2.04 as stored)
            dedup.pop(key, None)  # (to be remembered anew, at the end: the map is oldest first)
            seen = None
        if seen is not None:
            self.stats.duplicates += 1
            reply: bytes | RecoveredReply | None
            if isinstance(seen, Request):
                reply, original = seen.reply, seen.size
            else:
                _, reply, original = seen
                if isinstance(reply, RecoveredReply):  # committed before a restart: 2.04, with its token
                    if msg.type == CON:
                        self.stats.recovered_answers += 1
                        self.send(bytes((0x60 | len(msg.token), Code.CHANGED, msg.mid >> 8, msg.mid & 0xFF))
                                  + msg.token, peer, Code.CHANGED)
                    return None
            # a real retransmission is the original datagram again; a smaller "duplicate" could be
            # forged to pull a bigger cached answer at a spoofed address, so it gets nothing
            if reply is not None and msg.type == CON and size >= original:
                self.send(reply, peer, reply[1])  # counted by its code, as the lane counts it
            return None
        req = Request(self, peer, key, msg, now, size)
        dedup[key] = req
        if len(dedup) > self.params.dedup_max_entries:
            dedup.popitem(last=False)
            self.stats.dedup_evictions += 1
        self.stats.requests += 1
        if self._refused(req, msg):
            return None
        if req.confirmable:
            self._piggyback.append((now, key))
        return req

    def remember(self, peer: Peer, mid: int, at: float, token: bytes | None = None) -> bool:
        """An exchange whose reading was committed before a restart (corem/bus/recovery.py; given
        oldest first, `at` on this endpoint's clock): a CON retransmission of it -- a request with
        its `token`, any when None -- is answered 2.04 (an ACK with that token: never larger than
        it) and not handed on; one with another token is a new request.  False if known."""
        if token is not None and len(token) > 8:  # (as the lane's: RFC 7252 §3, TKL 0-8)
            raise ValueError("remember: a token is at most 8 bytes")
        key = (peer, mid)
        if key in self._dedup:
            return False
        self._dedup[key] = (at, RECOVERED if token is None else RecoveredReply(bytes(token)), 0)
        if len(self._dedup) > self.params.dedup_max_entries:
            self._dedup.popitem(last=False)
            self.stats.dedup_evictions += 1
        self.stats.recovered += 1
        return True

    def _refused(self, req: Request, msg: Message) -> bool:
        """Refuse a request with a critical option corem does not implement or cannot read (True),
        or leave it to the application (False), without the elective options it cannot read."""
        for number, _ in msg.options:
            if number & 1 and number not in self._known_critical:
                if number in PROXY_OPTIONS:  # RFC 7252 §5.7.2: corem is no forward-proxy
                    req.message = None
                    self.stats.proxy_refused += 1
                    self._answer(req, Code.PROXYING_NOT_SUPPORTED, None,
                                 f"{option_label(number)}: corem is not a proxy".encode())
                    return True
                return self._bad_option(req, f"{option_label(number)}: critical option not supported")
        odd = unrecognized(msg.options)
        if odd:
            for _, number, why in odd:
                if number & 1:  # a critical one, as if unknown (§5.4.3, §5.4.5)
                    return self._bad_option(req, f"{option_label(number)}: {why}")
            drop = {i for i, _, _ in odd}  # elective ones: ignored (§5.4.1)
            req.message = Message(msg.type, msg.code, msg.mid, msg.token,
                                  [o for i, o in enumerate(msg.options) if i not in drop], msg.payload)
        return False

    #: a NON with a critical option corem does not understand is rejected silently (RFC 7252
    #: §5.4.1, §4.3); over a stream (RFC 8323) there is no NON, and every such request gets 4.02
    silent_non = True

    def _bad_option(self, req: Request, why: str) -> bool:
        """A request with a critical option corem does not understand (RFC 7252 §5.4.1): 4.02 to
        a CON; a NON is rejected -- silently ignored, remembered as handled (§4.3)."""
        req.message = None
        self.stats.bad_options += 1
        if req.confirmable or not self.silent_non:
            self._answer(req, Code.BAD_OPTION, None, why.encode())
        else:
            req.state = DONE
            self._settle(req)
        return True

    def _before_session(self, peer: Peer, at: float) -> bool:
        """Did a message received at `at` come in `peer`'s previous DTLS session?"""
        if not self._sessions:
            return False
        began = self._sessions.get(peer)
        return began is not None and at < began

    def moved(self, old: Peer, new: Peer, now: float) -> None:
        """A DTLS session with a Connection ID now answers at `new` (RFC 9146 §6).  It is the same
        endpoint: what is still owed to `old` (a late answer, a retransmitted CON, a notification)
        goes to `new`, a retransmission from `new` of a request first sent from `old` is a
        duplicate, and an ACK from `new` settles a CON sent to `old`.  Nothing is re-keyed (the
        dedup map may be large): the two maps are read only when a lookup misses, or when sending,
        and live EXCHANGE_LIFETIME.  Should another session begin at `old` meanwhile (a NAT gave
        the address to another device), `new_session(old)` ends the forwarding: an answer still
        owed from before is then dropped, as for a session that ended, and never goes to the
        other device."""
        forward = self._forward
        step = old
        for _ in range(4):  # (a chain of moves, walked back: everything owed goes to the newest)
            entry = self._previous.get(step)
            if entry is None:
                break
            earlier = entry[0]
            if forward.get(earlier, (None,))[0] == step:
                forward[earlier] = (new, now)
            step = earlier
        forward.pop(new, None)  # (back where it once was)
        if old != new:
            forward[old] = (new, now)
            self._previous[new] = (old, now)
        for table in (forward, self._previous):
            if len(table) > self.params.dedup_max_entries:
                del table[next(iter(table))]

    def _earlier(self, peer: Peer, mid: int, table: dict[tuple[Peer, int], Any]) -> tuple[Peer, int] | None:
        """The key under which `table` knows (peer, mid) from an address its session moved from."""
        previous = self._previous
        for _ in range(4):  # (a few moves within one exchange's lifetime at most)
            entry = previous.get(peer)
            if entry is None:
                return None
            peer = entry[0]
            if (peer, mid) in table:
                return (peer, mid)
        return None

    def new_session(self, peer: Peer, now: float) -> None:
        """`peer` began a new security association (a DTLS handshake).  Message IDs are scoped to
        the endpoint, which under DTLS is the session (RFC 7252 §4.5, §9.1): what the peer sent in
        its previous session is no longer a duplicate of what it sends now, and a reading must not
        be answered from the old session's cache and dropped.  Nothing more is sent for the old
        session's requests either: that session, and what its message IDs meant, are gone (their
        readings are still committed).  Remembered for EXCHANGE_LIFETIME."""
        sessions = self._sessions
        sessions[peer] = now
        sessions.move_to_end(peer)
        if self._forward:
            self._forward.pop(peer, None)  # (another session at an address one moved away from)
        if len(sessions) > self.params.dedup_max_entries:
            sessions.popitem(last=False)

    # -- output ----------------------------------------------------------------------------
    def _respond(
        self, req: Request, code: int, options: Options | None, payload: bytes, now: float | None, context: Any
    ) -> None:
        """`Request.respond`."""
        if req.state == DONE:
            raise RuntimeError(f"{req!r} was already answered")
        if now is not None:
            self._now_hint = now
        if self.clock is not None:
            self.latency.observe(req.door, self.clock() - req.received_at)
        req.message = None  # the exchange no longer needs the datagram; let it go
        req.app = None
        self._answer(req, code, options, payload, context)

    def _answer(
        self, req: Request, code: int, options: Options | None, payload: bytes, context: Any = None
    ) -> None:
        state = req.state
        req.state = DONE
        if self._before_session(req.peer, req.received_at):
            self._settle(req)  # its session is gone: no answer (see new_session)
            return
        token = req.token
        code, options, payload = req.final(code, options, payload)
        if payload and self.params.limit_error_size:
            if code >= 0x80:
                payload = fit_error(req.size, req.mid, token, code, options, payload)
            elif req.door in OPEN_DOORS and req.protect is None:
                code, options, payload = self._bound(req, code, options, payload)
        if req.confirmable and state == PENDING:
            if options or payload:
                data = encode(Message(ACK, code, req.mid, token, options, payload))
            else:
                data = bytes((0x60 | len(token), code, req.mid >> 8, req.mid & 0xFF)) + token
            req.reply = data
            self.send(data, req.peer, code)
            self._settle(req)
            return
        self._settle(req)
        mid = self.mids.next()
        if not req.confirmable:
            self.send(encode(Message(NON, code, mid, token, options, payload)), req.peer, code)
            return
        data = encode(Message(CON, code, mid, token, options, payload))
        self.send_confirmable(data, req.peer, mid, token, context, code)

    def answer_late(
        self, peer: Peer, token: bytes, code: int, options: Options | None, payload: bytes, request_size: int
    ) -> None:
        """A separate response (a CON of ours, retransmitted until ACKed) to a request that another
        layer received and deduplicated: the fast lane's readings whose commit outlasted the
        piggyback timeout."""
        mid = self.mids.next()
        if payload and code >= 0x80 and self.params.limit_error_size:
            payload = fit_error(request_size, mid, token, code, options, payload)
        self.send_confirmable(encode(Message(CON, code, mid, token, options, payload)), peer, mid, token, None, code)

    @staticmethod
    def _bound(
        req: Request, code: int, options: Options | None, payload: bytes
    ) -> tuple[int, Options | None, bytes]:
        """The answer to `req` within AMPLIFICATION_FACTOR times its size: as it is, or -- a GET's 2.05
        -- cut to the largest Block2 block that fits (`blockwise.fitted`: block 0 of the whole
        representation with its ETag and Size2, or a smaller block at the same offset of a block the
        router already cut); if not even a 16-byte block fits, 4.01 without a payload (RFC 9175 §2.4
        answers so until the address is verified: DTLS or OSCORE verify it).  Another success (a
        POST's 2.04) keeps its code, without its payload (and its options, if need be): the
        request was carried out, and a 4.01 would have the client carry it out again (found by a
        review)."""
        bound = AMPLIFICATION_FACTOR * req.size

        def fits(answer: Response) -> bool:
            return len(encode(Message(ACK, answer.code, req.mid, req.token, answer.options, answer.payload))) <= bound

        answer = fitted(Response(code, payload, options), fits)
        if answer is not None:
            return answer.code, answer.options, answer.payload
        if code != Code.CONTENT:
            for trimmed in (Response(code, b"", options), Response(code, b"", None)):
                if fits(trimmed):  # (the last always does: a bare header and token, no larger than the request)
                    return trimmed.code, trimmed.options, b""
        return Code.UNAUTHORIZED, None, b""

    def _settle(self, req: Request) -> None:
        """Replace the answered exchange by an untracked tuple (still there for duplicates)."""
        dedup = self._dedup
        if dedup.get(req.key) is req:
            dedup[req.key] = (req.received_at, req.reply, req.size)

    def send_confirmable(
        self, data: bytes, peer: Peer, mid: int, token: bytes, context: Any = None, code: int = 0
    ) -> bool:
        """Send a CON of ours (separate response, notification) and retransmit it until ACKed.  False:
        no room (`has_room`), or `mid` is one that awaits its ACK already, of any peer (an ID its
        caller chose: found in review, a second with one peer's ID replaced the first entry, whose
        give-up then failed -- the ACK of one would be taken for the other; `next_mid` and
        `unpredictable_mid` never give one): so every entry not yet done is in `_outstanding`
        under its own key, and each ID awaiting an ACK is one message's (`MessageIds.busy`)."""
        if not self.has_room() or mid in self.mids:
            self.stats.outstanding_refused += 1
            return False
        p = self.params
        timeout = p.ack_timeout * (1 + self._rng() * (p.ack_random_factor - 1))
        out = Outgoing(peer, mid, token, data, timeout, context)
        self._outstanding[(peer, mid)] = out
        self.mids.busy(mid)
        self._schedule(out, self._now_hint + timeout)
        self.send(data, peer, code)
        return True

    def has_room(self, share: float = 1.0) -> bool:
        """Is there room for one more message awaiting its ACK, within `share` of max_outstanding
        (observe.py keeps half for what is not an unverified observer's)?"""
        return len(self._outstanding) < int(self.params.max_outstanding * share)

    def next_mid(self) -> int:
        """The ID of a message of ours: the next in turn, past those awaiting an ACK and the recent
        random ones (`MessageIds.next`).  The fast lane's NON answers take theirs here too."""
        return self.mids.next()

    def unpredictable_mid(self, avoid: Callable[[int], bool] | None = None) -> int:
        """A message ID drawn at random (not one `avoid` names either), for a confirmable message
        whose ACK is taken as proof that its peer receives what goes there (observe.py: a plain-UDP
        observer's notifications).  `next_mid`'s follow one another: one who also observes knows
        the one in flight (its own + 1), so an ACK with it, forged from a victim's address, would
        prove nothing; guessing this one takes some 15,000 forged datagrams on average, about 15
        bits (`MessageIds.unpredictable`)."""
        return self.mids.unpredictable(self._now_hint, avoid)

    def send(self, data: bytes, peer: Peer, code: int) -> None:
        """Send a message of ours that needs no ACK (a NON notification), counted by its code."""
        if self._forward:
            peer = self._forward.get(peer, (peer,))[0]
        self._outbox.append((data, peer))
        self.stats.responses[code] += 1


    def _schedule(self, out: Outgoing, deadline: float) -> None:
        self._seq += 1
        heapq.heappush(self._retx, (deadline, self._seq, out))

    # -- time ------------------------------------------------------------------------------
    #: The last `now` the endpoint saw; deadlines of messages created in between start here.
    _now_hint = 0.0

    @property
    def now(self) -> float:
        """The latest time the endpoint was given (by `receive`, `tick` or `respond`): the time of
        what it is handling, for those that act on its events (`Observers.handle`)."""
        return self._now_hint

    def tick(self, now: float) -> None:
        """Run every timer due at `now` (an abandoned message's `GaveUp` comes from `next_event`)."""
        self._now_hint = now
        self.mids.tick(now)
        p = self.params
        piggyback = self._piggyback
        dedup = self._dedup
        limit = now - p.piggyback_timeout
        while piggyback and piggyback[0][0] <= limit:
            at, key = piggyback.popleft()
            req = dedup.get(key)
            # (the same request: the key may name a newer one, from the peer's next DTLS session)
            if (type(req) is Request and req.state == PENDING and req.received_at == at and req.confirmable
                    and not self._before_session(req.peer, at)):
                req.state = SEPARATE
                req.reply = bytes((0x60, 0, req.mid >> 8, req.mid & 0xFF))  # empty ACK
                self.send(req.reply, req.peer, 0)
        limit = now - p.exchange_lifetime
        for table in (self._forward, self._previous):
            while table and next(iter(table.values()))[1] <= limit:
                del table[next(iter(table))]
        sessions = self._sessions
        while sessions and next(iter(sessions.values())) <= limit:
            sessions.popitem(last=False)  # older than any exchange still remembered
        while dedup:
            key, entry = next(iter(dedup.items()))
            if (entry.received_at if isinstance(entry, Request) else entry[0]) > limit:
                break
            del dedup[key]
        retx = self._retx
        while retx and retx[0][0] <= now:
            _, _, out = heapq.heappop(retx)
            if out.done:
                continue
            if out.tries >= p.max_retransmit:
                out.done = True
                del self._outstanding[(out.peer, out.mid)]
                self.mids.free(out.mid)
                self.stats.gave_up += 1
                self._events.append(GaveUp.of(out))
                continue
            out.tries += 1
            out.timeout *= 2
            self.stats.retransmissions += 1
            self._outbox.append((out.data, self._forward.get(out.peer, (out.peer,))[0]))
            self._schedule(out, now + out.timeout)

    def get_timer(self) -> float | None:
        """When `tick` next has work, or None if no timer is pending."""
        p = self.params
        candidates = []
        piggyback = self._piggyback
        dedup = self._dedup
        while piggyback and type(dedup.get(piggyback[0][1])) is not Request:
            piggyback.popleft()  # answered in time (or forgotten): nothing left to do for it
        if piggyback:
            candidates.append(piggyback[0][0] + p.piggyback_timeout)
        if self._retx:
            candidates.append(self._retx[0][0])
        if dedup:
            entry = next(iter(dedup.values()))
            received_at = entry.received_at if isinstance(entry, Request) else entry[0]
            candidates.append(received_at + p.exchange_lifetime)
        return min(candidates) if candidates else None

    # -- introspection ---------------------------------------------------------------------
    def metrics(self) -> Iterator[Sample | Histogram]:
        stats = self.stats
        yield from fields(stats, METRICS)
        for code, n in enumerate(stats.responses):
            if n:
                yield counter("corem_coap_responses", n, code=code_str(code))
        yield gauge("corem_coap_outstanding", len(self._outstanding))
        yield counter("corem_coap_random_ids_forgotten", self.mids.forgotten)
        yield from self.latency.metrics()

    @property
    def dedup_entries(self) -> int:
        return len(self._dedup)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def datagrams_to_send(self) -> list[tuple[bytes, Peer]]:
        """The datagrams queued since the last call, oldest first, as (bytes, peer); the caller
        owns the list."""
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None.  The edge takes them all after each batch and
        each tick, so they never pile up."""
        return self._events.popleft() if self._events else None
