"""The admin HTTP server alone (corem/admin/http.py), over Trio memory streams: no socket, no Server."""

from __future__ import annotations

import json

import trio
import trio.testing

from corem.admin.http import HttpError, HttpServer, Reply, Route
from corem.errors import StorageUnavailable
from corem.metrics import gather

TOKEN = "s3cret-token"


def echo(req):
    return Reply(200, json.dumps({"params": req.params, "query": req.query, "body": req.body.decode()}).encode(),
                 "application/json")


def refuse(req):
    raise HttpError(400, "tenant: not a valid name")


def full_disk(req):
    raise StorageUnavailable("disk full")


def boom(req):
    raise RuntimeError("a bug")


async def later(req):
    await trio.sleep(0)
    return Reply(201, b"made", "text/plain")


def server(max_body: int = 1024) -> HttpServer:
    return HttpServer([
        Route("GET", "/open/{name}", echo, auth=False),
        Route("POST", "/api/things/{name}", echo),
        Route("POST", "/api/bad", refuse),
        Route("POST", "/api/full", full_disk),
        Route("POST", "/api/boom", boom),
        Route("POST", "/api/later", later),
    ], admin_token=TOKEN, max_body=max_body)


async def ask(http: HttpServer, *chunks: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `chunks` on one connection; the reply's status, headers and body."""
    client, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.handle, server_side)
        for chunk in chunks:
            await client.send_all(chunk)
            await trio.sleep(0)  # the server sees them as separate reads
        data = b""
        while True:
            part = await client.receive_some(65536)
            if not part:
                break
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def post(path: str, body: bytes = b"", token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def test_routes_params_query_and_a_body_sent_in_pieces():
    http = server()
    status, headers, body = await ask(http, b"GET /open/a%20b?x=1&y=two HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body) == {"params": {"name": "a b"}, "query": {"x": "1", "y": "two"}, "body": ""}
    assert headers["connection"] == "close" and headers["content-length"] == str(len(body))
    request = post("/api/things/t1", b"0123456789" * 50)
    status, _, body = await ask(http, request[:30], request[30:200], request[200:])
    assert status == 200 and json.loads(body)["body"] == "0123456789" * 50


async def test_the_admin_token_is_required_and_refusals_are_counted():
    http = server()
    for token in (None, "wrong"):
        status, headers, body = await ask(http, post("/api/things/t1", b"{}", token))
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(body)["error"].startswith("authorization:")
    assert (await ask(http, post("/api/things/t1", b"{}")))[0] == 200
    samples = gather([(http, {})])
    assert samples["corem_admin_requests"][()] == 3 and samples["corem_admin_unauthorized"][()] == 2


async def test_errors_name_what_is_wrong():
    http = server(max_body=100)
    cases = [
        (post("/api/bad"), 400, "tenant: not a valid name"),
        (post("/api/full"), 503, "disk full"),
        (post("/api/boom"), 500, "internal error (see the server log)"),
        (post("/api/things/t1", b"x" * 101), 413, "body: 101 bytes; at most 100"),
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404, "path: /nowhere not found"),
        (b"DELETE /open/a HTTP/1.1\r\n\r\n", 405, "method: DELETE not allowed; use GET"),
        (b"GET /open/a HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400, "content-length: not a number"),
        (b"NONSENSE\r\n\r\n", 400, "bad request line"),
    ]
    for request, status, error in cases:
        got, headers, body = await ask(http, request)
        assert (got, json.loads(body)["error"]) == (status, error), request
    _, headers, _ = await ask(http, post("/api/full"))
    assert headers["retry-after"] == "5"
    _, headers, _ = await ask(http, b"DELETE /open/a HTTP/1.1\r\n\r\n")
    assert headers["allow"] == "GET"


async def test_head_gets_no_body_and_async_handlers_are_awaited():
    http = server()
    status, headers, body = await ask(http, b"HEAD /open/a HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, _, body = await ask(http, post("/api/later"))
    assert (status, body) == (201, b"made")


async def test_a_client_that_goes_away_mid_request_costs_nothing():
    http = server()
    client, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.handle, server_side)
        await client.send_all(post("/api/things/t1", b"x" * 50)[:-10])  # the body is cut short
        await client.aclose()
    assert http.requests == 1  # routed, then the connection ended: no reply, no error
