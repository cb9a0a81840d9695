"""A full disk under the data dir, for real: a tmpfs of a few MB that the test mounts (root only)
and fills.  corem stays up, CoAP and CoAPS readings get 5.03 meanwhile, idle DTLS sessions that
cannot be offloaded stay in memory, /readyz and the metrics say what failed, and everything works
again by itself once there is space."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import cbor2
import pytest

from corem.codec import Code

from .conftest import COAP_CLIENT, coap_client, corem_cli, post, start_corem, wait_for
from .dtls_udp_client import DtlsUdpClient

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root"
)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path) -> None:
    """Write until the filesystem refuses (ENOSPC), in smaller and smaller writes."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)


def fill_for_good(disk, data) -> None:
    """Fill the disk so that no SQLite file in `data` can take a write.  A write-ahead log that was
    checkpointed is written again from its start (corem's checkpointer runs every 25 ms): on a disk
    filled beside such a log, the next commits still fit in its old space, and whether one does
    depended on the timing (a reading stored, an idle session offloaded on a full disk).  So each
    log is emptied first (a TRUNCATE checkpoint from here), and all of it again if a write came in
    between."""
    deadline = time.monotonic() + 60  # (only detects a log that never gets empty)
    while True:
        for wal in data.glob("*.db-wal"):
            with contextlib.closing(sqlite3.connect(wal.with_name(wal.name[:-4]), timeout=30)) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        fill(disk / "filler")
        if all(wal.stat().st_size == 0 for wal in data.glob("*.db-wal")):
            return
        (disk / "filler").unlink()
        assert time.monotonic() < deadline, [(wal.name, wal.stat().st_size) for wal in data.glob("*.db-wal")]


def test_a_full_disk_is_5_03_for_coap_and_coaps_and_corem_recovers_by_itself(small_disk):
    data = small_disk / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "T1", data_dir=data)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d7", "--psk-identity", "id7",
              "--psk", "a-key-of-16-bytes", data_dir=data)
    server = start_corem(data, "--dtls-offload-after", "1", "--store-synchronous", "NORMAL")
    device = DtlsUdpClient(server.coaps_port, "id7", b"a-key-of-16-bytes")
    try:
        device.handshake()
        reading = cbor2.dumps({"t": 1.0})
        assert post(server.coap_port, "T1", reading, 1)[1] == 0x44
        assert device.post(["telemetry"], reading).code == Code.CHANGED
        fill_for_good(small_disk, data)

        # readings while the disk is full: 5.03, nothing acknowledged
        assert post(server.coap_port, "T1", reading, 2)[1] == 0xA3
        assert device.post(["telemetry"], reading).code == Code.SERVICE_UNAVAILABLE
        if COAP_CLIENT is not None:  # a management write (ThingsBoard client attributes): 5.03, not 5.00
            r = coap_client(f"{server.coap}/api/v1/T1/attributes", "-m", "post", "-t", "50", "-e", '{"fw": "1.2"}',
                            timeout=30)
            assert r.code == "5.03", r.output
        status, body = server.api("POST", "/api/devices", {"tenant": "acme", "device": "late", "token": "LATE"})
        assert status == 503 and "storage" in body["error"], body  # the admin API: retry later, not 500
        cli = subprocess.run([sys.executable, "-m", "corem", "devices", "add", "--data-dir", str(data), "--tenant",
                              "acme", "--device", "late2", "--token", "LATE2"], capture_output=True, text=True)
        assert cli.returncode == 2 and cli.stderr.startswith("corem: storage:"), cli.stderr  # one line, no traceback
        # the session is idle past dtls_offload_after: the sweep cannot store it
        wait_for(lambda: (m := server.metrics())["corem_dtls_sessions_offload_failed_total"] >= 1
                 and m["corem_dtls_session_store_errors_total"] >= 1, what="a failed offload")
        m = server.metrics()
        assert m['corem_coap_handler_errors_total{transport="udp"}'] == 0
        assert m["corem_dtls_sessions_offload_failed_total"] >= 1 and m["corem_dtls_session_store_errors_total"] >= 1
        status, body = server.readyz()
        assert status == 503 and (b"bus" in body or b"dtls session store" in body), body
        assert server.proc.poll() is None  # still running
        assert device.post(["telemetry"], reading).code == Code.SERVICE_UNAVAILABLE  # same session, in memory

        (small_disk / "filler").unlink()
        deadline = time.monotonic() + 60
        while post(server.coap_port, "T1", reading, 100 + int(time.monotonic() * 10) % 1000)[1] != 0x44:
            assert time.monotonic() < deadline, "CoAP did not recover"
        assert device.post(["telemetry"], reading).code == Code.CHANGED  # no new handshake needed
        # and the idle session is offloaded now
        wait_for(lambda: server.metrics()["corem_dtls_sessions_offloaded_total"] >= 1, what="the offload")
        wait_for(lambda: server.readyz()[0] == 200, what="ready again")
        assert device.post(["telemetry"], reading).code == Code.CHANGED  # restored from the store
        assert server.stop() == 0
    finally:
        device.close()
        if server.proc.poll() is None:
            server.proc.kill()


