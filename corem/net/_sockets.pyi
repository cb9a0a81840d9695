"""Batched UDP socket calls (`_sockets.c`); see corem/net/batch.py."""

from typing import Any

def recv_many(fd: int, bufsize: int, budget: int) -> list[tuple[bytes, Any]]:
    """Up to `budget` datagrams waiting on `fd`, each cut to `bufsize` bytes, as (bytes, peer)."""

def send_many(fd: int, datagrams: list[tuple[bytes, Any]], /) -> tuple[int, int, int, int]:
    """Send in order until the kernel takes no more: (taken, bytes sent, errors, blocked)."""

def readable_within(fd: int, ns: int, /) -> bool:
    """Whether a datagram (or an error) waits on `fd` within `ns` nanoseconds, polled on the CPU
    with the GIL released (corem/net/busypoll.py)."""
