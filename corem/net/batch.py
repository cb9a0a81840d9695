"""Reading and writing a UDP socket in batches: 64 datagrams per system call (recvmmsg / sendmmsg,
`_sockets.c`) where the C module is built, else one recvfrom / sendto each, with the same results."""

from __future__ import annotations

import errno
import logging
import socket
from functools import partial
from typing import Any, Callable

try:
    from ._sockets import recv_many, send_many
except ImportError:  # pragma: no cover - only without a C compiler
    recv_many = send_many = None  # type: ignore[assignment]

log = logging.getLogger("corem.net")

Datagrams = list[tuple[bytes, Any]]
#: `read(bufsize, budget)`: the datagrams waiting, up to `budget`, each cut to `bufsize` bytes
Reader = Callable[[int, int], Datagrams]
#: `send(wire)` -> (taken, bytes sent, errors, blocked): in order until the kernel takes no more
Sender = Callable[[Datagrams], tuple[int, int, int, int]]

#: ICMP errors a UDP socket reports on a later call: nothing to read, nothing wrong with the socket
_ICMP = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


def reader(sock: socket.socket) -> Reader:
    if recv_many is not None:
        return partial(recv_many, sock.fileno())  # (a C call with the fd bound: no Python frame a batch)
    recvfrom = sock.recvfrom

    def read(bufsize: int, budget: int) -> Datagrams:
        got = []
        for _ in range(budget):
            try:
                got.append(recvfrom(bufsize))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno not in _ICMP:
                    raise
        return got

    return read


def sender(sock: socket.socket) -> Sender:
    if send_many is not None:
        return partial(send_many, sock.fileno())
    sendto = sock.sendto

    def send(wire: Datagrams) -> tuple[int, int, int, int]:
        taken = nbytes = errors = 0
        for data, peer in wire:
            try:
                sendto(data, peer)
            except BlockingIOError:
                return taken, nbytes, errors, 1
            except OSError as e:
                errors += 1
                log.debug("send to %s failed: %s", peer, e)
            else:
                nbytes += len(data)
            taken += 1
        return taken, nbytes, errors, 0

    return send
