"""Rejected samples kept for the diagnostics UI: a bounded ring, newest last."""

from __future__ import annotations

import datetime
import json
from collections import deque
from typing import Iterator

import cbor2
import msgspec

from ..stats import Sample, gauge


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

    def metrics(self) -> Iterator[Sample]:
        yield gauge("corem_rejected_samples", len(self.samples))

    def newest(self, limit: int = 100) -> list[RejectedSample]:
        return list(reversed(self.samples))[:limit]


def cbor_diagnostic(data: bytes, limit: int = 4096) -> str:
    """RFC 8949 §8 diagnostic notation of a CBOR payload, for people reading a rejected sample;
    `invalid CBOR: …` with the decoder's reason when it does not decode."""
    try:
        value = cbor2.loads(data)
    except Exception as e:  # cbor2 raises several types; any of them means "not CBOR"
        return f"invalid CBOR: {e}"
    text = _diag(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _diag(v: object) -> str:
    if v is None:
        return "null"
    if v is True or v is False:
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else {
            "nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[repr(v)]
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (bytes, bytearray)):
        return f"h'{bytes(v).hex()}'"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_diag(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_diag(k)}: {_diag(x)}" for k, x in v.items()) + "}"
    if isinstance(v, cbor2.CBORTag):
        return f"{v.tag}({_diag(v.value)})"
    if isinstance(v, cbor2.CBORSimpleValue):
        return f"simple({v.value})"
    if isinstance(v, datetime.datetime):  # tags 0/1, decoded by cbor2
        return f'0("{v.isoformat()}")'
    if v is cbor2.undefined:
        return "undefined"
    return repr(v)
