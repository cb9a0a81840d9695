"""Fuzz the admin HTTP server's request parsing (request line, headers, Content-Length, body,
routing, the bearer token): every input gets a well-formed reply or ends the connection."""

import sys

import atheris

with atheris.instrument_imports():
    import trio

    from corem.admin.http import HttpServer, Reply, Route, json_reply

SERVER = HttpServer([
    Route("GET", "/open", lambda r: Reply(200, b"ok"), auth=False),
    Route("POST", "/api/devices/{tenant}/{device}", lambda r: json_reply({"got": r.json(), **r.params})),
    Route("PUT", "/api/raw", lambda r: json_reply({"n": len(r.body), "q": r.query})),
], admin_token="secret", max_body=4096)


class Stream:
    """What `_answer` reads from: the fuzzer's bytes in fuzzer-chosen chunks, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def receive_some(self, max_bytes: int) -> bytes:
        return self.chunks.pop(0)[:max_bytes] if self.chunks else b""


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    prefix = fdp.PickValueInList([b"", b"POST /api/devices/a/b HTTP/1.1\r\nAuthorization: Bearer secret\r\n",
                                  b"PUT /api/raw?x=1 HTTP/1.1\r\n", b"GET /open HTTP/1.1\r\n"])
    chunks = [prefix]
    while fdp.remaining_bytes():
        chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64)))

    async def main() -> None:
        try:
            reply, method = await SERVER._answer(Stream(chunks))
        except trio.BrokenResourceError:
            return  # the peer went away mid-request: nothing to answer
        assert 200 <= reply.status < 600 and isinstance(reply.body, bytes)

    trio.run(main)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
