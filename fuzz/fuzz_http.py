"""Fuzz the admin HTTP server as a connection sees it (corem/admin/http.py on h11): the request
line, headers, Content-Length and chunked framing, Expect: 100-continue, the body bound, routing,
the bearer token.  Every input gets well-formed HTTP back -- at most a 100 Continue, then one final
answer or nothing (the connection just ends) -- and the server never raises.

An input is one byte of choices, then the bytes the client sends: the low two bits pick a prefix
(none, or a request line and headers the body may complete), the rest the size of each read
(1..64 bytes), so that a regression input (fuzz/regressions/http-*) is that byte and a raw request.
"""

import sys

import atheris
import trio  # (not instrumented: the loop is not under test, and instrumented it triples an input's time)

with atheris.instrument_imports():
    import h11

    from corem.admin.http import HttpServer, Reply, Route, json_reply

PREFIXES = [b"", b"POST /api/devices/a/b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n",
            b"PUT /api/raw?x=1 HTTP/1.1\r\nHost: x\r\n", b"GET /open HTTP/1.1\r\nHost: x\r\n"]


SERVER = HttpServer([
    Route("GET", "/open", lambda r: Reply(200, b"ok"), auth=False),
    Route("POST", "/api/devices/{tenant}/{device}", lambda r: json_reply({"got": r.json(), **r.params})),
    Route("PUT", "/api/raw", lambda r: json_reply({"n": len(r.body), "q": r.query}), auth=False),
], admin_token="secret", max_body=4096, max_connections=4)


class Stream(trio.abc.Stream):
    """A connection: the input in reads of `size` bytes, then EOF; what the server sends is kept."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data = data
        self.size = size
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        chunk, self.data = self.data[:self.size], self.data[self.size:]
        return chunk

    async def send_all(self, data) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def check(sent: bytes, head: bool) -> None:
    """What the server sent: nothing, or [100 Continue] then one final answer with its whole body
    (none for a HEAD request)."""
    if sent.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):  # (then nothing: the client left mid-body)
        if not sent.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"):
            return
    if not sent:
        return
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="HEAD" if head else "GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(bytes(sent))
    client.receive_data(b"")
    final = None
    while True:
        event = client.next_event()  # a RemoteProtocolError here: corem sent what HTTP is not
        if isinstance(event, h11.InformationalResponse):
            assert event.status_code == 100 and final is None
        elif isinstance(event, h11.Response):
            assert 200 <= event.status_code < 600
            final = event
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
        else:
            assert isinstance(event, h11.Data)
    assert final is not None


def test_one_input(data: bytes) -> None:
    if not data:
        return
    sent = PREFIXES[data[0] & 3] + data[1:]
    stream = Stream(sent, 1 + (data[0] >> 2))

    async def main() -> None:
        await SERVER.handle(stream)

    trio.run(main)
    check(bytes(stream.sent), head=sent.lstrip(b"\r\n").startswith(b"HEAD "))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
