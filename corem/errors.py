"""The kinds of refusal every layer may raise, and the answer each one becomes.

One hierarchy, one root (`CoremError`): an error carries the answer it becomes -- its CoAP code
(`coap`, the code byte, class << 5 | detail) and its HTTP status (`http`) -- so that the CoAP
router and the admin HTTP server render any of them alike (`coap.response.refusal`, the HTTP
server's handler call), and no caller ever reads an error's kind from its message (the models:
h11's `ProtocolError`, aiocoap's `RenderableError`).  The message names the field at fault first,
then why (`token: already used by another device`): it is what the client is told.

    CoremError                      5.00 / 500  the root (never raised itself)
    ├── Refused                     the request's fault: the same request is refused again
    │   ├── BadInput (ValueError)   4.00 / 400  a field is not valid; the message names it
    │   │   └── Conflict            4.09 / 409  it exists already, or another holds it
    │   ├── NotFound (LookupError)  4.04 / 404  what the request names does not exist
    │   ├── Unauthorized (PermissionError) 4.01 / 401  a credential is wrong or missing
    │   ├── ClaimRefused            4.00 / 400  a claim's secret is not the device's
    │   ├── PreconditionFailed      4.12 / 412  an If-Match / If-None-Match that does not hold
    │   └── QueueFull               4.29 / 429  a bounded queue (downlink) is full
    ├── StorageUnavailable (RuntimeError) 5.03 / 503, retry after `RETRY_AFTER` s
    └── NewerFormat (ValueError)    5.00 / 500  data a newer corem wrote

Light on purpose (no corem import): the codec's errors are rooted here too.
"""

from __future__ import annotations

#: Seconds a client is told to wait (CoAP Max-Age on a 5.03, HTTP Retry-After) before it tries again.
RETRY_AFTER = 5


def _code(cls: int, detail: int) -> int:
    """A CoAP code byte (RFC 7252 §3): 4.09 is `_code(4, 9)`."""
    return cls << 5 | detail


class CoremError(Exception):
    """Anything corem refuses, with the answer it becomes (class attributes: a kind is its answer)."""

    #: the CoAP response code (byte) a device is answered
    coap: int = _code(5, 0)
    #: the HTTP status an API client is answered
    http: int = 500
    #: seconds after which the same request may work (None: it will not); Max-Age, Retry-After
    retry_after: int | None = None
    #: what a device is told instead of the message (None: the message itself); for the kinds
    #: whose message is for the operator's log (a disk's error), not for a device
    device_text: str | None = None


class Refused(CoremError):
    """The request's fault (a 4.xx / 4xx): the same request is refused again."""

    coap = _code(4, 0)
    http = 400


class BadInput(Refused, ValueError):
    """A field of the request is not valid: the message names it first (`psk: 4 bytes; ...`)."""


class Conflict(BadInput):
    """The request is well-formed but collides with what exists: a device, a credential another
    device holds, a package's version, a provisioning key (RFC 8132's 4.09, HTTP's 409).  A
    BadInput too: a caller that refuses bad input refuses this."""

    coap = _code(4, 9)
    http = 409


class NotFound(Refused, LookupError):
    """What the request names (a device, a profile) does not exist."""

    coap = _code(4, 4)
    http = 404


class Unauthorized(Refused, PermissionError):
    """A credential is wrong or missing (a provisioning key and secret)."""

    coap = _code(4, 1)
    http = 401


class ClaimRefused(Refused):
    """A claim's `secret_key` is not the one the device published, or its claim expired: the
    request's field is wrong (400, not 401: the caller is the operator, already authorized)."""


class PreconditionFailed(Refused):
    """A condition of the request (If-Match, If-None-Match; RFC 7252 §5.10.8) does not hold for
    the target: nothing was done."""

    coap = _code(4, 12)
    http = 412


class QueueFull(Refused):
    """A bounded queue (a device's downlink) is full: the caller may try again once it drains."""

    coap = _code(4, 29)
    http = 429


class StorageUnavailable(CoremError, RuntimeError):
    """A write the disk refused (full, failing, locked too long): nothing was stored, and the same
    request may work later.  CoAP answers 5.03 with Max-Age, HTTP 503 with Retry-After; neither is
    a 5.00/500, for it is no bug, and no task ends on it."""

    coap = _code(5, 3)
    http = 503
    retry_after = RETRY_AFTER
    device_text = "storage unavailable; retry later"


class StartRefused(StorageUnavailable):
    """A store that cannot give what corem's start needs of it (the DTLS record marks of a run
    before): `corem serve` does not start, and says so in one line (status 2) -- unlike a refusal
    at run time, which is answered and counted where it happens."""


class NewerFormat(CoremError, ValueError):
    """Data a newer corem wrote (a data dir's format, a table's schema version): this corem does
    not open it, and says so in one line naming both versions (corem/datadir.py)."""


def utf8(text: str, field: str) -> bytes:
    """`text` as UTF-8; a lone surrogate (JSON's "\\ud800" decodes to one) is the field's BadInput,
    not a UnicodeEncodeError that no caller expects."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise BadInput(f"{field}: not valid Unicode text (a lone surrogate)") from None


def http_headers(e: CoremError) -> dict[str, str]:
    """The HTTP headers an error's answer carries (Retry-After for the kinds that pass)."""
    return {} if e.retry_after is None else {"Retry-After": str(e.retry_after)}
