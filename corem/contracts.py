"""The JSON Schemas of what corem puts on the bus, made from the msgspec Structs it encodes with, and
published in the repository (docs/schemas/) for the systems that consume the records.

    python -m corem.contracts            # write docs/schemas/*.schema.json
    python -m corem.contracts --check    # exit 1 if a published file differs from what corem makes

| file                             | records                         | Struct                              |
|----------------------------------|---------------------------------|-------------------------------------|
| telemetry-point.schema.json      | `telemetry.raw.{tenant}`        | corem.ingest.point.TelemetryPoint   |
| presence-event.schema.json       | `device.presence.{tenant}`      | corem.ingest.presence.PresenceEvent |

The record headers (`content-type`, `device_id`, `creation-time`, ...) are described in
corem/bus/headers.py and docs/bus.md, and the OpenAPI document of the admin API is served by corem
itself (GET /api/openapi.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

DRAFT = "https://json-schema.org/draft/2020-12/schema"
#: the directory of the published files, in a checkout
PUBLISHED = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def _schema(kind: type, title: str, about: str) -> dict[str, Any]:
    """`kind`'s JSON Schema (2020-12), self-contained: its definition at the top, others in $defs."""
    made = msgspec.json.schema(kind)
    defs = made.get("$defs", {})
    top = defs.pop(kind.__name__)
    doc: dict[str, Any] = {"$schema": DRAFT, "title": title, "description": about, **{
        k: v for k, v in top.items() if k not in ("title", "description")}}
    if defs:
        doc["$defs"] = defs
    return doc


def schemas() -> dict[str, dict[str, Any]]:
    """file name -> its schema."""
    from .ingest.point import TelemetryPoint
    from .ingest.presence import PresenceEvent

    return {
        "telemetry-point.schema.json": _schema(
            TelemetryPoint, "corem TelemetryPoint",
            "One accepted reading: the JSON value of each record on the topic telemetry.raw.{tenant} (with the "
            "topic_prefix setting before it). Its headers: content-type (application/json), device_id, "
            "creation-time (ms since the Unix epoch: received_at), protocol, profile, coap-exchange. Fields may "
            "be added in a later version; none is removed or changes meaning without a new major version."),
        "presence-event.schema.json": _schema(
            PresenceEvent, "corem PresenceEvent",
            "A device going online (its first accepted reading) or offline (none for its threshold): the JSON "
            "value of each record on device.presence.{tenant}. Headers: type (presence), content-type, "
            "device_id, creation-time."),
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write(directory: Path = PUBLISHED) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = directory / name
        path.write_text(render(schema))
        written.append(path)
    return written


def stale(directory: Path = PUBLISHED) -> list[str]:
    """The published files that are missing or differ from what corem makes now."""
    out = []
    for name, schema in schemas().items():
        path = directory / name
        if not path.is_file() or path.read_text() != render(schema):
            out.append(str(path))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corem.contracts", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, default=PUBLISHED, help=f"default: {PUBLISHED}")
    parser.add_argument("--check", action="store_true", help="only say which files are out of date (exit 1)")
    args = parser.parse_args(argv)
    if args.check:
        out = stale(args.directory)
        for path in out:
            print(f"{path}: out of date; run python -m corem.contracts", file=sys.stderr)
        return 1 if out else 0
    for written in write(args.directory):
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
