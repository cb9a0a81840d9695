"""Cipher suites, the TLS 1.2 PRF (RFC 5246 §5, SHA-256), the master secret (RFC 5246 §8.1, or the
extended master secret of RFC 7627 §4) and the key block (RFC 5246 §6.3).  HMAC is the standard
library's (OpenSSL's), the PRF's C (_prf.c, on libcrypto) with `prf_py` its twin; the ciphers are
`cryptography`'s (records.py)."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Callable

SHA256 = "sha256"


@dataclass(frozen=True)
class Suite:
    code: int
    name: str
    kx: str  # "psk" or "ecdhe_ecdsa"
    cipher: str  # "ccm8", "ccm", "gcm" (records.RecordProtection)
    key_length: int = 16
    iv_length: int = 4  # the implicit part of the nonce (the "salt")


PSK_AES_128_CCM_8 = Suite(0xC0A8, "TLS_PSK_WITH_AES_128_CCM_8", "psk", "ccm8")
PSK_AES_128_CCM = Suite(0xC0A4, "TLS_PSK_WITH_AES_128_CCM", "psk", "ccm")
PSK_AES_128_GCM_SHA256 = Suite(0x00A8, "TLS_PSK_WITH_AES_128_GCM_SHA256", "psk", "gcm")
#: ECDHE on P-256 with ECDSA certificates (RFC 8422, RFC 7251 for CCM-8): negotiated only by a
#: server that has a certificate and key (connection.Params)
ECDHE_ECDSA_AES_128_CCM_8 = Suite(0xC0AE, "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8", "ecdhe_ecdsa", "ccm8")
ECDHE_ECDSA_AES_128_GCM_SHA256 = Suite(0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ecdhe_ecdsa",
                                       "gcm")

SUITES = {s.code: s for s in (PSK_AES_128_CCM_8, PSK_AES_128_CCM, PSK_AES_128_GCM_SHA256,
                              ECDHE_ECDSA_AES_128_CCM_8, ECDHE_ECDSA_AES_128_GCM_SHA256)}
#: what the engine negotiates, in the server's order of preference (PSK first: no signatures)
IMPLEMENTED = (PSK_AES_128_CCM_8, PSK_AES_128_CCM, PSK_AES_128_GCM_SHA256, ECDHE_ECDSA_AES_128_CCM_8,
               ECDHE_ECDSA_AES_128_GCM_SHA256)
SCSV_RENEGOTIATION = 0x00FF  # TLS_EMPTY_RENEGOTIATION_INFO_SCSV (RFC 5746)


def suite_by_name(name: str) -> Suite:
    for s in SUITES.values():
        if s.name == name or s.name.replace("_", "-") == name:
            return s
    raise ValueError(f"unknown cipher suite {name!r}")


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, SHA256)


try:  # the standard library's OpenSSL HMAC object: ~30% faster than its one-shot `hmac.digest`
    from _hashlib import hmac_new as _hmac_new  # (which looks the digest up by name at every call)

    def hmac_sha256(key: bytes, msg: bytes) -> bytes:
        return _hmac_new(key, msg, SHA256).digest()
except ImportError:  # pragma: no cover (CPython without OpenSSL)
    pass


def prf_py(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """P_SHA256(secret, label + seed), RFC 5246 §5 (the reference: `prf` is the C one, _prf.c,
    when it is built and COREM_PURE_PYTHON is not set)"""
    seed = label + seed
    mac = hmac_sha256
    out = b""
    a = seed
    while len(out) < length:
        a = mac(secret, a)
        out += mac(secret, a + seed)
    return out[:length]


def _load_prf() -> Callable[[bytes, bytes, bytes, int], bytes]:
    """The C PRF (~2.4x faster: one call, the key set up once), unless it is missing or
    COREM_PURE_PYTHON is set"""
    if os.environ.get("COREM_PURE_PYTHON"):
        return prf_py
    try:
        from ._prf import prf_sha256
    except ImportError:
        return prf_py

    def prf(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
        """P_SHA256(secret, label + seed), RFC 5246 §5"""
        return prf_sha256(secret, label + seed, length)

    return prf


prf = _load_prf()


def psk_premaster(psk: bytes) -> bytes:
    """RFC 4279 §2: uint16 N, N zeros, uint16 N, the PSK"""
    n = len(psk).to_bytes(2, "big")
    return n + bytes(len(psk)) + n + psk


def master_secret(premaster: bytes, client_random: bytes, server_random: bytes,
                  session_hash: bytes | None) -> bytes:
    """RFC 7627 §4 when `session_hash` (the hash of the handshake up to and including the
    ClientKeyExchange) is given, else RFC 5246 §8.1"""
    if session_hash is not None:
        return prf(premaster, b"extended master secret", session_hash, 48)
    return prf(premaster, b"master secret", client_random + server_random, 48)


@dataclass(frozen=True)
class Keys:
    client_key: bytes
    server_key: bytes
    client_iv: bytes
    server_iv: bytes


def key_block(suite: Suite, master: bytes, client_random: bytes, server_random: bytes) -> Keys:
    """RFC 5246 §6.3 for AEAD suites (no MAC keys)"""
    k, i = suite.key_length, suite.iv_length
    block = prf(master, b"key expansion", server_random + client_random, 2 * k + 2 * i)
    return Keys(block[:k], block[k:2 * k], block[2 * k:2 * k + i], block[2 * k + i:2 * k + 2 * i])


def verify_data(master: bytes, label: bytes, transcript: bytes) -> bytes:
    """Finished.verify_data, RFC 5246 §7.4.9 (label b"client finished" or b"server finished")"""
    return prf(master, label, hashlib.sha256(transcript).digest(), 12)
