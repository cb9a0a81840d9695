"""Downlink and the front doors, sans-IO: a real registry (SQLite), message layer and observers,
driven with an explicit clock; the sink is a list (the bus has its own tests)."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest

from corem.codec import Code, Message, OptionNumber as O, Type, decode, encode, encode_uint
from corem.coap import Endpoint, Params, Router
from corem.coap.observe import Observers
from corem.devices.downlink import Downlink
from corem.errors import BadInput, ClaimRefused, QueueFull
from corem.frontdoors.drogue import Drogue
from corem.frontdoors.emqx import Emqx, Heaviest, topic_matches
from corem.frontdoors.thingsboard import ThingsBoard
from corem.ingest.diagnostics import Diagnostics
from corem.ingest.telemetry import TelemetryIngest
from corem.registry import Directory, Registry
from corem.registry.management import Management

PEER = ("192.0.2.7", 40000)


class ListSink:
    """Takes every record at once and commits it when told (`commit()`)."""

    def __init__(self) -> None:
        self.records, self._waiting = [], []
        self.full = False  # True: refuses everything, as a full or failing bus does

    def submit(self, record, done, ctx=None) -> bool:
        if self.full:
            return False
        self.records.append(record)
        self._waiting.append((done, ctx))
        return True

    def commit(self) -> None:
        waiting, self._waiting = self._waiting, []
        for done, ctx in waiting:
            done(ctx, None)

    def topics(self, prefix: str) -> list[dict]:
        return [json.loads(r.value) for r in self.records if r.topic.startswith(prefix)]


class Stack:
    def __init__(self, tmp_path, **downlink) -> None:
        self.now = 0.0
        self.registry = Registry(tmp_path / "registry.db")
        self.registry.add_device("acme", "awake", token="TA")
        self.registry.add_device("acme", "sleepy", token="TS", power_mode="psm", gateways="awake")
        self.registry.add_device("acme", "roomy", token="TR", topics="room/#")
        self.directory = Directory(self.registry)
        self.directory.refresh()
        self.sink = ListSink()
        self.management = Management(self.registry)
        clock = lambda: self.now  # noqa: E731
        self.ingest = TelemetryIngest(self.directory, self.sink, Diagnostics(), now=clock)
        self.downlink = Downlink(self.management, self.sink, psm_activity_timer=10.0, clock=clock, **downlink)
        self.ingest.on_uplink = self.downlink.uplink
        self.endpoint = Endpoint(Params(), rng=lambda: 0.0)
        self.router = Router()
        self.observers = Observers(self.endpoint, representations=self.router.representations)
        self.downlink.watch(self.observers)
        self.ingest.install(self.router)
        ThingsBoard(self.directory, self.ingest, self.management, self.downlink, clock).install(self.router, self.observers)
        Drogue(self.directory, self.ingest, self.downlink, clock).install(self.router)
        self.emqx = Emqx(self.directory, self.ingest, self.downlink, clock)
        self.emqx.install(self.router, self.observers)
        self.mid = 0

    def device(self, name: str):
        return self.directory.named("acme", name)

    def send(self, code, path, *, query=(), payload=b"", observe=None, token=b"tk", opts=(), cf=None, peer=PEER):
        """One request; returns the messages sent in reply (answer first) as decoded Messages."""
        self.mid += 1
        options = [(O.URI_PATH, p.encode()) for p in path.strip("/").split("/")]
        options += [(O.URI_QUERY, q.encode()) for q in query]
        if observe is not None:
            options.append((O.OBSERVE, encode_uint(observe)))
        if cf is not None:
            options.append((O.CONTENT_FORMAT, encode_uint(cf)))
        options += list(opts)
        msg = Message(Type.CON, code, self.mid, token, sorted(options, key=lambda o: o[0]), payload)
        req = self.endpoint.receive(encode(msg), peer, self.now)
        r = self.router.dispatch(req)
        if r is not None:
            req.respond(r.code, r.options, r.payload)
        return self.outbox()

    def outbox(self) -> list[Message]:
        return [decode(d) for d, _ in self.endpoint.datagrams_to_send()]

    def tick(self, now: float) -> list[Message]:
        self.now = now
        self.downlink.tick(now)
        self.endpoint.tick(now)
        return self.outbox()


@pytest.fixture
def stack(tmp_path):
    return Stack(tmp_path)


def test_shared_attribute_change_reaches_an_observing_device(stack):
    [answer] = stack.send(Code.GET, "api/v1/TA/attributes", observe=0)
    assert answer.code == Code.CONTENT and json.loads(bytes(answer.payload)) == {}
    assert stack.downlink.set_shared(stack.device("awake"), {"mode": "eco"}) == "delivered"
    [note] = stack.outbox()
    assert note.token == b"tk" and note.observe is not None and json.loads(bytes(note.payload)) == {"mode": "eco"}
    # a later registration answers with the whole state
    [again] = stack.send(Code.GET, "api/v1/TA/attributes", observe=0, token=b"t2")
    assert json.loads(bytes(again.payload)) == {"mode": "eco"}


def test_updates_for_a_sleeping_device_are_merged_and_delivered_once_when_it_wakes(stack):
    sleepy = stack.device("sleepy")
    stack.send(Code.GET, "api/v1/TS/attributes", observe=0)  # registered while awake
    stack.tick(20.0)  # past psm_activity_timer: asleep
    assert stack.downlink.set_shared(sleepy, {"a": 1, "c": "x"}) == "queued"
    assert stack.downlink.set_shared(sleepy, {"a": 2, "b": 3}) == "queued"
    assert stack.outbox() == [] and stack.tick(21.0) == []
    # it wakes: it sends a reading; the reading's 2.04 first, then one merged notification
    stack.send(Code.POST, "api/v1/TS/telemetry", payload=b'{"t": 1}', cf=50)
    stack.sink.commit()
    [ack] = stack.outbox()
    assert ack.code == Code.CHANGED
    [note] = stack.tick(21.1)
    assert json.loads(bytes(note.payload)) == {"a": 2, "c": "x", "b": 3}
    assert stack.tick(22.0) == []  # only once
    assert stack.management.attributes("acme", "sleepy", "shared") == {"a": 2, "c": "x", "b": 3}


def test_rpc_waits_for_an_observer_and_its_reply_comes_back(stack):
    awake = stack.device("awake")
    call = stack.downlink.send_rpc(awake, "reboot", {"delay": 5}, timeout=30)
    assert call.status == "queued"
    [answer] = stack.send(Code.GET, "api/v1/TA/rpc", observe=0)
    assert answer.code == Code.CONTENT and answer.observe is not None
    [note] = stack.tick(0.1)
    assert json.loads(bytes(note.payload)) == {"id": call.id, "method": "reboot", "params": {"delay": 5}}
    assert call.status == "delivered"
    [reply] = stack.send(Code.POST, f"api/v1/TA/rpc/{call.id}", payload=b'{"ok": true}', cf=50)
    assert reply.code == Code.CHANGED and call.status == "replied" and call.response == {"ok": True}
    assert call.done.is_set()
    [again] = stack.send(Code.POST, f"api/v1/TA/rpc/{call.id}", payload=b"{}", cf=50)
    assert again.code == Code.NOT_FOUND
    statuses = [r["status"] for r in stack.sink.topics("commands.results.acme")]
    assert statuses == ["delivered", "replied"]


def test_a_reply_to_an_rpc_not_yet_delivered_ends_it_and_it_is_never_delivered(tmp_path):
    """A device may answer a call before it was delivered to it (it polled or guessed the id, or its
    reply overtook the notification).  The reply ends the call, as ThingsBoard's does: "replied" is
    published once, the call leaves the queue (its place is free again) and is never delivered --
    it was, afterwards, and "delivered" was published after "replied".  One-way calls alike."""
    stack = Stack(tmp_path, max_queued=2)
    dl, awake = stack.downlink, stack.device("awake")
    call = dl.send_rpc(awake, "reboot", None, timeout=30)  # nobody observes: it waits in the queue
    oneway = dl.send_rpc(awake, "blink", None, timeout=30, oneway=True)
    assert call.status == oneway.status == "queued" and dl.queued(awake)["rpc"] == 2
    [reply] = stack.send(Code.POST, f"api/v1/TA/rpc/{call.id}", payload=b'{"ok": true}', cf=50)
    assert reply.code == Code.CHANGED and call.status == "replied" and call.response == {"ok": True}
    assert call.done.is_set() and dl.queued(awake)["rpc"] == 1
    assert dl.reply(awake, oneway.id, "done") and oneway.status == "replied" and oneway.done.is_set()
    assert dl.queued(awake)["rpc"] == 0 and dl._rpcs == {} and dl._device_rpcs == {}
    [again] = stack.send(Code.POST, f"api/v1/TA/rpc/{call.id}", payload=b"{}", cf=50)
    assert again.code == Code.NOT_FOUND  # ended once
    later = dl.send_rpc(awake, "later", None, timeout=30)  # the queue's places are free again
    last = dl.send_rpc(awake, "last", None, timeout=30)
    # the device observes its RPCs: only what it did not answer reaches it
    [answer] = stack.send(Code.GET, "api/v1/TA/rpc", observe=0)
    assert answer.code == Code.CONTENT
    # (one at a time until the device acknowledges one: plain UDP's unverified address, observe.py)
    [first] = stack.tick(0.1)
    assert first.type == Type.CON
    assert stack.endpoint.receive(encode(Message(Type.ACK, 0, first.mid)), PEER, stack.now) is None
    while (event := stack.endpoint.next_event()) is not None:  # (as the edge hands them on)
        stack.observers.handle(event)
    notes = [first, *stack.tick(0.2)]
    assert [json.loads(bytes(n.payload))["method"] for n in notes] == ["later", "last"]
    assert call.status == oneway.status == "replied" and later.status == "delivered"
    results = [(r["id"], r["status"]) for r in stack.sink.topics("commands.results.acme")]
    assert results == [(call.id, "replied"), (oneway.id, "replied"), (later.id, "delivered"),
                       (last.id, "delivered")]
    assert dl.stats.rpc_replied == 2 and dl.stats.rpc_sent == 2
    assert list(dl._device_rpcs[("acme", "awake")]) == list(dl._rpcs) == [later.id, last.id]
    stack.tick(40.0)  # their deadlines: nothing in flight, nothing indexed, nothing queued
    assert dl._rpcs == {} and dl._device_rpcs == {} and dl.queued(awake)["rpc"] == 0


def test_rpcs_to_an_observer_at_an_unverified_address_wait_in_the_queue_and_none_is_lost(tmp_path):
    """On plain UDP one notification is in flight until the observer acknowledges it.  RPCs are
    messages, not states: none waits inside the observation, where a newer one could push it out
    after it was counted delivered (found in review); they stay queued, "queued", and go once the
    ACK came -- every one, in order."""
    stack = Stack(tmp_path, max_queued=20)
    dl, awake = stack.downlink, stack.device("awake")
    calls = [dl.send_rpc(awake, f"m{i}", None, timeout=300) for i in range(12)]
    [answer] = stack.send(Code.GET, "api/v1/TA/rpc", observe=0)
    assert answer.code == Code.CONTENT
    [first] = stack.tick(0.1)
    assert first.type == Type.CON and json.loads(bytes(first.payload))["method"] == "m0"
    assert [c.status for c in calls] == ["delivered"] + ["queued"] * 11
    assert stack.tick(0.2) == [] and stack.observers.stats.held == 0  # (nothing waits inside it)
    assert stack.endpoint.receive(encode(Message(Type.ACK, 0, first.mid)), PEER, stack.now) is None
    while (event := stack.endpoint.next_event()) is not None:
        stack.observers.handle(event)
    rest = stack.tick(0.3)
    assert [json.loads(bytes(n.payload))["method"] for n in rest] == [f"m{i}" for i in range(1, 12)]
    assert all(c.status == "delivered" for c in calls) and dl.stats.rpc_sent == 12


def test_an_rpc_refused_for_want_of_room_goes_once_the_endpoint_makes_room_not_at_the_next_uplink(tmp_path):
    """An unverified observer's notifications take half the endpoint's table of messages awaiting
    an ACK at most.  An RPC refused for that waited for its device's next uplink (found in review),
    which a device that only listens never sends; now it goes at the tick after any of those
    messages left the table."""
    stack = Stack(tmp_path)
    stack.endpoint.params = dataclasses.replace(stack.endpoint.params, max_outstanding=8)
    dl, awake = stack.downlink, stack.device("awake")
    [answer] = stack.send(Code.GET, "api/v1/TA/rpc", observe=0)
    assert answer.code == Code.CONTENT
    others = [("192.0.2.99", 6000 + i) for i in range(4)]  # (separate answers elsewhere: half the table)
    for i, other in enumerate(others):
        assert stack.endpoint.send_confirmable(b"\x40\x01\x00\x01", other, 100 + i, b"", None, Code.CONTENT)
    assert len(stack.tick(0.05)) == 4  # (those four, sent)
    call = dl.send_rpc(awake, "m0", None, timeout=300)
    assert stack.tick(0.1) == [] and call.status == "queued"
    assert stack.tick(0.2) == [] and call.status == "queued"  # (no room yet: nothing goes)
    assert stack.endpoint.receive(encode(Message(Type.ACK, 0, 100)), others[0], stack.now) is None
    while (event := stack.endpoint.next_event()) is not None:  # (as the edge hands them on)
        stack.observers.handle(event)
    [note] = stack.tick(0.3)
    assert json.loads(bytes(note.payload))["method"] == "m0" and call.status == "delivered"


def test_attribute_deltas_to_an_observer_at_an_unverified_address_wait_merged(tmp_path):
    """A delta names only the keys that changed: one that waited inside the observation could give
    way to a newer one (past 8) and its keys would never reach the device (found in review).
    While the observer's notification is in flight they wait in the downlink, merged, and go as
    one after its ACK."""
    stack = Stack(tmp_path)
    dl, awake = stack.downlink, stack.device("awake")
    [answer] = stack.send(Code.GET, "api/v1/TA/attributes", observe=0)
    assert answer.code == Code.CONTENT and answer.observe is not None
    assert dl.set_shared(awake, {"a": 1}) == "delivered"
    [first] = stack.outbox()
    assert first.type == Type.CON and json.loads(bytes(first.payload)) == {"a": 1}
    assert [dl.set_shared(awake, {f"k{i}": i}) for i in range(10)] == ["queued"] * 10
    assert dl.set_shared(awake, {"a": 2}) == "queued"
    assert stack.tick(0.1) == [] and stack.observers.stats.held == 0
    assert stack.endpoint.receive(encode(Message(Type.ACK, 0, first.mid)), PEER, stack.now) is None
    while (event := stack.endpoint.next_event()) is not None:
        stack.observers.handle(event)
    [merged] = stack.tick(0.2)
    assert json.loads(bytes(merged.payload)) == {"a": 2, **{f"k{i}": i for i in range(10)}}
    assert stack.tick(0.3) == []  # (once)


def test_rpc_polling_expiry_and_queue_bound(tmp_path):
    stack = Stack(tmp_path, max_queued=2)
    awake = stack.device("awake")
    first = stack.downlink.send_rpc(awake, "a", None, timeout=5)
    stack.downlink.send_rpc(awake, "b", None, timeout=50)
    with pytest.raises(QueueFull):
        stack.downlink.send_rpc(awake, "c", None, timeout=5)
    stack.tick(6.0)
    assert first.status == "expired" and first.done.is_set()
    [polled] = stack.send(Code.GET, "api/v1/TA/rpc")  # a device without Observe polls
    assert json.loads(bytes(polled.payload))["method"] == "b"
    [empty] = stack.send(Code.GET, "api/v1/TA/rpc")
    assert empty.code == Code.CONTENT and bytes(empty.payload) == b""


def test_an_rpc_larger_than_a_block_is_read_whole_by_polling_and_by_observing(stack):
    """Block2 follow-ups are cut from what the device began to read (an adversarial run: a poll's
    block 1 took the next RPC off the queue, a notification's tail was a new poll's, and both RPCs
    were reported delivered while the device had neither whole)"""
    from corem.codec import Block

    awake = stack.device("awake")
    big = {"blob": "x" * 1500}
    first = stack.downlink.send_rpc(awake, "big", big, timeout=30)
    second = stack.downlink.send_rpc(awake, "small", None, timeout=30)
    blocks = []
    for num in range(2):  # polling: GET, then GET Block2 1
        opts = [] if num == 0 else [(O.BLOCK2, encode_uint(Block(num, False, 6).to_uint()))]
        [part] = stack.send(Code.GET, "api/v1/TA/rpc", opts=opts)
        blocks.append(part)
    assert blocks[0].block2.more and not blocks[1].block2.more and blocks[0].etag == blocks[1].etag
    assert json.loads(b"".join(bytes(b.payload) for b in blocks))["params"] == big
    assert first.status == "delivered" and second.status == "queued"  # (the small one waits for its poll)


def test_a_notification_larger_than_a_block_is_read_whole(stack):
    """The notification carries block 0; the GET of block 1 gets the rest of that RPC (same
    ETag), not a slice of a new poll's answer"""
    from corem.codec import Block

    awake = stack.device("awake")
    [answer] = stack.send(Code.GET, "api/v1/TA/rpc", observe=0, token=b"ob")
    assert answer.observe is not None
    call = stack.downlink.send_rpc(awake, "big", {"blob": "y" * 1500}, timeout=30)
    [note] = stack.tick(0.1)
    assert note.block2 is not None and note.block2.more
    # (on plain UDP, the observer not yet verified, its block is as large as fits 3 times its request)
    blocks, num = [note], 1
    while blocks[-1].block2.more:
        [rest] = stack.send(Code.GET, "api/v1/TA/rpc", token=b"ob",
                            opts=[(O.BLOCK2, encode_uint(Block(num, False, note.block2.szx).to_uint()))])
        assert rest.code == Code.CONTENT and rest.etag == note.etag and rest.block2.num == num
        blocks.append(rest)
        num += 1
    whole = json.loads(b"".join(bytes(b.payload) for b in blocks))
    assert whole == {"id": call.id, "method": "big", "params": {"blob": "y" * 1500}} and call.status == "delivered"


