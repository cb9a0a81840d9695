"""The fast lane: the common telemetry request answered in C (`_lane.c`), datagram to sink record.

The C lane takes the request shapes that are nearly all of a fleet's traffic -- a CON or NON
`POST /api/v1/{token}/telemetry`, over CoAPS `POST /telemetry` (and `/api/v1/telemetry`) from a
session that names its device, and Drogue's `POST|PUT /v1/{channel}` with its credentials in option
4209 or the session (a channel once Drogue's door served it on the lane's endpoint:
`drogue_served`), an OSCORE request of a context corem/oscore gave it (`oscore_take`: opened, its
inner `POST /telemetry` taken as the context's device's, its answer sealed, in C: oscore.h), in the
formats the device's profile reads -- and hands every other datagram back
to the Python path (`UdpEdge` -> `Endpoint` -> `Router`), which remains the one place that rejects
and explains.  On plain CoAP it reads the socket itself (recvmmsg) and sends its answers
(sendmmsg).  Behind corem's own DTLS engine it does so too (`drain_records`, `send_records`): it
opens the records of the established sessions the security layer registered (`add_session`) with
their own Protection and Window objects (`_records.c`'s capsule) and seals its answers with their
write Protection -- one replay window and one write sequence number, whichever side takes a
record; the handshake, and every record it does not take, stay Python's.  Behind python-mbedtls it
gets the decrypted messages (`offer`) and its answers are encrypted by the edge.

`FastLane` is the glue around it: it gives the lane the devices it serves (the TelemetryPoint's
JSON head and tail are cut from `encode_point` itself, so the two cannot drift), submits the
lane's records to the sink, tells the downlink which devices talked and the ingest which
readings are durable.  The lane holds the devices that talk, not the whole registry: a device
is taken up when the Python path serves one of its readings on this endpoint (or it opens a
DTLS session here), at most `HOT` of them, and dropped when the registry changes it -- so a
million registered devices cost the lane nothing until they talk (the registry's directory
answers `known` for the rate limit's exemption of a token the lane does not hold).  Its counters are its own (`metrics()`, under the same names as the
endpoint's and the edge's: the metrics add them up per transport).

Without a C compiler the lane is not built and `Lane` is None: corem then runs on the Python path.
"""

from __future__ import annotations

import functools
import time
import weakref
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator

from ..bus.base import PackedRecord, Record, Sink
from ..coap.endpoint import Endpoint
from ..codec import Code, OptionNumber, code_str
from ..ingest.point import TelemetryPoint, encode_point
from ..ingest.telemetry import BUSY, Target, TelemetryIngest
from ..latency import BOUNDS as LATENCY_BOUNDS
from ..latency import LANE_DOORS
from ..latency import NAME as LATENCY
from ..profiles.compile import LANE_PROTOBUF, LANE_PYTHON, LaneDecoder
from ..stats import Histogram, Sample, counter
from .. import token_path

try:
    from ._lane import Lane, OscoreContext, OscoreWindow, compile_profile
except ImportError:  # pragma: no cover - only without a C compiler
    Lane = OscoreContext = OscoreWindow = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from ..oscore.context import Context
    from ..registry import Device

#: `touched(owners, marks_due, datagrams, bytes, now, readings_only, hellos, hello_bytes)`: what
#: `FastLane.drain_records` tells the security layer about the records it took and the new peers'
#: hellos it answered (corem/dtls/layer.py `EngineServer.lane_touched`)
Touched = Callable[[list[Any], int, int, int, float, bool, int, int], None]

#: What the lane answers a record the sink refused (full or closing) with: 5.03, like BUSY.
REFUSED = RuntimeError("the bus is full")
#: Devices a lane holds at most (~1.3 KB each: its token, its table entry, its Device).  When it
#: is full, the 1/64 taken up first are dropped, at most once a second (more than that and a
#: device waits on the Python path): the devices that keep talking are taken up again.
HOT = 100_000
#: While the registry has at most this many devices, a lane takes them all up at once (and each
#: one added or changed as it is), so that even their first readings are the lane's.
WARM = 4096


