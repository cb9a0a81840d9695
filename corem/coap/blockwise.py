"""Block-wise transfers (RFC 7959): Block2 responses and Block1 uploads.

A 2.05 representation larger than one block is cut into blocks, with an ETag of the whole
representation (so a client notices when it changed mid-transfer and restarts, §2.4) and Size2 on
the first block (§4).  The block size is the client's (Block2 in its request, early negotiation,
§2.4) or `DEFAULT_SZX`, never larger than `MAX_SZX`.  The later blocks are cut from the
representation its first block was cut from (`Representations`: a GET's answer, a notification),
kept a while for whoever asked: a resource whose GET takes something (the RPC poll) or whose state
moved on since a notification still gives the rest of what the client began to read.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import Any, Callable, Hashable, Iterator

from ..codec import Block, Code, Message, OptionNumber, decode_uint, encode_uint
from ..stats import Sample, counter, gauge
from .conditional import etag_of
from .peers import source_host
from .response import Response

#: 1024-byte blocks unless the client asks for smaller: fits a 1280-byte IPv6 MTU with headers.
DEFAULT_SZX = 6
MAX_SZX = 6


def requester(req: Any) -> tuple[Hashable, ...]:
    """Who asks for what, as block-wise transfers tell requests apart: the address, the device the
    security layer names (OSCORE's `identity`), the path and the query."""
    msg = req.message
    identity = req.identity
    return (req.peer, None if identity is None else (identity.tenant, identity.device), tuple(msg.uri_path),
            tuple(bytes(v) for n, v in msg.options if n == OptionNumber.URI_QUERY))


#: the largest representation kept for its later blocks: RPCs, commands and attribute values are
#: bounded well below it (16 KiB); larger ones -- a firmware package -- are read again for each
#: block, as GET may be (kept, a package of megabytes a device would cost that much each)
KEEP_MAX = 64 * 1024


class Representations:
    """Representations larger than one block, and at most KEEP_MAX, that went out as their first
    block (a GET's answer, a notification), by `requester`, for `lifetime` seconds and `max_entries`
    at most (the oldest forgotten first; ~64 MiB at most): a later Block2 request of the same
    requester is cut from what it began to read, not from a new answer of the handler.  One
    address keeps at most `max_per_peer` of them and one host `max_per_source` (its own oldest
    goes first): one device reading on and on cannot push the others' out (an adversarial run
    did with 1,001 GETs, and a device's RPC poll was then cut from the next RPC).  A key's first
    element is the requester's address (`forget` ends its entries: a new DTLS session there is
    another endpoint, maybe another device)."""

    def __init__(self, *, max_entries: int = 1000, lifetime: float = 60.0, max_per_peer: int = 8,
                 max_per_source: int = 100) -> None:
        self.max_entries = max_entries
        self.lifetime = lifetime
        self.max_per_peer = max_per_peer
        self.max_per_source = max_per_source
        self._kept: dict[tuple[Hashable, ...], tuple[float, Response]] = {}
        #: each host's and each address's keys, oldest first (dicts as ordered sets): the one to
        #: let go found at once, not by a walk over every kept representation
        self._per_source: dict[Hashable, dict[tuple[Hashable, ...], None]] = {}
        self._per_peer: dict[Hashable, dict[tuple[Hashable, ...], None]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, key: tuple[Hashable, ...], response: Response, now: float) -> None:
        kept = self._kept
        self._drop(key)  # (in the order kept: the oldest first)
        peer = key[0]
        host = source_host(peer)
        mine, hosts = self._per_peer.setdefault(peer, {}), self._per_source.setdefault(host, {})
        if len(mine) >= self.max_per_peer:  # (its own oldest makes room)
            self._drop(next(iter(mine)))
        elif len(hosts) >= self.max_per_source:
            self._drop(next(iter(hosts)))
        kept[key] = (now, response)
        self._per_peer.setdefault(peer, {})[key] = None  # (again: a drop may have let its set go)
        self._per_source.setdefault(host, {})[key] = None
        while len(kept) > self.max_entries or (kept and now - next(iter(kept.values()))[0] >= self.lifetime):
            self._drop(next(iter(kept)))

    def forget(self, peer: Hashable) -> None:
        """What `peer` began to read goes (a new session at its address: another endpoint)."""
        for key in list(self._per_peer.get(peer, ())):
            self._drop(key)

    def _drop(self, key: tuple[Hashable, ...]) -> None:
        if self._kept.pop(key, None) is not None:
            for sets, at in ((self._per_source, source_host(key[0])), (self._per_peer, key[0])):
                keys = sets[at]
                del keys[key]
                if not keys:
                    del sets[at]

    def recall(self, key: tuple[Hashable, ...], now: float) -> Response | None:
        entry = self._kept.get(key)
        if entry is None or now - entry[0] >= self.lifetime:
            return None
        return entry[1]


def worth_keeping(response: Response, asked: Block | None) -> bool:
    """A 2.05 that goes block-wise (larger than the block asked for) and is kept (`KEEP_MAX`)."""
    szx = DEFAULT_SZX if asked is None else min(asked.szx, MAX_SZX)
    return response.code == Code.CONTENT and 1 << (szx + 4) < len(response.payload) <= KEEP_MAX


def first_block(response: Response) -> Response:
    """What a notification carries of `response`: all of it, or its first block (with ETag and
    Size2) if it is a 2.05 larger than one block of the default size."""
    return _block(response, None, False) if response.code == Code.CONTENT else response


def block2(msg: Message, response: Response) -> Response:
    """The block of `response` that `msg` asks for (or the first, if it is too large for one)."""
    if response.code != Code.CONTENT:
        return response
    try:
        asked = msg.block2
    except ValueError:  # szx 7 is reserved
        return type(response)(Code.BAD_OPTION, b"block2: szx 7 is reserved")
    return _block(response, asked, msg.size2 is not None)


def fitted(response: Response, fits: Callable[[Response], bool]) -> Response | None:
    """`response` as it goes to a peer whose address is not verified, where a message may be only
    so large (`fits`: corem/coap/endpoint.py's AMPLIFICATION_FACTOR times a request): as it is if
    it fits; else, a 2.05, as the largest Block2 block that fits -- block 0 of the whole
    representation with its ETag and Size2, as `_block` cuts it, or, when `response` is a block
    already (it carries Block2: `block2` cut it), a smaller block at the same offset, its ETag and
    Size2 as they are; None when not even a 16-byte block fits, or for another code (a POST's 2.04
    cannot go on block-wise: the router serves the later blocks of a GET only).  What the peer
    reads next is its own Block2 request, cut from the same representation (`Representations`)."""
    if fits(response):
        return response
    if response.code != Code.CONTENT:
        return None
    length = len(response.payload)
    given = next((bytes(v) for n, v in response.options or () if n == OptionNumber.BLOCK2), None)
    within = None if given is None else Block.from_uint(decode_uint(given))
    for szx in range(MAX_SZX if within is None else within.szx, -1, -1):
        if 1 << (szx + 4) >= length:
            continue  # (no smaller than what did not fit)
        if within is None:
            piece = _block(response, Block(0, True, szx), False)
        else:
            piece = _smaller(response, within, szx)
        if fits(piece):
            return piece
    return None


def _smaller(response: Response, block: Block, szx: int) -> Response:
    """A block of size exponent `szx` (smaller than `block`'s) at the offset of `block`, which
    `response` carries: the same representation, so the same ETag and Size2."""
    options = [o for o in response.options or () if o[0] != OptionNumber.BLOCK2]
    num = block.num << (block.szx - szx)
    options.append((OptionNumber.BLOCK2, encode_uint(Block(num, True, szx).to_uint())))
    options.sort(key=lambda o: o[0])
    return type(response)(response.code, bytes(response.payload[: 1 << (szx + 4)]), options)


def _block(response: Response, asked: Block | None, size2_asked: bool) -> Response:
    """The block `asked` of a 2.05 (None: the first, and only if it does not fit in one)."""
    payload = bytes(response.payload)
    make = type(response)
    szx = DEFAULT_SZX if asked is None else min(asked.szx, MAX_SZX)
    size = 1 << (szx + 4)
    if asked is None:
        if len(payload) <= size:
            return response  # fits: no block-wise transfer
        offset = 0
    else:
        offset = asked.offset  # the client's offset, whatever block size it used (§2.4)
    num = offset // size
    if offset % size or (offset and offset >= len(payload)):  # (an empty 2.05 has a block 0 only)
        return make(Code.BAD_OPTION, b"block2: no such block")
    more = offset + size < len(payload)
    options = [o for o in (response.options or []) if o[0] not in (OptionNumber.BLOCK2, OptionNumber.SIZE2,
                                                                     OptionNumber.ETAG)]
    options.append((OptionNumber.BLOCK2, encode_uint(Block(num, more, szx).to_uint())))
    # the handler's own ETag if it gave one (what If-Match compares), else the one corem gives it
    options.append((OptionNumber.ETAG, etag_of(response)))
    if num == 0 or size2_asked:
        options.append((OptionNumber.SIZE2, encode_uint(len(payload))))
    options.sort(key=lambda o: o[0])
    return make(Code.CONTENT, payload[offset : offset + size], options)


#: Largest upload reassembled from Block1 blocks (bytes); beyond it: 4.13 with Size1.
MAX_BODY = 64 * 1024


class Assembly:
    __slots__ = ("parts", "size", "szx", "started", "content_format", "source")

    def __init__(self, szx: int, now: float, content_format: bytes | None, source: Hashable) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.szx = szx
        self.started = now
        self.content_format = content_format
        self.source = source


class Upload(enum.Enum):
    """What one Block1 request did to its upload (`Block1Uploads.receive`)."""

    #: no Block1 option: not an upload
    NONE = "none"
    #: an intermediate block, taken: answer 2.31 Continue
    CONTINUE = "continue"
    #: a bad block (out of order, too large, too many uploads): answer the error, the upload is gone
    REFUSED = "refused"
    #: the last block completed the body
    COMPLETE = "complete"


class Block1Uploads:
    """Reassembles Block1 uploads (RFC 7959 §2.5), bounded in count, size and lifetime.

    `receive(key, msg, now)` returns `(Upload.CONTINUE, response)` for an intermediate block,
    `(Upload.REFUSED, response)` for a bad one, `(Upload.COMPLETE, body)` when the last block
    completed the body, or `(Upload.NONE, None)` for a request without Block1.  Blocks must come
    in order (atomic upload); a block 0 restarts the transfer.  One source (`receive`'s: the
    requester's host) holds at most `max_per_source` of them: the blocks before the last are taken
    before any handler authenticates the request, so the bound is by where they come from.
    """

    def __init__(self, *, max_transfers: int = 1000, max_body: int = MAX_BODY, lifetime: float = 60.0,
                 max_per_source: int = 32) -> None:
        self.max_transfers = max_transfers
        self.max_body = max_body
        self.lifetime = lifetime
        self.max_per_source = max_per_source
        #: in the order they started (a block 0 that restarts one moves it to the end: `_expire`)
        self._transfers: dict[tuple[object, ...], Assembly] = {}
        self._per_source: Counter[Hashable] = Counter()
        self.refused = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._transfers)

    def metrics(self) -> Iterator[Sample]:
        yield gauge("corem_coap_uploads", len(self._transfers))
        yield counter("corem_coap_uploads_refused", self.refused)
        yield counter("corem_coap_uploads_expired", self.expired)

    def receive(self, key: tuple[object, ...], msg: Message, now: float,
                source: Hashable = None) -> tuple[Upload, Response | bytes | None]:
        make = Response
        try:
            block = msg.block1
        except ValueError:
            return Upload.REFUSED, make(Code.BAD_OPTION, b"block1: szx 7 is reserved")
        if block is None:
            return Upload.NONE, None
        self._expire(now)
        transfers = self._transfers
        size1 = msg.size1
        if size1 is not None and size1 > self.max_body or block.offset + len(msg.payload) > self.max_body:
            self._drop(key)
            self.refused += 1
            return Upload.REFUSED, make(Code.REQUEST_ENTITY_TOO_LARGE, b"",
                                 [(OptionNumber.SIZE1, encode_uint(self.max_body))])
        cf = msg.opt(OptionNumber.CONTENT_FORMAT)
        if block.num == 0:
            self._drop(key)  # (a restart: the upload starts again, at the end of the line to expire)
            if len(transfers) >= self.max_transfers or self._per_source[source] >= self.max_per_source:
                self.refused += 1
                return Upload.REFUSED, make(Code.SERVICE_UNAVAILABLE, b"too many uploads in progress",
                                     [(OptionNumber.MAX_AGE, encode_uint(5))])
            transfers[key] = Assembly(block.szx, now, None if cf is None else bytes(cf), source)
            self._per_source[source] += 1
        assembly = transfers.get(key)
        if assembly is None or block.offset != assembly.size or (block.more and len(msg.payload) != block.size):
            self._drop(key)
            self.refused += 1
            return Upload.REFUSED, make(Code.REQUEST_ENTITY_INCOMPLETE, b"block1: blocks out of order or missing")
        if len(msg.payload) > block.size:  # (a last block may be smaller than its size, not larger: RFC 7959 §2.2)
            self._drop(key)
            self.refused += 1
            return Upload.REFUSED, make(Code.BAD_REQUEST, b"block1: the last block is larger than its size")
        assembly.parts.append(bytes(msg.payload))
        assembly.size += len(msg.payload)
        if block.more:
            return Upload.CONTINUE, make(Code.CONTINUE, b"", [(OptionNumber.BLOCK1, encode_uint(block.to_uint()))])
        self._drop(key)
        return Upload.COMPLETE, b"".join(assembly.parts)

    def forget(self, peer: Hashable) -> None:
        """`peer`'s uploads go (a new DTLS session at its address: another endpoint, maybe another
        device, must not finish them).  Their keys begin with the requester's address (`requester`)."""
        if self._per_source.get(source_host(peer)):
            for key in [k for k in self._transfers if k[0] == peer]:
                self._drop(key)

    def _drop(self, key: tuple[object, ...]) -> None:
        assembly = self._transfers.pop(key, None)
        if assembly is not None:
            left = self._per_source[assembly.source] - 1
            if left:
                self._per_source[assembly.source] = left
            else:
                del self._per_source[assembly.source]

    def _expire(self, now: float) -> None:
        transfers = self._transfers
        while transfers:
            key, assembly = next(iter(transfers.items()))
            if now - assembly.started < self.lifetime:
                break
            self._drop(key)
            self.expired += 1
