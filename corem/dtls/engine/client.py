"""The client role, for tests and benchmarks only (a device's side): PSK, offering a Connection
ID (RFC 9146).  Sans-IO: `start(now)`, `receive(datagram, now)` -> application data,
`datagrams_to_send()`, `wrap(plaintext)`, `tick(now)`."""

from __future__ import annotations

from .connection import ESTABLISHED, Connection, Params
from .errors import DtlsDecodeError
from .records import parse_record_untrusted


class Client:
    def __init__(self, identity: bytes, psk: bytes, *, cid: bytes | None = b"", params: Params | None = None,
                 ems: bool = True) -> None:
        """`cid`: the CID this client asks the server to put in records to it (b"": offer RFC 9146
        but need none, the usual device; None: do not offer it)."""
        self.conn = Connection("client", params or Params(), None, 0.0)
        self.conn.offer_ems = ems
        self.identity = identity
        self.psk = psk
        self.cid = cid
        self.dropped = 0

    def start(self, now: float) -> None:
        self.conn.client_start(self.identity, self.psk, self.cid, now)

    @property
    def established(self) -> bool:
        return self.conn.state == ESTABLISHED

    @property
    def state(self) -> str:
        return self.conn.state

    def receive(self, datagram: bytes, now: float) -> list[bytes]:
        offset = 0
        while offset < len(datagram):
            try:
                rec, offset = parse_record_untrusted(datagram, offset, len(self.conn.cid_in))
            except DtlsDecodeError:
                self.dropped += 1
                break
            try:
                self.conn.receive_record(rec, now)
            except DtlsDecodeError:
                self.dropped += 1
        app, self.conn.app = self.conn.app, []
        return app

    def wrap(self, plaintext: bytes) -> bytes:
        sealed = self.conn.seal(plaintext) if self.conn.state == ESTABLISHED else None
        if sealed is None:
            raise RuntimeError("not established")
        return sealed

    def datagrams_to_send(self) -> list[bytes]:
        return self.conn.flush()

    def tick(self, now: float) -> None:
        self.conn.tick(now)
