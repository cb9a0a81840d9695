"""The corem engine's security layer (corem/dtls/layer.py, dtls_engine = corem) with what no
client reachable here does: Connection ID (RFC 9146), from the engine's own client role."""

from __future__ import annotations

from corem.dtls import DtlsParams, SessionStore
from corem.dtls.engine import Client
from corem.dtls.layer import CID_KEY, EngineServer, load_state_key
from corem.dtls.store import peer_key
from corem.registry import Device

from .test_dtls import DEVICE, IDENTITY, KEY

A, B, C = ("192.0.2.10", 40000), ("192.0.2.10", 40001), ("198.51.100.7", 5000)
STATE_KEY = bytes(range(32))


def layer(store=None, **params):
    moves = []
    srv = EngineServer({IDENTITY: DEVICE}.get, DtlsParams(**params), state_key=STATE_KEY, store=store,
                       device_lookup=lambda t, d: DEVICE if (t, d) == ("acme", "sensor-7") else None,
                       on_moved=lambda old, new, now: moves.append((old, new)))
    return srv, moves


def handshake(srv, peer=A, cid=b"", identity=IDENTITY.encode(), key=KEY):
    c = Client(identity, key, cid=cid)
    c.start(0.0)
    for _ in range(10):
        for d in c.datagrams_to_send():
            srv.receive(d, peer, 0.0)
        for d, to in srv.datagrams_to_send():
            assert to == peer
            c.receive(d, 0.0)
        if c.established and peer in srv.sessions:
            return c
    raise AssertionError("no handshake")


def metric(srv, name):
    return sum(s.value for s in srv.metrics() if s.name == name)


def test_a_device_that_changes_address_keeps_its_session_and_is_answered_at_the_new_one():
    srv, moves = layer()
    c = handshake(srv)
    assert srv.sessions[A].cid_in  # the server gave it a CID
    for n, peer in enumerate((B, C, A), 1):
        request, answer = b"\x40\x02\x00" + bytes((n,)), b"\x60\x44\x00" + bytes((n,))
        assert srv.receive(c.wrap(request), peer, float(n)) == [request]
        assert srv.device(peer) == DEVICE and list(srv.sessions) == [peer]
        assert c.receive(srv.wrap(answer, peer), float(n)) == [answer]
    assert moves == [(A, B), (B, C), (C, A)] and metric(srv, "corem_dtls_cid_moves") == 3
    assert metric(srv, "corem_dtls_handshakes_completed") == 1


def test_a_forged_or_unknown_cid_is_dropped_and_counted_and_moves_nothing():
    srv, moves = layer()
    c = handshake(srv)
    record = bytearray(c.wrap(b"\x40\x02\x00\x01"))
    record[-1] ^= 1  # the right CID, not authentic
    assert srv.receive(bytes(record), B, 1.0) == [] and moves == [] and list(srv.sessions) == [A]
    record = bytearray(c.wrap(b"\x40\x02\x00\x02"))
    record[11] ^= 0xFF  # a CID nobody has
    assert srv.receive(bytes(record), B, 1.0) == []
    assert metric(srv, "corem_dtls_records_unknown_cid") == 1


def test_an_offloaded_cid_session_is_restored_by_its_cid_from_a_new_address():
    srv, moves = layer(SessionStore(), offload_after=10.0, checkpoint=False)
    c = handshake(srv)
    assert srv.receive(c.wrap(b"\x40\x02\x00\x01"), A, 1.0)
    srv.sweep(20.0)
    assert not srv.sessions and srv.store.keys() == [CID_KEY + c.conn.cid_out]
    assert srv.receive(c.wrap(b"\x40\x02\x00\x02"), C, 21.0) == [b"\x40\x02\x00\x02"]
    assert srv.device(C) == DEVICE and metric(srv, "corem_dtls_sessions_restored") == 1
    assert c.receive(srv.wrap(b"\x60\x44\x00\x02", C), 21.0) == [b"\x60\x44\x00\x02"]


