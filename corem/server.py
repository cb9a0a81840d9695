"""The corem server composes -- stores, directory, ingest, doors, downlink, transports, admin HTTP --
and starts and stops them.  Each part is its module's: the listeners (transports.py, listeners.py),
where a device is served (cluster.py), the data dir (datadir.py), the stores (stores.py), the
operations routes (health.py), SIGHUP (reload.py), registry_changes.py."""

from __future__ import annotations

import functools
import gc
import logging
import sys
from typing import TYPE_CHECKING, Hashable, Iterator, cast

import trio

from . import datadir, listeners, reload, stores
from .admin import token as admin_token
from .admin.api import AdminApi, AdminParts
from .admin.history import History, Totals
from .admin.http import HttpServer, Route
from .build import BuildInfo
from .bus import topics
from .cluster import Carrier, CommandRecord
from .coap import discovery
from .coap.site import Site
from .codec import OptionNumber
from .codec.options import UNDERSTOOD_CRITICAL
from .config import Settings
from .devices.downlink import Downlink
from .doors import Doors
from .fastlane import serving
from .health import Health
from .identity import SessionDevice
from .ingest.diagnostics import Diagnostics
from .ingest.presence import Presence
from .ingest.telemetry import TelemetryIngest
from .listeners import Bound
from .logs import SERVE, fields
from .metrics import ProcessMetrics, gather
from .net import UdpEdge, fdlimit
from .oscore import Oscore
from .registry import Directory
from .registry import nudge as registry_nudge
from .registry.management import Management
from .registry.oscore import OscoreState
from .registry.presence import open_table as open_presence
from .registry_changes import RegistryChanges
from .reload import Report
from .stats import Measured
from .transports import Transport, Transports
from .workers.link import Link, WorkerSpec

if TYPE_CHECKING:
    from .dtls.server import DtlsServer

__all__ = ["Bound", "Server", "Transport"]

log = logging.getLogger("corem")

#: How often the downlink's queues and `ct` waits are looked at (the precision of `ct`).
DOWNLINK_TICK = 0.1
#: allocations between young-generation collections (CPython's default: 700)
GC_YOUNG = 20_000


