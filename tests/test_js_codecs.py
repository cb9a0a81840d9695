"""JavaScript codecs (LoRa Alliance TS013) as a profile format: a real codec's own examples, and
codecs that misbehave -- an endless loop, a huge allocation, a throw, a reach for I/O, a reach for
another profile's globals or for corem's own wrapper, a thrown value that would run code when printed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from corem.profiles.payload import Overloaded, PayloadError, Readings
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
                    "return {data: {calls: calls}}; }", timeout_ms=200)  # (the second call, a fresh runtime's
    with pytest.raises(Overloaded, match="codec: ran longer than its 200 ms"):  # first, must fit on a busy machine)
        looping(42, b"\x01", NOW)
    # a fresh runtime: the state the run left behind is gone, and the codec works again
    assert looping(42, b"\x00", NOW)[0].numeric == {"calls": 1.0}
    hungry = codec("function decodeUplink(i) { var a = []; while (true) a.push(new Array(1e6).fill(1)); }",
                   max_memory_mb=16, timeout_ms=1000)  # (the memory bound, not the clock: a busy machine is slow)
    with pytest.raises(Overloaded, match="codec: used more than its 16 MB"):
        hungry(42, b"\x01", NOW)
    assert codec(LHT65)(42, bytes.fromhex("CBF60B0D0376010ADD7FFF"), NOW)[0].numeric["temperature"] == 28.29
    assert decode_sample(parse_profile(json.dumps({"format": "js", "script": "function decodeUplink(i) "
                                                   "{ while (true) {} }", "timeout_ms": 5})),
                         42, b"\x01", NOW)["code"] == "5.03"


@pytest.mark.parametrize("max_memory_mb", [16, 32])
def test_the_memory_limit_is_the_limit_when_the_engine_can_only_throw_null(max_memory_mb):
    """At its heap limit QuickJS often cannot allocate its "out of memory" error either, and throws
    null instead: that is the memory limit (5.03, a fresh runtime), not the payload's fault (4.00)."""
    hungry = codec("var calls = 0; function decodeUplink(i) { calls++; if (!i.bytes[0]) return {data: {calls: calls}}; "
                   "var k = []; while (true) k.push('x' + k.length); }", max_memory_mb=max_memory_mb, timeout_ms=1000)
    assert hungry(42, b"\x00", NOW)[0].numeric == {"calls": 1.0}
    with pytest.raises(Overloaded, match=f"codec: used more than its {max_memory_mb} MB"):
        hungry(42, b"\x01", NOW)
    assert hungry(42, b"\x00", NOW)[0].numeric == {"calls": 1.0}  # a fresh runtime: the codec's state is gone


def test_a_codec_whose_state_would_fill_its_heap_keeps_none_between_calls():
    """The tester's case: a small string kept per payload byte at 8 MB filled the heap, and every
    later reading of the profile was 4.00 "threw null" for good.  Each call starts anew now, so its
    state stays one call's."""
    keeping = codec("var kept = []; function decodeUplink(i) { for (var j = 0; j < i.bytes.length; j++) "
                    "kept.push('frame ' + kept.length + ' byte ' + i.bytes[j]); return {data: {kept: kept.length}}; }",
                    max_memory_mb=8, timeout_ms=1000)
    for _ in range(800):
        assert keeping(42, bytes(range(200)), NOW)[0].numeric == {"kept": 200.0}


