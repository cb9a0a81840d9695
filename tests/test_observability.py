"""Metrics for operators (issue 30): the receive-to-answer histogram (Python path and C lane), the
process and platform families (one process and --workers), the diagnostics UI's ring of the last
hour, the Grafana dashboard and the Prometheus alert rules -- `promtool check metrics` on a real
scrape of a running `corem serve`, `promtool check rules` and `promtool test rules` on the rules."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import cbor2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corem.admin.history import BUS_REFUSED, History, Totals
from corem.coap import Endpoint, Router
from corem.coap.response import Response
from corem.codec import Code, Message, Type, encode
from corem.codec import OptionNumber as O
from corem.latency import BOUNDS, DOORS, LANE_DOORS, Latency, door_of
from corem.metrics import FAMILIES, ProcessMetrics, gather, render

from .conftest import SPEC_IDENTITY, SPEC_KEY, post, start_corem, wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "ops" / "prometheus" / "corem-alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "corem-alerts.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "corem.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and os.environ.get("CI") != "true",
    reason="promtool (Debian's prometheus package) is not installed; `make test` installs it as root",
)


def families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def promtool(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is not installed (CI must have it: make sysdeps)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd, input=stdin)


def named(expr: str) -> set[str]:
    """The metric families a PromQL expression reads (suffixes of counters and histograms off)."""
    out = set()
    for name in re.findall(r"\b((?:corem|process|python)_[a-z_]+)", expr):
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name.removesuffix(suffix) in FAMILIES:
                name = name.removesuffix(suffix)
        out.add(name)
    return out


# -- the histogram, sans-IO -------------------------------------------------------------------------
def test_a_duration_on_a_bound_is_in_that_bucket_and_the_lane_has_the_same_bounds():
    lat = Latency()
    for seconds in (0.0, 0.00025, 0.0003, 10.0, 11.0, -1.0):
        lat.observe("corem", seconds)
    (h,) = lat.metrics()
    assert h.counts[0] == 3 and h.counts[1] == 1 and h.counts[len(BOUNDS) - 1] == 1 and h.counts[-1] == 1
    assert h.labels == (("door", "corem"),) and h.total == pytest.approx(21.00055)
    from corem.fastlane import Lane

    if Lane is None and os.environ.get("CI") != "true":
        pytest.skip("the C fast lane is not built")
    from corem.bus.base import Record

    assert Lane(Record).counters()["latency_bounds"] == BOUNDS


def test_each_request_is_timed_under_the_door_its_route_belongs_to():
    now = [100.0]
    ep, router = Endpoint(), Router()
    ep.clock = lambda: now[0]
    later = []
    router.add("api/v1/{token}/telemetry", {Code.POST: lambda req, p: later.append(req)})
    router.add("telemetry", {Code.POST: lambda req, p: Response(Code.CHANGED)})
    router.add("ps/{topic*}", {Code.POST: lambda req, p: Response(Code.CHANGED)})
    router.add("sensors/x", {Code.GET: lambda req, p: Response(Code.CONTENT)}, door="mine")

    def ask(mid: int, path: list[bytes], code: int = Code.POST):
        req = ep.receive(encode(Message(Type.CON, code, mid, b"t", [(O.URI_PATH, p) for p in path])),
                         ("192.0.2.1", 5683), now[0])
        answer = router.dispatch(req)
        if answer is not None:
            req.respond(answer.code)

    ask(1, [b"api", b"v1", b"TOKEN", b"telemetry"])
    now[0] += 0.004  # the reading's commit
    later.pop().respond(Code.CHANGED)
    ask(2, [b"telemetry"])
    ask(3, [b"ps", b"a", b"b"])
    ask(4, [b"sensors", b"x"], Code.GET)
    ask(5, [b"nowhere"])
    got = {m.labels: m for m in ep.metrics() if m.name == "corem_request_duration_seconds"}
    assert set(got) == {(("door", d),) for d in ("thingsboard", "corem", "emqx", "mine", "none")}
    tb = got[(("door", "thingsboard"),)]
    assert tb.total == pytest.approx(0.004) and tb.counts[BOUNDS.index(0.005)] == 1  # (0.003, 0.005]
    assert door_of("v1/{channel}") == "drogue" and door_of(".well-known/core") == "discovery"
    assert door_of("mine/x") == "site" and set(LANE_DOORS) <= set(DOORS.values())
    # without a clock (sans-IO, as the other tests drive it) nothing is timed
    assert not list(Endpoint().latency.metrics())


def test_the_lane_times_the_readings_it_answers_and_python_its_own():
    from .lane_twin import Twin
    from .test_fastlane import post as lane_post

    twin = Twin()
    try:
        for side in (twin.lane, twin.python):
            side.endpoint.clock = lambda: twin.clock[0]
        twin.receive(lane_post())  # (a device's first reading may be the Python path's: the lane learns it)
        twin.commit()
        twin.receive(lane_post(mid=0x1000))  # the lane's, piggybacked
        twin.commit()
        twin.receive(lane_post(mid=0x2000))
        twin.advance(0.6)  # past the piggyback timeout: an empty ACK, then the answer separately
        twin.commit()
        twin.check()

        def histogram(side):
            values = gather((c, {"transport": "udp"}) for c in
                            [side.endpoint] + ([side.lane] if side.lane is not None else []))
            return values["corem_request_duration_seconds"]

        key = (("transport", "udp"), ("door", "thingsboard"))
        lane = histogram(twin.lane)[key]
        c = twin.lane.lane.lane.counters()["latency"]
        assert sum(c[0][0]) >= 2 and sum(c[1][0]) == 0  # the lane's (/api/v1/...: door 0), the late one too
        assert sum(lane.counts) == 3 and 0 <= lane.total < 30  # with its endpoint's (the lane's clock is the machine's)
        python = histogram(twin.python)[key]
        assert sum(python.counts) == 3 and python.total == pytest.approx(0.6)
    finally:
        twin.close()


# -- the process's families --------------------------------------------------------------------------
def test_process_families_are_labelled_by_worker_and_python_info_is_not():
    got = families(render(lambda: [(ProcessMetrics("3"), {}), (ProcessMetrics("supervisor", platform=False), {})]).decode())
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_gc_collections_total"):
        fam = name.removesuffix("_total")
        workers = {s.labels["worker"] for s in got[fam] if s.name == name}
        assert workers == {"3", "supervisor"}, name
    (info,) = got["python_info"]
    assert "worker" not in info.labels and info.labels["implementation"]
    one = families(render(lambda: [(ProcessMetrics(), {})]).decode())
    assert one["process_resident_memory_bytes"][0].labels == {} and one["process_resident_memory_bytes"][0].value > 1e6


# -- the ring ----------------------------------------------------------------------------------------
def test_the_ring_keeps_what_each_source_counted_since_its_last_sample():
    now = [1000.0]
    h = History(interval=10, size=3, clock=lambda: now[0])
    a = Totals(readings=100, rejections={"decode_error": 2}, handshakes=5, handshake_failures={"bad_mac": 1}, backlog=7)
    h.record({"w0": a})
    now[0] += 10
    a2 = Totals(readings=160, rejections={"decode_error": 5, "range": 1}, handshakes=5,
                handshake_failures={"bad_mac": 1}, backlog=3)
    b = Totals(readings=20, rejections={}, backlog=1)  # a worker started again: all it counted
    s = h.record({"w0": a2, "w1-new": b})
    assert (s["seconds"], s["readings"], s["rejections"], s["handshakes"], s["handshake_failures"], s["backlog"]) == (
        10, 80, {"decode_error": 3, "range": 1}, 0, {}, 4)
    now[0] += 10
    s = h.record({"w1-new": Totals(readings=25)})  # w0 did not answer: its counts come next time
    assert s["readings"] == 5 and s["backlog"] == 0
    now[0] += 4
    snap = h.snapshot({"w0": Totals(readings=170), "w1-new": Totals(readings=25)})
    assert snap["current"]["readings"] == 10 and snap["current"]["seconds"] == 4
    h.record({})
    assert len(h.samples) == 3 and snap["interval"] == 10  # bounded: the oldest went


def test_totals_read_the_same_families_as_metrics():
    class Part:
        def metrics(self):
            from corem.stats import counter, gauge

            yield counter("corem_telemetry_points", 7, tenant="a")
            yield counter("corem_telemetry_points", 3, tenant="b")
            yield counter("corem_protocol_payload_rejections", 2, protocol="coap", reason="decode_error")
            yield counter("corem_auth_failures", 4, protocol="coap", reason="unknown_token")
            yield counter("corem_telemetry_bus_refusals", 1)
            yield counter("corem_dtls_handshakes_completed", 9)
            yield counter("corem_dtls_handshakes_failed", 2, reason="bad_mac")
            yield gauge("corem_sink_pending", 11, sink="embedded")

    t = Totals.of(gather([(Part(), {})]))
    assert t == Totals(readings=10, rejections={"decode_error": 2, "unknown_token": 4, BUS_REFUSED: 1},
                       handshakes=9, handshake_failures={"bad_mac": 2}, backlog=11)


# -- a running corem serve -----------------------------------------------------------------------------
def json_post(port: int, token: str, body: bytes, mid: int) -> int:
    """A CON POST of JSON (Content-Format 50: the Python path's, not the lane's); the answer's code."""
    msg = encode(Message(Type.CON, Code.POST, mid, b"\x05", [
        (O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, token.encode()), (O.URI_PATH, b"telemetry"),
        (O.CONTENT_FORMAT, b"\x32")], body))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s.sendto(msg, ("127.0.0.1", port))
            try:
                data = s.recv(2048)
            except socket.timeout:
                continue
            if data[2:4] == msg[2:4] and data[1]:
                return data[1]
    raise AssertionError("no answer")


