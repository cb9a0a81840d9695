"""Ports for the tests' servers, with who holds them.  A port picked free (bind 0) and released
can be taken by another process before the server it is meant for binds it (pytest-xdist runs
other tests' servers meanwhile); a test then talks to the wrong server without knowing it.  So:
hold the port where nothing should listen, and where a server must be given a number, check in
/proc that the listener is that server's own."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from collections.abc import Iterator


def free_port(*kinds: int) -> int:
    """A port free for each socket kind asked (UDP and TCP: CoAP and CoAP over TCP share a number)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kinds[0]) as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                for kind in kinds[1:]:
                    with socket.socket(socket.AF_INET, kind) as other:
                        other.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no port free for every kind asked ({kinds})")


def free_tcp_port() -> int:
    """A TCP port free now and released, for a server that must be told its number (whose listener
    is then checked to be its own: `holds_socket`)."""
    return free_port(socket.SOCK_STREAM)


@contextlib.contextmanager
def refused_tcp_port() -> Iterator[int]:
    """A loopback port where connections are refused for as long as the block runs: bound by a
    socket that never listens, so no other process (another test's broker) can take it meanwhile,
    as it could a port picked free and released."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def listening_inode(port: int) -> int | None:
    """The inode of the socket listening on 127.0.0.1:`port`, from /proc/net/tcp (None: nobody)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # TCP_LISTEN
                return int(fields[9])
    return None


def holds_socket(pid: int, inode: int) -> bool:
    """Whether process `pid` has socket `inode` open: who is listening, not just that someone is."""
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def group_holds(port: int, pgid: int) -> bool | None:
    """Whether the socket listening on 127.0.0.1:`port` (TCP) is held by a process of process group
    `pgid` (a server started in a session of its own, with what it runs); None: nobody listens."""
    inode = listening_inode(port)
    if inode is None:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = proc_stat(f"/proc/{entry}/stat")
        if stat and int(stat[2]) == pgid and holds_socket(int(entry), inode):
            return True
    return False


def proc_stat(path: str) -> list[str] | None:
    """The fields of a /proc stat file after the command's name (state, ppid, pgrp, ...); None when
    the process or thread is gone."""
    try:
        with open(path) as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def nft_binary() -> str | None:
    """Debian's `nft` (nftables), on the PATH or in /usr/sbin (not on a user's PATH)."""
    import shutil

    return shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)


#: nftables tables of `test_nodes.Balancer`: `balancer_table(port)`, named by the pytest process
#: that made it -- its pid and its start time, so that a pid used again by a later process does
#: not keep a dead run's table alive
BALANCER_TABLE = "corem_test_{pid}_{started}_{port}"
_BALANCER_NAME = re.compile(r"^table ip (corem_test_(\d+)_(\d+)_\d+)$", re.M)


def started(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot: /proc/PID/stat's 22nd field), or None
    if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def balancer_table(port: int, pid: int | None = None) -> str:
    """The name of the balancer table of this process (or of `pid`) at `port`."""
    pid = os.getpid() if pid is None else pid
    return BALANCER_TABLE.format(pid=pid, started=started(pid) or 0, port=port)


def remove_stale_balancers(nft: str | None) -> list[str]:
    """Delete the balancer tables whose process is gone (it was killed before its test's cleanup),
    and say which.  Such a table DNATs every datagram to its virtual port -- free again, so the
    next server to bind it there -- to nodes long dead: found when a CI run's client met "ICMP:
    Connection refused" from a server that was listening (a table left at 35969 since a run of
    test_nodes was killed).  A live process's table is its test's own: one whose pid runs and
    started when the table's name says (a pid taken again by a later process does not keep a
    dead run's table).  (The pid is looked for in this process's pid namespace: runs in
    containers sharing one network namespace but not their pids would take each other's tables
    for stale -- as root, where nft runs at all.)"""
    if nft is None:
        return []
    listed = subprocess.run([nft, "list", "tables"], capture_output=True, text=True)
    removed = []
    for name, pid, start in _BALANCER_NAME.findall(listed.stdout):
        if started(int(pid)) != int(start):
            if subprocess.run([nft, "delete", "table", "ip", name], capture_output=True).returncode == 0:
                removed.append(name)
    return removed
