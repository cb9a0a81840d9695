"""A DTLS 1.2 engine corem owns (issue 27), sans-IO, on `cryptography`: records (records.py),
handshake messages (messages.py), one association in either role (connection.py), the server
engine under the security-layer interface (engine.py), certificates for ECDHE-ECDSA (certs.py),
the client role for tests and benchmarks (client.py), and a session as data (state.py); the same
handshake in TLS 1.2's framing for CoAP over TLS (tls.py: `TlsConnection`, `TlsClient`; its
docstring says why coaps+tcp runs on this engine).

Every function that reads bytes from the network is named `*_untrusted` and raises only
`DtlsDecodeError` (errors.py); the engine catches it once per record.

Decisions (and why):

- Extended master secret (RFC 7627) is required by default (`require_ems`): a hello without it
  gets a fatal handshake_failure.  Every client corem meets sends it (libcoap on OpenSSL and
  GnuTLS, Mbed TLS 2.28, the engine's own), and without it a session's keys are not bound to its
  handshake (the triple-handshake class of attacks).  A fleet of devices that cannot send it is
  served by `require_ems=False` (the RFC 5246 master secret), counted by its failure reason
  until then.
- The cookie (RFC 6347 §4.2.1) is the first 16 bytes of HMAC-SHA256 over the peer's address and
  the hello's version, random, session_id, suites and compression methods, under a 32-byte secret
  replaced every `cookie_rotation` seconds (60); the secret before it is still accepted, so a
  cookie lives between one and two periods.  Extensions are left out: the transcript binds them.
  Nothing is kept before a valid cookie, and a HelloVerifyRequest (44 bytes) is smaller than any
  hello that asks for one.  A ClientHello must come whole in one record (as Mbed TLS requires).
- Connection IDs (RFC 9146, extension 54; the drafts' 53 is ignored) are 6 random bytes chosen by
  the server (`cid_length`): 2^48 values against a table of at most 100,000 sessions, 6 bytes per
  record on a device's radio; a CID finds a session, it does not authenticate it (the AEAD does).
- A session's state (state.py) is a versioned binary record of ~90 bytes (suite, keys, IVs,
  epoch, the write sequence reservation, the replay window, both CIDs, the identity), sealed
  with AES-GCM under a settings key (+28 bytes) for a store other nodes share; its write sequence
  number is a reservation, so that no copy ever reuses a nonce.
- No renegotiation (an authenticated request gets a warning no_renegotiation and the session
  stays; a new ClientHello with a valid cookie starts a new session, which replaces the old one
  only when it completes), no compression, no resumption, nothing below DTLS 1.2.
"""

from .client import Client
from .connection import Params
from .crypto import IMPLEMENTED, SUITES, Suite
from .engine import CookieJar, Engine, EngineParams, EngineStats
from .errors import DtlsDecodeError
from .tls import TlsClient, TlsConnection

__all__ = ["Client", "CookieJar", "DtlsDecodeError", "Engine", "EngineParams", "EngineStats", "IMPLEMENTED",
           "Params", "SUITES", "Suite", "TlsClient", "TlsConnection"]
