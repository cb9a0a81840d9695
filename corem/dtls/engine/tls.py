"""TLS 1.2 (RFC 5246) on the engine's handshake, for CoAP over TLS (`--coaps-tcp`, RFC 8323;
issue 27), sans-IO: `TlsConnection` is a `connection.Connection` whose framing is TLS's, and
`TlsClient` its client role for tests and benchmarks.

Why corem's own engine, and not another stack: coaps+tcp serves the same devices with the same
credentials as CoAPS -- PSK identities looked up in the registry while the handshake runs, and
ECDSA certificates checked against `dtls_ca` and the registry (`dtls_client_auth`).  Python
3.11's `ssl` has no PSK server callback (3.13 has one), pyOpenSSL has none either (only a
third-party monkey patch, pyopenssl-psk, adds one), and the stack tcp.py used, python-mbedtls on
Mbed TLS 2.28, is past its end of life.  The engine already holds
the whole TLS 1.2 handshake for our suites (DTLS 1.2 is TLS 1.2's handshake in another framing):
one implementation of the key schedule, the PSK and ECDHE-ECDSA exchanges, extended master
secret, the checks and the alerts serves both transports, and is tested by both.

What differs from DTLS here is framing only, and this module holds all of it:

- records: a 5-byte header (type, version 0x0303, length), no epoch and no sequence number on
  the wire; each direction's sequence number is implicit, 0 for its first protected record after
  its ChangeCipherSpec.  Records come from a byte stream (`RecordReader`): cut anywhere, several
  in one read.  The first ClientHello's record may say {3, 0..3} (RFC 5246 Appendix E.1); every
  other record says 0x0303.
- AEAD (RFC 5246 §6.2.3.3, RFC 5288 for GCM, RFC 6655 for CCM and CCM-8): the fragment is an
  8-byte explicit nonce (this side writes its sequence number, as OpenSSL and Mbed TLS do) and
  the ciphertext; nonce = the 4-byte write IV + the explicit nonce; additional data = seq_num(8) +
  type(1) + version(2) + length of the plaintext(2).
- handshake messages: a 4-byte header (type, 24-bit length), in the wire and in the transcript
  that the Finished and extended master secret hash; a message may span records and several may
  share one (`HandshakeReader`); one may not span a ChangeCipherSpec.
- no HelloVerifyRequest or cookie (TCP's own handshake proved the address), no retransmission
  (the flight is written once), no Connection ID, version 0x0303 everywhere (the DTLS logic
  writes its ServerHello with DTLS's version: `_next_message` puts TLS's there, and "coap" as the
  ALPN answer when the client offered it, RFC 8323 §4.3).

The rest is the DTLS engine's (connection.py): the suites (TLS_PSK_WITH_AES_128_CCM_8,
TLS_PSK_WITH_AES_128_CCM, TLS_PSK_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, P-256), extended master secret required (`require_ems`),
no compression, no resumption, nothing below TLS 1.2 (a hello below 0x0303 is a protocol_version
alert), no renegotiation (a ClientHello after the handshake gets a warning no_renegotiation and
the session stays).  Over TCP every error is the end: a record that does not authenticate, a
message out of order or malformed bytes are answered with a fatal alert (bad_record_mac,
unexpected_message, decode_error, ...) and the connection is FAILED; nothing else is raised.
"""

from __future__ import annotations

from typing import Callable

from cryptography.exceptions import InvalidTag

import corem.dtls.engine.messages as m  # (the modules, not the package: no cycle through __init__)
from .connection import (CLOSED, ESTABLISHED, FAILED, WAIT_CCS, WAIT_FINISHED, WAIT_SERVER_HELLO, Connection,
                         Params)
from .crypto import Keys
from .errors import (BAD_RECORD_MAC, CLOSE_NOTIFY, DECODE_ERROR, ILLEGAL_PARAMETER, INTERNAL_ERROR,
                     NO_RENEGOTIATION, PROTOCOL_VERSION, RECORD_OVERFLOW, UNEXPECTED_MESSAGE, WARNING,
                     DtlsDecodeError, HandshakeFailed)
