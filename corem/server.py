"""The corem server: wires registry, message layer, ingest, sink and the Trio edges together."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import re
import socket
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterator, cast

import trio

from .admin import token as admin_token
from .admin.api import AdminApi, AdminParts
from .admin.history import History, Totals
from .admin.http import HttpRequest, HttpServer, Reply, Route, json_reply
from .bus import EmbeddedBus, Sink
from .build import BuildInfo
from .cluster import Carrier, CommandRecord
from .bus import topics
from .bus.commands import KafkaCommandReader
from .bus.kafka import KafkaSink
from .bus.recovery import RecoveryStats, recover_embedded, recover_kafka
from .bus.retention import Pruner, parse_age, parse_size
from .coap import Endpoint, Router, discovery
from .coap.blockwise import Block1Uploads
from .coap.endpoint import Request
from .coap.observe import Observers
from .coap.site import Site
from .coap.stream import StreamEndpoint
from .codec import MessageFormatError, OptionNumber, decode
from .codec.options import UNDERSTOOD_CRITICAL
from . import datadir
from .config import ConfigError, Settings
from .devices.downlink import Downlink
from .dtls import SessionStore
from .dtls.layer import EngineServer, load_state_key
from .errors import NewerFormat
from .net import fdlimit
from .fastlane import FastLane, Lane
from .frontdoors.drogue import Drogue
from .frontdoors.efento import Efento
from .frontdoors.emqx import Emqx
from .frontdoors.thingsboard import ThingsBoard
from .ingest.diagnostics import Diagnostics
from .ingest.presence import Presence
from .ingest.telemetry import TelemetryIngest
from . import logs
from .logs import SERVE, fields
from .metrics import ProcessMetrics, gather, render
from .net import UdpEdge, bind_udp
from .net.limits import SourceLimiter, lane_networks
from .net.security import PlainUdp
from .net.tcp import TcpEdge, Tls, bind_tcp
from .oscore import Oscore
from .registry import Device, Directory, Registry
from .registry import nudge as registry_nudge
from .registry.db import Lease, listen
from .registry.management import Management
from .registry.oscore import OscoreState
from .registry.presence import open_table as open_presence
from .reload import Report, applied, apply_limits, apply_log_format, apply_log_level, changed, restart_needed
from .stats import Measured, Sample, gauge
from .workers import steer
from .workers.link import Link, WorkerSpec

if TYPE_CHECKING:
    from .dtls.server import DtlsServer

log = logging.getLogger("corem")

#: How often the registry is checked for changes made by the CLI or another process: SQLite's
#: `data_version` (a pragma: ~5 us) 20 times a second, so that a writer that does not nudge is
#: served within 50 ms too; PostgreSQL's counter (a round trip) twice, NOTIFY being the way there.
REGISTRY_POLL, REGISTRY_POLL_SHARED = 0.05, 0.5
#: How often the downlink's queues and `ct` waits are looked at (the precision of `ct`).
DOWNLINK_TICK = 0.1
#: allocations between young-generation collections (CPython's default: 700)
GC_YOUNG = 20_000


@dataclass
class Bound:
    """The addresses actually bound (ports picked by the OS when 0 was asked for)."""

    coap: tuple | None = None
    coaps: tuple | None = None
    coap_tcp: tuple | None = None
    coaps_tcp: tuple | None = None
    http: tuple | None = None


@dataclass
class Transport:
    """One listener: its message layer, its resources, its observers and its edge."""

    name: str  # "udp", "dtls", "tcp" or "tls": the metric label
    endpoint: Endpoint
    router: Router
    observers: Observers
    edge: UdpEdge | TcpEdge
    dtls: DtlsServer | EngineServer | None = None
    lane: FastLane | None = None

    def components(self) -> list[Measured]:
        """What counts on this transport (labelled `transport=name` in /metrics)."""
        return [c for c in (self.endpoint, self.edge, self.lane, self.router, self.observers) if c is not None]


def make_sink(s: Settings, after_batch: Callable[[], None] | None = None, *, shared: bool = False) -> Sink:
    """The embedded SQLite bus (`shared` by the workers of one server), or Kafka for `--bus kafka://…`."""
    if s.bus == "embedded":
        return EmbeddedBus(datadir.bus_path(s), synchronous=s.store_synchronous, max_pending=s.sink_max_pending,
                           max_batch=s.sink_max_batch, after_batch=after_batch, shared=shared)
    return KafkaSink(s.kafka_settings(), max_pending=s.sink_max_pending, max_batch=s.sink_max_batch,
                     after_batch=after_batch)


def make_pruner(s: Settings) -> Pruner | None:
    """The embedded bus's retention (corem/bus/retention.py); None with Kafka, which keeps its own."""
    if s.bus != "embedded":
        return None
    return Pruner(datadir.bus_path(s), age=parse_age(s.bus_retention_age), size=parse_size(s.bus_retention_size))


