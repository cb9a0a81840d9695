"""JavaScript codecs (LoRa Alliance TS013) as a profile format: a real codec's own examples, and
codecs that misbehave -- an endless loop, a huge allocation, a throw, a reach for I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corem.ingest.payload import Overloaded, PayloadError, Readings
from corem.profiles.compile import compile_profile
from corem.profiles.spec import ProfileError, parse_profile
from corem.profiles.trial import decode_sample

pytest.importorskip("quickjs")

CODECS = Path(__file__).resolve().parent / "codecs"
LHT65 = (CODECS / "lht65.js").read_text()
NOW = 1_700_000_000_000


def codec(script: str, **limits: int):
    return compile_profile(parse_profile(json.dumps({"format": "js", "script": script, **limits})))


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("example", json.loads((CODECS / "lht65.examples.json").read_text()),
                         ids=lambda e: e["description"])
def test_a_ts013_codec_decodes_its_own_examples(example):
    decode = codec(LHT65)
    payload = bytes.fromhex(example["input"]["bytes"])
    expected = example["output"]
    if "errors" in expected:
        with pytest.raises(PayloadError) as e:
            decode(42, payload, NOW)
        assert (e.value.field, e.value.reason) == ("codec", "codec: " + "; ".join(expected["errors"]))
        return
    [point] = decode(42, payload, NOW)
    want = flatten(expected["data"])
    assert point == Readings({k: float(v) for k, v in want.items() if not isinstance(v, str)},
                             {k: v for k, v in want.items() if isinstance(v, str)}, None)


def test_the_codec_gets_the_ts013_input():
    decode = compile_profile(parse_profile(json.dumps({
        "format": "js", "fport": 7, "variables": {"site": "north"}, "script": """
        function decodeUplink(input) {
          return {data: {port: input.fPort, n: input.bytes.length, first: input.bytes[0],
                         site: input.variables.site, at: input.recvTime.getTime()}};
        }"""})))
    assert decode(None, b"\xff\x01", NOW) == [Readings(
        {"port": 7.0, "n": 2.0, "first": 255.0, "at": float(NOW)}, {"site": "north"}, None)]


def test_an_endless_loop_or_a_huge_allocation_is_5_03_and_the_codec_starts_clean():
    looping = codec("var calls = 0; function decodeUplink(i) { calls++; if (i.bytes[0]) while (true) {} "
                    "return {data: {calls: calls}}; }", timeout_ms=200)  # (the second call, a fresh isolate's
    with pytest.raises(Overloaded, match="codec: ran longer than its 200 ms"):  # first, must fit on a busy machine)
        looping(42, b"\x01", NOW)
    # a fresh isolate: the state the run left behind is gone, and the codec works again
    assert looping(42, b"\x00", NOW)[0].numeric == {"calls": 1.0}
    hungry = codec("function decodeUplink(i) { var a = []; while (true) a.push(new Array(1e6).fill(1)); }",
                   max_memory_mb=16, timeout_ms=1000)  # (the memory bound, not the clock: a busy machine is slow)
    with pytest.raises(Overloaded, match="codec: used more than its 16 MB"):
        hungry(42, b"\x01", NOW)
    assert codec(LHT65)(42, bytes.fromhex("CBF60B0D0376010ADD7FFF"), NOW)[0].numeric["temperature"] == 28.29
    assert decode_sample(parse_profile(json.dumps({"format": "js", "script": "function decodeUplink(i) "
                                                   "{ while (true) {} }", "timeout_ms": 5})),
                         42, b"\x01", NOW)["code"] == "5.03"


@pytest.mark.parametrize("script, reason", [
    ("function decodeUplink(i) { throw new Error('bad battery byte'); }", "codec: threw Error: bad battery byte"),
    ("function decodeUplink(i) { return require('fs').readFileSync('/etc/passwd'); }",
     "codec: threw ReferenceError: require is not defined"),
    ("function decodeUplink(i) { return fetch('http://example.com'); }",
     "codec: threw ReferenceError: fetch is not defined"),
    ("function decodeUplink(i) { return 5; }", "codec: decodeUplink returned no object"),
    ("function decodeUplink(i) { return {warnings: ['x']}; }", "codec: decodeUplink returned no data object"),
    ("function decodeUplink(i) { return {data: {t: null}}; }", "null values are not allowed"),
])
def test_a_codec_that_throws_or_reaches_for_io_refuses_the_reading(script, reason):
    with pytest.raises(PayloadError) as e:
        codec(script)(42, b"\x01", NOW)
    assert not isinstance(e.value, Overloaded) and e.value.reason.startswith(reason), e.value.reason


@pytest.mark.parametrize("script, error", [
    ("function decodeUplink(i) { return {data: ", "script: does not load: SyntaxError"),
    ("function decode(i) { return {}; }", "script: defines no function decodeUplink(input)"),
])
def test_a_script_that_does_not_load_is_refused_when_the_profile_is_written(script, error):
    with pytest.raises(ProfileError) as e:
        codec(script)
    assert str(e.value).startswith(error), e.value
