"""What sits between the socket and the CoAP message layer: the security layer.

The edge (`udp.py`) drives one of two implementations of the same four calls: `PlainUdp` (CoAP:
a datagram is the message) and `corem.dtls.DtlsServer` (CoAPS: handshakes, decryption; a
datagram may carry no message, or several).  Both also say which datagrams are *credentialed*
(let through when their source is over its rate, net/limits.py) and which device a peer is
bound to (a DTLS session names its device; plain UDP never does).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Protocol, Sequence

Peer = Hashable


class SecurityLayer(Protocol):
    #: True when `receive` and `wrap` are the identity: the fast lane may then read and answer the
    #: socket itself (plain CoAP)
    transparent: bool
    def receive(self, datagram: bytes, peer: Peer, now: float) -> Sequence[bytes]:
        """The CoAP messages one datagram carries."""

    def wrap(self, message: bytes, peer: Peer) -> bytes | None:
        """The datagram that carries `message` to `peer` (None: it cannot be sent any more)."""

    def datagrams_to_send(self) -> list[tuple[bytes, Peer]]:
        """The layer's own datagrams (handshake flights, alerts) queued since the last call."""

    def tick(self, now: float) -> None:
        """Run the layer's timers (handshake retransmission, idle sessions)."""

    def settle(self, now: float) -> None:
        """Called once per batch, after `receive` decrypted it and before its messages are handled:
        make durable what the batch's records used up (DTLS: their numbers, against replay)."""

    def credentialed(self, datagram: bytes, peer: Peer) -> bool:
        """Does `datagram` prove who sent it, well enough to pass a source over its rate?"""

    def device(self, peer: Peer) -> Any:
        """The device `peer` is bound to by this layer, or None."""


class PlainUdp:
    """Plain CoAP: no security layer; a datagram names its device (if at all) by a token in its
    path, which `credentialed` (given by the wiring: the registry knows the tokens) checks."""

    transparent = True

    def __init__(self, credentialed: Callable[[bytes, Peer], bool] | None = None) -> None:
        self._credentialed = credentialed

    def receive(self, datagram: bytes, peer: Peer, now: float) -> Sequence[bytes]:
        return (datagram,)  # (a 1-tuple per datagram: measured within noise of a branch in the loop)

    def wrap(self, message: bytes, peer: Peer) -> bytes | None:
        return message

    def datagrams_to_send(self) -> list[tuple[bytes, Peer]]:
        return []

    def tick(self, now: float) -> None:
        pass

    def settle(self, now: float) -> None:
        pass

    def credentialed(self, datagram: bytes, peer: Peer) -> bool:
        return self._credentialed is not None and self._credentialed(datagram, peer)

    def device(self, peer: Peer) -> Any:
        return None