class Server:
    def __init__(self, settings: Settings, worker: WorkerSpec | None = None) -> None:
        """`worker`: this server is one of `corem serve --workers N` (corem/workers): its sockets
        are inherited, the data dir is the supervisor's, and it shares the embedded bus."""
        fdlimit.raise_limit()  # first: the connection caps are derived from it (issue 26)
        self.settings = settings
        self.worker = worker
        topics.configure(settings.topic_prefix)  # (every topic this process names)
        # the data dir made, locked and prepared (with workers, by the supervisor for them)
        self._lock = datadir.take(settings) if worker is None else -1
        try:  # (before Trio starts: a bad certificate, a busy port or a damaged database is a plain ConfigError)
            if worker is None:
                datadir.create_files(settings)
            self._build(settings, worker)
        except BaseException:  # (a server that did not start holds nothing: no lock, no registry)
            if hasattr(self, "registry"):
                self.registry.close()
            self._unlock()
            raise

    def _build(self, settings: Settings, worker: WorkerSpec | None) -> None:
        self.registry = stores.open_registry(settings)
        self.directory = Directory(self.registry)
        self.sink = stores.make_sink(settings, after_batch=self._after_batch, shared=worker is not None)
        #: with workers, the supervisor prunes the bus (one pruner per data dir)
        self.pruner = stores.make_pruner(settings) if worker is None else None
        #: this process's process_* and python_* families (with workers: labelled by its index)
        self.process = ProcessMetrics(None if worker is None else str(worker.index))
        #: the UI's charts (with workers: the supervisor's front samples them all)
        self.history = History() if worker is None else None
        self.diagnostics = Diagnostics(settings.diagnostics_samples)
        tenants, profiles = settings.presence_thresholds()
        # presence per device across workers and nodes: its state in a table they share
        # (corem/registry/presence.py), a single process included (one code path)
        self.presence = Presence(self.sink, settings.presence_offline_after, tenants=tenants, profiles=profiles,
                                 table=open_presence(settings.registry_location(), settings.data_path))
        self.management = Management(self.registry)
        self.downlink = Downlink(
            self.management, self.sink, psm_activity_timer=settings.psm_activity_timer,
            max_queued=settings.max_queued_commands, clock=trio.current_time, after_send=self._after_batch,
        )
        # (a device removed, or removed and added again: what waited for the old one goes)
        self.directory.listen(functools.partial(self.downlink.forget, current=self.directory.named))
        self.ingest = TelemetryIngest(
            self.directory, self.sink, self.diagnostics, presence=self.presence, on_uplink=self.downlink.uplink,
            now=trio.current_time, max_readings=settings.max_readings_per_point,
        )
        self.oscore = Oscore(self.directory.oscore_device, OscoreState(self.registry.db),
                             UNDERSTOOD_CRITICAL - {OptionNumber.OSCORE},
                             shared=worker is not None or self.registry.shared,
                             lane_of=functools.partial(serving, self.ingest.lanes))
        self.doors = Doors(settings, self.directory, self.ingest, self.management, self.downlink)
        self.link: Link | None = None
        if worker is not None:
            self.link = Link(worker, self)
            self.downlink.number_ids(worker.index + 1, worker.count)
            self.doors.thingsboard.ask_owner = self.link.ask_reply
        #: where each device is served, and its downlink carried there (corem/cluster.py)
        self.cluster = Carrier(self.directory, self.downlink, self.management, self.sink, lambda: self.admin_token,
                               to_workers=self.link.to_workers if self.link else None,
                               tell_workers=self.link.first_sight if self.link else None)
        #: downlink requests from other systems on `commands.{tenant}` (corem/cluster.py)
        self.command_reader = self.cluster.reader(settings, worker.index if worker else 0, self.directory.tenants,
                                                  shared=self.registry.shared)
        self.admin_token = settings.admin_token or admin_token.read_or_create(settings.data_path)
        self.http: HttpServer | None = None
        #: Users' own resources (see corem.coap.site): `server.site.add("path", resource)`
        self.site = Site(clock=trio.current_time, after_notify=self._after_batch)
        self.changes = RegistryChanges(self.directory, shared_url=settings.registry if self.registry.shared else "")
        self._stop = trio.Event()
        self._reload_settings = trio.Lock()
        self.transports = Transports(settings, worker, self.directory, self.ingest, self.sink, self.oscore.unwrap,
                                     self._mount)
        self.bound: Bound = self.transports.bound
        self.health = Health(self.components, self.sink, self.transports)
        self.admin = AdminApi(AdminParts(
            self.registry, self.directory, self.management, self.downlink, self.presence, self.diagnostics,
            # (either DTLS layer: the admin summary reads sessions, offloaded, handshakes and the two
            # handshake counts, which EngineServer names as DtlsServer does)
            self.ingest, self.sink, cast("list[DtlsServer]", [t.dtls for t in self.transports if t.dtls is not None]),
            self.components,
            self.reload_registry,
            self.history,
        ))

    def _mount(self, t: Transport, session: SessionDevice) -> None:
        """Every door on a transport's router; `session` names a request's device."""
        self.ingest.install(t.router, session_device=session)
        self.doors.mount(t.router, t.observers, session)
        self.downlink.watch(t.observers)
        discovery.install(t.router)
        self.site.mount(t.router, t.observers)

    async def reload(self, new: Settings, *, quiet: bool = False) -> Report:
        """SIGHUP: apply what of `new` can change without dropping a device (corem/reload.py
        `apply`).  Logs the one line that says what, unless `quiet` (a worker: the supervisor
        says it for all).  One reload at a time."""
        async with self._reload_settings:
            report = await reload.apply(self, new)
            if not quiet:
                log.log(report.level, "%s", report.line())
            return report

    def use_admin_token(self, token: str) -> None:
        self.admin_token = token
        if self.http is not None:
            self.http.admin_token = token

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal-watching task)."""
        self._stop.set()

    def components(self) -> Iterator[tuple[Measured, dict[str, str]]]:
        """Everything that counts, with the labels of where it is mounted (corem/metrics.py)."""
        for t in self.transports:
            for c in t.components():
                yield c, {"transport": t.name}
            if t.dtls is not None:
                yield t.dtls, {}
        parts: list[Measured | None] = [self.ingest, self.sink, self.pruner, self.transports.recovery,
                                        self.command_reader, self.presence, self.downlink, self.oscore,
                                        *self.doors.components(), self.http, self.directory, self.diagnostics]
        for part in parts:
            if part is not None:
                yield part, {}
        yield BuildInfo(), {}
        yield self.process, {}
        js = sys.modules.get("corem.profiles.js")  # (the JS codecs' watchdog: no codec ran if never imported)
        if js is not None:
            yield js.WATCHDOG, {}
        yield self.health, {}

    async def _totals(self) -> dict[Hashable, Totals]:
        """What the UI's charts sample (corem/admin/history.py): this process's counters."""
        return {"": Totals.of(gather(self.components()))}

    def http_routes(self) -> list[Route]:
        ops = self.health.routes()
        self.admin.documented = list(ops)  # (the OpenAPI document lists them: not the internal ones below)
        if self.worker is not None:  # for the supervisor's front (corem/workers/front.py)
            ops.append(self.health.worker_route())
        if self.registry.shared:  # for the other nodes' commands readers
            ops.append(self.cluster.node_route())
        routes = self.admin.routes()
        if self.worker is None:  # (with workers, the supervisor's front routes between nodes)
            routes = self.cluster.routes(routes)
        return ops + routes

    def carry_out(self, record: CommandRecord) -> None:
        """A commands record the supervisor routed here (corem/workers/link.py)."""
        self.cluster.carry_out(record)

    def _unlock(self) -> None:
        datadir.release(self._lock)
        self._lock = -1

    def _after_batch(self) -> None:
        self.transports.flush()

    async def run(self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        self.directory.refresh()
        http_addr = s.listener("http")
        http = None
        try:
            if http_addr is not None:
                http = HttpServer(self.http_routes(), admin_token=self.admin_token, max_body=s.admin_max_body,
                                  access_log=self.worker is None)  # (with workers, the front logs each request)
                self.bound.http = await listeners.http(http, *http_addr)
                self.http = http
            if self.registry.shared and (s.node_url or self.bound.http is not None):
                node = s.node_url or listeners.admin_url(self.bound.http)  # type: ignore[arg-type]
                self.cluster.join(self.registry.db, node)
            streams = self.transports.streams()
            await self.transports.recover_exchanges()  # before the UDP edges read a datagram
            async with trio.open_nursery() as outer:
                await outer.start(self.sink.run)
                for edge in streams:  # connections outlive the accepting task: their last answers
                    await outer.start(edge.hold)
                async with trio.open_nursery() as inner:
                    for t in self.transports:
                        inner.start_soon(t.edge.serve)
                        if isinstance(t.edge, UdpEdge):  # (a TCP connection times itself)
                            inner.start_soon(t.edge.run_timers)
                    if http is not None:
                        inner.start_soon(http.serve)
                    inner.start_soon(self.changes.poll)
                    if self.registry.shared:
                        inner.start_soon(self.changes.listen)
                    await inner.start(self.cluster.run)
                    if self.link is None:  # workers: the supervisor answers nudges and relays them
                        await inner.start(registry_nudge.serve, s.data_path, self.changes.changed)
                    inner.start_soon(self.presence.run, trio.current_time)
                    inner.start_soon(self._tick_downlink)
                    if self.history is not None:
                        inner.start_soon(self.history.run, self._totals)
                    if self.pruner is not None:
                        inner.start_soon(self.pruner.run)
                    if self.command_reader is not None:
                        inner.start_soon(self.command_reader.run)
                    # everything allocated so far lives as long as the process: take it out of
                    # the collector's sight so each collection scans only what requests create
                    gc.collect()
                    gc.freeze()
                    # young collections every 20,000 allocations instead of 700: the per-request
                    # garbage is acyclic, so each pass found little; measured +6% readings/s
                    # (44.0k -> 47.2k, store NORMAL), within 1% of running with the GC disabled
                    gc.set_threshold(GC_YOUNG, 20, 100)
                    self.health.ready = True
                    log.info("started", extra=fields(**{k: v for k, v in vars(self.bound).items() if v is not None},
                                                     data_dir=s.data_dir))
                    task_status.started(self.bound)
                    if self.link is not None:
                        inner.start_soon(self.link.run, self.bound.http)
                    await self._stop.wait()
                    log.info("stopping: no new datagrams; committing and answering in-flight readings")
                    self.health.ready = False
                    for edge in streams:
                        edge.stop_reading()
                    inner.cancel_scope.cancel()
                # every reading accepted before the stop is committed and answered here
                await self.sink.close()
                self._after_batch()
                for edge in streams:
                    await edge.finish()
                for t in self.transports:
                    if t.dtls is not None:
                        n = t.dtls.close(trio.current_time())
                        log.info("saved %d DTLS sessions for the next start", n, extra=fields(sessions=n))
        finally:
            self.transports.close()
            self.directory.close()
            self.registry.close()
            self._unlock()
            (log if self.worker is not None else logging.getLogger(SERVE)).info("stopped")  # (corem/logs.py)

    async def _tick_downlink(self) -> None:
        while True:
            await trio.sleep(DOWNLINK_TICK)
            self.downlink.tick(trio.current_time())
            self.doors.tick()

    async def reload_registry(self) -> None:
        """After a change on the server's own registry connection (the admin API), which
        `data_version` does not count: reload now, off the event loop."""
        await self.changes.changed(force=True)
