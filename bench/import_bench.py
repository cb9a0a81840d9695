"""Fleet onboarding: import 100,000 devices into a running server and measure the serving pause.

    python bench/import_bench.py [--devices N]

A probe sends a reading every 2 ms to the running server (plain CoAP, a device of its own) and
times each answer, while `corem devices import` registers N devices (tokens and PSKs) from a CSV.
Prints the import's wall time, and the probe's answer times before, during and after the import:
the server reads the changed rows from the registry's change log as each chunk lands (in a worker
thread, applied on the event loop 2,000 at a time), so the longest answer should stay near the
others (once, the whole registry was read again on the event loop: ~0.9 s for 100,000).
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load_bench import free_port, wait_udp  # noqa: E402

PY = sys.executable


def probe(port: int, stop: threading.Event, rtts: list[tuple[float, float]]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    payload = cbor2.dumps({"t": 1})
    opts = b"\xb3api\x02v1\x05PROBE\x09telemetry\x11\x3c"
    mid = 0
    while not stop.is_set():
        mid = (mid + 1) & 0xFFFF
        msg = struct.pack("!BBH", 0x40, 0x02, mid) + opts + b"\xff" + payload
        sent = time.perf_counter()
        sock.sendto(msg, ("127.0.0.1", port))
        try:
            while True:
                data, _ = sock.recvfrom(2048)
                if len(data) >= 4 and struct.unpack("!H", data[2:4])[0] == mid:
                    break
        except socket.timeout:
            rtts.append((sent, 2.0))
            continue
        rtts.append((sent, time.perf_counter() - sent))
        time.sleep(0.002)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="corem-import-") as tmp:
        data = Path(tmp) / "data"
        subprocess.run([PY, "-m", "corem", "devices", "add", "--tenant", "probe", "--device", "p", "--token", "PROBE",
                        "--data-dir", str(data)], check=True, capture_output=True)
        csv = Path(tmp) / "fleet.csv"
        with csv.open("w") as f:
            f.write("tenant,device,token,psk_identity,psk\n")
            for i in range(args.devices):
                f.write(f"fleet,dev-{i},tok-{i},id-{i},key-{i:08d}\n")
        port = free_port()
        server = subprocess.Popen([PY, "-m", "corem", "serve", "--data-dir", str(data), "--coap", f"127.0.0.1:{port}",
                                   "--coaps", "off", "--http", "off"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_udp(port)
            stop, rtts = threading.Event(), []
            t = threading.Thread(target=probe, args=(port, stop, rtts), daemon=True)
            t.start()
            time.sleep(1.0)
            began = time.perf_counter()
            out = subprocess.run([PY, "-m", "corem", "devices", "import", str(csv), "--data-dir", str(data)],
                                 check=True, capture_output=True, text=True).stdout.strip()
            ended = time.perf_counter()
            time.sleep(1.5)
            stop.set()
            t.join()
        finally:
            server.terminate()
            server.wait(10)

    def summary(rows: list[float]) -> str:
        rows = sorted(rows)
        return (f"{len(rows)} answers, median {rows[len(rows) // 2] * 1000:.2f} ms, "
                f"p99 {rows[int(len(rows) * 0.99)] * 1000:.2f} ms, max {rows[-1] * 1000:.2f} ms") if rows else "none"

    before = [r for s, r in rtts if s < began]
    during = [r for s, r in rtts if began <= s <= ended + 0.5]
    after = [r for s, r in rtts if s > ended + 0.5]
    print(f"{out} (the command's wall time: {ended - began:.1f} s, a nudge waiting for the reload included)")
    print(f"| probe answers | {summary(before)} (before) |")
    print(f"| probe answers | {summary(during)} (import and reload) |")
    print(f"| probe answers | {summary(after)} (after) |")


if __name__ == "__main__":
    main()
