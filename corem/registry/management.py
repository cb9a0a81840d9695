"""Device management state that outlives a restart: attributes, OTA packages and their assignment,
provisioning keys and claims.  Kept in the registry's SQLite file so that one backup holds a fleet.

Values of attributes are JSON (any type a device or an operator may set); the tables are written by
the server's own connection, so `PRAGMA data_version` (the directory's reload trigger) does not move.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

from ..errors import BadInput, ClaimRefused, Conflict, StorageUnavailable, Unauthorized
from .store import PROFILE_NAME_RE, PROFILE_NAMES, TENANT_RE, Registry, check_field

SCHEMA = """
CREATE TABLE IF NOT EXISTS attributes (
    tenant TEXT NOT NULL, device TEXT NOT NULL,
    scope  TEXT NOT NULL CHECK (scope IN ('client', 'shared')),
    key    TEXT NOT NULL, value TEXT NOT NULL, updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device, scope, key)
);
CREATE TABLE IF NOT EXISTS packages (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, title TEXT NOT NULL, version TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL, created_at INTEGER NOT NULL,
    UNIQUE (kind, title, version)
);
CREATE TABLE IF NOT EXISTS assignments (
    tenant TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL, package INTEGER NOT NULL,
    PRIMARY KEY (tenant, device, kind)
);
CREATE TABLE IF NOT EXISTS provision_keys (
    key TEXT PRIMARY KEY, secret TEXT NOT NULL, tenant TEXT NOT NULL, profile TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS provision_quotas (
    key TEXT PRIMARY KEY, max_devices INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS provisioned (
    tenant TEXT NOT NULL, device TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tenant, device)
);
CREATE INDEX IF NOT EXISTS provisioned_by_key ON provisioned (key);
CREATE TABLE IF NOT EXISTS bus_positions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS rpc_rounds (
    one INTEGER PRIMARY KEY CHECK (one = 1), next_round INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    tenant TEXT NOT NULL, device TEXT NOT NULL, secret TEXT NOT NULL, expires_at INTEGER NOT NULL,
    owner TEXT, PRIMARY KEY (tenant, device)
);
"""

KINDS = ("firmware", "software")
#: Attribute keys: what fits a JSON object key and a query parameter list (`sharedKeys=a,b`).
KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
LABEL_RE = re.compile(r"[!-~]{1,128}")
LABEL = "1-128 printable ASCII characters, no spaces"
MAX_ATTRIBUTES = 1000  # per device and scope
MAX_VALUE = 16 * 1024  # bytes of JSON per attribute value


class Package(NamedTuple):
    id: int
    kind: str
    title: str
    version: str
    sha256: str
    size: int


def _now_ms() -> int:
    return int(time.time() * 1000)


class Management:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._conn = db = registry.conn
        db.schema(SCHEMA)
        self._integrity, self._error = db.IntegrityError, db.Error

    def _write(self, sql: str, args: tuple[Any, ...]) -> Any:
        """One statement that writes (autocommitted): a disk that refuses it (or a database that
        is gone) is StorageUnavailable; a broken constraint goes to the caller as it is."""
        try:
            return self._conn.execute(sql, args)
        except self._integrity:
            raise
        except self._error as e:
            raise StorageUnavailable(f"storage: {e}") from None

    @contextmanager
    def _transaction(self, *, writes_after_reading: bool = False) -> Iterator[None]:
        """All or nothing (the connection autocommits each statement otherwise).  A disk that
        refuses the write is `StorageUnavailable` (5.03 / 503 to the caller), not a crash.
        `writes_after_reading`: what it reads decides what it writes, so no other writer may come
        between -- SQLite's write lock taken at BEGIN (IMMEDIATE); PostgreSQL's rows are locked by
        the reads themselves (`FOR UPDATE`, see `provision`)."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE" if writes_after_reading and not conn.shared else "BEGIN")
            try:
                yield
                conn.execute("COMMIT")
            except BaseException:
                conn.rollback()
                raise
        except self._integrity:
            raise
        except self._error as e:
            raise StorageUnavailable(f"storage: {e}") from None

    # -- attributes ------------------------------------------------------------------------------
    def attributes(self, tenant: str, device: str, scope: str, keys: list[str] | None = None) -> dict[str, Any]:
        rows = self._conn.execute(
            "SELECT key, value FROM attributes WHERE tenant = ? AND device = ? AND scope = ?", (tenant, device, scope)
        )
        found = {k: json.loads(v) for k, v in rows}
        return found if keys is None else {k: found[k] for k in keys if k in found}

    def set_attributes(self, tenant: str, device: str, scope: str, values: Any) -> dict[str, Any]:
        """Store `values` (key -> JSON value; None deletes the key); returns what was stored."""
        if not isinstance(values, dict) or not values:
            raise BadInput("attributes: expected a non-empty object of key -> value")
        encoded: list[tuple[str, str | None]] = []
        for key, value in values.items():
            if not isinstance(key, str) or not KEY_RE.fullmatch(key):
                raise BadInput(f"attributes.{key}: not a valid key; allowed: 1-128 of A-Z a-z 0-9 _ . : -")
            text = None if value is None else json.dumps(value, separators=(",", ":"))
            if text is not None and len(text) > MAX_VALUE:
                raise BadInput(f"attributes.{key}: value is {len(text)} bytes of JSON; at most {MAX_VALUE}")
            encoded.append((key, text))
        now = _now_ms()
        with self._transaction():
            for key, text in encoded:
                if text is None:
                    self._conn.execute(
                        "DELETE FROM attributes WHERE tenant=? AND device=? AND scope=? AND key=?",
                        (tenant, device, scope, key),
                    )
                else:
                    self._conn.execute(
                        "INSERT INTO attributes VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, device, scope, key) "
                        "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                        (tenant, device, scope, key, text, now),
                    )
            count = self._conn.execute(
                "SELECT count(*) FROM attributes WHERE tenant=? AND device=? AND scope=?", (tenant, device, scope)
            ).fetchone()[0]
            if count > MAX_ATTRIBUTES:  # the transaction rolls back
                raise BadInput(f"attributes: a device keeps at most {MAX_ATTRIBUTES} {scope} attributes")
        return dict(values)

    # -- OTA packages ----------------------------------------------------------------------------
    def add_package(self, kind: str, title: str, version: str, data: bytes) -> Package:
        if kind not in KINDS:
            raise BadInput(f"kind: {kind!r} is not valid; allowed: {', '.join(KINDS)}")
        for name, value in (("title", title), ("version", version)):
            check_field(name, value, LABEL_RE, LABEL)
        if not data:
            raise BadInput("data: the package is empty")
        digest = hashlib.sha256(data).hexdigest()
        try:
            cur = self._write(
                "INSERT INTO packages (kind, title, version, sha256, size, data, created_at) VALUES (?,?,?,?,?,?,?) "
                "RETURNING id", (kind, title, version, digest, len(data), data, _now_ms()),
            )
        except self._integrity:
            raise Conflict(f"version: {kind} {title} {version} already exists") from None
        return Package(int(cur.fetchone()[0]), kind, title, version, digest, len(data))

    def packages(self) -> list[Package]:
        rows = self._conn.execute("SELECT id, kind, title, version, sha256, size FROM packages ORDER BY id")
        return [Package(*r) for r in rows]

    def package(self, package_id: int) -> Package | None:
        if not 0 < package_id < 2**63:  # SQLite's INTEGER range: anything else names no package
            return None
        row = self._conn.execute(
            "SELECT id, kind, title, version, sha256, size FROM packages WHERE id = ?", (package_id,)
        ).fetchone()
        return Package(*row) if row else None

    def package_data(self, package_id: int) -> bytes | None:
        row = self._conn.execute("SELECT data FROM packages WHERE id = ?", (package_id,)).fetchone()
        return bytes(row[0]) if row else None

    def assign(self, tenant: str, device: str, kind: str, package_id: object) -> Package:
        if not isinstance(package_id, int) or isinstance(package_id, bool):
            raise BadInput("package: expected a package id (integer)")
        package = self.package(package_id)
        if package is None:
            raise BadInput(f"package: no package with id {package_id}")
        if package.kind != kind:
            raise BadInput(f"package: {package_id} is {package.kind}, not {kind}")
        self._write("INSERT INTO assignments VALUES (?, ?, ?, ?) ON CONFLICT (tenant, device, kind) "
                    "DO UPDATE SET package = excluded.package", (tenant, device, kind, package_id))
        return package

    def assigned(self, tenant: str, device: str, kind: str) -> Package | None:
        row = self._conn.execute(
            "SELECT package FROM assignments WHERE tenant = ? AND device = ? AND kind = ?", (tenant, device, kind)
        ).fetchone()
        return self.package(row[0]) if row else None

    # -- provisioning and claiming ----------------------------------------------------------------
    def add_provision_key(self, key: str, secret: str, tenant: str, profile: str = "default",
                          max_devices: int | None = None) -> None:
        """`max_devices`: the devices this key may have registered that are still registered (None:
        no bound of its own; the per-source and per-key rates bound it anyway)."""
        check_field("key", key, LABEL_RE, LABEL)
        check_field("secret", secret, LABEL_RE, LABEL, secret=True)
        check_field("tenant", tenant, TENANT_RE, "1-64 of A-Z a-z 0-9 . _ -")
        check_field("profile", profile, PROFILE_NAME_RE, PROFILE_NAMES)
        if max_devices is not None and (type(max_devices) is not int or not 0 < max_devices < 2**31):
            raise BadInput("max_devices: a positive integer")
        try:
            with self._transaction():
                self._conn.execute(
                    "INSERT INTO provision_keys VALUES (?, ?, ?, ?, ?)", (key, secret, tenant, profile, _now_ms()))
                if max_devices is not None:
                    self._conn.execute("INSERT INTO provision_quotas VALUES (?, ?)", (key, max_devices))
        except self._integrity:
            raise Conflict(f"key: provisioning key {key!r} already exists") from None

    def provision(self, key: str, secret: str, device: str | None) -> tuple[str, str, str]:
        """A device presents a provisioning key and secret: register it with a fresh access token.
        Returns (tenant, device, token).  The secret is compared in constant time; a wrong key or
        secret is Unauthorized, a device name that exists a Conflict.  The key's `max_devices` is
        counted and the device registered in one transaction that no other writer comes between
        (workers and nodes provisioning with one key at once: found in review, each could count
        the same devices and all of them register one more)."""
        name = device or "device-" + secrets.token_hex(6)
        token = secrets.token_urlsafe(18)
        with self._transaction(writes_after_reading=True):
            # (again, though the door checked it before the key's rate: the key may have gone since,
            # and here its row is locked -- PostgreSQL -- until the device is registered)
            row = self.provision_key(key, secret, lock=True)
            quota = self._conn.execute("SELECT max_devices FROM provision_quotas WHERE key = ?", (key,)).fetchone()
            if quota is not None:
                # (found by an adversarial run: a key registered devices without end)
                made = self._conn.execute("SELECT count(*) FROM provisioned WHERE key = ?", (key,)).fetchone()[0]
                if made >= quota[0]:
                    # (short: on plain UDP the answer is cut to its request's size)
                    raise BadInput(f"max_devices ({quota[0]}) reached")
            self.registry.add_device(row[1], name, token=token, profile=row[2])  # (a name that exists: Conflict)
            self._conn.execute("INSERT INTO provisioned VALUES (?, ?, ?) ON CONFLICT (tenant, device) DO UPDATE SET "
                               "key = excluded.key", (row[1], name, key))
        return row[1], name, token

    def provision_key(self, key: str, secret: str, *, lock: bool = False) -> tuple[str, str, str]:
        """The key's (secret, tenant, profile) if `secret` is its secret (compared in constant
        time), else Unauthorized.  `lock`: in a transaction, the key's row locked until its end
        (PostgreSQL; SQLite's transaction holds the whole file's write lock already)."""
        row = self._conn.execute("SELECT secret, tenant, profile FROM provision_keys WHERE key = ?"
                                 + (" FOR UPDATE" if lock and self._conn.shared else ""), (key,)).fetchone()
        if row is None or not secrets.compare_digest(row[0].encode(), secret.encode()):
            raise Unauthorized("provisionDeviceKey/provisionDeviceSecret: not valid")
        return row

    def open_claim(self, tenant: str, device: str, secret: Any, duration_ms: Any) -> int:
        check_field("secretKey", secret, LABEL_RE, LABEL, secret=True)
        if not isinstance(duration_ms, int) or not 0 < duration_ms <= 30 * 86400_000:
            raise BadInput("durationMs: must be between 1 ms and 30 days")
        expires = _now_ms() + duration_ms
        self._write(
            "INSERT INTO claims (tenant, device, secret, expires_at, owner) VALUES (?, ?, ?, ?, NULL) "
            "ON CONFLICT (tenant, device) DO UPDATE SET secret = excluded.secret, expires_at = excluded.expires_at",
            (tenant, device, secret, expires),
        )
        return expires

    def claim(self, tenant: str, device: str, secret: str, owner: str) -> None:
        """An owner claims a device with the secret the device published; once, before it expires."""
        row = self._conn.execute(
            "SELECT secret, expires_at, owner FROM claims WHERE tenant = ? AND device = ?", (tenant, device)
        ).fetchone()
        if row is None or row[1] < _now_ms():
            raise ClaimRefused("secret_key: the device has no open claim (or it expired)")
        if not secrets.compare_digest(row[0].encode(), secret.encode()):
            raise ClaimRefused("secret_key: does not match the device's claim")
        self._write(
            "UPDATE claims SET owner = ?, expires_at = 0 WHERE tenant = ? AND device = ?", (owner, tenant, device)
        )

    def owner(self, tenant: str, device: str) -> str | None:
        row = self._conn.execute("SELECT owner FROM claims WHERE tenant = ? AND device = ?", (tenant, device)).fetchone()
        return row[0] if row else None

    # -- positions in the commands topics (corem.bus.commands) -----------------------------------
    def positions(self) -> dict[tuple[str, int], int]:
        return {(t, p): o for t, p, o in self._conn.execute("SELECT topic, partition, next_offset FROM bus_positions")}

    def reserve_rpc_rounds(self, n: int) -> int:
        """The first of `n` rounds of RPC ids now this process's (devices/downlink.py `_new_id`):
        processes and restarts never number two RPCs alike, so a device's late answer to an RPC of
        a process before is not taken for the answer to a new one.  StorageUnavailable if the
        registry cannot store it."""
        row = self._write("INSERT INTO rpc_rounds (one, next_round) VALUES (1, ?) ON CONFLICT (one) "
                          "DO UPDATE SET next_round = rpc_rounds.next_round + ? RETURNING next_round", (n, n)).fetchone()
        return int(row[0]) - n

    def set_position(self, topic: str, partition: int, next_offset: int) -> None:
        """Never backwards: with `--workers` the records of one partition are applied by the workers
        that hold their devices, and may finish out of order."""
        self._write("INSERT INTO bus_positions VALUES (?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE "
                    "SET next_offset = excluded.next_offset WHERE excluded.next_offset > bus_positions.next_offset", (topic, partition, next_offset))

    def remove(self, tenant: str, device: str) -> bool:
        """Remove a device and what is kept of it here (`forget`): every way of removing one (the
        admin API, the CLI) goes through this, so a device added again under its name starts with
        nothing of the old one's (its owner, shared attributes, packages).  False if not found."""
        removed = self.registry.remove_device(tenant, device)
        self.forget(tenant, device)
        return removed

    def forget(self, tenant: str, device: str) -> None:
        """A removed device's attributes, assignments and claim go with it."""
        with self._transaction():
            for table in ("attributes", "assignments", "claims", "provisioned"):  # (frees a key's max_devices)
                self._conn.execute(f"DELETE FROM {table} WHERE tenant = ? AND device = ?", (tenant, device))
