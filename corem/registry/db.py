"""The registry's database: SQLite in the data dir (the embedded default), or PostgreSQL shared by
several nodes (`registry = postgresql://…`), behind the few calls the registry makes.

The registry's SQL is written once, for SQLite, in the portable part of it (`INSERT … ON CONFLICT
… DO UPDATE`, `RETURNING`); for PostgreSQL, `Db` turns `?` into `%s` and its schema's types into
PostgreSQL's (`schema`).  Transactions are statements (`BEGIN`, `COMMIT`, `ROLLBACK`) on a
connection that otherwise commits each statement, on both.

Changes: SQLite counts other connections' commits in `PRAGMA data_version`.  In PostgreSQL a
statement trigger on the tables the directory caches (devices, profiles) moves a counter in
`corem_registry_version` and sends `NOTIFY corem_registry`, which every node LISTENs to
(`listen`), so a device added on one node is served by all at once.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator

#: the channel a PostgreSQL registry notifies on when devices or profiles change
CHANNEL = "corem_registry"
VERSION_SCHEMA = """
CREATE TABLE IF NOT EXISTS corem_registry_version (id INT PRIMARY KEY, v BIGINT NOT NULL);
INSERT INTO corem_registry_version VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE OR REPLACE FUNCTION corem_registry_changed() RETURNS trigger AS $$
BEGIN
    UPDATE corem_registry_version SET v = v + 1 WHERE id = 1;
    PERFORM pg_notify('corem_registry', '');
    RETURN NULL;
