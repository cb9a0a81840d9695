"""End to end: `corem serve` on loopback, libcoap's coap-client-notls as the device."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cbor2
import pytest

from .conftest import PIGGYBACKED, coap_client, corem_cli, needs_libcoap, post, start_corem, wait_for, write_cbor

pytestmark = [needs_libcoap]

READING = {"temperature": 22.5, "humidity": 65, "state": "running"}
REJECTIONS = 'corem_protocol_payload_rejections_total{protocol="coap",reason="decode_error"}'


def url(corem, token="T0KEN-1") -> str:
    return f"{corem.coap}/api/v1/{token}/telemetry"


def test_cbor_post_is_changed_and_stored(corem, tmp_path):
    f = write_cbor(tmp_path / "reading.cbor", READING)
    r = coap_client(url(corem), "-m", "post", "-t", "application/cbor", "-f", str(f))
    assert r.code == "2.04", r.output
    [point] = corem.points()
    assert (point["tenant"], point["device"], point["protocol"]) == ("acme", "sensor-1", "coap")
    assert point["numeric_values"] == {"temperature": 22.5, "humidity": 65.0}
    assert point["string_values"] == {"state": "running"}
    assert abs(point["received_at"] - time.time() * 1000) < 60_000 and point["ts"] == point["received_at"]
    assert corem.metrics()['corem_telemetry_points_total{tenant="acme"}'] == 1


def test_json_post_with_device_timestamp(corem, tmp_path):
    f = tmp_path / "reading.json"
    f.write_text('{"temperature": 21.0, "ts": 1700000000000}')
    r = coap_client(url(corem), "-m", "post", "-t", "application/json", "-f", str(f))
    assert r.code == "2.04", r.output
    [point] = corem.points("acme")
    assert point["ts"] == 1700000000000 and point["numeric_values"] == {"temperature": 21.0}


def test_bad_cbor_is_rejected_counted_kept_and_not_stored(corem, tmp_path):
    before = corem.metrics()[REJECTIONS]
    f = tmp_path / "bad.cbor"
    f.write_bytes(cbor2.dumps({"temperature": 22.5, "config": {"nested": 1}}))
    r = coap_client(url(corem), "-m", "post", "-t", "application/cbor", "-f", str(f))
    assert r.code == "4.00", r.output
    assert "config" in r.output and "nested map" in r.output  # the reason names the field
    f.write_bytes(b"\xa1\x61")  # truncated CBOR
    r = coap_client(url(corem), "-m", "post", "-t", "application/cbor", "-f", str(f))
    assert r.code == "4.00" and "invalid CBOR" in r.output, r.output
    metrics = corem.metrics()
    assert metrics[REJECTIONS] == before + 2
    assert metrics["corem_rejected_samples"] == 2
    assert corem.points() == []  # never a partial point


def test_unsupported_content_format_is_4_15(corem, tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("temperature=22.5")
    r = coap_client(url(corem), "-m", "post", "-t", "text/plain", "-f", str(f))
    assert r.code == "4.15", r.output
    assert corem.points() == []


def test_unknown_token_is_unauthorized_and_stores_nothing(corem, tmp_path):
    f = write_cbor(tmp_path / "reading.cbor", READING)
    r = coap_client(url(corem, "not-a-token"), "-m", "post", "-t", "application/cbor", "-f", str(f))
    assert r.code == "4.01", r.output
    assert corem.points() == []
    assert corem.metrics()['corem_auth_failures_total{protocol="coap",reason="unknown_token"}'] == 1


def test_unknown_path_and_method(corem):
    assert coap_client(f"{corem.coap}/nothing/here", "-m", "get").code == "4.04"
    assert coap_client(url(corem), "-m", "get").code == "4.05"
    assert coap_client(url(corem), "-m", "delete").code == "4.05"


def test_non_request_gets_non_response(corem, tmp_path):
    f = write_cbor(tmp_path / "reading.cbor", READING)
    r = coap_client(url(corem), "-N", "-m", "post", "-t", "application/cbor", "-f", str(f), timeout=30)
    assert "t:NON c:2.04" in r.output, r.output
    assert len(corem.points()) == 1


def test_devices_added_and_removed_while_running(corem, tmp_path):
    f = write_cbor(tmp_path / "reading.cbor", READING)
    corem_cli("devices", "add", "--tenant", "beta", "--device", "d2", "--token", "NEW-TOKEN", data_dir=corem.data_dir)
    deadline = time.monotonic() + 60  # (a bound for a busy machine: the loop ends at the first 2.04)
    while True:  # the server notices registry changes within REGISTRY_POLL
        r = coap_client(url(corem, "NEW-TOKEN"), "-m", "post", "-t", "application/cbor", "-f", str(f))
        if r.code == "2.04" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.code == "2.04", r.output
    assert [p["device"] for p in corem.points("beta")] == ["d2"]
    corem_cli("devices", "remove", "--tenant", "beta", "--device", "d2", data_dir=corem.data_dir)
    deadline = time.monotonic() + 60
    while True:
        r = coap_client(url(corem, "NEW-TOKEN"), "-m", "post", "-t", "application/cbor", "-f", str(f))
        if r.code == "4.01" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.code == "4.01"


def test_lossy_client_gets_exactly_one_point_per_reading(corem, tmp_path):
    """coap-client drops half of what it sends (-l 50%) and retransmits: every reading it saw
    acknowledged is stored exactly once, and no reading is ever stored twice."""
    n = 8

    def send(i: int):
        f = write_cbor(tmp_path / f"r{i}.cbor", {"seq": i, "temperature": 20 + i})
        # -B 20: a client whose every transmission is lost gives up after 20 s (4 tries at ACK_TIMEOUT
        # 2-3 s, doubling; all four lost: 1 in 16), not libcoap's default 90
        return i, coap_client(url(corem), "-l", "50%", "-m", "post", "-t", "application/cbor", "-f", str(f),
                              timeout=20)

    with ThreadPoolExecutor(n) as pool:
        results = dict(pool.map(send, range(n)))
    acked = {i for i, r in results.items() if r.code == "2.04"}
    assert len(acked) >= n // 2, {i: r.output[-300:] for i, r in results.items()}
    seqs = [int(p["numeric_values"]["seq"]) for p in corem.points()]
    assert len(seqs) == len(set(seqs)), f"a reading was stored twice: {sorted(seqs)}"
    assert acked <= set(seqs)


class DropFirstResponses:
    """A loopback UDP relay between one client and corem that drops the first `drop` answers
    coming back from corem (datagrams with a code): the client must retransmit and corem must
    deduplicate."""

    def __init__(self, server_port: int, drop: int) -> None:
        self.server = ("127.0.0.1", server_port)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.drop = drop
        self.dropped = 0
        self.client = None
        self._stop = False
        self._threads = [threading.Thread(target=self._up, daemon=True), threading.Thread(target=self._down, daemon=True)]
        for t in self._threads:
            t.start()

    def _up(self):
        self.front.settimeout(0.2)
        while not self._stop:
            try:
                data, self.client = self.front.recvfrom(2048)
            except OSError:
                continue
            self.back.sendto(data, self.server)

    def _down(self):
        self.back.settimeout(0.2)
        while not self._stop:
            try:
                data, _ = self.back.recvfrom(2048)
            except OSError:
                continue
            if self.dropped < self.drop and len(data) > 1 and data[1] != 0:  # an answer, not an empty ACK
                self.dropped += 1
                continue
            if self.client:
                self.front.sendto(data, self.client)

    def close(self):
        self._stop = True
        for t in self._threads:
            t.join()
        self.front.close()
        self.back.close()


def test_lost_response_retransmission_is_deduplicated(data_dir, tmp_path):
    # (a piggyback timeout of 30 s: the answer always rides the ACK, the datagram the relay drops;
    # a loaded machine cannot turn it into an empty ACK and a separate response the client never
    # asks again for)
    corem = start_corem(data_dir, env=PIGGYBACKED)
    relay = DropFirstResponses(corem.coap_port, drop=1)
    try:
        f = write_cbor(tmp_path / "reading.cbor", READING)
        r = coap_client(
            f"coap://127.0.0.1:{relay.port}/api/v1/T0KEN-1/telemetry", "-m", "post", "-t", "application/cbor", "-f", str(f)
        )
        assert relay.dropped == 1
        assert r.code == "2.04", r.output
        assert len(corem.points()) == 1  # the retransmission was answered from the cache, not stored again
        # (one retransmission, or more when the answer to the first is slower than the client's next timeout)
        assert corem.metrics()['corem_coap_duplicates_total{transport="udp"}'] >= 1
    finally:
        relay.close()
        corem.stop()


class Devices:
    """Threads that each keep one CON POST in flight against corem and note every 2.04: sent as
    a device does (conftest.post: retransmitted, its answer piggybacked or separate -- a busy
    machine, or a broker's acknowledgement, can take longer than the piggyback timeout)."""

    def __init__(self, port: int, n: int = 4) -> None:
        self.port = port
        self.acked: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, k: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mid = k * 1000
        while not self._stop.is_set():
            mid += 1
            try:  # (5 s: a reading not answered by then is not counted; corem killed, the stop waits no longer)
                answer = post(self.port, "T0KEN-1", cbor2.dumps({"seq": mid}), mid & 0xFFFF, timeout=5, sock=sock)
            except OSError:
                continue
            if answer is not None and answer[1] == 0x44:
                self.acked.append(mid)
        sock.close()

    def stop(self) -> list[int]:
        self._stop.set()
        for t in self._threads:
            t.join()
        return self.acked


def test_sigterm_answers_and_keeps_every_acknowledged_reading(data_dir):
    """Devices keep sending while corem is stopped with SIGTERM: every reading answered 2.04 is
    in the store, and the process exits cleanly."""
    server = start_corem(data_dir)
    devices = Devices(server.coap_port)
    try:
        wait_for(lambda: len(devices.acked) >= 20, what="readings acknowledged before the stop")
    finally:
        code = server.stop()
        acked = devices.stop()
    assert code == 0, server.stderr()
    stored = {int(p["numeric_values"]["seq"]) for p in server.points()}
    assert acked, "no reading was acknowledged before the stop"
    assert set(acked) <= stored
    assert "stopped" in server.stderr()


def test_sigkill_under_load_loses_no_acknowledged_reading(data_dir):
    """corem killed outright (SIGKILL) while devices send: a 2.04 is only ever sent after the
    point's batch is committed, so every acknowledged reading is in the store after the crash."""
    import signal

    server = start_corem(data_dir)
    devices = Devices(server.coap_port)
    try:
        wait_for(lambda: len(devices.acked) > 150, what="load: readings acknowledged before the kill")
    finally:  # (failed or not: no load left behind for the next test)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(60)
        acked = devices.stop()
    stored = {int(p["numeric_values"]["seq"]) for p in server.points()}
    assert len(acked) > 100, "too little load to mean anything"
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged readings lost"
    # and corem starts again on the same data dir after the crash (the lock died with it)
    again = start_corem(data_dir)
    assert again.stop() == 0


def test_a_device_with_an_unknown_profile_does_not_hurt_the_others(tmp_path):
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "good", "--token", "GOOD", data_dir=data)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "odd", "--token", "ODD", "--profile", "nosuch",
              data_dir=data)
    server = start_corem(data)
    try:
        f = write_cbor(tmp_path / "r.cbor", READING)
        odd = coap_client(f"{server.coap}/api/v1/ODD/telemetry", "-m", "post", "-t", "60", "-f", str(f))
        assert odd.code == "5.00" and "nosuch" in odd.output, odd.output
        assert coap_client(f"{server.coap}/api/v1/GOOD/telemetry", "-m", "post", "-t", "60", "-f", str(f)).code == "2.04"
        assert [p["device"] for p in server.points()] == ["good"]
        assert server.metrics()['corem_protocol_payload_rejections_total{protocol="coap",reason="unknown_profile"}'] == 1
    finally:
        server.stop()


