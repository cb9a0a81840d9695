"""The benchmarks' tables, in Markdown (docs/benchmarks.md's tables are pasted from what they print)."""

from __future__ import annotations

import json
from typing import Any, Callable, Collection, Iterable, Sequence

#: (heading, the cell of a row)
Column = tuple[str, Callable[[Any], object]]


def markdown(columns: Sequence[Column], rows: Iterable[Any], *, text: Collection[int] = (0,)) -> str:
    """The table of `rows`; the columns at the indices in `text` are left-aligned, the others
    (numbers) right-aligned."""
    lines = ["| " + " | ".join(heading for heading, _ in columns) + " |",
             "|" + "|".join("---" if i in text else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(str(cell(row)) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(rows: list[Any], columns: Sequence[Column], *, as_json: bool, title: str = "",
           text: Collection[int] = (0,)) -> None:
    """What a benchmark prints: its rows as JSON (`--json`), or its title and its table."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if title:
        print(f"\n{title}\n")
    print(markdown(columns, rows, text=text))
