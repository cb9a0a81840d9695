"""CoAPS: DTLS 1.2 sessions (sans-IO) on python-mbedtls, with the PSK callback store."""

from .certs import certificate_sha256, pem_sha256
from .server import DEFAULT_CIPHERS, DtlsParams, DtlsServer, PskStore
from .store import SessionStore

__all__ = ["DEFAULT_CIPHERS", "DtlsParams", "DtlsServer", "PskStore", "SessionStore", "certificate_sha256", "pem_sha256"]
