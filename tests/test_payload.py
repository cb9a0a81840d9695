"""Payload decoders: flat CBOR/JSON maps become readings, anything else is refused whole."""

from __future__ import annotations

import json
import math

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corem.profiles.payload import (
    CF_CBOR, CF_JSON, PayloadError, UnsupportedFormat, decode_readings, is_corem_reason,
)


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
    assert is_corem_reason(info.value.reason), info.value.reason


@pytest.mark.parametrize(
    "cf,data,reason",
    [
        (CF_CBOR, b"\xa1\x61", "invalid CBOR: the data ends before the value is complete"),
        (CF_CBOR, cbor({"a": 1}) + b"\x00", "invalid CBOR: 1 trailing bytes after the map"),
        (CF_CBOR, b"\xa2\x61a\x01\x61a\x02", "invalid CBOR: a map repeats a key"),
        (CF_CBOR, cbor({"a": {"b": {"c": {"d": 1}}}}), "invalid CBOR: nested deeper than 3 maps or arrays"),
        (CF_CBOR, b"\xff", "invalid CBOR: not well-formed"),  # a break code where an item belongs
        (CF_CBOR, b"\xa1\x61a\xf8\x10", "invalid CBOR: not well-formed"),  # a two-byte simple value < 32
        (CF_CBOR, cbor([1, 2]), "expected a map of metric -> value, got array"),
        (CF_CBOR, cbor(5), "expected a map of metric -> value, got integer"),
        (CF_CBOR, cbor({}), "the map has no readings"),
        (CF_CBOR, cbor({"ts": 5}), "the map has no readings, only ts"),
        (CF_CBOR, b"\xc1\x1a\x00\x00\x00\x01", "expected a map of metric -> value, got CBOR tag"),  # a datetime
        (CF_CBOR, cbor({"a": cbor2.CBORTag(4000, 1)}), "CBOR tag values are not allowed; send numbers, booleans or text"),
        (CF_CBOR, cbor({"a": cbor2.CBORSimpleValue(99)}), "CBOR simple values are not allowed; send numbers, booleans or text"),
        (CF_JSON, b'{"a": 1} x', "invalid JSON: not well-formed at byte 9"),
        (CF_JSON, b'{"a":', "invalid JSON: not well-formed at byte 5"),
        (CF_JSON, b'{"\xc3\xa9":1,}', "invalid JSON: not well-formed at byte 8"),  # bytes, not characters
        (CF_JSON, b'"#\xc0"', "invalid JSON: text is not UTF-8 at byte 2"),  # fuzz_payload found this one
        (CF_JSON, b'{"a": NaN}', "invalid JSON: NaN and Infinity are not JSON numbers"),
        (CF_JSON, b'{"a": 1e999}', "invalid JSON: a number is out of range"),
        (CF_JSON, b"[" * 3000 + b"]" * 3000, "invalid JSON: nested too deep"),  # (msgspec's recursion: was a 5.00)
        (None, cbor({"a": 1}), "content-format: missing; send application/cbor (60) or application/json (50)"),
        (CF_CBOR, b"", "empty payload"),
    ],
)
def test_refusals_are_in_corems_words(cf, data, reason):
    """The exact reason, whichever cbor2 or msgspec is installed: their messages change between
    releases (msgspec 0.23 reworded its UTF-8 error), corem's do not."""
    with pytest.raises(PayloadError) as info:
        decode_readings(cf, data)
    assert info.value.reason == reason
    assert is_corem_reason(reason)


def test_unsupported_format():
    with pytest.raises(UnsupportedFormat) as info:
        decode_readings(0, b"a=1")
    assert info.value.reason.startswith("content-format 0 is not supported") and is_corem_reason(info.value.reason)


def test_a_reason_that_is_not_corems_is_caught():
    assert not is_corem_reason("JSON is malformed: trailing characters (byte 10)")
    assert not is_corem_reason("invalid CBOR: premature end of stream")


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
        except PayloadError as e:
            assert is_corem_reason(e.reason), e.reason
            continue
        assert r.numeric or r.strings
