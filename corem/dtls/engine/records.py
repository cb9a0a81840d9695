"""The DTLS 1.2 record layer (RFC 6347 §4.1) with Connection IDs (RFC 9146 §4-5).

Records are parsed by `parse_record_untrusted` (one record at an offset of a datagram: a datagram
may hold several), protected and opened by `RecordProtection` (AEAD: AES-128-CCM-8, AES-128-CCM,
AES-128-GCM), and checked against replay by `ReplayWindow` (§4.1.2.6).

`parse_record_untrusted`, `Record`, `RecordProtection` and `ReplayWindow` are the C ones
(`_records.c` on the system's OpenSSL libcrypto, its work in `dtls_records.h`) when they are built
and COREM_PURE_PYTHON is not set; the `...Py` names (through `cryptography`) are the reference, the
same records byte for byte and the same refusals (tests/test_dtls_records_c.py).  `RECORDS` says
which.
`open_record_untrusted` is the receive path of an established session in one call: framing,
epoch, CID, replay window, AEAD, the window's update.

AEAD records (RFC 5246 §6.2.3.3, RFC 5288, RFC 6655): the fragment is an 8-byte explicit nonce
(this engine writes epoch + sequence number, as every stack does) and the ciphertext with its tag;
nonce = the 4-byte implicit IV (client or server write IV) + the explicit nonce.

  - without CID: additional_data = epoch(2) + seq(6) + type(1) + version(2) + length(2), the length
    of the plaintext;
  - with CID (RFC 9146 §5, content type tls12_cid = 25): the plaintext is the DTLSInnerPlaintext
    (content + real type + zero padding) and additional_data = seq_num_placeholder (8 x 0xff) +
    tls12_cid(1) + cid_length(1) + tls12_cid(1) + version(2) + epoch(2) + seq(6) + cid +
    length_of_DTLSInnerPlaintext(2).
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM

from .errors import BAD_RECORD_MAC, DECODE_ERROR, PROTOCOL_VERSION, RECORD_OVERFLOW, UNEXPECTED_MESSAGE, \
    DtlsDecodeError

CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
TLS12_CID = 25
CONTENT_TYPES = frozenset((CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA))

DTLS_1_2 = 0xFEFD
DTLS_1_0 = 0xFEFF  # (ClientHellos and HelloVerifyRequests may carry it in their record header)

HEADER = 13  # type, version, epoch, sequence number, length
SEQ_MAX = (1 << 48) - 1
EXPLICIT_NONCE = 8
#: RFC 6347 §4.1: a record's fragment is at most 2^14 bytes plus the cipher's expansion (2048)
MAX_FRAGMENT = (1 << 14) + 2048
MAX_PLAINTEXT = 1 << 14
SEQ_NUM_PLACEHOLDER = b"\xff" * 8

_HEADER = struct.Struct("!BHHHIH")  # type, version, epoch, seq (16 high + 32 low bits), length


class RecordPy:
    """One record as parsed (a plain slotted class: built once per record on the hot path; the
    reference: `Record` is the C one when it is built)"""

    __slots__ = ("type", "version", "epoch", "seq", "cid", "fragment")

    def __init__(self, type: int, version: int, epoch: int, seq: int, cid: bytes, fragment: bytes) -> None:
        self.type = type
        self.version = version
        self.epoch = epoch
        self.seq = seq
        self.cid = cid  # b"" unless type is TLS12_CID
        self.fragment = fragment

    @property
    def number(self) -> int:
        """epoch and sequence number as one integer (RFC 9146 §6 compares records by it)"""
        return self.epoch << 48 | self.seq

    def __repr__(self) -> str:
        return (f"Record(type={self.type}, epoch={self.epoch}, seq={self.seq}, cid={self.cid.hex()}, "
                f"{len(self.fragment)} B)")


def parse_record_untrusted_py(datagram: bytes, offset: int, cid_length: int) -> tuple[RecordPy, int]:
    """The record at `offset` and the offset after it.  `cid_length` is the length of the CID this
    side chose (records with content type tls12_cid carry it; the length is not on the wire).
    (The reference: `parse_record_untrusted` is the C one when it is built.)"""
    if len(datagram) - offset < HEADER:
        raise DtlsDecodeError(DECODE_ERROR, "record_truncated")
    ctype = datagram[offset]
    if ctype == TLS12_CID:
        if cid_length == 0:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "cid_not_negotiated")
        if len(datagram) - offset < HEADER + cid_length:
            raise DtlsDecodeError(DECODE_ERROR, "record_truncated")
        _, version, epoch, hi, lo, _ = _HEADER.unpack_from(datagram, offset)
        cid = bytes(datagram[offset + 11:offset + 11 + cid_length])
        start = offset + 11 + cid_length + 2
        length = int.from_bytes(datagram[start - 2:start], "big")
    elif ctype in CONTENT_TYPES:
        _, version, epoch, hi, lo, length = _HEADER.unpack_from(datagram, offset)
        cid = b""
        start = offset + HEADER
    else:
        raise DtlsDecodeError(UNEXPECTED_MESSAGE, "unknown_content_type")
    if version != DTLS_1_2 and not (version == DTLS_1_0 and epoch == 0):
        raise DtlsDecodeError(PROTOCOL_VERSION, "record_version")
    if length > MAX_FRAGMENT:
        raise DtlsDecodeError(RECORD_OVERFLOW, "record_overflow")
    end = start + length
    if end > len(datagram):
        raise DtlsDecodeError(DECODE_ERROR, "record_truncated")
    return RecordPy(ctype, version, epoch, hi << 32 | lo, cid, bytes(datagram[start:end])), end


def lone_epoch0_record_untrusted(datagram: bytes, ctype: int) -> int | None:
    """The sequence number of the record `datagram` is, when it is exactly one epoch-0 record of
    `ctype` that parse_record_untrusted would take (its version, length and size rules); else None
    (the caller parses it the long way, which names what is wrong).  The engine's shortcut for a
    handshake's first datagram: no Record, no loop.  Never raises.  (Its C twin, for the fast lane's
    answer to a new peer's hello: dtls_records.h `dtls_lone_epoch0`.)"""
    n = len(datagram)
    if n <= HEADER or datagram[0] != ctype or datagram[3] or datagram[4]:
        return None
    version = datagram[1] << 8 | datagram[2]
    if (version != DTLS_1_2 and version != DTLS_1_0) or datagram[11] << 8 | datagram[12] != n - HEADER \
            or n - HEADER > MAX_FRAGMENT:
        return None
    return int.from_bytes(datagram[5:11], "big")