@pytest.mark.parametrize("script, reason", [
    ("function decodeUplink(i) { throw new Error('bad battery byte'); }", "codec: threw Error: bad battery byte"),
    ("function decodeUplink(i) { return require('fs').readFileSync('/etc/passwd'); }",
     "codec: threw ReferenceError: require is not defined"),
    ("function decodeUplink(i) { return fetch('http://example.com'); }",
     "codec: threw ReferenceError: fetch is not defined"),
    ("function decodeUplink(i) { return process.env; }", "codec: threw ReferenceError: process is not defined"),
    ("function decodeUplink(i) { throw 'oops'; }", "codec: threw oops"),
    ("function decodeUplink(i) { throw undefined; }", "codec: threw undefined"),
    ("function decodeUplink(i) { throw {reason: 1}; }", "codec: threw [object Object]"),
    ("function decodeUplink(i) { throw new Error('two\\nlines'); }", "codec: threw Error: two"),
    ("function f() { return f() + 1; } function decodeUplink(i) { return f(); }",
     "codec: threw RangeError: Maximum call stack size exceeded"),
    ("function decodeUplink(i) { Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0); }",
     "codec: threw TypeError"),  # the one call that could block: it may not
    ("function decodeUplink(i) { return function () {}; }", "codec: decodeUplink returned no object"),
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


def test_what_the_sandbox_offers_no_require_no_io_no_timers_no_python():
    [point] = codec("""function decodeUplink(i) {
      var names = ["require", "process", "fetch", "XMLHttpRequest", "setTimeout", "setInterval", "console",
                   "print", "std", "os", "module", "exports", "Deno", "Bun"];
      var data = {};
      names.forEach(function (n) { data[n] = typeof globalThis[n]; });
      data.dynamic_import = String(import("fs"));  // (no loader: a promise whose job never runs)
      return {data: data};
    }""")(42, b"\x01", NOW)
    assert point.strings.pop("dynamic_import") == "[object Promise]"
    assert set(point.strings.values()) == {"undefined"}, point.strings


def test_one_profile_cannot_see_or_touch_another_profiles_globals():
    writer = codec("var secret = 42; globalThis.shared = 'mine'; "
                   "function decodeUplink(i) { Object.prototype.polluted = 1; secret++; return {data: {secret: secret}}; }")
    reader = codec("function decodeUplink(i) { return {data: {secret: typeof secret, shared: typeof shared, "
                   "polluted: typeof ({}).polluted}}; }")
    assert writer(42, b"\x01", NOW)[0].numeric == {"secret": 43.0}
    assert reader(42, b"\x01", NOW)[0].strings == {"secret": "undefined", "shared": "undefined",
                                                   "polluted": "undefined"}
    assert writer(42, b"\x01", NOW)[0].numeric == {"secret": 43.0}  # (and each call starts anew: below)


CHIRPSTACK_STYLE = """
var decoded = {};  // ChirpStack runs every call on a fresh runtime: codecs may keep their result here
function decodeUplink(input) {
  if (input.bytes[0] === 1) decoded.temperature = input.bytes[1];
  else decoded.battery = input.bytes[1];
  return {data: decoded};
}"""


def test_each_call_sees_fresh_global_state_as_on_chirpstack():
    """One runtime serves every device and tenant of a profile: a top-level `var`, a global made by
    a sloppy assignment or through globalThis, and a built-in's prototype written from the payload
    must not carry one call's values into the next (acme's temperature into globex's point)."""
    decode = codec(CHIRPSTACK_STYLE)
    assert decode(42, b"\x01\x25", NOW)[0].numeric == {"temperature": 37.0}
    assert decode(42, b"\x02\x5a", NOW)[0].numeric == {"battery": 90.0}
    leaky = codec("""
    var calls = 0;
    function decodeUplink(input) {
      calls++;
      var before = {calls: calls, implicit: typeof implicitGlobal, via_this: typeof globalThis.viaThis,
                    proto: typeof ({}).polluted, array_proto: typeof [].polluted, json: typeof JSON.parse};
      implicitGlobal = 1;  // (sloppy: a new global)
      globalThis.viaThis = 2;
      var target = {}, key = input.bytes[0] ? "__proto__" : "x";
      target[key].polluted = "yes";  // prototype pollution driven by the payload: the built-ins are frozen
      try { Array.prototype.polluted = 1; } catch (e) {}
      try { JSON.parse = null; } catch (e) {}
      return {data: before};
    }""")
    for _ in range(3):
        assert leaky(42, b"\x01", NOW)[0] == Readings(
            {"calls": 1.0}, {"implicit": "undefined", "via_this": "undefined", "proto": "undefined",
                             "array_proto": "undefined", "json": "function"}, None)


def test_a_global_a_call_cannot_take_back_makes_the_runtime_anew():
    decode = codec("""
    var seen = typeof kept;
    function decodeUplink(input) {
      Object.defineProperty(globalThis, "kept", {value: 1, configurable: false});  // (cannot be deleted)
      return {data: {seen: seen}};
    }""")
    for _ in range(3):  # each call's runtime is fresh, so `kept` was never there before
        assert decode(42, b"\x01", NOW)[0].strings == {"seen": "undefined"}


def test_a_script_that_closes_the_function_it_is_run_in_is_refused():
    """The script is compiled as a function's body; one that closes it would run code at load whose
    state every call shares."""
    with pytest.raises(ProfileError, match="script: does not load: not one script"):
        codec("}); var shared = []; (function () { function decodeUplink(i) { shared.push(1); "
              "return {data: {n: shared.length}}; }")


@pytest.mark.parametrize("script", [
    # a thrown value whose printing loops: printed inside the call, so within its limit
    "function decodeUplink(i) { throw {toString: function () { while (true) {} }}; }",
    # a stack trace that would loop when printed: Error.prepareStackTrace is pinned
    "try { Error.prepareStackTrace = function () { return {toString: function () { while (true) {} }}; }; } "
    "catch (e) {} function decodeUplink(i) { while (true) {} }",
    # what printing the engine's own 'interrupted' error reads: locked before the codec runs (a script
    # adding to a built-in at its top level is refused at load: test_a_script_that_adds_a_helper_...)
    "function decodeUplink(i) { Object.prototype[Symbol.toPrimitive] = function () { while (true) {} }; "
    "try { Object.defineProperty(Object.prototype, 'stack', {get: function () { while (true) {} }}); } catch (e) {} "
    "Error.prototype.toString = function () { while (true) {} }; Error.stackTraceLimit = 0; "
    "try { InternalError.prototype.toString = Error.prototype.toString; } catch (e) {} "
    "while (true) {} }",
    # a fake 'out of memory' whose every property loops
    "function decodeUplink(i) { throw new Proxy(new InternalError('out of memory'), "
    "{get: function () { while (true) {} }, getPrototypeOf: function () { while (true) {} }}); }",
])
def test_a_codec_cannot_run_code_outside_its_limits(script):
    decode = codec(script, timeout_ms=50)
    with pytest.raises(Overloaded, match="codec: ran longer than its 50 ms"):
        decode(42, b"\x01", NOW)


HEAVY_LOOPS = {  # the tester's: each ran seconds past a 50 ms limit (1 s at load), on the event loop
    "fill": "var a = new Array(1e5).fill(0); function decodeUplink(i) { while (true) a.fill(1); }",
    "stringify": "var a = []; for (var k = 0; k < 20000; k++) a.push(k); "
                 "function decodeUplink(i) { while (true) JSON.stringify(a); }",
    "slice": "function decodeUplink(i) { var b = new Array(65536).fill(1); while (b.length) b = b.slice(1); "
             "return {data: {b: b.length}}; }",
}


@pytest.mark.parametrize("name", HEAVY_LOOPS)
def test_a_loop_of_heavy_builtin_calls_is_stopped_near_its_limit(name):
    """QuickJS asks whether to stop every 10,000 or so operations, and a built-in call is one however
    long it runs: such a loop overran its limit by up to 10,000 calls' work (6.5 s of CPU for
    `JSON.stringify` over 20,000 numbers at 50 ms).  A built-in that goes through an array or a text
    now counts that work (PRELUDE's `counted`).  (CPU time, the process's own, with a wide margin:
    not the wall clock, which a loaded machine stretches.)"""
    decode = codec(HEAVY_LOOPS[name], timeout_ms=50)
    cpu = time.process_time()
    with pytest.raises(Overloaded, match="codec: ran longer than its 50 ms"):
        decode(42, b"\x01", NOW)
    assert time.process_time() - cpu < 0.4  # (50 ms, and what the last 10,000 operations did: 0.5-1.7 s before)


def test_a_codec_reading_its_payload_a_few_bytes_at_a_time_is_charged_what_it_reads():
    """A slice of two characters is charged two, not its whole string: charged the whole, a codec
    walking a 32 KB payload's hex two characters at a time did quadratic work (~50 million loop turns)
    and ran out of a limit its real work (~20 ms of CPU) fits many times over."""
    decode = codec("""function decodeUplink(i) {
      var hex = "", sum = 0, k;
      for (k = 0; k < i.bytes.length; k++) hex += (i.bytes[k] + 256).toString(16).substr(1);
      for (k = 0; k < hex.length; k += 2) sum += parseInt(hex.slice(k, k + 2), 16) + i.bytes.slice(k / 2, k / 2 + 1)[0];
      return {data: {sum: sum}};
    }""", timeout_ms=300)
    payload = bytes(range(256)) * 128
    [point] = decode(42, payload, NOW)
    assert len(payload) == 32768 and point.numeric == {"sum": 2.0 * sum(payload)}


def test_a_script_that_loops_on_heavy_builtin_calls_while_loading_is_stopped_near_its_limit():
    cpu = time.process_time()
    with pytest.raises(ProfileError, match="script: does not load: ran longer than its 1000 ms"):
        codec("var a = []; for (var k = 0; k < 100000; k++) a.push(k); while (true) JSON.stringify(a); "
              "function decodeUplink(i) {}")
    assert time.process_time() - cpu < 1.5


def test_the_counted_builtins_behave_as_the_builtins():
    [point] = codec("""function decodeUplink(i) {
      var a = [3, 1, 2], s = "a,b,c";
      return {data: {sorted: a.slice().sort().join(""), split: s.split(",").length, name: [].fill.name,
                     length: [].fill.length, json: JSON.stringify(JSON.parse('{"x": [1]}')),
                     from: Array.from("ab").join("-"), code: String.fromCharCode(104, 105),
                     typed: new Uint8Array([1, 2]).slice(1)[0], keys: Object.keys({p: 1, q: 2}).join(""),
                     constructs: (function () { try { new a.fill(); return "yes"; } catch (e) { return "no"; } })()}};
    }""")(42, b"\x01", NOW)
    assert point.strings == {"sorted": "123", "name": "fill", "json": '{"x":[1]}', "from": "a-b", "code": "hi",
                             "keys": "pq", "constructs": "no"}
    assert point.numeric == {"split": 3.0, "length": 1.0, "typed": 2.0}


def test_a_script_that_adds_a_helper_to_a_builtin_is_refused_when_the_profile_is_written():
    """Community codecs define helpers on prototypes (`Number.prototype.toHex`); with the built-ins
    frozen the write is ignored and every call would fail on the missing helper: refused at load,
    naming it.  A script that only reads built-ins, or replaces one QuickJS has, loads."""
    with pytest.raises(ProfileError, match=r"script: adds Number.prototype.toHex to a built-in"):
        codec("Number.prototype.toHex = function () { return this.toString(16); }; "
              "function decodeUplink(i) { return {data: {h: i.bytes[0].toHex()}}; }")
    with pytest.raises(ProfileError, match=r"script: adds Math.clamp to a built-in"):
        codec("Math.clamp = function (v) { return v; }; function decodeUplink(i) { return {data: {}}; }")
    with pytest.raises(ProfileError, match=r"script: adds Object.prototype.helper to a built-in"):  # (the check's
        codec("Array.prototype.map = function () { return []; }; Reflect.ownKeys = function () { return []; }; "
              "Object.prototype.helper = function () {}; "  # own reads are taken before the script runs)
              "function decodeUplink(i) { return {data: {}}; }")
    [point] = codec("String.prototype.padStart = String.prototype.padStart || function () {}; "
                    "function decodeUplink(i) { return {data: {h: (i.bytes[0]).toString(16).padStart(2, '0')}}; }")(
        42, b"\x0a", NOW)
    assert point.strings == {"h": "0a"}


def test_a_codec_cannot_replace_corems_wrapper():
    decode = codec("__corem_decode = function () { throw {toString: function () { while (true) {} }}; }; "
                   "function decodeUplink(i) { return {data: {ok: 1}}; }")
    assert decode(42, b"\x01", NOW)[0].numeric == {"ok": 1.0}
    with pytest.raises(ProfileError, match="script: does not load: TypeError"):  # strict: the write throws
        codec("'use strict'; __corem_decode = null; function decodeUplink(i) { return {data: {ok: 1}}; }")


def test_a_script_that_loops_or_hogs_while_loading_is_refused():
    with pytest.raises(ProfileError, match="script: does not load: ran longer than its 1000 ms"):
        codec("while (true) {} function decodeUplink(i) {}")
    with pytest.raises(ProfileError, match="script: does not load: used more than its 16 MB"):
        codec("var a = []; while (true) a.push(new Array(1e6).fill(1)); function decodeUplink(i) {}",
              max_memory_mb=16)


def test_a_codec_made_on_one_thread_runs_on_another():
    """As corem does: compiled on a worker thread (the registry's reload), called on the event loop's;
    the engine's stack bound follows the calling thread (a deep recursion is a RangeError, not a crash)."""
    made: list = []
    script = ("function depth(n) { return n ? 1 + depth(n - 1) : 0; } "
              "function decodeUplink(i) { return {data: {depth: depth(i.bytes[0] * 100)}}; }")
    worker = threading.Thread(target=lambda: made.append(codec(script)))
    worker.start()
    worker.join()
    assert made[0](42, b"\x05", NOW)[0].numeric == {"depth": 500.0}
    with pytest.raises(PayloadError, match="Maximum call stack size exceeded"):
        made[0](42, b"\xff", NOW)  # 25,500 frames deep
    results: list = []

    def calls() -> None:
        for _ in range(200):
            results.append(made[0](42, b"\x02", NOW)[0].numeric["depth"])

    threads = [threading.Thread(target=calls) for _ in range(4)]  # the codec's lock: one call at a time
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200.0] * 800


def test_the_codec_gets_its_payload_byte_for_byte_and_large_times_exactly():
    [point] = codec("function decodeUplink(i) { return {data: {bytes: i.bytes.join(','), "
                    "array: Array.isArray(i.bytes), at: i.recvTime.getTime(), text: 'a\\u0000b\\u00e9\\ud83d\\ude00'}}; }")(
        42, bytes([0, 1, 127, 128, 255]), 4_102_444_800_123)
    assert point.strings == {"bytes": "0,1,127,128,255", "text": "a\x00b\u00e9\U0001f600"}
    assert point.numeric == {"array": 1.0, "at": 4_102_444_800_123.0}


def test_a_runtime_that_does_not_load_again_after_a_limit_is_retried_after_a_while(monkeypatch):
    """After a limit the runtime is made anew on the event loop, its load watched as a call is; if
    that load fails, calls are 5.03 until RETRY_LOAD_AFTER has passed (not a load a message), then
    the next call loads it again."""
    from corem.profiles import js
    from corem.profiles.js import JsCodec

    monkeypatch.setattr(js, "RETRY_LOAD_AFTER", 3600)  # (the while does not pass on a slow machine either)
    decode = JsCodec("var calls = 0; function decodeUplink(i) { calls++; if (i.bytes[0]) while (true) {} "
                     "return {data: {calls: calls}}; }", timeout_ms=50)
    start = decode._start
    loads: list[float] = []

    def refused(watch_s: float = 1.0) -> None:
        loads.append(watch_s)
        raise ProfileError("script: does not load: ran longer than its 1000 ms")

    monkeypatch.setattr(decode, "_start", refused)
    with pytest.raises(Overloaded, match="ran longer than its 50 ms"):
        decode(42, b"\x01", NOW)
    assert loads == [0.05]  # (made anew at once, watched as a call: 1 s, not 5)
    for _ in range(3):
        with pytest.raises(Overloaded, match="codec: script: does not load"):  # 5.03, not a crash
            decode(42, b"\x00", NOW)
    assert loads == [0.05]  # (no load a message)
    monkeypatch.setattr(decode, "_start", start)
    decode._load_failed = (0.0, "")  # (RETRY_LOAD_AFTER has passed)
    assert decode(42, b"\x00", NOW)[0].numeric == {"calls": 1.0}


@pytest.mark.parametrize("script, field, reason", [
    # JavaScript text is UTF-16: a lone surrogate is no Unicode text the stored point could hold
    ("function decodeUplink(i) { return {data: {text: 'a' + String.fromCharCode(0xd800)}}; }", "text",
     "codec: not valid Unicode text (a lone surrogate)"),
    ("function decodeUplink(i) { var d = {}; d['t' + String.fromCharCode(0xdc00)] = 1; return {data: d}; }",
     "t\\udc00", "codec: not valid Unicode text (a lone surrogate)"),
    # data nested past what Python's JSON parser recurses (a 5.00 "internal error" before)
    ("function decodeUplink(i) { var d = {v: 1}; for (var k = 0; k < 1000; k++) d = {a: d}; return {data: d}; }",
     "codec.data", "codec: data nested too deep"),
    # nested deep, yet within the parser's reach: flattened only so far
    ("function decodeUplink(i) { var d = {v: 1}; for (var k = 0; k < 100; k++) d = {a: d}; return {data: d}; }",
     "a" + ".a" * 64, "nested deeper than 64 maps or arrays"),
])
def test_what_a_codec_returns_that_no_point_can_hold_is_its_4_00_naming_the_field(script, field, reason):
    with pytest.raises(PayloadError) as e:
        codec(script)(42, b"\x01", NOW)
    assert not isinstance(e.value, Overloaded)
    assert (e.value.field, e.value.reason) == (field, reason)


#: each multiplication of 500,000-bit BigInts ~150 ms, one operation to QuickJS: 200 of them would run
#: ~30 s past a 50 ms limit before QuickJS looked at the time
BIGINT_LOOP = "var y = (1n << 500000n) + 12345n; var z; for (var i = 0; i < 200; i++) { try { z = y * y; } catch (e) {} }"


def test_a_call_that_outruns_quickjss_looks_at_the_time_is_stopped_by_the_watchdog():
    """Found by review: operators on huge operands are one operation each, so a loop of BigInt
    multiplications held the event loop for minutes.  The watchdog drops the runtime's memory limit
    once the call is STOP_AFTER_MIN old: the multiplication under way is the last.  The codec then
    answers again, on a fresh runtime."""
    from corem.profiles.js import WATCHDOG

    decode = codec("function decodeUplink(i) { if (i.bytes[0] === 1) { " + BIGINT_LOOP + " } "
                   "return {data: {first: i.bytes[0]}}; }", timeout_ms=50)
    stops = WATCHDOG.stopped
    with pytest.raises(Overloaded, match="codec: ran longer than its 50 ms"):
        decode(42, b"\x01", NOW)
    assert WATCHDOG.stopped == stops + 1  # (the watchdog's doing, not QuickJS's own look at the time)
    [sample] = [m for m in WATCHDOG.metrics() if m.name == "corem_js_watchdog_stops"]
    assert sample.value == stops + 1  # (and what the metric says: the server test shows it is scraped)
    [point] = decode(42, b"\x02", NOW)
    assert point.numeric == {"first": 2.0}


def test_a_load_that_outruns_quickjss_looks_at_the_time_is_stopped_by_the_watchdog(monkeypatch):
    from corem.profiles import js

    monkeypatch.setattr(js, "STOP_AFTER", 1)  # (a load's limit is 1 s: stopped after 1 s, not 5)
    stops = js.WATCHDOG.stopped
    with pytest.raises(ProfileError, match="script: does not load: ran longer than its 1000 ms"):
        codec(BIGINT_LOOP + "; function decodeUplink(i) {}")
    assert js.WATCHDOG.stopped == stops + 1  # (the watchdog's doing: without it the load ran ~50 s and loaded)


class Runtime:
    """A runtime for the watchdog's unit test: records the memory limits it is given."""

    def __init__(self) -> None:
        self.limits: list[int] = []

    def set_memory_limit(self, n: int) -> None:
        self.limits.append(n)


def test_the_watchdog_stops_only_calls_past_their_time_each_once_and_never_the_next():
    from corem.profiles.js import STOP_AFTER, STOP_AFTER_MIN, Watchdog, Watched

    dog = Watchdog(period=None)  # (no thread: this test's `check` calls are all there are)
    slow, quick, done = Watched(dog), Watched(dog), Watched(dog)
    a, b, c, d = Runtime(), Runtime(), Runtime(), Runtime()
    now = time.monotonic()
    slow.begin(a, 0.05)
    quick.begin(b, 10.0)
    done.begin(c, 0.05)
    later = time.monotonic()  # (each began between `now` and `later`, whatever the machine's load)
    assert done.end() is False  # (ended in time: never stopped, whatever comes later)
    assert dog.check(now + STOP_AFTER_MIN - 0.01) == 0  # (never before STOP_AFTER_MIN, whatever its limit)
    assert dog.check(later + STOP_AFTER_MIN) == 1 and dog.check(later + 50) == 1  # slow; quick at 50 s
    assert dog.check(now + 3600) == 0  # each once
    assert (a.limits, b.limits, c.limits) == ([1], [1], []) and dog.stopped == 2  # (quick: at STOP_AFTER x 10 s)
    assert slow.end() is True and quick.end() is True
    t = time.monotonic()  # (read before it begins: its deadline is past t + STOP_AFTER_MIN whatever the load)
    slow.begin(d, 0.05)  # the next call on the same watch: its own time, and not stopped for the last one's
    assert dog.check(t + STOP_AFTER_MIN - 0.01) == 0 and d.limits == [] and slow.end() is False



def test_a_server_with_a_js_profile_reports_the_watchdogs_stops(data_dir):
    """`corem_js_watchdog_stops_total` is scraped where an operator scrapes: a server once a
    device's JS profile has decoded a reading shows it (corem/server.py `components`)."""
    from .conftest import corem_cli, post, start_corem

    corem_cli("profiles", "add", "lht", "--json", json.dumps(
        {"format": "js", "script": "function decodeUplink(i) { return {data: {b: i.bytes[0]}}; }"}),
        data_dir=data_dir)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "js-1", "--token", "JS-TOKEN", "--profile", "lht",
              data_dir=data_dir)
    server = start_corem(data_dir)
    try:
        answer = post(server.coap_port, "JS-TOKEN", b"\x07", 0x1234)
        assert answer is not None and answer[1] == 0x44  # (2.04)
        assert server.metrics()["corem_js_watchdog_stops_total"] == 0
    finally:
        server.stop()