def test_a_session_restored_by_a_record_that_does_not_authenticate_is_saved_again():
    """A restore takes the session's row out of the store before the record that asked for it is
    authenticated; a forged one (the right CID) must not leave the session unsaved until it idles
    again: the next tick saves it, so a crash or another worker still finds it."""
    srv, _ = layer(SessionStore(), offload_after=10.0)
    c = handshake(srv)
    assert srv.receive(c.wrap(b"\x40\x02\x00\x01"), A, 1.0)
    srv.sweep(20.0)
    key = CID_KEY + c.conn.cid_out
    assert not srv.sessions and srv.store.keys() == [key]
    forged = bytearray(c.wrap(b"\x40\x02\x00\x02"))
    forged[-1] ^= 1
    assert srv.receive(bytes(forged), C, 21.0) == [] and metric(srv, "corem_dtls_sessions_restored") == 1
    srv.tick(21.1)
    assert srv.store.keys() == [key]
    assert srv.receive(c.wrap(b"\x40\x02\x00\x03"), A, 22.0) == [b"\x40\x02\x00\x03"]


def test_a_record_naming_a_sleeping_cid_session_moves_nothing_until_one_authenticates():
    """A datagram with an offloaded session's CID wakes it, but proves nothing of its source: a
    forgery -- or the device's own record again -- sent from the address of another device's live
    session must neither end that session nor bind the sleeping one there (RFC 9146 §6).  Until a
    record authenticates, the session is parked (found by its CID, at no address); the device's
    next record places it wherever it comes from."""
    srv, moves = layer(SessionStore(), offload_after=10.0, checkpoint=False)
    v = handshake(srv, A)
    old = v.wrap(b"\x40\x02\x00\x01")
    assert srv.receive(old, A, 1.0)
    srv.sweep(20.0)
    assert not srv.sessions
    handshake(srv, C, cid=None)  # another device, by address (no CID), live at C
    other = srv.sessions[C]
    assert not other.cid_in
    forged = bytearray(v.wrap(b"\x40\x02\x00\x02"))
    forged[-1] ^= 1
    for datagram in (bytes(forged), old):
        assert srv.receive(datagram, C, 21.0) == []
        assert srv.sessions == {C: other} and list(srv.engine.parked) == [v.conn.cid_out]
    assert metric(srv, "corem_dtls_sessions_restored") == 1 and moves == []
    assert metric(srv, "corem_dtls_sessions") == 2  # (live 1 + asleep 1: the parked one counts as offloaded)
    assert srv.wrap(b"\x60\x44\x00\x02", A) is None  # (answered nowhere while parked)
    request, answer = b"\x40\x02\x00\x03", b"\x60\x44\x00\x03"
    assert srv.receive(v.wrap(request), B, 22.0) == [request]  # the device, from its new address
    assert srv.engine.parked == {} and srv.sessions[B].cid_in == v.conn.cid_out and srv.sessions[C] is other
    assert v.receive(srv.wrap(answer, B), 22.0) == [answer]


def test_a_parked_session_left_idle_is_offloaded_again_and_saved_at_shutdown(tmp_path):
    srv, _ = layer(SessionStore(tmp_path / "sessions.db"), offload_after=10.0, checkpoint=False)
    v = handshake(srv, A)
    assert srv.receive(v.wrap(b"\x40\x02\x00\x01"), A, 1.0)
    srv.sweep(20.0)
    key = CID_KEY + v.conn.cid_out
    forged = bytearray(v.wrap(b"\x40\x02\x00\x02"))
    forged[-1] ^= 1
    assert srv.receive(bytes(forged), C, 21.0) == [] and srv.store.keys() == []  # (taken: parked)
    srv.sweep(40.0)
    assert srv.engine.parked == {} and srv.store.keys() == [key] and srv.engine.by_cid == {}
    assert srv.receive(bytes(forged), C, 41.0) == []  # parked again; the process stops
    assert srv.close(42.0) == 1 and SessionStore(tmp_path / "sessions.db").keys() == [key]


