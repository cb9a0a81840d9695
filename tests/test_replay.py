"""No replay accepted anywhere (issue 26, item 4): an OSCORE request replayed to another worker or
node, and DTLS records replayed into a session restored after a crash, are refused and counted.

The OSCORE replay window of processes that share contexts lives in the registry's row
(registry/oscore.py); a restored DTLS session refuses every record at or below the highest number
its session took before the crash (dtls/server.py, the record marks)."""

from __future__ import annotations


import json
import os
import signal
import socket

import cbor2
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corem.oscore.context import ReplayWindow
from corem.registry.db import Db
from corem.registry.oscore import OscoreState, fingerprint

from .conftest import corem_cli, from_server, start_corem, wait_for

pytest.importorskip("aiocoap.oscore")
import aiocoap  # noqa: E402
from aiocoap import oscore as aio  # noqa: E402

from .test_oscore import KEYS, Server, device_context, opened, sealed  # noqa: E402
from .test_workers import port_for  # noqa: E402
from .test_kafka import broker  # noqa: E402,F401 - (the fixture, for the Kafka case)


# -- the shared window, alone ----------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=60))
def test_the_shared_window_takes_what_the_in_memory_window_takes(tmp_path_factory, seqs):
    """registry/oscore.py's one statement is RFC 8613 §7.4's window, number for number."""
    state = OscoreState(Db(tmp_path_factory.mktemp("w") / "r.db"))
    assert state.window_known("ctx")  # a context never used: an empty window, known
    memory = ReplayWindow(True)
    for seq in seqs:
        expected = memory.fresh(seq)
        if expected:
            memory.accept(seq)
        assert state.accept("ctx", seq) == expected, (seqs, seq)


def test_workers_starting_together_both_add_the_window_columns(tmp_path):
    """A registry from before the shared window gains its columns once; a second worker that saw
    them missing a moment before finds them added by the first (CI caught one dying of it)."""
    path = tmp_path / "r.db"
    old = Db(path)
    old.execute("CREATE TABLE oscore_state (context TEXT PRIMARY KEY, seq_next INTEGER NOT NULL, "
                "used INTEGER NOT NULL DEFAULT 0)")
    first, second = Db(path), Db(path)
    stale = second.columns("oscore_state")
    OscoreState(first)
    second.columns = lambda table: stale  # what it read before the first one's ALTER
    state = OscoreState(second)
    assert {"top", "bits"} <= first.columns("oscore_state") and state.window_known("ctx")


def test_the_shared_window_on_postgresql_is_the_same_window(tmp_path):
    """Nodes share the window in PostgreSQL: the same statement, PostgreSQL's integer types."""
    import os

    from .postgres_server import Postgres, binaries

    if binaries() is None and os.environ.get("CI") != "true":
        pytest.skip("PostgreSQL is not installed (`make test` installs it as root)")
    pg = Postgres()
    try:
        a, b = OscoreState(Db(pg.url)), OscoreState(Db(pg.url))  # two nodes
        assert a.window_known("ctx") and b.window_known("ctx")
        memory = ReplayWindow(True)
        import random

        rng = random.Random(7)
        for i in range(400):
            seq = rng.randrange(0, 2**40 - 1) if i == 399 else rng.randrange(0, 300)
            expected = memory.fresh(seq)
            if expected:
                memory.accept(seq)
            assert (a if i % 2 else b).accept("ctx", seq) == expected, (i, seq)
        a.mark_used("ctx")  # a process alone used it: its window is unknown to the nodes
        assert not b.window_known("ctx") and not b.accept("ctx", 2**40)
        assert b.start_window("ctx", 10) and not a.start_window("ctx", 9) and a.accept("ctx", 11)
        assert not a.accept("ctx", 10)
        # the server restarted (its start time is the epoch; here the one stored is made another's)
        # and a's connection with it: made again, it forgets the windows its lost commits wrote
        a._window.execute("UPDATE oscore_window_epoch SET epoch = 'a start before'")
        a._window._conn.close()
        assert not a.window_known("ctx") and not a.accept("ctx", 12) and a.windows_forgotten == 1
        assert not b.window_known("ctx")  # (one table: every node's windows)
    finally:
        pg.stop()


