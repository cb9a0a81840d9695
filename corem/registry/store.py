"""The device registry: tenants, devices, their credentials and profiles, in SQLite.

The CLI writes it; a running server keeps it in memory (directory.py) and reads what changed from
the change log, `registry_changes`: triggers number every change of a device or a profile in the
transaction that makes it, whoever writes (the CLI, the admin API, another tool).  The server
looks when SQLite's `PRAGMA data_version` (a cheap per-connection counter that moves when another
connection commits) moves, when it is nudged (nudge.py), or at PostgreSQL's NOTIFY (db.py).
Credentials are kept in clear text because they must be presented (PSKs to Mbed TLS) or looked
up exactly (access tokens); the database file is created mode 0600.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import msgspec

from ..errors import BadInput, Conflict, StorageUnavailable, utf8
from ..profiles.spec import DEFAULT as DEFAULT_PROFILE
from ..profiles.spec import NAME_RE as PROFILE_NAME_RE
from ..profiles.spec import Profile, ProfileError, encode_profile, parse_profile
from .db import Db, add_columns

log = logging.getLogger("corem.registry")

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    tenant       TEXT NOT NULL,
    device       TEXT NOT NULL,
    profile      TEXT NOT NULL DEFAULT 'default',
    token        TEXT UNIQUE,
    created_at   INTEGER NOT NULL,
    psk_identity TEXT UNIQUE,
    psk          BLOB,
    cert_sha256  TEXT UNIQUE,
    power_mode   TEXT NOT NULL DEFAULT 'drx',
    topics       TEXT NOT NULL DEFAULT '#',
    gateways     TEXT NOT NULL DEFAULT '',
    oscore       TEXT,
    oscore_kid   TEXT UNIQUE,
    PRIMARY KEY (tenant, device)
);
CREATE TABLE IF NOT EXISTS profiles (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,       -- the profile's JSON (corem/profiles/spec.py)
    updated_at INTEGER NOT NULL
);
"""
#: The change log in SQLite (PostgreSQL's is db.py's CHANGES_PG): a row for each device added,
#: changed or removed (tenant, device), each profile (tenant NULL, device: the profile's name),
#: numbered by SQLite in commit order (writers take turns at the database's write lock), and
#: written by triggers in the writing transaction itself.  `at` (seconds) is what it is pruned by
#: (directory.py); `registry_log.pruned` is the highest number pruned, so that a reader that had
#: not read that far knows to read everything again.
CHANGES_SQLITE = """
CREATE TABLE IF NOT EXISTS registry_changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT,
    device TEXT,
    at     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_log (one INTEGER PRIMARY KEY CHECK (one = 1), pruned INTEGER NOT NULL);
INSERT INTO registry_log VALUES (1, 0) ON CONFLICT (one) DO NOTHING;
CREATE TRIGGER IF NOT EXISTS devices_added AFTER INSERT ON devices BEGIN
    INSERT INTO registry_changes (tenant, device, at) VALUES (NEW.tenant, NEW.device, CAST(strftime('%s', 'now') AS INTEGER));
END;
CREATE TRIGGER IF NOT EXISTS devices_changed AFTER UPDATE ON devices BEGIN
    INSERT INTO registry_changes (tenant, device, at) VALUES (NEW.tenant, NEW.device, CAST(strftime('%s', 'now') AS INTEGER));
    INSERT INTO registry_changes (tenant, device, at) SELECT OLD.tenant, OLD.device, CAST(strftime('%s', 'now') AS INTEGER)
        WHERE OLD.tenant IS NOT NEW.tenant OR OLD.device IS NOT NEW.device;
END;
CREATE TRIGGER IF NOT EXISTS devices_removed AFTER DELETE ON devices BEGIN
    INSERT INTO registry_changes (tenant, device, at) VALUES (OLD.tenant, OLD.device, CAST(strftime('%s', 'now') AS INTEGER));
END;
CREATE TRIGGER IF NOT EXISTS profiles_added AFTER INSERT ON profiles BEGIN
    INSERT INTO registry_changes (tenant, device, at) VALUES (NULL, NEW.name, CAST(strftime('%s', 'now') AS INTEGER));
END;
CREATE TRIGGER IF NOT EXISTS profiles_changed AFTER UPDATE ON profiles BEGIN
    INSERT INTO registry_changes (tenant, device, at) VALUES (NULL, NEW.name, CAST(strftime('%s', 'now') AS INTEGER));
END;
CREATE TRIGGER IF NOT EXISTS profiles_removed AFTER DELETE ON profiles BEGIN
    INSERT INTO registry_changes (tenant, device, at) VALUES (NULL, OLD.name, CAST(strftime('%s', 'now') AS INTEGER));
END;
"""
#: Columns added after the first release of the table, for data dirs created before them.
MIGRATIONS = (
    ("psk_identity", "TEXT"), ("psk", "BLOB"), ("cert_sha256", "TEXT"),
    ("power_mode", "TEXT NOT NULL DEFAULT 'drx'"), ("topics", "TEXT NOT NULL DEFAULT '#'"),
    ("gateways", "TEXT NOT NULL DEFAULT ''"), ("oscore", "TEXT"), ("oscore_kid", "TEXT"),
)
#: Migrated columns that carry a UNIQUE constraint in SCHEMA (ALTER TABLE cannot add one: an index does).
_UNIQUE = ("psk_identity", "cert_sha256", "oscore_kid")
#: The registry's numbered migrations (`Db.migrate`; a new one goes at the end, SCHEMA gets its change too):
#: 1 = the columns added before there were versions.
SCHEMA_MIGRATIONS = (add_columns("devices", MIGRATIONS, _UNIQUE),)
#: the devices table's columns, in the order of a row (`row`) and of every SELECT of a device
COLUMNS = ("tenant", "device", "profile", "token", "created_at", "psk_identity", "psk", "cert_sha256", "power_mode",
           "topics", "gateways", "oscore", "oscore_kid")
