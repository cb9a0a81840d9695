"""CoAPS records in the fast lane (issue 27): behind corem's own DTLS engine the C lane reads the
socket, opens the records of established sessions with the session's own Protection and Window,
takes the common telemetry POST, and seals its answers with the session's write Protection; the
handshake and every record it does not take stay Python's.

The edge is driven here without Trio, one batch at a time (`Coaps.pump`: the body of
`UdpEdge.serve`), over real loopback sockets; the device is the engine's own client role."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import cbor2
import pytest

from corem.codec import Code, Message, Type, decode, encode
from corem.codec import OptionNumber as O
from corem.coap import Endpoint, Params, Router
from corem.dtls import DtlsParams, SessionStore
from corem.dtls.engine import Client
from corem.dtls.engine.records import RECORDS, parse_record_untrusted
from corem.dtls.layer import EngineServer
from corem.fastlane import FastLane
from corem.ingest.diagnostics import Diagnostics
from corem.ingest.point import decode_point
from corem.ingest.telemetry import TelemetryIngest
from corem.metrics import gather
from corem.net.udp import UdpEdge
from corem.registry import Directory, Registry

from .lane_twin import RecordingSink

pytestmark = pytest.mark.skipif(RECORDS != "c", reason="the lane opens records with the C records only")

IDENTITY, KEY = "lane-psk-1", b"lane-secret-key-1"
STATE_KEY = bytes(range(32))


def reading(mid: int, values: dict | None = None, path: tuple[bytes, ...] = (b"telemetry",), token: bytes = b"\x01\x02",
            mtype: Type = Type.CON) -> bytes:
    options = [(O.URI_PATH, p) for p in path] + [(O.CONTENT_FORMAT, b"\x3c")]
    return encode(Message(mtype, Code.POST, mid, token, options, cbor2.dumps(values or {"t": 21.5, "n": mid})))


class Device:
    """The engine's client role on a UDP socket of its own."""

    def __init__(self, server: tuple, cid: bytes | None = b"") -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.client = Client(IDENTITY.encode(), KEY, cid=cid)
        self.sent: list[bytes] = []  # every datagram sent (a captured record is replayed from here)

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()

    def send(self, datagram: bytes) -> None:
        self.sent.append(datagram)
        self.sock.sendto(datagram, self.server)

    def post(self, message: bytes) -> bytes:
        record = self.client.wrap(message)
        self.send(record)
        return record

    def flush(self) -> None:
        for d in self.client.datagrams_to_send():
            self.send(d)

    def datagrams(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out

    def answers(self, now: float = 0.0) -> list[bytes]:
        return [m for d in self.datagrams() for m in self.client.receive(d, now)]

    def move(self) -> None:
        """The same device from another port (a NAT rebinding): a new socket."""
        old = self.sock
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        old.close()

    def close(self) -> None:
        self.sock.close()


class Coaps:
    """One CoAPS server as `corem serve` wires it (dtls_engine = corem), lane on or off, sans Trio."""

    def __init__(self, *, lane: bool = True, store: SessionStore | None = None, **params) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="corem-lane-dtls-")
        self.registry = Registry(Path(self.tmp.name) / "registry.db")
        self.registry.add_device("acme", "d1", token="T1", psk_identity=IDENTITY, psk=KEY)
        self.directory = Directory(self.registry)
        self.directory.refresh()
        self.now = 100.0
        self.sink = RecordingSink()
        self.ingest = TelemetryIngest(self.directory, self.sink, Diagnostics(16), clock_ms=lambda: 1_700_000_000_000,
                                      now=lambda: self.now)
        self.endpoint = Endpoint(Params(), rng=lambda: 0.5)
        self.endpoint.transport = "dtls"
        self.router = Router()
        self.layer = EngineServer(self.directory.psk_device, DtlsParams(**params), state_key=STATE_KEY,
                                  store=store, device_lookup=self.directory.named,
                                  on_new_session=self._new_session, on_moved=lambda o, n, t: self._new_session(n, t))
        self.ingest.install(self.router, session_device=lambda req: req.identity or self.layer.device(req.peer))
        self.lane = FastLane(self.ingest, self.sink, self.endpoint) if lane else None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.edge = UdpEdge(self.sock, self.endpoint, self.router, security=self.layer, lane=self.lane)
        self.address = self.sock.getsockname()

    def _new_session(self, peer, now) -> None:
        self.endpoint.new_session(peer, now)
        if self.lane is not None:
            self.lane.new_session(peer, now)

    @property
    def lane_opens_records(self) -> bool:
        return self.edge._receive.__name__ == "_as_is" and self.edge._read.__name__ == "read_records"

    def pump(self, advance: float = 0.001) -> None:
        """One pass of UdpEdge.serve: read a batch, hand it on, send the answers."""
        self.now += advance
        e, now = self.edge, self.now
        for data, peer in e._read(now):
            for message in e._receive(data, peer, now):
                e._take(message, peer, now)
        for message, peer in e._collect():
            e._handle(message, peer, now)
        e._dispatch_events()
        e.flush()

    def commit(self) -> None:
        """The sink makes what it took durable; the answers go out at the flush."""
        self.sink.commit()
        self.edge.flush()

    def handshake(self, device: Device) -> None:
        device.client.start(0.0)
        for _ in range(10):
            device.flush()
            self.pump()
            for d in device.datagrams():
                device.client.receive(d, 0.0)
            if device.client.established and device.address in self.layer.sessions:
                device.flush()
                return
        raise AssertionError("no handshake")

    def stored(self) -> list[tuple]:
        stored, self.sink.stored = self.sink.stored, []
        return [(r.topic, r.key, decode_point(r.value), r.headers) for r in stored]

    def count(self, name: str) -> float:
        parts = [self.endpoint, self.ingest, self.layer, self.edge] + ([self.lane] if self.lane is not None else [])
        return sum(gather((c, {}) for c in parts).get(name, {}).values())

    def close(self) -> None:
        self.sock.close()
        self.registry.close()
        self.tmp.cleanup()


@pytest.fixture
def coaps():
    made: list[Coaps] = []

    def make(**kw) -> Coaps:
        made.append(Coaps(**kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_the_lane_takes_a_coaps_reading_and_answers_it_sealed_once_it_is_durable(coaps):
    srv = coaps()
    assert srv.lane_opens_records
    dev = Device(srv.address)
    srv.handshake(dev)
    dev.post(reading(7))
    srv.pump()
    assert srv.lane.counters["records_opened"] == 1 and len(srv.sink.waiting) == 1
    assert dev.answers() == []  # not durable yet: no answer
    srv.commit()
    [answer] = dev.answers()
    m = decode(answer)
    assert (m.type, m.code, m.mid, m.token) == (Type.ACK, Code.CHANGED, 7, b"\x01\x02")
    assert srv.lane.counters["records_sealed"] == 1
    [(topic, key, point, headers)] = srv.stored()
    assert point.device == "d1" and point.numeric_values == {"t": 21.5, "n": 7.0}
    assert headers["coap-exchange"].startswith("dtls 127.0.0.1 ")
