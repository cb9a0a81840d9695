"""An OSCORE security context (RFC 8613 §3): the keys derived from a device's master secret, the
nonces, corem's sender sequence number and the replay window for the device's requests.

Only the algorithms RFC 8613 makes mandatory: AES-CCM-16-64-128 (COSE 10: 16-byte key, 8-byte
tag, 13-byte nonce) and HKDF-SHA-256.  Seen from corem: the *sender* ID is corem's, the
*recipient* ID is the device's (the `kid` in its requests).
"""

from __future__ import annotations

from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..c_twins import c_twin

__all__ = ["AEAD_ALG", "Context", "InvalidTag", "MAX_ID", "MAX_SEQ", "ReplayWindow", "cbor_bstr", "derive"]

#: COSE algorithm AES-CCM-16-64-128
AEAD_ALG = 10
KEY_LEN, NONCE_LEN, TAG_LEN = 16, 13, 8
#: a Sender/Recipient ID is at most nonce length - 6 bytes (§3.3)
MAX_ID = NONCE_LEN - 6
#: Partial IVs are at most 5 bytes (§6.1): 2^40 - 1 sequence numbers per sender
MAX_SEQ = (1 << 40) - 1
#: RFC 8613 §7.4's default: a window of 32 sequence numbers
WINDOW = 32


def cbor_bstr(b: bytes) -> bytes:
    """CBOR's byte string (major type 2), for the short strings OSCORE puts in its structures."""
    n = len(b)
    if n < 24:
        return bytes((0x40 | n,)) + b
    if n < 256:
        return bytes((0x58, n)) + b
    return bytes((0x59, n >> 8, n & 0xFF)) + b


def _info(id_: bytes, id_context: bytes | None, kind: bytes, length: int) -> bytes:
    """The HKDF info (§3.2.1): [id, id_context, alg_aead, type, L] in CBOR."""
    ctx = b"\xf6" if id_context is None else cbor_bstr(id_context)  # null, or a bstr
    return b"\x85" + cbor_bstr(id_) + ctx + bytes((AEAD_ALG,)) + bytes((0x60 | len(kind),)) + kind + bytes((length,))


def _hkdf(secret: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(secret)


def derive(secret: bytes, salt: bytes, sender_id: bytes, recipient_id: bytes,
           id_context: bytes | None) -> tuple[bytes, bytes, bytes]:
    """(sender key, recipient key, common IV) from the master secret and salt (§3.2.1)."""
    return (_hkdf(secret, salt, _info(sender_id, id_context, b"Key", KEY_LEN), KEY_LEN),
            _hkdf(secret, salt, _info(recipient_id, id_context, b"Key", KEY_LEN), KEY_LEN),
            _hkdf(secret, salt, _info(b"", id_context, b"IV", NONCE_LEN), NONCE_LEN))


class ReplayWindow:
    """Which of the device's recent sequence numbers were accepted (§7.4): the highest, and a bit
    for each of the WINDOW below it.  An uninitialised window (after a restart, where corem cannot
    know what it accepted before) accepts nothing until Echo (RFC 9175) proves a request fresh."""

    __slots__ = ("top", "bits", "ready")

    def __init__(self, ready: bool) -> None:
        self.top = -1
        self.bits = 0
        self.ready = ready

    def fresh(self, seq: int) -> bool:
        if not self.ready:
            return False
        if seq > self.top:
            return True
        age = self.top - seq
        return age < WINDOW and not (self.bits >> age) & 1

    def accept(self, seq: int) -> None:
        """Mark `seq` seen (after the request decrypted, never before: a forged number must not
        move the window)."""
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = seq
        else:
            self.bits |= 1 << (self.top - seq)

    def start_at(self, seq: int) -> None:
        """Echo proved the request numbered `seq` fresh: nothing before it is accepted again."""
        self.top, self.bits, self.ready = seq, (1 << WINDOW) - 1, True


#: the replay window a Context holds: the fast lane's C window (corem/fastlane/oscore.h), which the
#: lane checks and moves itself for the requests it takes -- one window whichever path takes a
#: request -- or, without the C lane (or with COREM_PURE_PYTHON), ReplayWindow, its twin
Window: Callable[[bool], ReplayWindow] = c_twin("corem.fastlane._lane", "OscoreWindow", None) or ReplayWindow


class Context:
    """One device's security context; `reserve(n)` gives corem a block of n sender sequence
    numbers that no other process and no later start will use (persisted first, §7.5.1)."""

    __slots__ = ("sender_id", "recipient_id", "id_context", "_send", "_recv", "_iv", "window", "_seq", "_limit",
                 "_reserve", "echo", "name", "marked", "keys")

    def __init__(self, secret: bytes, salt: bytes, sender_id: bytes, recipient_id: bytes, id_context: bytes | None,
                 *, reserve: Callable[[int], int], window_ready: bool) -> None:
        if len(sender_id) > MAX_ID or len(recipient_id) > MAX_ID:
            raise ValueError(f"oscore: sender and recipient IDs are at most {MAX_ID} bytes")
        send, recv, iv = derive(secret, salt, sender_id, recipient_id, id_context)
        #: the derived (sender key, recipient key, common IV): what a fast lane holds to take the
        #: device's requests itself (corem/fastlane `FastLane.oscore_take`)
        self.keys = (send, recv, iv)
        self.sender_id, self.recipient_id, self.id_context = sender_id, recipient_id, id_context
        self._send, self._recv = AESCCM(send, TAG_LEN), AESCCM(recv, TAG_LEN)
        self._iv = int.from_bytes(iv, "big")
        self.window = Window(window_ready)
        self._seq = self._limit = 0
        self._reserve = reserve
        #: the Echo value (RFC 9175) this context's device must return before its window opens
        self.echo: bytes | None = None
        #: its row in the registry's oscore_state (registry/oscore.py), and whether this process
        #: has told that row it took a request (a window kept in memory: once per process)
        self.name = ""
        self.marked = False

    def nonce(self, id_piv: bytes, piv: bytes) -> bytes:
        """§5.2: [size of ID_PIV][ID_PIV, left-padded][PIV, left-padded to 5] XOR the common IV."""
        parts = ((len(id_piv) << 96) | (int.from_bytes(id_piv, "big") << 40) | int.from_bytes(piv, "big"))
        return (parts ^ self._iv).to_bytes(NONCE_LEN, "big")

    def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """The plaintext; InvalidTag if it was not sealed with the device's key."""
        return self._recv.decrypt(nonce, ciphertext, aad)

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._send.encrypt(nonce, plaintext, aad)

    def next_seq(self) -> int:
        """A sender sequence number never used before with this key (OverflowError past 2^40-1:
        the context must be renewed, §7.2.1)."""
        if self._seq >= self._limit:
            chunk = 1000
            start = self._reserve(chunk)
            if start + chunk - 1 > MAX_SEQ:
                raise OverflowError("oscore: sender sequence numbers exhausted; renew the context")
            self._seq, self._limit = start, start + chunk
        seq = self._seq
        self._seq += 1
        return seq
