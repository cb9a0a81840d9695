"""The peers' device APIs a server serves beside its own telemetry (corem/frontdoors/): the
ThingsBoard, Drogue, EMQX and Efento doors, made once and mounted on every transport's router."""

from __future__ import annotations

import trio

from .coap import Router
from .coap.observe import Observers
from .config import Settings
from .devices.downlink import Downlink
from .frontdoors.drogue import Drogue
from .frontdoors.efento import Efento
from .frontdoors.emqx import Emqx
from .frontdoors.thingsboard import ThingsBoard
from .ingest.telemetry import TelemetryIngest
from .registry import Directory
from .registry.management import Management
from .stats import Measured
from .identity import SessionDevice

#: downlink ticks between two sweeps of EMQX's expired retained messages
SWEEP_EVERY = 100


class Doors:
    def __init__(self, settings: Settings, directory: Directory, ingest: TelemetryIngest, management: Management,
                 downlink: Downlink) -> None:
        self.thingsboard = ThingsBoard(directory, ingest, management, downlink, trio.current_time,
                                       provision_rate_per_source=settings.provisioning_rate_per_source,
                                       provision_rate_per_key=settings.provisioning_rate_per_key)
        self.drogue = Drogue(directory, ingest, downlink, trio.current_time)
        self.emqx = Emqx(directory, ingest, downlink, trio.current_time, max_retained=settings.pubsub_max_retained,
                         max_retained_per_tenant=settings.pubsub_max_retained_per_tenant)
        self.efento = Efento(directory, ingest, management)
        self._ticks = 0

    def mount(self, router: Router, observers: Observers, session: SessionDevice) -> None:
        """Every door on a transport's router; `session` names a request's device."""
        self.thingsboard.install(router, observers, session)
        self.drogue.install(router, session)
        self.emqx.install(router, observers, session)
        self.efento.install(router, session)

    def components(self) -> list[Measured]:
        """The doors that count (corem/metrics.py)."""
        return [self.emqx, self.thingsboard, self.efento]

    def tick(self) -> None:
        """At each downlink tick (the server's): now and then, EMQX's expired retained messages go."""
        self._ticks += 1
        if self._ticks % SWEEP_EVERY == 0:
            self.emqx.sweep()
