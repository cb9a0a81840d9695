"""Presence per device across workers and nodes: one online and one offline per real transition,
whichever process hears the device (corem/registry/presence.py).

The transition logic against real databases -- two `Presence` on one SQLite file behaving as two
workers, and on a real PostgreSQL as two nodes -- and end to end: `corem serve --workers 2` with
the device moving from one worker's source port to the other's, and two nodes sharing PostgreSQL
with the device moving from one node to the other, and a node killed while it holds the device."""

from __future__ import annotations

import json
import os
import signal
import time

import cbor2
import pytest
import trio

from corem.bus import read_records
from corem.ingest.presence import Presence
from corem.registry.db import Db
from corem.registry.presence import PresenceTable

from .conftest import corem_cli, post, start_corem, wait_for
from .postgres_server import Postgres, binaries, empty

THRESHOLD = 2.0
#: The servers' threshold in the end-to-end tests: long enough that a loaded machine's pauses (a
#: worker started again after SIGKILL, a slow answer between two readings) never leave the device
#: unheard for longer, which would add an offline and an online to what the test expects.
LIVE_THRESHOLD = 5.0
#: Seconds between two of a test device's readings (`send_from`).
EVERY = 0.25
#: Readings EVERY apart that keep a device heard for longer than the threshold.
BEYOND_THRESHOLD = int(LIVE_THRESHOLD * 1.4 / EVERY)


class Sink:
    """Records what is published, in order, shared by the `Presence` of every 'process'."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, int, int]] = []  # (who, device, state, at, last_seen)
        self.who = ""

    def submit(self, record, done, ctx=None) -> bool:
        e = json.loads(record.value)
        self.events.append((self.who, e["device"], e["state"], e["at"], e["last_seen"]))
        return True


@pytest.fixture(scope="module")
def postgres():
    if binaries() is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql)")
    try:
        server = Postgres()
    except Exception as e:  # noqa: BLE001 - not startable here (no postgres user, no port)
        pytest.skip(f"PostgreSQL did not start: {e}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres):
    return empty(postgres.url)


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    """Where the processes under test share presence: one SQLite file, or one PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "presence.db"
    return request.getfixturevalue("pg_url")


class Cluster:
    """Processes sharing one presence table, on one clock (`at(seconds)` moves it)."""

    def __init__(self, where) -> None:
        self.where = where
        self.sink = Sink()
        self.clock = 1_000.0  # seconds; wall ms = clock * 1000, monotonic = clock
        self.processes: dict[str, Presence] = {}

    def start(self, name: str) -> Presence:
        p = Presence(self.sink, THRESHOLD, wall_ms=lambda: int(self.clock * 1000), table=PresenceTable(Db(self.where)))
        self.processes[name] = p
        return p

    def at(self, t: float) -> None:
        self.clock = 1_000.0 + t

    def hear(self, name: str, device: str = "d1") -> None:
        self.processes[name].seen("acme", device, self.clock)

    async def sweep(self, name: str, release: bool = False) -> None:
        p = self.processes[name]
        self.sink.who = name
        p.sweep(self.clock)
        await p.flush(release=release)

    def states(self, device: str = "d1") -> list[tuple[str, str]]:
        return [(who, state) for who, d, state, _, _ in self.sink.events if d == device]

    def close(self) -> None:
        for p in self.processes.values():
            assert p.table is not None
            p.table.close()


async def test_a_device_that_moves_is_online_once_and_offline_once_by_its_last_holder(where):
    c = Cluster(where)
    try:
        a, b = c.start("a"), c.start("b")
        c.at(0.0)
        c.hear("a")
        await c.sweep("a")
        assert c.states() == [("a", "online")] and a.transitions == {"online": 1}
        c.at(0.5)
        c.hear("b")  # the device moved: b hears it, and it was online already
        await c.sweep("b")
        assert c.states() == [("a", "online")]
        for t in (1.0, 1.5, 2.0, 2.6, 3.0, 3.5):  # b keeps hearing it (refreshing the shared last_seen)
            c.at(t)
            c.hear("b")
            await c.sweep("b")
            await c.sweep("a")  # a stopped hearing it at 0.0: quiet there for the threshold from 2.0
        assert not a.is_online("acme", "d1") and b.is_online("acme", "d1")
        assert c.states() == [("a", "online")]  # a let go of it without an offline: b still hears it
        c.at(5.4)
        await c.sweep("b")
        await c.sweep("a")
        assert c.states() == [("a", "online")]
        c.at(5.6)  # b's threshold after its last reading at 3.5
        await c.sweep("a")
        await c.sweep("b")
        assert c.states() == [("a", "online"), ("b", "offline")]
        offline = c.sink.events[-1]
        assert offline[4] == 1_003_500 and offline[3] == 1_005_600  # the last reading anywhere; when
        c.at(30.0)  # long after: nobody takes it offline again (the way out finds it offline)
        await c.sweep("a")
        await c.sweep("b")
        assert c.states() == [("a", "online"), ("b", "offline")]
        c.at(31.0)
        c.hear("a")  # back: online again, once
        c.hear("b")
        await c.sweep("b")
        await c.sweep("a")
        assert c.states()[2:] == [("b", "online")]
    finally:
        c.close()