_COLUMNS = ", ".join(COLUMNS)
#: ThingsBoard's power modes: DRX is always reachable; PSM only for a while after each uplink.
POWER_MODES = ("drx", "psm")
#: MQTT-style topic filters (EMQX front door), space-separated; `+` one level, `#` the rest.
TOPIC_FILTER_RE = re.compile(r"(?:[^\s#+/]*|\+)(?:/(?:[^\s#+/]*|\+))*(?:/#)?|#")
SHA256_RE = re.compile(r"[0-9a-f]{64}")

#: Tenants become Kafka topic names (`telemetry.raw.{tenant}`): Kafka's legal characters.
TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEVICE_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
#: Tokens travel in one Uri-Path segment: printable ASCII without '/', at most 255 bytes.
TOKEN_RE = re.compile(r"[!-.0-~]{1,255}")
#: PSK identities are opaque to DTLS, but they are typed on command lines: printable ASCII.
PSK_IDENTITY_RE = re.compile(r"[!-~]{1,128}")
#: RFC 4279 allows keys up to 64 bytes; fewer than 8 is too weak to accept.
PSK_MIN, PSK_MAX = 8, 64


#: A registry operation refused; the message names the field and why.  The name callers knew for
#: the kind corem/errors.py calls BadInput (`except RegistryError` still takes its Conflicts).
RegistryError = BadInput


class OscoreKeys(msgspec.Struct, frozen=True, kw_only=True):
    """A device's OSCORE security context input (RFC 8613 §3.1), seen from corem: `sender_id` is
    corem's, `recipient_id` the device's own Sender ID (the kid its requests carry)."""

    sender_id: bytes
    recipient_id: bytes
    secret: bytes
    salt: bytes = b""
    id_context: bytes | None = None

    @property
    def kid(self) -> tuple[bytes, bytes]:
        """How a request finds it: (its kid context or b'', its kid)."""
        return (self.id_context or b"", self.recipient_id)

    def key_text(self) -> str:
        """The unique registry key for `kid`, as text (hex)."""
        return f"{(self.id_context or b'').hex()}/{self.recipient_id.hex()}"


