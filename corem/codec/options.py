"""CoAP option registry (RFC 7252 §5.10, RFC 7641, RFC 7959, RFC 8613, RFC 7967, RFC 9175).

Option numbers carry their own properties in their bits (RFC 7252 §5.4.6): odd numbers are
critical, bit 1 marks unsafe-to-forward.  Values are stored on the wire in one of four formats;
`encode_uint` / `decode_uint` handle the variable-length unsigned integers.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple, Sequence


class OptionNumber(IntEnum):
    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    OSCORE = 9
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    HOP_LIMIT = 16
    ACCEPT = 17
    Q_BLOCK1 = 19
    LOCATION_QUERY = 20
    EDHOC = 21
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    Q_BLOCK2 = 31
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60
    ECHO = 252
    NO_RESPONSE = 258
    REQUEST_TAG = 292
    #: Drogue Cloud's private options (experimental range): HTTP-Basic-style credentials on a
    #: request, the name of a command on a response
    DROGUE_AUTH = 4209
    DROGUE_COMMAND = 4210


class Format(IntEnum):
    EMPTY = 0
    OPAQUE = 1
    UINT = 2
    STRING = 3


class OptionSpec(NamedTuple):
    format: Format
    repeatable: bool
    min_len: int
    max_len: int


N = OptionNumber
#: What each registered option looks like on the wire (RFC 7252 Table 4 and the later RFCs).
SPECS: dict[int, OptionSpec] = {
    N.IF_MATCH: OptionSpec(Format.OPAQUE, True, 0, 8),
    N.URI_HOST: OptionSpec(Format.STRING, False, 1, 255),
    N.ETAG: OptionSpec(Format.OPAQUE, True, 1, 8),
    N.IF_NONE_MATCH: OptionSpec(Format.EMPTY, False, 0, 0),
    N.OBSERVE: OptionSpec(Format.UINT, False, 0, 3),
    N.URI_PORT: OptionSpec(Format.UINT, False, 0, 2),
    N.LOCATION_PATH: OptionSpec(Format.STRING, True, 0, 255),
    N.OSCORE: OptionSpec(Format.OPAQUE, False, 0, 255),
    N.URI_PATH: OptionSpec(Format.STRING, True, 0, 255),
    N.CONTENT_FORMAT: OptionSpec(Format.UINT, False, 0, 2),
    N.MAX_AGE: OptionSpec(Format.UINT, False, 0, 4),
    N.URI_QUERY: OptionSpec(Format.STRING, True, 0, 255),
    N.HOP_LIMIT: OptionSpec(Format.UINT, False, 1, 1),
    N.ACCEPT: OptionSpec(Format.UINT, False, 0, 2),
    N.Q_BLOCK1: OptionSpec(Format.UINT, False, 0, 3),
    N.LOCATION_QUERY: OptionSpec(Format.STRING, True, 0, 255),
    N.EDHOC: OptionSpec(Format.EMPTY, False, 0, 0),
    N.BLOCK2: OptionSpec(Format.UINT, False, 0, 3),
    N.BLOCK1: OptionSpec(Format.UINT, False, 0, 3),
    N.SIZE2: OptionSpec(Format.UINT, False, 0, 4),
    N.Q_BLOCK2: OptionSpec(Format.UINT, False, 0, 3),
    N.PROXY_URI: OptionSpec(Format.STRING, False, 1, 1034),
    N.PROXY_SCHEME: OptionSpec(Format.STRING, False, 1, 255),
    N.SIZE1: OptionSpec(Format.UINT, False, 0, 4),
    N.ECHO: OptionSpec(Format.OPAQUE, False, 1, 40),
    N.NO_RESPONSE: OptionSpec(Format.UINT, False, 0, 1),
    N.REQUEST_TAG: OptionSpec(Format.OPAQUE, True, 0, 8),
    N.DROGUE_AUTH: OptionSpec(Format.STRING, False, 1, 512),
    N.DROGUE_COMMAND: OptionSpec(Format.STRING, False, 1, 255),
}
del N


#: Critical options corem knows but does not implement: a request carrying one is refused (RFC
#: 7252 §5.4.1: 4.02; §5.7.2: 5.05 for the proxy options), never served as if it were absent.
#: EDHOC: no key exchange (OSCORE contexts are provisioned);
#: Q-Block1/Q-Block2 (RFC 9177): block-wise is RFC 7959's Block1/Block2 only.
#: (If-Match / If-None-Match are implemented: conditional requests, corem/coap/conditional.py.)
UNSUPPORTED_CRITICAL = frozenset({
    OptionNumber.Q_BLOCK1, OptionNumber.EDHOC, OptionNumber.Q_BLOCK2, OptionNumber.PROXY_URI,
    OptionNumber.PROXY_SCHEME,
})
PROXY_OPTIONS = frozenset({OptionNumber.PROXY_URI, OptionNumber.PROXY_SCHEME})
#: The critical options corem serves requests with.
UNDERSTOOD_CRITICAL = frozenset(n for n in SPECS if n & 1 and n not in UNSUPPORTED_CRITICAL)

def unrecognized(options: Sequence[tuple[int, Any]]) -> list[tuple[int, int, str]]:
    """The occurrences of known options that RFC 7252 says to treat as unrecognized: a value
    whose length is not its option's (§5.4.3, Table 4), and each occurrence of an option that is
    not repeatable after its first (§5.4.5) -- as (index, number, why), in order."""
    out: list[tuple[int, int, str]] = []
    seen: set[int] = set()
    for i, (number, value) in enumerate(options):
        spec = SPECS.get(number)
        if spec is None:
            continue
        if not spec.min_len <= len(value) <= spec.max_len:
            out.append((i, number, f"{len(value)} bytes, not {spec.min_len}-{spec.max_len}"))
        elif number in seen and not spec.repeatable:
            out.append((i, number, "given more than once"))
        seen.add(number)
    return out


#: The options whose values are text (RFC 7252 §3.2 "string": UTF-8).
TEXT_OPTIONS = frozenset(n for n, spec in SPECS.items() if spec.format is Format.STRING)


def option_label(number: int) -> str:
    """`uri-query`, `drogue-auth`, `65001`: how a diagnostic names an option (by its number when
    it has no registered name: a diagnostic cut to the request's size still names it)."""
    try:
        return OptionNumber(number).name.lower().replace("_", "-")
    except ValueError:
        return str(number)


def first_bad_text(options: list[tuple[int, bytes | bytearray | memoryview]]) -> int | None:
    """The number of the first text option whose value is not UTF-8, or None.  Checked once per
    request, before any handler reads one, so no accessor ever raises on device input."""
    for number, value in options:
        if number in TEXT_OPTIONS:
            try:
                str(value, "utf-8")
            except UnicodeDecodeError:
                return number
    return None


def is_critical(number: int) -> bool:
    """Critical options must be understood; an unknown one rejects the message (§5.4.1)."""
    return bool(number & 1)


def is_elective(number: int) -> bool:
    return not number & 1


def is_unsafe(number: int) -> bool:
    """Unsafe-to-forward: a proxy that does not understand it must not forward it (§5.4.2)."""
    return bool(number & 2)


def is_no_cache_key(number: int) -> bool:
    return (number & 0x1E) == 0x1C


def encode_uint(value: int) -> bytes:
    """Shortest big-endian form; zero is the empty string (§3.2)."""
    if value < 0:
        raise ValueError(f"uint option value must be >= 0, got {value}")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(value: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(value, "big")


class Block(NamedTuple):
    """A Block1/Block2 value (RFC 7959 §2.2): block number, more flag, size exponent."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    @property
    def offset(self) -> int:
        return self.num << (self.szx + 4)

    @classmethod
    def from_uint(cls, value: int) -> Block:
        szx = value & 7
        if szx == 7:
            raise ValueError("block szx 7 is reserved")
        return cls(value >> 4, bool(value & 8), szx)

    def to_uint(self) -> int:
        if not 0 <= self.szx < 7:
            raise ValueError(f"block szx must be 0..6, got {self.szx}")
        if not 0 <= self.num < 1 << 20:
            raise ValueError(f"block num must be < 2**20, got {self.num}")
        return (self.num << 4) | (8 if self.more else 0) | self.szx
