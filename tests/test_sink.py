"""The group-commit batcher and the embedded SQLite bus, on real SQLite files."""

from __future__ import annotations

import sqlite3

import pytest
import trio

from corem.bus import EmbeddedBus, Record, read_records


def rec(i: int, tenant: str = "acme") -> Record:
    return Record(f"telemetry.raw.{tenant}", b"dev", f'{{"i":{i}}}'.encode(), {"protocol": "coap"})


@pytest.fixture(params=[False, True], ids=["thread", "inline"])
def inline(request) -> bool:
    """Each batch written in a worker thread, or on the event loop (`EmbeddedBus.inline`: store
    NORMAL on one CPU): the same answers and the same log either way."""
    return request.param


async def test_done_only_after_commit_and_batches_group(tmp_path, inline):
    bus = EmbeddedBus(tmp_path / "bus.db", synchronous="NORMAL")
    bus.inline = inline
    results: list = []
    seen_in_db: list[int] = []

    def done_factory(i):
        def done(ctx, err):
            # when a reading is acknowledged, it is already readable from another connection
            offsets = [r.value for r in read_records(tmp_path / "bus.db")]
            seen_in_db.append(rec(i).value in offsets)
            results.append((i, err))

        return done

    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        for i in range(500):
            assert bus.submit(rec(i), done_factory(i))
        await bus.close()
    assert [i for i, _ in results] == list(range(500))
    assert all(err is None for _, err in results)
    assert all(seen_in_db)
    assert bus.stats.acked == 500 and bus.stats.batches < 500  # grouped, not one commit per record
    stored = list(read_records(tmp_path / "bus.db", "telemetry.raw.acme"))
    assert [r.value for r in stored] == [rec(i).value for i in range(500)]
    assert [r.offset for r in stored] == list(range(1, 501))  # dense offsets across batches
    assert [r.offset for r in read_records(tmp_path / "bus.db", after=490)] == list(range(491, 501))
    assert [r.offset for r in read_records(tmp_path / "bus.db", limit=3, newest=True)] == [498, 499, 500]
    assert [r.offset for r in read_records(tmp_path / "bus.db", limit=3)] == [1, 2, 3]
    assert stored[0].headers == {"protocol": "coap"} and stored[0].key == b"dev"


async def test_topic_prefix_filter(tmp_path):
    bus = EmbeddedBus(tmp_path / "bus.db")
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        bus.submit(rec(1, "a_b"), lambda ctx, e: None)
        bus.submit(rec(2, "aXb"), lambda ctx, e: None)
        await bus.close()
    # '_' is a LIKE wildcard: the prefix must match literally
    assert [r.topic for r in read_records(tmp_path / "bus.db", "telemetry.raw.a_b")] == ["telemetry.raw.a_b"]


async def test_full_sink_refuses(tmp_path):
    bus = EmbeddedBus(tmp_path / "bus.db", max_pending=3)
    # not running: nothing drains, so the 4th is refused
    assert all(bus.submit(rec(i), lambda ctx, e: None) for i in range(3))
    assert not bus.submit(rec(3), lambda ctx, e: None)
    assert bus.stats.refused == 1


async def test_submit_many_takes_what_fits_in_order_and_answers_each(tmp_path):
    """The fast lane hands the sink a batch at once: the first ones that fit are taken, each
    answered through `done` with its own ctx once durable; the rest are refused and counted."""
    bus = EmbeddedBus(tmp_path / "bus.db", max_pending=5)
    answered = []
    assert bus.submit_many([rec(0), rec(1)], lambda ctx, e: answered.append((ctx, e)), ["a", "b"]) == 2
    assert bus.submit_many([rec(i) for i in range(2, 6)], lambda ctx, e: answered.append((ctx, e)),
                           ["c", "d", "e", "f"]) == 3
    assert bus.stats.refused == 1 and bus.stats.submitted == 5
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await bus.close()
    assert answered == [(c, None) for c in "abcde"]
    assert [r.value for r in read_records(tmp_path / "bus.db")] == [f'{{"i":{i}}}'.encode() for i in range(5)]


class FailingBus(EmbeddedBus):
    fail = True

    def write_prepared(self, rows):
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        super().write_prepared(rows)


async def test_failed_batch_reports_error_to_every_waiter_and_stores_nothing(tmp_path, inline):
    bus = FailingBus(tmp_path / "bus.db", synchronous="NORMAL")
    bus.inline = inline
    errors: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        for i in range(10):
            bus.submit(rec(i), lambda ctx, e: errors.append(e))
        with trio.fail_after(30):  # (the batch's reports: a bound for a busy machine)
            while len(errors) < 10:
                await trio.sleep(0.01)
        assert len(errors) == 10 and all(isinstance(e, sqlite3.OperationalError) for e in errors)
        assert bus.last_error is not None
        bus.fail = False  # the disk recovers: the sink does too
        ok: list = []
        bus.submit(rec(99), lambda ctx, e: ok.append(e))
        await bus.close()
    assert ok == [None] and bus.last_error is None
    assert [r.value for r in read_records(tmp_path / "bus.db")] == [rec(99).value]


