"""A live UDP attack on a running corem while real devices keep sending (loopback only, bounded).

    python bench/udp_fuzzer.py [--seconds 10] [--max-datagrams 2000000] [--json]

Starts corem in a temporary data dir (CoAP, CoAPS, HTTP on ports the OS picks), then for SECONDS:
- valid devices on 127.0.0.1 send confirmable CBOR POSTs (retransmitted like CoAP clients do) and
  record success and latency;
- attackers, each on its own loopback address (127.0.0.2 ...), send malformed CoAP, duplicated and
  reordered requests, random and truncated DTLS records, real ClientHellos from many source ports,
  oversized datagrams, and well-formed requests to the device-management doors with forged or junk
  credentials, bodies and options (observe floods, abandoned Block1 uploads, option 4209 garbage).
Reports datagrams sent by kind, what corem counted, the devices' success rate and latency, and
corem's RSS over the run.  `make soak` runs it for minutes; tests/test_attack.py runs it briefly.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import cbor2  # noqa: E402

from corem.codec import Code, Message, OptionNumber as O, Type, encode, make_options  # noqa: E402

TOKEN = "FUZZ-TOKEN"


def request(mid: int, token: str, payload: bytes, ctoken: bytes = b"") -> bytes:
    opts = make_options([(O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, token),
                         (O.URI_PATH, "telemetry"), (O.CONTENT_FORMAT, 60)])
    return encode(Message(Type.CON, Code.POST, mid, ctoken, opts, payload))


def door_request(rng: random.Random, mid: int) -> bytes:
    """A well-formed request to one of the peers' doors, with credentials and bodies that are wrong."""
    junk = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
    kind = rng.randrange(8)
    code, opts, payload = Code.POST, [], junk
    if kind == 0:  # ThingsBoard attributes / rpc with a forged token, some observing
        code = rng.choice((Code.GET, Code.POST))
        opts = [(O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, f"forged-{rng.randrange(10**6)}"),
                (O.URI_PATH, rng.choice(("attributes", "rpc", "claim", "firmware")))]
        if code == Code.GET:
            opts.append((O.OBSERVE, 0))
    elif kind == 1:  # observe floods on a real path (one per device: each replaces the one before)
        code = Code.GET
        opts = [(O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, TOKEN), (O.URI_PATH, "rpc"), (O.OBSERVE, 0)]
    elif kind == 2:  # provisioning with wrong secrets
        payload = json.dumps({"provisionDeviceKey": "k", "provisionDeviceSecret": junk.hex()}).encode()
        opts = [(O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, "provision"), (O.CONTENT_FORMAT, 50)]
    elif kind == 3:  # Drogue with garbage in option 4209
        opts = [(O.URI_PATH, "v1"), (O.URI_PATH, "telemetry"), (O.DROGUE_AUTH, b"Basic " + junk[:30]),
                (O.URI_QUERY, f"ct={rng.randrange(-5, 500)}")]
    elif kind == 4:  # EMQX with forged credentials
        code = rng.choice((Code.GET, Code.PUT, Code.POST, Code.DELETE))
        opts = [(O.URI_PATH, "ps"), (O.URI_PATH, "room"), (O.URI_PATH, "t"), (O.URI_QUERY, "c=x"),
                (O.URI_QUERY, f"u=d{rng.randrange(100)}"), (O.URI_QUERY, f"p={junk[:8].hex()}")]
    elif kind == 5:  # Block1 uploads started and abandoned
        opts = [(O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, TOKEN), (O.URI_PATH, "telemetry"),
                (O.CONTENT_FORMAT, 60), (O.BLOCK1, (rng.randrange(4) << 4) | 0x08 | 2), (O.REQUEST_TAG, junk[:4])]
        payload = bytes(64)
    elif kind == 6:  # OSCORE requests: kids nobody has, partial IVs replayed, ciphertext that is junk
        code = rng.choice((Code.POST, Code.FETCH))
        piv = bytes((rng.randrange(4),))
        opts = [(O.OSCORE, bytes((0x08 | len(piv),)) + piv + bytes((rng.randrange(4),)))]
    else:  # attribute bodies that are not what they claim
        opts = [(O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, TOKEN), (O.URI_PATH, "attributes"),
                (O.CONTENT_FORMAT, rng.choice((50, 60, 42)))]
    return encode(Message(Type.CON, code, mid, junk[:rng.randrange(0, 9)], make_options(opts), payload))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Device(threading.Thread):
    """A valid device: one CON POST at a time, ACK_TIMEOUT 1 s doubling, 4 retransmissions."""

    def __init__(self, port: int, k: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.k, self.stop_event = port, k, stop
        self.sent = self.ok = self.failed = 0
        self.latencies: list[float] = []

    def run(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        mid = self.k * 4000
        while not self.stop_event.is_set():
            mid = (mid + 1) & 0xFFFF
            ctoken = mid.to_bytes(2, "big")
            data = request(mid, TOKEN, cbor2.dumps({"seq": mid, "t": 21.5}), ctoken)
            self.sent += 1
            start = time.monotonic()
            timeout, answered = 1.0, False
            for _attempt in range(5):
                s.sendto(data, ("127.0.0.1", self.port))
                s.settimeout(timeout)
                end = time.monotonic() + timeout
                while time.monotonic() < end and not answered:
                    try:
                        reply, _ = s.recvfrom(2048)
                    except socket.timeout:
                        break
                    mtype = (reply[0] >> 4) & 3
                    if mtype == 2 and reply[2:4] == data[2:4] and reply[1] != 0:
                        answered = reply[1] == Code.CHANGED
                    elif mtype == 0 and reply[4:6] == ctoken:  # separate response: ACK it
                        s.sendto(bytes((0x60, 0, reply[2], reply[3])), ("127.0.0.1", self.port))
                        answered = reply[1] == Code.CHANGED
                if answered:
                    break
                timeout *= 2
            if answered:
                self.ok += 1
                self.latencies.append(time.monotonic() - start)
            else:
                self.failed += 1
        s.close()


def client_hello() -> bytes:
    from mbedtls import tls

    conf = tls.DTLSConfiguration(pre_shared_key=("nobody", b"0123456789ab"), ciphers=["TLS-PSK-WITH-AES-128-CCM-8"],
                                 validate_certificates=False)
    buf = tls.ClientContext(conf).wrap_buffers(None)
    for _ in range(3):
        try:
            buf.do_handshake()
        except (tls.WantReadError, tls.WantWriteError):
            pass
    return buf.peek_outgoing(4096)


class Attacker(threading.Thread):
    def __init__(self, kind: str, host: str, coap: int, coaps: int, stop: threading.Event, budget: int) -> None:
        super().__init__(daemon=True)
        self.kind, self.host, self.coap, self.coaps = kind, host, coap, coaps
        self.stop_event, self.budget = stop, budget
        self.sent = self.bytes = 0
        self.rng = random.Random(hash(kind) & 0xFFFF)

    def _socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((self.host, 0))
        s.setblocking(False)
        return s

    def _send(self, s: socket.socket, data: bytes, port: int) -> None:
        try:
            s.sendto(data, ("127.0.0.1", port))
        except OSError:
            return
        self.sent += 1
        self.bytes += len(data)

    def run(self) -> None:
        rng = self.rng
        s = self._socket()
        valid = request(1, "not-a-token", cbor2.dumps({"x": 1}))
        hello = client_hello() if self.kind == "client_hello" else b""
        captured = [request(rng.randrange(65536), "not-a-token", cbor2.dumps({"x": i})) for i in range(64)]
        while not self.stop_event.is_set() and self.sent < self.budget:
            if self.kind == "malformed_coap":
                if rng.random() < 0.5:
                    data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
                else:
                    b = bytearray(valid)
                    for _ in range(rng.randrange(1, 6)):
                        b[rng.randrange(len(b))] = rng.randrange(256)
                    data = bytes(b[: rng.randrange(1, len(b) + 1)])
                self._send(s, data, self.coap)
            elif self.kind == "duplicates":
                for data in rng.sample(captured, 8):  # out of order, each several times
                    for _ in range(rng.randrange(1, 4)):
                        self._send(s, data, self.coap)
            elif self.kind == "dtls_garbage":
                if rng.random() < 0.5:
                    body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
                    data = bytes((rng.choice((20, 21, 22, 23)), 0xFE, 0xFD)) + body
                else:
                    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                self._send(s, data, self.coaps)
            elif self.kind == "client_hello":  # many source ports: a fresh socket every 16 hellos
                s.close()
                s = self._socket()
                for _ in range(16):
                    self._send(s, hello, self.coaps)
            elif self.kind == "front_doors":
                self._send(s, door_request(rng, rng.randrange(65536)), self.coap)
            elif self.kind == "oversized":
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(1600, 9000)))
                self._send(s, data, rng.choice((self.coap, self.coaps)))
            time.sleep(0)  # let the other threads in
        s.close()


