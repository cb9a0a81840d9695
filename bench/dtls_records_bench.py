"""DTLS record protection per record: corem's C record layer (corem/dtls/engine/_records.c on
the system's OpenSSL libcrypto) against its Python reference (records.py on `cryptography`) and
python-mbedtls (Mbed TLS 2.28, what CoAPS runs on today).

    python bench/dtls_records_bench.py [--records 20000] [--size 48] [--repeat 5] [--json]

Per record, best of `repeat` runs over `records` records of `size` bytes of plaintext (a CoAP
telemetry POST is ~40-60 bytes):
  - open: the receive path of an established session: framing, the replay window (check, then
    mark), the AEAD.  "C, one call" is `open_record_untrusted`; "C in today's engine path" is
    records.parse_record_untrusted (Python) then the C window and `open_untrusted`, what
    connection.receive_record does now; "Python" is RecordProtectionPy.open_record_untrusted
    (the same steps in Python).  python-mbedtls: `receive_from_network` + `read` on the server's
    buffer of a session made in memory with its client (TLS_PSK_WITH_AES_128_CCM_8 only).
  - seal: the whole record from the plaintext (`seal`; python-mbedtls: `write` + `peek_outgoing` +
    `consume_outgoing`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.table import report  # noqa: E402
from corem.dtls.engine import records as R  # noqa: E402

KEY = bytes(range(16))
IV = bytes.fromhex("a0a1a2a3")
CID = bytes.fromhex("c1d2e3f4a5b6")


def best(repeat: int, n: int, run) -> float:
    """µs per record: the best of `repeat` runs of `run()` over n records"""
    times = []
    for _ in range(repeat):
        t = time.perf_counter_ns()
        run()
        times.append(time.perf_counter_ns() - t)
    return min(times) / n / 1000


def corem_rows(n: int, size: int, repeat: int) -> list[dict]:
    from corem.dtls.engine import _records

    plain = bytes(range(size % 256)) * (size // 256) + bytes(range(size % 256))
    plain = plain[:size].ljust(size, b"x")
    rows = []
    for cipher in ("ccm8", "ccm", "gcm"):
        for cid in (b"", CID):
            ref = R.RecordProtectionPy(cipher, KEY, IV)
            recs = [ref.seal(23, 1, seq, plain, cid) for seq in range(n)]
            c = _records.Protection(cipher, KEY, IV)
            py = R.RecordProtectionPy(cipher, KEY, IV)
            parse = R.parse_record_untrusted

            def c_one_call() -> None:
                w = _records.Window()
                op = c.open_record_untrusted
                for d in recs:
                    op(d, 0, cid, w)

            def c_engine_path() -> None:
                w = _records.Window()
                for d in recs:
                    rec, _ = parse(d, 0, len(cid))
                    if w.fresh(rec.seq):
                        c.open_untrusted(rec)
                        w.mark(rec.seq)

            def python() -> None:
                w = R.ReplayWindowPy()
                op = py.open_record_untrusted
                for d in recs:
                    op(d, 0, cid, w)

            def seal_with(prot):
                def run() -> None:
                    s = prot.seal
                    for seq in range(n):
                        s(23, 1, seq, plain, cid)
                return run

            label = f"{cipher}{' + CID' if cid else ''}"
            rows.append({"implementation": "C, one call (_records.c, " + _records.OPENSSL_VERSION.split()[1] + ")",
                         "record": label, "open_us": best(repeat, n, c_one_call),
                         "seal_us": best(repeat, n, seal_with(c))})
            rows.append({"implementation": "C in today's engine path (Python framing)", "record": label,
                         "open_us": best(repeat, n, c_engine_path), "seal_us": None})
            rows.append({"implementation": "Python reference (cryptography)", "record": label,
                         "open_us": best(repeat, n, python), "seal_us": best(repeat, n, seal_with(py))})
    return rows


def mbedtls_row(n: int, size: int, repeat: int) -> dict | None:
    try:
        from mbedtls import version
        from corem.dtls import DtlsParams, DtlsServer, PskStore
        from tests.test_dtls import DEVICE, IDENTITY, PEER, Client
    except ImportError:
        return None
    srv = DtlsServer(PskStore({IDENTITY: DEVICE}.get), DtlsParams())
    client = Client()
    assert client.handshake(srv)
    buf = srv.sessions[PEER].buf
    plain = b"x" * size
    recs = []
    for _ in range(n * repeat):
        client.buf.write(plain)
        recs += client.outgoing()
    chunks = [recs[i * n:(i + 1) * n] for i in range(repeat)]

    def open_all() -> None:
        chunk = chunks.pop(0)  # (in order: the window is Mbed TLS's)
        for d in chunk:
            buf.receive_from_network(d)
            buf.read(2048)

    def seal_all() -> None:
        for _ in range(n):
            buf.write(plain)
            d = buf.peek_outgoing(4096)
            buf.consume_outgoing(len(d))

    return {"implementation": f"python-mbedtls ({version.version})", "record": "ccm8",
            "open_us": best(repeat, n, open_all), "seal_us": best(repeat, n, seal_all)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    os.environ.pop("COREM_PURE_PYTHON", None)
    rows = corem_rows(a.records, a.size, a.repeat)
    m = mbedtls_row(a.records, a.size, a.repeat)
    if m is not None:
        rows.append(m)

    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} µs"
    report(rows, [("implementation", lambda r: r["implementation"]), ("record", lambda r: r["record"]),
                  ("open (receive path)", lambda r: us(r["open_us"])), ("seal", lambda r: us(r["seal_us"]))],
           as_json=a.json, title=f"DTLS 1.2 records of {a.size} B plaintext, per record (best of {a.repeat})",
           text=(0, 1))


if __name__ == "__main__":
    main()
