"""The UDP edge alone (corem/net): real loopback sockets, an endpoint and a router, no server.

The security layer here is a test double (`Rot`: each byte + 1), which is the point: the edge
must drive any layer through the interface alone.  DTLS through the same edge is tested with
real clients in test_interop_dtls.py.
"""

from __future__ import annotations

import socket

import pytest
import trio

from corem.codec import Code, Message, Type, decode, encode
from corem.codec import OptionNumber as O
from corem.coap import Acked, Endpoint, Params, Response, Router
from corem.metrics import gather
from corem.net import batch
from corem.net.limits import SourceLimiter
from corem.net.security import PlainUdp
from corem.net.udp import UdpEdge


@pytest.fixture
def udp_pair():
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_recv_many_and_send_many_behave_like_recvfrom_and_sendto(udp_pair):
    from corem.net._sockets import recv_many, send_many

    a, b = udp_pair
    to_b = ("127.0.0.1", b.getsockname()[1])
    wire = [(bytes([i]) * (i + 1), to_b) for i in range(100)] + [(b"x" * 300, to_b)]
    wire.insert(50, (b"lost", ("::1", 5683, 0, 0)))  # an IPv6 peer from an IPv4 socket: refused, skipped
    taken, nbytes, errors, blocked = send_many(a.fileno(), wire)
    assert (taken, errors, blocked) == (102, 1, 0) and nbytes == sum(range(1, 101)) + 300
    got = recv_many(b.fileno(), 200, 1000)
    assert len(got) == 101
    assert got[:100] == [(bytes([i]) * (i + 1), ("127.0.0.1", a.getsockname()[1])) for i in range(100)]
    assert got[100][0] == b"x" * 200  # cut to bufsize: the edge counts it as oversized
    assert recv_many(b.fileno(), 200, 1000) == []  # nothing waiting: no wait, no error
    with pytest.raises(TypeError):
        send_many(a.fileno(), [("text", to_b)])


@pytest.mark.parametrize("c_helpers", [True, False])
def test_the_batch_calls_read_and_send_the_same_with_or_without_c(udp_pair, monkeypatch, c_helpers):
    if not c_helpers:
        monkeypatch.setattr(batch, "recv_many", None)
        monkeypatch.setattr(batch, "send_many", None)
    a, b = udp_pair
    to_b, from_a = ("127.0.0.1", b.getsockname()[1]), ("127.0.0.1", a.getsockname()[1])
    taken, nbytes, errors, blocked = batch.sender(a)([(bytes([i]) * 10, to_b) for i in range(5)])
    assert (taken, nbytes, errors, blocked) == (5, 50, 0, 0)
    read = batch.reader(b)
    assert read(8, 3) == [(bytes([i]) * 8, from_a) for i in range(3)]
    assert len(read(8, 10)) == 2 and read(8, 10) == []


class Rot:
    """A security layer for the test: a datagram is its message with each byte + 1."""

    transparent = False

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.hellos: list[tuple[bytes, tuple]] = []
        self.unsettled = 0  # messages received since the last settle
        self.settled: list[int] = []

    def receive(self, datagram, peer, now):
        if datagram == b"hello":  # a "handshake": answered by the layer itself, no message
            self.hellos.append((b"welcome", peer))
            return ()
        self.unsettled += 1
        return (bytes((x - 1) & 0xFF for x in datagram),)

    def settle(self, now):
        self.settled.append(self.unsettled)
        self.unsettled = 0

    def wrap(self, message, peer):
        return bytes((x + 1) & 0xFF for x in message)

    def datagrams_to_send(self):
        out, self.hellos = self.hellos, []
        return out

    def tick(self, now):
        self.ticks.append(now)

    def credentialed(self, datagram, peer):
        return False

    def device(self, peer):
        return None


def rot(data: bytes) -> bytes:
    return bytes((x + 1) & 0xFF for x in data)


def unrot(data: bytes) -> bytes:
    return bytes((x - 1) & 0xFF for x in data)


def request(mid: int, path: bytes = b"hello", mtype: Type = Type.CON) -> bytes:
    return encode(Message(mtype, Code.GET, mid, b"t", [(O.URI_PATH, path)], b""))


async def exchange(client: socket.socket, server: tuple, datagrams: list[bytes], want: int,
                   timeout: float = 30.0) -> list[bytes]:
    """Send `datagrams` from `client` and collect `want` answers (or what came within `timeout`)."""
    sock = trio.socket.from_stdlib_socket(client)
    for d in datagrams:
        await sock.sendto(d, server)
    got = []
    with trio.move_on_after(timeout):
        while len(got) < want:
            data, _ = await sock.recvfrom(2048)
            got.append(data)
    return got


