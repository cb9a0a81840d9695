"""Certificates for DTLS: a device certificate's SHA-256 fingerprint (what devices are registered
by: on `cryptography`, whichever engine runs), and for the python-mbedtls engine the server's chain
and key from PEM files and the certificate a peer presented (python-mbedtls is imported only by
those: it is an optional dependency)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from cryptography import x509 as cx509
from cryptography.hazmat.primitives.serialization import Encoding

if TYPE_CHECKING:
    from mbedtls import pk, tls, x509


def load_certificates(path: str) -> list[x509.CRT]:  # (python-mbedtls's engine)
    """Every certificate in a PEM file (a chain: leaf first)."""
    return parse_certificates(open(path).read(), path)


def _pems(text: str, where: str) -> list[str]:
    marker = "-----END CERTIFICATE-----"
    pems = [part + marker for part in text.split(marker) if "-----BEGIN CERTIFICATE-----" in part]
    if not pems:
        raise ValueError(f"{where}: no PEM certificate in it")
    return pems


def parse_certificates(text: str, where: str = "PEM") -> list[x509.CRT]:
    from mbedtls import x509

    pems = _pems(text, where)
    try:
        return [x509.CRT.from_PEM(p.strip()) for p in pems]
    except Exception as e:  # noqa: BLE001 - Mbed TLS raises its own error types
        raise ValueError(f"{where}: not a valid certificate ({e})") from None


def load_key(path: str) -> pk.ECC | pk.RSA:
    from mbedtls import pk

    for kind in (pk.ECC, pk.RSA):
        try:
            return kind.from_file(path)
        except Exception:  # noqa: BLE001 - try the next key type
            continue
    raise ValueError(f"{path}: not a PEM EC or RSA private key")


def certificate_sha256(path: str) -> str:
    """The fingerprint devices are registered by: SHA-256 of the leaf certificate's DER."""
    return pem_sha256(open(path).read(), path)


def pem_sha256(text: str, where: str = "PEM") -> str:
    """`certificate_sha256` of a PEM given as text (the admin API's `cert_pem`)."""
    leaf = _pems(text, where)[0]
    try:
        der = cx509.load_pem_x509_certificate(leaf.strip().encode()).public_bytes(Encoding.DER)
    except ValueError as e:
        raise ValueError(f"{where}: not a valid certificate ({e})") from None
    return hashlib.sha256(der).hexdigest()


def peer_der(buf: tls.TLSWrappedBuffer) -> bytes | None:
    """The DER of the certificate the peer presented in its handshake, or None."""
    from mbedtls.exceptions import TLSError

    try:
        der = buf.getpeercert(binary_form=True)
    except (TLSError, ValueError):
        return None
    return der or None
