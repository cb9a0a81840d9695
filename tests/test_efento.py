"""Efento's NB-IoT door, sans-IO: messages built with protoc's classes of Efento's own `.proto`
files (independent of corem's schema reader), posted through the real message layer and router
to a real registry; the sink is a list.  What each sample becomes is written out here by hand
from Efento's schema comments, not taken from the door's tables."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from corem.codec import Code, Message, OptionNumber as O, Type, decode, encode, encode_uint
from corem.coap import Endpoint, Params, Router
from corem.frontdoors.efento import Efento
from corem.frontdoors.efento import decode as efento
from corem.ingest.diagnostics import Diagnostics
from corem.ingest.telemetry import TelemetryIngest
from corem.profiles.proto_schema import SchemaError, read_schema, read_schemas
from corem.registry import Directory, Registry
from corem.registry.management import Management

EFENTO = Path(efento.__file__).parent
PEER = ("192.0.2.7", 40000)
TOKEN = "EF-T0KEN-1"
TS = 1_606_391_700  # a channel's first sample (seconds)
NOW_MS = 1_700_000_000_000
WALL = 1_765_000_000.7

needs_protoc = pytest.mark.skipif(shutil.which("protoc") is None,
                                  reason="protoc (Debian protobuf-compiler) is not installed")
pytestmark = needs_protoc


# -- Efento's schema through protoc ----------------------------------------------------------------
def protoc_files(tmp: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp / "efento.pb"
    subprocess.run(["protoc", f"--proto_path={EFENTO}", f"--descriptor_set_out={out}", "--include_imports",
                    *efento.FILES], check=True, capture_output=True, text=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class Protoc:
    """protoc's message classes of Efento's schema: what the tests build messages with."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        pool = descriptor_pool.DescriptorPool()
        for f in files.file:
            pool.Add(f)
        cls = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))  # noqa: E731
        self.Measurements = cls("ProtoMeasurements")
        self.DeviceInfo = cls("ProtoDeviceInfo")
        self.Config = cls("ProtoConfig")
        self.type = pool.FindEnumTypeByName("MeasurementType").values_by_name


@pytest.fixture(scope="module")
def pb(tmp_path_factory) -> Protoc:
    return Protoc(protoc_files(tmp_path_factory.mktemp("protoc")))


def measurements(pb: Protoc, *channels, token: str = TOKEN, base: int = 60, factor: int = 1, **fields) -> bytes:
    """A ProtoMeasurements: channels as (type name, start point, offsets[, timestamp])."""
    m = pb.Measurements(**{"serial_number": bytes.fromhex("282c02424eed"), "battery_status": True,
                           "cloud_token": token, "measurement_period_base": base,
                           "measurement_period_factor": factor, **fields})
    for type_name, start, offsets, *ts in channels:
        ch = m.channels.add(type=pb.type[f"MEASUREMENT_TYPE_{type_name}"].number if isinstance(type_name, str)
                            else type_name, timestamp=ts[0] if ts else TS, start_point=start)
        ch.sample_offsets.extend(offsets)
    return m.SerializeToString()


def test_the_schema_reads_as_protoc_reads_it(tmp_path):
    """corem's reader makes of Efento's files (imports across them) what protoc makes, file for file."""
    mine = read_schemas({name: (EFENTO / name).read_text() for name in efento.FILES})
    theirs = {f.name: f for f in protoc_files(tmp_path).file}
    assert set(mine) == set(theirs)
    for name, f in theirs.items():
        assert mine[name] == f, name


def test_imports_are_for_schema_sets_only():
    with pytest.raises(SchemaError, match="imports are not supported"):
        read_schema('syntax = "proto3";\nimport "x.proto";\nmessage A { int32 a = 1; }')
    with pytest.raises(SchemaError, match=r"a\.proto: line 2:8: 'nope\.proto' is not one of the files"):
        read_schemas({"a.proto": 'syntax = "proto3";\nimport "nope.proto";\nmessage A { int32 a = 1; }'})
    with pytest.raises(SchemaError, match="imported by a file it imports"):
        read_schemas({"a.proto": 'syntax = "proto3";\nimport "b.proto";\n',
                      "b.proto": 'syntax = "proto3";\nimport "a.proto";\n'})
    with pytest.raises(SchemaError, match="b.proto: line 2:13: field 'x': type 'Missing' is not defined"):
        read_schemas({"a.proto": 'syntax = "proto3";\nimport "b.proto";\n',
                      "b.proto": 'syntax = "proto3";\nmessage B { Missing x = 1; }'})


