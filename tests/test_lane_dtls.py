"""CoAPS records in the fast lane (issue 27): behind corem's own DTLS engine the C lane reads the
socket, opens the records of established sessions with the session's own Protection and Window,
takes the common telemetry POST, and seals its answers with the session's write Protection; the
handshake and every record it does not take stay Python's.

The edge is driven here without Trio, one batch at a time (`Coaps.pump`: the body of
`UdpEdge.serve`), over real loopback sockets; the device is the engine's own client role."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import tempfile
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corem.bus.kafka import KafkaSettings, KafkaSink
from corem.bus.sqlite import EmbeddedBus
from corem.codec import Code, Message, Type, decode, encode
from corem.codec import OptionNumber as O
from corem.coap import Endpoint, Params, Router
from corem.dtls import DtlsParams, SessionStore
from corem.dtls.store import fold_packs
from corem.dtls.engine import Client
from corem.dtls.engine.records import RECORDS, RecordProtection, ReplayWindow, parse_record_untrusted
from corem.dtls.layer import EngineServer
from corem.fastlane import FastLane
from corem.ingest.diagnostics import Diagnostics
from corem.profiles.payload import decode_readings
from corem.ingest.point import decode_point
from corem.ingest.telemetry import TelemetryIngest
from corem.metrics import gather
from corem.net.udp import UdpEdge
from corem.wal import WRITER_BACKSTOP
from corem.registry import Directory, Registry

from .conftest import SPEC_IDENTITY, SPEC_KEY, coap_client, start_corem, write_cbor
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


class CarryingSink(RecordingSink):
    """RecordingSink that carries the layer's marks as the embedded bus does (corem/bus/sqlite.py
    `carry`): once the layer asked it to, each commit writes its records into a real bus file
    with the pack the carrier gives, in one transaction, before they are answered."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.bus = EmbeddedBus(path, synchronous="NORMAL")
        self.path, self.checkpointer = self.bus.path, self.bus.checkpointer
        self.at_commit: list = []  # (called once the records are stored, before they are answered)
        self.carrying = False
        self.carry_lock = self.bus.carry_lock

    def carry(self, take, done_below) -> bool:
        self.carrying = self.bus.carry(take, done_below)
        self.bus.open()
        return self.carrying

    def commit(self, error: BaseException | None = None) -> None:
        if error is None and self.carrying and self.waiting:
            self.bus.write_prepared(self.bus.prepare([record for record, _, _ in self.waiting]))
        for call in self.at_commit:
            call()
        super().commit(error)

    def close(self) -> None:
        self.bus.close_sync()


class Coaps:
    """One CoAPS server as `corem serve` wires it (dtls_engine = corem), lane on or off, sans Trio."""

    def __init__(self, *, lane: bool = True, store: SessionStore | None = None, limiter=None, profile: str | None = None,
                 hook=None, **params) -> None:
        """`profile`: the device's profile; `hook`: a Python decoder registered as it."""
        self.tmp = tempfile.TemporaryDirectory(prefix="corem-lane-dtls-")
        self.registry = Registry(Path(self.tmp.name) / "registry.db")
        # (registered at one instant: a second Coaps is the same device's registry after a restart,
        # whose saved sessions are sealed to the device's registration: registry.credentials)
        self.registry.add_device("acme", "d1", token="T1", psk_identity=IDENTITY, psk=KEY, created_at=1_700_000_000_000,
                                 **({"profile": profile} if profile else {}))
        self.directory = Directory(self.registry)
        self.directory.refresh()
        self.now = 100.0
        self.sink = CarryingSink(Path(self.tmp.name) / "bus.db")
        self.ingest = TelemetryIngest(self.directory, self.sink, Diagnostics(16), clock_ms=lambda: 1_700_000_000_000,
                                      now=lambda: self.now)
        self.endpoint = Endpoint(Params(), rng=lambda: 0.5)
        self.endpoint.transport = "dtls"
        self.router = Router()
        self.layer = EngineServer(self.directory.psk_device, DtlsParams(**params), state_key=STATE_KEY,
                                  store=store, device_lookup=self.directory.named,
                                  on_new_session=self._new_session, on_moved=lambda o, n, t: self._new_session(n, t))
        if hook is not None:
            self.ingest.register_profile(profile, hook)
        self.ingest.install(self.router, session_device=lambda req: req.identity or self.layer.device(req.peer))
        self.lane = FastLane(self.ingest, self.sink, self.endpoint) if lane else None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.edge = UdpEdge(self.sock, self.endpoint, self.router, security=self.layer, lane=self.lane, limiter=limiter)
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

    def handshake(self, device: Device, advance: float = 0.001) -> None:
        device.client.start(0.0)
        for _ in range(10):
            device.flush()
            self.pump(advance)
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
        self.sink.close()
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
    conn = srv.layer.sessions[dev.address]
    dev.post(reading(7))
    srv.pump()
    assert srv.lane.counters["records_opened"] == 1 and len(srv.sink.waiting) == 1
    assert conn.last_seen == srv.now  # (the layer was told: idle offload and expiry count it)
    assert dev.answers() == []  # not durable yet: no answer
    srv.commit()
    [answer] = dev.answers()
    m = decode(answer)
    assert (m.type, m.code, m.mid, m.token) == (Type.ACK, Code.CHANGED, 7, b"\x01\x02")
    assert srv.lane.counters["records_sealed"] == 1
    [(topic, key, point, headers)] = srv.stored()
    assert point.device == "d1" and point.numeric_values == {"t": 21.5, "n": 7.0}
    assert headers["coap-exchange"].startswith("dtls 127.0.0.1 ")


