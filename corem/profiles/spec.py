"""A device profile as data: how a device's payloads decode, and the rules its readings obey.

A profile is a JSON object, stored in the registry under its name and named by each device that
uses it.  Everything in it is checked when it is written (`parse_profile`), with the offending
field named, so a profile that is stored is one that compiles:

    {"format": "thingsboard", "nested": "flatten",
     "fields": {"temperature": {"min": -40, "max": 85, "unit": "Cel", "required": true},
                "t_raw": {"rename": "temperature_c", "scale": 0.1},
                "state": {"allowed": ["idle", "running"]}}}

`format` says how the payload reads (corem/profiles/formats.py): `flat` (a map of metric -> value,
the built-in `default`), `thingsboard` (a flat map, `{"ts", "values"}`, or an array of either),
`senml` (RFC 8428, JSON or CBOR), `array`, `binary`, `cayenne-lpp`, `js` (a TS013 codec, js.py)
and `protobuf` (a proto3 `schema`, proto.py).  `fields` are the mapping and validation rules
(corem/profiles/rules.py), applied to every point the payload decodes to.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from ..errors import BadInput

#: Profile names are typed on command lines and travel in URLs: a short, safe alphabet.
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The built-in profile every device starts on; it cannot be changed or removed.
DEFAULT = "default"

FORMATS = ("flat", "thingsboard", "senml", "array", "binary", "cayenne-lpp", "js", "protobuf")
#: the binary layout's field types: struct format, size
BINARY_TYPES = {
    "int8": "b", "uint8": "B", "bool": "?",
    **{f"{k}{e}": f"{'>' if e == 'be' else '<'}{c}" for k, c in (("int16", "h"), ("uint16", "H"), ("int32", "i"),
                                                                   ("uint32", "I"), ("int64", "q"), ("uint64", "Q"),
                                                                   ("float32", "f"), ("float64", "d"))
       for e in ("be", "le")},
}


class ProfileError(BadInput):
    """A profile that cannot be stored; the message names the field and why."""


class Rule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """What one incoming field becomes and must satisfy.  Checks apply to the value after `scale`
    and `offset` (the physical value); `rename` applies last."""

    rename: str | None = None
    scale: float | None = None
    offset: float | None = None
    unit: str | None = None
    type: Literal["number", "string"] | None = None
    min: float | None = None
    max: float | None = None
    required: bool = False
    allowed: list[str] | None = None


class Part(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One field of a fixed binary layout, in order: its name (None: bytes to skip) and type."""

    name: str | None = None
    type: str = "uint8"
    #: for type "skip": how many bytes
    bytes: int = 0


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    format: Literal["flat", "thingsboard", "senml", "array", "binary", "cayenne-lpp", "js", "protobuf"] = "flat"
    #: thingsboard, protobuf: what a nested map in `values` becomes -- its leaves as `outer.inner` fields
    #: ("flatten"), the map as JSON text in one string field ("json"), or a 4.00 ("reject")
    nested: Literal["reject", "flatten", "json"] = "reject"
    fields: dict[str, Rule] = {}
    #: array: the name of each position of a CBOR or JSON array (None: a position to skip; "ts":
    #: the point's time, ms)
    positions: list[str | None] = []
    #: binary: the payload's fields in order (types: int8, uint8, bool, int16be ... float64le, skip)
    layout: list[Part] = []
    #: js: a LoRa Alliance TS013 codec (`function decodeUplink(input) {...}`), run in a sandbox
    script: str = ""
    #: js: what the codec gets as `input.fPort` (CoAP has no port) and `input.variables`
    fport: int = 1
    variables: dict[str, Any] = {}
    #: js: the limits of one call: CPU time and heap; past them the reading is answered 5.03
    timeout_ms: int = 50
    max_memory_mb: int = 32
    #: protobuf: the proto3 schema (ThingsBoard's telemetry schema), and the message a payload is
    #: (its name; "": the schema's last top-level message, as ThingsBoard takes it)
    schema: str = ""
    message: str = ""
    description: str = ""


_encoder = msgspec.json.Encoder()
CHOICES = {"format": FORMATS, "nested": ("reject", "flatten", "json"), "type": ("number", "string")}


