"""CoAPS end to end: `corem serve` on loopback, libcoap's DTLS clients (OpenSSL and GnuTLS builds)."""

from __future__ import annotations

import cbor2
import pytest

from .conftest import DTLS_CLIENTS, SPEC_IDENTITY, SPEC_KEY, coap_client, needs_libcoap, start_corem, write_cbor

pytestmark = [needs_libcoap]

READING = {"temperature": 22.5, "humidity": 65}
clients = pytest.mark.parametrize("client", DTLS_CLIENTS)
#: both implementations of CoAPS's security layer (dtls_engine): corem's own (the default) and the
#: deprecated python-mbedtls one, which keeps the spec's command, its failures and its unit and
#: differential tests (test_dtls.py, test_dtls_differential.py); the longer end-to-end tests run on
#: the default engine alone (the suite's time: issue 27)
ENGINES = ("mbedtls", "corem")
engines = pytest.mark.parametrize("engine", ("corem",))


@pytest.fixture
def corem(data_dir):
    """`corem serve` on loopback (corem's engine)"""
    server = start_corem(data_dir)
    yield server
    server.stop()


@pytest.fixture(params=ENGINES)
def either(data_dir, request):
    """`corem serve` on loopback, on each DTLS engine"""
    server = start_corem(data_dir, "--dtls-engine", request.param)
    yield server
    server.stop()


def spec_command(corem, client, reading, identity=SPEC_IDENTITY, key=SPEC_KEY):
    """The spec's own command: coap-client -m post -u ID -k KEY -t application/cbor -f reading.cbor coaps://…/telemetry"""
    return coap_client(
        f"coaps://127.0.0.1:{corem.coaps_port}/telemetry",
        "-m", "post", "-u", identity, "-k", key, "-t", "application/cbor", "-f", str(reading),
        binary=client, timeout=30,
    )


@clients
def test_spec_command_is_changed_and_stored_for_the_identity(either, tmp_path, client):
    corem = either
    r = spec_command(corem, client, write_cbor(tmp_path / "reading.cbor", READING))
    assert r.code == "2.04", r.output
    [point] = corem.points()
    assert (point["tenant"], point["device"]) == ("acme", "sensor-7")  # from the session, not the payload
    assert point["numeric_values"] == {"temperature": 22.5, "humidity": 65.0}
    m = corem.metrics()
    assert m['corem_coap_responses_total{code="2.04",transport="dtls"}'] == 1
    assert m["corem_dtls_handshakes_completed_total"] == 1


@clients
def test_wrong_key_and_unknown_identity_fail_the_handshake_and_store_nothing(either, tmp_path, client):
    corem = either
    reading = write_cbor(tmp_path / "reading.cbor", READING)
    assert spec_command(corem, client, reading, key="not-the-right-key").code is None
    assert spec_command(corem, client, reading, identity="who-am-i").code is None
    assert corem.points() == []
    m = corem.metrics()
    assert m['corem_dtls_handshakes_failed_total{reason="bad_mac"}'] >= 1
    assert m['corem_dtls_handshakes_failed_total{reason="unknown_identity"}'] >= 1
    assert m["corem_dtls_handshakes_completed_total"] == 0


def test_the_server_busy_polls_for_the_answers_to_its_flights_unless_told_not_to(data_dir, tmp_path):
    """dtls_busy_poll_us (150 by default): each batch that sent a flight (the HelloVerifyRequest,
    the ServerHello flight, the Finished) is followed by a poll of the socket on the CPU, unless
    backing off after one that saw nothing -- so at least the first (more when a slow machine's
    client retransmits); 0: none, and no such metric."""
    reading = write_cbor(tmp_path / "reading.cbor", READING)
    for window in ("150", "0"):
        server = start_corem(data_dir, "--dtls-busy-poll-us", window)
        try:
            r = spec_command(server, DTLS_CLIENTS[0], reading)
            m = server.metrics()
        finally:
            server.stop()
        assert r.code == "2.04", r.output
        polls = {k: v for k, v in m.items() if k.startswith("corem_dtls_busy_poll")}
        if window == "0":
            assert polls == {}
        else:
            answered = polls['corem_dtls_busy_polls_total{outcome="answered",transport="dtls"}']
            missed = polls['corem_dtls_busy_polls_total{outcome="missed",transport="dtls"}']
            assert answered + missed >= 1 and polls['corem_dtls_busy_poll_seconds_total{transport="dtls"}'] > 0
    assert len(server.points()) == 2  # (the data dir's: one reading from each run)


