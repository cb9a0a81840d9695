"""Where a device is served, and carrying a request or a record there: the one home of that rule.

A device's downlink (an RPC, a command, attributes, a package) can only be carried out where the
device talks: its observations, its address, its DTLS session are there.  Two levels:

- **nodes** sharing a PostgreSQL registry (`Nodes`): the node that last heard the device first
  (registry/homes.py keeps `device_homes`).  An admin request or a `commands.{tenant}` record for
  a device another node holds is carried out there: the request forwarded to that node's admin
  URL, the record posted to its `POST /_node/commands/{tenant}`, once (`FORWARDED`: what a node
  was handed is served where it lands).  A node that does not answer leaves it here;
- **workers** of one `corem serve --workers N` (`Workers`, kept by the supervisor from its
  workers' announcements, corem/workers/link.py): the worker that last heard the device first.  A
  device nobody heard goes to worker 0, and is parked there: when another worker hears it, what
  worker 0 queued for it follows it (the supervisor's `moved`).

Who calls what:
- a `Server` (one process, or one worker) has a `Carrier`: it tells its first sights, wraps the
  admin API's device downlink routes (`routes`), takes the commands reader's records (`record`)
  and the other nodes' (`node_route`); a worker's records go to the supervisor (`to_workers`);
- the supervisor's admin front (corem/workers/front.py) asks `Nodes.elsewhere` and then
  `Workers.holder` for a device's request, and `command_device` for a node's record.

A commands record's device is read here only: `command_device`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from collections import Counter
from typing import Any, Callable, Mapping

import trio

from .admin.http import FORWARD_TIMEOUT, FORWARDED, HttpError, HttpRequest, Reply, Route, call, forward, json_reply
from .bus import topics
from .bus.base import Sink, publish_json
from .bus.commands import KafkaCommandReader
from .config import Settings
from .devices.commands import apply as apply_command
from .devices.commands import request_of
from .devices.requests import RpcRequest
from .devices.downlink import Downlink, results_topic
from .errors import BadInput, StorageUnavailable
from .inputs import check
from .registry import Device, Directory
from .registry.db import Db, Lease
from .registry.homes import Homes
from .registry.management import Management

log = logging.getLogger("corem.cluster")

#: (tenant, device)
Key = tuple[str, str]

#: the admin routes that reach a device, which only the node holding it can carry out
DOWNLINK_ROUTES = {("PUT", "attributes"), ("POST", "rpc"), ("POST", "commands"), ("PUT", "firmware"),
                   ("PUT", "software")}
#: the route by which another node hands this one a commands record for a device it holds
NODE_COMMANDS = "/_node/commands/{tenant}"


def is_downlink(route: Route) -> bool:
    """One of the admin API's routes that reaches a device (DOWNLINK_ROUTES)."""
    return (route.pattern.startswith("/api/devices/{tenant}/{device}/")
            and (route.method, route.pattern.rsplit("/", 1)[-1]) in DOWNLINK_ROUTES)


def command_device(tenant: str, value: bytes) -> Key | None:
    """The device a commands.{tenant} record's value names; None if it names none (any worker
    or node answers it: the result says what is wrong)."""
    try:
        device = request_of(value).get("device")
    except BadInput:
        return None
    return (tenant, device) if isinstance(device, str) else None


class Nodes:
    """This node among the nodes sharing a PostgreSQL registry: which one holds a device, and
    carrying a request or a record there."""

    def __init__(self, db: Db, node: str) -> None:
        """`node`: this node's admin URL, as the other nodes reach it."""
        self.homes = Homes(db, node)
        self.node = node

    def heard(self, tenant: str, device: str) -> None:
        self.homes.heard(tenant, device)

    async def run(self) -> None:
        await self.homes.run()

    def elsewhere(self, key: Key, headers: Mapping[str, str] | None = None) -> str | None:
        """The admin URL of the node that holds the device, if another; None for this node or a
        request another node already passed on (`headers` with FORWARDED)."""
        if headers is not None and FORWARDED in headers:
            return None
        return self.homes.elsewhere(*key)

    async def forward(self, home: str, req: HttpRequest) -> Reply:
        """`req` carried out at `home` (marked as passed on: it stays there), waited for as long as
        it may take there (`downlink_wait`)."""
        return await forward(home, req, node=self.node, timeout=downlink_wait(req))

    async def command(self, home: str, tenant: str, value: bytes, token: str) -> dict[str, Any] | None:
        """A commands record carried out at `home`: its result, or None if that node refused it
        (OSError, HttpError, trio.TooSlowError or ValueError: it did not answer, or not in JSON)."""
        reply = await call(home, "POST", NODE_COMMANDS.format(tenant=tenant), value,
                           {"authorization": f"Bearer {token}", FORWARDED: self.node})
        result = json.loads(reply.body) if reply.status == 200 else None
        if result is not None and not isinstance(result, dict):
            raise ValueError(f"{home} answered a commands record with {type(result).__name__}, not an object")
        return result


