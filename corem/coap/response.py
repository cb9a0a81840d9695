"""What a handler answers: a code, a payload and options (its own module, so that the router and
the block-wise layer both use it without importing each other)."""

from __future__ import annotations

from typing import NamedTuple


class Response(NamedTuple):
    code: int
    payload: bytes = b""
    options: list | None = None
