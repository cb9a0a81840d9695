"""The data dir's file names have one home (corem/datadir.py `FILES`), which the modules that
open them agree with; `take` locks and prepares, `create_files` makes the SQLite files."""

from __future__ import annotations

import pytest

from corem import datadir
from corem.datafiles import FILES
from corem.admin.token import TOKEN_FILE
from corem.config import ConfigError, Settings
from corem.dtls.layer import STATE_KEY_FILE
from corem.registry.presence import FILE as PRESENCE_FILE


def test_every_file_name_is_in_the_table():
    for name in (datadir.FORMAT_FILE, datadir.LOCK_FILE, datadir.BUS_FILE, datadir.REGISTRY_FILE,
                 datadir.SESSIONS_FILE, PRESENCE_FILE, TOKEN_FILE, STATE_KEY_FILE):
        assert name in FILES, name
    assert Settings.load({}, env={}).registry_location().name == datadir.REGISTRY_FILE


def test_take_locks_prepares_and_create_files_makes_the_databases(tmp_path):
    settings = Settings.load({"data_dir": str(tmp_path / "data")}, env={})
    fd = datadir.take(settings)
    try:
        with pytest.raises(ConfigError, match="in use by another corem serve"):
            datadir.take(settings)
        datadir.create_files(settings)
        made = {p.name for p in settings.data_path.iterdir()}
        assert {datadir.FORMAT_FILE, datadir.LOCK_FILE, datadir.BUS_FILE, datadir.REGISTRY_FILE,
                datadir.SESSIONS_FILE, PRESENCE_FILE} <= made, made
        assert made <= set(FILES) | {f"{datadir.BUS_FILE}-wal", f"{datadir.BUS_FILE}-shm"} | {
            f"{n}-{x}" for n in (datadir.REGISTRY_FILE, datadir.SESSIONS_FILE, PRESENCE_FILE) for x in ("wal", "shm")}
    finally:
        datadir.release(fd)
    datadir.release(datadir.take(settings))  # released: another may take it


@pytest.mark.parametrize("fails", ["sink", "port"])
def test_a_server_that_does_not_start_leaves_the_data_dir_free(tmp_path, monkeypatch, fails):
    """Found by review: a start that failed after the lock and the registry but before the listeners
    (the bus, the admin token, ...) kept the data dir's lock and the registry for the rest of the
    process: a second Server on the same data dir in it was refused."""
    import socket

    from corem import server as server_module
    from corem.server import Server

    def broken(*args, **kwargs):
        raise ConfigError("bus: down")

    if fails == "sink":
        monkeypatch.setattr(server_module.stores, "make_sink", broken)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        coaps = f"127.0.0.1:{busy.getsockname()[1]}" if fails == "port" else "off"
        settings = Settings.load({"data_dir": str(tmp_path / "d"), "coap": "127.0.0.1:0", "coaps": coaps,
                                  "http": "off"}, env={})
        with pytest.raises(ConfigError, match="bus: down" if fails == "sink" else "cannot listen"):
            Server(settings)
    datadir.release(datadir.take(settings))  # free again
