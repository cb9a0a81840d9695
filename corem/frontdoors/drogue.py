"""Drogue Cloud's CoAP endpoint (spec 001): `POST /v1/{channel}` with commands on the response.

    POST /v1/{channel}?application=&device=&data_schema=&as=&ct=

Authentication (decided in corem/identity.py): the DTLS session (PSK or certificate), or option
4209 carrying `Basic base64(device@application:password)` (or `device:password` with
`?application=`).  The password is the device's access token: corem keeps one secret per device,
whatever the door.  `as` lets a gateway publish for another device of the same application
(tenant) that names it in its `gateways` (registry; Drogue's gateway selector); the point is the
other device's, with a `via` header naming the gateway.  Any other `as` is 4.03.  The payload is decoded with the device's
profile like any reading; the channel and data schema travel as record headers.

With `ct` (seconds, at most 300) the answer waits: a command sent to the device meanwhile comes
back as 2.05 with its name in option 4210 and its body as payload; otherwise 2.04 after `ct`.
Errors are answered with the reason in the payload.

The fast lane (corem/fastlane) takes the common request itself -- no `ct`, no `as`, credentials in
4209 or the session -- once this door has served its channel on the lane's endpoint
(`drogue_served`), and writes the same record; anything else still comes here.
"""

from __future__ import annotations

from typing import Callable

from ..coap.endpoint import Request
from ..coap.resources import Response, Router
from ..codec import Code, OptionNumber
from ..devices.downlink import Downlink
from ..fastlane import drogue_served
from ..identity import Door, Refusal, SessionDevice
from ..ingest.telemetry import TelemetryIngest
from ..registry import Directory
from .common import bad_request, query

MAX_CT = 300.0


class Drogue:
    def __init__(self, directory: Directory, ingest: TelemetryIngest, downlink: Downlink, clock: Callable[[], float]) -> None:
        self.directory = directory
        self.ingest = ingest
        self.downlink = downlink
        self.clock = clock

    def install(self, router: Router, session_device: SessionDevice | None = None) -> None:
        def publish(req: Request, params: list[str]) -> Response | None:
            return self.publish(req, params[0], session_device)

        router.add("v1/{channel}", {Code.POST: publish, Code.PUT: publish},
                   link={"rt": "drogue.publish", "if": "core.p"}, identified=True)

    def publish(self, req: Request, channel: str, session_device: SessionDevice | None) -> Response | None:
        lanes = self.ingest.lanes
        if lanes:  # the router sends /v1/{channel} here: the endpoint's fast lane may take it too
            drogue_served(lanes, req.endpoint, channel)
        q = query(req)
        identity = self.ingest.identity
        device = identity.identify(req, Door.DROGUE, session=session_device, query=q)
        if isinstance(device, Refusal):
            return device.response()
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
            other = identity.gateway(device, q["as"])
            if isinstance(other, Refusal):
                return other.response()
            target_device = other
        target = self.ingest.target(target_device)  # (both read from the directory just now)
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
