"""Fuzz the fast lane (corem/fastlane/_lane.c) against the Python path: the fuzzer's bytes become a
sequence of datagrams (a telemetry POST template it mutates, or raw bytes), bus verdicts, clock
steps and new DTLS sessions, fed to the lane in front of the Python path and to the Python path
alone.  Both must store and answer the same, and nothing may escape.  (Eviction under the dedup
bound is tested in tests/test_fastlane.py: the lane also remembers datagrams the codec then
refuses, so the two fill their bounds at different rates.)"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from corem.codec import Code, Message, Type, encode
    from corem.codec import OptionNumber as O
    from tests.lane_twin import Twin

TWIN = Twin()
TEMPLATE = encode(Message(Type.CON, Code.POST, 0x1234, b"\x01\x02",
                          [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, b"T1"), (O.URI_PATH, b"telemetry"),
                           (O.CONTENT_FORMAT, b"\x3c")],
                          b"\xa3\x61a\xf9\x3e\x00\x61b\x18\x2a\x62ts\x1b\x00\x00\x01\x8b\xcf\xe5\x68\x00"))
PEERS = [("127.0.0.1", 40000), ("127.0.0.1", 40001), ("::1", 40000, 0, 0)]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    TWIN.reset()  # (a fresh pair per input: what fails replays alone)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:  # raw bytes
            datagram = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120))
        else:  # the template with bytes overwritten, cut or appended
            datagram = bytearray(TEMPLATE)
            for _ in range(fdp.ConsumeIntInRange(0, 3)):
                at = fdp.ConsumeIntInRange(0, len(datagram) - 1)
                datagram[at] = fdp.ConsumeInt(1) & 0xFF
            if kind == 2:
                datagram = datagram[: fdp.ConsumeIntInRange(4, len(datagram))]
            elif kind == 3:
                datagram = datagram[:-16] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
            datagram = bytes(datagram)
        TWIN.receive(datagram, PEERS[fdp.ConsumeIntInRange(0, 2)])
        then = fdp.ConsumeIntInRange(0, 4)
        if then == 0:
            TWIN.commit()
        elif then == 1:
            TWIN.commit(RuntimeError("bus down"))
        elif then == 2:
            TWIN.advance(fdp.ConsumeIntInRange(0, 3000) / 1000)
        elif then == 3:  # the peer handshakes again (CoAPS): its message ids start afresh
            TWIN.clock[0] += 0.001
            TWIN.new_session(PEERS[fdp.ConsumeIntInRange(0, 2)])
        TWIN.check()
    TWIN.commit()
    TWIN.check()
    counters = TWIN.lane.lane.lane.counters()
    assert counters["waiting"] == 0, counters


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
