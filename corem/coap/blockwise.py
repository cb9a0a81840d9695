"""Block-wise responses (RFC 7959 Block2), stateless.

A 2.05 representation larger than one block is cut into blocks.  corem keeps no per-transfer state:
each block request renders the representation again and answers the slice it asks for, with an
ETag of the whole representation (so a client notices when it changed mid-transfer and restarts,
§2.4) and Size2 on the first block (§4).  The block size is the client's (Block2 in its request,
early negotiation, §2.4) or `DEFAULT_SZX`, never larger than `MAX_SZX`.
"""

from __future__ import annotations

import hashlib

from typing import TYPE_CHECKING

from ..codec import Block, Code, Message, OptionNumber, encode_uint

if TYPE_CHECKING:
    from .resources import Response

#: 1024-byte blocks unless the client asks for smaller: fits a 1280-byte IPv6 MTU with headers.
DEFAULT_SZX = 6
MAX_SZX = 6


def etag(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=8).digest()


def block2(msg: Message, response: Response) -> Response:
    """The block of `response` that `msg` asks for (or the first, if it is too large for one)."""
    if response.code != Code.CONTENT:
        return response
    payload = bytes(response.payload)
    make = type(response)
    try:
        asked = msg.block2
    except ValueError:  # szx 7 is reserved
        return make(Code.BAD_OPTION, b"block2: szx 7 is reserved")
    szx = DEFAULT_SZX if asked is None else min(asked.szx, MAX_SZX)
    size = 1 << (szx + 4)
    if asked is None:
        if len(payload) <= size:
            return response  # fits: no block-wise transfer
        offset = 0
    else:
        offset = asked.offset  # the client's offset, whatever block size it used (§2.4)
    num = offset // size
    if offset % size or (offset >= len(payload) and payload):
        return make(Code.BAD_OPTION, b"block2: no such block")
    more = offset + size < len(payload)
    options = [o for o in (response.options or []) if o[0] not in (OptionNumber.BLOCK2, OptionNumber.SIZE2,
                                                                     OptionNumber.ETAG)]
    options.append((OptionNumber.BLOCK2, encode_uint(Block(num, more, szx).to_uint())))
    options.append((OptionNumber.ETAG, etag(payload)))
    if num == 0 or msg.size2 is not None:
        options.append((OptionNumber.SIZE2, encode_uint(len(payload))))
    options.sort(key=lambda o: o[0])
    return make(Code.CONTENT, payload[offset : offset + size], options)
