"""The data dir's file names have one home (corem/datadir.py `FILES`), which the modules that
open them agree with; `take` locks and prepares, `create_files` makes the SQLite files."""

from __future__ import annotations

import pytest

from corem import datadir
from corem.admin.token import TOKEN_FILE
from corem.config import ConfigError, Settings
from corem.dtls.layer import STATE_KEY_FILE
from corem.registry.presence import FILE as PRESENCE_FILE


def test_every_file_name_is_in_the_table():
    for name in (datadir.FORMAT_FILE, datadir.LOCK_FILE, datadir.BUS_FILE, datadir.REGISTRY_FILE,
                 datadir.SESSIONS_FILE, PRESENCE_FILE, TOKEN_FILE, STATE_KEY_FILE):
        assert name in datadir.FILES, name
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
        assert made <= set(datadir.FILES) | {f"{datadir.BUS_FILE}-wal", f"{datadir.BUS_FILE}-shm"} | {
            f"{n}-{x}" for n in (datadir.REGISTRY_FILE, datadir.SESSIONS_FILE, PRESENCE_FILE) for x in ("wal", "shm")}
    finally:
        datadir.release(fd)
    datadir.release(datadir.take(settings))  # released: another may take it
