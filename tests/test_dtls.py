"""DtlsServer, sans-IO, against a real Mbed TLS DTLS client in memory (no sockets)."""

from __future__ import annotations

import os

import pytest
from mbedtls import tls
from mbedtls.exceptions import TLSError

from corem.dtls import DtlsParams, DtlsServer, PskStore, SessionStore
from corem.dtls.store import freeze, peer_key, step_sequence, thaw
from corem.registry import Device

from .dtls_udp_client import psk_client_buffer

IDENTITY = "psk-identity-d7b1c0e2"
KEY = b"s3cr3t-pre-shared-key"
DEVICE = Device(tenant="acme", device="sensor-7", psk_identity=IDENTITY, psk=KEY)
PEER = ("192.0.2.10", 40000)


def server(**params) -> DtlsServer:
    return DtlsServer(PskStore({IDENTITY: DEVICE}.get), DtlsParams(**params))


class Client:
    """A DTLS-PSK client on python-mbedtls buffers, exchanging datagrams with a DtlsServer."""

    def __init__(self, identity: str = IDENTITY, key: bytes = KEY, peer=PEER) -> None:
        self.buf = psk_client_buffer(identity, key)
        self.peer = peer
        self.error: TLSError | None = None

    def outgoing(self) -> list[bytes]:
        out = []
        while chunk := self.buf.peek_outgoing(4096):
            self.buf.consume_outgoing(len(chunk))
            out.append(chunk)
        return out

    def step(self) -> bool:
        """Run the client's handshake until it waits for the server; True once it is over."""
        while self.buf._handshake_state is not tls.HandshakeStep.HANDSHAKE_OVER:
            try:
                self.buf.do_handshake()
            except tls.WantWriteError:
                continue
            except tls.WantReadError:
                break
            except TLSError as e:  # e.g. the server's fatal alert after a failed handshake
                self.error = e
                break
        return self.buf._handshake_state is tls.HandshakeStep.HANDSHAKE_OVER

    def handshake(self, srv: DtlsServer, now: float = 0.0, rounds: int = 20) -> bool:
        for _ in range(rounds):
            done = self.step()
            for datagram in self.outgoing():
                srv.receive(datagram, self.peer, now)
            for datagram, peer in srv.datagrams_to_send():
                assert peer == self.peer
                self.buf.receive_from_network(datagram)
            if done and self.peer in srv.sessions:
                return True
            if self.error is not None:
                return False
        return False

    def send(self, srv: DtlsServer, plaintext: bytes, now: float = 1.0) -> list[bytes]:
        self.buf.write(plaintext)
        got = []
        for datagram in self.outgoing():
            got += srv.receive(datagram, self.peer, now)
        return got

    def receive(self, record: bytes) -> bytes:
        self.buf.receive_from_network(record)
        return self.buf.read(2048)


def test_psk_handshake_resolves_the_device_and_carries_data():
    srv = server()
    client = Client()
    assert client.handshake(srv)
    assert srv.device(PEER) == DEVICE
    assert srv.stats.handshakes_completed == 1 and srv.stats.hello_verify_sent == 1
    assert not srv.handshakes
    assert client.send(srv, b"\x40\x02\x00\x01coap") == [b"\x40\x02\x00\x01coap"]
    record = srv.wrap(b"\x60\x44\x00\x01", PEER)
    assert record is not None and record != b"\x60\x44\x00\x01"  # encrypted
    assert client.receive(record) == b"\x60\x44\x00\x01"


def test_first_client_hello_gets_hello_verify_and_leaves_no_state():
    srv = server()
    client = Client()
    client.step()
    [hello] = client.outgoing()
    srv.receive(hello, PEER, 0.0)
    assert srv.stats.hello_verify_sent == 1
    assert not srv.sessions and not srv.handshakes
    [(hvr, _)] = srv.datagrams_to_send()
    assert len(hvr) < len(hello)  # no amplification


def test_wrong_key_fails_the_handshake():
    srv = server()
    assert not Client(key=b"not-the-right-key").handshake(srv)
    assert srv.stats.handshakes_failed["bad_mac"] == 1
    assert not srv.sessions and not srv.handshakes and srv.device(PEER) is None