from .records import ALERT, APPLICATION_DATA, CHANGE_CIPHER_SPEC, CONTENT_TYPES, DTLS_1_2, HANDSHAKE, aead_for

TLS_1_2 = 0x0303
HEADER = 5
HS_HEADER = 4
EXPLICIT_NONCE = 8
#: RFC 5246 §6.2: a plaintext fragment is at most 2^14 bytes, a protected one 2^14 + 2048
MAX_PLAINTEXT = 1 << 14
MAX_FRAGMENT = (1 << 14) + 2048
SEQ_MAX = (1 << 64) - 1
EXT_ALPN = 16
COAP_ALPN = b"coap"

PskLookup = Callable[[bytes], "bytes | None"]


# -- the record layer ----------------------------------------------------------------------------

def record(ctype: int, fragment: bytes) -> bytes:
    """A TLSPlaintext or TLSCiphertext record: type, 0x0303, length, fragment"""
    return bytes((ctype, 3, 3)) + len(fragment).to_bytes(2, "big") + fragment


def aad(seq: int, ctype: int, length: int, version: int = TLS_1_2) -> bytes:
    """RFC 5246 §6.2.3.3: seq_num(8) + TLSCompressed.type + version + length (of the plaintext)"""
    return seq.to_bytes(8, "big") + bytes((ctype,)) + version.to_bytes(2, "big") + length.to_bytes(2, "big")


class TlsProtection:
    """One direction's AEAD state: the key and the 4-byte implicit IV (salt); the sequence number is
    the caller's (implicit: it is never read from the wire)."""

    __slots__ = ("aead", "iv", "tag")

    def __init__(self, cipher: str, key: bytes, iv: bytes) -> None:
        if len(key) != 16 or len(iv) != 4:
            raise ValueError("AES-128 takes a 16-byte key and a 4-byte implicit IV")
        self.iv = bytes(iv)
        self.aead, self.tag = aead_for(cipher, key)

    @property
    def overhead(self) -> int:
        return EXPLICIT_NONCE + self.tag

    def seal(self, ctype: int, seq: int, plaintext: bytes) -> bytes:
        """The whole record (the explicit nonce is the sequence number)"""
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError("record_overflow: over 2^14 bytes of plaintext")
        explicit = seq.to_bytes(8, "big")
        return record(ctype, explicit + self.aead.encrypt(self.iv + explicit, plaintext,
                                                           aad(seq, ctype, len(plaintext))))

    def open_untrusted(self, ctype: int, seq: int, fragment: bytes) -> bytes:
        n = len(fragment) - EXPLICIT_NONCE - self.tag
        if n < 0:
            raise DtlsDecodeError(BAD_RECORD_MAC, "record_too_short")
        try:
            plain = self.aead.decrypt(self.iv + fragment[:EXPLICIT_NONCE], fragment[EXPLICIT_NONCE:],
                                      aad(seq, ctype, n))
        except InvalidTag:
            raise DtlsDecodeError(BAD_RECORD_MAC, "bad_record_mac") from None
        if len(plain) > MAX_PLAINTEXT:
            raise DtlsDecodeError(RECORD_OVERFLOW, "record_overflow")
        return plain


class RecordReader:
    """Records out of a byte stream cut anywhere.  Holds at most one incomplete record (its header
    is checked as soon as it is there: an oversized length is refused before anything is kept)."""

    __slots__ = ("buf", "first")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.first = True  # the first record (a ClientHello may carry {3, 0..3})

    @property
    def buffered(self) -> int:
        return len(self.buf)

    def feed_untrusted(self, data: bytes) -> list[tuple[int, bytes]]:
        """(content type, fragment) of every record completed by `data`"""
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= HEADER:
            ctype, major, minor = buf[pos], buf[pos + 1], buf[pos + 2]
            length = buf[pos + 3] << 8 | buf[pos + 4]
            if ctype not in CONTENT_TYPES:
                raise DtlsDecodeError(UNEXPECTED_MESSAGE, "unknown_content_type")
            if major != 3 or (minor != 3 and not (self.first and minor <= 3)):
                raise DtlsDecodeError(PROTOCOL_VERSION, "record_version")
            if length > MAX_FRAGMENT:
                raise DtlsDecodeError(RECORD_OVERFLOW, "record_overflow")
            if n - pos - HEADER < length:
                break
            out.append((ctype, bytes(buf[pos + HEADER:pos + HEADER + length])))
            pos += HEADER + length
            self.first = False
        del buf[:pos]
        return out


