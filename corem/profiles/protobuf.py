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
C core, upb) -- and by the fast lane in C (corem/fastlane/proto.h) for the schemas `lane_proto`
gives it a form of, this decoder being its twin.  A decoded message becomes what ThingsBoard's
JSON printer makes of it, so a device moved from ThingsBoard keeps its keys: fields by their JSON
names (`inner_object` -> `innerObject`), scalars without presence present with their default (0 is
a reading), unset `optional`, message and oneof fields absent, empty repeated and map fields
absent, enums by name, bytes as base64.  Then the
ThingsBoard rules apply: `{ts, values}` is a timestamped point (a `ts` of 0 without presence is "not
sent": the reading is timed when it comes) and nested messages, lists and maps go by the profile's
`nested` (flatten, json or reject).  A payload that does not parse is refused naming the field where
it breaks (`innerObject.key1: not UTF-8 text`).
"""

from __future__ import annotations

import base64
import functools
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
        # (the class's: a field named DESCRIPTOR is what the message's own attribute reads)
        for f in self.fields(type(msg).DESCRIPTOR):
            if f.presence and not msg.HasField(f.name):
                continue
            value = getattr(msg, f.name)
            if f.repeated and not value:
                continue
            out[f.key] = value if f.convert is None else f.convert(value)
        return out


def _map_key(k: object) -> str:
    return ("true" if k else "false") if isinstance(k, bool) else str(k)


@functools.lru_cache(maxsize=256)
def message_of(schema: str, message: str) -> type[Message]:
    """The message class a profile decodes payloads with; ProfileError if the schema cannot be used.
    One class per schema text and message (a class holds no state): reading a schema takes ~1.4 ms,
    and each ingest compiles its profiles itself (every worker, every test twin's side)."""
    try:
        return message_class(schema, message)
    except SchemaError as e:
        raise ProfileError(f"schema: {e}") from None
    except UnknownMessage as e:
        raise ProfileError(f"message: {e}") from None


def protobuf(cls: type[Message], nested: str) -> FormatDecoder:
    """A decoder of one `cls` message (`message_of`) per payload (application/octet-stream 42, or
    none)."""
    plan = Plan()
    name = cls.DESCRIPTOR.name
    ts_field = cls.DESCRIPTOR.fields_by_name.get("ts")
    # a proto3 ts without presence reads 0 when the device did not send one: then it is "now"
    ts_unset_is_zero = ts_field is not None and not ts_field.has_presence

    def decode(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        # (no bytes at all is a message too: proto3 writes none for a field at its default, so a
        # device reading 0 everywhere sends an empty payload -- found by a review)
        data = binary_payload(content_format, payload, empty=True)
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


# -- the fast lane's form --------------------------------------------------------------------------
#: a field's kind as the lane's C takes it (corem/fastlane/proto.h PB_*)
_F = FieldDescriptor
LANE_KINDS = {_F.TYPE_DOUBLE: 1, _F.TYPE_FLOAT: 2, _F.TYPE_INT32: 3, _F.TYPE_INT64: 4,
              _F.TYPE_UINT32: 5, _F.TYPE_UINT64: 6, _F.TYPE_SINT32: 7, _F.TYPE_SINT64: 8,
              _F.TYPE_FIXED32: 9, _F.TYPE_FIXED64: 10, _F.TYPE_SFIXED32: 11, _F.TYPE_SFIXED64: 12,
              _F.TYPE_BOOL: 13, _F.TYPE_STRING: 14, _F.TYPE_ENUM: 15, _F.TYPE_MESSAGE: 16}
_INTEGRAL = {LANE_KINDS[t] for t in (_F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_SINT32,
                                      _F.TYPE_SINT64, _F.TYPE_FIXED32, _F.TYPE_FIXED64, _F.TYPE_SFIXED32,
                                      _F.TYPE_SFIXED64)}
#: (number, kind, JSON name, presence, message index or -1, enum values ((number, name), ...))
LaneField = tuple[int, int, bytes, bool, int, tuple[tuple[int, bytes], ...]]
#: the bytes of a name the lane makes (corem/fastlane/cbor_json.h LANE_NAME): a longer JSON name
#: leaves the schema to `protobuf`'s decoder
LANE_NAME = 64
#: (message types, the first the payload's; the top message's `ts` field index, whether its 0 is
#: "not sent"; its `values` field index) -- -1 where there is none
LaneProto = tuple[tuple[tuple[LaneField, ...], ...], int, bool, int]
MAX_LANE_FIELDS = 64  # (proto.h PB_MAX_FIELDS)


def lane_proto(cls: type[Message]) -> LaneProto | None:
    """The schema of `cls` (`message_of`) as the fast lane's C decodes it (corem/fastlane/proto.h),
    or None where the lane would have to guess and `protobuf`'s decoder stays the only one: a
    repeated or map field, bytes, a oneof of several members (one clears another), a `ts` that is
    not an integer, more fields or longer names than the lane holds.  The lane still only accepts:
    a message it does not plainly read is `protobuf`'s (from the lane's batch), a refused one the
    Python path's."""
    top: Descriptor = cls.DESCRIPTOR
    types: list[Descriptor] = [top]
    index = {top.full_name: 0}
    plans: list[tuple[LaneField, ...]] = []
    at = 0
    while at < len(types):
        d = types[at]
        at += 1
        # (a oneof of one member -- a proto3 `optional`'s own among them -- is that field's presence)
        if len(d.fields) > MAX_LANE_FIELDS or any(len(o.fields) > 1 for o in d.oneofs):
            return None
        fields = []
        for f in d.fields:
            if f.is_repeated or f.type not in LANE_KINDS or not 0 < len(f.json_name.encode()) < LANE_NAME:
                return None  # (bytes, groups; a name longer than the lane writes)
            sub = -1
            if f.message_type is not None:
                sub = index.setdefault(f.message_type.full_name, len(types))
                if sub == len(types):
                    types.append(f.message_type)
            values: dict[int, bytes] = {}
            for v in f.enum_type.values if f.enum_type is not None else ():
                values.setdefault(v.number, v.name.encode())  # (an alias's first name, as Plan says it)
            fields.append((f.number, LANE_KINDS[f.type], f.json_name.encode(), bool(f.has_presence), sub,
                           tuple(values.items())))
        plans.append(tuple(fields))
    by_json = {f.json_name: i for i, f in enumerate(top.fields)}
    ts = by_json.get("ts", -1)
    named = top.fields_by_name.get("ts")
    if (named is not None and (ts < 0 or top.fields[ts] is not named)) or \
            (ts >= 0 and plans[0][ts][1] not in _INTEGRAL):
        return None  # (a `ts` the lane would have to read as `decode` does: not as a time)
    # (a ts of 0 is "not sent" only for the field named ts, without presence: `protobuf`'s rule)
    return tuple(plans), ts, named is not None and not named.has_presence, by_json.get("values", -1)


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
