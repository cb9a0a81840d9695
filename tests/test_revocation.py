"""What was granted on a credential ends with it: a running corem, its devices' PSKs and tokens
rotated (`corem devices import --replace`) or the device removed and added again under its name
(new hardware).  Its DTLS sessions (live, and saved across a restart), its coaps+tcp connection,
its Observe registrations and what waited for the old device in the downlink all end; the new
credential works.  (An adversarial run found each of them outliving the credential: the old PSK's
session answered 2.04 and stored readings, an observer of the revoked token received the new
device's shared attributes and RPCs, a re-added device received the old one's queued command.)"""

from __future__ import annotations

import json
import socket

import cbor2
import pytest

from corem.codec import Code, Message, Type, decode, encode, make_options
from corem.codec import OptionNumber as O

from .conftest import corem_cli, start_corem, wait_for
from .dtls_udp_client import DtlsUdpClient


def replace(data, tmp_path, **device) -> None:
    """`corem devices import --replace` of one device (the CLI tells the running server)."""
    f = tmp_path / f"{device['device']}.jsonl"
    f.write_text(json.dumps({"tenant": "acme", **device}) + "\n")
    corem_cli("devices", "import", str(f), "--replace", data_dir=data)


def reading(client: DtlsUdpClient, n: int, timeout: float) -> int | None:
    try:
        return client.post(["telemetry"], cbor2.dumps({"n": n}), timeout=timeout).code
    except TimeoutError:
        return None


def stored(server, device: str) -> list[int]:
    return sorted(int(p["numeric_values"]["n"]) for p in server.points("acme") if p["device"] == device)


def test_a_rotated_or_re_added_psk_ends_its_sessions_live_and_saved(tmp_path):
    data = tmp_path / "data"
    for d in ("rot", "readd", "slept"):
        corem_cli("devices", "add", "--tenant", "acme", "--device", d, "--psk-identity", f"id-{d}",
                  "--psk", f"old-key-{d}", data_dir=data)
    server = start_corem(data)
    try:
        old = {d: DtlsUdpClient(server.coaps_port, f"id-{d}", f"old-key-{d}".encode()) for d in ("rot", "readd", "slept")}
        for d, client in old.items():
            client.handshake()
            assert reading(client, 1, 30) == Code.CHANGED
        replace(data, tmp_path, device="rot", psk_identity="id-rot-2", psk="new-key-rot")
        assert server.api("DELETE", "/api/devices/acme/readd")[0] == 204
        assert server.api("POST", "/api/devices", {"tenant": "acme", "device": "readd", "psk_identity": "id-readd",
                                                   "psk": "new-key-readd"})[0] == 201
        wait_for(lambda: server.metrics().get("corem_dtls_sessions_revoked_total") == 2, what="two sessions revoked")
        # the old sessions are gone: their records are no one's (dropped), nothing is stored
        assert reading(old["rot"], 2, 3) is None and reading(old["readd"], 2, 3) is None
        assert stored(server, "rot") == [1] and stored(server, "readd") == [1]
        # the new credentials work
        new = DtlsUdpClient(server.coaps_port, "id-rot-2", b"new-key-rot")
        new.handshake()
        assert reading(new, 3, 30) == Code.CHANGED
        new = DtlsUdpClient(server.coaps_port, "id-readd", b"new-key-readd")  # (the same identity, another key)
        new.handshake()
        assert reading(new, 3, 30) == Code.CHANGED
        port = server.coaps_port
    finally:
        server.stop()  # "slept"'s session is saved at the stop
    replace(data, tmp_path, device="slept", psk_identity="id-slept", psk="new-key-slept")  # while corem is stopped
    server = start_corem(data, "--coaps", f"127.0.0.1:{port}")
    try:
        assert reading(old["slept"], 2, 3) is None  # its saved copy is sealed to the old key: it does not open
        wait_for(lambda: server.metrics().get("corem_dtls_sessions_lost_total") == 1, what="the saved session refused")
        assert stored(server, "slept") == [1]
    finally:
        server.stop()


