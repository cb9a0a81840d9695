"""The same handshakes and records through both of CoAPS's security layers -- DtlsServer on
python-mbedtls (the oracle) and EngineServer on corem's own DTLS engine (dtls_engine = corem) --
give the same outcomes: what is decrypted, what is refused and under which reason, which device a
session names, what the sessions, the store and the counters hold.  In memory, driven by a real Mbed
TLS client (tests/test_dtls.py's)."""

from __future__ import annotations

import pytest
from mbedtls import tls

from corem.dtls import DtlsParams, DtlsServer, PskStore, SessionStore
from corem.dtls.layer import BLOB_TAG, EngineServer
from corem.registry import Device

from .test_dtls import DEVICE, IDENTITY, KEY, PEER, Client

LAYERS = ("mbedtls", "corem")
STATE_KEY = bytes(range(32))  # (what dtls_state_key gives every process of a node, or every node)


def layer(kind: str, store: SessionStore | None = None, **params):
    lookup = {IDENTITY: DEVICE}.get
    named = (lambda t, d: DEVICE if (t, d) == ("acme", "sensor-7") else None)
    if kind == "mbedtls":
        return DtlsServer(PskStore(lookup), DtlsParams(**params), store=store, device_lookup=named)
    return EngineServer(lookup, DtlsParams(**params), state_key=STATE_KEY, store=store, device_lookup=named)


def both(scenario, **params):
    """The scenario's outcome on each layer; they must be equal"""
    outcomes = {kind: scenario(layer(kind, **params)) for kind in LAYERS}
    assert outcomes["mbedtls"] == outcomes["corem"], outcomes
    return outcomes["corem"]


def counts(srv) -> dict:
    m = {s.name: s.value for s in srv.metrics() if not s.labels}
    failed = {dict(s.labels)["reason"]: s.value for s in srv.metrics()
              if s.name == "corem_dtls_handshakes_failed"}
    sessions = {dict(s.labels)["state"]: s.value for s in srv.metrics() if s.name == "corem_dtls_sessions"}
    keep = ("corem_dtls_handshakes_started", "corem_dtls_handshakes_completed",
            "corem_dtls_hello_verify_sent",
            "corem_dtls_sessions_offloaded", "corem_dtls_sessions_restored", "corem_dtls_sessions_closed",
            "corem_dtls_sessions_expired", "corem_dtls_records_replayed", "corem_dtls_sessions_checkpointed")
    return {"counters": {k: m.get(k, 0) for k in keep}, "failed": failed, "sessions": sessions}


def test_a_psk_handshake_names_the_device_and_carries_data_both_ways():
    def scenario(srv):
        c = Client()
        ok = c.handshake(srv)
        got = c.send(srv, b"\x40\x02\x00\x01coap")
        answer = c.receive(srv.wrap(b"\x60\x44\x00\x01", PEER))
        return ok, srv.device(PEER), got, answer, counts(srv)

    ok, device, got, answer, _ = both(scenario)
    assert ok and device == DEVICE and got == [b"\x40\x02\x00\x01coap"] and answer == b"\x60\x44\x00\x01"


@pytest.mark.parametrize("identity, key, reason", [(IDENTITY, b"not-the-right-key", "bad_mac"),
                                                   ("who-am-i", KEY, "unknown_identity")])
def test_a_wrong_key_or_an_unknown_identity_fails_under_the_same_reason(identity, key, reason):
    def scenario(srv):
        ok = Client(identity=identity, key=key).handshake(srv)
        srv.tick(3600.0)  # (whichever notices later: the handshake's timeout)
        return ok, srv.device(PEER), counts(srv)

    ok, device, c = both(scenario)
    assert not ok and device is None and c["failed"] == {reason: 1}


def test_replayed_tampered_short_and_sessionless_records_are_refused():
    def scenario(srv):
        c = Client()
        assert c.handshake(srv)
        c.buf.write(b"\x40\x02\x00\x02x")
        [record] = c.outgoing()
        first = srv.receive(record, PEER, 1.0)
        again = srv.receive(record, PEER, 1.0)  # a replay
        c.buf.write(b"\x40\x02\x00\x03y")
        [other] = c.outgoing()
        tampered = srv.receive(other[:-1] + bytes((other[-1] ^ 1,)), PEER, 1.0)
        short = srv.receive(b"short", PEER, 1.0)
        stranger = srv.receive(record, ("192.0.2.99", 1), 1.0)
        still = srv.receive(other, PEER, 1.0)  # the genuine one after its forgery
        return first, again, tampered, short, stranger, still, srv.datagrams_to_send(), counts(srv)

    first, again, tampered, short, stranger, still, *_ = both(scenario)
    assert first == [b"\x40\x02\x00\x02x"] and again == tampered == short == stranger == []
    assert still == [b"\x40\x02\x00\x03y"]


def test_hellos_without_a_cookie_leave_no_state_and_get_smaller_answers():
    def scenario(srv):
        sizes = []
        for port in range(20):
            c = Client(peer=("192.0.2.10", 50000 + port))
            c.step()
            [hello] = c.outgoing()
            srv.receive(hello, c.peer, 0.0)
            sizes += [len(d) < len(hello) for d, _ in srv.datagrams_to_send()]
        return sizes, counts(srv)

    sizes, c = both(scenario)
    assert sizes == [True] * 20 and c["counters"]["corem_dtls_hello_verify_sent"] == 20
    assert c["sessions"] == {"live": 0, "offloaded": 0, "handshaking": 0}