def test_the_lane_takes_a_coaps_non_reading_and_answers_it_non_sealed(coaps):
    srv = coaps()
    dev = Device(srv.address)
    srv.handshake(dev)
    dev.post(reading(9, mtype=Type.NON))
    srv.pump()
    assert srv.lane.counters["records_opened"] == 1 and len(srv.sink.waiting) == 1
    srv.commit()
    [answer] = dev.answers()
    m = decode(answer)
    assert (m.type, m.code, m.token) == (Type.NON, Code.CHANGED, b"\x01\x02") and m.mid != 9
    assert srv.lane.counters["records_sealed"] == 1 and len(srv.stored()) == 1


def first_hello(srv) -> tuple[Device, bytes, list[bytes]]:
    """A new device's first ClientHello sent and the batch served: the device, its hello, what came back."""
    dev = Device(srv.address)
    dev.client.start(0.0)
    dev.flush()
    srv.pump()
    return dev, dev.sent[0], dev.datagrams()


def test_the_lane_answers_a_new_peers_cookie_less_hello_as_the_engine_would(coaps):
    """A new peer's first ClientHello never reaches Python: the lane sends the HelloVerifyRequest
    the engine makes for it (the same bytes: the same secret, the peer named as the engine names
    it), counted as the engine counts it, and the handshake goes on through the engine on that
    cookie; after the secret rotates, the lane's cookies are the new secret's."""
    srv = coaps()
    dev, hello, [hvr] = first_hello(srv)
    assert srv.lane.counters["hello_verify"] == 1 and srv.lane.counters["records_to_python"] == 0
    engine = srv.layer.engine
    assert engine.stats.hello_verify_sent == 1  # (the lane's, counted where the engine counts its own)
    assert engine.receive(hello, dev.address, srv.now) == [] and engine.outbox == [(hvr, dev.address)]
    engine.outbox.clear()
    assert srv.count("corem_dtls_hello_verify_sent") == 2 and srv.count("corem_dtls_bytes_sent_unauthenticated") == 88
    dev.client.receive(hvr, 0.0)
    for _ in range(6):
        dev.flush()
        srv.pump()
        for d in dev.datagrams():
            dev.client.receive(d, 0.0)
    assert dev.client.established and dev.address in srv.layer.sessions
    before = engine.cookies.secrets[0]
    engine.cookies.rotate(srv.now + 3600.0)
    assert engine.cookies.secrets[0] != before
    srv.layer.tick(srv.now)  # (the layer gives the lane the new secret)
    other, hello, [hvr] = first_hello(srv)
    assert engine.receive(hello, other.address, srv.now) == [] and engine.outbox == [(hvr, other.address)]


def test_the_lane_leaves_hellos_it_does_not_answer_to_the_engine(coaps):
    """A hello whose record is not the whole datagram, or in fragments: Python's, which decides and
    names why."""
    srv = coaps()
    dev, hello, _ = first_hello(srv)
    truncated = hello[:-1]  # (its record length no longer the datagram's)
    fragment = hello[:22] + (1).to_bytes(3, "big") + hello[25:]
    for d in (truncated, fragment):
        dev.send(d)
        srv.pump()
    assert srv.lane.counters["hello_verify"] == 1 and srv.lane.counters["records_to_python"] == 2


def plain(m: bytes) -> tuple:
    d = decode(m)
    return d.type, d.code, d.mid, d.token, [(n, bytes(v)) for n, v in d.options], bytes(d.payload)


def without_port(stored: list[tuple]) -> list[tuple]:
    """The exchange header names the device's port: each server's device has its own socket."""
    out = []
    for topic, key, point, headers in stored:
        h = dict(headers)
        scope, host, _port, mid, token = h["coap-exchange"].split(" ")
        h["coap-exchange"] = f"{scope} {host} {mid} {token}"
        out.append((topic, key, point, h))
    return out


def exchange(srv: Coaps, dev: Device, messages: list[bytes]) -> tuple[list, list]:
    """Each message sealed by the device, a batch, the sink's commit: (answers, stored)."""
    answers = []
    for m in messages:
        dev.post(m)
        srv.pump()
        srv.commit()
        answers += [plain(a) for a in dev.answers()]
    return answers, without_port(srv.stored())


