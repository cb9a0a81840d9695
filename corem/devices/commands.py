"""Downlink requests that arrive as bus records on `commands.{tenant}` (key: anything; value: JSON):

    {"device": "d1", "type": "rpc", "method": "reboot", "params": {...}, "timeout": 30}
    {"device": "d1", "type": "command", "command": "set-led", "payload": "on", "ttl": 300}
    {"device": "d1", "type": "attributes", "values": {"interval": 30}}
    {"device": "d1", "type": "firmware", "package": 3}          (or "software")

An optional `request_id` is echoed in the answer on `commands.results.{tenant}`: status
`accepted` (with `rpc_id` for RPC, whose later results carry it as `id`) or `rejected` with the
reason naming the field.  The same operations back the admin API.
"""

from __future__ import annotations

import json
from typing import Any

from ..registry import Directory, RegistryError
from ..registry.management import KINDS, Management
from .downlink import Downlink


def apply(tenant: str, value: bytes, directory: Directory, downlink: Downlink, management: Management) -> dict[str, Any]:
    """Carry out one request; returns the result record (always: a bad request is answered too)."""
    try:
        request = json.loads(value)
    except ValueError as e:
        return {"tenant": tenant, "status": "rejected", "reason": f"value: not valid JSON ({e})"}
    if not isinstance(request, dict):
        return {"tenant": tenant, "status": "rejected", "reason": "value: expected a JSON object"}
    result: dict[str, Any] = {"tenant": tenant, "device": request.get("device"), "type": request.get("type"),
                              "request_id": request.get("request_id")}
    try:
        result.update(status="accepted", **_dispatch(tenant, request, directory, downlink, management))
    except (ValueError, OverflowError) as e:  # RegistryError is a ValueError
        result.update(status="rejected", reason=str(e))
    return result


def _dispatch(tenant: str, r: dict, directory: Directory, downlink: Downlink, management: Management) -> dict:
    name = r.get("device")
    device = directory.named(tenant, name) if isinstance(name, str) else None
    if device is None:
        raise ValueError(f"device: {name!r} is not registered in tenant {tenant!r}")
    kind = r.get("type")
    if kind == "rpc":
        method, timeout = r.get("method"), r.get("timeout", 30)
        if not isinstance(method, str) or not method:
            raise ValueError("method: required string")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise ValueError("timeout: seconds, > 0 and <= 86400")
        call = downlink.send_rpc(device, method, r.get("params"), float(timeout), bool(r.get("oneway")))
        return {"rpc_id": call.id}
    if kind == "command":
        command, payload, ttl = r.get("command"), r.get("payload", ""), r.get("ttl", 300)
        if not isinstance(command, str) or not 0 < len(command.encode()) <= 255:
            raise ValueError("command: required string of 1-255 bytes")
        if not isinstance(payload, str):
            raise ValueError("payload: must be a string")
        if not isinstance(ttl, (int, float)) or not 0 < ttl <= 86400:
            raise ValueError("ttl: seconds, > 0 and <= 86400")
        return {"delivery": downlink.command(device, command, payload.encode(), float(ttl))}
    if kind == "attributes":
        values = r.get("values")
        if not isinstance(values, dict):
            raise RegistryError("values: expected an object of key -> value")
        return {"delivery": downlink.set_shared(device, values)}
    if kind in KINDS:
        package = r.get("package")
        if not isinstance(package, int) or isinstance(package, bool):
            raise ValueError("package: expected a package id (integer)")
        p = management.assign(tenant, device.device, kind, package)
        return {"delivery": assign_attributes(downlink, device, kind, p)}
    raise ValueError(f"type: {kind!r} is not one of rpc, command, attributes, firmware, software")


def assign_attributes(downlink: Downlink, device, kind: str, package) -> str:
    """Tell the device of its new package the ThingsBoard way: shared attributes it observes."""
    prefix = "fw" if kind == "firmware" else "sw"
    return downlink.set_shared(device, {
        f"{prefix}_title": package.title, f"{prefix}_version": package.version, f"{prefix}_size": package.size,
        f"{prefix}_checksum": package.sha256, f"{prefix}_checksum_algorithm": "SHA256",
    })
