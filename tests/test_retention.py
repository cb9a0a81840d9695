"""Retention of the embedded bus (corem/bus/retention.py): by age and by size, oldest first, in
small transactions, never the newest batch; then through a running `corem serve` (one process
and --workers) whose bus.db holds records older than its age and more than its size."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import cbor2
import msgspec
import pytest

from corem.bus import EmbeddedBus, read_records
from corem.bus.retention import Pruner, parse_age, parse_size
from corem.config import ConfigError, Settings

from .conftest import corem_cli, post, start_corem, wait_for

_encode = msgspec.msgpack.Encoder().encode


def point(tenant: str, i: int, pad: int = 0) -> bytes:
    p = {"tenant": tenant, "device": "old-1", "ts": 1764000000000 + i, "numeric_values": {"i": float(i)},
         "string_values": {"pad": "x" * pad} if pad else {}, "protocol": "coap", "received_at": 1764000000000 + i,
         "profile": "default"}
    return json.dumps(p, separators=(",", ":")).encode()


def write_batches(path: Path, batches: list[tuple[int, int, int]], tenant: str = "acme") -> None:
    """Append batches to bus.db as corem's writer does: (records, appended_at ms, padding per record)."""
    bus = EmbeddedBus(path)
    bus.open()
    try:
        for count, appended_at, pad in batches:
            start = bus._next_offset
            group = [(b"old-1", point(tenant, start + j, pad), {"protocol": "coap"}) for j in range(count)]
            bus.write_prepared([(bus._next_offset, f"telemetry.raw.{tenant}", count, _encode(group), appended_at)])
    finally:
        bus.close_sync()


def offsets(path: Path) -> list[int]:
    return [r.offset for r in read_records(path)]


def test_the_settings_parse_ages_and_sizes():
    assert parse_age("7d") == 7 * 86400 and parse_age("12h") == 43200 and parse_age("90") == 90
    assert parse_age("1.5m") == 90 and parse_age("2w") == 14 * 86400 and parse_age(604800) == 604800
    assert parse_age("off") is None and parse_age("0") is None
    assert parse_size("2GiB") == 2 << 30 and parse_size("500MB") == 500_000_000 and parse_size("1024") == 1024
    assert parse_size("64 KiB") == 65536 and parse_size("off") is None and parse_size(1 << 30) == 1 << 30
    for bad in ("7 days", "-1d", "1y", "nan", "inf", "1e3"):
        with pytest.raises(ValueError, match="bus_retention_age"):
            parse_age(bad)
    for bad in ("2G", "2 gigs", "-5MB", "nan"):
        with pytest.raises(ValueError, match="bus_retention_size"):
            parse_size(bad)
    s = Settings.load({"bus_retention_age": "36h", "bus_retention_size": "1GiB"}, env={})
    assert (s.bus_retention_age, s.bus_retention_size) == ("36h", "1GiB")
    assert (Settings().bus_retention_age, Settings().bus_retention_size) == ("7d", "off")
    with pytest.raises(ConfigError, match=r"^bus_retention_size: '3 parsecs' is not a size"):
        Settings.load({"bus_retention_size": "3 parsecs"}, env={})


def test_records_older_than_the_age_are_pruned_oldest_first_and_offsets_stay_dense(tmp_path):
    path = tmp_path / "bus.db"
    now_ms = int(time.time() * 1000)
    old, young = now_ms - 3 * 3600_000, now_ms - 60_000
    write_batches(path, [(10, old, 0)] * 30 + [(10, young, 0)] * 5)  # offsets 1-300 old, 301-350 young
    pruner = Pruner(path, age=3600, size=None, step_rows=8)
    assert pruner.step() == 80  # one small transaction: 8 batches
    assert pruner.prune() == 220
    assert offsets(path) == list(range(301, 351))  # the young ones, dense
    assert pruner.stats.records == {"age": 300, "size": 0} and pruner.stats.steps == 30 // 8 + 1
    # a reader positioned before the log's new start goes on at its first record
    assert [r.offset for r in read_records(path, after=120, limit=2)] == [301, 302]
    # the writer goes on with the next offset, in this process and in the next one
    write_batches(path, [(1, now_ms, 0)])
    assert offsets(path)[-1] == 351
    pruner.close()