class HandshakeReader:
    """Whole handshake messages out of handshake records: one may span records, several may share
    one.  Holds at most one incomplete message (of at most messages.MAX_MESSAGE bytes)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self.buf)

    def feed_untrusted(self, data: bytes) -> list[tuple[int, bytes]]:
        """(type, body) of every message completed by `data`"""
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= HS_HEADER:
            length = int.from_bytes(buf[pos + 1:pos + 4], "big")
            if length > m.MAX_MESSAGE:
                raise DtlsDecodeError(ILLEGAL_PARAMETER, "handshake_too_long")
            if n - pos - HS_HEADER < length:
                break
            out.append((buf[pos], bytes(buf[pos + HS_HEADER:pos + HS_HEADER + length])))
            pos += HS_HEADER + length
        del buf[:pos]
        return out


def handshake_message(msg_type: int, body: bytes) -> bytes:
    """A whole handshake message with TLS's header, as the wire and the transcript hold it"""
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


def parse_client_hello_untrusted(body: bytes) -> m.ClientHello:
    """A TLS ClientHello (no cookie field): read by messages.parse_client_hello_untrusted with an
    empty cookie put where DTLS has it, so that both transports make the same checks"""
    body = bytes(body)
    if len(body) < 35 or 35 + body[34] > len(body):
        raise DtlsDecodeError(DECODE_ERROR, "message_truncated")
    end = 35 + body[34]
    return m.parse_client_hello_untrusted(body[:end] + b"\x00" + body[end:])


def parse_alpn_untrusted(data: bytes) -> list[bytes]:
    """RFC 7301 §3.1: ProtocolNameList"""
    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        raise DtlsDecodeError(DECODE_ERROR, "alpn")
    out, pos = [], 2
    while pos < len(data):
        n = data[pos]
        if n == 0 or pos + 1 + n > len(data):
            raise DtlsDecodeError(DECODE_ERROR, "alpn")
        out.append(bytes(data[pos + 1:pos + 1 + n]))
        pos += 1 + n
    return out


def alpn_extension(protocol: bytes) -> bytes:
    return (len(protocol) + 1).to_bytes(2, "big") + bytes((len(protocol),)) + protocol


# -- one connection ------------------------------------------------------------------------------