def test_close_notify_ends_the_session():
    def scenario(srv):
        c = Client()
        assert c.handshake(srv)
        try:
            c.buf.shutdown()
        except tls.WantWriteError:
            pass
        for d in c.outgoing():
            srv.receive(d, PEER, 1.0)
        return PEER in srv.sessions, srv.wrap(b"x", PEER), counts(srv)

    live, wrapped, c = both(scenario)
    assert not live and wrapped is None and c["counters"]["corem_dtls_sessions_closed"] == 1


def test_an_idle_session_is_offloaded_and_restored_by_its_next_record():
    def scenario(srv):
        c = Client()
        assert c.handshake(srv)
        before = c.send(srv, b"\x40\x02\x00\x01a", now=1.0)
        srv.sweep(5.0)
        kept = PEER in srv.sessions
        srv.sweep(20.0)
        offloaded = (PEER in srv.sessions, len(srv.store))
        after = c.send(srv, b"\x40\x02\x00\x02b", now=21.0)
        answer = c.receive(srv.wrap(b"\x60\x44\x00\x02", PEER))
        return before, kept, offloaded, after, answer, srv.device(PEER), len(srv.store), counts(srv)

    outcome = both(scenario, offload_after=10.0, checkpoint=False)
    before, kept, offloaded, after, answer, device, left, c = outcome
    assert kept and offloaded == (False, 1) and after == [b"\x40\x02\x00\x02b"] and device == DEVICE
    assert answer == b"\x60\x44\x00\x02" and left == 0 and c["counters"]["corem_dtls_sessions_restored"] == 1


def test_a_session_restored_from_a_checkpoint_refuses_what_it_took_after_it(tmp_path):
    """The record marks (`settle`): after a crash, the copy restored from the checkpoint refuses
    every record the device sent between the checkpoint and the crash, and takes the next one."""
    def scenario(kind):
        path = tmp_path / f"{kind}.db"
        srv = layer(kind, SessionStore(path))
        c = Client()
        assert c.handshake(srv)
        assert c.send(srv, b"\x40\x02\x00\x01a", now=1.0)
        srv.tick(2.0)  # the checkpoint
        captured = []
        for n in range(2, 6):
            c.buf.write(b"\x40\x02\x00" + bytes((n,)))
            [record] = c.outgoing()
            captured.append(record)
            srv.receive(record, PEER, 3.0)
            srv.settle(3.0)
        # the process dies here; a new one restores from the store
        again = layer(kind, SessionStore(path))
        replayed = [again.receive(r, PEER, 4.0) for r in captured]
        fresh = c.send(again, b"\x40\x02\x00\x09", now=5.0)
        return replayed, fresh, counts(again)

    outcomes = {kind: scenario(kind) for kind in LAYERS}
    assert outcomes["mbedtls"] == outcomes["corem"], outcomes
    replayed, fresh, c = outcomes["corem"]
    assert replayed == [[]] * 4 and fresh == [b"\x40\x02\x00\x09"]
    assert c["counters"]["corem_dtls_records_replayed"] == 4
    assert c["counters"]["corem_dtls_sessions_restored"] == 1


def test_rows_one_engine_wrote_are_lost_sessions_to_the_other_never_code(tmp_path):
    """Both engines' rows in one table (one blob column): an mbedtls pickle is a lost session to the
    corem engine (never unpickled), a corem row a lost session to mbedtls; the device handshakes again."""
    path = tmp_path / "s.db"
    for writer, reader in (("mbedtls", "corem"), ("corem", "mbedtls")):
        srv = layer(writer, SessionStore(path), offload_after=10.0, checkpoint=False)
        c = Client()
        assert c.handshake(srv)
        assert c.send(srv, b"\x40\x02\x00\x01a", now=1.0)
        srv.sweep(20.0)
        [blob] = srv.store.blobs()
        assert blob.startswith(BLOB_TAG) == (writer == "corem")
        srv.store.close()
        other = layer(reader, SessionStore(path))
        assert c.send(other, b"\x40\x02\x00\x02b", now=21.0) == []
        assert other.stats.sessions_lost == 1 and PEER not in other.sessions
        assert Client().handshake(other)  # a new handshake, as after any lost session
        other.store.close()
        path.unlink()


def test_a_sealed_row_moved_to_another_peer_or_under_another_key_does_not_open():
    store = SessionStore()
    srv = layer("corem", store, offload_after=10.0, checkpoint=False)
    c = Client()
    assert c.handshake(srv)
    assert c.send(srv, b"\x40\x02\x00\x01a", now=1.0)
    srv.sweep(20.0)
    [row] = store.db.execute("SELECT peer, blob, tenant, device, last_seen, rx_top FROM sessions").fetchall()
    other = ("192.0.2.11", 40000)
    from corem.dtls.store import peer_key

    store.put([(peer_key(other), bytes(row[1]), row[2], row[3], row[4], row[5])])
    srv.offloaded.add(peer_key(other))
    c2 = Client(peer=other)
    c2.buf = c.buf  # the same session's records, from an address whose row holds the copy
    assert c2.send(srv, b"\x40\x02\x00\x02b", now=21.0) == [] and srv.stats.sessions_lost == 1
