"""The one admin HTTP port of `corem serve --workers N`, in front of the workers' private ones.

- `/metrics`: every worker's samples (`GET /_worker/metrics`, JSON), summed by name and labels --
  counters, gauges and histogram buckets alike -- except the families that describe the shared
  registry (`metrics.SHARED`), taken from one worker; plus the supervisor's own (`corem_workers*`).
  Each process's process_* and python_gc_* are labelled with its `worker` (the supervisor's
  "supervisor"), so they stay one series per process (corem/metrics.py says why).
- `/healthz`: the supervisor runs; `/readyz`: every worker is ready (each one's own /readyz).
- `/api/devices/{tenant}/{device}...`: to the worker that holds the device (supervisor.py).  An
  RPC for a device no worker has heard waits here, up to its timeout, for one to hear it.
- `/api/status` and `/api/diagnostics/samples`: gathered from every worker into one answer.
- `/api/diagnostics/history`: the UI's charts, sampled here from every worker's counters
  (corem/admin/history.py: a worker started again neither subtracts nor doubles anything).
- everything else (registry, profiles, packages, the UI): to the first ready worker; after a
  change that worked, every worker reloads the registry before the answer goes back.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator, Protocol, Sequence
from urllib.parse import unquote

import trio

from ..admin import token as admin_token
from ..admin.api import STATUS_DEVICES, samples_limit
from ..admin.http import (
    FORWARD_TIMEOUT, HttpError, HttpRequest, HttpServer, Reply, Route, call, forward, json_reply, target,
)
from ..admin.history import History, Totals
from ..metrics import SHARED, ProcessMetrics, gather, render
from ..bus.retention import Pruner
from ..cluster import Nodes, Workers, command_device, rpc_timeout
from ..config import Settings
from ..errors import BadInput
from ..registry.db import Db
from ..listeners import admin_url
from ..stats import Measurement, Sample, counter, gauge
from .samples import decode_samples



class Worker(Protocol):
    """A worker as the front sees it (supervisor.py `Worker`)."""

    @property
    def index(self) -> int: ...
    @property
    def http(self) -> int | None: ...  # its private admin port, once ready
    @property
    def pid(self) -> int | None: ...
    @property
    def ready(self) -> bool: ...
    async def wait_ready(self) -> None: ...


class Supervisor(Protocol):
    """What the front needs of its supervisor (supervisor.py `Supervisor`)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def count(self) -> int: ...
    @property
    def restarts(self) -> int: ...
    @property
    def workers(self) -> Sequence[Worker]: ...
    @property
    def holders(self) -> Workers: ...
    @property
    def pruner(self) -> Pruner | None: ...
    async def refresh_all(self) -> None: ...

log = logging.getLogger("corem.workers.front")

#: seconds a request waits for a worker to be ready (one that is starting again)
READY_WAIT = 10.0
#: seconds a worker has to answer what the front gathers from each (metrics, readiness, status):
#: its own answer takes milliseconds; one that is stuck (a wedged loop, a stopped process) must
#: not hold /metrics and /readyz past a scrape's timeout (Prometheus: 10 s) -- it counts as down
GATHER_TIMEOUT = 5.0


