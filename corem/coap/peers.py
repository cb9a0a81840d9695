"""A peer's address as the CoAP layers see it, and the host per-source bounds count by.

Its own module (a leaf): the endpoint, the block-wise layer, the observers and the DTLS slots all
count by it, and the endpoint cuts its bounded answers with the block-wise layer's cutting, so
neither of those two may hold it for the other.
"""

from __future__ import annotations

from typing import Hashable

Peer = Hashable


def source_host(peer: Peer) -> Hashable:
    """The host a peer address is from (its port left out): what per-source bounds count by."""
    return peer[0] if isinstance(peer, tuple) else peer
