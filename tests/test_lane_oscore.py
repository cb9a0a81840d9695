"""OSCORE (RFC 8613) through the fast lane: once corem/oscore has a context ready and unshared, the
lane opens the device's common requests -- an outer POST with the OSCORE option whose inner
`POST /telemetry` carries a reading -- and seals their answers in C (corem/fastlane/oscore.h), with
the context's one replay window; stored and answered byte for byte as the Python path would, side by
side with the lane off (tests/lane_twin.py).  Everything else -- the Echo challenge, shared contexts,
other inner requests, malformed options, forgeries, replays -- is still Python's, which answers it as
it always has."""

from __future__ import annotations

import functools

import tempfile
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corem.codec import Code, Message, Type, decode, encode
from corem.codec import OptionNumber as O
from corem.codec.options import UNDERSTOOD_CRITICAL
from corem.fastlane import FastLane, Lane, serving
from corem.identity import session_identity
from corem.oscore import Oscore
from corem.oscore import layer as oscore_layer
from corem.oscore.context import WINDOW, Context, ReplayWindow, Window, derive
from corem.oscore.protect import aad, plaintext
from corem.registry.db import Db
from corem.registry.oscore import OscoreState, fingerprint
from corem.registry.store import OscoreKeys

from .lane_twin import Twin

pytestmark = pytest.mark.skipif(Lane is None, reason="the C lane is not built")

if Lane is not None:
    from corem.fastlane._lane import OscoreContext, OscoreWindow

KEYS = OscoreKeys(sender_id=b"\x01", recipient_id=b"\x02", secret=b"0123456789abcdef0123", salt=b"\x9e\x7c")
#: a device whose context has a kid context (its requests carry it), of ThingsBoard's profile
KEYS_CTX = OscoreKeys(sender_id=b"", recipient_id=b"\x07\x07\x07\x07\x07\x07\x07", secret=bytes(range(16)),
                      id_context=b"\x37\xcb\xf3\x21\x00\x17\xa2\xd3")