# -- the door, sans-IO -----------------------------------------------------------------------------
class ListSink:
    def __init__(self) -> None:
        self.records, self._waiting = [], []

    def submit(self, record, done, ctx=None) -> bool:
        self.records.append(record)
        self._waiting.append((done, ctx))
        return True

    def submit_many(self, records, done, ctxs) -> int:
        for r, c in zip(records, ctxs):
            self.submit(r, done, c)
        return len(records)

    def commit(self) -> None:
        waiting, self._waiting = self._waiting, []
        for done, ctx in waiting:
            done(ctx, None)

    def values(self, prefix: str) -> list[dict]:
        return [json.loads(r.value) for r in self.records if r.topic.startswith(prefix)]


class Stack:
    def __init__(self, tmp_path) -> None:
        self.registry = Registry(tmp_path / "registry.db")
        self.registry.add_device("acme", "efento-1", token=TOKEN)
        self.registry.add_device("acme", "efento-2", token="EF-T0KEN-2")
        self.directory = Directory(self.registry)
        self.directory.refresh()
        self.sink = ListSink()
        self.management = Management(self.registry)
        self.ingest = TelemetryIngest(self.directory, self.sink, Diagnostics(), clock_ms=lambda: NOW_MS)
        self.endpoint = Endpoint(Params(), rng=lambda: 0.0)
        self.router = Router()
        #: peer -> the device its DTLS session (or OSCORE context) names
        self.sessions: dict = {}
        self.efento = Efento(self.directory, self.ingest, self.management, wall=lambda: WALL)
        self.efento.install(self.router, lambda req: self.sessions.get(req.peer))
        self.mid = 0

    def send(self, path: str, payload: bytes = b"", *, code=Code.POST, cf=None, peer=PEER) -> Message:
        """One CON request; its answer (once the sink committed what it took)."""
        self.mid += 1
        options = [(O.URI_PATH, p.encode()) for p in path.strip("/").split("/")]
        if cf is not None:
            options.append((O.CONTENT_FORMAT, encode_uint(cf)))
        msg = Message(Type.CON, code, self.mid, b"tk", sorted(options, key=lambda o: o[0]), payload)
        req = self.endpoint.receive(encode(msg), peer, 0.0)
        r = self.router.dispatch(req)
        if r is not None:
            req.respond(r.code, r.options, r.payload)
        else:
            self.sink.commit()
        [answer] = [decode(d) for d, _ in self.endpoint.datagrams_to_send()]
        return answer

    def points(self) -> list[dict]:
        return self.sink.values("telemetry.")

    def values(self) -> dict[int, dict]:
        """Every point's values by its timestamp (numbers and texts together)."""
        return {p["ts"]: {**p["numeric_values"], **p["string_values"]} for p in self.points()}

    def metric(self, name: str, **labels) -> float:
        from corem.stats import Sample
        for s in self.efento.metrics():
            assert isinstance(s, Sample)
            if s.name == name and dict(s.labels) == labels:
                return s.value
        raise KeyError(name)


@pytest.fixture
def stack(tmp_path):
    return Stack(tmp_path)


def test_the_spec_example_temperature_with_an_error_code_byte_exact(stack, pb):
    """proto_measurements.proto's own example: start point 100, offsets 15, 20 and 8388557 (the
    SHT4x's failure) -> 11.5 °C, 12 °C and no third value."""
    payload = measurements(pb, ("TEMPERATURE", 100, [15, 20, 8388557]))
    assert payload.hex() == ("0a06282c02424eed1001183c2213080110" "94affefd05" "20c801" "2a061e289affff07"
                             "400182010a45462d54304b454e2d31")
    answer = stack.send("m", payload)
    assert answer.code == Code.CREATED and answer.type == Type.ACK
    values = stack.values()
    assert values[TS * 1000]["temperature_1"] == 11.5
    assert values[(TS + 60) * 1000] == {"temperature_1": 12.0}
    assert (TS + 120) * 1000 not in values
    assert stack.metric("corem_efento_samples_skipped", reason="sensor_error") == 1
    [first, _] = stack.points()
    assert first["units"]["temperature_1"] == "°C" and first["profile"] == "efento"
    assert first["tenant"] == "acme" and first["device"] == "efento-1" and first["received_at"] == NOW_MS


