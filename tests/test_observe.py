"""Observe (RFC 7641) and the user resource API: sans-IO with a clock, then a real libcoap observer."""

from __future__ import annotations

import random
import subprocess
from functools import partial
from types import SimpleNamespace

import trio

from corem.codec import Block, Code, Message, OptionNumber as O, Type, decode, encode, encode_uint
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


def stack(verified=False, keep=False, **obs):
    """Plain CoAP (an address nothing verified), or `verified`: as behind DTLS or TCP; `keep`: a
    notification's later blocks are kept for its observer (as the server wires it)."""
    clock = [0.0]
    ep = Endpoint(Params(limit_error_size=not verified), rng=lambda: 0.0)
    router = Router()
    observers = Observers(ep, representations=router.representations if keep else None, **obs)
    site = Site(clock=lambda: clock[0])
    site.mount(router, observers)
    thermo = Thermo()
    site.add("thermo", thermo)
    site.add("plain", Plain())
    return ep, router, observers, thermo, clock


def request(ep, router, code, path, token=b"t1", mid=1, observe=None, payload=b"", peer=PEER):
    opts = [(O.URI_PATH, path.encode())] + ([(O.OBSERVE, bytes([observe]) if observe else b"")] if observe is not None else [])
    return exchange(ep, router, Message(Type.CON, code, mid, token, sorted(opts), payload), peer)


def acknowledge(ep, observers, sent, now=1.0):
    """The observer acknowledges the confirmable ones of `sent` (datagrams to it), as a genuine one
    at that address does; returns them decoded."""
    notes = [decode(data) for data, _ in sent]
    for note, (_, peer) in zip(notes, sent):
        if note.type == Type.CON:
            assert ep.receive(encode(Message(Type.ACK, 0, note.mid)), peer, now) is None
    while (event := ep.next_event()) is not None:
        observers.handle(event)
    return notes


def test_register_notify_and_deregister():
    ep, router, observers, thermo, clock = stack()
    first = request(ep, router, Code.GET, "thermo", observe=0)
    assert first.code == Code.CONTENT and first.observe is not None and bytes(first.payload) == b"20"
    assert len(observers) == 1
    thermo.value = b"21"
    thermo.changed()
    [(data, peer)] = sent = ep.datagrams_to_send()
    note = decode(data)
    # (plain CoAP: confirmable until the observer's ACK shows its address receives what is sent there)
    assert peer == PEER and note.type == Type.CON and note.token == b"t1" and bytes(note.payload) == b"21"
    assert note.observe > first.observe  # increasing sequence numbers (§4.4)
    acknowledge(ep, observers, sent)
    thermo.value = b"22"
    thermo.changed()
    [(data, peer)] = ep.datagrams_to_send()
    later = decode(data)
    assert peer == PEER and later.type == Type.NON and bytes(later.payload) == b"22"
    assert later.observe > note.observe
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
    ep, router, observers, thermo, clock = stack(verified=True, con_every=3)
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


def test_a_forged_registration_costs_its_victim_a_few_bounded_datagrams_then_nothing():
    """Plain UDP cannot tell a forged source: a GET with Observe from the victim's address
    registered the victim, and every later state went to it whole -- one 20-byte request bought a
    stream of 600-byte notifications for as long as the resource changed.  Until an observer's
    address acknowledges a confirmable notification each one is confirmable, within 3 times the
    registering request, and only one is in flight; unacknowledged, it ends the observation."""
    from corem.coap.endpoint import AMPLIFICATION_FACTOR

    ep, router, observers, thermo, clock = stack()
    victim = ("203.0.113.7", 5683)
    thermo.value = b"v" * 600
    msg = Message(Type.CON, Code.GET, 1, b"t1", [(O.URI_PATH, b"thermo"), (O.OBSERVE, b"")])
    exchange(ep, router, msg, victim)  # (its answer: the site's, bounded by the endpoint as before)
    assert len(observers) == 1
    bound = AMPLIFICATION_FACTOR * len(encode(msg))
    sent = []
    for t in range(1, 300):  # the state changes every second; the victim never answers
        clock[0] = float(t)
        ep.tick(float(t))
        while (event := ep.next_event()) is not None:
            observers.handle(event)
        thermo.value = b"%03d" % t + b"v" * 597
        thermo.changed()
        sent += [(t, data) for data, peer in ep.datagrams_to_send() if peer == victim]
    assert all(len(data) <= bound for _, data in sent), [len(data) for _, data in sent]
    assert {decode(data).type for _, data in sent} == {Type.CON}
    # one notification, retransmitted MAX_RETRANSMIT times (2 + 4 + 8 + 16 s apart), then nothing more
    assert len(sent) == 1 + ep.params.max_retransmit and len({decode(data).mid for _, data in sent}) == 1
    assert sent[-1][0] < 60 and len(observers) == 0 and observers.stats.lost == 1