class Front:
    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        s = supervisor.settings
        self.token = s.admin_token or admin_token.read_or_create(s.data_path)
        #: the supervisor's own process_* families (python_info comes from the first worker)
        self.process = ProcessMetrics("supervisor", platform=False)
        self.history = History()
        #: the workers that did not answer the last gathering in time (`_from_each`)
        self.silent: set[int] = set()
        #: each worker's last metrics, by index: (its pid, the answer) -- a silent worker's counters
        #: are its last ones, not gone from the sums (which would read as a counter reset)
        self._last_metrics: dict[int, tuple[int | None, Reply]] = {}
        #: this node's admin URL, and the devices' nodes (a shared registry), once bound
        self.node = ""
        self.nodes: Nodes | None = None
        self.http = HttpServer([
            Route("GET", "/metrics", self.metrics, auth=False),
            Route("GET", "/healthz", lambda r: Reply(200, b"ok\n", "text/plain"), auth=False),
            Route("GET", "/readyz", self.readyz, auth=False),
            Route("GET", "/api/status", self.status),
            Route("GET", "/api/diagnostics/samples", self.samples),
            Route("GET", "/api/diagnostics/history", self.history_reply),
            Route("*", "*", self.forward, auth=False),  # the worker checks the token
        ], admin_token=self.token, max_body=s.admin_max_body)

    async def bind(self, host: str, port: int) -> tuple:
        address = await self.http.bind(host, port)
        s = self.sup.settings
        self.node = s.node_url or admin_url(address)
        if s.registry:  # nodes sharing a registry: where the devices other nodes hold are
            self.nodes = Nodes(Db(s.registry), self.node)
        return address

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.history.run, self.totals)
            await self.http.serve()
            nursery.cancel_scope.cancel()

    # -- forwarding ------------------------------------------------------------------------------
    async def _ready(self, index: int) -> Worker:
        w = self.sup.workers[index]
        with trio.move_on_after(READY_WAIT):
            await w.wait_ready()
        if w.http is None:
            raise HttpError(503, f"worker {index} is starting again; retry")
        return w

    async def _first_ready(self) -> Worker:
        for w in self.sup.workers:
            if w.ready:
                return w
        return await self._ready(0)

    async def forward(self, req: HttpRequest) -> Reply:
        """A request to the worker that carries it out (corem/cluster.py): a device's to the node
        or the worker that holds the device, another node's commands record to the worker that
        holds its device, anything else to the first worker ready."""
        segments = [unquote(s) for s in req.path.strip("/").split("/")]
        body = req.body
        holders = self.sup.holders
        wait = FORWARD_TIMEOUT
        if not self.http.authorized(req.headers):
            # the worker answers it (401 on every route it may reach); nothing of it is kept here --
            # a device parked on a worker for a request without the token was a set anyone could
            # grow (an adversarial run: +43 MB from 3,000 unauthenticated DELETEs of long names)
            w = await self._first_ready()
        elif len(segments) >= 4 and segments[:2] == ["api", "devices"]:
            key = (segments[2], segments[3])
            elsewhere = self._held_elsewhere(key, req)
            if elsewhere is not None:  # another node's (a shared registry): it carries it out
                assert self.nodes is not None
                return await self.nodes.forward(elsewhere, req)
            if req.method == "POST" and segments[4:] == ["rpc"]:
                timeout = rpc_timeout(body)  # (0: a body the worker refuses, naming what is wrong)
                if timeout and not holders.holds(key):
                    body = await self._until_heard(key, body, timeout)
                wait = max(FORWARD_TIMEOUT, timeout + 30.0)  # (the worker answers when it ends)
            w = await self._ready(holders.holder(key, park=req.method not in ("GET", "HEAD")))
        elif segments[:2] == ["_node", "commands"] and len(segments) == 3:  # another node's commands record
            w = await self._ready(holders.holder(command_device(segments[2], body), park=True))
        else:
            w = await self._first_ready()
        try:
            reply = await forward(_local(w.http), req, body=body, timeout=wait)
        except (OSError, trio.TooSlowError) as e:  # the worker died meanwhile, or hangs
            why = e if isinstance(e, OSError) else f"no answer in {wait:g} s"
            raise HttpError(503, f"worker {w.index} did not answer ({why}); retry") from None
        if req.method not in ("GET", "HEAD") and reply.status < 300:
            await self.sup.refresh_all()  # every worker has the change before the caller goes on
        return reply

    def _held_elsewhere(self, key: tuple[str, str], req: HttpRequest) -> str | None:
        """The admin URL of the node that holds the device, if it is another node (nodes sharing
        a PostgreSQL registry); None for this node or no other.  Reads are served here."""
        if self.nodes is None or req.method in ("GET", "HEAD"):
            return None
        if self.sup.holders.holds(key):  # one of this node's workers holds it
            return None
        return self.nodes.elsewhere(key, req.headers)

    async def _until_heard(self, key: tuple[str, str], body: bytes, timeout: float) -> bytes:
        """An RPC waits for its device, which only the worker that hears it can reach: wait here
        (up to the RPC's own `timeout`) for a worker to hear it; the body then says what is left
        of the timeout (nothing left: the worker expires the RPC, as it would have)."""
        request = json.loads(body)
        started = trio.current_time()
        await self.sup.holders.until_heard(key, max(0.0, min(timeout, FORWARD_TIMEOUT)))
        request["timeout"] = max(0.001, timeout - (trio.current_time() - started))
        return json.dumps(request).encode()

    # -- gathered answers ------------------------------------------------------------------------
    async def _from_all(self, method: str, path: str) -> list[Reply]:
        """One answer from each ready worker (those that fail are left out), by worker index."""
        return [r for _, r in sorted(await self._from_each(method, path), key=lambda ir: ir[0])]

    async def _from_each(self, method: str, path: str, *, ok_only: bool = True) -> list[tuple[int, Reply]]:
        """Each worker's answer within GATHER_TIMEOUT (its 200s only, unless `ok_only` is False); one
        that gives none is left out and counts as down (`corem_worker_up` 0) until it answers again."""
        replies: list[tuple[int, Reply]] = []

        async def one(w: Worker) -> None:
            try:
                replies.append((w.index, await call(_local(w.http), method, path, b"",
                                                    {"authorization": f"Bearer {self.token}"}, GATHER_TIMEOUT)))
                self.silent.discard(w.index)
            except (OSError, HttpError, trio.TooSlowError) as e:
                self.silent.add(w.index)
                log.warning("worker %d did not answer %s: %s", w.index, path, e or "no answer in time")

        async with trio.open_nursery() as nursery:
            for w in self.sup.workers:
                if w.http is not None:
                    nursery.start_soon(one, w)
        return [(i, r) for i, r in replies if r.status == 200 or not ok_only]

    async def totals(self) -> dict[Any, Totals]:
        """Each worker's counters as the UI's charts read them, by (index, pid): a worker started
        again is a new source (its counters began again at zero)."""
        out: dict[Any, Totals] = {}
        for index, reply in await self._from_each("GET", "/_worker/metrics"):
            pid = self.sup.workers[index].pid
            out[index, pid] = Totals.of(gather([(_Listed(decode_samples(json.loads(reply.body))), {})]))
        return out

    async def history_reply(self, req: HttpRequest) -> Reply:
        return json_reply(self.history.snapshot(await self.totals()))

    async def metrics(self, req: HttpRequest) -> Reply:
        fresh = dict(await self._from_each("GET", "/_worker/metrics"))
        for w in self.sup.workers:
            if w.index in fresh:
                self._last_metrics[w.index] = (w.pid, fresh[w.index])
            elif w.http is not None and w.index in self._last_metrics and self._last_metrics[w.index][0] == w.pid:
                fresh[w.index] = self._last_metrics[w.index][1]  # (silent: its last counters, up 0)
        each = sorted(fresh.items(), key=lambda ir: ir[0])
        sources = [decode_samples(json.loads(r.body)) for _, r in each]
        own = _Listed(list(self.own_metrics()))
        for (index, _), samples in zip(each, sources):  # how the load spreads: labelled, not summed
            own.samples.append(gauge("corem_worker_requests", sum(
                m.value for m in samples if isinstance(m, Sample) and m.name == "corem_coap_requests"),
                worker=str(index)))
        parts: list[tuple[Any, dict[str, str]]] = [(_Listed(list(merge_shared(sources))), {}), (own, {})]
        return Reply(200, render(lambda: parts), "text/plain; version=0.0.4; charset=utf-8")

    def own_metrics(self) -> Iterator[Sample]:
        up = [w.http is not None and w.index not in self.silent for w in self.sup.workers]
        yield gauge("corem_workers", sum(up))
        yield counter("corem_worker_restarts", self.sup.restarts)
        for w, is_up in zip(self.sup.workers, up):
            yield gauge("corem_worker_up", float(is_up), worker=str(w.index))
        if self.sup.pruner is not None:  # (the bus's retention runs in the supervisor)
            yield from self.sup.pruner.metrics()
        yield from self.process.metrics()

    async def readyz(self, req: HttpRequest) -> Reply:
        replies = [r for _, r in await self._from_each("GET", "/readyz", ok_only=False)]
        missing = self.sup.count - sum(r.status == 200 for r in replies)
        if missing:  # (with the reasons the workers give, as one process gives its own)
            why = sorted({r.body.decode(errors="replace").strip() for r in replies if r.status != 200} - {""})
            text = f"{missing} of {self.sup.count} workers not ready" + (f": {'; '.join(why)}" if why else "")
            return Reply(503, f"{text}\n".encode(), "text/plain")
        return Reply(200, b"ready\n", "text/plain")

    async def status(self, req: HttpRequest) -> Reply:
        return json_reply(merge_status([json.loads(r.body) for r in await self._from_all("GET", target(req))]))

    async def samples(self, req: HttpRequest) -> Reply:
        """Every worker's rejected samples (each a JSON list, newest first), merged newest first
        under the one limit (checked here as a worker checks it)."""
        limit = samples_limit(req.query)
        replies = await self._from_all("GET", target(req))
        merged = sorted((s for r in replies for s in json.loads(r.body)), key=lambda s: s["at"], reverse=True)
        return json_reply(merged[:limit])


