"""JavaScript payload codecs with the LoRa Alliance TS013 Payload Codec API, so that a codec written
for The Things Stack or ChirpStack runs unchanged:

    function decodeUplink(input) {   // input: {bytes, fPort, recvTime, variables}
      return {data: {temperature: ...}, warnings: [], errors: []};
    }

Each profile's codec runs in its own QuickJS runtime (the engine ChirpStack runs TS013 codecs on;
here its maintained fork quickjs-ng, through the `quickjs-ng` wheel, module `quickjs`: no Node, so no `require`, no `process`, no `fetch`, no
files, no timers, no callback into Python -- only the language), with a CPU-time and a memory limit
per call, and every call with fresh state (PRELUDE says how: the runtime serves every device and
tenant of the profile).  A codec that throws, or returns `errors`, refuses the reading (4.00, field `codec`); one
that runs past its limits is answered 5.03 and its runtime is made anew, so the next call starts
clean.  Profiles with the same script and settings, whichever tenants', share one runtime
(`js_codec`): what one call leaves never reaches the next (fresh state a call, built-ins frozen).  `data` becomes one point, nested
objects flattened to `outer.inner` as for ThingsBoard's `nested: flatten`.

The limits.  Time: QuickJS asks an interrupt handler every 10,000 or so operations whether to stop;
the binding's handler compares `clock()`, the process's CPU time, with the call's start.  So a codec
is stopped once the process has spent `timeout_ms` of CPU since the call began: time the machine
spends on other processes does not count (mini-racer's limit was the wall clock, which a loaded
machine ran out for codecs that had done nothing wrong), while CPU the process's other threads burn
meanwhile does (the call runs without the GIL): that part can only make the limit come early.  What
could make it come late: a built-in call is one operation however long it runs, so a loop of heavy
built-in calls (`while (true) a.fill(1)` over a large array) ran up to 10,000 of them before it was
asked -- measured 3.2 s for a 100,000-element array at a 50 ms limit (bench/js_engines_bench.py,
`busy stop`; V8 stops it at 50 ms).  The built-ins that go through a whole array or text therefore
count that work as operations (PRELUDE's `counted`): such a loop stops within ~10-30 ms of the limit,
at load too.  Left: one call's own work, and operators (string `+`, a BigInt's `*`), one operation
each however large their operands -- the memory limit bounds the operands, not the time: 20
multiplications of 500,000-bit BigInts took 3 s at a 50 ms limit, a BigInt's `toString` up to ~3 s
each, and QuickJS would not ask before 10,000 of them.  So a watchdog (`Watchdog`, one thread for
every runtime) stops a call, or a load, still running STOP_AFTER times its limit after it began
(wall time; at least STOP_AFTER_MIN): it drops the runtime's memory limit to nothing, so the
operation under way is the last to complete -- every later one fails to allocate, and QuickJS's next
look at the time ends the call (an endless `try { x * x } catch (e) {}` too: measured, the call
ended 0.002 s after the drop; after a `toString` of a 900,000-bit BigInt, 2 s).  The call is then
5.03 as past its time, the runtime made anew (that load watched as a call is).  What the watchdog
cannot stop: a loop whose heavy operations allocate nothing -- comparing huge strings (`a === b`,
~0.9 ms for 12 MB) -- runs until QuickJS's next look, 10,000 of them (~9 s at the default 32 MB: a
known gap, which only running codecs off the event loop would close).  A plain endless loop stops
at the limit.  Memory: QuickJS's allocator refuses past
`max_memory_mb` for the whole runtime (the codec, its globals and the call's garbage), and throws
its InternalError "out of memory" -- or, when it cannot allocate even that, null: both are the
limit (5.03, a fresh runtime), never the payload's 4.00, or a codec whose kept state filled the heap
would refuse every later reading of its profile for good.  The one call
that could block, `Atomics.wait`, throws (the runtime may not block).

What never runs outside those limits: a thrown value is turned into text inside the call, by the
wrapper below; what leaves the engine as an exception is only ever the engine's own InternalError
(`interrupted`, `out of memory`), whose prototype is locked before the codec loads, and
`Error.prepareStackTrace` is pinned, so printing it runs none of the codec's code.

Threads: a runtime is not thread-safe.  Codecs are compiled on a worker thread (the registry's
reload) and called on the event loop's; every use of one codec's runtime holds its lock, and the
binding moves QuickJS's stack bound to the calling thread on every entry (`JS_UpdateStackTop`).
The one exception, the watchdog's `set_memory_limit` on a running call: the binding's does nothing
but JS_SetMemoryLimit, which sets one field the allocator reads (no entry, no stack bound moved).

Why QuickJS (bench/js_engines_bench.py: tests/codecs/lht65.js through this wrapper, against the
mini-racer path corem had): 12 µs a call against 97 µs; 0.25 ms to make a codec's runtime against
5 ms for an isolate (the first: 0.4 ms against 58 ms); ~160 KB of RSS a profile against ~700 KB, and
the first 0.9 MB against 58 MB; 8 MB installed against 85 MB.  The price is the late stop above.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterator

from .payload import Overloaded, PayloadError, Readings
from .formats import put_value
from ..extras import needs
from ..logs import Every
from ..stats import Sample, counter
from .spec import ProfileError

try:
    import quickjs  # type: ignore[import-untyped]  # (quickjs-ng ships no py.typed)
except ImportError:  # quickjs-ng: an optional package (the 'js' extra)
    quickjs = None

log = logging.getLogger("corem.profiles")

#: a codec's script gets this long (CPU) to load, whatever its per-call limit
LOAD_LIMIT_S = 1.0
#: a runtime made anew that did not load is tried again after this many seconds (calls meanwhile:
#: 5.03), not at every message
RETRY_LOAD_AFTER = 1.0
#: the watchdog stops a call or a load still running this many times its limit after it began
#: (wall time: a loaded machine stretches a call's CPU time), and never one younger than
#: STOP_AFTER_MIN seconds; it looks every WATCHDOG_PERIOD seconds
STOP_AFTER = 5
STOP_AFTER_MIN = 1.0
WATCHDOG_PERIOD = 0.05


class Watched:
    """One runtime's calls as the watchdog sees them: `begin(ctx, limit_s)` before a call (or a
    load) on `ctx`, `end()` after it -- True: the watchdog stopped it.  A lock of its own, taken by
    the call twice and by the watchdog when it looks, so the watchdog never stops the next call
    instead of the one that was late.  `call` wraps the three (a frame and its arguments' tuple a
    call: ~0.1-0.2 µs of the 3.5-17 µs a codec call takes)."""

    __slots__ = ("_guard", "_ctx", "_deadline", "_stopped", "_dog", "__weakref__")

    def __init__(self, dog: Watchdog | None = None) -> None:
        self._guard = threading.Lock()
        self._ctx: Any = None
        self._deadline = float("inf")
        self._stopped = False
        self._dog = dog or WATCHDOG
        self._dog.keep(self)

    def begin(self, ctx: Any, limit_s: float) -> None:
        deadline = time.monotonic() + max(STOP_AFTER * limit_s, STOP_AFTER_MIN)
        if self._dog._thread is None:  # (a forked child: the thread did not come along)
            self._dog.start()
        with self._guard:
            self._ctx, self._deadline, self._stopped = ctx, deadline, False

    def end(self) -> bool:
        with self._guard:
            self._ctx, self._deadline = None, float("inf")
            return self._stopped

    def call(self, ctx: Any, limit_s: float, fn: Callable[..., Any], *args: Any) -> tuple[Any, Exception | None, bool]:
        """`fn(*args)` on `ctx`, watched for `limit_s`: (its result, or None; the engine's exception
        it raised -- its limits, the only ones that leave corem's wrappers --, or None; stopped by
        the watchdog).  Every call and load of a runtime goes through here."""
        self.begin(ctx, limit_s)
        result: Any = None
        error: Exception | None = None
        try:
            result = fn(*args)
        except quickjs.JSException as e:
            error = e
        finally:
            stopped = self.end()
        return result, error, stopped

    def stop_if_late(self, now: float) -> bool:
        """(the watchdog) Stop the call under way if it is past its time: its runtime's memory
        limit dropped to nothing (1 byte: 0 would be none; JS_SetMemoryLimit sets one field)."""
        with self._guard:
            if self._stopped or now < self._deadline:
                return False
            self._ctx.set_memory_limit(1)
            self._stopped = True
            # (here, before the call can see `_stopped`: its count is already there; the watchdog's
            # thread is the only one that stops calls, so the count needs no lock of its own)
            self._dog.stopped += 1
            return True


class Watchdog:
    """Stops the runtimes whose call outran its limit between QuickJS's looks at the time (see the
    module's docstring): one thread, started when the first runtime is watched, looking every
    `period` (None: no thread; `check`, the whole of its work, is then the caller's)."""

    def __init__(self, period: float | None = WATCHDOG_PERIOD) -> None:
        self.period = period
        self._lock = threading.Lock()
        self._watched: weakref.WeakSet[Watched] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        #: calls stopped since the process started
        self.stopped = 0
        self._failing = Every()  # (a look that raised: logged once a minute)

    def keep(self, watched: Watched) -> None:
        """Look at `watched` from now on (as long as it lives)."""
        with self._lock:
            self._watched.add(watched)
        self.start()

    def start(self) -> None:
        """The thread, unless it runs (or there is none to run: `period` None)."""
        with self._lock:
            if self._thread is None and self.period is not None:
                self._thread = threading.Thread(target=self._run, name="corem-js-watchdog", daemon=True)
                self._thread.start()

    def check(self, now: float) -> int:
        """Stop every call past its time; how many were stopped now."""
        with self._lock:
            watched = list(self._watched)
        return sum(w.stop_if_late(now) for w in watched)

    def metrics(self) -> Iterator[Sample]:
        yield counter("corem_js_watchdog_stops", self.stopped)

    def _run(self) -> None:
        while self.period is not None:
            time.sleep(self.period)
            try:
                stopped = self.check(time.monotonic())
            except Exception:  # noqa: BLE001 - a bug here must not end the thread: the next look may work
                if self._failing.due():  # (a line a minute: it looks 20 times a second)
                    log.exception("js codec watchdog: looking at the calls failed")
                continue
            if stopped:
                log.warning("js codec: a call ran past its limit between QuickJS's looks at the time (%sx its limit "
                            "and at least %s s: one operation on huge operands, a BigInt's * or toString); stopped, its "
                            "runtime made anew", STOP_AFTER, STOP_AFTER_MIN)

    def _forked(self) -> None:
        """(in a forked child: the thread did not come along -- the next call starts it -- and a
        lock the parent held at the fork would never be released here)"""
        self._lock = threading.Lock()
        self._thread = None
        self.stopped = 0  # (the child's own count, as its other metrics are)
        for watched in list(self._watched):
            watched._guard = threading.Lock()


#: the process's watchdog (a component of its metrics: server.py)
WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._forked)

