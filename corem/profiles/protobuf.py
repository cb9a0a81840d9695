"""ThingsBoard-style protobuf profiles: a proto3 schema uploaded with the profile, its last
top-level message (or the one the profile names) decoding every reading (application/octet-stream
42, or no Content-Format):

    syntax = "proto3";
    package telemetry;
    message SensorDataReading {
      optional double temperature = 1;
      optional double humidity = 2;
      InnerObject innerObject = 3;
      message InnerObject { optional string key1 = 1; optional bool key2 = 2; }
    }

The schema is read by proto_schema.py; the wire format is decoded by Google's protobuf runtime (its
C core, upb).  A decoded message becomes what ThingsBoard's JSON printer makes of it, so a device
moved from ThingsBoard keeps its keys: fields by their JSON names (`inner_object` -> `innerObject`),
scalars without presence present with their default (0 is a reading), unset `optional`, message and
oneof fields absent, empty repeated and map fields absent, enums by name, bytes as base64.  Then the
ThingsBoard rules apply: `{ts, values}` is a timestamped point (a `ts` of 0 without presence is "not
sent": the reading is timed when it comes) and nested messages, lists and maps go by the profile's
`nested` (flatten, json or reject).  A payload that does not parse is refused naming the field where
it breaks (`innerObject.key1: not UTF-8 text`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from .payload import PayloadError, Readings
from .formats import FormatDecoder, binary_payload, thingsboard_entry
from .proto_schema import SCALARS, SchemaError, UnknownMessage, message_class
from .spec import ProfileError

# -- decoding ---------------------------------------------------------------------------------------
_Convert = Callable[[Any], Any]
#: a message type's descriptor: the runtime's (upb's) class, which the stubs type apart from the
#: pure-Python one
Descriptor = Any


@dataclass(slots=True, frozen=True)
class _Field:
    key: str
    name: str
    #: True: present only when set (proto3 optional, oneof, message); False: its default when absent
    presence: bool
    repeated: bool
    #: the runtime's value as ThingsBoard's JSON has it (None: as it is)
    convert: _Convert | None


class Plan:
    """How each message type becomes a dict, worked out once per type."""

    def __init__(self) -> None:
        self._plans: dict[str, list[_Field]] = {}

    def fields(self, d: Descriptor) -> list[_Field]:
        plan = self._plans.get(d.full_name)
        if plan is None:
            plan = self._plans[d.full_name] = [self._field(f) for f in d.fields]
        return plan

    def _field(self, f: FieldDescriptor) -> _Field:
        if not f.is_repeated:
            return _Field(f.json_name, f.name, f.has_presence, False, self._one(f))
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = self._one(f.message_type.fields_by_name["value"]) or (lambda v: v)
            return _Field(f.json_name, f.name, False, True,
                          lambda m: {_map_key(k): value(v) for k, v in m.items()})
        one = self._one(f)
        return _Field(f.json_name, f.name, False, True, (lambda xs: [one(x) for x in xs]) if one else list)

    def _one(self, f: FieldDescriptor) -> _Convert | None:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            return self.to_dict
        if f.enum_type is not None:
            names: dict[int, str] = {}
            for v in f.enum_type.values:  # an alias's first name, as protobuf's JSON printers say it
                names.setdefault(v.number, v.name)
            return lambda n: names.get(n, n)  # a number this schema does not know stays a number
        if f.type == FieldDescriptor.TYPE_BYTES:
            return lambda b: base64.b64encode(b).decode()
        return None

    def to_dict(self, msg: Message) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self.fields(msg.DESCRIPTOR):
            if f.presence and not msg.HasField(f.name):
                continue
            value = getattr(msg, f.name)
            if f.repeated and not value:
                continue
            out[f.key] = value if f.convert is None else f.convert(value)
        return out


def _map_key(k: object) -> str:
    return ("true" if k else "false") if isinstance(k, bool) else str(k)


def protobuf(schema: str, message: str, nested: str) -> FormatDecoder:
    """A decoder of one protobuf message per payload (application/octet-stream 42, or none);
    ProfileError if the schema cannot be used."""
    try:
        cls = message_class(schema, message)
    except SchemaError as e:
        raise ProfileError(f"schema: {e}") from None
    except UnknownMessage as e:
        raise ProfileError(f"message: {e}") from None
    plan = Plan()
    name = cls.DESCRIPTOR.name
    ts_field = cls.DESCRIPTOR.fields_by_name.get("ts")
    # a proto3 ts without presence reads 0 when the device did not send one: then it is "now"
    ts_unset_is_zero = ts_field is not None and not ts_field.has_presence

    def decode(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        data = binary_payload(content_format, payload)
        try:
            msg = cls.FromString(data)
        except DecodeError:
            fault = wire_fault(data, cls.DESCRIPTOR) or (None, "the bytes do not parse as protobuf")
            raise PayloadError(f"not a {name} message: {fault[1]}", fault[0]) from None
        entry = plan.to_dict(msg)
        if ts_unset_is_zero and entry.get("ts") == 0:
            del entry["ts"]
        return [thingsboard_entry(entry, None, nested)]

    return decode


# -- naming what broke ------------------------------------------------------------------------------
def wire_fault(data: bytes, d: Descriptor, where: str = "", depth: int = 0) -> tuple[str | None, str] | None:
    """(field, reason) where a payload that does not parse breaks, in the schema's words (the
    runtime only says that it does not); walked again on the error path only."""
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        if tag is None:
            return where.rstrip(".") or None, "a field's tag runs past the end"
        number, wire = tag >> 3, tag & 7
        f = d.fields_by_number.get(number)
        name = f"{where}{f.json_name if f else f'#{number}'}"
        if number == 0:
            return where.rstrip(".") or None, f"field number 0 at byte {at}"
        if wire not in WIRE_NAMES:
            return name, f"wire type {wire} is not one proto3 writes"
        if f is not None and wire not in _wire_types(f):
            return name, f"sent as {WIRE_NAMES[wire]}, but the schema says {_type_name(f)}"
        if wire == 0:
            value, at = _varint(data, at)
            if value is None:
                return name, "the varint runs past the end"
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
            if at > len(data):
                return name, f"the {WIRE_NAMES[wire][2:]} runs past the end"
        else:
            size, at = _varint(data, at)
            if size is None or at + size > len(data):
                return name, "its length runs past the end"
            if f is not None and f.type == FieldDescriptor.TYPE_MESSAGE and depth < 100:
                inner = wire_fault(data[at:at + size], f.message_type, f"{name}.", depth + 1)
                if inner:
                    return inner
            if f is not None and f.type == FieldDescriptor.TYPE_STRING:
                try:
                    data[at:at + size].decode()
                except UnicodeDecodeError:
                    return name, "not UTF-8 text"
            at += size
    return None if depth else (None, "the bytes do not parse as protobuf")


def _type_name(f: FieldDescriptor) -> str:
    if f.message_type is not None:
        return f"a {f.message_type.name} message"
    if f.enum_type is not None:
        return f"the enum {f.enum_type.name}"
    return next(n for n, t in SCALARS.items() if t == f.type)


WIRE_NAMES = {0: "a varint", 1: "a fixed64", 2: "length-delimited bytes", 5: "a fixed32"}
_FIXED64 = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)
_FIXED32 = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32)
_LENGTH = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)


def _wire_types(f: FieldDescriptor) -> tuple[int, ...]:
    """The wire types a field may come as (a repeated number packed, or one at a time)."""
    own = 1 if f.type in _FIXED64 else 5 if f.type in _FIXED32 else 2 if f.type in _LENGTH else 0
    return (own, 2) if f.is_repeated and own != 2 else (own,)


def _varint(data: bytes, at: int) -> tuple[int | None, int]:
    value = shift = 0
    while at < len(data) and shift < 70:
        b = data[at]
        at += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, at
        shift += 7
    return None, at
