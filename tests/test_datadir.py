"""The data dir (corem/datadir.py): private (0700, every file 0600) after a real `corem serve`
start, versioned (format.toml), an older one migrated by numbered steps, a newer one refused in
one line by `corem serve` and the CLI; the tables' numbered migrations (`Db.migrate`) on SQLite
and, under the schema lock, on PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Callable

import cbor2
import pytest

from corem import __version__, datadir, datafiles
from corem.datadir import FORMAT
from corem.errors import NewerFormat
from corem.dtls.store import SessionStore
from corem.registry import Registry
from corem.registry.db import Db

from .conftest import ADMIN_TOKEN, corem_cli, post, start_corem, wait_for
from .postgres_server import Postgres, binaries, empty

#: the devices table as the first release made it (the columns since came with migration 1)
OLD_DEVICES = """CREATE TABLE devices (tenant TEXT NOT NULL, device TEXT NOT NULL,
    profile TEXT NOT NULL DEFAULT 'default', token TEXT UNIQUE, created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device))"""
OLD_SESSIONS = """CREATE TABLE sessions (peer BLOB PRIMARY KEY, blob BLOB NOT NULL, tenant TEXT NOT NULL,
    device TEXT NOT NULL, last_seen REAL NOT NULL) WITHOUT ROWID"""


def modes(data: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir()}


def serve(data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corem", "serve", "--data-dir", str(data), "--coap", "127.0.0.1:0",
                           "--coaps", "127.0.0.1:0", "--http", "127.0.0.1:0", "--admin-token", ADMIN_TOKEN, *args],
                          capture_output=True, text=True, timeout=120)


def one_line(run: subprocess.CompletedProcess) -> str:
    """The refusal: status 2 and one line that is not a log line, no traceback."""
    lines = [line for line in run.stderr.splitlines() if line.startswith("corem: ")]
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_file_of_a_served_data_dir_is_private(data_dir, workers):
    server = start_corem(data_dir, "--workers", workers, "--admin-token", "")  # the token generated: a file
    try:
        answer = post(server.coap_port, "T0KEN-1", cbor2.dumps({"t": 1}), 41)
        assert answer is not None and answer[1] == 0x44
        wait_for(lambda: (data_dir / "bus.db-wal").exists(), what="the bus's WAL")
        found = modes(data_dir)
    finally:
        assert server.stop() == 0
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for name in ("bus.db", "bus.db-wal", "bus.db-shm", "registry.db", "registry.db-wal", "dtls-sessions.db",
                 "dtls-state.key", "presence.db", "admin-token", ".lock", "format.toml"):
        assert name in found, sorted(found)
    assert {name: mode for name, mode in found.items() if mode != 0o600} == {}
    fmt = tomllib.loads((data_dir / "format.toml").read_text())
    assert fmt == {"format": FORMAT, "written_by": f"corem {__version__}"}


def test_the_cli_makes_a_private_versioned_data_dir(tmp_path):
    data = tmp_path / "fresh"
    corem_cli("devices", "add", "--tenant", "a", "--device", "d", "--token", "T", data_dir=data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert {n: m for n, m in modes(data).items() if m != 0o600} == {}
    assert datadir.read_format(data) == (FORMAT, f"corem {__version__}")


def test_a_data_dir_from_before_formats_is_migrated_at_start(tmp_path):
    """What an older corem left: no format file, the directory 0755, bus.db 0644, a devices table
    without the columns added since: corem serve brings it to its format and serves its device."""
    data = tmp_path / "old"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    with sqlite3.connect(data / "registry.db") as conn:
        conn.execute(OLD_DEVICES)
        conn.execute("INSERT INTO devices VALUES ('acme', 'old-1', 'default', 'OLD-TOKEN', 1)")
    os.chmod(data / "registry.db", 0o600)
    with sqlite3.connect(data / "bus.db") as conn:
        conn.execute("CREATE TABLE batches (base_offset INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
                     "count INTEGER NOT NULL, records BLOB NOT NULL, appended_at INTEGER NOT NULL)")
    os.chmod(data / "bus.db", 0o644)
    server = start_corem(data)
    try:
        answer = post(server.coap_port, "OLD-TOKEN", cbor2.dumps({"t": 2}), 42)
        assert answer is not None and answer[1] == 0x44
    finally:
        assert server.stop() == 0
    assert f"migrated to format {FORMAT}" in server.stderr()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert {n: m for n, m in modes(data).items() if m != 0o600} == {}
    assert datadir.read_format(data)[0] == FORMAT
    with sqlite3.connect(data / "registry.db") as conn:
        assert {"psk_identity", "oscore_kid", "gateways"} <= {r[1] for r in conn.execute("PRAGMA table_info(devices)")}
        assert conn.execute("SELECT version, written_by FROM corem_schema WHERE component = 'registry'").fetchone() \
            == (1, f"corem {__version__}")
    assert [p["numeric_values"] for p in server.points("acme")] == [{"t": 2.0}]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_data_dir_a_newer_corem_wrote_is_refused_in_one_line(data_dir, workers):
    (data_dir / "format.toml").write_text(f'format = {FORMAT + 1}\nwritten_by = "corem 9.0.0"\n')
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    line = one_line(serve(data_dir, "--workers", workers))
    assert line == (f"corem: data_dir: {data_dir} is in format {FORMAT + 1}, written by corem 9.0.0; this corem "
                    f"({__version__}) reads formats up to {FORMAT}: run the newer corem, or a copy of the data dir "
                    f"from before it")
    for args in (["devices", "list"], ["devices", "add", "--tenant", "a", "--device", "b", "--token", "B"],
                 ["telemetry", "tail"]):
        assert one_line(corem_cli(*args, data_dir=data_dir, check=False)) == line
    after = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir() if p.name != ".lock"}
    assert after == {n: t for n, t in before.items() if n != ".lock"}  # nothing written


def test_a_table_a_newer_corem_migrated_is_refused_in_one_line(data_dir):
    with sqlite3.connect(data_dir / "registry.db") as conn:
        conn.execute("UPDATE corem_schema SET version = 7, written_by = 'corem 9.1.0' WHERE component = 'registry'")
    line = one_line(serve(data_dir))
    assert line == (f"corem: {data_dir / 'registry.db'}: registry is at schema version 7, written by corem 9.1.0; "
                    f"this corem ({__version__}) knows versions up to 1: run the newer corem, or a copy of the data "
                    f"from before it")
    assert one_line(corem_cli("devices", "list", data_dir=data_dir, check=False)) == line


def test_numbered_migrations_run_once_each_and_in_order(tmp_path):
    db = Db(tmp_path / "x.db")
    ran: list[str] = []
    one = lambda d: ran.append("1")  # noqa: E731
    two = lambda d: ran.append("2")  # noqa: E731
    assert db.migrate("thing", (one,)) == 0 and ran == ["1"]
    assert db.migrate("thing", (one,)) == 1 and ran == ["1"]
    assert db.migrate("thing", (one, two)) == 1 and ran == ["1", "2"]
    assert db.migrate("other", (one,)) == 0 and ran == ["1", "2", "1"]  # each component on its own
    with pytest.raises(NewerFormat, match="thing is at schema version 2, .* knows versions up to 1"):
        db.migrate("thing", (one,))

    def broken(d: Db) -> None:
        d.execute("CREATE TABLE half (x)")
        raise RuntimeError("cut short")

    with pytest.raises(RuntimeError):
        db.migrate("thing", (one, two, broken))
    assert db.migrate("thing", (one, two)) == 2  # nothing of the failed one stayed: not even its table
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchall() == []


def _start_together(start: Callable[[], None], n: int = 4) -> list[BaseException]:
    """Run `start` in `n` threads at once; what they raised."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            start()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_the_switch_to_wal_mode_waits_for_a_writer_sqlite_would_refuse_it_for_at_once(tmp_path):
    """A file in rollback mode with another connection's write lock on it: SQLite answers the
    switch "database is locked" at once, not after its busy timeout (how one of four processes
    starting together on an old data dir failed).  `into_wal` tries again once the lock is gone."""
    path = tmp_path / "old.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    opener = sqlite3.connect(path, isolation_level=None, timeout=30)
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # what SQLite itself does
        opener.execute("PRAGMA journal_mode=WAL")
    pauses: list[float] = []

    def pause(seconds: float) -> None:  # the holder commits while the opener waits
        pauses.append(seconds)
        if holder.in_transaction:
            holder.execute("COMMIT")

    datafiles.into_wal(opener, sleep=pause)
    assert pauses and opener.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    opener.close()
    holder.close()


