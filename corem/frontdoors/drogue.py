"""Drogue Cloud's CoAP endpoint (spec 001): `POST /v1/{channel}` with commands on the response.

    POST /v1/{channel}?application=&device=&data_schema=&as=&ct=

Authentication: the DTLS session (PSK or certificate), or option 4209 carrying
`Basic base64(device@application:password)` (or `device:password` with `?application=`).  The
password is the device's access token: corem keeps one secret per device, whatever the door.
`as` lets a gateway publish for another device of the same application (tenant) that names it in
its `gateways` (registry; Drogue's gateway selector); the point is the other device's, with a `via`
header naming the gateway.  Any other `as` is 4.03.  The payload is decoded with the device's
profile like any reading; the channel and data schema travel as record headers.

With `ct` (seconds, at most 300) the answer waits: a command sent to the device meanwhile comes
back as 2.05 with its name in option 4210 and its body as payload; otherwise 2.04 after `ct`.
Errors are answered with the reason in the payload.
"""

from __future__ import annotations

import base64
import secrets
from typing import Callable

from ..coap.endpoint import Request
from ..coap.resources import Response, Router
from ..codec import Code, OptionNumber
from ..devices.downlink import Downlink
from ..ingest.telemetry import TelemetryIngest
from ..registry import Device, Directory
from .common import bad_request, query, session_owner, unauthorized

MAX_CT = 300.0


class Drogue:
    def __init__(self, directory: Directory, ingest: TelemetryIngest, downlink: Downlink, clock: Callable[[], float]) -> None:
        self.directory = directory
        self.ingest = ingest
        self.downlink = downlink
        self.clock = clock

    def install(self, router: Router, session_device: Callable[[Request], Device | None] | None = None) -> None:
        def publish(req: Request, params: list[str]) -> Response | None:
            return self.publish(req, params[0], session_device)

        router.add("v1/{channel}", {Code.POST: publish, Code.PUT: publish},
                   link={"rt": "drogue.publish", "if": "core.p"})

    def authenticate(self, req: Request, q: dict[str, str], session_device) -> Device | Response:
        msg = req.message
        assert msg is not None
        auth = msg.opt(OptionNumber.DROGUE_AUTH)
        if auth is None:
            device = session_owner(self.directory, session_device, req)
            if device is None:
                return unauthorized("credentials: send option 4209 (Basic device@application:password) or use DTLS")
            return device
        try:
            text = bytes(auth).decode()
            scheme, _, encoded = text.partition(" ")
            if scheme.lower() != "basic" or not encoded:
                encoded = text  # the bare base64 form
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (UnicodeError, ValueError):  # binascii.Error is a ValueError; non-ASCII text fails before it
            return unauthorized("option 4209: not 'Basic ' followed by base64 of user:password")
        if not sep:
            return unauthorized("option 4209: no ':' between user and password")
        name, at, application = user.rpartition("@")
        if not at:
            name, application = user, q.get("application", "")
        device = self.directory.named(application, name)
        if device is None or device.token is None or not secrets.compare_digest(device.token.encode(), password.encode()):
            self.ingest.stats.auth_failures["coap", "bad_password"] += 1
            return unauthorized("option 4209: unknown device or wrong password")
        return device

    def publish(self, req: Request, channel: str, session_device) -> Response | None:
        q = query(req)
        device = self.authenticate(req, q, session_device)
        if isinstance(device, Response):
            return device
        for key, want in (("application", device.tenant), ("device", device.device)):
            if key in q and q[key] != want and not (key == "device" and "as" in q):
                return unauthorized(f"{key}: {q[key]!r} is not the authenticated {key} ({want!r})")
        ct = None
        if "ct" in q:
            try:
                ct = float(q["ct"])
            except ValueError:
                ct = -1.0
            if not 0 <= ct <= MAX_CT:
                return bad_request(f"ct: {q['ct']!r} is not a number of seconds between 0 and {MAX_CT:g}")
        target_device = device
        if "as" in q:
            other = self.directory.named(device.tenant, q["as"])
            if other is None or device.device not in other.gateways.split():
                self.ingest.stats.auth_failures["coap", "not_a_gateway"] += 1
                return Response(Code.FORBIDDEN, f"as: {device.device!r} is not a gateway of {q['as']!r}".encode())
            target_device = other
        target = self.ingest.by_name(target_device.tenant, target_device.device)
        if target is None:  # removed since the directory was read
            return unauthorized("device: no longer registered")
        headers = {**target.headers, "channel": channel}
        if "data_schema" in q:
            headers["data_schema"] = q["data_schema"]
        if target_device is not device:
            headers["via"] = device.device
        target = target._replace(headers=headers)
        if not ct:
            return self.ingest.ingest(req, target, "coap")
        return self.ingest.ingest(req, target, "coap",
                                  then=lambda r: self.downlink.wait_for_command(r, target_device, ct, self.clock()))