def test_lane_on_and_lane_off_answer_store_and_count_the_same(coaps):
    """Differential: what the lane opens and takes (a CON, a NON, a token path), and what it hands
    back (another path, a payload it does not decode, a GET), and a duplicate, is answered and
    stored as the Python path alone would, and the engine's counters read the same."""
    messages = [
        reading(1), reading(2, path=(b"api", b"v1", b"T1", b"telemetry")), reading(3, mtype=Type.NON),
        reading(4, path=(b"nowhere",)), encode(Message(Type.CON, Code.POST, 5, b"\x05", [(O.URI_PATH, b"telemetry"),
                                                                                          (O.CONTENT_FORMAT, b"\x3c")],
                                                      b"\xff\xff")),
        reading(1),  # a duplicate of the first (another record): the cached 2.04, stored once
        encode(Message(Type.CON, Code.GET, 6, b"\x06", [(O.URI_PATH, b".well-known"), (O.URI_PATH, b"core")])),
        reading(7, {"s": "on", "v": 1}),
    ]
    results = {}
    for lane in (True, False):
        srv = coaps(lane=lane)
        dev = Device(srv.address)
        srv.handshake(dev)
        answers, stored = exchange(srv, dev, messages)
        counts = {name: srv.count(name) for name in (
            "corem_dtls_bytes_received", "corem_dtls_records_dropped", "corem_coap_requests",
            "corem_coap_duplicates")}
        results[lane] = answers, stored, counts
        if lane:
            assert srv.lane.counters["records_opened"] == len(messages)
            assert srv.lane.counters["records_sealed"] >= 3  # (the lane's own answers)
    assert results[True][0] == results[False][0]
    assert results[True][1] == results[False][1] and len(results[True][1]) == 4
    assert results[True][2] == results[False][2]


def test_a_replayed_record_is_not_taken_twice_and_is_counted_as_dropped(coaps):
    srv = coaps()
    dev = Device(srv.address)
    srv.handshake(dev)
    record = dev.post(reading(1))
    srv.pump()
    srv.commit()
    assert len(dev.answers()) == 1 and len(srv.stored()) == 1
    dropped = srv.count("corem_dtls_records_dropped")
    dev.send(record)  # captured and sent again
    srv.pump()
    srv.commit()
    assert dev.answers() == [] and srv.stored() == []
    assert srv.count("corem_dtls_records_dropped") == dropped + 1
    assert srv.lane.counters["records_opened"] == 1 and srv.lane.counters["records_to_python"] >= 1


def test_a_forged_cid_is_dropped_and_counted_and_a_forged_record_does_not_move_the_window(coaps):
    srv = coaps()
    dev = Device(srv.address)
    srv.handshake(dev)
    conn = srv.layer.sessions[dev.address]
    assert conn.cid_in
    forged = bytearray(dev.client.wrap(reading(1)))
    forged[11] ^= 0xFF  # a CID nobody has
    dev.send(bytes(forged))
    srv.pump()
    assert srv.count("corem_dtls_records_unknown_cid") == 1 and srv.count("corem_dtls_records_dropped") == 1
    top = conn.window.top
    bad = bytearray(dev.client.wrap(reading(2)))
    bad[-1] ^= 1  # the right CID, not authentic
    dev.send(bytes(bad))
    srv.pump()
    srv.commit()
    assert conn.window.top == top and srv.stored() == [] and dev.answers() == []
    assert srv.count("corem_dtls_records_dropped") == 2
    dev.post(reading(3))  # the device goes on: the lane takes it
    srv.pump()
    srv.commit()
    assert len(dev.answers()) == 1 and len(srv.stored()) == 1
    assert srv.lane.counters["records_opened"] == 1


def test_a_cid_record_from_a_new_address_moves_the_session_through_python_then_the_lane_serves_it(coaps):
    srv = coaps()
    dev = Device(srv.address)
    srv.handshake(dev)
    old = dev.address
    dev.post(reading(1))
    srv.pump()
    srv.commit()
    assert len(dev.answers()) == 1 and srv.lane.counters["records_opened"] == 1
    dev.move()  # a NAT gave the device another port
    assert dev.address != old
    dev.post(reading(2))
    srv.pump()  # the lane hands it to Python, whose engine moves the session (RFC 9146 §6)
    assert list(srv.layer.sessions) == [dev.address] and srv.count("corem_dtls_cid_moves") == 1
    assert srv.lane.counters["records_opened"] == 1
    srv.commit()
    assert [plain(a)[:3] for a in dev.answers()] == [(Type.ACK, Code.CHANGED, 2)]
    dev.post(reading(3))
    srv.pump()  # the lane has the session at its new address
    srv.commit()
    assert srv.lane.counters["records_opened"] == 2
    assert [plain(a)[:3] for a in dev.answers()] == [(Type.ACK, Code.CHANGED, 3)]
    assert [p.numeric_values["n"] for _, _, p, _ in srv.stored()] == [1.0, 2.0, 3.0]


def sequence_numbers(datagrams: list[bytes], cid_length: int) -> list[int]:
    out = []
    for d in datagrams:
        offset = 0
        while offset < len(d):
            rec, offset = parse_record_untrusted(d, offset, cid_length)
            if rec.epoch == 1:
                out.append(rec.seq)
    return out


def test_the_lane_and_python_seal_with_one_sequence_counter(coaps):
    """Answers sealed by the lane (its readings) and by Python (the endpoint's answers, a late
    answer, a close_notify) come from one counter: strictly increasing, every record opens."""
    srv = coaps()
    dev = Device(srv.address, cid=None)  # (no CID: records by address)
    srv.handshake(dev)
    get = encode(Message(Type.CON, Code.GET, 50, b"\x50", [(O.URI_PATH, b"nowhere")]))
    sealed_by_lane = []
    got = []
    for mid in range(1, 7):
        dev.post(reading(mid) if mid % 2 else get[:2] + bytes((0, mid)) + get[4:])
        srv.pump()
        srv.commit()
        sealed_by_lane.append(srv.lane.counters["records_sealed"])
        got += dev.datagrams()
    srv.layer.engine.close(dev.address)  # a close_notify: Python's
    srv.edge.flush()
    got += dev.datagrams()
    assert srv.lane.counters["dtls_sessions"] == 0  # (closed: the lane forgot it)
    assert sealed_by_lane == [1, 1, 2, 2, 3, 3]
    numbers = sequence_numbers(got, 0)
    assert len(numbers) == 7 and numbers == sorted(set(numbers))
    answers = [plain(m) for d in got for m in dev.client.receive(d, 0.0)]
    assert [a[1] for a in answers] == [Code.CHANGED, Code.NOT_FOUND] * 3 and dev.client.dropped == 0
    assert dev.client.state == "closed"


