"""Drogue Cloud's door (`POST|PUT /v1/{channel}`, corem/frontdoors/drogue.py) through the fast lane:
the common request -- credentials in option 4209 or the DTLS session, the query's `application`,
`device` and `data_schema` -- is the lane's and stored and answered byte for byte as the Python path
would; everything else (`ct`, `as`, refusals, what the lane cannot read exactly) is still Python's,
which answers it as it always has.  Side by side with the lane off (tests/lane_twin.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corem.codec import Code, Message, Type, decode, encode
from corem.codec import OptionNumber as O
from corem.coap import Endpoint, Params, Router
from corem.devices.downlink import Downlink
from corem.fastlane import FastLane, Lane
from corem.frontdoors.drogue import Drogue
from corem.ingest.diagnostics import Diagnostics
from corem.ingest.telemetry import TelemetryIngest
from corem.metrics import gather
from corem.net.udp import deliver
from corem.registry.management import Management

from .lane_twin import RecordingSink, Twin

pytestmark = pytest.mark.skipif(Lane is None, reason="the C lane is not built")

READING = cbor2.dumps({"temperature": 22.5, "state": "running"})


def basic(user: str, *, scheme: str = "Basic ") -> bytes:
    return (scheme + base64.b64encode(user.encode()).decode()).encode()


def dpost(channel: str = "telemetry", *, query: tuple[str, ...] = (), auth: bytes | None = basic("d1@acme:T1"),
          mid: int = 0x100, code: int = Code.POST, mtype: int = Type.CON, cf: int | None = 60,
          payload: bytes = READING, extra: list | None = None) -> bytes:
    options = [(O.URI_PATH, b"v1"), (O.URI_PATH, channel.encode())]
    if cf is not None:
        options.append((O.CONTENT_FORMAT, bytes([cf])))
    options += [(O.URI_QUERY, q.encode()) for q in query]
    if auth is not None:
        options.append((O.DROGUE_AUTH, auth))
    options += extra or []
    return encode(Message(mtype, code, mid, b"\x07", sorted(options, key=lambda o: o[0]), payload))


def mount_drogue(twin: Twin) -> None:
    """Both sides serve Drogue's door, as `corem serve` mounts it on every router."""
    management = Management(twin.registry)
    for side in (twin.lane, twin.python):
        downlink = Downlink(management, side.sink, clock=lambda: twin.clock[0])
        Drogue(twin.directory, side.ingest, downlink, lambda: twin.clock[0]).install(side.router)


def drogue_twin() -> Twin:
    t = Twin()
    t.registry.add_device("acme", "gw", token="GW")
    t.registry.add_device("acme", "behind", token="BH", gateways="gw")
    t.registry.add_device("acme", "tb-d", token="TBD", profile="tb")
    t.directory.refresh(force=True)  # (written on its own connection)
    t.reset()
    mount_drogue(t)
    return t


@pytest.fixture
def twin():
    t = drogue_twin()
    yield t
    t.close()


def took(twin: Twin) -> int:
    return twin.lane.lane.counters["requests"]


def check(twin: Twin) -> tuple[list, list]:
    """Twin.check, and the headers in the same order on both sides (a dict compares without it)."""
    order = [[list(r.headers.items()) for r in side.sink.stored] for side in (twin.lane, twin.python)]
    assert order[0] == order[1], f"headers differ:\n lane   {order[0]}\n python {order[1]}"
    return twin.check()


def learn(twin: Twin, channel: str = "telemetry") -> None:
    """The Python path serves the channel once: from then on the lane knows the route is Drogue's."""
    twin.receive(dpost(channel, mid=0xF000 + len(channel)))
    twin.commit()
    check(twin)


