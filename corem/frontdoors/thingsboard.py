"""ThingsBoard's CoAP device API (spec 002), on corem's registry, downlink and bus.

    POST /api/v1/{token}/telemetry          readings (the ingest pipeline)
    POST /api/v1/{token}/attributes         client attributes            -> 2.04
    GET  /api/v1/{token}/attributes?clientKeys=a,b&sharedKeys=c          -> 2.05 {"client":{}, "shared":{}}
    GET  /api/v1/{token}/attributes + Observe 0: shared attributes now, then each change
    GET  /api/v1/{token}/rpc + Observe 0: RPC requests {"id", "method", "params"} as notifications
    GET  /api/v1/{token}/rpc                the oldest queued RPC request (polling devices)
    POST /api/v1/{token}/rpc/{id}           the device's answer to RPC {id} -> 2.04
    POST /api/v1/{token}/claim              {"secretKey", "durationMs"}: open a claim -> 2.04
    POST /api/v1/provision                  {"deviceName", "provisionDeviceKey", "provisionDeviceSecret"}
    GET  /api/v1/{token}/firmware|software  the assigned package, block-wise (Block2, ETag, Size2)

Over CoAPS the same paths work without the token (`/api/v1/attributes`, ...): the DTLS session
names the device.  Client attributes are also published to `attributes.{tenant}`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Iterator

from ..bus import topics
from ..bus.base import publish_json
from ..coap.conditional import conditional, etag_of, evaluate, with_etag
from ..coap.endpoint import Request
from ..coap.observe import Observers, answer_observe
from ..coap.peers import source_host
from ..coap.resources import Response, Router
from ..coap.response import RETRY_AFTER
from ..codec import Code, OptionNumber, encode_uint
from ..devices.downlink import Downlink, attributes_resource, rpc_resource
from ..identity import Door, Refusal, SessionDevice
from ..ingest.telemetry import TelemetryIngest
from ..logs import fields
from ..errors import BadInput, Unauthorized
from ..registry import Device, Directory, credentials
from ..registry.management import Management, Package
from ..net.limits import SourceLimiter
from ..stats import Sample, counter
from ..token_path import api_route, token_route
from .common import OCTETS, BodyError, bad_request, body, content, query

log = logging.getLogger("corem.thingsboard")

Handler = Callable[[Request, Device, list[str], Observers], "Response | None"]

#: OTA packages kept in memory for block-wise download (each block is a slice of the whole): at
#: most this many, and this many bytes together (the package read last is kept whatever its size,
#: so one large package being downloaded is read from the registry once, not once a block)
PACKAGE_CACHE = 8
PACKAGE_CACHE_BYTES = 128 * 1024 * 1024


def _buckets(rate: float) -> SourceLimiter | None:
    """A provisioning rate's token buckets by name (a source host, a key): ten seconds' worth at
    once (one at least: a rate under 0.1/s still lets one through), 10,000 names at most (the
    one first seen longest ago forgotten); None for a rate of 0 (no bound)."""
    return SourceLimiter(rate, burst=max(1.0, 10 * rate), max_sources=10_000) if rate > 0 else None


class PackageCache:
    """A package's bytes and its ETag, made once per package (found by id, and the sha256 stored
    with it: a package is never changed in place, but a registry replaced under a running server
    must not serve the old bytes). Found by a review: each Block2 request read
    the whole package from SQLite when it was not kept, and hashed all of it (BLAKE2b, `etag_of`)
    to tag one block: 16 MiB cost ~19 ms of the event loop a block, whatever the block's size. Now
    a block costs its slice; the ETag is the stored sha256's first 8 bytes (made at upload)."""

    def __init__(self, max_entries: int = PACKAGE_CACHE, max_bytes: int = PACKAGE_CACHE_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = 0
        self.reads = 0  # packages read from the registry (each a whole BLOB)
        self._kept: OrderedDict[tuple[int, str], tuple[bytes, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, package: Package, read: Callable[[int], "bytes | None"]) -> tuple[bytes, bytes]:
        """(the package's bytes, its ETag), read with `read(id)` only if not kept."""
        key = (package.id, package.sha256)
        found = self._kept.get(key)
        if found is not None:
            self._kept.move_to_end(key)
            return found
        self.reads += 1
        data = read(package.id) or b""
        found = (data, bytes.fromhex(package.sha256)[:8])
        self._kept[key] = found
        self.size += len(data)
        while len(self._kept) > 1 and (len(self._kept) > self.max_entries or self.size > self.max_bytes):
            _, (old, _etag) = self._kept.popitem(last=False)
            self.size -= len(old)
        return found


NO_SUCH_RPC = b"id: no RPC request with this id is waiting for this device"


def attributes_topic(tenant: str) -> str:
    return topics.attributes(tenant)


class ThingsBoard:
    def __init__(
        self,
        directory: Directory,
        ingest: TelemetryIngest,
        management: Management,
        downlink: Downlink,
        clock: Callable[[], float],
        *,
        provision_rate_per_source: float = 1.0,
        provision_rate_per_key: float = 10.0,
    ) -> None:
        self.directory = directory
        # Found by an adversarial run: one source registered 300 devices in 0.4 s with
        # one key (each a registry write and a directory refresh on the event loop). A source, then
        # a key (once its secret is checked: a wrong key makes no bucket), may register this many
        # devices a second, ten seconds' worth at once; beyond, 5.03 with Max-Age: a fleet behind
        # one address gets its devices registered, a few a second, as they retry
        # (ten seconds' worth at once; none for a rate of 0)
        self._provision_sources = _buckets(provision_rate_per_source)
        self._provision_keys = _buckets(provision_rate_per_key)
        self.ingest = ingest
        self.management = management
        self.downlink = downlink
        self.clock = clock
        self.packages = PackageCache()
        #: with --workers: is an RPC id another worker's (downlink.number_ids), and how to ask it
        #: whether a reply to it is taken (workers/link.py ask_reply); None in a single process
        self.ask_owner: Callable[[Device, int, Any, Callable[[bool], None]], None] | None = None
        self.provisioned = 0
        self.provision_refused = 0

    def metrics(self) -> Iterator[Sample]:
        yield counter("corem_provisioning", self.provisioned, result="success")
        yield counter("corem_provisioning", self.provision_refused, result="refused")
        yield counter("corem_ota_package_reads", self.packages.reads)

    def install(self, router: Router, observers: Observers, session_device: SessionDevice | None = None) -> None:
        doors: dict[str, dict[int, Handler]] = {
            "attributes": {Code.GET: self.get_attributes, Code.POST: self.post_attributes},
            "rpc": {Code.GET: self.get_rpc},
            "rpc/{id}": {Code.POST: self.post_rpc_reply},
            "claim": {Code.POST: self.post_claim},
            "firmware": {Code.GET: self.get_package("firmware")},
            "software": {Code.GET: self.get_package("software")},
        }
        for suffix, handlers in doors.items():
            by_token = {code: self._with_token(h, observers) for code, h in handlers.items()}
            # the packages have ETags: their handlers evaluate If-Match / If-None-Match (get_package)
            owned = suffix in ("firmware", "software")
            router.add(token_route(suffix), by_token, conditional=owned, identified=True)
            if session_device is not None:
                in_session = {code: self._in_session(h, observers, session_device) for code, h in handlers.items()}
                router.add(api_route(suffix), in_session, conditional=owned, identified=True)
        router.add(api_route("provision"), {Code.POST: self.provision}, link={"rt": "tb.provision", "if": "core.p", "ct": "50 60"})

    # -- device resolution (corem/identity.py decides, and counts the refusals) -------------------
    def _with_token(self, handler: Handler, observers: Observers):
        identify = self.ingest.identity.identify

        def call(req: Request, params: list[str]) -> Response | None:
            device = identify(req, Door.THINGSBOARD, token=params[0])
            if isinstance(device, Refusal):
                return device.response()
            self.downlink.uplink(device)
            return handler(req, device, params[1:], observers)

        return call

    def _in_session(self, handler: Handler, observers: Observers, session_device: SessionDevice):
        identify = self.ingest.identity.identify

        def call(req: Request, params: list[str]) -> Response | None:
            device = identify(req, Door.THINGSBOARD, session=session_device)
            if isinstance(device, Refusal):
                return device.response()
            self.downlink.uplink(device)
            return handler(req, device, params, observers)

        return call

    # -- attributes ------------------------------------------------------------------------------
    def get_attributes(self, req: Request, device: Device, params: list[str], observers: Observers) -> Response:
        m = self.management
        if req.message is not None and req.message.observe is not None:  # subscription: shared attributes
            state = m.attributes(device.tenant, device.device, "shared")
            return self._observe(req, device, attributes_resource(device), content(state, req), observers)
        q = query(req)
        asked: dict[str, list[str] | None] = {scope: [k for k in q[param].split(",") if k]
                 for scope, param in (("client", "clientKeys"), ("shared", "sharedKeys")) if param in q}
        scopes = asked or {"client": None, "shared": None}  # neither asked: everything
        return content({scope: m.attributes(device.tenant, device.device, scope, keys)
                        for scope, keys in scopes.items()}, req)

    def _observe(self, req: Request, device: Device, resource: str, response: Response,
                 observers: Observers) -> Response:
        # (`replace`: a device observes its RPCs and attributes once -- from a new NAT port, the old
        # observation ends when the new one is accepted; found in review: both stayed, and an RPC
        # counted delivered through the old one never reached the device's current address)
        answer = answer_observe(observers, req, resource, response, self.clock(), (device.tenant, device.device),
                                (credentials, credentials(device)), replace=True)  # (rotated, removed: it ends)
        if req.message is not None and req.message.observe == 0:  # a (re-)registration, not a goodbye
            self.downlink.observed(device, resource)
        return answer

    def post_attributes(self, req: Request, device: Device, params: list[str], observers: Observers) -> Response:
        try:
            values = body(req, "attributes")
            if not isinstance(values, dict):
                raise BodyError("attributes: expected an object of key -> value")
            stored = self.management.set_attributes(device.tenant, device.device, "client", values)
        except BadInput as e:  # (the body's, or a value past the registry's bounds)
            return bad_request(str(e))
        # stored before the answer; the bus copy is for consumers that follow attribute changes
        publish_json(self.ingest.sink, attributes_topic(device.tenant), device.device,
                     {"tenant": device.tenant, "device": device.device, "scope": "client", "values": stored})
        return Response(Code.CHANGED)

    # -- RPC -------------------------------------------------------------------------------------
    def get_rpc(self, req: Request, device: Device, params: list[str], observers: Observers) -> Response:
        if req.message is not None and req.message.observe is not None:
            return self._observe(req, device, rpc_resource(device), Response(Code.CONTENT), observers)
        call = self.downlink.poll_rpc(device)
        if call is None:
            return Response(Code.CONTENT)
        return content({"id": call.id, "method": call.method, "params": call.params}, req)

    def post_rpc_reply(self, req: Request, device: Device, params: list[str], observers: Observers) -> Response | None:
        if not params[0].isdigit():
            return bad_request(f"id: {params[0]!r} is not an RPC request id")
        try:
            reply = body(req, "response")
        except BodyError as e:
            return bad_request(str(e))
        rpc_id = int(params[0])
        if self.ask_owner is not None and not self.downlink.numbered_here(rpc_id):
            # another worker's RPC (the device talks to us from another address now): answered once
            # that worker says whether it waited for this device -- 2.04 or 4.04, as one process
            def told(taken: bool) -> None:
                if req.answered:  # (shutdown may have given up on it)
                    return
                if taken:
                    req.respond(Code.CHANGED)
                else:
                    req.respond(Code.NOT_FOUND, None, NO_SUCH_RPC)
            self.ask_owner(device, rpc_id, reply, told)
            return None
        if not self.downlink.reply(device, rpc_id, reply):
            return Response(Code.NOT_FOUND, NO_SUCH_RPC)
        return Response(Code.CHANGED)

    # -- claiming and provisioning ---------------------------------------------------------------
    def post_claim(self, req: Request, device: Device, params: list[str], observers: Observers) -> Response:
        try:
            claim = body(req, "claim") or {}
            if not isinstance(claim, dict):
                raise BodyError("claim: expected an object with secretKey and durationMs")
            self.management.open_claim(device.tenant, device.device, claim.get("secretKey"),
                                       claim.get("durationMs", 60_000))
        except BadInput as e:
            return bad_request(str(e))
        return Response(Code.CHANGED)

    def provision(self, req: Request, params: list[str]) -> Response:
        try:
            ask = body(req, "provision")
            if not isinstance(ask, dict):
                raise BodyError("provision: expected an object with provisionDeviceKey and provisionDeviceSecret")
            key, secret = ask.get("provisionDeviceKey"), ask.get("provisionDeviceSecret")
            if not isinstance(key, str) or not isinstance(secret, str):
                raise BodyError("provisionDeviceKey/provisionDeviceSecret: both are required strings")
            name = ask.get("deviceName")
            if name is not None and not isinstance(name, str):
                raise BodyError("deviceName: must be a string")
            now = self.clock()
            sources, keys = self._provision_sources, self._provision_keys
            if sources is not None and not sources.allow(str(source_host(req.peer)), now):
                return self._provision_busy(req, "over the source's rate")
            self.management.provision_key(key, secret)  # (Unauthorized before a bucket of its own)
            if keys is not None and not keys.allow(key, now):
                return self._provision_busy(req, "over the key's rate")
            tenant, device, token = self.management.provision(key, secret, name)
        except BadInput as e:  # (a device that exists already too: 4.00 FAILURE, as ThingsBoard answers)
            self.provision_refused += 1
            return content({"status": "FAILURE", "errorMsg": str(e)}, req, Code.BAD_REQUEST)
        except Unauthorized as e:
            self.provision_refused += 1
            return content({"status": "FAILURE", "errorMsg": str(e)}, req, Code.UNAUTHORIZED)
        self.directory.refresh(force=True)  # the new token works at once
        self.provisioned += 1
        log.info("device %s/%s provisioned with key %s", tenant, device, key,
                 extra=fields(tenant=tenant, device=device, provisioning_key=key))
        return content({"status": "SUCCESS", "deviceName": device, "credentialsType": "ACCESS_TOKEN",
                        "credentialsValue": token}, req, Code.CREATED)

    def _provision_busy(self, req: Request, reason: str) -> Response:
        """Over a provisioning rate: 5.03 with Max-Age (RFC 7252 §5.9.3.4: try again after it),
        ThingsBoard's FAILURE body, short (on plain UDP an error answer is no larger than its
        request: a longer one would be cut into JSON that does not parse); counted as refused."""
        self.provision_refused += 1
        busy = content({"status": "FAILURE", "errorMsg": reason}, req, Code.SERVICE_UNAVAILABLE)
        return Response(busy.code, busy.payload, sorted([*(busy.options or []), (OptionNumber.MAX_AGE, encode_uint(
            RETRY_AFTER))], key=lambda o: o[0]))

    # -- OTA -------------------------------------------------------------------------------------
    def get_package(self, kind: str) -> Handler:
        def get(req: Request, device: Device, params: list[str], observers: Observers) -> Response:
            package = self.management.assigned(device.tenant, device.device, kind)
            if package is None:
                return Response(Code.NOT_FOUND, f"{kind}: none assigned to this device".encode())
            q = query(req)
            if q.get("title", package.title) != package.title or q.get("version", package.version) != package.version:
                return Response(Code.NOT_FOUND, f"{kind}: the assigned package is {package.title} {package.version}".encode())
            data, etag = self.packages.get(package, self.management.package_data)
            # the ETag given here is the one every block carries and If-Match compares (etag_of
            # takes a handler's own and hashes nothing)
            return Response(Code.CONTENT, data, [(OptionNumber.ETAG, etag),
                                                 (OptionNumber.CONTENT_FORMAT, encode_uint(OCTETS))])

        def tagged(req: Request, device: Device, params: list[str], observers: Observers) -> Response:
            """The package with its ETag (every block carries it), judged by If-Match / If-None-Match
            (RFC 7252 §5.10.8) once rendered: reading a package changes nothing."""
            response = get(req, device, params, observers)
            etag = etag_of(response) if response.code == Code.CONTENT else None
            if etag is not None:
                response = with_etag(response, etag)
            if req.message is not None and conditional(req.message):
                refused = evaluate(req.message, etag is not None, etag)
                if refused is not None:
                    return refused
            return response

        return tagged

