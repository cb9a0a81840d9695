"""Log lines on stderr, one per record: logfmt (`log_format = "kv"`, the default) or JSON.

Every line has `ts` (RFC 3339, UTC, milliseconds: `2026-11-24T11:07:53.850+00:00`), `level`,
`logger`, `worker` (with `--workers`, in a worker), `msg`, then the record's structured fields,
each its own key (`log.info("started", extra=fields(coap=address))`), then `exc` (a traceback, as
one value).  The message stays a sentence a person reads; the fields are what a machine reads.

logfmt as Heroku, Go's go-logfmt and Loki read it: `key=value` pairs separated by one space; a
value is written bare unless it is empty or holds a space, `=`, `"`, `\\` or a control character,
and then in double quotes with `\\`, `"` and control characters escaped (`\\n`, `\\t`, `\\u001b`),
so a line never breaks.  Values: an address `(host, port)` is `host:port` (`[v6]:port`), never a
Python tuple; None is `""` (null in JSON); booleans `true`/`false`.

The lines that say where corem listens (`coap listening on udp 127.0.0.1:5683`) and that it
stopped are logged by `corem.serve` at info whatever `log_level` says: with port 0 they are the
only place the ports are told, and tests and scripts wait for them.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

import msgspec

#: the logger of the start and stop lines (always at info: see the module's docstring)
SERVE = "corem.serve"
RESERVED = ("ts", "level", "logger", "worker", "msg", "exc")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_NEEDS_QUOTES = re.compile(r'[\s="\\\x00-\x1f\x7f]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED = re.compile(r'[\\"\x00-\x1f\x7f]')


class Every:
    """One warning line every `seconds` at most for a trouble that repeats while it lasts (a disk
    that refuses, a database away): `due()` says whether to say it now -- the first time, then
    once the interval has passed.  One per trouble: two troubles sharing one would hide each other."""

    __slots__ = ("seconds", "_next")

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self._next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.seconds
        return True


def fields(**values: Any) -> dict[str, Any]:
    """A record's structured fields, for `extra=`: each becomes its own key on the line."""
    return {"fields": values}


def address(value: Any) -> Any:
    """`(host, port, ...)` (IPv6's 4-tuple, a TCP connection's serial after them) as `host:port` /
    `[host]:port`; anything else as it is."""
    if (isinstance(value, tuple) and len(value) >= 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        host = value[0]
        return f"[{host}]:{value[1]}" if ":" in host else f"{host}:{value[1]}"
    return value


def plain(value: Any) -> Any:
    """A field's value as JSON has it: addresses as text, paths as text, other objects as str()."""
    value = address(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def logfmt_value(value: Any) -> str:
    value = plain(value)
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _ESCAPED.sub(lambda m: _ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text) + '"'


def logfmt_key(key: str) -> str:
    return _KEY_BAD.sub("_", key) or "_"


def message(record: logging.LogRecord) -> str:
    """The record's message with its %-arguments, addresses among them as `host:port`."""
    args = record.args
    if isinstance(args, tuple) and args:
        try:
            return str(record.msg) % tuple(address(a) for a in args)
        except (TypeError, ValueError):
            pass
    return record.getMessage()


class _Lines(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def pairs(self, record: logging.LogRecord) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = [
            ("ts", datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")),
            ("level", record.levelname.lower()),
            ("logger", record.name),
        ]
        if self.worker is not None:
            out.append(("worker", self.worker))
        out.append(("msg", message(record)))
        for key, value in (getattr(record, "fields", None) or {}).items():
            out.append((f"_{key}" if key in RESERVED else key, value))
        if record.exc_info:
            out.append(("exc", self.formatException(record.exc_info)))
        elif record.stack_info:
            out.append(("exc", self.formatStack(record.stack_info)))
        return out


class LogfmtFormatter(_Lines):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{logfmt_key(k)}={logfmt_value(v)}" for k, v in self.pairs(record))


class JsonFormatter(_Lines):
    def format(self, record: logging.LogRecord) -> str:
        return msgspec.json.encode({k: plain(v) for k, v in self.pairs(record)}).decode()


def formatter(log_format: str, worker: int | None = None) -> logging.Formatter:
    """The formatter of `log_format` ("kv": logfmt, "json")."""
    return JsonFormatter(worker) if log_format == "json" else LogfmtFormatter(worker)


def use_format(log_format: str) -> int:
    """SIGHUP's `log_format` (corem/reload.py): the formatter of every handler `setup_logging`
    installed swapped, each keeping its `worker`; the next line is in the new format.  Returns how
    many handlers changed (0: logging was set up by someone else, e.g. an embedding program)."""
    n = 0
    for handler in logging.getLogger().handlers:
        old = handler.formatter
        if isinstance(old, _Lines):
            handler.setFormatter(formatter(log_format, old.worker))
            n += 1
    return n


def setup_logging(log_level: str, log_format: str, worker: int | None = None) -> None:
    """Log lines to stderr as logfmt or JSON (`log_format`); in a worker, `worker=N` on each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, worker))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    logging.getLogger(SERVE).setLevel(logging.INFO)
