"""Fuzz the DTLS record layer in C (corem/dtls/engine/_records.c, OpenSSL's libcrypto) against its
reference in records.py: datagrams of arbitrary bytes, and of records sealed with a fuzzer-chosen
key, content, CID and padding then mutated (bytes flipped, cut, repeated, appended), framed and opened record
by record (`parse_record_untrusted`, `open_untrusted`, `open_record_untrusted`) by both with a fuzzer-chosen replay window.  Nothing but
DtlsDecodeError leaves either; both accept and refuse the same records for the same reason, hand
out the same plaintexts and leave their windows equal; sealing is byte-identical."""

import sys

import atheris

with atheris.instrument_imports():
    from corem.dtls.engine import records as R
    from corem.dtls.engine.errors import DtlsDecodeError

from corem.dtls.engine import _records

CIPHERS = ["ccm8", "ccm", "gcm"]


def outcome(f, *args):
    try:
        return ("ok", f(*args))
    except DtlsDecodeError as e:
        return ("refused", e.alert, e.reason)


def sealed_datagram(fdp: atheris.FuzzedDataProvider, py: R.RecordProtectionPy, c: object, cid: bytes) -> bytes:
    records = []
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        ctype = fdp.PickValueInList([20, 21, 22, 23])
        epoch = fdp.ConsumeIntInRange(0, 2)
        seq = fdp.ConsumeIntInRange(0, R.SEQ_MAX) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 100)
        plain = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        padding = fdp.ConsumeIntInRange(0, 8)
        rec = py.seal(ctype, epoch, seq, plain, cid, padding)
        assert c.seal(ctype, epoch, seq, plain, cid, padding) == rec
        records.append(rec)
    d = bytearray(b"".join(records))
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        op = fdp.ConsumeIntInRange(0, 3)
        if op == 0 and d:
            d[fdp.ConsumeIntInRange(0, len(d) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
        elif op == 1:
            d = d[:fdp.ConsumeIntInRange(0, len(d))]
        elif op == 2:
            d += d[:fdp.ConsumeIntInRange(0, len(d))]
        else:
            d += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20))
    return bytes(d)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cipher = fdp.PickValueInList(CIPHERS)
    key = fdp.ConsumeBytes(16).ljust(16, b"\0")
    iv = fdp.ConsumeBytes(4).ljust(4, b"\0")
    cid = fdp.ConsumeBytes(fdp.PickValueInList([0, 0, 1, 6, 8]))
    top = fdp.ConsumeIntInRange(-1, 200) if fdp.ConsumeBool() else -1
    bits = fdp.ConsumeIntInRange(0, (1 << 64) - 1) if top >= 0 else 0
    py = R.RecordProtectionPy(cipher, key, iv)
    c = _records.Protection(cipher, key, iv)
    if fdp.ConsumeBool():
        datagram = sealed_datagram(fdp, py, c, cid)
    else:
        datagram = fdp.ConsumeBytes(fdp.remaining_bytes())
    epoch = fdp.ConsumeIntInRange(0, 2)
    wp, wc = R.ReplayWindowPy(top, bits), _records.Window(top, bits)
    offset = 0
    while offset < len(datagram):
        got_py = outcome(py.open_record_untrusted, datagram, offset, cid, wp, epoch)
        got_c = outcome(c.open_record_untrusted, datagram, offset, cid, wc, epoch)
        assert got_c == got_py, (got_c, got_py)
        assert (wc.top, wc.bits) == (wp.top, wp.bits)
        parsed_c = outcome(_records.parse_record_untrusted, datagram, offset, len(cid))
        try:
            rec, end = R.parse_record_untrusted_py(datagram, offset, len(cid))
        except DtlsDecodeError as e:
            assert parsed_c == ("refused", e.alert, e.reason)
            break
        rec_c, end_c = parsed_c[1]
        assert end_c == end and (rec_c.type, rec_c.version, rec_c.epoch, rec_c.seq, rec_c.cid, rec_c.fragment) == \
            (rec.type, rec.version, rec.epoch, rec.seq, rec.cid, rec.fragment)
        assert outcome(c.open_untrusted, rec) == outcome(py.open_untrusted, rec) == outcome(c.open_untrusted, rec_c)
        if got_c[0] == "ok":
            assert got_c[1][3] == end
        offset = end


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
