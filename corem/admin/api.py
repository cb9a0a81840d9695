"""The admin REST API (JSON, OpenAPI 3.1 at /api/openapi.json) and the diagnostics UI's data.

Every /api route except the OpenAPI document needs `Authorization: Bearer <admin token>`.  Bad
input is answered 400 with the offending field named; a missing or wrong token 401.  A handler
raises the refusals of corem/errors.py (BadInput, Conflict, NotFound, QueueFull, ...) and the HTTP
server answers each by its kind's status: no status is chosen from an error's text here.  The CLI's
`devices` commands call the same registry operations; its runtime commands (`rpc`, `command`,
`attributes`, `firmware`) call this API.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import msgspec

from .. import __version__
from ..content_format import CBOR
from ..devices.commands import assign_package
from ..devices.requests import CommandRequest, PackageAssignment, RpcRequest
from ..dtls import pem_sha256
from ..errors import BadInput, Conflict, NotFound
from ..inputs import check, schema
from ..ingest.diagnostics import cbor_diagnostic
from ..logs import fields
from ..metrics import gather, total
from ..profiles.compile import compile_profile
from ..profiles.spec import DEFAULT as DEFAULT_PROFILE
from ..profiles.spec import FORMATS as PROFILE_FORMATS
from ..profiles.spec import NAME_RE as PROFILE_NAME_RE
from ..profiles.spec import Profile, ProfileError, profile_from
from ..profiles.trial import SampleError, decode_sample, sample_bytes
from ..registry import Device, bulk
from ..registry.inputs import OSCORE_FIELDS, ClaimRequest, DeviceNew, ProvisioningKeyNew
from ..registry.management import KINDS, LABEL_RE
from ..registry.store import DEVICE_RE, TENANT_RE
from . import schemas
from .http import REASONS, HttpRequest, Reply, Route, json_reply

log = logging.getLogger("corem.admin")

if TYPE_CHECKING:
    from ..bus.base import Sink
    from ..devices.downlink import Downlink
    from ..dtls import DtlsServer
    from ..ingest.diagnostics import Diagnostics
    from .history import History
    from ..ingest.presence import Presence
    from ..ingest.telemetry import TelemetryIngest
    from ..metrics import Components
    from ..registry import Directory, Registry
    from ..registry.management import Management

#: Largest RPC wait an API caller may ask for, seconds.
MAX_RPC_TIMEOUT = 300.0
#: Devices listed in /api/status at most (most recently seen first): the UI stays light.
STATUS_DEVICES = 500

STR = {"type": "string"}


def _like(pattern: re.Pattern, **extra: Any) -> dict[str, Any]:
    """A string schema with the registry's own rule (corem.registry), so clients can check first."""
    return {"type": "string", "pattern": f"^{pattern.pattern}$", **extra}


NAMES = {"tenant": _like(TENANT_RE), "device": _like(DEVICE_RE), "name": _like(PROFILE_NAME_RE)}
QUERY = {"limit": {"type": "integer", "minimum": 1}, "format": {"type": "string", "enum": ["csv", "jsonl"]},
         "replace": {"type": "string", "enum": ["true", "false"]}, "kind": {"type": "string", "enum": list(KINDS)},
         "title": _like(LABEL_RE), "version": _like(LABEL_RE)}
#: each JSON request body, by the name the OpenAPI document gives it: its Struct is the one
#: definition the handler checks it with (`corem.inputs.check`) and the document shows
#: (components/schemas/{name}), the CLI's flags and defaults and the import's columns come from
BODY_TYPES: dict[str, type[msgspec.Struct]] = {
    "DeviceNew": DeviceNew, "RpcRequest": RpcRequest, "CommandRequest": CommandRequest,
    "PackageAssignment": PackageAssignment, "ProvisioningKeyNew": ProvisioningKeyNew, "ClaimRequest": ClaimRequest,
    "SampleRequest": schemas.SampleRequest,
}
#: each body's fields (name -> JSON Schema) and the required ones, as the document says them
BODIES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {name: schema(t) for name, t in BODY_TYPES.items()}


def struct_reply(value: Any, status: int = 200) -> Reply:
    """A JSON answer from the Structs of corem/admin/schemas.py (what the document says it is)."""
    return Reply(status, schemas.encode(value))


