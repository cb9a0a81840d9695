"""The server engine: many peers' DTLS 1.2 associations on one socket, sans-IO, under the shape
of corem's security layer (corem/net/security.py): `receive(datagram, peer, now)` -> the
application data it carried, `wrap(plaintext, peer)`, `datagrams_to_send()`, `tick(now)`.

Stateless until proven (RFC 6347 §4.2.1): a ClientHello without a valid cookie is answered by a
HelloVerifyRequest built from the hello alone and nothing is kept; the cookie is an HMAC of the
peer's address and the hello's parameters under a secret that rotates (`CookieJar`).  Only a
hello with a valid cookie gets a `Connection`.

Connection IDs (RFC 9146): offered by a client, the server picks `cid_length` random bytes; records
carrying a CID are found by it, whatever their source address, and the session's address moves to
the source of a record only when that record authenticated and is newer than every record before
it (§6).  A record with an unknown CID, or one that does not authenticate, is dropped and counted.
"""

from __future__ import annotations

import hmac
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import corem.dtls.engine.messages as m  # (the modules, not the package: no cycle through __init__)
import corem.dtls.engine.state as state
from ...c_twins import c_twin
from .connection import CLOSED, ESTABLISHED, FAILED, WAIT_CLIENT_KEY_EXCHANGE, Connection, Params
from .crypto import hmac_sha256
from .errors import DtlsDecodeError
from .records import DTLS_1_2, HANDSHAKE, HEADER, TLS12_CID, Record, lone_epoch0_record_untrusted, parse_record_untrusted, \
    plaintext_record

Peer = Hashable


#: _hello.c's `hello_verify` (the HelloVerifyRequest to a cookie-less hello in one call; None: the
#: Python path decides) and _flights.c's `server_hello` (a hello with a valid cookie answered with the
#: ServerHello flight of a PSK suite; None: the Python path decides); None when not built
_hello_verify: Callable[[bytes, int, bytes, bytes], bytes | None] | None = c_twin("._hello", "hello_verify", __package__)
_server_hello: Callable[..., tuple[Any, ...] | bytes | None] | None = c_twin("._flights", "server_hello", __package__)

COOKIE_LENGTH = 16
#: the highest message_seq a ClientHello may carry (a client's second hello is 1; the messages of
#: the handshake it starts are numbered on from it, within 16 bits)
MAX_HELLO_SEQ = 255
#: seconds between two walks over the sessions for idle ones
SWEEP_EVERY = 10.0
#: a session found by address that heard from its device this recently still holds that address:
#: no session of another device moves there by its CID (`_take_address`).  A NAT does not hand a
#: binding in use to another device, and the shortest UDP binding timeouts seen are ~30 s (RFC
#: 4787 asks for 2 minutes at least): an address that quiet may be someone else's now.
HELD_FOR = 30.0
#: server randoms (and CIDs) drawn from os.urandom this many handshakes' worth at a time: one
#: getrandom call a handshake was a system call on its path (they are sent in the clear: no
#: secret is kept ahead of its use)
RANDOM_POOL = 64
#: forks so far, as a child counts them: a pool drawn before a fork is used by neither side after it
#: (two workers must never hand out the same server random or CID)
_forks = [0]
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class CookieJar:
    """Cookies that need no state: HMAC-SHA256(secret, peer, the hello's version, random,
    session_id, cipher suites, compression methods), 16 bytes.  The secret is replaced every
    `rotate_every` seconds; a cookie made under the one before still passes (a client answers its
    HelloVerifyRequest within a round trip: at most two periods' cookies are good)."""

    def __init__(self, rotate_every: float = 60.0, now: float = 0.0) -> None:
        self.rotate_every = rotate_every
        self.secrets = [os.urandom(32), os.urandom(32)]
        self.rotated = now

    def rotate(self, now: float) -> None:
        if now - self.rotated >= self.rotate_every:
            self.secrets = [os.urandom(32), self.secrets[0]]
            self.rotated = now

    @staticmethod
    def _input(peer: Peer, hello: m.ClientHello) -> bytes:
        addr = repr(peer).encode()
        if hello.cookie_input:  # (a parsed hello: these very bytes, as they came)
            return len(addr).to_bytes(2, "big") + addr + hello.cookie_input
        suites = b"".join(s.to_bytes(2, "big") for s in hello.suites)
        return b"".join((
            len(addr).to_bytes(2, "big"), addr, hello.version.to_bytes(2, "big"), hello.random,
            bytes((len(hello.session_id),)), hello.session_id, len(suites).to_bytes(2, "big"), suites,
            bytes((len(hello.compression),)), hello.compression,
        ))

    def make(self, peer: Peer, hello: m.ClientHello) -> bytes:
        return hmac_sha256(self.secrets[0], self._input(peer, hello))[:COOKIE_LENGTH]

    def valid(self, peer: Peer, hello: m.ClientHello) -> bool:
        if len(hello.cookie) != COOKIE_LENGTH:
            return False
        data = self._input(peer, hello)
        for s in self.secrets:
            if hmac.compare_digest(hmac_sha256(s, data)[:COOKIE_LENGTH], hello.cookie):
                return True
        return False