def test_unknown_identity_fails_the_handshake():
    srv = server()
    assert not Client(identity="who-am-i").handshake(srv)
    assert srv.stats.handshakes_failed["unknown_identity"] == 1
    assert not srv.sessions and not srv.handshakes


def test_client_hello_flood_from_many_ports_leaves_no_state_and_no_amplification():
    srv = server()
    hellos = []
    for port in range(50):  # a real ClientHello each, from its own source port
        c = Client(peer=("192.0.2.99", 20000 + port))
        c.step()
        hellos.append((c.outgoing()[0], c.peer))
    for _ in range(4):
        for hello, peer in hellos:
            srv.receive(hello, peer, 0.0)
    junk = [(os.urandom(n), ("192.0.2.98", 30000 + n)) for n in range(1, 200)]
    for datagram, peer in junk:
        srv.receive(datagram, peer, 0.0)
    assert not srv.sessions and not srv.handshakes
    assert srv.stats.hello_verify_sent == 200
    assert srv.stats.bytes_out_unauthenticated <= srv.stats.bytes_in


def test_handshake_bound_refuses_and_counts():
    srv = server(max_handshakes=1)
    a, b = Client(peer=("192.0.2.1", 1)), Client(peer=("192.0.2.2", 2))
    for c in (a, b):  # both past the cookie exchange: HVR, then the hello with the cookie
        c.step()
        for d in c.outgoing():
            srv.receive(d, c.peer, 0.0)
        for d, _ in srv.datagrams_to_send():
            c.buf.receive_from_network(d)
        c.step()
        for d in c.outgoing():
            srv.receive(d, c.peer, 0.0)
        srv.datagrams_to_send()
    assert len(srv.handshakes) == 1 and srv.stats.handshakes_refused == {"prefix": 1}


def test_stalled_handshake_times_out():
    srv = server(handshake_timeout=5.0)
    c = Client()
    c.step()
    for d in c.outgoing():
        srv.receive(d, PEER, 0.0)
    for d, _ in srv.datagrams_to_send():
        c.buf.receive_from_network(d)
    c.step()
    for d in c.outgoing():
        srv.receive(d, PEER, 0.0)
    assert PEER in srv.handshakes
    srv.tick(3.0)
    assert PEER in srv.handshakes
    srv.tick(6.0)
    assert PEER not in srv.handshakes and srv.stats.handshakes_failed["timeout"] == 1


def test_close_notify_ends_the_session():
    srv = server()
    c = Client()
    assert c.handshake(srv)
    try:
        c.buf.shutdown()
    except tls.WantWriteError:
        pass
    for d in c.outgoing():
        srv.receive(d, PEER, 1.0)
    assert PEER not in srv.sessions and srv.stats.sessions_closed == 1


def test_new_client_hello_replaces_an_established_session():
    srv = server()
    assert Client().handshake(srv)
    old = srv.sessions[PEER]
    assert Client().handshake(srv)  # same address, fresh handshake (device rebooted)
    assert srv.sessions[PEER] is not old and srv.stats.handshakes_completed == 2


def test_garbage_and_records_without_session_are_dropped():
    srv = server()
    assert srv.receive(b"\x17\xfe\xfd\x00\x01" + bytes(8) + b"\x00\x10" + os.urandom(16), PEER, 0.0) == []
    assert srv.receive(b"short", PEER, 0.0) == []
    assert srv.stats.records_dropped == 2 and not srv.datagrams_to_send()


def test_idle_sessions_expire():
    srv = server(session_timeout=100.0)
    assert Client().handshake(srv)
    srv.tick(50.0)
    assert PEER in srv.sessions
    srv._next_sweep = 0.0
    srv.tick(500.0)
    assert PEER not in srv.sessions and srv.stats.sessions_expired == 1


def test_unknown_cipher_is_refused():
    """DtlsParams is both engines'; each names the suites it knows (engine_params for corem's)."""
    from corem.dtls.layer import engine_params

    with pytest.raises(ValueError, match="'TLS-NOPE' is not a cipher suite Mbed TLS offers"):
        DtlsServer(PskStore({}.get), DtlsParams(ciphers=("TLS-NOPE",)))
    with pytest.raises(ValueError, match="'TLS-NOPE' is not a cipher suite the corem engine implements"):
        engine_params(DtlsParams(ciphers=("TLS-NOPE",)))
    with pytest.raises(ValueError, match="no cipher suite given"):
        DtlsParams(ciphers=())