def traffic(server) -> None:
    """What the charts and the histogram should show: three CBOR readings (the fast lane's, once the
    first taught it the device), one JSON reading accepted and one rejected (the Python path's), a
    DTLS session's reading to /telemetry, a handshake with a wrong key."""
    from .dtls_udp_client import DtlsUdpClient

    for mid in range(3):
        answer = post(server.coap_port, "T0KEN-1", cbor2.dumps({"t": 20 + mid}), 0x100 + mid)
        assert answer is not None and answer[1] == Code.CHANGED
    assert json_post(server.coap_port, "T0KEN-1", b'{"t": 1}', 0x200) == Code.CHANGED
    assert json_post(server.coap_port, "T0KEN-1", b'{"t": {"nested": 1}}', 0x201) == Code.BAD_REQUEST
    device = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode())
    try:
        device.handshake()
        assert device.post(["telemetry"], cbor2.dumps({"t": 1})).code == Code.CHANGED
    finally:
        device.close()
    wrong = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, b"not-the-key-at-all")
    try:
        from mbedtls.exceptions import TLSError

        # (corem's alert, or its silence: either way no session; the server counts the failure
        # from the Finished the client sent, whatever the client's own bound)
        with pytest.raises((TLSError, TimeoutError)):
            wrong.handshake(timeout=10)
    finally:
        wrong.close()


