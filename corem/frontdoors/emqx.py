"""EMQX's CoAP gateway (spec 003): topics as resources, credentials in the query.

    /ps/{topic}?c=ClientId&u=Username&p=Password        PubSub mode
        PUT     retain the message (for Max-Age seconds, default 60; 0 deletes) and publish it:
                2.01 when there was no retained message, else 2.04, with the new one's ETag
        POST    publish without retaining
        GET     the retained message (4.04 when none), with its ETag and remaining Max-Age
        GET + Observe 0   subscribe: every later publish on the topic is a notification
        DELETE  remove the retained message
    /mqtt/{topic}?c=&u=&p=                              MQTT mode: PUT/POST publish, GET+Observe subscribe

`u` is the device id and `p` its access token (`c` is the client id, kept for the logs); over
CoAPS the session names the device and the query may be left out (corem/identity.py decides).  Topics are per tenant: devices
of one tenant never see another's.  Each device may use only the topics its registry entry allows
(`topics`, MQTT filters; default `#`): a publish or subscription outside them is 4.03.  A device
holds one subscription per topic on each transport: its latest replaces the one before, once
accepted (one the observer bounds refuse leaves the one before in place).
Every publish is also a record on `pubsub.{tenant}` (key = topic), answered 2.04 once it is on the
bus like a reading.  Retained messages are bounded per tenant (`max_retained_per_tenant`: the
publishing tenant's oldest dropped first) and for the server, in count and bytes, topics included
(then the oldest of the tenant holding the most goes): one tenant's device cannot push another
tenant's configuration out (one bound for all, oldest first, and it could).

Conditional requests (RFC 7252 §5.10.8) on `/ps/{topic}` are evaluated against the retained
message, after the credentials and the topic ACL, in the same step as the write (no `await`
between): `If-Match: <etag>` updates (or deletes, or publishes) only while that message is the
retained one, `If-None-Match` only while there is none (ETSI TD_COAP_CORE_22/23); else 4.12.
`/mqtt/{topic}` keeps no representation: the router evaluates it as a resource without ETags.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

from ..bus import topics
from ..bus.base import Record
from ..bus.headers import media_type, standard
from ..coap.conditional import conditional, etag_for, evaluate
from ..coap.endpoint import Request
from ..coap.observe import Observers, answer_observe
from ..coap.resources import Response, Router
from ..codec import Code, OptionNumber, Options, encode_uint
from ..devices.downlink import Downlink
from ..identity import Door, Refusal, SessionDevice
from ..ingest.telemetry import BUSY, TelemetryIngest, answer_committed
from ..registry import Device, Directory, credentials
from ..stats import Sample, counter, gauge
from .common import bad_request, query

DEFAULT_MAX_AGE = 60


def pubsub_topic(tenant: str) -> str:
    return topics.pubsub(tenant)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: `+` is one level, a trailing `#` any number (including none)."""
    want, got = topic_filter.split("/"), topic.split("/")
    for i, w in enumerate(want):
        if w == "#":
            return True
        if i >= len(got) or (w != "+" and w != got[i]):
            return False
    return len(want) == len(got)


class Retained(NamedTuple):
    payload: bytes
    content_format: int | None
    expires: float
    #: its ETag (`etag_for` its payload and Content-Format): what If-Match compares
    etag: bytes


@dataclass(slots=True)
class EmqxStats:
    published: int = 0
    retained: int = 0
    subscribed: int = 0
    denied: int = 0
    retained_dropped: int = 0


