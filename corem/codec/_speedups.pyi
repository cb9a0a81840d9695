"""The C decoder (`_speedups.c`); `message.decode_py` is its reference."""

from typing import Any

from .message import Message

def decode(data: bytes | bytearray | memoryview, /) -> Message:
    """Parse one CoAP datagram (raises the configured MessageFormatError)."""

def configure(message_type: type, error_type: type, empty_payload: Any, /) -> None:
    """Tell the decoder which classes to build and raise (once, at import)."""
