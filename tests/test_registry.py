"""The registry's in-memory directory at fleet scale: packed devices behind compact indexes
(corem/registry/compact.py), kept current from the change log (corem/registry/directory.py) --
the changed rows only, on SQLite and on PostgreSQL -- and what the ingest and the fast lane made
from a changed device made again.  The memory a device costs is the benchmark's
(bench/registry_bench.py), not a test's."""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import cbor2
import pytest
import trio

from corem.registry import Directory, Registry
from corem.registry import compact, directory as directory_module
from corem.registry.bulk import import_devices
from corem.registry.compact import NAME, PSK, TOKEN, Fleet, PyIndex
from corem.registry.store import parse_oscore

from .postgres_server import Postgres, binaries, empty

HAVE_PG = binaries() is not None or os.environ.get("CI") == "true"
INDEXES = [PyIndex] + ([compact._CIndex] if compact._CIndex is not None else [])


@pytest.fixture(scope="module")
def pg():
    if not HAVE_PG:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql)")
    server = Postgres()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    """A registry's location: a SQLite file, or an empty PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "registry.db"
    return empty(request.getfixturevalue("pg").url)


def test_ci_builds_the_index():
    if os.environ.get("CI") == "true" and not os.environ.get("COREM_PURE_PYTHON"):
        assert compact._CIndex is not None, "corem.registry._index did not build"


# -- the index and the packed fleet ---------------------------------------------------------------
@pytest.mark.parametrize("index", INDEXES, ids=lambda i: i.__module__)
def test_the_index_keeps_what_a_dict_would(index):
    rng = random.Random(7)
    x, model = index(), {}
    for _ in range(20_000):
        # few distinct hashes, so that probe chains meet and deletions shift entries back
        h = rng.choice([rng.randrange(-2**63, 2**63), rng.randrange(64), -1 - rng.randrange(64)])
        op = rng.random()
        if op < 0.5:
            row = rng.randrange(2**32 - 1)
            assert x.put(h, row) == model.get(h, -1)
            model[h] = row
        elif op < 0.85:
            assert x.pop(h) == model.pop(h, -1)
        else:
            assert x.get(h) == model.get(h, -1)
        assert len(x) == len(model)
    assert all(x.get(h) == row for h, row in model.items())
    x.clear()
    assert len(x) == 0 and x.get(next(iter(model), 0)) == -1


def _row(tenant, device, token=None, psk_identity=None, psk=None, cert=None, kid=None, profile="default"):
    return (tenant, device, profile, token, 1, psk_identity, psk, cert, "drx", "#", "", None, kid)


@pytest.mark.parametrize("index", INDEXES, ids=lambda i: i.__module__)
@pytest.mark.parametrize("hasher", [hash, lambda key: 7], ids=["hash", "every-key-collides"])
def test_a_fleet_finds_each_device_by_each_key_and_forgets_the_old_ones(hasher, index, monkeypatch):
    monkeypatch.setattr(compact, "new_index", index)
    f = Fleet(hasher, cache=4)
    assert all(isinstance(x, index) for x in f.indexes)
    for i in range(50):
        f.put(_row("t", f"d{i}", token=f"T{i}", psk_identity=f"id{i}" if i % 2 else None, psk=b"k" * 16 if i % 2 else None,
                   cert=f"{i:064x}" if i % 3 == 0 else None))
    assert len(f) == 50 and f.counts[TOKEN] == 50 and f.counts[PSK] == 25
    for i in range(50):
        assert f.find(TOKEN, f"T{i}").device == f"d{i}"
        assert f.find(NAME, ("t", f"d{i}")).token == f"T{i}"
        assert (f.find(PSK, f"id{i}") is not None) == bool(i % 2)
    assert f.find(TOKEN, "T50") is None and f.find(NAME, ("t", "d50")) is None and f.find(NAME, ("u", "d1")) is None
    # a re-key, a credential moving to another device, a removal
    f.put(_row("t", "d1", token="T1-new", psk_identity="id1", psk=b"n" * 16))
    f.put(_row("t", "d2", token="T3"))  # (d3 still has T3 here: its own change has not come yet)
    assert f.find(TOKEN, "T1") is None and f.find(TOKEN, "T1-new").device == "d1" and f.find(PSK, "id1").psk == b"n" * 16
    assert f.find(TOKEN, "T3").device == "d2" and f.find(TOKEN, "T2") is None
    f.put(_row("t", "d3", token="T3b"))  # d3's change: its old token was d2's already
    assert f.find(TOKEN, "T3").device == "d2" and f.find(TOKEN, "T3b").device == "d3"
    assert f.remove(("t", "d4")) and not f.remove(("t", "d4"))
    assert f.find(TOKEN, "T4") is None and f.find(NAME, ("t", "d4")) is None and len(f) == 49
    f.put(_row("t", "d4", token="T4"))  # its row is used again
    assert f.find(TOKEN, "T4").device == "d4" and len(f.rows) == 50
    assert sorted(d.device for d in f.devices()) == sorted(f"d{i}" for i in range(50))
    assert f.tenants == {"t": 50} and f.profiles == {"default": 50}


def test_a_fingerprint_another_tool_wrote_is_kept_as_written():
    f = Fleet()
    for i, cert in enumerate(["AB" * 32, "not hex", "ab" * 32]):
        f.put(_row("t", f"d{i}", cert=cert))
    assert [f.find(compact.CERT, c).device for c in ("AB" * 32, "not hex", "ab" * 32)] == ["d0", "d1", "d2"]
    assert len(f.rows[2]) < len(f.rows[0])  # (the lowercase one packed as 32 bytes)


def test_oscore_keys_another_writer_broke_leave_the_device_without_oscore_not_a_5_00(caplog):
    """A shared registry's row is written by whoever: keys that do not decode are said once, when
    the row is packed, and the device is served without an OSCORE context (its lookups raise
    nothing, where a request would have been answered 5.00)."""
    f = Fleet()
    bad = _row("t", "d1", token="T1")[:11] + ('{"sender_id": 5',) + (None,)
    f.put(bad)
    assert f.find(compact.TOKEN, "T1").oscore is None
    assert "oscore keys do not read" in caplog.text


def test_a_packed_device_is_the_device_as_stored(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    try:
        oscore = parse_oscore("01", "0a0b", "0123456789abcdef", None, "c0ffee", "aa")
        reg.add_device("acme", "full", token="T", profile="p1", psk_identity="id", psk=b"\x00" * 16,
                       cert_sha256="ab" * 32, power_mode="psm", topics="a/# b/+", gateways="gw-1 gw-2", oscore=oscore)
        reg.add_device("acme", "bare")
        d = Directory(reg)
        d.refresh()
        assert [d.named(x.tenant, x.device) for x in reg.list_devices()] == reg.list_devices()
        assert d.oscore_device(b"\xaa", b"\x0a\x0b").device == "full" and d.oscore_device(None, b"\x0a\x0b") is None
        assert d.cert_device("ab" * 32).device == "full" and d.psk_device("id").device == "full"
        assert d.knows_token(b"T") and not d.knows_token(b"\xff") and not d.knows_token(b"U")
        assert d.profile_counts() == {"p1": 1, "default": 1} and d.tenants() == {"acme"}
        assert sorted(d.by_name) == [("acme", "bare"), ("acme", "full")]
        assert "T" in d.by_token and len(d.by_token) == 1 and d.by_name["acme", "bare"].token is None
    finally:
        reg.close()


# -- the change log ---------------------------------------------------------------------------------
def test_each_change_is_read_as_it_is_and_nothing_is_read_again(where):
    """An add, a credential changed, a re-key, a removal, a profile: each read from the change log
    (the rows it names only), on SQLite and PostgreSQL alike; the whole registry read once."""
    writer, server = Registry(where), Registry(where)  # (two connections: a CLI and a server)
    try:
        for i in range(20):
            writer.add_device("acme", f"d{i}", token=f"T{i}", psk_identity=f"id{i}", psk=b"k" * 16)
        d = Directory(server)
        heard = []
        d.listen(heard.append)
        d.refresh()
        assert d.reloads == 1 and len(d) == 20 and heard == [None]

        writer.add_device("acme", "new", token="NEW")
        assert d.refresh() and d.token_device("NEW").device == "new"
        assert heard[-1] == [("acme", "new")] and d.updates == 1

        import_devices(writer, [(1, {"tenant": "acme", "device": "d1", "token": "T1-b", "psk_identity": "id1",
                                     "psk_hex": "11" * 16})], replace=True)  # a token and a PSK changed
        d.refresh()
        assert d.token_device("T1") is None and d.token_device("T1-b").device == "d1"
        assert d.psk_device("id1").psk == b"\x11" * 16

        writer.remove_device("acme", "d2")
        d.refresh()
        assert d.token_device("T2") is None and d.named("acme", "d2") is None and d.psk_device("id2") is None
        assert not d.knows_token(b"T2") and len(d) == 20

        from corem.profiles.spec import parse_profile

        writer.put_profile("tb", parse_profile('{"format": "thingsboard"}'))
        d.refresh()
        assert list(d.profiles) == ["tb"] and heard[-1] is None  # (a profile: every device may decode anew)

        assert d.reloads == 1 and d.updates == 3
        assert not d.refresh()  # nothing since
    finally:
        writer.close()
        server.close()


def test_a_token_handed_from_one_device_to_another_in_one_batch(where):
    writer, server = Registry(where), Registry(where)
    try:
        writer.add_device("acme", "a", token="X")
        writer.add_device("acme", "b", token="Y")
        d = Directory(server)
        d.refresh()
        import_devices(writer, [(1, {"tenant": "acme", "device": "a", "token": "A2"}),
                                (2, {"tenant": "acme", "device": "b", "token": "X"})], replace=True)
        import_devices(writer, [(1, {"tenant": "acme", "device": "a", "token": "Y"})], replace=True)
        d.refresh()
        assert d.token_device("X").device == "b" and d.token_device("Y").device == "a"
        assert d.token_device("A2") is None and d.reloads == 1
    finally:
        writer.close()
        server.close()


def test_many_changes_are_read_in_batches_and_a_flood_reads_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(directory_module, "BATCH", 7)
    monkeypatch.setattr(directory_module, "FULL", 30)
    writer, server = Registry(tmp_path / "r.db"), Registry(tmp_path / "r.db")
    try:
        d = Directory(server)
        d.refresh()
        import_devices(writer, [(i, {"tenant": "t", "device": f"d{i}", "token": f"T{i}"}) for i in range(25)])
        d.refresh()
        assert d.reloads == 1 and d.updates == 25 and len(d) == 25  # four batches
        import_devices(writer, [(i, {"tenant": "t", "device": f"e{i}"}) for i in range(31)])
        d.refresh()
        assert d.reloads == 2 and len(d) == 56  # more than FULL waited: read whole
    finally:
        writer.close()
        server.close()


def test_a_log_pruned_past_a_directory_makes_it_read_everything(where, monkeypatch):
    monkeypatch.setattr(directory_module, "PRUNE_CHUNK", 1)  # (a transaction per change)
    writer, server = Registry(where), Registry(where)
    try:
        writer.add_device("t", "a", token="A")
        d, other = Directory(server), Directory(server)
        d.refresh()
        other.refresh()
        writer.add_device("t", "b", token="B")
        d.refresh()
        assert d.prune(writer.db, retain=-10) >= 2  # (everything: older than ten seconds from now)
        writer.add_device("t", "c", token="C")
        d.refresh()
        assert d.reloads == 1 and d.token_device("C")  # it had read up to the pruning
        other.refresh()
        assert other.reloads == 2 and other.token_device("B") and other.token_device("C")  # it had not
    finally:
        writer.close()
        server.close()


def test_an_update_reads_off_the_event_loop_on_a_connection_of_its_own(where):
    writer, server = Registry(where), Registry(where)
    d = Directory(server)

    async def main():
        await d.update()
        writer.add_device("t", "a", token="A")
        if not writer.shared:
            assert d.changed()  # (SQLite's data_version moved)
        await d.update(force=True)
        assert d.token_device("A") and d._reader is not None

    try:
        trio.run(main)
    finally:
        d.close()
        writer.close()
        server.close()


def test_a_read_that_fails_is_logged_and_the_next_look_reads_again(tmp_path, monkeypatch, caplog):
    import sqlite3

    writer, server = Registry(tmp_path / "r.db"), Registry(tmp_path / "r.db")
    d = Directory(server)
    real, failures = Directory.read, [sqlite3.OperationalError("disk I/O error")]

    def read(self, db):
        if failures:
            raise failures.pop()
        return real(self, db)

    monkeypatch.setattr(Directory, "read", read)

    async def main():
        writer.add_device("t", "a", token="A")
        await d.update()
        assert d.token_device("A") is None and "could not read its changes" in caplog.text
        await d.update()
        assert d.token_device("A")

    try:
        trio.run(main)
    finally:
        d.close()
        writer.close()
        server.close()


def test_a_truncated_table_is_read_whole_again(pg):
    url = empty(pg.url)
    writer, server = Registry(url), Registry(url)
    try:
        writer.add_device("t", "a", token="A")
        d = Directory(server)
        d.refresh()
        writer.db.execute("TRUNCATE devices")
        writer.add_device("t", "b", token="B")
        d.refresh()
        assert d.reloads == 2 and d.token_device("A") is None and d.token_device("B")
    finally:
        writer.close()
        server.close()


# -- what was made from a device is made again: the ingest's targets, the fast lane's tables ------
def _post(token: str, mid: int) -> bytes:
    t = token.encode()
    length = bytes([len(t)]) if len(t) < 13 else bytes([0x0D, len(t) - 13])
    opts = b"\xb3api\x02v1" + length + t + b"\x09telemetry\x11\x3c"
    return struct.pack("!BBH", 0x40, 0x02, mid) + opts + b"\xff" + cbor2.dumps({"t": 1})


@pytest.fixture
def cold(monkeypatch):
    """A fast lane that takes devices up as they talk, as beyond WARM devices."""
    import corem.fastlane

    if corem.fastlane.Lane is None:
        pytest.skip("the C lane is not built")
    monkeypatch.setattr(corem.fastlane, "WARM", 0)
    from .lane_twin import Twin

    twin = Twin()
    yield twin
    twin.close()


def _lane_took(side) -> int:
    return side.lane.lane.counters()["accepted"] if side.lane is not None else 0


def test_a_device_is_taken_up_by_the_lane_after_its_first_reading_and_let_go_when_it_changes(cold):
    from corem.codec import Code, decode

    lane = cold.lane
    assert lane.lane.held == 0
    for mid in (1, 2):
        cold.receive(_post("T1", mid))
        cold.commit()
        answers, _ = cold.check()
        assert [decode(a[0]).code for a in answers] == [Code.CHANGED]
        assert _lane_took(lane) == mid - 1  # the first on the Python path, the next on the lane
    assert lane.lane.held == 1
    import_devices(cold.registry, [(1, {"tenant": "acme", "device": "d1", "token": "T1-new"})], replace=True)
    cold.directory.refresh(force=True)
    assert lane.lane.held == 0 and lane.ingest._targets.get(("acme", "d1")) is None
    cold.receive(_post("T1", 3))
    cold.receive(_post("T1-new", 4))
    cold.commit()
    answers, stored = cold.check()
    assert sorted(decode(a[0]).code for a in answers) == [Code.CHANGED, Code.UNAUTHORIZED]
    cold.registry.remove_device("acme", "d1")
    cold.directory.refresh(force=True)
    cold.receive(_post("T1-new", 5))
    cold.commit()
    answers, _ = cold.check()
    assert [decode(a[0]).code for a in answers] == [Code.UNAUTHORIZED]


def test_a_full_lane_lets_the_oldest_go_at_most_once_a_second(cold, monkeypatch):
    lane = cold.lane.lane
    lane.hot_max = 2
    for i in range(3):
        cold.registry.add_device("acme", f"x{i}", token=f"X{i}")
    cold.directory.refresh(force=True)
    for mid, token in enumerate(["X0", "X1", "X2"]):
        cold.lane.receive(_post(token, mid), ("127.0.0.1", 40000))
    assert lane.held == 2 and ("acme", "x2") in lane._hot and ("acme", "x0") not in lane._hot
    cold.lane.receive(_post("T1", 9), ("127.0.0.1", 40000))
    assert ("acme", "d1") not in lane._hot  # (full, and it let one go less than a second ago)


def test_a_token_the_lane_does_not_hold_is_still_exempt_from_the_rate_limit(monkeypatch):
    import corem.fastlane

    if corem.fastlane.Lane is None:
        pytest.skip("the C lane is not built")
    monkeypatch.setattr(corem.fastlane, "WARM", 0)
    from corem.coap.endpoint import Endpoint, Params
    from corem.fastlane import FastLane

    from .lane_twin import Twin

    twin = Twin()
    try:
        ingest = twin.lane.ingest
        lane = FastLane(ingest, twin.lane.sink, Endpoint(Params()), rate=0.5)  # (a burst of one)
        peer = ("127.0.0.1", 40001)
        now = twin.clock[0]
        slow = lane.receive(_post("T1", 1), peer, now)  # within the rate; not held: Python's
        slow += lane.receive(_post("T1", 2), peer, now)  # over it, but the token is registered
        slow += lane.receive(_post("NOPE", 3), peer, now)  # over it, unknown: dropped
        assert len(slow) == 2 and lane.counters["exempted"] == 1 and lane.counters["dropped"] == 1
    finally:
        twin.close()


# -- a running server -----------------------------------------------------------------------------
def test_a_running_server_serves_each_change_without_reading_the_registry_again(tmp_path):
    from .conftest import corem_cli, start_corem, wait_for

    data = tmp_path / "data"
    lines = "\n".join(f'{{"tenant": "fleet", "device": "d{i}", "token": "T{i}"}}' for i in range(3000))
    (tmp_path / "fleet.jsonl").write_text(lines + "\n")
    corem_cli("devices", "import", str(tmp_path / "fleet.jsonl"), data_dir=data)
    server = start_corem(data)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(60)  # a failure detector: the answer comes at once on an idle machine
    mid = [0]

    def code(token: str) -> int:
        mid[0] += 1
        sock.sendto(_post(token, mid[0]), ("127.0.0.1", server.coap_port))
        while True:
            data, _ = sock.recvfrom(2048)
            if struct.unpack("!H", data[2:4])[0] == mid[0]:
                return data[1]

    try:
        assert code("T7") == 0x44 and code("NEW") == 0x81
        corem_cli("devices", "add", "--tenant", "fleet", "--device", "new", "--token", "NEW", data_dir=data)
        # (served when the CLI returns on an idle machine, its nudge waiting up to 2 s for the server;
        # under load a moment later: the bound only detects a change never applied)
        wait_for(lambda: code("NEW") == 0x44, 60, "the added device served")
        (tmp_path / "rekey.jsonl").write_text('{"tenant": "fleet", "device": "d7", "token": "T7-b"}\n')
        corem_cli("devices", "import", str(tmp_path / "rekey.jsonl"), "--replace", data_dir=data)
        wait_for(lambda: code("T7") == 0x81 and code("T7-b") == 0x44, 60, "the new key served, the old refused")
        corem_cli("devices", "remove", "--tenant", "fleet", "--device", "new", data_dir=data)
        wait_for(lambda: code("NEW") == 0x81, 60, "the removed device refused")
        other = Registry(data / "registry.db")  # a writer that does not nudge: the poll finds it
        try:
            other.add_device("fleet", "quiet", token="QUIET")
        finally:
            other.close()
        wait_for(lambda: code("QUIET") == 0x44, what="the poll to find a change nobody announced")
        m = server.metrics()
        assert m["corem_registry_reads_total"] == 1 and m["corem_registry_changes_total"] == 4
        assert m["corem_registry_devices"] == 3001
    finally:
        sock.close()
        server.stop()


def test_a_profile_name_put_profile_could_never_give_is_refused_naming_it(tmp_path):
    """A device (or a provisioning key) naming a profile no profile can have was stored, and its
    readings were answered 5.00 until it was moved (found by a review)."""
    from corem.errors import BadInput
    from corem.registry.management import Management

    reg = Registry(tmp_path / "registry.db")
    for bad in ("my profile/v2 ", "é nope", ""):
        with pytest.raises(BadInput, match=r"^profile: .*allowed: 1-64 of"):
            reg.add_device("acme", "d1", token="T1", profile=bad)
        with pytest.raises(BadInput, match=r"^profile: "):
            Management(reg).add_provision_key("k1", "s3cret-1", "acme", profile=bad)
    reg.add_device("acme", "d1", token="T1", profile="thermo.v2_a-1")