#: (type, start point, offset) -> (key, value, unit): Efento's resolution and unit of each type
CONTINUOUS = [
    ("TEMPERATURE", -100, -5, "temperature_1", -10.5, "°C"),
    ("HUMIDITY", 40, 5, "humidity_1", 45, "%RH"),
    ("ATMOSPHERIC_PRESSURE", 10130, -5, "pressure_1", 1012.5, "hPa"),
    ("DIFFERENTIAL_PRESSURE", -100, 3, "pressure_diff_1", -97, "Pa"),
    ("PULSE_CNT", 0, 1234, "pulse_cnt_1", 1234, "pulses"),
    ("ELECTRICITY_METER", 100, 1, "watt_hour_1", 101, "Wh"),
    ("WATER_METER", 10, 2, "pulse_counter_water_1", 12, "l"),
    ("SOIL_MOISTURE", -300, 2, "soil_moisture_1", -298, "kPa"),
    ("CO_GAS", 30, 1, "co_gas_1", 31, "ppm"),
    ("NO2_GAS", 4, 0, "no2_gas_1", 4, "ppm"),
    ("H2S_GAS", 1234, 1, "h2s_gas_1", 12.35, "ppm"),
    ("AMBIENT_LIGHT", 5000, 5, "ambient_light_1", 500.5, "lx"),
    ("PM_1_0", 12, 0, "pm_1_0_1", 12, "µg/m³"),
    ("PM_2_5", 20, 1, "pm_2_5_1", 21, "µg/m³"),
    ("PM_10_0", 30, 2, "pm_10_0_1", 32, "µg/m³"),
    ("NOISE_LEVEL", 450, 3, "noise_level_1", 45.3, "dB"),
    ("NH3_GAS", 7, 0, "nh3_gas_1", 7, "ppm"),
    ("CH4_GAS", 8, 0, "ch4_gas_1", 8, "ppm"),
    ("HIGH_PRESSURE", 150000, 0, "high_pressure_1", 150000, "kPa"),
    ("DISTANCE_MM", 1000, 234, "distance_mm_1", 1234, "mm"),
    ("HUMIDITY_ACCURATE", 455, 1, "humidity_relative_1", 45.6, "%RH"),
    ("PERCENTAGE", 5000, 1, "percentage_1", 50.01, "%"),
    ("VOLTAGE", 33000, 1, "voltage_1", 3300.1, "mV"),
    ("CURRENT", 1000, 1, "current_1", 10.01, "mA"),
    ("CURRENT_PRECISE", -4000, 1, "current_precise_1", -3.999, "mA"),
    ("RESISTANCE", 1000, 1, "resistance_1", 1001, "Ω"),
]
#: the types whose value / 3 is the reading and the remainder its calibration status
WITH_STATUS = [
    ("IAQ", 150, 2, "iaq_1", 50, 2, "IAQ"),  # 152 = 3 * 50 + 2
    ("CO2_GAS", 1200, 1, "co2_gas_1", 400, 1, "ppm"),
    ("STATIC_IAQ", 300, 0, "static_iaq_1", 100, 0, "sIAQ"),
    ("CO2_EQUIVALENT", 1500, 2, "co2_1", 500, 2, "ppm"),
    ("BREATH_VOC", 30, 1, "breath_voc_1", 10, 1, "ppm"),
]


@pytest.mark.parametrize("type_name, start, offset, key, value, unit", CONTINUOUS)
def test_each_continuous_type_reads_with_its_resolution_and_unit(stack, pb, type_name, start, offset, key,
                                                                 value, unit):
    assert stack.send("m", measurements(pb, (type_name, start, [offset]))).code == Code.CREATED
    [point] = stack.points()
    assert point["numeric_values"][key] == pytest.approx(value) and point["units"][key] == unit
    assert point["ts"] == TS * 1000


@pytest.mark.parametrize("type_name, start, offset, key, value, status, unit", WITH_STATUS)
def test_types_with_a_calibration_status_split_value_and_status(stack, pb, type_name, start, offset, key, value,
                                                                status, unit):
    assert stack.send("m", measurements(pb, (type_name, start, [offset]))).code == Code.CREATED
    [point] = stack.points()
    stem = key[:-2]
    assert point["numeric_values"][key] == value and point["units"][key] == unit
    assert point["numeric_values"][f"{stem}_metadata_1"] == status


