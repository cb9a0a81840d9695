"""An established session as data (issue 27): a small versioned record that offload, checkpoint,
restart and other nodes read -- never pickle -- and its sealed form for stores other nodes share.

The record (big-endian, version 1):

    magic "cDS" | version 1 | role 1 (0 server, 1 client) | suite 2 | epoch 2
    | write_seq 6 (the next number this side may send: a reservation, below)
    | window top 8 (signed: -1 = nothing received) | window bits 8
    | key length 1 | read key | write key | iv length 1 | read iv | write iv
    | cid_in <1> | cid_out <1> | identity <2>

~90 bytes for a PSK session with a 6-byte CID and a short identity.

Write sequence numbers are reserved, not recorded: `export(conn, reserve)` stores
`write_seq + reserve` and caps the live connection there, so a session restored from any copy
never sends a number the original already used (an AEAD nonce used twice gives the key stream
away).  The read window is the one at the export; whoever restores it must also refuse what was
taken since (today's store writes the records' numbers before their messages are handled).

`seal`/`open_sealed_untrusted`: AES-128/256-GCM under a key from the settings, a random 12-byte
nonce, the additional data naming the format and the caller's `context` (the row's key: a sealed
session moved to another row does not open).  `from_bytes_untrusted` and `open_sealed_untrusted`
raise only DtlsDecodeError.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .connection import ESTABLISHED, Connection, Params
from .crypto import SUITES
from .errors import DECODE_ERROR, DtlsDecodeError
from .records import SEQ_MAX, RecordProtection, ReplayWindow

MAGIC = b"cDS"
VERSION = 1
ROLES = ("server", "client")
_FIXED = struct.Struct("!3sBBHH6sqQ")
SEAL_AAD = b"corem.dtls.session/1"
NONCE = 12


@dataclass(frozen=True)
class SessionState:
    role: str
    suite: int
    epoch: int
    write_seq: int
    window_top: int
    window_bits: int
    read_key: bytes
    write_key: bytes
    read_iv: bytes
    write_iv: bytes
    cid_in: bytes
    cid_out: bytes
    identity: bytes

    def to_bytes(self) -> bytes:
        return b"".join((
            _FIXED.pack(MAGIC, VERSION, ROLES.index(self.role), self.suite, self.epoch,
                        self.write_seq.to_bytes(6, "big"), self.window_top, self.window_bits),
            bytes((len(self.read_key),)), self.read_key, self.write_key,
            bytes((len(self.read_iv),)), self.read_iv, self.write_iv,
            bytes((len(self.cid_in),)), self.cid_in, bytes((len(self.cid_out),)), self.cid_out,
            len(self.identity).to_bytes(2, "big"), self.identity,
        ))

    @classmethod
    def from_bytes_untrusted(cls, data: bytes) -> SessionState:
        if len(data) < _FIXED.size:
            raise DtlsDecodeError(DECODE_ERROR, "state_truncated")
        magic, version, role, suite, epoch, seq, top, bits = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise DtlsDecodeError(DECODE_ERROR, "state_magic")
        if version != VERSION:
            raise DtlsDecodeError(DECODE_ERROR, "state_version")
        if role >= len(ROLES):
            raise DtlsDecodeError(DECODE_ERROR, "state_role")
        s = SUITES.get(suite)
        if s is None:
            raise DtlsDecodeError(DECODE_ERROR, "state_suite")
        if epoch != 1 or not -1 <= top <= SEQ_MAX:
            raise DtlsDecodeError(DECODE_ERROR, "state_numbers")
        pos = _FIXED.size

        def take(n: int) -> bytes:
            nonlocal pos
            if n > len(data) - pos:
                raise DtlsDecodeError(DECODE_ERROR, "state_truncated")
            out = bytes(data[pos:pos + n])
            pos += n
            return out

        klen = take(1)[0]
        if klen != s.key_length:
            raise DtlsDecodeError(DECODE_ERROR, "state_key_length")
        read_key, write_key = take(klen), take(klen)
        ivlen = take(1)[0]
        if ivlen != s.iv_length:
            raise DtlsDecodeError(DECODE_ERROR, "state_iv_length")
        read_iv, write_iv = take(ivlen), take(ivlen)
        cid_in = take(take(1)[0])
        cid_out = take(take(1)[0])
        identity = take(int.from_bytes(take(2), "big"))
        if pos != len(data):
            raise DtlsDecodeError(DECODE_ERROR, "state_trailing_bytes")
        return cls(ROLES[role], suite, epoch, int.from_bytes(seq, "big"), top, bits, read_key, write_key,
                   read_iv, write_iv, cid_in, cid_out, identity)


#: write sequence numbers a live session may use between two exports
DEFAULT_RESERVE = 1 << 16


def export(conn: Connection, reserve: int = DEFAULT_RESERVE) -> SessionState:
    """The state of an established connection; from now on `conn` sends at most `reserve` more
    records before the next export (see the module's text)."""
    if conn.state != ESTABLISHED or conn.suite is None or conn.read_prot is None or conn.write_prot is None:
        raise ValueError("only an established session is exported")
    keys = conn.keys
    assert keys is not None
    limit = min(conn.write_seq[1] + reserve, SEQ_MAX)
    conn.write_limit = limit
    if conn.role == "server":
        read_key, read_iv = keys.client_key, keys.client_iv
        write_key, write_iv = keys.server_key, keys.server_iv
    else:
        read_key, read_iv = keys.server_key, keys.server_iv
        write_key, write_iv = keys.client_key, keys.client_iv
    return SessionState(conn.role, conn.suite.code, 1, limit, conn.window.top, conn.window.bits, read_key,
                        write_key, read_iv, write_iv, conn.cid_in, conn.cid_out, conn.identity)


def restore(state: SessionState, peer: object, now: float, params: Params | None = None,
            reserve: int = DEFAULT_RESERVE) -> Connection:
    """An established connection from its state; it sends from the stored reservation on, and at
    most `reserve` records before it is exported again."""
    suite = SUITES[state.suite]
    conn = Connection(state.role, params or Params(), peer, now)
    conn.suite = suite
    conn.state = ESTABLISHED
    conn.identity = state.identity
    conn.cid_in, conn.cid_out = state.cid_in, state.cid_out
    conn.read_prot = RecordProtection(suite.cipher, state.read_key, state.read_iv)
    conn.write_prot = RecordProtection(suite.cipher, state.write_key, state.write_iv)
    conn.window = ReplayWindow(state.window_top, state.window_bits)  # (conn.newest reads its top)
    conn.write_seq = (0, state.write_seq)
    conn.write_limit = min(state.write_seq + reserve, SEQ_MAX)
    conn.restored_keys(state.read_key, state.read_iv, state.write_key, state.write_iv)
    return conn


def seal(state: SessionState, key: bytes, context: bytes = b"") -> bytes:
    """nonce(12) + AES-GCM(state) for a store other nodes share"""
    nonce = os.urandom(NONCE)
    return nonce + AESGCM(key).encrypt(nonce, state.to_bytes(), SEAL_AAD + context)


def open_sealed_untrusted(blob: bytes, key: bytes, context: bytes = b"") -> SessionState:
    if len(blob) < NONCE + 16:
        raise DtlsDecodeError(DECODE_ERROR, "sealed_truncated")
    try:
        data = AESGCM(key).decrypt(blob[:NONCE], blob[NONCE:], SEAL_AAD + context)
    except InvalidTag:
        raise DtlsDecodeError(DECODE_ERROR, "sealed_not_authentic") from None
    return SessionState.from_bytes_untrusted(data)
