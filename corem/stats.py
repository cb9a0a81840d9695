"""How a component shows its counters: `metrics()` yields `Sample`s (and `Histogram`s).

The hot paths count with plain integers on their own objects (no locks, no label lookups); at
scrape time `corem.metrics` asks each component for its samples, adds the labels of where it is
mounted (the transport), sums samples of the same name and labels (the fast lane and the Python
path count the same things), and writes them with the names and help texts of its one table.
No component imports Prometheus, and none writes into another's counters.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Protocol, Union

Labels = tuple[tuple[str, str], ...]


class Sample(NamedTuple):
    name: str
    value: float
    labels: Labels = ()


class Histogram(NamedTuple):
    """Non-cumulative bucket counts (the last one +Inf) and their sum, as the hot paths keep them."""

    name: str
    bounds: tuple[float, ...]
    counts: list[int]
    total: float
    labels: Labels = ()


Measurement = Union[Sample, Histogram]


class Measured(Protocol):
    def metrics(self) -> Iterable[Measurement]: ...


def counter(name: str, value: float, **labels: str) -> Sample:
    """A sample of a counter or a gauge (`corem.metrics.FAMILIES` says which)."""
    return Sample(name, value, tuple(labels.items()))


gauge = counter


def fields(stats: object, names: dict[str, str]) -> Iterator[Sample]:
    """A sample per attribute of a Stats object: `names` maps each attribute to its metric."""
    for attr, name in names.items():
        yield Sample(name, getattr(stats, attr))
