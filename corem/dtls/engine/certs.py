"""Certificates for the ECDHE-ECDSA suites, on `cryptography`: P-256 keys, ECDH, ECDSA with
SHA-256, and the chain check a server runs on a device's certificate (or a client on the
server's).  Untrusted inputs raise DtlsDecodeError only."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import (BAD_CERTIFICATE, DECRYPT_ERROR, ILLEGAL_PARAMETER, UNSUPPORTED_CERTIFICATE,
                     DtlsDecodeError)

#: a verifier: the peer's chain (DER, leaf first) -> the identity it proves (None: refused)
Verifier = Callable[[list[bytes]], "bytes | None"]


def ephemeral() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    return key, point


def ecdh_untrusted(key: ec.EllipticCurvePrivateKey, point: bytes) -> bytes:
    """The premaster secret: the x coordinate of the shared point (RFC 8422 §5.10)"""
    if len(point) != 65 or point[0] != 4:
        raise DtlsDecodeError(ILLEGAL_PARAMETER, "ec_point")
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        return key.exchange(ec.ECDH(), peer)
    except ValueError:
        raise DtlsDecodeError(ILLEGAL_PARAMETER, "ec_point") from None


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def leaf_key_untrusted(der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        cert = x509.load_der_x509_certificate(der)
        key = cert.public_key()
    except Exception:  # (the X.509 parser's errors are not all ValueErrors: InvalidVersion, found by fuzzing)
        raise DtlsDecodeError(BAD_CERTIFICATE, "certificate_syntax") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise DtlsDecodeError(UNSUPPORTED_CERTIFICATE, "not_a_p256_key")
    return key


def verify_untrusted(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, reason: str) -> None:
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise DtlsDecodeError(DECRYPT_ERROR, reason) from None


def fingerprint(der: bytes) -> bytes:
    """What certificate devices are registered by: SHA-256 of the leaf's DER, hex"""
    return hashlib.sha256(der).hexdigest().encode()


def chain_verifier(cas: list[x509.Certificate], clock: Callable[[], float] = time.time) -> Verifier:
    """A chain that ends at one of `cas` (each certificate signed by the next, every one within
    its validity, every issuer a CA) proves the leaf's fingerprint."""
    trusted = list(cas)

    def verify(chain: list[bytes]) -> bytes | None:
        try:
            return _verify(chain)
        except Exception:  # (untrusted DER through the X.509 parser: any of its errors is a refusal)
            return None

    def _verify(chain: list[bytes]) -> bytes | None:
        try:
            certs = [x509.load_der_x509_certificate(d) for d in chain]
        except ValueError:
            return None
        if not certs:
            return None
        now = datetime.fromtimestamp(clock(), timezone.utc)
        try:
            for c in certs:
                if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                    return None
            for child, parent in zip(certs, certs[1:]):
                if not _is_ca(parent):
                    return None
                child.verify_directly_issued_by(parent)
            top = certs[-1]
            if not any(top == ca or _issued(top, ca) for ca in trusted):
                return None
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return None
        return fingerprint(chain[0])

    return verify


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return cert.version == x509.Version.v1  # (a v1 certificate cannot say: openssl's old CAs)


def _issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
