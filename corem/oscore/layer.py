"""OSCORE on the router (RFC 8613 §8.2, §8.3): a request with the OSCORE option is verified and
decrypted before it is routed, so every resource serves it as the request the device sealed, with
the device's identity from its security context (like a DTLS session, but bound to the kid, not to
an address: a device whose address changed is served at once).  Its answers are sealed on their
way out (`Request.protect`), and so are the notifications of an observation it registered.

Freshness: the replay window of a context that was used before this process started is unknown, so
the first request gets a sealed 4.01 with an Echo option (RFC 9175, RFC 8613 Appendix B.1.2),
and the window starts at the request that returns it.  Where several processes serve the same
contexts (`shared`: `--workers`, or nodes on one PostgreSQL registry) the window they all check is
the registry's row (registry/oscore.py), moved by one atomic statement per accepted request: a
request replayed to another worker or node is refused there too.  The process's own window is then
a cache of what it took (a replay it saw itself is refused without a query).

The fast lane: once this layer has a context ready (its window known) and it is not `shared`, it
gives it to the fast lane in front of the request's endpoint (`lane_of`: corem/fastlane `serving`;
`FastLane.oscore_take`),
which from then on opens the device's common requests -- an inner `POST /telemetry` of a reading --
and seals their answers in C, with the same replay window object (a request taken by either path is
a replay to the other).  Everything else it hands here untouched.  A context this layer lets go
(evicted) is taken from the lanes too; a device changed or removed, the lane drops itself.
"""

from __future__ import annotations

import logging
import secrets
import weakref
from collections import Counter
from typing import Callable, Iterator, Protocol

from ..codec import Code, Message, OptionNumber, Options
from ..codec.message import OptionValue
from ..coap.endpoint import Request
from ..coap.response import Response, retry_later
from ..errors import StorageUnavailable
from ..logs import Every
from ..registry.oscore import OscoreState, fingerprint
from ..registry.store import Device, OscoreKeys
from ..stats import Sample, counter, gauge
from .context import Context, InvalidTag
from .protect import OscoreError, aad, bad_option, inner_message, parse_option, protect

log = logging.getLogger("corem.oscore")

#: contexts kept in memory at most (the oldest goes; it is rebuilt, with an Echo, if it comes back)
MAX_CONTEXTS = 100_000


#: the Sealer's warning, shared by every request's Sealer (one trouble: the registry away)
SEAL_FAILED = Every()


class Sealer:
    """Seals the answers to one request (and the notifications of the observation it made): the
    first answer with the request's nonce, every later one -- and any notification -- with a
    Partial IV of corem's own (a nonce is never used twice)."""

    __slots__ = ("ctx", "kid", "piv", "fetch", "fresh", "stats")

    def __init__(self, ctx: Context, kid: bytes, piv: bytes, fetch: bool, fresh: bool, stats: Counter[str]) -> None:
        self.ctx, self.kid, self.piv, self.fetch, self.fresh, self.stats = ctx, kid, piv, fetch, fresh, stats

    def __call__(self, code: int, options: Options | None, payload: bytes) -> tuple[int, Options, bytes]:
        """The answer sealed; or, when no sequence number of corem's own can be had for it (the
        registry cannot store the next block of them, RFC 8613 §B.1.1; the numbers are used up),
        an unprotected 5.03 with Max-Age (§8.2's errors go unprotected): the answer goes without,
        the request is not lost for it, and nothing escapes into the message layer (a review found
        one such failure ending `corem serve`)."""
        own = not self.fresh or any(n == OptionNumber.OBSERVE for n, _ in options or ())
        try:
            sealed = protect(self.ctx, self.kid, self.piv, code, options, payload, own_piv=own, fetch=self.fetch)
        except (StorageUnavailable, OverflowError) as e:
            self.stats["seal_failed"] += 1
            if SEAL_FAILED.due():  # (a line a minute at most: every answer fails while the registry is away)
                log.warning("oscore: an answer could not be sealed, 5.03 sent unprotected: %s", e)
            answer = retry_later(b"oscore: no sequence number to seal the answer with")
            return answer.code, answer.options or [], answer.payload
        self.fresh = False
        self.stats["sealed"] += 1
        return sealed


class ContextLane(Protocol):
    """What takes the common requests of a ready context off this layer, with its window (the fast
    lane in front of an endpoint: corem/fastlane `FastLane`)."""

    def oscore_take(self, ctx: Context, device: Device, kid: tuple[bytes, bytes]) -> bool: ...

    def oscore_drop(self, ctx: Context, kid: tuple[bytes, bytes]) -> None: ...

    @property
    def oscore_counts(self) -> tuple[int, int]: ...


