"""Fuzz the profile formats (ThingsBoard, SenML, positional arrays, binary layouts, Cayenne LPP, a
JavaScript codec, protobuf with ThingsBoard's schema and one of every construct) with rules on top:
nothing but PayloadError escapes, every point has readings, finite numbers and a time in range."""

import json
import math
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from corem.profiles.payload import MAX_TS_MS, PayloadError
    from corem.profiles.compile import compile_profile
    from corem.profiles.spec import parse_profile

PROTOS = Path(__file__).resolve().parent.parent / "tests" / "protos"

PROFILES = [compile_profile(parse_profile(text)) for text in (
    '{"format": "thingsboard"}',
    '{"format": "thingsboard", "nested": "flatten"}',
    '{"format": "thingsboard", "nested": "json", "fields": {"t": {"scale": 0.5, "max": 100, "rename": "temp"},'
    ' "s": {"allowed": ["a", "b"]}}}',
    '{"format": "senml", "fields": {"x": {"required": false, "unit": "Cel"}}}',
    '{"format": "array", "positions": ["ts", "t", null, "s"]}',
    '{"format": "binary", "layout": [{"name": "a", "type": "int16be"}, {"type": "skip", "bytes": 2},'
    ' {"name": "b", "type": "float32le"}, {"name": "c", "type": "float64be"}]}',
    '{"format": "cayenne-lpp", "fields": {"temperature_1": {"max": 50}}}',
    # a TS013 codec in its sandbox: whatever it returns for whatever bytes, corem stays in its words
    '{"format": "js", "timeout_ms": 50, "script": "function decodeUplink(i) { var b = i.bytes; if (b[0] === 1) '
    'throw new Error(\'x\'); if (b[0] === 2) return {errors: [\'bad\']}; var d = {}; '
    'for (var k = 1; k < b.length; k++) d[\'f\' + (k % 5)] = b[0] === 3 ? null : b[k] === 4 ? {n: b[k]} : '
    'b[k] > 200 ? String(b[k]) : b[k] / 7; return {data: d}; }"}',
    json.dumps({"format": "protobuf", "nested": "json", "schema": (PROTOS / "thingsboard.proto").read_text()}),
    json.dumps({"format": "protobuf", "nested": "flatten", "message": "Outer",
                "schema": (PROTOS / "kitchen_sink.proto").read_text(), "fields": {"seq": {"max": 10}}}),
    json.dumps({"format": "protobuf", "schema": (PROTOS / "timestamped.proto").read_text()}),
)]
CONTENT_FORMATS = [50, 60, 110, 111, 112, 113, 42, None, 0]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    decode = PROFILES[fdp.ConsumeIntInRange(0, len(PROFILES) - 1)]
    cf = CONTENT_FORMATS[fdp.ConsumeIntInRange(0, len(CONTENT_FORMATS) - 1)]
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        points = decode(cf, body, 1_700_000_000_000)
    except PayloadError as e:
        assert e.reason and (e.field is None or type(e.field) is str), e
        return
    assert 1 <= len(points) <= 1000
    for p in points:
        assert p.numeric or p.strings
        assert all(type(k) is str and type(v) is float and math.isfinite(v) for k, v in p.numeric.items())
        assert all(type(k) is str and type(v) is str for k, v in p.strings.items())
        assert p.ts is None or 0 <= p.ts <= MAX_TS_MS


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
