"""What the peers' front doors share: query parsing, JSON/CBOR bodies, device resolution."""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import unquote

import cbor2

from ..codec import Code, OptionNumber, encode_uint
from ..coap.endpoint import Request
from ..coap.resources import Response
from ..registry import Device, Directory

JSON, CBOR, OCTETS, TEXT = 50, 60, 42, 0
MAX_BODY = 64 * 1024


class BodyError(ValueError):
    pass


def query(req: Request) -> dict[str, str]:
    """Uri-Query options as a dict (`key=value`, percent-decoded; a bare `key` maps to '')."""
    assert req.message is not None
    out: dict[str, str] = {}
    for item in req.message.uri_query:
        key, _, value = item.partition("=")
        out[unquote(key)] = unquote(value)
    return out


def body(req: Request, what: str = "payload") -> Any:
    """The request payload as JSON or CBOR (by Content-Format; JSON when absent)."""
    msg = req.message
    assert msg is not None
    data = bytes(msg.payload)
    if len(data) > MAX_BODY:
        raise BodyError(f"{what}: {len(data)} bytes; at most {MAX_BODY}")
    cf = msg.content_format
    try:
        if cf == CBOR:
            return cbor2.loads(data)
        if cf in (None, JSON, TEXT):
            return json.loads(data) if data else None
    except (ValueError, cbor2.CBORDecodeError) as e:
        raise BodyError(f"{what}: not valid {'CBOR' if cf == CBOR else 'JSON'} ({e})") from None
    raise BodyError(f"{what}: Content-Format {cf} not supported; use 50 (JSON) or 60 (CBOR)")


def content(value: Any, req: Request, code: int = Code.CONTENT) -> Response:
    """Answer with `value` as CBOR if the request asks for it (Accept: 60), else JSON."""
    msg = req.message
    if msg is not None and msg.accept == CBOR:
        return Response(code, cbor2.dumps(value), [(OptionNumber.CONTENT_FORMAT, encode_uint(CBOR))])
    return Response(code, json.dumps(value, separators=(",", ":")).encode(),
                    [(OptionNumber.CONTENT_FORMAT, encode_uint(JSON))])


def bad_request(reason: str) -> Response:
    return Response(Code.BAD_REQUEST, reason.encode()[:512])


def unauthorized(reason: str) -> Response:
    return Response(Code.UNAUTHORIZED, reason.encode()[:512])


def session_owner(directory: Directory, session: Callable[[object], Device | None] | None, req: Request) -> Device | None:
    """The registered device behind a DTLS session, as the registry has it now (None without a
    session, for a one-way certificate session, or once the device was removed)."""
    named = session(req.peer) if session is not None else None
    return named and directory.named(named.tenant, named.device)
