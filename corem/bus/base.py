"""The sink interface (`Sink`) and the group-commit batcher of the embedded bus (`BatchingSink`).

The event loop hands records to `submit` / `submit_many` (never blocks, never waits on one
record) and each record is answered later by its `done(ctx, error)`: error is None once the record
is durable, the exception if it is not.  `done` is meant to be one shared function and `ctx` the
request it answers, so submitting allocates no closure per record.

`BatchingSink`: a single flusher task takes everything pending as one batch, writes it in a
worker thread, then answers every record in it; while one batch is being written the next one
accumulates, so batches grow with load.  A write that does not wait for the disk, in a process
that may run on one CPU only, is made on the event loop itself (`commits_inline`): there a
worker thread cannot run beside the loop, it only adds thread switches and waits for the GIL.  The Kafka sink (`kafka.py`) pipelines instead: records
go to librdkafka as they come and each is answered by its own delivery report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, NamedTuple, Sequence, Union

import trio

from ..stats import Histogram, Measurement, counter, gauge
from ..wal import Checkpointer
from .headers import standard

log = logging.getLogger("corem.bus")

Done = Callable[[Any, "BaseException | None"], None]


class Record(NamedTuple):
    topic: str
    key: bytes
    value: bytes
    headers: dict[str, str]


class PackedRecord(NamedTuple):
    """A record already in the embedded bus's stored form: `packed` is msgpack `[key, value,
    headers]`, byte for byte what `msgspec` writes for the `Record` (corem/bus/sqlite.py).  The C
    fast lane makes these for a sink that takes them (`Sink.packed`): no headers dict, exchange
    string nor tuple to encode per reading."""
    topic: str
    packed: bytes


#: what a sink is given: Records, and PackedRecords where the sink's `packed` says it takes them
AnyRecord = Union[Record, PackedRecord]


def publish_json(sink: "Sink", topic: str, key: str, value: Any) -> bool:
    """A record no device waits for (attribute copies, downlink results): JSON, with the standard
    headers (corem/bus/headers.py; `key` is the device), submitted without an answer to give; a
    refusal or a failed batch is logged (and counted by the sink)."""
    record = Record(topic, key.encode(), json.dumps(value, separators=(",", ":")).encode(), standard(key))
    if not sink.submit(record, _logged, (topic,)):  # (a context of its own: `whole_requests`)
        log.warning("a record for %s was refused: the bus is full", topic)
        return False
    return True


def _logged(ctx: tuple[str], error: BaseException | None) -> None:
    if error is not None:
        log.warning("a record for %s was not written: %s", ctx[0], error)


def whole_requests(ctxs: Sequence[Any], n: int) -> int:
    """How many of the records whose contexts are `ctxs` a sink may take when it has room for `n`:
    never part of one request's records (consecutive records with the same context object, not
    None: a request of several points submits them so, the fast lane's and the Python path's),
    which would be stored while the request is answered 5.03, and stored again when the device
    sends it again.  The largest cut at or below `n` between two requests; 0 if the first
    request alone is longer than `n`."""
    if n >= len(ctxs):
        return len(ctxs)
    while n > 0 and ctxs[n] is ctxs[n - 1] and ctxs[n] is not None:
        n -= 1
    return n


def first_request(ctxs: Sequence[Any]) -> int:
    """How many records the first request holds (its run of one context: `whole_requests`)."""
    n = 1
    while n < len(ctxs) and ctxs[n] is ctxs[0] and ctxs[0] is not None:
        n += 1
    return n


def answer_each(dones: Sequence[Done], ctxs: Sequence[Any], errors: Sequence[BaseException | None]) -> int:
    """Call every waiter's `done(ctx, error)`; one that raises (a bug) is logged and the others are
    still answered -- the records are durable, or failed, whatever one answer did.  How many raised."""
    raised = 0
    answers = zip(dones, ctxs, errors)
    while True:
        try:
            for done, ctx, error in answers:  # (no cost in the loop for the `try` around it)
                done(ctx, error)
            return raised
        except Exception:  # noqa: BLE001 - the next records are answered all the same
            raised += 1
            log.exception("the answer to a record taken by the bus failed; the other records are answered")


#: Readiness: a sink whose oldest record has waited this long for the bus to take it (a batch
#: write, a delivery report) is stalled, and /readyz says not ready until it moves again.  Far
#: above a healthy commit or delivery (milliseconds; a loaded disk's fsync, under a second), well
#: below kafka_timeout (10 s), after which the failures themselves say it.
STALLED_AFTER = 5.0

#: Histogram bucket bounds: batch write latency (seconds) and batch size (records).
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


@dataclass(slots=True)
class SinkStats:
    submitted: int = 0
    acked: int = 0
    failed: int = 0
    refused: int = 0
    #: a waiter's `done` that raised (a bug): logged, and the batch's other records still answered
    answer_errors: int = 0
    batches: int = 0
    batch_records: int = 0
    ack_seconds: float = 0.0
    #: non-cumulative counts per bucket; the last slot is +Inf
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    size_buckets: list[int] = field(default_factory=lambda: [0] * (len(SIZE_BUCKETS) + 1))

    def observe(self, seconds: float, size: int) -> None:
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.size_buckets[bisect_left(SIZE_BUCKETS, size)] += 1


class Sink:
    """What the rest of corem sees of a bus (the embedded log, Kafka): submit records, get each
    answered by its `done`; `run` is the sink's task, `close` drains it."""

    name = "sink"
    #: takes `PackedRecord`s beside `Record`s (the embedded bus: they are what it stores)
    packed = False

    def __init__(
        self, *, max_pending: int = 100_000, max_batch: int = 8192, after_batch: Callable[[], None] | None = None
    ) -> None:
        if max_pending < 1 or max_batch < 1:
            raise ValueError("max_pending and max_batch must be >= 1")
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.stats = SinkStats()
        #: Called after each batch of answers (the edge flushes its outbox there).
        self.after_batch = after_batch
        #: Last write failure, for readiness checks; cleared by the next successful batch.
        self.last_error: BaseException | None = None
        #: SQLite files written beside this bus -- the embedded bus's own (in its worker thread), the
        #: DTLS session store's (its record marks: dtls/layer.py `carry_marks`) -- their WAL copied
        #: off the event loop by the sink's `run` (corem/wal.py)
        self.checkpointer = Checkpointer()

    @contextlib.asynccontextmanager
    async def checkpointing(self) -> AsyncIterator[None]:
        """The checkpointer's thread, for as long as a sink's `run` is inside."""
        async with trio.open_nursery() as background:
            background.start_soon(self.checkpointer.run)
            try:
                yield
            finally:
                background.cancel_scope.cancel()

    def submit(self, record: Record, done: Done, ctx: Any = None) -> bool:
        """Queue `record`; False when the sink is full or closing (the caller answers 5.03)."""
        return self.submit_many([record], done, [ctx]) == 1

    def submit_many(self, records: Sequence[AnyRecord], done: Done, ctxs: list[Any]) -> int:
        """Take as many of `records` as there is room for (each answered by `done(ctx, error)`);
        returns how many were taken -- the first ones, in order, and whole requests only
        (`whole_requests`: a request's records are stored together or not at all)."""
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """Records taken and not answered yet."""
        raise NotImplementedError

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Refuse new records, wait until every record taken has been answered."""
        raise NotImplementedError

    #: What an edge calls after each batch of datagrams (None: nothing); see `UdpEdge.after_drain`.
    after_drain: Callable[[], object] | None = None

    def probe(self) -> str | None:
        """Can the bus be reached?  None if so, else why not (cheap: /readyz calls it): failing
        (the last records answered failed, and none succeeded since) or stalled (`stalled`)."""
        return str(self.last_error) if self.last_error is not None else self.stalled()

    def waiting_since(self) -> float | None:
        """When (time.monotonic()) the oldest record still waiting for the bus was taken, or None."""
        return None

    def stalled(self) -> str | None:
        """Why deliveries count as stalled (the oldest waiting record is older than
        STALLED_AFTER), or None."""
        since = self.waiting_since()
        if since is None:
            return None
        age = time.monotonic() - since
        if age <= STALLED_AFTER:
            return None
        return (f"deliveries stalled: the oldest record has waited {age:.1f} s for the bus "
                f"({self.pending} waiting)")

    def metrics(self) -> Iterator[Measurement]:
        """The `corem_sink_*` samples, labelled with the sink's name; a sink adds its own."""
        sk, sink = self.stats, self.name
        for attr in ("submitted", "acked", "failed", "refused"):
            yield counter(f"corem_sink_records_{attr}", getattr(sk, attr), sink=sink)
        yield counter("corem_sink_answer_errors", sk.answer_errors, sink=sink)
        yield counter("corem_sink_batches", sk.batches, sink=sink)
        yield counter("corem_sink_batch_records", sk.batch_records, sink=sink)
        yield counter("corem_sink_ack_seconds", sk.ack_seconds, sink=sink)
        labels = (("sink", sink),)
        yield Histogram("corem_sink_batch_seconds", LATENCY_BUCKETS, sk.latency_buckets, sk.ack_seconds, labels)
        yield Histogram("corem_sink_batch_size", SIZE_BUCKETS, sk.size_buckets, sk.batch_records, labels)
        yield gauge("corem_sink_pending", self.pending)


class BatchingSink(Sink):
    """Group commit on a worker thread; subclasses implement `prepare` and `write_prepared`."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._records: list[AnyRecord] = []
        self._dones: list[Done] = []
        self._ctxs: list[Any] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._closing = False
        self._stopped = trio.Event()
        #: when the batch being written began (time.monotonic()), None between batches
        self._writing_since: float | None = None

    # -- called on the event loop ------------------------------------------------------------
    def waiting_since(self) -> float | None:
        """The batch being written holds the oldest records (what waits behind it is younger)."""
        return self._writing_since

    def submit_many(self, records: Sequence[AnyRecord], done: Done, ctxs: list[Any]) -> int:
        room = 0 if self._closing else max(0, self.max_pending - len(self._records))
        n = whole_requests(ctxs, room)
        if n < len(records):
            self.stats.refused += len(records) - n
            records, ctxs = records[:n], ctxs[:n]
        if n:
            was_empty = not self._records
            self._records += records
            self._dones += [done] * n
            self._ctxs += ctxs
            self.stats.submitted += n
            if was_empty:
                self._lot.unpark_all()
        return n

    @property
    def pending(self) -> int:
        return len(self._records)

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher. Returns after `close()` once everything submitted has been answered."""
        await trio.to_thread.run_sync(self.open)
        async with self.checkpointing():
            task_status.started()
            await self._flush_until_closed()

    async def _flush_until_closed(self) -> None:
        try:
            while True:
                if not self._records:
                    if self._closing:
                        break
                    await self._lot.park()
                    continue
                records, dones, ctxs = self._records, self._dones, self._ctxs
                # (a batch is one transaction: a request's records in one, so that none is
                # stored while another fails; a request longer than a batch is a batch of its own)
                n = whole_requests(ctxs, self.max_batch) or first_request(ctxs)
                if len(records) > n:
                    self._records, self._dones, self._ctxs = records[n:], dones[n:], ctxs[n:]
                    records, dones, ctxs = records[:n], dones[:n], ctxs[:n]
                else:
                    self._records, self._dones, self._ctxs = [], [], []
                await self._write(records, dones, ctxs)
        finally:
            self._closing = True  # (ended by an error too: what is submitted now would wait forever)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close_sync)
            self._stopped.set()

    async def _write(self, records: list[AnyRecord], dones: list[Done], ctxs: list[Any]) -> None:
        stats = self.stats
        start = time.perf_counter()
        errors: list[BaseException | None] | None = None
        error: BaseException | None = None
        self._writing_since = time.monotonic()
        try:
            prepared = self.prepare(records)
            if self.commits_inline():
                errors = self.write_prepared(prepared)
            else:
                with trio.CancelScope(shield=True):  # a batch once started is finished and answered
                    errors = await trio.to_thread.run_sync(self.write_prepared, prepared)
        except Exception as e:  # noqa: BLE001 - any write failure is reported to every waiter
            error = e
        finally:
            self._writing_since = None
        if errors is None:
            errors = [error] * len(records)
        failed = [e for e in errors if e is not None]
        elapsed = time.perf_counter() - start
        stats.batches += 1
        stats.batch_records += len(records)
        stats.acked += len(records) - len(failed)
        stats.failed += len(failed)
        stats.observe(elapsed, len(records))
        if len(failed) < len(records):
            stats.ack_seconds += elapsed
        self.last_error = failed[0] if failed else None
        stats.answer_errors += answer_each(dones, ctxs, errors)
        if self.after_batch is not None:
            self.after_batch()

    async def close(self) -> None:
        """Refuse new records, flush the pending ones, wait until all are answered."""
        self._closing = True
        self._lot.unpark_all()
        await self._stopped.wait()

    def commits_inline(self) -> bool:
        """Write the next batch on the event loop rather than in a worker thread?  Only a write
        that never waits for the disk or a lock (BatchingSink: never)."""
        return False


    # -- run in the worker thread ------------------------------------------------------------
    def open(self) -> None:
        """Connect (runs in a worker thread before the first batch)."""

    def prepare(self, records: list[AnyRecord]) -> Any:
        """Turn a batch into what `write_prepared` writes; runs on the event loop, so keep it cheap
        (the point is to leave the worker thread little Python to run while it holds the GIL)."""
        return records

    def write_prepared(self, prepared: Any) -> list[BaseException | None] | None:
        """Write the batch durably (runs in the worker thread).  Raise if none of it was
        written; return per-record errors (None for each record written) if only some was."""
        raise NotImplementedError

    def close_sync(self) -> None:
        """Disconnect (runs in a worker thread after the last batch)."""
