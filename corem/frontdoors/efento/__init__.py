"""Efento's NB-IoT sensors (temperature, humidity, CO2, IAQ, pulse counters, water meters, binary
OK/alarm and flooding, ...): protobuf over CoAP, as ThingsBoard takes them (spec 002, "Efento
Integration"), on corem's registry, ingest and bus.

    POST /api/v1/efento/m | /coap/measurements | /m       measurements -> points   2.01
    POST /api/v1/efento/i | /coap/device-info  | /i       device info -> client attributes   2.01
    POST /api/v1/efento/c | /coap/configuration | /c      configuration -> client attributes   2.01
    GET (or POST) /api/v1/efento/t | /t                   the time: 4 bytes, big-endian seconds   2.05

ThingsBoard's paths, the spec's names and Efento's own short paths (its sensors' defaults).  The
payload is one message of Efento's published schema (decode.py); the device is the one whose access
token the message's `cloud_token` is.  Over CoAPS or OSCORE the session's device is taken when the
message carries no token, or one corem does not know (a sensor's cloud token may be its IMEI):
corem/identity.py decides.
Points are published as any reading is (`telemetry.{tenant}`, answered once durable), attributes
stored as the device's client attributes and copied to `attributes.{tenant}`.  A message that does
not decode is refused whole: 4.00 naming the field, counted, kept as a diagnostics sample.

The schema needs Google's protobuf runtime (the `protobuf` extra, as protobuf profiles do): without
it the door is there and says so, 5.01 naming the extra (`/t` needs nothing).
"""

from __future__ import annotations

import functools
import struct
import time
from collections import Counter
from types import ModuleType
from typing import Any, Callable, Iterator

from ... import content_format, logs
from ...bus.base import publish_json
from ...coap.endpoint import Request
from ...coap.resources import Response, Router
from ...coap.response import refusal
from ...codec import Code
from ...identity import Door, Refusal
from ...identity import SessionDevice as SessionLookup
from ...profiles.payload import PayloadError, UnsupportedFormat
from ...ingest.telemetry import TelemetryIngest
from ...errors import BadInput
from ...registry import Device, Directory
from ...registry.management import Management
from ...stats import Sample, counter
from ...token_path import api_route
from ..common import OCTETS
from ..thingsboard import attributes_topic

SessionDevice = SessionLookup | None

#: kind -> (ThingsBoard's and Efento's short segment, the spec's name)
PATHS = {
    "measurements": ("m", "measurements"),
    "device_info": ("i", "device-info"),
    "configuration": ("c", "configuration"),
}
KINDS = (*PATHS, "time")
RESULTS = ("accepted", "refused")
SKIPPED = ("sensor_error", "unknown_type", "unpaired", "invalid")
#: the `profile` of the points (their record header and field): what read them
PROFILE = "efento"
PROTOCOL = "coap"
#: the answer without Google's protobuf runtime (installed with the `protobuf` extra)
NO_PROTOBUF = Response(Code.NOT_IMPLEMENTED, b"efento: needs the 'protobuf' extra: pip install 'corem[protobuf]'")


def _decoder() -> ModuleType | None:
    """decode.py, imported at the door's first message (None without the protobuf runtime)."""
    try:
        from . import decode
    except ImportError:
        return None
    return decode


