"""The listen addresses: binding them (a port another process holds, or an address this machine
does not have, is one line naming the setting -- `cannot listen on [tcp ]host:port: reason` --
never a traceback), what was bound, and a bound address as a URL's host.  Used alike by a
`Server` and by the workers' supervisor, which binds for its workers."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from .config import ConfigError
from .logs import address
from .net import bind_udp
from .net.tcp import bind_tcp


@dataclass
class Bound:
    """The addresses actually bound (ports picked by the OS when 0 was asked for)."""

    coap: tuple | None = None
    coaps: tuple | None = None
    coap_tcp: tuple | None = None
    coaps_tcp: tuple | None = None
    http: tuple | None = None


def _refused(key: str, host: str, port: int, e: OSError, tcp: bool) -> ConfigError:
    return ConfigError(f"{key}: cannot listen on {'tcp ' if tcp else ''}{address((host, port))}: {e.strerror or e}")


def udp(key: str, host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The UDP socket of listener `key` (net/udp.py `bind_udp`)."""
    try:
        return bind_udp(host, port, reuse_port=reuse_port)
    except OSError as e:
        raise _refused(key, host, port, e, tcp=False) from None


def tcp(key: str, host: str, port: int) -> socket.socket:
    """The listening TCP socket of listener `key` (net/tcp.py `bind_tcp`)."""
    try:
        return bind_tcp(host, port)
    except OSError as e:
        raise _refused(key, host, port, e, tcp=True) from None


async def http(server: Any, host: str, port: int) -> tuple:
    """The admin HTTP listener (an admin HttpServer, or the workers' front)."""
    try:
        return await server.bind(host, port)
    except OSError as e:
        raise _refused("http", host, port, e, tcp=True) from None


def url_host(bound: tuple) -> str:
    """host:port of a bound address for a URL (an unspecified host: this machine's name)."""
    host = bound[0]
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    return str(address((host, bound[1])))


def admin_url(bound: tuple) -> str:
    """The base URL of an admin HTTP listener bound at `bound` (how other nodes, or the front,
    reach it: corem/cluster.py)."""
    return f"http://{url_host(bound)}"
