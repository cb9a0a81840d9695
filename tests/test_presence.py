"""Presence: online after the first accepted reading, offline after the threshold, on the bus."""

from __future__ import annotations

import json
import time

import trio

from corem.bus import EmbeddedBus, read_records
from corem.ingest.presence import Presence

from .conftest import coap_client, corem_cli, needs_libcoap, start_corem, write_cbor


async def test_transitions_are_published_once_each_and_counted(tmp_path):
    bus = EmbeddedBus(tmp_path / "bus.db")
    clock_ms = [1_000_000]
    p = Presence(bus, offline_after=120.0, wall_ms=lambda: clock_ms[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        p.seen("acme", "d1", 0.0)
        p.seen("acme", "d1", 10.0)  # already online: nothing new
        p.seen("acme", "d2", 50.0)
        assert p.online_by_tenant["acme"] == 2 and p.is_online("acme", "d1")
        assert p.sweep(100.0) == 0
        clock_ms[0] = 1_130_000
        assert p.sweep(130.1) == 1  # d1 last seen at 10.0
        assert not p.is_online("acme", "d1") and p.is_online("acme", "d2")
        p.seen("acme", "d1", 140.0)  # back: online again
        await bus.close()
    events = [json.loads(r.value) for r in read_records(tmp_path / "bus.db", "device.presence.acme")]
    assert [(e["device"], e["state"]) for e in events] == [
        ("d1", "online"), ("d2", "online"), ("d1", "offline"), ("d1", "online")
    ]
    assert events[2]["last_seen"] == 1_000_000 and events[2]["at"] == 1_130_000
    assert p.online_by_tenant["acme"] == 2 and p.transitions == {"online": 3, "offline": 1}


def test_thresholds_per_profile_win_over_per_tenant_over_the_default():
    class Sink:
        records: list = []

        def submit(self, record, done, ctx=None):
            self.records.append(record)
            return True

    p = Presence(Sink(), offline_after=120.0, tenants={"acme": 30.0}, profiles={"meter": 600.0})
    p.seen("acme", "plain", 0.0)
    p.seen("acme", "meter-1", 0.0, "meter")
    p.seen("other", "x", 0.0)
    assert p.sweep(31.0) == 1 and not p.is_online("acme", "plain")  # the tenant's 30 s
    assert p.sweep(121.0) == 1 and not p.is_online("other", "x")  # the default 120 s
    assert p.is_online("acme", "meter-1")  # its profile's 600 s
    p.seen("acme", "meter-1", 500.0, "default")  # re-profiled: it moves, and stays online
    assert p.online_by_tenant["acme"] == 1 and p.transitions["online"] == 3
    assert p.sweep(531.0) == 1 and p.online_by_tenant["acme"] == 0  # now the tenant's 30 s


@needs_libcoap
def test_device_goes_online_with_its_first_reading_and_offline_after_the_threshold(tmp_path):
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "sensor-1", "--token", "T0KEN-1", data_dir=data)
    # (5 s: the coap-client run and the scrape below must fit in the online window on a loaded machine)
    server = start_corem(data, "--presence-offline-after", "5")
    try:
        f = write_cbor(tmp_path / "r.cbor", {"temperature": 1.0})
        bad = tmp_path / "bad.cbor"
        bad.write_bytes(b"\xa1\x61")
        assert coap_client(f"{server.coap}/api/v1/T0KEN-1/telemetry", "-m", "post", "-t", "60", "-f", str(bad)).code == "4.00"
        assert server.metrics().get('corem_devices_online{tenant="acme"}', 0) == 0  # a rejected reading is not presence
        assert coap_client(f"{server.coap}/api/v1/T0KEN-1/telemetry", "-m", "post", "-t", "60", "-f", str(f)).code == "2.04"
        assert server.metrics()['corem_devices_online{tenant="acme"}'] == 1
        deadline = time.monotonic() + 60  # (only detects an offline that never comes)
        while server.metrics().get('corem_devices_online{tenant="acme"}', 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.metrics().get('corem_devices_online{tenant="acme"}', 0) == 0
    finally:
        server.stop()
    states = [json.loads(r.value)["state"] for r in read_records(data / "bus.db", "device.presence.acme")]
    assert states == ["online", "offline"]
