"""Profiles end to end: `corem serve` on loopback, profiles written with the CLI and the admin API,
readings from libcoap's coap-client (plain, OpenSSL, GnuTLS) and aiocoap through the doors."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from .conftest import DTLS_CLIENTS, SPEC_IDENTITY, SPEC_KEY, coap_client, corem_cli, needs_libcoap, start_corem

pytestmark = [needs_libcoap]

TB_PROFILE = {"format": "thingsboard", "nested": "flatten",
              "fields": {"temperature": {"min": -40, "max": 85, "unit": "Cel"}}}


@pytest.fixture
def server(tmp_path):
    d = tmp_path / "data"
    corem_cli("profiles", "add", "tb", "--json", json.dumps(TB_PROFILE), data_dir=d)
    corem_cli("profiles", "add", "senml", "--json", '{"format": "senml"}', data_dir=d)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "tb-1", "--token", "TB-TOKEN", "--profile", "tb",
              data_dir=d)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "meter-1", "--token", "SENML-TOKEN",
              "--profile", "senml", "--psk-identity", SPEC_IDENTITY, "--psk", SPEC_KEY, data_dir=d)
    s = start_corem(d)
    yield s
    s.stop()


def post(server, token: str, cf: str, payload: bytes, tmp_path: Path):
    f = tmp_path / "payload.bin"
    f.write_bytes(payload)
    return coap_client(f"{server.coap}/api/v1/{token}/telemetry", "-m", "post", "-t", cf, "-f", str(f), timeout=20)


def test_thingsboard_devices_send_their_documented_payloads_unchanged(server, tmp_path):
    """ThingsBoard's own telemetry formats on its door, which the default profile refuses."""
    sent = [
        json.dumps({"ts": 1672531200000, "values": {"temperature": 25.5}}),
        json.dumps([{"ts": 1672531201000, "values": {"temperature": 25.6}}, {"ts": 1672531202000,
                                                                             "values": {"temperature": 25.7}}]),
        json.dumps({"temperature": 25.8, "meta": {"fw": "1.2"}}),
    ]
    for payload in sent:
        r = post(server, "TB-TOKEN", "50", payload.encode(), tmp_path)
        assert r.code == "2.04", r.output
    r = post(server, "TB-TOKEN", "60", cbor2.dumps({"ts": 1672531203000, "values": {"temperature": 26.0}}), tmp_path)
    assert r.code == "2.04", r.output
    points = server.points("acme")
    assert [(p["ts"], p["numeric_values"], p["string_values"]) for p in points[:3] + points[4:]] == [
        (1672531200000, {"temperature": 25.5}, {}), (1672531201000, {"temperature": 25.6}, {}),
        (1672531202000, {"temperature": 25.7}, {}), (1672531203000, {"temperature": 26.0}, {})]
    assert points[3]["numeric_values"] == {"temperature": 25.8} and points[3]["string_values"] == {"meta.fw": "1.2"}
    assert {p["profile"] for p in points} == {"tb"} and all(p["units"] == {"temperature": "Cel"} for p in points)
    m = server.metrics()
    assert m['corem_telemetry_points_total{tenant="acme"}'] == 5  # four requests, five points


def test_a_reading_that_breaks_its_profile_is_refused_whole_and_kept_as_a_sample(server, tmp_path):
    r = post(server, "TB-TOKEN", "50", json.dumps([{"temperature": 20}, {"temperature": 120}]).encode(), tmp_path)
    assert r.code == "4.00" and "max: 120 is above 85" in r.output, r.output
    assert post(server, "TB-TOKEN", "110", b'[{"n":"t","v":1}]', tmp_path).code == "4.15"
    assert server.points() == []  # nothing of it: not the first point either
    m = server.metrics()
    assert m['corem_protocol_payload_rejections_total{protocol="coap",reason="rule_violation"}'] == 1
    status, samples = server.api("GET", "/api/diagnostics/samples")
    assert samples[-1]["reason"] == "rule_violation" and samples[-1]["field"] == "[1].temperature"
    # ... and the sample decodes against a changed profile before the device sends again
    status, result = server.api("POST", "/api/profiles/tb/decode", {"content_format": 50,
                                                                    "hex": samples[-1]["payload_hex"]})
    assert status == 422 and result["field"] == "[1].temperature"
    changed = {**TB_PROFILE, "fields": {"temperature": {"max": 150}}}
    assert server.api("PUT", "/api/profiles/tb", changed)[0] == 200
    status, result = server.api("POST", "/api/profiles/tb/decode", {"content_format": 50,
                                                                    "hex": samples[-1]["payload_hex"]})
    assert status == 200 and [p["numeric_values"] for p in result["points"]] == [{"temperature": 20.0},
                                                                                 {"temperature": 120.0}]
    r = post(server, "TB-TOKEN", "50", json.dumps([{"temperature": 20}, {"temperature": 120}]).encode(), tmp_path)
    assert r.code == "2.04", r.output  # the running server decodes with the changed profile at once


