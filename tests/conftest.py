"""Shared fixtures: a real `corem serve` process on loopback, and libcoap's real client."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, settings

from .coap_answers import IN_ACK, SEPARATE, ack_for, answer_kind

# A busy CI machine gives a test a fraction of a core: hypothesis's 200 ms deadline per example and
# its data-generation speed check would fail tests on wall-clock time alone, not on what they test.
settings.register_profile("corem", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("corem")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist (`make test`: a worker per core), a test marked `alone` runs with no other
    test beside it -- one that judges time under a load it makes itself (the handshake flood) --
    while the others share the machine: a run-wide lock, taken exclusively by `alone` and shared by
    the rest, around the whole test (its fixtures too).  A turnstile taken first by both keeps an
    `alone` test from waiting forever behind the others' stream of shared locks."""
    basetemp = item.config.option.basetemp
    if not os.environ.get("PYTEST_XDIST_WORKER") or not basetemp:
        yield
        return
    import fcntl

    root = Path(basetemp).parent  # (the run's directory: every worker's basetemp is in it)
    with open(root / "alone.lock", "a") as gate, open(root / "alone.turnstile", "a") as turnstile:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)


COAP_CLIENT = shutil.which("coap-client-notls")
DTLS_CLIENTS = [c for c in ("coap-client-openssl", "coap-client-gnutls") if shutil.which(c) or os.environ.get("CI") == "true"]

ADMIN_TOKEN = "admin-t0ken-for-tests"
SPEC_IDENTITY = "psk-identity-d7b1c0e2"
SPEC_KEY = "s3cr3t-pre-shared-key"

needs_libcoap = pytest.mark.skipif(
    COAP_CLIENT is None and os.environ.get("CI") != "true",
    reason="libcoap3-bin (coap-client-notls) is not installed; `make test` installs it as root",
)


def corem_cli(*args: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corem", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


@dataclass
class CoremProcess:
    data_dir: Path
    proc: subprocess.Popen
    coap_port: int
    coaps_port: int
    http_port: int
    stderr_path: Path
    extra_args: list[str] = field(default_factory=list)
    #: the RFC 8323 listeners, when started with --coap-tcp / --coaps-tcp
    coap_tcp_port: int | None = None
    coaps_tcp_port: int | None = None

    @property
    def coap(self) -> str:
        return f"coap://127.0.0.1:{self.coap_port}"

    def readyz(self) -> tuple[int, bytes]:
        """/readyz: (status, body)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> dict[str, float]:
        """Prometheus text parsed into {'name{labels}': value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def points(self, tenant: str | None = None) -> list[dict]:
        args = ["telemetry", "tail", "--json", "--limit", "0"]
        if tenant:
            args += ["--tenant", tenant]
        out = corem_cli(*args, data_dir=self.data_dir).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def api(self, method: str, path: str, body=None, *, token: str | None = ADMIN_TOKEN, raw: bytes | None = None,
            timeout: float = 30) -> tuple[int, object]:
        """One admin API call: (HTTP status, decoded JSON body or None)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        return status, (json.loads(text) if text.strip() else None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("corem did not stop within %.0f s" % timeout)
        return self.proc.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text()


#: corem's environment with every answer piggybacked on the request's ACK, whatever the machine's
#: load (COREM_PIGGYBACK_TIMEOUT 30 s): for test clients that do not wait out an empty ACK for a
#: separate answer, and relays that drop a datagram the client would not ask for again
PIGGYBACKED = {**os.environ, "COREM_PIGGYBACK_TIMEOUT": "30"}


def start_corem(data_dir: Path, *extra: str, timeout: float = 60, python: str = sys.executable,
                env: dict[str, str] | None = None) -> CoremProcess:
    """Start `corem serve` on loopback ports the OS picks; return once both listeners are up
    (their log lines: `coap listening on udp 127.0.0.1:PORT`, logged whatever --log-level says).
    `timeout` only detects a start that never comes: sized for a busy CI machine, not an idle one.
    `python`: another interpreter's corem (a clean virtualenv's); `env`: the process's environment."""
    stderr_path = data_dir.parent / f"corem-{time.monotonic_ns()}.stderr"
    log = open(stderr_path, "w")
    proc = subprocess.Popen(
        [
            python, "-m", "corem", "serve",
            "--data-dir", str(data_dir), "--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0",
            "--http", "127.0.0.1:0",
            *([] if "--admin-token" in extra else ["--admin-token", ADMIN_TOKEN]),
            *extra,
        ],
        stdout=log,  # (nothing, as a rule: the log is on stderr)
        stderr=log,
        env=env,
    )
    log.close()
    coap = coaps = http = None
    deadline = time.monotonic() + timeout
    text = ""
    while coap is None or coaps is None or http is None:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"corem did not start: {stderr_path.read_text()}")
        time.sleep(0.02)
        text = stderr_path.read_text()
        if m := re.search(r"coap listening on udp 127\.0\.0\.1:(\d+)", text):
            coap = int(m.group(1))
        if m := re.search(r"coaps listening on udp 127\.0\.0\.1:(\d+)", text):
            coaps = int(m.group(1))
        if m := re.search(r"http listening on http://127\.0\.0\.1:(\d+)", text):
            http = int(m.group(1))
    tcp = [int(m.group(1)) if (m := re.search(rf"{name} listening on tcp 127\.0\.0\.1:(\d+)", text)) else None
           for name in (r"coap\+tcp", r"coaps\+tcp")]
    server = CoremProcess(data_dir, proc, coap, coaps, http, stderr_path, list(extra), *tcp)
    _STARTED.append(server)
    return server


