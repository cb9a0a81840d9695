"""A small HTTP/1.1 server on Trio for the operator's side: metrics, health, the admin API, the UI.

It serves operators, Prometheus and the diagnostics page, not the internet, and must stay up for
them whatever else connects (issue 26):

- Parsing is h11's (sans-IO, what Trio's own examples use): the request line and headers, a
  mandatory Host, one well-formed Content-Length (`3_1`, `+31` or two that differ are a 400), chunked
  bodies decoded, 16 KiB of head at most (431).  corem adds one refusal h11 lets through: both
  Content-Length and Transfer-Encoding (RFC 9112 §6.1: the request-smuggling shape).
- One request per connection (`Connection: close`): Prometheus, curl, the CLI and the workers'
  front open one for each call anyway; a kept-alive connection would be one more way to hold a
  slot while idle, and pipelining one more parser state to get right, for nothing on loopback.
- `Expect: 100-continue` is answered 100 only once the head passed the admin token and the
  declared size fits `max_body`; otherwise the final 401 or 413 goes at once and the body is never
  read (nor is it waited for: the connection closes after a short lingering drain).  A request
  with a body needs the token on every route, the open ones included (they take none): no body is
  buffered for someone without it.
- Time: the whole head within `HEAD_TIMEOUT` of the connection; then the body and the answer may
  take as long as they keep moving: the connection is dropped only after `IDLE_TIMEOUT` without a
  byte (a 3 MB upload at 64 KB/s completes).  A handler's own wait is bounded by `HANDLER_TIMEOUT`.
- Never starved: at most `max_connections` at once (`fdlimit.admin_cap()`: below the open files
  limit with room for the databases); a new connection beyond them evicts the one that has waited
  longest for its head, or that sends a body or reads an answer without the admin token (idle or
  dribbling connections cannot keep /healthz out), and is refused 503 only if every connection is
  being served for a client with the token.  Out of file descriptors, accept() refuses
  (`fdlimit.Acceptor`) and the listener goes on.

Routes are (method, pattern) with `{name}` segments; a route marked `auth` needs
`Authorization: Bearer <admin token>`.
"""

from __future__ import annotations

import inspect
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import parse_qsl, unquote, urlencode

import h11
import trio

from ..errors import CoremError, http_headers
from ..inputs import finite_float, not_json, repeated_key
from ..logs import fields
from ..net.fdlimit import Acceptor, admin_cap
from ..stats import Sample, counter, gauge

log = logging.getLogger("corem.http")
#: one line per request answered, at info (`access_log`): method, path, status, duration, peer
access = logging.getLogger("corem.http.access")

