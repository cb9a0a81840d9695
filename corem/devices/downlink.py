"""Downlink: what the platform sends to devices — shared attributes, RPC requests, commands.

Delivery rides on Observe (a device observing its `attributes` or `rpc` resource gets a
notification) or, Drogue-style, on the response to a request that waits `ct` seconds.

Sleeping devices (PSM, ThingsBoard's power modes): a device registered with power mode `psm` is
reachable only for `psm_activity_timer` seconds after it last talked.  What is sent while it sleeps
is queued: shared attribute updates merged by key (the newer value wins) and delivered as one
notification, RPC requests and commands in order, each bounded in count and lifetime.  When the
device next talks the queue is flushed on the next tick (after the answer to that request, so a
notification never overtakes the response that registers its observation).

The class is sans-IO apart from `rpc()`, which awaits the device's reply: the server calls
`uplink()` from the front doors, `tick(now)` from a timer, and gives it the observer sets.
"""

from __future__ import annotations

import heapq
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Collection, Hashable, Iterator

import trio

from ..bus import topics
from ..bus.base import Sink, publish_json
from ..coap.endpoint import Request
from ..coap.observe import Observers
from ..codec import Code, OptionNumber, Options, encode_uint
from ..content_format import JSON
from ..errors import BadInput, QueueFull, utf8
from ..registry import Device
from ..registry.management import MAX_VALUE, Management
from ..stats import Sample, fields, gauge

#: idle queues looked at per tick at most
SWEEP = 256
#: the longest an RPC may wait for its device, or a command be kept for it (seconds)
MAX_WAIT = 86400.0
#: bytes of a command's payload, of an RPC's params as JSON: what an attribute value may be
#: (management.MAX_VALUE) -- a command goes out in one answer to the device's request, never
#: block-wise (one of 100 KB was taken off the queue, counted delivered and never sent: an
#: adversarial run), and queued ones are memory
MAX_PAYLOAD = MAX_VALUE
JSON_OPTS: Options = [(OptionNumber.CONTENT_FORMAT, encode_uint(JSON))]

#: seconds after which a device heard here is said heard here again (`on_first_sight`, with workers or
#: nodes): another node may have heard it since (it moved there and back), and the registry's
#: `device_homes` then still named that node -- its downlink went there until this one restarted
#: (found by a review).  A node's write for a fleet: a row per device every SEEN_AGAIN at most.
SEEN_AGAIN = 300.0
#: rounds of RPC ids reserved in the registry at a time (`Downlink._new_id`): ids grow by at most
#: this many rounds a restart
ID_ROUNDS = 1000



def attributes_resource(device: Device) -> str:
    return f"attributes:{device.tenant}/{device.device}"


def rpc_resource(device: Device) -> str:
    return f"rpc:{device.tenant}/{device.device}"


def results_topic(tenant: str) -> str:
    return topics.results(tenant)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class RpcCall:
    __slots__ = ("id", "device", "method", "params", "deadline", "oneway", "done", "response", "status")

    def __init__(self, id: int, device: Device, method: str, params: Any, deadline: float, oneway: bool) -> None:
        self.id = id
        self.device = device
        self.method = method
        self.params = params
        self.deadline = deadline
        self.oneway = oneway
        self.done = trio.Event()
        self.response: Any = None
        #: queued -> delivered -> replied | expired; a queued call may be replied or expire at once
        #: (`Downlink.reply`, `Downlink.forget`): it then leaves the queue and is never delivered
        self.status = "queued"


class DeviceQueue:
    """What waits for one device."""

    __slots__ = ("attributes", "rpcs", "commands", "waiting", "last_uplink", "born")

    def __init__(self, born: int = 0) -> None:
        self.attributes: dict[str, Any] = {}
        self.rpcs: deque[RpcCall] = deque()
        self.commands: deque[tuple[str, bytes, float]] = deque()
        #: a Drogue request parked until a command or its `ct` deadline: (request, deadline)
        self.waiting: tuple[Request, float] | None = None
        self.last_uplink = float("-inf")
        #: the registration of the device it is for (`Device.created_at`): one removed and added
        #: again under its name is another device, which gets nothing of this (`Downlink.forget`)
        self.born = born

    def empty(self) -> bool:
        return not (self.attributes or self.rpcs or self.commands or self.waiting)


