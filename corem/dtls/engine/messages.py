"""Handshake messages (RFC 6347 §4.2.2, RFC 5246 §7.4, RFC 4279, RFC 7627, RFC 5746, RFC 9146 §3):
their fragments, the messages the engine reads (`parse_*_untrusted`, raising only DtlsDecodeError)
and the ones it writes."""

from __future__ import annotations

import struct
from bisect import bisect_left
from dataclasses import dataclass
from typing import NamedTuple

from .errors import DECODE_ERROR, ILLEGAL_PARAMETER, DtlsDecodeError

HELLO_REQUEST = 0
CLIENT_HELLO = 1
SERVER_HELLO = 2
HELLO_VERIFY_REQUEST = 3
CERTIFICATE = 11
SERVER_KEY_EXCHANGE = 12
CERTIFICATE_REQUEST = 13
SERVER_HELLO_DONE = 14
CERTIFICATE_VERIFY = 15
CLIENT_KEY_EXCHANGE = 16
FINISHED = 20

EXT_EXTENDED_MASTER_SECRET = 23  # RFC 7627
EXT_CONNECTION_ID = 54  # RFC 9146 (the drafts' 53 is not read: their record layouts differ)
EXT_RENEGOTIATION_INFO = 0xFF01  # RFC 5746

HS_HEADER = 12
_HS = struct.Struct("!B3sH3s3s")
#: the same header read with each 24-bit field's low 16 bits as an integer (its high byte is added
#: from the payload: no int.from_bytes calls)
_HS2 = struct.Struct("!BxHHxHxH")
#: the largest handshake message the engine reassembles (a certificate chain fits, later)
MAX_MESSAGE = 8192
#: pieces one message may be in while it is reassembled.  A client cuts a flight at its MTU, and
#: one that sends it again cuts it the same way or at a smaller MTU: a few pieces.  Fragments of a
#: byte or two, spaced apart, are an attack on the reassembly (memory, and a merge per piece).
MAX_RANGES = 32


class Fragment(NamedTuple):
    """(a tuple: one is made per handshake message received, and a frozen dataclass's __init__
    cost ~3x as much)"""
    msg_type: int
    length: int
    message_seq: int
    offset: int
    body: bytes

    @property
    def whole(self) -> bool:
        return self.offset == 0 and len(self.body) == self.length


def parse_fragments_untrusted(payload: bytes) -> list[Fragment]:
    """The handshake fragments one record carries (one or more, back to back)."""
    out = []
    pos = 0
    n = len(payload)
    while pos < n:
        if n - pos < HS_HEADER:
            raise DtlsDecodeError(DECODE_ERROR, "handshake_truncated")
        msg_type, length, seq, offset, flen = _HS2.unpack_from(payload, pos)
        length = payload[pos + 1] << 16 | length
        offset = payload[pos + 6] << 16 | offset
        flen = payload[pos + 9] << 16 | flen
        pos += HS_HEADER
        if offset + flen > length or pos + flen > n:
            raise DtlsDecodeError(DECODE_ERROR, "handshake_fragment")
        if length > MAX_MESSAGE:
            raise DtlsDecodeError(ILLEGAL_PARAMETER, "handshake_too_long")
        out.append(Fragment(msg_type, length, seq, offset, bytes(payload[pos:pos + flen])))
        pos += flen
    return out


def message(msg_type: int, seq: int, body: bytes) -> bytes:
    """A whole handshake message with its DTLS header (as the transcript holds it, RFC 6347 §4.2.6)"""
    n = len(body).to_bytes(3, "big")
    return _HS.pack(msg_type, n, seq, b"\0\0\0", n) + body


def fragments(msg: bytes, room: int) -> list[bytes]:
    """A whole message (header included) cut into fragments of at most `room` bytes each"""
    body = msg[HS_HEADER:]
    if len(msg) <= room:
        return [msg]
    step = max(1, room - HS_HEADER)
    out = []
    for off in range(0, len(body), step):
        chunk = body[off:off + step]
        out.append(msg[:6] + off.to_bytes(3, "big") + len(chunk).to_bytes(3, "big") + chunk)
    return out


