"""Observe (RFC 7641) and the user resource API: sans-IO with a clock, then a real libcoap observer."""

from __future__ import annotations

import subprocess

import trio

from corem.codec import Code, Message, OptionNumber as O, Type, decode, encode
from corem.coap import Endpoint, Params, Response, Router
from corem.coap.observe import Observers, answer_observe
from corem.coap.site import Resource, Site

from .conftest import COAP_CLIENT, exchange, needs_libcoap

PEER = ("192.0.2.5", 5683)


class Thermo(Resource):
    observable = True

    def __init__(self) -> None:
        super().__init__()
        self.value = b"20"

    def get(self, req):
        return Response(Code.CONTENT, self.value)

    def put(self, req):
        self.value = bytes(req.message.payload)
        self.changed()
        return Response(Code.CHANGED)


class Plain(Resource):
    def post(self, req):
        return Response(Code.CREATED)


def stack(**obs):
    clock = [0.0]
    ep = Endpoint(Params(), rng=lambda: 0.0)
    router = Router()
    observers = Observers(ep, **obs)
    site = Site(clock=lambda: clock[0])
    site.mount(router, observers)
    thermo = Thermo()
    site.add("thermo", thermo)
    site.add("plain", Plain())
    return ep, router, observers, thermo, clock


def request(ep, router, code, path, token=b"t1", mid=1, observe=None, payload=b"", peer=PEER):
    opts = [(O.URI_PATH, path.encode())] + ([(O.OBSERVE, bytes([observe]) if observe else b"")] if observe is not None else [])
    return exchange(ep, router, Message(Type.CON, code, mid, token, sorted(opts), payload), peer)


def test_register_notify_and_deregister():
    ep, router, observers, thermo, clock = stack()
    first = request(ep, router, Code.GET, "thermo", observe=0)
    assert first.code == Code.CONTENT and first.observe is not None and bytes(first.payload) == b"20"
    assert len(observers) == 1
    thermo.value = b"21"
    thermo.changed()
    [(data, peer)] = ep.datagrams_to_send()
    note = decode(data)
    assert peer == PEER and note.type == Type.NON and note.token == b"t1" and bytes(note.payload) == b"21"
    assert note.observe > first.observe  # increasing sequence numbers (§4.4)
    request(ep, router, Code.GET, "thermo", observe=1, mid=2)  # deregister (§3.6)
    assert len(observers) == 0
    thermo.changed()
    assert ep.datagrams_to_send() == []


def test_observations_follow_a_session_that_moved_and_end_where_another_began():
    """A DTLS session moved by its Connection ID (RFC 9146 §6) keeps its observations at its new
    address -- before, they stayed keyed on the old one and were lost once the endpoint's
    forwarding expired; and a new session at an address ends the observations made there (the
    wiring: corem/transports.py calls `moved` and `forget`)"""
    ep, router, observers, thermo, clock = stack(max_per_source=1)
    moved_to, other = ("192.0.2.5", 6000), ("198.51.100.9", 7000)
    request(ep, router, Code.GET, "thermo", observe=0)
    request(ep, router, Code.GET, "thermo", observe=0, token=b"o1", peer=other)
    ep.datagrams_to_send()
    assert observers.moved(PEER, moved_to) == 1 and observers.moved(("192.0.2.99", 1), moved_to) == 0
    thermo.changed()
    assert sorted(peer for _, peer in ep.datagrams_to_send()) == [moved_to, other]
    request(ep, router, Code.GET, "thermo", observe=1, mid=2, peer=moved_to)  # its deregistration, from there
    assert len(observers) == 1 and observers.stats.refused == 0
    assert observers.forget(other) == 1 and len(observers) == 0
    thermo.changed()
    assert ep.datagrams_to_send() == []


def test_a_deregistration_ends_the_observation_of_its_target_resource_only():
    """RFC 7641 §3.6: GET with Observe 1 removes the entry for the target resource; another
    resource's GET with Observe 1 and the same token (another device's, from the same address)
    ended it too (an adversarial run)"""
    ep, router, observers, thermo, clock = stack()
    request(ep, router, Code.GET, "thermo", observe=0)
    assert request(ep, router, Code.GET, "plain", observe=1, mid=2).code == Code.METHOD_NOT_ALLOWED
    answer_observe(observers, ep.receive(encode(Message(Type.CON, Code.GET, 3, b"t1", [(O.URI_PATH, b"other"),
                   (O.OBSERVE, b"\x01")])), PEER, 0.0), "other", Response(Code.CONTENT, b""), 0.0)
    assert len(observers) == 1
    request(ep, router, Code.GET, "thermo", observe=1, mid=4)
    assert len(observers) == 0


