"""The JavaScript engine of the `js` profile format, measured: QuickJS (quickjs-ng, what corem runs)
against V8 (mini-racer, what it ran before), each on the project's codec (tests/codecs/lht65.js) and
through corem's own wrapper path -- corem.profiles.js.JsCodec for QuickJS, and for V8 the wrapper
corem had (the payload as an array literal in one eval, JSON back, `timeout` and `max_memory`).

    python bench/js_engines_bench.py [--json]

Each engine runs in a child process of its own (RSS is the process's).  Rows:
  call         µs a decode (payload in, the point out), the best of 5 runs
  cold start   ms to make the process's first codec: a fresh context or isolate, the codec loaded
  next start   ms to make each of 50 more (a profile added, or a codec made anew after a limit)
  RSS/context  KB of RSS each of 50 more codecs costs (one per profile)
  installed    MB the engine's distribution puts on disk (its RECORD)
  loop stop    ms (wall) until `while (true) {}` is stopped at a 50 ms limit
  busy stop    ms (wall) until a loop of heavy built-in calls (`a.fill(1)` over 100,000 elements)
               is stopped at a 50 ms limit: QuickJS polls its interrupt handler every 10,000 or so
               operations, and a built-in call is one (corem's wrapper counts `fill`'s and the other
               whole-array / whole-text built-ins' work as operations: corem/profiles/js.py `counted`)
V8 is skipped when mini-racer is not installed (it is no longer a dependency: pip install mini-racer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import timeit
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.table import report  # noqa: E402

LHT65 = (ROOT / "tests" / "codecs" / "lht65.js").read_text()
PAYLOAD = bytes.fromhex("CBF60B0D0376010ADD7FFF")
NOW = 1_700_000_000_000
LOOP = "function decodeUplink(i) { while (true) {} }"
BUSY = "var a = new Array(1e5).fill(0); function decodeUplink(i) { while (true) a.fill(1); }"
ENGINES = {"quickjs": ("QuickJS (quickjs-ng)", "quickjs-ng"), "v8": ("V8 (mini-racer)", "mini-racer")}


class V8Codec:
    """corem's mini-racer path as it was (corem/profiles/js.py before QuickJS), for the comparison."""

    WRAPPER = """
;function __corem_decode(bytes, fPort, recvTime, variables) {
  var out = decodeUplink({bytes: bytes, fPort: fPort, recvTime: new Date(recvTime), variables: variables});
  return JSON.stringify(out === undefined ? null : out);
}
"""

    def __init__(self, script: str, *, timeout_ms: int = 50, max_memory_mb: int = 32) -> None:
        from py_mini_racer import MiniRacer

        self.timeout_ms, self.max_memory = timeout_ms, max_memory_mb << 20
        self.ctx = MiniRacer()
        self.ctx.eval(script + self.WRAPPER, timeout=1000, max_memory=self.max_memory)

    def __call__(self, content_format: int | None, payload: bytes, now_ms: int) -> list[dict]:
        text = self.ctx.eval(f"__corem_decode({list(payload)}, 1, {now_ms}, {{}})",
                             timeout=self.timeout_ms, max_memory=self.max_memory)
        return [json.loads(text)["data"]]


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def installed_mb(dist: str) -> float:
    files = metadata.distribution(dist).files or []
    return sum(f.locate().stat().st_size for f in files if f.locate().is_file()) / 1e6


def stop_ms(make, script: str) -> float:
    codec = make(script, timeout_ms=50)
    start = time.perf_counter()
    try:
        codec(42, b"\x01", NOW)
    except Exception:
        pass
    return (time.perf_counter() - start) * 1000


def one(engine: str) -> dict:
    """The measurements of one engine, in this (child) process."""
    if engine == "quickjs":
        from corem.profiles.js import JsCodec as make
    else:
        make = V8Codec
    base = rss_kb()
    start = time.perf_counter()
    first = make(LHT65)
    cold_ms = (time.perf_counter() - start) * 1000
    first(42, PAYLOAD, NOW)
    n = 1000 if engine == "v8" else 20_000
    call_us = min(timeit.repeat(lambda: first(42, PAYLOAD, NOW), number=n, repeat=5)) / n * 1e6
    before = rss_kb()
    start = time.perf_counter()
    more = [make(LHT65) for _ in range(50)]
    next_ms = (time.perf_counter() - start) * 1000 / len(more)
    for codec in more:
        codec(42, PAYLOAD, NOW)
    per_context_kb = (rss_kb() - before) / len(more)
    return {"engine": ENGINES[engine][0], "call_us": round(call_us, 1), "cold_start_ms": round(cold_ms, 2),
            "next_start_ms": round(next_ms, 2),
            "rss_first_kb": before - base, "rss_per_context_kb": round(per_context_kb),
            "installed_mb": round(installed_mb(ENGINES[engine][1]), 1),
            "loop_stop_ms": round(stop_ms(make, LOOP), 1), "busy_stop_ms": round(stop_ms(make, BUSY), 1)}


def main() -> None:
    rows = []
    for engine, (_, dist) in ENGINES.items():
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            print(f"({dist} is not installed: no {engine} row)", file=sys.stderr)
            continue
        out = subprocess.run([sys.executable, __file__, "--one", engine], capture_output=True, text=True,
                             check=True, timeout=600)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(rows, [
        ("engine", lambda r: r["engine"]), ("call", lambda r: f"{r['call_us']} µs"),
        ("cold start", lambda r: f"{r['cold_start_ms']} ms"),
        ("next start", lambda r: f"{r['next_start_ms']} ms"),
        ("RSS, first codec", lambda r: f"{r['rss_first_kb']} KB"),
        ("RSS/context", lambda r: f"{r['rss_per_context_kb']} KB"),
        ("installed", lambda r: f"{r['installed_mb']} MB"),
        ("loop stop (50 ms)", lambda r: f"{r['loop_stop_ms']} ms"),
        ("busy stop (50 ms)", lambda r: f"{r['busy_stop_ms']} ms"),
    ], as_json="--json" in sys.argv)


if __name__ == "__main__":
    if "--one" in sys.argv:
        print(json.dumps(one(sys.argv[sys.argv.index("--one") + 1])), flush=True)
        os._exit(0)  # (mini-racer's V8 thread can keep a process from exiting)
    main()
