"""The handshake path's shortcuts decide as the general path does (issue 27: less Python per
handshake): the engine's ClientHello datagram taken whole, the handshake slots' verdict remembered
from `consider` to `admit`."""

from __future__ import annotations

import random

import pytest

from corem.dtls.engine import Client, DtlsDecodeError, Engine, EngineParams
from corem.dtls.engine.records import ALERT, HANDSHAKE, parse_record_untrusted, plaintext_record
from corem.dtls.slots import ADDRESS, FULL, HandshakeSlots

PSK = b"0123456789abcdef"
KEYS = {b"device-1": PSK}
PEER = ("192.0.2.10", 40000)


def _engine(monkeypatch: pytest.MonkeyPatch) -> Engine:
    stream = random.Random(3)
    monkeypatch.setattr("os.urandom", lambda n: stream.randbytes(n))
    return Engine(KEYS.get, EngineParams())


def _hello_datagram() -> bytes:
    cl = Client(b"device-1", PSK, cid=b"")
    cl.start(0.0)
    [d] = cl.datagrams_to_send()
    return d


def _answers(monkeypatch: pytest.MonkeyPatch, datagram: bytes) -> tuple[list[bytes], dict[str, int], int]:
    eng = _engine(monkeypatch)
    eng.receive(datagram, PEER, 0.0)
    return [d for d, _ in eng.datagrams_to_send()], dict(eng.stats.records_dropped), eng.stats.hello_verify_sent


def test_a_hello_alone_is_answered_as_one_followed_by_another_record(monkeypatch):
    """A datagram that is one ClientHello record takes the engine's shortcut; with a record after it,
    the records are taken one by one: the same HelloVerifyRequest either way"""
    hello = _hello_datagram()
    alone = _answers(monkeypatch, hello)
    # (an alert at epoch 0 after it: no session, dropped as no_session; the hello is answered first)
    followed = _answers(monkeypatch, hello + plaintext_record(ALERT, 0, 9, b"\x01\x00"))
    assert alone[0] and alone[0] == followed[0] and alone[2] == followed[2] == 1
    assert followed[1] == {"no_session": 1} and alone[1] == {}


@pytest.mark.parametrize("change, reason", [
    ("length_long", "record_truncated"), ("version", "record_version"), ("epoch", "no_session"),
    ("overflow", "record_overflow"), ("length_short", None)])
def test_a_hello_record_the_shortcut_does_not_take_is_judged_record_by_record(monkeypatch, change, reason):
    """What the shortcut leaves (a length that is not the datagram's, another version, epoch 1, a
    record over the limit) goes through the records one by one: dropped for the parser's reason (or,
    one byte short, a hello cut short and a byte that is no record), never answered"""
    d = bytearray(_hello_datagram())
    if change == "length_short":
        d[11:13] = (len(d) - 14).to_bytes(2, "big")
    elif change == "length_long":
        d[11:13] = (len(d) - 12).to_bytes(2, "big")
    elif change == "version":
        d[1:3] = b"\xfe\xfe"
    elif change == "epoch":
        d[3:5] = b"\x00\x01"
    else:
        d[11:13] = b"\xff\xff"
        d += bytes(0xFFFF - (len(d) - 13))
    sent, dropped, hvr = _answers(monkeypatch, bytes(d))
    assert sent == [] and hvr == 0
    if reason is not None:
        assert dropped == {reason: 1}
        if reason != "no_session":
            with pytest.raises(DtlsDecodeError):
                parse_record_untrusted(bytes(d), 0, EngineParams().cid_length)
    else:
        assert dropped.get("record_truncated") == 1, dropped


def test_a_dtls_1_0_hello_record_is_answered_as_before(monkeypatch):
    """A ClientHello in a DTLS 1.0 record header (as some clients send their first): answered"""
    d = bytearray(_hello_datagram())
    d[1:3] = b"\xfe\xff"
    got = _answers(monkeypatch, bytes(d))
    assert got[2] == 1 and got[1] == {}


def test_the_whole_handshake_through_the_shortcut_establishes(monkeypatch):
    """The client's three flights (two hellos by the shortcut, the PSK flight by C): one session"""
    eng = _engine(monkeypatch)
    cl = Client(b"device-1", PSK, cid=b"")
    cl.start(0.0)
    for _ in range(4):
        for d in cl.datagrams_to_send():
            assert d[0] == HANDSHAKE
            eng.receive(d, PEER, 0.0)
        for d, _p in eng.datagrams_to_send():
            cl.receive(d, 0.0)
    assert cl.established and PEER in eng.sessions and not eng.handshakes
    assert eng.stats.handshakes_completed == 1 and eng.stats.hello_verify_sent == 1


def test_admit_after_consider_uses_its_verdict_only_while_nothing_changed():
    """`consider` is remembered for the `admit` that follows it; a slot taken or freed in between
    and the verdict is made again"""
    s = HandshakeSlots(1)
    a, b = ("192.0.2.1", 1), ("198.51.100.1", 1)
    assert s.consider(a, 0.0).reason is None
    assert s.admit(b, 0.0).reason is None  # (the table is full now)
    assert s.admit(a, 0.0).reason == FULL and a not in s
    s.release(b)
    assert s.consider(a, 0.0).reason is None and s.admit(a, 0.0).reason is None and a in s


