"""CoAPS's security layer on corem's own DTLS engine (`corem.dtls.engine`, issue 27): the second
implementation of the interface `DtlsServer` (server.py, python-mbedtls) offers, selected by
`dtls_engine = "corem"`.

What it adds to the sans-IO `Engine` is what DtlsServer adds to Mbed TLS, with the same settings,
the same metric names and the same store:

- credentials: the PSK callback store (identity -> the registry's device and key), X.509 client
  certificates against `dtls_ca` and the registry (`dtls_client_auth` required | none | optional),
  the server's certificate and key;
- admission: a ClientHello with a valid cookie takes a handshake slot (slots.py) exactly as under
  DtlsServer; the cookie exchange itself stays stateless (the engine's CookieJar);
- sessions: at most `max_sessions` live; idle ones offloaded to the SessionStore (store.py) and
  restored by the next datagram, checkpoints, the save at shutdown, expiry.  The blob is the
  engine's state record (engine/state.py), sealed with AES-GCM under `dtls_state_key`, bound to
  its row's key, behind a 4-byte tag no pickle starts with.  It is never unpickled: a row this
  layer cannot open (an mbedtls pickle, another key, a forgery) is a lost session, and the device
  handshakes again.  Sessions with a Connection ID are stored under their CID (so a device that
  comes back from a new address is restored by it), the others under their peer's address;
- replays: `settle` writes the record numbers saved sessions took in the batch to the store
  before the batch is handled (SessionStore.mark), and a restored session's replay window
  refuses everything at or below that number (the window carries the floor);
- Connection ID moves (RFC 9146 §6): the engine moves a session to the address of its newest
  authenticated record; the layer counts it and tells `on_moved(old, new, now)`.
"""

from __future__ import annotations

import functools
import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Hashable, Iterator, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import corem.dtls.engine.state as state
from ..datafiles import STATE_KEY_FILE
from ..registry import Device, credentials, same_credentials
from ..logs import Every
from ..stats import Sample, counter, fields, gauge
from ..wal import WRITER_BACKSTOP, Checkpointer, defer_checkpoints
from .engine.certs import chain_verifier
from .engine.connection import ESTABLISHED, Connection
from .engine.engine import Engine, EngineParams, EngineStats
from .engine.errors import BAD_RECORD_MAC, DtlsDecodeError
from .engine.records import RECORDS, SEQ_MAX, TLS12_CID, parse_record_untrusted
from .keyset import KeySet
from .params import (DTLS_METRICS, MAX_MISSES, MISS_TTL, DtlsParams, corem_suites, has_cookie, registered,
                     registry_device)
from .slots import HandshakeSlots
from .store import FOLD_EVERY, Marks, Row, SessionStore, pack_marks, peer_key

log = logging.getLogger("corem.dtls")

Peer = Hashable

CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
#: what a stored blob of this layer starts with: 0x00 is no pickle opcode (the mbedtls engine's
#: `thaw` refuses it at once), then the format's name and version
BLOB_TAG = b"\x00cD1"
#: a row key for a session found by its Connection ID (peer keys are 6 or 18 bytes, or repr text)
CID_KEY = b"\x00cid"
#: epoch-1 records of a handshake that did not authenticate before it is failed as bad_mac
FINISHED_FAILURES = 2

#: the engine's failure names -> the names corem_dtls_handshakes_failed_total has used since
#: DtlsServer (docs: errors.py); the rest keep the engine's own name
REASONS = {
    "unknown_psk_identity": "unknown_identity",
    "bad_finished": "bad_mac",
    "finished_not_authentic": "bad_mac",
    "no_shared_suite": "no_cipher_in_common",
    "bad_certificate": "certificate_not_trusted",
    "protocol_version": "bad_protocol_version",
    "timeout": "timeout",
    "no_client_certificate": "no_client_certificate",
}


def reason_name(reason: str) -> str:
    if reason.startswith("peer_alert_"):
        return "alert_received"
    return REASONS.get(reason, reason)


def load_state_key(setting: str, data_dir: Path | None) -> bytes:
    """`dtls_state_key` (hex, 16 or 32 bytes), or the one kept in data_dir (made, mode 0600, the
    first time) when the setting is empty and `data_dir` is given."""
    if setting:
        try:
            key = bytes.fromhex(setting.strip())
        except ValueError:
            raise ValueError("dtls_state_key: not hex") from None
        if len(key) not in (16, 32):
            raise ValueError("dtls_state_key: 16 or 32 bytes (32 or 64 hex digits)")
        return key
    if data_dir is None:
        return os.urandom(32)
    path = data_dir / STATE_KEY_FILE
    try:
        return load_state_key(path.read_text().strip(), None)
    except FileNotFoundError:
        pass
    # made whole under another name, then linked into place: of workers starting at once, one
    # link wins and every one reads the winner's key (never a half-written file)
    key = os.urandom(32)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = data_dir / f".{STATE_KEY_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return load_state_key(path.read_text().strip(), None)


