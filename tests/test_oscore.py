"""OSCORE (corem/oscore), sans-IO: the RFC 8613 test vectors, and corem's layer against aiocoap's
OSCORE implementation as the device (its contexts protect the requests and unprotect corem's
answers), on a real registry database."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("aiocoap.oscore")
import aiocoap  # noqa: E402
from aiocoap import oscore as aio  # noqa: E402

from corem.coap import Endpoint, Router  # noqa: E402
from corem.coap.observe import Observers, answer_observe  # noqa: E402
from corem.coap.response import Response  # noqa: E402
from corem.codec import Code, OptionNumber, decode  # noqa: E402
from corem.codec.options import UNDERSTOOD_CRITICAL  # noqa: E402
from corem.oscore import Oscore  # noqa: E402
from corem.oscore.context import WINDOW, ReplayWindow, derive  # noqa: E402
from corem.oscore.protect import OscoreError, parse_option  # noqa: E402
from corem.registry.db import Db  # noqa: E402
from corem.registry.oscore import OscoreState, fingerprint  # noqa: E402
from corem.registry.store import Device, OscoreKeys, RegistryError, parse_oscore  # noqa: E402

SECRET = bytes(range(1, 17))
SALT = bytes.fromhex("9e7ca92223786340")
PEER = ("192.0.2.7", 40001)


def test_key_derivation_matches_rfc_8613_appendix_c1():
    # C.1.1, the client's view: Sender ID empty, Recipient ID 0x01
    sender, recipient, iv = derive(SECRET, SALT, b"", b"\x01", None)
    assert sender.hex() == "f0910ed7295e6ad4b54fc793154302ff"
    assert recipient.hex() == "ffb14e093c94c9cac9471648b4f98710"
    assert iv.hex() == "4622d4dd6d944168eefb54987c"


def test_the_option_value_is_read_as_section_6_1_says_and_bad_ones_are_4_02():
    assert parse_option(b"") == (None, None, None)
    assert parse_option(bytes.fromhex("0914")) == (b"\x14", b"", None)  # C.4: piv 0x14, empty kid
    assert parse_option(bytes.fromhex("19140837cbf3210017a2d3")) == (b"\x14", b"", bytes.fromhex("37cbf3210017a2d3"))
    for bad in (b"\x20", b"\x06" + bytes(6), b"\x03\x01", b"\x10", b"\x1a\x01"):
        with pytest.raises(OscoreError) as e:
            parse_option(bad)
        assert e.value.code == Code.BAD_OPTION


@settings(max_examples=300)
@given(st.lists(st.integers(0, 200), max_size=80))
def test_the_replay_window_accepts_each_number_once_and_nothing_older_than_it_covers(seqs):
    w, seen, top = ReplayWindow(True), set(), -1
    for seq in seqs:
        expected = seq not in seen and seq > top - WINDOW
        assert w.fresh(seq) == expected
        if expected:
            w.accept(seq)
            seen.add(seq)
            top = max(top, seq)


def test_an_uninitialised_window_accepts_nothing_until_echo_starts_it():
    w = ReplayWindow(False)
    assert not w.fresh(0) and not w.fresh(10**6)
    w.start_at(500)
    assert not w.fresh(500) and not w.fresh(480) and w.fresh(501)


def test_keys_are_checked_field_by_field():
    k = parse_oscore("01", "", "0123456789abcdef", None, "9e7c", None)
    assert k == OscoreKeys(sender_id=b"\x01", recipient_id=b"", secret=b"0123456789abcdef", salt=b"\x9e\x7c")
    assert parse_oscore(None, None, None, None) is None
    for args, field in ((("01", None, "0123456789abcdef", None), "oscore"),
                        (("01", "02", "short", None), "oscore_secret"),
                        (("0x1", "02", "0123456789abcdef", None), "oscore_sender_id"),
                        (("01", "0102030405060708", "0123456789abcdef", None), "oscore_recipient_id"),
                        (("01", "01", "0123456789abcdef", None), "oscore_recipient_id")):
        with pytest.raises(RegistryError, match=f"^{field}"):
            parse_oscore(*args)


def test_sequence_numbers_are_reserved_in_disjoint_blocks_across_connections(tmp_path):
    a, b = OscoreState(Db(tmp_path / "r.db")), OscoreState(Db(tmp_path / "r.db"))
    starts = [a.reserve("ctx", 1000), b.reserve("ctx", 1000), a.reserve("ctx", 10)]
    assert starts == [0, 1000, 2000]
    assert not a.used("ctx")
    b.mark_used("ctx")
    assert a.used("ctx") and a.reserve("ctx", 1) == 2010


# -- the layer, against aiocoap's OSCORE as the device --------------------------------------------------
KEYS = OscoreKeys(sender_id=b"\x01", recipient_id=b"\x02", secret=b"0123456789abcdef0123", salt=b"\x9e\x7c")
DEVICE = Device(tenant="acme", device="s1", oscore=KEYS)


def device_context(path, keys: OscoreKeys = KEYS) -> aio.FilesystemSecurityContext:
    path.mkdir(exist_ok=True)
    (path / "settings.json").write_text(json.dumps({
        "sender-id_hex": keys.recipient_id.hex(), "recipient-id_hex": keys.sender_id.hex(),
        "secret_hex": keys.secret.hex(), "salt_hex": keys.salt.hex()}))
    return aio.FilesystemSecurityContext(str(path))


class Server:
    """An endpoint and a router with OSCORE, one telemetry-like resource and one observable one."""

    def __init__(self, db_path, devices=(DEVICE,)):
        by_kid = {d.oscore.kid: d for d in devices}
        self.state = OscoreState(Db(db_path))
        self.oscore = Oscore(lambda ctx, kid: by_kid.get((ctx or b"", kid)), self.state,
                             UNDERSTOOD_CRITICAL - {OptionNumber.OSCORE})
        self.endpoint = Endpoint()
        self.router = Router()
        self.router.unwrap = self.oscore.unwrap
        self.observers = Observers(self.endpoint)
        self.seen = []

        def post(req, params):
            self.seen.append((req.identity.device, bytes(req.message.payload)))
            return Response(Code.CHANGED, b"", [(OptionNumber.LOCATION_PATH, b"r")])

        def get(req, params):
            return answer_observe(self.observers, req, "state", Response(Code.CONTENT, b"v1"), 0.0)

        self.router.add("telemetry", {Code.POST: post})
        self.router.add("state", {Code.GET: get})

    def send(self, data: bytes, peer=PEER) -> list[bytes]:
        req = self.endpoint.receive(data, peer, 0.0)
        if req is not None:
            r = self.router.dispatch(req)
            if r is not None:
                req.respond(r.code, r.options, r.payload)
        return [d for d, _ in self.endpoint.datagrams_to_send()]


def sealed(dev: aio.FilesystemSecurityContext, code, path: str, payload=b"", mid=1, **opts):
    msg = aiocoap.Message(code=code, uri=f"coap://127.0.0.1/{path}", payload=payload, **opts)
    msg.direction = aio.Direction.OUTGOING
    outer, request_id = dev.protect(msg)
    outer.mtype, outer.mid, outer.token = aiocoap.CON, mid, b"tk%d" % mid
    return outer.encode(), request_id


def opened(dev, data: bytes, request_id) -> aiocoap.Message:
    msg = aiocoap.Message.decode(data)
    msg.direction = aio.Direction.INCOMING
    inner, _ = dev.unprotect(msg, request_id)
    return inner


def test_a_sealed_reading_is_routed_as_the_device_sent_it_and_answered_sealed(tmp_path):
    server, dev = Server(tmp_path / "r.db"), device_context(tmp_path / "dev")
    data, rid = sealed(dev, aiocoap.POST, "telemetry", b"\xa1\x61t\x01", content_format=60)
    [answer] = server.send(data)
    outer = decode(answer)
    assert outer.code == Code.CHANGED and outer.opt(OptionNumber.OSCORE) is not None
    assert outer.opt(OptionNumber.LOCATION_PATH) is None  # class E: only inside
    inner = opened(dev, answer, rid)
    assert inner.code == aiocoap.CHANGED and inner.opt.location_path == ("r",)
    assert server.seen == [("s1", b"\xa1\x61t\x01")]
    # the same device from another address: served at once, no extra round trip
    data, rid = sealed(dev, aiocoap.POST, "telemetry", b"\xa0", mid=2, content_format=60)
    [answer] = server.send(data, ("198.51.100.3", 9))
    assert opened(dev, answer, rid).code == aiocoap.CHANGED and len(server.seen) == 2
    assert server.oscore.stats["echo"] == 0 and server.state.used(fingerprint(KEYS))


def test_replays_wrong_keys_unknown_contexts_and_bad_options_get_section_8_2_errors(tmp_path):
    server, dev = Server(tmp_path / "r.db"), device_context(tmp_path / "dev")
    data, _ = sealed(dev, aiocoap.POST, "telemetry", b"\xa0", content_format=60)
    server.send(data)
    # the same bytes again from another address (the message layer's dedup is per address)
    [answer] = server.send(data, ("198.51.100.3", 9))
    assert (decode(answer).code, bytes(decode(answer).payload)) == (Code.UNAUTHORIZED, b"Replay detected")
    wrong = device_context(tmp_path / "wrong", OscoreKeys(sender_id=b"\x01", recipient_id=b"\x02",
                                                          secret=b"another-secret-of-20"))
    for _ in range(3):  # fresh numbers: the replay check comes before decryption
        wrong.new_sequence_number()
    data, _ = sealed(wrong, aiocoap.POST, "telemetry", b"\xa0", mid=5, content_format=60)
    [answer] = server.send(data)
    assert (decode(answer).code, bytes(decode(answer).payload)) == (Code.BAD_REQUEST, b"Decryption failed")
    stranger = device_context(tmp_path / "stranger", OscoreKeys(sender_id=b"\x01", recipient_id=b"\x09",
                                                                secret=KEYS.secret))
    data, _ = sealed(stranger, aiocoap.POST, "telemetry", b"\xa0", mid=6, content_format=60)
    [answer] = server.send(data)
    # (on plain UDP the diagnostic is cut to the request's size: no amplification)
    assert decode(answer).code == Code.UNAUTHORIZED and b"Security context not found".startswith(
        bytes(decode(answer).payload)) and len(decode(answer).payload) > 10
    m = decode(data)
    m.options = [(n, b"\xff" if n == OptionNumber.OSCORE else v) for n, v in m.options]
    m.mid = 7
    from corem.codec import encode
    [answer] = server.send(encode(m))
    assert decode(answer).code == Code.BAD_OPTION
    assert server.seen == [("s1", b"\xa0")]  # nothing but the first got through
    st = server.oscore.stats
    assert (st["refused_replay"], st["refused_decrypt"], st["refused_unknown_context"], st["refused_bad_option"]) == (1, 1, 1, 1)


def test_after_a_restart_echo_reestablishes_freshness_and_no_nonce_is_used_twice(tmp_path):
    dev = device_context(tmp_path / "dev")
    first = Server(tmp_path / "r.db")
    data, _ = sealed(dev, aiocoap.POST, "telemetry", b"\xa0", content_format=60)
    first.send(data)
    old_request = data
    again = Server(tmp_path / "r.db")  # a restart: the window is unknown
    # the old request replayed into the new process: a sealed 4.01 with Echo, never processed
    [challenge] = again.send(old_request)
    data, rid = sealed(dev, aiocoap.POST, "telemetry", b"\xa1\x61t\x02", mid=2, content_format=60)
    [challenge] = again.send(data)
    outer = decode(challenge)
    assert outer.code == Code.CHANGED and len(outer.opt(OptionNumber.OSCORE)) > 1  # corem's own partial IV
    inner = opened(dev, challenge, rid)
    assert inner.code == aiocoap.UNAUTHORIZED and inner.opt.echo
    assert again.seen == []
    data, rid = sealed(dev, aiocoap.POST, "telemetry", b"\xa1\x61t\x02", mid=3, content_format=60, echo=inner.opt.echo)
    [answer] = again.send(data)
    assert opened(dev, answer, rid).code == aiocoap.CHANGED and again.seen == [("s1", b"\xa1\x61t\x02")]
    assert again.oscore.stats["echo"] == 2
    [replayed] = again.send(old_request, ("198.51.100.3", 9))  # older than the window's start
    assert bytes(decode(replayed).payload) == b"Replay detected"


def test_notifications_of_a_sealed_observation_are_sealed_with_corem_s_own_partial_ivs(tmp_path):
    server, dev = Server(tmp_path / "r.db"), device_context(tmp_path / "dev")
    data, rid = sealed(dev, aiocoap.GET, "state", observe=0)
    [answer] = server.send(data)
    outer = decode(answer)
    assert outer.code == Code.CONTENT and outer.observe is not None  # outer FETCH -> 2.05, Observe outside too
    first = opened(dev, answer, rid)
    assert first.payload == b"v1"
    pivs = {bytes(outer.opt(OptionNumber.OSCORE))}
    for n in range(3):
        server.observers.notify("state", Code.CONTENT, None, b"v%d" % (n + 2), 1.0)
        [note] = [d for d, _ in server.endpoint.datagrams_to_send()]
        pivs.add(bytes(decode(note).opt(OptionNumber.OSCORE)))
        assert opened(dev, note, rid).payload == b"v%d" % (n + 2)
    assert len(pivs) == 4  # each with a partial IV of its own


def test_a_restart_takes_sequence_numbers_past_every_block_used_before(tmp_path):
    dev = device_context(tmp_path / "dev")
    first = Server(tmp_path / "r.db")
    data, _ = sealed(dev, aiocoap.GET, "state", observe=0)
    [answer] = first.send(data)
    first_piv = parse_option(decode(answer).opt(OptionNumber.OSCORE)).piv
    assert first_piv == b"\x00"  # corem's first own number: 0, from the block 0-999
    again = Server(tmp_path / "r.db")  # a restart
    data, _ = sealed(dev, aiocoap.POST, "telemetry", b"\xa0", mid=2, content_format=60)
    [challenge] = again.send(data)  # the Echo answer: sealed with a number of corem's own
    assert int.from_bytes(parse_option(decode(challenge).opt(OptionNumber.OSCORE)).piv, "big") == 1000


def test_an_answer_that_cannot_get_a_sequence_number_is_an_unprotected_5_03_not_a_dead_server(tmp_path):
    """An answer sealed with a number of corem's own (an Observe answer here) needs the next block
    of them stored first (RFC 8613 §B.1.1).  With the registry locked by another writer, that
    failure escaped `deliver` and ended `corem serve` (found by a review): now the answer is an
    unprotected 5.03 with Max-Age, counted, and the next request, the lock gone, is served sealed."""
    import sqlite3

    from corem.net.udp import deliver

    server, dev = Server(tmp_path / "r.db"), device_context(tmp_path / "dev")
    data, rid = sealed(dev, aiocoap.POST, "telemetry", b"\xa0", content_format=60)
    deliver(server.endpoint, server.router, data, PEER, 0.0)
    assert [opened(dev, d, rid).code for d, _ in server.endpoint.datagrams_to_send()] == [aiocoap.CHANGED]
    server.state.db._conn.execute("PRAGMA busy_timeout=100")  # (not 30 s: the lock is held throughout)
    other = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    data, rid = sealed(dev, aiocoap.GET, "state", mid=2, observe=0)
    deliver(server.endpoint, server.router, data, PEER, 1.0)
    [answer] = [decode(d) for d, _ in server.endpoint.datagrams_to_send()]
    assert answer.code == Code.SERVICE_UNAVAILABLE and answer.opt(OptionNumber.OSCORE) is None
    assert answer.max_age == 5 and server.router.handler_errors == 0
    assert sum(s.value for s in server.oscore.metrics() if s.name == "corem_oscore_seal_failures") == 1
    other.execute("ROLLBACK")
    data, rid = sealed(dev, aiocoap.GET, "state", mid=3, observe=0)
    deliver(server.endpoint, server.router, data, PEER, 2.0)
    [again] = [d for d, _ in server.endpoint.datagrams_to_send()]
    assert opened(dev, again, rid).payload == b"v1"