def test_several_channels_and_samples_make_one_point_per_timestamp(stack, pb):
    """ThingsBoard's own case: period 180 s x 5; temperature and humidity, two samples each."""
    payload = measurements(pb, ("TEMPERATURE", 0, [223, 224]), ("HUMIDITY", 0, [20, 30]),
                           ("TEMPERATURE", 200, [1, 2, 3]), base=180, factor=5,
                           next_transmission_at=TS + 3600, signal=23)
    assert stack.send("api/v1/efento/m", payload).code == Code.CREATED
    assert stack.values() == {
        TS * 1000: {"temperature_1": 22.3, "humidity_2": 20.0, "temperature_3": 20.1,
                    "measurement_interval_1": 900.0, "measurement_interval_2": 900.0, "measurement_interval_3": 900.0,
                    "serial": "282C02424EED", "battery": "ok", "signal": 23.0,
                    "next_transmission_at": "2020-11-26 12:55:00 UTC"},
        (TS + 900) * 1000: {"temperature_1": 22.4, "humidity_2": 30.0, "temperature_3": 20.2},
        (TS + 1800) * 1000: {"temperature_3": 20.3},
    }
    # one answer for the whole message, once every point is durable
    assert len(stack.points()) == 3


def test_channels_with_their_own_timestamps_and_empty_slots(stack, pb):
    payload = measurements(pb, ("TEMPERATURE", 200, [0, 1], TS + 30), ("NO_SENSOR", 0, [5]), ("HUMIDITY", 50, [0]))
    assert stack.send("m", payload).code == Code.CREATED
    values = stack.values()
    assert values[(TS + 30) * 1000]["temperature_1"] == 20.0 and values[(TS + 90) * 1000] == {"temperature_1": 20.1}
    assert values[TS * 1000]["humidity_3"] == 50.0 and "serial" in values[(TS + 30) * 1000]  # the first channel's
    assert not any(k.endswith("_2") for v in values.values() for k in v)


def test_sensor_error_codes_are_skipped_and_counted_never_a_value(stack, pb):
    payload = measurements(pb, ("TEMPERATURE", 100, [8_355_840, 1, 8_388_607, 8_355_839, -32768, 2]))
    assert stack.send("m", payload).code == Code.CREATED
    temps = {ts: v["temperature_1"] for ts, v in stack.values().items() if "temperature_1" in v}
    assert temps == {(TS + 60) * 1000: 10.1, (TS + 180) * 1000: (100 + 8_355_839) / 10, (TS + 300) * 1000: 10.2}
    assert stack.metric("corem_efento_samples_skipped", reason="sensor_error") == 3


def test_binary_states_come_from_the_sign_and_the_offset_in_seconds(stack, pb):
    """The schema's example: 1, -9, 13 -> Alarm at the timestamp, OK 8 s later, Alarm 12 s later."""
    payload = measurements(pb, ("OK_ALARM", 0, [1, -9, 13]), ("FLOODING", 0, [-1, 5, 6]),
                           ("OUTPUT_CONTROL", 0, [-3, 4]), base=60, factor=1)
    assert stack.send("m", payload).code == Code.CREATED
    values = stack.values()
    assert values[TS * 1000]["ok_alarm_1"] == "ALARM" and values[TS * 1000]["flooding_2"] == "OK"
    assert values[(TS + 8) * 1000] == {"ok_alarm_1": "OK"}
    assert values[(TS + 12) * 1000] == {"ok_alarm_1": "ALARM"}
    assert values[(TS + 4) * 1000] == {"flooding_2": "WATER_DETECTED"}
    assert values[(TS + 5) * 1000] == {"flooding_2": "WATER_DETECTED"}  # the range's last sample, same state
    assert values[(TS + 2) * 1000] == {"output_control_3": "OFF"}
    assert values[(TS + 3) * 1000] == {"output_control_3": "ON"}
    assert values[TS * 1000]["measurement_interval_1"] == 60  # binary sensors look every period base


def test_a_binary_sample_without_a_sign_is_skipped_and_counted(stack, pb):
    assert stack.send("m", measurements(pb, ("OK_ALARM", 0, [1, 0, -3]))).code == Code.CREATED
    assert stack.metric("corem_efento_samples_skipped", reason="invalid") == 1
    assert stack.values()[(TS + 2) * 1000] == {"ok_alarm_1": "OK"}


@pytest.mark.parametrize("channels, period", [
    ([("TEMPERATURE", 200, [0, 1])], 60),  # continuous only: a factor of 0 is 1
    ([("TEMPERATURE", 200, [0, 1]), ("OK_ALARM", 0, [1])], 60 * 14),  # binary or mixed: 14
])
def test_a_period_factor_of_0_is_firmware_5s(stack, pb, channels, period):
    assert stack.send("m", measurements(pb, *channels, base=60, factor=0)).code == Code.CREATED
    values = stack.values()
    assert values[(TS + period) * 1000]["temperature_1"] == 20.1
    assert values[TS * 1000]["measurement_interval_1"] == period