def test_admit_after_consider_of_another_peer_decides_for_its_own():
    """A remembered verdict is the peer's it was made for"""
    s = HandshakeSlots(100)  # (2 an address)
    first, second = ("192.0.2.1", 1), ("192.0.2.1", 2)
    assert s.admit(first, 0.0).reason is None and s.admit(second, 0.0).reason is None
    assert s.consider(("203.0.113.9", 1), 0.0).reason is None
    assert s.admit(("192.0.2.1", 3), 0.0).reason == ADDRESS


def test_server_randoms_come_from_a_pool_drawn_now_and_then(monkeypatch):
    """os.urandom is called once for many handshakes' server randoms and CIDs, each different"""
    calls = []
    real = __import__("os").urandom
    monkeypatch.setattr("os.urandom", lambda n: calls.append(n) or real(n))
    eng = Engine(KEYS.get, EngineParams())
    calls.clear()
    drawn = [eng._randoms() for _ in range(100)]
    assert len(calls) == 2  # (64 handshakes' worth, then the next 64)
    assert len({r for r, _ in drawn}) == 100 and len({c for _, c in drawn}) == 100
    assert all(len(r) == 32 and c is not None and len(c) == EngineParams().cid_length for r, c in drawn)


def test_a_forked_child_never_uses_the_randomness_its_parent_drew():
    """Workers forked from one process: the child never uses the pool its parent drew before the
    fork (the parent goes on with it: no other process has it)"""
    import os

    eng = Engine(KEYS.get, EngineParams())
    eng._randoms()  # (the pool drawn, most of it unused)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (whatever happens, it never goes on with the suite)
        try:
            os.write(write, eng._randoms()[0])
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64)
    os.waitpid(pid, 0)
    parent = eng._randoms()[0]
    assert len(child) == 32 and child != parent
    assert eng._pool.find(child) == -1, "the child drew its own"


def test_the_engine_offers_each_answer_before_a_finished_handshakes_bookkeeping(monkeypatch):
    """`eager` is told as soon as an answer is in the outbox -- the HelloVerifyRequest, the ServerHello
    flight, our Finished -- and for the last, before the session's hooks run"""
    eng = _engine(monkeypatch)
    events: list[tuple[str, int]] = []
    sent: list[bytes] = []

    def eager() -> None:
        out = [d for d, _ in eng.datagrams_to_send()]
        sent.extend(out)
        events.append(("eager", len(out)))

    eng.eager = eager
    eng.established = lambda conn: events.append(("established", 0)) and None
    eng.on_session = lambda conn, live: events.append(("on_session", int(live)))
    cl = Client(b"device-1", PSK, cid=b"")
    cl.start(0.0)
    for _ in range(4):
        for d in cl.datagrams_to_send():
            eng.receive(d, PEER, 0.0)
        sent.extend(d for d, _ in eng.datagrams_to_send())
        for d in sent:
            cl.receive(d, 0.0)
        sent.clear()
    assert cl.established and PEER in eng.sessions
    assert events == [("eager", 1), ("eager", 1), ("eager", 1), ("established", 0), ("on_session", 1)]


def test_the_edge_sends_a_handshakes_last_flight_before_the_session_is_set_up():
    """Behind the engine, the edge sends the answer to a batch's last datagram at once: when the
    finished handshake's hooks run, our Finished is already on the wire"""
    from tests.test_lane_dtls import Coaps, Device

    c = Coaps()
    try:
        dev = Device(c.address)
        engine = c.layer.engine
        hook = engine.established
        sent_by_then: list[int] = []

        def established(conn):  # (the edge's datagrams and the lane's: it answers the first hello)
            sent_by_then.append(c.edge.stats.datagrams_out + c.lane.counters["datagrams_out"])
            assert hook is not None
            return hook(conn)

        engine.established = established
        c.handshake(dev)
        # (the HelloVerifyRequest, the ServerHello flight and our ChangeCipherSpec + Finished)
        assert sent_by_then == [3]
        dev.close()
    finally:
        c.close()


def test_the_edge_sends_the_answers_to_a_batch_once_after_its_last_datagram():
    """Two devices' hellos with their cookies in one batch: both ServerHello flights go in one
    system call, after the second (their first hellos the lane answered, without the edge)"""
    from tests.test_lane_dtls import Coaps, Device

    c = Coaps()
    try:
        a, b = Device(c.address), Device(c.address)
        calls: list[int] = []
        send = c.edge._send
        c.edge._send = lambda wire: calls.append(len(wire)) or send(wire)
        for dev in (a, b):
            dev.client.start(0.0)
            dev.flush()
        c.pump()
        assert calls == [] and c.lane.counters["hello_verify"] == 2
        for dev in (a, b):
            [hvr] = dev.datagrams()
            dev.client.receive(hvr, 0.0)
            dev.flush()
        c.pump()
        assert calls == [2] and len(a.datagrams()) == len(b.datagrams()) == 1
        a.close()
        b.close()
    finally:
        c.close()