def observe(sock: socket.socket, path: list[str], token: bytes, mid: int) -> Message:
    sock.send(encode(Message(Type.CON, Code.GET, mid, token,
                             make_options([(O.OBSERVE, 0), *((O.URI_PATH, p) for p in path)]))))
    return next_message(sock)


def next_message(sock: socket.socket) -> Message:
    msg = decode(sock.recv(4096))
    if msg.type == Type.CON:  # (acknowledged, as a device keeps its observation)
        sock.send(encode(Message(Type.ACK, 0, msg.mid, b"", [])))
    return msg


@pytest.mark.parametrize("how", ["rotated", "re-added"])
def test_observations_end_with_the_token_that_made_them(data_dir, tmp_path, how):
    server = start_corem(data_dir)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(30)
    s.connect(("127.0.0.1", server.coap_port))
    try:
        for token, what in ((b"r1", "rpc"), (b"a1", "attributes")):
            answer = observe(s, ["api", "v1", "T0KEN-1", what], token, 0x100 + len(what))
            assert answer.code == Code.CONTENT and answer.observe is not None
        if how == "rotated":
            replace(data_dir, tmp_path, device="sensor-1", token="T0KEN-2")
        else:
            assert server.api("DELETE", "/api/devices/acme/sensor-1")[0] == 204
            assert server.api("POST", "/api/devices", {"tenant": "acme", "device": "sensor-1", "token": "T0KEN-2"})[0] == 201
        # each observer is told once: 4.01, without Observe (RFC 7641 §3.2), and nothing after it
        ended = [next_message(s), next_message(s)]
        assert sorted(m.token for m in ended) == [b"a1", b"r1"]
        assert all(m.code == Code.UNAUTHORIZED and m.observe is None for m in ended)
        assert sum(v for k, v in server.metrics().items() if k.startswith("corem_coap_observe_revoked_total")) == 2
        status, body = server.api("PUT", "/api/devices/acme/sensor-1/attributes", {"wifi": "SECRET"})
        assert status == 200 and body["delivery"] == "stored"  # (no observer: kept for the device's next GET)
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):
            while True:  # whatever still comes to the old observer: never the secret
                assert b"SECRET" not in bytes(next_message(s).payload)
        # the device with its new token observes and gets it
        s.settimeout(30)
        answer = observe(s, ["api", "v1", "T0KEN-2", "attributes"], b"a2", 0x200)
        assert answer.code == Code.CONTENT and b"SECRET" in bytes(answer.payload)
    finally:
        s.close()
        server.stop()


def test_a_re_added_device_gets_nothing_that_waited_for_the_old_one(data_dir):
    server = start_corem(data_dir)
    try:
        assert server.api("POST", "/api/devices/acme/sensor-1/commands", {"command": "wipe", "payload": "old"})[0] == 202
        assert server.api("PUT", "/api/devices/acme/sensor-1/attributes", {"old_config": "x"})[0] == 200
        assert server.api("DELETE", "/api/devices/acme/sensor-1")[0] == 204
        assert server.api("POST", "/api/devices", {"tenant": "acme", "device": "sensor-1", "token": "T0KEN-2"})[0] == 201
        _, device = server.api("GET", "/api/devices/acme/sensor-1")
        assert device["queued"]["commands"] == 0 and device["queued"]["rpc"] == 0
        _, attributes = server.api("GET", "/api/devices/acme/sensor-1/attributes")
        assert attributes["shared"] == {}
        assert server.api("PUT", "/api/devices/acme/sensor-1/attributes", {"new_config": "y"})[0] == 200
    finally:
        server.stop()
    # the CLI's removal forgets as the API's does (attributes, claim, packages)
    corem_cli("devices", "remove", "--tenant", "acme", "--device", "sensor-1", data_dir=data_dir)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "sensor-1", "--token", "T0KEN-3", data_dir=data_dir)
    server = start_corem(data_dir)
    try:
        _, attributes = server.api("GET", "/api/devices/acme/sensor-1/attributes")
        assert attributes["shared"] == {}
    finally:
        server.stop()