def samples_limit(query: dict[str, str]) -> int:
    """`?limit=` of the samples routes (one process's and the workers' front's): 1 or more, 200
    without it; BadInput naming it otherwise (0 and negative numbers were taken, and each mode did
    something else with them)."""
    try:
        limit = int(query.get("limit", "200"))
    except ValueError:
        raise BadInput("limit: not an integer") from None
    if limit < 1:
        raise BadInput(f"limit: {limit}; at least 1")
    return limit


@dataclass(frozen=True)
class AdminParts:
    """What the admin API works with: the registry, the devices' state, and what it reports on."""

    registry: Registry
    directory: Directory
    management: Management
    downlink: Downlink
    presence: Presence
    diagnostics: Diagnostics
    ingest: TelemetryIngest
    sink: Sink
    #: the CoAPS listeners' DTLS layers (sessions for the status page)
    dtls: Sequence[DtlsServer]
    #: every component's counters (corem/metrics.py), for the status page's totals
    components: Components
    #: reload the registry after a write (off the event loop: a large fleet costs no pause)
    reload: Callable[[], Awaitable[None]]
    #: the charts' ring (corem/admin/history.py); with workers the supervisor's front keeps it
    history: History | None = None


class AdminApi:
    def __init__(self, parts: AdminParts) -> None:
        self.parts = parts
        #: the server's own routes the document lists beside the API's (/metrics, /healthz, /readyz)
        self.documented: list[Route] = []
        self.started = time.time()

    # -- helpers ---------------------------------------------------------------------------------
    def _device(self, req: HttpRequest) -> Device:
        device = self.parts.directory.named(req.params["tenant"], req.params["device"])
        if device is None:
            raise NotFound(f"device: {req.params['tenant']}/{req.params['device']} is not registered")
        return device

    def _describe(self, d: Device, seen: dict[tuple[str, str], int] | None = None,
                  detail: bool = True) -> schemas.DeviceView:
        """A device as the API shows it (never its secrets: corem/admin/schemas.py); `detail` adds
        what costs a query (the owner)."""
        s = self.parts
        key = (d.tenant, d.device)
        if seen is None:
            seen = s.presence.last_seen()
        return schemas.DeviceView(
            **schemas.DeviceRecord.fields_of(d), online=key in seen, last_seen=seen.get(key),
            points=s.ingest.stats.device_points.get(key, 0), rejections=s.ingest.stats.device_rejections.get(key, 0),
            queued=schemas.Queued(**s.downlink.queued(d)),
            owner=s.management.owner(*key) if detail else msgspec.UNSET)

    # -- devices ---------------------------------------------------------------------------------
    def list_devices(self, req: HttpRequest) -> Reply:
        devices = self.parts.registry.list_devices(req.query.get("tenant"))
        seen = self.parts.presence.last_seen()  # once, not per device
        return struct_reply([self._describe(d, seen, detail=False) for d in devices])

    async def add_device(self, req: HttpRequest) -> Reply:
        ask = check(DeviceNew, req.json())
        cert = None
        if ask.cert_pem:
            try:
                cert = pem_sha256(ask.cert_pem)
            except ValueError as e:
                raise BadInput(f"cert_pem: {e}") from None
        token = schemas.generated_token(ask, cert)
        # (a device or a credential that exists is a Conflict: 409; any other refusal 400)
        d = self.parts.registry.add_device(ask.tenant, ask.device, **ask.settings(cert_sha256=cert, token=token))
        await self.parts.reload()
        log.info("device %s/%s added through the admin API", d.tenant, d.device,
                 extra=fields(tenant=d.tenant, device=d.device))
        return struct_reply(schemas.DeviceCreated(**msgspec.structs.asdict(self._describe(d)), token=token), 201)

    def get_device(self, req: HttpRequest) -> Reply:
        return struct_reply(self._describe(self._device(req)))

    async def remove_device(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        self.parts.management.remove(d.tenant, d.device)
        await self.parts.reload()
        log.info("device %s/%s removed through the admin API", d.tenant, d.device,
                 extra=fields(tenant=d.tenant, device=d.device))
        return Reply(204)

    # -- attributes ------------------------------------------------------------------------------
    def get_attributes(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        m = self.parts.management
        return json_reply({"client": m.attributes(d.tenant, d.device, "client"),
                           "shared": m.attributes(d.tenant, d.device, "shared")})

    def set_shared(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        return json_reply({"delivery": self.parts.downlink.set_shared(d, req.json())})

    # -- RPC and commands ------------------------------------------------------------------------
    async def rpc(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        ask = check(RpcRequest, req.json())
        if ask.timeout > MAX_RPC_TIMEOUT:  # this call holds a connection
            raise BadInput(f"timeout: at most {MAX_RPC_TIMEOUT:g} seconds through the API")
        call = await self.parts.downlink.rpc(d, ask.method, ask.params, ask.timeout, ask.oneway)  # (QueueFull: 429)
        result = {"id": call.id, "status": call.status}
        if call.status == "replied":
            result["response"] = call.response
        return json_reply(result, 504 if call.status == "expired" else 200)

    def command(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        ask = check(CommandRequest, req.json())
        delivery = self.parts.downlink.command(d, ask.command, ask.payload_bytes(), ask.ttl)  # (QueueFull: 429)
        return json_reply({"delivery": delivery}, 202)

    # -- OTA -------------------------------------------------------------------------------------
    def upload_package(self, req: HttpRequest) -> Reply:
        q = req.query
        for key in ("kind", "title", "version"):
            if not q.get(key):
                raise BadInput(f"{key}: required query parameter")
        p = self.parts.management.add_package(q["kind"], q["title"], q["version"], req.body)  # (a Conflict: 409)
        log.info("%s package %s %s uploaded: %d bytes, sha256 %s", p.kind, p.title, p.version, p.size, p.sha256,
                 extra=fields(kind=p.kind, title=p.title, version=p.version, size=p.size, sha256=p.sha256))
        return json_reply(p._asdict(), 201)

    def list_packages(self, req: HttpRequest) -> Reply:
        return json_reply([p._asdict() for p in self.parts.management.packages()])

    def assign(self, kind: str):
        def handler(req: HttpRequest) -> Reply:
            d = self._device(req)
            ask = check(PackageAssignment, req.json())
            p, delivery = assign_package(self.parts.management, self.parts.downlink, d, kind, ask.package)
            log.info("%s %s %s assigned to %s/%s (%s)", kind, p.title, p.version, d.tenant, d.device, delivery,
                     extra=fields(kind=kind, title=p.title, version=p.version, tenant=d.tenant, device=d.device,
                                  delivery=delivery))
            return json_reply({**p._asdict(), "delivery": delivery})

        return handler

    # -- provisioning and claiming ---------------------------------------------------------------
    def add_provision_key(self, req: HttpRequest) -> Reply:
        ask = check(ProvisioningKeyNew, req.json())
        self.parts.management.add_provision_key(ask.key, ask.secret, ask.tenant, ask.profile or "default",
                                                ask.max_devices)
        return json_reply({"key": ask.key, "tenant": ask.tenant, "max_devices": ask.max_devices}, 201)

    def claim(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        ask = check(ClaimRequest, req.json())
        self.parts.management.claim(d.tenant, d.device, ask.secret_key, ask.owner)  # (ClaimRefused: 400)
        log.info("device %s/%s claimed by %s", d.tenant, d.device, ask.owner,
                 extra=fields(tenant=d.tenant, device=d.device, owner=ask.owner))
        return json_reply({"tenant": d.tenant, "device": d.device, "owner": ask.owner})

    # -- diagnostics -----------------------------------------------------------------------------
    def history(self, req: HttpRequest) -> Reply:
        from .history import Totals

        h = self.parts.history
        if h is None:
            raise NotFound("history: kept by the supervisor's front (--workers)")
        return json_reply(h.snapshot({"": Totals.of(gather(self.parts.components()))}))

    def samples(self, req: HttpRequest) -> Reply:
        q = req.query
        limit = samples_limit(q)
        out = []
        for s in self.parts.diagnostics.newest(len(self.parts.diagnostics.samples)):
            if any(q.get(k) and getattr(s, k) != q[k] for k in ("tenant", "device", "protocol", "reason")):
                continue
            out.append({
                "at": s.at, "protocol": s.protocol, "reason": s.reason, "detail": s.detail, "field": s.field,
                "tenant": s.tenant, "device": s.device, "peer": s.peer, "content_format": s.content_format,
                "payload_hex": s.payload.hex(),
                "payload_diagnostic": cbor_diagnostic(s.payload) if s.content_format in (None, CBOR)
                else s.payload.decode("utf-8", "replace"),
            })
            if len(out) >= limit:
                break
        return json_reply(out)

    def status(self, req: HttpRequest) -> Reply:
        s = self.parts
        ing = s.ingest.stats
        seen = s.presence.last_seen()
        keys = set(ing.device_points) | set(ing.device_rejections) | set(seen)
        recent = sorted(keys, key=lambda k: seen.get(k, 0), reverse=True)[:STATUS_DEVICES]
        devices = []
        for tenant, device in recent:
            d = s.directory.named(tenant, device)
            devices.append({
                "tenant": tenant, "device": device, "online": (tenant, device) in seen,
                "last_seen": seen.get((tenant, device)), "points": ing.device_points.get((tenant, device), 0),
                "rejections": ing.device_rejections.get((tenant, device), 0),
                "power_mode": d.power_mode if d else None,
            })
        dtls = [{
            "live": len(d.sessions), "offloaded": len(d.offloaded), "handshaking": len(d.handshakes),
            "completed": d.stats.handshakes_completed, "failed": dict(d.stats.handshakes_failed),
        } for d in s.dtls]
        totals = gather(s.components())
        return json_reply({
            "now": int(time.time() * 1000), "uptime": time.time() - self.started,
            "points": sum(ing.accepted.values()), "rejections": sum(ing.rejections.values()),
            "auth_failures": sum(ing.auth_failures.values()), "bus_refusals": ing.bus_refusals,
            "requests": total(totals, "corem_coap_requests"),
            "bus": {"name": s.sink.name, "pending": s.sink.pending,
                    "error": None if s.sink.last_error is None else str(s.sink.last_error)},
            "online": sum(s.presence.online_by_tenant.values()), "registered": len(s.directory),
            "devices": devices, "dtls": dtls[0] if dtls else None,
            "samples": len(s.diagnostics.samples),
        })

    async def import_devices(self, req: HttpRequest) -> Reply:
        """Many devices at once (CSV with a header, or JSON Lines), one transaction per chunk."""
        kind = req.query.get("format", "csv")
        if kind not in ("csv", "jsonl"):
            raise BadInput("format: csv or jsonl")
        try:
            text = req.body.decode()
        except UnicodeDecodeError:
            raise BadInput("body: not UTF-8 text") from None
        try:  # (a device that exists with other settings, a credential another holds: a Conflict, 409)
            result = bulk.import_devices(self.parts.registry, bulk.read_lines(text, kind),
                                         replace=req.query.get("replace") == "true")
        finally:
            await self.parts.reload()  # (chunks before an error are written)
        return json_reply(result._asdict())

    # -- profiles --------------------------------------------------------------------------------
    def _profile(self, req: HttpRequest) -> Profile | None:
        """The profile the path names (None: the built-in default); 404 if there is none."""
        name = req.params["name"]
        if name == DEFAULT_PROFILE:
            return None
        profile = self.parts.directory.profiles.get(name)
        if profile is None:
            raise NotFound(f"profile: {name!r} does not exist")
        return profile

    def list_profiles(self, req: HttpRequest) -> Reply:
        stored = self.parts.directory.profiles
        used = self.parts.directory.profile_counts()
        return json_reply([{"name": DEFAULT_PROFILE, "builtin": True, "devices": used.get(DEFAULT_PROFILE, 0)}]
                          + [{"name": n, "builtin": False, "devices": used.get(n, 0), "profile": msgspec.to_builtins(p)}
                             for n, p in sorted(stored.items())])

    def get_profile(self, req: HttpRequest) -> Reply:
        profile = self._profile(req)
        if profile is None:
            return json_reply({"name": DEFAULT_PROFILE, "builtin": True, "profile": msgspec.to_builtins(Profile())})
        return json_reply({"name": req.params["name"], "builtin": False, "profile": msgspec.to_builtins(profile)})

    async def put_profile(self, req: HttpRequest) -> Reply:
        try:
            profile = profile_from(req.json())
            compile_profile(profile)  # a script that does not load is refused now
        except ProfileError as e:
            raise BadInput(str(e)) from None
        created = self.parts.registry.put_profile(req.params["name"], profile)
        await self.parts.reload()
        log.info("profile %s %s through the admin API", req.params["name"], "added" if created else "changed",
                 extra=fields(profile=req.params["name"], change="added" if created else "changed"))
        return json_reply({"name": req.params["name"], "builtin": False, "profile": msgspec.to_builtins(profile)},
                          201 if created else 200)

    async def remove_profile(self, req: HttpRequest) -> Reply:
        if self._profile(req) is None:
            raise Conflict(f"profile: {DEFAULT_PROFILE!r} is built in")
        self.parts.registry.remove_profile(req.params["name"])  # (devices use it: a Conflict, 409)
        await self.parts.reload()
        return Reply(204, b"", "application/json")

    def decode(self, req: HttpRequest) -> Reply:
        """Try the profile on a sample: 200 with the points, or 422 with the error the device gets."""
        profile = self._profile(req)
        ask = check(schemas.SampleRequest, req.json())
        cf = ask.content_format
        if cf is not None and not 0 <= cf <= 65535:
            raise BadInput("content_format: 0-65535")
        try:
            payload = sample_bytes(ask.hex, ask.base64)
        except SampleError as e:
            raise BadInput(str(e)) from None
        result = decode_sample(profile, cf, payload, int(time.time() * 1000))
        return json_reply(result, 422 if "error" in result else 200)

    # -- the page --------------------------------------------------------------------------------
    def ui(self, req: HttpRequest) -> Reply:
        page = resources.files("corem.admin").joinpath("ui.html").read_bytes()
        return Reply(200, page, "text/html; charset=utf-8", {"Cache-Control": "no-cache"})

    def openapi(self, req: HttpRequest) -> Reply:
        return json_reply(openapi(self.documented + self.routes()))

    # -- the table -------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        """Every route, with what the OpenAPI document says of it (`openapi`): its operationId and
        tag, its body (a name of BODIES, or a schema), its answers (`ok`: the success codes, whose
        body is `response`, a Struct of corem/admin/schemas.py; `errors`: code -> text, answered
        with an Error, or (text, Struct))."""
        dev = "/api/devices/{tenant}/{device}"
        prof = "/api/profiles/{name}"
        s = schemas
        return [
            Route("GET", "/api/openapi.json", self.openapi, auth=False, doc={
                "id": "getOpenApi", "tag": "documents", "summary": "This document", "response": dict[str, Any]}),
            Route("GET", "/ui", self.ui, auth=False, doc={
                "id": "getUi", "tag": "documents", "summary": "The diagnostics page (HTML)", "content": "text/html"}),
            Route("GET", "/", lambda r: Reply(302, b"", "text/plain", {"Location": "/ui"}), auth=False,
                  doc={"hidden": True}),
            Route("GET", "/api/devices", self.list_devices, doc={
                "id": "listDevices", "tag": "devices", "summary": "List devices (optionally ?tenant=)",
                "query": ["tenant"], "response": list[s.DeviceView]}),
            Route("POST", "/api/devices", self.add_device, doc={
                "id": "addDevice", "tag": "devices",
                "summary": "Register a device; without credentials it gets a generated access token",
                "body": "DeviceNew", "ok": 201, "response": s.DeviceCreated,
                "errors": {409: "The device, token, PSK identity, certificate or OSCORE recipient ID exists already"}}),
            Route("POST", "/api/devices/import", self.import_devices, doc={
                "id": "importDevices", "tag": "devices",
                "summary": "Register many devices: CSV with a header, or JSON Lines (?format=jsonl); idempotent; "
                           "?replace=true overwrites devices that exist with other settings",
                "raw_body": "application/octet-stream", "query": ["format", "replace"], "optional": ["format", "replace"],
                "response": s.Imported,
                "errors": {409: "A device exists with other settings, or a credential is used by another",
                           413: "Larger than admin_max_body (the CLI imports any size)"}}),
            Route("GET", dev, self.get_device, doc={
                "id": "getDevice", "tag": "devices", "summary": "One device, with presence and queues",
                "response": s.DeviceView}),
            Route("DELETE", dev, self.remove_device, doc={
                "id": "removeDevice", "tag": "devices", "summary": "Remove a device and its state", "ok": 204}),
            Route("GET", dev + "/attributes", self.get_attributes, doc={
                "id": "getAttributes", "tag": "downlink", "summary": "Client and shared attributes",
                "response": s.Attributes}),
            Route("PUT", dev + "/attributes", self.set_shared, doc={
                "id": "setSharedAttributes", "tag": "downlink",
                "summary": "Set shared attributes (null deletes); delivered, or queued merged while the device sleeps",
                "body": {"type": "object", "description": "attribute name -> JSON value (null deletes it)"},
                "response": s.Delivery}),
            Route("POST", dev + "/rpc", self.rpc, doc={
                "id": "callRpc", "tag": "downlink",
                "summary": "Send an RPC request and wait for the reply (504 when none within timeout)",
                "body": "RpcRequest", "response": s.RpcResult,
                "errors": {429: "Too many requests queued for the device",
                           504: ("No reply within the timeout", s.RpcResult)}}),
            Route("POST", dev + "/commands", self.command, doc={
                "id": "sendCommand", "tag": "downlink", "summary": "Send a Drogue-style command (delivered on a ct response)",
                "body": "CommandRequest", "ok": 202, "response": s.Delivery,
                "errors": {429: "Too many commands queued for the device"}}),
            Route("PUT", dev + "/firmware", self.assign("firmware"), doc={
                "id": "assignFirmware", "tag": "ota", "summary": "Assign a firmware package",
                "body": "PackageAssignment", "response": s.PackageAssigned}),
            Route("PUT", dev + "/software", self.assign("software"), doc={
                "id": "assignSoftware", "tag": "ota", "summary": "Assign a software package",
                "body": "PackageAssignment", "response": s.PackageAssigned}),
            Route("POST", dev + "/claim", self.claim, doc={
                "id": "claimDevice", "tag": "provisioning", "summary": "Claim a device with the secret it published",
                "body": "ClaimRequest", "response": s.Claimed}),
            Route("GET", "/api/packages", self.list_packages, doc={
                "id": "listPackages", "tag": "ota", "summary": "OTA packages", "response": list[s.Package]}),
            Route("POST", "/api/packages", self.upload_package, doc={
                "id": "uploadPackage", "tag": "ota",
                "summary": f"Upload an OTA package (raw body; ?kind={'|'.join(KINDS)}&title=&version=)",
                "raw_body": "application/octet-stream", "query": ["kind", "title", "version"], "ok": 201,
                "response": s.Package,
                "errors": {409: "This kind, title and version exists already", 413: "Larger than admin_max_body"}}),
            Route("POST", "/api/provisioning-keys", self.add_provision_key, doc={
                "id": "addProvisioningKey", "tag": "provisioning",
                "summary": "Add a provisioning key and secret devices can trade for credentials",
                "body": "ProvisioningKeyNew", "ok": 201, "response": s.ProvisioningKey,
                "errors": {409: "The key exists already"}}),
            Route("GET", "/api/diagnostics/samples", self.samples, doc={
                "id": "listSamples", "tag": "diagnostics", "summary": "Rejected samples, newest first",
                "query": ["tenant", "device", "protocol", "reason", "limit"], "response": list[s.Sample]}),
            Route("GET", "/api/status", self.status, doc={
                "id": "getStatus", "tag": "diagnostics", "summary": "Counters, devices, DTLS sessions (the UI's data)",
                "response": s.Status}),
            Route("GET", "/api/diagnostics/history", self.history, doc={
                "id": "getHistory", "tag": "diagnostics",
                "summary": "The last hour, one sample per 10 s: readings, refusals by reason, DTLS handshakes and "
                           "failures by reason, bus backlog (the UI's charts)", "response": s.History,
                "errors": {404: "Kept by the supervisor's front (with --workers it answers this)"}}),
            Route("GET", "/api/profiles", self.list_profiles, doc={
                "id": "listProfiles", "tag": "profiles", "summary": "Device profiles (the built-in default first)",
                "response": list[s.ProfileEntry]}),
            Route("GET", prof, self.get_profile, doc={
                "id": "getProfile", "tag": "profiles", "summary": "One profile", "response": s.ProfileEntry,
                "errors": {404: "No such profile"}}),
            Route("PUT", prof, self.put_profile, doc={
                "id": "putProfile", "tag": "profiles",
                "summary": "Add (201) or replace (200) a profile; devices naming it use it from now on",
                "body": Profile, "ok": (200, 201), "response": s.ProfileEntry, "errors": {404: "No such profile"}}),
            Route("DELETE", prof, self.remove_profile, doc={
                "id": "removeProfile", "tag": "profiles", "summary": "Remove a profile no device uses", "ok": 204,
                "errors": {404: "No such profile", 409: "Built in, or devices use it"}}),
            Route("POST", prof + "/decode", self.decode, doc={
                "id": "decodeSample", "tag": "profiles",
                "summary": "Decode a sample payload with the profile: the points, or the error the device would get",
                "body": "SampleRequest", "response": s.Decoded,
                "errors": {404: "No such profile",
                           422: ("The sample is refused; the error names the field", s.DecodeRefused)}}),
        ]


TAGS = [
    {"name": "devices", "description": "The registry: devices and their credentials"},
    {"name": "downlink", "description": "What goes to a device: shared attributes, RPC, commands"},
    {"name": "ota", "description": "Firmware and software packages"},
    {"name": "provisioning", "description": "Provisioning keys and claiming"},
    {"name": "profiles", "description": "Device profiles: payload formats and rules"},
    {"name": "diagnostics", "description": "What the diagnostics page shows"},
    {"name": "operations", "description": "For Prometheus and orchestrators: metrics, liveness, readiness"},
    {"name": "documents", "description": "This document and the diagnostics page"},
]
ERROR = {"$ref": "#/components/schemas/Error"}


def openapi(routes: list[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`: request bodies from BODIES and the Profile Struct (what
    the handlers check with), answers from corem/admin/schemas.py's Structs."""
    types: list[Any] = [schemas.Error, Profile]
    for r in routes:
        for t in (r.doc.get("response"), r.doc.get("body"), *(
                e[1] for e in r.doc.get("errors", {}).values() if isinstance(e, tuple))):
            if t is not None and not isinstance(t, (str, dict)) and t not in types:
                types.append(t)
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    ref = dict(zip(map(repr, types), refs))
    for name, (allowed, required) in BODIES.items():
        components[name] = {"type": "object", "properties": allowed, "additionalProperties": False,
                            **({"required": list(required)} if required else {})}
    components["DeviceNew"]["dependentRequired"] = {
        "psk": ["psk_identity"], "psk_hex": ["psk_identity"],
        **{k: ["oscore_sender_id", "oscore_recipient_id"] for k in OSCORE_FIELDS}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        if r.doc.get("hidden"):
            continue
        op: dict[str, Any] = {"operationId": r.doc["id"], "tags": [r.doc["tag"]], "summary": r.doc.get("summary", "")}
        ok = r.doc.get("ok", 200)
        responses: dict[str, Any] = {}
        for code in ok if isinstance(ok, tuple) else (ok,):
            answer: dict[str, Any] = {"description": r.doc.get("ok_text", REASONS.get(code, "OK"))}
            if code != 204:
                if "content" in r.doc:
                    answer["content"] = {r.doc["content"]: {"schema": {"type": "string"}}}
                elif r.doc.get("response") is not None:
                    answer["content"] = {"application/json": {"schema": ref[repr(r.doc["response"])]}}
            responses[str(code)] = answer
        errors: dict[int, Any] = {}
        if r.auth:
            errors[400] = "Bad input; the error names the field"
            errors[401] = "Missing or wrong admin token"
        if "{device}" in r.pattern:
            errors[404] = "The device is not registered"
        errors.update(r.doc.get("errors", {}))
        for code, about in sorted(errors.items()):
            text, kind = about if isinstance(about, tuple) else (about, None)
            schema = ERROR if kind is None else ref[repr(kind)]
            responses[str(code)] = {"description": text, "content": {
                r.doc.get("error_content", "application/json"): {"schema": schema}}}
        op["responses"] = responses
        if r.auth:
            op["security"] = [{"admin": []}]
        params = [{"name": p[1:-1], "in": "path", "required": True, "schema": NAMES.get(p[1:-1], STR)}
                  for p in r.pattern.split("/") if p.startswith("{")]
        params += [{"name": q, "in": "query", "required": bool(r.doc.get("raw_body")) and q not in r.doc.get(
                        "optional", ()),
                    "schema": QUERY.get(q, STR)} for q in r.doc.get("query", [])]
        if params:
            op["parameters"] = params
        body = r.doc.get("body")
        if body is not None:
            schema = ({"$ref": f"#/components/schemas/{body}"} if isinstance(body, str)
                      else body if isinstance(body, dict) else ref[repr(body)])
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        elif r.doc.get("raw_body"):
            op["requestBody"] = {"required": True, "content": {r.doc["raw_body"]: {
                "schema": {"type": "string", "format": "binary"}}}}
        paths.setdefault(r.pattern, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "corem admin API", "version": __version__,
                 "description": "corem's admin API, metrics and health endpoints. Every /api route but this "
                                "document needs `Authorization: Bearer <admin token>`."},
        "tags": TAGS,
        "components": {"securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}}, "schemas": components},
        "paths": paths,
    }
