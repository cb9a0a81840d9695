"""A port another process holds is a one-line start error, never a second server answering the
fleet; SIGHUP does not end corem (issue 26, items 1 and 3).  Every test runs real `corem serve`
processes on loopback ports the first one picked."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from .conftest import ADMIN_TOKEN, corem_cli, post, start_corem, wait_for


def serve_again(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """A second `corem serve` with its own data dir and the given listeners: it must refuse."""
    return subprocess.run(
        [sys.executable, "-m", "corem", "serve", "--data-dir", str(data_dir), "--admin-token", ADMIN_TOKEN, *args],
        capture_output=True, text=True, timeout=120,
    )


def assert_one_line_refusal(run: subprocess.CompletedProcess, key: str, port: int) -> None:
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("ts=")]  # (log lines)
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr  # one line, not a traceback
    assert lines[0].startswith(f"corem: {key}: cannot listen on") and f":{port}" in lines[0], lines[0]
    assert "in use" in lines[0], lines[0]


def test_a_second_corem_cannot_take_the_udp_port_and_the_first_keeps_the_fleet(data_dir, tmp_path):
    first = start_corem(data_dir)
    try:
        other = tmp_path / "other"
        # the intruder knows no device: had it bound the port, it would answer 4.01 to the readings
        for key, port in (("coap", first.coap_port), ("coaps", first.coaps_port)):
            run = serve_again(other, f"--{key}", f"127.0.0.1:{port}", "--http", "127.0.0.1:0",
                              *(["--coaps", "127.0.0.1:0"] if key == "coap" else ["--coap", "127.0.0.1:0"]))
            assert_one_line_refusal(run, key, port)
        # 0.0.0.0 covers 127.0.0.1: the kernel refuses it too
        run = serve_again(other, "--coap", f"0.0.0.0:{first.coap_port}", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0")
        assert_one_line_refusal(run, "coap", first.coap_port)
        for n in range(3):
            answer = post(first.coap_port, "T0KEN-1", cbor2.dumps({"n": n}), 700 + n, timeout=30)
            assert answer is not None and answer[1] == 0x44  # 2.04 from the first corem
        assert sorted(p["numeric_values"]["n"] for p in first.points("acme")) == [0.0, 1.0, 2.0]
    finally:
        assert first.stop() == 0


def test_a_held_admin_or_tcp_port_is_one_line_at_start(data_dir, tmp_path):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        run = serve_again(tmp_path / "a", "--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--http", f"127.0.0.1:{port}")
        assert_one_line_refusal(run, "http", port)
        run = serve_again(tmp_path / "b", "--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0",
                          "--coap-tcp", f"127.0.0.1:{port}")
        assert_one_line_refusal(run, "coap_tcp", port)
        run = serve_again(tmp_path / "c", "--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--workers", "2",
                          "--http", f"127.0.0.1:{port}")
        assert_one_line_refusal(run, "http", port)
    finally:
        held.close()


def test_nothing_joins_the_workers_port_group(data_dir, tmp_path):
    first = start_corem(data_dir, "--workers", "2", timeout=60)
    try:
        for workers in ("2", "1"):
            run = serve_again(tmp_path / f"other-{workers}", "--coap", f"127.0.0.1:{first.coap_port}",
                              "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--workers", workers)
            assert_one_line_refusal(run, "coap", first.coap_port)
        # a socket that joins the group behind corem's back (same user, SO_REUSEPORT) gets nothing:
        # the steering program only picks the workers' sockets
        joiner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        joiner.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        joiner.bind(("127.0.0.1", first.coap_port))
        joiner.setblocking(False)
        try:
            devices = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
            for i, s in enumerate(devices):
                answer = post(first.coap_port, "T0KEN-1", cbor2.dumps({"j": i}), 900 + i, sock=s, timeout=30)
                assert answer is not None and answer[1] == 0x44
                s.close()
            with pytest.raises(BlockingIOError):
                joiner.recvfrom(2048)
        finally:
            joiner.close()
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_does_not_end_corem(data_dir, workers):
    """(Since issue 30 SIGHUP reloads: tests/test_operating.py.)"""
    server = start_corem(data_dir, "--workers", workers, timeout=60)
    try:
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded on SIGHUP" in server.stderr(), 60, "the SIGHUP log line")
        answer = post(server.coap_port, "T0KEN-1", cbor2.dumps({"after_hup": 1}), 4242, timeout=30)
        assert server.proc.poll() is None
        assert answer is not None and answer[1] == 0x44
        assert server.metrics()  # the admin port answers too
    finally:
        assert server.stop() == 0  # a graceful stop still works, status 0
    assert [p["numeric_values"] for p in server.points("acme")] == [{"after_hup": 1.0}]
    assert corem_cli("devices", "list", data_dir=data_dir).returncode == 0


def sighup_ignored(pid: int) -> bool:
    """/proc says the process ignores SIGHUP (its SigIgn mask)"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGHUP - 1)))


@pytest.mark.parametrize("launcher, workers", [("-m", "1"), ("-m", "2"), ("script", "1")])
def test_a_sighup_while_corem_starts_does_not_end_it(data_dir, launcher, workers):
    """From its first line `corem serve` -- `python -m corem` or the installed script -- ignores
    SIGHUP until its receiver is up (which says so or reloads): an adversarial run ended it,
    silently, with a SIGHUP in its first ~0.3 s -- imports and set-up, before the receiver.  Sent
    as soon as /proc shows the process ignoring it."""
    script = Path(sys.executable).parent / "corem"
    if launcher == "script" and not script.exists():
        pytest.skip("no installed corem script beside this interpreter")
    start = [sys.executable, "-m", "corem"] if launcher == "-m" else [str(script)]
    cmd = [*start, "serve", "--data-dir", str(data_dir), "--coap", "127.0.0.1:0",
           "--coaps", "off", "--http", "off", "--workers", workers]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sighup_ignored(proc.pid) or proc.poll() is not None, 60, "SIGHUP ignored")
        proc.send_signal(signal.SIGHUP)
        # (it goes on to serve: its listening line; had the signal ended it, stderr would close first)
        for line in proc.stderr:
            if "coap listening on udp" in line:
                break
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