#: OSCORE IDs are at most 7 bytes with AES-CCM-16-64-128 (RFC 8613 §3.3); RFC 8613 asks for a
#: master secret of at least the key length (16 bytes)
OSCORE_ID_MAX, OSCORE_SECRET_MIN, OSCORE_SECRET_MAX = 7, 16, 64
_OSCORE_CODEC = (msgspec.json.Encoder(), msgspec.json.Decoder(OscoreKeys))


def parse_oscore(sender_id: str | None, recipient_id: str | None, secret: str | None, secret_hex: str | None,
                 salt: str | None = None, id_context: str | None = None) -> OscoreKeys | None:
    """OSCORE keys from the CLI's or API's text (IDs, salt and ID context in hex, the secret as
    text or hex); None if none is given.  BadInput names the field."""
    given = [v is not None for v in (sender_id, recipient_id, secret, secret_hex, salt, id_context)]
    if not any(given):
        return None
    if sender_id is None or recipient_id is None or (secret is None and secret_hex is None):
        raise BadInput("oscore: a sender ID, a recipient ID and a secret go together; give all three")
    if secret is not None and secret_hex is not None:
        raise BadInput("oscore_secret: give it as text or as hex, not both")

    def unhex(name: str, text: str) -> bytes:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise BadInput(f"{name}: not hexadecimal") from None

    keys = OscoreKeys(
        sender_id=unhex("oscore_sender_id", sender_id), recipient_id=unhex("oscore_recipient_id", recipient_id),
        secret=utf8(secret, "oscore_secret") if secret is not None else unhex("oscore_secret_hex", secret_hex or ""),
        salt=unhex("oscore_salt", salt or ""), id_context=None if id_context is None else unhex("oscore_id_context", id_context))
    for name in ("sender_id", "recipient_id"):
        if len(getattr(keys, name)) > OSCORE_ID_MAX:
            raise BadInput(f"oscore_{name}: {len(getattr(keys, name))} bytes; at most {OSCORE_ID_MAX}")
    if keys.sender_id == keys.recipient_id:
        raise BadInput("oscore_recipient_id: must differ from the sender ID (RFC 8613 §3.3)")
    if not OSCORE_SECRET_MIN <= len(keys.secret) <= OSCORE_SECRET_MAX:
        raise BadInput(f"oscore_secret: {len(keys.secret)} bytes; a master secret must be "
                            f"{OSCORE_SECRET_MIN}-{OSCORE_SECRET_MAX} bytes")
    if keys.id_context is not None and len(keys.id_context) > 255:
        raise BadInput("oscore_id_context: at most 255 bytes")
    return keys


