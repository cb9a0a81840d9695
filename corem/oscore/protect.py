"""OSCORE's message transformation (RFC 8613 §4-§6, §8), sans-IO: the OSCORE option's value, the
AAD, the plaintext (the inner message), and a request's unprotection and a response's protection.

Inner (class E) options are everything but the few a proxy needs (class U: Uri-Host, Uri-Port,
Proxy-Uri, Proxy-Scheme, Hop-Limit, OSCORE itself); Observe is both (§4.1.3.5).  No option is
class I in RFC 8613, so the AAD's option field is empty.
"""

from __future__ import annotations

from typing import NamedTuple

from ..codec import Code, Message, MessageFormatError, OptionNumber, Options, Type, decode, encode, encode_uint
from ..codec.message import OptionValue
from .context import AEAD_ALG, Context, cbor_bstr

__all__ = ["OscoreOption", "OscoreError", "aad", "parse_option", "plaintext", "inner_message",
           "protect"]

#: class U options: stay outside, unencrypted (§4.1)
OUTER_ONLY = frozenset({OptionNumber.URI_HOST, OptionNumber.URI_PORT, OptionNumber.OSCORE, OptionNumber.PROXY_URI,
                        OptionNumber.PROXY_SCHEME, OptionNumber.HOP_LIMIT})


class OscoreError(Exception):
    """A request OSCORE refuses: the code and diagnostic of §8.2's unprotected error response."""

    def __init__(self, code: int, diagnostic: str, reason: str) -> None:
        super().__init__(diagnostic)
        self.code = code
        self.diagnostic = diagnostic
        #: the metric label (corem_oscore_refused{reason})
        self.reason = reason


def bad_option(why: str) -> OscoreError:
    return OscoreError(Code.BAD_OPTION, f"oscore: {why}", "bad_option")


class OscoreOption(NamedTuple):
    """The OSCORE option's value, decompressed (§6.1)."""

    piv: bytes | None
    kid: bytes | None
    kid_context: bytes | None


def parse_option(value: OptionValue) -> OscoreOption:
    """§6.1: flags (reserved bits 0), n bytes of Partial IV, [s, kid context], kid (the rest)."""
    if not value:
        return OscoreOption(None, None, None)
    flags = value[0]
    if flags & 0xE0:
        raise bad_option("reserved flag bits set (group OSCORE is not served)")
    n, pos = flags & 7, 1
    if n > 5:
        raise bad_option(f"partial IV of {n} bytes; at most 5")
    if pos + n > len(value):
        raise bad_option("option shorter than its partial IV")
    piv = bytes(value[pos:pos + n]) if n else None
    pos += n
    kid_context = None
    if flags & 0x10:
        if pos >= len(value):
            raise bad_option("kid context length missing")
        s = value[pos]
        if pos + 1 + s > len(value):
            raise bad_option("option shorter than its kid context")
        kid_context = bytes(value[pos + 1:pos + 1 + s])
        pos += 1 + s
    kid = bytes(value[pos:]) if flags & 0x08 else None
    if kid is None and pos != len(value):
        raise bad_option("bytes after the partial IV without the kid flag")
    return OscoreOption(piv, kid, kid_context)


def option_value(piv: bytes | None) -> bytes:
    """A response's OSCORE option: empty, or corem's Partial IV (no kid: the device knows ours)."""
    return b"" if piv is None else bytes((len(piv),)) + piv


def aad(request_kid: bytes, request_piv: bytes) -> bytes:
    """The Enc_structure (§5.4): ["Encrypt0", h'', external_aad], where external_aad wraps
    [1, [alg_aead], request_kid, request_piv, h''] -- written out, it is the same for every message."""
    external = b"\x85\x01\x81" + bytes((AEAD_ALG,)) + cbor_bstr(request_kid) + cbor_bstr(request_piv) + b"\x40"
    return b"\x83\x68Encrypt0\x40" + cbor_bstr(external)


def plaintext(code: int, options: Options | None, payload: bytes) -> bytes:
    """§5.3: the code, the inner options (CoAP's encoding), and 0xFF + payload if any."""
    if not options and not payload:
        return bytes((code,))  # (the common answer: a bare 2.04)
    inner = [o for o in options or () if o[0] not in OUTER_ONLY]
    # the codec writes a 4-byte header and no token before the options; that is all there is to strip
    return bytes((code,)) + encode(Message(Type.NON, code, 0, b"", inner, payload))[4:]


def inner_message(outer: Message, plain: bytes) -> Message:
    """The request the device sealed: its code, its inner options and payload, in the outer
    message's type, message ID and token (the message layer's, untouched by OSCORE)."""
    if not plain:
        raise bad_option("empty plaintext")
    token = outer.token
    header = bytes((0x40 | outer.type << 4 | len(token), plain[0], outer.mid >> 8, outer.mid & 0xFF))
    try:
        return decode(header + token + plain[1:])  # the plaintext is a message without its header and token
    except MessageFormatError as e:
        raise bad_option(f"inner message: {e}") from None


def protect(ctx: Context, request_kid: bytes, request_piv: bytes, code: int, options: Options | None, payload: bytes,
            *, own_piv: bool, fetch: bool) -> tuple[int, Options, bytes]:
    """A response sealed: (outer code, outer options, ciphertext).  With `own_piv` the nonce is
    made from corem's next sender sequence number (Echo answers and notifications must, §7.3,
    B.1.2); otherwise from the request's, which only the first answer to a request may use."""
    observe = None
    for number, value in options or ():
        if number == OptionNumber.OBSERVE:
            observe = value
    if own_piv:
        seq = ctx.next_seq()
        piv = encode_uint(seq) or b"\x00"
        nonce = ctx.nonce(ctx.sender_id, piv)
        opt = option_value(piv)
    else:
        nonce = ctx.nonce(request_kid, request_piv)
        opt = b""
    sealed = ctx.encrypt(nonce, plaintext(code, options, payload), aad(request_kid, request_piv))
    outer: Options = [(OptionNumber.OBSERVE, observe)] if observe is not None else []
    outer.append((OptionNumber.OSCORE, opt))
    # §4.2: the answer to an outer FETCH (an Observe request) is 2.05 Content, to a POST 2.04 Changed
    return (Code.CONTENT if fetch else Code.CHANGED), outer, sealed
