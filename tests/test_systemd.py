"""corem under systemd (issue 30): sd_notify readiness through a real `corem serve` -- READY=1 once
the listeners serve, RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 at SIGTERM, every message
from the main process only (with --workers too: systemd's NotifyAccess=main) -- and the unit in
ops/systemd checked by `systemd-analyze verify`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corem.sdnotify import Notifier

from .conftest import ADMIN_TOKEN, corem_cli

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "ops" / "systemd" / "corem.service"


class NotifySocket:
    """The socket systemd would hold: datagrams with their sender's credentials (SO_PASSCRED)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def next(self, timeout: float = 60.0) -> tuple[dict[str, str], int]:
        """The next message as {KEY: value} and the pid that sent it (`timeout`: a failure
        detector, sized for a busy machine)."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("iII", d)[0] for level, kind, d in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return dict(line.split("=", 1) for line in data.decode().splitlines()), pid

    def close(self) -> None:
        self.sock.close()


def serve(data: Path, notify: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    return subprocess.Popen(
        [sys.executable, "-m", "corem", "serve", "--data-dir", str(data), "--coap", "127.0.0.1:0", "--coaps",
         "127.0.0.1:0", "--http", "127.0.0.1:0", "--admin-token", ADMIN_TOKEN, *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_readiness_reload_and_stop_are_told_to_systemd_by_the_main_process(tmp_path, workers):
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "TOK-1", data_dir=data)
    sock = NotifySocket(tmp_path / "notify")
    proc = serve(data, sock.path, "--workers", str(workers))
    try:
        ready, pid = sock.next()
        assert pid == proc.pid and ready["READY"] == "1"
        # said once every listener serves: each one it names answers now
        status = ready["STATUS"]
        assert status.startswith("serving: coap udp 127.0.0.1:") and "coaps udp 127.0.0.1:" in status
        http = int(re.search(r"http http://127\.0\.0\.1:(\d+)", status).group(1))
        with socket.create_connection(("127.0.0.1", http), timeout=30) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGHUP)
        reloading, pid = sock.next()
        assert pid == proc.pid and reloading["RELOADING"] == "1"
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_us - int(reloading["MONOTONIC_USEC"]) < 120_000_000
        again, pid = sock.next()
        assert pid == proc.pid and again == ready  # ready again, the same listeners
        proc.send_signal(signal.SIGTERM)
        stopping, pid = sock.next()
        assert pid == proc.pid and stopping["STOPPING"] == "1"
        assert proc.wait(60) == 0
        # nothing else was sent (a worker that inherited NOTIFY_SOCKET would have said READY=1 too)
        sock.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.sock.recv(4096)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_without_notify_socket_nothing_is_sent_and_an_abstract_address_works(tmp_path):
    assert Notifier(None).ready("x") is False
    name = f"corem-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(30)
        assert Notifier("@" + name).stopping()
        assert s.recv(4096).decode().splitlines()[0] == "STOPPING=1"


def test_the_unit_is_a_hardened_notify_service_that_systemd_analyze_accepts(tmp_path):
    text = UNIT.read_text()
    settings = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, value)
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID" and settings["KillSignal"] == "SIGTERM"
    assert settings["User"] == "corem" and settings["StateDirectory"] == "corem"
    assert settings["StateDirectoryMode"] == "0700" and settings["Environment"] == "COREM_DATA_DIR=/var/lib/corem"
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("CapabilityBoundingSet", ""), ("AmbientCapabilities", ""),
                       ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6")):
        assert settings[key] == value, key
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd)")
    # verify checks that ExecStart is there: this checkout's corem stands in for /opt/corem/bin/corem
    corem = Path(sys.executable).with_name("corem")
    unit = tmp_path / "corem.service"
    unit.write_text(text.replace("/opt/corem/bin/corem", str(corem)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
