"""What the peers' front doors share: query parsing, JSON/CBOR bodies, answers.  (Who a request
speaks for is corem/identity.py's.)"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import cbor2

from ..coap.endpoint import Request
from ..coap.resources import Response
from ..codec import Code, OptionNumber, encode_uint
from ..content_format import CBOR, JSON, OCTETS, TEXT
from ..errors import BadInput

MAX_BODY = 64 * 1024
MAX_DEPTH = 32


class BodyError(BadInput):
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
    if cf not in (None, JSON, TEXT, CBOR):
        raise BodyError(f"{what}: Content-Format {cf} not supported; use 50 (JSON) or 60 (CBOR)")
    try:
        value = cbor2.loads(data) if cf == CBOR else (json.loads(data) if data else None)
    except (ValueError, cbor2.CBORDecodeError, RecursionError) as e:
        raise BodyError(f"{what}: not valid {'CBOR' if cf == CBOR else 'JSON'} ({e})") from None
    _plain(value, what, 0)
    return value


def _plain(value: Any, path: str, depth: int) -> None:
    """Bodies are stored and forwarded as JSON: only what JSON can say, nested at most MAX_DEPTH
    deep (CBOR byte strings, tags, non-text keys and non-finite numbers are refused by name)."""
    if depth > MAX_DEPTH:
        raise BodyError(f"{path}: nested more than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise BodyError(f"{path}: NaN and infinities are not allowed")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _plain(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BodyError(f"{path}: keys must be text, not {type(key).__name__}")
            _plain(item, f"{path}.{key}", depth + 1)
        return
    raise BodyError(f"{path}: {type(value).__name__} values are not allowed (JSON types only)")


def content(value: Any, req: Request, code: int = Code.CONTENT) -> Response:
    """Answer with `value` as CBOR if the request asks for it (Accept: 60), else JSON."""
    msg = req.message
    if msg is not None and msg.accept == CBOR:
        return Response(code, cbor2.dumps(value), [(OptionNumber.CONTENT_FORMAT, encode_uint(CBOR))])
    return Response(code, json.dumps(value, separators=(",", ":")).encode(),
                    [(OptionNumber.CONTENT_FORMAT, encode_uint(JSON))])


def bad_request(reason: str) -> Response:
    return Response(Code.BAD_REQUEST, reason.encode()[:512])
