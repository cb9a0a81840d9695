"""Fuzz the payload decoders (CBOR, JSON): nothing but PayloadError escapes, every refusal is in
corem's own words (never cbor2's or msgspec's), accepted readings are flat."""

import math
import sys

import atheris

with atheris.instrument_imports():
    from corem.profiles.payload import CF_CBOR, CF_JSON, PayloadError, decode_readings, is_corem_reason


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cf = CF_CBOR if fdp.ConsumeBool() else CF_JSON
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        r = decode_readings(cf, body)
    except PayloadError as e:
        assert is_corem_reason(e.reason), e.reason
        return
    assert r.numeric or r.strings
    assert all(type(k) is str and type(v) is float and math.isfinite(v) for k, v in r.numeric.items())
    assert all(type(k) is str and type(v) is str for k, v in r.strings.items())


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