def test_an_offloaded_session_is_replaced_when_a_new_handshake_completes_not_when_it_starts():
    srv, _ = layer(SessionStore(), offload_after=10.0, checkpoint=False)
    c = handshake(srv, A, cid=None)
    assert srv.receive(c.wrap(b"\x40\x02\x00\x01"), A, 1.0)
    srv.sweep(20.0)
    assert srv.store.keys() == [peer_key(A)]
    new = Client(IDENTITY.encode(), KEY, cid=None)
    new.start(21.0)
    for _ in range(2):  # its hello, then the hello with the cookie: admitted, a handshake under way
        for d in new.datagrams_to_send():
            srv.receive(d, A, 21.0)
        for d, _to in srv.datagrams_to_send():
            new.receive(d, 21.0)
    assert A in srv.handshakes and srv.store.keys() == [peer_key(A)]  # (it may never complete)
    for _ in range(4):
        for d in new.datagrams_to_send():
            srv.receive(d, A, 21.0)
        for d, _to in srv.datagrams_to_send():
            new.receive(d, 21.0)
    assert new.established and A in srv.sessions and srv.store.keys() == []


def test_one_device_holds_at_most_its_share_of_sessions_and_cannot_lock_others_out():
    """A device (one credential) that handshakes from port after port: its oldest session ends
    beyond dtls_max_sessions_per_device, so it cannot fill dtls_max_sessions and lock every other
    device out (found by an adversarial run: 40 handshakes of one PSK took all 40 sessions)"""
    other = Device(tenant="acme", device="sensor-8", psk=b"another-key")
    srv = EngineServer({IDENTITY: DEVICE, "other": other}.get,
                       DtlsParams(max_sessions=3, max_sessions_per_device=2), state_key=STATE_KEY)
    ports = [("192.0.2.10", 41000 + n) for n in range(6)]
    for peer in ports:
        handshake(srv, peer, cid=None)
    assert sorted(srv.sessions) == ports[-2:] and metric(srv, "corem_dtls_sessions_superseded") == 4
    handshake(srv, C, cid=None, identity=b"other", key=b"another-key")  # another device is served
    assert srv.device(C) == other
    handshake(srv, ports[-1], cid=None)  # again from its newest address: that one is replaced, no other ends
    assert sorted(srv.sessions) == sorted([*ports[-2:], C]) and metric(srv, "corem_dtls_sessions_superseded") == 4


def test_the_state_key_is_made_once_in_the_data_dir_mode_0600(tmp_path):
    key = load_state_key("", tmp_path)
    assert len(key) == 32 and load_state_key("", tmp_path) == key
    assert (tmp_path / "dtls-state.key").stat().st_mode & 0o777 == 0o600
    assert load_state_key("00" * 16, tmp_path) == bytes(16)


def test_the_settings_say_what_the_corem_engine_needs():
    import pytest

    from corem.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="'optional' needs dtls_engine = corem"):
        Settings(dtls_client_auth="optional", dtls_engine="mbedtls").check()
    Settings(dtls_client_auth="optional").check()  # (corem is the default engine)
    assert Settings().dtls_engine == "corem"
    # the deprecated engine: never on a shared store (its sessions are pickles), and only installed
    with pytest.raises(ConfigError, match="a shared store needs dtls_engine = corem"):
        Settings(dtls_engine="mbedtls", dtls_session_store="postgresql://corem@db/corem").check()
    # (without python-mbedtls installed: tests/test_interop_dtls.py, test_coaps_runs_without_python_mbedtls)
    with pytest.raises(ConfigError, match="dtls_state_key: needed"):
        Settings(dtls_engine="corem", dtls_session_store="postgresql://corem@db/corem").check()
    with pytest.raises(ConfigError, match="dtls_state_key: 32 or 64 hex digits"):
        Settings(dtls_engine="corem", dtls_state_key="abcd").check()
    Settings(dtls_engine="corem", dtls_session_store="postgresql://corem@db/corem",
             dtls_state_key="ab" * 32).check()


