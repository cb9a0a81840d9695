"""How a test client tells its CON request's answer (RFC 7252 §5.2): in the request's ACK
(piggybacked), or after an empty ACK as a response of its own with the request's token (separate;
a confirmable one is the client's to acknowledge).  One owner for every client that waits for one
(conftest.py `post`, test_exactly_once.py `exchange`, dtls_udp_client.py `DtlsUdpClient.exchange`)."""

from __future__ import annotations

IN_ACK, EMPTY_ACK, SEPARATE = "in the ACK", "empty ACK", "separate"


def answer_kind(datagram: bytes, mid: bytes, token: bytes) -> str | None:
    """What `datagram` is to the CON request of message ID `mid` (its 2 bytes) and `token`: its
    answer in the ACK (IN_ACK); the ACK alone, the answer to follow (EMPTY_ACK); the answer on
    its own, CON or NON, with the request's token (SEPARATE: taken even when the empty ACK was
    lost) -- or None: not this request's (another's late answer, a ping, a reset)."""
    if len(datagram) < 4:
        return None
    kind, code = (datagram[0] >> 4) & 3, datagram[1]
    if kind == 2 and datagram[2:4] == mid:
        return IN_ACK if code else EMPTY_ACK
    if kind in (0, 1) and code and datagram[4:4 + (datagram[0] & 15)] == token:
        return SEPARATE
    return None


def ack_for(datagram: bytes) -> bytes | None:
    """The empty ACK a confirmable separate answer asks of the client (None for a NON one)."""
    return bytes((0x60, 0, datagram[2], datagram[3])) if (datagram[0] >> 4) & 3 == 0 else None
