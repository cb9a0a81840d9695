"""Which node holds each device, for nodes sharing a PostgreSQL registry.

Downlink (an RPC, a command, an attribute notification) can only go out through the node the
device talks to: its observation, its address, its DTLS session are there.  Each node writes
`device_homes` when it first hears a device (in batches, from a thread: a fleet arriving at once
is one upsert per batch, not a query per device on the event loop), and the admin API of any
node forwards a device's downlink to the node written there (corem/cluster.py, the one home of
"where is this device served, carry this there").  The last
node to hear a device first wins, as a device that moved is heard first by its new node.

Why the registry and not a Kafka topic keyed by device: the admin call waits for the device's
answer (an RPC) and gets its result over the same HTTP exchange, which a forwarded request keeps;
and the nodes that share a registry are exactly the nodes that serve one fleet.
"""

from __future__ import annotations

import logging
import time

import trio

from .db import Db

log = logging.getLogger("corem.registry.homes")

SCHEMA = """
CREATE TABLE IF NOT EXISTS device_homes (
    tenant TEXT NOT NULL, device TEXT NOT NULL, node TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (tenant, device)
);
"""
#: seconds between writes of the devices heard first
WRITE_EVERY = 0.2


class Homes:
    def __init__(self, db: Db, node: str) -> None:
        """`db`: the registry's database; `node`: this node's admin URL, as other nodes reach it."""
        self.node = node
        self.db = db
        db.schema(SCHEMA)
        self._writer: Db | None = None  # the writer thread's own connection (run)
        self._pending: list[tuple[str, str]] = []
        self.errors = 0

    def heard(self, tenant: str, device: str) -> None:
        """A device heard here for the first time (Downlink's first-sight hook)."""
        self._pending.append((tenant, device))

    def elsewhere(self, tenant: str, device: str) -> str | None:
        """The admin URL of the node that last heard the device first, if that is another node."""
        row = self.db.execute("SELECT node FROM device_homes WHERE tenant = ? AND device = ?",
                              (tenant, device)).fetchone()
        return None if row is None or row[0] == self.node else str(row[0])

    async def run(self) -> None:
        self._writer = self.db.reopen()
        try:
            while True:
                await trio.sleep(WRITE_EVERY)
                if self._pending:
                    batch, self._pending = self._pending, []
                    await trio.to_thread.run_sync(self._write, batch)
        finally:
            self._writer.close()

    def _write(self, batch: list[tuple[str, str]]) -> None:
        assert self._writer is not None
        now = int(time.time() * 1000)
        try:
            self._writer.executemany(
                "INSERT INTO device_homes VALUES (?, ?, ?, ?) ON CONFLICT (tenant, device) "
                "DO UPDATE SET node = excluded.node, at = excluded.at",
                [(t, d, self.node, now) for t, d in dict.fromkeys(batch)])
        except self._writer.Error as e:  # the database is away: downlink for them stays local
            self.errors += 1
            log.warning("could not note %d devices heard here (%s)", len(batch), e)