#: the servers the running test started (`start_corem`), and those of a wider scope still running
#: when it began (a module's): a failed test's report shows their logs
_STARTED: list[CoremProcess] = []


def pytest_sessionstart(session):
    """Before any test: the kernel balancer tables a killed run of test_nodes left behind are
    removed (tests/ports.py `remove_stale_balancers`: one turns a later server's traffic away)."""
    from .ports import nft_binary, remove_stale_balancers

    nft = nft_binary()
    if nft is not None and os.geteuid() == 0:
        for name in remove_stale_balancers(nft):
            print(f"conftest: removed the nftables table {name}, left by a test process that was killed",
                  file=sys.stderr)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before a test's fixtures: the servers earlier tests started and stopped are not its own."""
    _STARTED[:] = [s for s in _STARTED if s.proc.poll() is None]
#: how much of each server's log a failed test's report shows (its end)
LOG_TAIL = 4000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed shows, beside its assertion, the end of each corem server's log it started,
    and whether its process was still running when the test ended (its own cleanup stops it): found
    when a CI run's client met "ICMP: Connection refused" from a server whose log had gone with its
    temporary directory by the time anyone looked."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _STARTED:
        for server in _STARTED:
            code = server.proc.poll()
            state = "running" if code is None else f"exited with {code}"
            try:
                with open(server.stderr_path, "rb") as f:  # (its end only)
                    f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
                    text = f.read().decode(errors="replace")
            except OSError as e:
                text = f"(log unreadable: {e})"
            report.sections.append((f"corem serve pid {server.proc.pid} ({state}), log tail", text))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    # `corem devices add` in this process (its main(), as `python -m corem` runs it): a fixture of
    # most end-to-end tests, where an interpreter started twice cost ~1 s each (test_cli runs the
    # command as a process)
    from corem.cli import main

    assert main(["devices", "add", "--data-dir", str(d), "--tenant", "acme", "--device", "sensor-1",
                 "--token", "T0KEN-1"]) == 0
    assert main(["devices", "add", "--data-dir", str(d), "--tenant", "acme", "--device", "sensor-7",
                 "--psk-identity", SPEC_IDENTITY, "--psk", SPEC_KEY]) == 0
    return d


@pytest.fixture
def corem(data_dir):
    server = start_corem(data_dir)
    yield server
    server.stop()


@dataclass
class CoapResult:
    code: str | None
    output: str