KINDS = ("malformed_coap", "duplicates", "dtls_garbage", "client_hello", "oversized", "front_doors")


def attack(server, seconds: float, max_datagrams: int, devices: int = 4) -> dict:
    """Run the attack against a started corem (tests.conftest.CoremProcess); return the report."""
    before_metrics = server.metrics()
    rss_start = rss_kib(server.proc.pid)
    stop = threading.Event()
    devs = [Device(server.coap_port, k, stop) for k in range(devices)]
    attackers = [Attacker(kind, f"127.0.0.{2 + i}", server.coap_port, server.coaps_port, stop,
                          max_datagrams // len(KINDS)) for i, kind in enumerate(KINDS)]
    for t in devs + attackers:
        t.start()
    rss_peak = rss_start
    timeline: list[tuple[int, int]] = []  # (seconds since start, RSS KiB), every tenth of the run
    start = time.monotonic()
    end = start + seconds
    next_sample = start
    while time.monotonic() < end:
        time.sleep(0.25)
        rss = rss_kib(server.proc.pid)
        rss_peak = max(rss_peak, rss)
        if time.monotonic() >= next_sample:
            timeline.append((round(time.monotonic() - start), rss))
            next_sample += max(1.0, seconds / 10)
    stop.set()
    for t in devs + attackers:
        t.join(30)
    after = server.metrics()
    lat = sorted(x for d in devs for x in d.latencies)
    counted = {k: after.get(k, 0) - before_metrics.get(k, 0) for k in after
               if any(w in k for w in ("format_errors", "oversized", "rate_limited_datagrams", "hello_verify",
                                        "handshakes_refused", "records_dropped", "duplicates", "auth_failures",
                                        "observe_refused", "observe_registrations", "provisioning", "uploads_refused", "handler_errors",
                                        "oscore_refused", "internal_errors"))}
    return {
        "seconds": seconds,
        "attack": {a.kind: {"datagrams": a.sent, "bytes": a.bytes} for a in attackers},
        "attack_datagrams": sum(a.sent for a in attackers),
        "devices": {"requests": sum(d.sent for d in devs), "ok": sum(d.ok for d in devs),
                    "failed": sum(d.failed for d in devs),
                    "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
                    "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None},
        "corem_counted": {k: v for k, v in counted.items() if v},
        "corem_alive": server.proc.poll() is None,
        "rss_kib": {"start": rss_start, "peak": rss_peak, "end": rss_kib(server.proc.pid), "timeline": timeline},
        "dedup_entries": after.get('corem_coap_dedup_entries{transport="udp"}'),
        "observers_after": sum(v for k, v in after.items() if k.startswith("corem_coap_observers")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-datagrams", type=int, default=2_000_000)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from tests.conftest import corem_cli, start_corem

    with tempfile.TemporaryDirectory(prefix="corem-fuzz-") as tmp:
        data = Path(tmp) / "data"
        corem_cli("devices", "add", "--tenant", "fuzz", "--device", "d1", "--token", TOKEN, data_dir=data)
        server = start_corem(data, "--log-level", "warning")
        try:
            report = attack(server, args.seconds, args.max_datagrams, args.devices)
        finally:
            server.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    d = report["devices"]
    print(f"attack: {report['attack_datagrams']:,} datagrams in {args.seconds:.0f} s "
          + ", ".join(f"{k} {v['datagrams']:,}" for k, v in report["attack"].items()))
    print(f"valid devices: {d['ok']}/{d['requests']} answered 2.04 "
          f"({100 * d['ok'] / max(1, d['requests']):.1f}%), p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms")
    print("corem counted: " + ", ".join(f"{k} +{v:,.0f}" for k, v in sorted(report["corem_counted"].items())))
    r = report["rss_kib"]
    print(f"corem alive: {report['corem_alive']}; RSS start {r['start'] / 1024:.1f} MiB, "
          f"peak {r['peak'] / 1024:.1f} MiB, end {r['end'] / 1024:.1f} MiB; dedup entries {report['dedup_entries']:,.0f}")
    print("RSS over time: " + ", ".join(f"{t}s {k / 1024:.0f}" for t, k in r["timeline"]) + " MiB")


if __name__ == "__main__":
    main()