def test_the_lane_never_seals_past_the_reservation_python_saves_the_session_again_first(coaps):
    srv = coaps()
    dev = Device(srv.address)
    srv.handshake(dev)
    conn = srv.layer.sessions[dev.address]
    limit = conn.write_seq[1]
    conn.write_limit = limit  # a stored copy reserved every number up to here: none left
    assert conn.write_prot.seal_next(23, b"x") is None and conn.write_seq[1] == limit  # nothing consumed
    dev.post(reading(1))
    srv.pump()
    checkpoints = srv.layer.stats.checkpoints
    srv.commit()  # the lane's 2.04 cannot be sealed by it: Python's wrap saves the session, then seals
    assert srv.lane.counters["records_sealed"] == 0 and srv.layer.stats.checkpoints == checkpoints + 1
    datagrams = dev.datagrams()
    assert sequence_numbers(datagrams, len(dev.client.conn.cid_in)) == [limit]
    assert conn.write_limit > limit
    assert [plain(m)[:3] for d in datagrams for m in dev.client.receive(d, 0.0)] == [(Type.ACK, Code.CHANGED, 1)]
    dev.post(reading(2))  # a new reservation: the lane seals again
    srv.pump()
    srv.commit()
    assert srv.lane.counters["records_sealed"] == 1 and len(dev.answers()) == 1


def test_a_session_whose_data_only_the_lane_opens_is_checkpointed(coaps):
    """`dtls_checkpoint` through the lane: nothing saved for the handshakes, the session that
    sent a reading (opened by the lane, never by Python) saved at the next tick."""
    srv = coaps(store=SessionStore())
    quiet, busy = Device(srv.address), Device(srv.address)
    srv.handshake(quiet)
    srv.handshake(busy)
    srv.layer.tick(srv.now + 0.5)
    assert srv.layer.stats.checkpoints == 0
    busy.post(reading(1))
    srv.pump()
    srv.commit()
    assert srv.lane.counters["records_opened"] == 1
    srv.layer.tick(srv.now + 0.5)
    assert srv.layer.stats.checkpoints == 1 and len(srv.layer.store.keys()) == 1


def test_the_record_numbers_of_a_saved_session_are_in_the_store_before_its_readings_reach_the_sink(coaps, tmp_path):
    store = SessionStore(tmp_path / "sessions.db")
    srv = coaps(store=store)
    dev = Device(srv.address)
    srv.handshake(dev)
    conn = srv.layer.sessions[dev.address]
    assert srv.layer._save([conn], srv.now, checkpoint=True) == 1  # (a checkpoint: the session is saved)
    events = []
    mark, submit = store.mark, srv.sink.submit_many

    def marking(marks):
        events.append(("mark", [top for top, _ in marks]))
        return mark(marks)

    def submitting(records, done, ctxs):
        events.append(("submit", len(records)))
        return submit(records, done, ctxs)

    store.mark, srv.sink.submit_many = marking, submitting
    for mid in (1, 2):
        dev.post(reading(mid))
    srv.pump()
    assert srv.lane.counters["records_opened"] == 2
    assert events == [("mark", [conn.window.top]), ("submit", 2)]
    key = srv.layer._key_of(conn)
    assert store.take(key)[5] == conn.window.top  # (the row's rx_top: what a restore refuses up to)