def test_a_new_session_at_an_address_gets_nothing_the_last_one_began(data_dir):
    """Another device whose DTLS session comes from the same address and port (a NAT's mapping
    handed on) is another endpoint: it does not read the rest of the firmware the first began
    to read, and its last Block1 block does not finish the first one's upload."""
    corem_cli("devices", "add", "--tenant", "acme", "--device", "fw-dev", "--psk-identity", "id-acme",
              "--psk", "acme-secret-key-0001", data_dir=data_dir)
    corem_cli("devices", "add", "--tenant", "globex", "--device", "intruder", "--psk-identity", "id-globex",
              "--psk", "globex-secret-key-01", data_dir=data_dir)
    server = start_corem(data_dir)
    try:
        firmware = b"ACME-PRIVATE-FIRMWARE " * 140
        status, package = server.api("POST", "/api/packages?kind=firmware&title=fw&version=1.0", raw=firmware)
        assert status == 201, package
        assert server.api("PUT", "/api/devices/acme/fw-dev/firmware", {"package": package["id"]})[0] == 200

        def request(client, code, path, mid, *options, payload=b""):
            msg = Message(Type.CON, code, mid, b"\x42", make_options([*((O.URI_PATH, p) for p in path), *options]),
                          payload)
            return client.exchange(encode(msg))

        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        reading = b'{"secret_a": 1, "pad": "' + b"x" * 1100 + b'", "b": 2}'
        acme = DtlsUdpClient(server.coaps_port, "id-acme", b"acme-secret-key-0001", source_port=port)
        acme.handshake()
        first = request(acme, Code.GET, ["api", "v1", "firmware"], 0x1001, (O.BLOCK2, 6))
        assert first.code == Code.CONTENT and bytes(first.payload).startswith(b"ACME-PRIVATE")
        assert request(acme, Code.POST, ["telemetry"], 0x1002, (O.CONTENT_FORMAT, 50), (O.BLOCK1, 0x0E),
                       payload=reading[:1024]).code == Code.CONTINUE
        acme.close()
        intruder = DtlsUdpClient(server.coaps_port, "id-globex", b"globex-secret-key-01", source_port=port)
        intruder.handshake()
        rest = request(intruder, Code.GET, ["api", "v1", "firmware"], 0x1001, (O.BLOCK2, (1 << 4) | 6))
        assert rest.code == Code.NOT_FOUND and b"ACME" not in bytes(rest.payload)  # (none assigned to it)
        last = request(intruder, Code.POST, ["telemetry"], 0x1002, (O.CONTENT_FORMAT, 50), (O.BLOCK1, 0x16),
                       payload=reading[1024:])
        assert last.code == Code.REQUEST_ENTITY_INCOMPLETE  # (no upload of its own to finish)
        intruder.close()
        assert server.points("globex") == [] and server.points("acme") == []
    finally:
        server.stop()


def test_a_subscription_ends_when_its_topics_are_narrowed(data_dir, tmp_path):
    server = start_corem(data_dir)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(30)
    s.connect(("127.0.0.1", server.coap_port))
    try:
        subscribed = observe(s, ["mqtt", "alerts"], b"s1", 0x300)  # (no query: the options carry it)
        assert subscribed.code == Code.UNAUTHORIZED  # (EMQX's door wants c, u and p)
        s.send(encode(Message(Type.CON, Code.GET, 0x301, b"s1", make_options(
            [(O.OBSERVE, 0), (O.URI_PATH, "mqtt"), (O.URI_PATH, "alerts"),
             *((O.URI_QUERY, q) for q in ("c=client-1", "u=sensor-1", "p=T0KEN-1"))]))))
        subscribed = next_message(s)
        assert subscribed.code == Code.CONTENT and subscribed.observe is not None
        replace(data_dir, tmp_path, device="sensor-1", token="T0KEN-1", topics="room/#")  # (no longer alerts)
        ended = next_message(s)
        assert ended.token == b"s1" and ended.code == Code.UNAUTHORIZED and ended.observe is None
    finally:
        s.close()
        server.stop()
