"""Busy-polling the CoAPS socket for the answer to a handshake flight.

A DTLS handshake is a chain of round trips: ClientHello, our HelloVerifyRequest, the hello again,
our ServerHello flight, the device's key exchange and Finished, ours -- and a device's first
request right after.  Between two of them the event loop sleeps in epoll, and each answer then pays
for waking it: the device's send interrupts a halted CPU (in a virtual machine, an exit to the
hypervisor), the kernel schedules the loop's thread back in, and Trio goes once round its run loop
before the edge reads the socket.  Where the device is close (a gateway, a proxy, the benchmark's
loopback) that costs more than the answer's own trip.

So after a batch that sent a handshake flight, the edge asks the socket again and again, on the
CPU, for up to `window` (`_sockets.readable_within`: poll() with no timeout, the GIL released, so
the bus's threads run), and reads the answer without going back to sleep.  Measured one handshake
at a time (loopback, 2026-12-07): 2,560-2,690 handshakes/s without (3,114 once), 3,520-3,880 with
a 150 µs window, the server's CPU a handshake ~300 -> ~270 µs (the poll replaces the sleep's own
wake-up work); bench/dtls_bench.py's rows say it beside libcoap's.

Where answers take longer than the window -- devices over a radio, whose round trip is tens of
milliseconds or seconds -- each poll would be a window of CPU thrown away.  So the polls back off:
after a poll that saw nothing, the batches of the next 1, then 3, 7, ... up to MAX_SKIP flights are
not polled after, and a poll that saw a datagram starts again at once.  On a quiet socket a fleet
that never answers in time costs at most one window every MAX_SKIP flights.  But "saw a datagram"
is anyone's: other devices' traffic arriving within windows keeps the backoff at 0 (as do hellos
from spoofed addresses, each answered by a HelloVerifyRequest, a flight: the next hello ends its
poll).  So polling also has a budget, BUDGET of the time (a token bucket over BURST): whatever
comes, it never takes more than a quarter of the loop's thread.  Measured one handshake at a time
on loopback: 18% of the time polling (~14 µs a poll, three polls a handshake).  Under load the
socket has datagrams waiting already, and a poll answers at once.

Sans-IO: `poll(fd)` calls the function it was given; the edge owns when to ask (net/udp.py), after a
batch in which `flights()` grew.
"""

from __future__ import annotations

import time
from typing import Callable

try:
    from ._sockets import readable_within
except ImportError:  # pragma: no cover - only without a C compiler
    readable_within = None  # type: ignore[assignment]

#: flights skipped at most after a poll that saw nothing (the backoff doubles up to it)
MAX_SKIP = 63
#: the longest window a setting may ask for, µs (a poll holds the event loop that long)
MAX_WINDOW_US = 2000
#: the share of the time polling may take at most, and the most it may take at once, seconds
BUDGET = 0.25
BURST = 0.01


class BusyPoll:
    """When and how long the edge polls its socket after a handshake flight, and what it got."""

    __slots__ = ("window_ns", "flights", "answered", "missed", "seconds", "_wait", "_backoff", "_skip", "_tokens",
                 "_at", "_clock")

    def __init__(self, window_us: int, flights: Callable[[], int], wait: Callable[[int, int], bool],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`flights()`: the handshake flights the security layer has sent so far (a count that
        only grows): a batch after which it grew sent one, and is followed by a poll.  `wait(fd,
        ns)`: `readable_within` (`busy_poll`).  The window's range is the setting's (config.py)."""
        self.window_ns = window_us * 1000
        self.flights = flights
        #: polls that saw a datagram within the window, polls that did not, and the seconds spent
        self.answered = 0
        self.missed = 0
        self.seconds = 0.0
        self._wait = wait
        self._backoff = 0
        self._skip = 0
        self._clock = clock
        #: the polling time left (the budget's bucket), as of `_at`
        self._tokens = BURST
        self._at = clock()

    def poll(self, fd: int) -> bool:
        """After a batch that sent a flight: is a datagram waiting on `fd` within the window?
        False at once while backing off or over the budget."""
        if self._skip:
            self._skip -= 1
            return False
        clock = self._clock
        start = clock()
        tokens = min(BURST, self._tokens + (start - self._at) * BUDGET)
        self._at = start
        if tokens <= 0:  # (over its share of the time: the bucket refills while the loop sleeps)
            self._tokens = tokens
            return False
        try:
            got = self._wait(fd, self.window_ns)
        except OSError:  # (poll() failed -- out of memory, or a socket closed: EBADF --: as if nothing came; the loop sleeps)
            got = False
        spent = clock() - start
        self._tokens = tokens - spent
        self.seconds += spent
        if got:
            self.answered += 1
            self._backoff = 0
        else:
            self.missed += 1
            self._backoff = self._skip = min(2 * self._backoff + 1, MAX_SKIP)
        return got


def busy_poll(window_us: int, flights: Callable[[], int]) -> BusyPoll | None:
    """The setting's BusyPoll; None when it is 0 (off) or the C module is not built."""
    if window_us == 0 or readable_within is None:
        return None
    return BusyPoll(window_us, flights, readable_within)
