"""Conditional requests (RFC 7252 §5.10.8): If-Match and If-None-Match, evaluated in one place.

    If-Match (repeatable, 0-8 bytes)   performed only if the target's current representation has
                                       one of the ETags given; an empty value: only if it has one
    If-None-Match (once, empty)        performed only if the target has no current representation
    both in one request                never performed (§5.10.8.2: both cannot hold)

A request whose condition does not hold is answered 4.12 Precondition Failed and nothing is done.
A conditional option that breaks its format (If-Match longer than 8 bytes, If-None-Match with a
value or repeated) is a critical option not understood: 4.02 (§5.4.3, §5.4.5).

Who evaluates: a handler that owns state with ETags (EMQX's `/ps` retained messages, users'
resources in `site.py`) calls `evaluate(msg, exists, etag)` itself, after its own checks
(authentication, ACLs) and in the same synchronous step as its write -- no `await` between the
check and the update, so two clients racing an `If-Match` update cannot both win.  It registers
its route with `Router.add(..., conditional=True)`.  Every other route has no ETags, and the router
evaluates for it (`evaluate(msg, Code.GET in its methods)`): such a resource has a current
representation if and only if it can be read -- so `If-Match: <etag>` never holds there, and
`If-Match: ""` / `If-None-Match` hold or not by whether it has a GET.
On a route whose handlers first ask who the request speaks for (`Router.add(..., identified=True)`:
every door that names a device), a condition that does not hold is answered by corem/identity.py
once the device is known: a request that names no device is answered 4.01, not 4.12
(authentication before preconditions, as HTTP orders them: RFC 9110 §13.2.1).

Telemetry (`POST …/telemetry`, no GET): a reading is appended to the bus; the target has no
current representation (RFC 7252 §5.10.8.1: "exists (i.e., has a current representation)"), so
If-Match (any value) is 4.12 and If-None-Match holds: the reading is taken as without it.  The fast
lane never takes a request with either option (any option but Uri-Path and Content-Format goes to
the Python path), so the answer is the same with the lane on or off.
"""

from __future__ import annotations

import hashlib

from ..codec import Code, Message, OptionNumber, Options
from .response import Response

IF_MATCH = OptionNumber.IF_MATCH
IF_NONE_MATCH = OptionNumber.IF_NONE_MATCH
ETAG = OptionNumber.ETAG
#: RFC 7252 §5.10.6: an ETag is 1-8 bytes; If-Match carries one, or nothing
MAX_ETAG = 8


def conditional(msg: Message) -> bool:
    """Does `msg` carry If-Match or If-None-Match?  (Options are in number order: only the first
    few are looked at, so this costs next to nothing on a request without them.)"""
    for number, _ in msg.options:
        if number > IF_NONE_MATCH:
            return False
        if number == IF_MATCH or number == IF_NONE_MATCH:
            return True
    return False


def evaluate(msg: Message, exists: bool, etag: bytes | None = None) -> Response | None:
    """None when `msg` may be performed on a target that has (`exists`) or has not a current
    representation, tagged `etag` (None: a representation without ETag); else the answer: 4.12,
    or 4.02 for a malformed conditional option."""
    matches: list[bytes] = []
    none_match = 0
    for number, value in msg.options:
        if number > IF_NONE_MATCH:
            break
        if number == IF_MATCH:
            if len(value) > MAX_ETAG:
                return Response(Code.BAD_OPTION, b"if-match: longer than 8 bytes")
            matches.append(bytes(value))
        elif number == IF_NONE_MATCH:
            if len(value):
                return Response(Code.BAD_OPTION, b"if-none-match: carries no value")
            none_match += 1
    if none_match > 1:
        return Response(Code.BAD_OPTION, b"if-none-match: not repeatable")
    if matches:
        if not exists:
            return Response(Code.PRECONDITION_FAILED, b"if-match: the resource has no current representation")
        if b"" not in matches and (etag is None or etag not in matches):
            return Response(Code.PRECONDITION_FAILED, b"if-match: not the current ETag")
    if none_match and exists:
        return Response(Code.PRECONDITION_FAILED, b"if-none-match: the resource exists")
    return None


def etag_for(payload: bytes, content_format: int | None) -> bytes:
    """The ETag corem gives a representation: 8 bytes of BLAKE2b over its Content-Format and
    payload (the same bytes, the same tag; a change of either, another)."""
    cf = b"" if content_format is None else content_format.to_bytes(2, "big")
    return hashlib.blake2b(payload, digest_size=8, key=b"cf" + cf).digest()


def etag_of(response: Response) -> bytes:
    """The ETag of a representation a handler rendered: its own ETag option if it gave one, else
    `etag_for` its payload and Content-Format."""
    cf: int | None = None
    for number, value in response.options or ():
        if number == ETAG:
            return bytes(value)
        if number == OptionNumber.CONTENT_FORMAT:
            cf = int.from_bytes(value, "big")
    return etag_for(bytes(response.payload), cf)


def with_etag(response: Response, etag: bytes) -> Response:
    """`response` with ETag `etag` (unless it carries one already)."""
    options: Options = list(response.options or [])
    if any(number == ETAG for number, _ in options):
        return response
    options.append((ETAG, etag))
    options.sort(key=lambda o: o[0])
    return type(response)(response.code, response.payload, options)


__all__ = ["conditional", "etag_for", "etag_of", "evaluate", "with_etag"]
