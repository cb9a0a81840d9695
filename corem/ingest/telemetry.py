"""Telemetry ingest: authenticated device + payload -> TelemetryPoint -> sink -> 2.04.

The handler never answers 2.04 itself: it submits the point to the sink and returns None; the
sink's `done` callback answers once the batch holding the point is durable (2.04), or refuses it
(5.03 with a Max-Age retry hint) if the batch failed.  A payload that does not decode is rejected
whole: 4.00 (4.15 for an unsupported Content-Format), the rejection counted, the sample kept.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Collection, Iterator, NamedTuple

import msgspec

from ..bus.base import Record, Sink
from ..bus.headers import CREATION_TIME, device_headers
from ..bus.recovery import HEADER as EXCHANGE, exchange_header
from ..coap.endpoint import Request
from ..coap.resources import Response, Router
from ..coap.response import refusal, retry_later
from .. import content_format, logs
from ..codec import Code
from ..errors import CoremError
from ..identity import Door, Identity, Refusal, SessionDevice
from ..profiles.formats import Series
from ..profiles.compile import LANE_PYTHON, Decoder, LaneDecoder, compile_profile
from ..profiles.rules import RuleViolation
from ..profiles.spec import DEFAULT as DEFAULT_NAME
from ..profiles.spec import Profile, ProfileError
from ..registry import Device, Directory
from ..stats import Sample, counter
from ..token_path import TELEMETRY, api_route, token_route
from .diagnostics import Diagnostics
from ..profiles.payload import Overloaded, PayloadError, Readings
from .point import TelemetryPoint, encode_point, telemetry_topic
from .presence import Presence

#: The answer when the bus cannot take a message (full, failing, shutting down): retry later.
BUSY = retry_later(b"bus unavailable; retry later")
#: Why a request with several points is answered 5.03 when the sink took only some of them.
SINK_FULL = RuntimeError("the bus took only some of the points")


def answer_committed(req: Request, error: BaseException | None) -> None:
    """A sink `done` for requests answered once their record is durable: 2.04, or 5.03 (BUSY)."""
    if req.answered:  # answered already (e.g. shutdown gave up on it)
        return
    if error is None:
        req.respond(Code.CHANGED)
    else:
        req.respond(BUSY.code, BUSY.options, BUSY.payload)


@dataclass(slots=True)
class IngestStats:
    #: tenant -> points acknowledged
    accepted: Counter[str] = field(default_factory=Counter)
    #: (protocol, reason) -> payloads rejected; reason is a stable metric label
    rejections: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: (protocol, reason) -> requests refused for who they speak for: counted by corem/identity.py
    #: alone (its `Reason`s are the labels)
    auth_failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    bus_refusals: int = 0
    #: (tenant, device) -> points acknowledged / payloads rejected (authenticated devices only,
    #: so bounded by the registry): the diagnostics UI's per-device rates
    device_points: Counter[tuple[str, str]] = field(default_factory=Counter)
    device_rejections: Counter[tuple[str, str]] = field(default_factory=Counter)


#: a Python hook's decoder (`TelemetryIngest.register_profile`): one reading per payload
Hook = Callable[[int | None, bytes | bytearray | memoryview], Readings]
#: the built-in `default` profile: a compiled profile of format `flat` (profiles/compile.py), as
#: every stored one is -- one decoder type, which the fast lane asks how it decodes in C
DEFAULT = compile_profile(Profile())


class UnknownProfile(CoremError):
    """The device names a profile this server has no decoder for: the server's configuration, not
    the device's fault (5.00)."""