def test_battery_signal_and_serial_are_in_the_first_channels_point(stack, pb):
    payload = measurements(pb, ("HUMIDITY", 40, [0, 1]), battery_status=False, signal=99,
                           battery_level=2474, transfer_reason=1)
    assert stack.send("m", payload).code == Code.CREATED
    [first, second] = stack.points()
    assert first["string_values"] == {"serial": "282C02424EED", "battery": "low", "battery_source": "external"}
    assert first["numeric_values"]["signal"] == 99 and first["numeric_values"]["battery_voltage"] == 4.12
    assert first["units"]["battery_voltage"] == "V"
    assert "battery" not in second["string_values"]


def test_accumulated_counters_total_major_and_minor_in_any_order(stack, pb):
    """A water meter: major channel 1 (12 hl, status 0), minor channel 2 (37 l, major index 0)."""
    major, minor = 4 * 12 + 0, 6 * 37 + 0
    payload = measurements(pb, ("WATER_METER_ACC_MAJOR", major, [0, 4]), ("WATER_METER_ACC_MINOR", minor, [0, 6]))
    assert stack.send("m", payload).code == Code.CREATED
    values = stack.values()
    assert values[TS * 1000]["water_cnt_acc_total_2"] == 1237 and "water_cnt_acc_1" not in values[TS * 1000]
    assert values[TS * 1000]["water_cnt_acc_metadata_1"] == 0
    assert values[(TS + 60) * 1000]["water_cnt_acc_total_2"] == 13 * 100 + 38
    # the minor first, its major (channel 2: index 1) after it; an electricity meter in kWh + Wh
    stack.sink.records.clear()
    payload = measurements(pb, ("ELEC_METER_ACC_MINOR", 6 * 250 + 1, [0]), ("ELEC_METER_ACC_MAJOR", 4 * 7 + 2, [0]))
    assert stack.send("m", payload).code == Code.CREATED
    [point] = stack.points()
    assert point["numeric_values"]["elec_meter_acc_total_1"] == 7250 and point["units"]["elec_meter_acc_total_1"] == "Wh"
    assert point["numeric_values"]["elec_meter_acc_metadata_2"] == 2
    # a minor whose major is not there: skipped, counted
    stack.sink.records.clear()
    assert stack.send("m", measurements(pb, ("PULSE_CNT_ACC_MINOR", 6 * 5 + 3, [0]))).code == Code.CREATED
    assert stack.metric("corem_efento_samples_skipped", reason="unpaired") == 1
    assert not any(k.startswith("pulse_cnt_acc") for v in stack.values().values() for k in v)


def test_a_type_the_schema_does_not_have_is_skipped_and_counted(stack, pb):
    payload = measurements(pb, ("TEMPERATURE", 200, [0]), (99, 1, [1, 2]), ("SHARED_MODEM", 0, [1]))
    assert stack.send("m", payload).code == Code.CREATED
    assert stack.metric("corem_efento_samples_skipped", reason="unknown_type") == 3
    assert stack.values()[TS * 1000]["temperature_1"] == 20.0


@pytest.mark.parametrize("path", ["m", "api/v1/efento/m", "coap/measurements"])
def test_every_path_of_the_door_takes_measurements(stack, pb, path):
    assert stack.send(path, measurements(pb, ("TEMPERATURE", 200, [0])), cf=42).code == Code.CREATED
    assert stack.metric("corem_efento_messages", kind="measurements", result="accepted") == 1


def test_a_malformed_message_is_refused_naming_the_field_counted_and_kept(stack, pb):
    good = measurements(pb, ("TEMPERATURE", 200, [0]))
    cases = [
        (good[:-3], "field 'cloudToken': not a ProtoMeasurements message: its length runs past the end"),
        (b"\x22\x04\x28\xff\xff\xff" + good,  # a channel whose packed offsets break off
         "field 'channels.sampleOffsets': not a ProtoMeasurements message: the varint runs past the end"),
        (measurements(pb), "field 'channels': a measurements message has at least one channel"),
        (measurements(pb, ("TEMPERATURE", 200, [0, 1]), base=0),
         "field 'measurementPeriodBase': 0, yet a channel has several samples to place in time"),
        (measurements(pb, ("TEMPERATURE", 200, [0], -5)), "field 'channels[0].timestamp': -5 is before 1970"),
        (measurements(pb, ("TEMPERATURE", 200, [0] * 3, 2**31 - 1), base=2**32 - 1, factor=2**32 - 1),
         "field 'channels[0].timestamp': its samples run past the year 9999"),
    ]
    for payload, reason in cases:
        answer = stack.send("m", payload)
        said = f"field {stack.ingest.diagnostics.newest(1)[0].field!r}: {stack.ingest.diagnostics.newest(1)[0].detail}"
        assert said.startswith(reason), said
        # over plain CoAP an error is never larger than its request (no amplification): cut to fit
        assert answer.code == Code.BAD_REQUEST and said.startswith(bytes(answer.payload).decode())
        assert len(encode(answer)) <= len(payload) + 9
    assert stack.points() == []
    assert stack.metric("corem_efento_messages", kind="measurements", result="refused") == len(cases)
    assert stack.ingest.stats.rejections["coap", "decode_error"] == len(cases)
    newest = stack.ingest.diagnostics.newest()
    assert len(newest) == len(cases) and newest[0].field == "channels[0].timestamp"
    assert newest[0].device == "efento-1" and newest[-1].device is None  # (its token did not parse)
    assert newest[-1].payload == good[:-3]


