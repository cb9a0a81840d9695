"""A server's operations routes: `/metrics` (every component's samples, corem/metrics.py),
`/healthz` (alive), `/readyz` (every listener bound and the bus reachable, as the sink and the
DTLS session stores see it), documented in the OpenAPI document; and in a worker, the front's
`/_worker/metrics` (the same samples, as JSON rows: workers/samples.py)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from .admin.http import HttpRequest, Reply, Route, json_reply
from .bus import Sink
from .metrics import gather, render
from .stats import Measured, Sample, gauge
from .transports import Transports
from .workers.samples import encode_samples

Components = Callable[[], Iterable[tuple[Measured, dict[str, str]]]]
TEXT = "text/plain; version=0.0.4; charset=utf-8"


class Health:
    def __init__(self, components: Components, sink: Sink, transports: Transports) -> None:
        self.components, self.sink, self.transports = components, sink, transports
        #: every listener bound and serving (the server sets it once started, clears it at the stop)
        self.ready = False

    def metrics(self) -> Iterator[Sample]:
        """Whether the bus is reachable now, as /readyz judges it."""
        yield gauge("corem_bus_not_ready", float(self.sink.probe() is not None))

    def routes(self) -> list[Route]:
        """The documented operations routes (no token: a probe or Prometheus calls them)."""
        return [Route("GET", path, fn, auth=False, doc={"id": op, "tag": "operations", "summary": summary,
                                                        "content": "text/plain", "error_content": "text/plain",
                                                        "errors": errors})
                for path, fn, op, summary, errors in (
            ("/metrics", self._metrics, "getMetrics", "Prometheus metrics (text exposition format 0.0.4)", {}),
            ("/healthz", self._healthz, "getHealth", "Alive: answers while the process runs", {}),
            ("/readyz", self._readyz, "getReadiness", "Ready: every listener bound and the bus reachable",
             {503: ("Starting, or what is not ready, one line each (e.g. the bus)", str)}),
        )]

    def worker_route(self) -> Route:
        """For the supervisor's front (corem/workers/front.py): this worker's samples."""
        return Route("GET", "/_worker/metrics", self._worker_metrics)

    def _metrics(self, req: HttpRequest) -> Reply:
        return Reply(200, render(self.components), TEXT)

    def _healthz(self, req: HttpRequest) -> Reply:
        return Reply(200, b"ok\n", "text/plain")

    def _readyz(self, req: HttpRequest) -> Reply:
        """Ready: every listener bound and the bus reachable, by the sink's own view (librdkafka's
        broker states and errors; the embedded bus's last write)."""
        if not self.ready:
            return Reply(503, b"starting\n", "text/plain")
        bus = self.sink.probe()
        problems = ([f"bus: {bus}"] if bus is not None else []) + [
            f"dtls session store: {t.dtls.store.last_error}"  # (the data dir's disk, as a rule)
            for t in self.transports if t.dtls is not None and t.dtls.store.last_error]
        if problems:
            return Reply(503, "".join(p + "\n" for p in problems).encode(), "text/plain")
        return Reply(200, b"ready\n", "text/plain")

    def _worker_metrics(self, req: HttpRequest) -> Reply:
        return json_reply(encode_samples(gather(self.components())))
