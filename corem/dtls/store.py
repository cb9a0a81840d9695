"""Offloaded DTLS sessions, kept in SQLite instead of in the process.

An idle session's Mbed TLS context serializes to ~0.9 KB.  Held as Python objects, each one
cost ~4 KB of RSS (object headers, dict slots and the heap fragmentation of interleaving them with
the ~40 KB live contexts that come and go), too much for a million idle devices.  Here the
serialized sessions live in a SQLite table and the server keeps only a set of 6- or 18-byte peer
keys, so a datagram from an unknown peer never costs a query.  The table is in the data dir,
mode 0600 (it holds session keys), and it survives a restart or a crash of corem: devices come
back to their session without a new handshake.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    peer      BLOB PRIMARY KEY,
    blob      BLOB NOT NULL,
    tenant    TEXT NOT NULL,
    device    TEXT NOT NULL,
    last_seen REAL NOT NULL  -- wall clock, seconds since the epoch
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_last_seen ON sessions (last_seen);
"""

Row = tuple[bytes, bytes, str, str, float]


def peer_key(peer: object) -> bytes:
    """A compact key for an address: packed IP + port (6 bytes for IPv4, 18 for IPv6)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except (OSError, TypeError):
            return repr(peer).encode()
        return packed + port.to_bytes(2, "big")
    return repr(peer).encode()


class SessionStore:
    def __init__(self, path: Path | str = ":memory:") -> None:
        if path != ":memory:":
            path = Path(path)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # a lost session costs one handshake, no data
        self._conn.executescript(SCHEMA)

    def put(self, rows: list[Row]) -> None:
        """Store sessions (replacing older ones for the same peer), in one transaction."""
        if not rows:
            return
        conn = self._conn
        conn.execute("BEGIN")
        try:
            conn.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def take(self, key: bytes) -> Row | None:
        """Remove and return the session of `key`."""
        row = self._conn.execute(
            "DELETE FROM sessions WHERE peer = ? RETURNING peer, blob, tenant, device, last_seen", (key,)
        ).fetchone()
        return row

    def discard(self, key: bytes) -> None:
        self._conn.execute("DELETE FROM sessions WHERE peer = ?", (key,))

    def keys(self) -> list[bytes]:
        return [k for (k,) in self._conn.execute("SELECT peer FROM sessions")]

    def expire(self, before: float) -> list[bytes]:
        """Forget sessions idle since before `before` (wall clock); return their keys."""
        return [k for (k,) in self._conn.execute("DELETE FROM sessions WHERE last_seen < ? RETURNING peer", (before,))]

    def blob_sizes(self) -> list[int]:
        return [n for (n,) in self._conn.execute("SELECT length(blob) FROM sessions")]

    def blobs(self) -> list[bytes]:
        return [b for (b,) in self._conn.execute("SELECT blob FROM sessions")]

    def __len__(self) -> int:
        return self._conn.execute("SELECT count(*) FROM sessions").fetchone()[0]

    def close(self) -> None:
        self._conn.close()
