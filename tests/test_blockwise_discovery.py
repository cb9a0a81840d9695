"""Block2 (RFC 7959) and /.well-known/core (RFC 6690): sans-IO, then libcoap's real client."""

from __future__ import annotations

import subprocess

import trio

from corem.codec import Block, Code, Message, OptionNumber as O, Type
from corem.coap import Endpoint, Params, Response, Router, discovery
from corem.coap.observe import Observers
from corem.coap.site import Resource, Site

from .conftest import COAP_CLIENT, exchange, needs_libcoap

PEER = ("192.0.2.9", 5683)
BIG = bytes(range(256)) * 20  # 5,120 bytes


class Big(Resource):
    rt = "firmware"
    ct = "42"

    def __init__(self) -> None:
        super().__init__()
        self.data = BIG

    def get(self, req):
        return Response(Code.CONTENT, self.data)


class Thermo(Resource):
    rt = "temperature"
    observable = True

    def get(self, req):
        return Response(Code.CONTENT, b"21")


def stack():
    ep = Endpoint(Params(), rng=lambda: 0.0)
    router = Router()
    site = Site()
    site.mount(router, Observers(ep))
    big = Big()
    site.add("fw/image", big)
    site.add("sensors/thermo", Thermo())
    discovery.install(router)
    return ep, router, big


def get(ep, router, path, block=None, query=None, mid=1):
    opts = [(O.URI_PATH, s.encode()) for s in path.split("/")]
    if query:
        opts.append((O.URI_QUERY, query.encode()))
    msg = Message(Type.CON, Code.GET, mid, b"k", sorted(opts))
    if block is not None:
        msg.add(O.BLOCK2, block)
    return exchange(ep, router, msg, PEER)


def test_large_representation_goes_in_blocks_with_size2_and_etag():
    ep, router, big = stack()
    first = get(ep, router, "fw/image")
    assert first.block2 == Block(0, True, 6) and first.size2 == len(BIG) and len(first.payload) == 1024
    got, num, mid = bytes(first.payload), 1, 2
    while True:
        m = get(ep, router, "fw/image", Block(num, False, 6), mid=mid)
        assert m.etag == first.etag
        got += bytes(m.payload)
        if not m.block2.more:
            break
        num, mid = num + 1, mid + 1
    assert got == BIG


def test_client_chosen_block_size_and_errors():
    ep, router, big = stack()
    small = get(ep, router, "fw/image", Block(0, False, 2))  # early negotiation: 64-byte blocks
    assert small.block2 == Block(0, True, 2) and bytes(small.payload) == BIG[:64]
    third = get(ep, router, "fw/image", Block(2, False, 2), mid=2)
    assert bytes(third.payload) == BIG[128:192]
    assert get(ep, router, "fw/image", Block(500, False, 6), mid=3).code == Code.BAD_OPTION
    big.data = b"changed" * 300
    assert get(ep, router, "fw/image", mid=4).etag != small.etag  # a change restarts the transfer
    assert get(ep, router, "sensors/thermo", mid=5).block2 is None  # small: no block-wise


def test_well_known_core_lists_and_filters():
    ep, router, _ = stack()
    all_ = get(ep, router, ".well-known/core")
    assert all_.content_format == 40
    text = bytes(all_.payload).decode()
    assert '</fw/image>;rt="firmware";ct=42' in text and '</sensors/thermo>;rt="temperature";obs' in text
    assert bytes(get(ep, router, ".well-known/core", query="rt=temperature", mid=2).payload).decode() == (
        '</sensors/thermo>;rt="temperature";obs')
    assert "</fw/image>" in bytes(get(ep, router, ".well-known/core", query="href=/fw*", mid=3).payload).decode()
    assert get(ep, router, ".well-known/core", query="rt=nothing", mid=4).code == Code.NOT_FOUND


@needs_libcoap
async def test_libcoap_fetches_block_wise_and_discovers(tmp_path):
    from corem.config import Settings
    from corem.server import Server

    server = Server(Settings.load({"data_dir": str(tmp_path / "d"), "coap": "127.0.0.1:0", "coaps": "off",
                                   "http": "off"}, env={}))
    server.site.add("fw/image", Big())
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        base = f"coap://127.0.0.1:{bound.coap[1]}"

        def fetch(*args):
            out = tmp_path / "out.bin"
            subprocess.run([COAP_CLIENT, "-o", str(out), *args], capture_output=True, timeout=30, check=True)
            return out.read_bytes()

        assert await trio.to_thread.run_sync(fetch, f"{base}/fw/image") == BIG
        assert await trio.to_thread.run_sync(fetch, "-b", "64", f"{base}/fw/image") == BIG
        links = (await trio.to_thread.run_sync(fetch, f"{base}/.well-known/core")).decode()
        server.stop()
    assert '</fw/image>;rt="firmware";ct=42' in links


class Sink(Resource):
    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def post(self, req):
        self.bodies.append(bytes(req.message.payload))
        return Response(Code.CHANGED)


def post_block(ep, router, num, more, szx, chunk, mid, size1=None):
    msg = Message(Type.CON, Code.POST, mid, b"u", [(O.URI_PATH, b"up")], chunk)
    msg.add(O.BLOCK1, Block(num, more, szx))
    if size1 is not None:
        msg.add(O.SIZE1, size1)
    return exchange(ep, router, msg, PEER)


def test_block1_upload_is_reassembled_and_bounded():
    ep = Endpoint(Params(), rng=lambda: 0.0)
    router = Router()
    site = Site()
    site.mount(router, Observers(ep))
    sink = Sink()
    site.add("up", sink)
    body = bytes(range(200))
    chunks = [body[i : i + 64] for i in range(0, 200, 64)]
    for n, chunk in enumerate(chunks[:-1]):
        m = post_block(ep, router, n, True, 2, chunk, mid=10 + n)
        assert m.code == Code.CONTINUE and m.block1 == Block(n, True, 2)
    last = post_block(ep, router, len(chunks) - 1, False, 2, chunks[-1], mid=20)
    assert last.code == Code.CHANGED and last.block1 == Block(3, False, 2)  # echoed (§2.3)
    assert sink.bodies == [body] and len(router.uploads) == 0
    # out of order: 4.08, and the transfer is forgotten
    post_block(ep, router, 0, True, 2, chunks[0], mid=30)
    assert post_block(ep, router, 2, True, 2, chunks[2], mid=31).code == Code.REQUEST_ENTITY_INCOMPLETE
    assert len(router.uploads) == 0
    # too large: 4.13 with the limit in Size1
    too_big = post_block(ep, router, 0, True, 6, bytes(1024), mid=40, size1=10**6)
    assert too_big.code == Code.REQUEST_ENTITY_TOO_LARGE and too_big.size1 == 64 * 1024
