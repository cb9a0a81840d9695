"""systemd's readiness protocol (sd_notify(3)), without libsystemd: one datagram per state change to
the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or `@name` for an abstract socket).

`corem serve` under `Type=notify` (ops/systemd/corem.service) says:

- `READY=1` once every listener is bound and served (with `--workers`, once every worker is ready),
  with a `STATUS=` line naming them; again after each reload;
- `RELOADING=1` (and `MONOTONIC_USEC=`, which systemd 253's Type=notify-reload wants) when SIGHUP
  starts a reload (corem/reload.py);
- `STOPPING=1` when SIGTERM or SIGINT starts the graceful stop.

Only the process systemd started speaks (NotifyAccess=main): the variable is taken out of the
environment at once, so workers and anything else corem starts do not inherit it.  Without
$NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("corem")


class Notifier:
    def __init__(self, address: str | None) -> None:
        self.address = address
        #: what was sent, in order (for tests and the log)
        self.sent: list[str] = []

    @classmethod
    def from_environ(cls, unset: bool = True) -> Notifier:
        """The notifier $NOTIFY_SOCKET names (taken out of the environment: `unset`)."""
        address = os.environ.pop("NOTIFY_SOCKET", None) if unset else os.environ.get("NOTIFY_SOCKET")
        return cls(address or None)

    def send(self, **state: str | int) -> bool:
        """Send `KEY=value` lines in one datagram; False when there is no socket or it refuses
        (logged: systemd would time the start out, which says more than a traceback here)."""
        if not self.address:
            return False
        text = "\n".join(f"{key.upper()}={value}" for key, value in state.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode(), target)
        except OSError as e:
            log.warning("sd_notify: could not tell %s %r: %s", self.address, text, e)
            return False
        self.sent.append(text)
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(ready=1, **({"status": status} if status else {}))

    def reloading(self) -> bool:
        return self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.send(stopping=1, status="stopping: answering what is in flight")