#: run once in each runtime before the codec: locks what printing an escaped exception reads, and
#: defines the two entry points, which the codec cannot replace (not writable, not configurable).
#: Both return text (the binding cuts a string at a NUL, and JSON never starts with these marks):
#: "!" + the JSON of a thrown value's text (refused), "#" + the same for the engine's catchable limit
#: (out of memory), "?" (the script defines no decodeUplink), "~" (the script is not one script:
#: it closes the function it is wrapped in), or the JSON of decodeUplink's result; and "*" before
#: the result when the call left state behind that the runtime cannot take back (a global it cannot
#: delete): the runtime is then made anew after the call.
#:
#: Each call sees fresh state, as on ChirpStack (a new runtime a call), where codecs may keep their
#: result in a top-level `var decoded = {}`: one runtime serves every device and tenant of the
#: profile, so what one call leaves must not reach the next.  A new runtime or context a call costs
#: ~340 µs and ~85 µs (measured: 13 µs a call today), so instead, in one runtime:
#:  - the script is compiled once as the body of a function (`factory`), which every call runs anew:
#:    its top-level `var`s, functions, `let`s are that run's own;
#:  - the built-ins (every object reachable from the global object's properties) are frozen and the
#:    global object's own properties locked before the script loads, so no call can change them for
#:    the next (a write to a built-in throws in strict code, is ignored otherwise -- also at load,
#:    so a polyfill of something QuickJS lacks does not take; QuickJS has ES2023); a script whose
#:    top level adds a helper to a built-in is refused at load, naming it (`ADDS_TO_BUILTINS`);
#:  - after each call the globals it added (`x = 1` without `var`, `globalThis.y = ...`) are deleted.
#: What is left shared: a global `let`/`const` made by an indirect eval of the codec's own.
PRELUDE = r"""
(function (global) {
  "use strict";
  var E = InternalError.prototype, toText = Error.prototype.toString, stringify = JSON.stringify,
      parse = JSON.parse, fromCode = String.prototype.charCodeAt, defineProperty = Object.defineProperty,
      getProto = Object.getPrototypeOf, DateC = Date, fnText = Function.prototype.toString,
      ownNames = Object.getOwnPropertyNames, ownKeys = Reflect.ownKeys, freeze = Object.freeze,
      remove = Reflect.deleteProperty,
      isFrozen = Object.isFrozen, getOwn = Object.getOwnPropertyDescriptor, hasOwn = Object.prototype.hasOwnProperty,
      factory = null, baseline = Object.create(null), nbaseline = 0;
  defineProperty(Error, "prepareStackTrace", {value: undefined, writable: false, configurable: false});
  defineProperty(E, Symbol.toPrimitive, {value: undefined, writable: false, configurable: false});
  defineProperty(E, "toString", {value: toText, writable: false, configurable: false});
  defineProperty(E, "name", {value: "InternalError", writable: false, configurable: false});
  defineProperty(E, "stack", {value: "", writable: false, configurable: false});
  Object.freeze(E);
  // The memory limit, however the engine reports it: its InternalError "out of memory" when it
  // could still make one, else `null` -- at the limit QuickJS often cannot allocate that error, and
  // what is thrown is then null (a codec's own `throw null` is taken for the limit too: nothing tells
  // the two apart, and a fresh runtime is the safe answer to both).
  function outOfMemory(e) {
    return e === null || (typeof e === "object" && getProto(e) === E && e.message === "out of memory");
  }
  function refused(e) {
    var text;
    try {
      text = outOfMemory(e) ? "#" : "!";
      return text + stringify(String(e));
    } catch (again) {  // (showing it failed: for want of memory too, if that is what it threw)
      return (text === "#" || outOfMemory(again) ? "#" : "!") + '"a value that cannot be shown"';
    }
  }
  function fixed(name, fn) {
    defineProperty(global, name, {value: fn, writable: false, enumerable: false, configurable: false});
  }
  // the globals a call added, deleted; false if one cannot be (then the runtime is made anew)
  function clean() {
    var names = ownNames(global);
    if (names.length === nbaseline) return true;  // (only ever added to: locked below)
    var ok = true;
    for (var i = 0; i < names.length; i++)
      if (!(names[i] in baseline) && !remove(global, names[i])) ok = false;  // (false, not a throw)
    return ok;
  }
  fixed("__corem_load", function (script) {
    try {
      var head = "function () {\n", tail = "\n;return typeof decodeUplink === 'function' ? decodeUplink : null;\n}";
      factory = (0, eval)("(" + head + script + tail + ")");
      // a script that closes the function it is wrapped in (`}); ...; (function () {`) would run
      // at load and keep what it made for every call: the factory must be the whole text
      if (typeof factory !== "function" || fnText.call(factory) !== head + script + tail) return "~";
      var codec = factory.call(global);  // (its top level once now: a throw or no decodeUplink refuses it)
      return codec === null ? "?" : clean() ? "" : "~";
    } catch (e) {
      return refused(e);
    }
  });
  fixed("__corem_decode", function (payload, fPort, recvTime, variables) {
    var out;
    try {
      var bytes = [], n = payload.length;
      for (var i = 0; i < n; i++) bytes.push(fromCode.call(payload, i));
      var codec = factory.call(global);
      var result = codec({bytes: bytes, fPort: fPort, recvTime: new DateC(recvTime), variables: parse(variables)});
      out = stringify(result === undefined ? null : result);
    } catch (e) {
      out = refused(e);
    }
    return clean() ? out : "*" + out;
  });
  // Built-ins that work through their input or output (a whole array, string or JSON text) count
  // that work against the CPU limit.  QuickJS asks its interrupt handler (the binding's: the call's
  // CPU time against its limit) every 10,000 or so operations, and one built-in call is one however
  // long it runs: `while (true) JSON.stringify(a)` over 5,000 elements ran 1.7 s at a 50 ms limit,
  // on the event loop.  Each such call is therefore followed by one empty loop turn (one operation)
  // per TICK elements it went through, so the handler is asked at least every 10,000 * TICK elements
  // of work -- ~10-30 ms of it -- as it is every 10,000 turns of a plain loop; whether to stop is
  // still the CPU time's to say.  (~2-5 ns a turn: a few % of the built-in's own time; a call on a
  // few bytes makes none.)  What is not a call is not counted: an operator on huge strings or
  // BigInts (`s + s`), which the memory limit bounds.
  // A call that reads a part of its string or array (`s.slice(k, k + 2)`) is charged that part, not
  // the whole: charged the whole, a codec slicing a 16 KB hex string two characters at a time did
  // quadratic work and ran out of its time on an 8 KB payload it had decoded in 5 ms.
  var TICK = 64, isArray = Array.isArray, isView = ArrayBuffer.isView, apply = Reflect.apply;
  var PART = {slice: 1, substring: 1, substr: 1, startsWith: 1, endsWith: 1};
  function sizeOf(v) {
    return typeof v === "string" || isArray(v) || isView(v) ? v.length : 0;
  }
  function counted(owner, name) {
    var d = getOwn(owner, name);
    if (!d || typeof d.value !== "function") return;
    var fn = d.value, whole = !PART[name];
    var wrapped = {[name]() {  // (a method, so not a constructor, as the built-in; its name the built-in's)
      var out = apply(fn, this, arguments), work = (whole ? sizeOf(this) : 0) + sizeOf(out);
      for (var i = 0; i < arguments.length; i++) work += sizeOf(arguments[i]);
      for (var turns = work / TICK; turns > 1; turns--) {}  // (each turn: one operation, one tick)
      return out;
    }}[name];
    defineProperty(wrapped, "length", {value: fn.length});
    d.value = wrapped;
    defineProperty(owner, name, d);
  }
  var TA = getProto(Uint8Array.prototype);
  ["fill", "slice", "splice", "concat", "join", "indexOf", "lastIndexOf", "includes", "reverse", "copyWithin",
   "sort", "toSorted", "toReversed", "toSpliced", "flat", "shift", "unshift", "toString", "with"].forEach(function (m) {
    counted(Array.prototype, m);
  });
  ["fill", "set", "slice", "join", "indexOf", "lastIndexOf", "includes", "sort", "reverse", "copyWithin",
   "toSorted", "toReversed", "with", "toString"].forEach(function (m) { counted(TA, m); });
  ["repeat", "split", "replace", "replaceAll", "padStart", "padEnd", "indexOf", "lastIndexOf", "includes",
   "slice", "substring", "substr", "concat", "toUpperCase", "toLowerCase", "trim", "trimStart", "trimEnd",
   "normalize", "match", "search", "localeCompare", "startsWith", "endsWith"].forEach(function (m) {
    counted(String.prototype, m);
  });
  counted(JSON, "stringify");
  counted(JSON, "parse");
  counted(Array, "from");
  counted(String, "fromCharCode");
  ["keys", "values", "entries", "assign", "getOwnPropertyNames"].forEach(function (m) { counted(Object, m); });
  // every built-in frozen (the global object's own properties locked, the object kept extensible:
  // sloppy code's `i = 0` makes a global, which clean() deletes after the call)
  var seen = [], stack = [];
  ownKeys(global).forEach(function (k) {
    var d = getOwn(global, k);
    if (typeof k === "string") baseline[k] = true;
    if (d.configurable || d.writable) {
      if ("value" in d) d.writable = false;
      d.configurable = false;
      defineProperty(global, k, d);
    }
    if (d.value !== global) stack.push(d.value, d.get, d.set);
  });
  nbaseline = ownNames(global).length;
  stack.push(getProto(global));
  while (stack.length) {
    var o = stack.pop();
    if ((typeof o !== "object" && typeof o !== "function") || o === null || o === global || isFrozen(o)) continue;
    freeze(o);
    stack.push(getProto(o));
    var keys = ownKeys(o);
    for (var i = 0; i < keys.length; i++) {
      var d = getOwn(o, keys[i]);
      stack.push(d.value, d.get, d.set);
    }
  }
})(globalThis);
"""


