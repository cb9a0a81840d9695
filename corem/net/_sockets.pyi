"""Batched UDP socket calls (`_sockets.c`); see corem/net/batch.py."""

from typing import Any

def recv_many(fd: int, bufsize: int, budget: int) -> list[tuple[bytes, Any]]:
    """Up to `budget` datagrams waiting on `fd`, each cut to `bufsize` bytes, as (bytes, peer)."""

def send_many(fd: int, datagrams: list[tuple[bytes, Any]], /) -> tuple[int, int, int, int]:
    """Send in order until the kernel takes no more: (taken, bytes sent, errors, blocked)."""
