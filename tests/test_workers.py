"""`corem serve --workers N` with real processes: the steering program on real sockets, two
workers on one port, a worker killed with SIGKILL and started again (no acknowledged reading lost,
no new DTLS handshake), downlink through the one admin port to whichever worker holds the device."""

from __future__ import annotations

import json
import os
import re
import signal
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import cbor2
import pytest

from corem.bus.sqlite import EmbeddedBus, read_records
from corem.bus.base import Record
from corem.net.udp import bind_udp
from corem.workers import steer
from corem.workers.front import merge_shared, merge_status
from corem.workers.samples import decode_samples, encode_samples
from corem.metrics import gather
from corem.stats import Histogram, Sample

from .conftest import (COAP_CLIENT, DTLS_CLIENTS, SPEC_IDENTITY, SPEC_KEY, coap_client, needs_libcoap, post, read_until, start_corem,
                       wait_for)
from .ports import proc_stat

CBOR = 60


# -- the steering program ----------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_kernel_steers_each_peer_to_the_socket_the_model_names(host):
    n = 3
    first = bind_udp(host, 0, reuse_port=True)
    port = first.getsockname()[1]
    group = [first] + [bind_udp(host, port, reuse_port=True) for _ in range(n - 1)]
    clients = []
    try:
        assert steer.attach(first, n)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(90):
            c = socket.socket(family, socket.SOCK_DGRAM)
            c.bind((host, 0))
            clients.append(c)
            for _ in range(2):  # twice: a peer lands where it landed before
                c.sendto(b"x", (host, port))
        landed: dict[tuple, list[int]] = {}
        for (_, peer), i in drain(group, 180, 16):
            landed.setdefault(peer[:2], []).append(i)
        assert len(landed) == 90
        assert all(where == [steer.worker_for(peer, n)] * 2 for peer, where in landed.items())
        spread = Counter(where[0] for where in landed.values())
        assert len(spread) == n and min(spread.values()) >= 15  # every socket serves
    finally:
        for s in group + clients:
            s.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_record_with_a_connection_id_goes_to_the_worker_its_cid_names(host):
    """RFC 9146: the device's NAT may give it a new address at any time; its session is the
    worker's whose index its CID starts with (the CoAPS group's program), so every address lands
    there.  Other datagrams, and a CID naming no worker, are steered by address as before."""
    n = 3
    first = bind_udp(host, 0, reuse_port=True)
    port = first.getsockname()[1]
    group = [first] + [bind_udp(host, port, reuse_port=True) for _ in range(n - 1)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    clients = []
    expected: dict[bytes, int] = {}
    try:
        assert steer.attach(first, n, cid=True)
        for k in range(60):
            c = socket.socket(family, socket.SOCK_DGRAM)
            c.bind((host, 0))
            clients.append(c)
            worker = k % (n + 1)  # (n: a first byte that names no worker)
            header = bytes((25, 0xFE, 0xFD, 0, 1)) + k.to_bytes(6, "big")
            record = header + steer.cid_prefix(worker, n) + b"\x01\x02\x03\x04\x05" + b"\x00\x08" + bytes(8)
            plain = b"\x40\x02" + k.to_bytes(2, "big")
            c.sendto(record, (host, port))
            c.sendto(plain, (host, port))
            by_address = steer.worker_for(c.getsockname(), n)
            expected[record] = worker if worker < n else by_address
            expected[plain] = by_address
        landed = drain(group, len(expected), 64)
        assert {data: i for (data, _), i in landed} == expected
    finally:
        for s in group + clients:
            s.close()


def test_with_more_workers_than_one_byte_names_cid_records_are_steered_by_address():
    assert steer.cid_prefix(7, 255) == b"\x07" and steer.cid_prefix(7, 256) == b""
    assert steer.program(256, cid=True) == steer.program(256)
    assert len(steer.program(255, cid=True)) == len(steer.program(255)) + 5  # (the CID prelude)


def drain(group: list[socket.socket], n: int, size: int) -> list[tuple[tuple[bytes, tuple], int]]:
    """The first `n` datagrams the sockets of `group` receive, each with its socket's index: read
    until all came (60 s at most, only to notice one lost), not after a pause sized for an idle machine."""
    got: list[tuple[tuple[bytes, tuple], int]] = []
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        ready, _, _ = select.select(group, [], [], 1.0)
        for s in ready:
            got.append((s.recvfrom(size), group.index(s)))
    return got


def test_the_model_reads_v4_mapped_addresses_as_ipv4():
    assert steer.worker_for(("::ffff:10.1.2.3", 5683, 0, 0), 7) == steer.worker_for(("10.1.2.3", 5683), 7)


def port_for(worker: int, n: int, family=socket.AF_INET) -> socket.socket:
    """A client socket on loopback whose datagrams the server gives to `worker`."""
    while True:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        if steer.worker_for(s.getsockname(), n) == worker:
            return s
        s.close()


# -- pieces of the front, alone ------------------------------------------------------------------
def test_samples_travel_as_json_and_add_up_histograms_included():
    h = Histogram("corem_sink_batch_size", (1.0, 10.0), [1, 2, 3], 40.0)
    one = gather([(_Fixed([Sample("corem_coap_requests", 5, (("code", "2.04"),)), h]), {"transport": "udp"})])
    two = gather([(_Fixed([Sample("corem_coap_requests", 7, (("code", "2.04"),)), h]), {"transport": "udp"})])
    sources = [decode_samples(encode_samples(one)), decode_samples(encode_samples(two))]
    merged = gather([(_Fixed(list(merge_shared(sources))), {})])
    assert merged["corem_coap_requests"] == {(("transport", "udp"), ("code", "2.04")): 12.0}
    [hist] = merged["corem_sink_batch_size"].values()
    assert isinstance(hist, Histogram) and hist.counts == [2, 4, 6] and hist.total == 80.0


def test_the_registry_size_is_counted_once_not_per_worker():
    a = [Sample("corem_registry_devices", 100), Sample("corem_coap_requests", 1)]
    b = [Sample("corem_registry_devices", 100), Sample("corem_coap_requests", 2)]
    merged = gather([(_Fixed(list(merge_shared([a, b]))), {})])
    assert merged["corem_registry_devices"] == {(): 100.0} and merged["corem_coap_requests"] == {(): 3.0}


def test_status_of_the_workers_merges_into_one():
    def part(points, devices, live, failed):
        return {"points": points, "rejections": 0, "auth_failures": 1, "bus_refusals": 0, "requests": points,
                "online": len(devices), "samples": 0, "registered": 5, "bus": {"name": "embedded", "pending": 1,
                                                                                  "error": None},
                "devices": devices, "dtls": {"live": live, "offloaded": 0, "handshaking": 0, "completed": live,
                                             "failed": failed}}
    merged = merge_status([part(3, [{"device": "a", "last_seen": 5}], 1, {"bad_mac": 1}),
                           part(4, [{"device": "b", "last_seen": 9}], 2, {"bad_mac": 2, "timeout": 1})])
    assert merged["points"] == 7 and merged["auth_failures"] == 2 and merged["registered"] == 5
    assert [d["device"] for d in merged["devices"]] == ["b", "a"] and merged["bus"]["pending"] == 2
    assert merged["dtls"] == {"live": 3, "offloaded": 0, "handshaking": 0, "completed": 3,
                              "failed": {"bad_mac": 3, "timeout": 1}}
    assert merged["workers"] == 2


class _Fixed:
    def __init__(self, samples):
        self.samples = samples

    def metrics(self):
        return self.samples


def test_writers_sharing_the_embedded_bus_keep_one_sequence_of_offsets(tmp_path):
    """Two workers' buses on one file: offsets are taken at commit, so none repeats or is skipped."""
    buses = [EmbeddedBus(tmp_path / "bus.db", synchronous="NORMAL", shared=True) for _ in range(2)]
    for b in buses:
        b.open()
    for i in range(10):
        bus = buses[i % 2]
        rows = bus.prepare([Record(f"telemetry.raw.t{i % 3}", b"d", b"v%d" % i, {}) for _ in range(1 + i % 4)])
        bus.write_prepared(rows)
    for b in buses:
        b.close_sync()
    offsets = [r.offset for r in read_records(tmp_path / "bus.db")]
    assert offsets == list(range(1, 1 + sum(1 + i % 4 for i in range(10))))


# -- real processes ----------------------------------------------------------------------------
def worker_pids(server) -> dict[int, int]:
    """Each worker's latest pid, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) ready \(pid (\d+)\)", server.stderr())}


@pytest.fixture
def workers(data_dir):
    server = start_corem(data_dir, "--workers", "2")
    yield server
    server.stop()


def test_two_workers_serve_one_port_and_keep_each_peer(workers):
    devices = [port_for(i % 2, 2) for i in range(16)]
    try:
        for rnd in range(2):
            for i, s in enumerate(devices):
                answer = post(workers.coap_port, "T0KEN-1", cbor2.dumps({"n": i, "round": rnd}), 100 * rnd + i, sock=s)
                assert answer is not None and answer[1] == 0x44  # 2.04
        m = workers.metrics()
        # each worker served exactly its peers' requests, both rounds: no peer moved
        assert m['corem_worker_requests{worker="0"}'] == 16 and m['corem_worker_requests{worker="1"}'] == 16
        assert m['corem_coap_requests_total{transport="udp"}'] == 32
        assert m["corem_registry_devices"] == 2  # the shared registry, counted once
        assert m["corem_workers"] == 2 and m["corem_worker_restarts_total"] == 0
        points = workers.points("acme")
        assert sorted((p["numeric_values"]["round"], p["numeric_values"]["n"]) for p in points) == [
            (r, n) for r in (0.0, 1.0) for n in map(float, range(16))]
        offsets = [r.offset for r in read_records(workers.data_dir / "bus.db", "telemetry.raw.")]
        assert len(offsets) == 32 and len(set(offsets)) == 32  # one log, no offset given twice
        status, body = workers.api("GET", "/api/status")
        assert status == 200 and body["workers"] == 2 and body["points"] == 32
        # a rejected sample on each worker: the front merges their lists (it read them as dicts: a 500)
        for i in (0, 1):
            answer = post(workers.coap_port, "T0KEN-1", b"\xff", 900 + i, sock=devices[i])
            assert answer is not None and answer[1] == 0x80  # 4.00
        status, samples = workers.api("GET", "/api/diagnostics/samples?limit=5")
        assert status == 200 and len(samples) == 2 and samples[0]["at"] >= samples[1]["at"]
        assert workers.api("GET", "/api/diagnostics/samples?limit=x")[1]["error"] == "limit: not an integer"
    finally:
        for s in devices:
            s.close()


def test_a_device_added_through_the_api_is_known_to_every_worker_at_once(workers):
    status, _ = workers.api("POST", "/api/devices", {"tenant": "acme", "device": "new-1", "token": "NEW-TOKEN"})
    assert status == 201
    for w in (0, 1):  # straight away, on both: the front reloads every worker before it answers
        s = port_for(w, 2)
        try:
            # (a worker that did not know the token would answer 4.01: the bound only waits out a busy machine)
            answer = post(workers.coap_port, "NEW-TOKEN", cbor2.dumps({"w": w}), 7, sock=s, timeout=30)
            assert answer is not None and answer[1] == 0x44
        finally:
            s.close()


def test_a_killed_worker_is_started_again_and_no_acknowledged_reading_is_lost(workers):
    devices = [port_for(i % 2, 2) for i in range(8)]
    acked: list[tuple[int, int]] = []
    stop = threading.Event()

    def device(i: int, s: socket.socket) -> None:
        n = 0
        while not stop.is_set() and n < 40:
            # (waits out worker 1's restart, which a busy machine can make take many seconds)
            answer = post(workers.coap_port, "T0KEN-1", cbor2.dumps({"d": i, "n": n}), 1000 + n, sock=s, timeout=90)
            if answer is not None and answer[1] == 0x44:
                acked.append((i, n))
            n += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=device, args=(i, s)) for i, s in enumerate(devices)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(acked) >= 40, what="readings before the kill")
        victim = worker_pids(workers)[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker_pids(workers).get(1) not in (None, victim), what="worker 1 started again")
        for t in threads:
            t.join(300)
        assert len(acked) == 8 * 40  # every device got every answer: the restarted worker took them up
        stored = {(int(p["numeric_values"]["d"]), int(p["numeric_values"]["n"])) for p in workers.points("acme")}
        assert set(acked) <= stored  # no reading answered 2.04 is missing
        m = workers.metrics()
        assert m["corem_worker_restarts_total"] == 1 and m["corem_workers"] == 2
        assert "worker 1 exited (signal 9)" in workers.stderr()
    finally:
        stop.set()
        for s in devices:
            s.close()


@pytest.fixture(params=["corem"])  # (the deprecated mbedtls engine: test_replay's worker case)
def dtls_workers(data_dir, request):
    """`corem serve --workers 2` on each DTLS engine (dtls_engine)"""
    server = start_corem(data_dir, "--workers", "2", "--dtls-engine", request.param)
    yield server
    server.stop()


def test_a_stuck_worker_is_down_in_the_metrics_and_not_ready_and_holds_neither(workers):
    """A worker that stops answering (a wedged loop, a stopped process) made /metrics and /readyz
    wait 90 s for it, showed it up, and dropped its counters from the sums (an adversarial run);
    each worker now has GATHER_TIMEOUT to answer: the stuck one is down, its counters its last ones,
    and /readyz says not ready."""
    for n in range(4):
        assert post(workers.coap_port, "T0KEN-1", cbor2.dumps({"n": n}), 700 + n)[1] == 0x44
    before = workers.metrics()
    victim = worker_pids(workers)[1]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_for(lambda: (proc_stat(f"/proc/{victim}/stat") or ["?"])[0] in ("T", "t"), what="worker 1 stopped")
        after = workers.metrics()  # (answers: the front's gathering gives the worker 5 s)
        # (the stopped one is down; the other's own up depends on its answer in 5 s: not asserted)
        assert after['corem_worker_up{worker="1"}'] == 0
        assert after['corem_coap_requests_total{transport="udp"}'] >= before['corem_coap_requests_total{transport="udp"}']
        status, body = workers.readyz()
        assert status == 503 and b"workers not ready" in body, body
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_for(lambda: workers.metrics()['corem_worker_up{worker="1"}'] == 1, what="worker 1 answering again")


def test_the_openapi_document_is_served_through_the_front(workers):
    """It was a 500 with workers (an internal route without a document had joined the list)"""
    with urllib.request.urlopen(f"http://127.0.0.1:{workers.http_port}/api/openapi.json", timeout=30) as r:
        doc = json.loads(r.read())
    assert r.status == 200 and "/api/devices" in doc["paths"] and not any("_worker" in p for p in doc["paths"])


def test_a_dtls_session_on_a_killed_worker_goes_on_without_a_handshake(dtls_workers):
    from .dtls_udp_client import DtlsUdpClient

    workers = dtls_workers

    probe = port_for(1, 2)
    source = probe.getsockname()[1]
    probe.close()
    client = DtlsUdpClient(workers.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode(), source_port=source)
    try:
        client.handshake()
        assert client.post(["telemetry"], cbor2.dumps({"seq": 1})).code == 68
        wait_for(lambda: workers.metrics()["corem_dtls_sessions_checkpointed_total"] >= 1, what="a checkpoint")
        assert client.post(["telemetry"], cbor2.dumps({"seq": 2})).code == 68  # after it: newer numbers
        victim = worker_pids(workers)[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker_pids(workers).get(1) not in (None, victim), what="worker 1 started again")
        # the same session, restored from the store by the new process: we can read its answers
        assert client.post(["telemetry"], cbor2.dumps({"seq": 3})).code == 68
        assert client.post(["telemetry"], cbor2.dumps({"seq": 4})).code == 68
        m = workers.metrics()
        assert m["corem_dtls_handshakes_completed_total"] == 0  # (the dead worker's one is gone with it)
        assert m["corem_dtls_sessions_restored_total"] == 1
        assert sorted(p["numeric_values"]["seq"] for p in workers.points("acme")) == [1.0, 2.0, 3.0, 4.0]
    finally:
        client.close()


@needs_libcoap
@pytest.mark.parametrize("binary", DTLS_CLIENTS)
def test_libcoap_dtls_devices_keep_their_session_across_a_killed_worker(dtls_workers, tmp_path, binary):
    """coap-client with -G: one DTLS session, a reading a second; its worker is killed midway."""
    workers = dtls_workers
    payload = tmp_path / "r.cbor"
    payload.write_bytes(cbor2.dumps({"t": 21.5}))
    probe = port_for(1, 2)
    source = probe.getsockname()[1]
    probe.close()
    device = subprocess.Popen(
        [binary, "-v", "6", "-B", "120", "-G", "8", "-p", str(source), "-u", SPEC_IDENTITY, "-k", SPEC_KEY,
         "-m", "post", "-t", "60", "-f", str(payload), f"coaps://127.0.0.1:{workers.coaps_port}/telemetry"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(workers.points("acme")) >= 3 and workers.metrics()[
            "corem_dtls_sessions_checkpointed_total"] >= 1, what="readings and a checkpoint")
        victim = worker_pids(workers)[1]
        os.kill(victim, signal.SIGKILL)
        out, _ = device.communicate(timeout=180)
    finally:
        if device.poll() is None:
            device.kill()
    assert len(re.findall(r"c:2\.04", out)) == 8, out[-2000:]
    assert len(workers.points("acme")) == 8
    m = workers.metrics()
    assert m["corem_dtls_handshakes_completed_total"] == 0 and m["corem_dtls_sessions_restored_total"] == 1


@needs_libcoap
def test_downlink_reaches_the_worker_that_holds_the_device(workers):
    """A device observing its attributes and RPCs from a peer on worker 1; the API call goes in at
    the one admin port; the device answers the RPC from a new port (another worker)."""
    probe = port_for(1, 2)
    source = probe.getsockname()[1]
    probe.close()
    base = f"{workers.coap}/api/v1/T0KEN-1"
    observer = subprocess.Popen([COAP_CLIENT, "-s", "90", "-p", str(source), "-m", "get", f"{base}/rpc"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: sum(v for k, v in workers.metrics().items()
                             if k.startswith("corem_coap_observers{")) >= 1, what="the observation")
        result = {}
        caller = threading.Thread(target=lambda: result.update(r=workers.api(
            "POST", "/api/devices/acme/sensor-1/rpc", {"method": "reboot", "timeout": 60}, timeout=120)))
        caller.start()
        wait_for(lambda: workers.metrics().get("corem_downlink_rpc_delivered_total", 0) >= 1, what="delivery")
        out = read_until(observer, '"method":"reboot"')
        rpc_id = int(re.search(r'\{"id":(\d+),"method":"reboot"', out).group(1))
        assert (rpc_id - 1) % 2 == 1  # numbered by worker 1, which holds the device
        for w in (0, 1):  # answered from the other worker's side, then its own: both reach worker 1
            replier = port_for(1 - w, 2) if w == 0 else port_for(1, 2)
            port = replier.getsockname()[1]
            replier.close()
            reply = subprocess.run([COAP_CLIENT, "-v", "6", "-B", "30", "-p", str(port), "-m", "post", "-t", "50",
                                    "-e", '{"ok":true}', f"{base}/rpc/{rpc_id}"], capture_output=True, text=True)
            assert reply.returncode == 0
            # (the other worker's side answered 2.04 unchecked; now as one process would:
            # 2.04 for the waiting RPC, then 4.04 -- it is answered already)
            assert re.findall(r"c:(\d\.\d\d)", reply.stdout + reply.stderr)[-1] == ("2.04" if w == 0 else "4.04")
            if w == 0:
                caller.join(120)
                assert result["r"] == (200, {"id": rpc_id, "status": "replied", "response": {"ok": True}})
    finally:
        if observer.poll() is None:
            observer.kill()


@needs_libcoap
def test_a_reply_to_an_rpc_that_does_not_exist_is_4_04_from_either_workers_side(workers):
    """Found by an adversarial run: with --workers, a reply to an id of the other
    worker's range was answered 2.04 before anyone checked the RPC existed. Now the worker asks the
    RPC's worker and answers what it says: 4.04 for ids never sent, from either side, as with one
    process."""
    base = f"{workers.coap}/api/v1/T0KEN-1"
    for w in (0, 1):
        probe = port_for(w, 2)
        port = probe.getsockname()[1]
        probe.close()
        for rpc_id in (1, 2, 1001, 1002):  # (both workers' ranges: odd ids worker 0's, even worker 1's)
            got = coap_client(f"{base}/rpc/{rpc_id}", "-p", str(port), "-m", "post", "-t", "50", "-e", '{"ok":1}')
            assert got.code == "4.04", (w, rpc_id, got.output[-500:])


def test_sigterm_stops_every_worker_and_the_supervisor(data_dir):
    server = start_corem(data_dir, "--workers", "2")
    pids = wait_for(lambda: len(worker_pids(server)) == 2 and worker_pids(server), what="two workers")
    assert server.stop() == 0
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert "level=info logger=corem.serve msg=stopped" in server.stderr()  # (the supervisor's, the last)


@needs_libcoap
def test_an_rpc_for_a_device_no_worker_has_heard_waits_for_one_to_hear_it(workers):
    base = f"{workers.coap}/api/v1/T0KEN-1"
    result = {}
    caller = threading.Thread(target=lambda: result.update(r=workers.api(
        "POST", "/api/devices/acme/sensor-1/rpc", {"method": "ping", "timeout": 60}, timeout=120)))
    caller.start()
    time.sleep(1.0)  # the call waits at the front: no worker has heard the device
    assert "r" not in result
    probe = port_for(1, 2)
    source = probe.getsockname()[1]
    probe.close()
    observer = subprocess.Popen([COAP_CLIENT, "-s", "90", "-p", str(source), "-m", "get", f"{base}/rpc"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = read_until(observer, '"method":"ping"')
        rpc_id = int(re.search(r'\{"id":(\d+),"method":"ping"', out).group(1))
        assert (rpc_id - 1) % 2 == 1  # sent by worker 1, which heard the device
        reply = subprocess.run([COAP_CLIENT, "-B", "30", "-m", "post", "-t", "50", "-e", '"pong"',
                                f"{base}/rpc/{rpc_id}"], capture_output=True, text=True)
        assert reply.returncode == 0
        caller.join(120)
        assert result["r"] == (200, {"id": rpc_id, "status": "replied", "response": "pong"})
    finally:
        if observer.poll() is None:
            observer.kill()


def test_an_rpc_for_a_silent_device_expires_after_its_own_timeout(workers):
    started = time.monotonic()
    status, body = workers.api("POST", "/api/devices/acme/sensor-1/rpc", {"method": "ping", "timeout": 10})
    assert status == 504 and body["status"] == "expired"
    # once, at the front; not again at the worker (that would take 2 x 10 s): 9 s to spare for a busy machine
    assert time.monotonic() - started < 19
    status, _ = workers.api("POST", "/api/devices/acme/sensor-1/rpc", {"method": "ping", "timeout": 1}, token="bad")
    assert status == 401  # an unauthenticated call is not held at the front


def test_a_setting_only_the_workers_check_stops_the_supervisor_with_one_line(tmp_path):
    """A cipher name the engine does not know stops the start with the reason and status 2, the
    workers not started again and again.  (Settings.check now finds it before any worker starts:
    the supervisor's own one line; a worker's refusal is what the last line says otherwise.)"""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "corem", "serve", "--data-dir", str(tmp_path / "d"),
                           "--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0",
                           "--workers", "2", "--dtls-ciphers", "NOPE"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - started < 60  # (not started again and again)
    assert "'NOPE' is not a cipher suite" in proc.stderr
    lines = proc.stderr.rstrip().splitlines()
    assert lines[-1] in ("corem: worker 0 refused the settings (status 2)",
                         "corem: worker 1 refused the settings (status 2)") or (
        len(lines) == 1 and lines[0].startswith("corem: dtls_ciphers: 'NOPE' is not a cipher suite"))


def test_corem_pure_python_reaches_the_workers_and_settings_do_not(monkeypatch):
    """COREM_PURE_PYTHON is no setting: the workers read it themselves, so it must not be stripped
    with the settings' variables (which reach them as COREM_WORKER_SETTINGS)"""
    from types import SimpleNamespace

    from corem.workers.supervisor import Supervisor

    monkeypatch.setenv("COREM_PURE_PYTHON", "1")
    monkeypatch.setenv("COREM_LOG_LEVEL", "debug")
    sup = SimpleNamespace(settings=None, _worker_settings=lambda settings: {"log_level": "info"})
    env = Supervisor._environment(sup, SimpleNamespace(dumps=lambda: "spec"))  # type: ignore[arg-type]
    assert env["COREM_PURE_PYTHON"] == "1" and "COREM_LOG_LEVEL" not in env
    assert json.loads(env["COREM_WORKER_SETTINGS"]) == {"log_level": "info"}