def test_a_genuine_observer_on_plain_udp_gets_whole_notifications_once_it_acknowledges_one():
    """Its first notification is a block within 3 times its request (the rest kept for its Block2
    GETs); the states that come before it acknowledges wait, then follow whole; from then on
    notifications are whole and non-confirmable, as behind DTLS."""
    from corem.coap.endpoint import AMPLIFICATION_FACTOR

    ep, router, observers, thermo, clock = stack(keep=True)
    msg = Message(Type.CON, Code.GET, 1, b"t1", [(O.URI_PATH, b"thermo"), (O.OBSERVE, b"")])
    exchange(ep, router, msg, PEER)
    bound = AMPLIFICATION_FACTOR * len(encode(msg))
    states = [bytes([65 + n]) * 600 for n in range(4)]  # AAA..., BBB..., CCC..., DDD...
    thermo.value = states[0]
    thermo.changed()
    [(data, peer)] = sent = ep.datagrams_to_send()
    first = decode(data)
    assert peer == PEER and first.type == Type.CON and len(data) <= bound
    assert first.block2.num == 0 and first.block2.more and first.size2 == 600 and first.observe is not None
    for state in states[1:3]:  # before its ACK: nothing more goes to that address
        thermo.value = state
        thermo.changed()
    assert ep.datagrams_to_send() == [] and observers.stats.held == 2
    # the rest of the first state is read block-wise, from what was notified (not the state now)
    got, num = bytes(first.payload), 1
    while True:
        asked = encode_uint(Block(num, False, first.block2.szx).to_uint())
        opts = sorted([(O.URI_PATH, b"thermo"), (O.BLOCK2, asked)])
        part = exchange(ep, router, Message(Type.CON, Code.GET, 10 + num, b"b", opts), PEER)
        assert part.etag == first.etag and part.block2.offset == len(got)
        got += bytes(part.payload)
        num = len(got) // part.block2.size
        if not part.block2.more:
            break
    assert got == states[0]
    # it acknowledges: what waited follows, whole, in order; then each new state, whole
    notes = acknowledge(ep, observers, sent)
    assert notes == [first] and ep.outstanding == 0
    thermo.value = states[3]
    thermo.changed()
    later = [decode(data) for data, _ in ep.datagrams_to_send()]
    assert [bytes(m.payload) for m in later] == states[1:]
    assert all(m.type == Type.NON and m.block2 is None for m in later)
    assert first.observe < later[0].observe < later[1].observe < later[2].observe


