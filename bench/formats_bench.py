"""Payload decode cost per profile format, the same reading in each, against the built-in flat map.

    python bench/formats_bench.py [--json]

The flat map is what the default profile decodes (in C on the fast lane; here the Python path's
decoder, which every other format runs beside).  Each row: ns per payload and its cost relative to
the flat map's.  Rules are measured separately (a profile with four of them on the same reading).
Last, `DOORS`: the front doors that decode a payload themselves (Efento's measurements: a message
of 3 channels x 6 samples, 6 points), not a profile (formats_load_bench takes `CASES` only).
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path

import cbor2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.table import report  # noqa: E402
from corem.frontdoors.efento import decode as efento
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
#: ThingsBoard's documented telemetry schema, its nested message kept as its JSON text (`nested: json`,
#: ThingsBoard's own way)
TB_PROTO = (Path(__file__).resolve().parent.parent / "tests" / "protos" / "thingsboard.proto").read_text()
TB_PROTO_READING = message_class(TB_PROTO)(temperature=22.5, humidity=65, innerObject={
    "key1": "value1", "key2": True, "key3": 3.5, "key4": 4}).SerializeToString()
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
    ("positional array, CBOR", '{"format": "array", "positions": ["ts", "temperature", "humidity", "state"]}', 60,
     cbor2.dumps([TS, *READING.values()])),
    ("Cayenne LPP, 2 temperatures", '{"format": "cayenne-lpp"}', 42, bytes.fromhex("03670110056700FF")),
    ("binary layout, 3 fields", '{"format": "binary", "layout": [{"name": "t", "type": "int16be"}, '
     '{"name": "h", "type": "uint8"}, {"name": "b", "type": "uint16le"}]}', 42, bytes.fromhex("00e141f00f")),
    ("protobuf message (ThingsBoard-style schema)", json.dumps({"format": "protobuf", "schema": PROTO,
                                                                "message": "Values"}), 42, PROTO_READING),
    ("protobuf {ts, values}", json.dumps({"format": "protobuf", "schema": PROTO}), 42, PROTO_TS),
    ("protobuf, ThingsBoard's schema, nested kept as JSON", json.dumps({"format": "protobuf", "schema": TB_PROTO,
                                                                       "nested": "json"}), 42, TB_PROTO_READING),
    ("JavaScript TS013 codec (LHT65 style), QuickJS", json.dumps({"format": "js", "script": LHT65}), 42,
     bytes.fromhex("CBF60B0D0376010ADD7FFF")),
]



def efento_measurements(channels: int = 3, samples: int = 6) -> bytes:
    """What an Efento NB-IoT sensor posts: temperature, humidity and CO2 channels, `samples` each."""
    m = efento.message_class("measurements")(
        serial_number=bytes.fromhex("282c02424eed"), battery_status=True, measurement_period_base=60,
        measurement_period_factor=5, cloud_token="EF-T0KEN-1", signal=23, next_transmission_at=TS // 1000 + 3600)
    for i, (kind, start) in enumerate([(1, 215), (2, 45), (26, 1201)][:channels]):
        m.channels.add(type=kind, timestamp=TS // 1000, start_point=start).sample_offsets.extend(
            (j * (i + 1)) % 7 for j in range(samples))
    return m.SerializeToString()


def efento_decode(cf: int | None, payload: bytes, now_ms: int) -> list:
    """The Efento door's decode (corem/frontdoors/efento): the message parsed, then its points."""
    return efento.measurements(efento.parse(efento.message_class("measurements"), payload), now_ms).points


#: the front doors that decode a payload themselves (not a profile): (name, decode, cf, payload)
DOORS = [
    ("Efento measurements, 3 channels x 6 samples (door)", efento_decode, 42, efento_measurements()),
]


def per_call_ns(fn, number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def main() -> None:
    rows = []
    base = None
    for name, spec_or_decode, cf, payload in [*CASES, *DOORS]:
        decode = compile_profile(parse_profile(spec_or_decode)) if isinstance(spec_or_decode, str) else spec_or_decode
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