class Emqx:
    def __init__(
        self,
        directory: Directory,
        ingest: TelemetryIngest,
        downlink: Downlink,
        clock: Callable[[], float],
        *,
        max_retained: int = 10_000,
        max_retained_bytes: int = 64 * 1024 * 1024,
        max_retained_per_tenant: int = 10_000,
    ) -> None:
        self.directory = directory
        self.ingest = ingest
        self.downlink = downlink
        self.clock = clock
        self.max_retained = max_retained
        self.max_retained_bytes = max_retained_bytes
        self.max_retained_per_tenant = max_retained_per_tenant
        #: tenant -> topic -> its retained message, each tenant's oldest first
        self._retained: dict[str, OrderedDict[str, Retained]] = {}
        #: the tenants by how many retained messages they hold and by their bytes: whose oldest
        #: goes when a server bound is passed, found without a walk over the tenants
        self._by_count = Heaviest()
        self._by_bytes = Heaviest()
        self._count = 0
        self._retained_bytes = 0
        self.stats = EmqxStats()
        #: every transport's observers: a publish over CoAP reaches subscribers on CoAPS too
        self.observers: list[Observers] = []

    def metrics(self) -> Iterator[Sample]:
        st = self.stats
        yield counter("corem_pubsub_published", st.published)
        yield counter("corem_pubsub_subscribed", st.subscribed)
        yield counter("corem_pubsub_denied", st.denied)
        yield counter("corem_pubsub_retained_dropped", st.retained_dropped)
        yield gauge("corem_pubsub_retained", len(self))

    def __len__(self) -> int:
        return self._count

    def install(self, router: Router, observers: Observers, session_device: SessionDevice | None = None) -> None:
        self.observers.append(observers)
        identify = self.ingest.identity.identify  # (credentials or session: corem/identity.py)

        def door(handler, retained: bool = False):
            """`retained`: a `/ps` method, whose If-Match / If-None-Match are evaluated here
            against the topic's retained message, right before `handler` (no await between)."""

            def call(req: Request, params: list[str]) -> Response | None:
                device = identify(req, Door.EMQX, session=session_device, query=query(req))
                if isinstance(device, Refusal):
                    return device.response()
                topic = params[0]
                if "#" in topic or "+" in topic:
                    return bad_request(f"topic: {topic!r}; wildcards are not supported in a CoAP resource path")
                if not any(topic_matches(f, topic) for f in device.topics.split()):
                    self.stats.denied += 1
                    return Response(Code.FORBIDDEN, f"topic: {topic!r} is not allowed for this device".encode())
                self.downlink.uplink(device)
                if retained and req.message is not None and conditional(req.message):
                    found = self._current(device.tenant, topic)
                    refused = evaluate(req.message, found is not None, None if found is None else found.etag)
                    if refused is not None:
                        return refused
                return handler(req, device, topic, observers)

            return call

        router.add("ps/{topic*}", {Code.GET: door(self.get, True), Code.PUT: door(self.put, True),
                                   Code.POST: door(self.post, True), Code.DELETE: door(self.delete, True)},
                   conditional=True)
        router.add("mqtt/{topic*}", {Code.GET: door(self.subscribe), Code.PUT: door(self.post),
                                     Code.POST: door(self.post)}, identified=True)

    # -- PubSub ----------------------------------------------------------------------------------
    def get(self, req: Request, device: Device, topic: str, observers: Observers) -> Response:
        if req.message is not None and req.message.observe is not None:
            return self.subscribe(req, device, topic, observers)
        found = self._current(device.tenant, topic)
        if found is None:
            return Response(Code.NOT_FOUND, b"topic: no retained message")
        return Response(Code.CONTENT, found.payload, self._options(found))

    def put(self, req: Request, device: Device, topic: str, observers: Observers) -> Response | None:
        """Retain and publish: refused (5.03) before anything changes if the bus cannot take it.
        Answered once on the bus: 2.01 if it created the retained message, else 2.04; with its ETag."""
        msg = req.message
        assert msg is not None
        max_age = msg.max_age if msg.opt(OptionNumber.MAX_AGE) is not None else DEFAULT_MAX_AGE
        key = (device.tenant, topic)
        payload, cf = bytes(msg.payload), msg.content_format
        etag = etag_for(payload, cf)
        created = max_age > 0 and self._current(*key) is None
        answer = self._publish(req, device, topic, _answer_put, (req, Code.CREATED if created else Code.CHANGED,
                                                                 [(OptionNumber.ETAG, etag)] if max_age > 0 else None))
        if answer is BUSY:
            return answer
        self._drop(key)
        if max_age > 0:
            tenant = device.tenant
            value = Retained(payload, cf, self.clock() + max_age, etag)
            mine = self._retained.setdefault(tenant, OrderedDict())
            mine[topic] = value
            self._count += 1
            size = _size(topic, value)
            self._by_count.add(tenant, 1)
            self._by_bytes.add(tenant, size)
            self._retained_bytes += size
            self.stats.retained += 1
            while len(mine) > self.max_retained_per_tenant:  # its own tenant's oldest
                self._drop((tenant, next(iter(mine))))
                self.stats.retained_dropped += 1
            while self._count > self.max_retained:  # the oldest of whoever holds the most
                heaviest = self._by_count.top()
                self._drop((heaviest, next(iter(self._retained[heaviest]))))
                self.stats.retained_dropped += 1
            while self._retained_bytes > self.max_retained_bytes:
                heaviest = self._by_bytes.top()
                self._drop((heaviest, next(iter(self._retained[heaviest]))))
                self.stats.retained_dropped += 1
        return answer

    def delete(self, req: Request, device: Device, topic: str, observers: Observers) -> Response:
        return Response(Code.DELETED if self._drop((device.tenant, topic)) else Code.NOT_FOUND)

    # -- both modes ------------------------------------------------------------------------------
    def subscribe(self, req: Request, device: Device, topic: str, observers: Observers) -> Response:
        msg = req.message
        if msg is None or msg.observe is None:
            return bad_request("observe: subscribe with GET and Observe 0")
        found = self._current(device.tenant, topic)
        response = Response(Code.CONTENT, found.payload, self._options(found)) if found else Response(Code.CONTENT)
        # One subscription per device and topic (on each transport): a new one replaces the one
        # before, from whatever address and token. An adversarial run found: on plain
        # UDP nothing verifies a registration's source address, so one device credential held 64
        # subscriptions to one topic at addresses it spoofed, and each of its publishes was
        # reflected 63 times. A device is at one place and wants each publish once; one that
        # moved, or subscribes again after a restart, is where its latest registration says.
        # Reflecting a publish to N addresses now takes N devices' credentials.  The transport's
        # Observers hold who observes what (`replace`): the one before ends only once the new one
        # is accepted, so a refused one (a bound) leaves the device the subscription it had.
        answer = answer_observe(observers, req, _resource(device.tenant, topic), response, self.clock(),
                                (device.tenant, device.device), (_grant, _grant(device)), replace=True)
        if answer is not response:
            self.stats.subscribed += 1
        return answer

    def post(self, req: Request, device: Device, topic: str, observers: Observers) -> Response | None:
        """Publish: answered 2.04 once the record is on the bus; subscribers are notified as soon
        as the bus has taken it (a refused publish, 5.03, reaches nobody)."""
        return self._publish(req, device, topic, answer_committed, req)

    def _publish(self, req: Request, device: Device, topic: str, done: Callable[[Any, BaseException | None], None],
                 ctx: Any) -> Response | None:
        """Submit the request's message to the bus (`done(ctx, error)` answers it) and notify the
        topic's subscribers: None, or BUSY if the bus cannot take it."""
        msg = req.message
        assert msg is not None
        payload = bytes(msg.payload)
        cf = msg.content_format
        headers = {"topic": topic, "device": device.device, **standard(device.device, media_type(cf))}
        if cf is not None:
            headers["content_format"] = str(cf)
        if not self.ingest.sink.submit(Record(pubsub_topic(device.tenant), topic.encode(), payload, headers),
                                       done, ctx):
            return BUSY
        opts: Options = [] if cf is None else [(OptionNumber.CONTENT_FORMAT, encode_uint(cf))]
        now = self.clock()
        for o in self.observers:
            o.notify(_resource(device.tenant, topic), Code.CONTENT, opts, payload, now)
        self.stats.published += 1
        return None

    # -- retained store --------------------------------------------------------------------------
    def _current(self, tenant: str, topic: str) -> Retained | None:
        mine = self._retained.get(tenant)
        found = None if mine is None else mine.get(topic)
        if found is not None and found.expires <= self.clock():
            self._drop((tenant, topic))
            return None
        return found

    def _options(self, found: Retained) -> list:
        opts = [(OptionNumber.ETAG, found.etag)]
        if found.content_format is not None:
            opts.append((OptionNumber.CONTENT_FORMAT, encode_uint(found.content_format)))
        opts.append((OptionNumber.MAX_AGE, encode_uint(max(0, int(found.expires - self.clock())))))
        return opts

    def _drop(self, key: tuple[str, str]) -> bool:
        tenant, topic = key
        mine = self._retained.get(tenant)
        old = None if mine is None else mine.pop(topic, None)
        if old is None:
            return False
        size = _size(topic, old)
        self._count -= 1
        self._retained_bytes -= size
        if mine:
            self._by_count.add(tenant, -1)
            self._by_bytes.add(tenant, -size)
        else:  # (no tenant stays behind empty)
            del self._retained[tenant]
            self._by_count.remove(tenant)
            self._by_bytes.remove(tenant)
        return True

    def sweep(self) -> None:
        """Forget expired retained messages (called from a timer; memory stays bounded anyway)."""
        now = self.clock()
        for key in [(t, k) for t, mine in self._retained.items() for k, v in mine.items() if v.expires <= now]:
            self._drop(key)