def test_a_block_without_drogues_credentials_never_joins_a_devices_upload(stack):
    """Drogue's door reads option 4209 on the request the handler sees -- the last block: a block 0
    sent without it (from the device's address) became the start of the device's stored reading
    (an adversarial run); it is an upload of its own now, and the device's last block finds none"""
    import base64

    from corem.codec import Block

    auth = (O.DROGUE_AUTH, b"Basic " + base64.b64encode(b"awake@acme:TA"))
    forged, rest = b'{"t": 99.5, "pad": "' + b"x" * 41 + b'", ', b'"n": 1}'  # (block 0: 64 bytes, szx 2)
    block0 = (O.BLOCK1, encode_uint(Block(0, True, 2).to_uint()))
    [cont] = stack.send(Code.POST, "v1/telemetry", payload=forged, cf=50, opts=[block0])  # no 4209
    assert cont.code == Code.CONTINUE
    block1 = (O.BLOCK1, encode_uint(Block(1, False, 2).to_uint()))
    [last] = stack.send(Code.POST, "v1/telemetry", payload=rest, cf=50, opts=[auth, block1])
    assert last.code == Code.REQUEST_ENTITY_INCOMPLETE and stack.sink.records == []


def test_drogue_command_is_piggybacked_on_a_waiting_request(stack):
    import base64

    auth = (O.DROGUE_AUTH, b"Basic " + base64.b64encode(b"awake@acme:TA"))
    assert stack.send(Code.POST, "v1/telemetry", query=["ct=30"], payload=b'{"t": 1}', cf=50, opts=[auth]) == []
    stack.sink.commit()
    assert stack.outbox() == []  # committed, now waiting for a command
    assert stack.downlink.command(stack.device("awake"), "reboot", b"now", ttl=60) == "delivered"
    [answer] = stack.outbox()
    assert answer.code == Code.CONTENT and bytes(answer.opt(O.DROGUE_COMMAND)) == b"reboot"
    assert bytes(answer.payload) == b"now"
    # no command: 2.04 once ct has passed
    stack.send(Code.POST, "v1/telemetry", query=["ct=2"], payload=b'{"t": 2}', cf=50, opts=[auth])
    stack.sink.commit()
    [empty_ack] = stack.tick(1.0)  # past the piggyback window: the answer will come separately
    assert empty_ack.type == Type.ACK and empty_ack.code == 0
    [late] = stack.tick(2.5)
    assert late.code == Code.CHANGED and late.type == Type.CON
    # a command queued while nobody waits goes out on the next ct request, at once
    assert stack.downlink.command(stack.device("awake"), "blink", b"", ttl=60) == "queued"
    stack.send(Code.POST, "v1/telemetry", query=["ct=30"], payload=b'{"t": 3}', cf=50, opts=[auth])
    stack.sink.commit()
    [quick] = stack.outbox()
    assert bytes(quick.opt(O.DROGUE_COMMAND)) == b"blink"
    points = [r for r in stack.sink.records if r.topic == "telemetry.raw.acme"]
    assert len(points) == 3 and points[0].headers["channel"] == "telemetry"