async def until(predicate, timeout: float = 30.0) -> None:
    """Until `predicate()` is true (the bound only detects what never happens)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def router() -> Router:
    r = Router()
    r.add("hello", {Code.GET: lambda req, params: Response(Code.CONTENT, b"hi")})
    return r


async def test_a_batch_is_settled_by_the_security_layer_before_any_of_its_messages_is_handled(udp_pair):
    """DTLS writes the batch's record numbers before its requests are served (replays after a
    crash): at every request the handler sees, nothing received is left unsettled."""
    client, server_sock = udp_pair
    layer = Rot()
    seen: list[int] = []
    r = Router()
    r.add("hello", {Code.GET: lambda req, params: seen.append(layer.unsettled) or Response(Code.CONTENT, b"hi")})
    edge = UdpEdge(server_sock, Endpoint(), r, security=layer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(edge.serve)
        got = await exchange(client, server_sock.getsockname(), [rot(request(i)) for i in range(20)], 20)
        nursery.cancel_scope.cancel()
    assert len(got) == 20 and seen == [0] * 20 and sum(layer.settled) == 20


async def test_the_edge_serves_requests_through_its_security_layer_and_ticks_it(udp_pair):
    client, server_sock = udp_pair
    layer = Rot()
    edge = UdpEdge(server_sock, Endpoint(), router(), security=layer)
    server = server_sock.getsockname()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(edge.serve)
        nursery.start_soon(edge.run_timers)
        got = await exchange(client, server, [b"hello", rot(request(1)), rot(request(2, b"nowhere"))], 3)
        await until(lambda: layer.ticks)  # (a timer period is 0.1 s)
        nursery.cancel_scope.cancel()
    assert got[0] == b"welcome"  # the layer's own datagram
    answers = sorted((decode(unrot(d)) for d in got[1:]), key=lambda m: m.mid)
    assert [(m.type, m.code, m.mid, bytes(m.payload)) for m in answers] == [
        (Type.ACK, Code.CONTENT, 1, b"hi"), (Type.ACK, Code.NOT_FOUND, 2, b"")]
    assert layer.ticks  # the timer task ticks the security layer
    samples = gather([(edge, {}), (edge.endpoint, {})])
    assert samples["corem_coap_datagrams_sent"][()] == 3 and samples["corem_coap_requests"][()] == 2


async def test_the_endpoints_events_reach_on_event(udp_pair):
    """A separate response is acknowledged by the client: the endpoint's `Acked` event reaches
    `on_event` with the context the response was sent with (observers depend on this)."""
    client, server_sock = udp_pair
    events = []
    waiting = []
    r = Router()
    r.add("slow", {Code.GET: lambda req, params: waiting.append(req)})  # answered later
    edge = UdpEdge(server_sock, Endpoint(Params(piggyback_timeout=0.05)), r, on_event=events.append)
    server = server_sock.getsockname()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(edge.serve)
        nursery.start_soon(edge.run_timers)
        [empty_ack] = await exchange(client, server, [request(7, b"slow")], 1)
        assert decode(empty_ack).type == Type.ACK and decode(empty_ack).code == 0
        waiting[0].respond(Code.CONTENT, payload=b"late", context="mine")
        edge.flush()
        [late] = await exchange(client, server, [], 1)
        con = decode(late)
        assert (con.type, con.code, bytes(con.payload)) == (Type.CON, Code.CONTENT, b"late")
        await exchange(client, server, [encode(Message(Type.ACK, 0, con.mid, b""))], 0)
        await until(lambda: events)  # the edge has read the ACK
        nursery.cancel_scope.cancel()
    assert [type(e) for e in events] == [Acked] and events[0].context == "mine"


async def test_over_the_rate_only_credentialed_datagrams_pass_and_oversized_ones_never(udp_pair):
    client, server_sock = udp_pair
    limiter = SourceLimiter(0.1, burst=2)  # burst 2, then one per 10 s (however slowly they are read)
    layer = PlainUdp(credentialed=lambda data, peer: data.endswith(b"!"))
    r = router()
    r.add("vip", {Code.GET: lambda req, params: Response(Code.CONTENT, b"ok")})
    edge = UdpEdge(server_sock, Endpoint(), r, security=layer, limiter=limiter, max_datagram=64)
    server = server_sock.getsockname()
    vip = encode(Message(Type.CON, Code.GET, 9, b"t", [(O.URI_PATH, b"vip")], b"!"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(edge.serve)
        got = await exchange(client, server, [request(1), request(2), request(3), request(4), vip, b"\x40" * 65], 3)
        await until(lambda: edge.stats.oversized)  # the last datagram, read after the answers
        nursery.cancel_scope.cancel()
    assert sorted(decode(d).mid for d in got) == [1, 2, 9]
    assert (limiter.dropped, limiter.exempted, edge.stats.oversized) == (2, 1, 1)
    samples = gather([(edge, {"transport": "udp"})])
    assert samples["corem_rate_limited_datagrams"][(("transport", "udp"),)] == 2
    assert samples["corem_coap_datagrams_oversized"][(("transport", "udp"),)] == 1


def test_send_many_sends_what_it_was_given_even_if_the_list_changes_meanwhile():
    """A peer's port converts through Python (`__index__`), which could empty the list: the
    datagrams before it in the batch must still be the bytes given (an ASan run found freed heap
    memory sent on the socket, or a crash, when send_many walked the list itself)."""
    from corem.net._sockets import send_many

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(10)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port = rx.getsockname()[1]
    items: list = []

    class EmptiesTheList:
        def __index__(self) -> int:
            items.clear()  # (the earlier datagrams' only other reference)
            [bytes([0x41 + i]) * 4000 for i in range(64)]  # (memory a freed one would be reused for)
            return port

    items += [(bytes([0x30 + i]) * 4000, ("127.0.0.1", port)) for i in range(3)]
    items.append((b"!", ("127.0.0.1", EmptiesTheList())))
    try:
        assert send_many(tx.fileno(), items)[:3] == (4, 12001, 0)
        assert [rx.recv(70000) for _ in range(4)] == [bytes([0x30 + i]) * 4000 for i in range(3)] + [b"!"]
    finally:
        rx.close()
        tx.close()