async def test_close_flushes_pending_and_refuses_new(tmp_path, inline):
    bus = EmbeddedBus(tmp_path / "bus.db", max_batch=7, synchronous="NORMAL")
    bus.inline = inline
    answered: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        for i in range(100):
            bus.submit(rec(i), lambda ctx, e: answered.append((ctx, e)), i)
        await bus.close()
        assert not bus.submit(rec(1000), lambda ctx, e: None)
    assert answered == [(i, None) for i in range(100)]  # in order, each with its own ctx
    assert bus.stats.batches >= 100 // 7


async def test_a_batch_of_many_topics_is_one_transaction_of_several_inserts(tmp_path, inline, monkeypatch):
    from corem.bus import sqlite

    monkeypatch.setattr(sqlite, "ROWS_PER_INSERT", 2)  # (1,000 rows a statement: five topics here)
    bus = EmbeddedBus(tmp_path / "bus.db", synchronous="NORMAL")
    bus.inline = inline
    answered: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        bus.submit_many([rec(i, f"t{i % 5}") for i in range(20)], lambda ctx, e: answered.append(e), list(range(20)))
        await bus.close()
    assert answered == [None] * 20 and bus.stats.batches == 1
    stored = list(read_records(tmp_path / "bus.db"))
    assert [r.offset for r in stored] == list(range(1, 21))  # each topic's records together
    assert sorted(r.value for r in stored) == sorted(rec(i).value for i in range(20))
    assert [r.topic for r in stored] == [f"telemetry.raw.t{i // 4}" for i in range(20)]


def test_a_commit_is_made_on_the_event_loop_only_where_it_never_waits(tmp_path, monkeypatch):
    from corem.bus import sqlite

    monkeypatch.setattr(sqlite, "one_cpu", lambda: True)
    assert EmbeddedBus(tmp_path / "a.db", synchronous="NORMAL").commits_inline()
    assert EmbeddedBus(tmp_path / "a.db", synchronous="OFF").commits_inline()
    assert not EmbeddedBus(tmp_path / "a.db", synchronous="FULL").commits_inline()  # (an fsync each)
    assert not EmbeddedBus(tmp_path / "a.db", synchronous="NORMAL", shared=True).commits_inline()  # (a lock)
    deferred = EmbeddedBus(tmp_path / "a.db", synchronous="NORMAL")
    deferred.defer(lambda: None)  # (the DTLS record marks, to a store that may be a network away)
    assert not deferred.commits_inline()
    marks: list[int] = []  # (a deferred write that says whether it has anything to write)
    said = EmbeddedBus(tmp_path / "a.db", synchronous="NORMAL")
    said.defer(lambda: None, pending=lambda: bool(marks))
    assert said.commits_inline()
    marks.append(1)
    assert not said.commits_inline()
    due = EmbeddedBus(tmp_path / "a.db", synchronous="NORMAL")
    due.checkpointer._due.add(due.path)  # (the log to start again: a checkpoint's fsyncs first)
    assert not due.commits_inline()
    monkeypatch.setattr(sqlite, "one_cpu", lambda: False)  # (a thread runs beside the loop)
    assert not EmbeddedBus(tmp_path / "a.db", synchronous="NORMAL").commits_inline()


def test_bad_sync_mode(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        EmbeddedBus(tmp_path / "x.db", synchronous="SOMETIMES")


async def test_histograms_count_every_batch(tmp_path):
    from corem.bus.base import LATENCY_BUCKETS, SIZE_BUCKETS

    bus = EmbeddedBus(tmp_path / "bus.db", max_batch=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        for i in range(25):
            bus.submit(rec(i), lambda ctx, e: None)
        await bus.close()
    st = bus.stats
    assert sum(st.latency_buckets) == st.batches == sum(st.size_buckets)
    assert len(st.latency_buckets) == len(LATENCY_BUCKETS) + 1 and len(st.size_buckets) == len(SIZE_BUCKETS) + 1
    assert st.size_buckets[-1] == 0  # no batch above max_batch


async def test_deferred_writes_run_before_every_batch_is_written(tmp_path):
    """`defer(write)`: what `write` makes durable is so before the batch holding the records
    submitted after it was asked for (the DTLS record marks: dtls/layer.py defer_marks)."""
    bus = EmbeddedBus(tmp_path / "bus.db")
    order: list[tuple[str, int]] = []

    def write() -> None:
        # nothing of the batch about to be written is in the bus yet
        order.append(("deferred", len(list(read_records(tmp_path / "bus.db")))))

    assert bus.defer(write)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        for i in range(3):
            committed = trio.Event()
            assert bus.submit(rec(i), lambda ctx, err: (order.append(("committed", i)), committed.set()))
            await committed.wait()
        await bus.close()
    assert order == [("deferred", 0), ("committed", 0), ("deferred", 1), ("committed", 1),
                     ("deferred", 2), ("committed", 2)]


def test_kafka_takes_no_deferred_writes():
    from corem.bus.base import Sink
    from corem.bus.kafka import KafkaSink

    # (each record goes out as it comes: the callers write first, as before)
    assert KafkaSink.defer is Sink.defer and Sink().defer(lambda: None) is False