def test_reading_larger_than_a_datagram_arrives_block_wise(corem, tmp_path):
    """libcoap sends a 2.4 KB CBOR reading in 64-byte Block1 blocks: one point with every value."""
    reading = {f"sensor_{i:03d}": i * 1.5 for i in range(120)}
    f = write_cbor(tmp_path / "big.cbor", reading)
    r = coap_client(url(corem), "-b", "64", "-m", "post", "-t", "application/cbor", "-f", str(f))
    assert r.code == "2.04", r.output
    assert "Block1" in r.output  # it really went block-wise
    [point] = corem.points()
    assert point["numeric_values"] == reading


@pytest.mark.parametrize("path", [
    ".well-known/core?rt=%ff",
    "ps/room/t?c=c1&u=sensor-1&p=%c3",
    "v1/telemetry?application=%ff",
    "api/v1/T0KEN-1/attributes?clientKeys=%ff",
])
def test_a_query_that_is_not_utf8_is_4_00_naming_the_option(corem, path):
    """libcoap sends the raw byte for %ff: 4.00 `uri-query: not valid UTF-8`, counted, and no
    handler ever sees it (it used to be a 5.00 and a traceback per datagram)."""
    r = coap_client(f"{corem.coap}/{path}", "-m", "get", timeout=30)
    # (on plain CoAP the text is cut to the request's size; the option's name comes first)
    assert r.code == "4.00" and "4.00 uri-query: not valid" in r.output, r.output
    m = corem.metrics()
    assert m['corem_coap_invalid_text_options_total{transport="udp"}'] == 1
    assert m['corem_coap_handler_errors_total{transport="udp"}'] == 0


def test_a_request_for_a_proxy_is_5_05_and_nothing_is_stored(corem, tmp_path):
    """libcoap's client sent through corem as a proxy (-P): Proxy-Uri is a critical option corem
    does not implement (RFC 7252 §5.7.2), so the reading is refused, not stored as if the option
    were absent (the fast lane hands the request to the endpoint, which refuses it)."""
    f = write_cbor(tmp_path / "r.cbor", READING)
    r = coap_client("coap://example.org/api/v1/T0KEN-1/telemetry", "-P", corem.coap, "-m", "post",
                    "-t", "application/cbor", "-f", str(f), timeout=30)
    assert r.code == "5.05" and "Proxy-" in r.output, r.output
    assert corem.points() == []
    assert corem.metrics()['corem_coap_proxy_refused_total{transport="udp"}'] == 1