class Reassembly:
    """One message's fragments as they come (any order, overlapping allowed, consistent or dropped)"""

    __slots__ = ("msg_type", "length", "body", "ranges")

    def __init__(self, first: Fragment) -> None:
        self.msg_type = first.msg_type
        self.length = first.length
        self.body = bytearray(first.length)
        self.ranges: list[tuple[int, int]] = []

    def add(self, f: Fragment) -> bool:
        """False when `f` contradicts what came before, or would leave the message in more than
        MAX_RANGES pieces (dropped: see MAX_RANGES); the message is complete when `complete`.
        The ranges stay sorted and apart: a fragment is merged with its neighbours only (a sort
        of every range at every fragment let 1-byte fragments cost ~60 ms a datagram)."""
        if f.msg_type != self.msg_type or f.length != self.length:
            return False
        a, b = f.offset, f.offset + len(f.body)
        if a == b:
            return True
        ranges = self.ranges
        lo = bisect_left(ranges, (a,))  # (the first range that starts at or after a)
        if lo and ranges[lo - 1][1] >= a:  # (the one before reaches it)
            lo -= 1
            a = ranges[lo][0]
        hi = lo
        while hi < len(ranges) and ranges[hi][0] <= b:
            b = max(b, ranges[hi][1])
            hi += 1
        if hi == lo and len(ranges) >= MAX_RANGES:
            return False
        self.body[f.offset:f.offset + len(f.body)] = f.body
        ranges[lo:hi] = [(a, b)]
        return True

    @property
    def complete(self) -> bool:
        return self.length == 0 or self.ranges == [(0, self.length)]


