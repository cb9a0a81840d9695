"""One DTLS 1.2 association, either role, sans-IO: the handshake as a state machine over whole
messages (reassembled from fragments, in message_seq order), the record protection of its epochs,
its flights and their retransmission.  The engine (engine.py) owns many of these (the server
role); `client.Client` owns one.

What the peer sends arrives as `Record`s (`receive_record`); what this side sends piles up as
datagrams (`flush`).  A handshake that must fail queues its fatal alert and goes to FAILED; a
record that does not authenticate, or repeats one, raises DtlsDecodeError and changes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from hmac import compare_digest
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric import ec

import corem.dtls.engine.certs as certs  # (the module, not the package: no cycle through __init__)
import corem.dtls.engine.messages as m
from ...c_twins import c_twin
from .crypto import (IMPLEMENTED, SCSV_RENEGOTIATION, SUITES, Keys, Suite, key_block, master_secret,
                     psk_premaster, verify_data)
from .errors import (ACCESS_DENIED, BAD_CERTIFICATE, BAD_RECORD_MAC, CLOSE_NOTIFY, DECODE_ERROR, DECRYPT_ERROR, FATAL,
                     HANDSHAKE_FAILURE, ILLEGAL_PARAMETER, INTERNAL_ERROR, NO_RENEGOTIATION, PROTOCOL_VERSION,
                     UNEXPECTED_MESSAGE, UNKNOWN_PSK_IDENTITY, WARNING, DtlsDecodeError, HandshakeFailed,
                     alert_name)
from .records import (ALERT, APPLICATION_DATA, CHANGE_CIPHER_SPEC, DTLS_1_2, HANDSHAKE, HEADER, SEQ_MAX,
                      TLS12_CID, Record, RecordProtection, ReplayWindow, plaintext_record)

# states
WAIT_SERVER_HELLO = "wait_server_hello"  # client: sent a ClientHello
WAIT_SERVER_HELLO_DONE = "wait_server_hello_done"
WAIT_CLIENT_CERTIFICATE = "wait_client_certificate"  # server: the same, with a CertificateRequest
WAIT_CLIENT_KEY_EXCHANGE = "wait_client_key_exchange"  # server: sent ServerHello..ServerHelloDone
WAIT_CERTIFICATE_VERIFY = "wait_certificate_verify"  # server: the client's certificate came
WAIT_CCS = "wait_change_cipher_spec"  # either: the peer's CCS (keys derived, read epoch pending)
WAIT_FINISHED = "wait_finished"
ESTABLISHED = "established"
FAILED = "failed"  # a fatal alert sent or received
CLOSED = "closed"  # close_notify

#: retransmission (RFC 6347 §4.2.4.1): 1 s doubling up to 60 s; a handshake gives up after this many
INITIAL_RTO = 1.0
MAX_RTO = 60.0
MAX_RETRANSMITS = 6
#: handshake messages buffered ahead of the next one expected
MAX_AHEAD = 4
#: renegotiations refused with a warning before a peer that keeps asking is failed: each refusal
#: is an alert to send, and one authenticated record can hold thousands of hellos (an adversarial
#: run: 4096 alerts a 16 KiB TLS record, past the connection's write bound; 100 a DTLS datagram)
MAX_RENEGOTIATIONS = 3
#: epoch-1 records kept while the peer's ChangeCipherSpec has not come (reordered)
MAX_EARLY = 4

PskLookup = Callable[[bytes], "bytes | None"]


#: _flights.c's `psk_finish` (the client's ClientKeyExchange..Finished answered in one call; None:
#: this state machine takes the datagram), None when not built
_psk_finish: Callable[..., tuple[Any, ...] | None] | None = c_twin("._flights", "psk_finish", __package__)
#: records.RecordProtection's cipher names as _flights.c numbers them (dtls_records.h `dtls_aead`)
_AEAD = {"ccm8": 0, "ccm": 1, "gcm": 2}


class _AskedOnce:
    """A PSK lookup asked at most once per identity: `_flights.psk_finish` asks it, and when C leaves
    the datagram to the state machine (an unknown identity, a lookup that failed) the state machine
    gets the same answer, as if it alone had asked."""

    __slots__ = ("lookup", "answers")

    def __init__(self, lookup: PskLookup) -> None:
        self.lookup = lookup
        self.answers: dict[bytes, tuple[bytes | None, Exception | None]] = {}

    def __call__(self, identity: bytes) -> bytes | None:
        answer = self.answers.get(identity)
        if answer is None:
            try:
                answer = (self.lookup(identity), None)
            except Exception as e:
                answer = (None, e)
            self.answers[identity] = answer
        if answer[1] is not None:
            raise answer[1]
        return answer[0]


@dataclass(frozen=True)
class Params:
    """What both roles are configured with."""
    suites: tuple[Suite, ...] = IMPLEMENTED
    #: RFC 7627: refuse a ClientHello (or ServerHello) without extended_master_secret
    require_ems: bool = True
    #: the largest datagram this side sends (flights are fragmented to fit)
    mtu: int = 1200
    #: ECDHE-ECDSA: this side's certificate chain (DER, leaf first) and its P-256 key; without
    #: them the ECDHE suites are never negotiated (server) or answered with no certificate (client)
    certificate_chain: tuple[bytes, ...] = ()
    private_key: ec.EllipticCurvePrivateKey | None = None
    #: the peer's chain -> the identity it proves, or None (certs.chain_verifier); a client
    #: without one takes any server certificate (tests only)
    verify_peer: certs.Verifier | None = None
    #: server: ask ECDHE clients for a certificate: "none", "optional" (one sent must verify; a
    #: device without one names itself later, with a token) or "required"
    client_auth: str = "none"
    #: server: whether the identity a client's verified certificate proves may connect (the
    #: registry's word, corem/dtls/layer.py), asked once the client proved it holds the key
    #: (CertificateVerify) and before this side's Finished: False is RFC 5246's access_denied,
    #: "a valid certificate was received, but when access control was applied, the sender decided
    #: not to proceed" -- the device learns it from its handshake, not from its first request
    admit_certificate: Callable[[bytes], bool] | None = None

    def __post_init__(self) -> None:
        if self.client_auth not in ("none", "optional", "required"):
            raise ValueError(f"client_auth must be none, optional or required, got {self.client_auth!r}")
        if self.client_auth != "none" and self.verify_peer is None:
            raise ValueError("client_auth needs verify_peer (certs.chain_verifier of the CA)")
        if (self.private_key is None) != (not self.certificate_chain):
            raise ValueError("certificate_chain and private_key go together")


class Connection:
    # (slots: a server makes one per handshake; its ~50 attributes in a dict cost ~4 us to set up)
    __slots__ = ("role", "params", "peer", "state", "started", "last_seen", "reason", "transcript", "recv_seq",
                 "send_seq", "pending", "flight", "retransmit_at", "rto", "retransmits", "resend",
                 "peer_flight_start", "client_random", "server_random", "hello_seq", "suite", "ems",
                 "secure_renegotiation", "master", "identity", "psk", "psk_for", "offered", "offer_cid", "ephemeral",
                 "peer_key", "peer_point", "certificate_requested", "peer_chain", "write_epoch", "_seq0", "_seq1",
                 "_limit1", "write_prot", "keys", "read_prot", "pending_read", "window", "early", "cid_in", "cid_out",
                 "auth_failures", "offer_ems", "out", "app", "floor", "layer", "renegotiations")

    def __init__(self, role: str, params: Params, peer: object, now: float) -> None:
        self.role = role
        self.params = params
        self.peer = peer
        self.state = ""
        self.started = now
        self.last_seen = now
        self.reason = ""  # why it failed or closed (a name for counters)
        # handshake
        self.transcript = bytearray()
        self.recv_seq = 0
        self.send_seq = 0
        self.pending: dict[int, tuple[int, m.Reassembly]] = {}  # message_seq -> (epoch, reassembly)
        self.flight: list[tuple[int, int, bytes]] = []  # (epoch, content type, payload)
        self.retransmit_at = float("inf")
        self.rto = INITIAL_RTO
        self.retransmits = 0
        self.resend = False  # the peer repeated its last flight: resend ours at the next flush
        #: the message_seq the peer's current flight starts at: a message below it repeats the
        #: peer's previous flight, so ours was lost (RFC 6347 §4.2.4); one inside it does not
        self.peer_flight_start = 0
        self.client_random = b""
        self.server_random = b""
        self.hello_seq = -1  # (server) the record number of the newest ClientHello taken
        self.suite: Suite | None = None
        self.ems = False
        self.secure_renegotiation = False
        self.master = b""
        self.identity = b""
        self.psk: bytes | None = None  # the client's own
        self.psk_for: PskLookup | None = None  # the server's callback
        self.offered: tuple[int, ...] = ()
        self.offer_cid: bytes | None = None  # the client's offer (None: none)
        self.ephemeral: ec.EllipticCurvePrivateKey | None = None  # ECDHE
        self.peer_key: ec.EllipticCurvePublicKey | None = None  # from the peer's certificate
        self.peer_point = b""  # the server's ephemeral point (client)
        self.certificate_requested = False
        self.peer_chain: list[bytes] = []
        # records
        self.write_epoch = 0
        # the write sequence numbers: epoch 0's here; epoch 1's in the write protection once there is
        # one (`write_seq`, `write_limit`: one counter with the fast lane, which seals through it)
        self._seq0 = 0
        self._seq1 = 0
        self._limit1 = SEQ_MAX  # (state.export caps it: sequence numbers reserved by a stored copy)
        self.write_prot: RecordProtection | None = None
        self.keys: Keys | None = None
        self.read_prot: RecordProtection | None = None
        self.pending_read: RecordProtection | None = None
        self.window = ReplayWindow()  # epoch 1 (epoch 0 is not authenticated: no window)
        self.early: list[tuple[int, bytes]] = []
        self.cid_in = b""  # the CID records to this side carry (this side chose it)
        self.cid_out = b""  # the CID records from this side carry (the peer chose it)
        self.auth_failures = 0  # epoch-1 records that did not authenticate during the handshake
        self.renegotiations = 0  # the peer's requests to renegotiate, refused (`refuse_renegotiation`)
        self.offer_ems = True  # (the client role; False only to test a server's refusal)
        self.out: list[bytes] = []
        self.app: list[bytes] = []
        #: every record numbered at or below it is refused (a session restored from a copy older
        #: than the records it took since: the numbers the store was told, layer.py's `settle`)
        self.floor = -1
        #: what the security layer driving the engine keeps beside the session (layer.py)
        self.layer: Any = None

    @property
    def write_seq(self) -> tuple[int, int]:
        """The next sequence number of each epoch (epoch 1's is the write protection's `next_seq`:
        the fast lane seals through the same object).  Assigned as a pair."""
        prot = self.write_prot
        return self._seq0, (prot.next_seq if prot is not None else self._seq1)

    @write_seq.setter
    def write_seq(self, value: tuple[int, int] | list[int]) -> None:
        self._seq0 = value[0]
        if self.write_prot is not None:
            self.write_prot.next_seq = value[1]
        else:
            self._seq1 = value[1]

    @property
    def write_limit(self) -> int:
        """Epoch 1's first sequence number not to use (state.export's reservation)."""
        prot = self.write_prot
        return prot.limit if prot is not None else self._limit1

    @write_limit.setter
    def write_limit(self, value: int) -> None:
        if self.write_prot is not None:
            self.write_prot.limit = value
        else:
            self._limit1 = value

    @property
    def newest(self) -> int:
        """epoch << 48 | seq of the newest authenticated record (RFC 9146 §6): the replay window's
        top in epoch 1 (whoever opened the record: this connection or the fast lane), or the floor
        a restored session refuses up to; -1 before any"""
        top = max(self.window.top, self.floor)
        return 1 << 48 | top if top >= 0 else -1

    # -- the server role -------------------------------------------------------------------------

    def server_start(self, hello: m.ClientHello, raw: bytes, message_seq: int, record_seq: int,
                     psk_for: PskLookup, cid: bytes | None, now: float, server_random: bytes | None = None) -> None:
        """A ClientHello whose cookie was valid: answer with ServerHello, ServerHelloDone.  `cid`: the
        CID to hand out if the client offers RFC 9146 (None: never); `server_random`: drawn by the
        engine, which draws it with the CID in one call (None: drawn here)."""
        self.psk_for = psk_for
        self.client_random = hello.random
        self.recv_seq = message_seq + 1
        self.send_seq = message_seq  # (as Mbed TLS and OpenSSL: the server's numbering follows the hello's)
        # RFC 6347 §4.2.1 suggests going on from the hello's record number (the client chose it:
        # not so close to 2^48 that a retransmitted flight would run out of numbers)
        self._seq0 = record_seq if record_seq < 1 << 32 else 0
        self.hello_seq = record_seq
        self.transcript += raw
        try:
            if hello.version > DTLS_1_2:  # (DTLS versions count down: 0xfeff is 1.0)
                raise HandshakeFailed(PROTOCOL_VERSION, "protocol_version")
            if 0 not in hello.compression:
                raise HandshakeFailed(ILLEGAL_PARAMETER, "compression")
            offered = set(hello.suites)
            try:
                ecdhe_ok = self._ecdhe_possible(hello)
            except DtlsDecodeError as e:
                raise HandshakeFailed(e.alert, e.reason) from None
            suite = next((s for s in self.params.suites
                          if s.code in offered and (s.kx == "psk" or ecdhe_ok)), None)
            if suite is None:
                raise HandshakeFailed(HANDSHAKE_FAILURE, "no_shared_suite")
            self.suite = suite
            self.ems = m.EXT_EXTENDED_MASTER_SECRET in hello.extensions
            if not self.ems and self.params.require_ems:
                raise HandshakeFailed(HANDSHAKE_FAILURE, "no_extended_master_secret")
            reneg = hello.extensions.get(m.EXT_RENEGOTIATION_INFO)
            if reneg is not None and reneg != b"\x00":
                raise HandshakeFailed(HANDSHAKE_FAILURE, "renegotiation_info")
            self.secure_renegotiation = reneg is not None or SCSV_RENEGOTIATION in offered
            try:
                offer = hello.cid_offered()
            except DtlsDecodeError as e:
                raise HandshakeFailed(e.alert, e.reason) from None
            self.server_random = server_random or os.urandom(32)
            extensions: list[tuple[int, bytes]] = []
            if self.ems:
                extensions.append((m.EXT_EXTENDED_MASTER_SECRET, b""))
            if self.secure_renegotiation:
                extensions.append((m.EXT_RENEGOTIATION_INFO, b"\x00"))
            if offer is not None and cid is not None:
                self.cid_in = cid
                self.cid_out = offer
                extensions.append((m.EXT_CONNECTION_ID, m.cid_extension(self.cid_in)))
            if suite.kx == "ecdhe_ecdsa" and m.EXT_EC_POINT_FORMATS in hello.extensions:
                extensions.append((m.EXT_EC_POINT_FORMATS, b"\x01\x00"))
        except HandshakeFailed as e:
            self._fail(e.alert, e.reason)
            return
        hello_body = m.server_hello(self.server_random, suite.code, extensions)
        msgs = [self._next_message(m.SERVER_HELLO, hello_body)]
        self.state = WAIT_CLIENT_KEY_EXCHANGE
        if suite.kx == "ecdhe_ecdsa":
            assert self.params.private_key is not None
            msgs.append(self._next_message(m.CERTIFICATE, m.certificate(self.params.certificate_chain)))
            self.ephemeral, point = certs.ephemeral()
            params = m.ecdhe_params(point)
            signature = certs.sign(self.params.private_key, self.client_random + self.server_random + params)
            ske = m.server_key_exchange_ecdhe(params, signature)
            msgs.append(self._next_message(m.SERVER_KEY_EXCHANGE, ske))
            if self.params.client_auth != "none":
                msgs.append(self._next_message(m.CERTIFICATE_REQUEST, m.certificate_request()))
                self.certificate_requested = True
                self.state = WAIT_CLIENT_CERTIFICATE
        msgs.append(self._next_message(m.SERVER_HELLO_DONE, b""))
        for msg in msgs:
            self.transcript += msg
        self._send_flight([(0, HANDSHAKE, msg) for msg in msgs], now, timer=True)

    def server_started(self, flight: tuple[Any, ...], server_random: bytes, record_seq: int, psk_for: PskLookup,
                       now: float) -> None:
        """`server_start`'s outcome as _flights.c's `server_hello` made it (engine.py `_hello`): the
        same state; the ServerHello flight, one datagram, the engine sent on already (not in `out`)"""
        (_datagram, self.client_random, suite, self.ems, self.secure_renegotiation, self.cid_in, self.cid_out,
         message_seq, hello, sh, shd) = flight
        self.psk_for = psk_for
        self.server_random = server_random
        self.suite = SUITES[suite]
        self.recv_seq = message_seq + 1
        self.send_seq = message_seq + 2
        self._seq0 = (record_seq if record_seq < 1 << 32 else 0) + 2
        self.hello_seq = record_seq
        self.transcript += hello + sh + shd
        self.state = WAIT_CLIENT_KEY_EXCHANGE
        self.flight = [(0, HANDSHAKE, sh), (0, HANDSHAKE, shd)]
        self.peer_flight_start = self.recv_seq
        self.retransmit_at = now + self.rto

    def psk_finished(self, datagram: bytes, now: float, answer: Callable[[bytes, Any], None]) -> bool:
        """The client's ClientKeyExchange, ChangeCipherSpec and Finished (one datagram, the usual
        PSK device) answered by _flights.c's `psk_finish`: the state `_server_message` leaves after
        them.  False: nothing changed, the records go through this state machine (anything unusual,
        an unknown identity, a Finished that does not verify: it names them).  `answer(datagram,
        peer)`: given our ChangeCipherSpec and Finished as soon as C made them, before the state
        here is brought up to date (the engine sends them on)."""
        suite = self.suite
        lookup = self.psk_for
        if _psk_finish is None or suite is None or suite.kx != "psk" or self.pending or self.early \
                or lookup is None or suite.key_length != 16 or suite.iv_length != 4:  # (_flights.c's keys)
            return False
        asked = lookup if isinstance(lookup, _AskedOnce) else _AskedOnce(lookup)
        done = _psk_finish(datagram, asked, self.recv_seq, self.transcript, self.client_random,
                           self.server_random, _AEAD[suite.cipher], self.ems, self.cid_in, self.cid_out,
                           self.send_seq, self._seq0, self.params.mtu)
        if done is None:
            if asked.answers:
                self.psk_for = asked  # (the state machine takes the datagram: the same answer)
            return False
        identity, client_key, server_key, client_iv, server_iv, finished_seq, mine, out = done
        answer(out, self.peer)
        self.identity = identity
        self.install(Keys(client_key, server_key, client_iv, server_iv))
        self.read_prot, self.pending_read = self.pending_read, None
        assert self.write_prot is not None
        self.write_prot.next_seq += 1  # (our Finished: epoch 1's first record)
        self._seq0 += 1  # (our ChangeCipherSpec)
        self.window.mark(finished_seq)
        self.recv_seq += 2
        self.send_seq += 1
        self.last_seen = now
        self.state = ESTABLISHED
        self.transcript = bytearray()
        self.flight = [(0, CHANGE_CIPHER_SPEC, b"\x01"), (1, HANDSHAKE, mine)]
        self.peer_flight_start = self.recv_seq
        self.retransmits = 0
        self.rto = INITIAL_RTO
        self.retransmit_at = float("inf")
        return True

    def _ecdhe_possible(self, hello: m.ClientHello) -> bool:
        """A certificate to show, and a client that takes P-256, uncompressed points and ECDSA-SHA256"""
        if self.params.private_key is None:
            return False
        ext = hello.extensions
        groups = m.parse_supported_groups_untrusted(ext[m.EXT_SUPPORTED_GROUPS]) \
            if m.EXT_SUPPORTED_GROUPS in ext else (m.SECP256R1,)
        formats = m.parse_point_formats_untrusted(ext[m.EXT_EC_POINT_FORMATS]) \
            if m.EXT_EC_POINT_FORMATS in ext else b"\x00"
        algs = m.parse_signature_algorithms_untrusted(ext[m.EXT_SIGNATURE_ALGORITHMS]) \
            if m.EXT_SIGNATURE_ALGORITHMS in ext else ()
        return m.SECP256R1 in groups and 0 in formats and m.ECDSA_SECP256R1_SHA256 in algs

    # -- the client role -------------------------------------------------------------------------

    def client_start(self, identity: bytes, psk: bytes, cid: bytes | None, now: float) -> None:
        self.identity = identity
        self.psk = psk
        self.offer_cid = cid
        self.client_random = os.urandom(32)
        self.offered = tuple(s.code for s in self.params.suites)
        self.state = WAIT_SERVER_HELLO
        self._send_hello(b"", now)

    def _send_hello(self, cookie: bytes, now: float) -> None:
        extensions = [(m.EXT_RENEGOTIATION_INFO, b"\x00")]
        if self.offer_ems:
            extensions.insert(0, (m.EXT_EXTENDED_MASTER_SECRET, b""))
        if self.offer_cid is not None:
            extensions.append((m.EXT_CONNECTION_ID, m.cid_extension(self.offer_cid)))
        if any(s.kx == "ecdhe_ecdsa" for s in self.params.suites):
            extensions += [(m.EXT_SUPPORTED_GROUPS, m.u16_list((m.SECP256R1,))),
                           (m.EXT_EC_POINT_FORMATS, b"\x01\x00"),
                           (m.EXT_SIGNATURE_ALGORITHMS, m.u16_list((m.ECDSA_SECP256R1_SHA256,)))]
        body = m.client_hello(self.client_random, cookie, self.offered, extensions)
        msg = self._next_message(m.CLIENT_HELLO, body)
        self.transcript = bytearray(msg)  # (the first hello and the HelloVerifyRequest are not hashed)
        self._send_flight([(0, HANDSHAKE, msg)], now, timer=True)

    # -- records in ------------------------------------------------------------------------------

    def receive_record(self, rec: Record, now: float) -> bool:
        """Take one record.  True when it was protected, authenticated and newer than every record
        before it (RFC 9146 §6: the peer's address may move to where it came from).
        DtlsDecodeError: dropped (not authentic, a replay, not for this epoch); nothing changed."""
        if self.state in (FAILED, CLOSED):
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "connection_closed")
        if rec.epoch == 0:
            if rec.type == TLS12_CID:
                raise DtlsDecodeError(UNEXPECTED_MESSAGE, "cid_in_epoch_0")
            if self.state == ESTABLISHED:
                # anyone can write a plaintext record with the peer's address on it: it must not
                # touch the session (the peer's own repeats of its last flight are ignored too;
                # its repeated Finished, at epoch 1, is what brings ours again)
                raise DtlsDecodeError(UNEXPECTED_MESSAGE, "plaintext_after_handshake")
            self.last_seen = now
            self._content(rec.type, rec.fragment, 0, now)
            return False
        if rec.epoch != 1:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "epoch")
        prot = self.read_prot or self.pending_read
        if prot is None:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "no_keys_yet")
        if (rec.type == TLS12_CID) != bool(self.cid_in) or rec.cid != self.cid_in:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "cid_mismatch")
        if rec.seq <= self.floor:
            raise DtlsDecodeError(BAD_RECORD_MAC, "below_floor")
        if not self.window.fresh(rec.seq):
            raise DtlsDecodeError(BAD_RECORD_MAC, "replayed")
        try:
            ctype, plain = prot.open_untrusted(rec)
        except DtlsDecodeError:
            if self.state != ESTABLISHED:
                self.auth_failures += 1  # (most likely the wrong PSK: the keys differ)
            raise
        newest = rec.number > self.newest
        self.window.mark(rec.seq)
        self.last_seen = now
        if self.read_prot is None:  # before the peer's ChangeCipherSpec: keep it for then
            if len(self.early) < MAX_EARLY:
                self.early.append((ctype, plain))
            return newest
        self._content(ctype, plain, 1, now)
        return newest

    def _content(self, ctype: int, data: bytes, epoch: int, now: float) -> None:
        if ctype == HANDSHAKE:
            try:
                frags = m.parse_fragments_untrusted(data)
            except DtlsDecodeError as e:
                if epoch == 0:
                    raise  # (unauthenticated: dropped)
                self._fail(e.alert, e.reason)
                return
            for f in frags:
                self._fragment(f, epoch, now)
                if self.state in (FAILED, CLOSED):
                    return
        elif ctype == CHANGE_CIPHER_SPEC:
            if data != b"\x01":
                raise DtlsDecodeError(DECODE_ERROR, "change_cipher_spec")
            self._change_cipher_spec(now)
        elif ctype == ALERT:
            self._alert(data, epoch)
        elif ctype == APPLICATION_DATA:
            if epoch == 1 and self.state == ESTABLISHED:
                self.app.append(data)
                if self.role == "server":
                    self.flight = []  # the client has our Finished: no more reason to resend it
            else:
                raise DtlsDecodeError(UNEXPECTED_MESSAGE, "early_application_data")

    def _alert(self, data: bytes, epoch: int) -> None:
        if len(data) != 2:
            raise DtlsDecodeError(DECODE_ERROR, "alert_length")
        if epoch == 0 and self.state == ESTABLISHED:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "plaintext_alert")  # (anyone could send it)
        level, description = data
        if description == CLOSE_NOTIFY and self.state == ESTABLISHED:
            self.state = CLOSED
            self.reason = "close_notify"
        elif level == FATAL or self.state != ESTABLISHED:
            # (a close_notify too, before the handshake is over: the handshake ends -- its slot is
            # free at once and the client's hello sent again starts afresh -- where CLOSED would
            # keep it, unanswered, until handshake_timeout)
            self.state = FAILED
            self.reason = f"peer_alert_{alert_name(description)}"

    def _fragment(self, f: m.Fragment, epoch: int, now: float) -> None:
        if f.message_seq < self.recv_seq:
            # (established, only the peer's repeated Finished, authenticated, asks for our last
            # flight again: a plaintext record anyone could send does not)
            if f.message_seq < self.peer_flight_start and (epoch == 1 or self.state != ESTABLISHED):
                self.resend = bool(self.flight)  # the peer did not hear our last flight
            return
        if self.state == ESTABLISHED:
            # (authenticated: the peer asks for a renegotiation, which this engine does not do)
            self.refuse_renegotiation()
            return
        if f.message_seq >= self.recv_seq + MAX_AHEAD:
            return
        entry = self.pending.get(f.message_seq)
        if entry is None and f.message_seq == self.recv_seq and f.whole:
            # the usual case, the next message whole in one fragment: no reassembly needed
            if not self._take_message(f.msg_type, f.body, epoch, now):
                return
        else:
            if entry is None:
                entry = self.pending[f.message_seq] = (epoch, m.Reassembly(f))
            if entry[0] != epoch or not entry[1].add(f):
                return
        while (entry := self.pending.get(self.recv_seq)) is not None and entry[1].complete:
            del self.pending[self.recv_seq]
            ep, r = entry
            if not self._take_message(r.msg_type, bytes(r.body), ep, now):
                return

    def _take_message(self, msg_type: int, body: bytes, epoch: int, now: float) -> bool:
        """The whole message numbered `recv_seq`: handled; False when the connection is over"""
        raw = m.message(msg_type, self.recv_seq, body)
        self.recv_seq += 1
        try:
            self._message(msg_type, body, raw, epoch, now)
        except HandshakeFailed as e:
            self._fail(e.alert, e.reason)
        except DtlsDecodeError as e:
            self._fail(e.alert, e.reason)
        return self.state not in (FAILED, CLOSED)

    def _message(self, msg_type: int, body: bytes, raw: bytes, epoch: int, now: float) -> None:
        want_epoch = 1 if msg_type == m.FINISHED else 0
        if epoch != want_epoch:
            raise HandshakeFailed(UNEXPECTED_MESSAGE, "message_epoch")
        if self.role == "server":
            self._server_message(msg_type, body, raw, now)
        else:
            self._client_message(msg_type, body, raw, now)

    def _server_message(self, msg_type: int, body: bytes, raw: bytes, now: float) -> None:
        assert self.suite is not None
        if self.state == WAIT_CLIENT_CERTIFICATE and msg_type == m.CERTIFICATE:
            chain = m.parse_certificate_untrusted(body)
            if chain:
                self.peer_key = certs.leaf_key_untrusted(chain[0])
                identity = self._verify(chain)
                if identity is None:
                    raise HandshakeFailed(BAD_CERTIFICATE, "bad_certificate")
                self.identity = identity
                self.peer_chain = chain
            elif self.params.client_auth == "required":
                raise HandshakeFailed(HANDSHAKE_FAILURE, "no_client_certificate")
            self.transcript += raw
            self.state = WAIT_CLIENT_KEY_EXCHANGE
        elif self.state == WAIT_CLIENT_KEY_EXCHANGE and msg_type == m.CLIENT_KEY_EXCHANGE \
                and self.suite.kx == "ecdhe_ecdsa":
            point = m.parse_ecdhe_client_key_exchange_untrusted(body)
            assert self.ephemeral is not None
            premaster = certs.ecdh_untrusted(self.ephemeral, point)
            self.ephemeral = None
            self.transcript += raw
            self._derive_from(premaster)
            self.state = WAIT_CERTIFICATE_VERIFY if self.peer_key is not None else WAIT_CCS
            self.retransmit_at = float("inf")
        elif self.state == WAIT_CERTIFICATE_VERIFY and msg_type == m.CERTIFICATE_VERIFY:
            signature = m.parse_certificate_verify_untrusted(body)
            assert self.peer_key is not None
            certs.verify_untrusted(self.peer_key, signature, bytes(self.transcript), "bad_certificate_verify")
            if not self._admitted(self.identity):
                raise HandshakeFailed(ACCESS_DENIED, "unregistered_certificate")
            self.transcript += raw
            self.state = WAIT_CCS
        elif self.state == WAIT_CLIENT_KEY_EXCHANGE and msg_type == m.CLIENT_KEY_EXCHANGE:
            identity = m.parse_psk_client_key_exchange_untrusted(body)
            assert self.psk_for is not None
            try:
                psk = self.psk_for(identity)
            except Exception:
                raise HandshakeFailed(INTERNAL_ERROR, "psk_lookup_error") from None
            if not psk:
                raise HandshakeFailed(UNKNOWN_PSK_IDENTITY, "unknown_psk_identity")
            self.identity = identity
            self.transcript += raw
            self._derive(psk)
            self.state = WAIT_CCS
            self.retransmit_at = float("inf")  # (the rest of the client's flight is on its way)
        elif self.state == WAIT_FINISHED and msg_type == m.FINISHED:
            got = m.parse_finished_untrusted(body)
            if not compare_digest(got, verify_data(self.master, b"client finished",
                                                      bytes(self.transcript))):
                raise HandshakeFailed(DECRYPT_ERROR, "bad_finished")
            self.transcript += raw
            mine = self._next_message(m.FINISHED,
                                      verify_data(self.master, b"server finished", bytes(self.transcript)))
            self.state = ESTABLISHED
            self._send_flight([(0, CHANGE_CIPHER_SPEC, b"\x01"), (1, HANDSHAKE, mine)], now, timer=False)
            self.transcript = bytearray()
        elif msg_type == m.CLIENT_HELLO:
            raise HandshakeFailed(UNEXPECTED_MESSAGE, "renegotiation")  # (new hellos: through the engine)
        else:
            raise HandshakeFailed(UNEXPECTED_MESSAGE, f"unexpected_{msg_type}_in_{self.state}")

    def _client_message(self, msg_type: int, body: bytes, raw: bytes, now: float) -> None:
        if self.state == WAIT_SERVER_HELLO and msg_type == m.HELLO_VERIFY_REQUEST:
            cookie = m.parse_hello_verify_request_untrusted(body)
            self._send_hello(cookie, now)
        elif self.state == WAIT_SERVER_HELLO and msg_type == m.SERVER_HELLO:
            sh = m.parse_server_hello_untrusted(body)
            if sh.version != DTLS_1_2:
                raise HandshakeFailed(PROTOCOL_VERSION, "protocol_version")
            if sh.suite not in self.offered or sh.compression != 0:
                raise HandshakeFailed(ILLEGAL_PARAMETER, "server_hello_suite")
            self.suite = SUITES[sh.suite]
            self.ems = m.EXT_EXTENDED_MASTER_SECRET in sh.extensions
            if not self.ems and self.params.require_ems:
                raise HandshakeFailed(HANDSHAKE_FAILURE, "no_extended_master_secret")
            if m.EXT_CONNECTION_ID in sh.extensions:
                if self.offer_cid is None:
                    raise HandshakeFailed(UNEXPECTED_MESSAGE, "unsolicited_cid")
                self.cid_out = m.parse_cid_extension_untrusted(sh.extensions[m.EXT_CONNECTION_ID])
                self.cid_in = self.offer_cid
            self.server_random = sh.random
            self.transcript += raw
            self.state = WAIT_SERVER_HELLO_DONE
            self.retransmit_at = float("inf")
        elif self.state == WAIT_SERVER_HELLO_DONE and msg_type == m.CERTIFICATE and self._ecdhe():
            chain = m.parse_certificate_untrusted(body)
            if not chain:
                raise HandshakeFailed(BAD_CERTIFICATE, "no_server_certificate")
            self.peer_key = certs.leaf_key_untrusted(chain[0])
            if self.params.verify_peer is not None and self._verify(chain) is None:
                raise HandshakeFailed(BAD_CERTIFICATE, "bad_certificate")
            self.peer_chain = chain
            self.transcript += raw
        elif self.state == WAIT_SERVER_HELLO_DONE and msg_type == m.SERVER_KEY_EXCHANGE and self._ecdhe():
            if self.peer_key is None:
                raise HandshakeFailed(UNEXPECTED_MESSAGE, "key_exchange_before_certificate")
            params, point, signature = m.parse_server_key_exchange_ecdhe_untrusted(body)
            certs.verify_untrusted(self.peer_key, signature, self.client_random + self.server_random + params,
                                   "bad_server_key_exchange")
            self.peer_point = point
            self.transcript += raw
        elif self.state == WAIT_SERVER_HELLO_DONE and msg_type == m.SERVER_KEY_EXCHANGE:
            self.transcript += raw  # (a PSK identity hint: not used)
        elif self.state == WAIT_SERVER_HELLO_DONE and msg_type == m.CERTIFICATE_REQUEST and self._ecdhe():
            m.parse_certificate_request_untrusted(body)
            self.certificate_requested = True
            self.transcript += raw
        elif self.state == WAIT_SERVER_HELLO_DONE and msg_type == m.SERVER_HELLO_DONE:
            self.transcript += raw
            flight: list[tuple[int, int, bytes]] = []
            if self.certificate_requested:
                cert = self._next_message(m.CERTIFICATE, m.certificate(self.params.certificate_chain))
                self.transcript += cert
                flight.append((0, HANDSHAKE, cert))
            if self._ecdhe():
                if not self.peer_point:
                    raise HandshakeFailed(UNEXPECTED_MESSAGE, "no_server_key_exchange")
                key, point = certs.ephemeral()
                premaster = certs.ecdh_untrusted(key, self.peer_point)
                cke = self._next_message(m.CLIENT_KEY_EXCHANGE, m.ecdhe_client_key_exchange(point))
                self.transcript += cke
                self._derive_from(premaster)
            else:
                assert self.psk is not None
                cke = self._next_message(m.CLIENT_KEY_EXCHANGE, m.psk_client_key_exchange(self.identity))
                self.transcript += cke
                self._derive(self.psk)
            flight.append((0, HANDSHAKE, cke))
            if self.certificate_requested and self.params.private_key is not None:
                signature = certs.sign(self.params.private_key, bytes(self.transcript))
                cv = self._next_message(m.CERTIFICATE_VERIFY, m.certificate_verify(signature))
                self.transcript += cv
                flight.append((0, HANDSHAKE, cv))
            fin = self._next_message(m.FINISHED,
                                     verify_data(self.master, b"client finished", bytes(self.transcript)))
            self.transcript += fin
            self.state = WAIT_CCS
            flight += [(0, CHANGE_CIPHER_SPEC, b"\x01"), (1, HANDSHAKE, fin)]
            self._send_flight(flight, now, timer=True)
        elif self.state == WAIT_FINISHED and msg_type == m.FINISHED:
            got = m.parse_finished_untrusted(body)
            if not compare_digest(got, verify_data(self.master, b"server finished",
                                                      bytes(self.transcript))):
                raise HandshakeFailed(DECRYPT_ERROR, "bad_finished")
            self.state = ESTABLISHED
            self.flight = []
            self.retransmit_at = float("inf")
            self.transcript = bytearray()
        else:
            raise HandshakeFailed(UNEXPECTED_MESSAGE, f"unexpected_{msg_type}_in_{self.state}")

    def _change_cipher_spec(self, now: float) -> None:
        if self.state != WAIT_CCS or self.pending_read is None:
            return  # out of order or repeated: the peer's retransmission brings it again
        self.read_prot = self.pending_read
        self.pending_read = None
        self.state = WAIT_FINISHED
        early, self.early = self.early, []
        for ctype, plain in early:
            self._content(ctype, plain, 1, now)
            if self.state in (FAILED, CLOSED):
                return

    def _verify(self, chain: list[bytes]) -> bytes | None:
        assert self.params.verify_peer is not None
        try:
            return self.params.verify_peer(chain)
        except Exception:
            raise HandshakeFailed(INTERNAL_ERROR, "certificate_check_error") from None

    def _admitted(self, identity: bytes) -> bool:
        admit = self.params.admit_certificate
        if admit is None:
            return True
        try:
            return admit(identity)
        except Exception:
            raise HandshakeFailed(INTERNAL_ERROR, "certificate_check_error") from None

    def _ecdhe(self) -> bool:
        return self.suite is not None and self.suite.kx == "ecdhe_ecdsa"

    def _derive(self, psk: bytes) -> None:
        self._derive_from(psk_premaster(psk))

    def _derive_from(self, premaster: bytes) -> None:
        """(called with the transcript up to and including the ClientKeyExchange: RFC 7627's
        session hash)"""
        assert self.suite is not None
        session_hash = _sha256(bytes(self.transcript)) if self.ems else None
        self.master = master_secret(premaster, self.client_random, self.server_random, session_hash)
        keys = key_block(self.suite, self.master, self.client_random, self.server_random)
        self.install(keys)

    def install(self, keys: Keys) -> None:
        """The epoch-1 protections: the write side at once (used from our CCS on), the read side
        pending until the peer's CCS."""
        assert self.suite is not None
        self.keys = keys
        client = RecordProtection(self.suite.cipher, keys.client_key, keys.client_iv)
        server = RecordProtection(self.suite.cipher, keys.server_key, keys.server_iv)
        write, self.pending_read = (server, client) if self.role == "server" else (client, server)
        write.next_seq, write.limit = self.write_seq[1], self.write_limit
        self.write_prot = write

    # -- records out -----------------------------------------------------------------------------

    def _next_message(self, msg_type: int, body: bytes) -> bytes:
        msg = m.message(msg_type, self.send_seq, body)
        self.send_seq += 1
        return msg

    def _record(self, epoch: int, ctype: int, payload: bytes) -> bytes:
        """The next record of `epoch`; b"" when there is no number for it: its 2^48 are used up (the
        connection is over), or the rest are reserved by a stored copy of the session (state.py:
        export it again first)"""
        if epoch == 0:
            seq = self._seq0
            if seq > SEQ_MAX:
                self.state = FAILED
                self.reason = "sequence_numbers_exhausted"
                return b""
            self._seq0 = seq + 1
            return plaintext_record(ctype, 0, seq, payload)
        prot = self.write_prot
        assert prot is not None
        if prot.next_seq > SEQ_MAX:
            self.state = FAILED
            self.reason = "sequence_numbers_exhausted"
            return b""
        # (the protection numbers it: the fast lane seals this session's answers through it too)
        return prot.seal_next(ctype, payload, self.cid_out) or b""

    def _send_flight(self, flight: list[tuple[int, int, bytes]], now: float, *, timer: bool) -> None:
        self.flight = flight
        self.peer_flight_start = self.recv_seq
        self.retransmits = 0
        self.rto = INITIAL_RTO
        self.retransmit_at = now + self.rto if timer else float("inf")
        self._emit_flight()

    def _emit_flight(self) -> None:
        mtu = self.params.mtu
        records: list[bytes] = []
        for epoch, ctype, payload in self.flight:
            if ctype != HANDSHAKE:
                records.append(self._record(epoch, ctype, payload))
                continue
            overhead = HEADER + (0 if epoch == 0 else self.write_prot.overhead + len(self.cid_out) + 1
                                 if self.write_prot is not None else 0)
            for frag in m.fragments(payload, mtu - overhead):
                records.append(self._record(epoch, ctype, frag))
        datagram = b""
        for rec in records:
            if not rec:
                continue
            if datagram and len(datagram) + len(rec) > mtu:
                self.out.append(datagram)
                datagram = b""
            datagram += rec
        if datagram:
            self.out.append(datagram)

    def _fail(self, alert: int, reason: str) -> None:
        self.state = FAILED
        self.reason = reason
        self.flight = []
        self.retransmit_at = float("inf")
        self.send_alert(FATAL, alert)

    def refuse_renegotiation(self) -> None:
        """RFC 5746 §4.4: say no (a warning no_renegotiation) and keep the session -- MAX_RENEGOTIATIONS
        times; a peer that asks again is failed (a fatal handshake_failure, as §4.4 also allows), so
        no record or datagram of hellos becomes a flood of alerts."""
        self.renegotiations += 1
        if self.renegotiations > MAX_RENEGOTIATIONS:
            self._fail(HANDSHAKE_FAILURE, "renegotiations")
        else:
            self.send_alert(WARNING, NO_RENEGOTIATION)

    def fail(self, alert: int, reason: str) -> None:
        """End the handshake: a fatal `alert`, FAILED for `reason` (the engine's caller decides)"""
        self._fail(alert, reason)

    def send_alert(self, level: int, description: int) -> None:
        epoch = 1 if self.write_epoch_active() else 0
        if rec := self._record(epoch, ALERT, bytes((level, description))):
            self.out.append(rec)

    def write_epoch_active(self) -> bool:
        """Has this side sent its ChangeCipherSpec (its records are protected)?"""
        return self.write_prot is not None and self.state in (ESTABLISHED, WAIT_FINISHED, WAIT_CCS) and (
            self.role == "client" or self.state == ESTABLISHED)

    def seal(self, plaintext: bytes) -> bytes | None:
        """An application data record (ESTABLISHED only); None once the sequence numbers reserved
        by the last export are used up (export again first: state.py)"""
        return self._record(1, APPLICATION_DATA, plaintext) or None

    def restored_keys(self, read_key: bytes, read_iv: bytes, write_key: bytes, write_iv: bytes) -> None:
        """(state.restore: the keys as the exporting side's `keys` holds them)"""
        if self.role == "server":
            self.keys = Keys(read_key, write_key, read_iv, write_iv)
        else:
            self.keys = Keys(write_key, read_key, write_iv, read_iv)

    def close(self) -> None:
        if self.state == ESTABLISHED:
            self.send_alert(WARNING, CLOSE_NOTIFY)
        self.state = CLOSED

    def flush(self) -> list[bytes]:
        if self.resend and self.flight and self.state not in (FAILED, CLOSED):
            self._emit_flight()
        self.resend = False
        out, self.out = self.out, []
        return out

    def give_up(self) -> None:
        """The handshake ran out of time: no alert (the peer is not answering), a reason named"""
        self.state = FAILED
        # the peer's Finished came but never authenticated: the keys differ, the PSK was wrong
        self.reason = "finished_not_authentic" if self.auth_failures else "timeout"
        self.retransmit_at = float("inf")

    def tick(self, now: float) -> None:
        if now < self.retransmit_at or self.state in (FAILED, CLOSED, ESTABLISHED):
            return
        if self.retransmits >= MAX_RETRANSMITS:
            self.give_up()
            self.retransmit_at = float("inf")
            return
        self.retransmits += 1
        self.rto = min(self.rto * 2, MAX_RTO)
        self.retransmit_at = now + self.rto
        self._emit_flight()


def _sha256(data: bytes) -> bytes:
    import hashlib
    return hashlib.sha256(data).digest()
