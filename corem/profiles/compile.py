"""A profile made a decoder: its format, then its rules on every point."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from .payload import Readings, decode_readings
from . import formats, rules
from ..extras import needs
from .spec import BINARY_TYPES, Profile, ProfileError, Rule

#: (content_format, payload, now_ms) -> one Readings per point
Decoder = Callable[[int | None, bytes | bytearray | memoryview, int], list[Readings]]



def _flat(content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
    return [decode_readings(content_format, payload)]


#: how the fast lane decodes a payload itself (corem/fastlane/_lane.c `parse_payload`): the
#: built-in default's flat map, where "ts" is the time; ThingsBoard's map or {ts, values}; Cayenne
#: LPP; the profile's positional array; its fixed binary layout; a SenML pack of one time; and
#: LANE_PYTHON: the lane calls the profile's Python decoder itself (js, a Python hook, a protobuf
#: schema the lane cannot hold), from its batch, without the CoAP request path
#: (corem/fastlane/pycodec.h); LANE_PROTOBUF: a protobuf message (corem/fastlane/proto.h), and
#: one proto.h does not read (text JSON would escape, ...) by the profile's Python decoder, as LANE_PYTHON
(LANE_FLAT, LANE_THINGSBOARD, LANE_CAYENNE_LPP, LANE_ARRAY, LANE_BINARY, LANE_SENML, LANE_PYTHON,
 LANE_PROTOBUF) = range(8)
#: a ThingsBoard profile's `nested`, as the lane's C takes it: a nested value refused (the Python
#: path's 4.00), flattened into its leaves, or kept as its JSON text
NESTED_REJECT, NESTED_FLATTEN, NESTED_JSON = 0, 1, 2
NESTED = {"reject": NESTED_REJECT, "flatten": NESTED_FLATTEN, "json": NESTED_JSON}
#: the formats the lane decodes in C, and how
LANES = {"flat": LANE_FLAT, "thingsboard": LANE_THINGSBOARD, "cayenne-lpp": LANE_CAYENNE_LPP, "array": LANE_ARRAY,
         "binary": LANE_BINARY, "senml": LANE_SENML}


#: a field rule as the lane's C takes it (corem/fastlane/rules.h `compile_rules`): name, rename,
#: unit, type (0 any, 1 number, 2 string), scale, offset, min, max, required, allowed
LaneRule = tuple[bytes, bytes | None, bytes | None, int, float | None, float | None, float | None, float | None,
                 bool, tuple[bytes, ...] | None]


#: a binary layout's field as the lane's C takes it (layouts.h): name (None: skip), struct format or
#: b"skip", bytes to skip
LanePart = tuple[bytes | None, bytes, int]


class Handover:
    """What a profile's Python decoder gave the fast lane for readings the lane then handed to the
    Python path (an exception -- a refusal, a codec's limit -- or points it does not write: more
    than it holds, a lone surrogate, ...), which the Python path takes instead of decoding again:
    a JavaScript codec run twice for one reading would pay its limits twice, on the event loop.
    By payload: the lane's batch is answered by the Python path right after it, in order, so a
    payload's outcomes are taken in the order they were put (one of another device with the same
    payload and profile is the same decode's: the decoder's input is the payload, and each call
    of a JS codec starts from fresh state).  Bounded (MOST outcomes, each kept MAX_AGE_MS), for
    a reading the Python path answers without decoding (busy, ...): the Python path takes its
    readings in the same pass of the event loop, milliseconds later, so an outcome older than that
    is one it never took -- given to a later reading of the same payload, it would carry that
    reading's time (a codec's recvTime) or limit.  (Past it, the Python path decodes again.)"""

    MOST = 256
    MAX_AGE_MS = 250

    __slots__ = ("outcomes", "count")

    def __init__(self) -> None:
        self.outcomes: dict[tuple[int | None, bytes], deque[tuple[int, Any]]] = {}
        self.count = 0

    def put(self, payload: bytes, content_format: int | None, now_ms: int, outcome: Any) -> None:
        """The lane's: `outcome` is the decoder's list of points or the exception it raised."""
        if self.count >= self.MOST:  # (what the Python path never took: the oldest payload's go)
            oldest = next(iter(self.outcomes))
            self.count -= len(self.outcomes.pop(oldest))
        self.outcomes.setdefault((content_format, payload), deque()).append((now_ms, outcome))
        self.count += 1

    def take(self, content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> Any:
        """The outcome the lane kept for this payload, or None (then decode it)."""
        key = (content_format, bytes(payload))
        waiting = self.outcomes.get(key)
        while waiting:
            at, outcome = waiting.popleft()
            self.count -= 1
            if not waiting:
                del self.outcomes[key]
            if abs(now_ms - at) <= self.MAX_AGE_MS:
                return outcome
        return None


class LaneDecoder:
    """A profile's decoder that the fast lane can also run in C, in `mode` (LANE_*), with its field
    `rules` (rules.py's, as data: `lane_rules`), its array's `positions`, its binary `layout` and
    its protobuf schema (`proto`, protobuf.py `lane_proto`): a profile of format `flat`,
    `thingsboard`, `cayenne-lpp`, `array`, `binary`, `senml` or `protobuf`.  Calling it is
    the Python twin, which answers whatever the lane leaves (tests/test_fastlane.py holds the two
    alike).  `compiled` is the lane's own form of all that, made once per profile by corem/fastlane
    and shared by its devices (False: the lane cannot hold it)."""

    __slots__ = ("decode", "mode", "rules", "positions", "layout", "nested", "proto", "compiled", "handover")

    def __init__(self, decode: Decoder, mode: int, rules: tuple[LaneRule, ...] = (),
                 positions: tuple[bytes | None, ...] = (), layout: tuple[LanePart, ...] = (),
                 nested: int = NESTED_REJECT, proto: tuple[Any, ...] | None = None) -> None:
        self.decode = decode
        self.mode = mode
        self.rules = rules
        self.positions = positions
        self.layout = layout
        #: ThingsBoard's `nested` (NESTED_*): the lane flattens nested values, or keeps their JSON text
        self.nested = nested
        self.proto = proto
        self.compiled: object = None
        #: LANE_PYTHON, LANE_PROTOBUF: what `decode` gave the lane for the readings it handed on
        self.handover = Handover()

    def __call__(self, content_format: int | None, payload: bytes | bytearray | memoryview,
                 now_ms: int) -> list[Readings]:
        if self.handover.count:  # (a reading the lane decoded, then handed on: decoded once)
            outcome = self.handover.take(content_format, payload, now_ms)
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:
                return outcome
        return self.decode(content_format, payload, now_ms)


def compile_profile(profile: Profile) -> Decoder:
    """The decoder a profile describes: its format, then its rules on every point."""
    decode: formats.FormatDecoder
    proto: tuple[Any, ...] | None = None  # (a protobuf schema's form for the lane's C)
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
            from .protobuf import lane_proto, message_of, protobuf
        except ImportError:  # (google's protobuf: an optional package)
            raise ProfileError(needs("format: 'protobuf'", "protobuf")) from None

        cls = message_of(profile.schema, profile.message)  # (read once: the decoder's and the lane's)
        decode = protobuf(cls, profile.nested)
        proto = lane_proto(cls)
    elif profile.format == "js":
        from .js import js_codec

        decode = js_codec(profile.script, fport=profile.fport, variables=profile.variables,
                          timeout_ms=profile.timeout_ms, max_memory_mb=profile.max_memory_mb)
    else:
        decode = _flat
    if profile.format in ("protobuf", "js"):  # the whole decoder, rules included, is the lane's twin
        whole = _with_rules(decode, profile.fields) if profile.fields else decode
        in_c = lane_rules(profile.fields) if profile.fields else ()
        if proto is not None and in_c is not None:  # (the lane reads the message in C, and its rules)
            return LaneDecoder(whole, LANE_PROTOBUF, in_c, nested=NESTED[profile.nested], proto=proto)
        return LaneDecoder(whole, LANE_PYTHON)  # (the lane calls it from its batch)
    mode = LANES.get(profile.format)
    shape = _lane_shape(profile)
    if shape is None:
        mode = None
    nested = NESTED[profile.nested] if profile.format == "thingsboard" else NESTED_REJECT
    if not profile.fields:
        return decode if mode is None or shape is None else LaneDecoder(decode, mode, (), *shape, nested)
    in_c = None if mode is None else lane_rules(profile.fields)
    if in_c is None or mode is None or shape is None:
        return _with_rules(decode, profile.fields)
    return LaneDecoder(_with_rules(decode, profile.fields), mode, in_c, *shape, nested)


def _with_rules(decode: formats.FormatDecoder, fields: dict[str, Rule]) -> Decoder:
    """`decode`, then the profile's rules on every point it gives."""

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


def _lane_shape(profile: Profile) -> tuple[tuple[bytes | None, ...], tuple[LanePart, ...]] | None:
    """An array's positions and a binary layout as the lane's C takes them; None if a name cannot
    be said in UTF-8 (a lone surrogate): that profile is Python's alone."""
    try:
        positions = tuple(None if p is None else p.encode() for p in profile.positions)
        layout = tuple((None, b"skip", p.bytes) if p.type == "skip" else
                       (None if p.name is None else p.name.encode(), BINARY_TYPES[p.type].encode(), 0)
                       for p in profile.layout)
    except UnicodeEncodeError:
        return None
    return positions, layout


_TYPES = {None: 0, "number": 1, "string": 2}


def lane_rules(fields: dict[str, Rule]) -> tuple[LaneRule, ...] | None:
    """The rules as the lane's C takes them, in the profile's order (rules.py applies them in it);
    None if one cannot be said in UTF-8 (a lone surrogate): Python's alone."""
    try:
        out = tuple((name.encode(), None if r.rename is None else r.rename.encode(),
                     None if r.unit is None else r.unit.encode(), _TYPES[r.type], r.scale, r.offset, r.min, r.max,
                     r.required, None if r.allowed is None else tuple(a.encode() for a in r.allowed))
                    for name, r in fields.items())
    except UnicodeEncodeError:
        return None
    return out