#: run in a runtime of its own, built-ins not frozen, at load: the name of a property the script's
#: top level adds to a built-in (`Number.prototype.toHex = ...`, a common helper in codecs), or "".
#: Frozen, such a write is ignored in sloppy code, and every call would then fail on the missing
#: helper ("not a function"): the script is refused when the profile is written, naming it.
ADDS_TO_BUILTINS = r"""
(function (script) {
  var ownKeys = Reflect.ownKeys, getProto = Object.getPrototypeOf, S = String, tag = Symbol.toStringTag;
  var owners = [], names = [], before = [], i, k;
  var cs = [Object, Array, String, Number, Boolean, Date, Math, JSON, Function, RegExp, Error, ArrayBuffer, DataView,
            Uint8Array, Map, Set, Promise, Symbol, BigInt, Reflect];
  for (i = 0; i < cs.length; i++) {
    owners.push(cs[i]); names.push(cs[i][tag] || cs[i].name);
    if (cs[i].prototype) { owners.push(cs[i].prototype); names.push((cs[i][tag] || cs[i].name) + ".prototype"); }
  }
  owners.push(getProto(Uint8Array.prototype)); names.push("TypedArray.prototype");
  // (what the script's top level may replace is read before it runs: primitives and loops only)
  for (i = 0; i < owners.length; i++) before.push(ownKeys(owners[i]));
  try {
    (0, eval)("(function () {\n" + script + "\n})").call(globalThis);
  } catch (e) {
    return "";  // (its load in the frozen runtime says why, or ran fine there)
  }
  for (i = 0; i < owners.length; i++) {  // (keys keep their order: an added one is where the two first differ)
    var keys = ownKeys(owners[i]);
    if (keys.length > before[i].length)
      for (k = 0; k < keys.length; k++) if (keys[k] !== before[i][k]) return names[i] + "." + S(keys[k]);
  }
  return "";
})
"""