def rpc_timeout(body: bytes) -> float:
    """An RPC request's timeout, by the API's own rules (RpcRequest's, its default included); 0 for
    a body the worker will refuse (it says why)."""
    try:
        return float(check(RpcRequest, json.loads(body)).timeout)
    except (ValueError, RecursionError):  # (BadInput too)
        return 0.0


def downlink_wait(req: HttpRequest) -> float:
    """How long a node waits for another to carry out `req`: an RPC is answered when it ends --
    its own timeout (up to 300 s) and some; anything else FORWARD_TIMEOUT.  (A fixed 90 s gave up
    on a longer RPC, which then ran again here: found by a review.)"""
    if req.method == "POST" and req.path.rstrip("/").endswith("/rpc"):
        return max(FORWARD_TIMEOUT, rpc_timeout(req.body) + 30.0)
    return FORWARD_TIMEOUT


class Workers:
    """Which worker of this node holds each device (the supervisor's): the one that last said it
    heard the device first; devices nobody heard, parked on worker 0."""

    def __init__(self) -> None:
        self.homes: dict[Key, int] = {}
        #: devices not heard by any worker when a downlink came for them: it went to worker 0
        self.parked: set[Key] = set()
        #: devices an RPC waits to hear from (the front parks RPCs for devices nobody heard)
        self._waiters: dict[Key, trio.Event] = {}
        self._waiting: Counter[Key] = Counter()  # (how many wait on each waiter)

    def holds(self, key: Key) -> bool:
        """Some worker of this node heard the device."""
        return key in self.homes

    def holder(self, key: Key | None, *, park: bool) -> int:
        """The worker that holds the device; worker 0 for one nobody heard (with `park`, it is
        remembered, so that what worker 0 queues follows the device when another worker hears it)."""
        if key is None:
            return 0
        index = self.homes.get(key)
        if index is None:
            if park:
                self.parked.add(key)
            return 0
        return index

    def arrived(self, key: Key, index: int) -> int | None:
        """Worker `index` heard the device first; returns the worker that held it before, if
        another (it must hand over what it queued for the device)."""
        before = self.homes.get(key)
        self.homes[key] = index
        if before is None and key in self.parked:
            self.parked.discard(key)
            before = 0
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.set()
        return before if before is not None and before != index else None

    async def until_heard(self, key: Key, timeout: float) -> None:
        """Until a worker hears the device, or `timeout` seconds (the device's waiter is let go of
        when the last one waiting gives up: none is kept for a device never heard)."""
        waiter = self._waiters.setdefault(key, trio.Event())
        self._waiting[key] += 1
        try:
            with trio.move_on_after(timeout):
                await waiter.wait()
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
                if self._waiters.get(key) is waiter:
                    del self._waiters[key]


@dataclasses.dataclass
class CommandRecord:
    """A commands.{tenant} record on its way to where its device is served."""

    topic: str
    partition: int
    offset: int
    value: bytes

    @property
    def tenant(self) -> str:
        return topics.commands_tenant(self.topic)

    def device(self) -> Key | None:
        return command_device(self.tenant, self.value)


