"""The fast lane's packed records: for the embedded bus the lane writes each reading's record in
the form the bus stores (msgpack `[key, value, headers]`, corem/bus/base.py `PackedRecord`), byte
for byte what msgspec writes for the Record the Python path makes.  lane_twin's sinks take packed
records and compare the stored forms of both paths in every twin test; these tests pin the parts
the common request does not reach: the encodings' size classes, an IPv6 peer, the fallbacks to
dict records, a sink that takes Records only, and the embedded bus's batch of both kinds."""

from __future__ import annotations

import cbor2
import msgspec
import pytest

from corem.bus.base import PackedRecord, Record
from corem.bus.sqlite import _batch
from corem.codec import Message, Type, decode, encode
from corem.codec import Code
from corem.codec import OptionNumber as O

from .lane_twin import Twin
from .test_lane_drogue import check as drogue_check
from .test_lane_drogue import dpost, drogue_twin, learn

_encode = msgspec.msgpack.Encoder().encode


def post(token: str, payload: bytes, *, mid: int = 0x1234, mtype: int = Type.CON) -> bytes:
    options = [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, token.encode()),
               (O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, bytes([60]))]
    return encode(Message(mtype, Code.POST, mid, b"\x01", options, payload))


def submitted(twin: Twin) -> list:
    """What the lane side's sink is given, as given (RecordingSink keeps them as Records)."""
    seen: list = []
    sink = twin.lane.sink
    take = sink.submit_many

    def spy(records, done, ctxs):
        seen.extend(records)
        return take(records, done, ctxs)

    sink.submit_many = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("packed", [True, False])
def test_an_embedded_bus_gets_packed_records_a_records_only_sink_records_and_both_store_pythons_bytes(packed):
    twin = Twin(packed=packed)
    try:
        seen = submitted(twin)
        for mid in range(3):
            twin.receive(post("T1", cbor2.dumps({"temperature": 21.5 + mid, "state": "ok"}), mid=mid))
        twin.commit()
        twin.check()
        assert twin.lane.lane.lane.counters()["requests"] == 3
        assert [type(r) for r in seen] == [PackedRecord if packed else Record] * 3
    finally:
        twin.close()


def test_every_size_class_of_the_encoding_and_an_ipv6_peer_are_msgspecs():
    """A device id past 31 bytes (str 8), a value past 255 bytes (bin 16), many headers' worth of
    text, an IPv6 peer's exchange: the stored form is msgspec's, byte for byte."""
    twin = Twin()
    try:
        twin.registry.add_device("acme", "d" * 40, token="LONG")
        twin.directory.refresh(force=True)
        twin.reset()
        seen = submitted(twin)
        big = {f"field_{i:03d}": i * 1.5 for i in range(40)}  # a JSON value of ~700 bytes
        for mid, peer in enumerate([("::1", 40001, 0, 0), ("127.0.0.1", 40002)]):
            for token in ("LONG", "T1"):
                # (the Python path takes a device's first reading; the lane the next ones)
                twin.receive(post(token, cbor2.dumps(big), mid=2 * mid), peer)
                twin.receive(post(token, cbor2.dumps(big), mid=2 * mid + 1), peer)
        twin.commit()
        twin.check()
        packed = [r for r in seen if isinstance(r, PackedRecord)]
        assert len(packed) >= 4
        for r in packed:
            key, value, headers = msgspec.msgpack.decode(r.packed)
            assert r.packed == _encode((key, value, headers))
            assert len(value) > 255 and r.packed[1 + 2 + len(key)] == 0xC5  # bin 16
        assert any(r.packed[1:3] == b"\xc4\x28" for r in packed)  # the 40-byte key
        assert any(b"udp ::1 40001" in r.packed for r in packed)
    finally:
        twin.close()


def test_drogues_channel_and_schema_are_packed_up_to_the_longest_a_uri_query_holds():
    """A Uri-Query is at most 255 bytes (RFC 7252 Table 4): a schema as long as one holds is
    packed; a longer option is refused 4.02 by both paths (an option of a length outside its own
    is unrecognized, §5.4.3) and stored by neither."""
    twin = drogue_twin()
    try:
        seen = submitted(twin)
        learn(twin)
        seen.clear()
        longest = "urn:" + "s" * (255 - len("data_schema=urn:"))
        twin.receive(dpost(query=("data_schema=urn:x",), mid=1))
        twin.receive(dpost(query=("data_schema=" + longest,), mid=2))
        twin.receive(dpost(query=("data_schema=" + longest + "s",), mid=3))
        twin.commit()
        answers, _ = drogue_check(twin)
        assert [decode(a[0]).code for a in answers] == [Code.CHANGED, Code.CHANGED, Code.BAD_OPTION]
        assert twin.lane.lane.counters["requests"] >= 2
        assert all(isinstance(r, PackedRecord) for r in seen) and len(seen) == 2
        schemas = [msgspec.msgpack.decode(r.packed)[2]["data_schema"] for r in seen]
        assert schemas == ["urn:x", longest]
    finally:
        twin.close()


def test_a_device_whose_headers_are_not_all_text_gets_dict_records():
    """pack_headers only packs str -> str (what headers.py makes); anything else stays a dict."""
    twin = Twin()
    try:
        fl = twin.lane.lane
        real = fl.lane

        class Spy:  # (set_target given a device's headers with a number in them)
            def __getattr__(self, name):
                return getattr(real, name)

            def set_target(self, i, entry):
                if entry is not None:
                    entry = (entry[0], entry[1], {**entry[2], "hops": 3}, *entry[3:])
                return real.set_target(i, entry)

        fl.lane = Spy()
        fl._drop(("acme", "d1"))  # (taken up when the lane was made: again, through the spy)
        fl.take_up(twin.lane.ingest.by_name("acme", "d1"))
        seen = submitted(twin)
        twin.lane.receive(post("T1", cbor2.dumps({"t": 1}), mid=1), ("127.0.0.1", 40000))
        assert real.counters()["requests"] == 1
        assert [type(r) for r in seen] == [Record] and seen[0].headers["hops"] == 3
    finally:
        twin.close()


def test_the_embedded_bus_batch_of_packed_and_plain_records_is_the_list_msgspec_writes():
    plain = [Record("t", b"k%d" % i, b"v" * i, {"a": "b" * i}) for i in range(70)]
    packed = [PackedRecord(r.topic, _encode(r[1:])) for r in plain]
    mixed = [p if i % 3 else r for i, (r, p) in enumerate(zip(plain, packed))]
    for n in (0, 1, 15, 16, 17, 70):
        want = _encode([r[1:] for r in plain[:n]])
        assert _batch(plain[:n]) == want and _batch(packed[:n]) == want and _batch(mixed[:n]) == want
    many = [packed[0]] * 70000  # (past array 16: array 32)
    assert _batch(many) == _encode([plain[0][1:]] * 70000)