class _Reader:
    """A cursor over untrusted bytes; every short read is a decode_error"""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise DtlsDecodeError(DECODE_ERROR, "message_truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.uint(length_bytes))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def end(self) -> None:
        if self.left:
            raise DtlsDecodeError(DECODE_ERROR, "trailing_bytes")


def parse_extensions_untrusted(r: _Reader) -> dict[int, bytes]:
    if not r.left:
        return {}
    block = _Reader(r.vector(2))
    out: dict[int, bytes] = {}
    while block.left:
        ext = block.uint(2)
        data = block.vector(2)
        if ext in out:
            raise DtlsDecodeError(ILLEGAL_PARAMETER, "duplicate_extension")
        out[ext] = data
    return out


class ClientHello(NamedTuple):
    """(a tuple, as Fragment: every hello, the cookie-less ones of a flood included, makes one)"""
    version: int
    random: bytes
    session_id: bytes
    cookie: bytes
    suites: tuple[int, ...]
    compression: bytes
    extensions: dict[int, bytes]
    #: the hello's bytes a cookie is made over (engine.CookieJar), as they came: version, random,
    #: session_id, cipher_suites and compression_methods with their length prefixes (b"": not
    #: parsed from the wire, CookieJar encodes the fields)
    cookie_input: bytes = b""

    def cid_offered(self) -> bytes | None:
        """The CID the client asks for in records to it (b"": none needed), or None: not offered"""
        data = self.extensions.get(EXT_CONNECTION_ID)
        if data is None:
            return None
        r = _Reader(data)
        cid = r.vector(1)
        r.end()
        return cid


def _truncated() -> DtlsDecodeError:
    return DtlsDecodeError(DECODE_ERROR, "message_truncated")


def parse_client_hello_untrusted(body: bytes) -> ClientHello:
    # (every hello, the cookie-less first ones included, comes through here: plain slicing, not
    # `_Reader`, which made it ~3x slower; the same checks in the same order, the same errors)
    body = bytes(body)
    n = len(body)
    if n < 35:
        raise _truncated()
    version = body[0] << 8 | body[1]
    random = body[2:34]
    end = 35 + body[34]
    if end > n:
        raise _truncated()
    session_id = body[35:end]
    if len(session_id) > 32:
        raise DtlsDecodeError(ILLEGAL_PARAMETER, "session_id_length")
    if end >= n:
        raise _truncated()
    session_end = end
    pos, end = end + 1, end + 1 + body[end]
    if end > n:
        raise _truncated()
    cookie = body[pos:end]
    cookie_end = end
    if end + 2 > n:
        raise _truncated()
    pos, end = end + 2, end + 2 + (body[end] << 8 | body[end + 1])
    if end > n:
        raise _truncated()
    raw = body[pos:end]
    if not raw or len(raw) % 2:
        raise DtlsDecodeError(DECODE_ERROR, "cipher_suites")
    suites = struct.unpack(f"!{len(raw) // 2}H", raw)
    if end >= n:
        raise _truncated()
    pos, end = end + 1, end + 1 + body[end]
    if end > n:
        raise _truncated()
    compression = body[pos:end]
    if not compression:
        raise DtlsDecodeError(DECODE_ERROR, "compression_methods")
    cookie_input = body[:session_end] + body[cookie_end:end]
    extensions: dict[int, bytes] = {}
    if end < n:  # (extensions: as parse_extensions_untrusted, then nothing after them)
        if end + 2 > n:
            raise _truncated()
        pos, end = end + 2, end + 2 + (body[end] << 8 | body[end + 1])
        if end > n:
            raise _truncated()
        while pos < end:
            if pos + 4 > end:
                raise _truncated()
            ext = body[pos] << 8 | body[pos + 1]
            stop = pos + 4 + (body[pos + 2] << 8 | body[pos + 3])
            if stop > end:
                raise _truncated()
            if ext in extensions:
                raise DtlsDecodeError(ILLEGAL_PARAMETER, "duplicate_extension")
            extensions[ext] = body[pos + 4:stop]
            pos = stop
        if end != n:
            raise DtlsDecodeError(DECODE_ERROR, "trailing_bytes")
    hello = ClientHello(version, random, session_id, cookie, suites, compression, extensions, cookie_input)
    if EXT_CONNECTION_ID in extensions:
        hello.cid_offered()  # (well-formed, or a decode error now)
    return hello


def client_hello(random: bytes, cookie: bytes, suites: tuple[int, ...],
                 extensions: list[tuple[int, bytes]]) -> bytes:
    return b"".join((
        (0xFEFD).to_bytes(2, "big"), random, b"\x00", bytes((len(cookie),)), cookie,
        (2 * len(suites)).to_bytes(2, "big"), struct.pack(f"!{len(suites)}H", *suites), b"\x01\x00",
        extensions_block(extensions),
    ))


def extensions_block(extensions: list[tuple[int, bytes]]) -> bytes:
    """A hello's extensions as the wire has them (nothing at all when there are none); DTLS's and
    TLS's (tls.py)"""
    if not extensions:
        return b""
    block = b"".join(ext.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data for ext, data in extensions)
    return len(block).to_bytes(2, "big") + block


def hello_verify_request(cookie: bytes) -> bytes:
    """RFC 6347 §4.2.1: server_version is DTLS 1.0 whatever is negotiated later"""
    return (0xFEFF).to_bytes(2, "big") + bytes((len(cookie),)) + cookie


def parse_hello_verify_request_untrusted(body: bytes) -> bytes:
    r = _Reader(body)
    r.uint(2)
    cookie = r.vector(1)
    r.end()
    return cookie


def server_hello(random: bytes, suite: int, extensions: list[tuple[int, bytes]]) -> bytes:
    """(an empty session_id: this server does not resume sessions)"""
    return b"".join(((0xFEFD).to_bytes(2, "big"), random, b"\x00", suite.to_bytes(2, "big"), b"\x00",
                     extensions_block(extensions)))


@dataclass(frozen=True, slots=True)
class ServerHello:
    version: int
    random: bytes
    session_id: bytes
    suite: int
    compression: int
    extensions: dict[int, bytes]


def parse_server_hello_untrusted(body: bytes) -> ServerHello:
    r = _Reader(body)
    version = r.uint(2)
    random = r.take(32)
    session_id = r.vector(1)
    suite = r.uint(2)
    compression = r.uint(1)
    extensions = parse_extensions_untrusted(r)
    r.end()
    return ServerHello(version, random, session_id, suite, compression, extensions)


def parse_psk_client_key_exchange_untrusted(body: bytes) -> bytes:
    """RFC 4279 §2: the PSK identity"""
    r = _Reader(body)
    identity = r.vector(2)
    r.end()
    return identity


def psk_client_key_exchange(identity: bytes) -> bytes:
    return len(identity).to_bytes(2, "big") + identity


def parse_finished_untrusted(body: bytes) -> bytes:
    if len(body) != 12:
        raise DtlsDecodeError(DECODE_ERROR, "finished_length")
    return bytes(body)


def cid_extension(cid: bytes) -> bytes:
    return bytes((len(cid),)) + cid


def parse_cid_extension_untrusted(data: bytes) -> bytes:
    r = _Reader(data)
    cid = r.vector(1)
    r.end()
    return cid


# -- certificates and ECDHE (RFC 5246 §7.4.2-7.4.8, RFC 8422) --------------------------------------

EXT_SUPPORTED_GROUPS = 10
EXT_EC_POINT_FORMATS = 11
EXT_SIGNATURE_ALGORITHMS = 13
SECP256R1 = 23
ECDSA_SECP256R1_SHA256 = 0x0403
NAMED_CURVE = 3
ECDSA_SIGN = 64  # ClientCertificateType ecdsa_sign


def _u16_list_untrusted(data: bytes) -> tuple[int, ...]:
    r = _Reader(data)
    raw = r.vector(2)
    r.end()
    if len(raw) % 2:
        raise DtlsDecodeError(DECODE_ERROR, "odd_length_list")
    return struct.unpack(f"!{len(raw) // 2}H", raw)


def parse_supported_groups_untrusted(data: bytes) -> tuple[int, ...]:
    return _u16_list_untrusted(data)


def parse_signature_algorithms_untrusted(data: bytes) -> tuple[int, ...]:
    return _u16_list_untrusted(data)


def parse_point_formats_untrusted(data: bytes) -> bytes:
    r = _Reader(data)
    formats = r.vector(1)
    r.end()
    return formats


def u16_list(values: tuple[int, ...]) -> bytes:
    return (2 * len(values)).to_bytes(2, "big") + struct.pack(f"!{len(values)}H", *values)


def certificate(chain: tuple[bytes, ...]) -> bytes:
    block = b"".join(len(c).to_bytes(3, "big") + c for c in chain)
    return len(block).to_bytes(3, "big") + block


def parse_certificate_untrusted(body: bytes) -> list[bytes]:
    r = _Reader(body)
    block = _Reader(r.vector(3))
    r.end()
    chain = []
    while block.left:
        cert = block.vector(3)
        if not cert:
            raise DtlsDecodeError(DECODE_ERROR, "empty_certificate")
        chain.append(cert)
    return chain


def ecdhe_params(point: bytes) -> bytes:
    """ServerECDHParams: named_curve secp256r1 and the server's ephemeral point"""
    return bytes((NAMED_CURVE,)) + SECP256R1.to_bytes(2, "big") + bytes((len(point),)) + point


def server_key_exchange_ecdhe(params: bytes, signature: bytes) -> bytes:
    return params + ECDSA_SECP256R1_SHA256.to_bytes(2, "big") + len(signature).to_bytes(2, "big") + signature


def parse_server_key_exchange_ecdhe_untrusted(body: bytes) -> tuple[bytes, bytes, bytes]:
    """(the signed params, the point, the signature)"""
    r = _Reader(body)
    if r.uint(1) != NAMED_CURVE or r.uint(2) != SECP256R1:
        raise DtlsDecodeError(ILLEGAL_PARAMETER, "curve")
    point = r.vector(1)
    params = body[:r.pos]
    if r.uint(2) != ECDSA_SECP256R1_SHA256:
        raise DtlsDecodeError(ILLEGAL_PARAMETER, "signature_algorithm")
    signature = r.vector(2)
    r.end()
    return params, point, signature


def certificate_request() -> bytes:
    """ecdsa_sign, ecdsa_secp256r1_sha256, no CA names"""
    return bytes((1, ECDSA_SIGN)) + u16_list((ECDSA_SECP256R1_SHA256,)) + b"\x00\x00"


def parse_certificate_request_untrusted(body: bytes) -> tuple[bytes, tuple[int, ...]]:
    r = _Reader(body)
    types = r.vector(1)
    algs = r.vector(2)
    r.vector(2)  # certificate_authorities (not used)
    r.end()
    if len(algs) % 2:
        raise DtlsDecodeError(DECODE_ERROR, "odd_length_list")
    return types, struct.unpack(f"!{len(algs) // 2}H", algs)


def ecdhe_client_key_exchange(point: bytes) -> bytes:
    return bytes((len(point),)) + point


def parse_ecdhe_client_key_exchange_untrusted(body: bytes) -> bytes:
    r = _Reader(body)
    point = r.vector(1)
    r.end()
    return point


def certificate_verify(signature: bytes) -> bytes:
    return ECDSA_SECP256R1_SHA256.to_bytes(2, "big") + len(signature).to_bytes(2, "big") + signature


def parse_certificate_verify_untrusted(body: bytes) -> bytes:
    r = _Reader(body)
    if r.uint(2) != ECDSA_SECP256R1_SHA256:
        raise DtlsDecodeError(ILLEGAL_PARAMETER, "signature_algorithm")
    signature = r.vector(2)
    r.end()
    return signature
