"""CoAP over TCP and TLS (RFC 8323), the Trio edge: one task pair per connection (a reader that
frames and dispatches, a writer that drains the connection's queue), a `StreamEndpoint` shared by
the listener's connections, TLS on python-mbedtls's buffers with the DTLS listener's credentials
(PSK identities and certificates from the registry).

Bounded: connections (`max_connections`, lowered to this listener's share of the open files limit by
`fdlimit.tcp_cap`; more are closed at once and counted; out of descriptors, accept() refuses and
the listener goes on: `fdlimit.Acceptor`), message size (what
corem's CSM announces; a larger frame aborts the connection), bytes queued to a connection that
does not read (`MAX_QUEUED`: it is closed), idle time (`idle_timeout`: a connection silent that long
gets a Release and is closed), and the TLS handshake's time.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import trio
from mbedtls import tls
from mbedtls.exceptions import TLSError

from ..codec import MessageFormatError
from ..coap import Router
from ..coap.observe import Observers
from ..coap.stream import (ABORT, BLOCK_WISE_TRANSFER, CSM, MAX_MESSAGE_SIZE, PING, PONG,
                           RELEASE, FrameError, Framer, StreamEndpoint, csm_max_message, message, signal)
from ..dtls.certs import peer_der
from ..dtls.server import HANDSHAKE_OVER, DtlsParams, PskStore
from ..stats import Sample, counter, gauge
from .fdlimit import Acceptor, tcp_cap

log = logging.getLogger("corem.tcp")

#: what ends a connection from the other side (or a broken network)
GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, TLSError)
#: bytes waiting for a connection that does not read, before it is closed
MAX_QUEUED = 1 << 20
READ_SIZE = 65536
#: TLS suites for coaps+tcp: the DTLS listener's, and the GCM ones TLS clients usually prefer
TLS_EXTRA_CIPHERS = ("TLS-PSK-WITH-AES-128-GCM-SHA256", "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256")


@dataclass(frozen=True)
class TcpParams:
    max_connections: int = 10_000
    #: the Max-Message-Size corem's CSM announces: a larger frame aborts the connection
    max_message: int = 8192 + 1024
    idle_timeout: float = 600.0
    handshake_timeout: float = 30.0


class Tls:
    """The coaps+tcp server side: a python-mbedtls TLS 1.2 context with the DTLS credentials."""

    def __init__(self, psk_store: PskStore, params: DtlsParams, cert_lookup: Callable[[str], Any]) -> None:
        from ..dtls.certs import load_certificates, load_key

        self.psk_store = psk_store
        self.cert_lookup = cert_lookup
        extra: dict[str, Any] = {}
        if params.cert_file is not None:
            assert params.key_file is not None
            extra["certificate_chain"] = (load_certificates(params.cert_file), load_key(params.key_file))
            if params.ca_file is not None:
                extra["trust_store"] = tls.TrustStore(load_certificates(params.ca_file))
        available = set(tls.ciphers_available())
        ciphers = tuple(dict.fromkeys(c for c in (*params.ciphers, *TLS_EXTRA_CIPHERS) if c in available))
        self.ctx = tls.ServerContext(tls.TLSConfiguration(
            pre_shared_key_store=psk_store, ciphers=ciphers,
            validate_certificates=params.cert_file is not None and params.client_auth == "required",
            lowest_supported_version=tls.TLSVersion.TLSv1_2, highest_supported_version=tls.TLSVersion.TLSv1_2,
            inner_protocols=(b"coap",), **extra))


class Connection:
    """One connection's state: its framer, the peer's limits, and what waits to be written."""

    def __init__(self, stream: trio.SocketStream, peer: Any, max_message: int) -> None:
        self.stream = stream
        self.peer = peer
        self.framer = Framer(max_message)
        self.device: Any = None
        self.buf: Any = None  # TLSWrappedBuffer, coaps+tcp
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
        for reason in ("frame", "too_large", "bad_message", "idle", "slow_reader", "handshake", "peer_abort",
                       "unregistered_certificate"):
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
        if len(self.connections) >= self.max_connections:
            self.stats["refused"] += 1
            await stream.aclose()
            return
        self.stats["accepted"] += 1
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
            self.observers.forget(peer)
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self._close(conn)

    async def _close(self, conn: Connection) -> None:
        """TLS's close_notify if the connection still takes it, then the socket's end."""
        if conn.buf is not None and not conn.stream.socket.fileno() < 0:
            try:
                conn.buf.shutdown()
                await conn.stream.send_all(self._tls_out(conn))
            except GONE:
                pass
        await conn.stream.aclose()

    async def _reader(self, conn: Connection) -> None:
        p = self.params
        if self.tls is not None and not await self._handshake(conn):
            return
        self._write(conn, signal(CSM, [(MAX_MESSAGE_SIZE, p.max_message.to_bytes(4, "big").lstrip(b"\0")),
                                       (BLOCK_WISE_TRANSFER, b"")]))
        while True:
            with trio.move_on_after(p.idle_timeout):
                data = await self._receive(conn)
                if data is None:
                    return
                if data:
                    try:
                        if not self._frames(conn, data):
                            return
                    except FrameError as e:
                        self.stats["aborted_" + e.reason] += 1
                        self._abort(conn, str(e))
                        return
                continue
            self.stats["aborted_idle"] += 1
            self._write(conn, signal(RELEASE))
            return

    async def _receive(self, conn: Connection) -> bytes | None:
        """The next plaintext bytes (b'' if a TLS record is not complete yet); None at the end."""
        data = await conn.stream.receive_some(READ_SIZE)
        if not data:
            return None
        self.stats["bytes_in"] += len(data)
        if conn.buf is None:
            return bytes(data)
        conn.buf.receive_from_network(bytes(data))
        out = bytearray()
        while True:
            try:
                chunk = conn.buf.read(READ_SIZE)
            except tls.WantReadError:
                break
            except TLSError:  # close_notify, or a record that does not authenticate: the end
                return bytes(out) if out else None
            if not chunk:
                return bytes(out) if out else None  # close_notify
            out += chunk
        return bytes(out)

    def _frames(self, conn: Connection, data: bytes) -> bool:
        """Dispatch every complete frame; False once the connection is to end."""
        now = self.clock()
        endpoint, router = self.endpoint, self.router
        for code, token, body in conn.framer.feed(data):
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
        if code == CSM:
            try:
                # read to check it: nothing is kept, as corem's messages stay below any peer's
                # Max-Message-Size (RFC 8323's least is 1152; Block2 cuts answers at 1024)
                csm_max_message(body)
            except MessageFormatError:
                self.stats["aborted_bad_message"] += 1
                self._abort(conn, "bad CSM")
                return False
        elif code == PING:
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
        if conn.buf is not None:
            sealed = bytearray()
            view = memoryview(data)
            while view:  # (a record holds at most 16 KiB: Mbed TLS takes what fits, and says how much)
                view = view[conn.buf.write(view):]
                sealed += self._tls_out(conn)
            data = bytes(sealed)
        conn.queued += data
        if len(conn.queued) > MAX_QUEUED:
            self.stats["aborted_slow_reader"] += 1
            conn.closing = True
            conn.queued.clear()
            conn.stream.socket.close()
        conn.wake.set()

    @staticmethod
    def _tls_out(conn: Connection) -> bytes:
        out = conn.buf.peek_outgoing(1 << 20)
        conn.buf.consume_outgoing(len(out))
        return bytes(out)

    async def _writer(self, conn: Connection) -> None:
        try:
            while True:
                await conn.wake.wait()
                conn.wake = trio.Event()
                while conn.queued:
                    data = bytes(conn.queued)
                    conn.queued.clear()
                    self.stats["bytes_out"] += len(data)
                    await conn.stream.send_all(data)
                if conn.closing:
                    return
        except GONE:  # the peer went away: the reader sees it too
            conn.closing = True

    async def _handshake(self, conn: Connection) -> bool:
        """The TLS handshake, bounded in time; the device from its PSK identity or certificate."""
        assert self.tls is not None
        buf = conn.buf = self.tls.ctx.wrap_buffers()
        store = self.tls.psk_store
        with trio.move_on_after(self.params.handshake_timeout):
            try:
                while buf._handshake_state is not HANDSHAKE_OVER:
                    store.resolved = None
                    try:
                        buf.do_handshake()
                    except tls.WantReadError:
                        out = self._tls_out(conn)
                        if out:
                            await conn.stream.send_all(out)
                        data = await conn.stream.receive_some(READ_SIZE)
                        if not data:
                            return False
                        buf.receive_from_network(bytes(data))
                    except tls.WantWriteError:
                        pass
                    finally:
                        if store.resolved is not None:
                            conn.device = store.resolved
                out = self._tls_out(conn)
                if out:
                    await conn.stream.send_all(out)
            except TLSError as e:
                self.stats["aborted_handshake"] += 1
                log.debug("coaps+tcp handshake with %s failed: %s", conn.peer, e)
                return False
            if conn.device is None:
                der = peer_der(buf)
                if der is not None:
                    conn.device = self.tls.cert_lookup(hashlib.sha256(der).hexdigest())
                    if conn.device is None:
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