@clients
def test_bad_cbor_over_coaps_is_rejected_like_plain_coap(corem, tmp_path, client):
    f = tmp_path / "bad.cbor"
    f.write_bytes(cbor2.dumps({"temperature": [1, 2]}))
    r = spec_command(corem, client, f)
    assert r.code == "4.00" and "temperature" in r.output, r.output
    assert corem.points() == []
    m = corem.metrics()
    assert m['corem_protocol_payload_rejections_total{protocol="coap",reason="decode_error"}'] == 1


def test_token_path_works_over_coaps_too(corem, tmp_path):
    reading = write_cbor(tmp_path / "reading.cbor", READING)
    r = coap_client(
        f"coaps://127.0.0.1:{corem.coaps_port}/api/v1/T0KEN-1/telemetry",
        "-m", "post", "-u", SPEC_IDENTITY, "-k", SPEC_KEY, "-t", "application/cbor", "-f", str(reading),
        binary=DTLS_CLIENTS[0], timeout=30,
    )
    assert r.code == "2.04", r.output
    assert [p["device"] for p in corem.points()] == ["sensor-1"]  # the token names the device


def test_client_hello_flood_from_many_ports_creates_no_state_and_no_amplification(corem):
    """Real ClientHellos without cookies from 100 source ports, each sent three times."""
    import socket

    from .test_dtls import Client

    socks = []
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    try:
        sent = 0
        for s in socks:
            c = Client()
            c.step()
            [hello] = c.outgoing()
            for _ in range(3):
                s.sendto(hello, ("127.0.0.1", corem.coaps_port))
                sent += len(hello)
        from .conftest import wait_for

        # every ClientHello answered (loopback: the answers are in our sockets once counted)
        wait_for(lambda: corem.metrics()["corem_dtls_hello_verify_sent_total"] >= 300, what="300 HelloVerifyRequests")
        received = 0
        for s in socks:
            while True:
                try:
                    received += len(s.recv(4096))
                except BlockingIOError:
                    break
    finally:
        for s in socks:
            s.close()
    m = corem.metrics()
    assert m['corem_dtls_sessions{state="live"}'] == 0 and m['corem_dtls_sessions{state="handshaking"}'] == 0
    assert m["corem_dtls_hello_verify_sent_total"] == 300
    assert 0 < received <= sent
    assert m["corem_dtls_bytes_sent_unauthenticated_total"] <= m["corem_dtls_bytes_received_total"]


@engines
def test_offloaded_session_keeps_working_without_a_new_handshake(data_dir, engine):
    from .dtls_udp_client import DtlsUdpClient

    server = start_corem(data_dir, "--dtls-offload-after", "0.3", "--dtls-engine", engine)
    client = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode())
    try:
        client.handshake()
        assert client.post(["telemetry"], cbor2.dumps({"seq": 1})).code == 68
        import time

        deadline = time.monotonic() + 60  # (only detects an offload that never comes)
        while server.metrics()["corem_dtls_sessions_offloaded_total"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        m = server.metrics()
        assert m['corem_dtls_sessions{state="offloaded"}'] == 1 and m['corem_dtls_sessions{state="live"}'] == 0
        assert client.post(["telemetry"], cbor2.dumps({"seq": 2})).code == 68
        m = server.metrics()
        assert m["corem_dtls_sessions_restored_total"] >= 1
        assert m["corem_dtls_handshakes_completed_total"] == 1  # the one at the start, no other
        assert sorted(p["numeric_values"]["seq"] for p in server.points()) == [1.0, 2.0]
    finally:
        client.close()
        server.stop()


@engines
def test_session_carried_across_a_restart_of_corem(data_dir, engine):
    from .dtls_udp_client import DtlsUdpClient

    first = start_corem(data_dir, "--dtls-engine", engine)
    port = first.coaps_port
    client = DtlsUdpClient(port, SPEC_IDENTITY, SPEC_KEY.encode())
    try:
        client.handshake()
        assert client.post(["telemetry"], cbor2.dumps({"seq": 1})).code == 68
        assert first.stop() == 0
        assert "saved 1 DTLS sessions" in first.stderr()
        second = start_corem(data_dir, "--coaps", f"127.0.0.1:{port}", "--dtls-engine", engine)
        try:
            assert second.coaps_port == port
            assert client.post(["telemetry"], cbor2.dumps({"seq": 2})).code == 68
            m = second.metrics()
            assert m["corem_dtls_handshakes_completed_total"] == 0  # no new handshake
            assert m["corem_dtls_sessions_restored_total"] == 1
            assert sorted(p["numeric_values"]["seq"] for p in second.points()) == [1.0, 2.0]
            assert not (data_dir / "dtls-sessions.bin").exists()  # taken back once, then removed
        finally:
            second.stop()
    finally:
        client.close()


@engines
@pytest.mark.parametrize("lane", ["on", "off"])
def test_a_new_session_from_the_same_address_starts_message_ids_afresh(data_dir, lane, engine):
    """A device that reboots handshakes again from the same address and port and starts its
    message IDs where it started before: its first reading is new, not a duplicate of the one the
    old session sent with that ID (which would be answered 2.04 from the cache and never stored)."""
    from .dtls_udp_client import DtlsUdpClient

    server = start_corem(data_dir, "--fast-lane", lane, "--dtls-engine", engine)
    first = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode())
    try:
        first.handshake()
        assert first.post(["telemetry"], cbor2.dumps({"seq": 1})).code == 68
        source = first.sock.getsockname()[1]
        first.close()
        again = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode(), source_port=source)
        try:
            again.handshake()
            assert again.mid == first.mid - 1  # the same first message ID as the old session's
            assert again.post(["telemetry"], cbor2.dumps({"seq": 2})).code == 68
        finally:
            again.close()
        assert sorted(p["numeric_values"]["seq"] for p in server.points()) == [1.0, 2.0]
        assert server.metrics()["corem_dtls_handshakes_completed_total"] == 2
    finally:
        server.stop()


