"""Try a profile on a sample payload: what a device's bytes would become, without storing
anything (`POST /api/profiles/{name}/decode`, `corem profiles decode`, the diagnostics UI)."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from .payload import Overloaded, PayloadError, UnsupportedFormat, decode_readings
from .compile import compile_profile
from .rules import RuleViolation
from .spec import Profile
from ..errors import BadInput


class SampleError(BadInput):
    """The sample itself could not be read (not the device's payload: the request's)."""


def sample_bytes(hex_text: str | None = None, base64_text: str | None = None) -> bytes:
    """The payload given as hex (spaces allowed) or base64 (either alphabet, padding optional)."""
    if (hex_text is None) == (base64_text is None):
        raise SampleError("sample: give the payload as hex or as base64 (one of them)")
    if hex_text is not None:
        try:
            return bytes.fromhex(re.sub(r"\s+", "", hex_text))
        except ValueError:
            raise SampleError("hex: not hexadecimal digits (two per byte)") from None
    text = re.sub(r"\s+", "", base64_text or "").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SampleError("base64: not base64") from None


def decode_sample(profile: Profile | None, content_format: int | None, payload: bytes, now_ms: int) -> dict[str, Any]:
    """{"points": [...]} as they would go on the bus, or {"error", "reason", "field", "kind"} as
    the device would be answered (`profile` None: the built-in default)."""
    try:
        if profile is None:
            readings = [decode_readings(content_format, payload)]
        else:
            readings = compile_profile(profile)(content_format, payload, now_ms)
    except PayloadError as e:
        kind = ("rule_violation" if isinstance(e, RuleViolation) else
                "unsupported_format" if isinstance(e, UnsupportedFormat) else
                "codec_limit" if isinstance(e, Overloaded) else "decode_error")
        return {"error": str(e), "reason": e.reason, "field": e.field, "kind": kind,
                "code": {"unsupported_format": "4.15", "codec_limit": "5.03"}.get(kind, "4.00")}
    return {"points": [{"ts": now_ms if r.ts is None else r.ts, "numeric_values": r.numeric,
                        "string_values": r.strings, **({"units": r.units} if r.units else {})} for r in readings]}