def test_idle_session_is_offloaded_and_restored_without_a_new_handshake():
    srv = server(offload_after=10.0)
    srv.device_lookup = lambda t, d: DEVICE if (t, d) == ("acme", "sensor-7") else None
    c = Client()
    assert c.handshake(srv)
    assert c.send(srv, b"\x40\x02\x00\x01a", now=1.0) == [b"\x40\x02\x00\x01a"]
    srv.sweep(5.0)
    assert PEER in srv.sessions  # not idle long enough
    srv.sweep(20.0)
    assert PEER not in srv.sessions and peer_key(PEER) in srv.offloaded and srv.stats.offloaded == 1
    [size] = srv.store.blob_sizes()
    assert size < 2048  # ~1 KB in the store instead of tens of KB of live context in the process
    assert c.send(srv, b"\x40\x02\x00\x02b", now=21.0) == [b"\x40\x02\x00\x02b"]
    assert PEER in srv.sessions and srv.stats.restored == 1 and srv.stats.handshakes_completed == 1
    assert srv.device(PEER) == DEVICE and not srv.offloaded and len(srv.store) == 0
    assert c.receive(srv.wrap(b"\x60\x44\x00\x02", PEER)) == b"\x60\x44\x00\x02"


def test_session_without_data_yet_stays_live_until_it_can_be_serialized():
    srv = server(offload_after=10.0)
    assert Client().handshake(srv)
    srv.sweep(20.0)  # Mbed TLS keeps handshake state until the first record: cannot save yet
    assert PEER in srv.sessions and srv.stats.offloaded == 0


def test_sessions_in_the_store_survive_into_a_new_server(tmp_path):
    path = tmp_path / "sessions.db"
    lookup = lambda t, d: DEVICE if (t, d) == ("acme", "sensor-7") else None  # noqa: E731
    old = DtlsServer(PskStore({IDENTITY: DEVICE}.get), store=SessionStore(path), device_lookup=lookup)
    c = Client()
    assert c.handshake(old)
    c.send(old, b"\x40\x02\x00\x01a")
    assert old.close(now=5.0) == 1
    new = DtlsServer(PskStore({IDENTITY: DEVICE}.get), store=SessionStore(path), device_lookup=lookup)
    assert new.offloaded == {peer_key(PEER)}
    assert c.send(new, b"\x40\x02\x00\x02b", now=101.0) == [b"\x40\x02\x00\x02b"]
    assert new.stats.handshakes_completed == 0 and new.stats.restored == 1
    assert new.device(PEER) == DEVICE


def test_a_device_removed_while_its_session_slept_does_not_come_back(tmp_path):
    path = tmp_path / "sessions.db"
    old = DtlsServer(PskStore({IDENTITY: DEVICE}.get), store=SessionStore(path))
    c = Client()
    assert c.handshake(old)
    c.send(old, b"\x40\x02\x00\x01a")
    old.close(now=5.0)
    new = DtlsServer(PskStore({IDENTITY: DEVICE}.get), store=SessionStore(path), device_lookup=lambda t, d: None)
    assert c.send(new, b"\x40\x02\x00\x02b", now=6.0) == []
    assert PEER not in new.sessions and new.stats.restored == 0


def test_offloaded_sessions_expire_in_the_store():
    srv = server(offload_after=10.0, session_timeout=100.0)
    clock = [0.0]
    srv.wall = lambda: 1_700_000_000.0 + clock[0]  # the wall clock moves with the test's clock
    c = Client()
    assert c.handshake(srv)
    c.send(srv, b"\x40\x02\x00\x01a", now=0.0)
    clock[0] = 20.0
    srv.sweep(20.0)
    assert len(srv.store) == 1
    clock[0] = 150.0
    srv.sweep(150.0)
    assert len(srv.store) == 0 and not srv.offloaded and srv.stats.sessions_expired == 1