def test_too_many_points_in_one_message_are_refused_whole(stack, pb):
    payload = measurements(pb, ("TEMPERATURE", 200, [0] * 1001))
    answer = stack.send("m", payload)
    assert answer.code == Code.BAD_REQUEST and b"1001 points in one message; at most 1000" in bytes(answer.payload)
    assert stack.points() == []


def test_a_content_format_other_than_octets_is_4_15(stack, pb):
    answer = stack.send("m", measurements(pb, ("TEMPERATURE", 200, [0])), cf=50)
    assert answer.code == Code.UNSUPPORTED_CONTENT_FORMAT


def test_the_device_is_the_cloud_token_s_else_the_session_s(stack, pb):
    payload = measurements(pb, ("TEMPERATURE", 200, [0]), token="nope")
    answer = stack.send("m", payload)
    assert answer.code == Code.UNAUTHORIZED and bytes(answer.payload) == b"cloudToken: unknown access token"
    answer = stack.send("m", measurements(pb, ("TEMPERATURE", 200, [0]), token=""))
    assert answer.code == Code.UNAUTHORIZED
    assert stack.ingest.stats.auth_failures["coap", "unknown_token"] == 1
    assert stack.ingest.stats.auth_failures["coap", "no_session_identity"] == 1
    # a DTLS session (or OSCORE context) names the device when the message does not
    stack.sessions[PEER] = stack.directory.named("acme", "efento-2")
    assert stack.send("m", measurements(pb, ("TEMPERATURE", 200, [0]), token="")).code == Code.CREATED
    assert stack.send("m", measurements(pb, ("TEMPERATURE", 201, [0]), token="862061049999999")).code == Code.CREATED
    assert stack.send("m", measurements(pb, ("TEMPERATURE", 202, [0]))).code == Code.CREATED  # a known token wins
    assert [(p["device"], p["numeric_values"]["temperature_1"]) for p in stack.points()] == [
        ("efento-2", 20.0), ("efento-2", 20.1), ("efento-1", 20.2)]


def device_info(pb: Protoc, token: str = TOKEN) -> bytes:
    di = pb.DeviceInfo(serial_number=bytes.fromhex("282c02424eed"), sw_version=1546, commit_id="0bdd23f",
                       cloud_token=token, enclosure_tamper_alert=2)
    di.memory_statistics.extend([0, 1_700_000_000, 1048576, 512000, 1024, 256, 100, 10, 2, 500, 400, 300, 200,
                                 100, 50, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 1_700_000_000, 1_700_000_060,
                                 1_700_000_000, 77])
    di.runtime_info.up_time = 3600
    di.runtime_info.message_counters.extend([5, 6, 10])
    di.runtime_info.mcu_temperature = -3
    di.runtime_info.battery_voltage = 3600
    di.runtime_info.max_mcu_temperature = 40
    di.runtime_info.min_mcu_temperature = -10
    di.runtime_info.runtime_errors.extend([7, 9])
    di.last_update_info.timestamp = 1_700_000_000
    di.last_update_info.status = 2
    di.modem.type = 4  # MODEM_TYPE_BC660
    di.modem.parameters.extend(range(-5, 17))  # its 22 parameters
    di.modem.sim_card_identification = "8948000000000000001"
    di.modem.firmware_version = 9
    di.modem.modem_identification = "862061049999999"
    di.modem.modem_statistics.extend([12, 86400, 80000, 6400])
    return di.SerializeToString()