class Carrier:
    """A server's part of the cluster: its first sights told, and its device downlink -- admin
    requests and commands records -- carried out where the device is served."""

    def __init__(self, directory: Directory, downlink: Downlink, management: Management, sink: Sink,
                 token: Callable[[], str], *, to_workers: Callable[[CommandRecord], None] | None = None,
                 tell_workers: Callable[[Device], None] | None = None) -> None:
        """`token`: the admin token now (it may be reloaded); `to_workers`: in a worker, hand a
        record to the supervisor, which gives it to the worker holding its device; `tell_workers`:
        in a worker, the supervisor hears of this worker's first sights."""
        self.directory, self.downlink, self.management, self.sink = directory, downlink, management, sink
        self.token = token
        self.to_workers = to_workers
        self.tell_workers = tell_workers
        #: the other nodes (a shared registry), once this node's admin URL is known (`join`)
        self.nodes: Nodes | None = None
        self._nursery: trio.Nursery | None = None  # for records carried to other nodes
        if tell_workers is not None:
            downlink.on_first_sight = self.first_sight

    def reader(self, settings: Settings, worker: int, tenants: Callable[[], set[str]], *,
               shared: bool) -> KafkaCommandReader | None:
        """The reader of downlink requests from other systems on `commands.{tenant}`: Kafka only
        (the embedded bus has no other writers; there the admin API and CLI are the way in); with
        workers, worker 0's (the supervisor hands each record to the worker that holds its device);
        with nodes, the one whose lease on the registry is held."""
        if settings.bus == "embedded" or worker:
            return None
        return KafkaCommandReader(settings.kafka_settings(), tenants, self.management.positions, self.record,
                                  refresh=settings.kafka_commands_refresh,
                                  leader=Lease(settings.registry).held if shared else None)

    def join(self, db: Db, node: str) -> Nodes:
        """Nodes sharing the registry `db`: this one is `node` (its admin URL)."""
        self.nodes = Nodes(db, node)
        self.downlink.on_first_sight = self.first_sight
        return self.nodes

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the first sights for the other nodes; carry records to them in the background."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.nodes is not None:
                nursery.start_soon(self.nodes.run)
            task_status.started()
            await trio.sleep_forever()

    def first_sight(self, device: Device) -> None:
        """A device heard here for the first time: the supervisor (workers) and the other nodes
        (a shared registry) are told, so that its downlink comes here."""
        if self.tell_workers is not None:
            self.tell_workers(device)
        if self.nodes is not None:
            self.nodes.heard(device.tenant, device.device)

    # -- admin requests --------------------------------------------------------------------------
    def routes(self, routes: list[Route]) -> list[Route]:
        """The admin API's routes, a device's downlink carried out at the node that holds it."""
        return [self.at_home(r) if is_downlink(r) else r for r in routes]

    def at_home(self, route: Route) -> Route:
        """A device's downlink route that another node may have to carry out: the one that holds
        the device.  Forwarded once; a node that does not answer leaves it here, as if the
        device were unknown."""
        handler = route.handler

        async def at_home(req: HttpRequest) -> Reply:
            nodes = self.nodes
            key = (req.params["tenant"], req.params["device"])
            home = nodes.elsewhere(key, req.headers) if nodes is not None else None
            if home is not None:
                assert nodes is not None
                try:
                    return await nodes.forward(home, req)
                except trio.TooSlowError:  # (it may be carrying it out: not here too, a second time)
                    log.warning("downlink for %s/%s: its node %s did not answer in time", *key, home)
                    return json_reply({"error": f"device {key[0]}/{key[1]}: its node {home} did not answer in "
                                                f"time; the request may have been carried out there"}, 504)
                except (OSError, HttpError) as e:
                    log.warning("downlink for %s/%s: its node %s did not answer (%s); kept here", *key, home, e)
            reply = handler(req)
            return await reply if inspect.isawaitable(reply) else reply

        return dataclasses.replace(route, handler=at_home)

    def node_route(self) -> Route:
        """`POST /_node/commands/{tenant}`: another node's commands reader hands over a record
        for a device this node holds."""
        return Route("POST", NODE_COMMANDS, self._node_command)

    def _node_command(self, req: HttpRequest) -> Reply:
        return json_reply(apply_command(req.params["tenant"], req.body, self.directory, self.downlink,
                                        self.management))

    # -- commands records ------------------------------------------------------------------------
    def record(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        """The commands reader's record: carried out at the node that holds its device, else
        (a worker) at the worker that does, else here."""
        record = CommandRecord(topic, partition, offset, value)
        if self._to_other_node(record):
            return
        if self.to_workers is not None:
            self.to_workers(record)
            return
        self.carry_out(record)

    def carry_out(self, record: CommandRecord) -> None:
        """Apply a record here (its device is served here, or nowhere) and publish its result."""
        self._done(record, apply_command(record.tenant, record.value, self.directory, self.downlink,
                                         self.management))

    def _to_other_node(self, record: CommandRecord) -> bool:
        if self.nodes is None or self._nursery is None:
            return False
        key = record.device()
        home = self.nodes.elsewhere(key) if key is not None else None
        if home is None:
            return False
        self._nursery.start_soon(self._carry_to, home, record)
        return True

    async def _carry_to(self, home: str, record: CommandRecord) -> None:
        assert self.nodes is not None
        try:
            result = await self.nodes.command(home, record.tenant, record.value, self.token())
        except (OSError, HttpError, trio.TooSlowError, ValueError) as e:
            log.warning("commands: %s did not take %s[%d]@%d (%s); carried out here", home, record.topic,
                        record.partition, record.offset, e)
            result = None
        if result is None:
            self.carry_out(record)
        else:
            self._done(record, result)

    def _done(self, record: CommandRecord, result: dict[str, Any]) -> None:
        """Publish a record's result on commands.results.{tenant} and move past it."""
        topic, partition, offset = record.topic, record.partition, record.offset
        result.update(at=int(time.time() * 1000), source={"topic": topic, "partition": partition, "offset": offset})
        publish_json(self.sink, results_topic(record.tenant), result.get("device") or "", result)
        try:
            self.management.set_position(topic, partition, offset + 1)
        except StorageUnavailable as e:  # the position is kept at the next write that works
            log.warning("could not store the position of %s[%d] (%s): after a restart it is read again",
                        topic, partition, e)
        if result["status"] == "rejected":
            log.info("rejected a downlink request from %s[%d]@%d: %s", topic, partition, offset, result["reason"])