def test_senml_json_and_cbor_from_libcoap(server, tmp_path):
    pack = [{"bn": "meter-1/", "bt": 1.7e9, "bu": "W", "n": "power", "v": 120.5},
            {"n": "power", "t": 10, "v": 121.0}, {"n": "energy", "u": "kWh", "s": 42.0}]
    assert post(server, "SENML-TOKEN", "110", json.dumps(pack).encode(), tmp_path).code == "2.04"
    cbor_pack = [{-2: "meter-1/", -3: 1.7e9 + 20, 0: "power", 2: 122.0, 1: "W"}, {0: "on", 4: True}]
    assert post(server, "SENML-TOKEN", "112", cbor2.dumps(cbor_pack), tmp_path).code == "2.04"
    got = [(p["ts"], p["numeric_values"], p.get("units")) for p in server.points("acme")]
    assert got == [
        (1_700_000_000_000, {"meter-1/power": 120.5, "meter-1/energy.sum": 42.0},
         {"meter-1/power": "W", "meter-1/energy.sum": "kWh"}),
        (1_700_000_010_000, {"meter-1/power": 121.0}, {"meter-1/power": "W"}),
        (1_700_000_020_000, {"meter-1/power": 122.0, "meter-1/on": 1.0}, {"meter-1/power": "W"}),
    ]


@pytest.mark.parametrize("client", DTLS_CLIENTS)
def test_senml_over_coaps_names_the_device_by_its_session(server, tmp_path, client):
    f = tmp_path / "pack.cbor"
    f.write_bytes(cbor2.dumps([{0: "temp", 2: 21.5, 1: "Cel"}]))
    r = coap_client(f"coaps://127.0.0.1:{server.coaps_port}/telemetry", "-m", "post", "-u", SPEC_IDENTITY,
                    "-k", SPEC_KEY, "-t", "112", "-f", str(f), binary=client, timeout=30)
    assert r.code == "2.04", r.output
    [point] = server.points()
    assert (point["device"], point["numeric_values"], point["units"]) == ("meter-1", {"temp": 21.5}, {"temp": "Cel"})


def test_drogue_door_and_aiocoap_decode_with_the_devices_profile(server, tmp_path):
    auth = base64.b64encode(b"tb-1@acme:TB-TOKEN").decode()
    r = coap_client(f"{server.coap}/v1/telemetry", "-m", "post", "-t", "50",
                    "-e", '{"ts":1672531200000,"values":{"temperature":1.5}}', "-O", f"4209,Basic {auth}")
    assert r.code == "2.04", r.output
    f = tmp_path / "pack.json"
    f.write_text(json.dumps([{"n": "x", "v": 2.5}]))
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("aiocoap_client.py")), "post",
                          f"{server.coap}/api/v1/SENML-TOKEN/telemetry", str(f), "110"],
                         capture_output=True, text=True, timeout=90)
    assert "2.04" in out.stdout, out.stdout + out.stderr
    assert [p["numeric_values"] for p in server.points("acme")] == [{"temperature": 1.5}, {"x": 2.5}]


def test_binary_layouts_cayenne_lpp_and_positional_arrays_from_libcoap(server, tmp_path):
    for name, spec in (("lpp", {"format": "cayenne-lpp"}),
                       ("raw", {"format": "binary", "layout": [{"name": "temperature", "type": "int16be"},
                                                               {"name": "humidity", "type": "uint8"}],
                                "fields": {"temperature": {"scale": 0.1}}}),
                       ("pos", {"format": "array", "positions": ["temperature", "state"]})):
        assert server.api("PUT", f"/api/profiles/{name}", spec)[0] == 201
        assert server.api("POST", "/api/devices", {"tenant": "lora", "device": name, "token": f"{name}-T",
                                                   "profile": name})[0] == 201
    (tmp_path / "lpp.bin").write_bytes(bytes.fromhex("03670110056700FF"))
    r = coap_client(f"{server.coap}/api/v1/lpp-T/telemetry", "-m", "post", "-t", "42", "-f", str(tmp_path / "lpp.bin"))
    assert r.code == "2.04", r.output
    (tmp_path / "raw.bin").write_bytes(bytes.fromhex("00e141"))
    r = coap_client(f"{server.coap}/api/v1/raw-T/telemetry", "-m", "post", "-f", str(tmp_path / "raw.bin"))
    assert r.code == "2.04", r.output  # no Content-Format: a binary layout takes it
    assert post(server, "pos-T", "60", cbor2.dumps([21.5, "ok"]), tmp_path).code == "2.04"
    assert post(server, "raw-T", "42", b"\x00", tmp_path).code == "4.00"
    got = {p["device"]: (p["numeric_values"], p["string_values"], p.get("units")) for p in server.points("lora")}
    assert got == {"lpp": ({"temperature_3": 27.2, "temperature_5": 25.5}, {},
                           {"temperature_3": "Cel", "temperature_5": "Cel"}),
                   "raw": ({"temperature": 22.5, "humidity": 65.0}, {}, None),
                   "pos": ({"temperature": 21.5}, {"state": "ok"}, None)}