class JsCodec:
    def __init__(self, script: str, *, fport: int = 1, variables: dict[str, Any] | None = None,
                 timeout_ms: int = 50, max_memory_mb: int = 32) -> None:
        self.script = script
        self.fport = fport
        self.variables = json.dumps(variables or {})
        self.timeout_ms = timeout_ms
        self.max_memory = max_memory_mb * 1024 * 1024
        self._lock = threading.Lock()
        #: its calls and loads, as the watchdog sees them
        self._watched = Watched()
        #: (after a runtime made anew did not load) when a call may try again, and why it did not
        self._load_failed = (0.0, "")
        with self._lock:
            self._ctx, self._decode = self._start()
        self._adds_to_builtins()  # (once: the script does not change; not at each `_restart`, on the loop)

    def _start(self, watch_s: float = LOAD_LIMIT_S) -> tuple[Any, Any]:
        """A fresh runtime with the codec loaded (ProfileError if it does not load)."""
        if quickjs is None:
            raise ProfileError(needs("format: 'js'", "js"))
        ctx = quickjs.Context()
        ctx.set_memory_limit(self.max_memory)
        ctx.set_time_limit(LOAD_LIMIT_S)
        def load() -> Any:
            ctx.eval(PRELUDE)
            return ctx.get("__corem_load")(self.script)

        result, error, stopped = self._watched.call(ctx, watch_s, load)
        if error is not None or stopped:
            raise ProfileError(
                f"script: does not load: {self._limit(error, int(LOAD_LIMIT_S * 1000), stopped)}") from None
        if result == "?":
            raise ProfileError("script: defines no function decodeUplink(input)")
        if result == "~":
            raise ProfileError("script: does not load: not one script (it closes the function corem runs it in, "
                               "or defines a global that cannot be deleted)")
        if result[:1] == "#":
            raise ProfileError(f"script: does not load: used more than its {self.max_memory >> 20} MB")
        if result:
            raise ProfileError(f"script: does not load: {_first_line(json.loads(result[1:]))}")
        ctx.set_time_limit(self.timeout_ms / 1000)
        return ctx, ctx.get("__corem_decode")

    def _adds_to_builtins(self) -> None:
        """ProfileError if the script's top level adds to a built-in (`ADDS_TO_BUILTINS`)."""
        ctx = quickjs.Context()
        ctx.set_memory_limit(self.max_memory)
        ctx.set_time_limit(LOAD_LIMIT_S)
        added, error, stopped = self._watched.call(ctx, LOAD_LIMIT_S, lambda: ctx.eval(ADDS_TO_BUILTINS)(self.script))
        if error is not None:  # (a limit: the frozen runtime's load passed, so it is not one to judge)
            if str(error).startswith("SyntaxError"):  # (corem's own text: never the script's, which eval catches)
                raise error
            return
        if added and not stopped:
            raise ProfileError(f"script: adds {added} to a built-in, which corem freezes (each call starts from "
                               "the same built-ins): define it as a function of the script instead")

    def _restart(self) -> None:
        """A fresh runtime after a limit: the state the run left behind is gone.  On the event
        loop, so the load is watched as a call is (STOP_AFTER_MIN, not 5 x the load's limit: a
        script whose top level did heavier work than when its profile was written held the loop
        for seconds more); if it does not load, calls are answered 5.03 for RETRY_LOAD_AFTER
        before a call tries again (not a load a message)."""
        self._ctx = self._decode = None
        try:
            self._ctx, self._decode = self._start(self.timeout_ms / 1000)
        except ProfileError as e:
            self._load_failed = (time.monotonic() + RETRY_LOAD_AFTER, str(e))

    def _limit(self, e: Exception | None, ms: int, stopped: bool = False) -> str:
        """What stopped the engine: its time (QuickJS's own look, or the watchdog's: `stopped`) or
        its memory (the only exceptions that escape)."""
        if stopped or str(e).startswith("InternalError: interrupted"):
            return f"ran longer than its {ms} ms"
        return f"used more than its {self.max_memory >> 20} MB"

    def __call__(self, content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        if not payload:
            raise PayloadError("empty payload")
        text = bytes(payload).decode("latin-1")  # one char a byte: the wrapper makes them numbers
        with self._lock:
            if self._decode is None:  # the runtime made anew after a limit did not load: try again, now and then
                if time.monotonic() >= self._load_failed[0]:
                    self._restart()
                if self._decode is None:
                    raise Overloaded(f"codec: {self._load_failed[1]}", "codec")
            # (now_ms a float: the binding cuts an int past 32 bits to int32, as a JS_TAG_INT)
            result, error, stopped = self._watched.call(self._ctx, self.timeout_ms / 1000, self._decode, text,
                                                        self.fport, float(int(now_ms)), self.variables)
            if error is not None or stopped:  # (stopped, yet returned: its runtime's memory limit is gone)
                reason = self._limit(error, self.timeout_ms, stopped)
                self._restart()
                raise Overloaded(f"codec: {reason}", "codec") from None
            if not isinstance(result, str):  # JSON.stringify's undefined: a function, a symbol
                result = "null"
            if result[:1] == "*":  # the call left a global behind that cannot be deleted: a fresh runtime
                result = result[1:]
                if result[:1] != "#":
                    self._restart()
            if result[:1] == "#":
                self._restart()
                raise Overloaded(f"codec: used more than its {self.max_memory >> 20} MB", "codec")
        if result[:1] == "!":
            raise PayloadError(f"codec: threw {_first_line(json.loads(result[1:]))}", "codec")
        try:
            out = json.loads(result)
        except RecursionError:  # (what JSON.stringify wrote nests past what Python's parser recurses)
            raise PayloadError("codec: data nested too deep", "codec.data") from None
        return [_point(out)]


def _point(result: Any) -> Readings:
    if not isinstance(result, dict):
        raise PayloadError("codec: decodeUplink returned no object", "codec")
    errors = result.get("errors")
    if errors:
        shown = "; ".join(str(e) for e in errors[:3]) if isinstance(errors, list) else str(errors)
        raise PayloadError(f"codec: {shown[:200]}", "codec")
    data = result.get("data")
    if not isinstance(data, dict):
        raise PayloadError("codec: decodeUplink returned no data object", "codec.data")
    numeric: dict[str, float] = {}
    strings: dict[str, str] = {}
    for key, value in data.items():
        put_value(key, value, "", "flatten", numeric, strings)
    if not numeric and not strings:
        raise PayloadError("codec: data has no readings", "codec.data")
    # JavaScript text is UTF-16: a codec that builds text from code units can return a lone surrogate,
    # which no UTF-8 (the stored point's JSON) can hold -- the codec's 4.00 here, not a 5.00 when
    # the point is encoded
    for key in numeric:
        _unicode(key, key)
    for key, text in strings.items():
        _unicode(key, key)
        _unicode(text, key)
    return Readings(numeric, strings, None)


def _unicode(text: str, field: str) -> None:
    """Refuses a name or text holding a lone surrogate (4.00 naming its field, shown escaped)."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise PayloadError("codec: not valid Unicode text (a lone surrogate)",
                               field.encode(errors="backslashreplace").decode()) from None


def _first_line(text: str) -> str:
    """The first line of what was thrown, as `String(thrown)` shows it (V8's message did the same)."""
    lines = text.strip().splitlines()
    return (lines[0] if lines else "")[:200]


#: the codecs made, by everything a profile gives them: at most this many kept
MAX_CODECS = 256
_codecs: OrderedDict[tuple[Any, ...], JsCodec] = OrderedDict()
_codecs_lock = threading.Lock()


def js_codec(script: str, *, fport: int = 1, variables: dict[str, Any] | None = None, timeout_ms: int = 50,
             max_memory_mb: int = 32) -> JsCodec:
    """The codec of these settings: one already made, else a new one (kept, the least recently
    asked for dropped past MAX_CODECS).  Each call starts with fresh state, so sharing one is
    invisible to its callers; making one costs ~3 ms (the runtime, the frozen built-ins), which
    every registry change recompiling the profiles -- and a test harness's every reset -- paid
    again for each JS profile.  ProfileError, as JsCodec, when the script does not load."""
    key = (script, fport, json.dumps(variables or {}, sort_keys=True), timeout_ms, max_memory_mb)
    with _codecs_lock:
        codec = _codecs.get(key)
        if codec is not None:
            _codecs.move_to_end(key)
            return codec
    codec = JsCodec(script, fport=fport, variables=variables, timeout_ms=timeout_ms, max_memory_mb=max_memory_mb)
    with _codecs_lock:
        _codecs[key] = codec
        while len(_codecs) > MAX_CODECS:
            _codecs.popitem(last=False)
    return codec