def test_an_ack_forged_with_the_next_message_id_does_not_verify_a_victim(monkeypatch):
    """Found in review: message IDs followed one another, so an attacker who observed too knew the
    one in flight to a victim he had registered (his own + 1) and verified the victim with an ACK
    forged from its address -- whole notifications from then on.  A plain-UDP observer's
    confirmable notifications now carry an ID drawn at random: the guess proves nothing, the
    victim stays bounded and, never answering, is dropped."""
    draws = iter([b"\x11\x22", b"\x9c\x41", *[b"\x55\x66"] * 100])  # (the draws, fixed: see below)
    monkeypatch.setattr("os.urandom", lambda n: (next(draws) * n)[:n])
    ep, router, observers, thermo, clock = stack()
    attacker, victim = ("198.51.100.9", 5683), ("203.0.113.7", 5683)
    thermo.value = b"v" * 600
    for who, token in ((attacker, b"a1"), (victim, b"v1")):
        msg = Message(Type.CON, Code.GET, 1, token, [(O.URI_PATH, b"thermo"), (O.OBSERVE, b"")])
        exchange(ep, router, msg, who)
    thermo.changed()
    sent = ep.datagrams_to_send()
    [mine] = [decode(d) for d, p in sent if p == attacker]
    [theirs] = [decode(d) for d, p in sent if p == victim]
    # (the victim's: 0x9C41 is just behind the counter, near 0 -- refused -- so the next draw)
    assert mine.mid == 0x1122 and theirs.mid == 0x5566
    acknowledge(ep, observers, [(d, p) for d, p in sent if p == attacker])  # (the attacker's own)
    for guess in (mine.mid, (mine.mid + 1) & 0xFFFF):  # forged from the victim's address: its own ID, and + 1
        assert ep.receive(encode(Message(Type.ACK, 0, guess)), victim, 1.0) is None
    while (event := ep.next_event()) is not None:
        observers.handle(event)
    [obs] = [o for (p, _), o in observers._by_key.items() if p == victim]
    assert not obs.verified and obs.in_flight
    thermo.value = b"w" * 600
    thermo.changed()
    assert [p for _, p in ep.datagrams_to_send()] == [attacker]  # (nothing more to the victim: it waits)


def test_a_message_id_already_awaiting_its_ack_is_refused_and_the_counter_passes_it_by():
    """Found in review: a sequential ID (`next_mid`) equal to a random one still awaiting its ACK
    replaced that entry, and the first one's give-up then raised KeyError in `tick` (the
    transport's task ended).  Such a pair is refused (as when too many await their ACK), and the
    endpoint's own sequential ones pass it by (corem/coap/message_ids.py); the first goes on and
    gives up as it would."""
    ep = Endpoint(Params(), rng=lambda: 0.0)
    mid = ep.unpredictable_mid()
    assert ep.send_confirmable(b"first", PEER, mid, b"t", "first", 0x45)
    assert not ep.send_confirmable(b"second", PEER, mid, b"u", "second", 0x45)
    assert ep.stats.outstanding_refused == 1
    ep.mids._mid = (mid - 1) & 0xFFFF  # (the counter come round to it)
    assert ep.next_mid() == (mid + 1) & 0xFFFF
    for t in range(1, 200):
        ep.tick(float(t))
    events = []
    while (event := ep.next_event()) is not None:
        events.append(event)
    assert [type(e).__name__ for e in events] == ["GaveUp"] and events[0].context == "first"


def test_a_random_message_id_is_never_one_of_the_recent_non_notifications_to_that_observer(monkeypatch):
    """RFC 7252 §4.4: an ID is not used again with an endpoint within EXCHANGE_LIFETIME.  Found in
    review: drawn at random, a confirmable notification's ID could be a recent NON's, and a client
    that deduplicates would drop it.  A draw that is one is drawn again."""
    draws = [b"\x12\x34"]
    monkeypatch.setattr("os.urandom", lambda n: draws.pop(0)[:n] if draws else b"\x77\x77"[:n])
    ep, router, observers, thermo, clock = stack(con_every=3)
    msg = Message(Type.CON, Code.GET, 1, b"t1", [(O.URI_PATH, b"thermo"), (O.OBSERVE, b"")])
    exchange(ep, router, msg, PEER)
    thermo.changed()
    [first] = acknowledge(ep, observers, ep.datagrams_to_send())  # (verified: NONs from now on)
    assert first.type == Type.CON and first.mid == 0x1234
    thermo.changed()  # (its 2nd: NON; the 3rd is confirmable)
    [non] = [decode(d) for d, _ in ep.datagrams_to_send()]
    assert non.type == Type.NON
    draws[:] = [non.mid.to_bytes(2, "big"), b"\x56\x78"]  # (the next draw: that NON's ID, then another)
    thermo.changed()
    [con] = [decode(d) for d, _ in ep.datagrams_to_send()]
    assert con.type == Type.CON and con.mid == 0x5678


