"""Settings: one table of keys, each settable by TOML file, environment variable and flag.

Precedence: flag > environment (`COREM_<KEY>`) > config file (`--config`, `COREM_CONFIG`) > default.
Every value is validated when corem starts; a bad one stops it with `ConfigError` naming the key
and what is allowed.  A TOML file may use TOML's own types (`workers = 4`, `fast_lane = false`,
`dtls_ciphers = [...]`, `[presence_tenants]`); numbers must be finite.  Each secret (`SECRETS`)
may instead be read from a file (`<key>_file`, `--<key>-file`, `COREM_<KEY>_FILE`).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .datafiles import REGISTRY_FILE
from .errors import BadInput

if TYPE_CHECKING:
    from .bus.kafka import KafkaSettings
    from .coap import Params
    from .dtls import DtlsParams
    from .net.limits import Network
    from .net.tcp import TcpParams

log = logging.getLogger(__name__)


class ConfigError(BadInput):
    pass


def parse_hostport(value: str, key: str, *, allow_off: bool = False) -> tuple[str, int] | None:
    """`HOST:PORT` or `[V6]:PORT`; `off` disables the listener where allowed."""
    if allow_off and value.strip().lower() in ("off", "none", ""):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: {value!r} is not HOST:PORT" + (" or 'off'" if allow_off else ""))
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{key}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{key}: port {p} is outside 0-65535")
    return host, p


def _positive(key: str, v: Any) -> None:
    if v <= 0:
        raise ConfigError(f"{key}: {v} must be > 0")


def _a_path(key: str, v: Any) -> None:
    """(an empty path is the current directory: a data_dir there would make it 0700 and every file
    in it 0600 -- never by accident)"""
    if not str(v).strip():
        raise ConfigError(f"{key}: empty; name a directory (the default is 'data')")


def _non_negative(key: str, v: Any) -> None:
    if v < 0:
        raise ConfigError(f"{key}: {v} must be >= 0")


def _busy_poll_us(key: str, v: Any) -> None:
    from .net.busypoll import MAX_WINDOW_US

    if not 0 <= v <= MAX_WINDOW_US:
        raise ConfigError(f"{key}: {v} must be within 0-{MAX_WINDOW_US} (µs; 0 is off)")


def _choice(*allowed: str) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if v not in allowed:
            raise ConfigError(f"{key}: {v!r} is not allowed; use one of {', '.join(a or repr(a) for a in allowed)}")

    check.allowed = allowed  # type: ignore[attr-defined]  # (TOML's true/false: on/off where allowed)
    return check


def _hostport(allow_off: bool) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        parse_hostport(v, key, allow_off=allow_off)

    return check


def _bus(key: str, v: Any) -> None:
    if v == "embedded":
        return
    from .bus.kafka import parse_bus_url

    try:
        parse_bus_url(v)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _parses(module: str, parser: str) -> Callable[[str, Any], None]:
    """A check that `module.parser(value, key)` takes the value; imported when first checked, so
    that loading the settings does not load the bus or the network layer."""

    def check(key: str, v: Any) -> None:
        try:
            getattr(importlib.import_module(module, __package__), parser)(v, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    return check


def _file(key: str, v: Any) -> None:
    if v and not os.path.isfile(v):
        raise ConfigError(f"{key}: {v!r} is not a readable file")


def parse_thresholds(value: str, key: str = "presence_tenants") -> dict[str, float]:
    """`tenant=seconds,tenant=seconds` -> {tenant: seconds} (`presence_profiles`: profiles)."""
    named = "PROFILE" if key == "presence_profiles" else "TENANT"
    out: dict[str, float] = {}
    for item in filter(None, (i.strip() for i in value.split(","))):
        tenant, sep, seconds = item.partition("=")
        try:
            out[tenant.strip()] = float(seconds)
        except ValueError:
            out[tenant.strip()] = -1.0
        if not sep or not tenant.strip() or not 0 < out[tenant.strip()] < math.inf:
            raise ConfigError(f"{key}: {item!r} is not {named}=SECONDS with SECONDS a finite number > 0")
    return out


def _thresholds(key: str, v: Any) -> None:
    parse_thresholds(v, key)


def _not_empty(key: str, v: Any) -> None:
    if not str(v).strip():
        raise ConfigError(f"{key}: empty; give a name (the default is 'corem')")


def _node_url(key: str, v: Any) -> None:
    """Empty (derived from the http listener), or an http(s) URL with a host: what the other
    nodes call."""
    if not v:
        return
    from urllib.parse import urlsplit

    try:
        url = urlsplit(v)
        url.port  # (raises ValueError for a port that is not a number or out of range)
    except ValueError as e:
        raise ConfigError(f"{key}: {v!r} is not a URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{key}: {v!r} is not an http:// or https:// URL with a host (e.g. http://10.0.0.7:8080)")


def _workers(key: str, v: Any) -> None:
    if str(v).strip().lower() == "auto":
        return
    try:
        n = int(v)
    except ValueError:
        raise ConfigError(f"{key}: {v!r} is not a number of processes or 'auto'") from None
    if not 1 <= n <= 1024:
        raise ConfigError(f"{key}: {n} must be 1 to 1024")


def _redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


def _database_url(key: str, v: Any) -> None:
    if v and not str(v).startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{key}: {v!r} is not a postgresql:// URL (empty: SQLite in the data dir)")


def _opt(default: Any, help: str, check: Callable[[str, Any], None] | None = None, form: str = "") -> Any:
    """A setting; `form`: "list" (a comma-separated list: a TOML array too) or "table" (KEY=VALUE
    pairs, comma-separated: a TOML table too)."""
    return field(default=default, metadata={"help": help, "check": check, "form": form})


#: the settings that are secrets: each may come from a file instead (`<key>_file`: the file's text,
#: without a trailing newline), kept out of `ps`, the environment and the config file
SECRETS = ("admin_token", "kafka_sasl_password", "dtls_state_key")
#: what both DTLS engines implement
DEFAULT_CIPHERS = "TLS-PSK-WITH-AES-128-CCM-8,TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8"


def _secret_file(secret: str) -> Any:
    return _opt("", f"a file holding {secret} (its text, without a trailing newline): the secret stays out of "
                    f"the command line, the environment and the config file; not with {secret} itself")


@dataclass
class Settings:
    coap: str = _opt("0.0.0.0:5683", "CoAP (UDP) listener HOST:PORT; port 0 picks one; 'off' disables", _hostport(True))
    coaps: str = _opt("0.0.0.0:5684", "CoAPS (DTLS 1.2) listener HOST:PORT; port 0 picks one; 'off' disables", _hostport(True))
    coap_tcp: str = _opt("off", "CoAP over TCP (RFC 8323) listener HOST:PORT (e.g. 0.0.0.0:5683); 'off' disables",
                         _hostport(True))
    coaps_tcp: str = _opt("off", "CoAP over TLS (RFC 8323) listener HOST:PORT (e.g. 0.0.0.0:5684), with the DTLS "
                          "listener's PSK and certificate settings; 'off' disables", _hostport(True))
    tcp_max_connections: int = _opt(10_000, "CoAP over TCP/TLS connections at once, per listener (lowered at "
                                    "start to what fits below the open files limit)", _positive)
    tcp_max_connections_per_source: int = _opt(
        1000, "CoAP over TCP/TLS connections one source address may hold, per listener (so one host cannot take "
        "every connection: a carrier's NAT in front of many devices needs room, hence not fewer)", _positive)
    tcp_max_message: int = _opt(9216, "the Max-Message-Size corem's CSM announces (bytes): a larger message "
                                "aborts its connection", _positive)
    tcp_idle_timeout: float = _opt(600.0, "seconds a silent TCP/TLS connection is kept before a Release", _positive)
    dtls_ciphers: str = _opt(
        DEFAULT_CIPHERS,
        "comma-separated DTLS cipher suites: TLS-PSK-WITH-AES-128-CCM-8, TLS-PSK-WITH-AES-128-CCM, "
        "TLS-PSK-WITH-AES-128-GCM-SHA256, TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8, TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256 "
        "(checked at start, even with CoAPS off)", form="list",
    )
    dtls_cert: str = _opt("", "PEM certificate chain the server presents (certificate mode)", _file)
    dtls_key: str = _opt("", "PEM private key of dtls_cert", _file)
    dtls_ca: str = _opt("", "PEM CA certificate(s) device certificates must chain to", _file)
    dtls_client_auth: str = _opt(
        "required", "certificate mode: 'required' (device certificate, registered), 'none' (one-way) or, with "
        "dtls_engine = corem, 'optional' (a certificate, when sent, must verify; without one a device names "
        "itself with a token)", _choice("required", "none", "optional"),
    )
    dtls_engine: str = _opt(
        "corem", "the DTLS implementation CoAPS runs on: 'corem' (corem's own engine on cryptography: Connection "
        "ID, sessions stored as sealed data) or, deprecated, 'mbedtls' (python-mbedtls, Mbed TLS 2.28, out of "
        "support; only with the optional package installed: pip install 'corem[mbedtls]'; never with a shared "
        "dtls_session_store)",
        _choice("corem", "mbedtls"),
    )
    dtls_state_key: str = _opt(
        "", "dtls_engine = corem: the key (hex, 32 or 64 digits) stored DTLS sessions are sealed under; empty = "
        "one kept in data_dir/dtls-state.key (mode 0600); required when dtls_session_store is shared "
        "(PostgreSQL: every node must open what the others saved)",
    )
    dtls_state_key_file: str = _secret_file("dtls_state_key")
    dtls_max_handshakes: int = _opt(1000, "DTLS handshakes in progress at most (past the cookie exchange)", _positive)
    dtls_max_sessions: int = _opt(100_000, "established DTLS sessions at most", _positive)
    dtls_max_sessions_per_device: int = _opt(
        1000, "dtls_engine = corem: established DTLS sessions one device (one credential) may hold; its new "
        "handshake ends its oldest beyond them, so one credential, stolen or misused, cannot take every session "
        "(a fleet that shares one credential needs room: not fewer than its devices)", _positive,
    )
    dtls_handshake_timeout: float = _opt(30.0, "seconds a DTLS handshake may take before it is dropped", _positive)
    dtls_session_inactivity_timeout: float = _opt(86400.0, "seconds an idle DTLS session is kept", _positive)
    dtls_offload_after: float = _opt(
        60.0, "seconds of idleness after which a DTLS session is serialized (~90 B; ~130 B stored) and its live "
        "context freed",
        _positive,
    )
    workers: str = _opt(
        "1", "worker processes serving the same CoAP/CoAPS ports (SO_REUSEPORT, each peer kept on one); "
        "'auto' = one per CPU", _workers,
    )
    dtls_extended_master_secret: str = _opt(
        "required", "dtls_engine = corem: 'required' (a ClientHello without RFC 7627's extended master secret "
        "gets handshake_failure, counted as no_extended_master_secret) or 'optional' (such a device is served on "
        "RFC 5246's master secret: only for a fleet whose DTLS stack cannot send it, e.g. node-dtls-client); "
        "TLS over TCP alike", _choice("required", "optional"),
    )
    dtls_busy_poll_us: int = _opt(
        150, "dtls_engine = corem: after sending a handshake flight, poll the CoAPS socket on the CPU this many µs "
        "for the device's answer instead of sleeping (a close device's next flight is read without the wake-up; "
        "measured in net/busypoll.py and docs/benchmarks.md); polls that see nothing back off (up to 63 flights "
        "unpolled) and polling never takes more than a quarter of the time; 0 is off", _busy_poll_us,
    )
    dtls_checkpoint: str = _opt(
        "on", "save each DTLS session to the session store once it carries data, so that a crash, a killed "
        "worker or another node takes it up without a handshake; 'off': saved only when idle or at shutdown",
        _choice("on", "off"),
    )
    dtls_session_store: str = _opt(
        "", "where DTLS sessions are saved: empty = data_dir/dtls-sessions.db (SQLite, this node); "
        "postgresql://user@host/db = shared by every node, so a device keeps its session when its node is lost",
        _database_url,
    )
    http: str = _opt("127.0.0.1:8080", "admin HTTP listener (/metrics, /healthz, /readyz, /api, /ui); 'off' disables", _hostport(True))
    node_url: str = _opt(
        "", "this node's admin URL as the other nodes reach it (nodes sharing a PostgreSQL registry forward "
        "a device's downlink to the node that holds it); empty: http:// and the http listener's address",
        _node_url,
    )
    data_dir: str = _opt("data", "directory for the registry and the embedded bus", _a_path)
    registry: str = _opt(
        "", "the device registry: empty = data_dir/registry.db (SQLite, this node); postgresql://user@host/db = "
        "one registry for every node (devices, credentials, profiles, attributes, packages, provisioning keys, "
        "claims)", _database_url,
    )
    bus: str = _opt(
        "embedded", "where accepted points go: 'embedded' (SQLite log in data_dir) or kafka://host:port[,host:port]",
        _bus,
    )
    topic_prefix: str = _opt(
        "", "put before the name of every topic corem writes and reads (telemetry.raw.{tenant}, attributes.{tenant}, "
        "pubsub.{tenant}, device.presence.{tenant}, commands.{tenant}, commands.results.{tenant}), e.g. 'site-7.'; "
        "empty: none", _parses(".bus.topics", "check_prefix"),
    )
    kafka_client_id: str = _opt("corem", "Kafka client id", _not_empty)
    kafka_acks: str = _opt("all", "Kafka acks: all, 1 or 0 (2.04 waits for this acknowledgement)", _choice("all", "1", "0"))
    kafka_idempotence: str = _opt(
        "auto", "idempotent producer (no duplicates from retries): 'auto' (on with kafka_acks=all), 'on' or 'off'",
        _choice("auto", "on", "off"),
    )
    kafka_compression: str = _opt("none", "Kafka compression (all built into librdkafka)",
                                  _choice("none", "gzip", "snappy", "lz4", "zstd"))
    kafka_linger_ms: float = _opt(
        0.2, "Kafka producer linger, ms (fractions allowed): how long librdkafka waits to fill a batch", _non_negative
    )
    kafka_batch_size: int = _opt(65536, "Kafka producer batch size, bytes", _positive)
    kafka_timeout: float = _opt(
        10.0, "seconds Kafka may take to acknowledge a record before its device gets 5.03 (librdkafka's "
        "message.timeout.ms: it gives the record up too)", _positive,
    )
    kafka_config: str = _opt(
        "", "any other librdkafka property: 'key=value,key=value' or a TOML table; checked by librdkafka at start, "
        "whatever the bus (its form only, without librdkafka installed)",
        _parses(".bus.kafka", "parse_kafka_config"), form="table",
    )
    kafka_security_protocol: str = _opt(
        "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    )
    kafka_sasl_mechanism: str = _opt("", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (managed clusters)",
                                     _choice("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    kafka_sasl_username: str = _opt("", "SASL user name")
    kafka_sasl_password: str = _opt("", "SASL password (prefer kafka_sasl_password_file)")
    kafka_sasl_password_file: str = _secret_file("kafka_sasl_password")
    kafka_ssl_cafile: str = _opt("", "CA file to verify the brokers (SSL)", _file)
    kafka_ssl_certfile: str = _opt("", "client certificate for the brokers (SSL)", _file)
    kafka_ssl_keyfile: str = _opt("", "client key for the brokers (SSL)", _file)
    kafka_commands_refresh: float = _opt(
        5.0, "seconds between looks for new commands.{tenant} topics (new tenants) on Kafka", _positive
    )
    store_synchronous: str = _opt(
        "FULL", "SQLite synchronous mode of the embedded bus: FULL survives power loss, NORMAL a crash",
        _choice("FULL", "NORMAL", "EXTRA", "OFF"),
    )
    bus_retention_age: str = _opt(
        "7d", "embedded bus: records older than this are pruned, oldest first (s, m, h, d, w; e.g. 7d); 'off' "
        "keeps them", _parses(".bus.retention", "parse_age"),
    )
    bus_retention_size: str = _opt(
        "off", "embedded bus: the oldest records are pruned while the log uses more than this (B, kB, MB, GB, "
        "TB, KiB, MiB, GiB, TiB; a plain number is bytes; e.g. 2GiB); 'off' sets no bound", _parses(".bus.retention", "parse_size"),
    )
    fast_lane: str = _opt(
        "on", "the common telemetry POST answered in C (token path on CoAP, session on CoAPS; every built-in "
        "payload format and protobuf decoded in C, JavaScript codecs called from the lane); 'off': all in Python",
        _choice("on", "off"),
    )
    sink_max_pending: int = _opt(100_000, "points waiting for the bus before devices get 5.03", _positive)
    sink_max_batch: int = _opt(8192, "points per bus batch at most", _positive)
    piggyback_timeout: float = _opt(0.5, "seconds to answer in the ACK before a separate response", _positive)
    ack_timeout: float = _opt(2.0, "ACK_TIMEOUT (RFC 7252) for separate responses, seconds", _positive)
    max_retransmit: int = _opt(4, "MAX_RETRANSMIT (RFC 7252)", _positive)
    exchange_lifetime: float = _opt(247.0, "seconds a message id is remembered for deduplication", _positive)
    dedup_max_entries: int = _opt(100_000, "exchanges remembered for deduplication at most", _positive)
    rate_limit_per_source: float = _opt(
        1000.0, "datagrams per second one source address may send (burst: twice that); 0 disables",
        _non_negative,
    )
    rate_limit_sources: int = _opt(100_000, "source addresses tracked by the rate limit at most", _positive)
    rate_limit_exempt: str = _opt(
        "", "networks never rate-limited, e.g. '10.0.0.0/8,2001:db8::/32' (your own gateways)",
        _parses(".net.limits", "parse_networks"), form="list",
    )
    max_datagram: int = _opt(1500, "largest datagram accepted, bytes (larger ones are dropped and counted)", _positive)
    presence_offline_after: float = _opt(
        120.0, "seconds without an accepted reading after which a device is offline", _positive
    )
    presence_tenants: str = _opt(
        "", "per-tenant offline thresholds overriding presence_offline_after, e.g. 'acme=30,globex=600'",
        _thresholds, form="table",
    )
    presence_profiles: str = _opt(
        "", "per-profile offline thresholds (they win over presence_tenants), e.g. 'meter=7200,tracker=60'",
        _thresholds, form="table",
    )
    admin_token: str = _opt(
        "", "bearer token for the admin REST API and UI; empty: one is generated into data_dir/admin-token"
    )
    admin_token_file: str = _secret_file("admin_token")
    admin_max_body: int = _opt(256 * 1024 * 1024, "largest admin API request body, bytes (firmware uploads)", _positive)
    psm_activity_timer: float = _opt(
        10.0, "seconds a PSM device stays reachable after it talks (updates for it queue otherwise)", _positive
    )
    provisioning_rate_per_source: float = _opt(
        1.0, "devices one source address may provision a second (ten seconds' worth at once; then 5.03 with "
        "Max-Age; 0: no bound)", _non_negative)
    provisioning_rate_per_key: float = _opt(
        10.0, "devices one provisioning key may register a second (ten seconds' worth at once; then 5.03 with "
        "Max-Age; 0: no bound)", _non_negative)
    max_readings_per_point: int = _opt(
        1_000, "readings one point (one record) may have; a payload with a point of more is refused 4.00 naming "
        "this bound", _positive)
    max_queued_commands: int = _opt(
        100, "RPC requests (queued or awaiting their reply) and commands queued per device at most", _positive)
    pubsub_max_retained: int = _opt(
        10_000, "retained /ps messages kept at most, all tenants together (the oldest of the tenant holding the "
        "most dropped first)", _positive)
    pubsub_max_retained_per_tenant: int = _opt(
        10_000, "retained /ps messages one tenant keeps at most (its own oldest dropped first)", _positive)
    max_observers: int = _opt(10_000, "Observe registrations per transport at most", _positive)
    max_observers_per_resource: int = _opt(1_000, "Observe registrations per resource at most", _positive)
    max_observers_per_source: int = _opt(32, "Observe registrations per source address at most", _positive)
    max_observers_per_device: int = _opt(
        64, "Observe registrations of one device (attributes, RPC, pub/sub topics), from any address, at most",
        _positive)
    max_uploads: int = _opt(1_000, "Block1 uploads in progress per transport at most", _positive)
    max_uploads_per_source: int = _opt(
        32, "Block1 uploads in progress per source address at most (their blocks come before the request is "
        "authenticated)", _positive)
    max_upload_size: int = _opt(64 * 1024, "largest body a Block1 upload may reassemble, bytes (then 4.13)", _positive)
    diagnostics_samples: int = _opt(1000, "rejected samples kept for diagnostics", _positive)
    log_level: str = _opt("info", "debug, info, warning or error", _choice("debug", "info", "warning", "error"))
    log_format: str = _opt("kv", "log lines as key=value ('kv') or JSON objects ('json')", _choice("kv", "json"))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def help(cls, key: str) -> str:
        return {f.name: f.metadata["help"] for f in fields(cls)}[key]

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        config_file: str | None = None,
    ) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get("COREM_CONFIG")
        if path:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except FileNotFoundError:
                raise ConfigError(f"config: file {path} not found") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
            for key in data:
                if key not in cls.keys():
                    raise ConfigError(f"{key}: unknown key in {path}; known keys: {', '.join(cls.keys())}")
            _take(values, data, f"the config file {path}")
        _take(values, {key: env[name] for key in cls.keys() if (name := "COREM_" + key.upper()) in env},
              "the environment")
        _unknown_environment(env, cls.keys())
        _take(values, {key: value for key, value in (flags or {}).items() if value is not None}, "the flags")
        settings = cls()
        for opt in fields(cls):
            if opt.name in values:
                setattr(settings, opt.name, _coerce(opt.name, values[opt.name], type(opt.default), opt.metadata["form"]))
            check = opt.metadata["check"]
            if check is not None:
                check(opt.name, getattr(settings, opt.name))
        for secret in SECRETS:
            where = getattr(settings, secret + "_file")
            if where:
                setattr(settings, secret, read_secret(where, secret + "_file"))
        return settings.check()

    def check(self) -> Settings:
        """Rules that involve several keys, and the optional packages the settings need (one line
        naming the extra to install: corem/extras.py)."""
        from .extras import installed, needs

        if self.bus != "embedded" and not installed("kafka"):
            raise ConfigError(needs(f"bus: {self.bus}", "kafka"))
        for setting in ("registry", "dtls_session_store"):
            if getattr(self, setting) and not installed("postgres"):
                raise ConfigError(needs(f"{setting}: {_redacted(getattr(self, setting))}", "postgres"))
        if self.dtls_client_auth == "optional" and self.dtls_engine != "corem":
            raise ConfigError("dtls_client_auth: 'optional' needs dtls_engine = corem (Mbed TLS 2.28, through "
                              "python-mbedtls, can only require a device certificate or not ask for one)")
        if self.dtls_engine == "mbedtls":
            try:
                importlib.import_module("mbedtls")
            except ImportError:
                raise ConfigError("dtls_engine: 'mbedtls' needs python-mbedtls, an optional package (pip install "
                                  "'corem[mbedtls]'); it bundles Mbed TLS 2.28, out of support: prefer 'corem'") from None
            if self.dtls_session_store:
                # (its stored sessions are pickles: a row another node wrote would run code here)
                raise ConfigError("dtls_session_store: a shared store needs dtls_engine = corem (the mbedtls "
                                  "engine stores sessions as pickles, which no process may read from another)")
        if self.dtls_engine == "corem" and self.dtls_session_store and not self.dtls_state_key:
            raise ConfigError("dtls_state_key: needed with dtls_engine = corem and a shared dtls_session_store "
                              "(every node seals and opens the stored sessions with it)")
        if self.dtls_state_key:
            try:
                key = bytes.fromhex(self.dtls_state_key.strip())
            except ValueError:
                raise ConfigError("dtls_state_key: not hex; 32 or 64 hex digits (a 16- or 32-byte key)") from None
            if len(key) not in (16, 32):
                raise ConfigError("dtls_state_key: 32 or 64 hex digits (a 16- or 32-byte key)")
        from .bus.retention import parse_age

        age = parse_age(self.bus_retention_age)
        if self.bus == "embedded" and age is not None and age < self.exchange_lifetime:
            # (a restart reads that long back from the bus to tell retransmissions of stored
            # readings from new ones: bus/recovery.py)
            raise ConfigError(f"bus_retention_age: {self.bus_retention_age!r} is shorter than exchange_lifetime "
                              f"({self.exchange_lifetime:g} s), which a restart reads back to store no reading "
                              f"twice; at least {math.ceil(self.exchange_lifetime)}s, or 'off'")
        if self.kafka_idempotence == "on" and self.kafka_acks != "all":
            raise ConfigError(f"kafka_idempotence: 'on' needs kafka_acks = all (it is {self.kafka_acks!r})")
        if self.kafka_sasl_mechanism and not self.kafka_security_protocol.startswith("SASL"):
            raise ConfigError("kafka_sasl_mechanism: needs kafka_security_protocol SASL_PLAINTEXT or SASL_SSL")
        self._check_ciphers()
        if self.bus != "embedded" or (self.kafka_config and installed("kafka")):
            # (with the embedded bus too: a kafka_config librdkafka refuses is named at start, not
            # when the bus moves to Kafka; without librdkafka installed its form is all there is to check)
            from .bus.kafka import check_kafka_settings

            try:
                check_kafka_settings(self.kafka_settings())
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return self

    def _check_ciphers(self) -> None:
        """`dtls_ciphers` names suites the DTLS engine takes, whether CoAPS is on or not: the DTLS
        side's one check and its words (`dtls.params.check_ciphers`), which the engine makes again
        when the listener starts."""
        if self.dtls_ciphers == DEFAULT_CIPHERS:
            # (the DTLS side's own default, DtlsParams's: held to it by tests/test_config.py; every
            # command loads the settings, and importing the DTLS side for it would cost ~0.2 s)
            return
        from .dtls.params import check_ciphers

        try:  # (mbedtls: importable, `check` made sure)
            check_ciphers(self.cipher_names(), self.dtls_engine)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def cipher_names(self) -> tuple[str, ...]:
        """`dtls_ciphers` as names, in their order."""
        return tuple(c.strip() for c in self.dtls_ciphers.split(",") if c.strip())

    def worker_count(self) -> int:
        """`workers` as a number: 'auto' is the CPUs this process may run on."""
        if self.workers.strip().lower() == "auto":
            return len(os.sched_getaffinity(0))
        return int(self.workers)

    def registry_location(self) -> Path | str:
        """The registry's SQLite file, or its PostgreSQL URL."""
        return self.registry or self.data_path / REGISTRY_FILE

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def listener(self, key: str) -> tuple[str, int] | None:
        """The address `coap`, `coaps`, `coap_tcp`, `coaps_tcp` or `http` listens on, or None when it is off."""
        return parse_hostport(getattr(self, key), key, allow_off=True)

    def presence_thresholds(self) -> tuple[dict[str, float], dict[str, float]]:
        """Offline thresholds per tenant and per profile (`presence_tenants`, `presence_profiles`)."""
        return (parse_thresholds(self.presence_tenants, "presence_tenants"),
                parse_thresholds(self.presence_profiles, "presence_profiles"))

    def exempt_networks(self) -> list[Network]:
        """`rate_limit_exempt`, parsed."""
        from .net.limits import parse_networks

        return parse_networks(self.rate_limit_exempt)

    def endpoint_params(self, *, verified_peers: bool = False) -> Params:
        """The message layer's parameters; `verified_peers` (behind DTLS) lifts the rule that an
        error answer is no larger than its request (plain UDP's anti-amplification)."""
        from .coap import Params

        return Params(
            ack_timeout=self.ack_timeout,
            max_retransmit=self.max_retransmit,
            piggyback_timeout=self.piggyback_timeout,
            exchange_lifetime=self.exchange_lifetime,
            dedup_max_entries=self.dedup_max_entries,
            limit_error_size=not verified_peers,
        )

    def tcp_params(self) -> TcpParams:
        from .net.tcp import TcpParams

        return TcpParams(max_connections=self.tcp_max_connections, max_per_source=self.tcp_max_connections_per_source,
                         max_message=self.tcp_max_message,
                         idle_timeout=self.tcp_idle_timeout, handshake_timeout=self.dtls_handshake_timeout)

    def dtls_params(self) -> DtlsParams:
        """The DTLS layer's parameters (cipher names are checked at start, `_check_ciphers`, and again
        when the listener starts)."""
        from .dtls import DtlsParams

        return DtlsParams(
            ciphers=self.cipher_names(),
            max_handshakes=self.dtls_max_handshakes,
            max_sessions=self.dtls_max_sessions,
            max_sessions_per_device=self.dtls_max_sessions_per_device,
            handshake_timeout=self.dtls_handshake_timeout,
            session_timeout=self.dtls_session_inactivity_timeout,
            offload_after=self.dtls_offload_after,
            checkpoint=self.dtls_checkpoint == "on",
            require_ems=self.dtls_extended_master_secret == "required",
            cert_file=self.dtls_cert or None,
            key_file=self.dtls_key or None,
            ca_file=self.dtls_ca or None,
            # ('optional' is the corem engine's alone, checked above; DtlsParams, python-mbedtls's, knows
            # two modes: the engine is given the setting itself, corem/server.py)
            client_auth="required" if self.dtls_client_auth == "optional" else self.dtls_client_auth,
        )

    def kafka_settings(self) -> KafkaSettings:
        """The `kafka_*` keys and `bus`, parsed, for the sink and the commands reader."""
        from .bus.kafka import KafkaSettings, parse_bus_url, parse_kafka_config

        return KafkaSettings(
            # (the embedded bus: a stand-in address, for `check` to have librdkafka judge kafka_config)
            bootstrap=parse_bus_url(self.bus) if self.bus != "embedded" else ("127.0.0.1:9092",),
            client_id=self.kafka_client_id,
            acks=self.kafka_acks,
            idempotence=self.kafka_idempotence,
            compression=self.kafka_compression,
            linger_ms=self.kafka_linger_ms,
            batch_size=self.kafka_batch_size,
            timeout=self.kafka_timeout,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism or None,
            sasl_username=self.kafka_sasl_username or None,
            sasl_password=self.kafka_sasl_password or None,
            ssl_cafile=self.kafka_ssl_cafile or None,
            ssl_certfile=self.kafka_ssl_certfile or None,
            ssl_keyfile=self.kafka_ssl_keyfile or None,
            extra=tuple(parse_kafka_config(self.kafka_config).items()),
        )


