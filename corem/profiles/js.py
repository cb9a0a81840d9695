"""JavaScript payload codecs with the LoRa Alliance TS013 Payload Codec API, so that a codec written
for The Things Stack or ChirpStack runs unchanged:

    function decodeUplink(input) {   // input: {bytes, fPort, recvTime, variables}
      return {data: {temperature: ...}, warnings: [], errors: []};
    }

Each profile's codec runs in its own V8 isolate (mini-racer, the maintained embedding of V8 for
Python: no Node, so no `require`, no network, no files, no timers -- only the language), with a
CPU-time and a heap limit per call.  A codec that throws, or returns `errors`, refuses the reading
(4.00, field `codec`); one that runs past its limits is answered 5.03 and its isolate is made anew,
so the next call -- and every other profile's -- starts clean.  `data` becomes one point, nested
objects flattened to `outer.inner` as for ThingsBoard's `nested: flatten`.

Why mini-racer: a real JavaScript engine (the codecs are written against V8 and SpiderMonkey, not a
subset), in-process (no Node child per call), with per-call time and memory limits built in, and
wheels on PyPI.  A call costs ~0.15 ms (measured: bench/formats_bench.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..ingest.payload import Overloaded, PayloadError, Readings
from .formats import put_value
from .spec import ProfileError

#: called with the payload as an array of numbers; JSON text back, so one conversion each way
WRAPPER = """
;function __corem_decode(bytes, fPort, recvTime, variables) {
  var out = decodeUplink({bytes: bytes, fPort: fPort, recvTime: new Date(recvTime), variables: variables});
  return JSON.stringify(out === undefined ? null : out);
}
"""


class JsCodec:
    def __init__(self, script: str, *, fport: int = 1, variables: dict[str, Any] | None = None,
                 timeout_ms: int = 50, max_memory_mb: int = 32) -> None:
        self.script = script
        self.fport = fport
        self.variables = json.dumps(variables or {})
        self.timeout_ms = timeout_ms
        self.max_memory = max_memory_mb * 1024 * 1024
        self._ctx = self._start()

    def _start(self) -> Any:
        """A fresh isolate with the codec loaded (ProfileError if it does not load)."""
        try:
            from py_mini_racer import JSEvalException, MiniRacer
        except ImportError:  # pragma: no cover - mini-racer is a dependency
            raise ProfileError("script: the js format needs mini-racer (pip install mini-racer)") from None
        ctx = MiniRacer()
        try:
            ctx.eval(self.script + WRAPPER, timeout=1000, max_memory=self.max_memory)
            kind = ctx.eval("typeof decodeUplink")
        except JSEvalException as e:
            raise ProfileError(f"script: does not load: {_first_line(e)}") from None
        if kind != "function":
            raise ProfileError("script: defines no function decodeUplink(input)")
        return ctx

    def __call__(self, content_format: int | None, payload: bytes | bytearray | memoryview, now_ms: int) -> list[Readings]:
        from py_mini_racer import JSEvalException, JSOOMException, JSTimeoutException

        if not payload:
            raise PayloadError("empty payload")
        call = f"__corem_decode({list(bytes(payload))}, {self.fport}, {int(now_ms)}, {self.variables})"
        try:
            text = self._ctx.eval(call, timeout=self.timeout_ms, max_memory=self.max_memory)
        except JSTimeoutException:
            self._ctx = self._start()
            raise Overloaded(f"codec: ran longer than its {self.timeout_ms} ms", "codec") from None
        except JSOOMException:
            self._ctx = self._start()
            raise Overloaded(f"codec: used more than its {self.max_memory >> 20} MB", "codec") from None
        except JSEvalException as e:
            raise PayloadError(f"codec: threw {_first_line(e)}", "codec") from None
        return [_point(json.loads(text) if isinstance(text, str) else None)]


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
    return Readings(numeric, strings, None)


def _first_line(e: Exception) -> str:
    """V8's message, without the place of corem's own call (`<anonymous>:1: `)."""
    text = str(e).strip().splitlines()
    return re.sub(r"^<anonymous>:\d+: ", "", text[0] if text else type(e).__name__)[:200]
