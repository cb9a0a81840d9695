"""A worker's metrics on their way to the supervisor's front (`GET /_worker/metrics`): the samples
`metrics.gather` summed, as JSON rows, and back -- a histogram keeps its buckets."""

from __future__ import annotations

from typing import Any

from ..stats import Histogram, Labels, Measurement, Sample


def encode_samples(values: dict[str, dict[Labels, Any]]) -> list[list[Any]]:
    """`metrics.gather`'s result as JSON: [name, labels, value] or [name, labels, bounds, counts, sum]."""
    out: list[list[Any]] = []
    for name, family in values.items():
        for labels, v in family.items():
            if isinstance(v, Histogram):
                out.append([name, labels, list(v.bounds), list(v.counts), v.total])
            else:
                out.append([name, labels, v])
    return out


def decode_samples(rows: list[list[Any]]) -> list[Measurement]:
    out: list[Measurement] = []
    for row in rows:
        name, labels = row[0], tuple((k, v) for k, v in row[1])
        if len(row) == 5:
            out.append(Histogram(name, tuple(row[2]), list(row[3]), row[4], labels))
        else:
            out.append(Sample(name, row[2], labels))
    return out
