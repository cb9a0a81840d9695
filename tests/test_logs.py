"""Log lines (corem/logs.py): real logfmt by default and JSON with every field its own key, read
back from a running `corem serve` by a strict parser; the start lines through logging; the admin
HTTP's access log."""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import cbor2
import pytest

from corem.logs import JsonFormatter, LogfmtFormatter, fields

from .conftest import ADMIN_TOKEN, post, start_corem

_PAIR = re.compile(r'([A-Za-z0-9_.-]+)=(?:"((?:[^"\\\x00-\x1f\x7f]|\\["\\nrt]|\\u[0-9a-f]{4})*)"|([^\s="\\\x00-\x1f\x7f]+))')
_UNESCAPE = re.compile(r'\\(["\\nrt]|u[0-9a-f]{4})')


def logfmt(line: str) -> dict[str, str]:
    """A strict logfmt parser: `key=value` pairs separated by single spaces, a value bare (no
    space, `=`, `"`, `\\` or control character) or double-quoted with `\\"`, `\\\\`, `\\n`, `\\r`,
    `\\t` and `\\uXXXX` escapes; anything else (a stray word, a tuple repr, a quote left open, a
    key twice) fails the test."""
    out: dict[str, str] = {}
    pos = 0
    while True:
        m = _PAIR.match(line, pos)
        assert m is not None, f"not logfmt at column {pos}: {line!r}"
        key = m.group(1)
        assert key not in out, f"{key} twice: {line!r}"
        if m.group(3) is not None:
            out[key] = m.group(3)
        else:
            out[key] = _UNESCAPE.sub(lambda e: {"n": "\n", "r": "\r", "t": "\t"}.get(e.group(1), e.group(1))
                                     if len(e.group(1)) == 1 else chr(int(e.group(1)[1:], 16)), m.group(2))
        pos = m.end()
        if pos == len(line):
            return out
        assert line[pos] == " " and line[pos + 1:pos + 2] not in (" ", ""), f"not logfmt at column {pos}: {line!r}"
        pos += 1


def rfc3339(ts: str) -> datetime:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)", ts), ts
    when = datetime.fromisoformat(ts)
    assert when.utcoffset() == timedelta(0)
    return when


def record(msg: str, *args: object, exc: bool = False, **kw: object) -> logging.LogRecord:
    r = logging.LogRecord("corem.test", logging.WARNING, __file__, 1, msg, args or None, None)
    if kw:
        r.fields = kw  # type: ignore[attr-defined]
    if exc:
        try:
            raise ValueError('bad "value"\nsecond line')
        except ValueError:
            r.exc_info = sys.exc_info()
    return r


def test_logfmt_quotes_and_escapes_what_it_must_and_nothing_else():
    line = LogfmtFormatter(worker=3).format(record(
        "peer %s sent %d bytes", ("192.0.2.7", 40312), 12, exc=True,
        peer=("2001:db8::1", 5684, 0, 0), text='say "hi"\\ now', empty="", none=None, eq="a=b", nl="x\ny",
        tab="\t", esc="\x1b[0m", flag=True, n=3, ratio=0.5, path=Path("/var/lib/corem"), unicode="grüße",
        ts="reserved", **{"weird key": 1}))
    assert "\n" not in line
    got = logfmt(line)
    rfc3339(got["ts"])
    assert got["level"] == "warning" and got["logger"] == "corem.test" and got["worker"] == "3"
    assert got["msg"] == "peer 192.0.2.7:40312 sent 12 bytes"  # an address, not a tuple's repr
    assert got["peer"] == "[2001:db8::1]:5684" and got["text"] == 'say "hi"\\ now'
    assert (got["empty"], got["none"], got["eq"], got["nl"], got["tab"], got["esc"]) == ("", "", "a=b", "x\ny", "\t",
                                                                                       "\x1b[0m")
    assert (got["flag"], got["n"], got["ratio"], got["path"], got["unicode"]) == ("true", "3", "0.5", "/var/lib/corem",
                                                                                  "grüße")
    assert got["_ts"] == "reserved" and got["weird_key"] == "1"  # (a field never hides ts, nor breaks the line)
    assert got["exc"].startswith("Traceback") and 'ValueError: bad "value"\nsecond line' in got["exc"]
    assert ' n=3 ' in line and ' flag=true ' in line and ' unicode=grüße ' in line  # bare where it can be
    assert ' empty="" ' in line and ' eq="a=b" ' in line


def test_json_puts_every_field_on_its_own_key():
    line = json.loads(JsonFormatter().format(record("started", coap=("127.0.0.1", 5683), http=None, n=2,
                                                    data_dir=Path("data"))))
    assert line == {"ts": line["ts"], "level": "warning", "logger": "corem.test", "msg": "started",
                    "coap": "127.0.0.1:5683", "http": None, "n": 2, "data_dir": "data"}
    rfc3339(line["ts"])


