"""Sinks: where accepted points go. The embedded SQLite log by default; Kafka with --bus kafka://."""

from .base import BatchingSink, Done, Record, Sink
from .sqlite import EmbeddedBus, read_records

__all__ = ["BatchingSink", "Done", "EmbeddedBus", "Record", "Sink", "read_records"]