READING = cbor2.dumps({"temperature": 22.5, "state": "running"})
TELEMETRY = [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c")]  # (60: CBOR)


class Client:
    """The device's side of a context: seals its requests, opens corem's answers."""

    def __init__(self, keys: OscoreKeys) -> None:
        corem_send, corem_recv, iv = derive(keys.secret, keys.salt, keys.sender_id, keys.recipient_id, keys.id_context)
        self.send, self.recv = AESCCM(corem_recv, 8), AESCCM(corem_send, 8)
        self.iv = int.from_bytes(iv, "big")
        self.kid, self.kid_context, self.corem_id = keys.recipient_id, keys.id_context, keys.sender_id
        self.seq = 0

    def nonce(self, kid: bytes, piv: bytes) -> bytes:
        parts = (len(kid) << 96) | (int.from_bytes(kid, "big") << 40) | int.from_bytes(piv, "big")
        return (parts ^ self.iv).to_bytes(13, "big")

    def option(self, piv: bytes) -> bytes:
        flags = len(piv) | 0x08 | (0x10 if self.kid_context is not None else 0)
        ctx = b"" if self.kid_context is None else bytes((len(self.kid_context),)) + self.kid_context
        return bytes((flags,)) + piv + ctx + self.kid

    def request(self, inner: list | None = None, payload: bytes = READING, *, mid: int = 0x100, seq: int | None = None,
                mtype: int = Type.CON, code: int = Code.POST, outer_code: int = Code.POST, piv: bytes | None = None,
                option: bytes | None = None, outer: list | None = None, token: bytes = b"\x05\x06",
                forge: bool = False) -> bytes:
        """A sealed request: the inner `code`, options and payload (a reading to /telemetry)."""
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        piv = piv if piv is not None else (seq.to_bytes(5, "big").lstrip(b"\x00") or b"\x00")
        sealed = self.send.encrypt(self.nonce(self.kid, piv), plaintext(code, TELEMETRY if inner is None else inner,
                                                                        payload), aad(self.kid, piv))
        if forge:
            sealed = sealed[:-1] + bytes((sealed[-1] ^ 1,))
        options = sorted([(O.OSCORE, self.option(piv) if option is None else option), *(outer or [])],
                         key=lambda o: o[0])
        return encode(Message(mtype, outer_code, mid, token, options, sealed))

    def answer(self, datagram: bytes, request: bytes) -> Message:
        """corem's answer to `request`, opened (the first answer has the request's nonce; an Echo
        challenge a partial IV of corem's own)."""
        req, outer = decode(request), decode(datagram)
        piv = bytes(req.opt(O.OSCORE))[1:1 + (req.opt(O.OSCORE)[0] & 7)]
        own = bytes(outer.opt(O.OSCORE))
        nonce = self.nonce(self.corem_id, own[1:]) if own else self.nonce(self.kid, piv)
        plain = self.recv.decrypt(nonce, bytes(outer.payload), aad(self.kid, piv))
        header = bytes((0x40 | outer.type << 4 | len(outer.token), plain[0], outer.mid >> 8, outer.mid & 0xFF))
        return decode(header + outer.token + plain[1:])


class OscoreTwin(Twin):
    """Twin with OSCORE on both sides' routers (each its own Oscore layer and state database, as two
    processes would have) and `/telemetry` mounted as `corem serve` mounts it."""

    def __init__(self, *, shared: bool = False, used: bool = False) -> None:
        self.shared, self.used = shared, used
        self.dbs = tempfile.TemporaryDirectory(prefix="corem-oscore-twin-")
        super().__init__()
        self.registry.add_device("acme", "os-1", oscore=KEYS)
        self.registry.add_device("acme", "os-2", oscore=KEYS_CTX, profile="tb")
        self.directory.refresh(force=True)
        self.reset()

    def reset(self) -> None:
        super().reset()
        if not hasattr(self, "dbs"):  # (Twin's own first reset)
            return
        for i, side in enumerate((self.lane, self.python)):
            side.ingest.install(side.router, session_identity(None))
            state = OscoreState(Db(Path(self.dbs.name) / f"{id(side)}-{i}.db"))
            if self.used:  # (another process, before this start, took requests: the windows are unknown)
                for keys in (KEYS, KEYS_CTX):
                    state.mark_used(fingerprint(keys))
            side.oscore = Oscore(self.directory.oscore_device, state, UNDERSTOOD_CRITICAL - {O.OSCORE},
                                 shared=self.shared, lane_of=functools.partial(serving, side.ingest.lanes))
            side.router.unwrap = side.oscore.unwrap

    def close(self) -> None:
        super().close()
        self.dbs.cleanup()

    def took(self) -> int:
        return self.lane.lane.counters["oscore_requests"]

    def contexts(self) -> int:
        return self.lane.lane.counters["oscore_contexts"]

    def check(self) -> tuple[list, list]:
        """Twin.check, and the headers in the same order on both sides (a dict compares without it)."""
        order = [[list(r.headers.items()) for r in side.sink.stored] for side in (self.lane, self.python)]
        assert order[0] == order[1], f"headers differ:\n lane   {order[0]}\n python {order[1]}"
        return super().check()

    def step(self, datagram: bytes, error: BaseException | None = None) -> tuple[list, list]:
        self.receive(datagram)
        self.commit(error)
        return self.check()


@pytest.fixture
def twin():
    t = OscoreTwin()
    yield t
    t.close()


@pytest.fixture
def echo_fixed(monkeypatch):
    """The Echo value both sides choose, the same (it is random)."""
    monkeypatch.setattr(oscore_layer.secrets, "token_bytes", lambda n: b"E" * n)


# -- the pieces in C against their Python twins --------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["accept", "start"]), st.integers(0, 200)), max_size=80), st.booleans())
def test_the_c_window_answers_as_the_python_one(ops, ready):
    c, py = OscoreWindow(ready), ReplayWindow(ready)
    for op, seq in ops:
        assert c.fresh(seq) == py.fresh(seq) and c.ready == py.ready
        if op == "start":
            c.start_at(seq)
            py.start_at(seq)
        elif py.fresh(seq):  # (as the layer does: a number is accepted only once found fresh)
            c.accept(seq)
            py.accept(seq)
        assert (c.top, c.bits) == (py.top, py.bits & ((1 << WINDOW) - 1))
    for seq in range(0, 260):
        assert c.fresh(seq) == py.fresh(seq)


def test_a_context_holds_the_c_window_the_lane_shares():
    ctx = Context(KEYS.secret, KEYS.salt, KEYS.sender_id, KEYS.recipient_id, None, reserve=lambda n: 0,
                  window_ready=True)
    assert Window is OscoreWindow and isinstance(ctx.window, OscoreWindow)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=7), st.binary(min_size=1, max_size=5), st.binary(min_size=1, max_size=300))
