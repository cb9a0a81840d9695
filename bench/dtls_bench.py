"""CoAPS: corem against libcoap's coap-server-openssl, and memory per DTLS session.

    python bench/dtls_bench.py [--seconds 5] [--handshake-seconds 3] [--handshakers 32] [--sessions 20000] [--json]
                               [--repeat N] [--only TEXT ...]   (only the targets named so; no memory measurement)

Throughput: bench/dtls_loadgen.c (OpenSSL, compiled here) does sequential full handshakes
(cookie exchange included) for HS seconds (the latency of one), then HANDSHAKERS clients
handshaking at once for HS seconds (what a server takes when a fleet reconnects), then drives 64
sessions x 4 confirmable POSTs in flight.
corem answers `POST /telemetry` (tenant and device from the PSK session, CBOR decode, group commit,
2.04 after commit, store NORMAL); libcoap answers PUT /example_data (payload kept in memory).
Servers are pinned to CPU 0, the generator to CPU 1.  libcoap runs under the same load right after
each corem run, and a row's ratios to libcoap are the medians of those pairs' (this machine's speed
drifts by up to 20% over minutes: a ratio is of two runs of the same minute; libcoap measured once at
the end put the drift into every ratio).  With --repeat N each corem row runs N times, each run
followed by libcoap's: the row is the median of its runs (each figure apart), libcoap's row the median
of all its runs.  Each corem run starts on a fresh copy of the provisioned data dir (no sessions nor
readings of the runs before it).  The row "corem plain CoAP (fast lane)" is
the same reading without DTLS (`POST /api/v1/{token}/telemetry`, bench/loadgen.c, 64 x 4): the
yardstick of issue 27 (CoAPS on corem's engine, whose records the lane opens and seals itself,
at >= 0.9x of it); each CoAPS row says its ratio to it -- corem's own row the median of its runs'
ratios to a plain run made just before each (paired, as libcoap's).  The row "corem
(dtls_busy_poll_us = 0)" is corem's own without its busy poll after a handshake flight
(corem/net/busypoll.py): what that poll is worth, which only the handshakes one at a time show.

Memory: a fresh process makes N sessions through DtlsServer with in-memory Mbed TLS clients
(each client freed after its handshake and one request) and reports the growth of its RSS per
session, once with every session live and once with every session offloaded (to the SQLite
session store in a temporary directory, as `corem serve` does in its data dir).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.load_bench import free_port, kafka_broker, kafka_vs_embedded, pin, wait_udp, warn_freed_memory  # noqa: E402
from bench.table import markdown  # noqa: E402

SRC = HERE / "dtls_loadgen.c"
BIN = HERE / "build" / "dtls_loadgen"
IDENTITY, KEY = "psk-identity-d7b1c0e2", "s3cr3t-pre-shared-key"


def build() -> Path:
    newest = max(SRC.stat().st_mtime, (HERE / "coap_template.h").stat().st_mtime)
    if not BIN.exists() or BIN.stat().st_mtime < newest:
        BIN.parent.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(BIN), str(SRC), "-lssl", "-lcrypto"], check=True)
    return BIN


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(n: int, mode: str, engine: str = "mbedtls") -> None:
    """Make n sessions (live or offloaded) and print the RSS growth per session."""
    from corem.dtls import DtlsParams, DtlsServer, PskStore, SessionStore
    from corem.dtls.layer import EngineServer
    from tests.test_dtls import DEVICE, IDENTITY, Client

    tmp = tempfile.mkdtemp(prefix="corem-dtls-mem-")
    store = SessionStore(Path(tmp) / "sessions.db")
    srv: DtlsServer | EngineServer
    if engine == "corem":
        srv = EngineServer({IDENTITY: DEVICE}.get, DtlsParams(offload_after=1.0, checkpoint=False),
                           state_key=os.urandom(32), store=store)
    else:
        srv = DtlsServer(PskStore({IDENTITY: DEVICE}.get), DtlsParams(offload_after=1.0), store=store)
    gc.collect()
    base = rss_bytes()
    for i in range(n):
        peer = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000 + i % 20000)
        c = Client(peer=peer)
        assert c.handshake(srv), f"handshake {i} failed"
        c.send(srv, b"\x40\x02\x00\x01x", now=0.0)
        srv.datagrams_to_send()
        del c
        if mode == "offloaded":
            srv.sweep(10.0)  # everything idle: serialize it
    gc.collect()
    grown = rss_bytes() - base
    blobs = srv.store.blob_sizes()
    print(json.dumps({
        "mode": mode if engine == "corem" else f"{mode} (dtls_engine = mbedtls)", "sessions": n,
        "live": len(srv.sessions), "offloaded": len(srv.offloaded),
        "rss_growth_bytes": grown, "bytes_per_session": round(grown / n),
        "mean_blob_bytes": round(sum(blobs) / len(blobs)) if blobs else None,
    }))


def memory(n: int, mode: str, engine: str = "corem") -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-worker", str(n), mode, engine],
                         capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


PLAIN = "corem plain CoAP (fast lane)"
LIBCOAP = "libcoap coap-server-openssl (C)"
MBEDTLS = "corem (dtls_engine = mbedtls, deprecated)"
#: corem's own row without the busy poll after a flight (net/busypoll.py): what it is worth
NO_BUSY_POLL = "corem (dtls_busy_poll_us = 0)"


def plain_lane(args, payload: str) -> dict:
    """corem's plain CoAP lane under the same load (64 devices x 4 in flight, the same payload)."""
    from bench.load_bench import TOKEN, build_loadgen, start_corem

    loadgen = build_loadgen()

    def load(port: int, seconds: float) -> dict:
        cmd = [*pin(1), str(loadgen), "127.0.0.1", str(port), "64", "4", str(seconds), "2",
               f"api/v1/{TOKEN}/telemetry", payload, "60"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
        return json.loads(out.stdout)

    with tempfile.TemporaryDirectory(prefix="corem-dtls-bench-plain-") as tmp:
        proc, port = start_corem("NORMAL")(Path(tmp))
        try:
            wait_udp(port)
            load(port, args.handshake_seconds)  # (a warm-up, as long as the CoAPS rows' handshakes)
            r = load(port, args.seconds)
        finally:
            proc.terminate()
            proc.wait(20)
    r.update(target=PLAIN, handshakes_per_s=0.0, concurrent_handshakes_per_s=0.0)
    print(f"  {PLAIN}: {r['rps']:.0f} req/s", file=sys.stderr)
    return r


#: the figures a row has of each run, and that its ratios to libcoap are of
FIGURES = ("handshakes_per_s", "concurrent_handshakes_per_s", "rps")


def median(values: list[float]) -> float:
    """The median (the lower of the two middle ones, as formats_load_bench)."""
    return sorted(values)[(len(values) - 1) // 2]


def median_row(runs: list[dict]) -> dict:
    """The run with the median requests/s (its latencies), each figure the median of the runs'."""
    row = dict(sorted(runs, key=lambda r: r["rps"])[(len(runs) - 1) // 2])
    row.update({f: median([r[f] for r in runs]) for f in FIGURES})
    return row


def ratios(r: dict, ref: dict) -> tuple[float, ...]:
    return tuple(r[f] / ref[f] if ref[f] else 0.0 for f in FIGURES)


def free_port_pair() -> int:
    """A free port whose one below is free too (libcoap serves CoAP on it, CoAPS on it + 1)."""
    while True:
        port = free_port()
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as below:
            below.bind(("127.0.0.1", port - 1))
            return port


def run_target(args, cmd: list[str], method: int, path: str, payload: str) -> dict:
    """One server started, the load generator's three phases against it, the server stopped.
    `{port}` in `cmd` is a port picked for this run, `{port-1}` the one below it (one picked for
    every run was taken once, by the time of the third, by another socket -- the load generator's
    handshakes go through thousands of ephemeral ports); a server that does not answer is shown
    with its log."""
    port = free_port_pair()
    cmd = [a.replace("{port-1}", str(port - 1)).replace("{port}", str(port)) for a in cmd]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        try:
            wait_udp(port, timeout=60, dtls=True)
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{e}: {' '.join(cmd)}\n{log.read().decode(errors='replace')[-2000:]}") from None
        out = subprocess.run(
            [*pin(1), str(BIN), "127.0.0.1", str(port), "64", "4", str(args.handshake_seconds), str(args.seconds),
             IDENTITY, KEY, str(method), path, payload, "60", str(args.handshakers)],
            capture_output=True, text=True, check=True, timeout=args.seconds + args.handshake_seconds + 60,
        )
        return json.loads(out.stdout)
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def say(args, name: str, r: dict) -> None:
    print(f"  {name}: {r['handshakes_per_s']:.0f} handshakes/s ({r['concurrent_handshakes_per_s']:.0f} "
          f"with {args.handshakers} at once), {r['rps']:.0f} req/s", file=sys.stderr)


def throughput(args) -> list[dict]:
    import cbor2

    payload = cbor2.dumps({"temperature": 22.5, "humidity": 65}).hex()
    results = []
    with tempfile.TemporaryDirectory(prefix="corem-dtls-bench-") as tmp, contextlib.ExitStack() as stack:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "corem", "devices", "add", "--data-dir", str(data), "--tenant", "bench",
                        "--device", "d1", "--psk-identity", IDENTITY, "--psk", KEY], check=True, capture_output=True)
        broker = kafka_broker()
        # (corem's own engine, the default, unless the row names the deprecated mbedtls one)
        buses = [("corem", "on", "embedded"), (NO_BUSY_POLL, "on", "embedded"),
                 ("corem (fast lane off)", "off", "embedded"), (MBEDTLS, "on", "embedded")]
        if broker is not None:
            stack.callback(broker.stop)
            kafka = f"kafka://{broker.bootstrap}"
            buses.insert(1, ("corem (bus Kafka: Tansu, acks=all, idempotent)", "on", kafka))
        targets = [
            (name, [*pin(0), sys.executable, "-m", "corem", "serve", "--data-dir", str(data), "--coap", "off",
                    "--coaps", "127.0.0.1:{port}", "--http", "off", "--store-synchronous", "NORMAL",
                    "--rate-limit-per-source", "0", "--fast-lane", lane, "--bus", bus,
                    "--dtls-engine", "mbedtls" if name == MBEDTLS else "corem",
                    "--dtls-busy-poll-us", "0" if name == NO_BUSY_POLL else "150",
                    "--log-level", "warning"], 2, "telemetry")
            for name, lane, bus in buses
        ]
        libcoap = None
        if shutil.which("coap-server-openssl"):
            # (libcoap serves CoAPS on its -p port + 1: `{port-1}`)
            libcoap = (LIBCOAP, [*pin(0), "coap-server-openssl", "-A", "127.0.0.1", "-p", "{port-1}", "-k", KEY],
                       3, "example_data")
        if args.only:
            targets = [t for t in targets if any(w in t[0] for w in args.only)]
            if libcoap is not None and not any(w in LIBCOAP for w in args.only):
                libcoap = None
        plains: list[dict] = []
        plain = not args.only or any(w in PLAIN for w in args.only)
        yards: list[dict] = []
        for name, cmd, method, path in targets:
            runs, pairs, to_plain = [], [], []
            for k in range(max(1, args.repeat)):
                if plain and (name == "corem" or not plains):
                    # the yardstick right before each run of corem's own row (the machine drifts
                    # by up to 20% over minutes: one plain run at the start put the drift into the
                    # ratio -- 0.92x once, where five alternating pairs gave 0.84-0.89x)
                    plains.append(plain_lane(args, payload))
                # each run a corem of its own on a fresh copy of the provisioned data dir: on the
                # one dir, a run started on the sessions and the bus of every run before it (its
                # start reads the last EXCHANGE_LIFETIME of the bus back), and its handshakes one
                # at a time -- the first phase, 1.5 s after the start -- fell from 2,869/s to 484/s
                # in three runs
                fresh = Path(tmp) / f"run-{len(yards)}-{k}"
                shutil.copytree(data, fresh)
                try:
                    runs.append(run_target(args, [str(fresh) if a == str(data) else a for a in cmd], method,
                                           path, payload))
                finally:
                    shutil.rmtree(fresh, ignore_errors=True)
                say(args, name, runs[-1])
                if plain and name == "corem":
                    to_plain.append(runs[-1]["rps"] / plains[-1]["rps"])
                if libcoap is not None:
                    # libcoap under the same load right after (the machine's speed drifts by 20%
                    # over minutes: a ratio is of two runs of the same minute)
                    yards.append(run_target(args, *libcoap[1:], payload))
                    say(args, libcoap[0], yards[-1])
                    pairs.append(ratios(runs[-1], yards[-1]))
            r = median_row(runs)
            r["target"] = name
            if to_plain:
                r["vs_plain"] = median(to_plain)
            if pairs:
                r["vs_libcoap"] = tuple(median([q[i] for q in pairs]) for i in range(len(FIGURES)))
            results.append(r)
        if plain and not plains:  # (--only plain)
            plains.append(plain_lane(args, payload))
        if plains:  # (the yardstick's row: the median of its runs, first)
            results.insert(0, {**median_row(plains), "target": PLAIN})
        if libcoap is not None and not yards:  # (libcoap alone: --only libcoap)
            yards = [run_target(args, *libcoap[1:], payload) for _ in range(max(1, args.repeat))]
            for y in yards:
                say(args, libcoap[0], y)
        if yards:  # (libcoap's row: the median of its runs beside corem's)
            results.append({**median_row(yards), "target": LIBCOAP, "vs_libcoap": (1.0, 1.0, 1.0)})
    kafka_vs_embedded(results, "corem", "corem (bus Kafka")
    return results


def vs_plain(r: dict, results: list[dict]) -> str:
    """corem's row: the median of its runs' ratios to the plain run just before each; the others
    against the plain row's median."""
    if "vs_plain" in r:
        return f"{r['vs_plain']:.2f}x (paired)"
    plain = next((p for p in results if p["target"] == PLAIN), None)
    if plain is None or r is plain or not plain["rps"]:
        return "-"
    return f"{r['rps'] / plain['rps']:.2f}x"


def vs_libcoap(r: dict) -> str:
    """The row's ratios to libcoap (handshakes one at a time / at once / requests), each the median
    of its runs' paired with the libcoap run right after each"""
    q = r.get("vs_libcoap")
    return "-" if q is None else " / ".join(f"{x:.2f}x" for x in q)


def main() -> None:
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--memory-worker":
        memory_worker(int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--handshake-seconds", type=float, default=3.0)
    ap.add_argument("--handshakers", type=int, default=32, help="clients handshaking at once (phase 1b)")
    ap.add_argument("--sessions", type=int, default=20000, help="sessions for the memory measurement")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="each corem row N times, each run followed by libcoap's: the medians")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the targets whose name contains TEXT (repeatable: e.g. --only "
                         "corem --only libcoap); skips the memory measurement")
    args = ap.parse_args()
    build()
    warn_freed_memory()
    results = throughput(args)
    if args.only:
        print(json.dumps(results, indent=2) if args.json else "\n".join(
            f"{r['target']}: {r['handshakes_per_s']:,.0f} handshakes/s one at a time, "
            f"{r.get('concurrent_handshakes_per_s', 0):,.0f} with {args.handshakers} at once, {r['rps']:,.0f} req/s"
            f" ({vs_plain(r, results)} of the plain lane; {vs_libcoap(r)} libcoap's, paired)" for r in results))
        return
    live = memory(min(args.sessions, 20000), "live")
    offloaded = memory(args.sessions, "offloaded")
    engine = [memory(min(args.sessions, 20000), "live", "mbedtls"), memory(args.sessions, "offloaded", "mbedtls")]
    if args.json:
        print(json.dumps({"throughput": results, "memory": [live, offloaded, *engine]}, indent=2))
        return
    print("\n" + markdown([
        ("target", lambda r: r["target"]), ("handshakes/s, one at a time", lambda r: f"{r['handshakes_per_s']:,.0f}"),
        (f"handshakes/s, {args.handshakers} at once", lambda r: f"{r.get('concurrent_handshakes_per_s', 0):,.0f}"),
        ("encrypted requests/s", lambda r: f"{r['rps']:,.0f}"), ("p50", lambda r: f"{r['p50_us'] / 1000:.2f} ms"),
        ("p99", lambda r: f"{r['p99_us'] / 1000:.2f} ms"),
        ("vs libcoap (hs / hs at once / req)", vs_libcoap),
        ("vs plain lane (req)", lambda r: vs_plain(r, results)),
    ], results))
    print("\n" + markdown([
        ("sessions", lambda m: f"{m['sessions']:,}"), ("state", lambda m: m["mode"]),
        ("RSS per session", lambda m: f"{m['bytes_per_session'] / 1024:.1f} KiB"),
        ("serialized size", lambda m: f"{m['mean_blob_bytes']} B" if m["mean_blob_bytes"] else "-"),
        ("1,000,000 sessions", lambda m: f"{m['bytes_per_session'] * 1e6 / 2**30:.2f} GiB"),
    ], (live, offloaded, *engine), text=(1,)))


if __name__ == "__main__":
    main()