class _Listed:
    """Samples already gathered, as a component for `metrics.render`."""

    def __init__(self, samples: list[Measurement]) -> None:
        self.samples = samples

    def metrics(self) -> list[Measurement]:
        return self.samples


def merge_shared(sources: list[list[Measurement]]) -> Iterator[Measurement]:
    """All workers' samples, but those of `SHARED` families from the first worker only (every
    worker reads the same registry: a sum would count each device N times)."""
    for i, samples in enumerate(sources):
        for m in samples:
            if i == 0 or m.name not in SHARED:
                yield m


def merge_status(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' `/api/status` as one: counts added, devices from all (most recent first), the
    registry's size once."""
    if not parts:
        return {}
    out = dict(parts[0])
    for key in ("points", "rejections", "auth_failures", "bus_refusals", "requests", "online", "samples"):
        out[key] = sum(p.get(key, 0) for p in parts)
    out["bus"] = dict(parts[0]["bus"], pending=sum(p["bus"]["pending"] for p in parts),
                      error=next((p["bus"]["error"] for p in parts if p["bus"]["error"]), None))
    devices = sorted((d for p in parts for d in p["devices"]), key=lambda d: d.get("last_seen") or 0, reverse=True)
    out["devices"] = devices[:STATUS_DEVICES]
    dtls = [p["dtls"] for p in parts if p.get("dtls")]
    if dtls:
        failed: dict[str, int] = {}
        for d in dtls:
            for reason, n in d["failed"].items():
                failed[reason] = failed.get(reason, 0) + n
        out["dtls"] = {k: sum(d[k] for d in dtls) for k in ("live", "offloaded", "handshaking", "completed")}
        out["dtls"]["failed"] = failed
    out["workers"] = len(parts)
    return out


def _local(port: int | None) -> str:
    """A worker's private admin port as the base of a URL."""
    if port is None:
        raise HttpError(503, "worker not ready")
    return admin_url(("127.0.0.1", port))