def test_the_c_cipher_seals_and_opens_as_cryptographys(kid, piv, text):
    ctx = Context(KEYS.secret, KEYS.salt, KEYS.sender_id, KEYS.recipient_id, None, reserve=lambda n: 0,
                  window_ready=True)
    send, recv, iv = ctx.keys
    c = OscoreContext(recv, send, iv, ctx.window, ("acme", "os-1"))
    sealed = c.seal(kid, piv, text)
    assert sealed == ctx.encrypt(ctx.nonce(kid, piv), text, aad(kid, piv))
    theirs = AESCCM(recv, 8).encrypt(ctx.nonce(kid, piv), text, aad(kid, piv))
    assert c.open(kid, piv, theirs) == text == ctx.decrypt(ctx.nonce(kid, piv), theirs, aad(kid, piv))
    assert c.open(kid, piv, theirs[:-1] + bytes((theirs[-1] ^ 1,))) is None


# -- the common request ------------------------------------------------------------------------------
def test_the_first_request_is_pythons_and_the_next_ones_the_lanes(twin):
    dev = Client(KEYS)
    first = dev.request(mid=1)
    answers, stored = twin.step(first)
    assert twin.took() == 0 and twin.contexts() == 1  # (ready after it: the lane holds the context now)
    assert dev.answer(answers[0][0], first).code == Code.CHANGED
    for mid in range(2, 6):
        request = dev.request(mid=mid, mtype=Type.NON if mid % 2 else Type.CON)
        answers, stored = twin.step(request)
        assert dev.answer(answers[0][0], request).code == Code.CHANGED
        outer = decode(answers[0][0])
        assert outer.code == Code.CHANGED and outer.options == [(O.OSCORE, b"")]
    assert twin.took() == 4
    topic, key, point, headers = stored[0]
    assert (topic, key) == ("telemetry.raw.acme", b"os-1")
    assert headers["coap-exchange"].startswith("udp+oscore 127.0.0.1 40000 ")
    assert point.numeric_values == {"temperature": 22.5} and point.string_values == {"state": "running"}
    assert twin.lane.count("corem_coap_responses", code="2.04") == twin.python.count("corem_coap_responses", code="2.04")


