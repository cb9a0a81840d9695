"""Fuzz the proto3 schema reader (a profile's `.proto`, uploaded through the admin API): any text is
a FileDescriptorProto the protobuf runtime takes, or a SchemaError naming line and column --
nothing else escapes.  Each input splices fuzzed text into one of the tests' schemas (so the
fuzzer starts inside the grammar, not at random bytes that never say `syntax`)."""

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from corem.profiles.proto_schema import SchemaError, UnknownMessage, message_class

SEEDS = [p.read_text() for p in sorted((Path(__file__).resolve().parent.parent / "tests" / "protos").glob("*.proto"))]
SEEDS.append("")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    message = ["", "A", "Outer", "Reading", "a.b.c.X"][fdp.ConsumeIntInRange(0, 4)]
    seed = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
    start = fdp.ConsumeIntInRange(0, len(seed))
    end = fdp.ConsumeIntInRange(start, len(seed))
    text = seed[:start] + fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()) + seed[end:]
    try:
        cls = message_class(text, message)
    except SchemaError as e:
        assert str(e), e  # the reader's errors name line and column; the runtime's, what it found
        return
    except UnknownMessage:
        return
    cls.FromString(b"")  # a class that decodes


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