def json_frame(tenant: str, device: str, profile: str) -> tuple[bytes, bytes] | None:
    """The bytes of a TelemetryPoint's JSON before `ts` and after `received_at`, cut from
    `encode_point` (None if its layout is not the one `_lane.c` writes between them)."""
    whole = encode_point(TelemetryPoint(tenant=tenant, device=device, ts=0, numeric_values={}, string_values={},
                                        protocol="coap", received_at=0, profile=profile))
    middle = b'0,"numeric_values":{},"string_values":{},"protocol":"coap","received_at":0'
    at = whole.find(b'"ts":')
    if at < 0:
        return None
    head = whole[: at + 5]
    tail = whole[at + 5 + len(middle):]
    return (head, tail) if head + middle + tail == whole else None


def lane_mode(target: Target) -> int | None:
    """How the lane decodes this device's payloads itself (profiles/compile.py's LANE_*), or None:
    a profile compiled to a `LaneDecoder` (the built-in default, stored profiles of the formats
    the lane reads, their rules); any other decoder (protobuf, js, a hook) is the Python path's."""
    decode = target.decode
    return decode.mode if isinstance(decode, LaneDecoder) else None


def lane_profile(target: Target) -> object:
    """The C form of the target's profile -- its field rules, array positions, binary layout,
    protobuf schema and Python decoder (`_lane.compile_profile`) -- made once per compiled profile
    and kept on its `LaneDecoder`; None: the default profile, nothing to hold; False: one the lane
    cannot hold (a name twice in its layout, more readings than it holds): the Python path's."""
    decode = target.decode
    if not isinstance(decode, LaneDecoder):
        return None
    if decode.compiled is None:
        try:
            in_python = decode.decode if decode.mode in (LANE_PYTHON, LANE_PROTOBUF) else None
            decode.compiled = compile_profile(decode.rules, decode.positions, decode.layout, in_python,
                                              decode.nested, decode.proto,
                                              decode.handover.put if in_python is not None else None)
        except ValueError:
            decode.compiled = False
    return decode.compiled


def answer_late(endpoint: Endpoint, peer: Any, token: bytes, code: int, request_size: int,
                sealed: bytes | None = None) -> None:
    """A reading whose commit outlasted the piggyback timeout: the endpoint answers it with a
    confirmable response of its own and retransmits it; `sealed`: an OSCORE request's answer, sealed
    by the lane (a 2.04 outside, the OSCORE option empty: corem/oscore's first answer)."""
    if sealed is not None:
        endpoint.answer_late(peer, token, Code.CHANGED, [(OptionNumber.OSCORE, b"")], sealed, request_size)
    elif code == BUSY.code:
        endpoint.answer_late(peer, token, code, BUSY.options, BUSY.payload, request_size)
    else:
        endpoint.answer_late(peer, token, code, None, b"", request_size)


def oscore_key(keys_kid: tuple[bytes, bytes]) -> bytes:
    """The lane's key of an OSCORE context (oscore.h `osc_key`): the length of its kid context, the
    kid context, its kid -- a request without a kid context finds the same as one with an empty one."""
    context, kid = keys_kid
    return bytes((len(context),)) + context + kid


class LaneHook:
    """What the Python path tells an endpoint's lane (`TelemetryIngest.lanes`): called with a Target,
    a device it served (`FastLane.take_up`); `drogue(channel)`, a route of Drogue's door it served.
    Holds the lane weakly: no cycle through the ingest, so a lane is freed at once."""

    __slots__ = ("_lane",)

    def __init__(self, lane: FastLane) -> None:
        self._lane = weakref.ref(lane)

    def __call__(self, target: Target) -> None:
        fast = self._lane()
        if fast is not None:
            fast.take_up(target)

    def drogue(self, channel: str) -> None:
        fast = self._lane()
        if fast is not None:
            fast.lane.drogue(channel)


def serving(lanes: dict[object, Callable[[Target], None]], endpoint: object) -> FastLane | None:
    """The fast lane in front of `endpoint` (`TelemetryIngest.lanes`: its LaneHook), if any:
    corem/oscore gives it the contexts it has ready (`Oscore(lane_of=partial(serving, lanes))`)."""
    hook = lanes.get(endpoint)
    return hook._lane() if isinstance(hook, LaneHook) else None


def drogue_served(lanes: dict[object, Callable[[Target], None]], endpoint: object, channel: str) -> None:
    """Drogue's door served `/v1/{channel}` on `endpoint` (corem/frontdoors/drogue.py): that endpoint's
    lane, if any, takes the channel's common requests from now on -- the router sends that path to
    the door there (a site's own `v1/...` resource would win over it: learned per channel)."""
    hook = lanes.get(endpoint)
    if isinstance(hook, LaneHook):
        hook.drogue(channel)