def test_a_kid_context_the_token_path_and_another_profile_are_the_lanes_too(twin):
    dev = Client(KEYS_CTX)
    twin.step(dev.request(mid=1, inner=[(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, b"telemetry"),
                                        (O.CONTENT_FORMAT, b"\x32")], payload=b'{"ts": 1700000000000, "values": {"a": 1}}'))
    for mid, inner, payload in (
        (2, [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x32")],
         b'{"ts": 1700000000000, "values": {"a": 1.5}}'),
        (3, [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x32")], b'{"a": 2}'),
        (4, [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, b"T1"), (O.URI_PATH, b"telemetry"),
             (O.CONTENT_FORMAT, b"\x3c")], READING),  # (the token's device: d1, as identity.py decides)
    ):
        answers, stored = twin.step(dev.request(mid=mid, inner=inner, payload=payload))
        assert stored
    assert twin.took() == 3
    assert stored[0][1] == b"d1"


def test_a_slow_bus_and_a_failing_one_are_answered_sealed_the_same(twin):
    dev = Client(KEYS)
    twin.step(dev.request(mid=1))
    request = dev.request(mid=2)
    twin.receive(request)
    twin.advance(0.6)  # past the piggyback timeout: an empty ACK, then the sealed answer separately
    twin.commit()
    answers, _ = twin.check()
    late = [decode(a[0]) for a in answers]
    assert sorted((m.type, m.code) for m in late) == [(Type.CON, Code.CHANGED), (Type.ACK, Code.EMPTY)]
    assert dev.answer(next(a[0] for a in answers if decode(a[0]).type == Type.CON), request).code == Code.CHANGED
    for mtype in (Type.CON, Type.NON):
        request = dev.request(mid=3 + mtype, mtype=mtype)
        answers, _ = twin.step(request, RuntimeError("disk"))
        inner = dev.answer(answers[0][0], request)
        assert inner.code == Code.SERVICE_UNAVAILABLE and inner.payload == b"bus unavailable; retry later"
        twin.receive(request)  # (its retransmission: the same sealed answer to a CON, nothing to a NON)
        twin.check()
    assert twin.took() == 3


def test_a_retransmission_gets_the_same_sealed_answer_and_no_second_reading(twin):
    dev = Client(KEYS)
    twin.step(dev.request(mid=1))
    request = dev.request(mid=2)
    first, stored = twin.step(request)
    again, stored_again = twin.step(request)
    assert first == again and stored and not stored_again


# -- one window for both paths -----------------------------------------------------------------------------
def test_a_request_taken_by_either_path_is_a_replay_to_the_other(twin):
    dev = Client(KEYS)
    twin.step(dev.request(mid=1, seq=100))  # (Python's; the lane holds the context from now on)
    answers, stored = twin.step(dev.request(mid=2, seq=100))  # the same number, a new message: Python's 4.01
    assert decode(answers[0][0]).code == Code.UNAUTHORIZED and answers[0][0].endswith(b"Replay detected")
    twin.step(dev.request(mid=3, seq=101))  # the lane's
    assert twin.took() == 1
    answers, _ = twin.step(dev.request(mid=4, seq=101))  # its replay: refused by Python, the window shared
    assert decode(answers[0][0]).code == Code.UNAUTHORIZED
    # a number Python takes (an inner request the lane does not: Observe), then the lane is offered it
    twin.step(dev.request(mid=5, seq=102, inner=[(O.OBSERVE, b""), *TELEMETRY]))
    answers, _ = twin.step(dev.request(mid=6, seq=102))
    assert decode(answers[0][0]).code == Code.UNAUTHORIZED
    answers, _ = twin.step(dev.request(mid=7, seq=102 - WINDOW))  # older than the window covers
    assert decode(answers[0][0]).code == Code.UNAUTHORIZED
    twin.step(dev.request(mid=8, seq=99))  # below the top, within the window, never seen: fresh
    assert twin.took() == 2


def test_a_forged_request_leaves_the_window_as_it_was(twin):
    dev = Client(KEYS)
    twin.step(dev.request(mid=1))
    answers, _ = twin.step(dev.request(mid=2, seq=5, forge=True))
    assert decode(answers[0][0]).code == Code.BAD_REQUEST  # Python's "Decryption failed"
    twin.step(dev.request(mid=3, seq=5))  # the real one: fresh still, and the lane's
    assert twin.took() == 1


# -- what stays Python's -----------------------------------------------------------------------------------
def test_a_context_whose_window_is_unknown_is_pythons_until_echo_starts_it(echo_fixed):
    t = OscoreTwin(used=True)
    try:
        dev = Client(KEYS)
        answers, stored = t.step(dev.request(mid=1))
        challenge = dev.answer(answers[0][0], dev.request(mid=1, seq=0))
        assert challenge.code == Code.UNAUTHORIZED and not stored and t.contexts() == 0
        echo = bytes(challenge.opt(O.ECHO))
        answers, stored = t.step(dev.request(mid=2, inner=[*TELEMETRY[:1], (O.CONTENT_FORMAT, b"\x3c"),
                                                           (O.ECHO, echo)]))
        assert stored and t.took() == 0 and t.contexts() == 1  # Echo started the window: the lane's from now on
        t.step(dev.request(mid=3))
        assert t.took() == 1
    finally:
        t.close()


def test_a_shared_context_stays_pythons():
    t = OscoreTwin(shared=True)
    try:
        dev = Client(KEYS)
        for mid in range(1, 5):
            answers, stored = t.step(dev.request(mid=mid))
            assert dev.answer(answers[0][0], dev.request(mid=mid, seq=mid - 1)).code == Code.CHANGED and stored
        assert t.took() == 0 and t.contexts() == 0
    finally:
        t.close()


def test_with_the_python_window_no_context_is_the_lanes(monkeypatch):
    """COREM_PURE_PYTHON (or no C lane): a Context holds ReplayWindow, which the lane cannot share."""
    from corem.oscore import context

    monkeypatch.setattr(context, "Window", ReplayWindow)
    t = OscoreTwin()
    try:
        dev = Client(KEYS)
        for mid in range(1, 4):
            answers, stored = t.step(dev.request(mid=mid))
            assert stored
        assert t.took() == 0 and t.contexts() == 0
    finally:
        t.close()


def bad_requests(dev: Client) -> list[dict]:
    """Requests the lane leaves to Python: malformed options, other methods, options, paths."""
    good = dev.option(b"\x30")
    return [
        dict(option=b""),  # no partial IV, no kid
        dict(option=b"\x20" + good[1:]),  # reserved bits
        dict(option=b"\x06" + bytes(6) + dev.kid),  # a partial IV of 6 bytes
        dict(option=b"\x05\x30"),  # shorter than its partial IV
        dict(option=b"\x01\x30"),  # no kid flag (bytes after the piv)
        dict(option=b"\x01\x30" + dev.kid),  # no kid flag
        dict(option=b"\x19\x30"),  # kid context length missing
        dict(option=b"\x19\x30\x05ab"),  # shorter than its kid context
        dict(option=b"\x09\x30" + dev.kid + b"\x00"),  # another kid: no such context
        dict(option=b"\x09\x30" + bytes(8)),  # a kid longer than 7 bytes
        dict(outer=[(O.OSCORE, good)]),  # the option twice
        dict(outer=[(O.URI_PATH, b"telemetry")]),  # an outer option
        dict(outer=[(O.CONTENT_FORMAT, b"\x3c")]),
        dict(outer=[(O.URI_HOST, b"corem")]),
        dict(outer_code=Code.FETCH),
        dict(outer_code=Code.GET),
        dict(outer_code=Code.PUT),
        dict(mtype=Type.ACK),
        dict(code=Code.PUT),  # another inner method
        dict(code=Code.GET, payload=b""),
        dict(inner=[(O.URI_PATH, b"elsewhere"), (O.CONTENT_FORMAT, b"\x3c")]),
        dict(inner=[(O.URI_PATH, b"v1"), (O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c")]),  # Drogue's door
        dict(inner=[(O.OBSERVE, b""), *TELEMETRY]),
        dict(inner=[*TELEMETRY, (O.ECHO, b"x")]),
        dict(inner=[*TELEMETRY, (O.SIZE1, b"\x05")]),
        dict(inner=[(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x00")], payload=b"x"),
        dict(inner=[*TELEMETRY, (2049, b"")]),  # an unknown critical option: Python's 4.02
        dict(payload=b"\xff\xff"),  # not CBOR
        dict(payload=b""),  # no payload
        dict(forge=True),
    ]


def test_malformed_options_other_requests_and_forgeries_stay_pythons(twin):
    dev = Client(KEYS)
    twin.step(dev.request(mid=1))
    for i, kw in enumerate(bad_requests(dev)):
        twin.step(dev.request(mid=0x200 + i, seq=100 + i, **kw))
    assert twin.took() == 0
    codes = []
    for i, kw in enumerate(bad_requests(dev)):  # (answered alike, whichever the codes)
        answers, _ = twin.step(dev.request(mid=0x300 + i, seq=200 + i, **kw))
        codes.append(decode(answers[0][0]).code if answers else None)
    assert Code.BAD_OPTION in codes and Code.METHOD_NOT_ALLOWED in codes and Code.BAD_REQUEST in codes
    twin.step(dev.request(mid=0x400, seq=400))
    assert twin.took() == 1


def test_a_device_changed_or_removed_is_pythons_again(twin):
    dev = Client(KEYS)
    twin.step(dev.request(mid=1))
    twin.step(dev.request(mid=2))
    assert twin.took() == 1 and twin.contexts() == 1
    twin.registry.remove_device("acme", "os-1")
    twin.registry.add_device("acme", "os-1", oscore=KEYS, profile="flat-too")
    twin.directory.refresh(force=True)
    assert twin.contexts() == 0
    twin.step(dev.request(mid=3))  # Python's (and the context the lane's again)
    twin.step(dev.request(mid=4))
    assert twin.took() == 2
    twin.registry.remove_device("acme", "os-1")
    twin.directory.refresh(force=True)
    assert twin.contexts() == 0
    answers, _ = twin.step(dev.request(mid=5))
    assert decode(answers[0][0]).code == Code.UNAUTHORIZED and twin.took() == 2


def test_a_context_the_layer_evicts_leaves_the_lane(twin, monkeypatch, echo_fixed):
    monkeypatch.setattr(oscore_layer, "MAX_CONTEXTS", 1)
    a, b = Client(KEYS), Client(KEYS_CTX)
    twin.step(a.request(mid=1))
    assert twin.contexts() == 1
    twin.step(b.request(mid=2, inner=[(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x32")], payload=b'{"a": 1}'))
    assert twin.contexts() == 1  # (a's went with its Context: a new one would begin with an empty window)
    request = a.request(mid=3)
    answers, _ = twin.step(request)  # a new Context on both sides, its window unknown: Echo, Python's
    assert a.answer(answers[0][0], request).opt(O.ECHO) is not None
    assert twin.took() == 0


def test_the_lanes_requests_are_counted_with_the_layers(twin):
    dev = Client(KEYS)
    for mid in range(1, 4):
        twin.step(dev.request(mid=mid))
    from corem.metrics import gather

    def samples(side):
        return gather([(side.oscore, {})])
    lane, python = samples(twin.lane), samples(twin.python)
    for name in ("corem_oscore_requests", "corem_oscore_sealed"):
        assert lane[name] == python[name] and sum(python[name].values()) == 3


# -- generated requests ----------------------------------------------------------------------------------
PAYLOADS = st.sampled_from([READING, b"\xa1\x61t\xf9\x3e\x00", b"\xff", b"", b'{"a": 1}']) | st.dictionaries(
    st.sampled_from(["a", "b", "ts"]), st.integers(-5, 5) | st.text(max_size=3), max_size=3).map(cbor2.dumps)
INNER = st.sampled_from([
    TELEMETRY, [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x32")],
    [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c")],
    [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, b"T1"), (O.URI_PATH, b"telemetry"),
     (O.CONTENT_FORMAT, b"\x3c")],
    [(O.URI_PATH, b"telemetry")], [(O.URI_PATH, b"other"), (O.CONTENT_FORMAT, b"\x3c")],
    [(O.OBSERVE, b""), *TELEMETRY]])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.sampled_from([KEYS, KEYS_CTX]), st.integers(0, 40), INNER, PAYLOADS,
    st.sampled_from([Type.CON, Type.NON]), st.sampled_from([Code.POST, Code.PUT]),
    st.sampled_from(["commit", "fail", "slow", "forge", "retransmit"])), min_size=1, max_size=10))
def test_generated_oscore_requests_are_stored_and_answered_the_same_with_and_without_the_lane(steps):
    t = OscoreTwin()
    clients = {KEYS: Client(KEYS), KEYS_CTX: Client(KEYS_CTX)}
    try:
        for i, (keys, seq, inner, payload, mtype, code, what) in enumerate(steps):
            request = clients[keys].request(inner, payload, mid=0x700 + i, seq=seq, mtype=mtype, code=code,
                                            forge=what == "forge")
            t.receive(request)
            if what == "slow":
                t.advance(0.6)
            t.commit(RuntimeError("disk") if what == "fail" else None)
            t.check()
            if what == "retransmit":
                t.receive(request)
                t.check()
    finally:
        t.close()


def test_most_common_requests_are_the_lanes(twin):
    dev = Client(KEYS)
    twin.step(dev.request(mid=1))
    for mid in range(2, 52):
        twin.step(dev.request(mid=mid, mtype=Type.NON if mid % 2 else Type.CON))
    assert twin.took() == 50


def test_aiocoaps_oscore_requests_are_the_lanes_and_it_opens_the_lanes_answers(twin, tmp_path):
    aiocoap = pytest.importorskip("aiocoap")
    from aiocoap import oscore as aio

    from .test_oscore import device_context

    dev = device_context(tmp_path / "dev", KEYS)
    for mid in range(1, 5):
        msg = aiocoap.Message(code=aiocoap.POST, uri="coap://127.0.0.1/telemetry", payload=READING, content_format=60)
        msg.direction = aio.Direction.OUTGOING
        outer, request_id = dev.protect(msg)
        outer.mtype, outer.mid, outer.token = aiocoap.CON, mid, b"tk%d" % mid
        answers, stored = twin.step(outer.encode())
        answer = aiocoap.Message.decode(answers[0][0])
        answer.direction = aio.Direction.INCOMING
        inner, _ = dev.unprotect(answer, request_id)
        assert inner.code == aiocoap.CHANGED and stored
    assert twin.took() == 3


def test_a_request_the_lane_takes_is_taken_whole_even_when_memory_runs_out_after_it_is_queued():
    """Whatever allocation fails while the lane takes a request, either nothing of it stays (Python's
    path) or all of it does: its exchange remembered and its number accepted -- never a request
    waiting for its answer whose number is still fresh (the same request would be taken, and its
    answer sealed under its nonce, twice)."""
    _testcapi = pytest.importorskip("_testcapi")
    t = OscoreTwin()
    dev = Client(KEYS)
    t.step(dev.request(mid=1))  # (Python's: the lane holds the context from here)
    fl = t.lane.lane
    lane = fl.lane
    ctx = next(iter(fl._oscore.values()))[0]
    tried = 0
    for k in range(1, 400):
        fl.begin()  # (a new epoch: the device's first reading in it is noted as heard)
        seq = 1000 + k
        waiting = lane.counters()["waiting"]
        _testcapi.set_nomemory(k, 0)
        try:
            lane.receive(dev.request(mid=0x2000 + k, seq=seq, mtype=Type.NON), ("127.0.0.1", 41000), t.clock[0],
                         1_000_000)
        except MemoryError:
            tried += 1
        finally:
            _testcapi.remove_mem_hooks()
        assert lane.counters()["waiting"] == waiting or not ctx.window.fresh(seq)
    assert tried  # (some allocation did fail)


def test_a_decrypted_message_larger_than_a_datagram_is_pythons_not_opened():
    """(receive_plain: DTLS's plaintext) a message over max_datagram never reaches the OSCORE
    opening, whose buffer holds a datagram: the Python path's, untouched."""
    t = OscoreTwin()
    dev = Client(KEYS)
    t.step(dev.request(mid=1))
    lane = t.lane.lane.lane
    opt = bytes((0x09, 0x40)) + dev.kid  # (a fresh partial IV, the context's kid)
    big = encode(Message(Type.CON, Code.POST, 7, b"", [(O.OSCORE, opt)], b"\x00" * 200_000))
    lane.receive_plain(big, ("127.0.0.1", 40000), 0, 1000.0, 1_000_000)
    slow, records, _, _ = lane.take()
    assert [m for m, _ in slow] == [big] and not records