def test_device_info_becomes_client_attributes_and_a_record(stack, pb):
    for path in ("i", "api/v1/efento/i", "coap/device-info"):
        assert stack.send(path, device_info(pb)).code == Code.CREATED
    attrs = stack.management.attributes("acme", "efento-1", "client")
    assert attrs["serial"] == "282C02424EED" and attrs["sw_version"] == 1546 and attrs["software_version"] == "06.10"
    assert attrs["commit_id"] == "0bdd23f" and attrs["enclosure_tamper_alert"] == 2
    assert attrs["timestamp_of_the_end_of_collecting_statistics"] == "2023-11-14T22:13:20Z"
    assert attrs["capacity_of_memory_in_bytes"] == 1048576 and attrs["number_of_all_samples_for_channel_6"] == 50
    assert "timestamp_of_the_first_binary_measurement" not in attrs  # 4294967295: undefined
    assert attrs["timestamp_of_the_last_continuous_measurement"] == "2023-11-14T22:14:20Z"
    assert attrs["nvm_write_counter"] == 77
    assert attrs["up_time"] == 3600 and attrs["counter_of_succeeded_messages"] == 10 and attrs["mcu_temp"] == -3
    assert attrs["battery_voltage"] == 3600 and attrs["runtime_errors"] == 2 and attrs["runtime_error_codes"] == [7, 9]
    assert attrs["last_update_check"] == "2023-11-14T22:13:20Z" and attrs["last_update_status"] == 2
    assert attrs["modem_type"] == "MODEM_TYPE_BC660" and attrs["modem_firmware_version"] == "MODEM_FIRMWARE_VERSION_BC660_V7"
    assert attrs["sc_EARFCN"] == -5 and attrs["select_PLMN"] == 16 and attrs["nc_RSRQ"] == 11
    assert attrs["modem_identification"] == "862061049999999" and attrs["modem_total_active_time"] == 6400
    assert TOKEN not in json.dumps(attrs)  # the access token is never an attribute
    [record, *_] = stack.sink.values("attributes.acme")
    assert record["device"] == "efento-1" and record["scope"] == "client" and record["values"] == attrs
    assert stack.metric("corem_efento_messages", kind="device_info", result="accepted") == 3


def test_configuration_becomes_client_attributes_without_its_secrets(stack, pb):
    cfg = pb.Config(serial_number=bytes.fromhex("282c02424eed"), measurement_period_base=60,
                    measurement_period_factor=5, transmission_interval=900, cloud_token=TOKEN,
                    data_server_ip="192.0.2.1", data_server_port=5683, apn="iot.example",
                    apn_password="secret", encryption_key=b"k" * 16, network_key=b"n" * 16)
    cfg.channel_types.extend([1, 2])
    rule = cfg.rules.add()
    rule.parameters.extend([1, 2])
    answer = stack.send("c", cfg.SerializeToString())
    assert answer.code == Code.CREATED
    attrs = stack.management.attributes("acme", "efento-1", "client")
    assert attrs["measurementPeriodBase"] == 60 and attrs["transmissionInterval"] == 900
    assert attrs["dataServerIp"] == "192.0.2.1" and attrs["apn"] == "iot.example"
    assert attrs["channelTypes"] == ["MEASUREMENT_TYPE_TEMPERATURE", "MEASUREMENT_TYPE_HUMIDITY"]
    assert attrs["rules"][0]["parameters"] == [1, 2]
    assert not {"cloudToken", "apnPassword", "encryptionKey", "networkKey"} & set(attrs)
    assert stack.sink.values("attributes.acme")[0]["values"] == attrs


def test_device_info_that_does_not_parse_is_refused(stack, pb):
    answer = stack.send("i", b"\x7a\x3c" + b"x" * 60 + b"\x72\x10\x08")  # a commit id, then a cut modem
    assert answer.code == Code.BAD_REQUEST
    assert bytes(answer.payload).startswith(b"field 'modem': not a ProtoDeviceInfo message: its length runs")
    assert stack.metric("corem_efento_messages", kind="device_info", result="refused") == 1


@pytest.mark.parametrize("path, code", [("t", Code.GET), ("t", Code.POST), ("api/v1/efento/t", Code.GET)])
def test_the_time_is_four_bytes_of_seconds(stack, path, code):
    answer = stack.send(path, code=code)
    assert answer.code == Code.CONTENT and bytes(answer.payload) == struct.pack(">I", int(WALL))
    assert bytes(answer.payload) == bytes.fromhex("6933c340")  # ThingsBoard's ByteBuffer.putInt of the same second


def test_skipped_counts_add_up_across_messages(stack, pb):
    for _ in range(2):
        stack.send("m", measurements(pb, ("TEMPERATURE", 200, [8_355_840, 0])))
    assert Counter({r: stack.metric("corem_efento_samples_skipped", reason=r) for r in
                    ("sensor_error", "unknown_type", "unpaired", "invalid")}) == Counter(sensor_error=2)


