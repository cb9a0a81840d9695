"""The CoAP message layer, sans-IO (RFC 7252 §4): dedup, piggybacking, retransmission, routing."""

from .endpoint import (
    DONE,
    PENDING,
    SEPARATE,
    Acked,
    Endpoint,
    GaveUp,
    Params,
    Request,
    Reset,
)
from . import discovery
from .resources import Response, Router

__all__ = [
    "DONE",
    "PENDING",
    "SEPARATE",
    "Acked",
    "Endpoint",
    "GaveUp",
    "Params",
    "Request",
    "Reset",
    "Response",
    "Router",
    "discovery",
]