def test_one_device_holds_at_most_its_share_of_the_observers_from_any_address():
    """An adversarial run had one registered device take all 10,000 registrations from 313
    addresses (32 each: the per-source bound held), leaving every other device without Observe"""
    ep = Endpoint(Params(), rng=lambda: 0.0)
    observers = Observers(ep, max_per_owner=2)

    def observe(host, owner, token=b"t"):
        msg = Message(Type.CON, Code.GET, 1, token, [(O.URI_PATH, b"x"), (O.OBSERVE, b"")])
        req = ep.receive(encode(msg), (host, 5683), 0.0)
        answer = answer_observe(observers, req, "x", Response(Code.CONTENT, b"1"), 0.0, owner)
        return dict(answer.options or []).get(O.OBSERVE)

    mallory, victim = ("acme", "mallory"), ("acme", "victim")
    assert [observe(f"192.0.2.{n}", mallory) is not None for n in range(3)] == [True, True, False]
    assert observe("198.51.100.1", victim) is not None  # another device is served
    assert observers.deregister(("192.0.2.0", 5683), b"t")  # one of its own ends: its share has room again
    assert observe("192.0.2.9", mallory) is not None and observers.stats.refused == 1
    # a session that moves (RFC 9146) keeps its observation and its count: the share is still full
    assert observers.moved(("192.0.2.9", 5683), ("192.0.2.77", 5683)) == 1
    assert observe("192.0.2.10", mallory) is None and observers.stats.refused == 2


def test_a_plain_get_or_a_refused_registration_has_no_observe_option():
    ep, router, observers, thermo, clock = stack(max_per_source=1)
    assert request(ep, router, Code.GET, "thermo").observe is None  # no Observe asked
    assert request(ep, router, Code.GET, "thermo", observe=0, mid=2).observe is not None
    refused = request(ep, router, Code.GET, "thermo", observe=0, token=b"t2", mid=3)
    assert refused.code == Code.CONTENT and refused.observe is None  # bound: answered, not registered
    assert observers.stats.refused == 1 and len(observers) == 1
    assert request(ep, router, Code.GET, "plain", mid=4).code == Code.METHOD_NOT_ALLOWED
    assert request(ep, router, Code.POST, "plain", mid=5).code == Code.CREATED


def test_every_nth_notification_is_confirmable_and_rst_or_silence_end_the_observation():
    ep, router, observers, thermo, clock = stack(con_every=3)
    request(ep, router, Code.GET, "thermo", observe=0)
    types = []
    for _ in range(3):
        thermo.changed()
        [(data, _)] = ep.datagrams_to_send()
        types.append(decode(data).type)
    assert types == [Type.NON, Type.NON, Type.CON]
    con = decode(data)
    assert ep.receive(encode(Message(Type.RST, 0, con.mid)), PEER, 1.0) is None  # the client lost interest
    observers.handle(ep.next_event())
    assert len(observers) == 0 and observers.stats.lost == 1
    # a RST answering a NON notification ends it too
    request(ep, router, Code.GET, "thermo", observe=0, token=b"t3", mid=9)
    thermo.changed()
    [(data, _)] = ep.datagrams_to_send()
    ep.receive(encode(Message(Type.RST, 0, decode(data).mid)), PEER, 2.0)
    observers.handle(ep.next_event())  # a RST to a NON notification: a stray one, matched by observers
    assert len(observers) == 0
    # a confirmable notification nobody acknowledges ends it (§4.5)
    request(ep, router, Code.GET, "thermo", observe=0, token=b"t4", mid=10)
    for _ in range(3):
        thermo.changed()
    ep.datagrams_to_send()
    for t in range(1, 200):
        ep.tick(float(t))
        while (event := ep.next_event()) is not None:
            observers.handle(event)
    assert len(observers) == 0 and observers.stats.lost == 3


async def observe_with_libcoap(tmp_path, path: str, resource: Resource, change, seconds: int, watch=None):
    """A real corem serving `resource` at `path`, libcoap's client observing it for `seconds`
    while `change()` runs (from the moment the client is registered: on a busy machine that
    moment comes late); returns the client's output and the transport's observers.  `watch`:
    called with the server before it runs."""
    from corem.config import Settings
    from corem.server import Server

    server = Server(Settings.load({"data_dir": str(tmp_path / "d"), "coap": "127.0.0.1:0", "coaps": "off",
                                   "http": "off"}, env={}))
    server.site.add(path, resource)
    if watch is not None:
        watch(server)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        url = f"coap://127.0.0.1:{bound.coap[1]}/{path}"

        async def once_observed() -> None:
            with trio.fail_after(60):
                while not len(server.transports[0].observers):
                    await trio.sleep(0.02)
            await change()

        nursery.start_soon(once_observed)
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            [COAP_CLIENT, "-s", str(seconds), "-v", "6", url], capture_output=True, text=True, timeout=90))
        observers = server.transports[0].observers
        server.stop()
    return result.stdout + result.stderr, observers


