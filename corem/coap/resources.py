"""Resources: which handler answers which Uri-Path and method.

Paths are patterns of segments; `{name}` matches any one segment and its value is passed to the
handler in order.  A handler returns a `Response` to answer at once, or None when it will answer
later through `Endpoint.respond` (e.g. after the point is committed to the bus).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

from ..codec import Code
from .blockwise import block2
from .endpoint import Request

log = logging.getLogger("corem.coap")


class Response(NamedTuple):
    code: int
    payload: bytes = b""
    options: list | None = None


Handler = Callable[[Request, list[str]], "Response | None"]

NOT_FOUND = Response(Code.NOT_FOUND)
METHOD_NOT_ALLOWED = Response(Code.METHOD_NOT_ALLOWED)


class Router:
    def __init__(self) -> None:
        # segment count -> [(pattern, {method: handler})]; pattern items are str or None (wildcard)
        self._routes: dict[int, list[tuple[tuple[str | None, ...], dict[int, Handler]]]] = {}
        self._links: dict[str, dict[str, str | bool]] = {}
        self.handler_errors = 0

    def add(self, path: str, methods: dict[int, Handler], link: dict[str, str | bool] | None = None) -> None:
        """Register `methods` (code -> handler) at `path`, e.g. `"api/v1/{token}/telemetry"`;
        `link` attributes (rt, if, ct, obs, title) list a literal path in /.well-known/core."""
        if link is not None and "{" not in path:
            self._links[path.strip("/")] = link
        segments = tuple(
            None if s.startswith("{") and s.endswith("}") else s for s in path.strip("/").split("/")
        ) if path.strip("/") else ()
        routes = self._routes.setdefault(len(segments), [])
        for pattern, existing in routes:
            if pattern == segments:
                existing.update(methods)
                return
        routes.append((segments, dict(methods)))
        # literal segments before wildcards, so /a/b wins over /a/{x}
        routes.sort(key=lambda r: tuple(s is None for s in r[0]))

    def links(self) -> list[tuple[str, dict[str, str | bool]]]:
        return sorted(self._links.items())

    def dispatch(self, req: Request) -> Response | None:
        msg = req.message
        assert msg is not None
        try:
            path = msg.uri_path
        except UnicodeDecodeError:
            return Response(Code.BAD_REQUEST, b"uri-path: not valid UTF-8")
        for pattern, methods in self._routes.get(len(path), ()):
            params = []
            for want, got in zip(pattern, path):
                if want is None:
                    params.append(got)
                elif want != got:
                    break
            else:
                handler = methods.get(msg.code)
                if handler is None:
                    return METHOD_NOT_ALLOWED
                try:
                    response = handler(req, params)
                    if response is not None and msg.code == Code.GET:
                        response = block2(msg, response)
                    return response
                except Exception:
                    self.handler_errors += 1
                    log.exception("handler for /%s failed", "/".join(path))
                    return Response(Code.INTERNAL_SERVER_ERROR, b"internal error")
        return NOT_FOUND