def test_a_first_start_on_a_full_disk_says_why_and_the_next_one_works(small_disk):
    """No space for the registry's journal or the generated admin token: one line naming the file,
    no empty token file left behind, and the next start (with space) makes the token and serves."""
    data = small_disk / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "T1", data_dir=data)
    fill(small_disk / "filler")
    r = subprocess.run([sys.executable, "-m", "corem", "serve", "--data-dir", str(data), "--coap", "127.0.0.1:0",
                        "--coaps", "off", "--http", "127.0.0.1:0", "--admin-token", ""],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(("corem: data_dir: cannot open", "corem: admin_token: cannot write")), line
    assert not (data / "admin-token").exists()
    (small_disk / "filler").unlink()
    server = start_corem(data, "--admin-token", "")
    try:
        assert (data / "admin-token").read_text().strip()
    finally:
        assert server.stop() == 0


def test_an_admin_token_that_cannot_be_written_is_a_one_line_error_and_an_empty_one_is_replaced(tmp_path):
    from corem.admin import token
    from corem.config import ConfigError

    with pytest.raises(ConfigError, match="admin_token: cannot write .*missing/admin-token"):
        token.read_or_create(tmp_path / "missing")
    (tmp_path / "admin-token").write_text("")  # what a full disk left behind before this was fixed
    made = token.read_or_create(tmp_path)
    assert made and token.read(tmp_path) == made and (tmp_path / "admin-token").stat().st_mode & 0o777 == 0o600


def test_with_workers_a_full_disk_is_5_03_and_readyz_gives_the_workers_reasons(small_disk):
    """The workers' front said only "2 of 2 workers not ready"; it gives their reasons, as one
    process gives its own (an adversarial run)"""
    data = small_disk / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "T1", data_dir=data)
    server = start_corem(data, "--workers", "2", "--store-synchronous", "NORMAL")
    try:
        reading = cbor2.dumps({"t": 1.0})
        assert post(server.coap_port, "T1", reading, 1)[1] == 0x44
        fill_for_good(small_disk, data)
        assert post(server.coap_port, "T1", reading, 2)[1] == 0xA3  # 5.03: nothing acknowledged
        status, body = server.readyz()
        assert status == 503 and b" of 2 workers not ready: bus: " in body, body  # (the one that tried to commit knows)
        (small_disk / "filler").unlink()
        mids = iter(range(100, 60_000))

        def ready_after_a_reading() -> bool:
            # (a worker is ready again once its bus commits again: readings, each from a new port,
            # go to either worker, until both did)
            post(server.coap_port, "T1", reading, next(mids))
            return server.readyz()[0] == 200

        wait_for(ready_after_a_reading, what="ready again")
    finally:
        assert server.stop() == 0
