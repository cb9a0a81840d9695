"""Resources users write, the way the aiocoap tutorial does, on corem's message layer.

    class Temperature(Resource):
        observable = True

        def __init__(self):
            super().__init__()
            self.value = b"21.5"

        def get(self, req):
            return Response(Code.CONTENT, self.value)

        def put(self, req):
            self.value = bytes(req.message.payload)
            self.changed()  # every observer gets the new state
            return Response(Code.CHANGED)

    server.site.add("sensors/temperature", Temperature())

A method the resource does not define is answered 4.05.  Handlers run on the event loop: keep them
quick, or answer later through `req.respond`.

Conditional requests (RFC 7252 §5.10.8) are the site's, not the resource's: the current
representation is what `get(None)` renders (`Resource.current`); its ETag is the one `get` gives,
or corem's (`conditional.etag_for`: its payload and Content-Format).  A GET's 2.05 and every
notification carry that ETag, and so does a 2.01/2.04 to a PUT or POST (the new state's) of an
observable resource, or one with a conditional request (others are not asked to render themselves
after every write).  A request with If-Match / If-None-Match is evaluated against the current state
right before the method is called, in the same step (no `await` between): one that does not hold
is 4.12 and the method is not called -- so of two clients updating with the same `If-Match`, one
wins.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..codec import Code
from .conditional import conditional, etag_of, evaluate, with_etag
from .endpoint import Request
from .observe import Observers, answer_observe
from .resources import Handler, Router
from .response import Response

METHODS = {Code.GET: "get", Code.POST: "post", Code.PUT: "put", Code.DELETE: "delete"}


class Resource:
    """Subclass and define any of get/post/put/delete(req) -> Response.  `get` is also called with
    `req=None` to render the current state: what observers are sent, what If-Match and
    If-None-Match are evaluated against (override `current` if `get` needs its request)."""

    #: Observable resources accept GET with Observe and notify on `changed()`.
    observable = False
    #: Link attributes for /.well-known/core (RFC 6690): resource type, interface, content formats.
    rt: str | None = None
    if_: str | None = None
    ct: str | None = None
    title: str | None = None

    def link(self) -> dict[str, str | bool]:
        given = {"rt": self.rt, "if": self.if_, "ct": self.ct, "title": self.title}
        attrs: dict[str, str | bool] = {k: v for k, v in given.items() if v is not None}
        if self.observable:
            attrs["obs"] = True
        return attrs

    def __init__(self) -> None:
        self._sites: list[tuple[Site, str]] = []

    def current(self) -> Response | None:
        """The current representation (a 2.05), or anything else when there is none (a 4.04, or
        None): `get(None)`, or None for a resource without `get`."""
        get = getattr(self, "get", None)
        return None if get is None else get(None)

    def changed(self) -> None:
        """Send the current state (what `get` returns) to every observer, on every transport."""
        for site, path in self._sites:
            site.notify(path, self)


class Site:
    """Mounts resources on one or more (router, observers) pairs: one per transport."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, after_notify: Callable[[], None] | None = None
    ) -> None:
        self._mounts: list[tuple[Router, Observers]] = []
        self._resources: dict[str, Resource] = {}
        self.clock = clock
        #: called after notifications were queued (the server flushes its edges there)
        self.after_notify = after_notify

    def mount(self, router: Router, observers: Observers) -> None:
        self._mounts.append((router, observers))
        for path, resource in self._resources.items():
            self._install(router, observers, path, resource)

    def add(self, path: str, resource: Resource) -> None:
        path = path.strip("/")
        self._resources[path] = resource
        resource._sites.append((self, path))
        for router, observers in self._mounts:
            self._install(router, observers, path, resource)

    def _install(self, router: Router, observers: Observers, path: str, resource: Resource) -> None:
        handlers: dict[int, Handler] = {
            code: _method(resource, getattr(resource, name), code) for code, name in METHODS.items()
            if hasattr(resource, name)}
        if resource.observable and Code.GET in handlers:
            handlers[Code.GET] = self._observed(resource, observers, path)
        # (door "site" whatever the path: its answers need no credentials, so on plain UDP they are
        # bounded as corem/coap/endpoint.py's OPEN_DOORS are)
        router.add(path, handlers, link=resource.link(), conditional=True, door="site")

    def _observed(self, resource: Resource, observers: Observers, path: str) -> Handler:
        """GET with the Observe option: register (0) or deregister (1) the requester (§3.1, §3.6)."""

        def get(req: Request, params: list[str]) -> Response | None:
            refused = _precondition(resource, req)
            if refused is not None:
                return refused
            response: Response | None = _tagged(resource, Code.GET, resource.get(req), req)  # type: ignore[attr-defined]
            return None if response is None else answer_observe(observers, req, path, response, self.clock())

        return get

    def notify(self, path: str, resource: Resource) -> None:
        state = resource.current()  # the representation observers get (no request behind it), as preconditions see it
        if state is None:
            return
        if state.code == Code.CONTENT:
            state = with_etag(state, etag_of(state))
        now = self.clock()
        for _router, observers in self._mounts:
            observers.notify(path, state.code, state.options, state.payload, now)
        if self.after_notify is not None:
            self.after_notify()


def _method(resource: Resource, method: Callable[[Request], Any], code: int) -> Handler:
    """A resource method as the router calls it (with `params`, which it does not take), behind the
    preconditions and giving its answer the ETag."""

    def call(req: Request, params: list[str]) -> Response | None:
        refused = _precondition(resource, req)
        if refused is not None:
            return refused
        return _tagged(resource, code, method(req), req)

    return call


def _precondition(resource: Resource, req: Request) -> Response | None:
    """4.12 (or 4.02) when the request's If-Match / If-None-Match do not hold for the resource's
    current state; None otherwise, and for a request without them."""
    msg = req.message
    if msg is None or not conditional(msg):
        return None
    current = resource.current()
    if current is None or current.code != Code.CONTENT:
        return evaluate(msg, False)
    return evaluate(msg, True, etag_of(current))


def _tagged(resource: Resource, code: int, response: Response | None, req: Request) -> Response | None:
    """A 2.05 with its ETag; a 2.01 / 2.04 to a PUT or POST with the new state's."""
    if response is None:
        return None
    if response.code == Code.CONTENT and code == Code.GET:
        return with_etag(response, etag_of(response))
    if response.code in (Code.CREATED, Code.CHANGED) and code in (Code.PUT, Code.POST) and (
            resource.observable or (req.message is not None and conditional(req.message))):
        # `get(None)` is promised by an observable resource (its notifications call it), and was
        # just called for a conditional request; any other resource is not asked to render itself
        # after every write (it might need its request, and the change is already made)
        current = resource.current()
        if current is not None and current.code == Code.CONTENT:
            return with_etag(response, etag_of(current))
    return response
