"""The message IDs of an endpoint's own messages: one owner for every rule about them.

RFC 7252 §4.4: an ID is not used again with an endpoint within EXCHANGE_LIFETIME, or the endpoint,
deduplicating, drops the new message as the old one's repeat (and takes an ACK of one for the
other).  corem numbers its messages from one counter per endpoint -- the answers of the Python path
and of the C fast lane, separate responses, notifications, commands -- and draws some at random
(`unpredictable`: a plain-UDP observer's confirmable notifications, whose ACK proves the address
only if it cannot be guessed).  The two kinds must not meet, and before this module they did: the
lane's NON answers took the counter's next ID even when one of that peer's CONs awaited its ACK
under it, and a random ID could be one the counter had just used with that peer.  So:

- a sequential ID (`next`) passes by every ID still awaiting its ACK -- of any peer: the fast lane
  asks without naming its peer -- and by the random ones drawn within EXCHANGE_LIFETIME (at most
  RANDOM_MAX, the newest);
- a random ID is none awaiting an ACK, none of the random ones drawn within EXCHANGE_LIFETIME
  (the newest RANDOM_MAX), none the caller names (`avoid`: observe.py's recent NON notifications to
  that observer, whatever came between), and none of the RECENT_MAX (half the space) just behind
  the counter -- those it used within EXCHANGE_LIFETIME, below the rate below -- so a draw keeps
  about 15 bits of surprise (less the IDs in flight: at most MAX_BUSY).

So the rules hold below two rates: 32,768 of the counter's IDs within EXCHANGE_LIFETIME (133 a
second; past 65,536, 265 a second, the counter itself comes round within it) and RANDOM_MAX draws
(17 a second) -- which forged observe registrations can pass, each unverified observer's bounded
notification drawing one: draws let go of early are counted (`forgotten`), and the counter may then
come round to one of them within EXCHANGE_LIFETIME.

Sans-IO: the endpoint gives `now` (`tick`, `unpredictable`) and says which IDs await an ACK
(`busy`, `free`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable

#: the newest sequential IDs a random one avoids, at most (half the space: 15 bits left to guess)
RECENT_MAX = 0x8000
#: the random IDs drawn within EXCHANGE_LIFETIME that the counter passes by, at most (the newest)
RANDOM_MAX = 4096
#: IDs awaiting an ACK at most (the endpoint's max_outstanding is bounded by it; one message each:
#: the endpoint refuses a second with an ID that awaits its ACK)
MAX_BUSY = 0x4000
#: IDs a caller's `avoid` names at most (observe.py's recent NON notifications are bounded by it).
#: With RECENT_MAX, MAX_BUSY and RANDOM_MAX both searches always find one: `next` has at least
#: 45,056 IDs left, a draw at least 2,288 (11 bits) in the worst case of every bound reached at
#: once, and ~15 bits in the usual one
MAX_AVOID = 10_000


class MessageIds:
    """An endpoint's message IDs: `next` for most, `unpredictable` for the few whose ACK proves
    something; `busy`/`free` as messages start and stop awaiting an ACK; `tick` as time passes."""

    def __init__(self, lifetime: float, start: int, draw: Callable[[], int] | None = None) -> None:
        self.lifetime = lifetime
        self._mid = start & 0xFFFF
        self._busy: set[int] = set()
        self._drawn: OrderedDict[int, float] = OrderedDict()
        self._draw = draw or (lambda: int.from_bytes(os.urandom(2), "big"))
        self._now = float("-inf")
        #: draws let go of before EXCHANGE_LIFETIME (past RANDOM_MAX of them): forged registrations
        #: can cause that, each bounded notification drawing one (`corem_coap_random_ids_forgotten_total`)
        self.forgotten = 0

    def next(self) -> int:
        """The counter's next ID, past those awaiting an ACK and the recent random ones."""
        mid, busy, drawn = self._mid, self._busy, self._drawn
        while True:
            mid = (mid + 1) & 0xFFFF
            if mid not in busy and mid not in drawn:
                break
        self._mid = mid
        return mid

    def unpredictable(self, now: float, avoid: Callable[[int], bool] | None = None) -> int:
        """A random ID: none awaiting an ACK, none drawn within EXCHANGE_LIFETIME, none `avoid`
        names, none of the RECENT_MAX just behind the counter; remembered for EXCHANGE_LIFETIME, so
        `next` passes it."""
        self._now = max(self._now, now)
        current, busy, drawn = self._mid, self._busy, self._drawn
        while True:
            mid = self._draw() & 0xFFFF
            if ((current - mid) & 0xFFFF >= RECENT_MAX and mid not in busy and mid not in drawn
                    and (avoid is None or not avoid(mid))):
                break
        drawn[mid] = self._now
        if len(drawn) > RANDOM_MAX:
            _, at = drawn.popitem(last=False)
            if at > self._now - self.lifetime:
                self.forgotten += 1  # (within EXCHANGE_LIFETIME: `next` may come round to it)
        return mid

    def __contains__(self, mid: int) -> bool:
        """Does a message of ours with `mid` await its ACK?"""
        return mid in self._busy

    def busy(self, mid: int) -> None:
        """A message of ours with `mid` awaits its ACK."""
        self._busy.add(mid)

    def free(self, mid: int) -> None:
        """The message with `mid` no longer awaits its ACK (acknowledged, reset, given up)."""
        self._busy.discard(mid)

    def tick(self, now: float) -> None:
        """Forget the draws that left EXCHANGE_LIFETIME."""
        self._now = max(self._now, now)
        limit = now - self.lifetime
        drawn = self._drawn
        while drawn and next(iter(drawn.values())) <= limit:
            drawn.popitem(last=False)
