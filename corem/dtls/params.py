"""What both DTLS engines share and neither owns: the settings of the CoAPS layer (`DtlsParams`),
which cipher suites each engine takes and how it refuses one (`check_ciphers`), the metric names of
its counters, and how a ClientHello shows a cookie before it is parsed.  No TLS library is imported
here at module level (a cipher check imports the one engine it asks), so corem runs on its own
engine without python-mbedtls installed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .slots import FLOOR

if TYPE_CHECKING:
    from .engine.crypto import Suite

DEFAULT_CIPHERS = ("TLS-PSK-WITH-AES-128-CCM-8", "TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8")
CLIENT_AUTH = ("required", "none")


@dataclass(frozen=True)
class DtlsParams:
    ciphers: tuple[str, ...] = DEFAULT_CIPHERS
    #: Handshakes past the cookie exchange at once; more ClientHellos are dropped and counted.
    max_handshakes: int = 1000
    #: Established sessions at once; a handshake beyond it is refused.
    max_sessions: int = 100_000
    #: Established sessions of one device (corem's engine): its new handshake ends its oldest
    #: beyond them, as Scandium removes stale double principals.  1% of `max_sessions`: one
    #: credential cannot take them all, and a fleet sharing a credential (a load generator's 64
    #: sessions, devices flashed with one key) still works -- at 4 such a fleet lost sessions.
    max_sessions_per_device: int = 1000
    #: A handshake that has not finished after this many seconds is dropped; when more than half
    #: the handshake slots are taken the timeout shrinks, to `handshake_floor` when all are
    #: (slots.py: who gets a slot, and why the floor is 5 s).
    handshake_timeout: float = 30.0
    handshake_floor: float = FLOOR
    #: Sessions idle longer than this are forgotten (`dtls_session_inactivity_timeout`).
    session_timeout: float = 24 * 3600.0
    #: Sessions idle longer than this are serialized (~130 B sealed with the corem engine, ~1 KB with
    #: mbedtls) and their live context freed.
    offload_after: float = 60.0
    #: Certificate mode: the server's certificate chain and key (PEM files), and the CA(s) a
    #: device certificate must chain to.  `client_auth` "required": a certificate device must
    #: present one that chains to `ca_file` and is registered (EMQX verify_peer +
    #: fail_if_no_peer_cert); "none": one-way, the device authenticates in CoAP (token).
    #: PSK devices are unaffected either way.
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    client_auth: str = "required"
    #: Save each session to the store once it carries data (and again every half
    #: `session_timeout`), so that a crash, a killed worker or another node restores it without
    #: a handshake (`dtls_checkpoint`); store.py says what a restore does to sequence numbers.
    checkpoint: bool = True
    #: corem's engine: refuse a hello without the extended master secret (RFC 7627); python-mbedtls's
    #: serves both kinds whatever this says
    require_ems: bool = True

    def __post_init__(self) -> None:
        # (which suite names are known depends on the engine: check_ciphers)
        if not self.ciphers:
            raise ValueError("dtls_ciphers: no cipher suite given")
        for name in ("max_handshakes", "max_sessions", "max_sessions_per_device"):
            if getattr(self, name) < 1:
                raise ValueError(f"dtls {name} must be >= 1")
        if self.client_auth not in CLIENT_AUTH:
            raise ValueError(f"dtls client_auth must be one of {', '.join(CLIENT_AUTH)}, got {self.client_auth!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("dtls_cert and dtls_key go together")
        if self.cert_file is not None and self.client_auth == "required" and self.ca_file is None:
            raise ValueError("dtls_ca is needed to verify device certificates (or set dtls_client_auth = none)")


def check_ciphers(names: Sequence[str], engine: str) -> None:
    """Whether the DTLS engine `engine` ("corem" or "mbedtls") takes the cipher suites `names`;
    ValueError names the first it does not.  The one check of `dtls_ciphers`: the settings make it
    at start, CoAPS on or off (config.Settings.check), and each engine when a listener is made on
    it (`corem_suites` for layer.engine_params, `mbedtls_ciphers` for server.DtlsServer), so what a
    user is told is the same whichever finds it first."""
    if engine == "corem":
        corem_suites(names)
    else:
        mbedtls_ciphers(names)


def corem_suites(names: Sequence[str]) -> tuple[Suite, ...]:
    """The suites of corem's engine `names` names (with dashes, as python-mbedtls spells them, or
    underscores), in their order; ValueError names the first it does not implement and the ones it
    does."""
    from .engine.crypto import IMPLEMENTED, suite_by_name

    suites = []
    for name in names:
        try:
            suites.append(suite_by_name(name))
        except ValueError:
            known = ", ".join(s.name.replace("_", "-") for s in IMPLEMENTED)
            raise ValueError(f"dtls_ciphers: {name!r} is not a cipher suite the corem engine implements "
                             f"({known})") from None
    return tuple(suites)


def mbedtls_ciphers(names: Sequence[str]) -> None:
    """ValueError names the first of `names` the installed Mbed TLS does not offer (python-mbedtls
    imported here: only the deprecated engine needs it)."""
    from mbedtls import tls

    available = set(tls.ciphers_available())
    for name in names:
        if name not in available:
            raise ValueError(f"dtls_ciphers: {name!r} is not a cipher suite Mbed TLS offers")


#: shared store: seconds before a peer with no saved session is asked for again, and how many
#: such peers are remembered at most
MISS_TTL = 5.0
MAX_MISSES = 100_000

DTLS_METRICS = {
    "handshakes_started": "corem_dtls_handshakes_started", "handshakes_completed": "corem_dtls_handshakes_completed",
    "handshakes_evicted": "corem_dtls_handshakes_evicted", "hello_verify_sent": "corem_dtls_hello_verify_sent",
    "records_dropped": "corem_dtls_records_dropped", "bytes_in": "corem_dtls_bytes_received",
    "records_replayed": "corem_dtls_records_replayed", "marks_failed": "corem_dtls_record_marks_failed",
    "bytes_out_unauthenticated": "corem_dtls_bytes_sent_unauthenticated",
    "sessions_closed": "corem_dtls_sessions_closed", "sessions_expired": "corem_dtls_sessions_expired",
    "offloaded": "corem_dtls_sessions_offloaded", "restored": "corem_dtls_sessions_restored",
    "sessions_lost": "corem_dtls_sessions_lost", "offload_failed": "corem_dtls_sessions_offload_failed",
    "checkpoints": "corem_dtls_sessions_checkpointed",
}


def registry_device(lookup: Callable[[str], Any], identity: bytes) -> Any:
    """The device a handshake's identity names (`lookup`: the registry's, identity -> device or
    None), or None: an unknown identity, one that is not UTF-8."""
    try:
        name = identity.decode()
    except UnicodeDecodeError:
        return None
    return lookup(name)


def registered(lookup: Callable[[str], Any], identity: bytes) -> bool:
    """Does a verified certificate's identity name a registered device?  (`Params.admit_certificate`
    of CoAPS and coaps+tcp alike: the engine asks it at the client's CertificateVerify.)"""
    return registry_device(lookup, identity) is not None


def registry_psk(lookup: Callable[[str], Any], identity: bytes) -> bytes | None:
    """The PSK of the device a handshake's identity names (`registry_device`), or None: an unknown
    identity, one that is not UTF-8, a device without a PSK.  The one rule for CoAPS and coaps+tcp
    alike."""
    device = registry_device(lookup, identity)
    psk: bytes | None = None if device is None else device.psk
    return psk


def has_cookie(hello: bytes) -> bool:
    """Whether a ClientHello (one record, one message) carries a cookie: after the 13-byte record
    header, the 12-byte handshake header, the version (2) and the random (32) come the session id
    and the cookie, each with a length byte (RFC 6347 §4.2.1).  A fragment, or a hello too short to
    tell, counts as having one: it asks the slots, as any hello that may start a handshake."""
    if hello[19:22] != b"\0\0\0" or len(hello) < 61:
        return True
    at = 60 + hello[59]
    return at >= len(hello) or hello[at] != 0