def _given(value: Any) -> bool:
    return value is not None and value != ""


def _take(values: dict[str, Any], source: Mapping[str, Any], where: str) -> None:
    """`source`'s values over `values` (the sources are taken from the lowest precedence up).  A
    secret and its file are one setting: a source that gives either replaces both, and one that
    gives both is refused."""
    for secret in SECRETS:
        inline, in_file = source.get(secret), source.get(secret + "_file")
        if _given(inline) and _given(in_file):
            raise ConfigError(f"{secret}: {secret} and {secret}_file are both given in {where}; give one of them")
        if _given(inline) or _given(in_file):
            values.pop(secret, None)
            values.pop(secret + "_file", None)
    values.update(source)


#: COREM_* variables that are not settings: the config file's path, the pure-Python switch (the C
#: parts' twins), and what a worker is handed by its supervisor (corem/workers)
NOT_SETTINGS = frozenset({"COREM_CONFIG", "COREM_PURE_PYTHON", "COREM_WORKER", "COREM_WORKER_SETTINGS"})


def _unknown_environment(env: Mapping[str, str], keys: list[str]) -> None:
    """A warning for each COREM_* variable that names no setting: a misspelt one would otherwise
    leave its setting at the default without a word (not an error, as an unknown key of the config
    file is: an environment carries variables of other tools and of other corem versions)."""
    names = {"COREM_" + key.upper() for key in keys}
    for name in sorted(env):
        if name.startswith("COREM_") and name not in names and name not in NOT_SETTINGS:
            near = difflib.get_close_matches(name, sorted(names), n=1)
            log.warning("%s: not a setting; ignored%s", name, f" (did you mean {near[0]}?)" if near else "")


