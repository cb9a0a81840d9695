"""Two plain-CoAP servers fed the same datagrams, sans-IO: the fast lane in front of the Python path
(what `corem serve` runs) and the Python path alone (`fast_lane = "off"`).  The lane must never
change what is stored or answered; tests/test_fastlane.py and fuzz/fuzz_lane.py compare the two.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from corem.bus.base import PackedRecord, Record, whole_requests
from corem.bus.sqlite import _batch as stored_form
from corem.coap import Endpoint, Params, Router
from corem.fastlane import FastLane
from corem.ingest.diagnostics import Diagnostics
from corem.profiles.payload import decode_readings
from corem.ingest.point import decode_point
from corem.ingest.telemetry import MAX_READINGS, TelemetryIngest
from corem.metrics import gather
from corem.profiles.spec import parse_profile
from corem.net.udp import deliver
from corem.registry import Directory, Registry

def custom(cf: int | None, payload: bytes | bytearray | memoryview):
    """A profile with a decoder of its own (a Python hook): its devices are the Python path's."""
    return decode_readings(60 if cf == 0 else cf, payload)


LHT65 = (Path(__file__).resolve().parent / "codecs" / "lht65.js").read_text()
JS_EDGE = """function decodeUplink(i) {
  var b = i.bytes[0];
  if (b === 1) return {data: {t: String.fromCharCode(0xd800)}};
  if (b === 2) { var d = {v: 1}; for (var k = 0; k < 1000; k++) d = {a: d}; return {data: d}; }
  if (b === 3) throw new Error("refused");
  if (b === 4) while (true) {}
  if (b === 5) { var many = {}; for (var m = 0; m < 65; m++) many["r" + m] = m; return {data: many}; }
  return {data: {b: b}};
}"""
PROTO = """syntax = "proto3";
message Values { double temperature = 1; int32 humidity = 2; string state = 3; }
message Reading { int64 ts = 1; Values values = 2; }
"""
#: every scalar kind the lane reads in C (corem/fastlane/proto.h), an enum with an alias, presence,
#: a nested message two deep, a `ts` that is a reading, a JSON name of its own, numbers out of order
PROTO_ALL = """syntax = "proto3";
message All {
  int32 late = 30;
  double d = 1; float f = 2; int32 i32 = 3; int64 i64 = 4; uint32 u32 = 5; uint64 u64 = 6;
  sint32 s32 = 7; sint64 s64 = 8; fixed32 fx32 = 9; fixed64 fx64 = 10; sfixed32 sf32 = 11; sfixed64 sf64 = 12;
  bool flag = 13; string text = 14; Mode mode = 15; optional double opt = 16; Inner inner = 17; int64 ts = 18;
  optional string snake_case_name = 19; uint32 renamed = 20 [json_name = "other"];
  enum Mode { option allow_alias = true; IDLE = 0; RUNNING = 1; BUSY = 1; }
  message Inner { optional string label = 1; int32 level = 2; Deeper deeper = 3; }
  message Deeper { bool on = 1; optional sint32 delta = 2; optional double ratio = 3; optional uint64 big = 4; }
}
"""

#: a flat profile with every kind of field rule (tests/test_fastlane.py, fuzz/fuzz_lane.py)
RULED = ('{"format": "flat", "fields": {'
         '"t_raw": {"scale": 0.1, "offset": -40, "min": -40, "max": 85, "unit": "Cel", "rename": "temperature",'
         ' "required": true},'
         ' "state": {"allowed": ["idle", "running"], "unit": "mode"}, "hum": {"type": "number", "unit": "%RH"},'
         ' "x": {"rename": "y"}, "label": {"type": "string"}, "same": {"rename": "same"}}}')