@dataclass(frozen=True)
class EngineParams(Params):
    #: the length of the CIDs this server hands out (0: never negotiate RFC 9146)
    cid_length: int = 6
    #: the first bytes of every CID (a worker's index: corem/workers/steer.py steers by it); the
    #: rest of `cid_length` is random
    cid_prefix: bytes = b""
    max_handshakes: int = 1000
    max_sessions: int = 100_000
    handshake_timeout: float = 60.0
    session_timeout: float = 24 * 3600.0
    cookie_rotation: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.cid_length <= 32:
            raise ValueError("cid_length must be 0..32")
        if self.cid_length and len(self.cid_prefix) + 4 > self.cid_length:
            raise ValueError("cid_prefix leaves fewer than 4 random bytes of cid_length")


@dataclass
class EngineStats:
    datagrams_in: int = 0
    bytes_in: int = 0
    bytes_out_unauthenticated: int = 0
    hello_verify_sent: int = 0
    #: handshake flights queued (HelloVerifyRequests included): each one a device answers, so the
    #: edge may busy-poll for it (net/busypoll.py)
    flights_sent: int = 0
    handshakes_started: int = 0
    handshakes_completed: int = 0
    handshakes_failed: Counter[str] = field(default_factory=Counter)
    records_dropped: Counter[str] = field(default_factory=Counter)
    address_changes: int = 0
    #: CID records of a session, from an address another device's live session holds: not moved
    #: there, their data dropped (`_take_address`)
    moves_refused: int = 0
    sessions_closed: int = 0
    sessions_expired: int = 0