class TlsConnection(Connection):
    """One TLS 1.2 connection, either role: bytes in (`receive_untrusted`), bytes out
    (`data_to_send`), application data (`app`, `seal`).  The server role starts from the
    client's first bytes (`psk_for` looks PSK identities up, as the DTLS engine's callback)."""

    def __init__(self, role: str, params: Params, peer: object, now: float, *,
                 psk_for: PskLookup | None = None, alpn: bytes | None = COAP_ALPN) -> None:
        super().__init__(role, params, peer, now)
        self.psk_for = psk_for
        self.records = RecordReader()
        self.handshake = HandshakeReader()
        self.alpn = alpn  # what this server answers to a client that offers it
        self.alpn_agreed = False
        self.read_seq = 0
        self.out_seq = 0
        self.tls_write: TlsProtection | None = None
        self.tls_pending: TlsProtection | None = None
        self.tls_read: TlsProtection | None = None
        self.sent_ccs = False

    @property
    def established(self) -> bool:
        return self.state == ESTABLISHED

    @property
    def over(self) -> bool:
        return self.state in (FAILED, CLOSED)

    # -- bytes in ------------------------------------------------------------------------------

    def receive_untrusted(self, data: bytes, now: float) -> None:
        """Take bytes from the stream.  Whatever they are, nothing is raised: a fault is a fatal
        alert queued and the state FAILED (`reason` says why); application data piles up in `app`."""
        if self.over:
            return
        self.last_seen = now
        try:
            for ctype, fragment in self.records.feed_untrusted(data):
                if self.tls_read is not None:
                    seq = self.read_seq
                    if seq >= SEQ_MAX:
                        raise DtlsDecodeError(INTERNAL_ERROR, "sequence_numbers_exhausted")
                    try:
                        plain = self.tls_read.open_untrusted(ctype, seq, fragment)
                    except DtlsDecodeError as e:
                        if self.state != ESTABLISHED and e.alert == BAD_RECORD_MAC:
                            raise DtlsDecodeError(BAD_RECORD_MAC, "finished_not_authentic") from None
                        raise
                    self.read_seq = seq + 1
                    self._content(ctype, plain, 1, now)
                else:
                    if len(fragment) > MAX_PLAINTEXT:
                        raise DtlsDecodeError(RECORD_OVERFLOW, "record_overflow")
                    self._content(ctype, fragment, 0, now)
                if self.over:
                    return
        except DtlsDecodeError as e:
            if not self.over:
                self._fail(e.alert, e.reason)

    def _content(self, ctype: int, data: bytes, epoch: int, now: float) -> None:
        if ctype == HANDSHAKE:
            if not data:
                raise DtlsDecodeError(UNEXPECTED_MESSAGE, "empty_handshake_record")
            for msg_type, body in self.handshake.feed_untrusted(data):
                self._handshake_message(msg_type, body, epoch, now)
                if self.over:
                    return
        elif ctype == CHANGE_CIPHER_SPEC:
            if data != b"\x01":
                raise DtlsDecodeError(DECODE_ERROR, "change_cipher_spec")
            self._change_cipher_spec(now)
        elif ctype == ALERT:
            if self.handshake.buffered:
                raise DtlsDecodeError(UNEXPECTED_MESSAGE, "alert_inside_handshake_message")
            self._alert(data, epoch)
        elif ctype == APPLICATION_DATA:
            if self.handshake.buffered:
                raise DtlsDecodeError(UNEXPECTED_MESSAGE, "data_inside_handshake_message")
            if epoch != 1 or self.state != ESTABLISHED:
                raise DtlsDecodeError(UNEXPECTED_MESSAGE, "early_application_data")
            if data:
                self.app.append(data)

    def _handshake_message(self, msg_type: int, body: bytes, epoch: int, now: float) -> None:
        if self.state == ESTABLISHED:
            if msg_type == (m.CLIENT_HELLO if self.role == "server" else m.HELLO_REQUEST):
                # RFC 5746 §4.4 / RFC 5246 §7.2.2: say no and keep the session (a few times)
                self.refuse_renegotiation()
                return
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, f"unexpected_{msg_type}_after_handshake")
        if self.role == "server" and self.state == "":
            self._client_hello(msg_type, body, now)
            return
        raw = handshake_message(msg_type, body)
        self.recv_seq += 1
        try:
            self._message(msg_type, body, raw, epoch, now)
        except (HandshakeFailed, DtlsDecodeError) as e:
            self._fail(e.alert, e.reason)

    def _client_hello(self, msg_type: int, body: bytes, now: float) -> None:
        if msg_type != m.CLIENT_HELLO:
            self._fail(UNEXPECTED_MESSAGE, "expected_client_hello")
            return
        try:
            hello = parse_client_hello_untrusted(body)
            alpn = hello.extensions.get(EXT_ALPN)
            offered = parse_alpn_untrusted(alpn) if alpn is not None else []
        except DtlsDecodeError as e:
            self._fail(e.alert, e.reason)
            return
        if hello.version < TLS_1_2 or hello.version >> 8 != 3:
            self._fail(PROTOCOL_VERSION, "protocol_version")
            return
        if m.EXT_CONNECTION_ID in hello.extensions:
            hello.extensions.pop(m.EXT_CONNECTION_ID)  # (no CID over TCP: not negotiated)
        self.alpn_agreed = self.alpn is not None and self.alpn in offered
        if self.psk_for is None:
            self._fail(INTERNAL_ERROR, "no_psk_lookup")
            return
        self.server_start(hello, handshake_message(msg_type, body), 0, 0, self.psk_for, None, now)

    def _alert(self, data: bytes, epoch: int) -> None:
        """(RFC 5246 §7.2.1: a close_notify is answered by one)"""
        was = self.state
        super()._alert(data, epoch)
        if was == ESTABLISHED and self.state == CLOSED:
            self.send_alert(WARNING, CLOSE_NOTIFY)

    def _client_message(self, msg_type: int, body: bytes, raw: bytes, now: float) -> None:
        if msg_type == m.HELLO_VERIFY_REQUEST:
            raise HandshakeFailed(UNEXPECTED_MESSAGE, "hello_verify_request_over_tls")
        if msg_type == m.SERVER_HELLO and self.state == WAIT_SERVER_HELLO:
            if len(body) < 2 or int.from_bytes(body[:2], "big") != TLS_1_2:
                raise HandshakeFailed(PROTOCOL_VERSION, "protocol_version")
            body = DTLS_1_2.to_bytes(2, "big") + body[2:]  # (the DTLS logic checks DTLS's number)
        super()._client_message(msg_type, body, raw, now)

    def _change_cipher_spec(self, now: float) -> None:
        if self.state != WAIT_CCS or self.tls_pending is None or self.handshake.buffered:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "unexpected_change_cipher_spec")
        self.tls_read, self.tls_pending = self.tls_pending, None
        self.read_seq = 0
        self.state = WAIT_FINISHED

    def install(self, keys: Keys) -> None:
        assert self.suite is not None
        self.keys = keys
        client = TlsProtection(self.suite.cipher, keys.client_key, keys.client_iv)
        server = TlsProtection(self.suite.cipher, keys.server_key, keys.server_iv)
        self.tls_write, self.tls_pending = (server, client) if self.role == "server" else (client, server)

    # -- the client role -----------------------------------------------------------------------

    def _send_hello(self, cookie: bytes, now: float) -> None:
        extensions = [(m.EXT_RENEGOTIATION_INFO, b"\x00")]
        if self.offer_ems:
            extensions.insert(0, (m.EXT_EXTENDED_MASTER_SECRET, b""))
        if any(s.kx == "ecdhe_ecdsa" for s in self.params.suites):
            extensions += [(m.EXT_SUPPORTED_GROUPS, m.u16_list((m.SECP256R1,))),
                           (m.EXT_EC_POINT_FORMATS, b"\x01\x00"),
                           (m.EXT_SIGNATURE_ALGORITHMS, m.u16_list((m.ECDSA_SECP256R1_SHA256,)))]
        if self.alpn is not None:
            extensions.append((EXT_ALPN, alpn_extension(self.alpn)))
        suites = b"".join(code.to_bytes(2, "big") for code in self.offered)
        body = b"".join((TLS_1_2.to_bytes(2, "big"), self.client_random, b"\x00",
                         len(suites).to_bytes(2, "big"), suites, b"\x01\x00", m.extensions_block(extensions)))
        msg = self._next_message(m.CLIENT_HELLO, body)
        self.transcript = bytearray(msg)
        self._send_flight([(0, HANDSHAKE, msg)], now, timer=False)

    # -- bytes out -----------------------------------------------------------------------------

    def _next_message(self, msg_type: int, body: bytes) -> bytes:
        if msg_type == m.SERVER_HELLO:
            body = TLS_1_2.to_bytes(2, "big") + body[2:]
            if self.alpn_agreed and self.alpn is not None:
                # (connection.py's ServerHello: an empty session_id, so its extensions start at 38)
                exts = body[38:]
                block = exts[2:] + EXT_ALPN.to_bytes(2, "big") + len(alpn_extension(self.alpn)).to_bytes(
                    2, "big") + alpn_extension(self.alpn)
                body = body[:38] + len(block).to_bytes(2, "big") + block
        self.send_seq += 1
        return handshake_message(msg_type, body)

    def _send_flight(self, flight: list[tuple[int, int, bytes]], now: float, *, timer: bool) -> None:
        """Written once (TCP does not lose it): nothing kept to resend, no timer"""
        self.flight = flight
        self.retransmit_at = float("inf")
        self._emit_flight()
        self.flight = []

    def _emit_flight(self) -> None:
        """Consecutive handshake messages share records (at most 2^14 bytes each)"""
        pending = b""
        protected = False
        for epoch, ctype, payload in self.flight + [(-1, -1, b"")]:
            if pending and (ctype != HANDSHAKE or (epoch == 1) != protected):
                for i in range(0, len(pending), MAX_PLAINTEXT):
                    self._write_record(protected, HANDSHAKE, pending[i:i + MAX_PLAINTEXT])
                pending = b""
            if ctype == HANDSHAKE:
                pending += payload
                protected = epoch == 1
            elif ctype >= 0:
                self._write_record(epoch == 1, ctype, payload)
                if ctype == CHANGE_CIPHER_SPEC:
                    self.sent_ccs = True

    def _write_record(self, protected: bool, ctype: int, payload: bytes) -> bool:
        if self.state == FAILED and self.reason == "sequence_numbers_exhausted":
            return False
        if not protected:
            self.out.append(record(ctype, payload))
            return True
        seq = self.out_seq
        if seq >= SEQ_MAX:
            self.state = FAILED
            self.reason = "sequence_numbers_exhausted"
            return False
        assert self.tls_write is not None
        self.out_seq = seq + 1
        self.out.append(self.tls_write.seal(ctype, seq, payload))
        return True

    def send_alert(self, level: int, description: int) -> None:
        self._write_record(self.sent_ccs and self.tls_write is not None, ALERT, bytes((level, description)))

    def seal(self, plaintext: bytes) -> bytes | None:
        """Application data as records (2^14 bytes each at most); None unless ESTABLISHED"""
        if self.state != ESTABLISHED:
            return None
        view = memoryview(plaintext)
        for i in range(0, max(len(view), 1), MAX_PLAINTEXT):
            if not self._write_record(True, APPLICATION_DATA, bytes(view[i:i + MAX_PLAINTEXT])):
                return None
        out, self.out = self.out, []
        return b"".join(out)

    def data_to_send(self) -> bytes:
        out, self.out = self.out, []
        return b"".join(out)

    def take_app(self) -> bytes:
        app, self.app = self.app, []
        return b"".join(app)


