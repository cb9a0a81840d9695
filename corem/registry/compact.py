"""The registry's devices in memory, packed: ~200 bytes a device instead of ~3.8 KB.

A `Fleet` keeps each registered device as one msgpack array in a `bytes` (its row of the devices
table; the tenant and profile as numbers into a table of words), in a list indexed by a row
number, and finds them through compact hash indexes (`Index`: 64-bit hashes of a key -> row
number, 16-32 bytes a key; `_index.c`) by name, token, PSK identity, certificate fingerprint and
OSCORE kid.  An index holds hashes, not keys: a lookup decodes the row it finds and compares the
key, so a key that is not registered is never taken for one that is, whatever its hash.  A key
whose hash another registered key of the same kind already has (rare: one pair in ~10^13 for a
million keys) is kept aside in `spill`.

`Device` objects are made from a row when asked for and kept in a small cache (`CACHE` of them),
so the devices that talk cost their objects and the rest only their row.
"""

from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from typing import Any, Callable, Hashable, Iterator, Protocol

import msgspec

from .store import _OSCORE_CODEC, Device

log = logging.getLogger("corem.registry")

try:
    from ._index import Index as _CIndex
except ImportError:  # pragma: no cover - only without a C compiler
    _CIndex = None  # type: ignore[assignment,misc]


class IndexLike(Protocol):
    def get(self, h: int, /) -> int: ...
    def put(self, h: int, row: int, /) -> int: ...
    def pop(self, h: int, /) -> int: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


