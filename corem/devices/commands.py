"""Downlink requests that arrive as bus records on `commands.{tenant}` (key: anything; value: JSON):

    {"device": "d1", "type": "rpc", "method": "reboot", "params": {...}, "timeout": 30}
    {"device": "d1", "type": "command", "command": "set-led", "payload": "on", "ttl": 300}
    {"device": "d1", "type": "attributes", "values": {"interval": 30}}
    {"device": "d1", "type": "firmware", "package": 3}          (or "software")

Beside `device`, `type` and an optional `request_id`, a record's fields are the request's, as the
admin API takes them (requests.py: one definition, one parse).  `request_id` is echoed in the
answer on `commands.results.{tenant}`: status `accepted` (with `rpc_id` for RPC, whose later
results carry it as `id`) or `rejected` with the reason naming the field.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgspec

from ..errors import BadInput, NotFound, Refused
from ..inputs import check
from ..registry import Device, Directory
from ..registry.management import KINDS, Management, Package
from .downlink import Downlink
from .requests import AttributesUpdate, CommandRequest, PackageAssignment, RpcRequest

log = logging.getLogger("corem.commands")

#: a record's fields that are not the request's
ENVELOPE = ("device", "type", "request_id")
#: each type of record -> the request it carries
REQUESTS: dict[str, type[msgspec.Struct]] = {"rpc": RpcRequest, "command": CommandRequest, "attributes": AttributesUpdate,
                             **{kind: PackageAssignment for kind in KINDS}}


def request_of(value: bytes) -> dict[str, Any]:
    """A record's value as the JSON object it must be (BadInput names what it is not: bytes that
    are no JSON, nested past the parser's depth, or another JSON value)."""
    try:
        request = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise BadInput(f"value: not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise BadInput("value: expected a JSON object")
    return request


def apply(tenant: str, value: bytes, directory: Directory, downlink: Downlink, management: Management) -> dict[str, Any]:
    """Carry out one request; returns the result record (always: a bad request is answered too)."""
    try:
        request = request_of(value)
    except BadInput as e:
        return {"tenant": tenant, "status": "rejected", "reason": str(e)}
    result: dict[str, Any] = {"tenant": tenant, "device": request.get("device"), "type": request.get("type"),
                              "request_id": request.get("request_id")}
    try:
        result.update(status="accepted", **_dispatch(tenant, request, directory, downlink, management))
    except Refused as e:  # (by its kind: bad input, no such device, a full queue)
        result.update(status="rejected", reason=str(e))
    except Exception:  # a bug this record found: logged and answered, never the reader's end
        log.exception("commands: a request of tenant %r could not be carried out", tenant)
        result.update(status="rejected", reason="internal error (logged)")
    return result


def _dispatch(tenant: str, r: dict, directory: Directory, downlink: Downlink, management: Management) -> dict:
    name = r.get("device")
    device = directory.named(tenant, name) if isinstance(name, str) else None
    if device is None:
        raise NotFound(f"device: {name!r} is not registered in tenant {tenant!r}")
    kind = r.get("type")
    if not isinstance(kind, str) or kind not in REQUESTS:
        raise BadInput(f"type: {kind!r} is not one of rpc, command, attributes, firmware, software")
    ask: msgspec.Struct = check(REQUESTS[kind], {k: v for k, v in r.items() if k not in ENVELOPE})
    if isinstance(ask, RpcRequest):
        call = downlink.send_rpc(device, ask.method, ask.params, ask.timeout, ask.oneway)
        return {"rpc_id": call.id}
    if isinstance(ask, CommandRequest):
        return {"delivery": downlink.command(device, ask.command, ask.payload_bytes(), ask.ttl)}
    if isinstance(ask, AttributesUpdate):
        return {"delivery": downlink.set_shared(device, ask.values)}
    assert isinstance(ask, PackageAssignment)
    _, delivery = assign_package(management, downlink, device, kind, ask.package)
    return {"delivery": delivery}


def assign_package(management: Management, downlink: Downlink, device: Device, kind: str,
                   package_id: object) -> tuple[Package, str]:
    """Assign an OTA package and tell the device the ThingsBoard way: shared attributes it
    observes (`fw_title`, `fw_version`, `fw_size`, `fw_checksum`, ...).  Returns the package
    and how the attributes were delivered."""
    package = management.assign(device.tenant, device.device, kind, package_id)
    prefix = "fw" if kind == "firmware" else "sw"
    delivery = downlink.set_shared(device, {
        f"{prefix}_title": package.title, f"{prefix}_version": package.version, f"{prefix}_size": package.size,
        f"{prefix}_checksum": package.sha256, f"{prefix}_checksum_algorithm": "SHA256",
    })
    return package, delivery
