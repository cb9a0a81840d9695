"""corem's CoAP codec: bytes <-> Message, zero-copy, no I/O (RFC 7252 §3)."""

from .message import (
    DECODER,
    Code,
    Message,
    MessageFormatError,
    Options,
    Type,
    code_str,
    decode,
    decode_py,
    encode,
    is_request,
    is_response,
    make_options,
)
from .options import Block, Format, OptionNumber, decode_uint, encode_uint, is_critical, is_unsafe

__all__ = [
    "DECODER",
    "Block",
    "Code",
    "Format",
    "Message",
    "MessageFormatError",
    "OptionNumber",
    "Options",
    "Type",
    "code_str",
    "decode",
    "decode_py",
    "decode_uint",
    "encode",
    "encode_uint",
    "is_critical",
    "is_request",
    "is_response",
    "is_unsafe",
    "make_options",
]
