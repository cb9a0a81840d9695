"""CoAP over reliable transports (RFC 8323: TCP, TLS), sans-IO: the framing, and the message layer
a connection needs -- which is almost none: no types, no message IDs, no ACKs, no deduplication,
no retransmission; a request is answered on its connection with its token.

Framing (§3.2): Len (4 bits) | TKL (4 bits), 0-4 bytes of extended length, the code, the token,
then options and payload exactly as in RFC 7252.  Len counts the options and payload: < 13 as is;
13, 14, 15 announce 1, 2, 4 bytes holding Len - 13, - 269, - 65805.  So a frame and a UDP message
differ only in their headers, and `to_frame` / the decoder swap the one for the other: the router,
Observe and Block-wise see the same `Message`s as on UDP.

Signals (§5, code class 7): CSM (7.01) first from each side, Ping (7.02) answered by Pong (7.03)
with the same token, Release (7.04) and Abort (7.05) end the connection.
"""

from __future__ import annotations

from typing import Any, Iterator

from ..codec import Message, MessageFormatError, Options, Type, code_str, decode, encode
from ..errors import BadInput
from ..stats import Histogram, Sample, counter
from .endpoint import DONE, Endpoint, Params, Request

CSM, PING, PONG, RELEASE, ABORT = 0xE1, 0xE2, 0xE3, 0xE4, 0xE5
#: CSM options (§5.3): Max-Message-Size (2), Block-Wise-Transfer (4)
MAX_MESSAGE_SIZE, BLOCK_WISE_TRANSFER = 2, 4
#: RFC 8323 §5.3.1: what a peer may send before its CSM says otherwise
DEFAULT_MAX_MESSAGE = 1152


class FrameError(BadInput):
    """A byte stream that is not RFC 8323 framing (or a frame over the size limit): the
    connection is aborted with this message; `reason` is the metric label (a BadInput of
    corem/errors.py)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _header(length: int, tkl: int, code: int) -> bytes:
    if length < 13:
        return bytes((length << 4 | tkl, code))
    if length < 269:
        return bytes((13 << 4 | tkl, length - 13, code))
    if length < 65805:
        n = length - 269
        return bytes((14 << 4 | tkl, n >> 8, n & 0xFF, code))
    return bytes((15 << 4 | tkl,)) + (length - 65805).to_bytes(4, "big") + bytes((code,))


def frame(code: int, token: bytes, body: bytes = b"") -> bytes:
    """A frame from its code, token and options-and-payload bytes."""
    return _header(len(body), len(token), code) + token + body


def to_frame(data: bytes) -> bytes:
    """A message encoded for UDP (RFC 7252 §3), reframed for a stream: the same token, options and
    payload behind the stream's header (type and message ID dropped)."""
    tkl = data[0] & 0x0F
    return frame(data[1], data[4:4 + tkl], data[4 + tkl:])


def signal(code: int, options: Options | None = None, payload: bytes = b"", token: bytes = b"") -> bytes:
    """A signalling message (CSM, Ping, Pong, Release, Abort)."""
    data = encode(Message(Type.NON, 0x45, 0, token, options or [], payload))  # (the codec refuses class 7)
    return frame(code, token, data[4 + len(token):])