@pytest.mark.parametrize("auth, why", [
    (None, b"credentials"),
    (b"Basic !!!", b"option 4209"),
    (b"Basic " + __import__("base64").b64encode(b"awake@acme:wrong"), b"wrong password"),
    (b"Basic " + __import__("base64").b64encode(b"awake@other:TA"), b"wrong password"),
])
def test_drogue_refuses_bad_credentials_with_the_reason(stack, auth, why):
    opts = [] if auth is None else [(O.DROGUE_AUTH, auth)]
    [answer] = stack.send(Code.POST, "v1/telemetry", payload=b'{"t": 1}', cf=50, opts=opts)
    assert answer.code == Code.UNAUTHORIZED and why in bytes(answer.payload)
    assert stack.sink.records == []


def test_drogue_gateway_publishes_as_another_device(stack):
    import base64

    auth = (O.DROGUE_AUTH, b"Basic " + base64.b64encode(b"awake:TA"))
    stack.send(Code.POST, "v1/state", query=["application=acme", "as=sleepy"], payload=b'{"t": 1}', cf=50, opts=[auth])
    stack.sink.commit()
    [ack] = stack.outbox()
    assert ack.code == Code.CHANGED
    [record] = stack.sink.records
    assert record.key == b"sleepy" and record.headers["via"] == "awake"
    [refused] = stack.send(Code.POST, "v1/state", query=["application=acme", "as=nobody"], payload=b"{}", cf=50,
                           opts=[auth])
    assert refused.code == Code.FORBIDDEN
    # roomy does not name awake among its gateways: awake may not speak for it
    [denied] = stack.send(Code.POST, "v1/state", query=["application=acme", "as=roomy"], payload=b"{}", cf=50,
                          opts=[auth])
    assert denied.code == Code.FORBIDDEN and b"not a gateway" in bytes(denied.payload)
    assert len(stack.sink.records) == 1