def test_over_oscore_the_context_names_the_device(tmp_path, pb):
    """An OSCORE-protected POST /m whose message carries no token: the device of the context."""
    pytest.importorskip("aiocoap.oscore")
    import aiocoap

    from corem.codec.options import UNDERSTOOD_CRITICAL
    from corem.oscore import Oscore
    from corem.registry.db import Db
    from corem.registry.oscore import OscoreState
    from corem.identity import session_identity as identity

    from .test_oscore import KEYS, device_context, opened, sealed

    stack = Stack(tmp_path)
    stack.registry.add_device("acme", "efento-os", oscore=KEYS)
    stack.directory.refresh(force=True)
    context = stack.directory.named("acme", "efento-os")  # (the registry's device: what an OSCORE lookup gives)
    oscore = Oscore(lambda ctx, kid: context if (ctx or b"", kid) == KEYS.kid else None, OscoreState(Db(tmp_path / "o.db")),
                    UNDERSTOOD_CRITICAL - {O.OSCORE})
    stack.router = Router()
    stack.router.unwrap = oscore.unwrap
    stack.efento.install(stack.router, identity(None))
    dev = device_context(tmp_path / "dev")
    data, rid = sealed(dev, aiocoap.POST, "m", measurements(pb, ("TEMPERATURE", 215, [0]), token=""))
    req = stack.endpoint.receive(data, PEER, 0.0)
    assert stack.router.dispatch(req) is None  # answered once durable
    stack.sink.commit()
    [(answer, _)] = stack.endpoint.datagrams_to_send()
    assert opened(dev, answer, rid).code == aiocoap.CREATED
    [point] = stack.points()
    assert point["device"] == "efento-os" and point["numeric_values"]["temperature_1"] == 21.5


#: accumulated counters: (major type, minor type, total key, resolution, unit)
ACCUMULATED = [
    ("WATER_METER_ACC_MAJOR", "WATER_METER_ACC_MINOR", "water_cnt_acc_total", 100, "l"),
    ("PULSE_CNT_ACC_MAJOR", "PULSE_CNT_ACC_MINOR", "pulse_cnt_acc_total", 1000, "pulses"),
    ("ELEC_METER_ACC_MAJOR", "ELEC_METER_ACC_MINOR", "elec_meter_acc_total", 1000, "Wh"),
    ("PULSE_CNT_ACC_WIDE_MAJOR", "PULSE_CNT_ACC_WIDE_MINOR", "pulse_cnt_acc_wide_total", 1_000_000, "pulses"),
]
BINARY = ["OK_ALARM", "FLOODING", "OUTPUT_CONTROL"]


@pytest.mark.parametrize("major, minor, key, resolution, unit", ACCUMULATED)
def test_each_accumulated_counter_is_major_times_its_resolution_plus_minor(stack, pb, major, minor, key, resolution,
                                                                          unit):
    payload = measurements(pb, (major, 4 * 321 + 1, [0]), (minor, 6 * 99 + 0, [0]))  # status 1; major: channel 1
    assert stack.send("m", payload).code == Code.CREATED
    [point] = stack.points()
    assert point["numeric_values"][f"{key}_2"] == 321 * resolution + 99 and point["units"][f"{key}_2"] == unit
    assert point["numeric_values"][f"{key[:-len('_total')]}_metadata_1"] == 1


def test_every_measurement_type_of_efentos_schema_is_tested_here(pb):
    """The tables above cover the schema's MeasurementType whole (a new type in a new schema
    fails here until it is read and tested)."""
    tested = ({c[0] for c in CONTINUOUS} | {c[0] for c in WITH_STATUS} | set(BINARY)
              | {a[0] for a in ACCUMULATED} | {a[1] for a in ACCUMULATED}
              | {"NO_SENSOR", "SHARED_MODEM"})  # an empty slot; reserved (tested as skipped)
    assert {name.removeprefix("MEASUREMENT_TYPE_") for name in pb.type} == tested


def test_without_the_protobuf_runtime_the_door_says_which_extra_it_needs(stack, pb, monkeypatch):
    import corem.frontdoors.efento as door

    monkeypatch.setattr(door, "_decoder", lambda: None)
    answer = stack.send("m", measurements(pb, ("TEMPERATURE", 200, [0])) + bytes(40))
    assert answer.code == Code.NOT_IMPLEMENTED
    assert bytes(answer.payload) == b"efento: needs the 'protobuf' extra: pip install 'corem[protobuf]'"
    assert stack.send("t", code=Code.GET).code == Code.CONTENT  # the time needs no schema
    assert stack.metric("corem_efento_messages", kind="measurements", result="refused") == 1
