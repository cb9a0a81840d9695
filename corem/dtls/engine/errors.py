"""The one error that bytes from the network raise, and the alert numbers (RFC 5246 §7.2, RFC 4279).

Every function whose name ends in `_untrusted` (or that lives in a module named for it) reads bytes
an attacker chose; it raises `DtlsDecodeError` and nothing else (the style of trio's `_dtls.py`).
The engine catches it at one place per record: a bad record is dropped, a bad handshake message
after the cookie is answered by the alert it names.
"""

from __future__ import annotations

# alert levels
WARNING = 1
FATAL = 2

# alert descriptions
CLOSE_NOTIFY = 0
UNEXPECTED_MESSAGE = 10
BAD_RECORD_MAC = 20
RECORD_OVERFLOW = 22
HANDSHAKE_FAILURE = 40
BAD_CERTIFICATE = 42
UNSUPPORTED_CERTIFICATE = 43
CERTIFICATE_UNKNOWN = 46
ILLEGAL_PARAMETER = 47
ACCESS_DENIED = 49
DECODE_ERROR = 50
DECRYPT_ERROR = 51
PROTOCOL_VERSION = 70
INSUFFICIENT_SECURITY = 71
INTERNAL_ERROR = 80
NO_RENEGOTIATION = 100
UNSUPPORTED_EXTENSION = 110
UNKNOWN_PSK_IDENTITY = 115

ALERT_NAMES = {
    CLOSE_NOTIFY: "close_notify", UNEXPECTED_MESSAGE: "unexpected_message", BAD_RECORD_MAC: "bad_record_mac",
    RECORD_OVERFLOW: "record_overflow", HANDSHAKE_FAILURE: "handshake_failure",
    BAD_CERTIFICATE: "bad_certificate",
    UNSUPPORTED_CERTIFICATE: "unsupported_certificate", CERTIFICATE_UNKNOWN: "certificate_unknown",
    ILLEGAL_PARAMETER: "illegal_parameter", ACCESS_DENIED: "access_denied", DECODE_ERROR: "decode_error",
    DECRYPT_ERROR: "decrypt_error",
    PROTOCOL_VERSION: "protocol_version", INSUFFICIENT_SECURITY: "insufficient_security",
    INTERNAL_ERROR: "internal_error", NO_RENEGOTIATION: "no_renegotiation",
    UNSUPPORTED_EXTENSION: "unsupported_extension", UNKNOWN_PSK_IDENTITY: "unknown_psk_identity",
}


def alert_name(description: int) -> str:
    return ALERT_NAMES.get(description, f"alert_{description}")


class DtlsDecodeError(Exception):
    """Bytes from the network that are not what they claim: `alert` is the description a fatal
    alert would carry (if one is sent at all: records are dropped silently, RFC 6347 §4.1.2.7),
    `reason` a short name for counters and logs."""

    def __init__(self, alert: int, reason: str) -> None:
        super().__init__(alert, reason)
        self.alert = alert
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} ({alert_name(self.alert)})"


class HandshakeFailed(Exception):
    """A handshake that must end with a fatal alert: well-formed messages that are wrong (a bad
    Finished, an unknown PSK identity, no suite in common).  Raised and caught inside the engine."""

    def __init__(self, alert: int, reason: str) -> None:
        super().__init__(alert, reason)
        self.alert = alert
        self.reason = reason
