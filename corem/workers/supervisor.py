"""`corem serve --workers N`: N worker processes, one server to the outside.

The supervisor
- binds every UDP listener N times on one port (SO_REUSEPORT) and steers each peer to one socket
  (a TCP listener once: every worker accepts connections on it, the kernel spreads them)
  (steer.py).  It keeps all the sockets for its whole life and hands socket i to worker i: a
  worker that dies and restarts gets the same socket back, with the datagrams that queued on it
  meanwhile, and so the same peers;
- starts the workers (`python -m corem.workers`), restarts one that exits (0.1 s, doubling to 5 s
  while it keeps dying young), and stops them on SIGTERM -- each commits and answers what it
  accepted and saves its DTLS sessions, as a single `corem serve` does;
- serves the one admin HTTP port (front.py): /metrics summed over the workers, the admin API and
  the UI forwarded to them, each device's downlink to the worker that holds the device;
- answers the CLI's registry nudges for the data dir and relays them to every worker.

Which worker holds a device: the one that last announced hearing it first (corem/cluster.py
`Workers`).  When a device's datagrams move to another worker (its address changed), that worker
announces it, and the supervisor tells the old one, which hands over what it queued for the
device.  The messages between them: control.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any

import trio

from .. import datadir
from ..admin import token as admin_token
from ..bus import topics
from ..config import SECRETS, ConfigError, Settings
from ..logs import SERVE, address, fields
from ..net import fdlimit
from ..cluster import Workers
from ..registry import nudge as registry_nudge
from ..reload import RELOADED, Report, applied, apply_log_format, apply_log_level, changed, restart_needed
from .. import listeners
from ..listeners import Bound
from ..stores import make_pruner
from . import control, steer
from .front import Front
from .control import Adopt, Command, Handover, Here, Moved, Ready, Refresh, Refreshed, Reload, Reloaded, RpcReply, RpcReplied
from .link import ENV, WorkerSpec

log = logging.getLogger("corem.workers")

#: seconds a worker is given to finish (commit, answer, save sessions) after SIGTERM
STOP_GRACE = 30.0
#: a worker that ran at least this long before exiting is restarted at once (not backed off)
HEALTHY_UPTIME = 10.0
MAX_BACKOFF = 5.0

#: how long a SIGHUP waits for every worker's report (nobody waits on a reload: a busy machine's
#: worker is waited for, not reported as silent)
RELOAD_WAIT = 30.0


@dataclass
class Worker:
    index: int
    process: trio.Process | None = None
    control: trio.socket.SocketType | None = None
    raw: socket.socket | None = None  # the same socket, for sends that do not wait
    http: int | None = None  # its private admin port, once ready
    pid: int | None = None
    starts: int = 0

    @property
    def ready(self) -> bool:
        return self.http is not None

    async def wait_ready(self) -> None:
        """Until this worker -- this process or the one started after it -- serves."""
        while self.http is None:
            await trio.sleep(0.02)


#: COREM_* variables that are not settings and go to the workers as they are: the Python twins of
#: the C code (corem/c_twins.py) must run in the workers too, where the traffic is handled
PASSED = frozenset({"COREM_PURE_PYTHON"})


class Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        fdlimit.raise_limit()  # first: the front's connection cap is derived from it (issue 26)
        self.settings = settings
        topics.configure(settings.topic_prefix)
        self.count = count
        self._lock = datadir.take(settings)
        try:
            datadir.create_files(settings)
        except BaseException:
            datadir.release(self._lock)
            raise
        self.groups: dict[str, list[socket.socket]] = {}
        self.steered: dict[str, bool] = {}
        self.bound = Bound()
        try:
            for key in ("coap", "coaps"):
                address = settings.listener(key)
                if address is not None:
                    self.groups[key] = self._group(key, *address)
                    setattr(self.bound, key, self.groups[key][0].getsockname())
            for key in ("coap_tcp", "coaps_tcp"):  # one listening socket: every worker accepts on it
                address = settings.listener(key)
                if address is not None:
                    listening = listeners.tcp(key, *address)
                    self.groups[key] = [listening] * count
                    setattr(self.bound, key, listening.getsockname())
        except BaseException:
            self._close()
            raise
        self.workers = [Worker(i) for i in range(count)]
        #: which worker holds each device it heard (see the module docstring)
        self.holders = Workers()
        self.restarts = 0
        self._refreshes: dict[int, tuple[set[int], trio.Event]] = {}
        #: SIGHUP: the workers not done reloading, set when all are, and their reports
        self._reloads: dict[int, tuple[set[int], trio.Event, dict[int, dict[str, Any]]]] = {}
        self._reload_lock = trio.Lock()
        self._refresh_ids = 0
        self._stopping = False
        self._started = False
        #: why the workers could not start (a setting only a worker checks, e.g. a cipher name)
        self.failed: str | None = None
        self._stop = trio.Event()
        self.front = Front(self)
        #: the embedded bus's retention: here, not in a worker (one pruner per data dir)
        self.pruner = make_pruner(settings)

    def _group(self, key: str, host: str, port: int) -> list[socket.socket]:
        """N sockets on one port (the first may pick it), steered by peer.

        A SO_REUSEPORT group admits any socket of the same user that asks to join, so the port is
        first bound plainly: if another process holds it (a second corem, with or without
        --workers), that bind fails and the start ends with one line.  Once the group is bound,
        corem's steering program only ever picks indices below N: a socket that joins later
        (index N or more) is never handed a datagram."""
        group: list[socket.socket] = []
        try:
            probe = listeners.udp(key, host, port)
            port = probe.getsockname()[1]
            probe.close()
            for _ in range(self.count):
                group.append(listeners.udp(key, host, port, reuse_port=True))
                port = group[0].getsockname()[1]
        except ConfigError:
            for s in group:
                s.close()
            raise
        # (CoAPS: a record with a Connection ID goes to the worker its CID names, steer.program)
        self.steered[key] = steer.attach(group[0], self.count, cid=key == "coaps")
        if not self.steered[key]:
            log.warning("%s: the kernel refused the steering program; its own hash steers peers", key)
        return group

    def stop(self) -> None:
        self._stop.set()

    # -- the workers -----------------------------------------------------------------------------
    def _spec(self, w: Worker, control: int) -> WorkerSpec:
        fds = {k: g[w.index].fileno() for k, g in self.groups.items()}
        return WorkerSpec(w.index, self.count, control, fds, steered=all(self.steered.values()))

    def _worker_settings(self, settings: Settings) -> dict[str, Any]:
        """A worker's settings: the supervisor's, with its private admin port."""
        values = asdict(settings)
        values.update(http=address(("127.0.0.1", 0)), workers="1")
        for secret in SECRETS:  # (a secret from a file: the worker reads the file, not the environment)
            if values[secret + "_file"]:
                values[secret] = ""
        if settings.registry and self.front.node:
            values["node_url"] = self.front.node  # the node is its front
        return values

    def _environment(self, spec: WorkerSpec) -> dict[str, str]:
        """A worker's environment: the supervisor's without its settings (the worker gets them as
        COREM_WORKER_SETTINGS), but with the variables that are not settings and that the worker
        reads itself (`PASSED`: COREM_PURE_PYTHON)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("COREM_") or k in PASSED}
        env[ENV] = spec.dumps()
        env["COREM_WORKER_SETTINGS"] = json.dumps(self._worker_settings(self.settings))
        return env

    async def _keep(self, w: Worker) -> None:
        """Run worker `w`; start it again whenever it exits, until the supervisor stops."""
        backoff = 0.1
        while not self._stopping:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            spec = self._spec(w, theirs.fileno())
            try:
                w.process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "corem.workers"], env=self._environment(spec),
                    pass_fds=(theirs.fileno(), *spec.fds.values()))
            finally:
                theirs.close()
            w.starts += 1
            w.raw, w.control = mine, trio.socket.from_stdlib_socket(mine)
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, w)
                await w.process.wait()
                nursery.cancel_scope.cancel()
            w.control.close()
            w.control, w.raw, w.http, w.pid = None, None, None, None
            for waiting, done in list(self._refreshes.values()):  # nobody to wait for there now
                waiting.discard(w.index)
                if not waiting:
                    done.set()
            if self._stopping:
                return
            code = w.process.returncode or 0
            if code == 2 and not self._started:  # it refused the settings (its message is above)
                self.failed = f"worker {w.index} refused the settings (status 2)"
                self._stop.set()
                return
            self.restarts += 1
            backoff = 0.1 if trio.current_time() - started >= HEALTHY_UPTIME else min(backoff * 2, MAX_BACKOFF)
            exited = f"signal {-code}" if code < 0 else f"status {code}"
            log.warning("worker %d exited (%s); starting it again in %.1f s", w.index, exited, backoff,
                        extra=fields(index=w.index, exit=exited, restart_in=backoff))
            await trio.sleep(backoff)

    async def _listen(self, w: Worker) -> None:
        assert w.control is not None
        while True:
            try:
                data = await w.control.recv(1 << 20)
            except ConnectionResetError:  # it exited with our messages unread: the same end
                return
            if not data:
                return
            try:
                message = control.to_supervisor(data)
            except control.Garbled as e:  # (a bug: said, and the worker goes on)
                log.error("worker %d sent a message the supervisor does not take (%s)", w.index, e)
                continue
            self._heard_from(w, message)

    def _heard_from(self, w: Worker, message: control.ToSupervisor) -> None:
        if isinstance(message, Ready):
            w.http, w.pid = message.http, message.pid
            log.info("worker %d ready (pid %d)", w.index, w.pid, extra=fields(index=w.index, pid=w.pid))
        elif isinstance(message, Here):
            for key in message.devices:
                before = self.holders.arrived(key, w.index)
                if before is not None:  # it hands over what it queued for the device
                    self.post(before, Moved(key, w.index))
        elif isinstance(message, Refreshed):
            pending = self._refreshes.get(message.n)
            if pending is not None:
                pending[0].discard(w.index)
                if not pending[0]:
                    pending[1].set()
        elif isinstance(message, Reloaded):
            reloading = self._reloads.get(message.n)
            if reloading is not None:
                reloading[0].discard(w.index)
                reloading[2][w.index] = message.report
                if not reloading[0]:
                    reloading[1].set()
        elif isinstance(message, Handover):
            self.post(message.to, Adopt(message.device, message.state))
        elif isinstance(message, RpcReply):  # to the worker that numbered the RPC (downlink.number_ids)
            self.post((message.id - 1) % self.count, message)
        elif isinstance(message, RpcReplied):  # back to the worker whose device is waiting for its answer
            if 0 <= message.to < self.count:
                self.post(message.to, message)
        elif isinstance(message, Command):
            self.post(self.holders.holder(message.device, park=True), message)

    def post(self, index: int, message: control.ToWorker) -> None:
        """Send `message` to worker `index` if it runs (a worker that is starting again lost what
        it held anyway)."""
        raw = self.workers[index].raw
        if raw is None:
            return
        try:
            raw.send(control.encode(message), socket.MSG_DONTWAIT)
        except OSError as e:
            log.warning("worker %d: could not pass a message on (%s)", index, e)

    async def refresh_all(self) -> None:
        """Every running worker reloads the registry; returns when all have (or have exited)."""
        self._refresh_ids += 1
        n = self._refresh_ids
        waiting = {w.index for w in self.workers if w.control is not None and w.ready}
        done = trio.Event()
        if not waiting:
            return
        self._refreshes[n] = (waiting, done)
        for i in list(waiting):
            self.post(i, Refresh(n))
        with trio.move_on_after(registry_nudge.WAIT):
            await done.wait()
        del self._refreshes[n]

    async def reload(self, new: Settings, *, quiet: bool = False) -> Report:
        """SIGHUP (corem/reload.py): the supervisor's own log level, log format and admin token, then every
        running worker reloads with the new settings (the credentials' files and the registry read
        again in each); one line for all.  What the workers applied is kept for the workers that
        start later; the rest needs a restart."""
        async with self._reload_lock:
            old, report = self.settings, Report()
            keys = changed(old, new)
            apply_log_level(old, new, report)
            apply_log_format(old, new, report)  # (its own lines: each worker swaps its own)
            if "admin_token" in keys or "admin_token_file" in keys:
                self.front.token = new.admin_token or admin_token.read_or_create(new.data_path)
                self.front.http.admin_token = self.front.token
            self._refresh_ids += 1
            n = self._refresh_ids
            waiting = {w.index for w in self.workers if w.control is not None and w.ready}
            reports: dict[int, dict[str, list[str]]] = {}
            done = trio.Event()
            self._reloads[n] = (waiting, done, reports)
            values = self._worker_settings(new)
            for i in sorted(waiting):
                self.post(i, Reload(n, values))
            with trio.move_on_after(RELOAD_WAIT) as late:
                if waiting:
                    await done.wait()
            del self._reloads[n]
            for i in sorted(reports):
                report.merge(reports[i], prefix=f"worker {i}: ")
            if late.cancelled_caught:
                report.failed.append(f"workers {', '.join(map(str, sorted(waiting)))} did not answer in "
                                     f"{RELOAD_WAIT:.0f} s")
            report.restart += [k for k in restart_needed(keys) if k not in report.restart]
            keep = [k for k in keys if k in RELOADED and k not in report.restart]
            if any("dtls credentials" in f for f in report.failed):
                keep = [k for k in keep if k not in ("dtls_cert", "dtls_key", "dtls_ca")]
            self.settings = applied(old, new, keep)
            if ("admin_token" in keys or "admin_token_file" in keys) and "admin_token" not in report.done:
                report.done.insert(0, "admin_token")  # (the front's; the workers said so too, if they took it)
            report.where = f"{len(reports)} of {self.count} workers"
            if not quiet:
                log.log(report.level, "%s", report.line())
            return report

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                http = self.settings.listener("http")
                if http is not None:  # first: the workers are told its address (node_url)
                    self.bound.http = await listeners.http(self.front, *http)
                    nursery.start_soon(self.front.serve)
                for w in self.workers:
                    nursery.start_soon(self._keep, w)
                await nursery.start(registry_nudge.serve, self.settings.data_path, self._nudged)
                if self.pruner is not None:
                    nursery.start_soon(self.pruner.run)
                while not all(w.ready for w in self.workers) and not self._stop.is_set():
                    await trio.sleep(0.02)
                if self.failed is not None:
                    await self._stop_workers()
                    raise ConfigError(self.failed)
                log.info("started %d workers", self.count, extra=fields(
                    workers=self.count, **{k: v for k, v in vars(self.bound).items() if v is not None},
                    data_dir=self.settings.data_dir, steering="corem" if all(self.steered.values()) else "kernel"))
                task_status.started(self.bound)
                self._started = True
                await self._stop.wait()
                await self._stop_workers()
                nursery.cancel_scope.cancel()
        finally:
            self._close()
            logging.getLogger(SERVE).info("stopped")  # (corem/logs.py)

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker; SIGKILL to one still running after STOP_GRACE."""
        log.info("stopping %d workers", self.count)
        self._stopping = True
        with trio.move_on_after(STOP_GRACE) as grace:
            for w in self.workers:
                if w.process is not None and w.process.returncode is None:
                    w.process.send_signal(signal.SIGTERM)
            for w in self.workers:
                if w.process is not None:
                    await w.process.wait()
        if grace.cancelled_caught:
            for w in self.workers:
                if w.process is not None and w.process.returncode is None:
                    log.error("worker %d did not stop in %.0f s: killed", w.index, STOP_GRACE)
                    w.process.kill()

    async def _nudged(self, force: bool = False) -> None:
        await self.refresh_all()

    def _close(self) -> None:
        for group in self.groups.values():
            for s in group:
                s.close()
        datadir.release(self._lock)