def engine_params(p: DtlsParams, cid_length: int = 6, client_auth: str | None = None,
                  cid_prefix: bytes = b"", admit_certificate: Callable[[bytes], bool] | None = None) -> EngineParams:
    """DtlsParams (the settings) as the engine's parameters; ValueError names what the engine
    cannot do.  `admit_certificate`: whether a verified certificate's identity is a registered
    device's (refused in the handshake otherwise: Params.admit_certificate)."""
    suites = corem_suites(p.ciphers)
    chain: tuple[bytes, ...] = ()
    key: ec.EllipticCurvePrivateKey | None = None
    verify = None
    mode = "none"
    if p.cert_file is not None:
        assert p.key_file is not None
        chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in _pem_certificates(p.cert_file))
        try:
            loaded = serialization.load_pem_private_key(Path(p.key_file).read_bytes(), None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{p.key_file}: not a PEM private key ({e})") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(loaded.curve, ec.SECP256R1):
            raise ValueError(f"{p.key_file}: the corem engine signs with P-256 ECDSA keys only")
        key = loaded
        mode = client_auth or p.client_auth
        if mode != "none":
            if p.ca_file is None:
                raise ValueError("dtls_ca is needed to verify device certificates "
                                 "(or set dtls_client_auth = none)")
            verify = chain_verifier(_pem_certificates(p.ca_file))
    return EngineParams(suites=suites, certificate_chain=chain, private_key=key, verify_peer=verify,
                        client_auth=mode, admit_certificate=admit_certificate, require_ems=p.require_ems,
                        cid_length=cid_length, cid_prefix=cid_prefix,
                        max_handshakes=p.max_handshakes,
                        max_sessions=p.max_sessions, handshake_timeout=p.handshake_timeout,
                        session_timeout=float("inf"))


def _pem_certificates(path: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not a valid PEM certificate ({e})") from None
    if not certs:
        raise ValueError(f"{path}: no PEM certificate in it")
    return certs


@dataclass
class LayerStats:
    hello_verify_sent: int = 0
    offloaded: int = 0
    offload_failed: int = 0
    checkpoints: int = 0
    restored: int = 0
    sessions_lost: int = 0
    handshakes_refused: Counter[str] = field(default_factory=Counter)
    handshakes_evicted: int = 0
    own_failures: Counter[str] = field(default_factory=Counter)  # (the layer's own: timeout)
    records_replayed: int = 0
    marks_failed: int = 0
    sessions_expired: int = 0
    cid_moves: int = 0
    sessions_superseded: int = 0
    sessions_revoked: int = 0
    sessions_taken_elsewhere: int = 0
    engine: EngineStats = field(default_factory=EngineStats)

    # (as DtlsStats names them: the admin API's summary reads these two)
    @property
    def handshakes_completed(self) -> int:
        return self.engine.handshakes_completed

    @property
    def handshakes_failed(self) -> Counter[str]:
        failed: Counter[str] = Counter()
        for reason, n in self.engine.handshakes_failed.items():
            failed[reason_name(reason)] += n
        failed.update(self.own_failures)
        return failed


class LaneSessions(Protocol):
    """The fast lane's table of the sessions whose records it opens and seals itself
    (corem/fastlane: `FastLane.add_session`, `drop_session`)."""

    def add_session(self, owner: Any, peer: Any, cid_in: bytes, cid_out: bytes, read: Any, window: Any,
                    write: Any, device: Device | None, floor: int, mark_key: bytes | None) -> None: ...

    def drop_session(self, owner: Any, peer: Any, cid_in: bytes) -> None: ...

    def take_marks(self) -> list[tuple[int, bytes]]: ...

    def take_marks_packed(self) -> bytes: ...

    def cookie_secret(self, secret: bytes) -> None: ...


class Session:
    """What the layer keeps beside a live Connection (attached as `conn.layer`)."""

    __slots__ = ("device", "checkpoint_due", "marked", "saved", "key")

    def __init__(self, device: Device | None, key: bytes) -> None:
        self.device = device
        self.checkpoint_due = 0.0
        #: the highest record number written to the store for it (-1: none)
        self.marked = -1
        #: the store holds a copy a crash would restore: record numbers go there first (settle)
        self.saved = False
        #: its row's key in the store (b"": not made yet -- `EngineServer._row` makes it the first time
        #: the session is saved; a session that ends before any save never needs one)
        self.key = key


#: a restored session's write sequence number is at least the wall clock's milliseconds times this
#: (48 bits: until the year 2527)
SEQ_PER_MS = 16


def _bound(device: Device | None) -> bytes:
    """What a saved session's seal is bound to beside its row's key: its device's name and
    credentials (`registry.credentials`; none for a session that names no device)."""
    return b"" if device is None else credentials(device)


class EngineServer:
    """CoAPS's security layer (corem/net/security.py) on corem's DTLS engine."""

    SWEEP_INTERVAL = 60.0
    transparent = False

    def __init__(
        self,
        psk_lookup: Callable[[str], Device | None],
        params: DtlsParams | None = None,
        cert_lookup: Callable[[str], Device | None] | None = None,
        *,
        state_key: bytes,
        store: SessionStore | None = None,
        device_lookup: Callable[[str, str], Device | None] | None = None,
        wall: Callable[[], float] = time.time,
        on_new_session: Callable[[Peer, float], None] | None = None,
        on_moved: Callable[[Peer, Peer, float], None] | None = None,
        cid_length: int = 6,
        client_auth: str | None = None,
        cid_prefix: bytes = b"",
    ) -> None:
        """`client_auth`: the setting, when it says more than `params` can ("optional");
        `cid_prefix`: what every CID starts with (a worker's index, corem/workers/steer.py)"""
        self.params = p = params or DtlsParams()
        self.psk_lookup = psk_lookup
        self.cert_lookup = cert_lookup or (lambda sha256: None)
        self.device_lookup = device_lookup or (lambda tenant, device: None)
        self.state_key = state_key
        self.store = store if store is not None else SessionStore()
        self.wall = wall
        self.on_new_session = on_new_session
        self.on_moved = on_moved
        self.engine = e = Engine(self._psk, engine_params(p, cid_length, client_auth, cid_prefix,
                                                          functools.partial(registered, self.cert_lookup)))
        e.admit = self._admit
        e.established = self._established
        #: the answer to the last PSK lookup (identity, device) while the datagram that asked is
        #: handled: the session it establishes names the same device without a second lookup
        self._looked_up: tuple[bytes, Device | None] | None = None
        e.moved = self._moved
        self.slots = HandshakeSlots(p.max_handshakes, p.handshake_timeout, p.handshake_floor)
        e.handshake_over = self.slots.release  # (its slot is free; no frame of ours between)
        self.stats = LayerStats(engine=e.stats)
        # (the edge calls it at every eager answer and every flush: the engine's, no frame between)
        self.datagrams_to_send: Callable[[], list[tuple[bytes, Peer]]] = e.datagrams_to_send
        #: the keys of the sessions waiting in the store (as fingerprints: keyset.py, ~20 B each)
        self.offloaded = KeySet() if self.store.shared else KeySet(self.store.keys())
        self._missed: dict[bytes, float] = {}
        self._now = 0.0
        self._next_sweep = 0.0
        self._offload_warning, self._foreign_row_warning = Every(), Every()  # (each a line a minute at most)
        self._checkpoints: set[Connection] = set()
        #: each device's sessions its handshakes here made, oldest first (`_hold`; pruned by `sweep`)
        self._held: dict[tuple[str, str], list[Connection]] = {}
        self._held_prune: dict[tuple[str, str], int] = {}  # (a list's length at which it is pruned next)
        self._marks: dict[bytes, Connection] = {}
        self._cid_length = cid_length
        self._hello_cookie = False  # (the ClientHello being handled carries a cookie)
        self._datagram = b""  # (the datagram being handled)
        self._lane: LaneSessions | None = None  # (attach_lane)
        self._lane_secret = b""  # (the cookie secret the lane was last given)
        self._packs_carried = 0  # (since the store last folded them)

    def with_credentials(self, params: DtlsParams, client_auth: str | None = None) -> EngineParams:
        """The engine's parameters with the certificate, key and CA of `params` read now (SIGHUP,
        corem/reload.py; ValueError or OSError if they do not load), everything else as it runs;
        `use` them for the handshakes that start from then on."""
        running = self.engine.params
        fresh = engine_params(params, running.cid_length, client_auth, running.cid_prefix)
        return dataclasses.replace(running, certificate_chain=fresh.certificate_chain, private_key=fresh.private_key,
                                   verify_peer=fresh.verify_peer, client_auth=fresh.client_auth)

    def use(self, params: EngineParams) -> None:
        """New handshakes (and sessions restored from the store) on `params`; established sessions
        keep what they were made with."""
        self.engine.params = params

    # -- the engine's hooks ----------------------------------------------------------------------
    def _psk(self, identity: bytes) -> bytes | None:
        device: Device | None = registry_device(self.psk_lookup, identity)
        self._looked_up = (identity, device)
        return None if device is None else device.psk

    def _admit(self, peer: Peer, now: float) -> bool:
        """A hello with a valid cookie: a handshake slot, as DtlsServer takes one (slots.py)."""
        if len(self.engine.sessions) >= self.params.max_sessions and peer not in self.engine.sessions:
            self.stats.handshakes_refused["sessions"] += 1
            return False
        verdict = self.slots.admit(peer, now, hello=self._datagram)
        if verdict.reason is not None:
            self.stats.handshakes_refused[verdict.reason] += 1
            return False
        if verdict.evict is not None and self.engine.drop_handshake(verdict.evict):
            self.stats.handshakes_evicted += 1
        return True

    def _established(self, conn: Connection) -> str | None:
        device: Device | None = None
        if conn.peer_chain:  # a certificate (verified against dtls_ca by the engine)
            device = self.cert_lookup(conn.identity.decode())
            if device is None:  # (removed from the registry since its CertificateVerify)
                log.debug("dtls peer %s presented an unregistered certificate", conn.peer)
                return "unregistered_certificate"
        elif conn.suite is not None and conn.suite.kx == "psk":
            looked = self._looked_up  # (this datagram's ClientKeyExchange asked for it: the usual PSK flight)
            device = looked[1] if looked is not None and looked[0] == conn.identity else \
                self.psk_lookup(conn.identity.decode(errors="replace"))
        # a new session replaces the peer's old one and its saved copy -- once it is made, not when
        # its hello came: a handshake that never completes (someone else's) leaves the old one be
        if self.store.shared or self.offloaded:  # (no key made when there is none to drop)
            key = peer_key(conn.peer)
            if key in self.offloaded or self.store.shared:
                self.offloaded.discard(key)
                self.store.discard(key)
        if device is not None:
            self._hold(device, conn)
        conn.layer = Session(device, b"")  # (its store key made when first saved: `_row`)
        if self.on_new_session is not None:
            self.on_new_session(conn.peer, self._now)
        return None

    def _hold(self, device: Device, conn: Connection) -> None:
        """`conn`, a new session of `device`: its oldest beyond `max_sessions_per_device` ends (as
        Scandium removes stale double principals) -- a device back from a new port without a CID
        leaves its old session behind, and one credential must not take every session slot"""
        key = (device.tenant, device.device)
        held = self._held.get(key)
        if held is None:
            self._held[key] = held = []
        # the sessions that ended are let go of only when the list has doubled since (and at each
        # sweep): a handshake costs O(1), not a pass over a fleet's sessions sharing one credential
        # (a pass each measured -5% of handshakes with 32 at once)
        cap = self.params.max_sessions_per_device
        if len(held) >= cap or len(held) >= self._held_prune.get(key, 16):
            e = self.engine
            # (the one at conn's own address is about to be replaced by it: not counted; a parked
            # one -- restored by its CID, placed by its next record -- counts: found by a review, a
            # credential's superseded sessions, woken by their CIDs, were all placed again)
            held[:] = [c for c in held if (e.sessions.get(c.peer) is c and c.peer != conn.peer)
                       or (c.cid_in and e.parked.get(c.cid_in) is c)]
            while len(held) >= cap:
                old = held.pop(0)
                e.drop(old)
                s: Session | None = old.layer
                if s is not None and s.key:  # (and its saved copy: a superseded session is not restored)
                    self.offloaded.discard(s.key)
                    self.store.discard(s.key)
                self.stats.sessions_superseded += 1
            self._held_prune[key] = max(16, 2 * len(held))
        held.append(conn)

    def revoke(self, names: Collection[tuple[str, str]] | None) -> None:
        """The registry changed these devices (None: any of them): end each session made here whose
        device is gone or proves itself otherwise now (a PSK or certificate rotated, the device
        removed and added again) -- the lane's copy with it, so no record of the old credential is
        taken, and a saved copy no longer opens (`_bound`); counted in `sessions_revoked`."""
        e = self.engine
        for name in list(self._held) if names is None else names:
            held = self._held.get(name)
            if not held:
                continue
            current = self.device_lookup(*name)
            for conn in list(held):
                s: Session | None = conn.layer
                if s is None or s.device is None or (current is not None and same_credentials(s.device, current)):
                    continue
                if e.sessions.get(conn.peer) is conn or e.parked.get(conn.cid_in) is conn:
                    e.drop(conn)  # (a checkpoint due for it passes it over: `checkpoint` saves live ones)
                    if s.key:
                        self.store.discard(s.key)
                    self.stats.sessions_revoked += 1
                held.remove(conn)

    def _moved(self, conn: Connection, old: Peer) -> None:
        self.stats.cid_moves += 1
        if self.on_moved is not None:
            self.on_moved(old, conn.peer, self._now)

    def _key_of(self, conn: Connection) -> bytes:
        return CID_KEY + conn.cid_in if conn.cid_in else peer_key(conn.peer)

    # -- the fast lane (issue 27) -------------------------------------------------------------------
    def attach_lane(self, lane: LaneSessions) -> bool:
        """Let the C lane open and seal the records of established sessions itself: every session
        is registered with it from now on (established, restored, moved) and dropped when it ends
        here (forgotten, offloaded, expired, closed, replaced).  False (nothing done) when the
        records are not the C ones (COREM_PURE_PYTHON): the lane shares their objects."""
        if RECORDS != "c":
            return False
        self._lane = lane
        self._lane_secret = self.engine.cookies.secrets[0]
        lane.cookie_secret(self._lane_secret)  # (new peers' cookie-less hellos: the lane answers them)
        self.engine.on_session = self._on_session
        for conn in list(self.engine.sessions.values()):
            self._on_session(conn, True)
        return True

    def _on_session(self, conn: Connection, live: bool) -> None:
        lane = self._lane
        assert lane is not None
        if not live:
            lane.drop_session(conn, conn.peer, conn.cid_in)
        elif conn.state == ESTABLISHED and conn.read_prot is not None and conn.write_prot is not None:
            s: Session | None = conn.layer
            # (a saved session's record numbers go to the store in every batch: `lane_touched`)
            lane.add_session(conn, conn.peer, conn.cid_in, conn.cid_out, conn.read_prot, conn.window,
                             conn.write_prot, None if s is None else s.device, conn.floor,
                             s.key if s is not None and s.saved else None)

    def lane_touched(self, conns: list[Connection], marks_due: int, datagrams: int, nbytes: int,
                     now: float, readings_only: bool = False, hellos: int = 0, hello_bytes: int = 0) -> None:
        """The lane opened `datagrams` records (`nbytes`) in this batch, and answered `hellos` new
        peers' ClientHellos (`hello_bytes` sent): counted as the engine counts what it receives and
        sends; the saved sessions' record numbers (`marks_due` of them: the lane's
        `take_marks`) written to the store before the batch's readings are submitted (as `settle`;
        logged as one pack, `take_marks_packed`, where the sink cannot carry them), or --
        `readings_only`: every record the lane opened was a reading it took, none went on to the
        endpoint -- with `carry_marks`, by the sink in the commit that makes them durable; the sessions
        seen (`conns`, each at most once a second: idle offload and expiry, checkpoints)."""
        self._now = now
        if marks_due and self._lane is not None:
            marks = self.store.marks
            if marks is Marks.LOGGED:
                self._log_pack(self._lane.take_marks_packed)
            elif not (readings_only and marks is Marks.CARRIED):
                self._write_marks(self._lane.take_marks())
        if self._packs_carried >= FOLD_EVERY:  # (carried by the bus, or logged by the store: into the sessions)
            self._packs_carried = 0
            self.store.fold_marks()
        e = self.engine
        e.stats.datagrams_in += datagrams
        e.stats.bytes_in += nbytes
        e.stats.hello_verify_sent += hellos
        e.stats.flights_sent += hellos
        e.stats.bytes_out_unauthenticated += hello_bytes
        checkpoint = self.params.checkpoint
        for conn in conns:
            conn.last_seen = now
            if conn.flight:
                conn.flight = []  # (as Connection does for application data: the client has our Finished)
            s: Session | None = conn.layer
            if s is None or conn.state != ESTABLISHED:
                continue
            if checkpoint and s.checkpoint_due <= now:
                self._checkpoints.add(conn)

    # -- input -----------------------------------------------------------------------------------
    def receive(self, data: bytes, peer: Peer, now: float) -> list[bytes]:
        self._now = now
        e = self.engine
        if len(data) < 14:
            e.stats.datagrams_in += 1
            e.stats.bytes_in += len(data)
            e.stats.records_dropped["short"] += 1
            return []
        first = data[0]
        if first == TLS12_CID:
            if data[11:11 + self._cid_length] not in e.by_cid:
                self._restore_key(CID_KEY + data[11:11 + self._cid_length], peer, now, data)
        elif first == CONTENT_APPLICATION_DATA and peer not in e.sessions and peer not in e.handshakes:
            self._restore_key(peer_key(peer), peer, now)
        if first == CONTENT_HANDSHAKE and data[3] == 0 and data[4] == 0 and data[13] == 1:
            if not has_cookie(data):
                pass  # (the engine answers it statelessly: no slot asked)
            elif self.slots.repeats(peer, data):
                # the very datagram that took this peer's slot, again: a flooder keeping its slot
                # (a client's retransmitted hello has a new record number).  Dropped for the cost
                # of a comparison, as DtlsServer does; the engine would resend its flight to it.
                e.stats.datagrams_in += 1
                e.stats.bytes_in += len(data)
                e.stats.records_dropped["replayed"] += 1
                return []
            elif (v := self.slots.consider(peer, now)).reason is not None and peer not in e.handshakes:
                e.stats.datagrams_in += 1
                e.stats.bytes_in += len(data)
                self.stats.handshakes_refused[v.reason] += 1
                return []
        self._datagram = data  # (the hello that takes a slot is remembered: `_admit`)
        self._looked_up = None
        out = e.receive(data, peer, now)
        hs = e.handshakes.get(peer)
        if hs is not None and hs.auth_failures >= FINISHED_FAILURES:
            # the device's Finished flight, sent again, still does not authenticate: the keys
            # differ (a wrong PSK).  Mbed TLS fails at the first; one forged record does not here.
            e.fail_handshake(peer, BAD_RECORD_MAC, "finished_not_authentic")
        for conn in e.touched:
            s: Session | None = conn.layer
            if s is None or conn.state != ESTABLISHED:
                continue
            # saved once it carries data (`dtls_checkpoint`): not for its Finished nor a
            # close_notify -- a session that never carries any is not worth a write
            if out and s.checkpoint_due <= now and self.params.checkpoint:
                self._checkpoints.add(conn)
            if s.saved and conn.window.top > s.marked:
                self._marks[s.key] = conn
        return out

    def settle(self, now: float) -> None:
        """As DtlsServer.settle: the record numbers saved sessions took in this batch go to the
        store before the batch's messages are handled."""
        if not self._marks:
            return
        marks = []
        for key, conn in self._marks.items():
            s: Session = conn.layer
            s.marked = conn.window.top
            marks.append((s.marked, key))
        self._marks.clear()
        self._write_marks(marks)

    # -- output ----------------------------------------------------------------------------------
    def wrap(self, plaintext: bytes, peer: Peer) -> bytes | None:
        conn = self.engine.sessions.get(peer)
        if conn is None:
            conn = self._restore_key(peer_key(peer), peer, self._now)
            if conn is None:
                return None
        sealed = conn.seal(plaintext)
        if sealed is None and conn.state == ESTABLISHED:
            # the sequence numbers the stored copy reserved are used up: save it again (a new
            # reservation), then send
            self._save([conn], self._now, checkpoint=True)
            sealed = conn.seal(plaintext)
        return sealed

    def credentialed(self, datagram: bytes, peer: Peer) -> bool:
        return self.engine.credentialed(datagram, peer)

    def device(self, peer: Peer) -> Device | None:
        conn = self.engine.sessions.get(peer)
        s: Session | None = None if conn is None else conn.layer
        return None if s is None else s.device

    # -- time ------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self._now = now
        e = self.engine
        for peer in self.slots.expire(now):
            conn = e.handshakes.get(peer)
            if conn is not None and e.drop_handshake(peer):
                # (the device's Finished came but never authenticated: its keys differ, a wrong PSK)
                self.stats.own_failures["bad_mac" if conn.auth_failures else "timeout"] += 1
        e.tick(now)
        if self._lane is not None and e.cookies.secrets[0] is not self._lane_secret:  # (rotated)
            self._lane_secret = e.cookies.secrets[0]
            self._lane.cookie_secret(self._lane_secret)
        if self._checkpoints:
            self.checkpoint(now)
        if now >= self._next_sweep:
            self._next_sweep = now + min(self.SWEEP_INTERVAL, self.params.offload_after / 2)
            self.sweep(now)

    def checkpoint(self, now: float) -> int:
        due, self._checkpoints = self._checkpoints, set()
        e = self.engine
        live = [c for c in due
                if c.state == ESTABLISHED and (e.sessions.get(c.peer) is c or e.parked.get(c.cid_in) is c)]
        return self._save(live, now, checkpoint=True)

    def _save(self, conns: list[Connection], now: float, *, checkpoint: bool) -> int:
        wall_offset = self.wall() - now
        rows = [self._row(c, wall_offset) for c in conns]
        if not rows or not self._put(rows):
            return 0
        if checkpoint:
            self.stats.checkpoints += len(rows)
            for c in conns:
                s: Session = c.layer
                s.saved = True
                s.marked = max(s.marked, c.window.top)
                s.checkpoint_due = now + self.params.session_timeout / 2
                if self._lane is not None and self.engine.sessions.get(c.peer) is c:  # (not a parked one)
                    self._on_session(c, True)  # (saved: the lane gives its record numbers now)
        return len(rows)

    def _put(self, rows: list[Row]) -> bool:
        """Save these rows, the marks the lane holds (for the bus, or its last batch's for the
        store's log) written first: a row replaces the
        one of its key, and without Connection ID a new session at an address has the key of the
        session before it -- whose marks, were they carried after this row, would become the new
        session's floor (a restore would refuse its records).  Written now, they raise the row
        before, which this one replaces.  (A pack the bus took in its worker thread is committed
        before the store's save begins: the save waits for the bus's `carry_lock`, store.py.)"""
        if rows and self._lane is not None:
            if self.store.marks is Marks.LOGGED:  # (the pack as the lane makes it: no list of marks between)
                self._log_pack(self._lane.take_marks_packed)
            elif self.store.marks is Marks.CARRIED:
                self._write_marks(self._lane.take_marks())
        return self.store.put(rows)

    def _row(self, conn: Connection, wall_offset: float) -> Row:
        s: Session = conn.layer
        if not s.key:
            s.key = self._key_of(conn)
        saved = state.export(conn)
        device = s.device
        blob = BLOB_TAG + state.seal(saved, self.state_key, s.key + _bound(device))
        tenant, name = (device.tenant, device.device) if device is not None else ("", "")
        return s.key, blob, tenant, name, conn.last_seen + wall_offset, max(conn.window.top, s.marked)

    def sweep(self, now: float, *, everything: bool = False) -> int:
        """Offload sessions idle past `offload_after` (all of them at shutdown), forget those idle
        past the inactivity timeout.  Returns how many were offloaded."""
        p = self.params
        e = self.engine
        expire_before = now - p.session_timeout
        offload_before = float("inf") if everything else now - p.offload_after
        wall_offset = self.wall() - now
        idle = [c for c in (*e.sessions.values(), *e.parked.values()) if c.last_seen < offload_before]
        saving: list[Connection] = []
        for conn in idle:
            if conn.last_seen < expire_before:
                self.stats.sessions_expired += 1
                e.drop(conn)
            elif conn.layer is not None:
                saving.append(conn)
        rows = [self._row(c, wall_offset) for c in saving]
        if not self._put(rows):
            self.stats.offload_failed += len(rows)
            if rows and self._offload_warning.due():
                log.warning("could not offload %d DTLS sessions (%s): they stay in memory", len(rows),
                            self.store.last_error)
            return 0
        for conn in saving:
            e.drop(conn)
            self._checkpoints.discard(conn)
        self.offloaded.update(row[0] for row in rows)
        self.stats.offloaded += len(rows)
        if self._held:  # (the sessions that left: no device's list keeps them)
            self._held = {k: live for k, held in self._held.items()
                          if (live := [c for c in held if e.sessions.get(c.peer) is c])}
            self._held_prune = {k: max(16, 2 * len(held)) for k, held in self._held.items()}
        expired = self.store.expire(expire_before + wall_offset)
        self.offloaded.difference_update(expired)
        self.stats.sessions_expired += len(expired)
        return len(rows)

    def _miss(self, key: bytes, now: float) -> None:
        """(a shared store) Not asked for `key` again for MISS_TTL: no row, or none this node may take."""
        if len(self._missed) >= MAX_MISSES:
            self._missed = {k: t for k, t in self._missed.items() if t > now}
        self._missed[key] = now + MISS_TTL

    def _restore_key(self, key: bytes, peer: Peer, now: float, waking: bytes | None = None) -> Connection | None:
        """The saved session `key` restored (by the datagram `waking`, which names its CID; None:
        by the peer's address), or None."""
        if self.store.shared:
            if self._missed.get(key, 0.0) > now:
                return None
        elif key not in self.offloaded:
            return None
        self.offloaded.discard(key)
        shared = self.store.shared
        # (a shared store's row is opened before it is taken: `peek`, then `take_unchanged` below)
        row = self.store.peek(key) if shared else self.store.take(key)
        if row is None:
            if shared:
                self._miss(key, now)
            return None
        self._missed.pop(key, None)
        _, blob, tenant, name, _, rx_top = row
        device = self.device_lookup(tenant, name) if tenant else None
        if tenant and device is None:  # the device was removed while its session slept
            if shared:
                self.store.take_unchanged(key, blob)
            self.stats.sessions_expired += 1
            return None
        if not blob.startswith(BLOB_TAG):  # e.g. an mbedtls pickle: never unpickled here, by any node
            if shared:
                self.store.take_unchanged(key, blob)
            self.stats.sessions_lost += 1
            return None
        # (by its CID: parked -- at no address, displacing nothing -- until a record authenticates:
        # the datagram that asked may be anyone's, from anywhere)
        parked = key.startswith(CID_KEY)
        try:
            # (sealed with its device's name and credentials: a row renamed to another device, or
            # one of a device whose credentials changed while it slept, does not open)
            saved = state.open_sealed_untrusted(blob[len(BLOB_TAG):], self.state_key, key + _bound(device))
            # records sealed from a number no older copy of the row can have reached: a copy put back
            # (a backup, a snapshot) or held by two nodes at once would otherwise seal again with the
            # numbers its newer self used -- nonce reuse under one key.  The clock floor outruns a
            # session's own numbers unless it sent over 16 records a millisecond on average.
            floor = min(int(self.wall() * 1000) * SEQ_PER_MS, SEQ_MAX - (1 << 24))
            if saved.write_seq < floor:
                saved = dataclasses.replace(saved, write_seq=floor)
        except (DtlsDecodeError, ValueError):
            self.stats.sessions_lost += 1
            if shared:  # (left untouched for a node that can open it: this one's key may be wrong)
                self._miss(key, now)
                if self._foreign_row_warning.due():
                    log.warning("a DTLS session of the shared store does not open with this node's dtls_state_key "
                                "(or its device's credentials changed since): left there; if this repeats, is "
                                "dtls_state_key the other nodes' key?")
            return None
        if shared and waking is not None and not self._authenticates(saved, waking, peer, now):
            # (a CID travels in the clear: a datagram that names one proves nothing until its record
            # opens under the session's keys.  Taken on its word, one forged datagram sent to any
            # node ended the session where it lived -- found by a review)
            self._miss(key, now)
            return None
        if shared:
            # (taken only now, and only as it was opened: before, a node that could not open it took
            # it and put it back as its own -- and the node that held it live ended its copy)
            taken = self.store.take_unchanged(key, blob)
            if taken is None:  # another node took it or saved it again since the peek
                self._miss(key, now)
                return None
            rx_top = taken[5]
        try:
            conn = self.engine.restore(saved, peer, now, parked=parked)
        except (DtlsDecodeError, ValueError):
            self.stats.sessions_lost += 1
            return None
        # every record at or below the newest the session took is refused from now on, not only
        # those the saved window holds: a record older than the top but new to the window, taken
        # after the copy was saved, is marked nowhere (a mark is written when the top grows), and
        # would be taken again (conn.newest counts the floor)
        conn.floor = max(rx_top, conn.window.top)
        s = Session(device, key)
        if device is not None:
            self._hold(device, conn)
        s.marked = rx_top
        s.saved = False  # (its row was taken: the next checkpoint saves it again)
        s.checkpoint_due = 0.0
        conn.layer = s
        if self.params.checkpoint:
            # (at the next tick, whatever the record that asked for it turns out to be: a forged
            # one is not authenticated, carries no data, and would leave the session unsaved)
            self._checkpoints.add(conn)
        if self._lane is not None and not parked:  # (a parked one: the engine's on_session once placed)
            self._on_session(conn, True)  # (again: now with its device and its floor)
        self.stats.restored += 1
        return conn

    def _authenticates(self, saved: state.SessionState, datagram: bytes, peer: Peer, now: float) -> bool:
        """Does the first record of `datagram` open, fresh, under `saved`'s keys?  On a copy of the
        session made for the question, which nothing keeps."""
        try:
            rec, _ = parse_record_untrusted(datagram, 0, self._cid_length)
            state.restore(saved, peer, now, self.engine.params).receive_record(rec, now)
        except (DtlsDecodeError, ValueError):
            return False
        return rec.type == TLS12_CID and rec.cid == saved.cid_in

    # -- the rest --------------------------------------------------------------------------------
    @property
    def sessions(self) -> dict[Peer, Connection]:
        return self.engine.sessions

    @property
    def handshakes(self) -> dict[Peer, Connection]:
        return self.engine.handshakes

    def flights_sent(self) -> int:
        """The handshake flights sent so far (the edge busy-polls after a batch that sent one)."""
        return self.engine.stats.flights_sent

    def metrics(self) -> Iterator[Sample]:
        e, d = self.engine.stats, self.stats
        yield counter("corem_dtls_handshakes_started", e.handshakes_started)
        yield counter("corem_dtls_handshakes_completed", e.handshakes_completed)
        yield counter("corem_dtls_hello_verify_sent", e.hello_verify_sent)
        yield counter("corem_dtls_bytes_received", e.bytes_in)
        yield counter("corem_dtls_bytes_sent_unauthenticated", e.bytes_out_unauthenticated)
        # (as DtlsServer counts them: replays into a restored session, at or below its floor; the
        # replay window's ordinary duplicates are dropped records)
        replayed = e.records_dropped.get("below_floor", 0)
        yield counter("corem_dtls_records_dropped", sum(e.records_dropped.values()) - replayed)
        yield counter("corem_dtls_records_replayed", replayed)
        yield counter("corem_dtls_sessions_closed", e.sessions_closed)
        yield counter("corem_dtls_sessions_expired", e.sessions_expired + d.sessions_expired)
        yield from fields(d, {k: v for k, v in DTLS_METRICS.items() if k in (
            "handshakes_evicted", "marks_failed", "offloaded", "restored", "sessions_lost",
            "offload_failed", "checkpoints")})
        yield counter("corem_dtls_cid_moves", d.cid_moves)
        yield counter("corem_dtls_cid_moves_refused", e.moves_refused)
        yield counter("corem_dtls_sessions_superseded", d.sessions_superseded)
        yield counter("corem_dtls_sessions_revoked", d.sessions_revoked)
        yield counter("corem_dtls_sessions_taken_elsewhere", d.sessions_taken_elsewhere)
        yield counter("corem_dtls_records_unknown_cid", e.records_dropped.get("unknown_cid", 0))
        for reason, n in sorted(d.handshakes_failed.items()):
            yield counter("corem_dtls_handshakes_failed", n, reason=reason)
        for reason, n in sorted(d.handshakes_refused.items()):
            yield counter("corem_dtls_handshakes_refused", n, reason=reason)
        yield gauge("corem_dtls_sessions", len(self.engine.sessions), state="live")
        # (a session restored by its CID and not yet placed by a record that authenticates -- engine
        # `parked` -- is as asleep as an offloaded one)
        yield gauge("corem_dtls_sessions", len(self.offloaded) + len(self.engine.parked), state="offloaded")
        yield gauge("corem_dtls_sessions", len(self.engine.handshakes), state="handshaking")
        yield counter("corem_dtls_session_store_errors", self.store.errors)

    def carry_marks(self, sink: Any, bus: Path | None = None) -> bool:
        """Have the marks of the lane's readings carried by the embedded bus `sink` in each batch
        it commits (bus/sqlite.py `carry`: one row in the batch's own transaction), instead of one
        transaction on the event loop per batch of datagrams: a reading is durable only with the
        numbers of the records that carried it (so a restore refuses them, as issue 26 requires),
        and they are coalesced (the highest number per session per bus commit).  This store reads
        them from the bus's file (`read_marks_from`).  Records that are not readings (anything the
        lane hands on) are marked at once in any case: their effects do not wait for the sink.
        A sink that cannot carry (Kafka: a record is durable when the brokers say so) has them
        logged in the store's own file instead, a pack a batch committed before the batch's
        readings are submitted (store.py `log_marks_here`, which first folds what the embedded bus
        file `bus` -- the data dir's, of a run on it before -- carried unread; False then).
        Neither for a shared store (other nodes restore from it at any time, and each node's marks
        raise only its own rows at once: `mark_held`) nor an in-memory one: False, and marks are
        written at once."""
        where = self.store.db.where
        # (the store says where the marks go, `marks`: decided once)
        if self.store.shared or self.store.marks is not Marks.AT_ONCE or str(where) == ":memory:":
            return False
        carry = getattr(sink, "carry", None)
        # (the store's WAL copied off the event loop's commits, by the sink's checkpointer)
        checkpointer: Checkpointer = sink.checkpointer
        checkpointer.watch(Path(where))
        if carry is None:  # (a pack a batch: the writer starts the log again itself)
            defer_checkpoints(self.store.db, WRITER_BACKSTOP)
            self.store.log_marks_here(functools.partial(checkpointer.before_commit, self.store.db, Path(where)), bus)
            return False  # (the store's marks LOGGED from now on)
        carry(self._carried_marks, lambda: self.store.folded_upto)  # (the bus's file made, if new)
        self.store.read_marks_from(sink.path, sink.carry_lock)
        defer_checkpoints(self.store.db)
        return True

    def _write_marks(self, marks: list[tuple[int, bytes]]) -> None:
        """(the event loop) Saved sessions' record numbers, written at once.  In a store other
        nodes share, a session whose row is gone was taken by another node (its restore deletes
        the row) or ended there: its copy here ends now (`_taken_elsewhere`), so that one session
        is never live on two nodes -- each taking records the other would take again."""
        if not marks:
            return
        if self.store.marks is Marks.LOGGED:
            self._log_pack(lambda: pack_marks(marks))
            return
        if not self.store.shared:
            if not self.store.mark(marks):
                self.stats.marks_failed += 1
            return
        gone = self.store.mark_held(marks)
        if gone is None:
            self.stats.marks_failed += 1
        elif gone:
            self._taken_elsewhere(gone)

    def _taken_elsewhere(self, keys: set[bytes]) -> None:
        """End the live copies of these saved sessions (another node holds them now; their rows
        are its).  The batch whose marks found them gone is not handled for them either: with no
        session here, its messages name no device (what the fast lane took of that batch is the
        one thing that still goes through: a batch's window)."""
        e = self.engine
        for conn in [*e.sessions.values(), *e.parked.values()]:
            s: Session | None = conn.layer
            if s is not None and s.saved and s.key in keys:
                e.drop(conn)
                # (not taken back at once -- by the answer to this very batch, whose wrap would
                # restore it: the device's next records here, after MISS_TTL, may take it back)
                self._missed[s.key] = self._now + MISS_TTL
                self.stats.sessions_taken_elsewhere += 1

    def _log_pack(self, take: Callable[[], bytes]) -> None:
        """(the store's marks LOGGED) The pack `take` makes, committed to its own log at once."""
        pack = self._pack_of(take)
        if not pack:
            return
        if self.store.log_pack(pack):
            self._packs_carried += 1
        else:
            self.stats.marks_failed += 1

    def _carried_marks(self) -> bytes:
        """(the bus, in a batch's transaction: on the event loop or in its worker thread) the lane's
        marks due as one pack, one per session however many batches of records it took since.
        Noted by the lane before their readings were submitted, they are all taken here (under
        the GIL) by the time the batch holding those readings is written; what comes after waits
        for the next batch.  The store folds them every FOLD_EVERY packs (`lane_touched`)."""
        lane = self._lane
        pack = b"" if lane is None else self._pack_of(lane.take_marks_packed)
        if pack:
            self._packs_carried += 1
        return pack

    def _pack_of(self, take: Callable[[], bytes]) -> bytes:
        """What `take` packs of the lane's marks; b"" if it failed (no memory: counted, the marks
        lost as a write the disk refused would lose them; the batch goes on)."""
        try:
            return take()
        except Exception:  # noqa: BLE001
            self.stats.marks_failed += 1
            return b""

    def close(self, now: float) -> int:
        saved = self.sweep(now, everything=True)
        self.store.close()
        return saved
