"""The corem server: wires registry, message layer, ingest, sink and the Trio edges together."""

from __future__ import annotations

import fcntl
import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .admin.http import HttpServer
from .bus import EmbeddedBus
from .coap import Endpoint, Params, Router
from .config import ConfigError, Settings, parse_hostport
from .ingest.diagnostics import Diagnostics
from .ingest.telemetry import TelemetryIngest
from .metrics import render
from .net import UdpEdge, bind_udp
from .registry import Directory, Registry

log = logging.getLogger("corem")

#: How often the registry is checked for changes made by the CLI or another process.
REGISTRY_POLL = 0.5


@dataclass
class Bound:
    """The addresses actually bound (ports picked by the OS when 0 was asked for)."""

    coap: tuple | None = None
    http: tuple | None = None
    extra: dict = field(default_factory=dict)


def lock_data_dir(data: Path) -> int:
    """One server per data dir: the embedded bus assigns offsets in memory, so two writers would
    interleave them.  The lock goes away with the process, however it ends."""
    fd = os.open(data / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"data_dir: {data} is in use by another corem serve") from None
    return fd


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        data = settings.data_path
        data.mkdir(parents=True, exist_ok=True)
        self._lock = lock_data_dir(data)
        self.registry = Registry(data / "registry.db")
        self.directory = Directory(self.registry)
        self.sink = EmbeddedBus(
            data / "bus.db",
            synchronous=settings.store_synchronous,
            max_pending=settings.sink_max_pending,
            max_batch=settings.sink_max_batch,
        )
        self.endpoint = Endpoint(
            Params(
                ack_timeout=settings.ack_timeout,
                max_retransmit=settings.max_retransmit,
                piggyback_timeout=settings.piggyback_timeout,
                exchange_lifetime=settings.exchange_lifetime,
                dedup_max_entries=settings.dedup_max_entries,
            )
        )
        self.router = Router()
        self.diagnostics = Diagnostics(settings.diagnostics_samples)
        self.ingest = TelemetryIngest(self.directory, self.sink, self.endpoint, self.diagnostics)
        self.ingest.install(self.router)
        self.edge: UdpEdge | None = None
        self.bound = Bound()
        self._stop = trio.Event()
        self._ready = False

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal-watching task)."""
        self._stop.set()

    # -- HTTP routes -------------------------------------------------------------------------
    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, "text/plain; version=0.0.4; charset=utf-8", render(self)

    def _healthz(self) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def _readyz(self) -> tuple[int, str, bytes]:
        if not self._ready:
            return 503, "text/plain", b"starting\n"
        if self.sink.last_error is not None:
            return 503, "text/plain", f"bus: {self.sink.last_error}\n".encode()
        return 200, "text/plain", b"ready\n"

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        self.directory.refresh()
        coap = parse_hostport(s.coap, "coap", allow_off=True)
        http_addr = parse_hostport(s.http, "http", allow_off=True)
        http = None
        if coap is not None:
            self.edge = UdpEdge(bind_udp(*coap), self.endpoint, self.router, max_datagram=s.max_datagram)
            self.sink.after_batch = self.edge.flush
            self.bound.coap = self.edge.address
        if http_addr is not None:
            http = HttpServer({"/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz})
            self.bound.http = await http.bind(*http_addr)
        try:
            async with trio.open_nursery() as outer:
                await outer.start(self.sink.run)
                async with trio.open_nursery() as inner:
                    if self.edge is not None:
                        inner.start_soon(self.edge.serve)
                        inner.start_soon(self.edge.run_timers)
                    if http is not None:
                        inner.start_soon(http.serve)
                    inner.start_soon(self._poll_registry)
                    # everything allocated so far lives as long as the process: take it out of
                    # the collector's sight so each collection scans only what requests create
                    gc.collect()
                    gc.freeze()
                    self._ready = True
                    log.info("started coap=%s http=%s data_dir=%s", self.bound.coap, self.bound.http, s.data_dir)
                    task_status.started(self.bound)
                    await self._stop.wait()
                    log.info("stopping: no new datagrams; committing and answering in-flight readings")
                    self._ready = False
                    inner.cancel_scope.cancel()
                # every reading accepted before the stop is committed and answered here
                await self.sink.close()
                if self.edge is not None:
                    self.edge.flush()
        finally:
            if self.edge is not None:
                self.edge.close()
            self.registry.close()
            os.close(self._lock)
            log.info("stopped")

    async def _poll_registry(self) -> None:
        while True:
            await trio.sleep(REGISTRY_POLL)
            if self.directory.refresh():
                log.info("registry changed: %d devices with tokens", len(self.directory.by_token))
