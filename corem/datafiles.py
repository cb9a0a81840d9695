"""The names of the files corem keeps in a data dir, and what each holds: the one home of them.

A leaf (it imports nothing of corem), so that every owner of a file -- the data dir's lock and
format (datadir.py), the settings' default registry (config.py), presence (registry/presence.py),
the admin token (admin/token.py), the DTLS state key (dtls/layer.py) -- names it from here; how
a reader opens one read-only (`read_only_uri`); and how a writer puts one in WAL mode (`into_wal`).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Callable

FORMAT_FILE = "format.toml"
LOCK_FILE = ".lock"
#: the embedded bus (`bus = "embedded"`)
BUS_FILE = "bus.db"
#: the registry when `registry` is empty (SQLite)
REGISTRY_FILE = "registry.db"
#: the DTLS sessions when `dtls_session_store` is empty
SESSIONS_FILE = "dtls-sessions.db"
#: presence per device, with the SQLite registry
PRESENCE_FILE = "presence.db"
#: the generated admin token
TOKEN_FILE = "admin-token"
#: the key that seals saved DTLS sessions' state (`dtls_state_key` not given)
STATE_KEY_FILE = "dtls-state.key"

#: every file corem keeps in a data dir, and what it holds
FILES = {
    FORMAT_FILE: "the data dir's format and the corem that wrote it",
    LOCK_FILE: "the lock of the corem serve running on it, and who that is",
    BUS_FILE: "the embedded bus (with its -wal and -shm)",
    REGISTRY_FILE: "devices, credentials, profiles (SQLite registry)",
    SESSIONS_FILE: "saved DTLS sessions",
    PRESENCE_FILE: "presence per device (SQLite registry)",
    TOKEN_FILE: "the generated admin token",
    STATE_KEY_FILE: "the key that seals saved DTLS sessions' state",
}


def file_uri(path: Path | str) -> str:
    """The SQLite URI of the file in `path`, percent-encoded: a path written into "file:..." as it
    is names another file, or none, when it holds a `%`, `?` or `#`."""
    return Path(path).resolve().as_uri()


def read_only_uri(path: Path | str) -> str:
    """`file_uri`, opened read-only."""
    return file_uri(path) + "?mode=ro"


def into_wal(conn: sqlite3.Connection, timeout: float = 30.0,
             sleep: Callable[[float], None] = time.sleep) -> None:
    """Put `conn`'s database in WAL mode, waiting out other processes that open it at the same
    moment (workers, nodes, a CLI): the switch takes the file's exclusive lock, and SQLite
    answers "database is locked" at once -- not through the busy timeout -- when another
    connection holds a lock it needs or is switching it too (seen: 1 start in 30 of four at once
    on a file in rollback mode).  Already in WAL mode, the switch changes nothing.  (`sleep`: how
    it waits between tries; a test's own.)"""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        sleep(pause)
        pause = min(pause * 2, 0.05)