def test_pubsub_retained_message_with_max_age_subscribe_and_acl(stack):
    q = ["c=cli", "u=awake", "p=TA"]
    # answered only once the message is on the bus
    assert stack.send(Code.PUT, "ps/room/temp", query=q, payload=b"21.5", opts=[(O.MAX_AGE, encode_uint(30))]) == []
    stack.sink.commit()
    [created] = stack.outbox()
    assert created.code == Code.CREATED and created.etag is not None  # (no retained message before it)
    stack.now = 10.0
    [got] = stack.send(Code.GET, "ps/room/temp", query=q)
    assert bytes(got.payload) == b"21.5" and got.max_age == 20
    [sub] = stack.send(Code.GET, "ps/room/temp", query=["c=c2", "u=roomy", "p=TR"], observe=0, token=b"sub")
    assert sub.observe is not None and bytes(sub.payload) == b"21.5"
    [note] = [m for m in stack.send(Code.POST, "mqtt/room/temp", query=q, payload=b"22.0") if m.token == b"sub"]
    assert bytes(note.payload) == b"22.0"
    stack.now = 31.0
    [gone] = stack.send(Code.GET, "ps/room/temp", query=q)
    assert gone.code == Code.NOT_FOUND
    [denied] = stack.send(Code.PUT, "ps/hall/door", query=["c=c2", "u=roomy", "p=TR"], payload=b"open")
    assert denied.code == Code.FORBIDDEN
    [nocreds] = stack.send(Code.GET, "ps/room/temp", query=["c=x", "u=awake"])
    assert nocreds.code == Code.UNAUTHORIZED and b"p: required" in bytes(nocreds.payload)
    published = [r for r in stack.sink.records if r.topic == "pubsub.acme"]
    assert [bytes(r.value) for r in published] == [b"21.5", b"22.0"] and published[0].key == b"room/temp"


def test_one_device_credential_is_no_reflector_of_its_publishes(stack):
    """Subscriptions from 40 addresses plain UDP cannot verify, one device's: each
    replaces the one before, so a publish goes out once (to the latest), not 40 times; another
    device's subscription to the topic is its own and stays."""
    for i in range(40):
        opts = [(O.URI_PATH, b"ps"), (O.URI_PATH, b"alerts"), (O.OBSERVE, b""),
                *[(O.URI_QUERY, q) for q in (b"c=c", b"u=awake", b"p=TA")]]
        msg = Message(Type.NON, Code.GET, 500 + i, b"v%d" % i, sorted(opts, key=lambda o: o[0]))
        req = stack.endpoint.receive(encode(msg), (f"198.51.100.{i}", 5683), stack.now)
        r = stack.router.dispatch(req)
        req.respond(r.code, r.options, r.payload)
    stack.registry.add_device("acme", "listener", token="TL")
    stack.directory.refresh(force=True)
    stack.send(Code.GET, "ps/alerts", query=["c=c", "u=listener", "p=TL"], observe=0, token=b"room")
    stack.outbox()
    assert len(stack.observers) == 2
    out = stack.send(Code.POST, "ps/alerts", query=["c=c", "u=awake", "p=TA"], payload=b"x" * 500)
    notes = [m for m in out + stack.outbox() if m.observe is not None]
    assert sorted(m.token for m in notes) == [b"room", b"v39"]


def test_a_refused_resubscription_leaves_the_device_the_subscription_it_had(stack):
    """A device's new subscription to a topic replaces the one before only once it is accepted.
    The door ended the one before first, so a new one the observers refused (here its new host's
    share is full) left the device subscribed nowhere: every later publish missed it.  A
    replacement takes no more room than the one it replaces: at a full table it is accepted."""
    obs = stack.observers
    obs.max_per_source = 1
    q = ["c=c", "u=awake", "p=TA"]
    [sub] = stack.send(Code.GET, "ps/alerts", query=q, observe=0, token=b"old")
    assert sub.observe is not None
    there = ("198.51.100.9", 5683)
    [attrs] = stack.send(Code.GET, "api/v1/TR/attributes", observe=0, token=b"attrs", peer=there)  # (roomy's)
    assert attrs.observe is not None  # that host's share is full now
    [refused] = stack.send(Code.GET, "ps/alerts", query=q, observe=0, token=b"new", peer=there)
    assert refused.code == Code.CONTENT and refused.observe is None and obs.stats.refused == 1

    def notified(payload: bytes) -> list[bytes]:
        out = stack.send(Code.POST, "ps/alerts", query=q, payload=payload)
        return sorted(m.token for m in out + stack.outbox() if m.observe is not None)

    assert notified(b"fire") == [b"old"]
    obs.max_per_source, obs.max_total = 32, len(obs)  # full: a replacement still fits
    [moved] = stack.send(Code.GET, "ps/alerts", query=q, observe=0, token=b"new", peer=("203.0.113.5", 5683))
    assert moved.observe is not None and len(obs) == 2 and notified(b"smoke") == [b"new"]


def test_a_resubscription_ends_the_devices_own_subscription_only(stack):
    """The door kept an index of subscriptions of its own beside the observers; an entry outlived
    the subscription it named (ended by Observe 1), and when another device then subscribed from
    that address with that token, the first device's next subscription ended the other's."""
    mine, theirs = ["c=c", "u=awake", "p=TA"], ["c=c", "u=roomy", "p=TR"]
    stack.send(Code.GET, "ps/room/door", query=mine, observe=0, token=b"t")
    stack.send(Code.GET, "ps/room/door", query=mine, observe=1, token=b"t")
    [other] = stack.send(Code.GET, "ps/room/door", query=theirs, observe=0, token=b"t")  # (the same gateway)
    [again] = stack.send(Code.GET, "ps/room/door", query=mine, observe=0, token=b"u", peer=("203.0.113.5", 5683))
    assert other.observe is not None and again.observe is not None and len(stack.observers) == 2
    out = stack.send(Code.POST, "ps/room/door", query=mine, payload=b"open")
    assert sorted(m.token for m in out + stack.outbox() if m.observe is not None) == [b"t", b"u"]


def test_retained_messages_are_bounded(tmp_path):
    stack = Stack(tmp_path)
    stack.emqx.max_retained = 3
    q = ["c=cli", "u=awake", "p=TA"]
    for i in range(10):
        stack.send(Code.PUT, f"ps/t/{i}", query=q, payload=b"x" * 10)
    assert len(stack.emqx) == 3 and stack.emqx.stats.retained_dropped == 7
    assert stack.emqx._retained_bytes == 3 * (10 + len("t/9"))  # (topics count too)


def test_retained_messages_are_bounded_per_tenant_and_taken_from_the_heaviest(tmp_path):
    """Found by an adversarial run: one bound for all tenants, oldest first, so one
    tenant's device publishing many topics dropped every other tenant's retained messages. Now a
    tenant's own bound drops its own oldest, and the server's takes from whoever holds the most."""
    stack = Stack(tmp_path)
    stack.registry.add_device("globex", "noisy", token="TG")
    stack.registry.add_device("initech", "quiet", token="TI")
    stack.directory.refresh(force=True)
    emqx = stack.emqx
    emqx.max_retained, emqx.max_retained_per_tenant = 8, 5

    def put(who: str, topic: str, payload: bytes = b"x") -> None:
        assert stack.send(Code.PUT, f"ps/{topic}", query=["c=c", f"u={who[0]}", f"p={who[1]}"], payload=payload) == []
        stack.sink.commit()  # (answered once on the bus)
        [answer] = stack.outbox()
        assert answer.code in (Code.CREATED, Code.CHANGED), answer

    def kept(who: str, topic: str) -> bool:
        [answer] = stack.send(Code.GET, f"ps/{topic}", query=["c=c", f"u={who[0]}", f"p={who[1]}"])
        return answer.code == Code.CONTENT

    acme, globex, initech = ("awake", "TA"), ("noisy", "TG"), ("quiet", "TI")
    put(acme, "config/setpoint")
    for i in range(20):  # over its own bound: its own oldest go
        put(globex, f"t/{i}")
    assert kept(acme, "config/setpoint") and len(emqx) == 6
    assert [kept(globex, f"t/{i}") for i in (14, 15, 19)] == [False, True, True]
    for i in range(3):  # the server's bound (8): taken from globex, which holds the most
        put(initech, f"c/{i}")
    assert len(emqx) == 8 and kept(acme, "config/setpoint") and all(kept(initech, f"c/{i}") for i in range(3))
    assert [kept(globex, f"t/{i}") for i in (15, 16, 19)] == [False, True, True]  # (9 > 8: one went)
    emqx.max_retained_bytes = emqx._retained_bytes  # the bytes bound: the same rule, by bytes
    put(globex, "t/big", b"y" * 100)  # the bytes over come out of globex's, the heaviest's
    assert kept(acme, "config/setpoint") and all(kept(initech, f"c/{i}") for i in range(3))
    assert emqx._retained_bytes <= emqx.max_retained_bytes
    assert sum(emqx._by_bytes.weight(t) for t in emqx._retained) == emqx._retained_bytes
    assert all(emqx._by_count.weight(t) == len(m) for t, m in emqx._retained.items())
    assert len(emqx) == sum(len(m) for m in emqx._retained.values()) == len(emqx._by_count) + 2