def test_the_shared_windows_are_forgotten_after_the_machine_restarts_not_after_a_process_does(tmp_path, monkeypatch):
    """The windows' moves are committed without a flush (SQLite NORMAL): a killed process loses
    none, a crash of the machine may lose the last.  So a start on another boot (its boot_id) makes
    every window unknown -- Echo starts it again -- and a start on the same boot trusts them (a
    review found a replay taken again, its answer sealed once more under its nonce)."""
    import corem.registry.oscore as oscore_state

    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(oscore_state, "BOOT_ID", boot)
    path = tmp_path / "r.db"
    first = OscoreState(Db(path))
    assert first.window_known("ctx") and first.accept("ctx", 5) and first.accept("ctx", 6)
    again = OscoreState(Db(path))  # a process of the same boot (a restart, another worker)
    assert again.window_known("ctx") and not again.accept("ctx", 5) and again.accept("ctx", 7)
    assert again.windows_forgotten == 0
    boot.write_text("boot-2\n")  # the machine restarted
    after = OscoreState(Db(path))
    assert not after.window_known("ctx") and not after.accept("ctx", 8) and after.windows_forgotten == 1
    assert after.start_window("ctx", 9) and after.accept("ctx", 10) and not after.accept("ctx", 9)
    assert OscoreState(Db(path)).window_known("ctx")  # (and the next start of that boot trusts it again)


def test_two_processes_share_one_window_and_a_junk_request_opens_nothing(tmp_path):
    """Worker B hears a junk request with the device's kid first (it builds the context then); the
    device's requests go to worker A; each replayed to B is refused and counted there."""
    a, b = Server(tmp_path / "r.db"), Server(tmp_path / "r.db")
    for s in (a, b):
        s.oscore.shared = True
    dev = device_context(tmp_path / "dev")
    junk, _ = sealed(device_context(tmp_path / "other", msgspec.structs.replace(KEYS, secret=b"x" * 20)), aiocoap.POST,
                     "telemetry", b"\xa0", mid=50, content_format=60)
    [refused] = b.send(junk)
    assert aiocoap.Message.decode(refused).code == aiocoap.BAD_REQUEST  # Decryption failed
    captured = []
    for n in range(3):
        data, _ = sealed(dev, aiocoap.POST, "telemetry", cbor2.dumps({"n": n}), mid=100 + n, content_format=60)
        [answer] = a.send(data)
        assert aiocoap.Message.decode(answer).code == aiocoap.CHANGED
        captured.append(data)
    for data in captured:
        [answer] = b.send(data, ("198.51.100.9", 7))
        msg = aiocoap.Message.decode(answer)
        assert msg.code == aiocoap.UNAUTHORIZED and msg.payload == b"Replay detected"
    assert len(a.seen) == 3 and b.seen == [] and b.oscore.stats["refused_replay"] == 3
    # and the other way round: what B takes, A refuses
    data, _ = sealed(dev, aiocoap.POST, "telemetry", b"\xa0", mid=200, content_format=60)
    [answer] = b.send(data)
    assert aiocoap.Message.decode(answer).code == aiocoap.CHANGED
    [answer] = a.send(data, ("198.51.100.10", 7))
    assert aiocoap.Message.decode(answer).code == aiocoap.UNAUTHORIZED and len(a.seen) == 3


def test_a_window_kept_in_memory_makes_a_later_shared_start_ask_echo(tmp_path):
    """One process alone keeps its window in memory; the row then says its top is unknown, so
    workers started later (sharing the row) ask Echo before taking a request."""
    alone = Server(tmp_path / "r.db")
    dev = device_context(tmp_path / "dev")
    data, rid = sealed(dev, aiocoap.POST, "telemetry", b"\xa0", mid=1, content_format=60)
    [answer] = alone.send(data)
    assert aiocoap.Message.decode(answer).code == aiocoap.CHANGED
    assert not alone.state.window_known(fingerprint(KEYS))
    shared = Server(tmp_path / "r.db")
    shared.oscore.shared = True
    [challenge] = shared.send(data, ("198.51.100.11", 7))  # the captured request: Echo, not served
    assert shared.seen == [] and shared.oscore.stats["echo"] == 1
    inner = opened(dev, challenge, rid)  # (sealed: the outer code is 2.04)
    assert inner.code == aiocoap.UNAUTHORIZED and inner.opt.echo


