"""The registry's database: SQLite in the data dir (the embedded default), or PostgreSQL shared by
several nodes (`registry = postgresql://…`), behind the few calls the registry makes.

The registry's SQL is written once, for SQLite, in the portable part of it (`INSERT … ON CONFLICT
… DO UPDATE`, `RETURNING`); for PostgreSQL, `Db` turns `?` into `%s` and its schema's types into
PostgreSQL's (`schema`).  Transactions are statements (`BEGIN`, `COMMIT`, `ROLLBACK`) on a
connection that otherwise commits each statement, on both.

Changes: SQLite counts other connections' commits in `PRAGMA data_version`.  In PostgreSQL a
statement trigger on the tables the directory caches (devices, profiles) moves a counter in
`corem_registry_version` and sends `NOTIFY corem_registry`, which every node LISTENs to
(`listen`), so a device added on one node is served by all at once.  What changed is in the
change log, `registry_changes` (store.py has SQLite's, VERSION_SCHEMA PostgreSQL's): triggers
write it in the writing transaction, so that a node reads the changed rows only (directory.py).
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import __version__
from ..datafiles import file_uri, into_wal, read_only_uri
from ..errors import NewerFormat

#: the channel a PostgreSQL registry notifies on when devices or profiles change
CHANNEL = "corem_registry"
VERSION_SCHEMA = """
CREATE TABLE IF NOT EXISTS corem_registry_version (id INT PRIMARY KEY, v BIGINT NOT NULL);
INSERT INTO corem_registry_version VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS registry_changes (seq BIGSERIAL PRIMARY KEY, tenant TEXT, device TEXT, at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS registry_log (one INT PRIMARY KEY CHECK (one = 1), pruned BIGINT NOT NULL);
INSERT INTO registry_log VALUES (1, 0) ON CONFLICT (one) DO NOTHING;
CREATE OR REPLACE FUNCTION corem_registry_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN  -- every row at once: the change log says "everything"
        PERFORM pg_advisory_xact_lock(7236452);
        INSERT INTO registry_changes (tenant, device, at) VALUES (NULL, NULL, extract(epoch FROM now())::BIGINT);
    END IF;
    UPDATE corem_registry_version SET v = v + 1 WHERE id = 1;
    PERFORM pg_notify('corem_registry', '');
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE OR REPLACE FUNCTION corem_registry_row_changed() RETURNS trigger AS $$
DECLARE
    at BIGINT := extract(epoch FROM now())::BIGINT;
BEGIN
    -- Writers of the change log take turns until they commit, so its numbers are in commit order:
    -- a reader that has read up to n never finds n + 1 committed while a lower number is not yet.
    PERFORM pg_advisory_xact_lock(7236452);
    IF TG_TABLE_NAME = 'profiles' THEN
        INSERT INTO registry_changes (tenant, device, at)
            VALUES (NULL, CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END, at);
        RETURN NULL;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO registry_changes (tenant, device, at) VALUES (NEW.tenant, NEW.device, at);
    END IF;
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND (OLD.tenant, OLD.device) IS DISTINCT FROM (NEW.tenant, NEW.device)) THEN
        INSERT INTO registry_changes (tenant, device, at) VALUES (OLD.tenant, OLD.device, at);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