# -- the client role, for tests and benchmarks ---------------------------------------------------

class TlsClient:
    """A TLS 1.2 client on the engine (PSK, or ECDHE-ECDSA with `params`' certificate), sans-IO:
    `start(now)`, `receive(data, now)` -> application data, `data_to_send()`, `wrap(plaintext)`."""

    def __init__(self, identity: bytes = b"", psk: bytes = b"", *, params: Params | None = None, ems: bool = True,
                 alpn: bytes | None = COAP_ALPN) -> None:
        self.conn = TlsConnection("client", params or Params(), None, 0.0, alpn=alpn)
        self.conn.offer_ems = ems
        self.identity = identity
        self.psk = psk

    def start(self, now: float) -> None:
        self.conn.client_start(self.identity, self.psk, None, now)

    @property
    def established(self) -> bool:
        return self.conn.state == ESTABLISHED

    @property
    def state(self) -> str:
        return self.conn.state

    def receive(self, data: bytes, now: float) -> bytes:
        self.conn.receive_untrusted(data, now)
        return self.conn.take_app()

    def wrap(self, plaintext: bytes) -> bytes:
        sealed = self.conn.seal(plaintext)
        if sealed is None:
            raise RuntimeError("not established")
        return sealed

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def close(self) -> None:
        self.conn.close()


__all__ = ["HandshakeReader", "RecordReader", "TlsClient", "TlsConnection", "TlsProtection", "aad",
           "handshake_message", "parse_client_hello_untrusted", "record"]