def test_old_tables_gain_their_columns_once_with_processes_starting_together(tmp_path):
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_DEVICES)
        conn.execute("INSERT INTO devices VALUES ('acme', 'old-1', 'default', 'OLD-TOKEN', 1)")
    sessions = tmp_path / "sessions.db"
    with sqlite3.connect(sessions) as conn:
        conn.execute(OLD_SESSIONS)

    def start() -> None:
        Registry(path).close()
        SessionStore(sessions).db.close()

    assert _start_together(start) == []
    reg = Registry(path)
    [d] = reg.list_devices()
    assert (d.device, d.token, d.power_mode, d.topics) == ("old-1", "OLD-TOKEN", "drx", "#")
    reg.add_device("acme", "new-1", token="NEW", psk_identity="id-1", psk=b"k" * 16)
    with pytest.raises(Exception, match="psk_identity"):  # the migrated column's unique index
        reg.add_device("acme", "new-2", token="NEW2", psk_identity="id-1", psk=b"k" * 16)
    assert reg.db.execute("SELECT component, version FROM corem_schema").fetchall() == [("registry", 1)]
    reg.close()
    store = SessionStore(sessions)
    assert "rx_top" in store.db.columns("sessions")
    # (3: the marks' log, packs; 4: the packs carried by the bus, the place read to here; 5: owner;
    # 6: the store's own log of packs, for a sink that cannot carry them)
    assert not store.db.columns("rx_pack") and not store.db.columns("rx_log")
    assert store.db.execute("SELECT upto FROM rx_folded").fetchall() == [(0,)]
    assert store.db.execute("SELECT version FROM corem_schema WHERE component = 'dtls_sessions'").fetchone() == (6,)
    store.db.close()