"""
#: each component's schema version (`Db.migrate`): the numbered migrations applied to its tables
VERSIONS = ("CREATE TABLE IF NOT EXISTS corem_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL, "
            "written_by TEXT NOT NULL)")
TRIGGER = ("CREATE OR REPLACE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
           "FOR EACH STATEMENT EXECUTE FUNCTION corem_registry_changed();"
           "CREATE OR REPLACE TRIGGER {table}_row_changed AFTER INSERT OR UPDATE OR DELETE ON {table} "
           "FOR EACH ROW EXECUTE FUNCTION corem_registry_row_changed();")


def _to_savepoint(sql: str) -> bool:
    """A ROLLBACK TO SAVEPOINT (which stays in the transaction), not a ROLLBACK?"""
    return sql.lstrip()[8:].lstrip().upper().startswith("TO")


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


#: one numbered migration of a component's tables: run inside `Db.migrate`'s transaction
Migration = Callable[["Db"], None]


def add_columns(table: str, columns: tuple[tuple[str, str], ...], unique: tuple[str, ...] = ()) -> Migration:
    """A migration that adds the `columns` (name, SQLite declaration) `table` lacks, and a unique
    index on each of those in `unique` (ALTER TABLE cannot add a UNIQUE constraint)."""

    def migration(db: Db) -> None:
        have = db.columns(table)
        for name, declaration in columns:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {pg_types(declaration) if db.shared else declaration}")
                if name in unique:
                    db.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {table}_{name} ON {table} ({name})")

    return migration


class Db:
    """One connection, SQLite's or PostgreSQL's, with sqlite3's surface (the registry's, and the
    DTLS session store's: dtls/store.py)."""

    def __init__(self, where: Path | str) -> None:
        self.where = where
        self.shared = is_url(where)
        #: (PostgreSQL) called with this Db after a lost connection is made again (`_alive`), before
        #: the statement that found it lost runs: what a session set, or a server restart undid
        self.on_reconnect: Callable[[Db], object] | None = None
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
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # (the data dir, when made here: 0700)
        if not path.exists():  # mode 0600: it holds credentials
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        # (by its URI: so that `attach_read_only` can name another file's with ?mode=ro)
        self._conn = sqlite3.connect(file_uri(path), isolation_level=None, check_same_thread=False, timeout=30,
                                     uri=True)
        into_wal(self._conn)

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
            if self.on_reconnect is not None:
                self.on_reconnect(self)
        if word.startswith("BEGIN"):
            self._in_transaction = True
        elif word.startswith(("COMMIT", "ROLLBACK")) and not _to_savepoint(sql):
            self._in_transaction = False

    def attach_read_only(self, path: Path, name: str) -> None:
        """(SQLite) Attach the database in `path` as `name`, read-only: a write transaction here
        (BEGIN IMMEDIATE) then takes no write lock on it -- attached read-write, it takes that
        file's too, and waits for (and holds up) every writer of it."""
        if self.shared or not name.isidentifier() or str(self.where) == ":memory:":
            # (an in-memory connection is not opened by URI: the URI would be a file's name)
            raise ValueError(f"attach_read_only: {name!r} on {'PostgreSQL' if self.shared else self.where}")
        self._conn.execute(f"ATTACH DATABASE ? AS {name}", (read_only_uri(path),))

    @property
    def in_transaction(self) -> bool:
        """Inside a transaction begun with BEGIN (not one statement's own)."""
        return self._in_transaction if self.shared else bool(self._conn.in_transaction)

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

    def stream(self, sql: str, args: tuple[Any, ...] = (), size: int = 10_000) -> Iterator[tuple[Any, ...]]:
        """The rows of a query, a few at a time, so that a large table is never all in memory at
        once (PostgreSQL: a server-side cursor, so inside a transaction)."""
        if not self.shared:
            yield from self._conn.execute(sql, args)
            return
        self._alive(sql)
        with self._conn.cursor(name="corem_stream") as cur:
            cur.itersize = size
            cur.execute(self._sql(sql), args)
            yield from cur

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

    def migrate(self, component: str, migrations: tuple[Migration, ...]) -> int:
        """Bring `component`'s tables to version len(migrations): each migration past the version
        `corem_schema` holds for it runs once, in order, in one transaction with the version it
        reaches -- on PostgreSQL under the schema lock (the one table creation takes), on SQLite
        under its write lock -- so processes starting together (workers, nodes) never run one
        twice.  A version above len(migrations) was written by a newer corem: `NewerFormat`, and
        nothing is changed.  Returns the version found.  (Migration 1 of a component whose
        columns were added before there were versions adds only those missing: a table made by
        a newer release before versioning has them already.)"""
        target = len(migrations)
        found = self._schema_version(component)
        if found is not None and found >= target:
            self._refuse_newer(component, found, target)
            return found
        self.execute("BEGIN" if self.shared else "BEGIN IMMEDIATE")
        try:
            if self.shared:
                self._conn.execute("SELECT pg_advisory_xact_lock(7236450)")  # the schema lock (`schema`)
            self._conn.execute(pg_types(VERSIONS) if self.shared else VERSIONS)
            found = self._schema_version(component) or 0
            self._refuse_newer(component, found, target)
            for migration in migrations[found:]:
                migration(self)
            self.execute("INSERT INTO corem_schema (component, version, written_by) VALUES (?, ?, ?) "
                         "ON CONFLICT (component) DO UPDATE SET version = excluded.version, "
                         "written_by = excluded.written_by", (component, target, f"corem {__version__}"))
            self.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        return found

    def _schema_version(self, component: str) -> int | None:
        """The version `corem_schema` holds for `component`; None if it holds none (or no table)."""
        try:
            row = self.execute("SELECT version FROM corem_schema WHERE component = ?", (component,)).fetchone()
        except self.Error:  # no table yet (PostgreSQL: the failed statement ended nothing: autocommit)
            return None
        return None if row is None else int(row[0])

    def _refuse_newer(self, component: str, found: int, target: int) -> None:
        if found > target:
            row = self.execute("SELECT written_by FROM corem_schema WHERE component = ?", (component,)).fetchone()
            where = "the registry's database" if self.shared else str(self.where)
            raise NewerFormat(f"{where}: {component} is at schema version {found}, written by "
                              f"{row[0] if row else 'a newer corem'}; this corem ({__version__}) knows versions up to "
                              f"{target}: run the newer corem, or a copy of the data from before it")

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