@engines
def test_a_new_session_at_an_address_ends_the_observations_made_there(data_dir, engine):
    """A device observes its shared attributes over CoAPS and goes away; another device handshakes
    from the same address and port (a NAT gave it the mapping): the first device's attributes must
    not reach it -- the observation was the old session's (RFC 7252 §9.1.1: the session is the
    endpoint).  Found by an adversarial run: they did, encrypted in the newcomer's session."""
    from corem.codec import Code, Message, OptionNumber as O, Type, encode, make_options

    from .conftest import corem_cli
    from .dtls_udp_client import DtlsUdpClient

    corem_cli("devices", "add", "--tenant", "acme", "--device", "dev-b", "--psk-identity", "id-b", "--psk",
              "key-bbbbbbbbbbbb", data_dir=data_dir)
    server = start_corem(data_dir, "--dtls-engine", engine)
    a = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode())
    b = None
    try:
        a.handshake()
        observe = Message(Type.CON, Code.GET, 500, b"\xa0", make_options(
            [(O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, "attributes"), (O.OBSERVE, 0)]))
        r = a.exchange(encode(observe))
        assert r.code == Code.CONTENT and r.observe is not None
        assert server.metrics()['corem_coap_observers{transport="dtls"}'] == 1
        port = a.sock.getsockname()[1]
        a.close()
        b = DtlsUdpClient(server.coaps_port, "id-b", b"key-bbbbbbbbbbbb", source_port=port)
        b.handshake()
        assert b.post(["telemetry"], cbor2.dumps({"x": 1})).code == Code.CHANGED
        assert server.metrics()['corem_coap_observers{transport="dtls"}'] == 0
        status, body = server.api("PUT", "/api/devices/acme/sensor-7/attributes", {"secret": "hunter2"})
        assert (status, body) == (200, {"delivery": "stored"})  # (no observer: its next GET reads it)
    finally:
        if b is not None:
            b.close()
        server.stop()


def test_coaps_runs_without_python_mbedtls(data_dir, tmp_path, monkeypatch):
    """python-mbedtls is an optional package now (the deprecated engine's): `corem serve` on its
    defaults, with `import mbedtls` failing, serves the spec's command; asking for the mbedtls
    engine then ends the start with one line saying what to install."""
    import subprocess
    import sys

    shadow = tmp_path / "shadow" / "mbedtls"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('python-mbedtls is not installed (test)')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    server = start_corem(data_dir)
    try:
        r = spec_command(server, DTLS_CLIENTS[0], write_cbor(tmp_path / "reading.cbor", READING))
        assert r.code == "2.04", r.output
        assert len(server.points()) == 1
    finally:
        server.stop()
    r = subprocess.run([sys.executable, "-m", "corem", "serve", "--data-dir", str(tmp_path / "d2"), "--coap", "off",
                        "--coaps", "127.0.0.1:0", "--http", "off", "--dtls-engine", "mbedtls"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'mbedtls' needs python-mbedtls, an optional package" in r.stderr, r.stderr
