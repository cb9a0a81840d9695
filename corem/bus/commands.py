"""Reading `commands.{tenant}` from Kafka: downlink requests other systems put on the bus.

One confluent-kafka (librdkafka) consumer on a worker thread, without group membership: it
assigns itself every partition of `commands.{tenant}` for each tenant in the registry (re-checked
every `refresh` seconds) and resumes from positions the server keeps in its data dir, so a restart
neither loses nor repeats requests and no broker-side group coordination is needed (Redpanda,
Kafka and Tansu alike).  Each poll's records are handed to the event loop in one call
(`deliver` per record), which carries them out and stores the positions.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import trio

from ..stats import Sample, counter
from . import topics
from .kafka import KafkaSettings

log = logging.getLogger("corem.bus.commands")



class KafkaCommandReader:
    def __init__(
        self,
        settings: KafkaSettings,
        tenants: Callable[[], set[str]],
        positions: Callable[[], dict[tuple[str, int], int]],
        deliver: Callable[[str, int, int, bytes], None],
        *,
        refresh: float = 5.0,
        leader: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.tenants = tenants
        self.positions = positions
        #: (topic, partition, offset, value), called on the event loop
        self.deliver = deliver
        self.refresh = refresh
        #: several nodes on one registry: read only while this says so (registry/db.py `Lease`)
        self.leader = leader
        self._stop = False
        self.errors = 0

    def metrics(self) -> Iterator[Sample]:
        yield counter("corem_kafka_commands_errors", self.errors)

    async def run(self) -> None:
        try:
            await trio.to_thread.run_sync(self._loop, abandon_on_cancel=True)
        finally:
            self._stop = True  # the abandoned thread notices within one poll

    def _loop(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

        consumer = None
        assigned: set[tuple[str, int]] = set()
        next_refresh = 0.0
        failing = False
        while not self._stop:
            try:
                if self.leader is not None and not self.leader():
                    if consumer is not None:  # another node reads now
                        consumer.close()
                        consumer = None
                    time.sleep(2.0)
                    continue
                if consumer is None:
                    consumer = Consumer(self.settings.consumer_config())
                    assigned, next_refresh = set(), 0.0
                if time.monotonic() >= next_refresh:
                    wanted_topics = {topics.commands(t) for t in trio.from_thread.run_sync(self.tenants)}
                    # one metadata request for every topic: asking for a topic by name could
                    # create it on brokers that auto-create
                    metadata = consumer.list_topics(timeout=5)
                    wanted = {(name, p) for name, t in metadata.topics.items() if name in wanted_topics and t.error is None
                              for p in t.partitions}
                    if wanted != assigned:
                        known = trio.from_thread.run_sync(self.positions)
                        consumer.assign([TopicPartition(topic, p, known.get((topic, p), OFFSET_BEGINNING))
                                         for topic, p in sorted(wanted)])
                        assigned = wanted
                    next_refresh = time.monotonic() + self.refresh
                if not assigned:
                    time.sleep(min(0.5, self.refresh))
                    continue
                batch = []
                for m in consumer.consume(num_messages=500, timeout=0.5):
                    if m.error() is not None:
                        raise KafkaException(m.error())
                    batch.append((m.topic(), m.partition(), m.offset(), m.value() or b""))
                if failing:
                    log.info("reading commands from kafka again")
                    failing = False
                if batch:
                    trio.from_thread.run_sync(self._deliver_all, batch)
            except (trio.RunFinishedError, trio.Cancelled):
                break
            except KafkaException as e:
                self.errors += 1
                if not failing:  # one line when it starts failing, one when it recovers
                    log.warning("reading commands from kafka failed (retrying every 2 s): %s", e)
                failing = True
                if consumer is not None:
                    consumer.close()
                consumer = None
                time.sleep(2.0)
        if consumer is not None:
            consumer.close()

    def _deliver_all(self, batch: list[tuple[Any, Any, Any, bytes]]) -> None:
        """(topic, partition, offset, value) as librdkafka gives them (never None for a record)"""
        for topic, partition, offset, value in batch:
            self.deliver(topic, partition, offset, value)
