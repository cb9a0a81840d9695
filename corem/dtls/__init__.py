"""CoAPS: DTLS 1.2 sessions (sans-IO).  corem's own engine (`engine/`, `layer.py`: the default) on
`cryptography`; python-mbedtls's (`server.py`, `dtls_engine = "mbedtls"`) only when that optional
package is installed (`pip install 'corem[mbedtls]'`), so it is imported on first use, not here."""

from __future__ import annotations

from typing import Any

from .certs import certificate_sha256, pem_sha256
from .params import DEFAULT_CIPHERS, DtlsParams
from .store import SessionStore

__all__ = ["DEFAULT_CIPHERS", "DtlsParams", "DtlsServer", "PskStore", "SessionStore", "certificate_sha256", "pem_sha256"]


def __getattr__(name: str) -> Any:
    """`DtlsServer` and `PskStore`, the python-mbedtls engine's, imported when first asked for."""
    if name in ("DtlsServer", "PskStore"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
