"""Resources: which handler answers which Uri-Path and method.

Paths are patterns of segments; `{name}` matches any one segment and its value is passed to the
handler in order; a last segment `{name*}` matches one or more segments (topic names such as
`ps/{topic*}`) and is passed joined with '/'.  A handler returns a `Response` to answer at once,
or None when it will answer later through `Request.respond` (e.g. after the point is committed).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator

from ..codec import Block, Code, Message, OptionNumber, decode_uint, encode_uint
from ..codec.options import first_bad_text, option_label
from ..errors import CoremError, Refused, StorageUnavailable
from ..latency import door_of
from ..stats import Sample, counter
from .conditional import conditional as has_conditions, evaluate as evaluate_conditions
from .blockwise import Block1Uploads, Representations, Upload, block2, requester, worth_keeping
from .response import Response, refusal

__all__ = ["Handler", "Response", "Router"]
from .endpoint import Request
from .peers import source_host

log = logging.getLogger("corem.coap")

#: Seconds between two logged handler errors (each is counted; the log shows the first of a burst).
ERROR_LOG_INTERVAL = 10


Handler = Callable[[Request, list[str]], "Response | None"]

NOT_FOUND = Response(Code.NOT_FOUND)
METHOD_NOT_ALLOWED = Response(Code.METHOD_NOT_ALLOWED)


class Methods(dict[int, Handler]):
    """One route's handlers by method code, and the front door the route belongs to (the `door`
    label of corem_request_duration_seconds: corem/latency.py)."""

    __slots__ = ("door",)

    def __init__(self, methods: dict[int, Handler], door: str) -> None:
        super().__init__(methods)
        self.door = door


class Router:
    def __init__(self, uploads: Block1Uploads | None = None) -> None:
        # segment count -> [(pattern, {method: handler})]; pattern items are str or None (wildcard)
        self._routes: dict[int, list[tuple[tuple[str | None, ...], Methods]]] = {}
        #: patterns ending in `{name*}`: (leading segments, {method: handler}), longest first
        self._prefixes: list[tuple[tuple[str | None, ...], Methods]] = []
        self._links: dict[str, dict[str, str | bool]] = {}
        self.handler_errors = 0
        #: requests refused 4.00 for a text option (Uri-Path, Uri-Query, ...) that is not UTF-8
        self.invalid_text = 0
        #: requests refused 5.03 because a handler's write was refused by the disk
        self.storage_errors = 0
        self._next_error_log = 0.0
        #: Block1 uploads in progress (RFC 7959 §2.5), bounded
        self.uploads = Block1Uploads() if uploads is None else uploads
        #: what a requester began to read block-wise (Observers keep their notifications' here too)
        self.representations = Representations()
        #: message-level security (corem/oscore): turns a sealed request into the device's request
        #: (or answers it) before it is routed
        self.unwrap: Callable[[Request], Response | None] | None = None
        #: handlers that evaluate If-Match / If-None-Match themselves (`add(..., conditional=True)`)
        self._conditional: set[Handler] = set()
        #: handlers that ask corem/identity.py who the request speaks for before anything else
        #: (`add(..., identified=True)`): a condition that does not hold is answered there
        self._identified: set[Handler] = set()

    def add(self, path: str, methods: dict[int, Handler], link: dict[str, str | bool] | None = None,
            *, conditional: bool = False, identified: bool = False, door: str | None = None) -> None:
        """Register `methods` (code -> handler) at `path`, e.g. `"api/v1/{token}/telemetry"`;
        `link` attributes (rt, if, ct, obs, title) list a literal path in /.well-known/core.
        `conditional`: the handlers evaluate If-Match / If-None-Match against their own state
        (`corem.coap.conditional.evaluate`); otherwise the router does, for a resource without ETags.
        `identified`: the handlers identify the device (`Identity.identify`) before they do anything:
        a condition that does not hold is answered 4.12 there, once the device is known, so a
        request that names none is answered 4.01 (authentication before preconditions, as HTTP
        orders them: RFC 9110 §13.2.1).
        `door`: the front door it belongs to (default: by its first segment, `latency.door_of`)."""
        door = door or door_of(path)
        if conditional:
            self._conditional.update(methods.values())
        elif identified:
            self._identified.update(methods.values())
        if link is not None and "{" not in path:
            self._links[path.strip("/")] = link
        segments = tuple(
            None if s.startswith("{") and s.endswith("}") else s for s in path.strip("/").split("/")
        ) if path.strip("/") else ()
        if path.rstrip("/").endswith("*}"):
            self._prefixes.append((segments[:-1], Methods(methods, door)))
            self._prefixes.sort(key=lambda r: -len(r[0]))
            return
        routes = self._routes.setdefault(len(segments), [])
        for pattern, existing in routes:
            if pattern == segments:
                existing.update(methods)
                return
        routes.append((segments, Methods(methods, door)))
        # literal segments before wildcards, so /a/b wins over /a/{x}
        routes.sort(key=lambda r: tuple(s is None for s in r[0]))

    def metrics(self) -> Iterator[Sample]:
        yield counter("corem_coap_handler_errors", self.handler_errors)
        yield counter("corem_coap_invalid_text_options", self.invalid_text)
        yield counter("corem_coap_storage_errors", self.storage_errors)
        yield from self.uploads.metrics()

    def links(self) -> list[tuple[str, dict[str, str | bool]]]:
        return sorted(self._links.items())

    def dispatch(self, req: Request) -> Response | None:
        """The answer to `req` (None: the handler answers later or not at all).  Nothing a request
        makes go wrong leaves here: a bug anywhere on the way (not only in its handler -- a
        block-wise step, an unwrap) is counted, logged and answered 5.00, never a dead server
        (found by a review: a Block2 number past 2**20 on an empty 2.05 raised out of here and
        ended `corem serve`)."""
        try:
            return self._dispatch(req)
        except Exception as e:  # noqa: BLE001 - see above
            return self._failed(e, req.message.uri_path if req.message is not None else [])

    def _failed(self, e: Exception, path: list[str]) -> Response:
        """A bug (a 5.00 kind of corem/errors.py included): counted, logged at most once every
        ERROR_LOG_INTERVAL (a device can trigger it), answered."""
        self.handler_errors += 1
        now = time.monotonic()
        if now >= self._next_error_log:  # a bug a device can trigger must not flood the log
            self._next_error_log = now + ERROR_LOG_INTERVAL
            log.error("handler for /%s failed (%d handler errors so far; at most one logged every %d s)",
                      "/".join(path), self.handler_errors, ERROR_LOG_INTERVAL, exc_info=e)
        return refusal(e) if isinstance(e, CoremError) else Response(Code.INTERNAL_SERVER_ERROR, b"internal error")

    def _dispatch(self, req: Request) -> Response | None:
        if self.unwrap is not None:
            refused = self.unwrap(req)
            if refused is not None:
                return refused
        msg = req.message
        assert msg is not None
        bad = first_bad_text(msg.options)
        if bad is not None:
            # 4.00, not 4.02: corem knows the option (a string, RFC 7252 §3.2) and this value breaks
            # its format; 4.02 says an option was not understood (§5.4.1)
            self.invalid_text += 1
            return Response(Code.BAD_REQUEST, f"{option_label(bad)}: not valid UTF-8".encode())
        path = msg.uri_path
        found = _match(self._routes.get(len(path), ()), path)
        if found is None:
            for pattern, methods in self._prefixes:  # the longest prefix that matches
                if len(pattern) < len(path):
                    found = _match([(pattern, methods)], path[: len(pattern)])
                    if found is not None:
                        found[1].append("/".join(path[len(pattern):]))
                        break
        if found is None:
            return NOT_FOUND
        methods, params = found
        req.door = methods.door
        handler = methods.get(msg.code)
        if handler is None:
            return METHOD_NOT_ALLOWED
        if has_conditions(msg) and handler not in self._conditional:
            # no ETags here: a current representation iff it can be read (corem/coap/conditional.py)
            refused = evaluate_conditions(msg, Code.GET in methods)
            if refused is not None:
                if refused.code != Code.PRECONDITION_FAILED or handler not in self._identified:
                    return refused
                req.unmet = bytes(refused.payload).decode()  # (Identity.identify answers it)
        block1 = msg.opt(OptionNumber.BLOCK1) if msg.code in (Code.POST, Code.PUT) else None
        if block1 is not None:
            return self._upload(req, msg, path, handler, params)
        return self._call(handler, req, params, path)

    def _call(self, handler: Handler, req: Request, params: list[str], path: list[str]) -> Response | None:
        msg = req.message
        assert msg is not None
        asked: Block | None = None
        if msg.code == Code.GET:
            try:
                asked = msg.block2
            except ValueError:
                pass  # (szx 7: `block2` answers it)
            if asked is not None and asked.num > 0:  # the rest of what it began to read, if kept
                kept = self.representations.recall(requester(req), req.received_at)
                if kept is not None:
                    return block2(msg, kept)
        try:
            response = handler(req, params)
        except (Refused, StorageUnavailable) as e:  # the request's fault, or the disk's: the answer it carries
            if isinstance(e, StorageUnavailable):
                self.storage_errors += 1
            return refusal(e)
        except Exception as e:  # noqa: BLE001 - a bug: `_failed`
            return self._failed(e, path)
        if response is not None and response.code >> 5 == 2:  # (a representation with its format)
            wanted = msg.accept
            if wanted is not None:
                given = next((decode_uint(v) for n, v in response.options or () if n == OptionNumber.CONTENT_FORMAT),
                             None)
                if given is not None and given != wanted:  # (RFC 7252 §5.10.4: MUST)
                    return Response(Code.NOT_ACCEPTABLE, f"accept: {wanted} cannot be given here; "
                                    f"content-format {given}".encode())
        if response is not None and msg.code == Code.GET:
            if worth_keeping(response, asked):
                self.representations.keep(requester(req), response, req.received_at)
            response = block2(msg, response)
        return response

    def _upload(
        self, req: Request, msg: Message, path: list[str], handler: Handler, params: list[str]
    ) -> Response | None:
        """A Block1 request: 2.31 until the body is complete, then the handler sees it whole.
        Its blocks are one upload when they come from one requester -- the address, and whoever
        the security layer says sent it (OSCORE's device) -- for one request: the path, the query
        and the credentials option a door reads (Drogue's), and the Request-Tag.  The handler,
        which authenticates, sees only the last block: a block from anyone else (unprotected, under
        another context, without the credentials) must start an upload of its own, never join
        this one (an adversarial run stored such a block as another device's reading)."""
        key = (*requester(req), tuple(bytes(v) for n, v in msg.options if n == OptionNumber.DROGUE_AUTH),
               bytes(msg.opt(OptionNumber.REQUEST_TAG) or b""))
        state, result = self.uploads.receive(key, msg, req.received_at, source_host(req.peer))
        if state is not Upload.COMPLETE:
            assert isinstance(result, Response)  # (a Block1 option is there: never Upload.NONE)
            return result
        assert isinstance(result, bytes)
        last = msg.block1
        assert last is not None
        whole = [o for o in msg.options if o[0] != OptionNumber.BLOCK1]
        req.message = Message(msg.type, msg.code, msg.mid, msg.token, whole, result)
        req.echo = [(OptionNumber.BLOCK1, encode_uint(last.to_uint()))]  # the final answer echoes it (§2.3)
        return self._call(handler, req, params, path)


def _match(
    routes: Iterable[tuple[tuple[str | None, ...], Methods]], path: list[str]
) -> tuple[Methods, list[str]] | None:
    """The first route whose pattern matches `path` segment for segment, with its parameters."""
    for pattern, methods in routes:
        params = []
        for want, got in zip(pattern, path):
            if want is None:
                params.append(got)
            elif want != got:
                break
        else:
            return methods, params
    return None