@pytest.fixture(scope="module")
def pg():
    if binaries() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL (Debian's postgresql) is not installed: make test installs it")
        pytest.skip("PostgreSQL (Debian's postgresql) is not installed; make test installs it as root")
    server = Postgres()
    yield server
    server.stop()


def test_postgresql_migrations_run_under_the_schema_lock_once(pg):
    url = empty(pg.url)
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        c.execute(OLD_DEVICES.replace("INTEGER", "BIGINT"))
        c.execute("INSERT INTO devices VALUES ('acme', 'old-1', 'default', 'OLD-TOKEN', 1)")
    assert _start_together(lambda: Registry(url).close()) == []
    reg = Registry(url)
    assert {"psk_identity", "oscore", "oscore_kid"} <= reg.db.columns("devices")
    assert reg.db.execute("SELECT version FROM corem_schema WHERE component = 'registry'").fetchone() == (1,)
    reg.db.execute("UPDATE corem_schema SET version = 3 WHERE component = 'registry'")
    reg.close()
    with pytest.raises(NewerFormat, match=r"^the registry's database: registry is at schema version 3, written by "
                                          r"corem .*; this corem \(.*\) knows versions up to 1"):
        Registry(url)


@pytest.mark.parametrize("name", ["bus.db", "presence.db", "dtls-sessions.db", "registry.db"])
def test_a_damaged_database_of_the_data_dir_is_one_line_naming_it(data_dir, name):
    """An adversarial run found bus.db and presence.db ending the start in a traceback"""
    from corem.config import Settings

    datadir.create_files(Settings.load({"data_dir": str(data_dir)}, env={}))  # (every file, then garbage in one)
    (data_dir / name).write_bytes(b"not a database, not at all: " * 100)
    for suffix in ("-wal", "-shm"):
        (data_dir / (name + suffix)).unlink(missing_ok=True)
    for workers in ("1", "2"):
        assert one_line(serve(data_dir, "--workers", workers)).startswith(
            f"corem: data_dir: cannot open {data_dir / name}: file is not a database")


@pytest.mark.parametrize("how", ["a file", "under a file"])
def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path, how):
    target = tmp_path / "afile"
    target.write_text("x")
    data = target if how == "a file" else target / "sub"
    line = one_line(serve(data))
    assert line.startswith(f"corem: data_dir: cannot make {data}: "), line
    assert one_line(corem_cli("devices", "list", data_dir=data, check=False)) == line


def test_an_empty_data_dir_is_refused_and_the_current_directory_left_alone(tmp_path):
    """An empty path is the current directory: corem made it 0700 and every file in it 0600 (an
    adversarial run: a script lost its executable bit to `COREM_DATA_DIR= corem devices list`)"""
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    env = {**os.environ, "COREM_DATA_DIR": ""}
    for args in (["serve", "--coap", "127.0.0.1:0", "--http", "off"], ["devices", "list"]):
        run = subprocess.run([sys.executable, "-m", "corem", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert one_line(run) == "corem: data_dir: empty; name a directory (the default is 'data')"
    assert stat.S_IMODE(script.stat().st_mode) == 0o755 and sorted(p.name for p in tmp_path.iterdir()) == ["run.sh"]
