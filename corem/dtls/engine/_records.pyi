"""DTLS record protection in C on OpenSSL's libcrypto (`_records.c`, `dtls_records.h`);
`records.RecordProtectionPy` and `records.ReplayWindowPy` are its reference."""

from typing import Any

from .records import RecordPy

OPENSSL_VERSION: str
OPENSSL_HEADERS: str

class Record:
    """records.Record"""

    type: int
    version: int
    epoch: int
    seq: int
    cid: bytes
    fragment: bytes

    def __init__(self, type: int, version: int, epoch: int, seq: int, cid: bytes, fragment: bytes) -> None: ...
    @property
    def number(self) -> int: ...

def parse_record_untrusted(datagram: bytes | bytearray | memoryview, offset: int, cid_length: int, /
                           ) -> tuple[Record, int]: ...

class Window:
    """records.ReplayWindow: top and bits are a signed and an unsigned 64-bit number."""

    top: int
    bits: int

    def __init__(self, top: int = -1, bits: int = 0) -> None: ...
    def fresh(self, seq: int, /) -> bool: ...
    def mark(self, seq: int, /) -> None: ...

class Protection:
    """records.RecordProtection: one direction's AEAD state for one epoch."""

    @property
    def iv(self) -> bytes: ...
    @property
    def tag(self) -> int: ...
    @property
    def overhead(self) -> int: ...
    @property
    def cipher(self) -> str: ...
    #: a write protection's next sequence number and the first one it may not use
    next_seq: int
    limit: int
    def __init__(self, cipher: str, key: bytes, iv: bytes) -> None: ...
    def seal(self, ctype: int, epoch: int, seq: int, plaintext: bytes, cid: bytes = b"",
             padding: int = 0) -> bytes: ...
    def seal_next(self, ctype: int, plaintext: bytes, cid: bytes = b"", /) -> bytes | None: ...
    def open_untrusted(self, record: RecordPy | Record, /) -> tuple[int, bytes]: ...
    def open_record_untrusted(self, datagram: bytes | bytearray | memoryview, offset: int, cid: bytes,
                              window: Window, epoch: int = 1, /) -> tuple[int, bytes, int, int]: ...

def configure(error_type: Any, /) -> None:
    """Tell the module which error refusals raise (records.py: DtlsDecodeError, once, at import)."""
