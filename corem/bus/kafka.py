"""The Kafka / Redpanda sink, on confluent-kafka (librdkafka): pipelined group commit.

Why librdkafka: against one Tansu broker on loopback, a plain producer loop did 9.3k records/s
with kafka-python 3 (its pure-Python producer thread shares corem's GIL, and a flush per batch
allows one batch in flight) and 261k records/s with confluent-kafka 2.16.

The shape: `submit_many` hands every record to `produce()` at once, on the event loop -- it only
copies the record into librdkafka's queue and never blocks (a full queue is `BufferError`: the
record is refused and its device gets 5.03).  librdkafka batches per partition (linger.ms,
batch.size) with up to five requests in flight per broker; nothing flushes.  Each record carries
its own delivery report, and that report alone decides its device's answer: 2.04 once the brokers
acknowledged it (`acks=all` by default), 5.03 with Max-Age otherwise.  The reports are served by
a thread blocked in `poll()` (librdkafka wakes it when reports are ready), which hands them to the
event loop in batches (`run_sync_soon`), and by `poll(0)` on the event loop after each batch of
datagrams an edge handled (`after_drain`): the event loop never waits on Kafka.  The per-record
bookkeeping -- a delivery callback per record, answering the acknowledged ones -- is C
(`_reports.c`: `Reports`), so a report costs the reporting thread no Python; `PyReports` is the
same thing in Python where the C is not built.

The producer is idempotent by default, so librdkafka's own retries never write a record twice and
one device's records (one key, one partition) stay in order.  `kafka_timeout` is librdkafka's
message.timeout.ms: a record refused for time is one librdkafka gave up on too, so it is not
delivered behind the device's back (except in the race at the very deadline, when the brokers
wrote it but their answer was late: delivery is at-least-once).  librdkafka reconnects by itself;
only a fatal error, or brokers refusing the producer's identity (`RESTART_ON`), makes corem start a
fresh producer.  Readiness comes from librdkafka's own view: broker states in its statistics, and
its errors.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Iterator, Sequence, cast

import trio

from ..logs import fields
from ..stats import Histogram, Measurement, counter, gauge
from .base import LATENCY_BUCKETS, AnyRecord, Done, Record, Sink, answer_each, whole_requests

try:
    from ._reports import Reports
except ImportError:  # pragma: no cover - only without a C compiler
    Reports = None  # type: ignore[assignment,misc]

log = logging.getLogger("corem.bus.kafka")


class _Throttle(logging.Filter):
    """librdkafka's own lines, one a facility (CONNECT, FAIL, ...) every `every` seconds: it says
    each failed connection attempt, every few seconds for as long as a broker is away -- what
    corem's metrics and /readyz say once (`KafkaStats`); the log keeps the news, not the repeats."""

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._next: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        facility = str(record.args[0]) if isinstance(record.args, tuple) and record.args else record.getMessage()
        now = time.monotonic()
        if now < self._next.get(facility, 0.0):
            return False
        if len(self._next) > 1000:  # (a bounded table whatever librdkafka names)
            self._next.clear()
        self._next[facility] = now + self.every
        return True


#: where librdkafka's log lines go (producers' and consumers'): through corem's logging, so in its
#: format (logfmt or JSON) like every other line, never raw on stderr
librdkafka_log = logging.getLogger("corem.bus.kafka.librdkafka")
librdkafka_log.addFilter(_Throttle())

#: How long the reporting thread's poll() blocks at most (it returns at once when reports come).
WAIT_FOR_REPORTS = 0.05
#: How often the sink's own task looks at closing, fatal errors and reports left unanswered.
SERVE_INTERVAL = 0.1
#: How often librdkafka's statistics (broker states, queue sizes) are read.
STATS_INTERVAL_MS = 1000

#: Delivery errors that say the brokers no longer accept this producer's idempotence identity:
#: only a fresh producer (a new producer id) gets records through again.  Tansu, for one, answers
#: librdkafka's epoch bump after a timed-out request (KIP-360) with PRODUCER_FENCED, forever.
RESTART_ON = frozenset({"PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH", "UNKNOWN_PRODUCER_ID",
                        "OUT_OF_ORDER_SEQUENCE_NUMBER", "INVALID_PRODUCER_ID_MAPPING"})