def test_a_ts013_javascript_codec_from_libcoap_and_a_bad_codec_harms_no_one_else(server, tmp_path):
    lht65 = (Path(__file__).with_name("codecs") / "lht65.js").read_text()
    assert server.api("PUT", "/api/profiles/lht65", {"format": "js", "script": lht65})[0] == 201
    assert server.api("PUT", "/api/profiles/stuck", {"format": "js", "timeout_ms": 20,
                                                     "script": "function decodeUplink(i) { while (true) {} }"})[0] == 201
    status, body = server.api("PUT", "/api/profiles/broken", {"format": "js", "script": "function decodeUplink( {"})
    assert status == 400 and body["error"].startswith("script: does not load: SyntaxError")
    for name in ("lht65", "stuck"):
        assert server.api("POST", "/api/devices", {"tenant": "js", "device": name, "token": f"{name}-T",
                                                   "profile": name})[0] == 201
    (tmp_path / "up.bin").write_bytes(bytes.fromhex("CBF60B0D0376010ADD7FFF"))
    stuck = coap_client(f"{server.coap}/api/v1/stuck-T/telemetry", "-m", "post", "-t", "42",
                        "-f", str(tmp_path / "up.bin"))
    # (the reason is cut to the request's size on plain UDP: no amplification)
    assert stuck.code == "5.03" and "codec: ran longer" in stuck.output, stuck.output
    r = coap_client(f"{server.coap}/api/v1/lht65-T/telemetry", "-m", "post", "-t", "42", "-f", str(tmp_path / "up.bin"))
    assert r.code == "2.04", r.output
    assert post(server, "TB-TOKEN", "50", b'{"temperature": 20}', tmp_path).code == "2.04"  # other profiles, too
    [point] = server.points("js")
    assert point["numeric_values"] == {"battery_v": 3.062, "temperature": 28.29, "humidity": 88.6,
                                       "probe.temperature": 27.81}
    assert point["string_values"] == {"battery_status": "good"}
    m = server.metrics()
    assert m['corem_protocol_payload_rejections_total{protocol="coap",reason="codec_limit"}'] == 1


def test_profiles_through_the_admin_api(server):
    status, listed = server.api("GET", "/api/profiles")
    assert status == 200 and [(p["name"], p["devices"]) for p in listed] == [("default", 0), ("senml", 1), ("tb", 1)]
    assert server.api("GET", "/api/profiles/nope")[0] == 404
    status, body = server.api("PUT", "/api/profiles/lpp", {"format": "senml", "fields": {"t": {"scale": "x"}}})
    assert status == 400 and body["error"] == "fields.t.scale: expected a number, got text"
    assert server.api("PUT", "/api/profiles/new", {"format": "senml"})[0] == 201
    assert server.api("DELETE", "/api/profiles/tb")[0] == 409  # tb-1 uses it
    assert server.api("DELETE", "/api/profiles/default")[0] == 409
    assert server.api("DELETE", "/api/profiles/new")[0] == 204
    status, body = server.api("POST", "/api/profiles/default/decode", {"content_format": 60,
                                                                       "base64": base64.b64encode(
                                                                           cbor2.dumps({"t": 1})).decode()})
    assert status == 200 and body["points"][0]["numeric_values"] == {"t": 1.0}
    assert server.api("POST", "/api/profiles/tb/decode", {"content_format": 50, "hex": "zz"})[1]["error"] \
        .startswith("hex:")