def test_through_corem_serve_a_device_whose_port_changes_at_every_reading_needs_one_handshake(data_dir):
    """`corem serve --dtls-engine corem` on loopback; the engine's client (no other client reachable
    here offers RFC 9146) sends 1,000 readings, each from a new source port, in one session: one
    handshake, each reading answered 2.04 at its new port and stored once."""
    from .conftest import start_corem

    server = start_corem(data_dir, "--dtls-engine", "corem")
    try:
        moving_device(server, 1000)
    finally:
        server.stop()


def test_with_workers_a_moving_device_stays_with_its_session_and_a_retransmission_is_not_stored_twice(data_dir):
    """`corem serve --workers 2`: a record with a CID goes to the worker whose index its CID starts
    with (corem/workers/steer.py), whatever port it comes from, so the session is never lost to the
    other worker; and a reading sent again from yet another port after the move (its answer lost)
    is the same exchange: answered 2.04 again, stored once (Endpoint.moved, and the lane's twin)."""
    from .conftest import start_corem

    server = start_corem(data_dir, "--workers", "2", "--dtls-engine", "corem")
    try:
        moving_device(server, 200, again_every=5)
    finally:
        server.stop()


def moving_device(server, n: int, again_every: int = 0) -> None:
    """n readings of one CID session, each from a new source port (and every `again_every`th once
    more from another one); every answer 2.04 at the port it was sent from, each stored once."""
    import socket

    import cbor2

    from .conftest import SPEC_IDENTITY, SPEC_KEY

    c = Client(SPEC_IDENTITY.encode(), SPEC_KEY.encode(), cid=b"")
    socks: list[socket.socket] = []

    def new_socket():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", server.coaps_port))
        s.settimeout(30)  # (only detects a lost answer)
        socks.append(s)
        return s

    def post(s, message):
        s.send(c.wrap(message))
        got: list[bytes] = []
        while not got:
            got += c.receive(s.recv(2048), 0.0)
        [answer] = got
        return answer

    try:
        first = new_socket()
        c.start(0.0)
        while True:  # (the client answers the HelloVerifyRequest, then the server's flight)
            for d in c.datagrams_to_send():
                first.send(d)
            if c.established:
                break
            c.receive(first.recv(2048), 0.0)
        sends = 0
        # (a socket is closed once the next one is bound: a port the OS handed out again at once
        # would be no move, and the count of moves one short -- seen once in five runs)
        last = None
        for i in range(n):
            mid = (i + 1).to_bytes(2, "big")
            message = b"\x40\x02" + mid + b"\xb9telemetry\x11\x3c\xff" + cbor2.dumps({"seq": i})
            for _ in range(2 if again_every and i % again_every == 0 else 1):
                s = new_socket() if sends else first
                if last is not None:
                    socks.remove(last)
                    last.close()
                    last = None
                sends += 1
                answer = post(s, message)
                assert answer[1] == 0x44 and answer[2:4] == mid, answer
                if s is not first:
                    last = s
        m = server.metrics()
        assert m["corem_dtls_handshakes_completed_total"] == 1
        assert m["corem_dtls_cid_moves_total"] == sends - 1
        stored = sorted(p["numeric_values"]["seq"] for p in server.points("acme"))
        assert stored == [float(i) for i in range(n)]
    finally:
        for s in socks:
            s.close()


def counted_layer(devices):
    """A layer whose registry lookups are counted (and answered from `devices`, read at each ask)."""
    asked = []

    def lookup(identity):
        asked.append(identity)
        return devices.get(identity)

    return EngineServer(lookup, DtlsParams(), state_key=STATE_KEY, cid_length=0), asked


def test_a_psk_handshake_asks_the_registry_once_and_its_session_is_that_device():
    srv, asked = counted_layer({IDENTITY: DEVICE})
    handshake(srv, cid=None)
    assert asked == [IDENTITY] and srv.device(A) == DEVICE


