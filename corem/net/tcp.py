"""CoAP over TCP and TLS (RFC 8323), the Trio edge: one task pair per connection (a reader that
frames and dispatches, a writer that drains the connection's queue), a `StreamEndpoint` shared by
the listener's connections, TLS 1.2 on corem's own engine (`corem.dtls.engine.tls`: the DTLS
engine's handshake in TLS's framing; that module says why) with the DTLS listener's credentials
and settings (`dtls.layer.engine_params`: PSK identities and certificates from the registry,
`dtls_ca`, `dtls_client_auth`).

Bounded: connections (`max_connections`, lowered to this listener's share of the open files limit by
`fdlimit.tcp_cap`; more are closed at once and counted; out of descriptors, accept() refuses and
the listener goes on: `fdlimit.Acceptor`), message size (what
corem's CSM announces; a larger frame aborts the connection), bytes queued to a connection that
does not read (`MAX_QUEUED`: it is closed), idle time (`idle_timeout`: a connection silent that long
gets a Release and is closed), and the TLS handshake's time.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import trio

from ..codec import MessageFormatError
from ..coap import Router
from ..coap.observe import Observers
from ..coap.stream import (ABORT, CSM, MAX_MESSAGE_SIZE, PING, PONG, RELEASE, FrameError, Framer, StreamEndpoint,
                           csm_max_message, message, signal, signal_options)
from ..dtls.engine.connection import FAILED, Params
from ..dtls.engine.crypto import suite_by_name
from ..dtls.engine.tls import TlsConnection
from ..dtls.params import registered, registry_psk
from ..stats import Sample, counter, gauge
from .fdlimit import Acceptor, tcp_cap

if TYPE_CHECKING:
    from ..dtls.params import DtlsParams

log = logging.getLogger("corem.tcp")

#: what ends a connection from the other side (or a broken network)
GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: bytes waiting for a connection that does not read, before it is closed
MAX_QUEUED = 1 << 20
#: bytes not yet sent on all of a listener's connections together: past it, the connection that
#: adds to them is closed as a slow reader -- MAX_QUEUED alone let 40 connections that each read
#: nothing hold 40 MB, and every connection the listener takes as much (an adversarial run)
MAX_UNSENT = 64 << 20
READ_SIZE = 65536
#: seconds a connection's writer may wait for the peer to take a byte (its receive window shut):
#: then the connection is closed.  Without it, a peer that never read held its writer -- and so its
#: slot, its source's count and its share of MAX_UNSENT -- for ever once its reader had ended (a
#: Release, an idle timeout), and a few hundred such filled MAX_UNSENT for everyone (a review)
WRITE_STALL = 30.0
#: bytes the writer hands to the stream at a time (each within WRITE_STALL)
WRITE_SIZE = 65536
#: TLS suites for coaps+tcp: the DTLS listener's, and the GCM ones TLS clients usually prefer
TLS_EXTRA_CIPHERS = ("TLS-PSK-WITH-AES-128-GCM-SHA256", "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256")


@dataclass(frozen=True)
class TcpParams:
    max_connections: int = 10_000
    #: connections of one source address (an adversarial run held all 9,616 from one host, idle,
    #: and every other device was closed at once for the idle timeout)
    max_per_source: int = 1000
    #: the Max-Message-Size corem's CSM announces: a larger frame aborts the connection
    max_message: int = 8192 + 1024
    idle_timeout: float = 600.0
    handshake_timeout: float = 30.0


class Tls:
    """The coaps+tcp server side: the engine's TLS 1.2 with the CoAPS layer's credentials and
    settings (`engine_params`, as `dtls.layer.EngineServer` builds them: the suites of
    `dtls_ciphers` and the GCM ones TLS clients usually prefer, the certificate and key, `dtls_ca`
    and `dtls_client_auth` required | none | optional); PSKs and certificates name devices in the
    registry."""

    def __init__(self, psk_lookup: Callable[[str], Any], params: DtlsParams, cert_lookup: Callable[[str], Any],
                 client_auth: str | None = None) -> None:
        """`client_auth`: the `dtls_client_auth` setting itself when it is "optional" (DtlsParams,
        python-mbedtls's, carries it as "required"), as EngineServer is given it"""
        self.psk_lookup = psk_lookup
        self.cert_lookup = cert_lookup
        self.params = self.with_credentials(params, client_auth)

    def with_credentials(self, params: DtlsParams, client_auth: str | None = None) -> Params:
        """The TLS parameters of these settings, their certificate, key and CA read now (at start,
        and at SIGHUP: corem/reload.py; ValueError or OSError if they do not load).  Assigned to
        `params`, they are what the connections accepted from then on use."""
        from ..dtls.layer import engine_params  # (the CoAPS layer's: not imported with the plain edge)

        ep = engine_params(params, cid_length=0, client_auth=client_auth)
        suites = tuple(dict.fromkeys((*ep.suites, *(suite_by_name(n) for n in TLS_EXTRA_CIPHERS))))
        return Params(suites=suites, require_ems=ep.require_ems, certificate_chain=ep.certificate_chain,
                      private_key=ep.private_key, verify_peer=ep.verify_peer, client_auth=ep.client_auth,
                      admit_certificate=functools.partial(registered, self.cert_lookup))

    def psk_for(self, identity: bytes) -> bytes | None:
        return registry_psk(self.psk_lookup, identity)

    def connection(self, peer: Any, now: float) -> TlsConnection:
        return TlsConnection("server", self.params, peer, now, psk_for=self.psk_for)

    def device(self, conn: TlsConnection) -> tuple[Any, bool]:
        """The device the handshake authenticated (None: none, a device that names itself later
        with a token), and False for a certificate that verified but is not registered"""
        if conn.peer_chain:
            device = self.cert_lookup(conn.identity.decode())
            return device, device is not None
        if conn.suite is not None and conn.suite.kx == "psk":
            return self.psk_lookup(conn.identity.decode(errors="replace")), True
        return None, True


class Connection:
    """One connection's state: its framer, the peer's limits, and what waits to be written."""

    def __init__(self, stream: trio.SocketStream, peer: Any, max_message: int) -> None:
        self.stream = stream
        self.peer = peer
        self.framer = Framer(max_message)
        self.device: Any = None
        self.tls: TlsConnection | None = None  # coaps+tcp
        self.tls_over = False  # the TLS connection ended (close_notify, a fault): read no more
        self.early = b""  # plaintext that came with the end of the handshake
        self.csm = False  # the peer's CSM came (RFC 8323 §5.3.1: before anything else)
        self.queued = bytearray()
        self.wake = trio.Event()
        self.closing = False
        self.aborted = False  # corem sent Abort
        self.reading = trio.CancelScope()  # cancelled at a stop (`TcpEdge.stop_reading`)


class TcpEdge:
    """Serves one TCP listener (plain, or TLS with `tls`) with the router of its transport."""

    def __init__(self, sock: socket.socket, endpoint: StreamEndpoint, router: Router, observers: Observers,
                 params: TcpParams, *, tls_server: Tls | None = None, after_dispatch: Callable[[], object] | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.router = router
        self.observers = observers
        self.params = params
        self.tls = tls_server
        self.after_dispatch = after_dispatch
        self.clock = clock
        self.connections: dict[Any, Connection] = {}
        #: `params.max_connections`, or less: what fits below the open files limit (raised at start)
        self.max_connections = tcp_cap(params.max_connections)
        self._per_source: Counter[str] = Counter()  # connections open by source address
        self.unsent = 0  # bytes queued or being sent on every connection (MAX_UNSENT)
        self._acceptor: Acceptor | None = None
        self._serial = 0
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._finished = trio.Event()
        self.stats: Counter[str] = Counter()
        sockname = sock.getsockname()
        self.address: tuple[str, int] = (sockname[0], sockname[1])

    # -- metrics -----------------------------------------------------------------------------
    def metrics(self) -> Iterator[Sample]:
        st = self.stats
        yield gauge("corem_tcp_connections", len(self.connections))
        yield counter("corem_tcp_connections_accepted", st["accepted"])
        yield counter("corem_tcp_connections_refused", st["refused"])
        yield counter("corem_tcp_connections_refused_no_fds", 0 if self._acceptor is None else self._acceptor.refused)
        for reason in ("frame", "too_large", "bad_message", "idle", "slow_reader", "write_stall", "handshake", "tls",
                       "peer_abort", "unregistered_certificate"):
            yield counter("corem_tcp_connections_aborted", st["aborted_" + reason], reason=reason)
        yield counter("corem_tcp_pings", st["pings"])
        yield counter("corem_tcp_truncated_frames", st["truncated"])
        yield counter("corem_tcp_internal_errors", st["internal_errors"])
        yield counter("corem_tcp_bytes_received", st["bytes_in"])
        yield counter("corem_tcp_bytes_sent", st["bytes_out"])

    def device(self, peer: Any) -> Any:
        """The device a coaps+tcp connection's handshake authenticated (PSK, or a certificate)."""
        conn = self.connections.get(peer)
        return None if conn is None else conn.device

    # -- serving -----------------------------------------------------------------------------
    async def hold(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Where the connections live, from the start until `finish`: beyond the accepting task, so
        that at a stop the answers of the last commits still reach their connections."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._finished.wait()
            nursery.cancel_scope.cancel()

    async def serve(self) -> None:
        """Accept connections (into `hold`'s nursery) until cancelled."""
        assert self._nursery is not None, "hold() runs first"
        acceptor = self._acceptor = Acceptor(trio.socket.from_stdlib_socket(self.sock), "coap over tcp")
        try:
            while True:
                try:  # (out of file descriptors: the Acceptor refuses and goes on)
                    stream = await acceptor.accept()
                except OSError as e:  # anything else the kernel says: never the end of corem
                    log.warning("coap over tcp: accept failed (%s); trying again in 0.1 s", e)
                    await trio.sleep(0.1)
                    continue
                self._nursery.start_soon(self._connection, stream)
        finally:
            acceptor.close()

    def stop_reading(self) -> None:
        """At a stop: no more requests; each connection waits for `finish` (its last answers)."""
        self._stopping = True
        for conn in self.connections.values():
            conn.reading.cancel()

    async def finish(self, timeout: float = 2.0) -> None:
        """After the last commits were answered: let the writers send what is queued, then close."""
        with trio.move_on_after(timeout):
            while any(conn.queued for conn in self.connections.values()):
                await trio.sleep(0.01)
        self._finished.set()

    def close(self) -> None:
        self.sock.close()

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            name = stream.socket.getpeername()
        except OSError:  # reset before it was served
            await stream.aclose()
            return
        self._serial += 1
        # (host, port, n): the host first, as Observe's per-source bound reads it; n, because a new
        # connection may come from the same port before the old one's task has ended
        peer = (name[0], name[1], self._serial)
        if len(self.connections) >= self.max_connections or self._per_source[name[0]] >= self.params.max_per_source:
            self.stats["refused"] += 1
            await stream.aclose()
            return
        self.stats["accepted"] += 1
        self._per_source[name[0]] += 1
        conn = Connection(stream, peer, self.params.max_message)
        self.connections[peer] = conn
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn)
                try:
                    with conn.reading:
                        if self._stopping:
                            conn.reading.cancel()
                        await self._reader(conn)
                    if conn.reading.cancelled_caught:  # a stop: the last answers, then the end
                        await self._finished.wait()
                except GONE:
                    pass
                finally:
                    conn.closing = True
                    conn.wake.set()
                    if conn.framer.buffered and not conn.aborted:  # the peer left inside a frame: not served
                        self.stats["truncated"] += 1
        except Exception:  # a bug must cost this connection, not the listener
            self.stats["internal_errors"] += 1
            log.exception("coap over tcp: connection from %s:%s failed", peer[0], peer[1])
        finally:
            del self.connections[peer]
            self.unsent -= len(conn.queued)  # (what was left for a peer that is gone)
            conn.queued.clear()
            left = self._per_source[name[0]] - 1
            if left:
                self._per_source[name[0]] = left
            else:
                del self._per_source[name[0]]
            self.observers.forget(peer)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self._close(conn)

    async def _close(self, conn: Connection) -> None:
        """TLS's close_notify if the connection still takes it, then the socket's end."""
        if conn.tls is not None and conn.tls.established and not conn.stream.socket.fileno() < 0:
            try:
                conn.tls.close()
                await conn.stream.send_all(conn.tls.data_to_send())
            except GONE:
                pass
        await conn.stream.aclose()

    async def _reader(self, conn: Connection) -> None:
        p = self.params
        if self.tls is not None and not await self._handshake(conn):
            return
        # (Max-Message-Size only: Block-Wise-Transfer beside a size over 1152 would promise BERT,
        # RFC 8323 §6, which corem does not do -- a BERT block was answered 4.02; a request up to
        # Max-Message-Size needs no blocks)
        self._write(conn, signal(CSM, [(MAX_MESSAGE_SIZE, p.max_message.to_bytes(4, "big").lstrip(b"\0"))]))
        if conn.early and not self._take(conn, conn.early):
            return
        while True:
            with trio.move_on_after(p.idle_timeout):
                data = await self._receive(conn)
                if data is None:
                    return
                if data and not self._take(conn, data):
                    return
                continue
            self.stats["aborted_idle"] += 1
            self._write(conn, signal(RELEASE))
            return

    async def _receive(self, conn: Connection) -> bytes | None:
        """The next plaintext bytes (b'' if a TLS record is not complete yet); None at the end."""
        if conn.tls_over:
            return None
        data = await conn.stream.receive_some(READ_SIZE)
        if not data:
            return None
        self.stats["bytes_in"] += len(data)
        if conn.tls is None:
            return bytes(data)
        return self._tls_in(conn, bytes(data))

    def _tls_in(self, conn: Connection, data: bytes) -> bytes | None:
        """The plaintext of TLS records; None once the connection is over (close_notify, or a
        fault: its fatal alert is sent)"""
        t = conn.tls
        assert t is not None
        t.receive_untrusted(data, self.clock())
        out = t.take_app()
        alert = t.data_to_send()  # (a fault's fatal alert, or a refused renegotiation's warning)
        if alert:
            self._queue(conn, alert)
        if t.over:
            conn.tls_over = True  # (what came before the end is served, then the end)
            # (corem's end, not the peer's alert: a record that did not authenticate, a renegotiation flood)
            if t.state == FAILED and not t.reason.startswith("peer_alert"):
                self.stats["aborted_tls"] += 1
                log.debug("coaps+tcp connection with %s ended: %s", conn.peer, t.reason)
            return out or None
        return out

    def _take(self, conn: Connection, data: bytes) -> bool:
        """`_frames`, a framing error answered with Abort; False once the connection is to end."""
        try:
            return self._frames(conn, data)
        except FrameError as e:
            self.stats["aborted_" + e.reason] += 1
            self._abort(conn, str(e))
            return False

    def _frames(self, conn: Connection, data: bytes) -> bool:
        """Dispatch every complete frame; False once the connection is to end."""
        now = self.clock()
        endpoint, router = self.endpoint, self.router
        for code, token, body in conn.framer.feed(data):
            if not conn.csm and code != CSM:  # RFC 8323 §5.3.1: its first message is its CSM
                self.stats["aborted_bad_message"] += 1
                self._abort(conn, "CSM expected first")
                return False
            if code >= 0xE0:
                if not self._signal(conn, code, token, body):
                    return False
                continue
            if not 1 <= code <= 31:
                continue  # an empty message (§3.3), or a response corem did not ask for
            try:
                msg = message(code, token, body)
            except MessageFormatError as e:
                self.stats["aborted_bad_message"] += 1
                self._abort(conn, f"bad message: {e}")
                return False
            req = endpoint.request(msg, conn.peer, now, len(body) + len(token))
            if req is not None:
                response = router.dispatch(req)
                if response is not None:
                    req.respond(response.code, response.options, response.payload)
        self.flush()
        if self.after_dispatch is not None:
            self.after_dispatch()
        return True

    def _signal(self, conn: Connection, code: int, token: bytes, body: bytes) -> bool:
        try:  # (a signal with an unknown critical option ends the connection, §5.3)
            if code == CSM:
                # read to check it: nothing is kept, as corem's messages stay below any peer's
                # Max-Message-Size (RFC 8323's least is 1152; Block2 cuts answers at 1024)
                csm_max_message(body)
                conn.csm = True
            else:
                signal_options(code, body)
        except MessageFormatError as e:
            self.stats["aborted_bad_message"] += 1
            self._abort(conn, f"bad {'CSM' if code == CSM else 'signal'}: {e}")
            return False
        if code == PING:
            self.stats["pings"] += 1
            self._write(conn, signal(PONG, token=token))
        elif code == RELEASE:
            return False
        elif code == ABORT:
            self.stats["aborted_peer_abort"] += 1
            return False
        return True

    def _abort(self, conn: Connection, reason: str) -> None:
        """Abort (7.05) with the reason; what is left of the stream is not the peer's truncation."""
        self._write(conn, signal(ABORT, payload=reason.encode()[:128]))
        conn.aborted = True

    # -- output ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand what the endpoint queued (answers, notifications) to each connection's writer."""
        for data, peer in self.endpoint.datagrams_to_send():
            conn = self.connections.get(peer)
            if conn is not None:
                self._write(conn, data)

    def _write(self, conn: Connection, data: bytes) -> None:
        if conn.closing:
            return
        if conn.tls is not None:
            sealed = conn.tls.seal(data)  # (records of at most 16 KiB each)
            if sealed is None:
                return
            data = sealed
        self._queue(conn, data)

    def _queue(self, conn: Connection, data: bytes) -> None:
        """Bytes for the writer; past MAX_QUEUED unsent the peer is not reading: it is closed."""
        if conn.closing:
            return
        conn.queued += data
        self.unsent += len(data)
        if len(conn.queued) > MAX_QUEUED or self.unsent > MAX_UNSENT:
            self.stats["aborted_slow_reader"] += 1
            conn.closing = True
            self.unsent -= len(conn.queued)
            conn.queued.clear()
            conn.stream.socket.close()
        conn.wake.set()

    async def _writer(self, conn: Connection) -> None:
        try:
            while True:
                await conn.wake.wait()
                conn.wake = trio.Event()
                while conn.queued:
                    data = bytes(conn.queued)
                    conn.queued.clear()
                    self.stats["bytes_out"] += len(data)
                    sent = 0
                    try:
                        while sent < len(data):
                            piece = data[sent:sent + WRITE_SIZE]
                            with trio.move_on_after(WRITE_STALL):
                                await conn.stream.send_all(piece)
                                sent += len(piece)
                                continue
                            self.stats["aborted_write_stall"] += 1
                            conn.closing = True
                            self.unsent -= len(conn.queued)
                            conn.queued.clear()
                            conn.stream.socket.close()  # (the reader, if still reading, ends too)
                            return
                    finally:
                        self.unsent -= len(data)
                if conn.closing:
                    return
        except GONE:  # the peer went away: the reader sees it too
            conn.closing = True

    async def _handshake(self, conn: Connection) -> bool:
        """The TLS handshake, bounded in time; the device from its PSK identity or certificate.
        What the client sent after its Finished waits in `conn.early`."""
        assert self.tls is not None
        t = conn.tls = self.tls.connection(conn.peer, self.clock())
        with trio.move_on_after(self.params.handshake_timeout):
            while not t.established:
                out = t.data_to_send()
                if out:
                    self.stats["bytes_out"] += len(out)
                    await conn.stream.send_all(out)
                if t.over:
                    # (a registry refusal counted apart, as a certificate removed since is below)
                    self.stats["aborted_unregistered_certificate" if t.reason == "unregistered_certificate"
                               else "aborted_handshake"] += 1
                    log.debug("coaps+tcp handshake with %s failed: %s", conn.peer, t.reason)
                    return False
                data = await conn.stream.receive_some(READ_SIZE)
                if not data:
                    return False
                self.stats["bytes_in"] += len(data)
                t.receive_untrusted(bytes(data), self.clock())
            self._queue(conn, t.data_to_send())  # (the server's Finished: the writer sends it with the CSM)
            conn.early = t.take_app()
            conn.device, registered = self.tls.device(t)
            if not registered:  # (removed from the registry since its CertificateVerify)
                self.stats["aborted_unregistered_certificate"] += 1
                return False
            return True
        self.stats["aborted_handshake"] += 1
        return False


def bind_tcp(host: str, port: int) -> socket.socket:
    """The listening socket (bound before Trio starts: a busy port is a plain error at start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


__all__ = ["TcpEdge", "TcpParams", "Tls", "bind_tcp"]