class FastLane:
    """Drives one C `Lane` for a `UdpEdge`: reading the socket itself (plain CoAP: `drain`, `send`)
    or offered the messages a security layer decrypted (`begin`, `offer`, `collect`,
    `take_outbox`); see the module docstring."""

    def __init__(
        self,
        ingest: TelemetryIngest,
        sink: Sink,
        endpoint: Endpoint,
        *,
        max_datagram: int = 1500,
        rate: float = 0.0,
        max_sources: int = 100_000,
        exempt: list[tuple[bytes, int]] | None = None,
    ) -> None:
        if Lane is None:
            raise RuntimeError("corem.fastlane._lane is not built (no C compiler when corem was installed)")
        p = endpoint.params
        self.lane = Lane(
            Record, max_datagram=max_datagram, piggyback_timeout=p.piggyback_timeout,
            exchange_lifetime=p.exchange_lifetime, dedup_max_entries=p.dedup_max_entries,
            rate=rate, burst=2 * rate, max_sources=max_sources, limit_error_size=p.limit_error_size,
            exempt=exempt or [], scope=endpoint.transport or "udp",
            path=tuple(s.encode() for s in (*token_path.PREFIX, token_path.TELEMETRY)),
            packed_type=PackedRecord if sink.packed else None,
        )
        self.ingest = ingest
        self.sink = sink
        # a point of more readings goes to the Python path, which refuses it naming the bound
        self.lane.max_readings = min(ingest.max_readings, 2**31 - 1)  # (a C int: larger would wrap)
        # (a function of the endpoint, not a method of self: no cycle, so a lane is freed at once)
        self.lane.on_late = functools.partial(answer_late, endpoint)
        self.lane.next_mid = endpoint.mids.next  # (NON answers: the endpoint's IDs, corem/coap/message_ids.py)
        # the lane's own calls, for the edge: timers, a new DTLS session, its answers (sent on
        # the socket `fd`, or taken as (bytes, peer) for the security layer to wrap)
        self.new_session = self.lane.new_session
        #: a CID session moved (old, new, now): the new address's retransmissions of the old's exchanges
        self.moved = self.lane.moved
        #: an exchange committed before a restart (corem/bus/recovery.py): remember(peer, mid, at,
        #: token) -- token None: the bus record did not name it, any token is a retransmission
        self.remember = self.lane.remember
        self.send = self.lane.flush
        self.take_outbox = self.lane.take_outbox
        self.rate_limited = rate > 0
        self._now_ms = 0
        self._refusals = 0  # the lane's refusals the ingest was told of
        # The lane's tables, changed in place (the lane reads these dicts at each lookup):
        #: token -> its device's target in the lane
        self._tokens: dict[bytes, int] = {}
        #: (tenant, device) -> its target in the lane (the DTLS sessions' devices are found by name)
        self._positions: dict[tuple[str, str], int] = {}
        #: the devices taken up, oldest first: (tenant, device) -> (target or -1: not the lane's, token)
        self._hot: dict[tuple[str, str], tuple[int, bytes | None]] = {}
        self._free: list[int] = []  # targets dropped, to be used again
        self._next = 0  # the next target never used
        self._dropped_at = -1.0  # when the last round of drops was (monotonic)
        self.hot_max, self.warm = HOT, WARM
        self.lane.set_targets(self._tokens, [], self._positions)
        directory = ingest.directory
        self.lane.known = directory.knows_token
        directory.listen(self._registry_changed)
        ingest.lanes[endpoint] = LaneHook(self)  # (no cycle through the ingest: freed at once)
        #: the OSCORE contexts given to the lane: its key -> (the Context, its device's name), and
        #: each device's keys (a device changed or removed: its contexts are the Python path's again)
        self._oscore: dict[bytes, tuple[Context, tuple[str, str]]] = {}
        self._oscore_named: dict[tuple[str, str], set[bytes]] = {}
        self._warm()

    def begin(self) -> None:
        """Before each batch: the batch's wall clock."""
        self._now_ms = self.ingest.clock_ms()

    # -- the devices the lane holds ----------------------------------------------------------------
    def take_up(self, target: Target) -> None:
        """The Python path served this device on the lane's endpoint: the lane takes its next
        readings (if its profile is one the lane decodes), unless it holds `hot_max` devices and
        dropped some less than a second ago."""
        device = target.device
        name = (device.tenant, device.device)
        hot = self._hot
        if name in hot:
            return
        if len(hot) >= self.hot_max:
            now = time.monotonic()
            if now - self._dropped_at < 1.0:
                return
            self._dropped_at = now
            for old in list(islice(hot, max(1, self.hot_max // 64))):
                self._drop(old)
        mode = lane_mode(target)
        frame = None if mode is None else json_frame(device.tenant, device.device, device.profile)
        profile = None if mode is None else lane_profile(target)
        if mode is None or frame is None or profile is False:  # its own decoder, or a layout the lane does not know
            hot[name] = (-1, None)
            return
        if self._free:
            i = self._free.pop()
        else:
            i, self._next = self._next, self._next + 1
        self.lane.set_target(i, (target.topic, target.key, target.headers, *frame, device, mode, profile,
                                 device.tenant.encode()))
        token = None if device.token is None else device.token.encode()
        if token is not None:
            self._tokens[token] = i
        self._positions[name] = i
        hot[name] = (i, token)

    def _drop(self, name: tuple[str, str]) -> None:
        i, token = self._hot.pop(name)
        if i < 0:
            return
        if token is not None and self._tokens.get(token) == i:
            del self._tokens[token]
        if self._positions.get(name) == i:
            del self._positions[name]
        self.lane.set_target(i, None)
        self._free.append(i)

    # -- OSCORE (corem/oscore gives the lane its contexts) -------------------------------------------
    def oscore_take(self, ctx: Context, device: Device, kid: tuple[bytes, bytes]) -> bool:
        """The Python path has `ctx` ready (its window known) and unshared, for `device` (found by
        `kid`: (kid context or b'', kid)): the lane opens its requests and seals their answers from
        now on, with the same replay window.  False: not a context the lane can hold (the window is
        the Python twin's)."""
        if OscoreWindow is None or not isinstance(ctx.window, OscoreWindow):
            return False
        key = oscore_key(kid)
        held = self._oscore.get(key)
        if held is not None and held[0] is ctx:
            return True
        name = (device.tenant, device.device)
        if name not in self._hot:  # (its readings are the lane's once its device is)
            target = self.ingest.by_name(*name)
            if target is not None:
                self.take_up(target)
        send, recv, iv = ctx.keys
        if held is not None:  # (new keys under the kid: the old context goes first)
            self._oscore_drop_key(key)
        self.lane.oscore_add(key, OscoreContext(recv, send, iv, ctx.window, name))
        self._oscore[key] = (ctx, name)
        self._oscore_named.setdefault(name, set()).add(key)
        return True

    def oscore_drop(self, ctx: Context, kid: tuple[bytes, bytes]) -> None:
        """The context is gone from the Python path (evicted, or new keys): the lane lets it go."""
        key = oscore_key(kid)
        held = self._oscore.get(key)
        if held is not None and held[0] is ctx:
            self._oscore_drop_key(key)

    def _oscore_drop_key(self, key: bytes) -> None:
        _, name = self._oscore.pop(key)
        keys = self._oscore_named.get(name)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._oscore_named[name]
        self.lane.oscore_drop(key)

    def _registry_changed(self, names: Collection[tuple[str, str]] | None) -> None:
        """The registry changed these devices (None: any of them): the lane lets them go, and the
        Python path takes them up again as they are now (or refuses them); their OSCORE contexts
        too (new keys are a new context, and a device removed has none)."""
        if names is not None:
            for name in names:
                if name in self._hot:
                    self._drop(name)
                for key in list(self._oscore_named.get(name, ())):
                    self._oscore_drop_key(key)
            if len(self.ingest.directory) <= self.warm:
                for name in names:
                    target = self.ingest.by_name(*name)
                    if target is not None:
                        self.take_up(target)
            return
        self._tokens.clear()
        self._positions.clear()
        self._hot.clear()
        self._oscore.clear()
        self._oscore_named.clear()
        self.lane.oscore_drop(None)
        self._free.clear()
        self._next = 0
        self.lane.set_targets(self._tokens, [], self._positions)
        self._warm()

    def _warm(self) -> None:
        """Take every registered device up, if there are at most `warm` of them."""
        directory = self.ingest.directory
        if len(directory) <= self.warm:
            for device in directory.fleet.devices():
                self.take_up(self.ingest.target(device))

    @property
    def held(self) -> int:
        """Devices the lane holds (taken up)."""
        return len(self._hot)

    def drain(self, fd: int, now: float, budget: int) -> list[tuple[bytes, Any]]:
        """Read up to `budget` datagrams from the socket `fd`; submit what the lane accepted;
        return the rest (with their peers) for the Python path."""
        self.begin()
        self.lane.drain(fd, now, self._now_ms, budget)
        return self._submit()

    def receive(self, data: bytes, peer: Any, now: float) -> list[tuple[bytes, Any]]:
        """`drain` for one datagram given by the caller (sans-IO: tests, fuzzing)."""
        self.begin()
        self.lane.receive(data, peer, now, self._now_ms)
        return self._submit()

    def offer(self, message: bytes, peer: Any, device: Any, now: float) -> None:
        """One CoAP message a security layer decrypted, from a session bound to `device` (or
        None): the lane keeps it, or keeps it back for `collect`."""
        target = -1 if device is None else self._positions.get((device.tenant, device.device), -1)
        self.lane.receive_plain(message, peer, target, now, self._now_ms)

    # -- CoAPS records (corem's DTLS engine: corem/dtls/layer.py `attach_lane`) --------------------
    def add_session(self, owner: Any, peer: Any, cid_in: bytes, cid_out: bytes, read: Any, window: Any,
                    write: Any, device: Any, floor: int, mark_key: bytes | None) -> None:
        """An established session whose records the lane opens (`read`, `window`) and seals
        (`write`) itself: C `Protection`s and `Window` of corem.dtls.engine._records, shared with
        the Connection `owner`; `floor`: records numbered at or below it are Python's; `mark_key`:
        a saved session's key in the session store (its record numbers are due there whenever the
        lane took records of it: `take_marks`); `owner` itself at most once a second."""
        name = None if device is None else (device.tenant, device.device)
        if name is not None and name not in self._hot:
            target = self.ingest.by_name(*name)
            if target is not None:
                self.take_up(target)
        self.lane.add_session(owner, peer, cid_in, cid_out, read, window, write, name, floor, mark_key)

    def drop_session(self, owner: Any, peer: Any, cid_in: bytes) -> None:
        self.lane.drop_session(owner, peer, cid_in)

    def take_marks(self) -> list[tuple[int, bytes]]:
        """The saved sessions' record numbers due in the store, taken: [(window top, row key)] for
        each that took records since the last call (or was dropped since), however many batches
        that spans -- on the event loop, or from the bus's worker thread just before a commit."""
        return self.lane.take_marks()

    def take_marks_packed(self) -> bytes:
        """`take_marks` as one pack, the row the embedded bus carries with a batch (bus/sqlite.py `carry`)."""
        return self.lane.take_marks_packed()

    def cookie_secret(self, secret: bytes) -> None:
        """The DTLS engine's current cookie secret (again at each rotation): the lane answers new
        peers' cookie-less ClientHellos itself, as the engine would (b"": it leaves them to it)."""
        self.lane.cookie_secret(secret)

    def limit(self, rate: float, burst: float, max_sources: int) -> None:
        """The per-source rate limit, when the lane reads a CoAPS socket itself."""
        self.lane.limit(rate, burst, max_sources)
        self.rate_limited = True

    def exempt(self, networks: list[tuple[bytes, int]]) -> None:
        """The networks the rate limit never drops (net/limits.py `lane_networks`), replaced whole:
        a SIGHUP's new `rate_limit_exempt`."""
        self.lane.exempt(networks)

    def drain_records(self, fd: int, now: float, budget: int, touched: Touched
                      ) -> tuple[list[tuple[bytes, Any]], list[tuple[bytes, Any]]]:
        """CoAPS: read up to `budget` datagrams from `fd`, open and take what the lane can; tell
        `touched(owners, marks_due, datagrams, bytes, now, readings_only, hellos, hello_bytes)` which
        sessions' records it
        took (`owners`: each at most once a second) and how many saved sessions' record numbers are
        due in the store (`take_marks`: the security layer writes them there, at once or just before
        the sink's next commit) BEFORE the batch's readings go to the sink.  Returns the datagrams
        for the security layer (untouched) and the messages the lane decrypted but does not take
        (for the endpoint), each with its peer."""
        self.begin()
        lane = self.lane
        lane.drain_records(fd, now, self._now_ms, budget)
        declined, owners, due, datagrams, nbytes, hellos, hello_bytes = lane.take_records()
        if datagrams:
            touched(owners, due, datagrams, nbytes, now, not declined, hellos, hello_bytes)
        return self._submit(), declined

    def receive_record(self, data: bytes, peer: Any, now: float, touched: Touched
                       ) -> tuple[list[tuple[bytes, Any]], list[tuple[bytes, Any]]]:
        """`drain_records` for one datagram given by the caller (sans-IO: tests, fuzzing)."""
        self.begin()
        lane = self.lane
        lane.receive_record(data, peer, now, self._now_ms)
        declined, owners, due, datagrams, nbytes, hellos, hello_bytes = lane.take_records()
        if datagrams:
            touched(owners, due, datagrams, nbytes, now, not declined, hellos, hello_bytes)
        return self._submit(), declined

    def send_records(self, fd: int) -> None:
        """Seal the lane's answers to registered sessions and send them on `fd`; what is left
        (no session, or its reservation of sequence numbers used up) is `take_outbox`'s."""
        self.lane.send_records(fd)

    def collect(self) -> list[tuple[bytes, Any]]:
        """After a batch of `offer`: submit what the lane took; the rest, for Python."""
        return self._submit()

    def _submit(self) -> list[tuple[bytes, Any]]:
        lane = self.lane
        slow, records, ctxs, heard = lane.take()
        if records:
            taken = self.sink.submit_many(records, lane.committed, ctxs)
            for ctx in ctxs[taken:]:
                lane.committed(ctx, REFUSED)
        on_uplink = self.ingest.on_uplink
        if on_uplink is not None:
            for device in heard:
                on_uplink(device)
        return slow

    def settle(self) -> None:
        """Tell the ingest which of the lane's readings became durable since the last call (the
        ingest owns that count; the refusals are told at `tick`)."""
        accepted = self.ingest.accepted
        for device, n in self.lane.take_committed().items():
            accepted(device, n)

    def tick(self, now: float) -> None:
        """The lane's timers; and the readings it answered 5.03 since the last tick, for the
        ingest's count (here, ten times a second, not at every flush: reading the lane's
        counters builds a dict)."""
        self.lane.tick(now)
        refusals = self.lane.counters()["refusals"]
        if refusals != self._refusals:
            self.ingest.refused(refusals - self._refusals)
            self._refusals = refusals

    @property
    def counters(self) -> dict[str, Any]:
        return self.lane.counters()

    def metrics(self) -> Iterator[Sample | Histogram]:
        """The lane's share of the endpoint's and the edge's counters (same names: summed)."""
        c = self.lane.counters()
        for name, key in (
            ("corem_coap_datagrams_received", "datagrams_in"), ("corem_coap_bytes_received", "bytes_in"),
            ("corem_coap_requests", "requests"), ("corem_coap_duplicates", "duplicates"),
            ("corem_coap_dedup_evictions", "dedup_evictions"), ("corem_coap_datagrams_oversized", "oversized"),
            ("corem_coap_datagrams_sent", "datagrams_out"), ("corem_coap_bytes_sent", "bytes_out"),
            ("corem_coap_send_blocked", "send_blocked"), ("corem_coap_send_errors", "send_errors"),
            ("corem_coap_dedup_recovered", "recovered"),
            ("corem_coap_recovered_answers", "recovered_answers"),
        ):
            yield counter(name, c[key])
        for code, n in c["responses"].items():
            yield counter("corem_coap_responses", n, code=code_str(code))
        for door, (counts, seconds) in zip(LANE_DOORS, c["latency"]):  # (the endpoint's own buckets: summed)
            if any(counts):
                yield Histogram(LATENCY, LATENCY_BOUNDS, list(counts), seconds, (("door", door),))

    @property
    def oscore_counts(self) -> tuple[int, int]:
        """(OSCORE requests the lane took, answers it sealed): corem/oscore adds them to its own."""
        c = self.lane.counters()
        return c["oscore_requests"], c["oscore_sealed"]

    def __len__(self) -> int:
        """Exchanges the lane remembers for deduplication."""
        return self.lane.counters()["dedup_entries"]