def plaintext_record(ctype: int, epoch: int, seq: int, fragment: bytes, version: int = DTLS_1_2) -> bytes:
    return _HEADER.pack(ctype, version, epoch, seq >> 32, seq & 0xFFFFFFFF, len(fragment)) + fragment


def aad(ctype: int, epoch: int, seq: int, length: int, version: int = DTLS_1_2) -> bytes:
    """RFC 5246 §6.2.3.3 with DTLS's seq_num = epoch + sequence number (RFC 6347 §4.1.2.1)"""
    return struct.pack("!HHIBHH", epoch, seq >> 32, seq & 0xFFFFFFFF, ctype, version, length)


def aad_cid(cid: bytes, epoch: int, seq: int, inner_length: int, version: int = DTLS_1_2) -> bytes:
    """RFC 9146 §5 (AEAD ciphers), byte for byte"""
    return b"".join((
        SEQ_NUM_PLACEHOLDER, bytes((TLS12_CID, len(cid), TLS12_CID)), version.to_bytes(2, "big"),
        epoch.to_bytes(2, "big"), seq.to_bytes(6, "big"), cid, inner_length.to_bytes(2, "big"),
    ))


def aead_for(cipher: str, key: bytes) -> tuple[AESCCM | AESGCM, int]:
    """The AEAD of a suite's cipher ("ccm8", "ccm", "gcm") under `key`, and its tag length: DTLS's
    records and TLS's (tls.py) alike."""
    if cipher == "ccm8":
        return AESCCM(key, tag_length=8), 8
    if cipher == "ccm":
        return AESCCM(key, tag_length=16), 16
    if cipher == "gcm":
        return AESGCM(key), 16
    raise ValueError(f"unknown AEAD {cipher!r}")