def test_an_old_notifications_give_up_does_not_end_a_newer_registration_with_its_token():
    """Found in review: a confirmable notification's give-up named its observation by address and
    token only, so after the client registered again with the same token the old one's give-up
    ended the new registration.  It ends the observation it was sent for, if that is still there."""
    ep, router, observers, thermo, clock = stack()
    msg = Message(Type.CON, Code.GET, 1, b"t1", [(O.URI_PATH, b"thermo"), (O.OBSERVE, b"")])
    exchange(ep, router, msg, PEER)
    thermo.changed()
    [(data, _)] = ep.datagrams_to_send()
    assert decode(data).type == Type.CON  # (in flight, never acknowledged)
    again = Message(Type.CON, Code.GET, 2, b"t1", [(O.URI_PATH, b"thermo"), (O.OBSERVE, b"")])
    exchange(ep, router, again, PEER)  # the client registers again, with the same token
    for t in range(1, 200):  # the old notification's retransmissions run out
        ep.tick(float(t))
        while (event := ep.next_event()) is not None:
            observers.handle(event)
    assert ep.stats.gave_up == 1 and len(observers) == 1 and observers.stats.lost == 0


def test_past_max_held_the_oldest_waiting_state_gives_way():
    """Found in review: past `max_held` waiting states the newest were dropped, and once the
    observer acknowledged it was left eight states behind the resource's.  The oldest gives way:
    the last state it is sent is the resource's latest."""
    ep, router, observers, thermo, clock = stack(max_held=3)
    msg = Message(Type.CON, Code.GET, 1, b"t1", [(O.URI_PATH, b"thermo"), (O.OBSERVE, b"")])
    exchange(ep, router, msg, PEER)
    thermo.value = b"s00"
    thermo.changed()
    sent = ep.datagrams_to_send()
    for n in range(1, 12):  # eleven more states before its ACK
        thermo.value = b"s%02d" % n
        thermo.changed()
    assert ep.datagrams_to_send() == [] and observers.stats.held == 11 and observers.stats.held_dropped == 8
    acknowledge(ep, observers, sent)
    got = [bytes(decode(d).payload) for d, _ in ep.datagrams_to_send()]
    assert got == [b"s09", b"s10", b"s11"]


def test_an_unverified_observer_no_block_fits_for_is_told_401_and_ends():
    """A registration so small that not even a 16-byte block of a notification fits 3 times it:
    one bare 4.01 (no larger than the request), and the observation ends (RFC 9175 §2.4)."""
    ep, router, observers, thermo, clock = stack()
    msg = Message(Type.CON, Code.GET, 1, b"", [(O.URI_PATH, b"thermo"), (O.OBSERVE, b"")])
    exchange(ep, router, msg)
    assert len(observers) == 1
    thermo.value = b"x" * 100
    thermo.changed()
    [(data, _)] = ep.datagrams_to_send()
    told = decode(data)
    assert told.code == Code.UNAUTHORIZED and told.observe is None and len(data) <= len(encode(msg))
    assert len(observers) == 0
    thermo.changed()
    assert ep.datagrams_to_send() == []