def parse_profile(data: bytes | str) -> Profile:
    """A profile from its JSON text, checked whole (ProfileError names the field)."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise ProfileError(f"profile: not valid JSON ({e})") from None
    return profile_from(raw)


def profile_from(raw: object) -> Profile:
    """A profile from decoded JSON (the admin API's body), checked whole."""
    if not isinstance(raw, dict):
        raise ProfileError("profile: expected an object")
    fields = raw.get("fields", {})
    if not isinstance(fields, dict):
        raise ProfileError("fields: expected an object of field name -> rule")
    rules = {str(name): _convert(rule, Rule, f"fields.{name}") for name, rule in fields.items()}
    top = _convert({k: v for k, v in raw.items() if k != "fields"}, Profile, "")
    profile = msgspec.structs.replace(top, fields=rules)
    check(profile)
    return profile


def encode_profile(profile: Profile) -> bytes:
    return _encoder.encode(profile)


def _convert(raw: object, kind: type[msgspec.Struct], where: str) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as e:
        raise ProfileError(_explain(str(e), where)) from None


def _explain(message: str, where: str) -> str:
    """msgspec's "Expected `float | null`, got `str` - at `$.scale`" in corem's words, with the
    whole path: "fields.t.scale: expected a number, got text"."""
    text, sep, path = message.partition(" - at `$")
    path = ".".join(p for p in (where, path.rstrip("`").lstrip(".") if sep else "") if p) or "profile"
    unknown = re.fullmatch(r"Object contains unknown field `([^`]*)`", text)
    if unknown:
        return f"{path}: unknown field {unknown[1]!r}"
    enum = re.fullmatch(r"Invalid enum value (.*)", text)
    if enum:
        key = path.rpartition(".")[2]
        return f"{path}: {enum[1]} is not allowed; use one of {', '.join(CHOICES.get(key, ()))}"
    for theirs, ours in (("`float | null`", "a number"), ("`float`", "a number"), ("`str | null`", "text"),
                         ("`str`", "text"), ("`bool`", "true or false"), ("`object`", "an object"),
                         ("`array`", "an array"), ("`array | null`", "an array"), ("`int`", "an integer"),
                         ("`null`", "null"), ("Expected", "expected")):
        text = text.replace(theirs, ours)
    return f"{path}: {text}"


def check(profile: Profile) -> None:
    """The rules that JSON types alone do not say."""
    renamed: dict[str, str] = {}
    for name, rule in profile.fields.items():
        where = f"fields.{name}"
        if not name:
            raise ProfileError("fields: a field name is empty")
        if rule.rename is not None:
            if not rule.rename:
                raise ProfileError(f"{where}.rename: must not be empty")
            if rule.rename in renamed:
                raise ProfileError(f"{where}.rename: {rule.rename!r} is also what {renamed[rule.rename]!r} becomes")
            renamed[rule.rename] = name
        numeric = rule.scale is not None or rule.offset is not None or rule.min is not None or rule.max is not None
        if numeric and (rule.type == "string" or rule.allowed is not None):
            raise ProfileError(f"{where}: scale, offset, min and max are for numbers; allowed and type string "
                               "are for text")
        if rule.scale == 0:
            raise ProfileError(f"{where}.scale: 0 would make every value 0")
        if rule.min is not None and rule.max is not None and rule.min > rule.max:
            raise ProfileError(f"{where}: min {rule.min} is above max {rule.max}")
        if rule.allowed is not None and not rule.allowed:
            raise ProfileError(f"{where}.allowed: an empty list allows nothing")
    if (profile.format == "array") != bool(profile.positions):
        raise ProfileError("positions: the array format needs them, and only it" if profile.positions
                           else "positions: name each position of the array (null skips one)")
    if (profile.format == "binary") != bool(profile.layout):
        raise ProfileError("layout: the binary format needs one, and only it" if profile.layout
                           else "layout: give the payload's fields in order, e.g. [{\"name\": \"t\", \"type\": \"int16be\"}]")
    names = [n for n in profile.positions if n is not None] + [p.name for p in profile.layout if p.name is not None]
    if len(names) != len(set(names)):
        raise ProfileError(f"{'positions' if profile.positions else 'layout'}: a name is given twice")
    for i, part in enumerate(profile.layout):
        if part.type == "skip":
            if part.bytes < 1 or part.name is not None:
                raise ProfileError(f"layout[{i}]: skip takes bytes >= 1 and no name")
        elif part.type not in BINARY_TYPES:
            raise ProfileError(f"layout[{i}].type: {part.type!r} is not one of {', '.join(BINARY_TYPES)}, skip")
        elif not part.name:
            raise ProfileError(f"layout[{i}].name: required (use type skip for bytes to leave out)")
    if (profile.format == "js") != bool(profile.script):
        raise ProfileError("script: the js format needs a TS013 codec (function decodeUplink(input) {...}), and only "
                           "it" if not profile.script else "script: only the js format runs a script")
    if not 1 <= profile.timeout_ms <= 1000:
        raise ProfileError("timeout_ms: 1-1000 (one call's CPU time; the event loop waits for it)")
    if not 8 <= profile.max_memory_mb <= 512:
        raise ProfileError("max_memory_mb: 8-512")
    if not 1 <= profile.fport <= 255:
        raise ProfileError("fport: 1-255")
    if profile.nested != "reject" and profile.format not in ("thingsboard", "protobuf"):
        raise ProfileError("nested: only the thingsboard and protobuf formats have nested values "
                           f"(format is {profile.format!r})")
    if (profile.format == "protobuf") != bool(profile.schema):
        raise ProfileError("schema: the protobuf format needs a proto3 schema, and only it" if not profile.schema
                           else "schema: only the protobuf format takes a schema")
    if profile.message and profile.format != "protobuf":
        raise ProfileError("message: only the protobuf format names a message")