@needs_libcoap
async def test_libcoap_observer_receives_every_change(tmp_path):
    thermo = Thermo()
    thermo.value = b"temp=20"  # (values no log time of the client's can contain)

    async def change():
        for v in (b"temp=31", b"temp=32", b"temp=33"):
            await trio.sleep(0.7)
            thermo.value = v
            thermo.changed()

    # (10 s: the changes come 0.7 s apart from the moment the client is registered, late on a busy machine)
    out, _ = await observe_with_libcoap(tmp_path, "sensors/thermo", thermo, change, 10)
    for v in ("temp=20", "temp=31", "temp=32", "temp=33"):  # the first answer, then one notification per change
        assert v in out, out
    assert "Observe" in out


class Gone(Thermo):
    """A resource that can be deleted (GET 4.04) and created again."""

    def __init__(self) -> None:
        super().__init__()
        self.exists = True

    def get(self, req):
        return Response(Code.CONTENT, self.value) if self.exists else Response(Code.NOT_FOUND, b"gone")


def test_a_resource_that_goes_away_ends_its_observations():
    """RFC 7641 §4.2: the non-2.xx notification carries no Observe option and removes the
    observer, so the resource created again notifies no one from before."""
    ep, router, observers, _thermo, _clock = stack()
    gone = Gone()
    site = Site(clock=lambda: 0.0)
    site.mount(router, observers)
    site.add("gone", gone)
    request(ep, router, Code.GET, "gone", observe=0)
    assert len(observers) == 1
    gone.exists = False
    gone.changed()
    [(data, _)] = ep.datagrams_to_send()
    note = decode(data)
    assert note.code == Code.NOT_FOUND and note.opt(O.OBSERVE) is None and len(observers) == 0
    gone.exists = True
    gone.changed()
    assert ep.datagrams_to_send() == []


def test_a_state_larger_than_a_block_is_notified_block_wise():
    """RFC 7959 §2.6: the notification is the first block (Block2 0/M, ETag, Size2) with its
    Observe number; the observer GETs the rest, which the resource renders again."""
    ep, router, observers, thermo, _clock = stack()
    request(ep, router, Code.GET, "thermo", observe=0)
    thermo.value = bytes(range(256)) * 10 + b"END"  # 2,563 bytes
    thermo.changed()
    [(data, _)] = ep.datagrams_to_send()
    note = decode(data)
    assert note.opt(O.OBSERVE) is not None and note.block2.num == 0 and note.block2.more and note.block2.szx == 6
    assert len(note.payload) == 1024 and note.size2 == len(thermo.value) and note.opt(O.ETAG) is not None
    assert len(data) < 1100
    opts = sorted([(O.URI_PATH, b"thermo"), (O.BLOCK2, bytes([0x26]))])  # num 2, szx 6
    last = exchange(ep, router, Message(Type.CON, Code.GET, 7, b"t9", opts), PEER)
    # (on plain UDP a block of the site's is cut to fit 3 times its request: the offset asked for)
    assert last.block2.offset == 2048 and last.opt(O.ETAG) == note.opt(O.ETAG)
    assert bytes(last.payload) == thermo.value[2048 : 2048 + last.block2.size]


@needs_libcoap
async def test_libcoap_follows_a_large_state_block_wise_and_learns_when_it_is_gone(tmp_path):
    served: list[int] = []  # the later blocks of a notification the client fetched (from what it notified)
    ended: list[bytes] = []  # the answer that carried the changed state's last block

    def watch(server):
        kept = server.transports[0].router.representations
        recall = kept.recall

        def counted(key, now):
            found = recall(key, now)
            if found is not None:
                served.append(len(served) + 1)
            return found

        kept.recall = counted
        # (on plain UDP the blocks after a notification are cut to fit 3 times their request: how
        # many the client asks for depends on its request's size, so the test waits for the last)
        endpoint = server.transports[0].endpoint
        send = endpoint.send

        def sent(data, peer, code):
            if data.endswith(b"E-END"):
                ended.append(data)
            send(data, peer, code)

        endpoint.send = sent

    big = Gone()

    async def change():
        await trio.sleep(0.7)
        big.value = b"x" * 2500 + b"-FIRST-CHANGE-END"
        big.changed()
        with trio.fail_after(30):  # the client fetches the blocks after the first (waited on, not timed)
            while not (ended and served):
                await trio.sleep(0.02)
        big.exists = False
        big.changed()
        await trio.sleep(0.3)
        big.exists = True  # created again: the gone observer hears nothing more
        big.value = b"AFTER"
        big.changed()

    # (the client observes 15 s: the change, its blocks, the 4.04 and the re-creation all in them on a busy machine)
    out, observers = await observe_with_libcoap(tmp_path, "big", big, change, 15, watch)
    assert "-FIRST-CHANGE-END" in out, out  # libcoap fetched the blocks after the first
    assert "Block2" in out and "c:4.04" in out, out  # (the code as -v 6 prints it, not a log time)
    assert "AFTER" not in out and len(observers) == 0
