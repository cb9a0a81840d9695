"""Who a request speaks for: the one place every front door asks, and the count of those refused.

A device is named in one of these ways, all decided here (`Identity.identify`):

- by the security below CoAP: its OSCORE context (`Request.identity`, set by corem/oscore), else
  the device of its peer's DTLS or TLS session (`session_identity` makes that lookup for a
  transport; the doors are given it at install);
- by the access token in its path, `api/v1/{token}/...` (corem/token_path.py), or in its payload
  (Efento's `cloud_token`, falling back on the session);
- by a door's own credentials: Drogue's option 4209 (`Basic device@application:password`) and its
  gateway rule (`as`), EMQX's `?c=&u=&p=`.  The password is the device's access token: corem keeps
  one secret per device, whatever the door.

A request that names no registered device gets a `Refusal`: its `Reason` is the label of
`corem_auth_failures{protocol,reason}` (dashboards and alert rules in ops/ use them) and it
carries the answer it becomes (4.01, or 4.03 for a gateway that may not speak for a device) with
the text each door has always answered (`Door` chooses it).  Only this module counts them.
"""

from __future__ import annotations

import base64
import enum
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Iterator, Mapping

from .codec import Code, MessageFormatError, OptionNumber, decode
from .errors import PreconditionFailed
from .coap.response import MAX_TEXT, Response
from .registry import Device, Directory, same_credentials
from .stats import Sample, counter
from .token_path import token_of, token_route

if TYPE_CHECKING:
    from .coap.endpoint import Request

#: who sent a request, by the security below CoAP (None: no device named there)
SessionDevice = Callable[["Request"], "Device | None"]



class Reason(enum.Enum):
    """Why a request names no device it may speak for; the value is the metric label."""

    #: the token (in the path, or Efento's cloud token) is no device's
    UNKNOWN_TOKEN = "unknown_token"
    #: the session (or OSCORE context) names no device: a one-way certificate session, or none
    NO_SESSION_IDENTITY = "no_session_identity"
    #: the session's device was removed from the registry after its handshake, or its credentials changed
    REVOKED = "revoked"
    #: a door's credentials name no device, or the wrong password (Drogue, EMQX)
    BAD_PASSWORD = "bad_password"
    #: a door's credentials are not there, and no session names the device (Drogue, EMQX)
    NO_CREDENTIALS = "no_credentials"
    #: a door's credentials are not in its form (Drogue's option 4209)
    MALFORMED_CREDENTIALS = "malformed_credentials"
    #: the request names an application or device other than its credentials' (Drogue's query)
    DEVICE_MISMATCH = "device_mismatch"
    #: a gateway publishing for a device that does not name it among its `gateways` (Drogue's `as`)
    NOT_A_GATEWAY = "not_a_gateway"

    @property
    def code(self) -> int:
        """The CoAP answer: 4.03 when the requester is known but may not speak for that device."""
        return Code.FORBIDDEN if self is Reason.NOT_A_GATEWAY else Code.UNAUTHORIZED


