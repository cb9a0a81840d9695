"""The keys of the DTLS sessions offloaded to the session store, held as 64-bit fingerprints.

Every datagram from an address (or CID) without a live session asks whether its session waits in
the store, so the answer must be in memory; a Python set of the keys costs ~80 bytes each (the bytes
object and its slot), most of an offloaded session's RSS (issue 27: at most 108 B an idle session).
A fingerprint is the key's Python hash (SipHash under the process's random seed: a peer cannot
choose keys that collide); two keys with the same one would cost a lookup in the store that finds
nothing, or one offloaded session forgotten (it handshakes again): at 10^6 sessions, a chance of
~10^-8.  `KeySet` is the C table (`_keyset.c`, 11-22 B a key) unless it is missing or
COREM_PURE_PYTHON is set; `KeySetPy` is its twin (a set of the fingerprints)."""

from __future__ import annotations

from typing import Iterable

from ..c_twins import c_twin


def _fingerprint(key: bytes) -> int:
    if not isinstance(key, bytes):
        raise TypeError(f"a session key is bytes, not {type(key).__name__}")
    return hash(key) or 1


class KeySetPy:
    __slots__ = ("_fps",)

    def __init__(self, iterable: Iterable[bytes] = ()) -> None:
        self._fps = {_fingerprint(k) for k in iterable}

    def add(self, key: bytes) -> None:
        self._fps.add(_fingerprint(key))

    def discard(self, key: bytes) -> None:
        self._fps.discard(_fingerprint(key))

    def update(self, keys: Iterable[bytes]) -> None:
        self._fps.update(_fingerprint(k) for k in keys)

    def difference_update(self, keys: Iterable[bytes]) -> None:
        self._fps.difference_update(_fingerprint(k) for k in keys)

    def __contains__(self, key: object) -> bool:
        return _fingerprint(key) in self._fps  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._fps)


#: _keyset.c's KeySet (the same methods: _keyset.pyi), or the twin
KeySet: type[KeySetPy] = c_twin("._keyset", "KeySet", __package__) or KeySetPy
