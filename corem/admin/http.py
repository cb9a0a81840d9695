"""A small HTTP/1.1 server on Trio for the operator's side: /metrics, /healthz, /readyz.

Deliberately minimal (one request per connection, GET only, bounded request size and time):
it serves operators and Prometheus, not the internet.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

log = logging.getLogger("corem.http")

MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT = 10.0

Handler = Callable[[str], Awaitable[tuple[int, str, bytes]]]

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpServer:
    def __init__(self, routes: dict[str, Callable[[], tuple[int, str, bytes]]]) -> None:
        self.routes = routes
        self.listeners: list[trio.SocketListener] = []

    async def bind(self, host: str, port: int) -> tuple:
        self.listeners = await trio.open_tcp_listeners(port, host=host)
        return self.listeners[0].socket.getsockname()

    async def serve(self) -> None:
        await trio.serve_listeners(self._handle, self.listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                    if len(data) > MAX_REQUEST:
                        await self._reply(stream, 400, "text/plain", b"request too large\n")
                        return
                line = data.split(b"\r\n", 1)[0].decode("latin-1")
                parts = line.split(" ")
                if len(parts) != 3:
                    await self._reply(stream, 400, "text/plain", b"bad request line\n")
                    return
                method, target, _ = parts
                path = target.split("?", 1)[0]
                route = self.routes.get(path)
                if route is None:
                    await self._reply(stream, 404, "text/plain", b"not found\n")
                elif method not in ("GET", "HEAD"):
                    await self._reply(stream, 405, "text/plain", b"GET only\n")
                else:
                    status, ctype, body = route()
                    await self._reply(stream, status, ctype, b"" if method == "HEAD" else body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    @staticmethod
    async def _reply(stream: trio.SocketStream, status: int, ctype: str, body: bytes) -> None:
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        await stream.send_all(head + body)