END $$ LANGUAGE plpgsql;
"""
TRIGGER = ("CREATE OR REPLACE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
           "FOR EACH STATEMENT EXECUTE FUNCTION corem_registry_changed();")


def is_url(where: object) -> bool:
    return isinstance(where, str) and where.startswith(("postgresql://", "postgres://"))


def pg_types(schema: str) -> str:
    """A SQLite schema in PostgreSQL's types: 64-bit integers (ms timestamps), BYTEA, a serial id,
    8-byte floats (PostgreSQL's REAL has 4 bytes: seconds since the epoch would lose minutes)."""
    schema = re.sub(r"\bid INTEGER PRIMARY KEY\b", "id BIGSERIAL PRIMARY KEY", schema)
    schema = re.sub(r"\bINTEGER\b", "BIGINT", schema)
    schema = re.sub(r"\bREAL\b", "DOUBLE PRECISION", schema)
    schema = re.sub(r"\s*WITHOUT ROWID", "", schema)
    return re.sub(r"\bBLOB\b", "BYTEA", schema)


class Db:
    """One connection, SQLite's or PostgreSQL's, with sqlite3's surface (the registry's, and the
    DTLS session store's: dtls/store.py)."""

    def __init__(self, where: Path | str) -> None:
        self.where = where
        self.shared = is_url(where)
        if self.shared:
            import psycopg

            self.Error: type[Exception] = psycopg.Error
            self.IntegrityError: type[Exception] = psycopg.IntegrityError
            self.OperationalError: type[Exception] = psycopg.OperationalError
            self._conn: Any = psycopg.connect(str(where), autocommit=True, connect_timeout=10)
            self._in_transaction = False
            return
        self.Error, self.IntegrityError, self.OperationalError = (
            sqlite3.Error, sqlite3.IntegrityError, sqlite3.OperationalError)
        if str(where) == ":memory:":
            self._conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            return
        path = Path(where)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # mode 0600: it holds credentials
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")

    def reopen(self) -> Db:
        """Another connection to the same database (for a reader on another thread)."""
        return Db(self.where)

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s") if self.shared else sql

    def execute(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> Any:
        if self.shared:
            self._alive(sql)
        return self._conn.execute(self._sql(sql), args)

    def _alive(self, sql: str) -> None:
        """Make a lost PostgreSQL connection again (a restarted server, a failover): the statement
        that found it lost failed; the next one outside a transaction runs on a new connection.
        Inside a transaction it fails too, so no statement of it lands outside it."""
        word = sql.lstrip()[:8].upper()
        if self._conn.closed:
            if self._in_transaction and not word.startswith("ROLLBACK"):
                raise self.OperationalError("the connection to the registry's database was lost in a transaction")
            import psycopg

            self._conn, self._in_transaction = psycopg.connect(str(self.where), autocommit=True, connect_timeout=10), False
        if word.startswith("BEGIN"):
            self._in_transaction = True
        elif word.startswith(("COMMIT", "ROLLBACK")):
            self._in_transaction = False

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self.shared:
            self._alive(sql)
            with self._conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        else:
            self._conn.executemany(sql, rows)

    def each_returning(self, sql: str, rows: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
        """Run a statement with RETURNING once per row of arguments; what each run returned.  On
        PostgreSQL in one pipeline (no round trip per row: ~3x the rows per second on loopback)."""
        if not rows:
            return []
        if not self.shared:
            return [self._conn.execute(sql, r).fetchall() for r in rows]
        self._alive(sql)
        out = []
        with self._conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows, returning=True)
            for _ in cur.results():
                out.append(cur.fetchall())
        return out

    def schema(self, sql: str, *, watched: tuple[str, ...] = ()) -> None:
        """Create the tables of a SQLite `sql` schema; in PostgreSQL, with its types, one node at a
        time (concurrent CREATE IF NOT EXISTS can collide), and with the change trigger on
        `watched` tables."""
        if not self.shared:
            self._conn.executescript(sql)
            return
        self.execute("BEGIN")
        try:
            self._conn.execute("SELECT pg_advisory_xact_lock(7236450)")  # any constant: corem's schema lock
            self._conn.execute(pg_types(sql))
            if watched:
                self._conn.execute(VERSION_SCHEMA)
                for table in watched:
                    self._conn.execute(TRIGGER.format(table=table))
            self.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def add_columns(self, table: str, columns: tuple[tuple[str, str], ...]) -> list[str]:
        """Columns added to `table` after its first release (name, SQLite declaration), if missing;
        returns those this call added.  Processes that start together (workers, nodes) may add one
        at once: in PostgreSQL under the schema lock with IF NOT EXISTS; in SQLite the loser's
        'duplicate column' is the same outcome as the winner's, and is taken as such."""
        have = self.columns(table)
        added = []
        for name, declaration in columns:
            if name in have:
                continue
            if self.shared:
                self.schema(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {declaration};")
            else:
                try:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):
                        raise
                    continue
            added.append(name)
        return added

    def columns(self, table: str) -> set[str]:
        if self.shared:
            return {r[0] for r in self.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))}
        return {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}

    def rollback(self) -> None:
        """End the transaction if one is open (SQLite may have ended it already)."""
        try:
            if self.shared:
                self._in_transaction = False
                if not self._conn.closed:
                    self._conn.execute("ROLLBACK")
            elif self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - nothing to roll back, or the connection is gone
            pass

    def data_version(self) -> int:
        """Moves when the registry's devices or profiles change (SQLite: when another connection
        commits anything)."""
        if self.shared:
            return int(self.execute("SELECT v FROM corem_registry_version WHERE id = 1").fetchone()[0])
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        self._conn.close()


def listen(url: str, changed: Callable[[], object], stop: Callable[[], bool]) -> Iterator[None]:
    """Call `changed()` at each NOTIFY on the registry's channel until `stop()` (run in a thread;
    yields once listening, so the caller knows it is)."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        yield
        while not stop():
            for _ in conn.notifies(timeout=1.0, stop_after=1):
                changed()


class Lease:
    """One holder among the nodes of a PostgreSQL registry (a session advisory lock on a
    connection of its own): the node whose `held()` is True reads `commands.{tenant}`.  The lock
    goes with the connection, so when its node dies another takes it at its next `held()`."""

    KEY = 7236451  # corem's commands reader

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._held = False

    def held(self) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                import psycopg

                self._conn, self._held = psycopg.connect(self.url, autocommit=True, connect_timeout=5), False
            if not self._held:
                self._held = bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.KEY,)).fetchone()[0])
            else:
                self._conn.execute("SELECT 1")  # still connected, so still held
        except Exception:  # noqa: BLE001 - psycopg's: the database is away; nobody here holds it
            self._conn, self._held = None, False
        return self._held

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
