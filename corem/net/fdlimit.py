"""File descriptors: the process's limit, what the connection caps may take of it, and an accept
that survives running out.

Issue 26 (8): 1,100 idle connections to the admin port took every descriptor under the usual soft
limit of 1024; the next database open failed and corem exited.  Three things together stop that:

- `raise_limit()` at start (Server and the workers' supervisor): the soft RLIMIT_NOFILE is raised
  to the hard one (an unprivileged process may; 1024 is a default of the past, for `select()`,
  which corem does not use: Trio waits with epoll).
- `admin_cap()` and `tcp_cap()`: the admin HTTP server and each CoAP-over-TCP listener hold at most
  that many connections, so that all of them together stay `HEADROOM` descriptors below the limit
  (the databases and their journals, the UDP sockets, the log, worker links, outgoing forwards).
- `Acceptor`: accept() failing with EMFILE or ENFILE (out of descriptors anyway: another process,
  a burst of database files) is a refused connection -- counted, logged at most once per
  `LOG_EVERY` seconds -- and the listener goes on; never an exception that ends corem.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import struct

import trio

log = logging.getLogger("corem.fdlimit")

#: descriptors kept for everything but connections: SQLite files and journals (registry, bus,
#: DTLS store), the UDP and listening sockets, the log, pipes to workers, outgoing HTTP forwards
#: (the workers' front opens one per request it passes on), threads' files.  Measured: a serving
#: corem with all listeners and no connection holds ~40.
HEADROOM = 256
#: the admin HTTP server's cap when descriptors are plenty: operators, Prometheus and a UI are
#: served by far fewer; beyond it the connection waiting longest for its head is evicted
ADMIN_MAX = 512
#: the least any listener is given, however low the limit (it must still serve someone)
FLOOR = 8
#: RFC 8323 listeners one process may open (coap+tcp and coaps+tcp): each gets an equal share of
#: what the admin server leaves, whether or not the other is configured (simple, and still far
#: above what one needs under the usual hard limits: ~9,600 each under 20,000)
TCP_LISTENERS = 2
#: errno values of accept() that mean "out of descriptors (or kernel memory)": a refusal, not a fault
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: errno values of accept() about the one connection being accepted (it went away first): skip it
TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                       errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EOPNOTSUPP,
                       errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR})
#: seconds between accepts while out of descriptors (a connection closing frees one meanwhile)
PAUSE = 0.05
#: seconds between two log lines about refusals (the count since the last one is in the line)
LOG_EVERY = 10.0


def raise_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (no-op if it is already); the soft limit now.
    An unlimited hard limit is taken as 1,048,576 (what the kernel's nr_open usually allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.debug("open files: soft limit raised from %d to %d", soft, want)
            soft = want
        except (ValueError, OSError) as e:  # nr_open below the hard limit, say: keep what is
            log.warning("open files: could not raise the soft limit %d to %d (%s)", soft, want, e)
    return limit() if soft == resource.RLIM_INFINITY else soft


def limit() -> int:
    """The soft RLIMIT_NOFILE now (unlimited taken as 1,048,576)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def admin_cap(fds: int | None = None) -> int:
    """Connections the admin HTTP server holds at once under `fds` (default: the limit now): a
    quarter of what the headroom leaves, at most `ADMIN_MAX` (the workers' front holds two
    descriptors a request: the caller's and its forward)."""
    room = (limit() if fds is None else fds) - HEADROOM
    return max(FLOOR, min(ADMIN_MAX, room // 4))


def tcp_cap(wanted: int, fds: int | None = None) -> int:
    """A CoAP-over-TCP listener's connection cap: `wanted` (tcp_max_connections), lowered -- with a
    log line -- to its share of what the headroom and the admin server leave."""
    fds = limit() if fds is None else fds
    share = max(FLOOR, (fds - HEADROOM - admin_cap(fds)) // TCP_LISTENERS)
    if wanted > share:
        log.warning("tcp_max_connections %d lowered to %d: the open files limit is %d (%d kept for files, "
                    "%d for admin connections, the rest shared by the CoAP-over-TCP listeners)",
                    wanted, share, fds, HEADROOM, admin_cap(fds))
        return share
    return wanted


class Acceptor:
    """accept() on a listening Trio socket, where running out of descriptors refuses the
    connection instead of raising.

    Out of descriptors, the pending connection stays in the kernel's backlog, its client waiting
    for nothing; so a spare descriptor (/dev/null) is kept: closed, it lets that one connection be
    accepted and closed at once (the client sees its refusal), then it is taken again.  The
    loop then pauses `PAUSE` s: closing connections free descriptors meanwhile.
    """

    def __init__(self, sock: trio.socket.SocketType, name: str) -> None:
        self.sock = sock
        self.name = name
        #: connections refused for want of a descriptor
        self.refused = 0
        self._spare: int | None = None  # taken at the first accept, given back by `close`
        self._armed = False
        self._logged_at = -LOG_EVERY
        self._logged = 0

    async def accept(self) -> trio.SocketStream:
        if not self._armed:
            self._armed, self._spare = True, _spare()
        while True:
            try:
                conn, _ = await self.sock.accept()
            except OSError as e:
                if e.errno in EXHAUSTED:
                    self._refuse(e)
                    await self._shed()
                    await trio.sleep(PAUSE)
                    continue
                if e.errno in TRANSIENT:
                    continue
                raise  # the listener itself is gone (closed at a stop): the caller ends
            return trio.SocketStream(conn)

    def _refuse(self, e: OSError) -> None:
        self.refused += 1
        now = trio.current_time()
        if now - self._logged_at >= LOG_EVERY:
            log.warning("%s: out of file descriptors (%s): refusing connections (%d refused since the last "
                        "line); the listener goes on", self.name, os.strerror(e.errno or 0),
                        self.refused - self._logged)
            self._logged_at, self._logged = now, self.refused

    async def _shed(self) -> None:
        """Free the spare descriptor, accept the waiting connection with it and close it."""
        if self._spare is None:
            self._spare = _spare()
            return
        os.close(self._spare)
        self._spare = None
        try:
            with trio.move_on_after(PAUSE):
                conn, _ = await self.sock.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST: no TIME_WAIT
                conn.close()
        except OSError:
            pass
        finally:
            self._spare = _spare()

    def close(self) -> None:
        """Give the spare descriptor back (the listener is done)."""
        self._armed = False
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


def _spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


__all__ = ["Acceptor", "HEADROOM", "admin_cap", "limit", "raise_limit", "tcp_cap"]
