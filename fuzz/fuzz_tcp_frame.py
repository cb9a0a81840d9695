"""Fuzz RFC 8323 framing (corem/coap/stream.py): any byte stream, cut anywhere, yields frames that
re-encode to exactly the bytes they were cut from, or a FrameError; nothing else escapes, and no
more than one frame's worth is ever buffered."""

import sys

import atheris

with atheris.instrument_imports():
    from corem.coap.stream import FrameError, Framer, MessageFormatError, frame, message

MAX = 512


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    framer = Framer(MAX)
    stream = b""
    rebuilt = b""
    try:
        while fdp.remaining_bytes():
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            stream += chunk
            for code, token, body in framer.feed(chunk):
                assert len(token) <= 8 and len(body) + len(token) <= MAX
                rebuilt += frame(code, token, body)
                if 1 <= code <= 31 or 64 <= code < 192:
                    try:
                        message(code, token, body)
                    except MessageFormatError:
                        pass
            assert framer.buffered <= MAX + 6 + 8
    except FrameError:
        return
    # the frames read are the stream's prefix, byte for byte (minimal length encodings only)
    if rebuilt != stream[: len(rebuilt)]:
        assert frame_lengths_not_minimal(stream), (stream, rebuilt)
    assert len(stream) - len(rebuilt) == framer.buffered


def frame_lengths_not_minimal(stream: bytes) -> bool:
    """A sender may use a longer length form than needed (e.g. 13 + 0 for length 13); the frame
    is the same message, re-encoded shorter.  True if the stream has such a frame."""
    framer, pos = Framer(1 << 20), 0
    for code, token, body in framer.feed(stream):
        b0 = stream[pos]
        ext = (0,) * 13 + (1, 2, 4)
        n = 2 + ext[b0 >> 4] + len(token) + len(body)
        if stream[pos:pos + n] != frame(code, token, body):
            return True
        pos += n
    return False


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