async def test_two_holders_hearing_a_device_at_once_make_one_online_and_one_offline(where):
    c = Cluster(where)
    try:
        c.start("a"), c.start("b")
        c.at(0.0)
        c.hear("a")
        c.hear("b")
        async with trio.open_nursery() as n:  # both flush at once
            n.start_soon(c.processes["a"].flush)
            n.start_soon(c.processes["b"].flush)
        assert [s for _, s in c.states()] == ["online"]
        c.at(1.0)
        c.hear("a")
        c.at(1.4)
        c.hear("b")
        c.at(3.2)  # a: quiet for 2.2 s; b for 1.8 s -- a lets go, b holds
        await c.sweep("a")
        await c.sweep("b")
        assert [s for _, s in c.states()] == ["online"]
        c.at(3.5)
        await c.sweep("a")
        await c.sweep("b")
        assert c.states()[1:] == [("b", "offline")] and c.sink.events[-1][4] == 1_001_400
    finally:
        c.close()


async def test_a_holder_that_dies_leaves_its_devices_to_the_others_sweep_once(where):
    c = Cluster(where)
    try:
        c.start("a"), c.start("b"), c.start("c")
        c.at(0.0)
        c.hear("a")
        await c.sweep("a")  # and then process a is killed: no sweep, no release
        c.at(4.0)
        await c.sweep("b")
        assert [s for _, s in c.states()] == ["online"]  # not before the threshold and the margin
        c.at(8.5)  # 2 s + 0.5 (a quarter) + 2 sweeps of 0.5 + 2 s slack = 5.5 s after the reading
        async with trio.open_nursery() as n:  # two survivors sweep at once: one takes it
            n.start_soon(c.sweep, "b")
            n.start_soon(c.sweep, "c")
        assert [s for _, s in c.states()] == ["online", "offline"]
        assert c.sink.events[-1][4] == 1_000_000
    finally:
        c.close()


async def test_a_restarted_process_neither_repeats_online_nor_forgets_offline(where):
    c = Cluster(where)
    try:
        c.start("a")
        c.at(0.0)
        c.hear("a")
        await c.sweep("a")
        c.at(1.0)
        c.hear("a")
        await c.sweep("a", release=True)  # a stops (graceful): the device stays online
        c.processes["a"].table.close()
        c.start("a")  # the same process started again
        c.at(1.5)
        c.hear("a")
        await c.sweep("a")
        assert [s for _, s in c.states()] == ["online"]  # no second online after the restart
        c.at(3.6)
        await c.sweep("a")
        assert [s for _, s in c.states()] == ["online", "offline"]  # at the threshold, not later
    finally:
        c.close()


async def test_a_database_that_refuses_a_flush_is_tried_again_with_the_next(tmp_path):
    c = Cluster(tmp_path / "presence.db")
    try:
        p = c.start("a")
        c.at(0.0)
        c.hear("a")
        assert p.table is not None
        apply = p.table.apply

        def refuse(batch, now):
            raise p.table.db.OperationalError("database is locked")

        p.table.apply = refuse  # type: ignore[method-assign]
        await c.sweep("a")
        assert p.store_errors == 1 and c.states() == []
        p.table.apply = apply  # type: ignore[method-assign]
        await c.sweep("a")
        assert c.states() == [("a", "online")]
    finally:
        c.close()


# -- end to end ----------------------------------------------------------------------------------
def presence_events(*data_dirs) -> list[dict]:
    """The presence records of every embedded bus given (the nodes'), in the order each wrote them."""
    return [json.loads(r.value) for d in data_dirs for r in read_records(d / "bus.db", "device.presence.acme")]


def wait_settled(data_dirs) -> list[dict]:
    """The presence records once one offline is there (waited for, with a bound for a loaded
    machine), and past the time any second one (from an old holder, or the way out) would have
    come: the way-out margin (`Presence._stale_ms`) after that."""
    wait_for(lambda: any(e["state"] == "offline" for e in presence_events(*data_dirs)), timeout=60,
             what="the device's offline")
    settle = time.time() + LIVE_THRESHOLD * 1.25 + 2 * 0.5 + 2.0 + 1.0  # (after the offline: later than that)
    while time.time() < settle:
        time.sleep(0.1)
    return presence_events(*data_dirs)


def send_from(port: int, sock, n: int, start_mid: int, every: float = EVERY) -> int:
    """`n` readings from `sock`, each answered 2.04; the wall-clock ms just before the last was sent
    (the server took it after that, whatever its answer's delay on a loaded machine)."""
    last = 0
    for i in range(n):
        last = int(time.time() * 1000)
        answer = post(port, "T0KEN-1", cbor2.dumps({"i": i}), start_mid + i, sock=sock, timeout=20)
        assert answer is not None and answer[1] == 0x44
        time.sleep(every)
    return last


