"""Payload formats a profile can decode: one request becomes one or more points, all or nothing.

Each decoder takes `(content_format, payload)` and returns a list of `Readings` (one per point) or
raises `PayloadError` naming the field; the first bad record rejects the whole payload.

- `thingsboard` (ThingsBoard's CoAP device API, JSON 50 or CBOR 60): a flat map
  `{"temperature": 25.5}`, a timestamped one `{"ts": 1672531200000, "values": {...}}`, or an array
  of either.  As in ThingsBoard, every key of a flat map is a value (`ts` only means the time in
  the `{"ts", "values"}` form).  A nested map (or an array) in the values is flattened to
  `outer.inner` fields, kept as JSON text, or refused: the profile's `nested`.
- `array` (JSON 50 / CBOR 60): positional values, `[22.5, 65, "ok"]`, named by the profile's
  `positions`; an array of such arrays is one point each.
- `binary` (application/octet-stream 42, or no Content-Format): a fixed layout of numbers
  (`int16be`, `uint8`, `float32le`, ... and `skip`), exactly as long as the payload.
- `cayenne-lpp` (42, or none): Cayenne Low Power Payload, fields `{type}_{channel}` with units.
- `senml` (RFC 8428: JSON 110 / 111, CBOR 112 / 113; application/json and application/cbor are
  read as SenML too): base name, time, unit, value and sum resolved over the pack (§4.6),
  `v` / `vs` / `vb` / `vd` (base64url text), a sum `s` as the field `{name}.sum`, relative times (below 2**28 s, §4.5.3) from the moment it came,
  records grouped into one point per resolved time, units kept.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import sys
from typing import Any, Callable

from .. import content_format
from ..content_format import name as cf_name
from .payload import (
    CF_CBOR,
    CF_JSON,
    MAX_TS_MS,
    PayloadError,
    Readings,
    UnsupportedFormat,
    decode_cbor,
    decode_json,
    float_of,
    kind,
    put_scalar,
    shown,
)

#: (content_format, payload, now_ms) -> the points' readings
FormatDecoder = Callable[[int | None, bytes | bytearray | memoryview, int], list[Readings]]

#: Points one payload may carry (a bound: a request is one reply, whatever it holds).
MAX_POINTS = 1000
#: Nesting a value may have (ThingsBoard's, a JavaScript codec's data: JSON and CBOR alike), bounded
#: where `put_value` flattens it or keeps it as JSON text: deeper is the sender's 4.00, naming the
#: field, where Python's recursion limit (~1,000 frames) made it a 5.00.  (SenML and positional
#: arrays take no nested value at all: their CBOR is decoded to the same DECODE_NESTING, one bound
#: for every CBOR document, and what nests is refused by its type.)
MAX_NESTING = 64
#: Nesting a CBOR document is decoded to: past MAX_NESTING by the most a format wraps a value in (an
#: array of `{"ts", "values"}` maps: 3) and one more, so that a value nested up to MAX_NESTING is
#: taken in either format and one a level deeper meets `put_value`'s bound, naming the field, as in
#: JSON (decoded to msgspec's recursion limit); deeper still, `invalid CBOR: nested deeper than 68
#: maps or arrays`.  It was 16 while JSON went to 64: a document was taken as JSON and refused as
#: CBOR.  Not deeper (found in review): cbor2 builds what it decodes, and a map key nested hundreds
#: of levels deep is past what `repr` follows in an error, its tags past what freeing them does
DECODE_NESTING = MAX_NESTING + 4

CF_SENML_JSON, CF_SENSML_JSON = content_format.SENML_JSON, content_format.SENSML_JSON
CF_SENML_CBOR, CF_SENSML_CBOR = content_format.SENML_CBOR, content_format.SENSML_CBOR


class Series(list[Readings]):
    """The points of a payload that was an array of them: a rule broken by one is named by its
    place (`[0].temperature`), as the format's own errors are, even in an array of one."""


def _document(content_format: int | None, payload: bytes | bytearray | memoryview, json_formats: tuple[int, ...],
              cbor_formats: tuple[int, ...], names: str) -> Any:
    if content_format is None:
        raise PayloadError(f"content-format: missing; send {names}")
    if not payload:
        raise PayloadError("empty payload")
    if content_format in json_formats:
        return decode_json(payload)
    if content_format in cbor_formats:
        return decode_cbor(payload, DECODE_NESTING)
    raise UnsupportedFormat(f"content-format {content_format} is not supported by this profile; send {names}")


