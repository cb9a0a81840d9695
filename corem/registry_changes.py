"""How a running server learns that its registry changed, and applies it without a pause in
serving: the CLI's nudge (registry/nudge.py, served by the server), PostgreSQL's NOTIFY (a change
by another node, the CLI or an admin API), and a poll as the fallback for writers that do neither.
Applying is the directory's (registry/directory.py): the changed rows read in a worker thread,
applied on the event loop a batch at a time; the ingest's targets and the lanes' tables of the
devices changed are made again as they next talk.  One update at a time."""

from __future__ import annotations

import logging

import trio

from .registry import Directory
from .registry.db import listen

log = logging.getLogger("corem")

#: How often the registry is checked for changes made by the CLI or another process: SQLite's
#: `data_version` (a pragma: ~5 us) 20 times a second, so that a writer that does not nudge is
#: served within 50 ms too; PostgreSQL's counter (a round trip) twice, NOTIFY being the way there.
REGISTRY_POLL, REGISTRY_POLL_SHARED = 0.05, 0.5


class RegistryChanges:
    def __init__(self, directory: Directory, *, shared_url: str = "") -> None:
        """`shared_url`: a PostgreSQL registry's URL (listened to); empty for SQLite."""
        self.directory = directory
        self.shared_url = shared_url

    async def changed(self, force: bool = False) -> None:
        """Apply the registry's changes (`force`: also one made on the server's own connection,
        the admin API's, which SQLite's `data_version` does not count)."""
        await self.directory.update(force)

    async def poll(self) -> None:
        """The fallback for writers that do not nudge: another process, a tool."""
        every = REGISTRY_POLL_SHARED if self.shared_url else REGISTRY_POLL
        while True:
            await trio.sleep(every)
            await self.changed()

    async def listen(self) -> None:
        """A PostgreSQL registry: reload at each NOTIFY, in a thread of its own; the poll stays
        as the fallback."""
        stopping = False

        def run() -> None:
            for _ in listen(self.shared_url, lambda: trio.from_thread.run(self.changed), lambda: stopping):
                pass

        try:
            while True:
                try:
                    await trio.to_thread.run_sync(run, abandon_on_cancel=True)
                except Exception as e:  # noqa: BLE001 - psycopg's: the database went away; the poll goes on
                    log.warning("registry: not listening for changes (%s); trying again in 2 s", e)
                await trio.sleep(2.0)
        finally:
            stopping = True
