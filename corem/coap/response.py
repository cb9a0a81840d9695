"""What a handler answers: a code, a payload and options (its own module, so that the router and
the block-wise layer both use it without importing each other); and the answer any refusal of
corem/errors.py becomes (`refusal`)."""

from __future__ import annotations

from typing import NamedTuple

from ..codec import Code, OptionNumber, Options, encode_uint
from ..errors import RETRY_AFTER, CoremError

#: the bytes of a refusal's text a device is sent at most (a datagram's room; the field comes first)
MAX_TEXT = 512

__all__ = ["RETRY_AFTER", "Response", "refusal", "retry_later"]


class Response(NamedTuple):
    code: int
    payload: bytes = b""
    options: Options | None = None


def retry_later(reason: bytes) -> Response:
    """5.03 with Max-Age `RETRY_AFTER`: what corem needs for the request (the bus, the disk) cannot
    take it now; the same request may work later."""
    return Response(Code.SERVICE_UNAVAILABLE, reason, [(OptionNumber.MAX_AGE, bytes([RETRY_AFTER]))])


def refusal(e: CoremError) -> Response:
    """The answer an error of corem/errors.py becomes: its CoAP code, its text (the message, or
    the kind's `device_text`), and Max-Age when the same request may work later."""
    text = e.device_text if e.device_text is not None else str(e)
    options: Options | None = None if e.retry_after is None else [(OptionNumber.MAX_AGE, encode_uint(e.retry_after))]
    return Response(e.coap, text.encode()[:MAX_TEXT], options)  # (the field first: it survives the cap)