def test_a_device_moving_between_two_workers_is_online_once_and_offline_once(data_dir):
    from .test_workers import port_for

    server = start_corem(data_dir, "--workers", "2", "--presence-offline-after", str(LIVE_THRESHOLD))
    first, second = port_for(0, 2), port_for(1, 2)
    try:
        send_from(server.coap_port, first, 4, 100)  # worker 0 hears it
        wait_for(lambda: presence_events(data_dir), timeout=30, what="the online")
        # then it is heard by worker 1 only, for longer than the threshold: worker 0 stops hearing it
        last = send_from(server.coap_port, second, BEYOND_THRESHOLD, 200)
        m = server.metrics()  # (each worker served its own source port: the device moved)
        assert m['corem_worker_requests{worker="0"}'] >= 4
        assert m['corem_worker_requests{worker="1"}'] >= BEYOND_THRESHOLD
        events = wait_settled([data_dir])
    finally:
        first.close()
        second.close()
        server.stop()
    assert [e["state"] for e in events] == ["online", "offline"], events
    online, offline = events
    assert offline["last_seen"] >= last  # the last reading, on worker 1
    assert offline["at"] >= last + LIVE_THRESHOLD * 1000  # not while worker 1 still heard it


def test_a_worker_killed_while_it_holds_the_device_repeats_no_online(data_dir):
    """The worker is started again and gets the device back (same source port): no second online;
    the killed process's count stays in the table, so the offline comes by the way out, once."""
    from .test_workers import port_for, worker_pids

    server = start_corem(data_dir, "--workers", "2", "--presence-offline-after", str(LIVE_THRESHOLD))
    sock = port_for(1, 2)
    try:
        send_from(server.coap_port, sock, 4, 100)
        wait_for(lambda: presence_events(data_dir), timeout=30, what="the online")
        victim = wait_for(lambda: worker_pids(server).get(1), what="worker 1")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker_pids(server).get(1) not in (None, victim), timeout=60, what="worker 1 started again")
        last = send_from(server.coap_port, sock, 6, 200)
        events = wait_settled([data_dir])
    finally:
        sock.close()
        server.stop()
    assert [e["state"] for e in events] == ["online", "offline"], events
    assert events[1]["at"] >= last + LIVE_THRESHOLD * 1000


def two_nodes(registry_url, tmp_path):
    """Nodes a and b sharing registry_url, and the device's UDP socket."""
    import socket

    nodes = [start_corem(tmp_path / name, "--registry", registry_url,
                         "--presence-offline-after", str(LIVE_THRESHOLD)) for name in ("a", "b")]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return nodes, sock, [n.data_dir for n in nodes]


@pytest.fixture
def registry_url(pg_url, tmp_path):
    corem_cli("devices", "add", "--registry", pg_url, "--tenant", "acme", "--device", "sensor-1",
              "--token", "T0KEN-1", data_dir=tmp_path / "cli")
    return pg_url


def test_a_device_moving_between_two_nodes_is_online_once_and_offline_once(registry_url, tmp_path):
    nodes, sock, dirs = two_nodes(registry_url, tmp_path)
    try:
        send_from(nodes[0].coap_port, sock, 4, 100)  # node a hears it
        wait_for(lambda: presence_events(*dirs), timeout=30, what="the online")
        last = send_from(nodes[1].coap_port, sock, BEYOND_THRESHOLD, 200)  # then node b (the balancer moved it)
        events = wait_settled(dirs)
    finally:
        sock.close()
        for n in nodes:
            n.stop()
    assert [e["state"] for e in events] == ["online", "offline"], events
    assert presence_events(dirs[0])[0]["state"] == "online" and presence_events(dirs[1])[0]["state"] == "offline"
    assert events[1]["last_seen"] >= last and events[1]["at"] >= last + LIVE_THRESHOLD * 1000


def test_the_devices_of_a_killed_node_go_offline_once_by_another_node(registry_url, tmp_path):
    nodes, sock, dirs = two_nodes(registry_url, tmp_path)
    try:
        last = send_from(nodes[0].coap_port, sock, 3, 100)
        wait_for(lambda: presence_events(dirs[0]), timeout=30, what="the online")
        os.kill(nodes[0].proc.pid, signal.SIGKILL)  # node a dies holding the device: no offline from it
        nodes[0].proc.wait(10)
        events = wait_settled(dirs)
    finally:
        sock.close()
        nodes[1].stop()
    assert [e["state"] for e in events] == ["online", "offline"], events
    assert presence_events(dirs[1])[0]["state"] == "offline"  # by node b's sweep
    # the last reading node a wrote (it writes at most every quarter threshold; what it heard
    # after its last write died with it)
    assert events[1]["last_seen"] >= last - (LIVE_THRESHOLD / 4 + 2 * 0.5) * 1000 - 300