def get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def exercise(server) -> None:
    """A reading (a device seen), and admin requests: answered, refused, not found."""
    answer = post(server.coap_port, "T0KEN-1", cbor2.dumps({"t": 1}), 77)
    assert answer is not None and answer[1] == 0x44
    base = f"http://127.0.0.1:{server.http_port}"
    assert get(f"{base}/metrics") == 200
    assert get(f"{base}/api/devices?tenant=acme", ADMIN_TOKEN) == 200
    assert get(f"{base}/api/devices") == 401
    assert get(f"{base}/nowhere") == 404


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_running_corem_logs_logfmt(data_dir, workers):
    server = start_corem(data_dir, "--workers", workers)
    try:
        exercise(server)
    finally:
        assert server.stop() == 0
    lines = [logfmt(line) for line in server.stderr().splitlines()]
    for line in lines:
        rfc3339(line["ts"])
        assert line["level"] in ("debug", "info", "warning", "error") and line["logger"].startswith("corem")
        assert "('" not in line["msg"] and "('" not in " ".join(line.values())  # no Python tuple anywhere
    listening = {line["listener"]: line for line in lines if line["msg"].startswith(line.get("listener", "-"))}
    assert set(listening) == {"coap", "coaps", "http"}
    assert listening["coap"]["address"] == f"127.0.0.1:{server.coap_port}"
    assert listening["coap"]["msg"] == f"coap listening on udp 127.0.0.1:{server.coap_port}"
    assert listening["http"]["msg"] == f"http listening on http://127.0.0.1:{server.http_port}"
    assert all(line["logger"] == "corem.serve" and "worker" not in line for line in listening.values())
    [started] = [line for line in lines if line["msg"].startswith("started") and "worker" not in line]
    assert started["coap"] == f"127.0.0.1:{server.coap_port}" and started["http"] == f"127.0.0.1:{server.http_port}"
    assert started["data_dir"] == str(data_dir)
    if workers == "2":
        assert started["workers"] == "2"
        assert {line["worker"] for line in lines if "worker" in line} == {"0", "1"}  # each worker's lines tagged
    access = [line for line in lines if line["logger"] == "corem.http.access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("GET", "/metrics", "200"), ("GET", "/api/devices", "200"), ("GET", "/api/devices", "401"),
        ("GET", "/nowhere", "404")]  # one line each, with workers too (the front's)
    assert access[1]["query"] == "tenant=acme" and access[1]["msg"] == "GET /api/devices 200"
    for a in access:
        assert a["level"] == "info" and float(a["duration_ms"]) >= 0 and int(a["bytes"]) > 0
        assert re.fullmatch(r"127\.0\.0\.1:\d+", a["peer"])
    assert lines[-1]["msg"] == "stopped" and lines[-1]["logger"] == "corem.serve"


def test_a_running_corem_logs_json_with_every_field_a_key(data_dir):
    server = start_corem(data_dir, "--log-format", "json")
    try:
        exercise(server)
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.stderr().splitlines()]
    for line in lines:
        rfc3339(line["ts"])
        assert {"ts", "level", "logger", "msg"} <= set(line)
    [started] = [line for line in lines if line["msg"] == "started"]
    assert started["coap"] == f"127.0.0.1:{server.coap_port}" and started["coaps"] == f"127.0.0.1:{server.coaps_port}"
    assert "coap_tcp" not in started and started["data_dir"] == str(data_dir)  # (only the listeners bound)
    [coap] = [line for line in lines if line.get("listener") == "coap"]
    assert coap["address"] == f"127.0.0.1:{server.coap_port}" and coap["logger"] == "corem.serve"
    [metrics] = [line for line in lines if line["logger"] == "corem.http.access" and line["path"] == "/metrics"]
    assert metrics["method"] == "GET" and metrics["status"] == 200 and isinstance(metrics["duration_ms"], float)
    assert metrics["peer"].startswith("127.0.0.1:")
    assert lines[-1]["msg"] == "stopped"


def test_the_start_lines_are_logged_whatever_the_level(data_dir):
    server = start_corem(data_dir, "--log-level", "warning")  # (start_corem waits for them)
    assert server.stop() == 0
    lines = [logfmt(line) for line in server.stderr().splitlines()]
    assert {line["logger"] for line in lines} == {"corem.serve"}  # nothing else at info
    assert [line["msg"].split(" ")[0] for line in lines] == ["coap", "coaps", "http", "stopped"]


@pytest.mark.parametrize("peer, text", [
    (("127.0.0.1", 5683), "127.0.0.1:5683"), (("::1", 5683, 0, 0), "[::1]:5683"),
    (("127.0.0.1", 40000, 7), "127.0.0.1:40000"),  # a CoAP-over-TCP peer: (host, port, connection serial)
    ("session-1", "session-1"), (("a", "b"), ("a", "b")),
])
def test_one_host_port_formatter_for_every_peer(peer, text):
    """logs.address, the one host:port formatter (admin URLs, log fields, diagnostics samples): a TCP
    peer's serial was printed as a Python tuple in the diagnostics (found by review)."""
    from corem.ingest.telemetry import _peer_str
    from corem.logs import address
    assert address(peer) == text
    assert _peer_str(peer) == str(text)


def test_a_repeating_trouble_is_said_once_a_minute_and_each_trouble_on_its_own(monkeypatch):
    """logs.Every: the first time at once, then not until the interval passed; two troubles, two
    clocks (one shared clock hid a second trouble's line behind the first's)."""
    from corem import logs

    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    offload, foreign = logs.Every(), logs.Every()
    assert offload.due() and not offload.due()
    assert foreign.due()  # (its own: not hidden by the other's line)
    clock[0] += 59.9
    assert not offload.due() and not foreign.due()
    clock[0] += 0.1
    assert offload.due() and foreign.due() and not offload.due()