class RecordProtectionPy:
    """One direction's AEAD state for one epoch: the key and the 4-byte implicit IV (the reference;
    `RecordProtection` is the C one when it is built)."""

    __slots__ = ("aead", "iv", "tag", "cipher", "next_seq", "limit")

    def __init__(self, cipher: str, key: bytes, iv: bytes) -> None:
        if len(key) != 16 or len(iv) != 4:
            raise ValueError("AES-128 takes a 16-byte key and a 4-byte implicit IV")
        self.iv = bytes(iv)
        #: a write protection's sequence numbers: the next one, and the first one it may not use
        #: (state.export's reservation).  One counter, whoever seals: the Connection (`seal_next`)
        #: and, with the C records, the fast lane (through _records' capsule)
        self.next_seq = 0
        self.limit = SEQ_MAX
        self.cipher = cipher
        self.aead, self.tag = aead_for(cipher, key)

    @property
    def overhead(self) -> int:
        return EXPLICIT_NONCE + self.tag

    def seal(self, ctype: int, epoch: int, seq: int, plaintext: bytes, cid: bytes = b"",
             padding: int = 0) -> bytes:
        """The whole record.  With `cid` (the peer's, non-empty) a tls12_cid record (RFC 9146).
        OverflowError past the last sequence number (2^48 - 1); ValueError for a record over DTLS's
        limits (a plaintext over 2^14 bytes, a fragment over MAX_FRAGMENT, a CID over 255 bytes)."""
        if seq < 0 or seq > SEQ_MAX:
            raise OverflowError("sequence number over 2^48 - 1 (exhausted)")
        inner_length = len(plaintext) + (1 + padding if cid else 0)
        if (len(plaintext) > MAX_PLAINTEXT or len(cid) > 255 or padding < 0
                or EXPLICIT_NONCE + inner_length + self.tag > MAX_FRAGMENT):
            raise ValueError("record_overflow: the record would be over DTLS's limits")
        explicit = epoch.to_bytes(2, "big") + seq.to_bytes(6, "big")
        if cid:
            inner = plaintext + bytes((ctype,)) + bytes(padding)
            extra = aad_cid(cid, epoch, seq, len(inner))
            sealed = explicit + self.aead.encrypt(self.iv + explicit, inner, extra)
            return b"".join((
                bytes((TLS12_CID,)), DTLS_1_2.to_bytes(2, "big"), explicit, cid,
                len(sealed).to_bytes(2, "big"), sealed,
            ))
        extra = aad(ctype, epoch, seq, len(plaintext))
        sealed = explicit + self.aead.encrypt(self.iv + explicit, plaintext, extra)
        return plaintext_record(ctype, epoch, seq, sealed)

    def seal_next(self, ctype: int, plaintext: bytes, cid: bytes = b"") -> bytes | None:
        """The next record of epoch 1, numbered `next_seq` (then counted); None, nothing consumed,
        once the number is at `limit` (the reservation is used up); OverflowError past 2^48 - 1."""
        seq = self.next_seq
        if seq > SEQ_MAX:  # (exhausted first: no reservation helps)
            raise OverflowError("sequence number over 2^48 - 1 (exhausted)")
        if seq >= self.limit:
            return None
        record = self.seal(ctype, 1, seq, plaintext, cid)
        self.next_seq = seq + 1
        return record

    def open_untrusted(self, record: RecordPy) -> tuple[int, bytes]:
        """(content type, plaintext) of a protected record; DtlsDecodeError(bad_record_mac) when it
        does not authenticate."""
        fragment = record.fragment
        if len(fragment) > MAX_FRAGMENT:
            raise DtlsDecodeError(RECORD_OVERFLOW, "record_overflow")
        n = len(fragment) - EXPLICIT_NONCE - self.tag
        if n < 0:
            raise DtlsDecodeError(BAD_RECORD_MAC, "record_too_short")
        nonce = self.iv + fragment[:EXPLICIT_NONCE]
        if record.type == TLS12_CID:
            extra = aad_cid(record.cid, record.epoch, record.seq, n, record.version)
        else:
            extra = aad(record.type, record.epoch, record.seq, n, record.version)
        try:
            plain = self.aead.decrypt(nonce, fragment[EXPLICIT_NONCE:], extra)
        except InvalidTag:
            raise DtlsDecodeError(BAD_RECORD_MAC, "bad_record_mac") from None
        if record.type != TLS12_CID:
            return record.type, plain
        inner = plain.rstrip(b"\x00")  # DTLSInnerPlaintext: content, real type, zeros
        if not inner or inner[-1] not in CONTENT_TYPES:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "inner_content_type")
        return inner[-1], inner[:-1]

    def open_record_untrusted(self, datagram: bytes, offset: int, cid: bytes, window: ReplayWindowPy,
                              epoch: int = 1) -> tuple[int, bytes, int, int]:
        """The record at `offset` of `datagram`, of an established session whose records carry
        `cid` (the CID this side chose; b"": none), opened in one call: (content type, plaintext,
        epoch << 48 | seq, the offset after the record).  Refused (DtlsDecodeError), in this
        order: what `parse_record_untrusted` refuses, another epoch ("epoch"), another CID or none
        ("cid_mismatch"), a replay ("replayed"), what `open_untrusted` refuses.  `window` is marked
        only once the record authenticated."""
        rec, end = parse_record_untrusted_py(datagram, offset, len(cid))
        if rec.epoch != epoch:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "epoch")
        if (rec.type == TLS12_CID) != bool(cid) or rec.cid != cid:
            raise DtlsDecodeError(UNEXPECTED_MESSAGE, "cid_mismatch")
        if not window.fresh(rec.seq):
            raise DtlsDecodeError(BAD_RECORD_MAC, "replayed")
        ctype, plain = self.open_untrusted(rec)
        window.mark(rec.seq)
        return ctype, plain, rec.number, end


