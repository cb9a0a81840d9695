"""Observe (RFC 7641), sans-IO: who observes which resource, and the notifications they get.

An observer is a (peer, token) pair (§3.1).  A GET with Observe 0 that is answered 2.xx registers
it and the answer carries an Observe sequence number; a GET with Observe 1 removes it (§3.6), and
so does a RST in reply to a notification or a confirmable notification that is never acknowledged
(§3.6, §4.5).  Notifications carry increasing 24-bit sequence numbers; every `con_every`-th one, and
at least one every `con_interval` seconds, is confirmable so that gone observers are noticed (§4.5).

Notifications are no amplifier (RFC 7252 §11.3, RFC 7641 §7).  An observer registered over plain UDP
without OSCORE is an address nothing verified: a GET with Observe from a forged source registers the
victim, and every later notification would go to it -- one small request buying an endless stream.
So until that address shows it receives what corem sends there -- it acknowledges a confirmable
notification (`verified`) -- each notification to it is confirmable, at most AMPLIFICATION_FACTOR
times the registering request (a 2.05 cut to the largest Block2 block that fits, `blockwise.fitted`,
as the endpoint cuts a first answer; the rest is kept for its Block2 requests; an error cut to the
request's size, as the endpoint's), and only one is in flight: states notified meanwhile wait on the
observation (`max_held`) and follow once it is acknowledged; and such notifications take at most
half the endpoint's messages awaiting ACK.  A victim that never answers costs MAX_RETRANSMIT + 1
datagrams of that bound, then the observation ends (§4.5) with what waited, and nothing more goes
there.  A genuine observer acknowledges its first notification and from then on gets them whole, on
the usual cadence.  If not even a 16-byte block fits, the observation ends, told once with a bare
4.01 (RFC 9175 §2.4 answers so until an address is verified).  Behind DTLS or TCP (the handshake or
the connection proved the address: `Params.limit_error_size` is off) and over OSCORE (as the
endpoint's answers: only the device's key seals its request) an observer is verified from the start.
A re-registration is a new observation, unverified again until it acknowledges one.  An empty ACK
names only a message ID: a plain-UDP observer's confirmable notifications carry one drawn at random
(`Endpoint.unpredictable_mid`; corem's others follow one another, and one who also observes would
know the one in flight: found in review, a forged ACK from the victim's address verified it).
Forging one takes some 15,000 datagrams on average (corem/coap/message_ids.py: a draw avoids the
IDs in use, about 15 bits are left), for each confirmable notification -- the first, and
every `con_every`-th after it, whose silence ends the observation.  States notified while one is in
flight wait, `max_held` at most: past that the oldest gives way, so the observer always ends at
the resource's latest state.

Registrations are claims from addresses that plain UDP cannot verify, so they are bounded: per
resource, per source host, per device, and in total.  Refusals are counted; a refused GET is still
answered, only without the Observe option (§3.1: the client then knows it is not on the list).
A registration a door made for a device ends when the device's registration no longer grants it
(`revoke`: removed, its credentials rotated, its topics narrowed).  A door whose device observes a
resource once (EMQX's subscriptions) registers with `replace`: the device's observation of it
from another address or token ends when the new one is accepted, and only then.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Collection, Hashable, Iterator

from ..codec import Block, Code, Message, OptionNumber, Options, Type, decode_uint, encode, encode_uint
from ..stats import Sample, counter, gauge
from .blockwise import Representations, first_block, fitted, requester, worth_keeping
from .endpoint import (
    AMPLIFICATION_FACTOR, Acked, Endpoint, Event, GaveUp, Outcome, Protect, Request, Reset, StrayReset, fit_error,
)
from .message_ids import MAX_AVOID
from .peers import source_host
from .response import Response

Peer = Hashable
#: (a function of the owner's current registration, its value when the observation was made)
Grant = tuple[Callable[[Any], Hashable], Hashable]


class Observation:
    __slots__ = ("resource", "peer", "token", "notifications", "last_con", "protect", "request", "owner",
                 "grant", "size", "verified", "in_flight", "held")

    def __init__(self, resource: str, peer: Peer, token: bytes, now: float, protect: Protect | None = None,
                 request: tuple[Hashable, ...] = (), owner: Hashable = None, grant: Grant | None = None,
                 size: int = 0, verified: bool = True) -> None:
        self.resource = resource
        #: the device that registered it (the doors name it), counted against `max_per_owner`
        self.owner = owner
        #: what it was granted on: (how to read it off the owner's registration, what it read then);
        #: once the owner reads otherwise (its credentials or topics changed) or is gone, it ends
        #: (`Observers.revoke`)
        self.grant = grant
        self.peer = peer
        self.token = token
        #: who registered, for what, past the address (`blockwise.requester` without the peer): a
        #: notification larger than a block is kept for its rest under it (`Representations`)
        self.request = request
        self.notifications = 0
        self.last_con = now
        #: the registering request's sealer (OSCORE): each notification is sealed for this observer
        self.protect = protect
        #: the registering request's size in bytes: what bounds each notification until `verified`
        self.size = size
        #: has its address shown that it receives what corem sends there (the module docstring says how)?
        self.verified = verified
        #: not `verified`, and its one confirmable notification awaits the ACK
        self.in_flight = False
        #: not `verified`: what was notified while one was `in_flight` -- each as it goes out (its
        #: Observe number given) and the whole state when it is to be kept for its later blocks --
        #: oldest first, sent once it is acknowledged
        self.held: list[tuple[Response, Response | None]] = []

    def granted(self, device: Any) -> bool:
        """Does its owner's registration now (`device`: None, gone) still grant it?"""
        return device is not None and (self.grant is None or self.grant[0](device) == self.grant[1])

    def message(self, mtype: Type, code: int, mid: int, options: Options, payload: bytes) -> bytes:
        """A message to this observer, sealed for it when it registered over OSCORE."""
        if self.protect is None:
            return encode(Message(mtype, code, mid, self.token, options, payload))
        outer_code, outer, sealed = self.protect(code, options, payload)
        return encode(Message(mtype, outer_code, mid, self.token, outer, sealed))


