"""Payload decoders: CBOR or JSON flat maps of metric -> value, strictly validated.

A reading is all or nothing: the first offending field rejects the whole payload with a
`PayloadError` that names the field and the reason, so no partial point is ever produced.
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any, NamedTuple

import cbor2
import msgspec

from .. import content_format
from ..errors import RETRY_AFTER, BadInput, _code
from ..inputs import finite_float, not_json, repeated_key

CF_JSON = content_format.JSON
CF_CBOR = content_format.CBOR
#: what a flat map may be sent as, as a refusal names it
SEND = f"{content_format.name(CF_CBOR)} or {content_format.name(CF_JSON)}"


class PayloadError(BadInput):
    """A payload that cannot become a TelemetryPoint (4.00). `field` is None when no field is to blame."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"field {field!r}: {reason}" if field is not None else reason)


class Overloaded(PayloadError):
    """The decoder could not finish within its limits (a JavaScript codec's CPU time or memory):
    not the device's fault and maybe not the next try's either -- 5.03 with Max-Age."""

    coap = _code(5, 3)
    http = 503
    retry_after = RETRY_AFTER


class UnsupportedFormat(PayloadError):
    """The Content-Format is not one the profile decodes (CoAP 4.15)."""

    coap = _code(4, 15)
    http = 415


class Readings(NamedTuple):
    numeric: dict[str, float]
    strings: dict[str, str]
    ts: int | None
    #: field -> unit (SenML `u`, a profile's `unit`), when the payload or the profile says
    units: dict[str, str] | None = None


#: Largest accepted `ts`: year 9999 in ms.  Anything beyond is a unit mistake (µs or ns).
MAX_TS_MS = 253_402_300_799_999


def decode_cbor(payload: bytes | bytearray | memoryview, depth: int = 0) -> Any:
    """One CBOR data item, nested at most `depth` maps or arrays deep (DECODE_DEPTH: a flat map
    and one level more, so that a nested field can be named)."""
    depth = depth or DECODE_DEPTH
    if payload[:3] == SELF_DESCRIBED:  # (RFC 8949 §3.4.6: tag 55799 only says "CBOR follows")
        payload = payload[3:]
    fp = io.BytesIO(payload)
    try:
        value = cbor2.CBORDecoder(fp, max_depth=depth, allow_duplicate_keys=False).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise PayloadError(f"invalid CBOR: {_cbor_problem(payload, e, depth)}") from None
    if fp.tell() != len(payload):
        raise PayloadError(f"invalid CBOR: {len(payload) - fp.tell()} trailing bytes after the map")
    return value


#: the self-described CBOR prefix (tag 55799), which some encoders put before every document
SELF_DESCRIBED = b"\xd9\xd9\xf7"
#: cbor2's max_depth: a map (1) of maps (2) of maps (3) decodes, so flat_readings can name the field
DECODE_DEPTH = 3
#: how deep `_cbor_problem` decodes again to tell a document nested too deep from one not well-formed
#: (error path only; deeper than this is "not well-formed" -- which it may be)
RETRY_DEPTH = 2000


def _cbor_problem(payload: bytes | bytearray | memoryview, error: BaseException, depth: int) -> str:
    """Why cbor2 refused `payload`, in corem's words: cbor2's messages change between releases,
    and a device (and its developer's tests) should see the same reason whichever is installed.
    Found by trying again with one restriction lifted; runs on the error path only."""
    if isinstance(error, cbor2.CBORDecodeEOF):
        return "the data ends before the value is complete"
    for limit, duplicates, reason in (
        (depth, True, "a map repeats a key"),
        # (bounded, found in review: cbor2 builds what it decodes, and freeing tens of thousands of
        # nested tags overflows the C stack; no item nests deeper than it has bytes)
        (RETRY_DEPTH, False, f"nested deeper than {depth} maps or arrays"),
    ):
        try:
            cbor2.CBORDecoder(io.BytesIO(payload), max_depth=limit, allow_duplicate_keys=duplicates).decode()
        except Exception:  # noqa: BLE001 - still refused: not this restriction
            continue
        return reason
    if isinstance(error, cbor2.CBORDecodeError) and not isinstance(error, ValueError):
        return "not well-formed"
    return "a tagged or special value does not decode"


_json = msgspec.json.Decoder()


def decode_json(payload: bytes | bytearray | memoryview) -> Any:
    """The JSON document, or PayloadError saying why not: as CBOR's decoder, a map that repeats a
    key is refused -- JSON parsers keep one of the two silently, and the reading the device sent
    under the other would be lost with a 2.04 (RFC 8259 §4: names SHOULD be unique)."""
    try:
        value = _json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec < 0.23 let UnicodeDecodeError through
        raise PayloadError(f"invalid JSON: {_json_problem(bytes(payload))}") from None
    except RecursionError:  # (msgspec's decoder recurses: ~3,000 nested arrays are past Python's limit)
        raise PayloadError("invalid JSON: nested too deep") from None
    data = bytes(payload)  # (`in` on a memoryview looks for an int)
    if b"{" in data:  # (a second read for the names msgspec does not report: the Python path only --
        # the fast lane checks them as it reads, and hands a document that repeats one to this path)
        try:
            json.loads(data, object_pairs_hook=_unique_names)
        except RecursionError:
            raise PayloadError("invalid JSON: nested too deep") from None
    return value


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, or PayloadError naming the key it repeats (json.loads lets it out)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise PayloadError("invalid JSON: a map repeats a key", repeated_key(pairs))
    return obj