ARRAY = '{"format": "array", "positions": ["temperature", null, "ts", "state", "humidity"]}'
#: every binary type, both byte orders, and bytes to skip: 1+1+1+2+2+2+2+4+4+4+4+8+8+8+8+2+4+4+8+8 = 85 bytes
BINARY = ('{"format": "binary", "layout": ['
          '{"name": "i8", "type": "int8"}, {"name": "u8", "type": "uint8"}, {"name": "flag", "type": "bool"},'
          '{"name": "i16b", "type": "int16be"}, {"name": "i16l", "type": "int16le"},'
          '{"name": "u16b", "type": "uint16be"}, {"name": "u16l", "type": "uint16le"},'
          '{"name": "i32b", "type": "int32be"}, {"name": "i32l", "type": "int32le"},'
          '{"name": "u32b", "type": "uint32be"}, {"name": "u32l", "type": "uint32le"},'
          '{"name": "i64b", "type": "int64be"}, {"name": "i64l", "type": "int64le"},'
          '{"name": "u64b", "type": "uint64be"}, {"name": "u64l", "type": "uint64le"},'
          '{"type": "skip", "bytes": 2},'
          '{"name": "f32b", "type": "float32be"}, {"name": "f32l", "type": "float32le"},'
          '{"name": "f64b", "type": "float64be"}, {"name": "f64l", "type": "float64le"}]}')


def unpacked(record: Record | PackedRecord) -> Record:
    """A record as a `Record` (a PackedRecord's msgpack read back)."""
    if isinstance(record, PackedRecord):
        key, value, headers = msgspec.msgpack.decode(record.packed)
        return Record(record.topic, key, value, headers)
    return record


class RecordingSink:
    """The sink interface, committing when told to (`commit(error)`), with bounded room.  Like the
    embedded bus it takes the lane's PackedRecords (`packed`: False, like Kafka's, it takes
    Records only); `waiting` and `stored` hold them as Records, `stored_bytes` each as the
    embedded bus stores it (sqlite.py `_batch`), so the twins compare what reaches the disk."""

    def __init__(self, room: int = 1_000_000, packed: bool = True) -> None:
        self.room = room
        self.packed = packed
        self.waiting: list[tuple[Any, Any, Any]] = []
        self.stored: list[Any] = []
        self.stored_bytes: list[bytes] = []
        self._waiting_bytes: list[bytes] = []

    def submit(self, record, done, ctx=None) -> bool:
        return self.submit_many([record], done, [ctx]) == 1

    def submit_many(self, records, done, ctxs) -> int:
        n = whole_requests(ctxs, max(0, self.room - len(self.waiting)))  # (the sinks' rule: a request whole)
        assert self.packed or not any(isinstance(r, PackedRecord) for r in records), "a packed record for a sink without"
        self.waiting += [(unpacked(r), done, c) for r, c in zip(records[:n], ctxs[:n])]
        self._waiting_bytes += [stored_form([r]) for r in records[:n]]
        return n

    def commit(self, error: BaseException | None = None) -> None:
        waiting, self.waiting = self.waiting, []
        waiting_bytes, self._waiting_bytes = self._waiting_bytes, []
        for (record, done, ctx), raw in zip(waiting, waiting_bytes):
            if error is None:
                self.stored.append(record)
                self.stored_bytes.append(raw)
            done(ctx, error)


class Side:
    """One server: endpoint, router, ingest, sink -- and the lane in front when `lane`."""

    def __init__(self, directory: Directory, clock: list[float], *, lane: bool, params: Params, room: int,
                 rate: float = 0.0, packed: bool = True, max_readings: int = MAX_READINGS) -> None:
        self.clock = clock
        self.sink = RecordingSink(room, packed)
        self.ingest = TelemetryIngest(directory, self.sink, Diagnostics(16), clock_ms=lambda: int(clock[0] * 1000),
                                      now=lambda: clock[0], max_readings=max_readings)
        self.ingest.register_profile("twin-custom", custom)
        self.endpoint = Endpoint(params, rng=lambda: 0.5)
        self.router = Router()
        self.ingest.install(self.router)
        self.lane = FastLane(self.ingest, self.sink, self.endpoint, rate=rate) if lane else None

    def receive(self, data: bytes, peer: tuple) -> None:
        now = self.clock[0]
        slow = self.lane.receive(data, peer, now) if self.lane is not None else [(data, peer)]
        for message, source in slow:  # what the edge does with them
            deliver(self.endpoint, self.router, message, source, now)

    def commit(self, error: BaseException | None = None) -> None:
        self.sink.commit(error)
        if self.lane is not None:  # what the edge does: settle at the flush, count refusals at the tick
            self.lane.settle()
            self.lane.tick(self.clock[0])

    def tick(self) -> None:
        now = self.clock[0]
        self.endpoint.tick(now)
        if self.lane is not None:
            self.lane.tick(now)
            self.lane.settle()

    def take_out(self) -> list[tuple[bytes, tuple]]:
        out = self.endpoint.datagrams_to_send()
        if self.lane is not None:
            out += self.lane.take_outbox()
        return sorted(out)

    def count(self, name: str, **labels: str) -> float:
        """A metric of this side as /metrics shows it: the endpoint's, the ingest's and the lane's
        samples of `name` (with `labels`) added up."""
        parts = [self.endpoint, self.ingest] + ([self.lane] if self.lane is not None else [])
        samples = gather((c, {}) for c in parts).get(name, {})
        want = set(labels.items())
        return sum(v for key, v in samples.items() if want <= set(key))

    def take_stored(self) -> list[tuple]:
        stored, self.sink.stored = self.sink.stored, []
        self.sink.stored_bytes = []
        return [(r.topic, r.key, decode_point(r.value), r.headers) for r in stored]