# -- through `corem serve --workers 2` ----------------------------------------------------------------
def aiocoap_context(tmp_path, name="dev"):
    """The device d-osc's side of its context (aiocoap's OSCORE), sealing requests in this test."""
    ctx = tmp_path / name
    ctx.mkdir()
    (ctx / "settings.json").write_text(json.dumps({"sender-id_hex": "02", "recipient-id_hex": "01",
                                                   "secret_ascii": "0123456789abcdef0123"}))
    return aio.FilesystemSecurityContext(str(ctx))


def exchange(sock: socket.socket, port: int, data: bytes) -> aiocoap.Message:
    sock.settimeout(30)
    sock.sendto(data, ("127.0.0.1", port))
    return aiocoap.Message.decode(from_server(sock, ("127.0.0.1", port)))


def test_an_oscore_request_replayed_to_the_other_worker_is_refused_and_counted(data_dir, tmp_path):
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d-osc", "--oscore-sender-id", "01",
              "--oscore-recipient-id", "02", "--oscore-secret", "0123456789abcdef0123", data_dir=data_dir)
    server = start_corem(data_dir, "--workers", "2", timeout=60)
    home, other = port_for(0, 2), port_for(1, 2)
    try:
        dev = aiocoap_context(tmp_path)
        # junk with the device's kid reaches worker 1 first
        junk_ctx = tmp_path / "junk"
        junk_ctx.mkdir()
        (junk_ctx / "settings.json").write_text(json.dumps({"sender-id_hex": "02", "recipient-id_hex": "01",
                                                            "secret_ascii": "another-secret-of-20"}))
        junk, _ = sealed(aio.FilesystemSecurityContext(str(junk_ctx)), aiocoap.POST, "telemetry", b"\xa0",
                         mid=9, content_format=60)
        assert exchange(other, server.coap_port, junk).code == aiocoap.BAD_REQUEST
        captured = []
        for n in range(3):
            data, _ = sealed(dev, aiocoap.POST, "telemetry", cbor2.dumps({"osc": n}), mid=10 + n, content_format=60)
            assert exchange(home, server.coap_port, data).code == aiocoap.CHANGED
            captured.append(data)
        for data in captured:  # the same bytes from a port the kernel steers to worker 1
            answer = exchange(other, server.coap_port, data)
            assert answer.code == aiocoap.UNAUTHORIZED and answer.payload == b"Replay detected"
        m = server.metrics()
        assert m['corem_oscore_refused_total{reason="replay"}'] == 3
        assert m['corem_worker_requests{worker="1"}'] == 4  # the replays did reach the other worker
        stored = sorted(p["numeric_values"]["osc"] for p in server.points("acme") if p["device"] == "d-osc")
        assert stored == [0.0, 1.0, 2.0]  # each reading once
    finally:
        home.close()
        other.close()
        server.stop()


# -- DTLS: records replayed into a session restored after a crash ----------------------------------
class CapturingClient:
    """A CoAPS device (tests/dtls_udp_client.py) whose datagrams an attacker on the path keeps."""

    def __init__(self, port: int, source_port: int = 0) -> None:
        from .conftest import SPEC_IDENTITY, SPEC_KEY
        from .dtls_udp_client import DtlsUdpClient

        self.client = DtlsUdpClient(port, SPEC_IDENTITY, SPEC_KEY.encode(), source_port=source_port)
        self.captured: list[bytes] = []
        send = self.client.sock.send

        def capture(data: bytes) -> int:
            self.captured.append(bytes(data))
            return send(data)

        self.client.sock = _Tapped(self.client.sock, capture)


