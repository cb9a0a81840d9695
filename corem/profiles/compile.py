"""A profile made a decoder: its format, then its rules on every point."""

from __future__ import annotations

from typing import Callable

from ..ingest.payload import Readings, decode_readings
from . import formats, rules
from ..extras import needs
from .spec import BINARY_TYPES, Profile, ProfileError

#: (content_format, payload, now_ms) -> one Readings per point
Decoder = Callable[[int | None, bytes | bytearray | memoryview, int], list[Readings]]



def _flat(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
    return [decode_readings(content_format, payload)]


#: how the fast lane decodes a payload itself (corem/fastlane/_lane.c `parse_payload`): the
#: built-in default's flat map, where "ts" is the time; ThingsBoard's map or {ts, values}; Cayenne LPP
LANE_FLAT, LANE_THINGSBOARD, LANE_CAYENNE_LPP = 0, 1, 2


class LaneDecoder:
    """A profile's decoder that the fast lane can also run in C, in `mode` (LANE_*): a profile of
    format `flat`, `thingsboard` or `cayenne-lpp` without field rules.  Calling it is the Python
    twin, which answers whatever the lane leaves (tests/test_fastlane.py holds the two alike)."""

    __slots__ = ("decode", "mode")

    def __init__(self, decode: Decoder, mode: int) -> None:
        self.decode = decode
        self.mode = mode

    def __call__(self, content_format: int | None, payload: bytes | bytearray | memoryview,
                 now_ms: int) -> list[Readings]:
        return self.decode(content_format, payload, now_ms)


def compile_profile(profile: Profile) -> Decoder:
    """The decoder a profile describes: its format, then its rules on every point."""
    decode: formats.FormatDecoder
    if profile.format == "thingsboard":
        decode = formats.thingsboard(profile.nested)
    elif profile.format == "senml":
        decode = formats.senml
    elif profile.format == "array":
        decode = formats.positional(profile.positions)
    elif profile.format == "binary":
        decode = formats.binary([(p.name, "skip" if p.type == "skip" else BINARY_TYPES[p.type], p.bytes)
                                 for p in profile.layout])
    elif profile.format == "cayenne-lpp":
        decode = formats.cayenne_lpp
    elif profile.format == "protobuf":
        try:
            from .protobuf import protobuf
        except ImportError:  # (google's protobuf: an optional package)
            raise ProfileError(needs("format: 'protobuf'", "protobuf")) from None

        decode = protobuf(profile.schema, profile.message, profile.nested)
    elif profile.format == "js":
        from .js import JsCodec

        decode = JsCodec(profile.script, fport=profile.fport, variables=profile.variables,
                         timeout_ms=profile.timeout_ms, max_memory_mb=profile.max_memory_mb)
    else:
        decode = _flat
    if not profile.fields:
        if profile.format == "thingsboard":
            return LaneDecoder(decode, LANE_THINGSBOARD)
        if profile.format == "cayenne-lpp":
            return LaneDecoder(decode, LANE_CAYENNE_LPP)
        if decode is _flat:
            return LaneDecoder(decode, LANE_FLAT)
        return decode
    fields = profile.fields

    def with_rules(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        points = decode(content_format, payload, now_ms)
        if not isinstance(points, formats.Series):
            return [rules.apply(r, fields) for r in points]
        out = []
        for i, r in enumerate(points):
            try:
                out.append(rules.apply(r, fields))
            except rules.RuleViolation as e:
                raise rules.RuleViolation(e.reason, f"[{i}].{e.field}") from None
        return out

    return with_rules