def test_without_a_sink_that_carries_them_the_marks_are_a_pack_a_batch_committed_before_the_readings(coaps, tmp_path):
    """(Kafka: a sink with no `carry`) `carry_marks` has the lane's marks logged in the store's own
    file: one pack a batch of datagrams -- one INSERT, not an UPDATE per session -- committed
    before the batch's readings reach the sink; a process that dies before any fold leaves them
    there, and the next one's restore refuses the records they mark.  The sink's checkpointer
    copies the store's WAL, and the store starts the log again itself when a pass asks (a commit a
    batch: its own automatic checkpoint is only a far bound)."""
    where = tmp_path / "sessions.db"
    store = SessionStore(where)
    srv = coaps(store=store)
    kafka = KafkaSink(KafkaSettings(bootstrap=("127.0.0.1:1",)))  # (never started: its checkpointer, no `carry`)
    checkpointer = kafka.checkpointer
    assert not srv.layer.carry_marks(kafka)  # (False: logged, not carried)
    assert [path for path, _ in checkpointer._files] == [where]
    page = store.db.execute("PRAGMA page_size").fetchone()[0]  # (the limit is bytes: in its pages)
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone() == (WRITER_BACKSTOP // page,)
    dev = Device(srv.address)
    srv.handshake(dev)
    conn = srv.layer.sessions[dev.address]
    assert srv.layer._save([conn], srv.now, checkpoint=True) == 1
    events = []
    log_pack, submit, mark = store.log_pack, srv.sink.submit_many, store.mark

    def logging(pack):
        events.append(("log", [top for top, _, _ in fold_packs([pack])]))
        return log_pack(pack)

    def submitting(records, done, ctxs):
        events.append(("submit", len(records)))
        return submit(records, done, ctxs)

    def marking(marks):
        events.append(("mark", marks))
        return mark(marks)

    store.log_pack, srv.sink.submit_many, store.mark = logging, submitting, marking
    captured = [dev.post(reading(mid)) for mid in (1, 2)]
    srv.pump()
    assert events == [("log", [conn.window.top]), ("submit", 2)]
    srv.commit()
    assert len(srv.stored()) == 2 and len(dev.answers()) == 2
    checkpointer._due.add(where)  # (a pass found the log past RESTART)
    captured.append(dev.post(reading(3)))
    srv.pump()
    assert checkpointer.restarts == 1 and not checkpointer.restart_due(where)
    srv.commit()
    assert len(srv.stored()) == 1 and len(dev.answers()) == 1
    srv.sock.close()  # the process dies before any fold: the packs are all it left
    again = coaps(store=SessionStore(where))
    again.layer.carry_marks(KafkaSink(KafkaSettings(bootstrap=("127.0.0.1:1",))))
    dev.server = again.address
    for record in captured:
        dev.send(record)
        again.pump()
    again.commit()
    assert again.stored() == [] and dev.answers() == []
    assert again.count("corem_dtls_records_replayed") == 3 and again.layer.stats.restored == 1


def _unread_packs(store: SessionStore) -> list[bytes]:
    """The packs the bus carried that the store has not folded yet."""
    return [bytes(m) for (m,) in store.db.execute(
        "SELECT blob FROM bus.carried WHERE n > (SELECT upto FROM rx_folded) ORDER BY n")]


def _saved_session(coaps, store, **kw):
    """A CoAPS server (from the `coaps` fixture) whose marks the sink carries, as `corem serve` wires
    it; a device's session on it, saved to `store`; and what a restore would read of it: the row's
    rx_top, or a higher mark the bus carried"""
    srv = coaps(store=store, **kw)
    assert srv.layer.carry_marks(srv.sink)
    dev = Device(srv.address)
    srv.handshake(dev)
    conn = srv.layer.sessions[dev.address]
    key = srv.layer._key_of(conn)
    assert srv.layer._save([conn], srv.now, checkpoint=True) == 1

    def stored_top() -> int:
        [(top,)] = store.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (key,)).fetchall()
        return max([int(top), *(t for t, k, _ in fold_packs(_unread_packs(store)) if k == key)])

    return srv, dev, conn, stored_top


def test_the_marks_of_the_lanes_readings_are_carried_in_the_bus_commit_that_makes_them_durable(coaps, tmp_path):
    """With the embedded bus (`carry_marks`, as corem serve wires it) the marks of records that were
    all readings wait for the sink's next batch, coalesced, and are written in that batch's own
    transaction (one file, one commit); a record the lane hands on (not a reading) is marked at
    once, as before."""
    store = SessionStore(tmp_path / "sessions.db")
    srv, dev, conn, stored_top = _saved_session(coaps, store)
    key = srv.layer._key_of(conn)
    assert tmp_path / "sessions.db" in [p for p, _ in srv.sink.checkpointer._files]  # (its WAL copied off the loop)
    saved_top = conn.window.top

    def row_top() -> int:
        [(top,)] = store.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (key,)).fetchall()
        return int(top)

    assert stored_top() == saved_top
    for mid in (1, 2, 3):
        dev.post(reading(mid))
    srv.pump()
    assert stored_top() == saved_top  # (not yet: the readings are not durable either)
    seen = []  # (another connection's view of the bus file, as the records are answered)
    bus = sqlite3.connect(srv.sink.path)
    srv.sink.at_commit.append(lambda: seen.append(bus.execute(
        "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM carried)").fetchone()))
    srv.commit()
    assert seen == [(1, 1)] and stored_top() == conn.window.top and len(srv.stored()) == 3
    # in the bus's file, not in the row; the store's fold moves it there and passes its place
    assert row_top() == saved_top < conn.window.top
    store.fold_marks()
    assert row_top() == conn.window.top and _unread_packs(store) == []
    assert store.folded_upto == 1
    # a GET is no reading: the lane hands it on, and its record's number is written at once
    dev.post(encode(Message(Type.CON, Code.GET, 9, b"g", [(11, b"telemetry")], b"")))
    srv.pump()
    assert stored_top() == row_top() == conn.window.top
    # the next batch deletes the rows the store has read, never the newest
    dev.post(reading(10))
    srv.pump()
    srv.commit()
    assert bus.execute("SELECT n FROM carried").fetchall() == [(1,), (2,)]
    store.fold_marks()
    dev.post(reading(11))
    srv.pump()
    srv.commit()
    assert bus.execute("SELECT n FROM carried").fetchall() == [(2,), (3,)]
    bus.close()