def test_the_newest_batch_is_kept_whatever_its_age_so_offsets_are_never_reused(tmp_path):
    path = tmp_path / "bus.db"
    ancient = int(time.time() * 1000) - 30 * 86400_000
    write_batches(path, [(5, ancient, 0)] * 3)
    pruner = Pruner(path, age=60, size=1)
    assert pruner.prune() == 10
    assert offsets(path) == [11, 12, 13, 14, 15]
    pruner.close()
    write_batches(path, [(1, ancient, 0)])  # a restart reads the next offset from the batch kept
    assert offsets(path)[-1] == 16


def test_the_oldest_records_go_while_the_log_uses_more_than_its_size(tmp_path):
    path = tmp_path / "bus.db"
    now_ms = int(time.time() * 1000)
    write_batches(path, [(20, now_ms, 2000)] * 60)  # ~40 KB a batch, ~2.4 MB
    limit = 1 << 20
    pruner = Pruner(path, age=None, size=limit, step_bytes=256 * 1024)
    assert pruner.used_bytes() > 2 * limit
    pruned = pruner.prune()
    assert pruner.used_bytes() <= limit and pruner.stats.size <= limit
    kept = offsets(path)
    assert pruned == 1200 - len(kept) and pruner.stats.records["size"] == pruned
    assert kept == list(range(pruned + 1, 1201))  # the newest ones, dense
    # not more than needed: about 1 MB of the 2.4 are left (a batch's 40 KB in the bus's pages, three
    # of 16 KB: the pruner counts the pages a batch frees, not its length, which over-pruned by ~20%)
    assert len(kept) >= 400
    # the file does not shrink: its free pages are reused, so it grows no more
    length = path.stat().st_size
    write_batches(path, [(20, now_ms, 2000)] * 5)
    pruner.prune()
    assert path.stat().st_size == length and pruner.used_bytes() <= limit
    pruner.close()


def test_the_size_limit_keeps_what_a_restart_reads_back_and_an_age_below_it_is_refused(tmp_path):
    """A restart reads the last exchange_lifetime of records back to store no retransmitted reading
    twice (bus/recovery.py): the size limit prunes none of them -- the log stays over its size,
    counted -- and an age below exchange_lifetime is refused at start, naming both settings."""
    path = tmp_path / "bus.db"
    now_ms = int(time.time() * 1000)
    write_batches(path, [(20, now_ms - 600_000, 2000)] * 20 + [(20, now_ms - 60_000, 2000)] * 20)
    pruner = Pruner(path, age=None, size=1, keep=247)
    assert pruner.prune() == 400  # the ones from ten minutes ago; none from a minute ago
    assert offsets(path) == list(range(401, 801))
    assert pruner.stats.records["size"] == 400 and pruner.stats.held == 1
    assert pruner.step() == 0 and pruner.stats.held == 2
    pruner.close()
    with pytest.raises(ConfigError, match=r"^bus_retention_age: '2m' is shorter than exchange_lifetime \(247 s\)"):
        Settings.load({"bus_retention_age": "2m"}, env={}).check()
    assert Settings.load({"bus_retention_age": "2m", "exchange_lifetime": 60}, env={}).check()
    assert Settings.load({"bus_retention_age": "5m"}, env={}).check()


