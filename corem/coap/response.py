"""What a handler answers: a code, a payload and options (its own module, so that the router and
the block-wise layer both use it without importing each other)."""

from __future__ import annotations

from typing import NamedTuple

from ..codec import Code, OptionNumber, Options

#: Seconds a device is told to wait (Max-Age on a 5.03) before it tries again.
RETRY_AFTER = 5


class Response(NamedTuple):
    code: int
    payload: bytes = b""
    options: Options | None = None


def retry_later(reason: bytes) -> Response:
    """5.03 with Max-Age `RETRY_AFTER`: what corem needs for the request (the bus, the disk) cannot
    take it now; the same request may work later."""
    return Response(Code.SERVICE_UNAVAILABLE, reason, [(OptionNumber.MAX_AGE, bytes([RETRY_AFTER]))])