def test_carried_marks_are_one_per_session_per_commit_and_outlive_the_sessions_place_in_the_lane(coaps, tmp_path):
    """The lane notes a saved session's mark once however many batches of its records come before
    the sink commits (one pack, its top then); a session that leaves the lane meanwhile (saved
    again, offloaded, moved) keeps its mark due, carried with the readings it carried."""
    store = SessionStore(tmp_path / "sessions.db")
    srv = coaps(store=store)
    assert srv.layer.carry_marks(srv.sink)
    devices = [Device(srv.address) for _ in range(2)]
    conns = []
    for dev in devices:
        srv.handshake(dev)
        conns.append(srv.layer.sessions[dev.address])
    assert srv.layer._save(conns, srv.now, checkpoint=True) == 2

    def written() -> list[list[tuple[int, bytes]]]:
        return [sorted((t, k) for t, k, _ in fold_packs([pack])) for pack in _unread_packs(store)]

    keys = [srv.layer._key_of(c) for c in conns]
    for mid in (1, 2, 3):  # three batches of both devices' readings, then one commit
        for dev in devices:
            dev.post(reading(mid))
        srv.pump()
    assert written() == [] and srv.lane.counters["records_opened"] == 6
    srv.commit()
    assert written() == [sorted((c.window.top, k) for c, k in zip(conns, keys))] and len(srv.stored()) == 6
    # the first device's session leaves the lane with a reading not durable yet
    devices[0].post(reading(4))
    srv.pump()
    srv.lane.drop_session(conns[0], conns[0].peer, conns[0].cid_in)
    assert srv.lane.counters["dtls_sessions"] == 1
    srv.commit()
    assert written()[1:] == [[(conns[0].window.top, keys[0])]] and len(srv.stored()) == 1
    srv.commit()  # (nothing due: nothing written)
    assert len(written()) == 2


@pytest.mark.parametrize("refused", ["INSERT INTO batches", "INSERT INTO carried"])
def test_a_batch_the_bus_could_not_write_passes_its_marks_to_the_next(coaps, tmp_path, refused):
    """A batch whose transaction failed: the pack, taken under its write lock after its records
    (or not taken yet, when the records' INSERT failed), may hold marks of readings submitted
    after it: it goes with the next batch, neither lost nor written without its readings."""
    store = SessionStore(tmp_path / "sessions.db")
    srv, dev, conn, stored_top = _saved_session(coaps, store)
    saved_top = conn.window.top
    dev.post(reading(1))
    srv.pump()
    bus = srv.sink.bus
    real = bus._conn
    bus._conn = _RefusingInsert(real, refused)
    with pytest.raises(sqlite3.OperationalError):
        bus.write_prepared(bus.prepare([record for record, _, _ in srv.sink.waiting]))
    bus._conn = real
    # (neither the records nor the marks: the pack kept by the bus, or still the lane's)
    assert stored_top() == saved_top and bool(bus._unwritten) == (refused == "INSERT INTO carried")
    srv.commit()
    assert stored_top() == conn.window.top and len(srv.stored()) == 1


class _RefusingInsert:
    """A bus connection whose INSERTs beginning `refused` fail (a full disk), then rolls back as
    SQLite would."""

    def __init__(self, conn: sqlite3.Connection, refused: str) -> None:
        self.conn = conn
        self.refused = refused

    def execute(self, sql, *args):
        if sql.startswith(self.refused):
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction


def test_a_restored_session_is_the_lanes_again_and_refuses_what_its_store_marked(coaps, tmp_path):
    """A crash after readings were marked: the session restored from its older copy must refuse
    those records (issue 26), in the lane as in Python."""
    where = tmp_path / "sessions.db"
    srv = coaps(store=SessionStore(where))
    dev = Device(srv.address)
    srv.handshake(dev)
    conn = srv.layer.sessions[dev.address]
    srv.layer._save([conn], srv.now, checkpoint=True)
    captured = [dev.post(reading(mid)) for mid in (1, 2)]
    srv.pump()
    srv.commit()
    assert len(srv.stored()) == 2 and len(dev.answers()) == 2
    srv.sock.close()  # the process dies: a new one on the same store, the device's session there
    again = coaps(store=SessionStore(where))
    dev.server = again.address
    for record in captured:  # the records already taken, sent again: refused (below the floor)
        dev.send(record)
        again.pump()
    again.commit()
    assert again.stored() == [] and dev.answers() == []
    assert again.count("corem_dtls_records_replayed") == 2 and again.layer.stats.restored == 1
    # (restored by its CID and parked: no record authenticated, so at no address and not the lane's)
    assert again.lane.counters["dtls_sessions"] == 0 and again.lane.counters["records_opened"] == 0
    assert list(again.layer.engine.parked) == [conn.cid_in] and again.layer.sessions == {}
    dev.post(reading(3))  # the next one authenticates: Python places the session, the lane serves it
    again.pump()
    again.commit()
    assert again.lane.counters["dtls_sessions"] == 1 and again.layer.engine.parked == {}
    dev.post(reading(4))
    again.pump()
    again.commit()
    assert [p.numeric_values["n"] for _, _, p, _ in again.stored()] == [3.0, 4.0]
    assert again.lane.counters["records_opened"] >= 1 and len(dev.answers()) == 2