class Efento:
    def __init__(self, directory: Directory, ingest: TelemetryIngest, management: Management,
                 wall: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.ingest = ingest
        self.management = management
        #: the time /t answers (seconds since the epoch)
        self.wall = wall
        #: (kind, accepted | refused) -> messages
        self.messages: Counter[tuple[str, str]] = Counter()
        #: reason -> samples of accepted measurements that became no value
        self.skipped: Counter[str] = Counter()

    def metrics(self) -> Iterator[Sample]:
        for kind in KINDS:
            for result in RESULTS:
                yield counter("corem_efento_messages", self.messages[kind, result], kind=kind, result=result)
        for reason in SKIPPED:
            yield counter("corem_efento_samples_skipped", self.skipped[reason], reason=reason)

    def install(self, router: Router, session_device: SessionDevice = None) -> None:
        handlers: dict[str, Callable[[Request, SessionDevice], Response | None]] = {
            kind: functools.partial(self.post_attributes, kind=kind) for kind in PATHS}
        handlers["measurements"] = self.post_measurements
        for kind, (short, name) in PATHS.items():
            post = self._post(handlers[kind], session_device)
            for path in (api_route(f"efento/{short}"), f"coap/{name}", short):
                router.add(path, {Code.POST: post}, door="efento", identified=True,
                           link={"rt": f"efento.{short}", "if": "core.p", "ct": "42"} if path == short else None)
        for path in (api_route("efento/t"), "t"):
            router.add(path, {Code.GET: self.get_time, Code.POST: self.get_time}, door="efento",
                       link={"rt": "efento.t"} if path == "t" else None)

    @staticmethod
    def _post(handler: Callable[[Request, SessionDevice], Response | None], session_device: SessionDevice):
        def call(req: Request, params: list[str]) -> Response | None:
            return handler(req, session_device)

        return call

    # -- the time ----------------------------------------------------------------------------------
    def get_time(self, req: Request, params: list[str]) -> Response:
        """The current time for the sensor's clock: 4 bytes, big-endian seconds since the epoch
        (ThingsBoard's `ByteBuffer.putInt`: the same bytes, read unsigned, until 2106)."""
        self.messages["time", "accepted"] += 1
        return Response(Code.CONTENT, struct.pack(">I", int(self.wall()) & 0xFFFFFFFF))

    # -- reading a message -------------------------------------------------------------------------
    def _read(self, req: Request, kind: str, session_device: SessionDevice) -> tuple[ModuleType, Any, Device] | Response:
        """decode.py, the request's message and its device, or the answer refusing it (counted)."""
        decode = _decoder()
        if decode is None:
            self.messages[kind, "refused"] += 1
            return NO_PROTOBUF
        cls = decode.message_class(kind)
        msg = req.message
        assert msg is not None
        data = bytes(msg.payload)
        try:
            if msg.content_format not in (None, OCTETS):
                raise UnsupportedFormat(f"content-format {msg.content_format} is not Efento's; send "
                                        f"{content_format.name(OCTETS)} or no Content-Format")
            parsed = decode.parse(cls, data)
        except PayloadError as e:  # before the device is known: over CoAPS or OSCORE the session's
            return self._refuse(req, kind, self.ingest.identity.owner(req, session_device), e)
        device = self.ingest.identity.identify(req, Door.EFENTO, session=session_device, token=parsed.cloud_token)
        if isinstance(device, Refusal):
            self.messages[kind, "refused"] += 1
            return device.response()
        return decode, parsed, device

    def _refuse(self, req: Request, kind: str, device: Device | None, error: PayloadError) -> Response:
        """4.00 (4.15 for a Content-Format), counted and kept as a diagnostics sample."""
        self.messages[kind, "refused"] += 1
        stats = self.ingest.stats
        stats.rejections[PROTOCOL, "decode_error"] += 1
        if device is not None:
            stats.device_rejections[device.tenant, device.device] += 1
        msg = req.message
        assert msg is not None
        peer = req.peer
        self.ingest.diagnostics.add(
            at=self.ingest.clock_ms(), protocol=PROTOCOL, reason="decode_error", detail=error.reason,
            field=error.field, tenant=device and device.tenant, device=device and device.device,
            peer=str(logs.address(peer)),
            content_format=msg.content_format, payload=msg.payload,
        )
        return refusal(error)

    # -- the three messages ------------------------------------------------------------------------
    def post_measurements(self, req: Request, session_device: SessionDevice) -> Response | None:
        got = self._read(req, "measurements", session_device)
        if isinstance(got, Response):
            return got
        decode, parsed, device = got
        received_at = self.ingest.clock_ms()
        try:
            result = decode.measurements(parsed, received_at)
        except PayloadError as e:
            return self._refuse(req, "measurements", device, e)
        target = self.ingest.target(device)  # (read from the directory just now)
        self.messages["measurements", "accepted"] += 1
        self.skipped.update(result.skipped)
        if not result.points:  # (never: the device's status is a point of its own)
            return Response(Code.CREATED)
        return self.ingest.ingest_points(req, target, PROTOCOL, result.points, received_at, profile=PROFILE,
                                         then=_created)

    def post_attributes(self, req: Request, session_device: SessionDevice, kind: str) -> Response:
        """Device info or configuration (`kind`): decode.py's function of that name reads it."""
        got = self._read(req, kind, session_device)
        if isinstance(got, Response):
            return got
        decode, parsed, device = got
        return self._attributes(req, kind, device, getattr(decode, kind)(parsed))

    def _attributes(self, req: Request, kind: str, device: Device, values: dict[str, Any]) -> Response:
        """Stored as the device's client attributes, then copied to `attributes.{tenant}`: 2.01."""
        if self.ingest.on_uplink is not None:  # (a sleeping device that talks is awake)
            self.ingest.on_uplink(device)
        try:
            stored = self.management.set_attributes(device.tenant, device.device, "client", values)
        except BadInput as e:  # a value past the registry's bounds
            return self._refuse(req, kind, device, PayloadError(str(e)))
        self.messages[kind, "accepted"] += 1
        publish_json(self.ingest.sink, attributes_topic(device.tenant), device.device,
                     {"tenant": device.tenant, "device": device.device, "scope": "client", "values": stored})
        return Response(Code.CREATED)


def _created(req: Request) -> None:
    """Efento's sensors are answered 2.01 Created once their points are durable."""
    req.respond(Code.CREATED)