#: bytes of request line and headers at most (more: 431)
MAX_HEAD = 16 * 1024
#: seconds from the connection to the end of its request head: an honest client sends it at once;
#: one that does not is either idle or feeding it a byte at a time to hold the slot
HEAD_TIMEOUT = 10.0
#: seconds without a byte of the body arriving, or of the answer leaving, before the connection is
#: dropped: progress, not size, decides (a 3 MB firmware at 64 KB/s takes ~47 s and completes)
IDLE_TIMEOUT = 30.0
#: seconds a handler may take: longer than the longest wait a route has (an RPC waits for its
#: device up to admin.api.MAX_RPC_TIMEOUT, 300 s; the workers' front forwards for up to 90 s)
HANDLER_TIMEOUT = 330.0
#: after an answer given without reading the whole body (401, 413, a bad request): seconds and
#: bytes of the client's unread data drained before closing, so that the close is not a reset
#: that destroys the answer in the client's buffers before it reads it
LINGER_TIME = 1.0
LINGER_BYTES = 1 << 20
#: seconds to tell a refused connection 503 (all slots serving requests) before closing it
REFUSE_TIME = 1.0
READ_SIZE = 65536

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Content Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
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
        """The body as JSON (RFC 8259: no NaN or Infinity, which nothing could read back as JSON;
        no key twice in an object, which would keep one of them silently, as devices' readings are
        refused for it); `HttpError(400)` naming the problem otherwise."""
        if not self.body:
            raise HttpError(400, "body: expected a JSON object")
        try:
            return json.loads(self.body, parse_constant=not_json, parse_float=finite_float, object_pairs_hook=_object)
        except (ValueError, RecursionError) as e:
            raise HttpError(400, f"body: not valid JSON ({e})") from None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError(f"the key {repeated_key(pairs)!r} is given twice")
    return obj


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(CoremError):
    """A refusal only HTTP has (a method, a body, a forwarded answer), with its status; every
    other kind of corem/errors.py is answered by its own `http` status alike."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http = self.status = status
        self.message = message


def json_reply(value: Any, status: int = 200) -> Reply:
    # (allow_nan=False: a float that is no JSON number is a bug here -- 500 -- never an answer no
    # JSON reader takes; what is stored came through `HttpRequest.json` or the devices' decoders)
    return Reply(status, json.dumps(value, separators=(",", ":"), allow_nan=False).encode() + b"\n")


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


class _Gone(Exception):
    """The client closed the connection, or stopped sending: nothing more to answer."""


class HttpServer:
    def __init__(self, routes: list[Route], *, admin_token: str = "", max_body: int = 1024 * 1024,
                 max_connections: int | None = None, head_timeout: float = HEAD_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, access_log: bool = True) -> None:
        """`max_connections`: default `fdlimit.admin_cap()` (the open files limit as it is now:
        corem raises it first); the timeouts are settable for tests.  `access_log`: a line per
        request answered (off for a worker's private port: the front logs what the client asked)."""
        self.routes = routes
        self.access_log = access_log
        self.admin_token = admin_token
        self.max_body = max_body
        self.max_connections = admin_cap() if max_connections is None else max_connections
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.listeners: list[trio.SocketListener] = []
        self._acceptors: list[Acceptor] = []
        #: connections being served (evicted ones until their task closes them)
        self.open = 0
        #: who is evicted at the cap, oldest first (by when each entered its phase): connections
        #: still waiting for their request head, and those without the admin token being answered
        #: (a route open to all: the probes, /metrics, the workers' front passing requests on -- the
        #: worker checks the token) or being sent their answer.  Only the token's holders are never
        #: evicted: no one without it can keep them out, however slow the open routes answer.
        self._evictable: dict[object, trio.CancelScope] = {}
        self.requests = 0
        self.unauthorized = 0
        self.bad_requests = 0
        self.evicted = 0
        self.refused_busy = 0
        self.timeouts = {"head": 0, "body": 0, "answer": 0, "handler": 0}

    async def bind(self, host: str, port: int) -> tuple:
        self.listeners = await trio.open_tcp_listeners(port, host=host)
        return self.listeners[0].socket.getsockname()

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            for listener in self.listeners:
                nursery.start_soon(self._accept, listener)

    async def _accept(self, listener: trio.SocketListener) -> None:
        acceptor = Acceptor(listener.socket, "admin http")
        self._acceptors.append(acceptor)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await acceptor.accept()
                    nursery.start_soon(self.handle, stream)
        finally:
            acceptor.close()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (one request: `Connection: close`); any Trio stream will do."""
        if self.open >= self.max_connections:
            if not self._evictable:  # every connection is being served: this one is told so
                self.refused_busy += 1
                with trio.move_on_after(REFUSE_TIME):
                    await self._refuse(stream)
                await trio.aclose_forcefully(stream)
                return
            oldest = next(iter(self._evictable))
            self._evictable.pop(oldest).cancel()  # its task closes it at once
            self.evicted += 1
        self.open += 1
        try:
            await self._serve_one(stream)
        finally:
            self.open -= 1

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        reply = _error(503, f"busy: {self.max_connections} admin connections are being served; retry",
                       {"Retry-After": "1"})
        try:
            await stream.send_all(_raw(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _serve_one(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        key = object()
        started = trio.current_time()
        try:
            with trio.move_on_after(self.head_timeout) as head:
                self._evictable[key] = head
                try:
                    request = await self._head(conn, stream)
                finally:
                    self._evictable.pop(key, None)
            if head.cancelled_caught:  # idle, too slow, or evicted for a newer connection
                if trio.current_time() >= head.deadline:  # (evicted: counted as such)
                    self.timeouts["head"] += 1
                return
            vouched = isinstance(request, h11.Request) and self._vouched(request)
            with trio.CancelScope() as answering:
                if not vouched:  # (an open route's handler, for one without the token: /readyz,
                    self._evictable[key] = answering  # /metrics, the front's forwarding, wait seconds)
                try:
                    reply, method = await self._answer(conn, stream, request)
                except h11.RemoteProtocolError as e:  # in the body (chunk framing)
                    reply, method = self._bad(e), "GET"
                finally:
                    self._evictable.pop(key, None)
            if answering.cancelled_caught:  # evicted for a newer connection: closed unanswered
                return
            with trio.CancelScope() as sending:
                if not vouched:
                    self._evictable[key] = sending  # (an open route's answer to one that does not read)
                try:
                    await self._send(conn, stream, reply, head_only=method == "HEAD")
                    if self.access_log:
                        self._log_access(stream, request, method, reply, trio.current_time() - started)
                    if not _complete(conn):
                        await self._linger(stream)
                finally:
                    self._evictable.pop(key, None)
        except _Gone:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    def _log_access(stream: trio.abc.Stream, request: h11.Request | Reply, method: str, reply: Reply,
                    seconds: float) -> None:
        """The access log's line: the answer is sent (its last byte handed to the kernel)."""
        if not access.isEnabledFor(logging.INFO):
            return
        try:
            peer = stream.socket.getpeername()  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            peer = None
        if isinstance(request, h11.Request):
            path, _, query = request.target.decode("latin-1").partition("?")
        else:  # (a head that did not parse: no method or path to tell)
            method, path, query = "-", "-", ""
        line = fields(method=method, path=path, status=reply.status, bytes=len(reply.body),
                      duration_ms=round(seconds * 1000, 3), peer=peer)
        if query:
            line["fields"]["query"] = query
        access.info("%s %s %d", method, path, reply.status, extra=line)

    async def _head(self, conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | Reply:
        """The request head; a Reply (400, 431) when it is not one; `_Gone` if the peer left."""
        fed = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                return self._bad(e)
            if event is h11.NEED_DATA:
                data = bytes(await stream.receive_some(READ_SIZE))
                fed += len(data)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                # (h11 bounds a head still incomplete; one that came whole in a read is measured here)
                if fed - len(conn.trailing_data[0]) > MAX_HEAD:
                    return self._bad(h11.RemoteProtocolError("request head larger than 16 KiB", 431))
                return event
            raise _Gone  # ConnectionClosed: the peer left before a whole head

    def _bad(self, e: h11.RemoteProtocolError) -> Reply:
        self.bad_requests += 1
        status = e.error_status_hint if e.error_status_hint in REASONS else 400
        return _error(status, f"request: {str(e)[:200]}")

    async def _answer(self, conn: h11.Connection, stream: trio.abc.Stream,
                      request: h11.Request | Reply) -> tuple[Reply, str]:
        if isinstance(request, Reply):
            return request, "GET"
        method = request.method.decode("ascii", "replace")
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.headers:  # (h11 lowercased the names)
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        chunked = "transfer-encoding" in headers
        if chunked and "content-length" in headers:
            self.bad_requests += 1
            return _error(400, "request: both Content-Length and Transfer-Encoding (send one)"), method
        length = int(headers.get("content-length", "0").partition(",")[0] or 0)  # h11 checked it (equal repeats)
        if length > self.max_body:
            return _error(413, f"body: {length} bytes; at most {self.max_body}"), method
        path, _, qs = request.target.decode("latin-1").partition("?")
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
            # before reading a body it may not send; and no body at all without the token: the open
            # routes take none (GETs; the workers' front forwards to routes that check the token),
            # and one buffered for them would be memory anyone could ask for (max_body a connection)
            if (route.auth or chunked or length) and not self.authorized(headers):
                self.unauthorized += 1
                why = "missing or wrong admin token" if route.auth else "a request with a body needs the admin token"
                return _error(401, f"authorization: {why} (Authorization: Bearer TOKEN)",
                              {"WWW-Authenticate": "Bearer"}), method
            body = await self._body(conn, stream)  # (without the token: none, at once)
            if isinstance(body, Reply):
                return body, method
            http_request = HttpRequest(method, path, params, dict(parse_qsl(qs)), headers, body)
            return await self._call(route, http_request), method
        if allowed:
            return _error(405, f"method: {method} not allowed; use {', '.join(sorted(set(allowed)))}",
                          {"Allow": ", ".join(sorted(set(allowed)))}), method
        return _error(404, f"path: {path} not found"), method

    async def _body(self, conn: h11.Connection, stream: trio.abc.Stream) -> bytes | Reply:
        """The whole body (h11 undoes chunking), at most `max_body`; `_Gone` if the client stops
        sending for `idle_timeout` or leaves."""
        if conn.they_are_waiting_for_100_continue:  # the head passed: now it may send the body
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")) or b"")
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(self.idle_timeout):
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        raise _Gone  # it left mid-body: nothing to answer
                    conn.receive_data(bytes(data))
                    continue
                self.timeouts["body"] += 1
                raise _Gone
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body:  # chunked: the size shows only as it comes
                    return _error(413, f"body: more than {self.max_body} bytes; at most {self.max_body}")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise _Gone

    async def _call(self, route: Route, request: HttpRequest) -> Reply:
        try:
            with trio.fail_after(HANDLER_TIMEOUT):
                reply = route.handler(request)
                if inspect.isawaitable(reply):
                    reply = await reply
                return reply
        except CoremError as e:  # any refusal, by its kind's status (never by its text)
            return _error(e.http, str(e), http_headers(e))
        except trio.TooSlowError:
            self.timeouts["handler"] += 1
            return _error(504, f"no answer within {HANDLER_TIMEOUT:g} s")
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal error (see the server log)")

    def metrics(self) -> Iterator[Sample]:
        yield counter("corem_admin_requests", self.requests)
        yield counter("corem_admin_unauthorized", self.unauthorized)
        yield counter("corem_admin_bad_requests", self.bad_requests)
        yield gauge("corem_admin_connections", self.open)
        yield counter("corem_admin_connections_evicted", self.evicted)
        yield counter("corem_admin_connections_refused", self.refused_busy, reason="busy")
        yield counter("corem_admin_connections_refused", sum(a.refused for a in self._acceptors), reason="no_fds")
        for phase, n in self.timeouts.items():
            yield counter("corem_admin_timeouts", n, phase=phase)

    def _vouched(self, request: h11.Request) -> bool:
        """Did the request carry the admin token (its connection is not evicted)?"""
        return self.authorized({k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers
                                if k == b"authorization"})

    def authorized(self, headers: dict[str, str]) -> bool:
        """Does the request carry the admin token?"""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return bool(self.admin_token) and scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), self.admin_token.encode()
        )

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, reply: Reply, head_only: bool = False) -> None:
        """The answer, through h11 when it can still frame one, else as bytes; each piece must
        leave within `idle_timeout` (a client that stops reading is dropped)."""
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
                   *reply.headers.items(), ("Connection", "close")]
        try:
            data = conn.send(h11.Response(status_code=reply.status, headers=headers,
                                          reason=REASONS.get(reply.status, "").encode()))
            data = (data or b"") + (b"" if head_only else conn.send(h11.Data(data=reply.body)) or b"")
            conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # h11 cannot frame it (its state): the same bytes by hand
            data = _raw(reply, head_only)
        view = memoryview(data)
        for start in range(0, len(view), READ_SIZE):
            with trio.move_on_after(self.idle_timeout):
                await stream.send_all(view[start:start + READ_SIZE])
                continue
            self.timeouts["answer"] += 1
            raise _Gone

    @staticmethod
    async def _linger(stream: trio.abc.Stream) -> None:
        """Half-close, then drain what the client still sends for a moment (see `LINGER_TIME`)."""
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            return
        with trio.move_on_after(LINGER_TIME):
            await stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    return
                drained += len(data)