def coap_client(url: str, *args: str, timeout: float = 90, binary: str | None = None) -> CoapResult:
    """Run libcoap's coap-client (notls unless `binary` says otherwise); `code` is the response
    code it received (e.g. '2.04')."""
    binary = binary or COAP_CLIENT
    assert binary, "coap-client-notls is not installed"
    proc = subprocess.run(
        [binary, "-v", "6", "-B", str(int(timeout)), *args, url],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )
    out = proc.stdout + proc.stderr
    codes = re.findall(r"t:(?:ACK|CON|NON) c:(\d\.\d\d)", out)
    return CoapResult(codes[-1] if codes else None, out)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll `predicate` until it returns something true (returned), or fail naming `what`.
    The bound only detects an event that never comes: generous, so a busy machine still passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_until(proc: subprocess.Popen, *wanted: str, timeout: float = 60.0) -> str:
    """The output of a client left running (an observer: text mode, stdout a pipe), read until every
    `wanted` text is in it or the client ends; a client still running is then stopped (SIGTERM, on
    which libcoap's coap-client ends cleanly) and what it said is returned.  An observer waits for
    its notification this way, not for `-s` seconds sized for an idle machine; `timeout` only
    detects a notification that never comes."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while not all(w in seen.decode(errors="replace") for w in wanted):
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"no {wanted!r} from the client within {timeout:.0f} s: {seen.decode()[-2000:]}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:  # it ended
                break
            seen += chunk
    if proc.poll() is None:
        proc.terminate()
    rest, _ = proc.communicate(timeout=60)
    return seen.decode(errors="replace") + (rest or "")


def write_cbor(path: Path, value) -> Path:
    path.write_bytes(cbor2.dumps(value))
    return path


def exchange(endpoint, router, msg, peer=("192.0.2.9", 5683)):
    """One request through a sans-IO endpoint and router: the single message it answers with (the
    endpoint's own, for a request it refuses itself: an option it cannot read, say)."""
    from corem.coap import Request
    from corem.codec import decode, encode

    req = endpoint.receive(encode(msg), peer, 0.0)
    if req is not None:
        assert isinstance(req, Request)
        r = router.dispatch(req)
        req.respond(r.code, r.options, r.payload)
    [(data, _)] = endpoint.datagrams_to_send()
    return decode(data)


def post(port: int, token: str, payload: bytes, mid: int, timeout: float = 30.0,
         sock: socket.socket | None = None) -> bytes | None:
    """One CON POST /api/v1/{token}/telemetry as a device would send it: retransmitted every
    second, answered piggybacked (ACK, same mid) or separately (CON with our CoAP token, which
    is ACKed).  Returns the response message."""
    tok = token.encode()
    ctoken = mid.to_bytes(4, "big")
    msg = (bytes((0x44, 0x02, (mid >> 8) & 0xFF, mid & 0xFF)) + ctoken + b"\xb3api\x02v1" + bytes((len(tok),)) + tok
           + b"\x09telemetry\x11\x3c\xff" + payload)
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    server = ("127.0.0.1", port)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.sendto(msg, server)
            try:
                data = from_server(s, server)
            except socket.timeout:
                continue
            while True:
                kind = answer_kind(data, msg[2:4], ctoken)
                if kind == SEPARATE and (ack := ack_for(data)) is not None:
                    s.sendto(ack, server)
                if kind in (IN_ACK, SEPARATE):
                    return data
                try:  # an empty ACK (or not this request's): the answer follows separately
                    data = from_server(s, server)
                except socket.timeout:
                    break
        return None
    finally:
        if sock is None:
            s.close()


def from_server(s: socket.socket, server: tuple[str, int]) -> bytes:
    """The next datagram `server` sent to `s`, as a device takes only its server's answers.  Others
    do come: a port the OS hands out was another test's client's a moment ago, and that test's
    server may still be sending it a separate response again (CON, token and all) -- once taken
    for this request's 2.04 while the bus it waited on was frozen."""
    while True:
        data, source = s.recvfrom(2048)
        if source == server:
            return data


def log_line(text: str, marker: str) -> str:
    """The first line of `text` holding `marker` ("" if none)."""
    return next((line for line in text.splitlines() if marker in line), "")


def coap_pings(port: int, n: int, source: str = "127.0.0.1", answers: int | None = None) -> int:
    """`n` CoAP pings at once from one socket bound to `source`; the RSTs that come back (waiting for
    `answers` of them, 30 s each: a failure detector, not a pace; else 0.5 s after the last)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for mid in range(n):
            s.sendto(bytes((0x40, 0x00, 0x70, mid)), ("127.0.0.1", port))
        got = 0
        s.settimeout(30 if answers else 0.5)
        try:
            while got < (answers or n):
                if s.recvfrom(64)[1] == ("127.0.0.1", port):  # (not a stranger's datagram to a reused port)
                    got += 1
        except TimeoutError:
            pass
        return got


def serving_one_device(tmp_path_factory, name: str):
    """A module's `corem serve` on a fresh data dir with one device, acme/sensor-1 of token
    T0KEN-1 (a generator for a fixture: stopped when the module is done)."""
    data = tmp_path_factory.mktemp(name) / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "sensor-1", "--token", "T0KEN-1", data_dir=data)
    s = start_corem(data)
    yield s
    s.stop()