def scrape(server) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=30) as r:
        return r.read().decode()


def duration_counts(text: str) -> dict[tuple[str, str], float]:
    return {(s.labels["transport"], s.labels["door"]): s.value
            for s in families(text)["corem_request_duration_seconds"] if s.name.endswith("_count")}


@needs_promtool
def test_a_running_corem_times_its_answers_shows_its_process_and_passes_promtool(data_dir):
    server = start_corem(data_dir)
    try:
        traffic(server)
        failed = lambda: sum(s.value for s in families(scrape(server))["corem_dtls_handshakes_failed"]  # noqa: E731
                             if s.name.endswith("_total"))
        wait_for(failed, what="the wrong key's handshake counted as failed")
        text = scrape(server)
        counts = duration_counts(text)
        # the CBOR readings (the lane's but the device's first, which teaches it the device) and the JSON
        # ones (the Python path's, one refused); the session's reading to /telemetry
        assert counts[("udp", "thingsboard")] == 5 and counts[("dtls", "corem")] == 1, counts
        got = families(text)
        for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "process_max_fds",
                     "process_start_time_seconds", "python_gc_collections"):
            assert got[name] and all("worker" not in s.labels for s in got[name]), name
        assert len(got["python_info"]) == 1
        assert [s.value for s in got["corem_bus_not_ready"]] == [0.0]
        # promtool lints the real scrape (names, help, counter suffixes, histogram shape)
        r = promtool("check", "metrics", stdin=text)
        assert r.returncode == 0, r.stdout + r.stderr
        # the charts' data: the interval under way holds what came since the last sample
        status, h = server.api("GET", "/api/diagnostics/history")
        assert status == 200 and h["interval"] == 10 and h["samples"]
        seen = h["samples"] + [h["current"]]
        assert sum(s["readings"] for s in seen) == 5  # (the rejected one is not a reading)
        assert sum(s["rejections"].get("decode_error", 0) for s in seen) == 1
        assert sum(s["handshakes"] for s in seen) >= 1 and sum(sum(s["handshake_failures"].values()) for s in seen) >= 1
        assert server.api("GET", "/api/diagnostics/history", token=None)[0] == 401
    finally:
        server.stop()


@needs_promtool
def test_with_workers_each_process_is_its_own_series_and_the_front_keeps_the_ring(data_dir):
    server = start_corem(data_dir, "--workers", "2")
    try:
        traffic(server)
        text = scrape(server)
        got = families(text)
        for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_start_time_seconds"):
            assert {s.labels["worker"] for s in got[name]} == {"0", "1", "supervisor"}, name
        assert len(got["python_info"]) == 1  # the same in every process: once
        counts = duration_counts(text)
        assert counts[("udp", "thingsboard")] == 5 and counts[("dtls", "corem")] == 1, counts
        r = promtool("check", "metrics", stdin=text)
        assert r.returncode == 0, r.stdout + r.stderr

        def history():
            status, h = server.api("GET", "/api/diagnostics/history")
            assert status == 200
            seen = h["samples"] + [h["current"]]
            return sum(s["readings"] for s in seen) == 5 and h

        h = wait_for(history, what="every worker's readings in the front's ring")
        assert sum(s["rejections"].get("decode_error", 0) for s in h["samples"] + [h["current"]]) == 1
    finally:
        server.stop()


# -- the dashboard and the alert rules ------------------------------------------------------------------
def exprs(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_the_dashboard_reads_only_families_corem_exposes():
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    for want in ("Readings / s", "Refused / s, by reason", "Handshakes / s", "Backlog", "Bus latency",
                 "Receive to answer, p50 and p99, by transport", "CPU", "Resident memory"):
        assert want in titles
    for title, expr in exprs(dash):
        assert named(expr) - {"python_info"} <= set(FAMILIES), (title, named(expr) - set(FAMILIES))
    assert "corem_request_duration_seconds" in {n for _, e in exprs(dash) for n in named(e)}
    # the data source is the importer's choice (a variable), nothing is fetched from elsewhere
    text = DASHBOARD.read_text()
    assert '"uid": "${datasource}"' in text and "http://" not in text and "https://" not in text


@needs_promtool
def test_the_dashboards_queries_are_promql(tmp_path):
    """promtool has no query linter: each panel's query, Grafana's variables filled in, as a
    recording rule that `promtool check rules` parses."""
    dash = json.loads(DASHBOARD.read_text())
    rules = [{"record": f"corem:dashboard:{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
             for i, (_, expr) in enumerate(exprs(dash))]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # (JSON is YAML)
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0 and f"{len(rules)} rules found" in r.stdout, r.stdout + r.stderr


@needs_promtool
def test_the_alert_rules_check_and_their_tests_pass():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    r = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_the_alert_rules_cover_the_issue_and_read_only_families_corem_exposes():
    import yaml

    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"CoremBusNotReady", "CoremRejectionsRising", "CoremHandshakeFailures", "CoremStorageErrors",
            "CoremWorkersRestarting"} <= names
    for rule in rules:
        assert named(rule["expr"]) <= set(FAMILIES), (rule["alert"], named(rule["expr"]) - set(FAMILIES))
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