class Device(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    device: str
    profile: str = "default"
    token: str | None = None
    created_at: int = 0
    psk_identity: str | None = None
    psk: bytes | None = None
    #: SHA-256 of the device's X.509 certificate (DER), lowercase hex
    cert_sha256: str | None = None
    #: "drx" (always reachable) or "psm" (reachable only shortly after it talks; updates queue)
    power_mode: str = "drx"
    #: topic filters this device may publish and subscribe to on /ps and /mqtt (its tenant's only)
    topics: str = "#"
    #: devices of the same tenant allowed to publish for this one (Drogue's `as=`), space-separated
    gateways: str = ""
    #: the OSCORE security context's input (corem/oscore), or None
    oscore: OscoreKeys | None = None


def credentials(device: Device) -> bytes:
    """A digest of who `device` is and what it proves it with: its name, its registration
    (`created_at`: removed and added again, it is another device) and every credential (token,
    PSK, certificate, OSCORE).  What was granted on them -- a DTLS session, a TLS connection, an
    observation, a saved session's seal -- ends when this changes (corem/identity.py, the DTLS
    layer); a change of profile, topics or power mode leaves it be.  Stable across processes and
    nodes (a saved session is opened elsewhere)."""
    return hashlib.blake2b(msgspec.msgpack.encode(_credential_fields(device)), digest_size=16,
                           person=b"corem.device").digest()


def same_credentials(a: Device, b: Device) -> bool:
    """`credentials(a) == credentials(b)` without the two digests (a request's check: identity.py)."""
    return a is b or _credential_fields(a) == _credential_fields(b)


def _credential_fields(device: Device) -> tuple[object, ...]:
    return (device.tenant, device.device, device.created_at, device.token, device.psk_identity, device.psk,
            device.cert_sha256, device.oscore)


#: what a profile's name may be (PROFILE_NAME_RE), in words
PROFILE_NAMES = "1-64 of A-Z a-z 0-9 . _ -"


def check_field(name: str, value: object, pattern: re.Pattern, allowed: str, *, secret: bool = False) -> None:
    """BadInput naming `name` unless `value` is a string matching `pattern` whole (a secret's
    value is not repeated in the message)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        what = "not valid" if secret else f"{value!r} is not valid"
        raise BadInput(f"{name}: {what}; allowed: {allowed}")


def parse_psk(text: str | None, hex_text: str | None) -> bytes | None:
    """A pre-shared key given as text or as hex (CLI `--psk`/`--psk-hex`, API `psk`/`psk_hex`)."""
    if text is not None and hex_text is not None:
        raise BadInput("psk: give it as text or as hex, not both")
    if hex_text is not None:
        try:
            return bytes.fromhex(hex_text)
        except ValueError:
            raise BadInput("psk_hex: not hexadecimal") from None
    return None if text is None else utf8(text, "psk")


def new_device(
    tenant: str,
    device: str,
    *,
    token: str | None = None,
    profile: str = "default",
    psk_identity: str | None = None,
    psk: bytes | None = None,
    cert_sha256: str | None = None,
    power_mode: str = "drx",
    topics: str = "#",
    gateways: str = "",
    oscore: OscoreKeys | None = None,
    created_at: int | None = None,
) -> Device:
    """A device, every field checked (BadInput names the field and what is allowed)."""
    check_field("tenant", tenant, TENANT_RE, "1-64 of A-Z a-z 0-9 . _ -")
    check_field("device", device, DEVICE_RE, "1-128 of A-Z a-z 0-9 . _ : @ -")
    if token is not None:
        check_field("token", token, TOKEN_RE, "1-255 printable ASCII characters except '/' and space", secret=True)
    if (psk_identity is None) != (psk is None):
        raise BadInput("psk: a PSK identity and a key go together; give both or neither")
    if psk_identity is not None:
        check_field("psk_identity", psk_identity, PSK_IDENTITY_RE, "1-128 printable ASCII characters, no spaces")
        assert psk is not None  # (checked above: they go together)
        if not PSK_MIN <= len(psk) <= PSK_MAX:
            raise BadInput(f"psk: {len(psk)} bytes; a key must be {PSK_MIN}-{PSK_MAX} bytes")
    if cert_sha256 is not None and not SHA256_RE.fullmatch(cert_sha256):
        raise BadInput("cert_sha256: not a lowercase hex SHA-256 fingerprint")
    # (a name `put_profile` could never give: such a device would be answered 5.00 until moved)
    check_field("profile", profile, PROFILE_NAME_RE, PROFILE_NAMES)
    if power_mode not in POWER_MODES:
        raise BadInput(f"power_mode: {power_mode!r} is not valid; allowed: {', '.join(POWER_MODES)}")
    filters = topics.split()
    if not filters or not all(TOPIC_FILTER_RE.fullmatch(f) for f in filters):
        raise BadInput(f"topics: {topics!r} is not valid; allowed: space-separated MQTT topic filters")
    for gateway in gateways.split():
        check_field("gateways", gateway, DEVICE_RE, "space-separated device ids")
    return Device(
        tenant=tenant, device=device, profile=profile, token=token,
        created_at=int(time.time() * 1000) if created_at is None else created_at,
        psk_identity=psk_identity, psk=psk, cert_sha256=cert_sha256, power_mode=power_mode,
        topics=" ".join(filters), gateways=" ".join(gateways.split()), oscore=oscore,
    )


def row(d: Device) -> tuple[Any, ...]:
    """A device as the devices table's row, in `COLUMNS` order."""
    oscore = d.oscore
    return (d.tenant, d.device, d.profile, d.token, d.created_at, d.psk_identity, d.psk, d.cert_sha256,
            d.power_mode, d.topics, d.gateways, None if oscore is None else _OSCORE_CODEC[0].encode(oscore).decode(),
            None if oscore is None else oscore.key_text())


#: The unique credentials of a device row, in the order a collision is named, with what each says
#: (the primary key, (tenant, device), is looked at first: "it exists" says it all).
UNIQUE_CREDENTIALS = (
    ("token", "token: already used by another device"),
    ("psk_identity", "psk_identity: already used by another device"),
    ("cert_sha256", "cert: this certificate is already registered to another device"),
    ("oscore_kid", "oscore_recipient_id: already used by another device (with this ID context)"),
)


def _conflict(db: Db, d: Device) -> Conflict:
    """Which unique column a refused INSERT of `d` collided with, asked of the table itself (one
    SELECT, the same SQL on SQLite and PostgreSQL) rather than read from the driver's message,
    whose words differ between the two (and between versions)."""
    values = dict(zip(COLUMNS, row(d)))
    try:
        if db.execute("SELECT 1 FROM devices WHERE tenant = ? AND device = ?", (d.tenant, d.device)).fetchone():
            return Conflict(f"device: {d.tenant}/{d.device} already exists")
        for column, says in UNIQUE_CREDENTIALS:
            value = values[column]
            if value is not None and db.execute(f"SELECT 1 FROM devices WHERE {column} = ?", (value,)).fetchone():
                return Conflict(says)
    except db.Error:  # (the database failing while it is asked: the collision stands, unnamed)
        pass
    # (the row it collided with is gone since: a writer beside this one)
    return Conflict(f"device: {d.tenant}/{d.device} collided with a device written meanwhile; try again")


class Registry:
    @classmethod
    def reading(cls, db: Db) -> Registry:
        """A Registry on an open connection, for reads only (no schema work)."""
        reg = cls.__new__(cls)
        reg.db = db
        reg.path = Path(db.where) if not db.shared else None
        return reg

    def __init__(self, where: Path | str) -> None:
        """`where`: the SQLite file, or a postgresql:// URL (db.py)."""
        self.db = Db(where)
        self.path: Path | None = None if self.db.shared else Path(where)
        self.db.schema(SCHEMA, watched=("devices", "profiles"))  # (PostgreSQL: with its change log, db.py)
        self.db.migrate("registry", SCHEMA_MIGRATIONS)
        if not self.db.shared:
            self.db.schema(CHANGES_SQLITE)

    @property
    def shared(self) -> bool:
        """PostgreSQL: other nodes read and write it too."""
        return self.db.shared

    def close(self) -> None:
        self.db.close()

    def add_device(self, tenant: str, device: str, **settings: Any) -> Device:
        """Register a device (the settings of `new_device`); BadInput names what is wrong."""
        d = new_device(tenant, device, **settings)
        db = self.db
        # (in a caller's PostgreSQL transaction -- provisioning's -- a failed INSERT aborts it, and
        # the collision could not be named: found in review, "collided ... try again" came where
        # "already exists" is right.  A savepoint keeps the transaction usable for `_conflict`)
        marked = db.shared and db.in_transaction
        try:
            if marked:
                db.execute("SAVEPOINT add_device")
            db.execute(f"INSERT INTO devices ({_COLUMNS}) VALUES ({', '.join('?' * len(COLUMNS))})", row(d))
            if marked:
                db.execute("RELEASE SAVEPOINT add_device")
        except db.IntegrityError:
            if marked:
                db.execute("ROLLBACK TO SAVEPOINT add_device")
            raise _conflict(db, d) from None
        except self.db.Error as e:  # a full or failing disk, a lost database: retry later
            raise StorageUnavailable(f"storage: {e}") from None
        return d

    def remove_device(self, tenant: str, device: str) -> bool:
        try:
            cur = self.db.execute("DELETE FROM devices WHERE tenant = ? AND device = ?", (tenant, device))
        except self.db.Error as e:
            raise StorageUnavailable(f"storage: {e}") from None
        return cur.rowcount > 0

    # -- profiles (corem/profiles): stored checked, so a stored one always compiles ------------------
    def put_profile(self, name: str, profile: Profile) -> bool:
        """Add or replace the profile `name`; True if it is new.  Devices that name it use the new
        one from the next reload."""
        check_field("profile", name, PROFILE_NAME_RE, PROFILE_NAMES)
        if name == DEFAULT_PROFILE:
            raise BadInput(f"profile: {DEFAULT_PROFILE!r} is built in; give yours another name")
        existed = self.db.execute("SELECT 1 FROM profiles WHERE name = ?", (name,)).fetchone() is not None
        try:
            self.db.execute(
                "INSERT INTO profiles (name, spec, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
                (name, encode_profile(profile).decode(), int(time.time() * 1000)))
        except self.db.Error as e:
            raise StorageUnavailable(f"storage: {e}") from None
        return not existed

    def remove_profile(self, name: str) -> bool:
        """Remove a profile no device names (Conflict says which devices still do)."""
        users = self.db.execute("SELECT tenant, device FROM devices WHERE profile = ? LIMIT 4", (name,)).fetchall()
        if users:
            shown = ", ".join(f"{t}/{d}" for t, d in users[:3]) + (" and more" if len(users) > 3 else "")
            raise Conflict(f"profile: {name!r} is used by {shown}; move them to another profile first")
        try:
            cur = self.db.execute("DELETE FROM profiles WHERE name = ?", (name,))
        except self.db.Error as e:
            raise StorageUnavailable(f"storage: {e}") from None
        return cur.rowcount > 0

    def list_profiles(self) -> dict[str, Profile]:
        """Every stored profile by name (one that no longer parses -- written by a newer corem,
        say -- is left out and logged)."""
        out = {}
        for name, spec in self.db.execute("SELECT name, spec FROM profiles ORDER BY name"):
            try:
                out[name] = parse_profile(spec)
            except ProfileError as e:
                log.warning("profile %r in the registry does not parse (%s): devices naming it get 5.00", name, e)
        return out

    def list_devices(self, tenant: str | None = None) -> list[Device]:
        sql = f"SELECT {_COLUMNS} FROM devices"
        args: tuple = ()
        if tenant is not None:
            sql += " WHERE tenant = ?"
            args = (tenant,)
        rows = self.db.execute(sql + " ORDER BY tenant, device", args)
        return [
            Device(tenant=t, device=d, profile=p, token=k, created_at=c, psk_identity=i,
                   psk=None if s is None else bytes(s), cert_sha256=f,
                   power_mode=m, topics=o, gateways=g, oscore=None if x is None else _OSCORE_CODEC[1].decode(x))
            for t, d, p, k, c, i, s, f, m, o, g, x, _ in rows
        ]

    @property
    def conn(self) -> Db:
        """The connection, for the management tables that live in the same database."""
        return self.db

    def data_version(self) -> int:
        """Moves whenever the devices or profiles change (db.py: SQLite counts other connections'
        commits only)."""
        return self.db.data_version()
