"""The admin REST API (JSON, OpenAPI 3.1 at /api/openapi.json) and the diagnostics UI's data.

Every /api route except the OpenAPI document needs `Authorization: Bearer <admin token>`.  Bad
input is answered 400 with the offending field named; a missing or wrong token 401.  The CLI's
`devices` commands call the same registry operations; its runtime commands (`rpc`, `command`,
`attributes`, `firmware`) call this API.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import msgspec

from ..devices.commands import assign_package
from ..dtls import pem_sha256
from ..ingest.diagnostics import cbor_diagnostic
from ..logs import fields
from ..metrics import gather, total
from ..profiles.compile import compile_profile
from ..profiles.proto_schema import MAX_SCHEMA_BYTES
from ..profiles.spec import DEFAULT as DEFAULT_PROFILE
from ..profiles.spec import FORMATS as PROFILE_FORMATS
from ..profiles.spec import NAME_RE as PROFILE_NAME_RE
from ..profiles.spec import Profile, ProfileError, profile_from
from ..profiles.trial import SampleError, decode_sample, sample_bytes
from ..registry import Device, RegistryError, bulk
from ..registry.management import KINDS, LABEL_RE
from ..registry.store import DEVICE_RE, PSK_IDENTITY_RE, TENANT_RE, TOKEN_RE, parse_oscore, parse_psk
from .http import HttpError, HttpRequest, Reply, Route, json_reply

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
SAMPLE_FIELDS = {"content_format": {"type": "integer", "minimum": 0, "maximum": 65535},
                 "hex": {"type": "string", "description": "the payload as hex"},
                 "base64": {"type": "string", "description": "the payload as base64"}}
#: a profile's JSON (corem/profiles/spec.py checks it whole; the schema says its shape)
PROFILE_SCHEMA = {"type": "object", "properties": {
    "format": {"type": "string", "enum": list(PROFILE_FORMATS)},
    "nested": {"type": "string", "enum": ["reject", "flatten", "json"]},
    "positions": {"type": "array", "items": {"type": ["string", "null"]}},
    "layout": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": ["string", "null"]}, "type": STR, "bytes": {"type": "integer"}}}},
    "description": STR,
    "fields": {"type": "object", "additionalProperties": {"type": "object", "properties": {
        "rename": STR, "scale": {"type": "number"}, "offset": {"type": "number"}, "unit": STR,
        "type": {"type": "string", "enum": ["number", "string"]}, "min": {"type": "number"},
        "max": {"type": "number"}, "required": {"type": "boolean"},
        "allowed": {"type": "array", "items": STR}}}},
    "script": {"type": "string", "description": "js: a TS013 codec, function decodeUplink(input)"},
    "fport": {"type": "integer", "minimum": 1, "maximum": 255}, "variables": {"type": "object"},
    "timeout_ms": {"type": "integer", "minimum": 1, "maximum": 1000},
    "max_memory_mb": {"type": "integer", "minimum": 8, "maximum": 512},
    "schema": {"type": "string", "description": "protobuf: a proto3 schema (ThingsBoard's telemetry proto schema)",
               "maxLength": MAX_SCHEMA_BYTES},
    "message": {"type": "string", "description": "protobuf: the message a payload is (default: the last one)"}}}
QUERY = {"limit": {"type": "integer", "minimum": 1}, "format": {"type": "string", "enum": ["csv", "jsonl"]},
         "replace": {"type": "string", "enum": ["true", "false"]}, "kind": {"type": "string", "enum": list(KINDS)},
         "title": _like(LABEL_RE), "version": _like(LABEL_RE)}
DEVICE_FIELDS = {
    "tenant": NAMES["tenant"], "device": NAMES["device"], "profile": {"type": "string", "minLength": 1},
    "token": _like(TOKEN_RE), "psk_identity": _like(PSK_IDENTITY_RE),
    "psk": {"type": "string", "description": "key as text, 8-64 bytes", "minLength": 8, "maxLength": 64},
    "psk_hex": {"type": "string", "description": "key as hex, 8-64 bytes", "pattern": "^([0-9a-fA-F]{2}){8,64}$"},
    "cert_pem": {"type": "string", "description": "device certificate (PEM); registers its SHA-256"},
    "power_mode": {"type": "string", "enum": ["drx", "psm"]},
    "topics": {"type": "string", "description": "space-separated MQTT filters for /ps and /mqtt"},
    "gateways": {"type": "string", "description": "space-separated devices that may publish for this one (as=)"},
    "oscore_sender_id": {"type": "string", "description": "OSCORE: corem's Sender ID, hex (0-7 bytes)",
                         "pattern": "^([0-9a-fA-F]{2}){0,7}$"},
    "oscore_recipient_id": {"type": "string", "description": "OSCORE: the device's Sender ID (its kid), hex",
                            "pattern": "^([0-9a-fA-F]{2}){0,7}$"},
    "oscore_secret": {"type": "string", "description": "OSCORE master secret as text, 16-64 bytes",
                      "minLength": 16, "maxLength": 64},
    "oscore_secret_hex": {"type": "string", "description": "OSCORE master secret as hex, 16-64 bytes",
                          "pattern": "^([0-9a-fA-F]{2}){16,64}$"},
    "oscore_salt": {"type": "string", "description": "OSCORE master salt, hex", "pattern": "^([0-9a-fA-F]{2}){0,64}$"},
    "oscore_id_context": {"type": "string", "description": "OSCORE ID context, hex",
                          "pattern": "^([0-9a-fA-F]{2}){0,255}$"},
}
OSCORE_FIELDS = ("oscore_sender_id", "oscore_recipient_id", "oscore_secret", "oscore_secret_hex", "oscore_salt",
                 "oscore_id_context")


def _fields(body: Any, allowed: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HttpError(400, "body: expected a JSON object")
    for key in body:
        if key not in allowed:
            raise HttpError(400, f"{key}: unknown field; allowed: {', '.join(allowed)}")
    for key in required:
        if body.get(key) in (None, ""):
            raise HttpError(400, f"{key}: required")
    for key, value in body.items():
        kind = allowed[key].get("type")
        types: dict[str, type | tuple[type, ...]] = {"string": str, "number": (int, float), "integer": int,
                                                     "boolean": bool}
        ok = types.get(kind)
        if ok is not None and value is not None and (not isinstance(value, ok) or (kind != "boolean" and isinstance(value, bool))):
            raise HttpError(400, f"{key}: expected a {kind}")
    return body


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
        self.started = time.time()

    # -- helpers ---------------------------------------------------------------------------------
    def _device(self, req: HttpRequest) -> Device:
        device = self.parts.directory.named(req.params["tenant"], req.params["device"])
        if device is None:
            raise HttpError(404, f"device: {req.params['tenant']}/{req.params['device']} is not registered")
        return device

    def _describe(self, d: Device, seen: dict[tuple[str, str], int] | None = None,
                  detail: bool = True) -> dict[str, Any]:
        """A device as JSON (never its secrets); `detail` adds what costs a query (the owner)."""
        s = self.parts
        key = (d.tenant, d.device)
        if seen is None:
            seen = s.presence.last_seen()
        return {
            "tenant": d.tenant, "device": d.device, "profile": d.profile, "created_at": d.created_at,
            "has_token": d.token is not None, "psk_identity": d.psk_identity, "cert_sha256": d.cert_sha256,
            "power_mode": d.power_mode, "topics": d.topics, "gateways": d.gateways,
            "oscore": d.oscore and {"sender_id": d.oscore.sender_id.hex(), "recipient_id": d.oscore.recipient_id.hex(),
                                    "id_context": None if d.oscore.id_context is None else d.oscore.id_context.hex()},
            "online": key in seen, "last_seen": seen.get(key),
            "points": s.ingest.stats.device_points.get(key, 0),
            "rejections": s.ingest.stats.device_rejections.get(key, 0),
            "queued": s.downlink.queued(d), **({"owner": s.management.owner(*key)} if detail else {}),
        }

    # -- devices ---------------------------------------------------------------------------------
    def list_devices(self, req: HttpRequest) -> Reply:
        devices = self.parts.registry.list_devices(req.query.get("tenant"))
        seen = self.parts.presence.last_seen()  # once, not per device
        return json_reply([self._describe(d, seen, detail=False) for d in devices])

    async def add_device(self, req: HttpRequest) -> Reply:
        body = _fields(req.json(), DEVICE_FIELDS, ("tenant", "device"))
        cert = None
        if body.get("cert_pem"):
            try:
                cert = pem_sha256(body["cert_pem"])
            except ValueError as e:
                raise HttpError(400, f"cert_pem: {e}") from None
        token = body.get("token")
        oscore_given = any(body.get(k) is not None for k in OSCORE_FIELDS)
        if token is None and body.get("psk_identity") is None and cert is None and not oscore_given:
            token = secrets.token_urlsafe(18)  # a device needs some credential: an access token by default
        try:
            psk = parse_psk(body.get("psk"), body.get("psk_hex"))
            oscore = parse_oscore(*(body.get(k) for k in OSCORE_FIELDS))
            d = self.parts.registry.add_device(
                body["tenant"], body["device"], token=token, profile=body.get("profile") or "default",
                psk_identity=body.get("psk_identity"), psk=psk, cert_sha256=cert,
                power_mode=body.get("power_mode") or "drx", topics=body.get("topics") or "#",
                gateways=body.get("gateways") or "", oscore=oscore,
            )
        except RegistryError as e:
            raise HttpError(409 if "already" in str(e) else 400, str(e)) from None
        await self.parts.reload()
        log.info("device %s/%s added through the admin API", d.tenant, d.device,
                 extra=fields(tenant=d.tenant, device=d.device))
        return json_reply({**self._describe(d), "token": token}, 201)

    def get_device(self, req: HttpRequest) -> Reply:
        return json_reply(self._describe(self._device(req)))

    async def remove_device(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        self.parts.registry.remove_device(d.tenant, d.device)
        self.parts.management.forget(d.tenant, d.device)
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
        try:
            delivery = self.parts.downlink.set_shared(d, req.json())
        except RegistryError as e:
            raise HttpError(400, str(e)) from None
        return json_reply({"delivery": delivery})

    # -- RPC and commands ------------------------------------------------------------------------
    async def rpc(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        body = _fields(req.json(), {"method": STR, "params": {}, "timeout": {"type": "number"},
                                    "oneway": {"type": "boolean"}}, ("method",))
        timeout = body.get("timeout", 10.0)
        if isinstance(timeout, (int, float)) and timeout > MAX_RPC_TIMEOUT:  # this call holds a connection
            raise HttpError(400, f"timeout: at most {MAX_RPC_TIMEOUT:g} seconds through the API")
        try:
            call = await self.parts.downlink.rpc(d, body["method"], body.get("params"), timeout,
                                                  bool(body.get("oneway")))
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        except OverflowError as e:
            raise HttpError(429, str(e)) from None
        result = {"id": call.id, "status": call.status}
        if call.status == "replied":
            result["response"] = call.response
        return json_reply(result, 504 if call.status == "expired" else 200)

    def command(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        body = _fields(req.json(), {"command": STR, "payload": STR, "payload_base64": STR, "ttl": {"type": "number"}},
                       ("command",))
        if "payload" in body and "payload_base64" in body:
            raise HttpError(400, "payload: give payload or payload_base64, not both")
        try:
            payload = base64.b64decode(body["payload_base64"], validate=True) if "payload_base64" in body \
                else (body.get("payload") or "").encode()
        except ValueError:  # binascii.Error, or text that is not even ASCII
            raise HttpError(400, "payload_base64: not base64") from None
        try:
            delivery = self.parts.downlink.command(d, body["command"], payload, body.get("ttl", 300.0))
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        except OverflowError as e:
            raise HttpError(429, str(e)) from None
        return json_reply({"delivery": delivery}, 202)

    # -- OTA -------------------------------------------------------------------------------------
    def upload_package(self, req: HttpRequest) -> Reply:
        q = req.query
        for key in ("kind", "title", "version"):
            if not q.get(key):
                raise HttpError(400, f"{key}: required query parameter")
        try:
            p = self.parts.management.add_package(q["kind"], q["title"], q["version"], req.body)
        except RegistryError as e:
            raise HttpError(409 if "already" in str(e) else 400, str(e)) from None
        log.info("%s package %s %s uploaded: %d bytes, sha256 %s", p.kind, p.title, p.version, p.size, p.sha256,
                 extra=fields(kind=p.kind, title=p.title, version=p.version, size=p.size, sha256=p.sha256))
        return json_reply(p._asdict(), 201)

    def list_packages(self, req: HttpRequest) -> Reply:
        return json_reply([p._asdict() for p in self.parts.management.packages()])

    def assign(self, kind: str):
        def handler(req: HttpRequest) -> Reply:
            d = self._device(req)
            body = _fields(req.json(), {"package": {"type": "integer"}}, ("package",))
            try:
                p, delivery = assign_package(self.parts.management, self.parts.downlink, d, kind, body["package"])
            except RegistryError as e:
                raise HttpError(400, str(e)) from None
            log.info("%s %s %s assigned to %s/%s (%s)", kind, p.title, p.version, d.tenant, d.device, delivery,
                     extra=fields(kind=kind, title=p.title, version=p.version, tenant=d.tenant, device=d.device,
                                  delivery=delivery))
            return json_reply({**p._asdict(), "delivery": delivery})

        return handler

    # -- provisioning and claiming ---------------------------------------------------------------
    def add_provision_key(self, req: HttpRequest) -> Reply:
        body = _fields(req.json(), {"key": STR, "secret": STR, "tenant": STR, "profile": STR},
                       ("key", "secret", "tenant"))
        try:
            self.parts.management.add_provision_key(body["key"], body["secret"], body["tenant"],
                                                     body.get("profile") or "default")
        except RegistryError as e:
            raise HttpError(409 if "already" in str(e) else 400, str(e)) from None
        return json_reply({"key": body["key"], "tenant": body["tenant"]}, 201)

    def claim(self, req: HttpRequest) -> Reply:
        d = self._device(req)
        body = _fields(req.json(), {"owner": STR, "secret_key": STR}, ("owner", "secret_key"))
        try:
            self.parts.management.claim(d.tenant, d.device, body["secret_key"], body["owner"])
        except PermissionError as e:
            raise HttpError(400, str(e)) from None
        log.info("device %s/%s claimed by %s", d.tenant, d.device, body["owner"],
                 extra=fields(tenant=d.tenant, device=d.device, owner=body["owner"]))
        return json_reply({"tenant": d.tenant, "device": d.device, "owner": body["owner"]})

    # -- diagnostics -----------------------------------------------------------------------------
    def history(self, req: HttpRequest) -> Reply:
        from .history import Totals

        h = self.parts.history
        if h is None:
            raise HttpError(404, "history: kept by the supervisor's front (--workers)")
        return json_reply(h.snapshot({"": Totals.of(gather(self.parts.components()))}))

    def samples(self, req: HttpRequest) -> Reply:
        q = req.query
        try:
            limit = int(q.get("limit", "200"))
        except ValueError:
            raise HttpError(400, "limit: not an integer") from None
        out = []
        for s in self.parts.diagnostics.newest(len(self.parts.diagnostics.samples)):
            if any(q.get(k) and getattr(s, k) != q[k] for k in ("tenant", "device", "protocol", "reason")):
                continue
            out.append({
                "at": s.at, "protocol": s.protocol, "reason": s.reason, "detail": s.detail, "field": s.field,
                "tenant": s.tenant, "device": s.device, "peer": s.peer, "content_format": s.content_format,
                "payload_hex": s.payload.hex(),
                "payload_diagnostic": cbor_diagnostic(s.payload) if s.content_format in (None, 60)
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
            raise HttpError(400, "format: csv or jsonl")
        try:
            text = req.body.decode()
        except UnicodeDecodeError:
            raise HttpError(400, "body: not UTF-8 text") from None
        try:
            result = bulk.import_devices(self.parts.registry, bulk.read_lines(text, kind),
                                         replace=req.query.get("replace") == "true")
        except RegistryError as e:
            raise HttpError(409 if "already used" in str(e) or "exists with other" in str(e) else 400, str(e)) from None
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
            raise HttpError(404, f"profile: {name!r} does not exist")
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
            created = self.parts.registry.put_profile(req.params["name"], profile)
        except (ProfileError, RegistryError) as e:
            raise HttpError(400, str(e)) from None
        await self.parts.reload()
        log.info("profile %s %s through the admin API", req.params["name"], "added" if created else "changed",
                 extra=fields(profile=req.params["name"], change="added" if created else "changed"))
        return json_reply({"name": req.params["name"], "builtin": False, "profile": msgspec.to_builtins(profile)},
                          201 if created else 200)

    async def remove_profile(self, req: HttpRequest) -> Reply:
        if self._profile(req) is None:
            raise HttpError(409, f"profile: {DEFAULT_PROFILE!r} is built in")
        try:
            self.parts.registry.remove_profile(req.params["name"])
        except RegistryError as e:
            raise HttpError(409, str(e)) from None
        await self.parts.reload()
        return Reply(204, b"", "application/json")

    def decode(self, req: HttpRequest) -> Reply:
        """Try the profile on a sample: 200 with the points, or 422 with the error the device gets."""
        profile = self._profile(req)
        body = _fields(req.json(), SAMPLE_FIELDS)
        cf = body.get("content_format")
        if cf is not None and not 0 <= cf <= 65535:
            raise HttpError(400, "content_format: 0-65535")
        try:
            payload = sample_bytes(body.get("hex"), body.get("base64"))
        except SampleError as e:
            raise HttpError(400, str(e)) from None
        result = decode_sample(profile, cf, payload, int(time.time() * 1000))
        return json_reply(result, 422 if "error" in result else 200)

    # -- the page --------------------------------------------------------------------------------
    def ui(self, req: HttpRequest) -> Reply:
        page = resources.files("corem.admin").joinpath("ui.html").read_bytes()
        return Reply(200, page, "text/html; charset=utf-8", {"Cache-Control": "no-cache"})

    def openapi(self, req: HttpRequest) -> Reply:
        return json_reply(openapi(self.routes()))

    # -- the table -------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        dev = "/api/devices/{tenant}/{device}"
        prof = "/api/profiles/{name}"
        obj = {"type": "object"}
        return [
            Route("GET", "/api/openapi.json", self.openapi, auth=False, doc={"summary": "This document"}),
            Route("GET", "/ui", self.ui, auth=False, doc={"summary": "The diagnostics page (HTML)"}),
            Route("GET", "/", lambda r: Reply(302, b"", "text/plain", {"Location": "/ui"}), auth=False,
                  doc={"hidden": True}),
            Route("GET", "/api/devices", self.list_devices, doc={"summary": "List devices (optionally ?tenant=)"}),
            Route("POST", "/api/devices", self.add_device, doc={
                "summary": "Register a device; without credentials it gets a generated access token",
                "ok": 201, "errors": {409: "The device, token, PSK identity, certificate or OSCORE recipient ID exists already"},
                "body": {"type": "object", "required": ["tenant", "device"], "properties": DEVICE_FIELDS,
                         "dependentRequired": {"psk": ["psk_identity"], "psk_hex": ["psk_identity"],
                                               "psk_identity": [],
                                               **{k: ["oscore_sender_id", "oscore_recipient_id"]
                                                  for k in OSCORE_FIELDS}}}}),
            Route("POST", "/api/devices/import", self.import_devices, doc={
                "summary": "Register many devices: CSV with a header, or JSON Lines (?format=jsonl); idempotent; "
                           "?replace=true overwrites devices that exist with other settings",
                "raw_body": True, "query": ["format", "replace"], "optional": ["format", "replace"],
                "errors": {409: "A device exists with other settings, or a credential is used by another",
                           413: "Larger than admin_max_body (the CLI imports any size)"}}),
            Route("GET", dev, self.get_device, doc={"summary": "One device, with presence and queues"}),
            Route("DELETE", dev, self.remove_device, doc={"summary": "Remove a device and its state", "ok": 204}),
            Route("GET", dev + "/attributes", self.get_attributes, doc={"summary": "Client and shared attributes"}),
            Route("PUT", dev + "/attributes", self.set_shared, doc={
                "summary": "Set shared attributes (null deletes); delivered, or queued merged while the device sleeps",
                "body": obj}),
            Route("POST", dev + "/rpc", self.rpc, doc={
                "summary": "Send an RPC request and wait for the reply (504 when none within timeout)",
                "errors": {429: "Too many requests queued for the device", 504: "No reply within the timeout"},
                "body": {"type": "object", "required": ["method"], "properties": {
                    "method": STR, "params": {}, "timeout": {"type": "number"}, "oneway": {"type": "boolean"}}}}),
            Route("POST", dev + "/commands", self.command, doc={
                "summary": "Send a Drogue-style command (delivered on a ct response)",
                "ok": 202, "errors": {429: "Too many commands queued for the device"},
                "body": {"type": "object", "required": ["command"], "properties": {
                    "command": STR, "payload": STR, "payload_base64": STR, "ttl": {"type": "number"}}}}),
            Route("PUT", dev + "/firmware", self.assign("firmware"), doc={
                "summary": "Assign a firmware package", "body": {"type": "object", "required": ["package"],
                                                                 "properties": {"package": {"type": "integer"}}}}),
            Route("PUT", dev + "/software", self.assign("software"), doc={
                "summary": "Assign a software package", "body": {"type": "object", "required": ["package"],
                                                                 "properties": {"package": {"type": "integer"}}}}),
            Route("POST", dev + "/claim", self.claim, doc={
                "summary": "Claim a device with the secret it published", "body": {
                    "type": "object", "required": ["owner", "secret_key"],
                    "properties": {"owner": STR, "secret_key": STR}}}),
            Route("GET", "/api/packages", self.list_packages, doc={"summary": "OTA packages"}),
            Route("POST", "/api/packages", self.upload_package, doc={
                "summary": f"Upload an OTA package (raw body; ?kind={'|'.join(KINDS)}&title=&version=)",
                "raw_body": True, "query": ["kind", "title", "version"], "ok": 201,
                "errors": {409: "This kind, title and version exists already", 413: "Larger than admin_max_body"}}),
            Route("POST", "/api/provisioning-keys", self.add_provision_key, doc={
                "summary": "Add a provisioning key and secret devices can trade for credentials",
                "ok": 201, "errors": {409: "The key exists already"},
                "body": {"type": "object", "required": ["key", "secret", "tenant"],
                         "properties": {"key": STR, "secret": STR, "tenant": STR, "profile": STR}}}),
            Route("GET", "/api/diagnostics/samples", self.samples, doc={
                "summary": "Rejected samples, newest first", "query": ["tenant", "device", "protocol", "reason", "limit"]}),
            Route("GET", "/api/status", self.status, doc={"summary": "Counters, devices, DTLS sessions (the UI's data)"}),
            Route("GET", "/api/diagnostics/history", self.history, doc={
                "summary": "The last hour, one sample per 10 s: readings, refusals by reason, DTLS handshakes and "
                           "failures by reason, bus backlog (the UI's charts)"}),
            Route("GET", "/api/profiles", self.list_profiles, doc={"summary": "Device profiles (the built-in default first)"}),
            Route("GET", prof, self.get_profile, doc={"summary": "One profile", "errors": {404: "No such profile"}}),
            Route("PUT", prof, self.put_profile, doc={
                "summary": "Add or replace a profile; devices naming it use it from now on", "ok": 200,
                "errors": {201: "Created", 404: "No such profile"}, "body": PROFILE_SCHEMA}),
            Route("DELETE", prof, self.remove_profile, doc={
                "summary": "Remove a profile no device uses", "ok": 204,
                "errors": {404: "No such profile", 409: "Built in, or devices use it"}}),
            Route("POST", prof + "/decode", self.decode, doc={
                "summary": "Decode a sample payload with the profile: the points, or the error the device would get",
                "errors": {404: "No such profile", 422: "The sample is refused; the error names the field"},
                "body": {"type": "object", "properties": SAMPLE_FIELDS}}),
        ]


def openapi(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        if r.doc.get("hidden"):
            continue
        ok = str(r.doc.get("ok", 200))
        op: dict[str, Any] = {"summary": r.doc.get("summary", ""), "responses": {
            ok: {"description": r.doc.get("ok_text", "OK")}}}
        if r.auth:
            op["security"] = [{"admin": []}]
            op["responses"]["400"] = {"description": "Bad input; the error names the field"}
            op["responses"]["401"] = {"description": "Missing or wrong admin token"}
        if "{device}" in r.pattern:
            op["responses"]["404"] = {"description": "The device is not registered"}
        for code, text in r.doc.get("errors", {}).items():
            op["responses"][str(code)] = {"description": text}
        params = [{"name": p[1:-1], "in": "path", "required": True, "schema": NAMES.get(p[1:-1], STR)}
                  for p in r.pattern.split("/") if p.startswith("{")]
        params += [{"name": q, "in": "query", "required": r.doc.get("raw_body", False) and q not in r.doc.get(
                        "optional", ()),
                    "schema": QUERY.get(q, STR)} for q in r.doc.get("query", [])]
        if params:
            op["parameters"] = params
        if "body" in r.doc:
            schema = r.doc["body"]
            if "properties" in schema:  # unknown fields are refused (400 naming them)
                schema = {**schema, "additionalProperties": False}
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        elif r.doc.get("raw_body"):
            op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}
        paths.setdefault(r.pattern, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "corem admin API", "version": "1"},
        "components": {"securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }

