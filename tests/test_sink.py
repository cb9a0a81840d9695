"""The group-commit batcher and the embedded SQLite bus, on real SQLite files."""

from __future__ import annotations

import sqlite3

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from corem.bus import EmbeddedBus, Record, read_records
from corem.bus.base import PackedRecord


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


async def test_a_request_of_several_points_is_taken_whole_or_refused_whole(tmp_path):
    """A request's points (consecutive records with one context object, as the fast lane and the
    Python path submit them) are stored together or not at all: were the bus to take the first
    three of five, the request would be answered 5.03 with three points stored -- and stored
    again when the device sends it again."""
    bus = EmbeddedBus(tmp_path / "bus.db", max_pending=5)
    answered = []
    two, five, three = object(), object(), object()
    assert bus.submit_many([rec(0), rec(1)], lambda ctx, e: answered.append(ctx), [two, two]) == 2
    # room for 3: the five-point request is refused whole, not cut after its third point
    assert bus.submit_many([rec(i) for i in range(2, 7)], lambda ctx, e: answered.append(ctx), [five] * 5) == 0
    assert bus.stats.refused == 5
    # several requests at once (the lane's batch): the ones before the cut, none of the one across it
    assert bus.submit_many([rec(7), rec(8), rec(9), rec(10)], lambda ctx, e: answered.append(ctx),
                           [None, three, three, three]) == 1
    assert bus.stats.refused == 8 and bus.stats.submitted == 3
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await bus.close()
    assert answered == [two, two, None]
    assert [r.value for r in read_records(tmp_path / "bus.db")] == [rec(i).value for i in (0, 1, 7)]


async def test_a_batch_never_splits_a_request_and_a_request_longer_than_a_batch_is_one_of_its_own(tmp_path):
    """A batch is one transaction: a request's records in two batches could be stored in one and
    fail in the other.  So the batcher cuts at max_batch only between requests."""
    bus = EmbeddedBus(tmp_path / "bus.db", max_batch=3)
    a, b, c = object(), object(), object()
    for ctxs in ([a, a], [b, b], [c] * 5, [None, None, None, None]):  # (None: records of no request)
        assert bus.submit_many([rec(i) for i in range(len(ctxs))], lambda ctx, e: None, ctxs) == len(ctxs)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await bus.close()
    with sqlite3.connect(tmp_path / "bus.db") as conn:
        counts = [n for (n,) in conn.execute("SELECT count FROM batches ORDER BY base_offset")]
    assert counts == [2, 2, 5, 3, 1]


async def test_an_answer_that_raises_leaves_the_others_answered_and_the_bus_running(tmp_path, inline, caplog):
    """A waiter's `done` that raises is a bug of its caller's; the batch is durable all the same:
    the other records are answered, the bus goes on, the raise is logged and counted."""
    bus = EmbeddedBus(tmp_path / "bus.db", synchronous="NORMAL")
    bus.inline = inline
    answered: list = []

    def done(ctx, error):
        if ctx == 1:
            raise KeyError("no such exchange")
        answered.append(ctx)

    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        assert bus.submit_many([rec(i) for i in range(4)], done, [0, 1, 2, 3]) == 4
        with trio.fail_after(30):
            while len(answered) < 3:
                await trio.sleep(0.01)
        assert bus.submit(rec(4), done, 4)  # still running
        await bus.close()
    assert answered == [0, 2, 3, 4]
    assert bus.stats.answer_errors == 1 and bus.stats.acked == 5
    assert "the answer to a record taken by the bus failed" in caplog.text


async def test_a_bus_whose_flusher_ended_refuses_what_would_never_be_answered(tmp_path):
    """The flusher ended by an error (here: the edge's after-batch hook) takes the sink down with
    it; until the server stops, what is submitted is refused (5.03), not queued for nobody."""
    def boom() -> None:
        raise RuntimeError("after_batch failed")

    bus = EmbeddedBus(tmp_path / "bus.db", after_batch=boom)
    with pytest.raises(ExceptionGroup) as ended:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            bus.submit(rec(0), lambda ctx, e: None)
    assert ended.group_contains(RuntimeError, match="after_batch failed")
    assert not bus.submit(rec(1), lambda ctx, e: None)


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
    carrying = EmbeddedBus(tmp_path / "a.db", synchronous="NORMAL")
    carrying.carry(lambda: b"marks", lambda: 0)  # (the DTLS record marks: in the batch's own transaction)
    assert carrying.commits_inline()
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


async def test_what_a_carrier_gives_is_written_in_each_batchs_own_transaction(tmp_path, inline, monkeypatch):
    """`carry(take, done_below)`: `take()` is asked just before each batch is written -- after the
    records of the batch were submitted -- and written as a row of `carried` with them, in one
    commit; rows below `done_below()` are deleted in a later batch, never the newest; nothing is
    written for an empty take."""
    from corem.bus import sqlite

    monkeypatch.setattr(sqlite, "one_cpu", lambda: inline)
    bus = EmbeddedBus(tmp_path / "bus.db", synchronous="NORMAL")
    given: list[bytes] = [b"first", b"", b"third", b"fourth"]
    done_below = [0]
    asked: list[int] = []

    def take() -> bytes:
        asked.append(len(list(read_records(tmp_path / "bus.db"))))  # (the batch is not in yet)
        return given.pop(0)

    assert bus.carry(take, lambda: done_below[0])
    with pytest.raises(RuntimeError, match="one carrier"):
        bus.carry(take, lambda: 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        for i in range(4):
            committed = trio.Event()
            assert bus.submit(rec(i), lambda ctx, err: committed.set())
            await committed.wait()
            if i == 2:
                done_below[0] = 2  # (the reader read rows 1 and 2)
        await bus.close()
    assert bus.inline == inline and asked == [0, 1, 2, 3]
    db = sqlite3.connect(tmp_path / "bus.db")
    assert db.execute("SELECT n, blob FROM carried ORDER BY n").fetchall() == [(2, b"third"), (3, b"fourth")]
    db.close()


def test_kafka_carries_nothing():
    from corem.bus.kafka import KafkaSink

    # (each record goes out as it comes: the DTLS layer writes the marks first, as before)
    assert not hasattr(KafkaSink, "carry")


@pytest.mark.parametrize("name", ["pct%41", "what?", "hash#1", "sp ace"])
async def test_the_log_is_read_back_from_a_data_dir_whose_name_a_uri_would_misread(tmp_path, name):
    """The readers open the bus read-only by an encoded URI (datafiles.read_only_uri): written into
    "file:...?mode=ro" as it was, `%41` named another file and `?` or `#` cut the name short."""
    from corem.bus.recovery import recover_embedded

    path = tmp_path / name / "bus.db"
    path.parent.mkdir()
    bus = EmbeddedBus(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        assert bus.submit(rec(1), lambda ctx, err: None)
        await bus.close()
    assert [r.value for r in read_records(path)] == [rec(1).value]
    assert recover_embedded(path, 0, 4).total() == 0  # (opened, and nothing to recover: no exchange header)


@pytest.mark.parametrize("existing", [None, 4096])
async def test_a_new_bus_file_has_pages_of_page_size_and_an_existing_one_keeps_its_own(tmp_path, existing):
    """(a batch row is one ~60 KB BLOB: 4 KB pages wrote it two syscalls a page, PAGE_SIZE)"""
    from corem.bus.sqlite import PAGE_SIZE

    path = tmp_path / "bus.db"
    if existing is not None:  # (a file an older corem made, records in it)
        old = sqlite3.connect(path)
        old.execute(f"PRAGMA page_size={existing}")
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("CREATE TABLE t (x)")
        old.close()
    bus = EmbeddedBus(path, synchronous="NORMAL")
    answered: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        bus.submit(rec(1), lambda ctx, e: answered.append(e))
        await bus.close()
    assert answered == [None]
    assert sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0] == (existing or PAGE_SIZE)
    assert [r.value for r in read_records(path)] == [rec(1).value]


_records = st.lists(st.tuples(st.sampled_from(["telemetry.raw.a", "telemetry.raw.b"]), st.binary(max_size=8),
                              st.binary(max_size=40), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
                              st.booleans()), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(_records)
def test_a_batch_row_holds_each_records_triple_as_msgspec_writes_it_whatever_the_mix_of_packed_records_and_topics(
        tmp_path_factory, made):
    """`prepare`: a row a topic (in the order the topics come), each the msgpack array of its records'
    `[key, value, headers]` -- a `PackedRecord`'s bytes as they are -- whether every record is packed
    (the lane's batches), none is (the Python path's) or some are; offsets one after another.
    (`prepare` reads no file: the bus is never opened.)"""
    bus = EmbeddedBus(tmp_path_factory.getbasetemp() / "never-opened.db")
    bus._next_offset = 41
    records = [PackedRecord(t, msgspec.msgpack.encode((k, v, h))) if packed else Record(t, k, v, h)
               for t, k, v, h, packed in made]
    rows = bus.prepare(records)
    topics = list(dict.fromkeys(t for t, *_ in made))
    assert [row[1] for row in rows] == topics
    offset = 41
    for (base, topic, count, blob, _at) in rows:
        mine = [(k, v, h) for t, k, v, h, _ in made if t == topic]
        assert (base, count) == (offset, len(mine))
        assert blob == msgspec.msgpack.encode(mine)
        offset += count
