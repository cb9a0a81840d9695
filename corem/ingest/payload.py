"""Payload decoders: CBOR or JSON flat maps of metric -> value, strictly validated.

A reading is all or nothing: the first offending field rejects the whole payload with a
`PayloadError` that names the field and the reason, so no partial point is ever produced.
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

import cbor2
import msgspec

CF_JSON = 50
CF_CBOR = 60


class PayloadError(ValueError):
    """A payload that cannot become a TelemetryPoint. `field` is None when no field is to blame."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"field {field!r}: {reason}" if field is not None else reason)


class UnsupportedFormat(PayloadError):
    """The Content-Format is not one the profile decodes (CoAP 4.15)."""


class Readings(NamedTuple):
    numeric: dict[str, float]
    strings: dict[str, str]
    ts: int | None


#: Largest accepted `ts`: year 9999 in ms.  Anything beyond is a unit mistake (µs or ns).
MAX_TS_MS = 253_402_300_799_999


def decode_cbor(payload: bytes | memoryview) -> dict:
    fp = io.BytesIO(payload)
    try:
        # max_depth 3 lets one level of nesting through so that the field can be named below
        value = cbor2.CBORDecoder(fp, max_depth=3, allow_duplicate_keys=False).decode()
    except cbor2.CBORDecodeError as e:
        raise PayloadError(f"invalid CBOR: {e}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise PayloadError(f"invalid CBOR: {e}") from None
    if fp.tell() != len(payload):
        raise PayloadError(f"invalid CBOR: {len(payload) - fp.tell()} trailing bytes after the map")
    return value


_json = msgspec.json.Decoder()


def decode_json(payload: bytes | memoryview) -> dict:
    try:
        return _json.decode(payload)
    except msgspec.DecodeError as e:
        raise PayloadError(f"invalid JSON: {e}") from None
    except UnicodeDecodeError as e:  # msgspec lets this one through (found by fuzz/fuzz_payload.py)
        raise PayloadError(f"invalid JSON: text is not UTF-8 at byte {e.start}") from None


DECODERS = {CF_CBOR: decode_cbor, CF_JSON: decode_json}


def flat_readings(value: object) -> Readings:
    """Split a decoded map into numeric and string readings; `ts` is the point's time."""
    if not isinstance(value, dict):
        raise PayloadError(f"expected a map of metric -> value, got {_kind(value)}")
    if not value:
        raise PayloadError("the map has no readings")
    numeric: dict[str, float] = {}
    strings: dict[str, str] = {}
    ts = None
    for key, v in value.items():
        if type(key) is not str:
            raise PayloadError(f"map keys must be text strings, got {_kind(key)}", repr(key))
        if not key:
            raise PayloadError("metric name is empty", key)
        t = type(v)
        if key == "ts":
            if t is not int or not 0 <= v <= MAX_TS_MS:
                raise PayloadError("ts must be an integer of milliseconds since the epoch", key)
            ts = v
        elif t is float:
            if not math.isfinite(v):
                raise PayloadError(f"{v} is not a finite number", key)
            numeric[key] = v
        elif t is int:
            try:
                numeric[key] = float(v)
            except OverflowError:
                raise PayloadError("integer too large for a float", key) from None
        elif t is str:
            strings[key] = v
        elif t is bool:
            numeric[key] = 1.0 if v else 0.0
        else:
            raise PayloadError(f"{_kind(v)} values are not allowed; send numbers, booleans or text", key)
    if not numeric and not strings:
        raise PayloadError("the map has no readings, only ts")
    return Readings(numeric, strings, ts)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "nested map"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, (bytes, bytearray)):
        return "byte string"
    return type(value).__name__


def decode_readings(content_format: int | None, payload: bytes | memoryview) -> Readings:
    """Decode a telemetry payload of the given Content-Format into readings, or raise."""
    if content_format is None:
        raise PayloadError("content-format: missing; send application/cbor (60) or application/json (50)")
    decoder = DECODERS.get(content_format)
    if decoder is None:
        raise UnsupportedFormat(
            f"content-format {content_format} is not supported; send application/cbor (60) or application/json (50)"
        )
    if not payload:
        raise PayloadError("empty payload")
    return flat_readings(decoder(payload))
