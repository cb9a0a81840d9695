"""One definition per input: a request's fields are a msgspec Struct, and what checks it, documents
it and asks for it is made from that Struct -- the admin API's check of a JSON body (`check`), its
OpenAPI schema (`schema`), the CLI's flags (`add_flags`) and the import's columns (`names`).

A field's JSON type is the Struct's annotation; its constraints and its description are the
annotation's `msgspec.Meta` (what the OpenAPI document shows: clients can check first); the CLI's
help and metavar are the Meta's `extra` ("cli", "metavar").  The checks here are the shape's
(unknown fields, required ones, JSON types), in the words the clients were always answered; what
a value means (a PSK's length in bytes, a tenant's characters) is the owner's check (the registry,
the downlink), which names the field too.

Light on purpose (msgspec only): the CLI imports it.
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Any, TypeVar

import msgspec

from .errors import BadInput

T = TypeVar("T", bound=msgspec.Struct)


# -- JSON as corem takes it (an admin body, a device's payload): what Python's json reader lets through
def not_json(constant: str) -> Any:
    """json's `parse_constant`: NaN and Infinity are no JSON numbers (nothing could read them back)."""
    raise ValueError(f"{constant} is not a JSON number")


def finite_float(text: str) -> float:
    """json's `parse_float`: a number past a float's range (1e400) would be infinity -- no JSON
    either, and stored, every answer that holds it would fail."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a float")
    return value


def repeated_key(pairs: list[tuple[str, Any]]) -> str | None:
    """The first key an object's `pairs` (json's `object_pairs_hook`) give twice, or None: a JSON
    reader keeps one of the two silently.  One pass (a body of many keys is read on the event loop)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None

#: JSON Schema type -> what a value of it is in Python (a bool is no number)
_PYTHON: dict[str, type | tuple[type, ...]] = {"string": str, "number": (int, float), "integer": int, "boolean": bool}


@functools.cache  # (a Struct's fields do not change: inspected once, not at every request)
def _info(struct: type[msgspec.Struct]) -> msgspec.inspect.StructType:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return info