def test_pruning_a_backlog_leaves_the_writer_its_turn(tmp_path):
    """The pruner catches up in small transactions while a writer commits batches: each of its
    transactions is short, and every batch of the writer is committed while it catches up."""
    import trio

    path = tmp_path / "bus.db"
    ancient = int(time.time() * 1000) - 30 * 86400_000
    write_batches(path, [(50, ancient, 500)] * 2000)  # ~55 MB of records to prune
    pruner = Pruner(path, age=3600, size=None)
    bus = EmbeddedBus(path, synchronous="NORMAL")
    bus.open()
    commits: list[float] = []
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            group = [(b"new", point("acme", 0), {}) for _ in range(50)]
            bus.write_prepared([(bus._next_offset, "telemetry.raw.acme", 50, _encode(group), int(time.time() * 1000))])
            commits.append(time.perf_counter() - started)
            time.sleep(0.002)

    writer = threading.Thread(target=write)
    writer.start()

    async def main() -> None:
        with trio.move_on_after(120):
            while pruner.stats.records["age"] < 100_000:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pruner.run)
                    while pruner.stats.records["age"] < 100_000:
                        await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        stop.set()
        writer.join()
        bus.close_sync()
    assert pruner.stats.records["age"] == 100_000 and pruner.stats.errors == 0
    assert len(commits) > 10 and min(offsets(path)) == 100_001
    # bounded work per transaction: at most STEP_ROWS batches or STEP_BYTES of records
    assert pruner.stats.steps >= 100_000 * 550 // (2 << 20)
    print(f"prune steps {pruner.stats.steps}, longest {pruner.stats.longest_step * 1000:.1f} ms; writer commits "
          f"{len(commits)}, median {sorted(commits)[len(commits) // 2] * 1000:.2f} ms, "
          f"max {max(commits) * 1000:.1f} ms")


def _bus_with_history(data_dir: Path) -> tuple[int, int]:
    """bus.db with 20 batches from 3 h ago (300 records) and 40 of ~66 KB from ten minutes ago --
    older than exchange_lifetime, which the size limit keeps: (the old records, the young ones)."""
    now_ms = int(time.time() * 1000)
    write_batches(data_dir / "bus.db", [(15, now_ms - 3 * 3600_000, 0)] * 20 + [(30, now_ms - 600_000, 2000)] * 40,
                  tenant="hist")
    return 300, 1200


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_running_corem_prunes_its_bus_past_the_retention_and_tail_still_works(data_dir, workers):
    old, young = _bus_with_history(data_dir)
    server = start_corem(data_dir, "--bus-retention-age", "1h", "--bus-retention-size", "1MiB", "--workers", workers)
    try:
        def pruned() -> dict[str, float]:
            m = server.metrics()
            return {r: m.get(f'corem_bus_pruned_records_total{{reason="{r}"}}', 0.0) for r in ("age", "size")}

        wait_for(lambda: (p := pruned())["age"] == old and p["size"] > 0 and server.metrics()["corem_bus_size_bytes"]
                 <= 1 << 20, what="the bus pruned by age and size")
        assert server.metrics()["corem_bus_prune_errors_total"] == 0
        # readings go on being taken, and `tail` reads what is kept: the newest history and them
        for n in range(3):
            answer = post(server.coap_port, "T0KEN-1", cbor2.dumps({"after": n}), 300 + n)
            assert answer is not None and answer[1] == 0x44
        history = server.points("hist")
        assert history and len(history) < young and all(p["string_values"]["pad"] for p in history)
        assert [p["numeric_values"]["i"] for p in history][-1] == old + young  # the newest kept
        assert [p["numeric_values"] for p in server.points("acme")] == [{"after": 0.0}, {"after": 1.0}, {"after": 2.0}]
        tail = corem_cli("telemetry", "tail", "--limit", "1", data_dir=data_dir).stdout
        assert "acme/sensor-1 after=2" in tail
        stored = sorted(r.offset for r in read_records(data_dir / "bus.db"))
        # one dense run of offsets: the history kept, the readings and their presence records
        assert stored == list(range(stored[0], stored[-1] + 1)) and stored[-1] >= old + young + 3
        assert stored[0] > old + 1
    finally:
        assert server.stop() == 0


def test_retention_off_keeps_everything(data_dir):
    old, young = _bus_with_history(data_dir)
    server = start_corem(data_dir, "--bus-retention-age", "off")
    try:
        wait_for(lambda: server.metrics()["corem_bus_size_bytes"] > 0, what="the bus measured")
        assert server.metrics()['corem_bus_pruned_records_total{reason="age"}'] == 0
    finally:
        assert server.stop() == 0
    assert len(server.points("hist")) == old + young
    with sqlite3.connect(data_dir / "bus.db") as conn:
        assert conn.execute("SELECT SUM(count) FROM batches").fetchone()[0] == old + young