class PyIndex:
    """`_index.Index` in Python (a dict: ~100 bytes a key instead of 16-32), when it is not built."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[int, int] = {}

    def get(self, h: int) -> int:
        return self._d.get(h, -1)

    def put(self, h: int, row: int) -> int:
        old = self._d.get(h, -1)
        self._d[h] = row
        return old

    def pop(self, h: int) -> int:
        return self._d.pop(h, -1)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    @property
    def nbytes(self) -> int:
        return self._d.__sizeof__()


def new_index() -> IndexLike:
    return _CIndex() if _CIndex is not None else PyIndex()


#: the kinds of key a device is found by (the indexes of a Fleet, in this order)
NAME, TOKEN, PSK, CERT, KID = range(5)
KIND_NAMES = ("name", "token", "psk_identity", "cert_sha256", "oscore_kid")
#: Device objects kept made (the devices asked for most recently, roughly)
CACHE = 8192

#: a row as the devices table has it (store._COLUMNS): tenant, device, profile, token, created_at,
#: psk_identity, psk, cert_sha256, power_mode, topics, gateways, oscore (JSON), oscore_kid
Row = tuple[Any, ...]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_oscore = _OSCORE_CODEC[1].decode


def _checked_oscore(r: Row) -> str | None:
    """The row's OSCORE keys (JSON text), or None if they do not decode: a row another writer of a
    shared registry put there is read when the device is looked up (`_make`), where an error would
    answer the device's request 5.00; here it is said once, and the device has no OSCORE context
    (its OSCORE requests are refused as an unknown kid)."""
    text = r[11]
    if text is None:
        return None
    try:
        _oscore(text)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.warning("device %s/%s: its oscore keys do not read (%s); it has no OSCORE context", r[0], r[1], e)
        return None
    return text


def _pack_cert(text: str | None) -> bytes | str | None:
    """A certificate fingerprint as its 32 bytes (half the text), if it reads back the same."""
    if text is None:
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:  # (written by another tool: kept as it is)
        return text
    return raw if raw.hex() == text else text


def _unpack_cert(value: bytes | str | None) -> str | None:
    return value.hex() if isinstance(value, bytes) else value


def row_keys(r: Row) -> tuple[Any, ...]:
    """The keys a table row is found by, in kind order (None: it has none of that kind)."""
    return ((r[0], r[1]), r[3], r[5], r[7], r[12])


def device_key(kind: int, d: Device) -> Any:
    if kind == NAME:
        return (d.tenant, d.device)
    if kind == TOKEN:
        return d.token
    if kind == PSK:
        return d.psk_identity
    if kind == CERT:
        return d.cert_sha256
    return None if d.oscore is None else d.oscore.key_text()


class Fleet:
    """Every registered device, packed (see the module docstring).  Not thread-safe: one is
    built in a worker thread and then handed to the event loop, which alone changes it."""

    def __init__(self, hasher: Callable[[Hashable], int] = hash, cache: int = CACHE) -> None:
        self.rows: list[bytes | None] = []
        self._free: list[int] = []
        self.indexes: list[IndexLike] = [new_index() for _ in KIND_NAMES]
        #: (kind, key) -> row, for a key whose hash another key of its kind has in the index
        self.spill: dict[tuple[int, Any], int] = {}
        self._words: list[str] = []
        self._word_ids: dict[str, int] = {}
        self.tenants: Counter[str] = Counter()
        self.profiles: Counter[str] = Counter()
        #: devices with a key of each kind
        self.counts = [0] * len(KIND_NAMES)
        self.hash = hasher
        self.cache: dict[int, Device] = {}
        self.cache_size = cache

    def __len__(self) -> int:
        return self.counts[NAME]

    # -- rows ------------------------------------------------------------------------------------
    def _word(self, text: str) -> int:
        n = self._word_ids.get(text)
        if n is None:
            n = self._word_ids[text] = len(self._words)
            self._words.append(text)
        return n

    def pack(self, r: Row) -> bytes:
        return _encode((self._word(r[0]), r[1], self._word(r[2]), r[3], r[4], r[5],
                        None if r[6] is None else bytes(r[6]), _pack_cert(r[7]), r[8], r[9], r[10],
                        _checked_oscore(r), r[12]))

    def unpack(self, blob: bytes) -> Row:
        """A packed row as the table has it."""
        x = _decode(blob)
        words = self._words
        return (words[x[0]], x[1], words[x[2]], x[3], x[4], x[5], x[6], _unpack_cert(x[7]),
                x[8], x[9], x[10], x[11], x[12])

    def _make(self, blob: bytes) -> Device:
        x = _decode(blob)
        words = self._words
        return Device(tenant=words[x[0]], device=x[1], profile=words[x[2]], token=x[3], created_at=x[4],
                      psk_identity=x[5], psk=x[6], cert_sha256=_unpack_cert(x[7]), power_mode=x[8],
                      topics=x[9], gateways=x[10], oscore=None if x[11] is None else _oscore(x[11]))

    def device(self, row: int) -> Device:
        """The Device of a live row (made once, then cached)."""
        d = self.cache.get(row)
        if d is None:
            blob = self.rows[row]
            assert blob is not None
            d = self._make(blob)
            cache = self.cache
            if len(cache) >= self.cache_size:  # drop the older half (cheaper than an exact LRU)
                for k in list(islice(cache, max(1, self.cache_size // 2))):
                    del cache[k]
            cache[row] = d
        return d

    def devices(self) -> Iterator[Device]:
        """Every device (made anew each time: for the rare walk over all of them)."""
        for blob in self.rows:
            if blob is not None:
                yield self._make(blob)

    # -- lookups ---------------------------------------------------------------------------------
    def find(self, kind: int, key: Any) -> Device | None:
        """The device with this key of this kind."""
        if self.spill:
            row = self.spill.get((kind, key))
            if row is not None:
                return self.device(row)
        row = self.indexes[kind].get(self.hash(key))
        if row < 0:
            return None
        d = self.device(row)
        return d if device_key(kind, d) == key else None

    def _row_of(self, kind: int, key: Any) -> int:
        """The row with this key, checked against the packed row (no Device made), or -1."""
        if self.spill:
            row = self.spill.get((kind, key))
            if row is not None:
                return row
        row = self.indexes[kind].get(self.hash(key))
        if row < 0:
            return -1
        blob = self.rows[row]
        return row if blob is not None and row_keys(self.unpack(blob))[kind] == key else -1

    # -- changes ---------------------------------------------------------------------------------
    def put(self, r: Row, *, new: bool = False) -> int:
        """Add or replace the device of table row `r` (`new`: it is not here, as in a first load);
        returns its row number."""
        keys = row_keys(r)
        row = -1 if new else self._row_of(NAME, keys[0])
        if row >= 0:
            self._unindex(row)
        elif self._free:
            row = self._free.pop()
        else:
            row = len(self.rows)
            self.rows.append(None)
        self.rows[row] = self.pack(r)
        self.cache.pop(row, None)
        for kind, key in enumerate(keys):
            if key is not None:
                self._index(kind, key, row)
                self.counts[kind] += 1
        self.tenants[r[0]] += 1
        self.profiles[r[2]] += 1
        return row

    def remove(self, name: tuple[str, str]) -> bool:
        row = self._row_of(NAME, name)
        if row < 0:
            return False
        self._unindex(row)
        self.rows[row] = None
        self._free.append(row)
        self.cache.pop(row, None)
        return True

    def _unindex(self, row: int) -> None:
        """Take the keys of `row` out of the indexes (where they still lead to it)."""
        blob = self.rows[row]
        assert blob is not None
        r = self.unpack(blob)
        for kind, key in enumerate(row_keys(r)):
            if key is None:
                continue
            self.counts[kind] -= 1
            if self.spill.get((kind, key)) == row:
                del self.spill[kind, key]
                continue
            h = self.hash(key)
            index = self.indexes[kind]
            if index.get(h) == row:
                index.pop(h)
        for counter, word in ((self.tenants, r[0]), (self.profiles, r[2])):
            counter[word] -= 1
            if counter[word] <= 0:
                del counter[word]

    def _index(self, kind: int, key: Any, row: int) -> None:
        h = self.hash(key)
        index = self.indexes[kind]
        other = index.put(h, row)
        if other < 0 or other == row:
            return
        held = self.rows[other]
        if held is not None and row_keys(self.unpack(held))[kind] != key:
            # another key with the same hash: it keeps the index, this one goes aside
            index.put(h, other)
            self.spill[kind, key] = row
        # else the key moved to `row` from a device whose own change is not read yet: it is `row`'s now

    def memory(self) -> int:
        """Bytes of the rows, their list and the indexes (not the cached Device objects)."""
        rows = sum(blob.__sizeof__() for blob in self.rows if blob is not None)
        return rows + self.rows.__sizeof__() + sum(index.nbytes for index in self.indexes)
