"""CoAPS readings against the plain CoAP lane, in one corem: the yardstick of the CoAPS target
(>= 0.9x the plain lane) without the machine's drift between two servers.

    python bench/coaps_plain_pairs.py [--pairs 8] [--seconds 2] [--inflight 4] [--json]

dtls_bench.py pairs each CoAPS run with a plain run of another corem started just before it: on a
shared virtual machine the speed moves by more than the gap between the two within a minute (one
sitting's 25 such pairs spread 0.72-1.08x).  Here one corem (pinned to CPU 0; embedded bus, store
NORMAL, no rate limit, the fast lane) listens on CoAP and CoAPS at once, and the two loads take
turns against it, SECONDS each, PAIRS times, in the order plain-CoAPS then CoAPS-plain (ABBA: a
steady drift adds to either side alike): bench/loadgen.c with 64 devices x 4 CON in flight to
`/api/v1/{token}/telemetry`, and bench/dtls_loadgen.c with 64 DTLS-PSK sessions x 4 to `/telemetry`
(its records its own, phase 2 only), on CPU 1, the same CBOR reading.  Each pair's ratio is of two
runs seconds apart on the same process, the same bus file and the same heap; the result is their
median, with the spread.  A run's first 64 handshakes are in its seconds (~10 ms of 2 s); both loads
are warmed up once first.  (One thing the plain load pays here that a CoAP-only corem does not:
with a CoAPS listener the embedded bus has a carrier for the sessions' record marks, so every batch,
plain ones too, is written in a transaction of its own -- BEGIN, INSERT, COMMIT -- not one INSERT.
That is what `make run`'s corem, on both transports, does too.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import dtls_bench  # noqa: E402
from bench.load_bench import TOKEN, build_loadgen, free_port, pin, warn_freed_memory  # noqa: E402


def start(data: Path) -> tuple[subprocess.Popen, int, int]:
    """One corem on both transports (the plain device by token, the CoAPS one by PSK)."""
    for creds in (["--device", "plain", "--token", TOKEN],
                  ["--device", "coaps", "--psk-identity", dtls_bench.IDENTITY, "--psk", dtls_bench.KEY]):
        subprocess.run([sys.executable, "-m", "corem", "devices", "add", "--data-dir", str(data), "--tenant", "bench",
                        *creds], check=True, capture_output=True)
    coap, coaps = free_port(), dtls_bench.free_port_pair()
    proc = subprocess.Popen(
        [*pin(0), sys.executable, "-m", "corem", "serve", "--data-dir", str(data),
         "--coap", f"127.0.0.1:{coap}", "--coaps", f"127.0.0.1:{coaps}", "--http", "off",
         "--store-synchronous", "NORMAL", "--rate-limit-per-source", "0", "--fast-lane", "on",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
    )
    return proc, coap, coaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--inflight", type=int, default=4, help="requests in flight per device (64 devices)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warn_freed_memory()
    import cbor2

    payload = cbor2.dumps({"temperature": 22.5, "humidity": 65}).hex()
    plain_gen, dtls_gen = build_loadgen(), dtls_bench.build()

    def run(kind: str, port: int, seconds: float) -> dict:
        if kind == "plain":
            cmd = [*pin(1), str(plain_gen), "127.0.0.1", str(port), "64", str(args.inflight), str(seconds), "2",
                   f"api/v1/{TOKEN}/telemetry", payload, "60"]
        else:
            cmd = [*pin(1), str(dtls_gen), "127.0.0.1", str(port), "64", str(args.inflight), "0", str(seconds),
                   dtls_bench.IDENTITY, dtls_bench.KEY, "2", "telemetry", payload, "60", "0"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
        r = json.loads(out.stdout)
        if r["ok_2xx"] != r["answered"] or not r["answered"]:
            raise SystemExit(f"{kind}: not every answer was a 2.04: {r}")
        return r

    pairs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="corem-coaps-plain-") as tmp:
        proc, coap, coaps = start(Path(tmp) / "data")
        ports = {"plain": coap, "coaps": coaps}
        try:
            dtls_bench.wait_udp(coaps, timeout=60, dtls=True)
            for kind in ("plain", "coaps"):
                run(kind, ports[kind], 1.0)  # (warm-up)
            for k in range(args.pairs):
                order = ("plain", "coaps") if k % 2 == 0 else ("coaps", "plain")
                got = {kind: run(kind, ports[kind], args.seconds) for kind in order}
                ratio = got["coaps"]["rps"] / got["plain"]["rps"]
                pairs.append({"plain_rps": got["plain"]["rps"], "coaps_rps": got["coaps"]["rps"], "ratio": ratio,
                              "plain_p99_us": got["plain"]["p99_us"], "coaps_p99_us": got["coaps"]["p99_us"]})
                print(f"  pair {k + 1} ({order[0]} first): plain {got['plain']['rps']:,.0f}/s, "
                      f"CoAPS {got['coaps']['rps']:,.0f}/s: {ratio:.3f}", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(20)
    ratios = sorted(p["ratio"] for p in pairs)
    result = {"pairs": pairs, "median": dtls_bench.median(ratios), "min": ratios[0], "max": ratios[-1]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"CoAPS readings against the plain lane, one corem, 64 x {args.inflight} in flight, {len(pairs)} ABBA "
              f"pairs of {args.seconds:g} s: "
              f"median {result['median']:.3f}x (spread {result['min']:.3f}-{result['max']:.3f})")


if __name__ == "__main__":
    main()