WINDOW = 64
_MASK = (1 << WINDOW) - 1


class ReplayWindowPy:
    """RFC 6347 §4.1.2.6: the highest sequence number authenticated so far and a bitmap of the 64
    below it (bit i: top - i was seen).  `fresh` before decryption, `mark` only after the record
    authenticated (a forged record must not move the window).  The reference: `ReplayWindow` is
    the C one when it is built (top and bits there are a signed and an unsigned 64-bit number)."""

    __slots__ = ("top", "bits")

    def __init__(self, top: int = -1, bits: int = 0) -> None:
        self.top = top
        self.bits = bits

    def fresh(self, seq: int) -> bool:
        if seq > self.top:
            return True
        d = self.top - seq
        return d < WINDOW and not (self.bits >> d) & 1

    def mark(self, seq: int) -> None:
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & _MASK if shift < WINDOW else 1
            self.top = seq
        elif self.top - seq < WINDOW:
            self.bits |= 1 << (self.top - seq)


def _load_c() -> Any:
    """The C record layer, unless it is missing or COREM_PURE_PYTHON is set."""
    if os.environ.get("COREM_PURE_PYTHON"):
        return None
    try:
        from . import _records
    except ImportError:
        return None
    _records.configure(DtlsDecodeError)
    return _records


if TYPE_CHECKING:
    Record = RecordPy
    RecordProtection = RecordProtectionPy
    ReplayWindow = ReplayWindowPy
    parse_record_untrusted = parse_record_untrusted_py
    RECORDS: str
else:
    _c = _load_c()
    if _c is None:
        RECORDS = "python"
        Record, RecordProtection, ReplayWindow = RecordPy, RecordProtectionPy, ReplayWindowPy
        parse_record_untrusted = parse_record_untrusted_py
    else:
        RECORDS = "c"
        Record, RecordProtection, ReplayWindow = _c.Record, _c.Protection, _c.Window
        parse_record_untrusted = _c.parse_record_untrusted
