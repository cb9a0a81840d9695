"""A CI-sized run of the live UDP fuzzer (bench/udp_fuzzer.py): valid devices keep being served
while malformed CoAP, duplicates, DTLS garbage, ClientHello floods, oversized datagrams and forged
requests to the device-management doors arrive."""

from __future__ import annotations

import pytest

from bench.udp_fuzzer import TOKEN, attack

from .conftest import corem_cli, start_corem


@pytest.mark.slow
@pytest.mark.alone  # (it judges the devices' service under a flood it makes: no other test's load beside it)
def test_valid_devices_are_served_through_an_attack(tmp_path):
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "fuzz", "--device", "d1", "--token", TOKEN, data_dir=data)
    server = start_corem(data, "--log-level", "warning")
    try:
        report = attack(server, seconds=5.0, max_datagrams=400_000)
    finally:
        server.stop()
    d = report["devices"]
    assert report["corem_alive"]
    assert d["requests"] > 100 and d["failed"] == 0 and d["ok"] == d["requests"], d  # 100% for CON requests
    assert report["attack_datagrams"] > 10_000
    counted = report["corem_counted"]
    for metric in ("corem_coap_format_errors_total", "corem_dtls_hello_verify_sent_total",
                   "corem_coap_datagrams_oversized_total", "corem_rate_limited_datagrams_total",
                   "corem_auth_failures_total", "corem_coap_observe_registrations_total", "corem_provisioning_total"):
        assert any(k.startswith(metric) for k in counted), (metric, counted)
    assert report["attack"]["front_doors"]["datagrams"] > 1000
    # (the observe flood on a real token: each registration replaces the device's one before --
    # a device observes its RPCs once -- so thousands leave one, and none needs refusing)
    assert report["observers_after"] <= 1 + 4, report["observers_after"]
    assert not any("handler_errors" in k for k in counted), counted  # every forged request got its 4.xx
    rss = report["rss_kib"]
    assert rss["peak"] - rss["start"] < 64 * 1024, rss  # bounded memory under the flood