class Tenant(str):
    """A tenant's name that counts how often it is hashed: each time a tenant is looked at by name."""

    looked_at = 0

    def __hash__(self) -> int:
        Tenant.looked_at += 1
        return str.__hash__(self)


def test_a_server_bound_finds_the_heaviest_tenant_without_a_walk(stack):
    """Past `max_retained` (count) or the bytes bound, the heaviest tenant's oldest goes; it was
    found by a walk over every tenant, at each publish past the bound.  Counted, not timed: the
    tenants looked at to make room for one message, with 3,000 tenants, are a few dozen."""
    emqx = stack.emqx
    emqx.max_retained = emqx.max_retained_bytes = 1 << 30
    mid = 0

    def put(tenant: Tenant, topic: str, payload: bytes = b"v") -> None:
        nonlocal mid
        mid += 1
        opts = sorted([(O.URI_PATH, b"ps"), (O.URI_PATH, topic.encode())], key=lambda o: o[0])
        req = stack.endpoint.receive(encode(Message(Type.NON, Code.PUT, mid, b"p", opts, payload)), PEER, stack.now)
        device = type("Device", (), {"tenant": tenant, "device": "d"})()
        assert emqx.put(req, device, topic, stack.observers) is None  # (answered once on the bus)

    tenants = [Tenant(f"tenant-{i}") for i in range(3000)]
    for t in tenants:
        put(t, "config")
    put(tenants[7], "more")
    put(tenants[7], "most")  # the heaviest, by count and by bytes
    emqx.max_retained = len(emqx)  # full: the next message pushes tenant-7's oldest out
    Tenant.looked_at = 0
    put(tenants[1], "again")
    assert emqx.stats.retained_dropped == 1 and list(emqx._retained[tenants[7]]) == ["more", "most"]
    assert Tenant.looked_at < 100, Tenant.looked_at
    emqx.max_retained, emqx.max_retained_bytes = 1 << 30, emqx._retained_bytes + 50  # the bytes bound
    Tenant.looked_at = 0
    put(tenants[2], "big", b"x" * 50)  # 3 bytes over; tenant-2 the heaviest by bytes now: its oldest goes
    assert emqx.stats.retained_dropped == 2 and list(emqx._retained[tenants[2]]) == ["big"]
    assert Tenant.looked_at < 100, Tenant.looked_at


def test_a_tenant_that_left_and_came_back_is_not_the_heaviest_by_its_old_entry():
    """(found in review) an entry of its stay before had its weight again, and won the tie
    its new arrival loses"""
    heaviest = Heaviest()
    heaviest.add("T", 1)
    heaviest.add("U", 0)
    heaviest.remove("T")
    heaviest.add("U", 1)
    heaviest.add("T", 1)
    assert heaviest.top() == "U"


def test_the_heaviest_is_the_tenant_a_walk_in_arrival_order_would_pick():
    """`Heaviest` against the walk it replaces (`max` over the tenants as they came, the first of
    equal weights), through random changes, arrivals and departures."""
    rng = random.Random(7)
    heaviest, weights = Heaviest(), {}
    for _ in range(20_000):
        tenant = f"t{rng.randrange(40)}"
        if tenant in weights and rng.random() < 0.1:
            heaviest.remove(tenant)
            del weights[tenant]
        else:
            delta = rng.randrange(-5, 6) if tenant in weights else rng.randrange(0, 6)
            heaviest.add(tenant, delta)
            weights[tenant] = weights.get(tenant, 0) + delta
        if weights:
            assert heaviest.top() == max(weights, key=weights.__getitem__)
        assert len(heaviest) == len(weights) and all(heaviest.weight(t) == w for t, w in weights.items())


@pytest.mark.parametrize("flt, topic, match", [
    ("#", "a/b", True), ("a/#", "a", True), ("a/#", "a/b/c", True), ("a/+", "a/b", True),
    ("a/+", "a/b/c", False), ("a/b", "a/b", True), ("a/b", "a/c", False), ("+/+", "a", False),
])
def test_topic_filters(flt, topic, match):
    assert topic_matches(flt, topic) is match


def test_provisioning_and_claiming(stack):
    stack.management.add_provision_key("pk", "ps", "acme")
    body = b'{"deviceName": "fresh", "provisionDeviceKey": "pk", "provisionDeviceSecret": "ps"}'
    [ok] = stack.send(Code.POST, "api/v1/provision", payload=body, cf=50)
    creds = json.loads(bytes(ok.payload))
    assert ok.code == Code.CREATED and creds["status"] == "SUCCESS" and creds["deviceName"] == "fresh"
    stack.send(Code.POST, f"api/v1/{creds['credentialsValue']}/telemetry", payload=b'{"t": 1}', cf=50)
    stack.sink.commit()
    assert stack.outbox()[0].code == Code.CHANGED
    [bad] = stack.send(Code.POST, "api/v1/provision", payload=body.replace(b'"ps"', b'"no"'), cf=50)
    assert bad.code == Code.UNAUTHORIZED and json.loads(bytes(bad.payload))["status"] == "FAILURE"
    [again] = stack.send(Code.POST, "api/v1/provision", payload=body, cf=50)
    assert again.code == Code.BAD_REQUEST and b"already exists" in bytes(again.payload)
    assert len([d for d in stack.registry.list_devices("acme") if d.device == "fresh"]) == 1  # (a replay: nothing)
    # claiming: the device opens a claim, an owner presents its secret
    [opened] = stack.send(Code.POST, "api/v1/TA/claim", payload=b'{"secretKey": "s3", "durationMs": 60000}', cf=50)
    assert opened.code == Code.CHANGED
    with pytest.raises(ClaimRefused):
        stack.management.claim("acme", "awake", "wrong", "bob")
    stack.management.claim("acme", "awake", "s3", "alice")
    assert stack.management.owner("acme", "awake") == "alice"
    with pytest.raises(ClaimRefused):  # once only
        stack.management.claim("acme", "awake", "s3", "mallory")


