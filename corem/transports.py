"""A server's transports, built from its settings: for each listener (coap, coaps, coap_tcp,
coaps_tcp) its socket (bound here, or a worker's, inherited: corem/listeners.py), message layer,
router, observers and edge -- with, on UDP, the per-source rate limit (Python's, or the C fast
lane's) and the lane itself, and for CoAPS the DTLS layer on its session store.  What is mounted
on each router is the server's `mount` (its doors); what runs is the server's.

Also what concerns every transport at once: the exchanges of committed readings read back into
their dedup maps at a start (`recover_exchanges`), the rate limits and credentials that a reload
changes in place (`limits`, `credential_swaps`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Hashable, Iterator

import trio

from . import datadir, listeners
from .bus import EmbeddedBus, Sink
from .bus.kafka import KafkaSink
from .bus.recovery import RecoveryStats, recover_embedded, recover_kafka
from .coap import Endpoint, Router
from .coap.blockwise import Block1Uploads
from .coap.endpoint import Request
from .identity import SessionDevice, session_identity
from .coap.response import Response
from .coap.observe import Observers
from .coap.stream import StreamEndpoint
from .config import ConfigError, Settings
from .dtls.layer import EngineServer, load_state_key
from .fastlane import FastLane, Lane
from .ingest.telemetry import TelemetryIngest
from .listeners import Bound
from .logs import fields
from .net import UdpEdge
from .net.busypoll import busy_poll
from .net.limits import SourceLimiter, lane_networks
from .net.security import PlainUdp
from .net.tcp import TcpEdge, Tls
from .registry import Device, Directory
from .stats import Measured
from .stores import session_store
from .workers import steer
from .workers.link import WorkerSpec

if TYPE_CHECKING:
    from .dtls.server import DtlsServer

log = logging.getLogger("corem")


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


class Transports:
    """The server's listeners, bound at construction (before Trio starts: a bad certificate or a
    busy port is a plain ConfigError, and nothing stays bound)."""

    def __init__(self, settings: Settings, worker: WorkerSpec | None, directory: Directory,
                 ingest: TelemetryIngest, sink: Sink, unwrap: Callable[[Request], Response | None],
                 mount: Callable[[Transport, SessionDevice], None]) -> None:
        """`unwrap`: OSCORE's, on every router; `mount`: the server's doors onto a transport."""
        self.settings, self.worker, self.directory, self.ingest, self.sink = settings, worker, directory, ingest, sink
        self.unwrap, self.mount = unwrap, mount
        self.all: list[Transport] = []
        self.bound = Bound()
        #: what the start read back from the bus for deduplication (`recover_exchanges`)
        self.recovery = RecoveryStats()
        try:
            self._bind()
        except BaseException:
            self.close()
            raise
        directory.listen(self.revoke)

    def revoke(self, names: Collection[tuple[str, str]] | None) -> None:
        """The registry changed these devices (None: any): the observations their doors made for
        them end where the device is gone or no longer grants them (corem/coap/observe.py)."""
        for t in self.all:
            t.observers.revoke(self._device, names)

    def _device(self, owner: Hashable) -> Device | None:
        assert isinstance(owner, tuple)  # (the doors' owners: (tenant, device))
        return self.directory.named(owner[0], owner[1])

    def __iter__(self) -> Iterator[Transport]:
        return iter(self.all)

    def __getitem__(self, index: int) -> Transport:
        return self.all[index]

    def __len__(self) -> int:
        return len(self.all)

    def close(self) -> None:
        for t in self.all:
            t.edge.close()

    def flush(self) -> None:
        """Send what every edge has ready (after a batch committed)."""
        for t in self.all:
            t.edge.flush()

    def streams(self) -> list[TcpEdge]:
        return [t.edge for t in self.all if isinstance(t.edge, TcpEdge)]

    # -- building --------------------------------------------------------------------------------
    def _bind(self) -> None:
        s = self.settings
        coap = s.listener("coap")
        if coap is not None:
            endpoint, router = Endpoint(s.endpoint_params()), self._router()
            lane = self._fast_lane(endpoint, behind_dtls=False)
            observers = self._observers(endpoint, router)
            # (over its source's rate, a datagram naming a known token still goes through)
            security = PlainUdp(self.ingest.identity.names_a_known_token)
            edge = UdpEdge(
                self._socket("coap", coap), endpoint, router, security=security, max_datagram=s.max_datagram,
                limiter=self._limiter(), lane=lane, after_drain=self.sink.after_drain, on_event=observers.handle,
            )
            self.bound.coap = edge.address
            self._add(Transport("udp", endpoint, router, observers, edge, lane=lane), session_identity(None))
        coaps = s.listener("coaps")
        if coaps is not None:
            endpoint, router = Endpoint(s.endpoint_params(verified_peers=True)), self._router()
            endpoint.transport = "dtls"  # (named so in bus records: corem/bus/recovery.py)
            lane = self._fast_lane(endpoint, behind_dtls=True)
            observers = self._observers(endpoint, router)
            try:
                dtls = self._dtls(endpoint, router, lane, observers)
            except (ValueError, OSError) as e:
                raise ConfigError(f"dtls: {e}") from None
            edge = UdpEdge(
                self._socket("coaps", coaps), endpoint, router, security=dtls, max_datagram=s.max_datagram,
                limiter=self._limiter(), lane=lane, after_drain=self.sink.after_drain, on_event=observers.handle,
                # (the deprecated mbedtls engine's flights are sent inside its binding: none to poll after)
                busy_poll=busy_poll(s.dtls_busy_poll_us, dtls.flights_sent) if isinstance(dtls, EngineServer) else None,
            )
            self.bound.coaps = edge.address
            self._add(Transport("dtls", endpoint, router, observers, edge, dtls, lane), session_identity(dtls.device))
        for key, name in (("coap_tcp", "tcp"), ("coaps_tcp", "tls")):
            address = s.listener(key)
            if address is not None:
                self._bind_tcp(key, name, address)

    def _add(self, t: Transport, session: SessionDevice) -> None:
        t.endpoint.clock = trio.current_time  # (the edges' clock: receive-to-answer durations, corem/latency.py)
        self.mount(t, session)
        self.all.append(t)

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
        observers = self._observers(endpoint, router)
        sock = self.worker.socket(key) if self.worker is not None else None
        if sock is None:
            sock = listeners.tcp(key, *address)
        edge = TcpEdge(sock, endpoint, router, observers, s.tcp_params(), tls_server=tls_server,
                       after_dispatch=self.sink.after_drain)
        setattr(self.bound, key, edge.address)
        self._add(Transport(name, endpoint, router, observers, edge),
                  session_identity(edge.device if tls_server is not None else None))

    def _socket(self, key: str, address: tuple[str, int]) -> socket.socket:
        """The listener's socket: bound here, or a worker's, inherited from the supervisor."""
        inherited = self.worker.socket(key) if self.worker is not None else None
        return inherited if inherited is not None else listeners.udp(key, *address)

    def _observers(self, endpoint: Endpoint, router: Router) -> Observers:
        s = self.settings
        return Observers(endpoint, max_total=s.max_observers, max_per_resource=s.max_observers_per_resource,
                         max_per_source=s.max_observers_per_source, max_per_owner=s.max_observers_per_device,
                         representations=router.representations)

    def _router(self) -> Router:
        s = self.settings
        router = Router(Block1Uploads(max_transfers=s.max_uploads, max_body=s.max_upload_size,
                                      max_per_source=s.max_uploads_per_source))
        router.unwrap = self.unwrap  # OSCORE on every transport (RFC 8613 allows it inside DTLS too)
        return router

    def _dtls(self, endpoint: Endpoint, router: Router, lane: FastLane | None,
              observers: Observers) -> DtlsServer | EngineServer:
        s, directory, worker = self.settings, self.directory, self.worker

        def new_session(peer: Hashable, now: float) -> None:
            """A handshake completed: the peer's message IDs are scoped to its new session, and the
            observations made at that address end -- they were another session's, maybe another
            device's (RFC 7252 §9.1.1: the DTLS session is the endpoint), and its downlink must not
            reach whoever handshakes there next (a NAT gives an address to another device)."""
            endpoint.new_session(peer, now)
            observers.forget(peer)
            router.uploads.forget(peer)  # (nor may it finish their uploads, or read the rest of
            router.representations.forget(peer)  # what they began to read: firmware, RPCs)
            if lane is not None:
                lane.new_session(peer, now)

        def moved(old: Hashable, new: Hashable, now: float) -> None:
            """A session moved to a new address by its Connection ID (RFC 9146 §6): message IDs at
            that address are its own from now on (not a duplicate of what another device, or a NAT's
            earlier mapping, sent from there), and the endpoint follows it (what it owes the old
            address goes to the new; a retransmission from the new one is a duplicate), and so do
            its observations (notifications go where the session is)."""
            new_session(new, now)
            endpoint.moved(old, new, now)
            observers.moved(old, new)
            if lane is not None:
                lane.moved(old, new, now)

        if s.dtls_engine == "corem":
            store = session_store(s)
            engine = EngineServer(
                directory.psk_device, s.dtls_params(), cert_lookup=directory.cert_device,
                state_key=load_state_key(s.dtls_state_key, None if store.shared else s.data_path),
                store=store, device_lookup=directory.named, on_new_session=new_session,
                on_moved=moved,
                client_auth=s.dtls_client_auth,
                # with workers, CIDs name this worker: its records come here from any address
                cid_prefix=steer.cid_prefix(worker.index, worker.count) if worker and worker.steered else b"",
            )
            if engine.offloaded:
                log.info("%d DTLS sessions waiting in %s from before", len(engine.offloaded), datadir.SESSIONS_FILE)
            # the marks of the lane's readings written by the embedded bus just before it commits them
            # (on Kafka, logged in the store's own file: what a run on the embedded bus left unread
            # in the data dir's bus file is folded first)
            engine.carry_marks(self.sink, bus=datadir.bus_path(s))
            directory.listen(engine.revoke)  # (a device removed, or its credentials changed: its sessions end)
            return engine
        # python-mbedtls's engine (optional, deprecated: Mbed TLS 2.28 is out of support), imported
        # only when chosen (Settings.check made sure it is installed)
        from .dtls.server import DtlsServer, PskStore

        log.warning("dtls_engine = mbedtls: CoAPS runs on Mbed TLS 2.28 (python-mbedtls), out of support since "
                    "the end of 2024 and to be removed; dtls_engine = corem is the default")
        dtls = DtlsServer(PskStore(directory.psk_device), s.dtls_params(), cert_lookup=directory.cert_device,
                          store=session_store(s), device_lookup=directory.named, on_new_session=new_session)
        if dtls.offloaded:
            log.info("%d DTLS sessions waiting in %s from before", len(dtls.offloaded), datadir.SESSIONS_FILE)
        return dtls

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

    # -- what a reload changes in place (corem/reload.py) -----------------------------------------
    def limits(self) -> tuple[list[SourceLimiter], list[FastLane]]:
        """The rate limits running: the Python limiters, and the C lanes that apply it themselves."""
        limiters = [t.edge.limiter for t in self.all
                    if isinstance(t.edge, UdpEdge) and isinstance(t.edge.limiter, SourceLimiter)]
        return limiters, [t.lane for t in self.all if t.lane is not None and t.lane.rate_limited]

    def credential_swaps(self, new: Settings) -> list[Callable[[], None]]:
        """The DTLS and TLS layers' new credentials, every file read and checked before any layer
        changes (ValueError or OSError: none does); `dtls_client_auth` stays as it runs."""
        auth = self.settings.dtls_client_auth
        params = dataclasses.replace(new, dtls_client_auth=auth).dtls_params()
        swaps: list[Callable[[], None]] = []
        for t in self.all:
            if isinstance(t.dtls, EngineServer):
                swaps.append(functools.partial(t.dtls.use, t.dtls.with_credentials(params, auth)))
            elif t.dtls is not None:
                raise ValueError("dtls_engine = mbedtls reads its credentials at start only: restart corem")
            tls = t.edge.tls if isinstance(t.edge, TcpEdge) else None
            if tls is not None:
                swaps.append(functools.partial(setattr, tls, "params", tls.with_credentials(params, auth)))
        return swaps

    # -- a start -----------------------------------------------------------------------------------
    async def recover_exchanges(self) -> None:
        """Exactly once across a crash: the exchanges of the readings the bus committed within
        EXCHANGE_LIFETIME (newest first, at most the dedup map's capacity) go into each UDP
        transport's dedup map -- the lane's, which sees every datagram first, or the endpoint's --
        so that a device retransmitting a CON whose 2.04 died with the last process gets its 2.04
        and no second point -- a request of that peer and message id with another token is a new
        one, served (a device that rebooted: corem/bus/recovery.py).  With workers, only the peers
        steered here.
        A bus that cannot be read is logged and counted, and corem starts anyway."""
        udp = {t.name: t for t in self.all if isinstance(t.edge, UdpEdge)}
        stats = self.recovery
        if not udp:
            return
        p = self.settings.endpoint_params()
        keep = None  # (where the kernel's hash steers, any peer may be this worker's: all are kept)
        worker = self.worker
        if worker is not None and worker.count > 1 and worker.steered:
            index, count = worker.index, worker.count
            keep = lambda peer: steer.worker_for(peer, count) == index  # noqa: E731
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
            stats.failures += 1
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
            for peer, mid, at_ms, token in keys:  # oldest first, on this process's clock
                remember(peer, mid, now - max(0.0, (wall_ms - at_ms) / 1000), token)
        stats.records = found.records  # (the keys: corem_coap_dedup_recovered, the dedup maps')
        if found.error is not None:
            stats.failures += 1
            log.warning("read back only part of the exchanges of committed readings (%s)", found.error)
        log.info("recovered %d exchanges of committed readings from %d records in %.2f s",
                 found.total(), found.records, found.seconds,
                 extra=fields(exchanges=found.total(), records=found.records, seconds=round(found.seconds, 3)))