def test_unverified_observers_take_half_the_messages_awaiting_ack_at_most():
    """Forged registrations cost nothing to make: their confirmable notifications may not fill the
    endpoint's table of messages awaiting ACK, which separate answers to readings need too."""
    ep = Endpoint(Params(max_outstanding=4), rng=lambda: 0.0)
    observers = Observers(ep)
    for n in range(3):
        msg = Message(Type.CON, Code.GET, 1, b"t", [(O.URI_PATH, b"x"), (O.OBSERVE, b"")])
        answer_observe(observers, ep.receive(encode(msg), (f"203.0.113.{n}", 5683), 0.0), "x",
                       Response(Code.CONTENT, b"1"), 0.0)
    ep.datagrams_to_send()
    assert observers.notify("x", Code.CONTENT, None, b"2", 0.0) == 2 and ep.outstanding == 2
    assert len(ep.datagrams_to_send()) == 2 and ep.send_confirmable(b"separate", PEER, 7, b"") is True


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
    thermo.changed()
    acknowledge(ep, observers, ep.datagrams_to_send())  # (plain CoAP: whole blocks once it acknowledged one)
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
        # (the end in one block of any size: on plain UDP the first notification and the blocks
        # after it are cut to fit 3 times their request, as small as 16 bytes)
        big.value = b"x" * 2496 + b"FIRST-CHANGE-END"
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
    assert "FIRST-CHANGE-END" in out, out  # libcoap fetched the blocks after the first
    assert "Block2" in out and "c:4.04" in out, out  # (the code as -v 6 prints it, not a log time)
    assert "AFTER" not in out and len(observers) == 0


class _Unwalked(dict):
    """The table of every observation, asked by key but never walked."""

    def _walked(self, *args, **kwargs):
        raise AssertionError("every observation was walked")

    __iter__ = values = items = keys = _walked


class Fleet:
    """Devices' registrations as `revoke` reads them (`current`), with a count of what it read:
    each owner asked, each grant read off a registration."""

    def __init__(self) -> None:
        self.devices: dict[tuple[str, str], dict] = {}
        self.asked: list[tuple[str, str]] = []
        self.reads = 0

    def current(self, owner):
        self.asked.append(owner)
        return self.devices.get(owner)

    def token(self, device: dict) -> str:
        self.reads += 1
        return device["token"]


def observe_as(observers: Observers, fleet: Fleet, owner, host: str, token: bytes, resource: str,
               granted: bool = True) -> None:
    """A door's registration for `owner` (None: no device named), granted on its token."""
    req = SimpleNamespace(peer=(host, 5683), token=token, protect=None, message=None, size=16)
    grant = (fleet.token, fleet.devices[owner]["token"]) if owner is not None and granted else None
    assert observers.register(req, resource, 0.0, owner, grant) is not None


def revoke_by_walk(observers: Observers, current, owners) -> int:
    """`Observers.revoke` as it was: a walk over every observation, whichever owners are named (the
    reference the indexed one must agree with)."""
    asked = None if owners is None else set(owners)
    now: dict = {}
    ended = 0
    for key, obs in list(observers._by_key.items()):
        if obs.owner is None or (asked is not None and obs.owner not in asked):
            continue
        if obs.owner not in now:
            now[obs.owner] = current(obs.owner)
        if obs.granted(now[obs.owner]):
            continue
        observers._tell_revoked(obs)
        observers._remove(key)
        ended += 1
    observers.stats.revoked += ended
    return ended


def test_revoking_named_devices_reads_their_own_observations_only():
    """A registry change of one device among 2,000 (6,000 observations, and some no device made)
    reads that device's observations and asks for that device only: `revoke` walked every
    observation at each change, whichever devices were named.  Counted, not timed: the table of
    every observation may be asked by key but not walked, and the grants read are the device's."""
    ep = Endpoint(Params(), rng=lambda: 0.0)
    observers = Observers(ep, max_total=1 << 20, max_per_resource=1 << 20, max_per_source=1 << 20)
    fleet = Fleet()
    for i in range(2000):
        owner = ("acme", f"d{i}")
        fleet.devices[owner] = {"token": f"T{i}"}
        for n, resource in enumerate(("attributes", "rpc", "ps/alerts")):
            observe_as(observers, fleet, owner, f"10.{i // 250}.{i % 250}.{n}", b"t%d" % n, f"{resource}:{i}")
    for n in range(50):
        observe_as(observers, fleet, None, f"192.0.2.{n}", b"anon", "thermo")
    assert len(observers) == 6050
    ep.datagrams_to_send()
    observers._by_key = _Unwalked(observers._by_key)

    fleet.devices["acme", "d7"] = {"token": "T7-rotated"}  # its credential rotated
    assert observers.revoke(fleet.current, [("acme", "d7"), ("acme", "d7"), ("acme", "never-seen")]) == 3
    assert fleet.asked == [("acme", "d7")] and fleet.reads == 3
    told = sorted((peer, decode(data).token, decode(data).code) for data, peer in ep.datagrams_to_send())
    assert told == [((f"10.0.7.{n}", 5683), b"t%d" % n, Code.UNAUTHORIZED) for n in range(3)]
    fleet.asked, fleet.reads = [], 0
    assert observers.revoke(fleet.current, [("acme", "d8")]) == 0  # unchanged: its observations stay
    assert fleet.asked == [("acme", "d8")] and fleet.reads == 3 and ep.datagrams_to_send() == []
    del fleet.devices["acme", "d9"]  # removed: ended without a grant read
    fleet.asked, fleet.reads = [], 0
    assert observers.revoke(fleet.current, {("acme", "d9")}) == 3 and fleet.reads == 0
    assert observers.revoke(fleet.current, [("acme", "d7")]) == 0 and fleet.asked == [("acme", "d9")]
    assert len(dict.keys(observers._by_key)) == 6044 and observers.stats.revoked == 6
    assert ("acme", "d7") not in observers._per_owner and len(observers._per_owner[("acme", "d8")]) == 3


