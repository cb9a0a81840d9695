"""Delivery tickets for the Kafka sink (`_reports.c`); `kafka.PyReports` is the same in Python."""

from typing import Any, Callable, Sequence

class Reports:
    def __init__(self, bounds: Sequence[float]) -> None: ...
    @property
    def outstanding(self) -> int:
        """Records produced and not reported yet."""
    @property
    def oldest(self) -> float | None:
        """When the oldest record not reported yet was produced (time.monotonic()), or None."""
    def submit(self, produce: Callable[..., Any], records: list[Any], done: Callable[[Any, BaseException | None], Any],
               ctxs: list[Any], /) -> int:
        """Produce each record with a ticket as its callback; how many produce() took."""
    def answer(self) -> list[tuple[Callable[[Any, BaseException | None], Any], Any, Any]]:
        """Answer the acknowledged records; return the failed ones as (done, ctx, error)."""
    def fail_all(self, error: BaseException, /) -> int:
        """Fail every record still waiting for its report."""
    def ready(self) -> bool: ...
    def stats(self) -> dict[str, Any]:
        """{outstanding, acked, failed, latency_sum, buckets}"""