# -- the common request ----------------------------------------------------------------------------
def test_the_first_request_of_a_channel_is_pythons_and_the_next_ones_the_lanes(twin):
    twin.receive(dpost(mid=1))
    twin.commit()
    check(twin)
    assert took(twin) == 0  # (the route is learned from the door itself: it alone knows it serves it)
    twin.receive(dpost(mid=2, query=("data_schema=urn:x", "application=acme")))
    twin.commit()
    answers, stored = check(twin)
    assert took(twin) == 1
    assert [decode(a[0]).code for a in answers] == [Code.CHANGED]
    topic, key, point, headers = stored[0]
    assert (topic, key) == ("telemetry.raw.acme", b"d1")
    assert list(headers) == ["protocol", "profile", "content-type", "device_id", "channel", "data_schema",
                             "creation-time", "coap-exchange"]
    assert headers["channel"] == "telemetry" and headers["data_schema"] == "urn:x"
    assert point.numeric_values == {"temperature": 22.5} and point.string_values == {"state": "running"}


def test_a_channel_the_door_never_served_here_is_pythons(twin):
    learn(twin, "telemetry")
    twin.receive(dpost("state", mid=5))
    twin.commit()
    check(twin)
    assert took(twin) == 0
    twin.receive(dpost("state", mid=6))
    twin.commit()
    check(twin)
    assert took(twin) == 1


def test_without_the_door_on_its_router_the_lane_never_takes_v1():
    t = Twin()  # (no Drogue door mounted: /v1/... is 4.04 on both sides)
    try:
        for mid in range(3):
            t.receive(dpost(mid=mid))
            t.commit()
            answers, _ = check(t)
            assert decode(answers[0][0]).code == Code.NOT_FOUND
        assert took(t) == 0
    finally:
        t.close()


@pytest.mark.parametrize("kw", [
    dict(),
    dict(code=Code.PUT),
    dict(mtype=Type.NON),
    dict(auth=basic("d1@acme:T1", scheme="bAsIc ")),
    dict(auth=base64.b64encode(b"d1@acme:T1")),  # the bare base64 form
    dict(auth=basic("d1:T1"), query=("application=acme",)),  # device:password with ?application=
    dict(query=("device=d1", "application=acme", "data_schema=")),
    dict(query=("data_schema=a=b&c", "unknown=1", "other", "")),  # (keys the door does not read)
    dict(cf=50, payload=b'{"temperature": 21, "label": "x"}'),
    dict(auth=basic("tb-d@acme:TBD"), payload=cbor2.dumps([{"ts": 5, "values": {"a": 1}}, {"ts": 6, "values": {"a": 2}}])),
    dict(auth=basic("lpp-1@acme:LPP"), cf=42, payload=bytes([1, 0x67, 0x00, 0xEB])),
    dict(auth=basic("js-1@acme:JS"), cf=None, payload=bytes.fromhex("CBF60B0D03760100AD7FFF")),
    dict(channel="a%20b/ü"),  # (the channel is a path segment: the router's text, never unquoted)
])
def test_common_drogue_requests_are_the_lanes_and_stored_and_answered_as_python_would(twin, kw):
    channel = kw.get("channel", "telemetry")
    learn(twin, channel)
    before = took(twin)
    twin.receive(dpost(**kw))
    twin.commit()
    answers, stored = check(twin)
    assert took(twin) == before + 1, "the lane did not take it"
    assert decode(answers[0][0]).code == Code.CHANGED and stored
    assert all(h["channel"] == channel for *_, h in stored)


def test_a_slow_bus_and_a_failing_one_are_answered_the_same(twin):
    learn(twin)
    twin.receive(dpost(mid=0x300))
    twin.advance(0.6)  # past the piggyback timeout: an empty ACK, then the answer separately
    twin.commit()
    check(twin)
    twin.receive(dpost(mid=0x301, mtype=Type.NON))
    twin.commit(RuntimeError("disk"))
    answers, _ = check(twin)
    assert decode(answers[0][0]).code == Code.SERVICE_UNAVAILABLE
    twin.receive(dpost(mid=0x301, mtype=Type.NON))  # (a duplicate: nothing again)
    check(twin)
    assert took(twin) == 2