def _bare(t: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The field's type without None (optional) and without its Meta."""
    if isinstance(t, msgspec.inspect.UnionType):
        rest = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
        if len(rest) == 1:
            t = rest[0]
    return t.type if isinstance(t, msgspec.inspect.Metadata) else t


def _extra(t: msgspec.inspect.Type) -> dict[str, Any]:
    """The Meta's `extra` (CLI help, metavar) of a field's type, optional or not."""
    if isinstance(t, msgspec.inspect.UnionType):
        for u in t.types:
            if isinstance(u, msgspec.inspect.Metadata):
                return u.extra or {}
    return (t.extra or {}) if isinstance(t, msgspec.inspect.Metadata) else {}


def json_type(t: msgspec.inspect.Type) -> str | None:
    """A field's JSON type ("string", "number", "integer", "boolean"), None for any."""
    t = _bare(t)
    if isinstance(t, msgspec.inspect.StrType):
        return "string"
    if isinstance(t, msgspec.inspect.BoolType):
        return "boolean"
    if isinstance(t, msgspec.inspect.IntType):
        return "integer"
    if isinstance(t, msgspec.inspect.FloatType):
        return "number"
    if isinstance(t, msgspec.inspect.LiteralType) and all(isinstance(v, str) for v in t.values):
        return "string"
    return None


def names(struct: type[msgspec.Struct]) -> tuple[str, ...]:
    """The fields' names, in their order (the import's columns, the API's allowed list)."""
    return struct.__struct_fields__


def required(struct: type[msgspec.Struct]) -> tuple[str, ...]:
    """The fields without a default."""
    return tuple(f.name for f in _info(struct).fields if f.required)


def defaults(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """Each field's default (those that have one other than None)."""
    return {f.name: f.default for f in _info(struct).fields
            if f.default is not msgspec.NODEFAULT and f.default is not None and f.default is not msgspec.UNSET}


def schema(struct: type[msgspec.Struct]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(properties, required) of the Struct's JSON Schema, as the OpenAPI document shows a body:
    an optional field is its type (null means "not given": `check` drops it), with its default
    when it has one."""
    (ref,), found = msgspec.json.schema_components([struct])
    properties: dict[str, Any] = {}
    for name, prop in found[struct.__name__]["properties"].items():
        prop = dict(prop)
        if "anyOf" in prop:
            rest = [p for p in prop.pop("anyOf") if p != {"type": "null"}]
            prop = {**(rest[0] if len(rest) == 1 else {"anyOf": rest}), **prop}
        if prop.get("default", 0) is None:
            del prop["default"]
        if "enum" in prop and json_type(_field(struct, name).type) == "string":
            prop = {"type": "string", **prop}
        properties[name] = prop
    return properties, required(struct)


def _field(struct: type[msgspec.Struct], name: str) -> msgspec.inspect.Field:
    return next(f for f in _info(struct).fields if f.name == name)


def check(struct: type[T], body: Any, *, listing: str = "allowed",
          words: dict[str, str] | None = None) -> T:
    """`body` (JSON) as the Struct, its shape checked: an object, no unknown field, the required
    ones given (not null, not ""), each of its JSON type (null is "not given").  BadInput names
    the field: `colour: unknown field; allowed: ...`, `tenant: required`, `timeout: expected a
    number` (`words`: another way to say a type, e.g. {"string": "text"}; `listing`: the word
    before the allowed fields)."""
    if not isinstance(body, dict):
        raise BadInput("body: expected a JSON object")
    info = _info(struct)
    allowed = names(struct)
    for key in body:
        if key not in allowed:
            raise BadInput(f"{key}: unknown field; {listing}: {', '.join(allowed)}")
    for f in info.fields:
        if f.required and body.get(f.name) in (None, ""):
            raise BadInput(f"{f.name}: required")
    given = {k: v for k, v in body.items() if v is not None}
    for f in info.fields:
        if f.name not in given:
            continue
        kind = json_type(f.type)
        value = given[f.name]
        ok = _PYTHON.get(kind or "")
        if ok is not None and (not isinstance(value, ok) or (kind != "boolean" and isinstance(value, bool))):
            said = (words or {}).get(kind or "", f"a {kind}")
            raise BadInput(f"{f.name}: expected {said}")
    return struct(**given)


def add_flags(parser: argparse.ArgumentParser, struct: type[msgspec.Struct], *, skip: tuple[str, ...] = ()) -> None:
    """A `--field-name` flag for each field of the Struct (but `skip`): required when the field
    is, its default the Struct's, its choices a Literal's, its help and metavar the Meta's
    `extra` ("cli", "metavar") or else its description."""
    for f in _info(struct).fields:
        if f.name in skip:
            continue
        extra = _extra(f.type)
        bare = _bare(f.type)
        options: dict[str, Any] = {"dest": f.name}
        if f.required:
            options["required"] = True
        elif f.default is not msgspec.NODEFAULT and f.default is not msgspec.UNSET:
            options["default"] = f.default
        if isinstance(bare, msgspec.inspect.LiteralType):  # ("" too: the default, as in the API and the import)
            options["choices"] = [*bare.values, *([""] if "" not in bare.values and not f.required else [])]
            # (shown without the empty choice: `{drx,psm,}` read as a stray comma)
            options["metavar"] = "{" + ",".join(str(v) for v in bare.values if v != "") + "}"
        help_text = extra.get("cli")
        if help_text is None:
            meta = f.type.types[0] if isinstance(f.type, msgspec.inspect.UnionType) else f.type
            help_text = (getattr(meta, "extra_json_schema", None) or {}).get("description")
        if help_text is not None:
            options["help"] = help_text.replace("%", "%%")
        if "metavar" in extra:
            options["metavar"] = extra["metavar"]
        parser.add_argument("--" + f.name.replace("_", "-"), **options)