def read_secret(path: str, key: str) -> str:
    """A secret from a file: its text without a trailing newline (`echo secret > file` writes one)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"{key}: {path} is empty")
    return text


def _finite(key: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number (nan and inf are refused)")
    return value


def _item(key: str, value: Any) -> str:
    """One element of a TOML array or value of a TOML table, as the setting's text spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        _finite(key, value)
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    raise ConfigError(f"{key}: expected text or a number in it, got {type(value).__name__} {value!r}")


def _coerce(key: str, value: Any, kind: type, form: str = "") -> Any:
    """A value from the file (TOML's types), the environment or a flag (text) as the setting's type."""
    if kind is str:
        if isinstance(value, str):
            return value
        check = getattr(Settings.__dataclass_fields__[key].metadata["check"], "allowed", ())
        if isinstance(value, bool) and "on" in check and "off" in check:  # fast_lane = false
            return "on" if value else "off"
        if isinstance(value, int) and not isinstance(value, bool):  # workers = 4, kafka_acks = 1
            return str(value)
        if isinstance(value, list) and form == "list":  # dtls_ciphers = ["...", "..."]
            return ",".join(_item(key, v) for v in value)
        if isinstance(value, dict) and form == "table":  # [presence_tenants] acme = 30
            return ",".join(f"{k}={_item(key, v)}" for k, v in value.items())
        what = {"list": "text or an array", "table": "text or a table"}.get(form, "text")
        raise ConfigError(f"{key}: expected {what}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and kind is float:
        return _finite(key, value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not a{'n integer' if kind is int else ' number'}") from None
        return _finite(key, number) if kind is float else number
    raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