def _json_problem(data: bytes) -> str:
    """Why msgspec refused `data`, in corem's words and with the byte where it went wrong (as
    for CBOR: msgspec's messages are not corem's to pass on).  Error path only."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"text is not UTF-8 at byte {e.start}"
    try:
        json.loads(text, parse_constant=not_json, parse_float=finite_float)
    except json.JSONDecodeError as e:
        return f"not well-formed at byte {len(text[: e.pos].encode())}"
    except RecursionError:
        return "nested too deep"
    except ValueError as e:
        if str(e).endswith("is not a JSON number"):  # (`not_json`'s; else 1e999, or an integer of 4,300+ digits)
            return "NaN and Infinity are not JSON numbers"
        return "a number is out of range"
    # (Python's json took it: a string with a lone surrogate escape, \ud800, which is no Unicode)
    return "a string holds a lone surrogate escape (\\uD800-\\uDFFF without its pair)"


DECODERS = {CF_CBOR: decode_cbor, CF_JSON: decode_json}


def flat_readings(value: object) -> Readings:
    """Split a decoded map into numeric and string readings; `ts` is the point's time."""
    if not isinstance(value, dict):
        raise PayloadError(f"expected a map of metric -> value, got {kind(value)}")
    if not value:
        raise PayloadError("the map has no readings")
    numeric: dict[str, float] = {}
    strings: dict[str, str] = {}
    ts = None
    for key, v in value.items():
        if type(key) is not str:
            raise PayloadError(f"map keys must be text strings, got {kind(key)}", shown(key))
        if not key:
            raise PayloadError("metric name is empty", key)
        if key == "ts":
            if type(v) is not int or not 0 <= v <= MAX_TS_MS:
                raise PayloadError("ts must be an integer of milliseconds since the epoch", key)
            ts = v
        elif not put_scalar(key, v, numeric, strings):
            raise PayloadError(f"{kind(v)} values are not allowed; send numbers, booleans or text", key)
    if not numeric and not strings:
        raise PayloadError("the map has no readings, only ts")
    return Readings(numeric, strings, ts)


def put_scalar(key: str, v: object, numeric: dict[str, float], strings: dict[str, str]) -> bool:
    """A number, boolean (1.0 / 0.0) or text value into its readings; False for anything else."""
    if isinstance(v, bool):  # (before int: a bool is one)
        numeric[key] = 1.0 if v else 0.0
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise PayloadError(f"{v} is not a finite number", key)
        numeric[key] = v
    elif isinstance(v, int):
        numeric[key] = float_of(v, key)
    elif isinstance(v, str):
        strings[key] = v
    else:
        return False
    return True


def float_of(v: int, field: str) -> float:
    """An integer from a device as the float a point holds it in; PayloadError naming `field`
    where no float can (the one rule for every format and for values kept as JSON)."""
    try:
        return float(v)
    except OverflowError:
        raise PayloadError("integer too large for a float", field) from None


def shown(key: object) -> str:
    """A key from a device's document as an error quotes it: a scalar or a byte string as it is
    (cut at 40 characters), anything else -- a map, an array, a bignum -- as `<its kind>`: `repr`
    of a bignum past 4,300 digits raises, and of a deeply nested key runs long."""
    if isinstance(key, (str, bytes)):
        return repr(key[:40])
    if type(key) in _SCALARS and not (type(key) is int and key.bit_length() > 64):
        return repr(key)
    return f"<{kind(key)}>"


def kind(value: object) -> str:
    """A decoded value's kind in CBOR's and JSON's terms (never a Python or cbor2 class name)."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "nested map"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, (bytes, bytearray)):
        return "byte string"
    if isinstance(value, cbor2.CBORSimpleValue) or value is cbor2.undefined:
        return "CBOR simple"
    return _SCALARS.get(type(value), "CBOR tag")


_SCALARS = {bool: "boolean", int: "integer", float: "float", str: "text string"}


_KIND = "(null|nested map|array|byte string|CBOR simple|CBOR tag|boolean|integer|float|text string)"
#: Every reason a PayloadError gives, as patterns: corem's own words, whichever cbor2 or msgspec is
#: installed (tests and fuzz/fuzz_payload.py hold every refusal to one of them).
REASONS = tuple(re.compile(p) for p in (
    r"content-format: missing; send application/cbor \(60\) or application/json \(50\)",
    r"content-format \d+ is not supported; send application/cbor \(60\) or application/json \(50\)",
    r"empty payload",
    r"invalid CBOR: (the data ends before the value is complete|a map repeats a key|not well-formed"
    r"|nested deeper than \d+ maps or arrays|a tagged or special value does not decode|\d+ trailing bytes after the map)",
    r"invalid JSON: (text is not UTF-8 at byte \d+|not well-formed at byte \d+"
    r"|NaN and Infinity are not JSON numbers|a number is out of range|nested too deep|a map repeats a key"
    r"|a string holds a lone surrogate escape \(\\uD800-\\uDFFF without its pair\))",
    rf"expected a map of metric -> value, got {_KIND}",
    r"the map has no readings(, only ts)?",
    rf"map keys must be text strings, got {_KIND}",
    r"metric name is empty",
    r"ts must be an integer of milliseconds since the epoch",
    r"(nan|inf|-inf) is not a finite number",
    r"integer too large for a float",
    rf"{_KIND} values are not allowed; send numbers, booleans or text",
))


def is_corem_reason(reason: str) -> bool:
    return any(p.fullmatch(reason) for p in REASONS)


def decode_readings(content_format: int | None, payload: bytes | bytearray | memoryview) -> Readings:
    """Decode a telemetry payload of the given Content-Format into readings, or raise."""
    if content_format is None:
        raise PayloadError(f"content-format: missing; send {SEND}")
    decoder = DECODERS.get(content_format)
    if decoder is None:
        raise UnsupportedFormat(
            f"content-format {content_format} is not supported; send {SEND}"
        )
    if not payload:
        raise PayloadError("empty payload")
    return flat_readings(decoder(payload))