#: Properties corem sets from its own settings: `kafka_config` may not set them a second way.
OWNED = frozenset({
    "bootstrap.servers", "client.id", "acks", "enable.idempotence", "compression.type", "linger.ms",
    "batch.size", "message.timeout.ms", "delivery.timeout.ms", "queue.buffering.max.messages",
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "error_cb", "stats_cb",
    "logger", "statistics.interval.ms", "on_delivery", "group.id", "enable.auto.commit", "delivery.report.only.error",
})


class _Gone:
    """The error a record gets when its producer is let go of before reporting it (shaped like
    confluent-kafka's KafkaError for DeliveryFailed)."""

    def __init__(self, why: str) -> None:
        self.why = why

    def name(self) -> str:
        return "_PRODUCER_GONE"

    def str(self) -> str:
        return self.why


class DeliveryFailed(ConnectionError):
    """librdkafka's delivery report said no: the record is not on the bus."""

    def __init__(self, error: Any) -> None:  # a confluent_kafka.KafkaError, or _Gone
        self.code = error.name()
        super().__init__(f"kafka did not take the record: {error.str()}")


def parse_kafka_config(value: str, key: str = "kafka_config") -> dict[str, str]:
    """`key=value,key=value` -> {librdkafka property: value} (a TOML table arrives here as that
    text, from Settings.load); a comma only separates where another `key=` follows, so values may
    hold commas (cipher lists)."""
    out: dict[str, str] = {}
    for part in re.split(r",(?=\s*[A-Za-z0-9_.-]+\s*=)", value.strip()):
        if not part.strip():
            continue
        k, sep, v = (x.strip() for x in part.partition("="))
        if not sep or not k:
            raise ValueError(f"{key}: {part.strip()!r} is not property=value")
        if not re.fullmatch(r"[a-z0-9_.-]+", k):
            raise ValueError(f"{key}: {k!r} is not a librdkafka property name")
        if k in OWNED:
            raise ValueError(f"{key}: {k} is set by corem's own settings (kafka_*, bus); set it there")
        out[k] = v
    return out


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: tuple[str, ...]
    client_id: str = "corem"
    acks: str = "all"
    #: "auto": on with acks=all (librdkafka's idempotence needs it), off otherwise
    idempotence: str = "auto"
    compression: str = "none"
    linger_ms: float = 0.2
    batch_size: int = 65536
    timeout: float = 10.0
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: any other librdkafka property, passed through (kafka_config)
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def idempotent(self) -> bool:
        return self.idempotence == "on" or (self.idempotence == "auto" and self.acks == "all")

    def client_config(self) -> dict[str, Any]:
        """What producers and consumers share: where the brokers are and how to talk to them."""
        cfg: dict[str, Any] = {
            "bootstrap.servers": ",".join(self.bootstrap),
            "client.id": self.client_id,
            "reconnect.backoff.max.ms": 2000,
            "security.protocol": self.security_protocol,
            "logger": librdkafka_log,
        }
        if self.sasl_mechanism:
            cfg.update({"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.sasl_username or "",
                        "sasl.password": self.sasl_password or ""})
        for key, prop in (("ssl_cafile", "ssl.ca.location"), ("ssl_certfile", "ssl.certificate.location"),
                          ("ssl_keyfile", "ssl.key.location")):
            if getattr(self, key):
                cfg[prop] = getattr(self, key)
        cfg.update(self.extra)
        return cfg

    def producer_config(self, max_pending: int = 100_000) -> dict[str, Any]:
        timeout_ms = max(1, int(self.timeout * 1000))
        cfg = {
            **self.client_config(),
            "acks": self.acks,  # all, 1 or 0: librdkafka's own spellings
            "enable.idempotence": self.idempotent,
            "compression.type": self.compression,
            "linger.ms": self.linger_ms,
            "batch.size": self.batch_size,
            # a record not acknowledged by then is failed by librdkafka itself (and not retried)
            "message.timeout.ms": max(timeout_ms, self.linger_ms + 1),
            "queue.buffering.max.messages": max_pending,
            "statistics.interval.ms": STATS_INTERVAL_MS,
        }
        if "request.timeout.ms" not in dict(self.extra):
            cfg["request.timeout.ms"] = min(30_000, max(1000, timeout_ms // 2))
        return cfg

    def consumer_config(self) -> dict[str, Any]:
        # a group id librdkafka insists on; corem assigns partitions itself and never commits
        return {**self.client_config(), "group.id": f"{self.client_id}-commands", "enable.auto.commit": False,
                "enable.auto.offset.store": False, "enable.partition.eof": False}


def check_kafka_settings(settings: KafkaSettings) -> None:
    """librdkafka's own verdict on the configuration, at start: raises ValueError naming the
    property it refuses (a typo in `kafka_config` stops corem instead of being ignored)."""
    from confluent_kafka import KafkaException, Producer

    def attempt(cfg: dict[str, Any]) -> str | None:
        try:
            Producer(cfg)
        except (KafkaException, ValueError, TypeError) as e:
            return str(e.args[0].str() if e.args and hasattr(e.args[0], "str") else e)
        return None

    full = settings.producer_config()
    problem = attempt(full)
    if problem is None:
        return
    base = replace(settings, extra=()).producer_config()
    for key, value in settings.extra:
        why = attempt({**base, key: value})
        if why is not None:
            raise ValueError(f"kafka_config: {key}={value}: {why}")
    raise ValueError(f"kafka: librdkafka refuses the configuration: {problem}")


def parse_bus_url(url: str) -> tuple[str, ...]:
    """`kafka://host:port[,host:port]` -> ("host:port", ...)."""
    if not url.startswith("kafka://"):
        raise ValueError(f"bus: {url!r} is neither 'embedded' nor kafka://host:port[,host:port]")
    hosts = tuple(h.strip() for h in url[len("kafka://"):].strip("/").split(",") if h.strip())
    if not hosts:
        raise ValueError("bus: kafka:// needs at least one host:port")
    for h in hosts:
        host, sep, port = h.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bus: {h!r} is not host:port")
    return hosts


class PyReports:
    """`_reports.Reports` in Python: a delivery callback per record (librdkafka reports every
    record to it), the acknowledged ones answered by `answer()`, the failed ones returned.  Reports
    come on the reporting thread and on the event loop, hence the lock."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.outstanding = 0
        self._lock = threading.Lock()
        self._ok: list[tuple[Done, Any]] = []
        self._failed: list[tuple[Done, Any, Any]] = []
        self._buckets = [0] * (len(bounds) + 1)
        self._latency_sum = 0.0
        self._acked = self._failures = 0
        #: id of a record's callback -> (done, ctx, made), while its report has not come
        self._waiting: dict[int, tuple[Done, Any, float]] = {}
        self._ids = itertools.count()

    def submit(self, produce: Any, records: list[Record], done: Done, ctxs: list[Any]) -> int:
        taken = 0
        report = self._report
        for r in records:
            ticket = next(self._ids)
            with self._lock:  # waiting before produce(): the reporting thread may report at once
                self._waiting[ticket] = (done, ctxs[taken], time.monotonic())
                self.outstanding += 1
            try:  # positional: (topic, value, key, partition, callback, on_delivery, ts, headers)
                produce(r.topic, r.value, r.key, -1, partial(report, ticket), None, 0, r.headers)
            except BaseException as e:
                with self._lock:
                    if self._waiting.pop(ticket, None) is not None:
                        self.outstanding -= 1
                if isinstance(e, BufferError):
                    break
                raise
            taken += 1
        return taken

    def _report(self, ticket: int, error: Any, message: Any) -> None:
        with self._lock:
            entry = self._waiting.pop(ticket, None)
            if entry is None:  # failed already by fail_all
                return
            done, ctx, made = entry
            latency = time.monotonic() - made
            self._buckets[bisect_left(self.bounds, latency)] += 1
            self._latency_sum += latency
            self.outstanding -= 1
            if error is None:
                self._acked += 1
                self._ok.append((done, ctx))
            else:
                self._failures += 1
                self._failed.append((done, ctx, error))

    def ready(self) -> bool:
        return bool(self._ok or self._failed)

    @property
    def oldest(self) -> float | None:
        """When the oldest record not reported yet was produced (time.monotonic()), or None."""
        with self._lock:
            for _done, _ctx, made in self._waiting.values():  # (tickets in the order made)
                return made
        return None

    def fail_all(self, error: Any) -> int:
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            for done, ctx, _made in waiting.values():
                self._failed.append((done, ctx, error))
            self._failures += len(waiting)
            self.outstanding -= len(waiting)
        return len(waiting)

    def answer(self) -> list[tuple[Done, Any, Any]]:
        with self._lock:
            ok, self._ok = self._ok, []
            failed, self._failed = self._failed, []
        # (as the C twin: a done that raises is logged, and the rest are answered)
        answer_each([done for done, _ in ok], [ctx for _, ctx in ok], [None] * len(ok))
        return failed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"outstanding": self.outstanding, "acked": self._acked, "failed": self._failures,
                    "latency_sum": self._latency_sum, "buckets": list(self._buckets)}


class KafkaStats:
    """What librdkafka says, kept for /metrics and /readyz."""

    __slots__ = ("delivery_errors", "client_errors", "brokers", "queue_messages", "fatal", "last_client_error",
                 "stats_at", "producers")

    def __init__(self) -> None:
        self.delivery_errors: Counter[str] = Counter()  # librdkafka error name -> records failed
        self.client_errors: Counter[str] = Counter()  # error_cb: error name -> times
        self.brokers: dict[str, str] = {}  # "host:port/id" -> state (UP, DOWN, CONNECT, ...)
        self.queue_messages = 0  # librdkafka's producer queue, as of its last statistics
        self.fatal: str | None = None
        self.last_client_error: str | None = None
        self.stats_at = 0.0
        self.producers = 0  # producers started (1 + fresh starts after fatal errors)


class KafkaSink(Sink):
    name = "kafka"

    def __init__(self, settings: KafkaSettings, *, reports: type | None = None, **kw: Any) -> None:
        """`reports`: `_reports.Reports` (the default where built) or `PyReports`."""
        super().__init__(**kw)
        self.settings = settings
        self.kafka = KafkaStats()
        kind = reports or (Reports if Reports is not None else PyReports)
        self._reports = kind(LATENCY_BUCKETS)
        #: with C tickets librdkafka reports only failures; a ticket let go of unreported is a success
        self._only_errors = kind is not PyReports
        self._producer: Any = None
        self._produce: Any = None
        self._latency_seen = 0.0
        self._answer_scheduled = False
        self._reporting = False
        self._token: Any = None
        self._closing = False
        self._wake = trio.Event()
        self._stopped = trio.Event()

    # -- called on the event loop ------------------------------------------------------------
    def submit_many(self, records: Sequence[AnyRecord], done: Done, ctxs: list[Any]) -> int:
        # (Records only: `packed` is False, so the lane gives this sink no PackedRecord)
        produce = self._produce
        if produce is None or self._closing:
            self.stats.refused += len(records)
            return 0
        before, total = self._reports.outstanding, len(records)
        # (whole requests only, within the records librdkafka has not reported on: its queue holds
        # as many, `queue.buffering.max.messages`, so it refuses none of them by count -- a record
        # once produced cannot be taken back, and a request cut there would be answered 5.03 with
        # some of its points stored.  Its bytes limit, 1 GiB by default, can still cut one.)
        n = whole_requests(ctxs, max(0, self.max_pending - before))
        if n < total:
            records, ctxs = records[:n], ctxs[:n]
        try:
            n = self._reports.submit(produce, cast("list[Record]", records), done, ctxs)
        except Exception as e:  # noqa: BLE001 - a fatal producer, a bad topic: refused, noted
            n = self._reports.outstanding - before  # (no report is filed during submit)
            self.last_error = e
            log.warning("kafka refused a record: %s", e)
        if n:
            self.stats.submitted += n
        if n < total:
            self.stats.refused += total - n
        return n

    @property
    def pending(self) -> int:
        """Records produced whose delivery report has not come yet (librdkafka has them)."""
        return self._reports.outstanding

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Start the producer and its reporting thread; serve until `close()` has drained it."""
        async with self.checkpointing():
            await self._run(task_status)

    async def _run(self, task_status: trio.TaskStatus) -> None:
        self._start_producer()
        self._token = trio.lowlevel.current_trio_token()
        self._reporting = True
        reporter = threading.Thread(target=self._report_thread, name="corem-kafka-reports", daemon=True)
        reporter.start()
        task_status.started()
        try:
            await self._serve()
        finally:
            self._reporting = False
            producer, self._producer, self._produce = self._producer, None, None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(reporter.join)
                self._let_go(producer, "corem stopped before kafka reported the record")
                if self._reports.ready():
                    self._answer()
                holder = [producer] if producer is not None else []
                del producer
                await trio.to_thread.run_sync(_dispose, holder)
            self._stopped.set()

    async def _serve(self) -> None:
        """Closing, fatal errors, and a look at the reports now and then (should the thread lag)."""
        reports = self._reports
        while True:
            with trio.move_on_after(SERVE_INTERVAL):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.kafka.fatal is not None:
                self._restart_after_fatal()
            self._poll()
            if self._closing and not reports.outstanding and not reports.ready():
                return

    def _report_thread(self) -> None:
        """Blocks in poll() (the GIL released) until librdkafka has reports, lets the C tickets
        file them, and asks the event loop to answer them: one wake-up per batch."""
        reports = self._reports
        while self._reporting:
            producer = self._producer
            if producer is None:
                time.sleep(WAIT_FOR_REPORTS)
                continue
            producer.poll(WAIT_FOR_REPORTS)
            if reports.ready() and not self._answer_scheduled:
                self._answer_scheduled = True
                try:
                    self._token.run_sync_soon(self._answer_ready)
                except trio.RunFinishedError:
                    return

    def _answer_ready(self) -> None:
        """Run by Trio between tasks (`run_sync_soon`): nothing may escape from here, or the run
        itself ends."""
        self._answer_scheduled = False
        try:
            if self._reports.ready():
                self._answer()
        except Exception:  # noqa: BLE001 - a bug in an answer; the other answers went out
            log.exception("answering kafka delivery reports failed")
        if self._closing and not self._reports.outstanding:
            self._wake.set()

    def _poll(self) -> None:
        producer = self._producer
        if producer is None:
            return
        producer.poll(0)  # runs the callbacks of everything librdkafka has ready; never waits
        if self._reports.ready():
            self._answer()

    def after_drain(self) -> None:
        """The edges call this after each batch of datagrams: under load, reports are answered
        within that pass of the event loop, before the answers go out."""
        if self._reports.outstanding:
            self._poll()

    def _answer(self) -> None:
        before = self.stats.acked + self.stats.failed
        failed = self._reports.answer()  # the acknowledged ones are answered (2.04) in there
        stats, kafka = self.stats, self.kafka
        first_error: BaseException | None = None
        errors: list[BaseException | None] = []
        for _, _, error in failed:
            e = DeliveryFailed(error)
            kafka.delivery_errors[e.code] += 1
            if first_error is None:
                first_error = e
                if e.code in RESTART_ON and kafka.fatal is None:
                    kafka.fatal = f"{e.code} in a delivery report"
                    log.warning("kafka refuses this producer's identity (%s): starting a fresh one", e.code)
            errors.append(e)
        if failed:
            stats.answer_errors += answer_each([f[0] for f in failed], [f[1] for f in failed], errors)
        totals = self._reports.stats()
        n = totals["acked"] + totals["failed"] - before
        latency = totals["latency_sum"] - self._latency_seen
        self._latency_seen = totals["latency_sum"]
        stats.acked, stats.failed = totals["acked"], totals["failed"]
        stats.batches += 1
        stats.batch_records += n
        stats.observe(latency / n if n else 0.0, n)  # a batch's time: its records' mean
        if first_error is None:
            stats.ack_seconds += latency
        self.last_error = first_error
        if self.after_batch is not None:
            self.after_batch()

    # -- librdkafka's callbacks (inside poll) --------------------------------------------------
    def _error(self, error: Any) -> None:
        name = error.name()
        self.kafka.client_errors[name] += 1
        self.kafka.last_client_error = f"{name}: {error.str()}"
        if error.fatal():
            self.kafka.fatal = self.kafka.last_client_error
            log.error("kafka producer failed for good (%s): starting a fresh one", self.kafka.fatal)
        else:
            log.debug("kafka: %s", self.kafka.last_client_error)

    def _statistics(self, text: str) -> None:
        try:
            stats = json.loads(text)
        except ValueError:
            return
        brokers = stats.get("brokers", {})
        # the brokers learned from metadata; until there are some, the bootstrap connections
        learned = {name: b.get("state", "?") for name, b in brokers.items() if b.get("nodeid", -1) >= 0}
        self.kafka.brokers = learned or {name: b.get("state", "?") for name, b in brokers.items()
                                         if name.endswith("/bootstrap")}
        self.kafka.queue_messages = int(stats.get("msg_cnt", 0))
        self.kafka.stats_at = time.monotonic()

    # -- producer lifecycle --------------------------------------------------------------------
    def _start_producer(self) -> None:
        from confluent_kafka import Producer

        cfg = self.settings.producer_config(self.max_pending)
        cfg.update({"error_cb": self._error, "stats_cb": self._statistics,
                    "delivery.report.only.error": self._only_errors})
        self._producer = Producer(cfg)
        self._produce = self._producer.produce
        self.kafka.fatal = None
        self.kafka.producers += 1
        log.info("kafka producer for %s (acks=%s, idempotent=%s)", ",".join(self.settings.bootstrap),
                 self.settings.acks, self.settings.idempotent,
                 extra=fields(bootstrap=",".join(self.settings.bootstrap), acks=self.settings.acks,
                              idempotent=self.settings.idempotent))

    def _restart_after_fatal(self) -> None:
        """The idempotent producer cannot go on: fail what it holds (5.03), start a fresh one."""
        old = self._producer
        if old is not None:
            old.purge()
            old.poll(0)  # the purged records' reports: failures
        self._let_go(old, f"kafka producer restarted after: {self.kafka.fatal}")
        self._start_producer()
        if self._reports.ready():
            self._answer()
        if old is not None:
            holder = [old]
            del old
            trio.lowlevel.spawn_system_task(trio.to_thread.run_sync, _dispose, holder)

    def _let_go(self, producer: Any, why: str) -> None:
        """`producer` will report nothing more: whatever still waits for a report is failed
        (5.03), so no device waits for ever and no freed callback counts as a delivery."""
        if producer is not None:
            lost = self._reports.fail_all(_Gone(why))
            if lost:
                log.warning("%d records had no delivery report from the kafka producer let go of", lost)

    async def close(self) -> None:
        """Refuse new records; wait until every record in flight has its report (at most
        kafka_timeout: librdkafka fails what it cannot deliver by then)."""
        self._closing = True
        self._wake.set()
        await self._stopped.wait()

    def waiting_since(self) -> float | None:
        return self._reports.oldest

    def probe(self) -> str | None:
        """From librdkafka's own state: a fatal error, the last deliveries failing, deliveries
        stalled (a record waiting longer than STALLED_AFTER for its report: a broker that holds the
        connection and answers nothing, frozen or overloaded -- librdkafka sees it UP), or no broker
        up in its latest statistics."""
        k = self.kafka
        if k.fatal is not None:
            return f"kafka: {k.fatal}"
        if self.last_error is not None:
            return str(self.last_error)
        if (stalled := self.stalled()) is not None:
            return f"kafka: {stalled}"
        if not k.stats_at:
            return "kafka: no statistics from librdkafka yet (connecting)"
        if not any(state == "UP" for state in k.brokers.values()):
            states = ", ".join(f"{name} {state}" for name, state in sorted(k.brokers.items())) or "none known"
            return f"kafka: no broker is up ({states})" + (f"; {k.last_client_error}" if k.last_client_error else "")
        return None

    def metrics(self) -> Iterator[Measurement]:
        yield from super().metrics()
        k = self.kafka
        yield gauge("corem_kafka_in_flight", self.pending)
        yield gauge("corem_kafka_queue_messages",
                    len(self._producer) if self._producer is not None else k.queue_messages)
        totals = self._reports.stats()
        yield Histogram("corem_kafka_delivery_seconds", LATENCY_BUCKETS, totals["buckets"], totals["latency_sum"])
        for code, n in sorted(k.delivery_errors.items()):
            yield counter("corem_kafka_delivery_errors", n, code=code)
        for code, n in sorted(k.client_errors.items()):
            yield counter("corem_kafka_client_errors", n, code=code)
        states = Counter(k.brokers.values())
        for state in sorted(set(states) | {"UP"}):
            yield gauge("corem_kafka_brokers", states.get(state, 0), state=state)
        yield counter("corem_kafka_producers_started", k.producers)

def _dispose(holder: list) -> None:
    """Let go of a producer off the event loop (librdkafka joins its threads there): the caller
    passes its only reference in `holder`.  No flush or poll: its reports were served already,
    and no callback may run on this thread."""
    holder.clear()
