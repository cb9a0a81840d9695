"""OSCORE against a real client: aiocoap-client (aiocoap's command line, with a credentials file)
posts readings to a running corem, from a new source port each time (an address change: served with
no extra round trip), and again after a corem restart (Echo re-establishes freshness); aiocoap's
client library observes attributes through OSCORE (aiocoap-client itself ends an observation after
the first answer).  Wrong keys and replayed datagrams are refused and counted."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from corem.fastlane import Lane

from .conftest import corem_cli, start_corem, wait_for, write_cbor

pytest.importorskip("aiocoap.oscore")
AIOCOAP_CLIENT = shutil.which("aiocoap-client") or str(Path(sys.executable).with_name("aiocoap-client"))
HELPER = [sys.executable, str(Path(__file__).with_name("aiocoap_client.py"))]
SECRET = "0123456789abcdef0123"


def credentials(tmp_path: Path, port: int, secret: str = SECRET, name: str = "ctx") -> Path:
    """aiocoap's credentials file and security context directory for the device d-osc."""
    ctx = tmp_path / name
    ctx.mkdir(exist_ok=True)
    (ctx / "settings.json").write_text(json.dumps({"sender-id_hex": "02", "recipient-id_hex": "01",
                                                   "secret_ascii": secret}))
    creds = tmp_path / f"{name}.json"
    creds.write_text(json.dumps({f"coap://127.0.0.1:{port}/*": {"oscore": {"contextfile": str(ctx) + "/"}}}))
    return creds


def aiocoap_post(creds: Path, port: int, reading: Path) -> subprocess.CompletedProcess:
    return subprocess.run([AIOCOAP_CLIENT, "--credentials", str(creds), "-m", "POST", "--content-format",
                           "application/cbor", "--payload", f"@{reading}", f"coap://127.0.0.1:{port}/telemetry"],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def oscore_dir(data_dir):
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d-osc", "--oscore-sender-id", "01",
              "--oscore-recipient-id", "02", "--oscore-secret", SECRET, data_dir=data_dir)
    return data_dir


def test_aiocoap_client_posts_through_oscore_across_address_changes_and_a_restart(oscore_dir, tmp_path):
    server = start_corem(oscore_dir)
    try:
        creds = credentials(tmp_path, server.coap_port)
        for n in range(3):  # each run of the client is a new source port: an address change
            r = aiocoap_post(creds, server.coap_port, write_cbor(tmp_path / f"r{n}.cbor", {"temperature": 20 + n}))
            assert r.returncode == 0, r.stderr
        m = server.metrics()
        assert m["corem_oscore_requests_total"] == 3 and m["corem_oscore_echo_challenges_total"] == 0
        # the first request gave the ready context to the C fast lane, which served the next ones
        # itself (`corem serve` wires corem/oscore to the lane: server.py `lane_of`)
        assert m["corem_oscore_lane_requests_total"] == (0 if Lane is None else 2)
        assert [p["numeric_values"]["temperature"] for p in server.points("acme") if p["device"] == "d-osc"] \
            == [20, 21, 22]
    finally:
        server.stop()
    server = start_corem(oscore_dir)  # the replay window is unknown now: Echo
    try:
        creds = credentials(tmp_path, server.coap_port)  # (the same context directory, new port)
        r = aiocoap_post(creds, server.coap_port, write_cbor(tmp_path / "after.cbor", {"temperature": 30}))
        assert r.returncode == 0, r.stderr
        m = server.metrics()
        assert m["corem_oscore_echo_challenges_total"] == 1 and m["corem_oscore_requests_total"] == 2
        points = [p for p in server.points("acme") if p["device"] == "d-osc"]
        assert [p["numeric_values"]["temperature"] for p in points] == [20, 21, 22, 30]
        # the wrong master secret: 4.00 Decryption failed, counted, nothing stored
        wrong = credentials(tmp_path, server.coap_port, "another-secret-of-20", name="wrong")
        r = aiocoap_post(wrong, server.coap_port, tmp_path / "after.cbor")
        assert r.returncode != 0
        wait_for(lambda: server.metrics().get('corem_oscore_refused_total{reason="decrypt"}')
                 or server.metrics().get('corem_oscore_refused_total{reason="replay"}'), what="the refusal counted")
        assert len([p for p in server.points("acme") if p["device"] == "d-osc"]) == 4
    finally:
        server.stop()


