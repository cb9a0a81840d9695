"""The CoAP message layer, sans-IO (RFC 7252 §4): dedup, piggybacking, retransmission, routing."""

from . import discovery
from .endpoint import Acked, Endpoint, Event, GaveUp, Outcome, Params, Request, Reset, StrayReset
from .resources import Router
from .response import Response

__all__ = [
    "Acked",
    "Endpoint",
    "Event",
    "GaveUp",
    "Outcome",
    "Params",
    "Request",
    "Reset",
    "Response",
    "Router",
    "StrayReset",
    "discovery",
]
