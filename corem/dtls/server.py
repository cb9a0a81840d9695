"""DTLS 1.2 sessions for many peers on one UDP socket, sans-IO, on python-mbedtls buffers.

`DtlsServer.receive(datagram, peer, now)` returns the decrypted application datagrams (CoAP
messages) and queues handshake records in `outbox`; `wrap(plaintext, peer)` encrypts a response;
`tick(now)` drives handshake retransmission and expiry.  Mbed TLS does the cryptography; this
module owns which session a datagram belongs to and how many there may be.

How python-mbedtls 2.10 behaves (measured; docs/architecture.md): `do_handshake()` runs one step;
the first ClientHello of a buffer that has a cookie parameter raises `HelloVerifyRequest` after
writing the HelloVerifyRequest; the PSK store is a Mapping whose `__getitem__` is called inside
`do_handshake()`.

Stateless until proven: a ClientHello is handled by a fresh buffer that is thrown away again
unless the hello carried a valid cookie (RFC 6347 §4.2.1), so a spoofed flood leaves no state
and gets back only HelloVerifyRequests, which are smaller than the hellos that caused them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Mapping

from mbedtls import tls
from mbedtls.exceptions import TLSError

from ..registry import Device
from ..logs import Every
from ..stats import Sample, counter, fields, gauge
from .certs import load_certificates, load_key, peer_der
from .errors import CLOSE_NOTIFY, error_code
from .errors import reason as tls_reason
from .params import (CLIENT_AUTH, DEFAULT_CIPHERS, DTLS_METRICS, MAX_MISSES, MISS_TTL, DtlsParams,  # noqa: F401
                     has_cookie, mbedtls_ciphers)
from .slots import HandshakeSlots
from .store import Row, SessionStore, Unsaved, freeze, peer_key, step_sequence, thaw

log = logging.getLogger("corem.dtls")

Peer = Hashable

#: (the stubs say `_handshake_state` is an int; it is this enum member)
HANDSHAKE_OVER: Any = tls.HandshakeStep.HANDSHAKE_OVER
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
CLIENT_HELLO = 1  # handshake message type, the byte after the 13-byte record header

#: Bytes asked of Mbed TLS per read; a record's plaintext is read in as many as it takes.
READ_SIZE = 2048

class PskStore(Mapping[str, bytes]):
    """The PSK callback store: identity -> key, resolved from the registry's directory.

    Mbed TLS calls `__getitem__` synchronously inside `do_handshake()`; the device found is left in
    `resolved` for the DtlsServer to attach to the session it was stepping.  A KeyError rejects
    the handshake.
    """

    def __init__(self, lookup: Callable[[str], Device | None]) -> None:
        self.lookup = lookup
        self.resolved: Device | None = None

    def __getitem__(self, identity: str) -> bytes:
        device = self.lookup(identity)
        if device is None or device.psk is None:
            raise KeyError(identity)
        self.resolved = device
        return device.psk

    def __reduce__(self) -> tuple[type[PskStore], tuple[Callable[[str], None]]]:
        """A serialized session carries its configuration, and with it this store.  It must not
        drag the registry (or any key) into the blob: restored sessions never look a key up."""
        return (PskStore, (_no_device,))

    def __iter__(self) -> Iterator[str]:
        return iter(())  # Mbed TLS only looks identities up; it never lists them

    def __len__(self) -> int:
        return 0


def _no_device(identity: str) -> None:
    return None




class Session:
    __slots__ = ("buf", "device", "established", "started", "last_seen", "checkpoint_due", "rx_top", "floor",
                 "saved")

    def __init__(self, buf: tls.TLSWrappedBuffer, now: float) -> None:
        self.buf = buf
        self.device: Device | None = None
        self.established = False
        self.started = now
        self.last_seen = now
        #: when the session is next saved to the store (0: at the first tick after a record)
        self.checkpoint_due = 0.0
        #: the highest record number taken from the device, and the number at or below which
        #: every record is a replay (a session restored from the store: what it took before)
        self.rx_top = -1
        self.floor = -1
        #: the store's key of its copy (a checkpoint) that a crash would restore, or None: its
        #: records' numbers are written there before they are handled (`DtlsServer.settle`)
        self.saved: bytes | None = None


@dataclass(slots=True)
class DtlsStats:
    datagrams_in: int = 0
    bytes_in: int = 0
    bytes_out_unauthenticated: int = 0
    hello_verify_sent: int = 0
    offloaded: int = 0
    offload_failed: int = 0  # sessions the store refused (disk full): kept in memory
    checkpoints: int = 0  # live sessions saved to the store (dtls_checkpoint)
    restored: int = 0
    sessions_lost: int = 0
    handshakes_started: int = 0
    handshakes_completed: int = 0
    handshakes_failed: Counter[str] = field(default_factory=Counter)  # reason -> count
    handshakes_refused: Counter[str] = field(default_factory=Counter)  # reason -> count (slots.py)
    handshakes_evicted: int = 0  # half-open handshakes dropped for a fairer newcomer (slots.py)
    records_dropped: int = 0
    records_replayed: int = 0  # at or below a restored session's floor (see Session.floor)
    marks_failed: int = 0  # batches whose record numbers the store refused (disk full)
    sessions_closed: int = 0
    sessions_expired: int = 0


#: DtlsStats field -> metric name


class DtlsServer:
    """CoAPS's security layer (corem/net/security.py): handshakes, sessions, records."""

    #: Seconds between sweeps of idle established sessions.
    SWEEP_INTERVAL = 60.0
    #: records are not messages: the fast lane gets the decrypted messages, not the socket
    transparent = False

    def __init__(
        self,
        psk_store: PskStore,
        params: DtlsParams | None = None,
        cert_lookup: Callable[[str], Device | None] | None = None,
        *,
        store: SessionStore | None = None,
        device_lookup: Callable[[str, str], Device | None] | None = None,
        wall: Callable[[], float] = time.time,
        on_new_session: Callable[[Peer, float], None] | None = None,
    ) -> None:
        self.params = p = params or DtlsParams()
        self.psk_store = psk_store
        self.cert_lookup = cert_lookup or _no_device
        #: offloaded sessions live in the store; `offloaded` is the set of their peer keys
        self.store = store if store is not None else SessionStore()
        if self.store.shared:
            # its sessions are pickles (store.freeze/thaw): a row another node wrote would run code
            # here.  Settings.check refuses the setting; this refuses the object, whoever makes it
            raise ValueError("the mbedtls engine never takes a shared session store (its sessions are pickles); "
                             "use dtls_engine = corem")
        self._offload_warning = Every()
        self.device_lookup = device_lookup or (lambda tenant, device: None)
        self.wall = wall
        #: (a shared store -- PostgreSQL, several nodes -- is asked per unknown peer instead:
        #: another node may have saved a session for it at any time)
        self.offloaded: set[bytes] = set() if self.store.shared else set(self.store.keys())
        #: shared store: peers just asked for in vain, and when to ask again (a flood of records
        #: from unknown addresses costs one query per address per MISS_TTL, not one per datagram)
        self._missed: OrderedDict[bytes, float] = OrderedDict()
        self._now = 0.0
        mbedtls_ciphers(p.ciphers)
        extra: dict[str, Any] = {}
        if p.cert_file is not None:
            assert p.key_file is not None  # (DtlsParams checks that they go together)
            extra["certificate_chain"] = (load_certificates(p.cert_file), load_key(p.key_file))
            if p.ca_file is not None:
                extra["trust_store"] = tls.TrustStore(load_certificates(p.ca_file))
        conf = tls.DTLSConfiguration(
            pre_shared_key_store=psk_store,
            ciphers=tuple(p.ciphers),
            validate_certificates=p.cert_file is not None and p.client_auth == "required",
            lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
            highest_supported_version=tls.DTLSVersion.DTLSv1_2,
            anti_replay=True,
            **extra,
        )
        self._ctx = tls.ServerContext(conf)
        #: live sessions in activity order (least recently active first), and handshakes past
        #: the cookie exchange (stepped by tick)
        self.sessions: OrderedDict[Peer, Session] = OrderedDict()
        self.handshakes: dict[Peer, Session] = {}
        #: who holds the handshake slots (`handshakes` has exactly their peers)
        self.slots = HandshakeSlots(p.max_handshakes, p.handshake_timeout, p.handshake_floor)
        self._outbox: list[tuple[bytes, Peer]] = []
        self.stats = DtlsStats()
        #: told `(peer, now)` when a handshake completes: a new session, in which the peer's
        #: message IDs start afresh (the message layer stops treating old ones as duplicates).
        #: A callback, not an event: it must reach the message layer before the next datagram.
        self.on_new_session = on_new_session
        self._next_sweep = 0.0
        #: live sessions to save at the next tick (dtls_checkpoint)
        self._checkpoints: set[Peer] = set()
        #: saved sessions that took records in this batch: their numbers go to the store (`settle`)
        self._marks: dict[bytes, Session] = {}

    # -- input ---------------------------------------------------------------------------------
    def receive(self, data: bytes, peer: Peer, now: float) -> list[bytes]:
        """Feed one datagram; return the application datagrams it decrypted to."""
        stats = self.stats
        self._now = now
        stats.datagrams_in += 1
        stats.bytes_in += len(data)
        if len(data) < 14:  # shorter than a DTLS record header and one byte
            stats.records_dropped += 1
            return []
        handshake = self.handshakes.get(peer)
        if handshake is not None:
            if self.slots.repeats(peer, data):  # a flooder's hello again: a replay (slots.py)
                stats.records_dropped += 1
                return []
            handshake.last_seen = now
            self._step(handshake, peer, data)
            return []
        if data[0] == CONTENT_HANDSHAKE and data[3] == 0 and data[4] == 0 and data[13] == CLIENT_HELLO:
            return self._hello(data, peer, now)  # a new handshake (replacing any old session)
        session = self.sessions.get(peer)
        if session is None:
            if self.store.shared:
                session = self._fetch(peer, now) if data[0] == CONTENT_APPLICATION_DATA else None
            else:
                session = self._restore(peer, now) if self.offloaded else None
            if session is None:
                stats.records_dropped += 1  # no session to decrypt it with
                return []
        else:
            self.sessions.move_to_end(peer)
        session.last_seen = now
        if session.checkpoint_due <= now and self.params.checkpoint:
            self._checkpoints.add(peer)
        top = newest_record(data, session.floor)
        if top <= REPLAYED:  # a replay into a restored session, or not DTLS records at all
            if top == REPLAYED:
                stats.records_replayed += 1
            else:
                stats.records_dropped += 1
            return []
        out = self._read(session, peer, data)
        if out and top > session.rx_top:
            session.rx_top = top
            if session.saved is not None:
                self._marks[session.saved] = session
        return out

    def settle(self, now: float) -> None:
        """Write the record numbers that saved sessions took in this batch to the store, before
        their messages are handled: a session restored from its copy after a crash then refuses
        every record the device sent before (a replay would be a reading stored twice, or an
        actuation done twice).  The edge calls it once per batch, between decrypting and handling.
        If the disk refuses, the batch is still served (it is counted, and /readyz says the store
        fails): only records taken while the store refuses writes could be replayed after a crash."""
        if not self._marks:
            return
        marks = [(max(s.rx_top, s.floor), key) for key, s in self._marks.items()]
        self._marks.clear()
        if not self.store.mark(marks):
            self.stats.marks_failed += 1

    def _hello(self, data: bytes, peer: Peer, now: float) -> list[bytes]:
        """A ClientHello from a peer without a handshake in progress: cookie exchange first, then
        a handshake slot (slots.py), shared fairly by source address and prefix."""
        if len(self.sessions) >= self.params.max_sessions and peer not in self.sessions:
            self.stats.handshakes_refused["sessions"] += 1
            return []
        # A hello without a cookie always gets its stateless HelloVerifyRequest, whatever the
        # slots hold (a full table must not keep new devices from even starting).  One with a
        # cookie asks for a slot first: a source over its share costs a lookup, no cryptography.
        verdict = self.slots.consider(peer, now) if has_cookie(data) else None
        if verdict is not None and verdict.reason is not None:
            self.stats.handshakes_refused[verdict.reason] += 1
            return []
        buf = self._ctx.wrap_buffers()
        buf.setcookieparam(_peer_bytes(peer))
        session = Session(buf, now)
        buf.receive_from_network(data)
        try:
            self._advance(session)
        except tls.HelloVerifyRequest:
            # no cookie or a stale one: answer statelessly, keep nothing
            self.stats.hello_verify_sent += 1
            self._flush(buf, peer, unauthenticated=True)
            return []
        except tls.WantReadError:
            pass
        except TLSError as e:
            self._fail(session, peer, e)
            return []
        # the cookie was valid: the peer takes a slot (maybe evicting a heavier source's oldest
        # half-open handshake) and has a handshake in progress (replacing an old session, and its
        # saved copy, offloaded or a checkpoint)
        verdict = self.slots.admit(peer, now, verdict, data)
        if verdict.reason is not None:
            self.stats.handshakes_refused[verdict.reason] += 1
            return []
        if verdict.evict is not None and self.handshakes.pop(verdict.evict, None) is not None:
            self.stats.handshakes_evicted += 1
        key = peer_key(peer)
        if self.sessions.pop(peer, None) is not None or key in self.offloaded or self.store.shared:
            self.offloaded.discard(key)
            self.store.discard(key)
        self.handshakes[peer] = session
        self.stats.handshakes_started += 1
        self._flush(buf, peer, unauthenticated=True)
        self._check_done(session, peer)
        return []

    def _step(self, session: Session, peer: Peer, data: bytes | None) -> None:
        buf = session.buf
        if data is not None:
            buf.receive_from_network(data)
        try:
            self._advance(session)
        except tls.WantReadError:
            pass
        except TLSError as e:
            self._fail(session, peer, e)
            return
        self._flush(buf, peer, unauthenticated=True)
        self._check_done(session, peer)

    def _advance(self, session: Session) -> None:
        """Step the handshake until it needs input (WantReadError) or is over."""
        buf = session.buf
        store = self.psk_store
        while buf._handshake_state is not HANDSHAKE_OVER:
            store.resolved = None
            try:
                buf.do_handshake()
            except tls.WantWriteError:
                continue
            finally:
                if store.resolved is not None:
                    session.device = store.resolved

    def _check_done(self, session: Session, peer: Peer) -> None:
        if session.established or session.buf._handshake_state is not HANDSHAKE_OVER:
            return
        self.handshakes.pop(peer, None)
        self.slots.release(peer)
        if session.device is None:  # not PSK: a certificate maps to a device, or nothing does
            der = peer_der(session.buf)
            if der is not None:
                session.device = self.cert_lookup(hashlib.sha256(der).hexdigest())
                if session.device is None:
                    # a valid certificate, but no registered device has it: end the session
                    self.stats.handshakes_failed["unregistered_certificate"] += 1
                    log.debug("dtls peer %s presented an unregistered certificate", peer)
                    try:
                        session.buf.shutdown()
                    except TLSError:
                        pass
                    self._flush(session.buf, peer, unauthenticated=True)
                    return
        session.established = True
        self.sessions[peer] = session
        self.stats.handshakes_completed += 1
        if self.on_new_session is not None:
            self.on_new_session(peer, self._now)

    def _fail(self, session: Session, peer: Peer, error: TLSError) -> None:
        reason = tls_reason(error)
        self.stats.handshakes_failed[reason] += 1
        log.debug("dtls handshake with %s failed: %s", peer, reason)  # counted by reason in metrics
        self._flush(session.buf, peer, unauthenticated=True)  # the alert, if Mbed TLS wrote one
        if self.handshakes.get(peer) is session:
            del self.handshakes[peer]
            self.slots.release(peer)

    def _read(self, session: Session, peer: Peer, data: bytes) -> list[bytes]:
        buf = session.buf
        buf.receive_from_network(data)
        # a datagram that is one record (the usual case) is read once: asking again only to be
        # told WantReadError costs an exception per datagram
        one_record = len(data) == 13 + (data[11] << 8 | data[12])
        out = []
        while True:
            try:
                plaintext = buf.read(READ_SIZE)
            except tls.WantReadError:
                break
            except TLSError as e:
                # close_notify, a fatal alert, or a record that does not decrypt
                if error_code(e) == CLOSE_NOTIFY:
                    self.stats.sessions_closed += 1
                    del self.sessions[peer]
                else:
                    self.stats.records_dropped += 1
                break
            if not plaintext:
                break
            out.append(plaintext)
            if one_record and len(plaintext) < READ_SIZE:
                break
        return out

    # -- output --------------------------------------------------------------------------------
    def wrap(self, plaintext: bytes, peer: Peer) -> bytes | None:
        """Encrypt one application datagram for `peer`; None if it has no session any more."""
        session = self.sessions.get(peer)
        if session is None:
            session = self._restore(peer, None)
            if session is None:
                return None
        buf = session.buf
        buf.write(plaintext)
        record = buf.peek_outgoing(4096)
        buf.consume_outgoing(len(record))
        return record

    def datagrams_to_send(self) -> list[tuple[bytes, Peer]]:
        """Handshake flights and alerts queued since the last call (records of application data
        come from `wrap`)."""
        out, self._outbox = self._outbox, []
        return out

    def credentialed(self, datagram: bytes, peer: Peer) -> bool:
        """Over its source's rate, a datagram from a live session still goes through: the cookie
        exchange and the handshake proved the peer (net/limits.py)."""
        return peer in self.sessions

    def _flush(self, buf: tls.TLSWrappedBuffer, peer: Peer, *, unauthenticated: bool) -> None:
        while True:
            out = buf.peek_outgoing(4096)
            if not out:
                return
            buf.consume_outgoing(len(out))
            self._outbox.append((out, peer))
            if unauthenticated:
                self.stats.bytes_out_unauthenticated += len(out)

    # -- time ----------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Retransmit handshake flights whose timer ran out, drop stalled handshakes, and now and
        then offload idle sessions and forget those idle past the inactivity timeout."""
        self._now = now
        p = self.params
        for peer in self.slots.expire(now):  # past the timeout, which shrinks as the slots fill
            if self.handshakes.pop(peer, None) is not None:
                self.stats.handshakes_failed["timeout"] += 1
        for peer, session in list(self.handshakes.items()):
            self._step(session, peer, None)  # Mbed TLS resends its flight if its timer expired
        if self._checkpoints:
            self.checkpoint(now)
        if now >= self._next_sweep:
            self._next_sweep = now + min(self.SWEEP_INTERVAL, p.offload_after / 2)
            self.sweep(now)

    def checkpoint(self, now: float) -> int:
        """Save the sessions that had a record since they were due, in one transaction, and go on
        with each from its saved copy (Mbed TLS resets a context it saves).  A session that cannot
        be saved yet (no data since its handshake) is tried again after its next record."""
        due, self._checkpoints = self._checkpoints, set()
        wall_offset = self.wall() - now
        rows: list[Row] = []
        saving: list[Session] = []
        for peer in due:
            session = self.sessions.get(peer)
            if session is None:
                continue
            blob = freeze(session.buf)
            if blob is Unsaved.NOT_YET:
                continue
            buf = None if blob is Unsaved.LOST else thaw(blob)
            if buf is None:
                log.warning("lost the session of %s while saving it", peer)
                self.stats.sessions_lost += 1
                del self.sessions[peer]
                continue
            assert isinstance(blob, bytes)
            session.buf = buf
            session.checkpoint_due = now + self.params.session_timeout / 2
            rows.append(_stored(peer, session, blob, wall_offset))
            saving.append(session)
        if rows and self.store.put(rows):
            self.stats.checkpoints += len(rows)
            for session, row in zip(saving, rows):  # (only those saved: not one NOT_YET)
                session.saved = row[0]
        return len(rows)

    def sweep(self, now: float, *, everything: bool = False) -> int:
        """Offload sessions idle past `offload_after` (all of them with `everything`, at shutdown)
        and forget those idle past the inactivity timeout.  Walks from the least recently active
        end and stops at the first active session.  Returns how many were offloaded."""
        p = self.params
        expire_before = now - p.session_timeout
        offload_before = float("inf") if everything else now - p.offload_after
        wall_offset = self.wall() - now
        sessions = self.sessions
        keep: list[tuple[Peer, Session]] = []
        rows: list[Row] = []
        saving: list[tuple[Peer, Session, Row]] = []
        while sessions:
            peer, session = next(iter(sessions.items()))
            if session.last_seen >= offload_before:
                break
            del sessions[peer]
            if session.last_seen < expire_before:
                self.stats.sessions_expired += 1
                continue
            blob = freeze(session.buf)
            if blob is Unsaved.NOT_YET:
                keep.append((peer, session))  # not serializable yet (no data since the handshake)
            elif blob is Unsaved.LOST:
                # saving resets the live context: whatever failed after it, this session is gone;
                # the device will do a new handshake
                log.warning("lost the session of %s while serializing it", peer)
                self.stats.sessions_lost += 1
            else:
                row = _stored(peer, session, blob, wall_offset)
                rows.append(row)
                saving.append((peer, session, row))
        for peer, session in keep:
            sessions[peer] = session
            sessions.move_to_end(peer, last=False)
        if not self.store.put(rows):  # the disk refused: they stay live; the next sweep tries again
            self._keep_live(saving)
            return 0
        self.offloaded.update(row[0] for row in rows)
        self.stats.offloaded += len(rows)
        expired = self.store.expire(expire_before + wall_offset)
        self.offloaded.difference_update(expired)
        self.stats.sessions_expired += len(expired)
        return len(rows)

    def _keep_live(self, saving: list[tuple[Peer, Session, Row]]) -> None:
        """The store refused these sessions: back into memory, each from its blob (saving reset
        its Mbed TLS context), in front of the least recently active end where they were."""
        self.stats.offload_failed += len(saving)
        if saving and self._offload_warning.due():  # one line a minute while the disk refuses
            log.warning("could not offload %d DTLS sessions (%s): they stay in memory", len(saving),
                        self.store.last_error)
        for peer, session, row in reversed(saving):
            buf = thaw(row[1])
            if buf is None:  # a blob that does not restore: the device handshakes again
                self.stats.sessions_lost += 1
                continue
            session.buf = buf
            self.sessions[peer] = session
            self.sessions.move_to_end(peer, last=False)

    def _fetch(self, peer: Peer, now: float) -> Session | None:
        """A shared store: the session another node (or this one) saved for this peer, if any."""
        key = peer_key(peer)
        missed = self._missed
        if missed.get(key, 0.0) > now:
            return None
        session = self._restore(peer, now, known=False)
        if session is None:
            missed[key] = now + MISS_TTL
            missed.move_to_end(key)
            while len(missed) > MAX_MISSES or (missed and next(iter(missed.values())) <= now):
                missed.popitem(last=False)
        else:
            missed.pop(key, None)
        return session

    def _restore(self, peer: Peer, now: float | None, known: bool = True) -> Session | None:
        key = peer_key(peer)
        if known and key not in self.offloaded:
            return None
        self.offloaded.discard(key)
        row = self.store.take(key)
        if row is None:
            return None
        _, blob, tenant, name, _, rx_top = row
        device = self.device_lookup(tenant, name) if tenant else None
        if tenant and device is None:  # the device was removed while its session slept
            self.stats.sessions_expired += 1
            return None
        # the copy may be older than what this peer last heard from us (a checkpoint, before a
        # crash): our record numbers must start past any we sent since (store.step_sequence)
        wall = self.wall()
        buf = thaw(blob, lambda body: step_sequence(body, wall))
        if buf is None:  # a blob that does not restore is a lost session, no more
            self.stats.sessions_lost += 1
            return None
        session = Session(buf, self._now if now is None else now)
        session.established = True
        session.device = device
        session.floor = session.rx_top = rx_top  # the copy may be older than the records it took
        self.sessions[peer] = session
        self.stats.restored += 1
        return session

    def metrics(self) -> Iterator[Sample]:
        d = self.stats
        yield from fields(d, DTLS_METRICS)
        for reason, n in sorted(d.handshakes_failed.items()):
            yield counter("corem_dtls_handshakes_failed", n, reason=reason)
        for reason, n in sorted(d.handshakes_refused.items()):
            yield counter("corem_dtls_handshakes_refused", n, reason=reason)
        yield gauge("corem_dtls_sessions", len(self.sessions), state="live")
        yield gauge("corem_dtls_sessions", len(self.offloaded), state="offloaded")
        yield gauge("corem_dtls_sessions", len(self.handshakes), state="handshaking")
        yield counter("corem_dtls_session_store_errors", self.store.errors)

    def device(self, peer: Peer) -> Device | None:
        session = self.sessions.get(peer)
        return None if session is None else session.device

    def close(self, now: float) -> int:
        """At shutdown: offload every session that can be saved.  Returns how many were saved.
        (Since their blobs are tagged with a key of this process's own, store.thaw, a process after
        the restart finds them but never unpickles them: each is a lost session there and its
        device handshakes again.  Only corem's engine takes sessions across a restart.)"""
        saved = self.sweep(now, everything=True)
        self.store.close()
        return saved


def _stored(peer: Peer, session: Session, blob: bytes, wall_offset: float) -> Row:
    """A session as the store keeps it: peer key, blob, its device, and when it was last seen
    (wall clock)."""
    device = session.device
    tenant, name = (device.tenant, device.device) if device is not None else ("", "")
    return peer_key(peer), blob, tenant, name, session.last_seen + wall_offset, max(session.rx_top, session.floor)


#: `newest_record`'s answers that are not a record number
REPLAYED, MALFORMED = -2, -3


def newest_record(data: bytes, floor: int) -> int:
    """The highest record number among the datagram's records of epoch 1 and above (-1 if none);
    REPLAYED if any is at or below `floor`; MALFORMED if the records do not fill the datagram.
    Read before the records decrypt: the number is only kept (`rx_top`) once they did."""
    top, at, end = -1, 0, len(data)
    while at + 13 <= end:
        epoch = data[at + 3] << 8 | data[at + 4]
        if epoch:
            seq = int.from_bytes(data[at + 5:at + 11], "big")
            if seq <= floor:
                return REPLAYED
            if seq > top:
                top = seq
        at += 13 + (data[at + 11] << 8 | data[at + 12])
    return top if at == end else MALFORMED


def _peer_bytes(peer: Peer) -> bytes:
    if isinstance(peer, tuple):
        return f"{peer[0]}|{peer[1]}".encode()
    return repr(peer).encode()