class Engine:
    """`psk_for(identity) -> key | None` is called (synchronously) once per ClientKeyExchange."""

    transparent = False

    def __init__(self, psk_for: Callable[[bytes], bytes | None], params: EngineParams | None = None,
                 now: float = 0.0) -> None:
        self.psk_for = psk_for
        self.params = params or EngineParams()
        self.cookies = CookieJar(self.params.cookie_rotation, now)
        self.handshakes: dict[Peer, Connection] = {}
        self.sessions: dict[Peer, Connection] = {}
        self.by_cid: dict[bytes, Connection] = {}
        #: sessions restored by their CID that no record has authenticated since (`restore`,
        #: parked): found by CID, bound to no address until a newest record authenticates
        self.parked: dict[bytes, Connection] = {}
        self.outbox: list[tuple[bytes, Peer]] = []
        self.stats = EngineStats()
        self._next_sweep = now
        #: randomness drawn ahead (`_random`): the bytes, where the next use starts, the fork they were drawn in
        self._pool = b""
        self._pool_at = 0
        self._pool_fork = _forks[0]
        #: the suites `_flights.server_hello` may choose among, in order: (code, 0 PSK / 1 ECDHE), 3
        #: bytes each (ECDHE only with a certificate: without one it is never chosen)
        self._prefs = b"".join(s.code.to_bytes(2, "big") + bytes((s.kx != "psk",)) for s in self.params.suites
                               if s.kx == "psk" or self.params.private_key is not None)
        #: the connections the last `receive` touched (the security layer reads their numbers)
        self.touched: list[Connection] = []
        # hooks for the security layer that drives this engine (corem/dtls/layer.py):
        #: `admit(peer, now)`: a ClientHello with a valid cookie may start a handshake (False: it
        #: is dropped, nothing kept; the caller counts why)
        self.admit: Callable[[Peer, float], bool] | None = None
        #: `established(conn)`: a handshake completed; a reason (str) refuses the session
        #: (e.g. an unregistered certificate: it is closed and counted as a failed handshake)
        self.established: Callable[[Connection], str | None] | None = None
        #: `handshake_over(peer)`: a handshake left `handshakes` (completed, failed, replaced)
        self.handshake_over: Callable[[Peer], object] | None = None
        #: `moved(conn, old_peer)`: RFC 9146 §6, a session now answers at `conn.peer`
        self.moved: Callable[[Connection, Peer], None] | None = None
        #: `on_session(conn, live)`: `conn` became a session at `conn.peer` (live) or is no longer
        #: one there (False; also said of connections that never were, harmlessly): the fast lane's
        #: table of the sessions whose records it opens (layer.py `attach_lane`)
        self.on_session: Callable[[Connection, bool], None] | None = None
        #: `eager()`: an answer to a peer's flight is in the outbox (a HelloVerifyRequest, a flight),
        #: before the bookkeeping that follows it (a finished handshake's hooks: the session, the
        #: lane's table); the driver may send the outbox now (`datagrams_to_send`), so that the
        #: peer's next flight is on its way while this side does the rest (net/udp.py: for the
        #: last datagram of a batch)
        self.eager: Callable[[], None] | None = None

    # -- in --------------------------------------------------------------------------------------

    def receive(self, datagram: bytes, peer: Peer, now: float) -> list[bytes]:
        """The application data records of one datagram (decrypted); handshake answers queued."""
        stats = self.stats
        stats.datagrams_in += 1
        n = len(datagram)
        stats.bytes_in += n
        if n > HEADER and datagram[0] == HANDSHAKE:
            # the handshake's datagrams, decided once (anything else: the records one by one, below)
            seq = lone_epoch0_record_untrusted(datagram, HANDSHAKE)
            if seq is not None and datagram[HEADER] == m.CLIENT_HELLO:
                # a ClientHello, one record making up the datagram: no Record, no loop
                try:
                    conn = self._hello(datagram[HEADER:], seq, peer, now)
                except DtlsDecodeError as e:
                    stats.records_dropped[e.reason] += 1
                    conn = None
                if conn is None:
                    self.touched = []
                    return []
                self.touched = [conn]
                got = conn.app
                if got:
                    conn.app = []
                self._settle(conn)
                return got
            hs = self.handshakes.get(peer)  # (maybe a PSK client's whole second flight)
            if hs is not None and hs.state == WAIT_CLIENT_KEY_EXCHANGE and hs.psk_finished(datagram, now, self._answer):
                self.touched = [hs]
                self._settle(hs)
                return []
        touched: list[Connection] = []
        app: list[bytes] = []
        offset = 0
        while offset < len(datagram):
            try:
                rec, offset = parse_record_untrusted(datagram, offset, self.params.cid_length)
            except DtlsDecodeError as e:
                self.stats.records_dropped[e.reason] += 1
                break  # (the rest of the datagram cannot be framed)
            try:
                conn = self._record(rec, peer, now)
            except DtlsDecodeError as e:
                self.stats.records_dropped[e.reason] += 1
                continue
            if conn is not None:
                if conn not in touched:
                    touched.append(conn)
                if conn.app:
                    app.extend(conn.app)
                    conn.app = []
        for conn in touched:
            self._settle(conn)
        self.touched = touched
        return app

    def _record(self, rec: Record, peer: Peer, now: float) -> Connection | None:
        if rec.type == TLS12_CID:
            conn = self.by_cid.get(rec.cid)
            if conn is None:
                raise DtlsDecodeError(0, "unknown_cid")
            newest = conn.receive_record(rec, now)
            if newest and peer != conn.peer and self.sessions.get(conn.peer) is conn:
                self._move(conn, peer, now)  # (a session's: a handshake finishes where its cookie was)
            elif newest and self.parked.get(rec.cid) is conn:
                self._place(conn, peer, now)
            if conn.app and self.sessions.get(peer) is not conn:
                # authentic, but not this session's address (an older record from an address it
                # left, a parked session's, a move refused): what it carries would be answered at
                # `peer` and taken as the data of the session there, another device's
                conn.app = []
                self.stats.records_dropped["cid_not_at_address"] += 1
            return conn
        if rec.epoch == 0:
            if rec.type == HANDSHAKE and rec.fragment[:1] == bytes((m.CLIENT_HELLO,)):
                return self._hello(rec.fragment, rec.seq, peer, now)
            conn = self.handshakes.get(peer) or self.sessions.get(peer)
            if conn is None:
                raise DtlsDecodeError(0, "no_session")
            conn.receive_record(rec, now)
            return conn
        hs = self.handshakes.get(peer)
        session = self.sessions.get(peer)
        if hs is not None and (hs.pending_read or hs.read_prot):
            failures = hs.auth_failures
            try:
                hs.receive_record(rec, now)
                return hs
            except DtlsDecodeError:
                if session is None:
                    raise
            # (a new handshake with the peer of a live session: the record may be the session's)
            session.receive_record(rec, now)
            hs.auth_failures = failures  # it was: no sign of a wrong PSK in the new handshake
            return session
        if session is None:
            raise DtlsDecodeError(0, "no_session")
        session.receive_record(rec, now)
        return session

    def _hello(self, fragment: bytes, record_seq: int, peer: Peer, now: float) -> Connection | None:
        """A ClientHello (whole, in one record: RFC 6347 lets a server require it; as Mbed TLS):
        `fragment` is the record's, `record_seq` its number."""
        addr = repr(peer).encode()
        n = len(fragment)
        at = 47 + fragment[46] if n > 47 else n  # (the cookie's length byte, after the session id)
        if _hello_verify is not None and not (at < n and fragment[at] == COOKIE_LENGTH):
            # (the cookie-less hello's answer in one C call, or None; a hello with a cookie of the
            # cookie's length it leaves alone: `_server_hello` checks that cookie)
            hvr = _hello_verify(fragment, record_seq, addr, self.cookies.secrets[0])
            if hvr is not None:
                self._verify(hvr, peer)
                return None
        # the server random and a CID (if it hands them out), one draw for either path
        server_random, cid = self._randoms()
        flight: tuple[Any, ...] | bytes | None = None
        if _server_hello is not None:  # (a valid cookie and a PSK suite: the ServerHello flight in one C call)
            params = self.params
            flight = _server_hello(fragment, record_seq, addr, self.cookies.secrets, self._prefs,
                                   params.require_ems, server_random, cid or b"", params.mtu)
        if type(flight) is bytes:  # (a cookie of the cookie's length that is not valid: C's HelloVerifyRequest)
            self._verify(flight, peer)
            return None
        if flight is not None:
            client_random = flight[1]
        else:
            [f, *_] = m.parse_fragments_untrusted(fragment)
            if not f.whole:
                raise DtlsDecodeError(0, "fragmented_client_hello")
            if f.message_seq > MAX_HELLO_SEQ:  # (the numbers of a handshake go on from it: room for them)
                raise DtlsDecodeError(0, "client_hello_message_seq")
            hello = m.parse_client_hello_untrusted(f.body)
            if not self.cookies.valid(peer, hello):
                cookie = self.cookies.make(peer, hello)
                msg = m.message(m.HELLO_VERIFY_REQUEST, f.message_seq, m.hello_verify_request(cookie))
                self._verify(plaintext_record(HANDSHAKE, 0, record_seq, msg, DTLS_1_2), peer)
                return None
            client_random = hello.random
        current = self.handshakes.get(peer)
        if current is not None and current.client_random == client_random and current.state != FAILED:
            if record_seq <= current.hello_seq:
                # the very record again (a retransmission is a new record, RFC 6347 §4.1): a
                # replay, e.g. a flood keeping a slot; our flight is not sent for it
                raise DtlsDecodeError(0, "replayed_client_hello")
            current.hello_seq = record_seq
            current.resend = True  # its retransmitted hello: our ServerHello flight was lost
            return current
        if current is not None:
            self._forget(current)  # (a new hello, a new handshake: it asks for a slot afresh)
        if self.admit is not None:
            if not self.admit(peer, now):
                return None
        elif len(self.handshakes) >= self.params.max_handshakes:
            raise DtlsDecodeError(0, "too_many_handshakes")
        if flight is not None:
            assert type(flight) is tuple
            self._answer(flight[0], peer)  # (C's ServerHello flight: on its way before the connection is made)
        conn = Connection("server", self.params, peer, now)
        self.handshakes[peer] = conn
        self.stats.handshakes_started += 1
        if flight is not None:
            conn.server_started(flight, server_random, record_seq, self.psk_for, now)
        else:
            conn.server_start(hello, m.message(m.CLIENT_HELLO, f.message_seq, f.body), f.message_seq, record_seq,
                              self.psk_for, cid, now, server_random)
        if conn.cid_in:
            self.by_cid[conn.cid_in] = conn
        return conn

    def _verify(self, hvr: bytes, peer: Peer) -> None:
        """A HelloVerifyRequest (C's or Python's), queued, counted and offered at once (`_answer`)"""
        self.stats.hello_verify_sent += 1
        self.stats.bytes_out_unauthenticated += len(hvr)
        self._answer(hvr, peer)

    def _answer(self, datagram: bytes, peer: Peer) -> None:
        """An answer C made (a flight): queued, and offered to the driver (`eager`) before the
        connection's state is brought up to date"""
        self.outbox.append((datagram, peer))
        self.stats.flights_sent += 1
        if self.eager is not None:
            self.eager()

    def _randoms(self) -> tuple[bytes, bytes | None]:
        """A server random, and a CID no session holds (None: this server hands none out)"""
        p = self.params
        if not p.cid_length:
            return self._random(32), None
        while True:
            drawn = self._random(32 + p.cid_length - len(p.cid_prefix))
            cid = p.cid_prefix + drawn[32:]
            if cid not in self.by_cid:
                return drawn[:32], cid

    def _random(self, n: int) -> bytes:
        """`n` bytes of os.urandom's, from the pool (RANDOM_POOL)"""
        at = self._pool_at
        if at + n > len(self._pool) or self._pool_fork != _forks[0]:
            self._pool, at, self._pool_fork = os.urandom(n * RANDOM_POOL), 0, _forks[0]
        self._pool_at = at + n
        return self._pool[at:at + n]

    def _settle(self, conn: Connection) -> None:
        """After a datagram: send what it queued; a finished handshake becomes the session (the one
        it replaces, if any, goes); a failed one goes."""
        if conn.out or conn.resend:
            peer = conn.peer
            self.outbox += [(d, peer) for d in conn.flush()]
            if conn.state not in (FAILED, CLOSED):  # (a fatal alert, a close_notify: no answer comes)
                self.stats.flights_sent += 1
            if self.eager is not None:
                self.eager()  # (before the hooks of a finished handshake, below)
        if conn.state == ESTABLISHED and self.sessions.get(conn.peer) is conn:
            return  # (a session's record: the common case)
        if self.handshakes.get(conn.peer) is conn:
            if conn.state == ESTABLISHED:
                del self.handshakes[conn.peer]
                if self.handshake_over is not None:
                    self.handshake_over(conn.peer)
                refused = self.established(conn) if self.established is not None else None
                if refused is not None:
                    self.stats.handshakes_failed[refused] += 1
                    conn.close()
                    for d in conn.flush():
                        self.outbox.append((d, conn.peer))
                        self.stats.bytes_out_unauthenticated += len(d)
                    self._forget(conn)
                    return
                old = self.sessions.pop(conn.peer, None)
                if old is not None:
                    self._forget(old)
                if len(self.sessions) >= self.params.max_sessions:
                    self._forget(conn)
                    self.stats.handshakes_failed["too_many_sessions"] += 1
                    return
                self.sessions[conn.peer] = conn
                self.stats.handshakes_completed += 1
                if self.on_session is not None:
                    self.on_session(conn, True)
            elif conn.state == FAILED:
                self.stats.handshakes_failed[conn.reason] += 1
                self._forget(conn)
        elif conn.state not in (ESTABLISHED, ""):
            if self.sessions.get(conn.peer) is conn:
                self.stats.sessions_closed += 1
            self._forget(conn)

    def _forget(self, conn: Connection) -> None:
        if self.on_session is not None:
            self.on_session(conn, False)
        if self.handshakes.get(conn.peer) is conn:
            del self.handshakes[conn.peer]
            if self.handshake_over is not None:
                self.handshake_over(conn.peer)
        if self.sessions.get(conn.peer) is conn:
            del self.sessions[conn.peer]
        if conn.cid_in and self.by_cid.get(conn.cid_in) is conn:
            del self.by_cid[conn.cid_in]
            if self.parked.get(conn.cid_in) is conn:
                del self.parked[conn.cid_in]

    def _take_address(self, conn: Connection, peer: Peer, now: float) -> bool:
        """May `conn`, found by its CID, answer at `peer` from now on?  A session of another
        device there gives way if it can be found without it: parked if it has a CID of its own
        (its own next newest record places it again, wherever that comes from), ended if it has
        none and has been silent HELD_FOR (its device's binding there is gone).  One without a
        CID heard from there since keeps it: another session's record from its address, however
        authentic, was sent with a forged source address (RFC 9146 §6 and its security
        considerations) -- moving there would end a live session, and send its answers to
        another device."""
        other = self.sessions.get(peer)
        if other is None or other is conn:
            return True
        if other.cid_in:
            if self.on_session is not None:
                self.on_session(other, False)
            del self.sessions[peer]
            self.parked[other.cid_in] = other
        elif now - other.last_seen < HELD_FOR:
            self.stats.moves_refused += 1
            return False
        else:
            self._forget(other)  # (a session by address at that address is superseded)
        return True

    def _move(self, conn: Connection, peer: Peer, now: float) -> None:
        """RFC 9146 §6: the newest authenticated record came from `peer`: answer there from now on
        (if the address can be its: `_take_address`)"""
        if not self._take_address(conn, peer, now):
            return
        if self.on_session is not None:
            self.on_session(conn, False)
        if self.sessions.get(conn.peer) is conn:
            del self.sessions[conn.peer]
        old, conn.peer = conn.peer, peer
        self.sessions[peer] = conn
        if self.on_session is not None:
            self.on_session(conn, True)
        self.stats.address_changes += 1
        if self.moved is not None:
            self.moved(conn, old)

    def _place(self, conn: Connection, peer: Peer, now: float) -> None:
        """A parked session's first newest record that authenticates came from `peer`: it is the
        session there from now on, as a move would make it (RFC 9146 §6; `_take_address`)"""
        if not self._take_address(conn, peer, now):
            return
        del self.parked[conn.cid_in]
        conn.peer = peer
        self.sessions[peer] = conn
        if self.on_session is not None:
            self.on_session(conn, True)

    def drop_handshake(self, peer: Peer) -> bool:
        """Forget the handshake in progress with `peer` (its slot was taken back: timeout,
        eviction); nothing is sent"""
        conn = self.handshakes.get(peer)
        if conn is None:
            return False
        self._forget(conn)
        return True

    def fail_handshake(self, peer: Peer, alert: int, reason: str) -> bool:
        """End the handshake in progress with `peer` with a fatal alert (sent), counted by `reason`"""
        conn = self.handshakes.get(peer)
        if conn is None:
            return False
        conn.fail(alert, reason)
        self._settle(conn)
        return True

    def forget(self, peer: Peer) -> Connection | None:
        """Drop the session with `peer` (offloaded, expired, replaced); nothing is sent"""
        conn = self.sessions.get(peer)
        if conn is not None:
            self._forget(conn)
        return conn

    def drop(self, conn: Connection) -> None:
        """Drop `conn`, a session at its address or a parked one (offloaded, expired); nothing is sent"""
        self._forget(conn)

    # -- out -------------------------------------------------------------------------------------

    def wrap(self, plaintext: bytes, peer: Peer) -> bytes | None:
        conn = self.sessions.get(peer)
        if conn is None or conn.state != ESTABLISHED:
            return None
        return conn.seal(plaintext)

    def datagrams_to_send(self) -> list[tuple[bytes, Peer]]:
        out, self.outbox = self.outbox, []
        return out

    def tick(self, now: float) -> None:
        self.cookies.rotate(now)
        for conn in list(self.handshakes.values()):
            conn.tick(now)
            if now - conn.started > self.params.handshake_timeout and conn.state not in (FAILED, ESTABLISHED):
                conn.give_up()
            self._settle(conn)
        if now >= self._next_sweep:  # (idle sessions: a walk of them all, so not at every tick)
            self._next_sweep = now + SWEEP_EVERY
            idle = self.params.session_timeout
            for conn in [c for c in self.sessions.values() if now - c.last_seen > idle]:
                self.stats.sessions_expired += 1
                self._forget(conn)

    def settle(self, now: float) -> None:
        pass

    def credentialed(self, datagram: bytes, peer: Peer) -> bool:
        return peer in self.sessions or (datagram[:1] == bytes((TLS12_CID,)) and
                                         datagram[11:11 + self.params.cid_length] in self.by_cid)

    def device(self, peer: Peer) -> bytes | None:
        """The PSK identity the session with `peer` authenticated"""
        conn = self.sessions.get(peer)
        return conn.identity if conn is not None else None

    def export(self, peer: Peer, reserve: int = state.DEFAULT_RESERVE) -> state.SessionState | None:
        """The session with `peer` as data (state.py), or None"""
        conn = self.sessions.get(peer)
        if conn is None or conn.state != ESTABLISHED:
            return None
        return state.export(conn, reserve)

    def restore(self, saved: state.SessionState, peer: Peer, now: float, *, parked: bool = False) -> Connection:
        """Take over a session another process (or node) exported, as the session with `peer`;
        or `parked` (one with a CID, restored because a datagram named its CID): found by its CID
        only, at no address and displacing no session, until a newest record authenticates --
        the datagram that woke it proves nothing of its source (RFC 9146 §6), and a forged one
        must not move it, nor end the session another device has at that source."""
        if saved.role != "server" or (saved.cid_in and len(saved.cid_in) != self.params.cid_length):
            raise ValueError("not a session of a server with this CID length")
        conn = state.restore(saved, peer, now, self.params)
        if parked:
            if not conn.cid_in:
                raise ValueError("only a session with a CID is restored parked")
            other = self.by_cid.get(conn.cid_in)
            if other is not None:
                self._forget(other)
            self.by_cid[conn.cid_in] = self.parked[conn.cid_in] = conn
            return conn
        old = self.sessions.get(peer)
        if old is not None:
            self._forget(old)
        if conn.cid_in:
            other = self.by_cid.get(conn.cid_in)
            if other is not None:
                self._forget(other)
            self.by_cid[conn.cid_in] = conn
        self.sessions[peer] = conn
        if self.on_session is not None:
            self.on_session(conn, True)
        return conn

    def close(self, peer: Peer) -> None:
        conn = self.sessions.get(peer)
        if conn is not None:
            conn.close()
            self._settle(conn)
