"""The headers on every record corem publishes, named as Eclipse Hono names them, so that a consumer
written for Hono's Kafka topics (or any other) can tell what a record is without reading its value.

| header          | value                                                                           |
|-----------------|---------------------------------------------------------------------------------|
| `content-type`  | the value's media type: `application/json` for corem's own records (readings,  |
|                 | presence, attributes, command results); a /ps message's from its Content-Format |
| `device_id`     | the device the record is about (also the record's key)                          |
| `creation-time` | when corem took it, milliseconds since the Unix epoch, as decimal text: for a   |
|                 | reading its `received_at` (the C fast lane writes the same)                     |

Beside them, what corem had before: `protocol` and `profile` on readings, `coap-exchange` (the
exchange a reading came in, corem/bus/recovery.py), Drogue's `channel`, `data_schema`, `via`,
/ps's `topic`, `device`, `content_format`, presence's `type`.
"""

from __future__ import annotations

import time

from .. import content_format

CONTENT_TYPE = "content-type"
DEVICE_ID = "device_id"
CREATION_TIME = "creation-time"
JSON = content_format.MEDIA_TYPES[content_format.JSON]
#: the media type of a CoAP Content-Format (corem/content_format.py, the one table of them)
media_type = content_format.media_type


def device_headers(device: str, content_type: str = JSON) -> dict[str, str]:
    """The headers that are the same on all of a device's records of one kind (the fast lane's
    per-device base dict holds them: it copies it for each record)."""
    return {CONTENT_TYPE: content_type, DEVICE_ID: device}


def created(headers: dict[str, str], ms: int) -> dict[str, str]:
    """`headers` and `creation-time` (a new dict: `headers` is usually a device's shared one)."""
    return {**headers, CREATION_TIME: str(ms)}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def standard(device: str, content_type: str = JSON, ms: int | None = None) -> dict[str, str]:
    """A record's three standard headers (`ms`: its creation time; default now)."""
    return {CONTENT_TYPE: content_type, DEVICE_ID: device, CREATION_TIME: str(now_ms() if ms is None else ms)}
