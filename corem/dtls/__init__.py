"""CoAPS: DTLS 1.2 sessions (sans-IO) on python-mbedtls, with the PSK callback store."""

from .server import DEFAULT_CIPHERS, DtlsParams, DtlsServer, PskStore, certificate_sha256, pem_sha256
from .store import SessionStore

__all__ = ["DEFAULT_CIPHERS", "DtlsParams", "DtlsServer", "PskStore", "SessionStore", "certificate_sha256", "pem_sha256"]