def test_offloaded_blob_carries_no_key_material_of_the_store():
    other = Device(tenant="t", device="o", psk_identity="other", psk=b"another-devices-key")
    srv = DtlsServer(PskStore({IDENTITY: DEVICE, "other": other}.get), DtlsParams(offload_after=1.0))
    c = Client()
    assert c.handshake(srv)
    c.send(srv, b"\x40\x02\x00\x01a")
    srv.sweep(100.0)
    [blob] = srv.store.blobs()
    assert b"another-devices-key" not in blob and KEY not in blob and b"other" not in blob


def _crash_after_a_checkpoint(tmp_path, step):
    """A session saved at its first record, used on, then its server gone without a word (a
    crash, a killed worker): a new server on the same store takes it up."""
    import corem.dtls.server as server_module

    path = tmp_path / "sessions.db"
    lookup = lambda t, d: DEVICE  # noqa: E731
    old = DtlsServer(PskStore({IDENTITY: DEVICE}.get), store=SessionStore(path), device_lookup=lookup)
    c = Client()
    assert c.handshake(old)
    assert c.send(old, b"\x40\x02\x00\x01a", now=1.0) == [b"\x40\x02\x00\x01a"]
    old.tick(1.1)
    assert old.stats.checkpoints == 1 and len(old.store) == 1
    for i in range(5):  # the device hears record numbers past the checkpoint's
        assert c.send(old, b"\x40\x02\x00\x02b", now=2.0 + i) == [b"\x40\x02\x00\x02b"]
        assert c.receive(old.wrap(b"\x60\x44\x00\x02", PEER)) == b"\x60\x44\x00\x02"
    new = DtlsServer(PskStore({IDENTITY: DEVICE}.get), store=SessionStore(path), device_lookup=lookup)
    if not step:
        server_module.step_sequence = lambda blob, wall: blob
    try:
        assert c.send(new, b"\x40\x02\x00\x03c", now=10.0) == [b"\x40\x02\x00\x03c"]
        assert new.stats.restored == 1 and new.stats.handshakes_completed == 0
        record = new.wrap(b"\x60\x44\x00\x03", PEER)
    finally:
        server_module.step_sequence = step_sequence
    try:
        return c.receive(record)
    except tls.WantReadError:
        return None  # Mbed TLS dropped the record


def test_a_session_checkpointed_before_a_crash_is_taken_up_and_the_device_hears_us(tmp_path):
    assert _crash_after_a_checkpoint(tmp_path, step=True) == b"\x60\x44\x00\x03"


def test_without_the_sequence_step_the_device_would_drop_our_records_as_replays(tmp_path):
    """Why `step_sequence` exists: the checkpoint numbers records from before what the device saw."""
    assert _crash_after_a_checkpoint(tmp_path, step=False) in (None, b"")


def test_the_sequence_step_moves_only_the_outgoing_counter_and_never_back():
    srv = server()
    c = Client()
    assert c.handshake(srv)
    c.send(srv, b"\x40\x02\x00\x01a")
    blob = freeze(srv.sessions[PEER].buf)
    stepped = step_sequence(blob, 1_800_000_000.0)
    assert len(stepped) == len(blob) and stepped != blob
    diff = [i for i in range(len(blob)) if blob[i] != stepped[i]]
    assert max(diff) - min(diff) < 6  # within the 6-byte record number
    assert step_sequence(stepped, 1_700_000_000.0) == stepped  # an earlier clock: unchanged
    assert step_sequence(b"not a session", 1e9) == b"not a session"
    assert thaw(blob, lambda body: step_sequence(body, 1_800_000_000.0)) is not None
    assert thaw(stepped) is None  # (bytes changed after the tag: refused, never unpickled)


def test_the_deprecated_engine_never_unpickles_a_blob_another_process_wrote():
    """Pickle runs code.  A blob is unpickled only under this process's tag: one written by
    another process (a worker, the process before a restart, whoever can write the data dir's
    file) -- here a pickle that would run code -- is a lost session."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    evil = pickle.dumps(Boom())
    assert thaw(evil) is None and thaw(bytes(32) + evil) is None


def test_checkpoints_can_be_turned_off():
    srv = server(checkpoint=False)
    c = Client()
    assert c.handshake(srv)
    c.send(srv, b"\x40\x02\x00\x01a")
    srv.tick(2.0)
    assert srv.stats.checkpoints == 0 and len(srv.store) == 0
