"""Efento's door against a real `corem serve`, the messages built with protoc's classes of Efento's
`.proto` and posted as files by libcoap's coap-client: plain CoAP (the device named by the message's
cloud token) and CoAPS with a PSK (named by its DTLS session, the message carrying no token)."""

from __future__ import annotations

import struct
import time

import pytest

from .conftest import DTLS_CLIENTS, SPEC_IDENTITY, SPEC_KEY, coap_client, needs_libcoap
from .test_efento import TS, Protoc, device_info, measurements, needs_protoc, protoc_files

pytestmark = [needs_libcoap, needs_protoc, pytest.mark.interop]


@pytest.fixture(scope="module")
def pb(tmp_path_factory) -> Protoc:
    return Protoc(protoc_files(tmp_path_factory.mktemp("protoc")))


def test_measurements_device_info_and_the_time_over_plain_coap(corem, pb, tmp_path):
    m = tmp_path / "m.bin"
    m.write_bytes(measurements(pb, ("TEMPERATURE", 200, [23, 24, 8_388_557]), ("HUMIDITY", 40, [5, 6]),
                               ("OK_ALARM", 0, [1, -31]), token="T0KEN-1", base=60, factor=1))
    for path in ("m", "api/v1/efento/m"):
        r = coap_client(f"{corem.coap}/{path}", "-m", "post", "-f", str(m))
        assert r.code == "2.01", r.output
    points = [p for p in corem.points("acme") if p["device"] == "sensor-1"]
    assert len(points) == 2 * 3  # each post: TS, TS+30 (the alarm's OK), TS+60 (TS+120's sample is an error code)
    by_ts = {p["ts"]: {**p["numeric_values"], **p["string_values"]} for p in points}
    assert by_ts[TS * 1000]["temperature_1"] == 22.3 and by_ts[TS * 1000]["humidity_2"] == 45.0
    assert by_ts[TS * 1000]["ok_alarm_3"] == "ALARM" and by_ts[(TS + 30) * 1000] == {"ok_alarm_3": "OK"}
    assert by_ts[(TS + 60) * 1000] == {"temperature_1": 22.4, "humidity_2": 46.0}
    assert points[0]["profile"] == "efento" and points[0]["units"]["temperature_1"] == "°C"
    metrics = corem.metrics()
    assert metrics['corem_efento_messages_total{kind="measurements",result="accepted"}'] == 2
    assert metrics['corem_efento_samples_skipped_total{reason="sensor_error"}'] == 2
    assert any(k.startswith("corem_request_duration_seconds_count") and 'door="efento"' in k and v >= 2
               for k, v in metrics.items())

    i = tmp_path / "i.bin"
    i.write_bytes(device_info(pb, token="T0KEN-1"))
    assert coap_client(f"{corem.coap}/i", "-m", "post", "-f", str(i)).code == "2.01"
    status, attrs = corem.api("GET", "/api/devices/acme/sensor-1/attributes")
    assert status == 200 and attrs["client"]["software_version"] == "06.10"
    assert attrs["client"]["modem_type"] == "MODEM_TYPE_BC660"

    out = tmp_path / "now.bin"
    before = int(time.time())
    r = coap_client(f"{corem.coap}/t", "-m", "get", "-o", str(out))
    assert r.code == "2.05"
    [now] = struct.unpack(">I", out.read_bytes())
    assert before - 1 <= now <= int(time.time()) + 1

    broken = tmp_path / "broken.bin"
    broken.write_bytes(m.read_bytes()[:-3])
    r = coap_client(f"{corem.coap}/coap/measurements", "-m", "post", "-f", str(broken))
    assert r.code == "4.00" and "field 'cloudToken'" in r.output
    assert corem.metrics()['corem_protocol_payload_rejections_total{protocol="coap",reason="decode_error"}'] == 1


@pytest.mark.parametrize("client", DTLS_CLIENTS)
def test_measurements_over_coaps_name_the_device_by_its_session(corem, pb, tmp_path, client):
    m = tmp_path / "m.bin"
    m.write_bytes(measurements(pb, ("CO2_GAS", 1200, [1, 4]), token=""))
    r = coap_client(f"coaps://127.0.0.1:{corem.coaps_port}/m", "-m", "post", "-u", SPEC_IDENTITY, "-k", SPEC_KEY,
                    "-f", str(m), binary=client)
    assert r.code == "2.01", r.output
    points = [p for p in corem.points("acme") if p["device"] == "sensor-7"]
    assert [(p["ts"], p["numeric_values"]["co2_gas_1"], p["numeric_values"]["co2_gas_metadata_1"])
            for p in points] == [(TS * 1000, 400.0, 1.0), ((TS + 60) * 1000, 401.0, 1.0)]  # 1201 = 3 * 400 + 1, 1204 = 3 * 401 + 1
    # without a session and without a token: no device
    assert coap_client(f"{corem.coap}/m", "-m", "post", "-f", str(m)).code == "4.01"
