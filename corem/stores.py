"""The stores a server opens from its settings -- the registry, the bus (its sink and, embedded,
its retention), the DTLS session store -- in the data dir (corem/datadir.py names the files) or
at their URLs.  A store that cannot be opened is one line naming its setting (a password in a
URL is not repeated)."""

from __future__ import annotations

import re
import sqlite3
from typing import Callable

from . import datadir
from .bus import EmbeddedBus, Sink
from .bus.kafka import KafkaSink
from .bus.retention import Pruner, parse_age, parse_size
from .config import ConfigError, Settings
from .dtls import SessionStore
from .errors import NewerFormat
from .registry import Registry


def redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


def open_registry(s: Settings) -> Registry:
    """The registry: SQLite in the data dir, or the PostgreSQL database `registry` names."""
    try:
        return Registry(s.registry_location())
    except (ConfigError, NewerFormat):  # a table a newer corem wrote
        raise
    except (sqlite3.Error, OSError) as e:  # a full or read-only disk: one line, not a traceback
        raise ConfigError(f"data_dir: cannot open {s.data_path / datadir.REGISTRY_FILE}: {e}") from None
    except Exception as e:  # psycopg's errors: the database is not reachable
        raise ConfigError(f"registry: cannot use {redacted(s.registry)}: {e}") from None


def make_sink(s: Settings, after_batch: Callable[[], None] | None = None, *, shared: bool = False) -> Sink:
    """The embedded SQLite bus (`shared` by the workers of one server), or Kafka for `--bus kafka://…`."""
    if s.bus == "embedded":
        return EmbeddedBus(datadir.bus_path(s), synchronous=s.store_synchronous, max_pending=s.sink_max_pending,
                           max_batch=s.sink_max_batch, after_batch=after_batch, shared=shared)
    return KafkaSink(s.kafka_settings(), max_pending=s.sink_max_pending, max_batch=s.sink_max_batch,
                     after_batch=after_batch)


def make_pruner(s: Settings) -> Pruner | None:
    """The embedded bus's retention (corem/bus/retention.py); None with Kafka, which keeps its own."""
    if s.bus != "embedded":
        return None
    return Pruner(datadir.bus_path(s), age=parse_age(s.bus_retention_age), size=parse_size(s.bus_retention_size),
                  keep=s.exchange_lifetime)


def session_store(s: Settings) -> SessionStore:
    """Where DTLS sessions are saved: `dtls_session_store`, or the data dir's SQLite file."""
    where = s.dtls_session_store
    try:
        return SessionStore(where or datadir.sessions_path(s))
    except Exception as e:  # psycopg's OperationalError: the database is not there
        if not where:
            raise
        raise ConfigError(f"dtls_session_store: cannot use {redacted(where)}: {e}") from None