class Twin:
    """The two sides over one registry: T1 (default profile, tenant acme), T2 (a custom decoder)."""

    def __init__(self, *, room: int = 1_000_000, dedup_max_entries: int = 100_000, packed: bool = True,
                 max_readings: int = MAX_READINGS) -> None:
        """`packed`: the sinks take the lane's PackedRecords, as the embedded bus does (False: as
        Kafka's, Records only); `max_readings`: max_readings_per_point."""
        self.tmp = tempfile.TemporaryDirectory(prefix="corem-twin-")
        self.registry = Registry(Path(self.tmp.name) / "registry.db")
        self.registry.add_device("acme", "d1", token="T1")
        self.registry.add_device("acme", "d2", token="T2", profile="twin-custom")
        self.registry.add_device("other.t", "d3:@x", token='T"3\\')
        # stored profiles the lane also runs in C (LaneDecoder): ThingsBoard's (nested: flatten, so a
        # nested value is the Python path's to flatten) and a flat one
        self.registry.put_profile("tb", parse_profile('{"format": "thingsboard", "nested": "flatten"}'))
        self.registry.put_profile("flat-too", parse_profile('{"format": "flat"}'))
        self.registry.put_profile("tb-rules", parse_profile('{"format": "thingsboard", "fields": {"a": {"max": 10}}}'))
        self.registry.add_device("acme", "tb-1", token="TB", profile="tb")
        # ThingsBoard's nested values kept as their JSON text (nested: json)
        self.registry.put_profile("tb-json", parse_profile('{"format": "thingsboard", "nested": "json"}'))
        self.registry.add_device("acme", "tbj-1", token="TBJ", profile="tb-json")
        self.registry.add_device("acme", "flat-1", token="FL", profile="flat-too")
        self.registry.add_device("acme", "tbr-1", token="TBR", profile="tb-rules")
        self.registry.put_profile("lpp", parse_profile('{"format": "cayenne-lpp"}'))
        self.registry.add_device("acme", "lpp-1", token="LPP", profile="lpp")
        # a profile with every field rule, which the lane applies in C too (rules.h)
        self.registry.put_profile("ruled", parse_profile(RULED))
        self.registry.add_device("acme", "ruled-1", token="RU", profile="ruled")
        # a positional array (a skipped place, the time, text) and a binary layout of every type
        self.registry.put_profile("array", parse_profile(ARRAY))
        self.registry.add_device("acme", "array-1", token="AR", profile="array")
        self.registry.put_profile("binary", parse_profile(BINARY))
        self.registry.add_device("acme", "binary-1", token="BIN", profile="binary")
        self.registry.put_profile("senml", parse_profile('{"format": "senml"}'))
        self.registry.add_device("acme", "senml-1", token="SML", profile="senml")
        # decoders the lane calls from its batch (LANE_PYTHON): a JavaScript codec with a rule, a
        # protobuf schema, and (T2, "twin-custom") a Python hook
        self.registry.put_profile("js", parse_profile(json.dumps({
            "format": "js", "script": LHT65, "fields": {"temperature": {"max": 60, "unit": "Cel"}}})))
        self.registry.add_device("acme", "js-1", token="JS", profile="js")
        # a codec that returns what no stored point can hold, by the payload's first byte: 1, a text
        # with a lone surrogate; 2, data nested 1,000 deep; 3, it throws; 4, it loops (its time limit);
        # 5, 65 readings (more than the lane writes); else a reading
        self.registry.put_profile("js-edge", parse_profile(json.dumps({"format": "js", "script": JS_EDGE})))
        self.registry.add_device("acme", "js-edge-1", token="JU", profile="js-edge")
        self.registry.put_profile("proto", parse_profile(json.dumps({"format": "protobuf", "schema": PROTO})))
        self.registry.add_device("acme", "proto-1", token="PB", profile="proto")
        # protobuf read in C (proto.h): every kind, nested messages flattened (PBA), refused (PBR) or
        # kept as their JSON text (PBJ: those messages the profile's Python decoder reads, from the lane's batch)
        self.registry.put_profile("proto-all", parse_profile(json.dumps(
            {"format": "protobuf", "schema": PROTO_ALL, "nested": "flatten"})))
        self.registry.add_device("acme", "proto-all-1", token="PBA", profile="proto-all")
        self.registry.put_profile("proto-reject", parse_profile(json.dumps({"format": "protobuf", "schema": PROTO_ALL})))
        self.registry.add_device("acme", "proto-reject-1", token="PBR", profile="proto-reject")
        self.registry.put_profile("proto-json", parse_profile(json.dumps(
            {"format": "protobuf", "schema": PROTO_ALL, "nested": "json"})))
        self.registry.add_device("acme", "proto-json-1", token="PBJ", profile="proto-json")
        self.directory = Directory(self.registry)
        self.directory.refresh()
        self.clock = [1000.0]
        self._sides = dict(params=Params(dedup_max_entries=dedup_max_entries), room=room, packed=packed,
                           max_readings=max_readings)
        self.reset()

    def reset(self) -> None:
        """Both sides anew (the registry stays): each fuzz input starts from the same state."""
        self.lane = Side(self.directory, self.clock, lane=True, **self._sides)
        self.python = Side(self.directory, self.clock, lane=False, **self._sides)

    def close(self) -> None:
        self.registry.close()
        self.tmp.cleanup()

    def receive(self, data: bytes, peer: tuple = ("127.0.0.1", 40000)) -> None:
        self.lane.receive(data, peer)
        self.python.receive(data, peer)

    def commit(self, error: BaseException | None = None) -> None:
        self.lane.commit(error)
        self.python.commit(error)

    def new_session(self, peer: tuple) -> None:
        """What the DTLS edge does when `peer` completes a handshake (UdpEdge._new_session)."""
        now = self.clock[0]
        self.lane.endpoint.new_session(peer, now)
        assert self.lane.lane is not None
        self.lane.lane.new_session(peer, now)
        self.python.endpoint.new_session(peer, now)

    def advance(self, seconds: float) -> None:
        self.clock[0] += seconds
        self.lane.tick()
        self.python.tick()

    def check(self) -> tuple[list, list]:
        """Both sides answered and stored the same; returns (answers, stored)."""
        out_lane, out_python = self.lane.take_out(), self.python.take_out()
        assert out_lane == out_python, f"answers differ:\n lane   {out_lane}\n python {out_python}"
        # (the bytes first: a decoded point hides how its numbers were written, 1e-07 or 1e-7;
        # the records as the embedded bus stores them, the lane's packed ones beside Python's)
        disk_lane, disk_python = self.lane.sink.stored_bytes, self.python.sink.stored_bytes
        assert disk_lane == disk_python, f"stored forms differ:\n lane   {disk_lane}\n python {disk_python}"
        raw_lane, raw_python = [r.value for r in self.lane.sink.stored], [r.value for r in self.python.sink.stored]
        assert raw_lane == raw_python, f"bytes stored differ:\n lane   {raw_lane}\n python {raw_python}"
        stored_lane, stored_python = self.lane.take_stored(), self.python.take_stored()
        assert stored_lane == stored_python, f"stored differ:\n lane   {stored_lane}\n python {stored_python}"
        return out_lane, stored_lane
