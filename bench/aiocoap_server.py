"""The same work as corem's telemetry path, written the way an aiocoap user would write it.

`POST /api/v1/{token}/telemetry`: look the token up, decode the CBOR flat map with corem's own
decoder, build the TelemetryPoint, store it in SQLite (WAL, synchronous=NORMAL, one commit per
reading: aiocoap has no group commit) and answer 2.04.  Used only by bench/load_bench.py.

    python bench/aiocoap_server.py PORT DB_PATH TOKEN TENANT DEVICE
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time

import aiocoap
import aiocoap.resource as resource

from corem.profiles.payload import PayloadError, decode_readings
from corem.ingest.point import TelemetryPoint, encode_point


class Telemetry(resource.Resource):
    def __init__(self, db: sqlite3.Connection, tenant: str, device: str) -> None:
        super().__init__()
        self.db = db
        self.tenant = tenant
        self.device = device

    async def render_post(self, request):
        try:
            readings = decode_readings(request.opt.content_format, request.payload)
        except PayloadError as e:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST, payload=str(e).encode())
        now = int(time.time() * 1000)
        point = TelemetryPoint(
            tenant=self.tenant,
            device=self.device,
            ts=now if readings.ts is None else readings.ts,
            numeric_values=readings.numeric,
            string_values=readings.strings,
            protocol="coap",
            received_at=now,
        )
        self.db.execute(
            "INSERT INTO records (topic, key, value) VALUES (?, ?, ?)",
            ("telemetry.raw." + self.tenant, self.device.encode(), encode_point(point)),
        )
        self.db.commit()
        return aiocoap.Message(code=aiocoap.CHANGED)


async def main(port: int, db_path: str, token: str, tenant: str, device: str) -> None:
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS records (offset INTEGER PRIMARY KEY, topic TEXT, key BLOB, value BLOB)")
    site = resource.Site()
    site.add_resource(["api", "v1", token, "telemetry"], Telemetry(db, tenant, device))
    await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    port, db_path, token, tenant, device = sys.argv[1:6]
    asyncio.run(main(int(port), db_path, token, tenant, device))
