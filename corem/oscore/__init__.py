"""OSCORE (RFC 8613): CoAP security at the message level, bound to a device's key id rather than to
an address -- `context.py` (keys, nonces, replay window), `protect.py` (the message transformation),
`layer.py` (the router's unwrap of a sealed request, and the sealing of its answers)."""

from .layer import Oscore, Sealer

__all__ = ["Oscore", "Sealer"]