class Framer:
    """Cuts a byte stream into frames: `feed(data)` -> [(code, token, body)], bounded by
    `max_message` (what corem's CSM announced): a longer frame is a FrameError, never buffered."""

    __slots__ = ("max_message", "_buf")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes, bytes]]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while pos < n:
            b0 = buf[pos]
            length, tkl = b0 >> 4, b0 & 0x0F
            if tkl > 8:
                raise FrameError(f"token length {tkl}; at most 8", "frame")
            ext = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 4)[length]
            head = 1 + ext + 1
            if pos + 1 + ext > n:
                break
            if ext:
                raw = int.from_bytes(buf[pos + 1:pos + 1 + ext], "big")
                length = raw + (13, 269, 0, 65805)[ext - 1]
            if length + tkl > self.max_message:
                raise FrameError(f"message of {length + tkl} bytes; at most {self.max_message} (our CSM)", "too_large")
            end = pos + head + tkl + length
            if end > n:
                break
            code = buf[pos + head - 1]
            out.append((code, bytes(buf[pos + head:pos + head + tkl]), bytes(buf[pos + head + tkl:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def message(code: int, token: bytes, body: bytes) -> Message:
    """A frame's message (MessageFormatError if its options are not RFC 7252's)."""
    return decode(bytes((0x50 | len(token), code, 0, 0)) + token + body)  # NON, message ID 0: unused


#: the options each signal defines (RFC 8323 §5.3-5.6), numbered per signal: CSM's Max-Message-Size
#: and Block-Wise-Transfer, Ping's and Pong's Custody, Release's Alternative-Address and Hold-Off,
#: Abort's Bad-CSM-Option
SIGNAL_OPTIONS = {CSM: {2, 4}, PING: {2}, PONG: {2}, RELEASE: {2, 4}, ABORT: {2}}


def signal_options(code: int, body: bytes) -> Message:
    """A signal's options (and payload); MessageFormatError for options that do not parse, or for a
    critical one (odd) the signal does not define -- the connection must be aborted (§5.3)."""
    msg = message(0x45, b"", body)  # (read as a 2.05: the codec refuses class 7, UDP's reserved class)
    unknown = [n for n, _ in msg.options if n & 1 and n not in SIGNAL_OPTIONS.get(code, ())]
    if unknown:
        raise MessageFormatError(f"critical option {unknown[0]} unknown to this signal")
    return msg


def csm_max_message(body: bytes) -> int:
    """The Max-Message-Size a peer's CSM announces (the default if it does not)."""
    value = signal_options(CSM, body).opt(MAX_MESSAGE_SIZE)
    return DEFAULT_MAX_MESSAGE if value is None else int.from_bytes(value, "big")


class StreamEndpoint(Endpoint):
    """The message layer of every connection of one listener: a request becomes a `Request` whose
    answer goes back as a frame to its connection (`peer` names the connection); notifications
    (`send`, `send_confirmable`) are reframed.  The transport is reliable, so nothing waits for an
    ACK and nothing is retransmitted; no exchange is remembered once answered."""

    #: no retransmissions (RFC 8323), so no exchange to name in bus records (corem/bus/recovery.py)
    transport = None
    #: no NON on a stream: a request with a critical option corem cannot read is answered 4.02
    silent_non = False

    def __init__(self) -> None:
        super().__init__(Params(limit_error_size=False))  # a connection proved its address

    def request(self, msg: Message, peer: Any, now: float, size: int) -> Request | None:
        """A request frame's `Request`, or None when the message layer answered it itself (a
        critical option corem does not implement: 4.02, or 5.05 for a proxy option)."""
        self._now_hint = now
        self.stats.requests += 1
        req = Request(self, peer, (peer, 0), msg, now, size)
        return None if self._refused(req, msg) else req

    def _answer(self, req: Request, code: int, options: Options | None, payload: bytes, context: Any = None) -> None:
        req.state = DONE
        code, options, payload = req.final(code, options, payload)
        self.send(encode(Message(Type.NON, code, 0, req.token, options or [], payload)), req.peer, code)

    def send(self, data: bytes, peer: Any, code: int) -> None:
        self._outbox.append((to_frame(data), peer))
        self.stats.responses[code] += 1

    def send_confirmable(self, data: bytes, peer: Any, mid: int, token: bytes, context: Any = None,
                         code: int = 0) -> bool:
        self.send(data, peer, code)  # (reliable: delivered, or the connection is gone)
        return True

    def tick(self, now: float) -> None:
        self._now_hint = now

    def get_timer(self) -> float | None:
        return None

    def metrics(self) -> Iterator[Sample | Histogram]:
        yield counter("corem_coap_requests", self.stats.requests)
        yield counter("corem_coap_bad_options", self.stats.bad_options)
        yield counter("corem_coap_proxy_refused", self.stats.proxy_refused)
        for code, n in enumerate(self.stats.responses):
            if n:
                yield counter("corem_coap_responses", n, code=code_str(code))
        yield from self.latency.metrics()


__all__ = ["ABORT", "CSM", "DEFAULT_MAX_MESSAGE", "FrameError", "Framer", "MessageFormatError", "PING", "PONG",
           "RELEASE", "StreamEndpoint", "csm_max_message", "frame", "message", "signal", "to_frame"]