# -- what stays Python's ---------------------------------------------------------------------------
REFUSED = [
    # (request, Python's answer code)
    (dict(auth=None), Code.UNAUTHORIZED),
    (dict(auth=basic("d1@acme:wrong")), Code.UNAUTHORIZED),
    (dict(auth=basic("nobody@acme:T1")), Code.UNAUTHORIZED),
    (dict(auth=basic("d1@other:T1")), Code.UNAUTHORIZED),
    (dict(auth=basic("d1:T1")), Code.UNAUTHORIZED),  # no '@' and no ?application=
    (dict(auth=basic("d1@acme")), Code.UNAUTHORIZED),  # no ':'
    (dict(auth=b"Basic not base64!"), Code.UNAUTHORIZED),
    (dict(auth=b"Basic "), Code.UNAUTHORIZED),
    (dict(auth="Basic ".encode() + base64.b64encode("d1@acme:T1é".encode())), Code.UNAUTHORIZED),
    (dict(auth=b"Basic\xc3\xa9 x"), Code.UNAUTHORIZED),  # (UTF-8, but not base64)
    (dict(auth=b"\xff"), Code.BAD_REQUEST),  # (not UTF-8: the router's text check)
    (dict(query=("application=other",)), Code.UNAUTHORIZED),
    (dict(query=("device=d2",)), Code.UNAUTHORIZED),
    (dict(query=("application=",)), Code.UNAUTHORIZED),
    (dict(auth=basic("gw@acme:GW"), query=("as=behind",)), Code.CHANGED),  # a gateway: Python's
    (dict(auth=basic("gw@acme:GW"), query=("as=d1",)), Code.FORBIDDEN),
    (dict(query=("ct=0",)), Code.CHANGED),
    (dict(query=("ct=abc",)), Code.BAD_REQUEST),
    (dict(query=("ct=1000",)), Code.BAD_REQUEST),
    (dict(query=("applic%61tion=other",)), Code.UNAUTHORIZED),  # (unquoted by Python: the lane leaves it)
    (dict(query=("data_schema=%41",)), Code.CHANGED),
    (dict(query=("data_schema=é",)), Code.CHANGED),
    (dict(query=("data_schema=a", "data_schema=b")), Code.CHANGED),  # (Python keeps the last)
    (dict(query=tuple(f"k{i}=v" for i in range(9))), Code.CHANGED),
    (dict(auth=base64.b64encode(b"d1@acme:T1").rstrip(b"=")), Code.UNAUTHORIZED),  # unpadded: Python refuses it
    (dict(auth=b"Basic ZDFAYWNtZTpUMR=="), Code.CHANGED),  # stray bits: binascii ignores them, the lane does not read it
    (dict(payload=b"\xff\xff"), Code.BAD_REQUEST),
    (dict(cf=0, payload=b"x"), Code.UNSUPPORTED_CONTENT_FORMAT),
    (dict(extra=[(O.ACCEPT, b"")]), Code.CHANGED),  # (another option)
    (dict(extra=[(O.DROGUE_AUTH, basic("d2@acme:T2"))]), Code.BAD_OPTION),  # (4209, critical, twice: §5.4.5)
    (dict(code=Code.GET), Code.METHOD_NOT_ALLOWED),
]


@pytest.mark.parametrize("kw, code", REFUSED)
def test_what_the_lane_does_not_take_python_serves_or_refuses_as_always(twin, kw, code):
    learn(twin)
    before = took(twin)
    twin.receive(dpost(**kw))
    twin.commit()
    answers, _ = check(twin)
    assert decode(answers[0][0]).code == code
    assert took(twin) == before, "the lane took it"