class _Tapped:
    """A socket whose `send` goes through `tap` (the rest is the socket's)."""

    def __init__(self, sock: socket.socket, tap) -> None:
        self._sock, self.send = sock, tap

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.mark.parametrize("engine,crash,bus", [
    ("mbedtls", "corem", "embedded"), ("mbedtls", "worker", "embedded"),
    ("corem", "corem", "embedded"), ("corem", "worker", "embedded"),
    # (Kafka: the marks are a pack a batch in the session store's own file, not in the bus's commit)
    ("corem", "corem", "kafka"),
])
def test_records_captured_after_a_checkpoint_are_refused_by_the_restored_session(data_dir, crash, engine, bus,
                                                                                request):
    """The checkpoint is taken after the session's first reading; the device then sends 20 more,
    all captured.  After a SIGKILL (of corem, or of the device's worker) the session comes back from
    the checkpoint without a handshake -- and refuses every captured record, counted; each reading
    is stored once; the device goes on in the same session.  (On the deprecated mbedtls engine the
    session does not come back -- its rows are pickles, unpickled only by the process that wrote
    them -- and the device handshakes again; each reading is stored once all the same.)"""
    from .conftest import SPEC_IDENTITY  # noqa: F401 - (the device sensor-7 of the data_dir fixture)
    from .test_kafka import consume, pytestmark as needs_kafka
    from .test_workers import worker_pids

    broker = None
    if bus == "kafka":  # (test_kafka's broker, stopped by its fixture; skipped where test_kafka is)
        if needs_kafka.args[0]:
            pytest.skip(needs_kafka.kwargs["reason"])
        broker = request.getfixturevalue("broker")
    kafka = ("--bus", f"kafka://{broker.bootstrap}") if broker is not None else ()
    workers = ("--workers", "2") if crash == "worker" else ()
    server = start_corem(data_dir, *workers, *kafka, "--dtls-engine", engine, timeout=60)
    source = 0
    if crash == "worker":
        probe = port_for(1, 2)
        source = probe.getsockname()[1]
        probe.close()
    device = CapturingClient(server.coaps_port, source)
    client = device.client
    try:
        client.handshake(timeout=30)
        assert client.post(["telemetry"], cbor2.dumps({"r": 0}), timeout=30).code == 68
        wait_for(lambda: server.metrics()["corem_dtls_sessions_checkpointed_total"] >= 1, 60, "a checkpoint")
        device.captured.clear()
        for n in range(1, 21):
            assert client.post(["telemetry"], cbor2.dumps({"r": n}), timeout=30).code == 68
        captured = list(device.captured)
        assert len(captured) >= 20
        if crash == "corem":
            server.stop(signal.SIGKILL)
            server = start_corem(data_dir, *kafka, "--dtls-engine", engine, timeout=60)
            client.sock.connect(("127.0.0.1", server.coaps_port))
        else:
            victim = worker_pids(server)[1]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: worker_pids(server).get(1) not in (None, victim), 60, "worker 1 started again")
        for data in captured:  # the attacker replays them, from the device's own address
            client.sock.send(data)
        if engine == "mbedtls":
            # the deprecated engine never unpickles what another process wrote (pickle runs code):
            # its session went with the process, the replays find none, the device handshakes again
            client.close()
            device = CapturingClient(server.coaps_port, 0)
            client = device.client
            client.handshake(timeout=30)
            assert client.post(["telemetry"], cbor2.dumps({"r": 21}), timeout=30).code == 68
            m = server.metrics()
            assert m["corem_dtls_sessions_restored_total"] == 0 and m["corem_dtls_handshakes_completed_total"] == 1
        else:
            # the device goes on in the same session: its next record is newer than any it sent
            assert client.post(["telemetry"], cbor2.dumps({"r": 21}), timeout=30).code == 68
            m = server.metrics()
            assert m["corem_dtls_records_replayed_total"] == len(captured)
            assert m["corem_dtls_sessions_restored_total"] == 1 and m["corem_dtls_handshakes_completed_total"] == 0
        points = server.points("acme") if broker is None else [
            json.loads(r.value) for r in consume(broker.bootstrap, "telemetry.raw.acme", None)]
        stored = sorted(p["numeric_values"]["r"] for p in points if p["device"] == "sensor-7")
        assert stored == [float(n) for n in range(22)]  # each once: no replayed reading stored
    finally:
        client.close()
        server.stop()
