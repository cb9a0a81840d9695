"""Rejected samples kept for the diagnostics UI: a bounded ring, newest last."""

from __future__ import annotations

from collections import deque

import msgspec


class RejectedSample(msgspec.Struct, frozen=True, kw_only=True):
    at: int  # ms since epoch
    protocol: str
    reason: str  # metric label, e.g. decode_error
    detail: str  # the human reason
    field: str | None
    tenant: str | None
    device: str | None
    peer: str
    content_format: int | None
    payload: bytes


class Diagnostics:
    """Keeps the last `capacity` rejected samples (payloads cut at `max_payload` bytes)."""

    def __init__(self, capacity: int = 1000, max_payload: int = 2048) -> None:
        self.samples: deque[RejectedSample] = deque(maxlen=capacity)
        self.max_payload = max_payload

    def add(self, **fields) -> None:
        payload = fields.pop("payload")
        self.samples.append(RejectedSample(payload=bytes(payload[: self.max_payload]), **fields))

    def newest(self, limit: int = 100) -> list[RejectedSample]:
        return list(reversed(self.samples))[:limit]