def _sensor_reading(temperature: float, humidity: float, key1: str) -> bytes:
    """ThingsBoard's documented SensorDataReading, encoded as a device's firmware would
    (tests/test_protobuf.py checks such bytes against protoc's classes)."""
    inner = b"\x0a" + bytes([len(key1)]) + key1.encode()
    return (b"\x09" + struct.pack("<d", temperature) + b"\x11" + struct.pack("<d", humidity)
            + b"\x1a" + bytes([len(inner)]) + inner)


@pytest.mark.parametrize("client", DTLS_CLIENTS)
def test_a_protobuf_profile_with_its_proto_through_every_door(server, tmp_path, client):
    """A .proto uploaded with the profile (the admin API), then readings from coap-client on the
    ThingsBoard door (-t 42 and no Content-Format), over CoAPS, on the Drogue door, and aiocoap."""
    schema = (Path(__file__).with_name("protos") / "thingsboard.proto").read_text()
    status, body = server.api("PUT", "/api/profiles/pb", {"format": "protobuf", "schema": schema, "nested": "json",
                                                          "fields": {"temperature": {"unit": "Cel", "max": 85}}})
    assert status == 201, body
    status, body = server.api("PUT", "/api/profiles/bad", {"format": "protobuf", "schema": "syntax = 'proto2';"})
    assert status == 400 and body["error"].startswith("schema: line 1:10: only proto3 schemas"), body
    assert server.api("POST", "/api/devices", {"tenant": "pb", "device": "pb-1", "token": "PB-TOKEN", "profile": "pb",
                                               "psk_identity": "pb-identity", "psk": "pb-pre-shared-key"})[0] == 201
    assert post(server, "PB-TOKEN", "42", _sensor_reading(21.5, 40.0, "a"), tmp_path).code == "2.04"
    (tmp_path / "r.bin").write_bytes(_sensor_reading(22.0, 41.0, "b"))
    r = coap_client(f"{server.coap}/api/v1/PB-TOKEN/telemetry", "-m", "post", "-f", str(tmp_path / "r.bin"))
    assert r.code == "2.04", r.output
    (tmp_path / "s.bin").write_bytes(_sensor_reading(22.5, 42.0, "c"))
    r = coap_client(f"coaps://127.0.0.1:{server.coaps_port}/telemetry", "-m", "post", "-u", "pb-identity",
                    "-k", "pb-pre-shared-key", "-t", "42", "-f", str(tmp_path / "s.bin"), binary=client, timeout=30)
    assert r.code == "2.04", r.output
    auth = base64.b64encode(b"pb-1@pb:PB-TOKEN").decode()
    (tmp_path / "d.bin").write_bytes(_sensor_reading(23.0, 43.0, "d"))
    r = coap_client(f"{server.coap}/v1/telemetry", "-m", "post", "-t", "42", "-f", str(tmp_path / "d.bin"),
                    "-O", f"4209,Basic {auth}")
    assert r.code == "2.04", r.output
    (tmp_path / "e.bin").write_bytes(_sensor_reading(23.5, 44.0, "e"))
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("aiocoap_client.py")), "post",
                          f"{server.coap}/api/v1/PB-TOKEN/telemetry", str(tmp_path / "e.bin"), "42"],
                         capture_output=True, text=True, timeout=90)
    assert "2.04" in out.stdout, out.stdout + out.stderr
    # refused: a rule broken, bytes that are not the message, JSON to a protobuf profile
    r = post(server, "PB-TOKEN", "42", _sensor_reading(99.0, 1.0, "x"), tmp_path)
    assert r.code == "4.00" and "temperature" in r.output, r.output
    r = post(server, "PB-TOKEN", "42", b"\x1a\x03\x0a\x01\xff", tmp_path)
    assert r.code == "4.00", r.output
    assert post(server, "PB-TOKEN", "50", b'{"temperature": 1}', tmp_path).code == "4.15"
    got = [(p["numeric_values"], p["string_values"], p["units"], p["profile"]) for p in server.points("pb")]
    assert got == [({"temperature": t, "humidity": h}, {"innerObject": json.dumps({"key1": k})
                                                        .replace(" ", "")}, {"temperature": "Cel"}, "pb")
                   for t, h, k in ((21.5, 40.0, "a"), (22.0, 41.0, "b"), (22.5, 42.0, "c"), (23.0, 43.0, "d"),
                                   (23.5, 44.0, "e"))]
    status, samples = server.api("GET", "/api/diagnostics/samples")
    assert (samples[-2]["reason"], samples[-2]["field"]) == ("decode_error", "innerObject.key1")
    assert samples[-2]["detail"].endswith("not UTF-8 text")