class Oscore:
    """The server side of OSCORE for one process: contexts built from the registry on first use."""

    def __init__(self, lookup: Callable[[bytes | None, bytes], Device | None], state: OscoreState,
                 known_critical: frozenset[int], *, shared: bool = False,
                 lane_of: Callable[[object], ContextLane | None] | None = None) -> None:
        """`known_critical`: the critical options an inner request may carry (RFC 7252 §5.4.1
        applies inside too); `shared`: other processes serve the same contexts (the module
        docstring); `lane_of`: the lane in front of a request's endpoint, if any (corem/fastlane
        `serving`: the server wires it, so this layer imports no lane)."""
        self._lookup = lookup
        self._state = state
        self.shared = shared
        self._known = known_critical
        #: a device's keys -> its Context (keys derived once; the replay window and sequence numbers
        #: live here).  Keyed by the keys themselves: new keys for a device are a new context.
        self._contexts: dict[OscoreKeys, Context] = {}
        self.stats: Counter[str] = Counter()
        #: the fast lanes given a context (told when one goes; their counts are added to ours)
        self._lanes: weakref.WeakSet[ContextLane] = weakref.WeakSet()
        self._lane_of = lane_of

    def metrics(self) -> Iterator[Sample]:
        st = self.stats
        requests, sealed, lane_requests = st["requests"], st["sealed"], 0
        for lane in self._lanes:  # (the requests the lanes took never came here)
            taken, lane_sealed = lane.oscore_counts
            lane_requests += taken
            sealed += lane_sealed
        yield counter("corem_oscore_requests", requests + lane_requests)
        yield counter("corem_oscore_lane_requests", lane_requests)
        yield counter("corem_oscore_sealed", sealed)
        yield counter("corem_oscore_seal_failures", st["seal_failed"])
        yield counter("corem_oscore_windows_forgotten", self._state.windows_forgotten)
        yield counter("corem_oscore_echo_challenges", st["echo"])
        for reason in ("bad_option", "unknown_context", "decrypt", "replay", "method", "storage"):
            yield counter("corem_oscore_refused", st["refused_" + reason], reason=reason)
        yield gauge("corem_oscore_contexts", len(self._contexts))

    def _context(self, keys: OscoreKeys) -> Context:
        ctx = self._contexts.get(keys)
        if ctx is None:
            if len(self._contexts) >= MAX_CONTEXTS:
                old_keys = next(iter(self._contexts))
                old = self._contexts.pop(old_keys)
                for lane in self._lanes:  # (its window goes with it: the lanes must not keep taking its requests)
                    lane.oscore_drop(old, old_keys.kid)
            name = fingerprint(keys)
            ready = self._state.window_known(name) if self.shared else not self._state.used(name)
            ctx = Context(keys.secret, keys.salt, keys.sender_id, keys.recipient_id, keys.id_context,
                          reserve=lambda n: self._state.reserve(name, n), window_ready=ready)
            ctx.name = name
            self._contexts[keys] = ctx
        return ctx

    def unwrap(self, req: Request) -> Response | None:
        """A request with the OSCORE option becomes the request the device sealed (`req.message`,
        `req.identity`, `req.protect` set), and None is returned; or the answer it gets instead
        (§8.2's errors unsealed, the Echo challenge sealed)."""
        outer = req.message
        assert outer is not None
        value = outer.opt(OptionNumber.OSCORE)
        if value is None:
            return None
        self.stats["requests"] += 1
        try:
            return self._unwrap(req, outer, value)
        except OscoreError as e:
            self.stats["refused_" + e.reason] += 1
            return Response(e.code, e.diagnostic.encode(), [(OptionNumber.MAX_AGE, b"")] if e.code == Code.UNAUTHORIZED else None)
        except StorageUnavailable as e:
            self.stats["refused_storage"] += 1
            log.warning("oscore: %s", e)
            return retry_later(b"oscore: storage unavailable; retry later")

    def _unwrap(self, req: Request, outer: Message, value: OptionValue) -> Response | None:
        if outer.code not in (Code.POST, Code.FETCH):
            raise OscoreError(Code.METHOD_NOT_ALLOWED, "oscore: the outer code must be POST or FETCH", "method")
        option = parse_option(value)
        if option.kid is None or option.piv is None:
            raise bad_option("a request needs a kid and a partial IV")
        device = self._lookup(option.kid_context, option.kid)
        if device is None or device.oscore is None:
            raise OscoreError(Code.UNAUTHORIZED, "Security context not found", "unknown_context")
        ctx = self._context(device.oscore)
        seq = int.from_bytes(option.piv, "big")
        window = ctx.window
        if window.ready and not window.fresh(seq):
            raise OscoreError(Code.UNAUTHORIZED, "Replay detected", "replay")
        try:
            plain = ctx.decrypt(ctx.nonce(option.kid, option.piv), bytes(outer.payload), aad(option.kid, option.piv))
        except InvalidTag:
            raise OscoreError(Code.BAD_REQUEST, "Decryption failed", "decrypt") from None
        inner = inner_message(outer, plain)
        fetch = outer.code == Code.FETCH
        if not self.shared and not ctx.marked:  # once per process, before it takes a request
            self._state.mark_used(ctx.name)  # (a restart must ask Echo)
            ctx.marked = True
        if not window.ready:
            echo = inner.opt(OptionNumber.ECHO)
            if ctx.echo is None or echo is None or bytes(echo) != ctx.echo:
                # B.1.2: the request may be a replay from before the restart; its nonce must not be used
                ctx.echo = ctx.echo or secrets.token_bytes(8)
                self.stats["echo"] += 1
                req.protect = Sealer(ctx, option.kid, option.piv, fetch, False, self.stats)
                return Response(Code.UNAUTHORIZED, b"", [(OptionNumber.MAX_AGE, b""), (OptionNumber.ECHO, ctx.echo)])
            if self.shared and not self._state.start_window(ctx.name, seq):
                raise OscoreError(Code.UNAUTHORIZED, "Replay detected", "replay")  # another process is past it
            window.start_at(seq)
            ctx.echo = None
        elif self.shared and not self._state.accept(ctx.name, seq):  # another worker or node took it
            raise OscoreError(Code.UNAUTHORIZED, "Replay detected", "replay")
        else:
            window.accept(seq)
        if not self.shared and self._lane_of is not None:  # ready, and this process's alone: the
            lane = self._lane_of(req.endpoint)  # endpoint's fast lane may take its next requests
            if lane is not None and lane.oscore_take(ctx, device, device.oscore.kid):
                self._lanes.add(lane)
        req.message = inner
        req.identity = device
        req.protect = Sealer(ctx, option.kid, option.piv, fetch, True, self.stats)
        for number, _ in inner.options:
            if number & 1 and number not in self._known:
                return Response(Code.BAD_OPTION, f"option {number}: critical option not supported".encode())
        return None
