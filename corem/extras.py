"""The optional parts of corem and the packages they need (pyproject.toml's extras): a single embedded
node installs none of them (`pip install corem`, or requirements-runtime.lock); a setting or a
profile that needs one names it, in one line, when it is missing.

| extra      | package          | needed by                                                          |
|------------|------------------|--------------------------------------------------------------------|
| `kafka`    | confluent-kafka  | `bus = kafka://...` (the Kafka sink, the commands reader)          |
| `postgres` | psycopg[binary]  | `registry = postgresql://...`, `dtls_session_store = postgresql://...` |
| `js`       | quickjs-ng       | profiles of format `js` (TS013 JavaScript codecs)                  |
| `protobuf` | protobuf         | profiles of format `protobuf` (ThingsBoard's telemetry schemas)    |
| `mbedtls`  | python-mbedtls   | `dtls_engine = mbedtls` (deprecated)                               |
"""

from __future__ import annotations

import importlib.util

#: extra -> the module its package provides
MODULES = {"kafka": "confluent_kafka", "postgres": "psycopg", "js": "quickjs", "protobuf": "google.protobuf",
           "mbedtls": "mbedtls"}


def installed(extra: str) -> bool:
    """Is the package of `extra` importable (without importing it)?"""
    name = MODULES[extra]
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # (a parent package missing: google.protobuf without google)
        return False


def needs(what: str, extra: str) -> str:
    """The line that says `what` needs `extra`: "bus: kafka://… needs the 'kafka' extra: pip install 'corem[kafka]'"."""
    return f"{what} needs the '{extra}' extra: pip install 'corem[{extra}]'"
