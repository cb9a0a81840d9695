"""Certificates for DTLS: the server's chain and key from PEM files, a device certificate's
SHA-256 fingerprint (what devices are registered by), and the certificate a peer presented."""

from __future__ import annotations

import hashlib

from mbedtls import pk, tls, x509
from mbedtls.exceptions import TLSError


def load_certificates(path: str) -> list[x509.CRT]:
    """Every certificate in a PEM file (a chain: leaf first)."""
    return parse_certificates(open(path).read(), path)


def parse_certificates(text: str, where: str = "PEM") -> list[x509.CRT]:
    marker = "-----END CERTIFICATE-----"
    pems = [part + marker for part in text.split(marker) if "-----BEGIN CERTIFICATE-----" in part]
    if not pems:
        raise ValueError(f"{where}: no PEM certificate in it")
    try:
        return [x509.CRT.from_PEM(p.strip()) for p in pems]
    except Exception as e:  # noqa: BLE001 - Mbed TLS raises its own error types
        raise ValueError(f"{where}: not a valid certificate ({e})") from None


def load_key(path: str) -> pk.ECC | pk.RSA:
    for kind in (pk.ECC, pk.RSA):
        try:
            return kind.from_file(path)
        except Exception:  # noqa: BLE001 - try the next key type
            continue
    raise ValueError(f"{path}: not a PEM EC or RSA private key")


def certificate_sha256(path: str) -> str:
    """The fingerprint devices are registered by: SHA-256 of the leaf certificate's DER."""
    return hashlib.sha256(load_certificates(path)[0].to_DER()).hexdigest()


def pem_sha256(text: str) -> str:
    """`certificate_sha256` of a PEM given as text (the admin API's `cert_pem`)."""
    return hashlib.sha256(parse_certificates(text)[0].to_DER()).hexdigest()


def peer_der(buf: tls.TLSWrappedBuffer) -> bytes | None:
    """The DER of the certificate the peer presented in its handshake, or None."""
    try:
        der = buf.getpeercert(binary_form=True)
    except (TLSError, ValueError):
        return None
    return der or None