@dataclass(frozen=True, slots=True)
class Notification:
    """The context a confirmable notification is sent with: which observation it belongs to, so
    that its `Reset` or `GaveUp` ends that observation -- that one, not a later registration with
    the same address and token (found in review: an old notification's give-up ended the new one)."""

    key: tuple[Peer, bytes]
    obs: Observation


@dataclass(slots=True)
class ObserveStats:
    registered: int = 0
    refused: int = 0
    deregistered: int = 0
    notifications: int = 0
    con_notifications: int = 0
    lost: int = 0
    revoked: int = 0
    #: notifications that waited for an unverified observer's confirmable one to be acknowledged
    held: int = 0
    #: of those, the ones a newer state replaced before they could go (past `max_held`)
    held_dropped: int = 0


class Observers:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        max_total: int = 10_000,
        max_per_resource: int = 1_000,
        max_per_source: int = 32,
        max_per_owner: int = 64,
        con_every: int = 20,
        con_interval: float = 24 * 3600.0,
        recent_non: int = MAX_AVOID,
        representations: Representations | None = None,
        max_held: int = 8,
    ) -> None:
        self.endpoint = endpoint
        #: what waits on an unverified observer while its confirmable notification is in flight, at
        #: most (beyond it the oldest waiting gives way: `_hold`)
        self.max_held = max_held
        #: told the owner (the device a door named) of an observer at an unverified address that
        #: acknowledged its notification, or of one whose confirmable notification the endpoint's
        #: table of messages awaiting an ACK had no room for when the table makes room (any of
        #: them acknowledged, reset or given up): what a notifier kept back for it
        #: (`notify(hold=False)`) may go now
        self.freed: list[Callable[[Hashable], None]] = []
        #: owners whose notification found the endpoint's table full (`_no_room`), until it makes room
        self._no_room_for: set[Hashable] = set()
        #: the router's: a notification cut to its first block is kept there for the rest
        self.representations = representations
        self.max_total = max_total
        self.max_per_resource = max_per_resource
        self.max_per_source = max_per_source
        #: one device's registrations, from however many addresses: it cannot take the whole table
        self.max_per_owner = max_per_owner
        #: owner -> the keys of its observations, in the order made (a dict as an ordered set): its
        #: count is what `max_per_owner` bounds, and what `revoke` of named owners reads -- their own
        #: observations, found without a walk over everyone's
        self._per_owner: dict[Hashable, dict[tuple[Peer, bytes], None]] = {}
        #: (owner, resource) -> the keys of that owner's observations of it: what a registration
        #: that replaces them (`register`'s `replace`) ends, found without a walk
        self._owned: dict[tuple[Hashable, str], set[tuple[Peer, bytes]]] = {}
        self.con_every = con_every
        self.con_interval = con_interval
        self._by_key: dict[tuple[Peer, bytes], Observation] = {}
        self._by_resource: dict[str, dict[tuple[Peer, bytes], Observation]] = {}
        self._per_source: Counter[Hashable] = Counter()
        #: peer -> its observations' tokens (a closed connection ends them: `forget`)
        self._by_peer: dict[Peer, set[bytes]] = {}
        #: (peer, mid) of recent NON notifications -> observer key, so that a RST answering one
        #: cancels the observation (the message layer forgets NON messages once sent)
        self._recent_non: OrderedDict[tuple[Peer, int], Notification] = OrderedDict()
        if not 0 < recent_non <= MAX_AVOID:  # (a random draw avoids them: message_ids.py bounds how many)
            raise ValueError(f"recent_non must be between 1 and {MAX_AVOID}, got {recent_non}")
        self._recent_non_max = recent_non
        self._seq = 0
        self.stats = ObserveStats()

    def __len__(self) -> int:
        return len(self._by_key)

    def metrics(self) -> Iterator[Sample]:
        st = self.stats
        yield gauge("corem_coap_observers", len(self._by_key))
        yield counter("corem_coap_observe_registrations", st.registered)
        yield counter("corem_coap_observe_refused", st.refused)
        yield counter("corem_coap_observe_notifications", st.notifications)
        yield counter("corem_coap_observe_lost", st.lost)
        yield counter("corem_coap_observe_revoked", st.revoked)
        yield counter("corem_coap_observe_held", st.held)
        yield counter("corem_coap_observe_held_dropped", st.held_dropped)

    def observers(self, resource: str) -> int:
        return len(self._by_resource.get(resource, ()))

    # -- registration --------------------------------------------------------------------------
    def register(self, req: Request, resource: str, now: float, owner: Hashable = None,
                 grant: Grant | None = None, *, replace: bool = False) -> int | None:
        """Register the requester (`owner`: the device it is, when a door knows, and `grant`: what of
        it the registration rests on); the Observe value for its response, or None if refused.

        `replace`: the owner's other observations of `resource` (other addresses or tokens) are
        superseded by this one -- a door's rule that a device observes a resource once.  The bounds
        are checked as if they were gone (a replacement takes no more room), and they end only once
        this one is accepted: a refused one leaves the owner the observation it had, not none."""
        key = (req.peer, req.token)
        if key in self._by_key:  # re-registration (§4.1): same observer, fresh state
            # (unverified again over plain UDP, though the old one may have been verified: the GET
            # proves no more than any, and one forged with a guessed token could otherwise move a
            # verified observer to a larger resource, unbounded)
            self._remove(key)
        host = source_host(req.peer)
        superseded = list(self._owned.get((owner, resource), ())) if replace and owner is not None else []
        freed = len(superseded)
        freed_here = sum(1 for peer, _ in superseded if source_host(peer) == host)
        if (
            len(self._by_key) - freed >= self.max_total
            or self.observers(resource) - freed >= self.max_per_resource
            or self._per_source[host] - freed_here >= self.max_per_source
            or (owner is not None and len(self._per_owner.get(owner, ())) - freed >= self.max_per_owner)
        ):
            self.stats.refused += 1
            return None
        for old in superseded:
            self._remove(old)
        self.stats.deregistered += freed
        # (its address is verified behind DTLS or TCP, and over OSCORE: see the module docstring)
        verified = req.protect is not None or not self.endpoint.params.limit_error_size
        self._add(Observation(resource, req.peer, req.token, now, req.protect,
                              requester(req)[1:] if req.message is not None else (), owner, grant,
                              req.size, verified))
        self.stats.registered += 1
        return self._next_seq()

    def deregister(self, peer: Peer, token: bytes, resource: str | None = None) -> bool:
        """End the observation of `peer` with `token` -- of `resource` if named (RFC 7641 §3.6: a GET
        with Observe 1 removes the entry for the target resource, not one of another resource that
        uses the same token)."""
        obs = self._by_key.get((peer, token))
        if obs is None or (resource is not None and obs.resource != resource):
            return False
        if self._remove((peer, token)):
            self.stats.deregistered += 1
            return True
        return False

    def forget(self, peer: Peer) -> int:
        """End every observation of `peer` (a connection that closed, RFC 8323 §7.1)."""
        tokens = list(self._by_peer.get(peer, ()))
        for token in tokens:
            self._remove((peer, token))
        self.stats.deregistered += len(tokens)
        return len(tokens)

    def revoke(self, current: Callable[[Hashable], Any], owners: Collection[Hashable] | None) -> int:
        """The registrations of these owners changed (None: any of them might have): end each of
        their observations whose owner is gone (`current(owner)` is None) or no longer reads as it
        did when it registered (`grant`) -- a token or key rotated, the device removed and added
        again, its topics narrowed: its downlink must not reach whoever holds what was revoked.  The
        observer is told once, 4.01 without Observe (RFC 7641 §3.2: a non-2.xx ends it); a device
        that still may observe registers again.  Returns how many ended.

        Named owners cost their own observations only (`_per_owner`), each owner read once: every
        registry change calls this, most of them for a device or a few, and one device's change must
        not cost a walk over every observation of the fleet.  An owner's observations are looked at
        in the order made; `current` is asked only of owners that observe here."""
        asked = list(self._per_owner) if owners is None else dict.fromkeys(owners)
        ended = 0
        for owner in asked:
            keys = self._per_owner.get(owner)
            if not keys:
                continue  # (the usual registry change: no observer of theirs here)
            device = current(owner)
            for key in list(keys):
                obs = self._by_key[key]
                if obs.granted(device):
                    continue
                self._tell_revoked(obs)
                self._remove(key)
                ended += 1
        self.stats.revoked += ended
        return ended

    def _tell_revoked(self, obs: Observation) -> None:
        text = b"observation revoked: its credentials changed; register again"
        self._tell(obs, Code.UNAUTHORIZED, [], text)

    def _tell(self, obs: Observation, code: int, options: Options, payload: bytes) -> None:
        """A NON message to `obs` that ends it (an error: no Observe); to an unverified observer no
        larger than its registering request, as an error answer is (`fit_error`)."""
        ep = self.endpoint
        mid = ep.next_mid()
        if not obs.verified:
            payload = fit_error(obs.size, mid, obs.token, code, options, payload)
        ep.send(obs.message(Type.NON, code, mid, options, payload), obs.peer, code)

    def moved(self, old: Peer, new: Peer) -> int:
        """The session at `old` answers at `new` from now on (a DTLS Connection ID move, RFC 9146
        §6): its observations follow it -- the same endpoint at another address -- keeping their
        tokens and state; returns how many."""
        tokens = list(self._by_peer.get(old, ()))
        for token in tokens:
            obs = self._by_key[(old, token)]
            self._remove((old, token))
            self._remove((new, token))  # (one the new address had with that token: superseded)
            obs.peer = new
            self._add(obs)
        return len(tokens)

    def _add(self, obs: Observation) -> None:
        """`obs` in every table and count (`_remove` takes it out of them)."""
        key = (obs.peer, obs.token)
        self._by_key[key] = obs
        self._by_resource.setdefault(obs.resource, {})[key] = obs
        self._per_source[source_host(obs.peer)] += 1
        if obs.owner is not None:
            self._per_owner.setdefault(obs.owner, {})[key] = None
            self._owned.setdefault((obs.owner, obs.resource), set()).add(key)
        self._by_peer.setdefault(obs.peer, set()).add(obs.token)

    def _remove(self, key: tuple[Peer, bytes]) -> bool:
        obs = self._by_key.pop(key, None)
        if obs is None:
            return False
        observers = self._by_resource[obs.resource]
        del observers[key]
        if not observers:
            del self._by_resource[obs.resource]
        tokens = self._by_peer[obs.peer]
        tokens.discard(obs.token)
        if not tokens:
            del self._by_peer[obs.peer]
        host = source_host(obs.peer)
        self._per_source[host] -= 1
        if not self._per_source[host]:
            del self._per_source[host]
        if obs.owner is not None:
            mine = self._per_owner[obs.owner]
            del mine[key]
            if not mine:
                del self._per_owner[obs.owner]
            owned = self._owned[(obs.owner, obs.resource)]
            owned.discard(key)
            if not owned:
                del self._owned[(obs.owner, obs.resource)]
        return True

    # -- notifications -------------------------------------------------------------------------
    def notify(self, resource: str, code: int, options: Options | None, payload: bytes, now: float,
               hold: bool = True) -> int:
        """Send the resource's new state to each of its observers; returns how many (an unverified
        observer's that waits for its notification in flight to be acknowledged included).  `hold`
        False: a notification that is a message, not a state (an RPC: none may give way to a newer
        one) does not wait on such an observer -- it is not counted, the caller keeps it and is told
        when the observer is free (`freed`)."""
        observers = self._by_resource.get(resource)
        if not observers:
            return 0
        sent = 0
        # §4.2: a state a GET would not answer 2.xx (the resource is gone) goes out once, without
        # Observe, and ends every observation of it; a re-created resource starts without them
        ending = not 64 <= code < 96
        whole: Response | None = None
        kept: Response | None = None  # (what a verified observer's Block2 requests read on from)
        if ending:
            out = Response(code, payload, list(options or []))
        else:
            # RFC 7959 §2.6 (and RFC 7641): a state larger than a block goes as its first block,
            # with ETag and Size2; the observer GETs the rest -- of this state, kept for it
            whole = Response(code, payload, options)
            first = first_block(whole)
            seq = encode_uint(self._next_seq())
            out = Response(first.code, first.payload,  # (the same options for all)
                           sorted([*(first.options or []), (OptionNumber.OBSERVE, seq)], key=lambda o: o[0]))
            kept = self._to_keep(whole, out)
        for key, obs in list(observers.items()):
            if obs.verified:
                done = self._send(key, obs, out, kept, now)
            elif ending:
                self._tell(obs, out.code, out.options or [], out.payload)
                self.stats.notifications += 1
                done = True
            elif obs.in_flight:
                done = self._hold(obs, out, kept) if hold else False
            else:
                done = self._send_bounded(key, obs, out, whole, now)
            sent += done
        if ending:
            for key in list(observers):
                if self._remove(key):
                    self.stats.deregistered += 1
        return sent

    def _send(self, key: tuple[Peer, bytes], obs: Observation, out: Response, kept: Response | None,
              now: float) -> bool:
        """A notification to a verified observer, as it is: NON, or CON on the cadence (§4.5); `kept`:
        the whole state `out` is the first block of, kept for the observer's Block2 requests."""
        ep = self.endpoint
        if kept is not None and self.representations is not None:
            self.representations.keep((obs.peer, *obs.request), kept, now)
        obs.notifications += 1
        confirmable = obs.notifications % self.con_every == 0 or now - obs.last_con >= self.con_interval
        if confirmable and not ep.has_room():
            # (too many messages awaiting ACK: this one is skipped, the next may go -- told before an
            # ID is taken for it, so a random one is never drawn for a message that does not go)
            return self._no_room(obs)
        # (a plain-UDP observer's confirmable one: its silence must end the observation, so its ACK
        # must not be forgeable -- `Endpoint.unpredictable_mid`)
        if not confirmable:
            mid = ep.next_mid()
        else:
            mid = self._random_mid(obs.peer) if self._plain(obs) else ep.next_mid()
        mtype = Type.CON if confirmable else Type.NON
        data = obs.message(mtype, out.code, mid, out.options or [], out.payload)
        if confirmable:
            if not ep.send_confirmable(data, obs.peer, mid, obs.token, Notification(key, obs), out.code):
                return self._no_room(obs)  # (its ID awaits an ACK already: never one next_mid or a draw gives)
            obs.last_con = now
            self.stats.con_notifications += 1
        else:
            ep.send(data, obs.peer, out.code)
            recent = self._recent_non
            recent[(obs.peer, mid)] = Notification(key, obs)
            if len(recent) > self._recent_non_max:
                recent.popitem(last=False)
        self.stats.notifications += 1
        return True

    def _send_bounded(self, key: tuple[Peer, bytes], obs: Observation, out: Response, whole: Response | None,
                      now: float) -> bool:
        """A notification to an observer whose address is not verified: confirmable, and within
        AMPLIFICATION_FACTOR times its registering request (the module docstring says why)."""
        ep = self.endpoint
        if not ep.has_room(0.5):
            # (forged registrations cost nothing to make: their notifications, each awaiting its
            # ACK for up to a minute and a half, take half the endpoint's table at most -- the
            # rest is for separate answers to readings and verified observers)
            return self._no_room(obs)
        bound = AMPLIFICATION_FACTOR * obs.size

        def fits(candidate: Response) -> bool:  # (a message ID is two bytes whatever it is: 0 here)
            message = obs.message(Type.CON, candidate.code, 0, candidate.options or [], candidate.payload)
            return len(message) <= bound

        piece = fitted(out, fits)
        if piece is None:  # (not even a 16-byte block: nothing can go there before it is verified)
            self._tell(obs, Code.UNAUTHORIZED, [], b"")
            if self._remove(key):
                self.stats.lost += 1
            return False
        # (drawn only now, for a message that goes: each draw is remembered for EXCHANGE_LIFETIME)
        mid = self._random_mid(obs.peer)  # (its ACK verifies the address: not to be guessed)
        data = obs.message(Type.CON, piece.code, mid, piece.options or [], piece.payload)
        if not ep.send_confirmable(data, obs.peer, mid, obs.token, Notification(key, obs), piece.code):
            return self._no_room(obs)  # too many messages awaiting ACK: this one is skipped, the next may go
        kept = self._to_keep(whole, piece)
        if kept is not None and self.representations is not None:
            self.representations.keep((obs.peer, *obs.request), kept, now)
        obs.notifications += 1
        obs.in_flight = True
        obs.last_con = now
        self.stats.con_notifications += 1
        self.stats.notifications += 1
        return True

    def _random_mid(self, peer: Peer) -> int:
        """`Endpoint.unpredictable_mid`, and none of the NON notifications this remembers sending
        `peer` (RFC 7252 §4.4; found in review: the endpoint's own window is its newest 32,768 IDs,
        which a load of other NONs may carry past this observer's)."""
        recent = self._recent_non
        return self.endpoint.unpredictable_mid(lambda mid: (peer, mid) in recent)

    def _plain(self, obs: Observation) -> bool:
        """Is `obs` an observer over plain UDP (its address proven by nothing but ACKs)?"""
        return obs.protect is None and self.endpoint.params.limit_error_size

    def _hold(self, obs: Observation, out: Response, kept: Response | None) -> bool:
        """An unverified observer's notification waits for the one in flight to be acknowledged:
        one datagram at a time goes to an address that may be a victim's.  Past `max_held` the
        oldest waiting one gives way (found in review: the newest were dropped, and the observer
        was left at a state eight behind the resource's -- Observe's promise is its latest)."""
        if len(obs.held) >= self.max_held:
            del obs.held[0]
            self.stats.held_dropped += 1
        obs.held.append((out, kept))
        self.stats.held += 1
        return True

    def _to_keep(self, whole: Response | None, piece: Response) -> Response | None:
        """`whole`, if `piece` (what an observer is sent of it) is a block of it to be kept for the
        observer's Block2 requests (`worth_keeping`); else None."""
        if whole is None or self.representations is None:
            return None
        given = next((v for n, v in piece.options or () if n == OptionNumber.BLOCK2), None)
        asked = None if given is None else Block.from_uint(decode_uint(bytes(given)))
        return whole if worth_keeping(whole, asked) else None

    def _no_room(self, obs: Observation) -> bool:
        """(False) `obs`'s notification found no room in the endpoint's table: its owner is told
        when the table makes room (found in review: an RPC refused so waited for its device's next
        uplink, which a device that only listens never sends)."""
        if obs.owner is not None:
            self._no_room_for.add(obs.owner)
        return False

    def _made_room(self) -> None:
        owners, self._no_room_for = self._no_room_for, set()
        for owner in owners:
            self._tell_freed(owner)

    def _tell_freed(self, owner: Hashable) -> None:
        """`owner`'s RPCs and deltas may go again (`freed`: the downlink's)."""
        for told in self.freed:
            told(owner)

    def _acknowledged(self, key: tuple[Peer, bytes]) -> None:
        """A confirmable notification to `key` was acknowledged from its address: an unverified
        observer is verified, and what waited goes to it, whole."""
        obs = self._by_key.get(key)
        if obs is None or obs.verified:
            return
        obs.verified = True
        obs.in_flight = False
        held, obs.held = obs.held, []
        now = self.endpoint.now
        for out, kept in held:
            self._send(key, obs, out, kept, now)
        if obs.owner is not None:
            self._tell_freed(obs.owner)

    def handle(self, event: Event) -> None:
        """Feed message-layer events: a RST (to a CON or a NON notification) or a CON
        notification that was never acknowledged ends the observation; an acknowledged one
        verifies its observer's address."""
        sent: Notification | None
        if self._no_room_for and isinstance(event, Outcome):  # (a confirmable message left the table)
            self._made_room()
        if isinstance(event, StrayReset):
            sent = self._recent_non.pop((event.peer, event.mid), None)
        elif isinstance(event, (Reset, GaveUp)) and isinstance(event.context, Notification):
            sent = event.context
        elif isinstance(event, Acked) and isinstance(event.context, Notification):
            self._acknowledged(event.context.key)  # (the address's proof, whichever registration)
            return
        else:
            return
        if sent is not None and self._by_key.get(sent.key) is sent.obs and self._remove(sent.key):
            self.stats.lost += 1

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFF
        return self._seq


def answer_observe(observers: Observers, req: Request, resource: str, response: Response, now: float,
                   owner: Hashable = None, grant: Grant | None = None, *, replace: bool = False) -> Response:
    """Apply a GET's Observe option to its 2.xx answer: 0 registers the requester (and the answer
    carries the sequence number; `replace`: as `Observers.register`), 1 deregisters it (§3.1,
    §3.6).  Returns the answer to send."""
    observe = req.message.observe if req.message is not None else None
    if observe == 1:
        observers.deregister(req.peer, req.token, resource)
    elif observe == 0 and 64 <= response.code < 96:
        seq = observers.register(req, resource, now, owner, grant, replace=replace)
        if seq is not None:
            opts = sorted([*(response.options or []), (OptionNumber.OBSERVE, encode_uint(seq))], key=lambda o: o[0])
            response = Response(response.code, response.payload, opts)
    return response
