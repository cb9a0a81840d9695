"""Codec hot path: corem's decode/encode against aiocoap's on the same messages, in one run.

    python bench/codec_bench.py [--json]

Prints ns per message and the ratio (aiocoap time / corem time: higher is better for corem).
Both corem decoders are measured: the C one (`decode`, when built) and the pure-Python reference.
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path

import aiocoap
import cbor2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.table import markdown  # noqa: E402
from corem.codec import DECODER, Code, Message, OptionNumber as O, Type, decode, decode_py, encode, make_options

READING = cbor2.dumps({"temperature": 22.5, "humidity": 65, "state": "running"})

MESSAGES = {
    # the spec's request: POST /telemetry over CoAPS, CBOR (68 bytes)
    "POST /telemetry (CoAPS form)": Message(
        Type.CON, Code.POST, 0x1234, b"\x01\x02\x03\x04",
        make_options([(O.URI_PATH, "telemetry"), (O.CONTENT_FORMAT, 60)]), READING,
    ),
    # the plain-CoAP token form
    "POST /api/v1/{token}/telemetry": Message(
        Type.CON, Code.POST, 0x1234, b"\x01\x02\x03\x04",
        make_options([(O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, "A1B2C3D4E5F6G7H8"),
                      (O.URI_PATH, "telemetry"), (O.CONTENT_FORMAT, 60)]), READING,
    ),
    "ACK 2.04 (piggybacked)": Message(Type.ACK, Code.CHANGED, 0x1234, b"\x01\x02\x03\x04"),
    "GET observe + block2": Message(
        Type.CON, Code.GET, 0x2222, b"\x0a\x0b",
        make_options([(O.OBSERVE, 0), (O.URI_PATH, "api"), (O.URI_PATH, "v1"), (O.URI_PATH, "tok"),
                      (O.URI_PATH, "attributes"), (O.ACCEPT, 60), (O.BLOCK2, 6)]),
    ),
}


def per_call_ns(fn, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e9


def aiocoap_outgoing(m: Message) -> aiocoap.Message:
    am = aiocoap.Message.decode(encode(m))
    out = aiocoap.Message(mtype=aiocoap.numbers.types.Type(m.type), code=m.code, mid=m.mid, token=m.token,
                          payload=bytes(m.payload))
    out.opt = am.opt
    return out


def main() -> None:
    rows = []
    for name, msg in MESSAGES.items():
        wire = encode(msg)
        assert decode(wire) == msg
        n = 100_000
        dec_c = per_call_ns(lambda: decode(wire), n)
        dec_py = per_call_ns(lambda: decode_py(wire), n)
        dec_aio = per_call_ns(lambda: aiocoap.Message.decode(wire), n // 4)
        parsed = decode(wire)
        out = aiocoap_outgoing(msg)
        enc = per_call_ns(lambda: encode(parsed), n)
        enc_aio = per_call_ns(out.encode, n // 4)
        rows.append({
            "message": name, "bytes": len(wire),
            "decode_ns": round(dec_c), "decode_py_ns": round(dec_py), "aiocoap_decode_ns": round(dec_aio),
            "decode_ratio": round(dec_aio / dec_c, 1), "decode_py_ratio": round(dec_aio / dec_py, 1),
            "encode_ns": round(enc), "aiocoap_encode_ns": round(enc_aio), "encode_ratio": round(enc_aio / enc, 1),
        })
    if "--json" in sys.argv:
        print(json.dumps({"decoder": DECODER, "rows": rows}, indent=2))
        return
    print(f"corem decoder: {DECODER} (decode_py is the pure-Python reference)\n")
    print(markdown([
        ("message", lambda r: r["message"]), ("bytes", lambda r: r["bytes"]),
        ("corem decode", lambda r: f"{r['decode_ns']} ns"), ("pure-Python decode", lambda r: f"{r['decode_py_ns']} ns"),
        ("aiocoap decode", lambda r: f"{r['aiocoap_decode_ns']} ns"),
        ("ratio (C / Py)", lambda r: f"{r['decode_ratio']}x / {r['decode_py_ratio']}x"),
        ("corem encode", lambda r: f"{r['encode_ns']} ns"), ("aiocoap encode", lambda r: f"{r['aiocoap_encode_ns']} ns"),
        ("ratio", lambda r: f"{r['encode_ratio']}x"),
    ], rows))


if __name__ == "__main__":
    main()
