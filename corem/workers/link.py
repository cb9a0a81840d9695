"""A worker's side of `corem serve --workers N`: what it inherits and what it tells the supervisor.

A worker is a whole corem `Server` on sockets it inherits (the supervisor binds them, so they and
their queued datagrams outlive the worker) and with its admin HTTP on a private loopback port that
only the supervisor's front uses.  Between the two runs one SOCK_SEQPACKET pair, one typed message
per packet (control.py lists them).

If the supervisor goes away (its end of the pair closes) the worker stops as on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import trio

from ..cluster import CommandRecord
from ..config import ConfigError, Settings
from . import control
from .control import (
    Adopt, Command, Handover, Here, Moved, Ready, Refresh, Refreshed, Reload, Reloaded, RpcReplied, RpcReply,
)

if TYPE_CHECKING:
    from ..devices.downlink import Downlink
    from ..reload import Report
    from ..registry import Device, Directory


class Served(Protocol):
    """What the link needs of its worker's server (corem.server.Server)."""

    downlink: Downlink
    directory: Directory

    def stop(self) -> None: ...
    def reload_registry(self) -> Awaitable[None]: ...
    def reload(self, new: Settings, *, quiet: bool = False) -> Awaitable[Report]: ...
    def carry_out(self, record: CommandRecord) -> None: ...

log = logging.getLogger("corem.worker")

#: the environment variable that carries a worker's spec
ENV = "COREM_WORKER"
#: how often a worker tells the supervisor of the devices it heard first (seconds)
ANNOUNCE_EVERY = 0.02
#: devices per "here" packet (a packet stays well under the socket's buffer)
ANNOUNCE_CHUNK = 2000
#: replies to another worker's RPCs waiting for its word, at most (the oldest then told "no"), and
#: how long one waits (seconds): a worker starting again lost its RPCs, so "no" is the truth then too
MAX_ASKED = 10_000
ASK_TIMEOUT = 10.0


@dataclass
class WorkerSpec:
    index: int
    count: int
    control: int  # fd of this worker's end of the pair
    #: "coap" / "coaps" -> fd of its UDP socket; "coap_tcp" / "coaps_tcp" -> the shared listening socket
    fds: dict[str, int] = field(default_factory=dict)
    #: peers are steered by corem's program (steer.worker_for names a peer's worker), not the
    #: kernel's hash: the worker keeps only its own peers' recovered exchanges (bus/recovery.py)
    steered: bool = True

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))

    def socket(self, listener: str) -> socket.socket | None:
        """The inherited socket of `listener` ("coap", "coaps", "coap_tcp", "coaps_tcp"), if this server has it."""
        fd = self.fds.get(listener)
        if fd is None:
            return None
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock


class Link:
    """The worker's end of the control pair."""

    def __init__(self, spec: WorkerSpec, server: Served) -> None:
        self.spec = spec
        self.server = server
        self.sock = trio.socket.from_stdlib_socket(socket.socket(fileno=spec.control))
        self._heard: list[tuple[str, str]] = []
        self._outbox: list[control.ToSupervisor] = []
        self._sending = trio.Lock()
        #: ask number -> (when asked, what to do with the RPC's worker's word): `ask_reply`
        self._asked: OrderedDict[int, tuple[float, Callable[[bool], None]]] = OrderedDict()
        self._ask = 0

    def first_sight(self, device: Device) -> None:
        """Downlink's hook: this device was heard here for the first time (sent in a batch)."""
        self._heard.append((device.tenant, device.device))

    def ask_reply(self, device: Device, rpc_id: int, response: Any, then: Callable[[bool], None]) -> None:
        """A device answered an RPC another worker numbered: pass it there, and `then(taken)` once
        that worker says whether an RPC of that id waited for this device. Found by an adversarial
        run: the reply was answered 2.04 at once, unchecked, where a single process
        answers 4.04 for an RPC that does not exist."""
        self._ask += 1
        self._asked[self._ask] = (trio.current_time(), then)
        while len(self._asked) > MAX_ASKED:
            _, (_, told) = self._asked.popitem(last=False)
            told(False)
        self.post(RpcReply((device.tenant, device.device), rpc_id, response, self.spec.index, self._ask))

    def _expire_asked(self) -> None:
        now = trio.current_time()
        while self._asked:
            n, (at, then) = next(iter(self._asked.items()))
            if now - at < ASK_TIMEOUT:
                break
            del self._asked[n]
            then(False)

    def to_workers(self, record: CommandRecord) -> None:
        """A commands record (worker 0 reads them): the supervisor gives it to the worker that
        holds its device (corem/cluster.py)."""
        self.post(Command.of(record))

    def post(self, message: control.ToSupervisor) -> None:
        """Send `message` soon (from synchronous code on the event loop)."""
        self._outbox.append(message)

    async def send(self, message: control.ToSupervisor) -> None:
        async with self._sending:
            await self.sock.send(control.encode(message))

    async def run(self, http: tuple | None) -> None:
        """Say ready, then announce and obey until cancelled or the supervisor goes."""
        await self.send(Ready(http[1] if http else None, os.getpid()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._announce)
            await self._obey()
            nursery.cancel_scope.cancel()

    async def _announce(self) -> None:
        while True:
            await trio.sleep(ANNOUNCE_EVERY)
            self._expire_asked()
            outbox, self._outbox = self._outbox, []
            for message in outbox:
                await self.send(message)
            while self._heard:
                chunk, self._heard = self._heard[:ANNOUNCE_CHUNK], self._heard[ANNOUNCE_CHUNK:]
                await self.send(Here(chunk))

    async def _reload(self, values: dict[str, Any]) -> dict[str, Any]:
        try:
            new = Settings.load(values, env={})
        except ConfigError as e:  # (a secret's file gone since the supervisor read it)
            return {"done": [], "restart": [], "failed": [str(e)]}
        return asdict(await self.server.reload(new, quiet=True))

    async def _obey(self) -> None:
        server = self.server
        while True:
            try:
                data = await self.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                log.warning("worker %d: the supervisor is gone; stopping", self.spec.index)
                server.stop()
                return
            try:
                message = control.to_worker(data)
            except control.Garbled as e:  # (a bug: said, and the worker goes on)
                log.error("worker %d: a message from the supervisor it does not take (%s)", self.spec.index, e)
                continue
            if isinstance(message, Refresh):
                await server.reload_registry()
                await self.send(Refreshed(message.n))
            elif isinstance(message, Reload):  # SIGHUP, passed on by the supervisor with the settings it read
                await self.send(Reloaded(message.n, await self._reload(message.settings)))
            elif isinstance(message, Moved):
                state = server.downlink.moved(*message.device)
                if state is not None:
                    await self.send(Handover(message.device, message.to, state))
            elif isinstance(message, Adopt):
                device = server.directory.named(*message.device)
                if device is not None:
                    server.downlink.adopt(device, message.state)
            elif isinstance(message, Command):
                server.carry_out(message.record())
            elif isinstance(message, RpcReply):
                device = server.directory.named(*message.device)
                taken = device is not None and server.downlink.reply(device, message.id, message.response)
                if message.asker is not None:
                    await self.send(RpcReplied(message.asker, message.ask, taken))
            elif isinstance(message, RpcReplied):
                asked = self._asked.pop(message.ask, None)
                if asked is not None:
                    asked[1](message.ok)
