"""Issue 28's table: every built-in payload format under load, as CoAP CON, CoAP NON and CoAPS
(CON), beside libcoap's C servers, in one run.

    python bench/formats_load_bench.py [--seconds 4] [--only TEXT ...] [--repeat N] [--kafka]
                                       [--door thingsboard|drogue] [--json]

One corem (pinned to CPU 0; embedded bus, store NORMAL, no rate limit) holds one device per format,
each on the profile and with the payload of bench/formats_bench.py's CASES (the same reading in
every format that can carry it).  The C load generators run on CPU 1 with 64 devices x 4 requests
in flight: bench/loadgen.c (CON, or NON answered by a NON response matched by token) to
`/api/v1/{token}/telemetry`, and bench/dtls_loadgen.c (64 DTLS sessions, PSK, CON) to
`/telemetry`.  libcoap's coap-server-notls / coap-server-openssl answer PUT /example_data under
the same load (the payload kept in memory): the yardstick of each transport.

Each row runs against a corem of its own, started on a fresh copy of the provisioned data dir,
after a WARMUP-second run of the same load: the bus is empty at every row's start (one corem for
the whole table wrote several GB into one bus.db, and the later rows' p99 was that file's size,
not their format's).  A CoAP row's corem listens on CoAP only, as coap-server-notls does.

Each row: 2.xx/s, p50, p99, its ratio to libcoap's requests/s on the same transport and message
type -- libcoap run under the same load right after each corem run, the ratio the median of those
pairs' (this machine's speed drifts by up to 20% over minutes: a ratio is of two runs of the same
minute) --, and to the flat CBOR row of its column (issue 28's targets: >= 1.0x libcoap, >= 0.8x flat
CBOR, p99 <= 2x libcoap's).  A row whose answers are not all 2.xx says how many were not.  With --repeat N
each row (libcoap's too) is run N times, each against a fresh corem, and the run with the median
2.xx/s is the row: on a shared machine one run can fall on another's load.  With
--kafka, corem's bus is Kafka (Tansu on CPU 1, corem's producer acks=all and idempotent, as by
default) instead of the embedded one: 2.04 once the brokers acknowledged each reading; each corem run
has a fresh broker of its own (Tansu keeps its records in memory: one broker for the whole script
would grow past a 23 GB machine's RAM, and every row met a fuller broker than the one before).  With
--door drogue the same readings go through Drogue Cloud's door instead: `POST
/v1/telemetry?data_schema=bench` with the device's credentials in option 4209 (`Basic
base64(device@bench:token)`) over CoAP, `POST /v1/telemetry` (the session's device) over CoAPS.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.dtls_bench import KEY, median  # noqa: E402
from bench.dtls_bench import build as build_dtls_loadgen  # noqa: E402
from bench.formats_bench import CASES  # noqa: E402
from bench.load_bench import build_loadgen, free_port, kafka_broker, pin, wait_udp, warn_freed_memory  # noqa: E402
from bench.table import report  # noqa: E402

DEVICES, INFLIGHT = 64, 4
#: seconds of the same load before each row is measured (a fresh corem: its first batches)
WARMUP = 1.0
MODES = ("CoAP CON", "CoAP NON", "CoAPS CON")
LIBCOAP = "libcoap (C), PUT kept in memory"


def corem_cli(data: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "corem", *args, "--data-dir", str(data)], check=True, capture_output=True)


def provision(data: Path) -> list[tuple[str, str, str, int, bytes]]:
    """A profile and a device per case: (name, token, PSK identity, content format, payload)."""
    rows = []
    for i, (name, spec, cf, payload) in enumerate(CASES):
        profile = "default" if json.loads(spec) == {"format": "flat"} else f"p{i}"  # (the built-in one)
        if profile != "default":
            corem_cli(data, "profiles", "add", profile, "--json", spec)
        token, identity = f"FMT-{i}", f"fmt-{i}"
        corem_cli(data, "devices", "add", "--tenant", "bench", "--device", f"d{i}", "--token", token,
                  "--profile", profile, "--psk-identity", identity, "--psk", KEY)
        rows.append((name, token, identity, cf, payload))
    return rows


def udp_load(port: int, seconds: float, method: int, path: str, payload: bytes, cf: int, kind: str) -> dict:
    cmd = [*pin(1), str(build_loadgen()), "127.0.0.1", str(port), str(DEVICES), str(INFLIGHT), str(seconds),
           str(method), path, payload.hex(), str(cf), kind]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return json.loads(out.stdout)


def dtls_load(port: int, seconds: float, identity: str, method: int, path: str, payload: bytes, cf: int) -> dict:
    cmd = [*pin(1), str(build_dtls_loadgen()), "127.0.0.1", str(port), str(DEVICES), str(INFLIGHT), "0.5",
           str(seconds), identity, KEY, str(method), path, payload.hex(), str(cf)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return json.loads(out.stdout)


DOORS = ("thingsboard", "drogue")


def door_path(door: str, mode: str, token: str) -> str:
    """The path (bench/coap_template.h: `?query`, `#option=value`) of a reading through `door`."""
    if door == "drogue":
        if mode.startswith("CoAPS"):
            return "v1/telemetry"
        device = "d" + token.removeprefix("FMT-")  # (provision's names)
        basic = base64.b64encode(f"{device}@bench:{token}".encode()).decode()
        return f"v1/telemetry?data_schema=bench#4209=Basic {basic}"
    return "telemetry" if mode.startswith("CoAPS") else f"api/v1/{token}/telemetry"


def measure(mode: str, coap: int, coaps: int, seconds: float, token: str, identity: str, cf: int,
            payload: bytes, libcoap: bool = False, door: str = "thingsboard") -> dict:
    method = 3 if libcoap else 2
    path = "example_data" if libcoap else door_path(door, mode, token)
    if mode == "CoAPS CON":
        return dtls_load(coaps, seconds, identity, method, path, payload, cf)
    return udp_load(coap, seconds, method, path, payload, cf, "non" if mode == "CoAP NON" else "con")


def median_run(runs: list[dict]) -> dict:
    """The run with the median 2.xx/s (the lower of the two middle ones, as `median`)."""
    return sorted(runs, key=lambda r: r["ok_2xx"] / r["seconds"])[(len(runs) - 1) // 2]


def libcoap_run(mode: str, seconds: float, payload: bytes) -> dict | None:
    """One run of libcoap's server for `mode` (None: not installed)."""
    binary = "coap-server-openssl" if mode.startswith("CoAPS") else "coap-server-notls"
    if not shutil.which(binary):
        return None
    port = free_port()  # (libcoap serves CoAPS on its -p port + 1)
    args = ["-A", "127.0.0.1", "-p", str(port - 1 if mode.startswith("CoAPS") else port)]
    proc = subprocess.Popen([*pin(0), binary, *args, "-k", KEY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_udp(port, timeout=60, dtls=mode.startswith("CoAPS"))
        return measure(mode, port, port, seconds, "", "psk-identity", 60, payload, libcoap=True)
    finally:
        proc.terminate()
        proc.wait(20)


def rate(r: dict) -> float:
    return r["ok_2xx"] / r["seconds"]


def serve(data: Path, bus: str, dtls: bool) -> tuple[subprocess.Popen, int, int]:
    """One corem on `data`, pinned to CPU 0, once it answers: (process, CoAP port, CoAPS port).
    Its log (warnings and errors) goes to `data`'s side, `corem.log`: a corem that does not
    answer is said with the end of its log."""
    coap, coaps = free_port(), free_port()
    log = data.parent / "corem.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*pin(0), sys.executable, "-m", "corem", "serve", "--data-dir", str(data), "--coap", f"127.0.0.1:{coap}",
             "--coaps", f"127.0.0.1:{coaps}" if dtls else "off", "--http", "off", "--store-synchronous", "NORMAL",
             "--rate-limit-per-source", "0", "--log-level", "warning", "--bus", bus],
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_udp(coap, timeout=30)
    except BaseException as e:
        proc.kill()
        proc.wait(30)
        tail = log.read_text(errors="replace").splitlines()[-10:]
        raise RuntimeError(f"corem (exit {proc.returncode}) did not answer on udp {coap}; its log's end:\n"
                           + "\n".join(tail)) from e
    return proc, coap, coaps


def serve_again(template: Path, data: Path, bus: str, dtls: bool) -> tuple[subprocess.Popen, int, int]:
    """`serve` on a fresh copy of `template`, and once more if that corem does not answer (said,
    with its log's end): one failed start in a run of ~150 is not to lose the run."""
    shutil.copytree(template, data)
    try:
        return serve(data, bus, dtls)
    except RuntimeError as e:
        print(f"  (again: {e})", file=sys.stderr)
        shutil.rmtree(data)
    shutil.copytree(template, data)
    return serve(data, bus, dtls)


def fresh_broker():
    """A Tansu of its own for one corem run (load_bench.kafka_broker), or the script ends saying why."""
    broker = kafka_broker()
    if broker is None:
        sys.exit("formats_load_bench: --kafka needs Tansu (tests/kafka_broker.py): not installed here")
    return broker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--only", action="append", default=[], metavar="TEXT", help="only the formats named so")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, metavar="N", help="each row N times: the median by 2.xx/s")
    ap.add_argument("--kafka", action="store_true", help="corem's bus on Kafka (Tansu) instead of the embedded one")
    ap.add_argument("--door", choices=DOORS, default="thingsboard", help="the door the readings go through")
    args = ap.parse_args()
    warn_freed_memory()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="corem-formats-load-") as tmp:
        template = Path(tmp) / "template"
        cases = provision(template)
        if args.only:
            cases = [c for c in cases if any(w in c[0] for w in args.only)]
        yardsticks: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for name, token, identity, cf, payload in cases:
            for mode in MODES:
                runs, ratios = [], []
                for _ in range(max(1, args.repeat)):
                    data = Path(tmp) / "row"
                    with contextlib.ExitStack() as run:
                        # (a broker of its own a run: Tansu keeps every record in memory, ~440 B each,
                        # and a whole --repeat 3 run's ~60 million records would outgrow a 23 GB machine)
                        bus = "embedded"
                        if args.kafka:
                            broker = fresh_broker()
                            run.callback(broker.stop)
                            bus = f"kafka://{broker.bootstrap}"
                        proc, coap, coaps = serve_again(template, data, bus, mode.startswith("CoAPS"))
                        try:
                            measure(mode, coap, coaps, WARMUP, token, identity, cf, payload, door=args.door)
                            runs.append(measure(mode, coap, coaps, args.seconds, token, identity, cf, payload,
                                                door=args.door))
                        finally:
                            proc.terminate()
                            proc.wait(30)
                            shutil.rmtree(data)
                    # libcoap under the same load right after (the machine's speed drifts by 20%
                    # over minutes: a ratio is of two runs of the same minute)
                    yard = libcoap_run(mode, args.seconds, CASES[0][3])
                    if yard is not None and rate(yard):
                        yardsticks[mode].append(yard)
                        ratios.append(rate(runs[-1]) / rate(yard))
                r = median_run(runs)
                r.update(format=name, mode=mode, vs_libcoap=median(ratios) if ratios else None)
                print(f"  {name} / {mode}: {r['rps']:.0f}/s, p50 {r['p50_us'] / 1000:.2f} ms, "
                      f"p99 {r['p99_us'] / 1000:.2f} ms, vs libcoap {r['vs_libcoap'] or 0:.2f}x"
                      f" (libcoap {rate(yardsticks[mode][-1]) if yardsticks[mode] else 0:.0f}/s)", file=sys.stderr)
                results.append(r)
    for mode, yards in yardsticks.items():  # (libcoap's rows: the median of its runs beside corem's)
        if yards:
            results.append({**median_run(yards), "format": LIBCOAP, "mode": mode, "vs_libcoap": 1.0})
    flat = {r["mode"]: r for r in results if r["format"] == CASES[0][0]}

    def ratio(r: dict, to: dict) -> str:
        other = to.get(r["mode"])
        return f"{r['rps'] / other['rps']:.2f}x" if other and other["rps"] else "-"

    def vs_libcoap(r: dict) -> str:
        return "-" if r.get("vs_libcoap") is None else f"{r['vs_libcoap']:.2f}x"

    def not_ok(r: dict) -> str:
        bad = r["answered"] - r["ok_2xx"] + r.get("timeouts", 0)
        return str(bad) if bad else ""

    report(results, [
        ("payload (Content-Format)", lambda r: r["format"]), ("transport", lambda r: r["mode"]),
        ("2.xx/s", lambda r: f"{r['ok_2xx'] / r['seconds']:,.0f}"), ("p50", lambda r: f"{r['p50_us'] / 1000:.2f} ms"),
        ("p99", lambda r: f"{r['p99_us'] / 1000:.2f} ms"), ("vs libcoap", vs_libcoap),
        ("vs flat CBOR", lambda r: ratio(r, flat)), ("not 2.xx", not_ok),
    ], as_json=args.json, title=f"Every payload format under load ({DEVICES} devices x {INFLIGHT} in flight, "
                                 f"{args.seconds:g} s a row, bus {'Kafka (Tansu)' if args.kafka else 'embedded'}, "
                                 f"door {args.door})",
       text=(0, 1))


if __name__ == "__main__":
    main()
