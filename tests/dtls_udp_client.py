"""A CoAPS device for tests: an Mbed TLS DTLS-PSK client on a real UDP socket that keeps its
session for as long as the object lives (libcoap's coap-client exits after each request)."""

from __future__ import annotations

import socket
import time

from mbedtls import tls
from mbedtls.exceptions import TLSError

from corem.codec import Code, Message, OptionNumber as O, Type, decode, encode, make_options

from .coap_answers import EMPTY_ACK, IN_ACK, SEPARATE, ack_for, answer_kind


def psk_client_buffer(identity: str, key: bytes) -> tls.TLSWrappedBuffer:
    """A DTLS 1.2 PSK client (TLS_PSK_WITH_AES_128_CCM_8) on Mbed TLS buffers, as devices are."""
    conf = tls.DTLSConfiguration(
        pre_shared_key=(identity, key),
        ciphers=["TLS-PSK-WITH-AES-128-CCM-8"],
        validate_certificates=False,
        lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
        highest_supported_version=tls.DTLSVersion.DTLSv1_2,
    )
    return tls.ClientContext(conf).wrap_buffers(None)


class DtlsUdpClient:
    def __init__(self, port: int, identity: str, key: bytes, *, source_port: int = 0) -> None:
        self.buf = psk_client_buffer(identity, key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if source_port:  # (a device back on its old port; with port 0, the kernel could pick one in use)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", source_port))
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.mid = 100

    def _flush(self) -> None:
        while chunk := self.buf.peek_outgoing(4096):
            self.buf.consume_outgoing(len(chunk))
            self.sock.send(chunk)

    def handshake(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.buf._handshake_state is not tls.HandshakeStep.HANDSHAKE_OVER:
            if time.monotonic() > deadline:
                raise TimeoutError("handshake did not finish")
            try:
                self.buf.do_handshake()
            except tls.WantWriteError:
                pass
            except tls.WantReadError:
                self._flush()
                try:
                    self.buf.receive_from_network(self.sock.recv(4096))
                except socket.timeout:
                    pass
        self._flush()

    def post(self, path: list[str], payload: bytes, content_format: int = 60, timeout: float = 30.0) -> Message:
        """A CON POST over the session; retransmitted every second until the ACK comes."""
        self.mid += 1
        msg = Message(  # (a token of its own: a late answer to the one before is not this one's)
            Type.CON, Code.POST, self.mid, self.mid.to_bytes(2, "big"),
            make_options([(O.URI_PATH, p) for p in path] + [(O.CONTENT_FORMAT, content_format)]), payload,
        )
        return self.exchange(encode(msg), timeout)

    def exchange(self, data: bytes, timeout: float = 30.0) -> Message:
        """A CON message (already encoded) over the session, retransmitted every second until the
        ACK with its message ID comes: the answer, piggybacked -- or, after an empty ACK (a server
        whose bus took longer than its piggyback timeout), the separate answer with the request's
        token, acknowledged if confirmable."""
        self.mid = data[2] << 8 | data[3]
        token = decode(data).token
        acked = False  # (an empty ACK came: no more retransmissions, the answer follows)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not acked:
                self.buf.write(data)
                self._flush()
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                try:
                    self.buf.receive_from_network(self.sock.recv(4096))
                    reply = self.buf.read(2048)
                except (socket.timeout, tls.WantReadError):
                    continue
                except TLSError as e:
                    raise AssertionError(f"DTLS error: {e}") from None
                kind = answer_kind(reply, data[2:4], token)
                acked = acked or kind == EMPTY_ACK
                if kind == SEPARATE and (ack := ack_for(reply)) is not None:
                    self.buf.write(ack)
                    self._flush()
                if kind in (IN_ACK, SEPARATE):
                    return decode(reply)
        raise TimeoutError("no answer")

    def close(self) -> None:
        self.sock.close()
