"""A profile made a decoder: its format, then its rules on every point."""

from __future__ import annotations

from typing import Callable

from ..ingest.payload import Readings, decode_readings
from . import formats, rules
from .spec import Profile

#: (content_format, payload, now_ms) -> one Readings per point
Decoder = Callable[[int | None, bytes | bytearray | memoryview, int], list[Readings]]



def _flat(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
    return [decode_readings(content_format, payload)]


def compile_profile(profile: Profile) -> Decoder:
    """The decoder a profile describes: its format, then its rules on every point."""
    decode: formats.FormatDecoder
    if profile.format == "thingsboard":
        decode = formats.thingsboard(profile.nested)
    elif profile.format == "senml":
        decode = formats.senml
    else:
        decode = _flat
    if not profile.fields:
        return decode
    fields = profile.fields

    def with_rules(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        return [rules.apply(r, fields) for r in decode(content_format, payload, now_ms)]

    return with_rules