def _hooked(hook: Hook) -> Decoder:
    """A Python hook as a profile's decoder: its one reading a list of one point, which the fast
    lane too calls from its batch (LANE_PYTHON)."""

    def decode(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        return [hook(content_format, payload)]

    return LaneDecoder(decode, LANE_PYTHON)


def _broken(reason: str) -> Decoder:
    def decode(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        raise UnknownProfile(reason)

    return decode


#: Targets kept made: those of the devices that talked most recently, roughly (a registered
#: device that does not talk costs its packed row in the directory only)
TARGETS = 16384
#: readings one point may have by default (the setting max_readings_per_point): a point is one
#: record, and a record of thousands of readings is a payload's bytes multiplied on the bus
MAX_READINGS = 1000


class Target(NamedTuple):
    """Everything per-device the hot path needs, made when the device first talks and again after
    it (or its profile) changed."""

    device: Device
    #: its profile's decoder: any number of points, all or nothing (a `LaneDecoder` when the fast
    #: lane can run it in C: the default profile, stored ones of its formats)
    decode: Decoder
    topic: str
    key: bytes
    headers: dict[str, str]


class Points:
    """A request whose payload became several records: answered once all of them are durable,
    5.03 if any failed (each record is one point; a retry may store the others again)."""

    __slots__ = ("req", "device", "points", "left", "error", "then")

    def __init__(self, req: Request, device: Device, points: int, then: Callable[[Request], None] | None) -> None:
        self.req, self.device, self.points, self.left, self.then = req, device, points, points, then
        self.error: BaseException | None = None


class TelemetryIngest:
    def __init__(
        self,
        directory: Directory,
        sink: Sink,
        diagnostics: Diagnostics,
        *,
        presence: Presence | None = None,
        on_uplink: Callable[[Device], None] | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        now: Callable[[], float] = time.monotonic,
        max_readings: int = MAX_READINGS,
    ) -> None:
        self.directory = directory
        #: readings one point may have (max_readings_per_point; the fast lane is told the same)
        self.max_readings = max_readings
        self.sink = sink
        self.diagnostics = diagnostics
        self.clock_ms = clock_ms
        self.now = now
        self.presence = presence
        #: told of every authenticated request (the downlink learns that a sleeping device woke)
        self.on_uplink = on_uplink
        self.stats = IngestStats()
        #: who each request speaks for, for every door: it alone counts `stats.auth_failures`
        self.identity = Identity(directory, self.stats.auth_failures)
        #: (tenant, device) -> its Target, for the devices that talked lately (at most TARGETS)
        self._targets: dict[tuple[str, str], Target] = {}
        #: profile name -> (the Profile it was compiled from, its decoder)
        self._compiled: dict[str, tuple[Profile, Decoder]] = {}
        #: profile name -> a Python hook's decoder (`register_profile`): this ingest's, no module's
        self._hooks: dict[str, Decoder] = {}
        #: endpoint -> what its fast lane is told of a device served on the Python path (FastLane.take_up)
        self.lanes: dict[object, Callable[[Target], None]] = {}
        directory.listen(self._registry_changed)

    def install(self, router: Router, session_device: SessionDevice | None = None) -> None:
        """Add the telemetry front doors; with `session_device` also `POST /telemetry`, whose tenant
        and device come from the security below CoAP (a DTLS session, an OSCORE context)."""
        router.add(token_route(TELEMETRY), {Code.POST: self.post_with_token}, identified=True)
        if session_device is not None:
            identify = self.identity.identify

            def post_in_session(req: Request, params: list[str]) -> Response | None:
                # (one-way certificate session: the device names itself by token; or removed since)
                device = identify(req, Door.TELEMETRY, session=session_device)
                if isinstance(device, Refusal):
                    return device.response()
                return self.ingest(req, self.target(device), "coap")

            router.add(TELEMETRY, {Code.POST: post_in_session},
                       link={"rt": "corem.telemetry", "if": "core.p", "ct": f"{content_format.CBOR} {content_format.JSON}"},
                       identified=True)
            router.add(api_route(TELEMETRY), {Code.POST: post_in_session}, identified=True)  # ThingsBoard's x509 path

    def register_profile(self, name: str, hook: Hook) -> None:
        """A profile decoded by Python code (`hook(content_format, payload)` returns Readings or
        raises PayloadError naming the field): for embedding corem; the devices naming `name`
        are served by it unless the registry stores a profile of that name, which comes first."""
        self._hooks[name] = _hooked(hook)
        self._targets.clear()

    def _decoder(self, name: str) -> Decoder:
        """A profile's decoder: stored (compiled once per version), a hook, the built-in default,
        or one that answers 5.00 naming it (this device only: the others keep being served)."""
        profile = self.directory.profiles.get(name)
        if profile is not None:  # a stored profile (corem profiles add ...)
            cached = self._compiled.get(name)
            if cached is None or cached[0] != profile:
                try:
                    cached = self._compiled[name] = (profile, compile_profile(profile))
                except ProfileError as e:  # (checked when written: a codec that stopped loading) 5.00
                    cached = self._compiled[name] = (profile, _broken(f"profile {name!r}: {e}"))
            return cached[1]
        hook = self._hooks.get(name)
        if hook is not None:
            return hook
        if name == DEFAULT_NAME:
            return DEFAULT
        # (the answer goes to the device: it names no other profile -- other tenants' among them;
        # `corem profiles list` is the operator's)
        return _broken(f"profile {name!r} is not registered")

    def _target(self, device: Device, protocol: str = "coap") -> Target:
        return Target(
            device,
            self._decoder(device.profile),
            telemetry_topic(device.tenant),
            device.device.encode(),
            {"protocol": protocol, "profile": device.profile, **device_headers(device.device)},
        )

    def _registry_changed(self, names: Collection[tuple[str, str]] | None) -> None:
        """The directory changed these devices (None: any of them): their Targets are made again."""
        if names is None:
            self._targets.clear()
        else:
            for name in names:
                self._targets.pop(name, None)

    def target(self, device: Device) -> Target:
        """The pipeline target of a registered device (made at its first use, then kept)."""
        key = (device.tenant, device.device)
        t = self._targets.get(key)
        if t is None:
            targets = self._targets
            if len(targets) >= TARGETS:  # the older half goes (cheaper than an exact LRU)
                for old in list(islice(targets, TARGETS // 2)):
                    del targets[old]
            t = targets[key] = self._target(device)
        return t

    def by_name(self, tenant: str, device: str) -> Target | None:
        """The pipeline target of a registered device (None once it is removed)."""
        t = self._targets.get((tenant, device))
        if t is not None:
            return t
        d = self.directory.named(tenant, device)
        return None if d is None else self.target(d)

    # -- front doors ---------------------------------------------------------------------------
    def post_with_token(self, req: Request, params: list[str]) -> Response | None:
        """ThingsBoard-style `POST /api/v1/{token}/telemetry`."""
        device = self.identity.identify(req, Door.TELEMETRY, token=params[0])
        if isinstance(device, Refusal):
            return device.response()
        return self.ingest(req, self.target(device), "coap")

    # -- the pipeline --------------------------------------------------------------------------
    def ingest(
        self, req: Request, target: Target, protocol: str, then: Callable[[Request], None] | None = None
    ) -> Response | None:
        """Decode, submit, answer 2.04 once durable -- or call `then(req)` to answer it instead."""
        msg = req.message
        assert msg is not None
        received_at = self.clock_ms()
        if self.on_uplink is not None:
            self.on_uplink(target.device)
        if self.lanes:
            take_up = self.lanes.get(req.endpoint)
            if take_up is not None:  # the endpoint's fast lane may take this device's next readings
                take_up(target)
        content_format = msg.content_format
        device = target.device
        try:
            points = target.decode(content_format, msg.payload, received_at)
            self._check_size(points)
        except UnknownProfile as e:  # the server's configuration, not the device's fault: 5.00
            self.stats.rejections[protocol, "unknown_profile"] += 1
            return Response(Code.INTERNAL_SERVER_ERROR, str(e).encode())
        except PayloadError as e:
            self._reject(req, device, protocol, e, content_format, received_at)
            return refusal(e)  # (its kind's answer: 4.00, 4.15, or the codec's limits' 5.03 with Max-Age)
        if len(points) != 1:
            return self._ingest_points(req, target, protocol, then, received_at, points)
        readings = points[0]
        point = TelemetryPoint(
            tenant=device.tenant,
            device=device.device,
            ts=received_at if readings.ts is None else readings.ts,
            numeric_values=readings.numeric,
            string_values=readings.strings,
            protocol=protocol,
            received_at=received_at,
            profile=device.profile,
            units=readings.units or msgspec.UNSET,
        )
        record = Record(target.topic, target.key, encode_point(point), _headers(req, target.headers, received_at))
        if then is None:
            req.app = device
            accepted = self.sink.submit(record, self._committed, req)
        else:  # rare (Drogue's ct): the tuple stays off the hot path's callback
            req.app = (device, then)
            accepted = self.sink.submit(record, self._committed_then, req)
        if not accepted:
            self.stats.bus_refusals += 1
            return BUSY
        return None

    def ingest_points(self, req: Request, target: Target, protocol: str, points: list[Readings], received_at: int,
                      *, profile: str, then: Callable[[Request], None] | None = None) -> Response | None:
        """Points a front door decoded itself (Efento's measurements), named as read by `profile`:
        one record each, all or nothing, answered as `ingest` answers (2.04 once durable, or `then`)."""
        if self.on_uplink is not None:
            self.on_uplink(target.device)
        return self._ingest_points(req, target, protocol, then, received_at, points, profile)

    def _ingest_points(self, req: Request, target: Target, protocol: str, then: Callable[[Request], None] | None,
                       received_at: int, points: list[Readings], profile: str | None = None) -> Response | None:
        """A stored profile's points: one record each, submitted together, one answer."""
        device = target.device
        headers = _headers(req, target.headers, received_at)
        if profile is not None:
            headers = {**headers, "profile": profile}
        records = [Record(target.topic, target.key, encode_point(TelemetryPoint(
            tenant=device.tenant, device=device.device, ts=received_at if r.ts is None else r.ts,
            numeric_values=r.numeric, string_values=r.strings, protocol=protocol, received_at=received_at,
            profile=profile or device.profile, units=r.units or msgspec.UNSET)), headers) for r in points]
        many = Points(req, device, len(records), then)
        taken = self.sink.submit_many(records, self._committed_point, [many] * len(records))
        if taken < len(records):
            self.stats.bus_refusals += 1
            if not taken:
                return BUSY
            # (sinks take a request's records whole or not at all -- bus/base.py `whole_requests`
            # -- but Kafka's queue can still refuse one by its bytes: the ones produced stay, and
            # the answer is 5.03)
            many.left, many.error = taken, SINK_FULL
        return None

    def _committed_point(self, many: Points, error: BaseException | None) -> None:
        if error is not None and many.error is None:
            many.error = error
        many.left -= 1
        req = many.req
        if many.left or req.answered:
            return
        if many.error is not None:
            if many.error is not SINK_FULL:  # (a partial refusal was counted when it happened)
                self.stats.bus_refusals += 1
            answer_committed(req, many.error)
            return
        self.accepted(many.device, many.points)
        if many.then is not None:
            many.then(req)
        else:
            answer_committed(req, None)

    def _committed(self, req: Request, error: BaseException | None) -> None:
        """The sink's verdict on one point: 2.04 once durable, 5.03 with a retry hint if not."""
        if not req.answered:  # (shutdown may have given up on it already)
            self._account(req.app, error)
            answer_committed(req, error)

    def _committed_then(self, req: Request, error: BaseException | None) -> None:
        """As `_committed`, but a durable point is answered by the `then` given to `ingest`."""
        if not req.answered:
            device, then = req.app
            self._account(device, error)
            if error is None:
                then(req)
            else:
                answer_committed(req, error)

    def _account(self, device: Device, error: BaseException | None) -> None:
        if error is not None:
            self.stats.bus_refusals += 1
        else:
            self.accepted(device, 1)

    def metrics(self) -> Iterator[Sample]:
        st = self.stats
        for (protocol, reason), n in sorted(st.rejections.items()):
            yield counter("corem_protocol_payload_rejections", n, protocol=protocol, reason=reason)
        if not st.rejections:
            yield counter("corem_protocol_payload_rejections", 0, protocol="coap", reason="decode_error")
        yield from self.identity.metrics()
        for tenant, n in sorted(st.accepted.items()):
            yield counter("corem_telemetry_points", n, tenant=tenant)
        yield counter("corem_telemetry_bus_refusals", st.bus_refusals)

    def refused(self, n: int) -> None:
        """`n` readings answered 5.03 elsewhere (the fast lane): the bus could not take them."""
        self.stats.bus_refusals += n

    def accepted(self, device: Device, n: int) -> None:
        """`n` readings of `device` are durable on the bus (here, or on the fast lane): counted
        as accepted, and the device is present."""
        self.stats.accepted[device.tenant] += n
        self.stats.device_points[device.tenant, device.device] += n
        if self.presence is not None:
            self.presence.seen(device.tenant, device.device, self.now(), device.profile)

    def _check_size(self, points: list[Readings]) -> None:
        """PayloadError for a point of more than `max_readings` readings. Found by an adversarial
        run: nothing bounded them, and a 64 KiB protobuf payload of `repeated bool`,
        flattened, became one record of 65,000 readings (~1 MB: past Kafka's default message size,
        so that device would be answered 5.03 for good)."""
        most = self.max_readings
        for i, r in enumerate(points):
            n = len(r.numeric) + len(r.strings)
            if n > most:
                raise PayloadError(f"max_readings_per_point is {most}: this point has {n} readings",
                                   f"[{i}]" if len(points) > 1 or isinstance(points, Series) else None)

    def _reject(
        self,
        req: Request,
        device: Device,
        protocol: str,
        error: PayloadError,
        content_format: int | None,
        received_at: int,
    ) -> None:
        reason = ("rule_violation" if isinstance(error, RuleViolation) else
                  "codec_limit" if isinstance(error, Overloaded) else "decode_error")
        self.stats.rejections[protocol, reason] += 1
        self.stats.device_rejections[device.tenant, device.device] += 1
        msg = req.message
        assert msg is not None
        self.diagnostics.add(
            at=received_at,
            protocol=protocol,
            reason=reason,
            detail=error.reason,
            field=error.field,
            tenant=device.tenant,
            device=device.device,
            peer=_peer_str(req.peer),
            content_format=content_format,
            payload=msg.payload,
        )


def _headers(req: Request, device: dict[str, str], received_at: int) -> dict[str, str]:
    """A reading's record headers, as the fast lane writes them: its device's (with `content-type`
    and `device_id`), `creation-time` (its `received_at`: corem/bus/headers.py) and the exchange it
    came in (`coap-exchange`: peer, message id and token), so that a restart can tell its
    retransmission from a new reading (corem/bus/recovery.py).  No exchange over TCP (no
    retransmissions); an OSCORE request's transport is marked, as its answer must be sealed (not
    recovered)."""
    transport = req.endpoint.transport
    if transport is None:
        return {**device, CREATION_TIME: str(received_at)}
    if req.protect is not None:
        transport += "+oscore"
    exchange = exchange_header(transport, req.peer, req.mid, req.token)
    return {**device, CREATION_TIME: str(received_at), EXCHANGE: exchange}


def _peer_str(peer: object) -> str:
    return str(logs.address(peer))
