"""Reading `commands.{tenant}` from Kafka: downlink requests other systems put on the bus.

One consumer on a worker thread, without a consumer group: it assigns itself every partition of
`commands.{tenant}` for each tenant in the registry (re-checked every `refresh` seconds) and
resumes from positions the server keeps in its data dir, so a restart neither loses nor repeats
requests and no broker-side group coordination is needed (Redpanda, Kafka and Tansu alike).
Each record is handed to the event loop (`deliver`), which carries it out and stores the position.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import trio

from .kafka import KafkaSettings

log = logging.getLogger("corem.bus.commands")

PREFIX = "commands."


class KafkaCommandReader:
    def __init__(
        self,
        settings: KafkaSettings,
        tenants: Callable[[], set[str]],
        positions: Callable[[], dict[tuple[str, int], int]],
        deliver: Callable[[str, int, int, bytes], None],
        *,
        refresh: float = 5.0,
    ) -> None:
        self.settings = settings
        self.tenants = tenants
        self.positions = positions
        #: (topic, partition, offset, value), called on the event loop
        self.deliver = deliver
        self.refresh = refresh
        self._stop = False
        self.errors = 0

    async def run(self) -> None:
        try:
            await trio.to_thread.run_sync(self._loop, abandon_on_cancel=True)
        finally:
            self._stop = True  # the abandoned thread notices within one poll

    def _loop(self) -> None:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        consumer = None
        assigned: set = set()
        next_refresh = 0.0
        failing = False
        while not self._stop:
            try:
                if consumer is None:
                    consumer = KafkaConsumer(**self.settings.client_config(), group_id=None,
                                             enable_auto_commit=False, auto_offset_reset="earliest")
                    assigned, next_refresh = set(), 0.0
                if time.monotonic() >= next_refresh:
                    tenants = trio.from_thread.run_sync(self.tenants)
                    wanted = set()
                    for tenant in tenants:
                        for p in consumer.partitions_for_topic(PREFIX + tenant) or ():
                            wanted.add(TopicPartition(PREFIX + tenant, p))
                    if wanted != assigned:
                        consumer.assign(sorted(wanted))
                        known = trio.from_thread.run_sync(self.positions)
                        for tp in wanted:
                            pos = known.get((tp.topic, tp.partition))
                            if pos is None:
                                consumer.seek_to_beginning(tp)
                            else:
                                consumer.seek(tp, pos)
                        assigned = wanted
                    next_refresh = time.monotonic() + self.refresh
                if not assigned:
                    time.sleep(min(0.5, self.refresh))
                    continue
                batch = consumer.poll(timeout_ms=500, max_records=500)
                if failing:
                    log.info("reading commands from kafka again")
                    failing = False
                for tp, records in batch.items():
                    for r in records:
                        trio.from_thread.run_sync(self.deliver, tp.topic, tp.partition, r.offset, r.value or b"")
            except (trio.RunFinishedError, trio.Cancelled):
                break
            except KafkaError as e:
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
