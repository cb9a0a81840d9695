"""DTLS record protection per record: corem's C record layer (corem/dtls/engine/_records.c on
the system's OpenSSL libcrypto) against its Python reference (records.py on `cryptography`) and
python-mbedtls (Mbed TLS 2.28, what CoAPS runs on today).

    python bench/dtls_records_bench.py [--records 20000] [--size 48] [--repeat 5] [--json]

Per record, best of `repeat` runs over `records` records of `size` bytes of plaintext (a CoAP
telemetry POST is ~40-60 bytes):
  - open: the receive path of an established session: framing, the replay window (check, then
    mark), the AEAD.  "C, one call" is `open_record_untrusted`; "C in today's engine path" is
    records.parse_record_untrusted, the window's `fresh`, `open_untrusted`, the window's `mark`
    (all C, called from Python: what connection.receive_record does now); "Python" is
    RecordProtectionPy.open_record_untrusted (the same steps in Python); "C core alone" is
    dtls_records.h called from C (compiled here: what the fast lane will pay); "cryptography's
    AEAD call alone" is AESCCM/AESGCM.decrypt and .encrypt with everything else precomputed (its
    OpenSSL is the one it bundles).  python-mbedtls: `receive_from_network` + `read` on the server's
    buffer of a session made in memory with its client (TLS_PSK_WITH_AES_128_CCM_8 only).
  - seal: the whole record from the plaintext (`seal`; python-mbedtls: `write` + `peek_outgoing` +
    `consume_outgoing`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
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

            aead = py.aead
            nonce, body = IV + recs[0][13 + len(cid):21 + len(cid)], recs[0][21 + len(cid):]
            extra = (R.aad_cid(cid, 1, 0, len(plain) + 1) if cid else R.aad(23, 1, 0, len(plain)))
            inner = plain + b"\x17" if cid else plain
            aead.decrypt(nonce, body, extra)

            def aead_open() -> None:
                d = aead.decrypt
                for _ in range(n):
                    d(nonce, body, extra)

            def aead_seal() -> None:
                e = aead.encrypt
                for _ in range(n):
                    e(nonce, inner, extra)

            label = f"{cipher}{' + CID' if cid else ''}"
            rows.append({"implementation": "C, one call (_records.c, " + _records.OPENSSL_VERSION.split()[1] + ")",
                         "record": label, "open_us": best(repeat, n, c_one_call),
                         "seal_us": best(repeat, n, seal_with(c))})
            rows.append({"implementation": "C, today's engine path (4 calls)", "record": label,
                         "open_us": best(repeat, n, c_engine_path), "seal_us": None})
            rows.append({"implementation": "Python reference (cryptography)", "record": label,
                         "open_us": best(repeat, n, python), "seal_us": best(repeat, n, seal_with(py))})
            rows.append({"implementation": "cryptography's AEAD call alone (no framing, no window)",
                         "record": label, "open_us": best(repeat, n, aead_open), "seal_us": best(repeat, n, aead_seal)})
    return rows


FLOOR_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "dtls_records.h"
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    int n = atoi(argv[1]), repeat = atoi(argv[3]); size_t size = (size_t)atoi(argv[2]);
    uint8_t key[16], iv[4] = {0xa0, 0xa1, 0xa2, 0xa3}, cid[6] = {0xc1, 0xd2, 0xe3, 0xf4, 0xa5, 0xb6};
    uint8_t *pt = malloc(size + 1), *out = malloc(DTLS_MAX_FRAGMENT);
    for (int i = 0; i < 16; i++) key[i] = (uint8_t)i;
    memset(pt, 'x', size);
    for (int a = 0; a < 3; a++) for (int c = 0; c < 2; c++) {
        dtls_prot s, r;
        if (dtls_prot_init(&s, a, key, iv) || dtls_prot_init(&r, a, key, iv)) return 1;
        size_t cl = c ? 6 : 0, rs = dtls_sealed_size(&s, size, cl, 0);
        uint8_t *recs = malloc(rs * (size_t)n);
        double bs = 1e9, bo = 1e9;
        for (int k = 0; k < repeat; k++) {
            double t = now();
            for (int i = 0; i < n; i++) dtls_seal(&s, 23, 1, (uint64_t)i, pt, size, cid, cl, 0, recs + rs * i);
            if (now() - t < bs) bs = now() - t;
            dtls_window w = {-1, 0};
            size_t pl; uint8_t ct; uint64_t num;
            t = now();
            for (int i = 0; i < n; i++) {
                size_t off = 0;
                if (dtls_open_record(&r, &w, recs + rs * i, rs, &off, cid, cl, 1, out, &pl, &ct, &num)) return 2;
            }
            if (now() - t < bo) bo = now() - t;
        }
        printf("%d %d %.4f %.4f\n", a, c, bo / n * 1e6, bs / n * 1e6);
        free(recs);
    }
    return 0;
}
"""


def floor_rows(n: int, size: int, repeat: int) -> list[dict]:
    """dtls_records.h from C, no Python (gcc and libssl-dev: `make sysdeps`)"""
    build = HERE / "build"
    build.mkdir(exist_ok=True)
    src, exe = build / "dtls_records_floor.c", build / "dtls_records_floor"
    src.write_text(FLOOR_C)
    try:
        subprocess.run(["gcc", "-O2", "-Wall", "-I", str(HERE.parent / "corem" / "dtls" / "engine"), "-o", str(exe),
                        str(src), "-lcrypto"], check=True)
        out = subprocess.run([str(exe), str(n), str(size), str(repeat)], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"(the C core alone was not measured: {e})", file=sys.stderr)
        return []
    rows = []
    for line in out.strip().splitlines():
        a, c, open_us, seal_us = line.split()
        rows.append({"implementation": "C core alone (dtls_records.h from C)",
                     "record": ("ccm8", "ccm", "gcm")[int(a)] + (" + CID" if c == "1" else ""),
                     "open_us": float(open_us), "seal_us": float(seal_us)})
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
    floor = {r["record"]: r for r in floor_rows(a.records, a.size, a.repeat)}
    if floor:  # (beside the rows of the same record)
        rows = [x for r in rows for x in ([r, floor[r["record"]]] if r["implementation"].startswith("crypto")
                                           else [r])]
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