def test_a_devices_refusals_are_counted_as_the_python_path_counts_them(twin):
    learn(twin)
    for i, (kw, _) in enumerate(REFUSED[:14]):
        twin.receive(dpost(mid=0x400 + i, **kw))
        twin.commit()
        check(twin)
    for reason in ("no_credentials", "bad_password", "malformed_credentials", "device_mismatch"):
        assert twin.lane.count("corem_auth_failures", reason=reason) == twin.python.count(
            "corem_auth_failures", reason=reason) > 0, reason


def test_the_lanes_drogue_readings_are_timed_under_the_drogue_door(twin):
    for side in (twin.lane, twin.python):  # (sans-IO endpoints time nothing without a clock)
        side.endpoint.clock = lambda: twin.clock[0]
    learn(twin)
    twin.receive(dpost(mid=0x500))
    twin.commit()
    check(twin)
    assert sum(twin.lane.lane.counters["latency"][2][0]) == 1

    def counted(side) -> int:  # (the endpoint's and the lane's, added up as /metrics does)
        parts = [side.endpoint] + ([side.lane] if side.lane is not None else [])
        histograms = gather((c, {"transport": "udp"}) for c in parts)["corem_request_duration_seconds"]
        return sum(histograms[(("transport", "udp"), ("door", "drogue"))].counts)

    assert counted(twin.lane) == counted(twin.python) == 2


def test_a_device_changed_in_the_registry_is_pythons_again_until_served(twin):
    learn(twin)
    twin.registry.remove_device("acme", "d1")
    twin.registry.add_device("acme", "d1", token="T1-new")
    twin.directory.refresh(force=True)
    for mid, auth in ((0x600, basic("d1@acme:T1")), (0x601, basic("d1@acme:T1-new")), (0x602, basic("d1@acme:T1"))):
        twin.receive(dpost(mid=mid, auth=auth))
        twin.commit()
        check(twin)


# -- generated ------------------------------------------------------------------------------------
AUTHS = st.sampled_from([
    None, basic("d1@acme:T1"), basic("d1:T1"), basic("d1@acme:T2"), basic("d2@acme:T2"), basic("gw@acme:GW"),
    basic("d3:@x@other.t:T\"3\\"), basic("tb-d@acme:TBD"), base64.b64encode(b"d1@acme:T1"), b"Basic x",
    basic("d1@acme:T1", scheme="BASIC "), basic("nobody@acme:T1"), basic("d1@acme"), b"",
])
QUERY_ITEMS = st.sampled_from([
    "application=acme", "application=other.t", "application=", "device=d1", "device=d2", "device=behind",
    "as=behind", "as=d1", "ct=0", "ct=x", "data_schema=s1", "data_schema=", "data_schema=%41", "x=1", "x", "",
    "application", "device", "data_schema=v=w",
]) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
PAYLOADS = st.sampled_from([
    (60, READING), (50, b'{"t": 1, "s": "x"}'), (60, cbor2.dumps([{"ts": 1, "values": {"a": 1}}])),
    (60, b"\xff"), (50, b"{"), (None, READING), (42, bytes([1, 0x67, 0, 1])),
]) | st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(-5, 5) | st.text(max_size=3), max_size=3).flatmap(
    lambda m: st.sampled_from([(60, cbor2.dumps(m)), (50, json.dumps(m).encode())]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.sampled_from(["telemetry", "state", "v"]), st.lists(QUERY_ITEMS, max_size=4), AUTHS, PAYLOADS,
    st.sampled_from([Code.POST, Code.PUT]), st.sampled_from([Type.CON, Type.NON]),
    st.sampled_from(["commit", "fail", "slow"])), min_size=1, max_size=8))
def test_generated_drogue_requests_are_stored_and_answered_the_same_with_and_without_the_lane(steps):
    t = drogue_twin()
    try:
        for i, (channel, query, auth, (cf, payload), code, mtype, bus) in enumerate(steps):
            t.receive(dpost(channel, query=tuple(query), auth=auth, cf=cf, payload=payload, code=code, mtype=mtype,
                            mid=0x700 + i))
            if bus == "slow":
                t.advance(0.6)
            t.commit(RuntimeError("disk") if bus == "fail" else None)
            check(t)
            t.receive(dpost(channel, query=tuple(query), auth=auth, cf=cf, payload=payload, code=code, mtype=mtype,
                            mid=0x700 + i))  # (its retransmission)
            check(t)
    finally:
        t.close()