# -- ThingsBoard -----------------------------------------------------------------------------------
def thingsboard(nested: str) -> FormatDecoder:
    """A decoder for ThingsBoard's telemetry payloads; `nested`: "reject", "flatten" or "json"."""

    def decode(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        doc = _document(content_format, payload, (CF_JSON,), (CF_CBOR,),
                        f"{cf_name(CF_JSON)} or {cf_name(CF_CBOR)}")
        entries = doc if isinstance(doc, list) else [doc]
        if not entries:
            raise PayloadError("the array has no points")
        if len(entries) > MAX_POINTS:
            raise PayloadError(f"{len(entries)} points in one payload; at most {MAX_POINTS}")
        if not isinstance(doc, list):
            return [thingsboard_entry(doc, None, nested)]
        return Series(thingsboard_entry(e, i, nested) for i, e in enumerate(entries))

    return decode


def thingsboard_entry(entry: object, index: int | None, nested: str) -> Readings:
    """One ThingsBoard point (a flat map or `{ts, values}`; a decoded protobuf message too)."""
    where = "" if index is None else f"[{index}]."
    if not isinstance(entry, dict):
        raise PayloadError(f"expected a map of key -> value or {{\"ts\", \"values\"}}, got {kind(entry)}",
                           where.rstrip(".") or None)
    ts = None
    values: object = entry
    if "values" in entry and set(entry) <= {"ts", "values"}:
        values = entry["values"]
        if "ts" in entry:
            ts = entry["ts"]
            if type(ts) is not int or not 0 <= ts <= MAX_TS_MS:
                raise PayloadError("ts must be an integer of milliseconds since the epoch", f"{where}ts")
        if not isinstance(values, dict):
            raise PayloadError(f"values must be a map of key -> value, got {kind(values)}", f"{where}values")
        where += "values."
    numeric: dict[str, float] = {}
    strings: dict[str, str] = {}
    assert isinstance(values, dict)
    for key, value in values.items():
        put_value(key, value, where, nested, numeric, strings)
    if not numeric and not strings:
        raise PayloadError("the map has no readings", where.rstrip(".") or None)
    return Readings(numeric, strings, ts)


def put_value(key: object, value: object, where: str, nested: str, numeric: dict[str, float],
              strings: dict[str, str], prefix: str = "", depth: int = 0) -> None:
    """One key's value into the readings: a scalar as it is, a map or an array as `nested` says
    (ThingsBoard's values, a JavaScript codec's data), at most MAX_NESTING levels deep."""
    if type(key) is not str or not key:
        raise PayloadError("keys must be non-empty text strings", f"{where}{prefix}{shown(key)}")
    name = prefix + key
    if value is None:
        raise PayloadError("null values are not allowed", where + name)
    if name in numeric or name in strings:  # ({"a.b": 1, "a": {"b": 2}} flattened: one would be lost)
        raise PayloadError("the name is given twice once nested maps are flattened", where + name)
    if put_scalar(name, value, numeric, strings):
        return
    if isinstance(value, (dict, list)):
        if depth >= MAX_NESTING:  # (only flatten recurses: json's depth is its own, below)
            raise PayloadError(f"nested deeper than {MAX_NESTING} maps or arrays", where + name)
        if nested == "json":
            strings[name] = json.dumps(_plain(value, where + name, depth), separators=(",", ":"), ensure_ascii=False)
            return
        if nested == "flatten":
            items = value.items() if isinstance(value, dict) else ((str(i), v) for i, v in enumerate(value))
            for inner, v in items:
                put_value(inner, v, where, nested, numeric, strings, name + ".", depth + 1)
            return
        raise PayloadError(f"{kind(value)} values are not allowed (the profile's nested is reject; "
                           "flatten or json take them)", where + name)
    raise PayloadError(f"{kind(value)} values are not allowed; send numbers, booleans, text or maps", where + name)


def _plain(value: object, field: str, depth: int = 0) -> object:
    """`value` as JSON can say it (CBOR may hold what JSON cannot: refused, naming the field), at
    most MAX_NESTING levels deep (as put_value flattens: json.dumps would recurse past Python's limit)."""
    if isinstance(value, (dict, list)) and depth >= MAX_NESTING:
        raise PayloadError(f"nested deeper than {MAX_NESTING} maps or arrays", field)
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            raise PayloadError("keys must be text strings", field)
        return {k: _plain(v, f"{field}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{field}.{i}", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, int) and not isinstance(value, bool):
        float_of(value, field)  # (refused as put_scalar refuses it: JSON text cannot say it)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise PayloadError(f"{kind(value)} values cannot be kept as JSON", field)


# -- SenML (RFC 8428) ------------------------------------------------------------------------------
#: CBOR labels (RFC 8428 §6, Table 4)
LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs", 0: "n", 1: "u", 2: "v", 3: "vs",
          4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}
#: a resolved name (§4.5.1)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-:./_]*")
#: times below this are relative to now (§4.5.3)
RELATIVE_BELOW = 2 ** 28
SENML_VERSION = 10


def senml(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
    doc = _document(content_format, payload, (CF_SENML_JSON, CF_SENSML_JSON, CF_JSON),
                    (CF_SENML_CBOR, CF_SENSML_CBOR, CF_CBOR),
                    f"{cf_name(CF_SENML_JSON)} or {cf_name(CF_SENML_CBOR)}")
    if not isinstance(doc, list):
        raise PayloadError(f"a SenML pack is an array of records, got {kind(doc)}")
    if not doc:
        raise PayloadError("the pack has no records")
    if len(doc) > MAX_POINTS:
        raise PayloadError(f"{len(doc)} records in one pack; at most {MAX_POINTS}")
    base: dict[str, Any] = {"bn": "", "bt": 0.0, "bu": None, "bv": 0.0, "bs": 0.0}
    points: dict[int, Readings] = {}
    for i, raw in enumerate(doc):
        record = _record(raw, i)
        for label in ("bn", "bt", "bu", "bv", "bs"):
            if label in record:
                base[label] = record[label]
        name = base["bn"] + record.get("n", "")
        field = name or f"[{i}]"
        if not NAME_RE.fullmatch(name):
            raise PayloadError("the resolved name (bn + n) must start with a letter or digit and hold only "
                               "A-Z a-z 0-9 - : . / _", field)
        t = base["bt"] + record.get("t", 0.0)
        seconds = now_ms / 1000 + t if t < RELATIVE_BELOW else t
        ts = round(seconds * 1000) if math.isfinite(seconds * 1000) else -1  # (bt + t may overflow to inf)
        if not 0 <= ts <= MAX_TS_MS:
            raise PayloadError("the resolved time is outside year 1970 to 9999", field)
        point = points.get(ts)
        if point is None:
            point = points[ts] = Readings({}, {}, ts, {})
        values = [k for k in ("v", "vs", "vb", "vd") if k in record]
        if len(values) > 1:
            raise PayloadError(f"a record has one value; this one has {', '.join(values)}", field)
        if not values and "s" not in record:
            raise PayloadError("the record has no value (v, vs, vb, vd or s)", field)
        unit = record.get("u", base["bu"])
        if values:
            _put(point, name, _value(values[0], record[values[0]], base, field), unit, field)
        if "s" in record:
            _put(point, name + ".sum", float(base["bs"] + record["s"]), unit, field + ".sum")
    return [p if p.units else p._replace(units=None) for p in points.values()]


def _record(raw: object, index: int) -> dict[str, Any]:
    """One record with its labels as names, each checked for its type (§4.3, §6)."""
    if not isinstance(raw, dict):
        raise PayloadError(f"a record is a map, got {kind(raw)}", f"[{index}]")
    record: dict[str, Any] = {}
    for key, value in raw.items():
        label = LABELS.get(key) if type(key) is int else key if type(key) is str else None
        if label is None:
            raise PayloadError(f"{shown(key)} is not a SenML label", f"[{index}]")
        if label.endswith("_"):  # §4.4: must-understand labels corem does not know
            raise PayloadError("a label ending in _ must be understood; corem does not know this one",
                               f"[{index}].{label}")
        if label not in _TYPES:
            continue  # an extension corem may ignore (§4.4)
        want, what = _TYPES[label]
        if not want(value):
            raise PayloadError(f"{label} must be {what}, got {kind(value)}", f"[{index}].{label}")
        record[label] = value
    version = record.get("bver", SENML_VERSION)
    if version > SENML_VERSION:
        raise PayloadError(f"bver {version}: corem reads SenML version {SENML_VERSION} and below", f"[{index}].bver")
    return record


def _number(v: object) -> bool:
    if isinstance(v, int) and not isinstance(v, bool):  # (a huge integer: not a finite float either)
        return abs(v) <= sys.float_info.max
    return isinstance(v, float) and math.isfinite(v)


_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "bn": (lambda v: isinstance(v, str), "text"), "n": (lambda v: isinstance(v, str), "text"),
    "bu": (lambda v: isinstance(v, str), "text"), "u": (lambda v: isinstance(v, str), "text"),
    "vs": (lambda v: isinstance(v, str), "text"), "vb": (lambda v: isinstance(v, bool), "true or false"),
    "vd": (lambda v: isinstance(v, (str, bytes)), "data (base64url text in JSON, bytes in CBOR)"),
    "bver": (lambda v: type(v) is int and v >= 0, "a non-negative integer"),
    **{k: (_number, "a finite number") for k in ("bt", "bv", "bs", "v", "s", "t", "ut")},
}


def _value(label: str, value: Any, base: dict[str, Any], field: str) -> float | str:
    if label == "v":
        return float(base["bv"] + value)
    if label == "vb":
        return 1.0 if value else 0.0
    if label == "vd":
        if isinstance(value, bytes):
            return base64.urlsafe_b64encode(value).rstrip(b"=").decode()
        if not re.fullmatch(r"[A-Za-z0-9_-]*", value):
            raise PayloadError("vd must be base64url without padding (RFC 8428 §5)", field)
        return str(value)
    return str(value)


def _put(point: Readings, name: str, value: float | str, unit: str | None, field: str) -> None:
    if name in point.numeric or name in point.strings:
        raise PayloadError("the pack gives this name twice at the same time", field)
    if isinstance(value, str):
        point.strings[name] = value
    else:
        if not math.isfinite(value):
            raise PayloadError(f"{value} is not a finite number", field)
        point.numeric[name] = value
    if unit:
        assert point.units is not None
        point.units[name] = unit


# -- positional arrays ------------------------------------------------------------------------------
def positional(positions: list[str | None]) -> FormatDecoder:
    """A CBOR or JSON array whose places are the profile's `positions` (`[22.5, 65, "ok"]`);
    an array of such arrays is one point each.  A place named `ts` is the point's time (ms)."""

    def decode(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        doc = _document(content_format, payload, (CF_JSON,), (CF_CBOR,),
                        f"{cf_name(CF_CBOR)} or {cf_name(CF_JSON)}")
        if not isinstance(doc, list):
            raise PayloadError(f"expected an array of {len(positions)} values, got {kind(doc)}")
        rows = doc if doc and all(isinstance(r, list) for r in doc) else [doc]
        if len(rows) > MAX_POINTS:
            raise PayloadError(f"{len(rows)} points in one payload; at most {MAX_POINTS}")
        if rows is not doc:
            return [_row(doc, positions, None)]
        return Series(_row(row, positions, i) for i, row in enumerate(rows))

    return decode


def _row(row: list[Any], positions: list[str | None], index: int | None) -> Readings:
    where = "" if index is None else f"[{index}]"
    if len(row) != len(positions):
        raise PayloadError(f"{len(row)} values; the profile names {len(positions)} positions", where or None)
    numeric: dict[str, float] = {}
    strings: dict[str, str] = {}
    ts = None
    for name, value in zip(positions, row):
        if name is None:
            continue
        if name == "ts":
            if type(value) is not int or not 0 <= value <= MAX_TS_MS:
                raise PayloadError("ts must be an integer of milliseconds since the epoch", f"{where}ts" if where else "ts")
            ts = value
        elif not put_scalar(name, value, numeric, strings):
            raise PayloadError(f"{kind(value)} values are not allowed; send numbers, booleans or text",
                               f"{where}.{name}" if where else name)
    if not numeric and not strings:
        raise PayloadError("the array has no readings", where or None)
    return Readings(numeric, strings, ts)


# -- fixed binary layouts ---------------------------------------------------------------------------
CF_OCTETS = content_format.OCTETS


def binary_payload(content_format: int | None, payload: bytes | bytearray | memoryview,
                   empty: bool = False) -> bytes:
    """The bytes of a payload sent as application/octet-stream or with no Content-Format; `empty`:
    none at all is a payload too (a proto3 message whose every field is at its default)."""
    if content_format not in (None, CF_OCTETS):
        raise UnsupportedFormat(f"content-format {content_format} is not supported by this profile; send "
                                f"{cf_name(CF_OCTETS)} or no Content-Format")
    if not payload and not empty:
        raise PayloadError("empty payload")
    return bytes(payload)


def binary(layout: list[tuple[str | None, str, int]]) -> FormatDecoder:
    """A fixed layout of numbers (`int16be temperature, uint8 humidity, ...`): the payload is
    exactly as long as the layout; `layout` is (name, struct format or "skip", skip bytes)."""
    # a struct per field: byte order is per field
    parts = [(name, struct.Struct(f if f != "skip" else f"{n}x")) for name, f, n in layout]
    size = sum(s.size for _, s in parts)

    def decode(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        data = binary_payload(content_format, payload)
        if len(data) != size:
            raise PayloadError(f"the payload is {len(data)} bytes; the profile's layout reads {size}")
        numeric: dict[str, float] = {}
        at = 0
        for name, s in parts:
            if name is not None:
                value = float(s.unpack_from(data, at)[0])
                if not math.isfinite(value):
                    raise PayloadError(f"{value} is not a finite number", name)
                numeric[name] = value
            at += s.size
        return [Readings(numeric, {}, None)]

    return decode


# -- Cayenne LPP ------------------------------------------------------------------------------------
#: LPP type -> (name, bytes, signed, divisor, unit, axes); multi-axis types give one field per axis
LPP_TYPES: dict[int, tuple[str, int, bool, float, str | None, tuple[str, ...]]] = {
    0: ("digital_in", 1, False, 1, None, ()), 1: ("digital_out", 1, False, 1, None, ()),
    2: ("analog_in", 2, True, 100, None, ()), 3: ("analog_out", 2, True, 100, None, ()),
    100: ("generic", 4, False, 1, None, ()), 101: ("illuminance", 2, False, 1, "lx", ()),
    102: ("presence", 1, False, 1, None, ()), 103: ("temperature", 2, True, 10, "Cel", ()),
    104: ("humidity", 1, False, 2, "%RH", ()), 113: ("accelerometer", 6, True, 1000, "g", ("x", "y", "z")),
    115: ("barometer", 2, False, 10, "hPa", ()), 116: ("voltage", 2, False, 100, "V", ()),
    117: ("current", 2, False, 1000, "A", ()), 118: ("frequency", 4, False, 1, "Hz", ()),
    120: ("percentage", 1, False, 1, "%", ()), 121: ("altitude", 2, True, 1, "m", ()),
    125: ("concentration", 2, False, 1, "ppm", ()), 128: ("power", 2, False, 1, "W", ()),
    130: ("distance", 4, False, 1000, "m", ()), 131: ("energy", 4, False, 1000, "kWh", ()),
    132: ("direction", 2, False, 1, "deg", ()), 133: ("unixtime", 4, False, 1, "s", ()),
    134: ("gyrometer", 6, True, 100, "deg/s", ("x", "y", "z")), 135: ("colour", 3, False, 1, None, ("r", "g", "b")),
    136: ("gps", 9, True, 1, None, ("latitude", "longitude", "altitude")), 142: ("switch", 1, False, 1, None, ()),
}
#: GPS packs three 3-byte values with their own divisors
GPS = ((3, 10000, "lat"), (3, 10000, "lon"), (3, 100, "m"))


def cayenne_lpp(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
    """Cayenne Low Power Payload: [channel, type, value...]*; fields are `{type}_{channel}`
    (`temperature_1`), as The Things Stack's LPP decoder names them, with their units."""
    data = binary_payload(content_format, payload)
    numeric: dict[str, float] = {}
    units: dict[str, str] = {}
    at = 0
    while at < len(data):
        if len(data) - at < 2:
            raise PayloadError(f"byte {at}: a channel without a type")
        channel, code = data[at], data[at + 1]
        spec = LPP_TYPES.get(code)
        if spec is None:
            raise PayloadError(f"byte {at + 1}: type {code} is not a Cayenne LPP type", f"channel {channel}")
        name, size, signed, divisor, unit, axes = spec
        field = f"{name}_{channel}"
        body = data[at + 2: at + 2 + size]
        if len(body) < size:
            raise PayloadError(f"byte {at + 2}: {name} needs {size} bytes, {len(body)} left", field)
        if field in numeric or f"{field}.{axes[0] if axes else ''}" in numeric:
            raise PayloadError("the payload gives this channel and type twice", field)
        if code == 136:
            offset = 0
            for (n, div, u), axis in zip(GPS, axes):
                numeric[f"{field}.{axis}"] = int.from_bytes(body[offset:offset + n], "big", signed=True) / div
                units[f"{field}.{axis}"] = u
                offset += n
        elif axes:
            step = size // len(axes)
            for i, axis in enumerate(axes):
                raw = int.from_bytes(body[i * step:(i + 1) * step], "big", signed=signed)
                numeric[f"{field}.{axis}"] = raw / divisor
                if unit:
                    units[f"{field}.{axis}"] = unit
        else:
            numeric[field] = int.from_bytes(body, "big", signed=signed) / divisor
            if unit:
                units[field] = unit
        at += 2 + size
    return [Readings(numeric, {}, None, units or None)]