def _complete(conn: h11.Connection) -> bool:
    """Has the client sent all of its request (what is buffered ends it)?  If not, and the answer
    did not wait for it, the close is lingering."""
    try:
        while conn.their_state is h11.SEND_BODY:
            if conn.next_event() is h11.NEED_DATA:
                return False
    except h11.RemoteProtocolError:
        return False
    return conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)  # (MUST_CLOSE: done, and we said close)


def _raw(reply: Reply, head_only: bool = False) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
    head = (
        f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, '')}\r\nContent-Type: {reply.content_type}\r\n"
        f"Content-Length: {len(reply.body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + reply.body


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    reply = json_reply({"error": message}, status)
    reply.headers.update(headers or {})
    return reply


#: seconds a forwarded request may take (an RPC, which waits for its device, its own timeout and 30 s more)
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


async def forward(base: str, req: HttpRequest, *, node: str | None = None, body: bytes | None = None,
                  timeout: float = FORWARD_TIMEOUT) -> Reply:
    """Pass `req` on to another corem (`node`: this one's URL, when it goes to another node;
    `body`: instead of the request's own; `timeout`: how long its answer may take)."""
    headers = {k: v for k, v in req.headers.items() if k in PASSED_ON}
    if node is not None:
        headers[FORWARDED] = node
    return await call(base, req.method, target(req), req.body if body is None else body, headers, timeout)


async def call(base: str, method: str, target: str, body: bytes, headers: dict[str, str],
               timeout: float = FORWARD_TIMEOUT) -> Reply:
    """One request to another corem HTTP server (`base`: http://host:port), as this one serves:
    HTTP/1.1, one per connection.  For the workers' front and for nodes forwarding downlink."""
    hostport = base.removeprefix("http://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    head = f"{method} {target} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with trio.fail_after(timeout):
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