class Heaviest:
    """Tenants by a weight (how many retained messages each holds, or their bytes), the heaviest
    found at once, so a server bound's eviction never walks every tenant (with thousands of tenants
    each publish past the bound did).  heapq's heap of (-weight, arrival, tenant) entries, one
    pushed at each change: an entry whose weight is no longer its tenant's (or whose tenant left)
    is stale, dropped when it comes to the top, and the heap is made anew from the live weights
    when the stale ones outnumber them.  Of equal weights the tenant that came first is the
    heaviest, as it was when the tenants were walked in the order they came."""

    __slots__ = ("_heap", "_weights", "_arrivals")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, str]] = []
        #: tenant -> [weight, arrival]
        self._weights: dict[str, list[int]] = {}
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._weights)

    def weight(self, tenant: str) -> int:
        w = self._weights.get(tenant)
        return 0 if w is None else w[0]

    def top(self) -> str:
        """The heaviest tenant (there is one: a bound is passed only while something is held)."""
        heap, weights = self._heap, self._weights
        while True:
            neg, arrival, tenant = heap[0]
            w = weights.get(tenant)
            if w is not None and w[0] == -neg and w[1] == arrival:  # (not an entry of its stay before)
                return tenant
            heapq.heappop(heap)

    def add(self, tenant: str, delta: int) -> None:
        """`tenant`'s weight changes by `delta` (it comes in, at the end of the arrivals, if new)."""
        w = self._weights.get(tenant)
        if w is None:
            self._arrivals += 1
            w = self._weights[tenant] = [0, self._arrivals]
        w[0] += delta
        heapq.heappush(self._heap, (-w[0], w[1], tenant))
        self._compact()

    def remove(self, tenant: str) -> None:
        del self._weights[tenant]
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._weights) + 64:
            self._heap = [(-w, arrival, t) for t, (w, arrival) in self._weights.items()]
            heapq.heapify(self._heap)


def _answer_put(ctx: tuple[Request, int, Options | None], error: BaseException | None) -> None:
    """A sink `done` for a retaining PUT: its 2.01 / 2.04 with the ETag once durable, or 5.03."""
    req, code, options = ctx
    if req.answered:  # answered already (e.g. shutdown gave up on it)
        return
    if error is None:
        req.respond(code, options)
    else:
        req.respond(BUSY.code, BUSY.options, BUSY.payload)


def _size(topic: str, value: Retained) -> int:
    """What a retained message counts towards the byte bounds: its payload and its topic (a long
    topic with an empty payload is memory too)."""
    return len(value.payload) + len(topic)


def _resource(tenant: str, topic: str) -> str:
    return f"topic:{tenant}/{topic}"


def _grant(device: Device) -> tuple[bytes, str]:
    """What a subscription rests on: the device's credentials and its topic filters (narrowed, or
    the device rotated or removed: its subscriptions end, corem/coap/observe.py `revoke`)."""
    return credentials(device), device.topics

