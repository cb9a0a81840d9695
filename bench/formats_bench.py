"""Payload decode cost per profile format, the same reading in each, against the built-in flat map.

    python bench/formats_bench.py [--json]

The flat map is what the default profile decodes (in C on the fast lane; here the Python path's
decoder, which every other format runs beside).  Each row: ns per payload and its cost relative to
the flat map's.  Rules are measured separately (a profile with four of them on the same reading).
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path

import cbor2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.table import report  # noqa: E402
from corem.profiles.compile import compile_profile
from corem.profiles.proto_schema import message_class
from corem.profiles.spec import parse_profile

READING = {"temperature": 22.5, "humidity": 65, "state": "running"}
TS = 1_700_000_000_000
SENML = [{"bn": "dev/", "bt": TS / 1000, "n": "temperature", "u": "Cel", "v": 22.5},
         {"n": "humidity", "u": "%RH", "v": 65}, {"n": "state", "vs": "running"}]
SENML_CBOR = [{-2: "dev/", -3: TS / 1000, 0: "temperature", 1: "Cel", 2: 22.5}, {0: "humidity", 1: "%RH", 2: 65},
              {0: "state", 3: "running"}]
LHT65 = (Path(__file__).resolve().parent.parent / "tests" / "codecs" / "lht65.js").read_text()
RULES = ('{"format": "thingsboard", "fields": {"temperature": {"min": -40, "max": 85, "unit": "Cel"}, '
         '"humidity": {"scale": 1, "max": 100}, "state": {"allowed": ["idle", "running"]}, '
         '"rssi": {"required": false}}}')
PROTO = """syntax = "proto3";
message Values { double temperature = 1; int32 humidity = 2; string state = 3; }
message Reading { int64 ts = 1; Values values = 2; }
"""
PROTO_READING = message_class(PROTO, "Values")(**READING).SerializeToString()
PROTO_TS = message_class(PROTO)(ts=TS, values=READING).SerializeToString()

CASES = [
    ("flat map, CBOR (default)", '{"format": "flat"}', 60, cbor2.dumps(READING)),
    ("flat map, JSON (default)", '{"format": "flat"}', 50, json.dumps(READING).encode()),
    ("ThingsBoard {ts, values}, CBOR", '{"format": "thingsboard"}', 60, cbor2.dumps({"ts": TS, "values": READING})),
    ("ThingsBoard {ts, values}, JSON", '{"format": "thingsboard"}', 50,
     json.dumps({"ts": TS, "values": READING}).encode()),
    ("ThingsBoard array of 10, JSON", '{"format": "thingsboard"}', 50,
     json.dumps([{"ts": TS + i, "values": READING} for i in range(10)]).encode()),
    ("ThingsBoard nested, flattened, JSON", '{"format": "thingsboard", "nested": "flatten"}', 50,
     json.dumps({**READING, "meta": {"fw": "1.2", "hw": 3}}).encode()),
    ("SenML JSON (110)", '{"format": "senml"}', 110, json.dumps(SENML).encode()),
    ("SenML CBOR (112)", '{"format": "senml"}', 112, cbor2.dumps(SENML_CBOR)),
    ("ThingsBoard + 4 rules, JSON", RULES, 50, json.dumps(READING).encode()),
    ("Cayenne LPP, 2 temperatures", '{"format": "cayenne-lpp"}', 42, bytes.fromhex("03670110056700FF")),
    ("binary layout, 3 fields", '{"format": "binary", "layout": [{"name": "t", "type": "int16be"}, '
     '{"name": "h", "type": "uint8"}, {"name": "b", "type": "uint16le"}]}', 42, bytes.fromhex("00e141f00f")),
    ("protobuf message (ThingsBoard-style schema)", json.dumps({"format": "protobuf", "schema": PROTO,
                                                                "message": "Values"}), 42, PROTO_READING),
    ("protobuf {ts, values}", json.dumps({"format": "protobuf", "schema": PROTO}), 42, PROTO_TS),
    ("JavaScript TS013 codec (LHT65 style), QuickJS", json.dumps({"format": "js", "script": LHT65}), 42,
     bytes.fromhex("CBF60B0D0376010ADD7FFF")),
]


def per_call_ns(fn, number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def main() -> None:
    rows = []
    base = None
    for name, spec, cf, payload in CASES:
        decode = compile_profile(parse_profile(spec))
        points = decode(cf, payload, TS)
        ns = per_call_ns(lambda: decode(cf, payload, TS))
        base = base or ns
        rows.append({"format": name, "bytes": len(payload), "points": len(points), "ns": round(ns),
                     "ns_per_point": round(ns / len(points)), "vs_flat": round(ns / base, 2)})
    report(rows, [
        ("payload", lambda r: r["format"]), ("bytes", lambda r: r["bytes"]), ("points", lambda r: r["points"]),
        ("decode", lambda r: f"{r['ns']} ns"), ("per point", lambda r: f"{r['ns_per_point']} ns"),
        ("vs flat CBOR", lambda r: f"{r['vs_flat']}x"),
    ], as_json="--json" in sys.argv)


if __name__ == "__main__":
    main()
