"""Fuzz the CoAP decoder: C and Python decoders agree, and what decodes re-encodes byte-exact."""

import sys

import atheris

with atheris.instrument_imports():
    from corem.codec import DECODER, MessageFormatError, decode, decode_py, encode


def test_one_input(data: bytes) -> None:
    try:
        ref = decode_py(data)
    except MessageFormatError as e:
        if DECODER == "c":
            try:
                decode(data)
            except MessageFormatError as c:
                assert (c.reason, c.mid, c.mtype) == (e.reason, e.mid, e.mtype), (c.reason, e.reason)
            else:
                raise AssertionError(f"C accepted what Python refused: {e.reason}")
        return
    assert encode(ref) == data
    if DECODER == "c":
        assert decode(data) == ref
    for accessor in ("content_format", "accept", "observe", "size1", "size2", "max_age", "etags", "if_match"):
        getattr(ref, accessor)
    for accessor in ("block1", "block2"):
        try:
            getattr(ref, accessor)
        except ValueError:  # szx 7 is reserved: a refusal with a reason, not a crash
            pass
    for accessor in ("uri_path", "uri_query", "uri_host", "location_path", "proxy_uri"):
        try:
            getattr(ref, accessor)
        except UnicodeDecodeError:  # string options are bytes until asked; the router answers 4.00
            pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