def test_attribute_requests_name_the_bad_field(stack):
    [bad] = stack.send(Code.POST, "api/v1/TA/attributes", payload=b'{"bad key": 1}', cf=50)
    assert bad.code == Code.BAD_REQUEST and bytes(bad.payload).startswith(b"attributes.bad key")
    [notjson] = stack.send(Code.POST, "api/v1/TA/attributes", payload=b"{", cf=50)
    assert notjson.code == Code.BAD_REQUEST and bytes(notjson.payload).startswith(b"attributes: not valid")
    [ok] = stack.send(Code.POST, "api/v1/TA/attributes", payload=b'{"fw": "1.2", "n": 3}', cf=50)
    assert ok.code == Code.CHANGED
    [got] = stack.send(Code.GET, "api/v1/TA/attributes", query=["clientKeys=fw,missing"])
    assert json.loads(bytes(got.payload)) == {"client": {"fw": "1.2"}}
    [unknown] = stack.send(Code.GET, "api/v1/NOPE/attributes")
    assert unknown.code == Code.UNAUTHORIZED


def test_firmware_block2_download_matches_the_package(stack):
    import hashlib
    import os

    image = os.urandom(5000)
    p = stack.management.add_package("firmware", "fw", "2.0", image)
    stack.management.assign("acme", "awake", "firmware", p.id)
    got, num = b"", 0
    while True:
        [m] = stack.send(Code.GET, "api/v1/TA/firmware", opts=[(O.BLOCK2, encode_uint(num << 4 | 6))])
        assert m.code == Code.CONTENT and m.size2 in (None, 5000)
        got += bytes(m.payload)
        if not m.block2.more:
            break
        num += 1
    assert hashlib.sha256(got).hexdigest() == p.sha256
    [wrong] = stack.send(Code.GET, "api/v1/TA/firmware", query=["version=1.0"])
    assert wrong.code == Code.NOT_FOUND
    [none] = stack.send(Code.GET, "api/v1/TA/software")
    assert none.code == Code.NOT_FOUND


def test_the_package_cache_is_bounded_and_follows_the_stored_package():
    """Packages are read once and kept: at most max_entries and max_bytes (the one read
    last kept whatever its size), found by id and sha256 (other bytes under the same id: read anew)."""
    from corem.frontdoors.thingsboard import PackageCache
    from corem.registry.management import Package

    blobs = {1: b"a" * 60, 2: b"b" * 60, 3: b"c" * 200}
    cache = PackageCache(max_entries=2, max_bytes=150)
    pkg = lambda i, sha="00" * 32: Package(i, "firmware", "t", str(i), sha, len(blobs[i]))  # noqa: E731
    assert cache.get(pkg(1), blobs.get) == (blobs[1], bytes(8)) and cache.reads == 1
    assert cache.get(pkg(1), blobs.get)[0] is blobs[1] and cache.reads == 1  # kept
    cache.get(pkg(2), blobs.get)
    cache.get(pkg(1), blobs.get)
    assert cache.reads == 2 and len(cache) == 2
    cache.get(pkg(3), blobs.get)  # larger than max_bytes alone: kept, the others go
    assert len(cache) == 1 and cache.size == 200
    cache.get(pkg(3, "ff" * 32), blobs.get)  # the registry holds other bytes under that id
    assert cache.reads == 4 and cache.get(pkg(3, "ff" * 32), blobs.get)[1] == b"\xff" * 8 and len(cache) == 1


def test_provisioning_is_bounded_per_source_per_key_and_by_the_keys_max_devices(stack):
    """Found by an adversarial run: one source registered 300 devices in 0.4 s with
    one key. A source may provision 1 a second (10 at once), a key 10 a second (100 at once),
    beyond: 5.03 with Max-Age; a key's max_devices bounds the devices it registered that remain."""
    mgmt = stack.management
    mgmt.add_provision_key("fleet", "s", "acme")
    nameless = b'{"provisionDeviceKey": "fleet", "provisionDeviceSecret": "s"}'
    answers = [stack.send(Code.POST, "api/v1/provision", payload=nameless, cf=50)[0] for _ in range(15)]
    assert [a.code for a in answers] == [Code.CREATED] * 10 + [Code.SERVICE_UNAVAILABLE] * 5
    assert answers[-1].max_age == 5 and json.loads(bytes(answers[-1].payload)) == {
        "status": "FAILURE", "errorMsg": "over the source's rate"}
    stack.now += 1.0  # a second later: one more
    codes = [stack.send(Code.POST, "api/v1/provision", payload=nameless, cf=50)[0].code for _ in range(2)]
    assert codes == [Code.CREATED, Code.SERVICE_UNAVAILABLE]
    assert len(stack.registry.list_devices("acme")) == 3 + 11
    # the key's own bucket (net/limits.py's SourceLimiter, by key): 10 a second, 100 at once, past
    # the source's (another source each time); a wrong secret is 4.01 and takes nothing of it
    stack.now += 100.0
    wrong = b'{"provisionDeviceKey": "fleet", "provisionDeviceSecret": "no"}'
    assert stack.send(Code.POST, "api/v1/provision", payload=wrong, cf=50)[0].code == Code.UNAUTHORIZED
    peers = [(f"10.1.{i // 250}.{i % 250}", 5683) for i in range(101)]
    codes = [stack.send(Code.POST, "api/v1/provision", payload=nameless, cf=50, peer=p)[0].code for p in peers]
    assert codes == [Code.CREATED] * 100 + [Code.SERVICE_UNAVAILABLE]
    # max_devices: removing one of its devices frees its place
    mgmt.add_provision_key("small", "s2", "acme", max_devices=2)
    stack.now += 100.0
    named = b'{"deviceName": "%d", "provisionDeviceKey": "small", "provisionDeviceSecret": "s2"}'
    codes = [stack.send(Code.POST, "api/v1/provision", payload=named % i, cf=50)[0] for i in range(3)]
    assert [a.code for a in codes] == [Code.CREATED, Code.CREATED, Code.BAD_REQUEST]
    assert json.loads(bytes(codes[2].payload))["errorMsg"] == "max_devices (2) reached"
    stack.registry.remove_device("acme", "0")
    mgmt.forget("acme", "0")
    assert stack.send(Code.POST, "api/v1/provision", payload=named % 3, cf=50)[0].code == Code.CREATED
    with pytest.raises(BadInput, match="max_devices"):
        mgmt.add_provision_key("zero", "s", "acme", max_devices=0)


