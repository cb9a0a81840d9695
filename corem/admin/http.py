"""A small HTTP/1.1 server on Trio for the operator's side: metrics, health, the admin API, the UI.

Deliberately small (one request per connection, bounded head, body and time): it serves
operators, Prometheus and the diagnostics page, not the internet.  Routes are (method, pattern)
with `{name}` segments; a route marked `auth` needs `Authorization: Bearer <admin token>`.
"""

from __future__ import annotations

import inspect
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import parse_qsl, unquote, urlencode

import trio

from ..errors import StorageUnavailable
from ..stats import Sample, counter

log = logging.getLogger("corem.http")

MAX_HEAD = 16 * 1024
REQUEST_TIMEOUT = 30.0
#: Connections served at once; more wait in the kernel's backlog (memory stays bounded).
MAX_CONNECTIONS = 64

REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
    415: "Unsupported Media Type", 429: "Too Many Requests", 500: "Internal Server Error",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


@dataclass
class HttpRequest:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON; `HttpError(400)` naming the problem otherwise."""
        if not self.body:
            raise HttpError(400, "body: expected a JSON object")
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError) as e:
            raise HttpError(400, f"body: not valid JSON ({e})") from None


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_reply(value: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value, separators=(",", ":")).encode() + b"\n")


Handler = Callable[[HttpRequest], "Reply | Awaitable[Reply]"]


@dataclass
class Route:
    method: str
    pattern: str
    handler: Handler
    auth: bool = True
    #: OpenAPI details: summary, request body schema, extra responses
    doc: dict[str, Any] = field(default_factory=dict)

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if self.pattern == "*":  # any path (the workers' front forwards what it does not serve)
            return {}
        want = self.pattern.strip("/").split("/")
        if len(want) != len(segments):
            return None
        params = {}
        for w, g in zip(want, segments):
            if w.startswith("{") and w.endswith("}"):
                params[w[1:-1]] = unquote(g)
            elif w != g:
                return None
        return params


class HttpServer:
    def __init__(self, routes: list[Route], *, admin_token: str = "", max_body: int = 1024 * 1024) -> None:
        self.routes = routes
        self.admin_token = admin_token
        self.max_body = max_body
        self.listeners: list[trio.SocketListener] = []
        self._slots = trio.Semaphore(MAX_CONNECTIONS)
        self.requests = 0
        self.unauthorized = 0

    async def bind(self, host: str, port: int) -> tuple:
        self.listeners = await trio.open_tcp_listeners(port, host=host)
        return self.listeners[0].socket.getsockname()

    async def serve(self) -> None:
        await trio.serve_listeners(self.handle, self.listeners)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (one request: `Connection: close`); any Trio stream will do."""
        async with self._slots:
            await self._serve_one(stream)

    async def _serve_one(self, stream: trio.abc.Stream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                reply, method = await self._answer(stream)
                await self._send(stream, reply, head_only=method == "HEAD")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.abc.Stream) -> tuple[Reply, str]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise trio.BrokenResourceError
            data += chunk
            if len(data) > MAX_HEAD and b"\r\n\r\n" not in data[:MAX_HEAD]:
                return _error(400, "request head too large"), "GET"
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return _error(400, "bad request line"), "GET"
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return _error(400, "content-length: not a number"), method
        if length < 0 or length > self.max_body:
            return _error(413, f"body: {length} bytes; at most {self.max_body}"), method
        path, _, qs = target.partition("?")
        segments = [s for s in path.strip("/").split("/")] if path.strip("/") else []
        allowed = []
        for route in self.routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method not in (method, "*") and not (method == "HEAD" and route.method == "GET"):
                allowed.append(route.method)
                continue
            self.requests += 1
            if route.auth and not self.authorized(headers):  # before reading a body it may not send
                self.unauthorized += 1
                return _error(401, "authorization: missing or wrong admin token (Authorization: Bearer TOKEN)",
                              {"WWW-Authenticate": "Bearer"}), method
            body = bytearray(rest)
            while len(body) < length:
                chunk = await stream.receive_some(min(1 << 20, length - len(body)))
                if not chunk:
                    raise trio.BrokenResourceError
                body += chunk
            request = HttpRequest(method, path, params, dict(parse_qsl(qs)), headers, bytes(body[:length]))
            try:
                reply = route.handler(request)
                if inspect.isawaitable(reply):
                    reply = await reply
            except HttpError as e:
                return _error(e.status, e.message), method
            except StorageUnavailable as e:
                return _error(503, str(e), {"Retry-After": "5"}), method
            except Exception:
                log.exception("%s %s failed", method, path)
                return _error(500, "internal error (see the server log)"), method
            return reply, method
        if allowed:
            return _error(405, f"method: {method} not allowed; use {', '.join(sorted(set(allowed)))}",
                          {"Allow": ", ".join(sorted(set(allowed)))}), method
        return _error(404, f"path: {path} not found"), method

    def metrics(self) -> Iterator[Sample]:
        yield counter("corem_admin_requests", self.requests)
        yield counter("corem_admin_unauthorized", self.unauthorized)

    def authorized(self, headers: dict[str, str]) -> bool:
        """Does the request carry the admin token?"""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return bool(self.admin_token) and scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), self.admin_token.encode()
        )

    @staticmethod
    async def _send(stream: trio.abc.Stream, reply: Reply, head_only: bool = False) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
        head = (
            f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, '')}\r\nContent-Type: {reply.content_type}\r\n"
            f"Content-Length: {len(reply.body)}\r\n{extra}Connection: close\r\n\r\n"
        ).encode()
        await stream.send_all(head if head_only else head + reply.body)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    reply = json_reply({"error": message}, status)
    reply.headers.update(headers or {})
    return reply


#: seconds a forwarded request may take (an RPC waits for its device: the API caps that at 60 s)
FORWARD_TIMEOUT = 90.0
#: headers of a forwarded request's answer passed on
PASSED = ("location", "retry-after", "www-authenticate")
#: a request one corem passed to another (the node or worker that holds a device): served
#: where it lands, never passed on again; the value names the node it came from
FORWARDED = "x-corem-forwarded"
#: headers of a request passed on with it
PASSED_ON = ("authorization", "content-type", "accept", FORWARDED)


def target(req: HttpRequest) -> str:
    """The request's path and query, as it came."""
    return req.path + ("?" + urlencode(req.query) if req.query else "")


async def forward(base: str, req: HttpRequest, *, node: str | None = None, body: bytes | None = None) -> Reply:
    """Pass `req` on to another corem (`node`: this one's URL, when it goes to another node;
    `body`: instead of the request's own)."""
    headers = {k: v for k, v in req.headers.items() if k in PASSED_ON}
    if node is not None:
        headers[FORWARDED] = node
    return await call(base, req.method, target(req), req.body if body is None else body, headers)


async def call(base: str, method: str, target: str, body: bytes, headers: dict[str, str]) -> Reply:
    """One request to another corem HTTP server (`base`: http://host:port), as this one serves:
    HTTP/1.1, one per connection.  For the workers' front and for nodes forwarding downlink."""
    hostport = base.removeprefix("http://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    head = f"{method} {target} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with trio.fail_after(FORWARD_TIMEOUT):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(head.encode() + body)
            chunks = []
            while chunk := await stream.receive_some(1 << 16):
                chunks.append(chunk)
    top, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        raise HttpError(503, f"{base} gave no answer; retry") from None
    got = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Reply(status, payload, got.get("content-type", "application/octet-stream"),
                 {k.title(): v for k, v in got.items() if k in PASSED})
