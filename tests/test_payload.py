"""Payload decoders: flat CBOR/JSON maps become readings, anything else is refused whole."""

from __future__ import annotations

import json
import math

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corem.ingest.payload import CF_CBOR, CF_JSON, PayloadError, UnsupportedFormat, decode_readings


def cbor(v) -> bytes:
    return cbor2.dumps(v)


def test_spec_example_cbor_and_json_agree():
    reading = {"temperature": 22.5, "humidity": 65, "state": "running"}
    for cf, data in ((CF_CBOR, cbor(reading)), (CF_JSON, json.dumps(reading).encode())):
        r = decode_readings(cf, data)
        assert r.numeric == {"temperature": 22.5, "humidity": 65.0}
        assert r.strings == {"state": "running"}
        assert r.ts is None


def test_booleans_become_1_and_0_and_ts_is_taken():
    r = decode_readings(CF_CBOR, cbor({"on": True, "off": False, "ts": 1700000000123}))
    assert r.numeric == {"on": 1.0, "off": 0.0} and r.ts == 1700000000123


@pytest.mark.parametrize(
    "value,field,reason",
    [
        ({"a": 1, "nested": {"x": 1}}, "nested", "nested map"),
        ({"a": 1, "list": [1, 2]}, "list", "array"),
        ({"a": None}, "a", "null"),
        ({"a": b"\x00"}, "a", "byte string"),
        ({1: 2}, "1", "text strings"),
        ({"a": 1.5, "ts": "yesterday"}, "ts", "ts must be an integer"),
        ({"a": 1.5, "ts": -1}, "ts", "ts must be an integer"),
        ({"a": 1.5, "ts": 10**19}, "ts", "ts must be an integer"),
        ({"a": float("nan")}, "a", "finite"),
        ({"a": float("inf")}, "a", "finite"),
        ({"big": 10**400}, "big", "too large"),
        ({"": 1}, "", "empty"),
    ],
)
def test_offending_field_is_named(value, field, reason):
    with pytest.raises(PayloadError) as info:
        decode_readings(CF_CBOR, cbor(value))
    assert info.value.field == field
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"\xa1\x61", "invalid CBOR"),  # truncated
        (cbor({"a": 1}) + b"\x00", "trailing bytes"),
        (b"\xa2\x61a\x01\x61a\x02", "invalid CBOR"),  # duplicate key
        (cbor([1, 2]), "expected a map"),
        (cbor(5), "expected a map"),
        (cbor({}), "no readings"),
        (cbor({"ts": 5}), "only ts"),
        (cbor({"a": {"b": {"c": {"d": 1}}}}), "invalid CBOR"),  # deeper than max_depth
        (b"\xc1\x1a\x00\x00\x00\x01", "expected a map"),  # a tagged datetime
    ],
)
def test_bad_cbor(data, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_readings(CF_CBOR, data)


def test_bad_json_and_formats():
    with pytest.raises(PayloadError, match="invalid JSON"):
        decode_readings(CF_JSON, b'{"a": 1} x')
    with pytest.raises(PayloadError, match="content-format: missing"):
        decode_readings(None, cbor({"a": 1}))
    with pytest.raises(UnsupportedFormat, match="content-format 0 is not supported"):
        decode_readings(0, b"a=1")
    with pytest.raises(PayloadError, match="empty payload"):
        decode_readings(CF_CBOR, b"")


names = st.text(min_size=1, max_size=12).filter(lambda s: s != "ts")
values = st.one_of(
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=20),
)


@given(st.dictionaries(names, values, min_size=1, max_size=10))
def test_any_flat_map_round_trips(reading):
    for cf, data in ((CF_CBOR, cbor(reading)), (CF_JSON, json.dumps(reading).encode())):
        r = decode_readings(cf, data)
        assert set(r.numeric) | set(r.strings) == set(reading)
        for k, v in reading.items():
            if isinstance(v, str):
                assert r.strings[k] == v
            else:
                assert r.numeric[k] == float(v) and math.isfinite(r.numeric[k])


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_escape_as_anything_but_payload_error(data):
    for cf in (CF_CBOR, CF_JSON):
        try:
            r = decode_readings(cf, data)
        except PayloadError:
            continue
        assert r.numeric or r.strings


def test_json_that_is_not_utf8_is_a_payload_error():
    """Found by fuzz/fuzz_payload.py: msgspec raised UnicodeDecodeError, not DecodeError."""
    with pytest.raises(PayloadError, match="not UTF-8"):
        decode_readings(CF_JSON, b'"#\xc0"')