def provision_at_once(where: Any, n: int = 6, max_devices: int = 3) -> tuple[list[str], int]:
    """`n` connections (as workers or nodes have) provisioning with one key of `max_devices` at
    once, each pausing between the key's count and its registration (the window a race needs):
    what each was answered, and how many devices the key has."""
    import threading
    import time

    setup = Management(Registry(where))
    setup.add_provision_key("rush", "s", "acme", max_devices=max_devices)
    parts = [Management(Registry(where)) for _ in range(n)]
    barrier = threading.Barrier(n)
    answers: list[str] = []

    def one(i: int, mgmt: Management) -> None:
        add = mgmt.registry.add_device

        def slow_add(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.05)  # (the window only: what is asserted does not depend on it)
            return add(*args, **kwargs)

        mgmt.registry.add_device = slow_add  # type: ignore[method-assign]
        barrier.wait()
        try:
            mgmt.provision("rush", "s", f"rush-{i}")
            answers.append("registered")
        except BadInput as e:
            answers.append(str(e))

    threads = [threading.Thread(target=one, args=(i, m)) for i, m in enumerate(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(answers), sum(d.device.startswith("rush-") for d in setup.registry.list_devices("acme"))


def test_a_keys_max_devices_holds_when_workers_provision_with_it_at_once(tmp_path):
    """Found in review: the count and the registration were not one transaction, so workers
    provisioning with one key at once could all count the same devices and each register one
    more.  Six connections to one SQLite registry, max_devices 3: three registered, three refused."""
    answers, made = provision_at_once(tmp_path / "registry.db")
    assert answers == ["max_devices (3) reached"] * 3 + ["registered"] * 3 and made == 3


def test_observer_churn_leaves_nothing_behind(stack):
    """Registrations come and go by the thousand; nothing stays behind.  A device observes its RPCs
    once: each registration (another token, as from another NAT port) replaces the one before."""
    obs = stack.observers
    obs.max_total, obs.max_per_source, obs.max_per_owner = 500, 10_000, 10_000
    for i in range(2000):
        stack.send(Code.GET, "api/v1/TA/rpc", observe=0, token=i.to_bytes(4, "big"))
    assert len(obs) == 1 and obs.stats.refused == 0 and obs.stats.deregistered == 1999
    for i in range(2000):
        stack.send(Code.GET, "api/v1/TA/rpc", observe=1, token=i.to_bytes(4, "big"))
    assert len(obs) == 0 and obs._by_resource == {} and not obs._per_source and not obs._per_owner
    assert not obs._owned


def test_router_prefix_patterns():
    from corem.coap import Response

    router, seen = Router(), []
    router.add("ps/{topic*}", {Code.GET: lambda req, p: seen.append(p) or Response(Code.CONTENT)})
    router.add("ps/fixed/{x}", {Code.GET: lambda req, p: seen.append(("fixed", p)) or Response(Code.CONTENT)})
    ep = Endpoint(Params())
    for path in ("ps/a", "ps/a/b/c", "ps/fixed/1", "ps"):
        opts = [(O.URI_PATH, s.encode()) for s in path.split("/")]
        req = ep.receive(encode(Message(Type.CON, Code.GET, len(seen) + 100, b"", opts)), PEER, 0.0)
        r = router.dispatch(req)
        if path == "ps":
            assert r.code == Code.NOT_FOUND
    assert seen == [["a"], ["a/b/c"], ("fixed", ["1"])]


def test_idle_queues_of_a_psm_fleet_are_forgotten_a_bounded_number_per_tick(stack):
    from corem.devices.downlink import SWEEP
    from corem.registry import Device

    fleet = [Device(tenant="acme", device=f"p{i}", power_mode="psm") for i in range(5000)]
    for d in fleet:
        stack.downlink.uplink(d)  # each one talked (at 0.0): reachable for psm_activity_timer
    assert stack.downlink.devices_queued == 5000
    stack.downlink.set_shared(fleet[0], {"a": 1})  # delivered or stored: awake
    stack.tick(20.0)  # all asleep now
    assert stack.downlink.set_shared(fleet[1], {"k": 2}) == "queued"
    assert stack.downlink.devices_queued == 5000 - SWEEP + 1  # one sweep's worth gone; p1 queued anew
    for i in range(40):
        stack.tick(20.0 + i)
    assert stack.downlink.devices_queued == 1  # only the one with something waiting
    assert stack.downlink.queued(fleet[1])["attributes"] == 1


def test_drogue_auth_option_with_non_ascii_text_is_4_01_not_a_crash(stack):
    """Found by fuzz_frontdoors: base64 of non-ASCII text raised inside the handler (5.00)."""
    [answer] = stack.send(Code.POST, "v1/x", payload=b"{}", cf=50, opts=[(O.DROGUE_AUTH, "Basic ߙߙ".encode())])
    assert answer.code == Code.UNAUTHORIZED and stack.router.handler_errors == 0


@pytest.mark.parametrize("body, cf, why", [
    (__import__("cbor2").dumps({"fw": b"\x01\x02"}), 60, b"attributes.fw: bytes values"),   # found by fuzz_frontdoors
    (__import__("cbor2").dumps({1: "x"}), 60, b"attributes: keys must be text"),
    (b"[" * 5000 + b"]" * 5000, 50, b"attributes: not valid JSON"),
    (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", 50, b"attributes.a[0]"),
    (b'{"a": NaN}', 50, b"attributes.a: NaN"),
])
def test_attribute_bodies_are_plain_json_or_refused_by_name(stack, body, cf, why):
    [answer] = stack.send(Code.POST, "api/v1/TA/attributes", payload=body, cf=cf)
    assert answer.code == Code.BAD_REQUEST and len(answer.payload) >= 10  # cut to the request size (no amplifier)
    assert bytes(answer.payload).startswith(why[: len(answer.payload)])
    assert stack.router.handler_errors == 0


def test_a_publish_the_bus_refuses_is_5_03_and_reaches_no_one(stack):
    q = ["c=cli", "u=awake", "p=TA"]
    [sub] = stack.send(Code.GET, "ps/room/t", query=q, observe=0, token=b"sub")
    assert sub.observe is not None
    stack.sink.full = True
    [busy] = stack.send(Code.PUT, "ps/room/t", query=q, payload=b"1", token=b"pub")
    assert busy.code == Code.SERVICE_UNAVAILABLE and busy.max_age == 5
    stack.sink.full = False
    [missing] = stack.send(Code.GET, "ps/room/t", query=q, token=b"get")
    assert missing.code == Code.NOT_FOUND  # not retained either


def test_leaving_an_observation_keeps_what_waits_for_a_sleeping_device(stack):
    sleepy = stack.device("sleepy")
    stack.send(Code.GET, "api/v1/TS/attributes", observe=0)
    stack.tick(20.0)
    assert stack.downlink.set_shared(sleepy, {"a": 1}) == "queued"
    stack.send(Code.GET, "api/v1/TS/attributes", observe=1, token=b"other")  # some other token leaves
    assert stack.downlink.queued(sleepy)["attributes"] == 1


def test_attribute_bound_is_all_or_nothing_and_forget_removes_a_device_state(stack, monkeypatch):
    import corem.registry.management as m

    monkeypatch.setattr(m, "MAX_ATTRIBUTES", 3)
    mg = stack.management
    mg.set_attributes("acme", "awake", "shared", {"a": 1, "b": 2})
    with pytest.raises(BadInput, match="at most 3"):
        mg.set_attributes("acme", "awake", "shared", {"b": 20, "c": 3, "d": 4})
    assert mg.attributes("acme", "awake", "shared") == {"a": 1, "b": 2}  # b was not changed either
    mg.set_attributes("acme", "awake", "shared", {"a": None, "c": 3, "d": 4})  # a delete makes room
    assert mg.attributes("acme", "awake", "shared") == {"b": 2, "c": 3, "d": 4}
    mg.open_claim("acme", "awake", "s3cret", 60_000)
    mg.forget("acme", "awake")
    assert mg.attributes("acme", "awake", "shared") == {} and mg.owner("acme", "awake") is None


def test_a_device_whose_profile_is_not_registered_is_told_so_and_nothing_else(tmp_path):
    """5.00 naming its own profile only: the answer listed every registered profile's name, other
    tenants' included (an adversarial run)"""
    from corem.profiles.spec import parse_profile

    stack = Stack(tmp_path)
    stack.registry.put_profile("other-tenants-secret-profile", parse_profile('{"format": "flat"}'))
    stack.registry.add_device("acme", "lost", token="TL", profile="nosuch")
    stack.directory.refresh(force=True)
    # (a request large enough that its answer is not cut: an error answer is never larger than it)
    [answer] = stack.send(Code.POST, "api/v1/TL/telemetry", payload=b'{"a": 1, "pad": "' + b"x" * 200 + b'"}', cf=50)
    assert answer.code == Code.INTERNAL_SERVER_ERROR
    assert bytes(answer.payload) == b"profile 'nosuch' is not registered" and not stack.sink.records


def test_a_registry_change_expires_what_waited_for_a_replaced_device_and_nothing_else(stack):
    """`Downlink.forget`: a device removed and added again (another `created_at`) loses its RPCs --
    queued and delivered-but-unanswered, each expired in the order sent, its caller told -- and its
    commands; a rotated credential (the same registration) keeps them; other devices keep theirs."""
    import msgspec

    dl = stack.downlink
    awake, roomy, sleepy = stack.device("awake"), stack.device("roomy"), stack.device("sleepy")
    first = dl.send_rpc(awake, "a", None, timeout=60)
    second = dl.send_rpc(awake, "b", None, timeout=60)
    [polled] = stack.send(Code.GET, "api/v1/TA/rpc")  # the first is delivered, its reply awaited
    assert json.loads(bytes(polled.payload))["id"] == first.id and first.status == "delivered"
    third = dl.send_rpc(awake, "c", None, timeout=60)
    assert dl.command(awake, "reboot", b"", ttl=60) == "queued"
    others = [dl.send_rpc(roomy, "r", None, timeout=60), dl.send_rpc(sleepy, "s", None, timeout=60)]
    stack.sink.records.clear()
    registry = {("acme", d.device): d for d in (awake, roomy, sleepy)}

    dl.forget([("acme", "awake")], lambda t, d: registry.get((t, d)))  # the same registration
    assert stack.sink.records == [] and dl.queued(awake) == {"attributes": 0, "rpc": 2, "commands": 1,
                                                            "waiting": False}
    registry["acme", "awake"] = msgspec.structs.replace(awake, created_at=awake.created_at + 1)
    dl.forget([("acme", "awake")], lambda t, d: registry.get((t, d)))  # removed and added again
    results = [(r["device"], r.get("id"), r.get("command"), r["status"]) for r in stack.sink.topics("commands.")]
    assert results == [("awake", first.id, None, "expired"), ("awake", second.id, None, "expired"),
                       ("awake", third.id, None, "expired"), ("awake", None, "reboot", "expired")]
    assert all(c.status == "expired" and c.done.is_set() for c in (first, second, third))
    assert all(c.status == "queued" and not c.done.is_set() for c in others)
    assert dl.queued(registry["acme", "awake"])["rpc"] == 0 and dl.queued(roomy)["rpc"] == 1
    assert dl.stats.rpc_expired == 3 and dl.stats.commands_expired == 1
    assert not dl.reply(awake, first.id, {})  # the old device's late reply is no one's

    del registry["acme", "roomy"]  # None: any device may have changed; roomy is gone
    dl.forget(None, lambda t, d: registry.get((t, d)))
    assert others[0].status == "expired" and others[1].status == "queued" and dl.stats.rpc_expired == 4


class _NotWalked(dict):
    """A table of every RPC in flight that may be asked by id but not walked."""

    def _walked(self, *args, **kwargs):
        raise AssertionError("every RPC in flight was walked")

    __iter__ = values = items = keys = _walked


def test_forget_looks_at_the_changed_devices_own_rpcs_only(tmp_path):
    """With many devices' RPCs in flight, a registry change of one device reads that device's RPCs
    and no other: `forget` never walks the table of all of them (it did, once per change: with a
    large fleet every change cost every RPC in flight).  The index by device stays exactly the
    calls in flight, whatever ends them (a reply, a one-way delivery, a deadline, `forget`), and
    holds no device without one."""
    from corem.registry import Device

    stack = Stack(tmp_path)
    dl = stack.downlink
    fleet = [Device(tenant="acme", device=f"d{i}", created_at=1) for i in range(50)]
    calls = {d.device: [dl.send_rpc(d, "m", None, timeout=10 + i, oneway=d.device == "d3") for i in range(3)]
             for d in fleet}
    assert dl.reply(fleet[1], calls["d1"][0].id, {})  # a reply
    dl.poll_rpc(fleet[3])  # a one-way delivery
    stack.tick(10.5)  # each device's first deadline
    dl._rpcs = _NotWalked(dl._rpcs)
    gone = fleet[7]
    dl.forget([("acme", "d7"), ("acme", "never-seen")], lambda t, d: None if d == gone.device else fleet[0])
    assert [c.status for c in calls["d7"]] == ["expired"] * 3
    assert [c.status for c in calls["d8"]] == ["expired", "queued", "queued"]

    def by_device(table):
        out: dict = {}
        for call in dict.values(table):
            out.setdefault((call.device.tenant, call.device.device), {})[call.id] = call
        return out

    assert dl._device_rpcs == by_device(dl._rpcs) and all(dl._device_rpcs.values())
    assert ("acme", "d7") not in dl._device_rpcs and len(dl._device_rpcs) == 49
    stack.tick(100.0)  # every deadline past: nothing in flight, nothing indexed
    assert dict.__len__(dl._rpcs) == 0 and dl._device_rpcs == {}


def test_a_provisioning_rate_under_a_tenth_a_second_still_starts_and_lets_one_through():
    """Found in review: ten seconds' worth of 0.05/s is half a token, which the limiter refused
    (the server did not start); the burst is one at least."""
    from corem.frontdoors.thingsboard import _buckets

    limiter = _buckets(0.05)
    assert limiter is not None and limiter.burst == 1.0
    assert limiter.allow("10.0.0.1", 0.0) and not limiter.allow("10.0.0.1", 1.0)
    assert _buckets(0.0) is None


def test_rpcs_awaiting_their_reply_count_against_the_devices_bound(tmp_path):
    """max_queued bounded only the calls not delivered yet: a device that polls takes each off the
    queue, and calls awaiting their reply piled up for their whole timeout (found by a review: 1,000
    of 1 KB for max_queued=2).  Every call in flight counts now; a reply makes room again."""
    stack = Stack(tmp_path, max_queued=2)
    awake = stack.device("awake")
    calls = []
    for _ in range(2):
        calls.append(stack.downlink.send_rpc(awake, "m", {"x": "y"}, timeout=86400))
        stack.send(Code.GET, "api/v1/TA/rpc")  # the device polls: delivered, awaiting its reply
    with pytest.raises(QueueFull, match="awaiting their reply"):
        stack.downlink.send_rpc(awake, "m", {"x": "y"}, timeout=86400)
    stack.downlink._expire_rpc(calls[0])  # (its time is up: its place is free)
    assert stack.downlink.send_rpc(awake, "m", {"x": "y"}, timeout=86400).id not in {c.id for c in calls}


def test_a_device_heard_here_is_said_so_again_after_a_while_for_it_may_have_moved_and_come_back(tmp_path):
    """With nodes, `device_homes` names the node that last said it heard a device first.  A node
    said so once per process: a device that went to another node and came back kept the other
    node's name, and its downlink went there (found by a review).  It is said again after SEEN_AGAIN."""
    from corem.devices.downlink import SEEN_AGAIN

    stack = Stack(tmp_path)
    told: list[tuple[float, str]] = []
    stack.downlink.on_first_sight = lambda device: told.append((stack.now, device.device))
    awake = stack.device("awake")
    for t in (0.0, 1.0, SEEN_AGAIN - 1, SEEN_AGAIN + 0.5, SEEN_AGAIN + 2):
        stack.now = t
        stack.downlink.uplink(awake)
    assert told == [(0.0, "awake"), (SEEN_AGAIN + 0.5, "awake")]


def test_rpc_ids_go_on_across_a_restart_so_a_late_answer_ends_no_new_rpc(tmp_path):
    """RPC ids started at 1 in every process: after a restart, a device's late answer to the RPC it
    was sent before ended the new RPC given the same id (found by a review).  The ids are rounds
    reserved in the registry a block at a time: a restart goes on past every block given before."""
    first = Stack(tmp_path)
    old = first.downlink.send_rpc(first.device("awake"), "factory_reset", None, timeout=60)
    assert old.id == 1
    second = Downlink(Management(first.registry), first.sink, clock=lambda: 0.0)  # the next process
    new = second.send_rpc(first.device("awake"), "get_config", None, timeout=60)
    assert new.id != old.id and new.id > old.id
    workers = [Downlink(Management(first.registry), first.sink, clock=lambda: 0.0) for _ in range(2)]
    for index, w in enumerate(workers):
        w.number_ids(index + 1, 2)  # (workers number apart, and go on past the blocks before them too)
    ids = [w.send_rpc(first.device("awake"), "m", None, timeout=60).id for w in workers]
    assert ids[0] % 2 == 1 and ids[1] % 2 == 0 and min(ids) > new.id