class Door(enum.Enum):
    """Which front door asks: the rule it follows and the texts it answers."""

    TELEMETRY = "telemetry"  # corem's POST api/v1/{token}/telemetry, /telemetry, api/v1/telemetry
    THINGSBOARD = "thingsboard"  # api/v1/{token}/<resource> and api/v1/<resource>
    EFENTO = "efento"  # the message's cloud token, else the session
    DROGUE = "drogue"  # option 4209, else the session; `as`
    EMQX = "emqx"  # ?c=&u=&p=, else the session


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused for who it speaks for: the reason (counted) and the text answered."""

    reason: Reason
    text: str

    @property
    def code(self) -> int:
        return self.reason.code

    def response(self) -> Response:
        return Response(self.reason.code, self.text.encode()[:MAX_TEXT])


_NO_SESSION_TB = f"no registered device in this session; use /{token_route('...')}"
_NO_SESSION_EFENTO = "cloudToken: empty, and no registered device in this session"
_DROGUE_CREDENTIALS = "credentials: send option 4209 (Basic device@application:password) or use DTLS"

#: the fixed texts of each door's refusals (byte for byte what devices have been answered; the
#: ones naming a value from the request are made where they are decided)
TEXTS: dict[Door, dict[Reason, str]] = {
    Door.TELEMETRY: {
        Reason.UNKNOWN_TOKEN: "unknown access token",
        Reason.NO_SESSION_IDENTITY: f"no device identity in this session; use /{token_route('telemetry')}",
        Reason.REVOKED: "device no longer registered",
    },
    Door.THINGSBOARD: {
        Reason.UNKNOWN_TOKEN: "unknown access token",
        Reason.NO_SESSION_IDENTITY: _NO_SESSION_TB,
        Reason.REVOKED: _NO_SESSION_TB,
    },
    Door.EFENTO: {
        Reason.UNKNOWN_TOKEN: "cloudToken: unknown access token",
        Reason.NO_SESSION_IDENTITY: _NO_SESSION_EFENTO,
        Reason.REVOKED: _NO_SESSION_EFENTO,
    },
    Door.DROGUE: {
        Reason.NO_CREDENTIALS: _DROGUE_CREDENTIALS,
        Reason.REVOKED: _DROGUE_CREDENTIALS,
        Reason.BAD_PASSWORD: "option 4209: unknown device or wrong password",
    },
    Door.EMQX: {
        Reason.BAD_PASSWORD: "u/p: unknown username or wrong password",
    },
}
_DROGUE_NOT_BASIC = "option 4209: not 'Basic ' followed by base64 of user:password"
_DROGUE_NO_COLON = "option 4209: no ':' between user and password"
#: EMQX's credentials, in the query
EMQX_CREDENTIALS = ("c", "u", "p")


def session_identity(session: Callable[[Hashable], Device | None] | None) -> SessionDevice:
    """Who sent a request, by the security below CoAP: its OSCORE context, else the device of its
    peer's DTLS or TLS session (`session`, when the transport has sessions).  The device as it was
    when the session began: `Identity` checks that it is still registered."""
    if session is None:
        return lambda req: req.identity
    return lambda req: req.identity or session(req.peer)


class Identity:
    """Decides who a request speaks for, for every door, and counts the refusals
    (`failures`: (protocol, reason label) -> requests; the ingest's `auth_failures`)."""

    def __init__(self, directory: Directory, failures: Counter[tuple[str, str]] | None = None,
                 protocol: str = "coap") -> None:
        self.directory = directory
        self.failures: Counter[tuple[str, str]] = Counter() if failures is None else failures
        self.protocol = protocol

    # -- the one question --------------------------------------------------------------------------
    def identify(self, req: Request, door: Door, *, session: SessionDevice | None = None,
                 token: str | None = None, query: Mapping[str, str] | None = None) -> Device | Refusal:
        """The registered device `req` speaks for, or why none (counted).

        `session`: the transport's `session_identity` (None: the door was installed without one);
        `token`: the token the path or payload names (None: no token path; Efento's may be empty);
        `query`: the request's Uri-Query as a dict (Drogue's and EMQX's credentials are there).

        Raises PreconditionFailed (4.12) when the device is known and the request carries a
        condition the Router found not to hold (`Request.unmet`): a request naming no device is
        answered its 4.01 first, and one that names a device does nothing."""
        found = self._identify(req, door, session, token, query)
        if req.unmet is not None and not isinstance(found, Refusal):
            raise PreconditionFailed(req.unmet)
        return found

    def _identify(self, req: Request, door: Door, session: SessionDevice | None, token: str | None,
                  query: Mapping[str, str] | None) -> Device | Refusal:
        if door is Door.DROGUE:
            return self._drogue(req, session, query or {})
        if door is Door.EMQX:
            return self._emqx(req, session, query or {})
        if door is Door.EFENTO:
            return self._efento(req, session, token)
        if token is not None:
            device = self.directory.token_device(token)
            return self.refuse(door, Reason.UNKNOWN_TOKEN) if device is None else device
        found = self._by_session(req, session)
        return self.refuse(door, found) if isinstance(found, Reason) else found

    def gateway(self, device: Device, other: str) -> Device | Refusal:
        """The device named `other` of `device`'s tenant, if it names `device` among its gateways
        (Drogue's `as`: a gateway publishes for the devices behind it), else 4.03 (counted)."""
        found = self.directory.named(device.tenant, other)
        if found is None or device.device not in found.gateways.split():
            return self.refuse(Door.DROGUE, Reason.NOT_A_GATEWAY,
                               f"as: {device.device!r} is not a gateway of {other!r}")
        return found

    def owner(self, req: Request, session: SessionDevice | None) -> Device | None:
        """The registered device behind `req`'s session or OSCORE context, as the registry has it
        now; None without one (not a refusal, not counted: e.g. whom to charge a bad payload to)."""
        found = self._by_session(req, session)
        return None if isinstance(found, Reason) else found

    def refuse(self, door: Door, reason: Reason, text: str | None = None) -> Refusal:
        """The refusal for `reason` with `door`'s text (or `text`), counted."""
        self.failures[self.protocol, reason.value] += 1
        return Refusal(reason, TEXTS[door][reason] if text is None else text)

    def names_a_known_token(self, data: bytes, peer: Hashable) -> bool:
        """Over its source's rate: does this datagram name its device by a known token in its path
        (`api/v1/{token}/...`)?  Then it goes through (net/limits.py; the C lane does the same)."""
        try:
            msg = decode(data)
        except MessageFormatError:
            return False
        token = token_of([bytes(v) for n, v in msg.options if n == OptionNumber.URI_PATH][:3])
        return token is not None and self.directory.knows_token(token)

    def metrics(self) -> Iterator[Sample]:
        for (protocol, reason), n in sorted(self.failures.items()):
            yield counter("corem_auth_failures", n, protocol=protocol, reason=reason)

    # -- the ways ----------------------------------------------------------------------------------
    def _by_session(self, req: Request, session: SessionDevice | None) -> Device | Reason:
        named = session(req) if session is not None else None
        if named is None:
            return Reason.NO_SESSION_IDENTITY
        current = self.directory.named(named.tenant, named.device)
        if current is None or (current is not named and not same_credentials(current, named)):
            # removed, or its credentials changed (rotated, or removed and added again): the
            # session was made with what no longer names it (the DTLS layer ends it too)
            return Reason.REVOKED
        return current

    def _efento(self, req: Request, session: SessionDevice | None, token: str | None) -> Device | Refusal:
        """The device whose access token the message's `cloud_token` is; else (no token, or one
        corem does not know: a sensor's may be its IMEI) the session's."""
        device = self.directory.token_device(token) if token else None
        if device is not None:
            return device
        found = self._by_session(req, session)
        if not isinstance(found, Reason):
            return found
        return self.refuse(Door.EFENTO, Reason.UNKNOWN_TOKEN if token else found)

    def _drogue(self, req: Request, session: SessionDevice | None, q: Mapping[str, str]) -> Device | Refusal:
        """Option 4209 (`Basic base64(device@application:password)`, or `device:password` with
        `?application=`), else the session; `application` and `device` in the query, if given,
        must be the authenticated ones (`device` may differ with `as`: `gateway` decides)."""
        msg = req.message
        assert msg is not None
        auth = msg.opt(OptionNumber.DROGUE_AUTH)
        if auth is None:
            found = self._by_session(req, session)
            if isinstance(found, Reason):
                return self.refuse(Door.DROGUE, Reason.REVOKED if found is Reason.REVOKED else Reason.NO_CREDENTIALS)
            device = found
        else:
            try:
                text = bytes(auth).decode()
                scheme, _, encoded = text.partition(" ")
                if scheme.lower() != "basic" or not encoded:
                    encoded = text  # the bare base64 form
                user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (UnicodeError, ValueError):  # binascii.Error is a ValueError; non-ASCII text fails before it
                return self.refuse(Door.DROGUE, Reason.MALFORMED_CREDENTIALS, _DROGUE_NOT_BASIC)
            if not sep:
                return self.refuse(Door.DROGUE, Reason.MALFORMED_CREDENTIALS, _DROGUE_NO_COLON)
            name, at, application = user.rpartition("@")
            if not at:
                name, application = user, q.get("application", "")
            named = self.directory.named(application, name)
            if not _password_is(named, password):
                return self.refuse(Door.DROGUE, Reason.BAD_PASSWORD)
            assert named is not None
            device = named
        for key, want in (("application", device.tenant), ("device", device.device)):
            if key in q and q[key] != want and not (key == "device" and "as" in q):
                return self.refuse(Door.DROGUE, Reason.DEVICE_MISMATCH,
                                   f"{key}: {q[key]!r} is not the authenticated {key} ({want!r})")
        return device

    def _emqx(self, req: Request, session: SessionDevice | None, q: Mapping[str, str]) -> Device | Refusal:
        """The session's device when the query has no password; else `u` (the device id) and `p`
        (its access token), with `c` (the client id, for the logs) required too."""
        if "p" not in q:
            device = self.owner(req, session)
            if device is not None:
                return device
        missing = [k for k in EMQX_CREDENTIALS if not q.get(k)]
        if missing:
            return self.refuse(Door.EMQX, Reason.NO_CREDENTIALS,
                               f"{', '.join(missing)}: required (?c=ClientId&u=Username&p=Password)")
        device = self.directory.token_device(q["p"])
        if device is None or device.device != q["u"]:
            return self.refuse(Door.EMQX, Reason.BAD_PASSWORD)
        return device


def _password_is(device: Device | None, password: str) -> bool:
    """Is `password` the access token of `device` (compared in constant time)?"""
    return (device is not None and device.token is not None
            and secrets.compare_digest(device.token.encode(), password.encode()))
