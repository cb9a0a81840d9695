"""The Kafka / Redpanda sink, on kafka-python (>= 3; kafka-python-ng is archived and points back).

Each group-commit batch is handed to the producer in the worker thread, flushed once, and then
every record's own future is read: a record is acknowledged (2.04) only if the broker acknowledged
it (acks=all by default), and refused (5.03) otherwise, record by record.  The producer's own I/O
thread does the networking; the event loop never waits on Kafka.

The producer is created lazily and recreated after a failure, so corem starts and answers 5.03
while the brokers are down, and recovers by itself when they come back.  `delivery_timeout_ms`
follows `kafka_timeout`, so a record corem gave up on is not delivered behind the device's back
(which would turn its retry into a duplicate) except in the rare race at the very deadline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .base import BatchingSink, Record

log = logging.getLogger("corem.bus.kafka")

@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: tuple[str, ...]
    client_id: str = "corem"
    acks: str = "all"
    compression: str = "none"
    linger_ms: int = 5
    batch_size: int = 65536
    timeout: float = 10.0
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def client_config(self) -> dict[str, Any]:
        """What producers and consumers share: where the brokers are and how to talk to them."""
        cfg: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap),
            "client_id": self.client_id,
            "reconnect_backoff_max_ms": 2000,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            cfg.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                       sasl_plain_password=self.sasl_password)
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key):
                cfg[key] = getattr(self, key)
        return cfg

    def producer_config(self) -> dict[str, Any]:
        timeout_ms = int(self.timeout * 1000)
        return {
            **self.client_config(),
            "acks": {"all": "all", "1": 1, "0": 0}[self.acks],
            "compression_type": None if self.compression == "none" else self.compression,
            "linger_ms": self.linger_ms,
            "batch_size": self.batch_size,
            "request_timeout_ms": max(1000, timeout_ms // 2),
            "delivery_timeout_ms": timeout_ms,
            "max_block_ms": timeout_ms,
            "bootstrap_timeout_ms": timeout_ms,
        }


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


class KafkaSink(BatchingSink):
    name = "kafka"

    def __init__(self, settings: KafkaSettings, **kw) -> None:
        super().__init__(**kw)
        self.settings = settings
        self._producer = None

    def _ensure_producer(self):
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(**self.settings.producer_config())
            log.info("connected to kafka %s", ",".join(self.settings.bootstrap))
        return self._producer

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0)
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    def write_prepared(self, records: list[Record]) -> list[BaseException | None]:
        from kafka.errors import KafkaError

        try:
            producer = self._ensure_producer()
        except KafkaError as e:  # no broker reachable: every record in the batch is refused
            raise ConnectionError(f"kafka unavailable: {e}") from None
        futures = []
        for r in records:
            try:
                futures.append(producer.send(
                    r.topic, value=r.value, key=r.key, headers=[(k, v.encode()) for k, v in r.headers.items()]
                ))
            except KafkaError as e:  # buffer full or metadata unavailable within max_block_ms
                futures.append(e)
        try:
            producer.flush(timeout=self.settings.timeout)
        except KafkaError:
            pass  # the futures say which records made it
        results: list[BaseException | None] = []
        failed = False
        for f in futures:
            if isinstance(f, BaseException):
                results.append(f)
                failed = True
            elif f.is_done and f.succeeded():
                results.append(None)
            else:
                results.append(f.exception if f.is_done else TimeoutError("kafka did not acknowledge in time"))
                failed = True
        if failed and all(r is not None for r in results):
            self._drop_producer()  # nothing got through: start afresh on the next batch
        return results

    def probe(self) -> str | None:
        """A TCP connection to any bootstrap broker: cheap, and independent of the producer,
        which lives on the sink's worker thread."""
        import socket

        errors = []
        for hostport in self.settings.bootstrap:
            host, _, port = hostport.rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
                return None
            except OSError as e:
                errors.append(f"{hostport}: {e.strerror or e}")
        return "kafka unreachable: " + "; ".join(errors)

    def close_sync(self) -> None:
        if self._producer is not None:
            try:
                self._producer.flush(timeout=self.settings.timeout)
            finally:
                self._drop_producer()