def test_most_generated_common_requests_are_the_lanes(twin):
    learn(twin)
    for mid in range(50):
        twin.receive(dpost(mid=0x800 + mid, query=("data_schema=s", "application=acme")[: mid % 3],
                           mtype=Type.NON if mid % 2 else Type.CON, code=Code.PUT if mid % 5 else Code.POST))
        twin.commit()
        check(twin)
    assert took(twin) == 50


# -- over CoAPS: the session's device ---------------------------------------------------------------
class SessionSide:
    """A CoAPS server as the python-mbedtls edge drives it: each decrypted message offered to the lane
    with its session's device (or, with the lane off, straight to the endpoint)."""

    def __init__(self, twin: Twin, sessions: dict, *, lane: bool) -> None:
        self.twin, self.sessions = twin, sessions
        self.sink = RecordingSink()
        clock = twin.clock
        self.ingest = TelemetryIngest(twin.directory, self.sink, Diagnostics(16), clock_ms=lambda: int(clock[0] * 1000),
                                      now=lambda: clock[0])
        self.endpoint = Endpoint(Params(), rng=lambda: 0.5)
        self.router = Router()
        downlink = Downlink(Management(twin.registry), self.sink, clock=lambda: clock[0])
        Drogue(twin.directory, self.ingest, downlink, lambda: clock[0]).install(
            self.router, lambda req: sessions.get(req.peer))
        self.lane = FastLane(self.ingest, self.sink, self.endpoint) if lane else None

    def receive(self, data: bytes, peer: Any) -> None:
        now = self.twin.clock[0]
        slow = [(data, peer)]
        if self.lane is not None:
            self.lane.begin()
            self.lane.offer(data, peer, self.sessions.get(peer), now)
            slow = self.lane.collect()
        for message, source in slow:
            deliver(self.endpoint, self.router, message, source, now)

    def commit(self) -> None:
        self.sink.commit()
        if self.lane is not None:
            self.lane.settle()

    def out(self) -> list:
        out = self.endpoint.datagrams_to_send() + (self.lane.take_outbox() if self.lane is not None else [])
        return sorted(out)

    def stored(self) -> list:
        stored, self.sink.stored = self.sink.stored, []
        return [(r.topic, r.key, r.value, list(r.headers.items())) for r in stored]


@pytest.mark.parametrize("kw, lane_takes", [
    (dict(auth=None), True),  # the session's device
    (dict(auth=None, query=("device=d1", "application=acme", "data_schema=s")), True),
    (dict(auth=basic("d2@acme:T2")), False),  # 4209 over the session: its device (a Python decoder: Python's)
    (dict(auth=basic("flat-1@acme:FL")), True),  # 4209 names another device than the session's: 4209 wins
    (dict(auth=basic("d1@acme:nope")), False),
    (dict(auth=None, query=("device=flat-1",)), False),
])
def test_over_coaps_the_sessions_device_or_4209s_is_the_lanes_as_identity_decides(twin, kw, lane_takes):
    d1 = twin.directory.named("acme", "d1")
    peer = ("10.0.0.9", 5684)
    sessions = {peer: d1}
    lane, python = SessionSide(twin, sessions, lane=True), SessionSide(twin, sessions, lane=False)
    for i, request in enumerate([dpost(auth=None, mid=1), dpost(mid=2, **kw)]):
        for side in (lane, python):
            side.receive(request, peer)
            side.commit()
        assert lane.out() == python.out()
        assert lane.stored() == python.stored()
    assert lane.lane.counters["requests"] == (1 if lane_takes else 0)