def test_over_its_rate_a_source_passes_with_a_session_and_is_dropped_without(coaps):
    """The lane applies the edge's rate limit to every datagram, as on plain CoAP; a datagram of a
    known session is exempted (as EngineServer.credentialed says)."""
    from corem.net.limits import SourceLimiter

    srv = coaps(limiter=SourceLimiter(1.0, burst=3.0))
    dev = Device(srv.address)
    srv.handshake(dev, advance=5.0)  # (the bucket refills between the flights)
    srv.pump(5.0)
    for mid in range(1, 7):
        dev.post(reading(mid))
    srv.pump(0.0)  # six records at once from one source: over its rate, but a session's
    srv.commit()
    assert len(srv.stored()) == 6 and len(dev.answers()) == 6
    assert srv.count("corem_rate_limit_exempted") >= 3 and srv.count("corem_rate_limited_datagrams") == 0
    stranger = Device(srv.address)  # (the same host: its bucket is empty; limits are per host)
    for _ in range(6):
        stranger.send(b"\x16\xfe\xfd" + bytes(20))  # no session: dropped
    srv.pump(0.0)
    assert srv.count("corem_rate_limited_datagrams") == 6 and srv.count("corem_dtls_bytes_received") > 0


def test_sessions_leave_the_lane_with_the_engine(coaps):
    srv = coaps(offload_after=10.0, checkpoint=False)
    devices = [Device(srv.address) for _ in range(3)]
    for d in devices:
        srv.handshake(d)
    assert srv.lane.counters["dtls_sessions"] == 3
    srv.layer.close(srv.now)  # (every session to the store) -- the sweep
    assert srv.lane.counters["dtls_sessions"] == 0


def test_a_session_dropped_by_python_during_a_drain_is_not_used_for_the_records_after(coaps):
    """The lane looks a record's session up once, ahead of taking the record (drain_record_ahead),
    and seals the answer with the session that took it (send_records), each only while no
    session was added or removed since.  Python code the drain calls (here the device's profile,
    a Python hook the lane calls from its batch) may drop a session: a record of it read in the
    same drain goes to Python, which still holds the session, and so does the answer to the
    record being taken -- neither uses the entry the lane let go (its references released: a
    crash, without either check)."""
    dropped: list[int] = []

    def hook(cf, payload):
        if not dropped:
            dropped.append(srv.lane.counters["records_opened"])
            srv.lane.drop_session(conn, conn.peer, conn.cid_in)  # (what the engine does when a session ends)
        return decode_readings(cf, payload)

    srv = coaps(profile="hook", hook=hook)
    dev = Device(srv.address)
    srv.handshake(dev)
    conn = srv.layer.sessions[dev.address]
    dev.post(reading(1))  # the hook runs for this one, from the lane's batch
    dev.post(reading(2))  # read in the same drain: its session found before the first was taken
    srv.pump()
    assert dropped == [1]  # (dropped from the lane's batch, the second record not taken yet)
    assert srv.lane.counters["dtls_sessions"] == 0
    assert srv.lane.counters["records_opened"] == 1  # the first only: the second went to Python
    srv.commit()
    assert sorted(decode(a).code for a in dev.answers()) == [Code.CHANGED] * 2
    assert sorted(p.numeric_values["n"] for _, _, p, _ in srv.stored()) == [1.0, 2.0]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 300), st.lists(st.tuples(st.booleans(), st.integers(1, 30), st.booleans()), max_size=400))
def test_the_lanes_session_table_finds_every_session_and_only_those_through_churn(coaps, storm, ops):
    """The lane's table of sessions, by address and by CID, against a model through adds and
    drops: its indexes delete by backward shift, so every session left must still be found, by
    either key, and nothing dropped.  Up to 30 sessions fill the smallest index up to half (long
    probe runs); a storm of sessions before them grows it, and their leaving shrinks it."""
    if RECORDS != "c":
        pytest.skip("the lane opens records with the C records only")
    srv = coaps()
    lane = srv.lane
    storm_owner = object()
    for i in range(storm):
        lane.add_session(storm_owner, ("127.0.0.3", 1000 + i), (50_000 + i).to_bytes(4, "big"), b"", RecordProtection(
            "ccm8", bytes(16), bytes(4)), ReplayWindow(), RecordProtection("ccm8", bytes(16), bytes(4)), None, -1, None)
    for i in range(storm):
        assert lane.lane.drop_session(storm_owner, ("127.0.0.3", 1000 + i), (50_000 + i).to_bytes(4, "big"))
    prot, window = RecordProtection("ccm8", bytes(16), bytes(4)), ReplayWindow()
    model: dict[int, tuple[object, bytes]] = {}  # port -> (owner, its CID)

    def peer(port: int) -> tuple:
        return ("127.0.0.1", 20000 + port)

    for add, port, with_cid in ops:
        if add:
            cid = (port + 1000).to_bytes(4, "big") if with_cid else b""
            owner = object()
            lane.add_session(owner, peer(port), cid, b"", prot, window, prot, None, -1, None)
            model[port] = (owner, cid)  # (one at an address: the one before it is replaced)
        elif port in model:
            owner, cid = model.pop(port)
            assert lane.lane.drop_session(owner, peer(port), cid)
        else:
            assert not lane.lane.drop_session(object(), peer(port), b"")
        assert lane.counters["dtls_sessions"] == len(model)
    for port, (owner, cid) in list(model.items()):  # each found by its CID (an address elsewhere) ...
        if cid:
            assert lane.lane.drop_session(owner, ("127.0.0.2", 1), cid)
            del model[port]
    for port, (owner, cid) in model.items():  # ... or by its address
        assert lane.lane.drop_session(owner, peer(port), b"")
    assert lane.counters["dtls_sessions"] == 0