def identity(session: Callable[[Hashable], Device | None] | None) -> Callable[[Request], Device | None]:
    """Who sent a request, by the security below CoAP: its OSCORE context, else the device of its
    peer's DTLS or TLS session (`session`, when the transport has sessions)."""
    if session is None:
        return lambda req: req.identity
    return lambda req: req.identity or session(req.peer)


def _bind_or_explain(key: str, host: str, port: int):
    try:
        return bind_udp(host, port)
    except OSError as e:
        raise ConfigError(f"{key}: cannot listen on {host}:{port}: {e.strerror or e}") from None


async def bind_http(server: Any, host: str, port: int) -> tuple:
    """The admin HTTP listener; a port another process holds is one line at start, as for CoAP."""
    try:
        return await server.bind(host, port)
    except OSError as e:
        raise ConfigError(f"http: cannot listen on tcp {host}:{port}: {e.strerror or e}") from None


def url_host(address: tuple) -> str:
    """host:port of a bound address for a URL (an unspecified host: this machine's name)."""
    host = address[0]
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    return logs.address((host, address[1]))


def _redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


class Server:
    def __init__(self, settings: Settings, worker: WorkerSpec | None = None) -> None:
        """`worker`: this server is one of `corem serve --workers N` (corem/workers): its sockets
        are inherited, the data dir is the supervisor's, and it shares the embedded bus."""
        fdlimit.raise_limit()  # first: the connection caps are derived from it (issue 26)
        self.settings = settings
        self.worker = worker
        topics.configure(settings.topic_prefix)  # (every topic this process names)
        data = settings.data_path
        if worker is None:
            self._lock = datadir.take(settings)
        else:  # (the supervisor took the data dir for its workers)
            self._lock = -1
        try:
            self.registry = Registry(settings.registry_location())
        except (ConfigError, NewerFormat):  # a table a newer corem wrote
            self._unlock()
            raise
        except (sqlite3.Error, OSError) as e:  # a full or read-only disk: one line, not a traceback
            self._unlock()
            raise ConfigError(f"data_dir: cannot open {data / datadir.REGISTRY_FILE}: {e}") from None
        except Exception as e:  # psycopg's errors: the database is not reachable
            self._unlock()
            raise ConfigError(f"registry: cannot use {_redacted(settings.registry)}: {e}") from None
        self.directory = Directory(self.registry)
        self.sink = make_sink(settings, after_batch=self._after_batch, shared=worker is not None)
        #: with workers, the supervisor prunes the bus (one pruner per data dir)
        self.pruner = make_pruner(settings) if worker is None else None
        #: this process's process_* and python_* families (with workers: labelled by its index)
        self.process = ProcessMetrics(None if worker is None else str(worker.index))
        #: the UI's charts (with workers: the supervisor's front samples them all)
        self.history = History() if worker is None else None
        self.diagnostics = Diagnostics(settings.diagnostics_samples)
        tenants, profiles = settings.presence_thresholds()
        # presence per device across workers and nodes: its state in a table they share
        # (corem/registry/presence.py), a single process included (one code path)
        self.presence = Presence(self.sink, settings.presence_offline_after, tenants=tenants, profiles=profiles,
                                 table=open_presence(settings.registry_location(), data))
        self.management = Management(self.registry)
        self.downlink = Downlink(
            self.management, self.sink, psm_activity_timer=settings.psm_activity_timer,
            max_queued=settings.max_queued_commands, clock=trio.current_time, after_send=self._after_batch,
        )
        self.ingest = TelemetryIngest(
            self.directory, self.sink, self.diagnostics, presence=self.presence, on_uplink=self.downlink.uplink,
            now=trio.current_time,
        )
        self.oscore = Oscore(self.directory.oscore_device, OscoreState(self.registry.db),
                             UNDERSTOOD_CRITICAL - {OptionNumber.OSCORE},
                             shared=worker is not None or self.registry.shared)
        self.thingsboard = ThingsBoard(self.directory, self.ingest, self.management, self.downlink, trio.current_time)
        self.drogue = Drogue(self.directory, self.ingest, self.downlink, trio.current_time)
        self.emqx = Emqx(self.directory, self.ingest, self.downlink, trio.current_time,
                         max_retained=settings.pubsub_max_retained)
        self.efento = Efento(self.directory, self.ingest, self.management)
        self.link: Link | None = None
        if worker is not None:
            self.link = Link(worker, self)
            self.downlink.forward_reply = self.link.forward_reply
            self.downlink.number_ids(worker.index + 1, worker.count)
        #: where each device is served, and its downlink carried there (corem/cluster.py)
        self.cluster = Carrier(self.directory, self.downlink, self.management, self.sink, lambda: self.admin_token,
                               to_workers=self.link.to_workers if self.link else None,
                               tell_workers=self.link.first_sight if self.link else None)
        #: downlink requests from other systems on `commands.{tenant}` (Kafka only: the embedded
        #: bus has no other writers; there the admin API and CLI are the way in).  With workers,
        #: worker 0 reads them and the supervisor hands each to the worker that holds its device.
        self.command_reader = None if settings.bus == "embedded" or (worker and worker.index) else KafkaCommandReader(
            settings.kafka_settings(), self.directory.tenants, self.management.positions,
            self.cluster.record,
            refresh=settings.kafka_commands_refresh,
            leader=Lease(settings.registry).held if self.registry.shared else None,
        )
        self.admin_token = settings.admin_token or admin_token.read_or_create(data)
        self.http: HttpServer | None = None
        self.transports: list[Transport] = []
        #: Users' own resources (see corem.coap.site): `server.site.add("path", resource)`
        self.site = Site(clock=trio.current_time, after_notify=self._after_batch)
        self.bound = Bound()
        #: what the start read back from the bus for deduplication (`_recover_exchanges`)
        self.recovery = RecoveryStats()
        self._stop = trio.Event()
        self._reload_settings = trio.Lock()
        self._ready = False
        try:
            self._bind()  # before Trio starts: a bad certificate or a busy port is a plain ConfigError
        except BaseException:
            self._close_listeners()
            self._unlock()
            raise
        self.admin = AdminApi(AdminParts(
            self.registry, self.directory, self.management, self.downlink, self.presence, self.diagnostics,
            # (either DTLS layer: the admin summary reads sessions, offloaded, handshakes and the two
            # handshake counts, which EngineServer names as DtlsServer does)
            self.ingest, self.sink, cast("list[DtlsServer]", [t.dtls for t in self.transports if t.dtls is not None]),
            self.components,
            self.reload_registry,
            self.history,
        ))

    def new_endpoint(self, *, verified_peers: bool = False) -> Endpoint:
        return Endpoint(self.settings.endpoint_params(verified_peers=verified_peers))

    # -- SIGHUP ------------------------------------------------------------------------------------
    async def reload(self, new: Settings, *, quiet: bool = False) -> Report:
        """Apply what of `new` can change without dropping a device (corem/reload.py): the log
        level and format, the rate limit, the DTLS/TLS credentials (read again), the admin token and the
        registry (read again); the other changed settings are reported as needing a restart and
        keep their running values.  Logs the one line that says so, unless `quiet` (a worker: the
        supervisor says it for all).  One reload at a time."""
        async with self._reload_settings:
            old, report = self.settings, Report()
            keys = changed(old, new)
            taken: list[str] = []
            apply_log_level(old, new, report)
            apply_log_format(old, new, report)
            taken += [k for k in ("log_level", "log_format") if k in keys]
            limiters = [t.edge.limiter for t in self.transports
                        if isinstance(t.edge, UdpEdge) and isinstance(t.edge.limiter, SourceLimiter)]
            lanes = [t.lane for t in self.transports if t.lane is not None and t.lane.rate_limited]
            taken += apply_limits(old, new, limiters, lanes, report)
            if any(getattr(s, k) for s in (old, new) for k in ("dtls_cert", "dtls_key", "dtls_ca")):
                try:
                    swaps = self._credentials(new)
                except (ValueError, OSError) as e:
                    report.failed.append(f"dtls credentials ({e})")
                else:
                    for swap in swaps:
                        swap()
                    if swaps:  # (no CoAPS nor coaps+tcp listener: nothing uses them)
                        report.done.append("dtls credentials (dtls_cert, dtls_key, dtls_ca read again)")
                    taken += [k for k in ("dtls_cert", "dtls_key", "dtls_ca") if k in keys]
            if "admin_token" in keys or "admin_token_file" in keys:
                self.admin_token = new.admin_token or admin_token.read_or_create(new.data_path)
                if self.http is not None:
                    self.http.admin_token = self.admin_token
                report.done.append("admin_token")
                taken += ["admin_token", "admin_token_file"]
            await self.reload_registry()
            report.done.append("registry (read again)")
            report.restart += [k for k in restart_needed(keys) if k not in report.restart]
            self.settings = applied(old, new, taken)
            if not quiet:
                log.log(report.level, "%s", report.line())
            return report

    def _credentials(self, new: Settings) -> list[Callable[[], None]]:
        """The DTLS and TLS layers' new credentials, every file read and checked before any layer
        changes (ValueError or OSError: none does); `dtls_client_auth` stays as it runs."""
        params = dataclasses.replace(new, dtls_client_auth=self.settings.dtls_client_auth).dtls_params()
        auth = self.settings.dtls_client_auth
        swaps: list[Callable[[], None]] = []
        for t in self.transports:
            if isinstance(t.dtls, EngineServer):
                swaps.append(functools.partial(t.dtls.use, t.dtls.with_credentials(params, auth)))
            elif t.dtls is not None:
                raise ValueError("dtls_engine = mbedtls reads its credentials at start only: restart corem")
            tls = t.edge.tls if isinstance(t.edge, TcpEdge) else None
            if tls is not None:
                swaps.append(functools.partial(setattr, tls, "params", tls.with_credentials(params, auth)))
        return swaps

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal-watching task)."""
        self._stop.set()

    # -- HTTP routes -------------------------------------------------------------------------
    def components(self) -> Iterator[tuple[Measured, dict[str, str]]]:
        """Everything that counts, with the labels of where it is mounted (corem/metrics.py)."""
        for t in self.transports:
            for c in t.components():
                yield c, {"transport": t.name}
            if t.dtls is not None:
                yield t.dtls, {}
        parts: list[Measured | None] = [self.ingest, self.sink, self.pruner, self.recovery, self.command_reader,
                                        self.presence, self.downlink,
                                        self.oscore, self.emqx, self.thingsboard, self.efento, self.http, self.directory,
                                        self.diagnostics]
        for part in parts:
            if part is not None:
                yield part, {}
        yield BuildInfo(), {}
        yield self.process, {}
        yield self, {}

    def metrics(self) -> Iterator[Sample]:
        """The server's own: whether its bus is reachable now, as /readyz judges it."""
        yield gauge("corem_bus_not_ready", float(self.sink.probe() is not None))

    async def _totals(self) -> dict[Hashable, Totals]:
        """What the UI's charts sample (corem/admin/history.py): this process's counters."""
        return {"": Totals.of(gather(self.components()))}

    def _metrics(self, req: HttpRequest) -> Reply:
        return Reply(200, render(self.components), "text/plain; version=0.0.4; charset=utf-8")

    def _healthz(self, req: HttpRequest) -> Reply:
        return Reply(200, b"ok\n", "text/plain")

    def _readyz(self, req: HttpRequest) -> Reply:
        """Ready: every listener bound and the bus reachable, by the sink's own view (librdkafka's
        broker states and errors; the embedded bus's last write)."""
        if not self._ready:
            return Reply(503, b"starting\n", "text/plain")
        bus = self.sink.probe()
        problems = ([f"bus: {bus}"] if bus is not None else []) + [
            f"dtls session store: {t.dtls.store.last_error}"  # (the data dir's disk, as a rule)
            for t in self.transports if t.dtls is not None and t.dtls.store.last_error]
        if problems:
            return Reply(503, "".join(p + "\n" for p in problems).encode(), "text/plain")
        return Reply(200, b"ready\n", "text/plain")

    def http_routes(self) -> list[Route]:
        ops = [Route("GET", path, fn, auth=False, doc={"id": op, "tag": "operations", "summary": summary,
                                                        "content": "text/plain", "error_content": "text/plain",
                                                        "errors": errors})
               for path, fn, op, summary, errors in (
            ("/metrics", self._metrics, "getMetrics", "Prometheus metrics (text exposition format 0.0.4)", {}),
            ("/healthz", self._healthz, "getHealth", "Alive: answers while the process runs", {}),
            ("/readyz", self._readyz, "getReadiness", "Ready: every listener bound and the bus reachable",
             {503: ("Starting, or what is not ready, one line each (e.g. the bus)", str)}),
        )]
        self.admin.documented = ops  # (the OpenAPI document lists them)
        if self.worker is not None:  # for the supervisor's front (corem/workers/front.py)
            ops.append(Route("GET", "/_worker/metrics", self._worker_metrics))
        if self.registry.shared:  # for the other nodes' commands readers
            ops.append(self.cluster.node_route())
        routes = self.admin.routes()
        if self.worker is None:  # (with workers, the supervisor's front routes between nodes)
            routes = self.cluster.routes(routes)
        return ops + routes

    def _worker_metrics(self, req: HttpRequest) -> Reply:
        from .workers.front import encode_samples

        return json_reply(encode_samples(gather(self.components())))

    def _unlock(self) -> None:
        datadir.release(self._lock)
        self._lock = -1

    def carry_out(self, record: CommandRecord) -> None:
        """A commands record the supervisor routed here (corem/workers/link.py)."""
        self.cluster.carry_out(record)

    # -- lifecycle ---------------------------------------------------------------------------
    def _bind(self) -> None:
        s = self.settings
        coap = s.listener("coap")
        if coap is not None:
            endpoint, router = self.new_endpoint(), self._router()
            lane = self._fast_lane(endpoint, behind_dtls=False)
            observers = self._observers(endpoint)
            edge = UdpEdge(
                self._socket("coap", coap), endpoint, router, security=PlainUdp(self._names_a_known_token),
                max_datagram=s.max_datagram, limiter=self._limiter(), lane=lane, after_drain=self.sink.after_drain,
                on_event=observers.handle,
            )
            self.bound.coap = edge.address
            self._add_transport(Transport("udp", endpoint, router, observers, edge, lane=lane), identity(None))
        coaps = s.listener("coaps")
        if coaps is not None:
            endpoint, router = self.new_endpoint(verified_peers=True), self._router()
            endpoint.transport = "dtls"  # (named so in bus records: corem/bus/recovery.py)
            lane = self._fast_lane(endpoint, behind_dtls=True)
            try:
                dtls = self._dtls(endpoint, lane)
            except (ValueError, OSError) as e:
                raise ConfigError(f"dtls: {e}") from None
            observers = self._observers(endpoint)
            edge = UdpEdge(
                self._socket("coaps", coaps), endpoint, router, security=dtls, max_datagram=s.max_datagram,
                limiter=self._limiter(), lane=lane, after_drain=self.sink.after_drain, on_event=observers.handle,
            )
            self.bound.coaps = edge.address
            self._add_transport(Transport("dtls", endpoint, router, observers, edge, dtls, lane), identity(dtls.device))
        for key, name in (("coap_tcp", "tcp"), ("coaps_tcp", "tls")):
            address = s.listener(key)
            if address is not None:
                self._bind_tcp(key, name, address)

    def _bind_tcp(self, key: str, name: str, address: tuple[str, int]) -> None:
        """CoAP over TCP, or over TLS with the DTLS listener's credentials (RFC 8323)."""
        s = self.settings
        tls_server = None
        if name == "tls":
            try:
                tls_server = Tls(self.directory.psk_device, s.dtls_params(), self.directory.cert_device,
                                 client_auth=s.dtls_client_auth)
            except (ValueError, OSError) as e:
                raise ConfigError(f"{key}: {e}") from None
        endpoint, router = StreamEndpoint(), self._router()
        observers = self._observers(endpoint)
        sock = self.worker.socket(key) if self.worker is not None else None
        if sock is None:
            try:
                sock = bind_tcp(*address)
            except OSError as e:
                raise ConfigError(f"{key}: cannot listen on tcp {address[0]}:{address[1]}: {e.strerror}") from None
        edge = TcpEdge(sock, endpoint, router, observers, s.tcp_params(), tls_server=tls_server,
                       after_dispatch=self.sink.after_drain)
        setattr(self.bound, key, edge.address)
        self._add_transport(Transport(name, endpoint, router, observers, edge),
                            identity(edge.device if tls_server is not None else None))

    def _socket(self, key: str, address: tuple[str, int]) -> socket.socket:
        """The listener's socket: bound here, or a worker's, inherited from the supervisor."""
        inherited = self.worker.socket(key) if self.worker is not None else None
        return inherited if inherited is not None else _bind_or_explain(key, *address)

    def _observers(self, endpoint: Endpoint) -> Observers:
        s = self.settings
        return Observers(endpoint, max_total=s.max_observers, max_per_resource=s.max_observers_per_resource,
                         max_per_source=s.max_observers_per_source)

    def _router(self) -> Router:
        s = self.settings
        router = Router(Block1Uploads(max_transfers=s.max_uploads, max_body=s.max_upload_size))
        router.unwrap = self.oscore.unwrap  # OSCORE on every transport (RFC 8613 allows it inside DTLS too)
        return router

    def _add_transport(self, t: Transport, session: Callable[[Request], Device | None]) -> None:
        """Mount every door on the transport's router; `session` names a request's device."""
        t.endpoint.clock = trio.current_time  # (the edges' clock: receive-to-answer durations, corem/latency.py)
        self.ingest.install(t.router, session_device=session)
        self.thingsboard.install(t.router, t.observers, session)
        self.drogue.install(t.router, session)
        self.emqx.install(t.router, t.observers, session)
        self.efento.install(t.router, session)
        self.downlink.observers.append(t.observers)
        discovery.install(t.router)
        self.site.mount(t.router, t.observers)
        self.transports.append(t)

    def _dtls(self, endpoint: Endpoint, lane: FastLane | None) -> DtlsServer | EngineServer:
        s = self.settings

        def new_session(peer: Hashable, now: float) -> None:
            """A handshake completed: the peer's message IDs are scoped to its new session."""
            endpoint.new_session(peer, now)
            if lane is not None:
                lane.new_session(peer, now)

        def moved(old: Hashable, new: Hashable, now: float) -> None:
            """A session moved to a new address by its Connection ID (RFC 9146 §6): message IDs at
            that address are its own from now on (not a duplicate of what another device, or a NAT's
            earlier mapping, sent from there), and the endpoint follows it (what it owes the old
            address goes to the new; a retransmission from the new one is a duplicate)."""
            new_session(new, now)
            endpoint.moved(old, new, now)
            if lane is not None:
                lane.moved(old, new, now)

        if s.dtls_engine == "corem":
            store = self._session_store()
            engine = EngineServer(
                self.directory.psk_device, s.dtls_params(), cert_lookup=self.directory.cert_device,
                state_key=load_state_key(s.dtls_state_key, None if store.shared else s.data_path),
                store=store, device_lookup=self.directory.named, on_new_session=new_session,
                on_moved=moved,
                client_auth=s.dtls_client_auth,
                # with workers, CIDs name this worker: its records come here from any address
                cid_prefix=steer.cid_prefix(self.worker.index, self.worker.count) if self.worker and self.worker.steered
                else b"",
            )
            if engine.offloaded:
                log.info("%d DTLS sessions waiting in %s from before", len(engine.offloaded), datadir.SESSIONS_FILE)
            # the marks of the lane's readings written by the embedded bus just before it commits them
            engine.defer_marks(self.sink)
            return engine
        # python-mbedtls's engine (optional, deprecated: Mbed TLS 2.28 is out of support), imported
        # only when chosen (Settings.check made sure it is installed)
        from .dtls.server import DtlsServer, PskStore

        log.warning("dtls_engine = mbedtls: CoAPS runs on Mbed TLS 2.28 (python-mbedtls), out of support since "
                    "the end of 2024 and to be removed; dtls_engine = corem is the default")
        dtls = DtlsServer(
            PskStore(self.directory.psk_device),
            s.dtls_params(),
            cert_lookup=self.directory.cert_device,
            store=self._session_store(),
            device_lookup=self.directory.named,
            on_new_session=new_session,
        )
        if dtls.offloaded:
            log.info("%d DTLS sessions waiting in %s from before", len(dtls.offloaded), datadir.SESSIONS_FILE)
        return dtls

    def _session_store(self) -> SessionStore:
        where = self.settings.dtls_session_store
        try:
            return SessionStore(where or datadir.sessions_path(self.settings))
        except Exception as e:  # psycopg's OperationalError: the database is not there
            if not where:
                raise
            raise ConfigError(f"dtls_session_store: cannot use {_redacted(where)}: {e}") from None

    def _close_listeners(self) -> None:
        for t in self.transports:
            t.edge.close()

    def _names_a_known_token(self, data: bytes, peer: Hashable) -> bool:
        """Over its source's rate: does this datagram name its device by a known token in its path
        (`/api/v1/{token}/...`)?  Then it goes through (net/limits.py; the fast lane does the same)."""
        try:
            msg = decode(data)
        except MessageFormatError:
            return False
        path = [bytes(v) for n, v in msg.options if n == OptionNumber.URI_PATH][:3]
        if len(path) < 3 or path[0] != b"api" or path[1] != b"v1":
            return False
        return self.directory.knows_token(path[2])

    def _limiter(self) -> SourceLimiter | None:
        s = self.settings
        if not s.rate_limit_per_source:
            return None
        return SourceLimiter(s.rate_limit_per_source, max_sources=s.rate_limit_sources,
                             exempt_networks=s.exempt_networks())

    def _fast_lane(self, endpoint: Endpoint, *, behind_dtls: bool) -> FastLane | None:
        s = self.settings
        if s.fast_lane == "off":
            return None
        if Lane is None:
            log.warning("fast_lane: the C lane is not built (no C compiler at install?); serving CoAP in Python")
            return None
        # behind DTLS the edge reads the socket and rate-limits the records, not the lane
        return FastLane(self.ingest, self.sink, endpoint, max_datagram=s.max_datagram,
                        rate=0.0 if behind_dtls else s.rate_limit_per_source, max_sources=s.rate_limit_sources,
                        exempt=lane_networks(s.exempt_networks()))

    def _after_batch(self) -> None:
        for t in self.transports:
            t.edge.flush()

    async def run(self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        self.directory.refresh()
        http_addr = s.listener("http")
        http = None
        try:
            if http_addr is not None:
                http = HttpServer(self.http_routes(), admin_token=self.admin_token, max_body=s.admin_max_body,
                                  access_log=self.worker is None)  # (with workers, the front logs each request)
                self.bound.http = await bind_http(http, *http_addr)
                self.http = http
            if self.registry.shared and (s.node_url or self.bound.http is not None):
                node = s.node_url or f"http://{url_host(self.bound.http)}"  # type: ignore[arg-type]
                self.cluster.join(self.registry.db, node)
            streams = [t.edge for t in self.transports if isinstance(t.edge, TcpEdge)]
            await self._recover_exchanges()  # before the UDP edges read a datagram
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
                    inner.start_soon(self._poll_registry)
                    if self.registry.shared:
                        inner.start_soon(self._listen_registry)
                    await inner.start(self.cluster.run)
                    if self.link is None:  # workers: the supervisor answers nudges and relays them
                        await inner.start(registry_nudge.serve, s.data_path, self._registry_changed)
                    inner.start_soon(self._sweep_presence)
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
                    self._ready = True
                    log.info("started", extra=fields(**{k: v for k, v in vars(self.bound).items() if v is not None},
                                                     data_dir=s.data_dir))
                    task_status.started(self.bound)
                    if self.link is not None:
                        inner.start_soon(self.link.run, self.bound.http)
                    await self._stop.wait()
                    log.info("stopping: no new datagrams; committing and answering in-flight readings")
                    self._ready = False
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
            self._close_listeners()
            self.directory.close()
            self.registry.close()
            self._unlock()
            (log if self.worker is not None else logging.getLogger(SERVE)).info("stopped")  # (corem/logs.py)

    async def _recover_exchanges(self) -> None:
        """Exactly once across a crash: the exchanges of the readings the bus committed within
        EXCHANGE_LIFETIME (newest first, at most the dedup map's capacity) go into each UDP
        transport's dedup map -- the lane's, which sees every datagram first, or the endpoint's --
        so that a device retransmitting a CON whose 2.04 died with the last process gets its 2.04
        and no second point (corem/bus/recovery.py).  With workers, only the peers steered here.
        A bus that cannot be read is logged and counted, and corem starts anyway."""
        udp = {t.name: t for t in self.transports if isinstance(t.edge, UdpEdge)}
        if not udp:
            return
        p = self.settings.endpoint_params()
        keep = None  # (where the kernel's hash steers, any peer may be this worker's: all are kept)
        if self.worker is not None and self.worker.count > 1 and self.worker.steered:
            from .workers.steer import worker_for

            index, count = self.worker.index, self.worker.count
            keep = lambda peer: worker_for(peer, count) == index  # noqa: E731
        since_ms = int((time.time() - p.exchange_lifetime) * 1000)
        sink = self.sink
        try:
            if isinstance(sink, EmbeddedBus):
                found = await trio.to_thread.run_sync(
                    lambda: recover_embedded(sink.path, since_ms, p.dedup_max_entries, keep=keep))
            elif isinstance(sink, KafkaSink):
                found = await trio.to_thread.run_sync(
                    lambda: recover_kafka(sink.settings, since_ms, p.dedup_max_entries, keep=keep))
            else:
                return
        except Exception as e:  # noqa: BLE001 - the bus's own errors: serve anyway, said and counted
            self.recovery.failures += 1
            log.warning("could not read back the exchanges of committed readings from the bus (%s): starting "
                        "without them; a retransmission of a reading committed before the stop may be stored "
                        "twice", e)
            return
        now, wall_ms = trio.current_time(), time.time() * 1000
        for name, keys in found.keys.items():
            t = udp.get(name)
            if t is None:
                continue
            remember = t.lane.remember if t.lane is not None else t.endpoint.remember
            for peer, mid, at_ms in keys:  # oldest first, on this process's clock
                remember(peer, mid, now - max(0.0, (wall_ms - at_ms) / 1000))
        self.recovery.records = found.records  # (the keys: corem_coap_dedup_recovered, the dedup maps')
        if found.error is not None:
            self.recovery.failures += 1
            log.warning("read back only part of the exchanges of committed readings (%s)", found.error)
        log.info("recovered %d exchanges of committed readings from %d records in %.2f s",
                 found.total(), found.records, found.seconds,
                 extra=fields(exchanges=found.total(), records=found.records, seconds=round(found.seconds, 3)))

    async def _tick_downlink(self) -> None:
        n = 0
        while True:
            await trio.sleep(DOWNLINK_TICK)
            self.downlink.tick(trio.current_time())
            n += 1
            if n % 100 == 0:
                self.emqx.sweep()

    async def _sweep_presence(self) -> None:
        await self.presence.run(trio.current_time)

    async def _poll_registry(self) -> None:
        """The fallback for writers that do not nudge (registry_nudge): another process, a tool."""
        every = REGISTRY_POLL_SHARED if self.registry.shared else REGISTRY_POLL
        while True:
            await trio.sleep(every)
            await self._registry_changed()

    async def _listen_registry(self) -> None:
        """A PostgreSQL registry: reload at each NOTIFY (a change by another node, the CLI, or an
        admin API), in a thread of its own; the poll stays as the fallback."""
        stopping = False

        def run() -> None:
            for _ in listen(self.settings.registry, lambda: trio.from_thread.run(self._registry_changed),
                            lambda: stopping):
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

    async def reload_registry(self) -> None:
        """After a change on the server's own registry connection (the admin API), which
        `data_version` does not count: reload now, off the event loop."""
        await self._registry_changed(force=True)

    async def _registry_changed(self, force: bool = False) -> None:
        """Apply the registry's changes without a pause in serving: the changed rows are read in
        a worker thread and applied on the event loop a batch at a time (registry/directory.py);
        the ingest's targets and the lanes' tables of the devices changed are made again as they
        next talk.  One update at a time."""
        await self.directory.update(force)