def split_records(datagram):
    """A datagram's records, each a datagram of its own (13-byte header, length at 11..13)"""
    out = []
    while datagram:
        n = 13 + int.from_bytes(datagram[11:13], "big")
        out.append(datagram[:n])
        datagram = datagram[n:]
    return out


def test_a_session_whose_finished_comes_in_a_later_datagram_names_the_device_the_registry_says_then():
    # (the answer of the ClientKeyExchange's lookup is the session's only within that datagram)
    other = Device(tenant="acme", device="sensor-8", psk_identity=IDENTITY, psk=KEY)
    devices = {IDENTITY: DEVICE}
    srv, asked = counted_layer(devices)
    c = Client(IDENTITY.encode(), KEY, cid=None)
    c.start(0.0)
    for _ in range(2):  # the hello, then the hello with its cookie
        for d in c.datagrams_to_send():
            srv.receive(d, A, 0.0)
        for d, _to in srv.datagrams_to_send():
            c.receive(d, 0.0)
    [flight] = c.datagrams_to_send()
    *first, finished = split_records(flight)
    for d in first:  # ClientKeyExchange, ChangeCipherSpec: the keys, from the registry's answer
        srv.receive(d, A, 0.0)
    assert asked == [IDENTITY] and A not in srv.sessions
    devices[IDENTITY] = other
    srv.receive(finished, A, 0.0)
    for d, _to in srv.datagrams_to_send():
        c.receive(d, 0.0)
    assert c.established and asked == [IDENTITY, IDENTITY] and srv.device(A) == other


def test_a_session_makes_its_store_key_when_it_is_first_saved():
    srv = EngineServer({IDENTITY: DEVICE}.get, DtlsParams(offload_after=10.0, checkpoint=False),
                       state_key=STATE_KEY, store=SessionStore(), cid_length=0,
                       device_lookup=lambda t, d: DEVICE if (t, d) == ("acme", "sensor-7") else None)
    c = handshake(srv, cid=None)
    assert srv.sessions[A].layer.key == b""  # (a session that ends before any save never needs one)
    assert srv.receive(c.wrap(b"\x40\x02\x00\x01"), A, 1.0)
    srv.sweep(20.0)
    assert srv.store.keys() == [peer_key(A)]
    assert srv.receive(c.wrap(b"\x40\x02\x00\x02"), A, 21.0) == [b"\x40\x02\x00\x02"]
    assert srv.device(A) == DEVICE and srv.sessions[A].layer.key == peer_key(A)


def test_a_session_is_checkpointed_once_it_carries_data_not_for_its_handshake_or_close():
    """`dtls_checkpoint`: a session is saved once it carries data; one that handshakes and closes
    (or sits idle) costs no write -- a reconnecting fleet's handshakes are not store writes."""
    srv, _ = layer(SessionStore())
    quiet = handshake(srv, peer=A, cid=None)
    busy = handshake(srv, peer=B, cid=None)
    srv.tick(0.5)
    assert srv.stats.checkpoints == 0 and srv.store.keys() == []
    assert srv.receive(busy.wrap(b"\x40\x02\x00\x01"), B, 1.0) == [b"\x40\x02\x00\x01"]
    quiet.conn.close()  # (close_notify)
    for d in quiet.datagrams_to_send():
        assert srv.receive(d, A, 1.0) == []
    srv.tick(1.1)
    assert srv.stats.checkpoints == 1 and srv.store.keys() == [peer_key(B)]
    assert A not in srv.sessions


