"""Device profiles: which payload decoder turns a device's bytes into readings.

A profile is named on the device in the registry.  The built-in `default` profile decodes flat
CBOR and JSON maps; users add their own with `register_profile`.
"""

from __future__ import annotations

from typing import Callable

from .payload import Readings, decode_readings

Decoder = Callable[[int | None, bytes | bytearray | memoryview], Readings]

_PROFILES: dict[str, Decoder] = {"default": decode_readings}


def register_profile(name: str, decoder: Decoder) -> None:
    """Add a profile; `decoder(content_format, payload)` returns Readings or raises PayloadError."""
    _PROFILES[name] = decoder


def get_decoder(name: str) -> Decoder:
    try:
        return _PROFILES[name]
    except KeyError:
        raise KeyError(f"profile {name!r} is not registered (known: {', '.join(sorted(_PROFILES))})") from None