def test_without_the_c_records_the_edge_keeps_the_python_path(monkeypatch):
    import corem.dtls.layer as layer

    monkeypatch.setattr(layer, "RECORDS", "python")
    srv = Coaps()
    try:
        assert not srv.lane_opens_records
        dev = Device(srv.address)
        srv.handshake(dev)
        dev.post(reading(1))
        srv.pump()
        srv.commit()
        assert len(dev.answers()) == 1 and len(srv.stored()) == 1
        assert srv.lane.counters["records_opened"] == 0
    finally:
        srv.close()


@pytest.mark.skipif(not shutil.which("coap-client-openssl") and os.environ.get("CI") != "true",
                    reason="libcoap's coap-client-openssl is not installed (under CI=true this fails instead)")
def test_libcoap_openssl_clients_post_through_the_lane_of_corem_serve(data_dir, tmp_path):
    """A real client (libcoap on OpenSSL, PSK) to `corem serve --dtls-engine corem`: the handshake is
    Python's, the readings the lane's; each answered 2.04 once stored."""
    server = start_corem(data_dir, "--dtls-engine", "corem")
    try:
        reading_file = write_cbor(tmp_path / "reading.cbor", {"temperature": 22.5, "humidity": 65})
        for path in ("telemetry", "api/v1/telemetry", "telemetry"):
            r = coap_client(f"coaps://127.0.0.1:{server.coaps_port}/{path}", "-m", "post", "-u", SPEC_IDENTITY,
                            "-k", SPEC_KEY, "-t", "application/cbor", "-f", str(reading_file),
                            binary="coap-client-openssl", timeout=30)
            assert r.code == "2.04", r.output
        points = server.points()
        assert [(p["tenant"], p["device"]) for p in points] == [("acme", "sensor-7")] * 3
        m = server.metrics()
        assert m['corem_coap_responses_total{code="2.04",transport="dtls"}'] == 3
        assert m["corem_dtls_handshakes_completed_total"] == 3 and m["corem_dtls_bytes_received_total"] > 0
        assert "the fast lane opens and seals the records of established sessions" in server.stderr()
    finally:
        server.stop()


def test_a_new_session_at_an_address_does_not_inherit_the_floor_of_the_one_before(coaps, tmp_path):
    """Without Connection ID a session's row is its address's: a device that handshakes again while
    readings of its session before wait for the bus must not get that session's record numbers as
    its own floor once they are durable (a restore would refuse its records)."""
    store = SessionStore(tmp_path / "sessions.db")
    srv = coaps(store=store)
    assert srv.layer.carry_marks(srv.sink)
    dev = Device(srv.address, cid=None)
    srv.handshake(dev)
    old = srv.layer.sessions[dev.address]
    key = srv.layer._key_of(old)
    assert srv.layer._save([old], srv.now, checkpoint=True) == 1
    for mid in range(1, 30):
        dev.post(reading(mid))
    srv.pump()
    assert old.window.top >= 29  # (noted in the lane, waiting for the bus with their readings)
    dev.client = Client(IDENTITY.encode(), KEY, cid=None)  # (the device starts again, at the same address)
    srv.handshake(dev)
    new = srv.layer.sessions[dev.address]
    assert new is not old and srv.layer._key_of(new) == key
    assert srv.layer._save([new], srv.now, checkpoint=True) == 1
    srv.commit()
    store.fold_marks()
    taken = store.take(key)
    assert taken is not None and taken[5] <= new.window.top < old.window.top


@pytest.mark.parametrize("where", ["carried by the bus", "logged by the store"])
def test_the_lane_has_the_store_fold_its_marks_every_fold_every_packs(coaps, tmp_path, monkeypatch, where):
    """`lane_touched` counts the packs written (carried in a bus commit, or logged in the store's
    file) and has the store fold them once FOLD_EVERY are there: the rows say the tops again and
    nothing waits to be read."""
    import corem.dtls.layer as layer_module

    monkeypatch.setattr(layer_module, "FOLD_EVERY", 2)
    store = SessionStore(tmp_path / "sessions.db")
    if where.startswith("carried"):
        srv, dev, conn, _ = _saved_session(coaps, store)
    else:
        srv = coaps(store=store)
        assert not srv.layer.carry_marks(KafkaSink(KafkaSettings(bootstrap=("127.0.0.1:1",))))
        dev = Device(srv.address)
        srv.handshake(dev)
        conn = srv.layer.sessions[dev.address]
        assert srv.layer._save([conn], srv.now, checkpoint=True) == 1
    key = srv.layer._key_of(conn)

    def row_top() -> int:
        return int(store.db.execute("SELECT rx_top FROM sessions WHERE peer = ?", (key,)).fetchone()[0])

    saved = row_top()
    tops = []
    for mid in (1, 2, 3):
        dev.post(reading(mid))
        srv.pump()
        tops.append(row_top())
        srv.commit()
    # logged: each batch's pack is written in its lane_touched, the second one folds both; carried:
    # a pack is written by the commit after it, the third batch's lane_touched folds the two
    folded_at = 1 if where.startswith("logged") else 2
    assert tops[:folded_at] == [saved] * folded_at and tops[folded_at] > saved