@dataclass(slots=True)
class DownlinkStats:
    attribute_updates: int = 0
    attributes_queued: int = 0
    rpc_sent: int = 0
    rpc_replied: int = 0
    rpc_expired: int = 0
    commands_sent: int = 0
    commands_expired: int = 0
    queue_full: int = 0


#: DownlinkStats field -> metric name
METRICS = {
    "attribute_updates": "corem_downlink_attribute_updates", "attributes_queued": "corem_downlink_attributes_queued",
    "rpc_sent": "corem_downlink_rpc_delivered", "rpc_replied": "corem_downlink_rpc_replied",
    "rpc_expired": "corem_downlink_rpc_expired", "commands_sent": "corem_downlink_commands_delivered",
    "commands_expired": "corem_downlink_commands_expired", "queue_full": "corem_downlink_queue_full",
}


class Downlink:
    def __init__(
        self,
        management: Management,
        sink: Sink,
        *,
        psm_activity_timer: float = 10.0,
        max_queued: int = 100,
        max_devices: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        after_send: Callable[[], None] | None = None,
    ) -> None:
        self.management = management
        self.sink = sink
        self.psm_activity_timer = psm_activity_timer
        self.max_queued = max_queued
        self.max_devices = max_devices
        self.clock = clock
        #: one Observers per transport (CoAP, CoAPS): a device may observe on either
        self.observers: list[Observers] = []
        #: called after notifications or responses were queued (the server flushes its edges)
        self.after_send = after_send
        self._queues: OrderedDict[tuple[str, str], DeviceQueue] = OrderedDict()
        self._due: set[tuple[str, str]] = set()
        #: queues with a parked `ct` request or commands: the only ones a tick has to look at
        self._timed: set[tuple[str, str]] = set()
        self._rpcs: dict[int, RpcCall] = {}
        #: the same calls by device, each device's in the order sent: a registry change walks the
        #: changed devices' own calls (`forget`), not every call in flight
        self._device_rpcs: dict[tuple[str, str], dict[int, RpcCall]] = {}
        #: (deadline, rpc id), soonest first
        self._deadlines: list[tuple[float, int]] = []
        #: the rounds of RPC ids this process may give (`_new_id`): none reserved yet
        self._round = self._rounds_end = 0
        self.stats = DownlinkStats()
        #: with `--workers`: told once of each device first heard here, so that the supervisor can
        #: route this device's downlink here (corem/workers); None in a single process
        self.on_first_sight: Callable[[Device], None] | None = None
        #: when each device was last said heard here (`on_first_sight`): again after SEEN_AGAIN
        self._seen: dict[tuple[str, str], float] = {}
        self._id_first, self._id_step = 1, 1

    def number_ids(self, first: int, step: int) -> None:
        """RPC ids `first`, `first + step`, ...: workers number apart, so ids stay unique per
        server and say which worker sent each (a device may answer through another one)."""
        self._id_first, self._id_step = first, step

    def _new_id(self) -> int:
        """The next RPC id: `first + step * round`, the rounds reserved in the registry a block at
        a time (`Management.reserve_rpc_rounds`): ids numbered from 1 in every process let a
        device's late answer to an RPC sent before a restart end the new RPC given the same id
        (found by a review).  StorageUnavailable if no block can be stored: the RPC is refused."""
        if self._round >= self._rounds_end:
            self._round = self.management.reserve_rpc_rounds(ID_ROUNDS)
            self._rounds_end = self._round + ID_ROUNDS
        self._round += 1
        return self._id_first + self._id_step * (self._round - 1)

    def numbered_here(self, rpc_id: int) -> bool:
        """Is `rpc_id` one this process numbers (`number_ids`)?  With workers, a device may answer
        another worker's RPC through this one (corem/frontdoors/thingsboard.py asks that worker)."""
        return (rpc_id - self._id_first) % self._id_step == 0

    # -- device side -----------------------------------------------------------------------------
    def uplink(self, device: Device) -> None:
        """The device talked: it is awake; what waits for it goes out on the next tick."""
        key = (device.tenant, device.device)
        if self.on_first_sight is not None:
            now, last = self.clock(), self._seen.get(key)
            if last is None or now - last >= SEEN_AGAIN:
                self._seen[key] = now
                self.on_first_sight(device)
        q = self._queues.get(key)
        if q is None:
            if device.power_mode == "drx":
                return  # nothing waits and nothing to remember: always reachable
            q = self._queue(device)
            if q is None:
                return
        self._touch(key, q, self.clock())
        if q.attributes or q.rpcs:
            self._due.add(key)

    def observed(self, device: Device, resource: str) -> None:
        """The device (re-)registered an observation: its answer carries the full attribute state,
        so pending attribute deltas are moot; pending RPCs go out on the next tick."""
        q = self._queues.get((device.tenant, device.device))
        if q is None:
            return
        if resource == attributes_resource(device):
            q.attributes.clear()
        self._due.add((device.tenant, device.device))

    def reply(self, device: Device, rpc_id: int, response: Any) -> bool:
        """The device answered RPC `rpc_id` (ThingsBoard: POST /rpc/{id}); False if no such call
        waits for this device.

        A reply to a call not yet delivered (the device polled or guessed its id, or its reply
        overtook the notification) ends it as a reply to a delivered one does: it leaves the
        device's queue (`_release`), is never delivered, and "replied" is its one result.  That is
        ThingsBoard's rule -- its device actor keeps sent and unsent calls in one pending map, which
        a response empties whether the call went out or not -- and refusing it would answer 4.04 to
        a device that did answer, then send it the call it answered."""
        call = self._rpcs.get(rpc_id)
        if call is None or call.device.tenant != device.tenant or call.device.device != device.device:
            return False
        self._release(call)
        call.status, call.response = "replied", response
        self.stats.rpc_replied += 1
        self._publish(call.device, {"id": call.id, "type": "rpc", "method": call.method, "status": "replied",
                                    "response": response})
        call.done.set()
        return True

    def poll_rpc(self, device: Device) -> RpcCall | None:
        """A device without Observe asks for its oldest waiting RPC request."""
        q = self._queues.get((device.tenant, device.device))
        if q is None or not q.rpcs:
            return None
        call = q.rpcs.popleft()
        self._delivered(call)
        return call

    def wait_for_command(self, req: Request, device: Device, ct: float, now: float) -> None:
        """A Drogue request with `ct`: answer with a queued command now, or park the request until
        one arrives or `ct` passes (then 2.04)."""
        key = (device.tenant, device.device)
        q = self._queues.get(key) or self._queue(device)
        if q is None:
            req.respond(Code.CHANGED)
            return
        self._touch(key, q, now)
        self._drop_expired_commands(q, device, now)
        if q.commands:
            self._answer_with_command(req, device, q.commands.popleft())
            return
        if q.waiting is not None:  # a newer request replaces the older one, which is answered
            old = q.waiting[0]
            if not old.answered:
                old.respond(Code.CHANGED)
        q.waiting = (req, now + ct)
        self._timed.add(key)

    # -- operator side ---------------------------------------------------------------------------
    def set_shared(self, device: Device, values: Any) -> str:
        """Store shared attributes and deliver the change: 'delivered' (to its observers),
        'queued' (a sleeping device, or an observer at an unverified address whose notification is
        in flight: merged with what already waits) or 'stored' (awake but not observing: its next
        GET reads it)."""
        stored = self.management.set_attributes(device.tenant, device.device, "shared", values)
        self.stats.attribute_updates += 1
        now = self.clock()
        resource = attributes_resource(device)
        if self._reachable(device, now):
            # awake: observers get it now; a device not observing reads it with its next GET.  A
            # delta is a message, not a state (only the keys that changed): one an observer at an
            # unverified address cannot take yet waits here, merged, not inside the observation
            # where past 8 the oldest gives way (found in review), and goes after its ACK (`_freed`)
            if self._notify(resource, stored, now, hold=False):
                return "delivered"
            if not any(o.observers(resource) for o in self.observers):
                return "stored"
        key = (device.tenant, device.device)
        q = self._queues.get(key) or self._queue(device)
        if q is None:
            return "stored"
        q.attributes.update(stored)  # merged by key: the newer value wins
        self.stats.attributes_queued += 1
        return "queued"

    def send_rpc(self, device: Device, method: Any, params: Any, timeout: Any, oneway: bool = False) -> RpcCall:
        """Queue an RPC request for the device; it goes out at once if the device listens.
        BadInput names a bad argument; QueueFull says the device's queue is full."""
        if not isinstance(method, str) or not method:
            raise BadInput("method: a non-empty string is required")
        _check_wait("timeout", timeout)
        size = len(json.dumps(params, separators=(",", ":")))
        if size > MAX_PAYLOAD:
            raise BadInput(f"params: {size} bytes of JSON; at most {MAX_PAYLOAD}")
        now = self.clock()
        key = (device.tenant, device.device)
        q = self._queues.get(key) or self._queue(device)
        # (those sent and waiting for their reply count too: the queue bounded only those not sent
        # yet, and a device that took each at once let calls pile up for their whole timeout --
        # up to a day from the commands topic; found by a review)
        if q is None or len(self._device_rpcs.get(key, ())) >= self.max_queued:  # (every call in flight)
            self.stats.queue_full += 1
            raise QueueFull(f"device {device.tenant}/{device.device}: {self.max_queued} requests queued or "
                            "awaiting their reply already")
        call = RpcCall(self._new_id(), device, method, params, now + timeout, oneway)
        self._track(call)
        heapq.heappush(self._deadlines, (call.deadline, call.id))
        q.rpcs.append(call)
        if self._reachable(device, now):
            self._flush(key, q, now)
        return call

    async def rpc(self, device: Device, method: str, params: Any, timeout: float, oneway: bool = False) -> RpcCall:
        """Send an RPC and wait for the reply (or only for delivery, if `oneway`) up to `timeout`."""
        call = self.send_rpc(device, method, params, timeout, oneway)
        with trio.move_on_after(timeout):
            await call.done.wait()
        if not call.done.is_set():
            self._expire_rpc(call)
        return call

    def command(self, device: Device, name: Any, payload: bytes, ttl: Any) -> str:
        """A Drogue-style command: answered to a waiting request at once ('delivered'), or kept
        until the device next waits with `ct` ('queued')."""
        if not isinstance(name, str) or not 0 < len(utf8(name, "command")) <= 255:
            raise BadInput("command: 1-255 bytes of text (it travels in option 4210)")
        _check_wait("ttl", ttl)
        if len(payload) > MAX_PAYLOAD:
            raise BadInput(f"payload: {len(payload)} bytes; at most {MAX_PAYLOAD}")
        now = self.clock()
        key = (device.tenant, device.device)
        q = self._queues.get(key) or self._queue(device)
        if q is None or len(q.commands) >= self.max_queued:
            self.stats.queue_full += 1
            raise QueueFull(f"device {device.tenant}/{device.device}: {self.max_queued} commands queued already")
        cmd = (name, payload, now + ttl)
        if q.waiting is not None and not q.waiting[0].answered:
            req, _ = q.waiting
            q.waiting = None
            self._answer_with_command(req, device, cmd)
            return "delivered"
        q.commands.append(cmd)
        self._timed.add(key)
        return "queued"

    # -- between workers ---------------------------------------------------------------------------
    def moved(self, tenant: str, device: str) -> dict[str, Any] | None:
        """The device is heard by another worker now: forget it was seen here (if it comes back,
        it is announced again) and give up what waits for it -- shared attributes and commands,
        with their remaining lifetimes -- for `adopt` there.  RPCs stay: their callers wait here."""
        key = (tenant, device)
        self._seen.pop(key, None)
        q = self._queues.get(key)
        if q is None or not (q.attributes or q.commands):
            return None
        now = self.clock()
        state = {"attributes": q.attributes,
                 "commands": [[name, payload.hex(), deadline - now] for name, payload, deadline in q.commands
                              if deadline > now]}
        q.attributes, q.commands = {}, deque()
        return state

    def adopt(self, device: Device, state: dict[str, Any]) -> None:
        """Take over what another worker kept for the device (`moved` there)."""
        key = (device.tenant, device.device)
        q = self._queues.get(key) or self._queue(device)
        if q is None:
            return
        now = self.clock()
        q.attributes = {**state.get("attributes", {}), **q.attributes}
        q.commands.extend((name, bytes.fromhex(payload), now + ttl) for name, payload, ttl in state.get("commands", []))
        if q.commands:
            self._timed.add(key)
        if q.attributes and self._reachable(device, now):
            self._due.add(key)

    def forget(self, names: Collection[tuple[str, str]] | None, current: Callable[[str, str], Device | None]) -> None:
        """The registry changed these devices (None: any): what waits for one that is gone, or was
        removed and added again (another device under its name), goes -- its RPCs expire (their
        callers are told), its commands expire, a parked Drogue request is answered 2.04 -- so
        nothing meant for the old one reaches the new (a rotated credential is the same device:
        what waits for it stays).  It looks at those devices' own RPCs only (`_device_rpcs`): every
        registry change calls it, and the change of one device must not cost every RPC in flight
        for the whole fleet."""
        keys = {*self._queues, *self._device_rpcs} if names is None else set(names)
        for key in keys:
            q = self._queues.get(key)
            calls = self._device_rpcs.get(key)
            if q is None and calls is None:
                continue
            device = current(*key)
            born = None if device is None else device.created_at
            for call in list(calls.values()) if calls is not None else ():
                if call.device.created_at != born:
                    self._expire_rpc(call)  # (queued, or delivered and awaiting the old device's reply)
            if q is None or q.born == born:
                continue
            del self._queues[key]
            self._due.discard(key)
            self._timed.discard(key)
            self._seen.pop(key, None)
            now = self.clock()
            old = Device(tenant=key[0], device=key[1], created_at=q.born)
            while q.commands:
                q.commands[0] = (*q.commands[0][:2], now)  # (expired now)
                self._drop_expired_commands(q, old, now)
            if q.waiting is not None and not q.waiting[0].answered:
                q.waiting[0].respond(Code.CHANGED)

    # -- timers ----------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Flush what became deliverable, end `ct` waits, expire what waited too long."""
        due, self._due = self._due, set()
        for key in due:
            q = self._queues.get(key)
            if q is not None:
                self._flush(key, q, now)
        sent = bool(due)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            call = self._rpcs.get(heapq.heappop(deadlines)[1])
            if call is not None:
                self._expire_rpc(call)
        for key in list(self._timed):
            q = self._queues.get(key)
            if q is not None and q.waiting is not None and q.waiting[1] <= now:
                req = q.waiting[0]
                q.waiting = None
                if not req.answered:
                    req.respond(Code.CHANGED)
                    sent = True
            if q is not None and q.commands:
                self._drop_expired_commands(q, Device(tenant=key[0], device=key[1]), now)
            if q is None or (q.waiting is None and not q.commands):
                self._timed.discard(key)
        # forget idle queues from the least recently active end, a bounded number per tick
        queues, stale = self._queues, now - self.psm_activity_timer
        for _ in range(SWEEP):
            if not queues:
                break
            key, q = next(iter(queues.items()))
            if q.last_uplink > stale:
                break
            if q.empty():
                del queues[key]
            else:
                queues.move_to_end(key)  # still holds something for its device: look again later
        if sent and self.after_send is not None:
            self.after_send()

    # -- internals -------------------------------------------------------------------------------
    def _queue(self, device: Device) -> DeviceQueue | None:
        if len(self._queues) >= self.max_devices:
            self.stats.queue_full += 1
            return None
        q = self._queues[device.tenant, device.device] = DeviceQueue(device.created_at)
        return q

    def _touch(self, key: tuple[str, str], q: DeviceQueue, now: float) -> None:
        q.last_uplink = now
        self._queues.move_to_end(key)  # least recently active first: the idle sweep's order

    def _reachable(self, device: Device, now: float) -> bool:
        if device.power_mode != "psm":
            return True
        q = self._queues.get((device.tenant, device.device))
        return q is not None and now - q.last_uplink <= self.psm_activity_timer

    def watch(self, observers: Observers) -> None:
        """Notify through `observers` too (a transport's).  An RPC or an attribute delta an observer
        at an unverified address cannot take yet (its notification in flight, coap/observe.py)
        stays queued here (deltas merged) and goes at the tick after that observer's ACK
        (`_freed`), rather than wait inside it, where a newer one could push it out after it was
        counted delivered (found in review)."""
        self.observers.append(observers)
        observers.freed.append(self._freed)

    def _freed(self, owner: Hashable) -> None:
        if owner in self._queues:  # (the doors name a device's observations by (tenant, device))
            self._due.add(owner)  # type: ignore[arg-type]

    def _notify(self, resource: str, body: Any, now: float, hold: bool = True) -> int:
        payload = dumps(body)
        sent: int = sum(o.notify(resource, Code.CONTENT, JSON_OPTS, payload, now, hold) for o in self.observers)
        if sent and self.after_send is not None:
            self.after_send()
        return sent

    def _flush(self, key: tuple[str, str], q: DeviceQueue, now: float) -> None:
        device = q.rpcs[0].device if q.rpcs else Device(tenant=key[0], device=key[1])
        if q.attributes and self._notify(attributes_resource(device), q.attributes, now, hold=False):
            q.attributes = {}
        while q.rpcs:
            call = q.rpcs[0]
            body = {"id": call.id, "method": call.method, "params": call.params}
            if not self._notify(rpc_resource(call.device), body, now, hold=False):
                break  # nobody observes the RPC resource yet: keep it until someone does
            q.rpcs.popleft()
            self._delivered(call)

    def _delivered(self, call: RpcCall) -> None:
        call.status = "delivered"
        self.stats.rpc_sent += 1
        if call.oneway:
            self._release(call)
            call.done.set()
        self._publish(call.device, {"id": call.id, "type": "rpc", "method": call.method, "status": "delivered"})

    def _track(self, call: RpcCall) -> None:
        """`call` is in flight: found by its id (a reply, its deadline) and by its device (`forget`)."""
        self._rpcs[call.id] = call
        self._device_rpcs.setdefault((call.device.tenant, call.device.device), {})[call.id] = call

    def _release(self, call: RpcCall) -> bool:
        """`call` is no longer in flight (replied, delivered one-way, expired); False if it was not.
        It leaves every table that holds it, here and nowhere else: by id, by device -- whose entry
        goes with its last call: the index holds no more devices than calls -- and, not delivered
        yet, its device's queue: a call that ended is never delivered afterwards (nor does it take
        a place in the queue)."""
        if self._rpcs.pop(call.id, None) is None:
            return False
        key = (call.device.tenant, call.device.device)
        calls = self._device_rpcs[key]
        del calls[call.id]
        if not calls:
            del self._device_rpcs[key]
        if call.status == "queued":
            q = self._queues.get(key)
            if q is not None and call in q.rpcs:
                q.rpcs.remove(call)
        return True

    def _expire_rpc(self, call: RpcCall) -> None:
        if not self._release(call):
            return
        call.status = "expired"
        self.stats.rpc_expired += 1
        self._publish(call.device, {"id": call.id, "type": "rpc", "method": call.method, "status": "expired"})
        call.done.set()

    def _drop_expired_commands(self, q: DeviceQueue, device: Device, now: float) -> None:
        while q.commands and q.commands[0][2] <= now:
            name = q.commands.popleft()[0]
            self.stats.commands_expired += 1
            self._publish(device, {"type": "command", "command": name, "status": "expired"})

    def _answer_with_command(self, req: Request, device: Device, cmd: tuple[str, bytes, float]) -> None:
        name, payload, _ = cmd
        req.respond(Code.CONTENT, [(OptionNumber.DROGUE_COMMAND, name.encode())], payload)
        self.stats.commands_sent += 1
        self._publish(device, {"type": "command", "command": name, "status": "delivered"})
        if self.after_send is not None:
            self.after_send()

    def _publish(self, device: Device, result: dict[str, Any]) -> None:
        """Results go to `commands.results.{tenant}`, key = device."""
        result = {"tenant": device.tenant, "device": device.device, "at": int(time.time() * 1000), **result}
        publish_json(self.sink, results_topic(device.tenant), device.device, result)

    @property
    def devices_queued(self) -> int:
        return len(self._queues)

    def metrics(self) -> Iterator[Sample]:
        yield from fields(self.stats, METRICS)
        yield gauge("corem_downlink_devices_queued", len(self._queues))

    def queued(self, device: Device) -> dict[str, Any]:
        q = self._queues.get((device.tenant, device.device))
        if q is None:
            return {"attributes": 0, "rpc": 0, "commands": 0, "waiting": False}
        return {"attributes": len(q.attributes), "rpc": len(q.rpcs), "commands": len(q.commands),
                "waiting": q.waiting is not None}



def _check_wait(name: str, seconds: object) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_WAIT:
        raise BadInput(f"{name}: seconds, more than 0 and at most {MAX_WAIT:g}")
