"""The CoAP message and its wire format (RFC 7252 §3).

`decode` makes one pass over the datagram, validates every field it reads, and keeps option values
and the payload as memoryviews into the datagram: nothing is copied until someone asks (`bytes(v)`).
The token is the one exception: it is at most 8 bytes and is used as a dictionary key, so a copy is
cheaper than a view.  `encode` writes into one bytearray.
"""

from __future__ import annotations

import os
from enum import IntEnum
from typing import Callable, Iterable, Union

from ..errors import BadInput
from .options import Block, OptionNumber, decode_uint, encode_uint

Buffer = Union[bytes, bytearray, memoryview]
OptionValue = Union[bytes, bytearray, memoryview]
#: a message's options: (number, value) pairs in number order
Options = list[tuple[int, OptionValue]]


class MessageFormatError(BadInput):
    """The datagram is not a well-formed CoAP message; `reason` says which rule it broke (a
    BadInput of corem/errors.py: a ValueError as before)."""

    def __init__(self, reason: str, mid: int | None = None, mtype: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: The message id and type, when the header was readable: a CON with a format error is
        #: answered with RST (§4.2), which needs them.
        self.mid = mid
        self.mtype = mtype


class Type(IntEnum):
    CON = 0
    NON = 1
    ACK = 2
    RST = 3


class Code(IntEnum):
    """Method and response codes, class << 5 | detail (§12.1)."""

    EMPTY = 0
    GET = 1
    POST = 2
    PUT = 3
    DELETE = 4
    FETCH = 5
    PATCH = 6
    IPATCH = 7
    CREATED = 65
    DELETED = 66
    VALID = 67
    CHANGED = 68
    CONTENT = 69
    CONTINUE = 95
    BAD_REQUEST = 128
    UNAUTHORIZED = 129
    BAD_OPTION = 130
    FORBIDDEN = 131
    NOT_FOUND = 132
    METHOD_NOT_ALLOWED = 133
    NOT_ACCEPTABLE = 134
    REQUEST_ENTITY_INCOMPLETE = 136
    CONFLICT = 137
    PRECONDITION_FAILED = 140
    REQUEST_ENTITY_TOO_LARGE = 141
    UNSUPPORTED_CONTENT_FORMAT = 143
    UNPROCESSABLE_ENTITY = 150
    TOO_MANY_REQUESTS = 157
    INTERNAL_SERVER_ERROR = 160
    NOT_IMPLEMENTED = 161
    BAD_GATEWAY = 162
    SERVICE_UNAVAILABLE = 163
    GATEWAY_TIMEOUT = 164
    PROXYING_NOT_SUPPORTED = 165


def code_str(code: int) -> str:
    """`68` -> `"2.04"`, the notation of RFC 7252 and of every CoAP tool."""
    return f"{code >> 5}.{code & 31:02d}"


def is_request(code: int) -> bool:
    return 1 <= code <= 31


def is_response(code: int) -> bool:
    return code >= 64


_EMPTY = memoryview(b"")


class Message:
    """One CoAP message. `options` is a list of (number, value) pairs in ascending number order."""

    __slots__ = ("type", "code", "mid", "token", "options", "payload")

    def __init__(
        self,
        type: int = Type.CON,
        code: int = Code.EMPTY,
        mid: int = 0,
        token: bytes = b"",
        options: list[tuple[int, OptionValue]] | None = None,
        payload: Buffer = b"",
    ) -> None:
        self.type = type
        self.code = code
        self.mid = mid
        self.token = token
        self.options = [] if options is None else options
        self.payload = payload

    # -- generic option access -------------------------------------------------------------
    def opt(self, number: int) -> OptionValue | None:
        """The first value of option `number`, or None."""
        for n, v in self.options:
            if n == number:
                return v
        return None

    def opts(self, number: int) -> list[OptionValue]:
        return [v for n, v in self.options if n == number]

    def add(self, number: int, value: OptionValue | int | str | bool | Block) -> Message:
        """Append an option, converting int/str/Block to the option's wire format."""
        raw = _to_wire(number, value)
        options = self.options
        # keep ascending order; same-number options keep insertion order
        i = len(options)
        while i and options[i - 1][0] > number:
            i -= 1
        options.insert(i, (number, raw))
        return self

    def set(self, number: int, value: OptionValue | int | str | bool | Block | None) -> Message:
        """Replace every value of option `number` (None removes it)."""
        self.options = [(n, v) for n, v in self.options if n != number]
        if value is not None and value is not False:
            self.add(number, value)
        return self

    def _uint(self, number: int) -> int | None:
        v = self.opt(number)
        return None if v is None else int.from_bytes(v, "big")

    def _strs(self, number: int) -> list[str]:
        return [str(v, "utf-8") for n, v in self.options if n == number]

    def _str(self, number: int) -> str | None:
        v = self.opt(number)
        return None if v is None else str(v, "utf-8")

    # -- typed accessors for the registered options ----------------------------------------
    @property
    def uri_path(self) -> list[str]:
        return self._strs(OptionNumber.URI_PATH)

    @property
    def uri_query(self) -> list[str]:
        return self._strs(OptionNumber.URI_QUERY)

    @property
    def location_path(self) -> list[str]:
        return self._strs(OptionNumber.LOCATION_PATH)

    @property
    def location_query(self) -> list[str]:
        return self._strs(OptionNumber.LOCATION_QUERY)

    @property
    def uri_host(self) -> str | None:
        return self._str(OptionNumber.URI_HOST)

    @property
    def proxy_uri(self) -> str | None:
        return self._str(OptionNumber.PROXY_URI)

    @property
    def proxy_scheme(self) -> str | None:
        return self._str(OptionNumber.PROXY_SCHEME)

    @property
    def uri_port(self) -> int | None:
        return self._uint(OptionNumber.URI_PORT)

    @property
    def content_format(self) -> int | None:
        return self._uint(OptionNumber.CONTENT_FORMAT)

    @property
    def accept(self) -> int | None:
        return self._uint(OptionNumber.ACCEPT)

    @property
    def max_age(self) -> int:
        """Max-Age defaults to 60 s when absent (§5.10.5)."""
        v = self._uint(OptionNumber.MAX_AGE)
        return 60 if v is None else v

    @property
    def observe(self) -> int | None:
        return self._uint(OptionNumber.OBSERVE)

    @property
    def size1(self) -> int | None:
        return self._uint(OptionNumber.SIZE1)

    @property
    def size2(self) -> int | None:
        return self._uint(OptionNumber.SIZE2)

    @property
    def no_response(self) -> int | None:
        return self._uint(OptionNumber.NO_RESPONSE)

    @property
    def hop_limit(self) -> int | None:
        return self._uint(OptionNumber.HOP_LIMIT)

    @property
    def block1(self) -> Block | None:
        v = self._uint(OptionNumber.BLOCK1)
        return None if v is None else Block.from_uint(v)

    @property
    def block2(self) -> Block | None:
        v = self._uint(OptionNumber.BLOCK2)
        return None if v is None else Block.from_uint(v)

    @property
    def etags(self) -> list[bytes]:
        return [bytes(v) for v in self.opts(OptionNumber.ETAG)]

    @property
    def etag(self) -> bytes | None:
        v = self.opt(OptionNumber.ETAG)
        return None if v is None else bytes(v)

    @property
    def if_match(self) -> list[bytes]:
        return [bytes(v) for v in self.opts(OptionNumber.IF_MATCH)]

    @property
    def if_none_match(self) -> bool:
        return self.opt(OptionNumber.IF_NONE_MATCH) is not None

    @property
    def echo(self) -> bytes | None:
        v = self.opt(OptionNumber.ECHO)
        return None if v is None else bytes(v)

    @property
    def request_tag(self) -> list[bytes]:
        return [bytes(v) for v in self.opts(OptionNumber.REQUEST_TAG)]

    # -- comparisons and display -----------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.type == other.type
            and self.code == other.code
            and self.mid == other.mid
            and bytes(self.token) == bytes(other.token)
            and [(n, bytes(v)) for n, v in self.options] == [(n, bytes(v)) for n, v in other.options]
            and bytes(self.payload) == bytes(other.payload)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        opts = ", ".join(f"{n}={bytes(v)!r}" for n, v in self.options)
        return (
            f"Message({Type(self.type).name} {code_str(self.code)} mid={self.mid} "
            f"token={bytes(self.token).hex()} [{opts}] payload={bytes(self.payload)!r})"
        )


def _to_wire(number: int, value: OptionValue | int | str | bool | Block) -> OptionValue:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if isinstance(value, bool):
        if value is not True:
            raise ValueError(f"option {number}: False is not a value; use set(number, None)")
        return b""
    if isinstance(value, Block):
        return encode_uint(value.to_uint())
    if isinstance(value, int):
        return encode_uint(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"option {number}: cannot encode {type(value).__name__}")


def decode_py(data: Buffer) -> Message:
    """Parse one datagram; raise MessageFormatError naming the rule it breaks.

    The reference implementation; `decode` is the C one (`_speedups.c`) when it is built.
    """
    n = len(data)
    if n < 4:
        raise MessageFormatError(f"truncated header: {n} bytes, need 4")
    b0 = data[0]
    code = data[1]
    tkl = b0 & 15
    if b0 & 0xC0 != 0x40 or tkl > 8 or n == 4 or code == 0 or (code >> 5) in _BAD_CLASS or b0 & 0x30 == 0x30:
        return _decode_unusual(data, n, b0, code, tkl)
    pos = 4 + tkl
    if pos > n:
        raise MessageFormatError(
            f"truncated token: need {tkl} bytes, have {n - 4}", (data[2] << 8) | data[3], (b0 >> 4) & 3
        )
    if type(data) is bytes:
        mv = memoryview(data)
        token = data[4:pos]
    else:
        mv = memoryview(data)
        token = bytes(mv[4:pos])
    options: list[tuple[int, OptionValue]] = []
    append = options.append
    payload: OptionValue = _EMPTY
    number = 0
    try:
        while pos < n:
            byte = data[pos]
            pos += 1
            if byte < 0xD0 and (byte & 15) < 13:
                # the common case: delta and length both fit their nibbles
                end = pos + (byte & 15)
                number += byte >> 4
            elif byte == 0xFF:
                if pos == n:
                    raise _error(data, "payload marker with no payload")
                payload = mv[pos:]
                break
            else:
                delta = byte >> 4
                length = byte & 15
                if delta == 13:
                    delta = data[pos] + 13
                    pos += 1
                elif delta == 14:
                    delta = ((data[pos] << 8) | data[pos + 1]) + 269
                    pos += 2
                elif delta == 15:
                    raise _error(data, "option delta nibble 15 without payload marker")
                if length == 13:
                    length = data[pos] + 13
                    pos += 1
                elif length == 14:
                    length = ((data[pos] << 8) | data[pos + 1]) + 269
                    pos += 2
                elif length == 15:
                    raise _error(data, "option length nibble 15")
                end = pos + length
                number += delta
            if end > n:
                raise _error(
                    data, f"truncated option {number}: value needs {end - pos} bytes, have {n - pos}"
                )
            append((number, mv[pos:end]))
            pos = end
    except IndexError:
        raise _error(data, "truncated option header") from None
    if number > 65535:
        raise _error(data, f"option number {number} exceeds 65535")
    msg = _new(Message)
    msg.type = (b0 >> 4) & 3
    msg.code = code
    msg.mid = (data[2] << 8) | data[3]
    msg.token = token
    msg.options = options
    msg.payload = payload
    return msg


_BAD_CLASS = frozenset((1, 6, 7))
_new = object.__new__


def _error(data: Buffer, reason: str) -> MessageFormatError:
    return MessageFormatError(reason, (data[2] << 8) | data[3], (data[0] >> 4) & 3)


def _decode_unusual(data: Buffer, n: int, b0: int, code: int, tkl: int) -> Message:
    """The rare header shapes, kept out of the hot path: errors, empty messages, bare headers."""
    mid = (data[2] << 8) | data[3]
    mtype = (b0 >> 4) & 3
    if b0 >> 6 != 1:  # (RFC 7252 §3: silently ignored -- no RST, whose version it would not be)
        raise MessageFormatError(f"version {b0 >> 6}, expected 1")
    if tkl > 8:
        raise MessageFormatError(f"token length {tkl} is reserved (9-15)", mid, mtype)
    if code == 0:
        if n != 4 or tkl:
            raise MessageFormatError(
                "empty message (code 0.00) with token, options or payload", mid, mtype
            )
        return Message(mtype, 0, mid, b"", [], b"")
    cls = code >> 5
    if cls in _BAD_CLASS:
        raise MessageFormatError(f"code {cls}.{code & 31:02d} is in a reserved class", mid, mtype)
    if mtype == 3:
        raise MessageFormatError("reset message must be empty", mid, mtype)
    # n == 4: a request or response with no token, options or payload
    if tkl:
        raise MessageFormatError(f"truncated token: need {tkl} bytes, have 0", mid, mtype)
    return Message(mtype, code, mid, b"", [], b"")


def _ext(value: int) -> tuple[int, bytes]:
    """Nibble and extended bytes for an option delta or length (§3.1)."""
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    if value < 65805:
        return 14, (value - 269).to_bytes(2, "big")
    raise ValueError(f"option delta or length {value} exceeds 65804")


def encode(msg: Message) -> bytes:
    """Serialize; options are written in ascending number order, same numbers in list order."""
    token = msg.token
    tkl = len(token)
    if tkl > 8:
        raise ValueError(f"token: {tkl} bytes, at most 8")
    if not 0 <= msg.mid <= 0xFFFF:
        raise ValueError(f"mid: {msg.mid} is not a 16-bit message id")
    out = bytearray(((0x40 | (msg.type << 4) | tkl), msg.code, msg.mid >> 8, msg.mid & 0xFF))
    out += token
    options = msg.options
    if options:
        if any(options[i][0] > options[i + 1][0] for i in range(len(options) - 1)):
            options = sorted(options, key=_number)
        last = 0
        for number, value in options:
            delta = number - last
            last = number
            length = len(value)
            if delta < 13 and length < 13:
                out.append((delta << 4) | length)
            else:
                dn, dx = _ext(delta)
                ln, lx = _ext(length)
                out.append((dn << 4) | ln)
                out += dx
                out += lx
            out += value
    payload = msg.payload
    if payload:
        out.append(0xFF)
        out += payload
    return bytes(out)


def _number(item: tuple[int, OptionValue]) -> int:
    return item[0]


def make_options(pairs: Iterable[tuple[int, OptionValue | int | str | bool | Block]]) -> Options:
    """Build an option list from typed values, e.g. `[(URI_PATH, "telemetry"), (CONTENT_FORMAT, 60)]`."""
    return sorted(((n, _to_wire(n, v)) for n, v in pairs), key=_number)


def _select_decoder() -> tuple[Callable[[Buffer], Message], str]:
    """The C decoder unless it is missing or COREM_PURE_PYTHON is set."""
    if os.environ.get("COREM_PURE_PYTHON"):
        return decode_py, "python"
    try:
        from . import _speedups
    except ImportError:
        return decode_py, "python"
    _speedups.configure(Message, MessageFormatError, _EMPTY)
    return _speedups.decode, "c"


decode, DECODER = _select_decoder()

__all__ = [
    "Buffer",
    "Code",
    "Message",
    "MessageFormatError",
    "Options",
    "Type",
    "code_str",
    "DECODER",
    "decode",
    "decode_py",
    "decode_uint",
    "encode",
    "is_request",
    "is_response",
    "make_options",
]
