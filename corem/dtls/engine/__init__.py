"""A DTLS 1.2 engine corem owns (issue 27), sans-IO: records (records.py), handshake messages
(messages.py), one association in either role (connection.py), the server engine (engine.py),
the client role for tests and benchmarks (client.py), and a session as data (state.py).

Every function that reads bytes from the network is named `*_untrusted` and raises only
`DtlsDecodeError` (errors.py)."""

from .client import Client
from .connection import Params
from .crypto import IMPLEMENTED, SUITES, Suite
from .engine import CookieJar, Engine, EngineParams, EngineStats
from .errors import DtlsDecodeError

__all__ = ["Client", "CookieJar", "DtlsDecodeError", "Engine", "EngineParams", "EngineStats", "IMPLEMENTED",
           "Params", "SUITES", "Suite"]
