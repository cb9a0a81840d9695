"""The DTLS record layer in C (corem/dtls/engine/_records.c on OpenSSL's libcrypto) against its
reference in records.py (`RecordProtectionPy`, `ReplayWindowPy`, on `cryptography`): the same
records byte for byte, the same framing, the same accept/refuse decisions with the same reasons
(the replay window, CID layouts, tampered records, lengths and limits), and sequence number
exhaustion."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM
from hypothesis import given, settings, strategies as st

from corem.dtls.engine import records as R
from corem.dtls.engine.errors import DtlsDecodeError

_records = pytest.importorskip("corem.dtls.engine._records", reason="the C record layer is not built")

CIPHERS = ["ccm8", "ccm", "gcm"]
KEY = bytes(range(16))
IV = bytes.fromhex("a0a1a2a3")
SEQ = st.integers(0, R.SEQ_MAX)
CID = st.sampled_from([b"", b"\x01", bytes(range(6)), bytes(range(20))])


def pair(cipher: str, key: bytes = KEY, iv: bytes = IV) -> tuple[object, R.RecordProtectionPy]:
    return _records.Protection(cipher, key, iv), R.RecordProtectionPy(cipher, key, iv)


def outcome(f, *args):
    """what a call returned, or the refusal it raised (alert, reason)"""
    try:
        return ("ok", f(*args))
    except DtlsDecodeError as e:
        return ("refused", e.alert, e.reason)


def test_the_c_layer_is_the_default_and_uses_the_systems_libcrypto():
    assert R.RECORDS == "c" and R.RecordProtection is _records.Protection and R.ReplayWindow is _records.Window
    assert R.Record is _records.Record and R.parse_record_untrusted is _records.parse_record_untrusted
    assert _records.OPENSSL_VERSION.startswith("OpenSSL 3.")


def fields(rec):
    return (rec.type, rec.version, rec.epoch, rec.seq, rec.cid, rec.fragment, rec.number)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 130), st.sampled_from([0, 1, 6, 20]), st.data())
def test_parsers_agree(data, offset, cid_length, draw):
    """the C framing against parse_record_untrusted_py, on arbitrary bytes and on real records"""
    if draw.draw(st.booleans()):
        cid = bytes(range(cid_length))
        prot = R.RecordProtectionPy(draw.draw(st.sampled_from(CIPHERS)), KEY, IV)
        data = data[:offset] + prot.seal(draw.draw(st.sampled_from([20, 21, 22, 23])), draw.draw(st.integers(0, 3)),
                                         draw.draw(SEQ), data, cid) + data
        offset = min(offset, len(data))
    got_c = outcome(_records.parse_record_untrusted, data, offset, cid_length)
    got_py = outcome(R.parse_record_untrusted_py, data, offset, cid_length)
    if got_c[0] == "ok":
        assert got_py[0] == "ok" and fields(got_c[1][0]) == fields(got_py[1][0]) and got_c[1][1] == got_py[1][1]
        rec_c, rec_py = got_c[1][0], got_py[1][0]
        for cipher in CIPHERS:
            c, py = pair(cipher)
            assert outcome(c.open_untrusted, rec_c) == outcome(c.open_untrusted, rec_py) == \
                outcome(py.open_untrusted, rec_py)
    else:
        assert got_c == got_py


def test_records_of_either_kind_are_alike():
    rec = _records.Record(25, 0xFEFD, 1, 9, b"\x01", b"frag")
    ref = R.RecordPy(25, 0xFEFD, 1, 9, b"\x01", b"frag")
    assert fields(rec) == fields(ref) and repr(rec) == repr(ref)
    rec.seq = 10
    assert rec.number == 1 << 48 | 10


def test_pure_python_switch():
    code = "from corem.dtls.engine import records as R; print(R.RECORDS, R.RecordProtection.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "COREM_PURE_PYTHON": "1"}).stdout.split()
    assert out == ["python", "RecordProtectionPy"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(CIPHERS), st.binary(min_size=16, max_size=16), st.binary(min_size=4, max_size=4),
       st.sampled_from([20, 21, 22, 23]), st.integers(0, 0xFFFF), SEQ, st.binary(max_size=300), CID,
       st.integers(0, 40))
def test_seal_is_byte_identical_and_both_open_it(cipher, key, iv, ctype, epoch, seq, plaintext, cid, padding):
    c, py = pair(cipher, key, iv)
    sealed = c.seal(ctype, epoch, seq, plaintext, cid, padding)
    assert sealed == py.seal(ctype, epoch, seq, plaintext, cid, padding)
    rec, end = R.parse_record_untrusted(sealed, 0, len(cid))
    assert end == len(sealed)
    assert c.open_untrusted(rec) == py.open_untrusted(rec) == (ctype, plaintext)
    # and the same protection object seals again after opening (one context, keyed per direction)
    assert c.seal(ctype, epoch, seq, plaintext, cid, padding) == sealed
    assert (c.iv, c.tag, c.overhead) == (py.iv, py.tag, py.overhead)


def test_against_cryptography_directly():
    """(independent of records.py: the AEAD's own output for RFC 5246's additional data)"""
    for cipher, aead in [("ccm8", AESCCM(KEY, 8)), ("ccm", AESCCM(KEY, 16)), ("gcm", AESGCM(KEY))]:
        c = _records.Protection(cipher, KEY, IV)
        rec = c.seal(23, 1, 5, b"x" * 50)
        explicit = rec[13:21]
        additional = explicit + b"\x17\xfe\xfd" + (50).to_bytes(2, "big")
        assert aead.decrypt(IV + explicit, rec[21:], additional) == b"x" * 50


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(CIPHERS), CID, st.integers(0, 3), SEQ, st.binary(max_size=100), st.integers(0, 8),
       st.data())
def test_tampered_records_are_refused_by_both_alike(cipher, cid, epoch, seq, plaintext, padding, data):
    c, py = pair(cipher)
    sealed = bytearray(py.seal(23, epoch, seq, plaintext, cid, padding))
    i = data.draw(st.integers(0, len(sealed) - 1))
    sealed[i] ^= data.draw(st.integers(1, 255))
    tampered = bytes(sealed)
    wc, wp = _records.Window(), R.ReplayWindowPy()
    got_c = outcome(c.open_record_untrusted, tampered, 0, cid, wc, epoch)
    got_py = outcome(py.open_record_untrusted, tampered, 0, cid, wp, epoch)
    assert got_c == got_py
    assert got_c[0] == "refused" or (i in (1, 2) and got_c[1][2] >> 48 == epoch)  # (only the version may vary)
    assert (wc.top, wc.bits) == (wp.top, wp.bits)
    try:
        rec, _ = R.parse_record_untrusted_py(tampered, 0, len(cid))
    except DtlsDecodeError:
        return
    assert outcome(c.open_untrusted, rec) == outcome(py.open_untrusted, rec)
    rec_c, _ = _records.parse_record_untrusted(tampered, 0, len(cid))
    assert outcome(c.open_untrusted, rec_c) == outcome(py.open_untrusted, rec)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CIPHERS), CID, st.lists(st.tuples(st.integers(0, 200), st.booleans(), st.integers(0, 2)),
                                              max_size=60))
def test_a_stream_of_records_through_both_windows(cipher, cid, stream):
    """Records out of order, repeated, forged, of another epoch, with and without the CID:
    the same results, and the windows always equal."""
    c, py = pair(cipher)
    sender = R.RecordProtectionPy(cipher, KEY, IV)
    wc, wp = _records.Window(), R.ReplayWindowPy()
    for seq, forge, epoch in stream:
        rec = bytearray(sender.seal(23, epoch or 1, seq, seq.to_bytes(2, "big"), cid))
        if forge:
            rec[-1] ^= 1
        datagram = b"\x00" * 3 + bytes(rec) + b"tail"
        got_c = outcome(c.open_record_untrusted, datagram, 3, cid, wc, 1 if epoch else 2)
        got_py = outcome(py.open_record_untrusted, datagram, 3, cid, wp, 1 if epoch else 2)
        assert got_c == got_py
        if got_c[0] == "ok":
            assert got_c[1] == (23, seq.to_bytes(2, "big"), 1 << 48 | seq, 3 + len(rec))
        assert (wc.top, wc.bits) == (wp.top, wp.bits)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CIPHERS), st.lists(st.tuples(st.sampled_from(["seal", "seal_next", "open", "forged"]),
                                                    st.sampled_from([b"", bytes(range(6))]), st.binary(max_size=60)),
                                          max_size=40))
def test_one_protection_used_every_way_stays_the_twin_of_python(cipher, steps):
    """One C protection sealing and opening, with and without a CID, in any order: CCM records
    without a CID go through OpenSSL's TLS record mode and the others through the general calls,
    each switch making its context again -- always the records and plaintexts of the Python twin,
    and a datagram it refuses is left as it came (the lane hands it on to the engine)."""
    c, py = pair(cipher)
    c.next_seq = py_next = 7
    for i, (op, cid, text) in enumerate(steps):
        if op == "seal":
            assert c.seal(23, 1, 100 + i, text, cid) == py.seal(23, 1, 100 + i, text, cid)
        elif op == "seal_next":
            assert c.seal_next(23, text, cid) == py.seal(23, 1, py_next, text, cid)
            py_next += 1
        else:
            sealed = bytearray(py.seal(23, 1, 100 + i, text, cid))
            if op == "forged":
                sealed[-1] ^= 1
            before = bytes(sealed)
            wc, wp = _records.Window(), R.ReplayWindowPy()
            assert outcome(c.open_record_untrusted, sealed, 0, cid, wc) == \
                outcome(py.open_record_untrusted, before, 0, cid, wp)
            assert bytes(sealed) == before and (wc.top, wc.bits) == (wp.top, wp.bits)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(CIPHERS), CID, st.binary(max_size=120), st.integers(0, 130), st.integers(-1, 300),
       st.integers(0, (1 << 64) - 1))
def test_arbitrary_bytes_same_decision(cipher, cid, data, offset, top, bits):
    c, py = pair(cipher)
    wc, wp = _records.Window(top, bits), R.ReplayWindowPy(top, bits)
    assert outcome(c.open_record_untrusted, data, offset, cid, wc) == \
        outcome(py.open_record_untrusted, data, offset, cid, wp)
    assert (wc.top, wc.bits) == (wp.top, wp.bits)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 400), max_size=200), st.integers(-1, 100), st.integers(0, (1 << 64) - 1))
def test_windows_agree(seqs, top, bits):
    wc, wp = _records.Window(top, bits), R.ReplayWindowPy(top, bits)
    for s in seqs:
        assert wc.fresh(s) == wp.fresh(s)
        if wp.fresh(s):
            wc.mark(s)
            wp.mark(s)
        assert (wc.top, wc.bits) == (wp.top, wp.bits)


def test_window_far_jump_and_state_round_trip():
    w = _records.Window()
    w.mark(R.SEQ_MAX)
    assert (w.top, w.bits) == (R.SEQ_MAX, 1) and not w.fresh(R.SEQ_MAX) and w.fresh(R.SEQ_MAX - 1)
    assert not w.fresh(R.SEQ_MAX - 64)
    w2 = _records.Window(w.top, w.bits)
    assert (w2.top, w2.bits) == (w.top, w.bits)
    w2.top, w2.bits = 5, 0b11
    assert not w2.fresh(4) and w2.fresh(3)
    with pytest.raises(OverflowError):
        _records.Window(0, 1 << 64)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_sequence_number_exhaustion_and_limits(cipher):
    c, py = pair(cipher)
    assert c.seal(23, 1, R.SEQ_MAX, b"last") == py.seal(23, 1, R.SEQ_MAX, b"last")
    for impl in (c, py):
        with pytest.raises(OverflowError):
            impl.seal(23, 1, R.SEQ_MAX + 1, b"one too many")
        with pytest.raises(OverflowError):
            impl.seal(23, 1, -1, b"")
        with pytest.raises(ValueError):
            impl.seal(23, 1, 0, bytes(R.MAX_PLAINTEXT + 1))
        with pytest.raises(ValueError):
            impl.seal(23, 1, 0, b"", b"\x01", R.MAX_FRAGMENT)  # (padding past the fragment limit)
        with pytest.raises(ValueError):
            impl.seal(23, 1, 0, b"", bytes(256))
        with pytest.raises(ValueError):
            impl.seal(23, 1, 0, b"", b"\x01", -1)
    big = c.seal(23, 1, 0, bytes(R.MAX_PLAINTEXT), bytes(6), 100)
    assert big == py.seal(23, 1, 0, bytes(R.MAX_PLAINTEXT), bytes(6), 100)
    assert c.open_record_untrusted(big, 0, bytes(6), _records.Window())[1] == bytes(R.MAX_PLAINTEXT)
    # a record that says it is longer than DTLS allows is refused before any crypto
    over = b"\x17\xfe\xfd\x00\x01" + bytes(6) + (R.MAX_FRAGMENT + 1).to_bytes(2, "big") + bytes(R.MAX_FRAGMENT + 1)
    w = _records.Window()
    assert outcome(c.open_record_untrusted, over, 0, b"", w) == ("refused", 22, "record_overflow")
    assert outcome(c.open_untrusted, R.Record(23, 0xFEFD, 1, 0, b"", bytes(R.MAX_FRAGMENT + 1))) == \
        outcome(py.open_untrusted, R.Record(23, 0xFEFD, 1, 0, b"", bytes(R.MAX_FRAGMENT + 1))) == \
        ("refused", 22, "record_overflow")
    for n in range(0, 8 + c.tag):
        rec = R.Record(23, 0xFEFD, 1, 0, b"", bytes(n))
        assert outcome(c.open_untrusted, rec) == outcome(py.open_untrusted, rec) == \
            ("refused", 20, "record_too_short")


def test_bad_arguments_are_python_errors_not_refusals():
    with pytest.raises(ValueError):
        _records.Protection("chacha", KEY, IV)
    with pytest.raises(ValueError):
        _records.Protection("ccm8", KEY[:15], IV)
    c = _records.Protection("ccm8", KEY, IV)
    with pytest.raises(TypeError):
        c.open_record_untrusted(b"", 0, b"", R.ReplayWindowPy())
    for args, kwargs in [((23, 1, 0), {}), ((23, 1, 0, b""), {"cid": b"", "colour": 1}),
                         ((23, 1, 0, b"", b""), {"cid": b""}), (("23", 1, 0, b""), {})]:
        with pytest.raises(TypeError):
            c.seal(*args, **kwargs)
    assert c.seal(plaintext=b"p", seq=3, epoch=1, ctype=23, padding=2, cid=b"\x01") == \
        R.RecordProtectionPy("ccm8", KEY, IV).seal(23, 1, 3, b"p", b"\x01", 2)
    with pytest.raises(ValueError):
        c.open_record_untrusted(b"", -1, b"", _records.Window())
    assert outcome(c.open_record_untrusted, b"\x17", 5, b"", _records.Window()) == \
        ("refused", 50, "record_truncated")


def test_inner_plaintext_without_a_content_type_is_refused_alike():
    """A CID record that authenticates but whose DTLSInnerPlaintext is all zeros, or ends in an
    unknown type: both say inner_content_type."""
    cid = bytes(range(6))
    for inner in (b"", b"\x00\x00\x00", b"data\x63\x00"):
        explicit = (1).to_bytes(2, "big") + (4).to_bytes(6, "big")
        extra = R.aad_cid(cid, 1, 4, len(inner))
        body = explicit + AESCCM(KEY, 8).encrypt(IV + explicit, inner, extra)
        rec = bytes([25]) + b"\xfe\xfd" + explicit + cid + len(body).to_bytes(2, "big") + body
        c, py = pair("ccm8")
        got = outcome(c.open_record_untrusted, rec, 0, cid, _records.Window())
        assert got == outcome(py.open_record_untrusted, rec, 0, cid, R.ReplayWindowPy()) == \
            ("refused", 10, "inner_content_type")


@pytest.mark.parametrize("cipher", CIPHERS)
def test_seal_next_numbers_its_own_records_up_to_the_limit_alike(cipher):
    """A write protection carries its sequence numbers (issue 27: one counter for the Connection
    and the fast lane): seal_next seals at next_seq and counts it, returns None at `limit` (nothing
    consumed; the limit is at most 2^48, so 2^48 - 1 is the last number sealed, and past it
    OverflowError says the numbers are exhausted); the same in C and in Python."""
    for p in pair(cipher):
        assert (p.next_seq, p.limit) == (0, R.SEQ_MAX)
        p.next_seq, p.limit = 5, 7
        records = [p.seal_next(23, b"reading", b"\x01\x02\x03") for _ in range(3)]
        assert records[2] is None and p.next_seq == 7
        assert [R.parse_record_untrusted(r, 0, 3)[0].seq for r in records[:2]] == [5, 6]
        other = type(p)(cipher, KEY, IV)
        assert records[0] == other.seal(23, 1, 5, b"reading", b"\x01\x02\x03")  # byte for byte
        p.limit = R.SEQ_MAX + 1
        p.next_seq = R.SEQ_MAX
        assert R.parse_record_untrusted(p.seal_next(21, b"\x01\x00"), 0, 0)[0].seq == R.SEQ_MAX
        with pytest.raises(OverflowError):  # exhausted, not "reserved": no new reservation helps
            p.seal_next(23, b"one too many")
        assert p.next_seq == R.SEQ_MAX + 1
    c = _records.Protection(cipher, KEY, IV)
    with pytest.raises((OverflowError, ValueError)):
        c.next_seq = -1
    with pytest.raises(OverflowError):
        c.limit = R.SEQ_MAX + 2


def test_the_lane_api_capsule_is_exported():
    assert type(_records._LANE_API).__name__ == "PyCapsule"
    assert "corem.dtls.engine._records._LANE_API" in repr(_records._LANE_API)