def test_revoking_ends_what_the_walk_over_every_observation_ended():
    """The same observations end, each observer told alike, as with the walk `revoke` was, for
    named devices and for any (None): random fleets, registrations with and without a grant or a
    device, sessions that moved, credentials rotated, devices removed and added again.  The index
    by owner stays each owner's observations, in the order made, and holds no owner without one."""
    rng = random.Random(7)
    for _ in range(40):
        sides = []
        for _side in range(2):
            ep = Endpoint(Params(), rng=lambda: 0.0)
            unbounded = dict.fromkeys(("max_total", "max_per_resource", "max_per_source", "max_per_owner"),
                                      1 << 20)
            sides.append((ep, Observers(ep, **unbounded), Fleet()))
        owners = [("acme", f"d{i}") for i in range(rng.randint(1, 12))]
        plan = [(rng.choice([*owners, None]), f"198.51.100.{rng.randrange(20)}", bytes([rng.randrange(4)]),
                 rng.choice(("a", "b", "c")), rng.random() < 0.8) for _ in range(rng.randint(0, 60))]
        moves = [(f"198.51.100.{rng.randrange(20)}", f"198.51.100.{rng.randrange(20)}") for _ in range(3)]
        for _round in range(4):
            changes = {o: rng.choice(("same", "rotated", "gone")) for o in owners}
            pool = [*owners, ("acme", "ghost")]
            named = None if rng.random() < 0.3 else rng.sample(pool, rng.randint(0, min(4, len(pool))))
            results = []
            for side, (ep, observers, fleet) in enumerate(sides):
                for o in owners:
                    fleet.devices.setdefault(o, {"token": f"T-{o[1]}"})
                for owner, host, token, resource, granted in plan:
                    observe_as(observers, fleet, owner, host, token, resource, granted)
                for old, new in moves:
                    observers.moved((old, 5683), (new, 5683))
                ep.datagrams_to_send()
                for o, change in changes.items():
                    if change == "rotated":
                        fleet.devices[o] = {"token": fleet.devices[o]["token"] + "'"}
                    elif change == "gone":
                        fleet.devices.pop(o, None)
                revoke = observers.revoke if side else partial(revoke_by_walk, observers)
                ended = revoke(fleet.current, named)
                told = [(peer, m.token, m.code, bytes(m.payload)) for m, peer in
                        ((decode(data), peer) for data, peer in ep.datagrams_to_send())]
                results.append((ended, sorted(told), list(observers._by_key), observers.stats,
                                sorted(fleet.asked)))
                by_owner: dict = {}
                for key, obs in observers._by_key.items():
                    if obs.owner is not None:
                        by_owner.setdefault(obs.owner, []).append(key)
                assert {o: list(keys) for o, keys in observers._per_owner.items()} == by_owner
                fleet.asked = []
            assert results[0] == results[1]
