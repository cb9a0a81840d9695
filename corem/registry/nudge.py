"""Registry changes made by the CLI, seen by a running server at once.

The server polls the registry every half second (`PRAGMA data_version`): a script that adds a
device and connects it straight away could be refused for that long.  So a running server also
listens on a local socket named after its data dir, and `corem devices add|remove` says "look now"
there after its commit and waits for "done": when the CLI returns, the server has the change.  No
server, or one that does not answer within `WAIT`, and the CLI goes on; the poll still catches it.

The socket is a Linux abstract one (no file, so no 108-byte path limit); what it offers is a
registry refresh, which any local process could cause anyway by writing the registry it can read.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable

import trio

#: Seconds the CLI waits for the server's "done": what it promises is that the next request is
#: served, so it waits out a loaded machine's reload (a reload takes milliseconds on an idle one);
#: a wedged server costs a CLI run this long once, and the poll still catches the change.
WAIT = 10.0
REQUEST, DONE = b"refresh\n", b"done\n"


def address(data_dir: Path) -> bytes:
    """The abstract socket name of the server that owns `data_dir`."""
    digest = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:24]
    return b"\0corem-registry-" + digest.encode()


def nudge(data_dir: Path) -> bool:
    """Tell a running server on `data_dir` to read the registry now; True once it has."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(WAIT)
            s.connect(address(data_dir))
            s.sendall(REQUEST)
            return s.recv(16) == DONE
    except OSError:  # no server there (ConnectionRefused, FileNotFound) or it did not answer in time
        return False


async def serve(data_dir: Path, refresh: Callable[[], Awaitable[object]],
                task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer nudges for `data_dir` until cancelled: `refresh()`, then "done"."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(address(data_dir))
    except OSError:  # another process has the name (cannot be: data dirs are locked); poll only
        sock.close()
        task_status.started(False)  # (the value says: nudges, or polling only)
        return
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(WAIT):
                if await stream.receive_some(16) == REQUEST:
                    await refresh()
                    await stream.send_all(DONE)

    task_status.started(True)
    await trio.serve_listeners(one, [listener])