def test_a_late_record_taken_after_the_checkpoint_is_not_taken_again_by_the_restored_session():
    """A record that arrives late (below the window's top, reordered) after the session was
    saved is taken, and raises no mark: the top did not grow.  After a crash the restored copy's
    window does not hold it -- its floor, the newest record the session took, must refuse it."""
    store = SessionStore()
    srv, _ = layer(store)
    c = handshake(srv, peer=A, cid=None)
    r1, r2, r3 = (c.wrap(b"\x40\x02\x00" + bytes((i,)) + b"POST /unlock") for i in (1, 2, 3))
    assert srv.receive(r1, A, 1.0) and srv.receive(r3, A, 1.1)  # (r2 reordered behind r3)
    srv.settle(1.1)
    srv.tick(1.2)  # the checkpoint: saved with r3 the top, r2 not seen
    assert store.keys() == [peer_key(A)]
    assert srv.receive(r2, A, 1.3) == [b"\x40\x02\x00\x02POST /unlock"]
    srv.settle(1.3)
    assert srv.receive(r2, A, 1.4) == []  # (the live window)
    again, _ = layer(store)  # the process crashed: a new one restores the row at the next datagram
    assert again.receive(r2, A, 2.0) == [] and again.receive(r1, A, 2.1) == []
    r4 = c.wrap(b"\x40\x02\x00\x04POST /unlock")
    assert again.receive(r4, A, 2.2) == [b"\x40\x02\x00\x04POST /unlock"]  # what is new is taken


def test_an_older_copy_of_a_saved_session_never_seals_with_a_number_used_since():
    """A row put back from a backup (or a session two nodes restored at once) holds a write
    reservation its newer self has used: restored, it seals from the wall clock's floor on
    (16 a millisecond), past every number a session of fewer records than that has used -- not
    with the same record numbers under the same key (AES-CCM nonce reuse)."""
    wall = [1_800_000_000.0]
    srv, _ = layer(SessionStore(), offload_after=10.0, checkpoint=False)
    srv.wall = lambda: wall[0]
    c = handshake(srv)
    assert srv.receive(c.wrap(b"\x40\x02\x00\x01"), A, 1.0)
    srv.sweep(20.0)
    [key] = srv.store.keys()
    row = srv.store.take(key)
    used: list[list[int]] = []
    for copy in range(2):  # the same saved row restored twice, the first copy gone in between
        srv.store.put([row])
        srv.offloaded.add(key)
        wall[0] += 1.0
        assert srv.receive(c.wrap(b"\x40\x02\x00\x02"), C, 21.0 + copy) == [b"\x40\x02\x00\x02"]
        conn = srv.engine.sessions[C]
        numbers = []
        for _ in range(3):
            numbers.append(conn.write_seq[1])
            assert srv.wrap(b"\x60\x44\x00\x02", C)
        used.append(numbers)
        srv.engine.drop(conn)
    assert not set(used[0]) & set(used[1]), used
    assert used[1][0] >= int(wall[0] * 1000) * 16


def test_a_superseded_session_leaves_no_saved_copy_to_come_back_from():
    """One credential holds at most max_sessions_per_device sessions: its newest ends its oldest.
    The oldest's saved copy stayed in the store, and woken by its CID (parked, then placed) it was
    live again, past the cap and max_sessions -- parked sessions were not counted either (found by
    a review).  A superseded session's copy goes with it."""
    store = SessionStore()
    srv, _ = layer(store, max_sessions=4, max_sessions_per_device=2)
    clients = []
    for n in range(4):
        peer = ("192.0.2.10", 41000 + n)
        c = handshake(srv, peer)  # (with a CID)
        assert srv.receive(c.wrap(b"\x40\x02\x00\x01"), peer, 1.0 + n)
        srv.settle(1.0 + n)
        srv.tick(1.1 + n)  # (its checkpoint: a saved copy)
        clients.append((c, peer))
    assert srv.stats.sessions_superseded == 2 and len(store.keys()) == 2
    again, _ = layer(store, max_sessions=4, max_sessions_per_device=2)  # a restart on the same store
    woken = [again.receive(c.wrap(b"\x40\x02\x00\x03"), ("203.0.113.1", 50000 + i), 20.0)
             for i, (c, _) in enumerate(clients)]
    assert woken == [[], [], [b"\x40\x02\x00\x03"], [b"\x40\x02\x00\x03"]]
    assert sum(again.device(p) == DEVICE for p in again.sessions) == 2