def test_a_replayed_oscore_datagram_is_refused_from_any_address(oscore_dir, tmp_path):
    """The client's datagram captured on its way (a UDP relay in between), then sent again from
    another address: 4.01 Replay detected; the reading is stored once."""
    server = start_corem(oscore_dir)
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind(("127.0.0.1", 0))
    relay.settimeout(60)  # (the client is a Python program starting up: on a busy machine, seconds)
    port = relay.getsockname()[1]
    try:
        creds = credentials(tmp_path, port)
        proc = subprocess.Popen([AIOCOAP_CLIENT, "--credentials", str(creds), "-m", "POST", "--content-format",
                                 "application/cbor", "--payload", f"@{write_cbor(tmp_path / 'r.cbor', {'t': 1})}",
                                 f"coap://127.0.0.1:{port}/telemetry"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        request, client = relay.recvfrom(2048)
        corem = ("127.0.0.1", server.coap_port)
        relay.sendto(request, corem)
        while True:  # until corem's answer (a loaded machine's client may send its request again first)
            data, source = relay.recvfrom(2048)
            relay.sendto(data, client if source == corem else corem)
            if source == corem:
                break
        assert proc.wait(60) == 0
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.settimeout(30)
        other.sendto(request, ("127.0.0.1", server.coap_port))
        reply, _ = other.recvfrom(2048)
        other.close()
        assert reply[1] == 0x81 and b"Replay detected" in reply  # 4.01
        assert server.metrics()['corem_oscore_refused_total{reason="replay"}'] == 1
        assert [p["numeric_values"] for p in server.points("acme") if p["device"] == "d-osc"] == [{"t": 1}]
    finally:
        relay.close()
        server.stop()


def test_aiocoap_observes_attributes_through_oscore(oscore_dir, tmp_path):
    server = start_corem(oscore_dir)
    try:
        creds = credentials(tmp_path, server.coap_port)
        proc = subprocess.Popen([*HELPER, "--credentials", str(creds), "observe",
                                 f"coap://127.0.0.1:{server.coap_port}/api/v1/attributes", "3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: server.metrics().get('corem_coap_observers{transport="udp"}'), what="the observer")
        for version in ("1.0", "1.1"):
            assert server.api("PUT", "/api/devices/acme/d-osc/attributes", {"fw": version})[0] == 200
        out, err = proc.communicate(timeout=60)
        lines = out.strip().splitlines()
        assert lines[0].startswith("2.05") and lines[-2:] == ['2.05 Content {"fw":"1.0"}', '2.05 Content {"fw":"1.1"}'], (out, err)
        assert server.metrics()["corem_oscore_sealed_total"] >= 3
    finally:
        server.stop()


def test_aiocoap_client_posts_through_oscore_over_tcp(oscore_dir, tmp_path):
    server = start_corem(oscore_dir, "--coap-tcp", "127.0.0.1:0")
    try:
        port = server.coap_tcp_port
        creds = tmp_path / "tcp.json"
        credentials(tmp_path, port)
        creds.write_text(json.dumps({f"coap+tcp://127.0.0.1:{port}/*": {"oscore": {"contextfile": str(tmp_path / "ctx") + "/"}}}))
        r = subprocess.run([AIOCOAP_CLIENT, "--credentials", str(creds), "-m", "POST", "--content-format",
                            "application/cbor", "--payload", f"@{write_cbor(tmp_path / 't.cbor', {'tcp': 1})}",
                            f"coap+tcp://127.0.0.1:{port}/telemetry"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert [p["numeric_values"] for p in server.points("acme") if p["device"] == "d-osc"] == [{"tcp": 1}]
        assert server.metrics()["corem_oscore_sealed_total"] == 1
    finally:
        server.stop()


def test_oscore_inside_dtls_names_the_device_by_its_context(oscore_dir, tmp_path):
    """OSCORE is allowed inside CoAPS: the context's device is the one the reading is for, whoever
    the DTLS session belongs to (here sensor-7's PSK session carries d-osc's sealed reading)."""
    import aiocoap
    from aiocoap import oscore as aio

    from corem.codec import Code, encode

    from .conftest import SPEC_IDENTITY, SPEC_KEY
    from .dtls_udp_client import DtlsUdpClient

    server = start_corem(oscore_dir)
    client = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode())
    try:
        client.handshake()
        credentials(tmp_path, 0)
        ctx = aio.FilesystemSecurityContext(str(tmp_path / "ctx"))
        msg = aiocoap.Message(code=aiocoap.POST, uri="coaps://127.0.0.1/telemetry", content_format=60,
                              payload=bytes.fromhex("a1616401"))  # {"d": 1}
        msg.direction = aio.Direction.OUTGOING
        outer, request_id = ctx.protect(msg)
        outer.mtype, outer.mid, outer.token = aiocoap.CON, 4242, b"os"
        reply = client.exchange(outer.encode())
        assert reply.code == Code.CHANGED and reply.opt(9) is not None  # sealed
        answer = aiocoap.Message.decode(encode(reply))
        answer.direction = aio.Direction.INCOMING
        assert ctx.unprotect(answer, request_id)[0].code == aiocoap.CHANGED
        assert [(p["device"], p["numeric_values"]) for p in server.points("acme")] == [("d-osc", {"d": 1})]
    finally:
        client.close()
        server.stop()
