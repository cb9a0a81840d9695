"""ThingsBoard-style protobuf profiles: the schema reader against Debian's protoc, and payloads that
protoc's own classes encode, decoded as ThingsBoard's JSON printer would have them."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from corem.profiles.payload import PayloadError, UnsupportedFormat
from corem.profiles.compile import compile_profile
from corem.profiles.proto_schema import SchemaError, read_schema
from corem.profiles.rules import RuleViolation
from corem.profiles.spec import ProfileError, profile_from

from .conftest import corem_cli

PROTOS = Path(__file__).with_name("protos")
needs_protoc = pytest.mark.skipif(shutil.which("protoc") is None,
                                  reason="protoc (Debian protobuf-compiler) is not installed")


def protoc_descriptor(text: str, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """What Debian's protoc makes of a schema (CalledProcessError with its message if it refuses it)."""
    (tmp_path / "profile.proto").write_text(text)
    subprocess.run(["protoc", f"--proto_path={tmp_path}", f"--descriptor_set_out={tmp_path / 'out.pb'}",
                    "profile.proto"], check=True, capture_output=True, text=True)
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "out.pb").read_bytes())
    return files.file[0]


def protoc_class(text: str, full_name: str, tmp_path: Path):
    """A message class built from protoc's descriptor: the payloads are encoded independently of
    the reader under test."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(protoc_descriptor(text, tmp_path))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def decoder(schema: str, **profile):
    return compile_profile(profile_from({"format": "protobuf", "schema": schema, **profile}))


def points(decode, payload: bytes, content_format: int | None = 42):
    return [(r.numeric, r.strings, r.ts) for r in decode(content_format, payload, 1_700_000_000_000)]


# -- the schema ------------------------------------------------------------------------------------
@needs_protoc
@pytest.mark.parametrize("name", sorted(p.name for p in PROTOS.glob("*.proto")))
def test_the_schema_reads_as_protoc_reads_it(name, tmp_path):
    text = (PROTOS / name).read_text()
    assert read_schema(text) == protoc_descriptor(text, tmp_path)


H = 'syntax = "proto3";\n'
#: schemas protoc refuses too, and what corem says of each (line:column as protoc's)
REFUSED = [
    (H + "message A { int32 a = 1; int32 a = 2; }", "line 2:32: field 'a' is defined twice in A"),
    (H + "message A { int32 a = 0; }", "line 2:23: field 'a': numbers are 1 to 536870911, not 0"),
    (H + "message A { int32 a = 19000; }", "line 2:23: field 'a': 19000-19999 are reserved"),
    (H + "message A { int32 a = 018; }", "line 2:23: the field number: 018 starts with 0, so it is octal"),
    (H + "message A { B a = 1; }", "line 2:13: field 'a': type 'B' is not defined"),
    (H + "message A { map<float, int32> m = 1; }", "line 2:17: a map's key is an integer type, bool or string"),
    (H + "message A { map<string, int32> m = 1; message MEntry {} }", "line 2:47: 'MEntry' is already defined"),
    (H + "enum E { A = 1; } message M { E e = 1; }", "line 2:14: E: a proto3 enum's first value must be 0"),
    (H + "enum E { A = 0; B = 0; } message M {}", "line 2:21: B: 0 is already 'A'"),
    (H + "enum E { X = 0; } enum F { X = 0; } message M {}", "line 2:28: 'X' is already defined"),
    (H + "message A { oneof o { repeated int32 x = 1; } }", "line 2:23: a oneof's fields take no label"),
    (H + "message A { reserved 1; int32 x = 1; }", "field 'x' uses reserved number 1"),
    (H + "message A { reserved 'x'; int32 x = 1; }", "field name 'x' is reserved"),
    (H + "message A { int32 foo_bar = 1; int32 fooBar = 2; }", "its JSON name is 'foo_bar''s too"),
    (H + "message A { int32 x = 1 [packed = true]; }", "packed is for repeated numbers"),
    (H + "message A { int32 x = 1 }", "line 2:25: expected ';', got '}'"),
    (H + "message A { int32 x = 1;", "line 2:25: the schema ends too soon"),
    (H + "message A { optional repeated int32 x = 1; }", "line 2:37: expected '=', got 'x'"),
    (H + "package p; package q; message A {}", "line 2:12: package must come once"),
    (H + "message A { A.B x = 1; message B {} } message C { B y = 2; }", "field 'y': type 'B' is not defined"),
    (H + "message A { int32 x = 1; } /* never closed", "line 2:28: an unterminated comment"),
    ("message A { int32 x = 1; }", "line 1:1: the schema must start with syntax = \"proto3\";"),
]
#: schemas protoc takes and ThingsBoard (and so corem) does not
NOT_THINGSBOARDS = [
    ('syntax = "proto2"; message A { optional int32 x = 1; }', "line 1:10: only proto3 schemas"),
    (H + 'import "other.proto"; message A {}', "line 2:1: imports are not supported"),
    (H + 'option java_package = "x"; message A {}', "line 2:1: options are not supported"),
    (H + "message A {} service S { rpc Get(A) returns (A); }", "line 2:14: services are not supported"),
    (H + "message A { int32 x = 1 [ctype = CORD]; }", "line 2:26: option 'ctype' is not supported"),
    (H + "enum E { X = 0; }", "line 1:1: the schema defines no message"),
]


@pytest.mark.parametrize("schema, error", [
    (H + 'message A { int32 x = 1 [json_name = "\\ud800"]; }', "line 2:38: field 'x': json_name is not text UTF-8 can say"),
    (H + 'message A { reserved "\\ud800"; int32 x = 1; }', "line 2:22: a reserved name is not text UTF-8 can say"),
    (H + 'enum E { A = 0; reserved "\\udc00"; } message M {}', "line 2:26: a reserved name is not text UTF-8 can say"),
    # (found by the fuzz target: an escape cut short raised UnicodeDecodeError out of the reader)
    ('syntax = "\\u12";', "line 1:10: the syntax holds an escape cut short"),
])
def test_text_no_utf8_can_say_is_refused_naming_it(schema, error):
    """Found by review: a lone surrogate escaped in a json_name or a reserved name raised
    UnicodeEncodeError out of the schema reader (a profile that could not even be refused); every
    string of the schema is checked where it is read."""
    with pytest.raises(SchemaError) as e:
        read_schema(schema)
    assert error in str(e.value)


def test_messages_nested_past_the_bound_are_refused_naming_the_line():
    """(about 990 levels raised RecursionError, not SchemaError.)  upb refuses about 100
    levels anyway; MAX_NESTING is the deepest the reader takes, and that schema decodes."""
    from corem.profiles.proto_schema import MAX_NESTING, message_class
    def nested(n: int) -> str:
        return H + "message M { double v = 1;\n" * n + "}" * n
    for n in (MAX_NESTING + 1, 2000):  # (2000 levels: 56 KiB, under MAX_SCHEMA_BYTES)
        with pytest.raises(SchemaError) as e:
            read_schema(nested(n))
        assert str(e.value) == f"line {MAX_NESTING + 2}:9: messages are nested more than {MAX_NESTING} deep"
    assert message_class(nested(MAX_NESTING))().DESCRIPTOR.name == "M"


@pytest.mark.parametrize("schema,error", REFUSED + NOT_THINGSBOARDS)
def test_a_schema_that_cannot_be_used_is_refused_naming_line_and_column(schema, error, tmp_path):
    with pytest.raises(SchemaError) as e:
        read_schema(schema)
    assert error in str(e.value)
    if shutil.which("protoc") and (schema, error) in REFUSED:
        with pytest.raises(subprocess.CalledProcessError):
            protoc_descriptor(schema, tmp_path)  # (and protoc refuses it as well)


def test_a_profile_names_what_is_wrong_with_its_schema_or_message():
    schema = (PROTOS / "thingsboard.proto").read_text()
    with pytest.raises(ProfileError, match=r"^schema: the protobuf format needs a proto3 schema"):
        profile_from({"format": "protobuf"})
    with pytest.raises(ProfileError, match=r"^schema: only the protobuf format takes a schema"):
        profile_from({"format": "thingsboard", "schema": schema})
    with pytest.raises(ProfileError, match=r"^schema: line 1:8: expected '=', got '\"proto3\"'"):
        decoder('syntax "proto3";\nmessage A {}')
    with pytest.raises(ProfileError, match=r"^message: 'Nope' is not defined in the schema \(it defines "
                                           r"telemetry.SensorDataReading, telemetry.SensorDataReading.InnerObject\)"):
        decoder(schema, message="Nope")
    assert decoder(schema, message="InnerObject", nested="json")(42, b"\x0a\x02ok", 0)[0].strings == {"key1": "ok"}


# -- decoding --------------------------------------------------------------------------------------
@needs_protoc
def test_thingsboards_example_decodes_to_thingsboards_keys(tmp_path):
    schema = (PROTOS / "thingsboard.proto").read_text()
    cls = protoc_class(schema, "telemetry.SensorDataReading", tmp_path)
    msg = cls(temperature=42.5, humidity=0.0)
    msg.innerObject.key1 = "value1"
    msg.innerObject.key4 = 7
    payload = msg.SerializeToString()
    # its JSON printer keeps a nested message as JSON: ThingsBoard's own behaviour
    assert points(decoder(schema, nested="json"), payload) == [
        ({"temperature": 42.5, "humidity": 0.0}, {"innerObject": '{"key1":"value1","key4":7}'}, None)]
    assert points(decoder(schema, nested="flatten"), payload) == [
        ({"temperature": 42.5, "humidity": 0.0, "innerObject.key4": 7.0}, {"innerObject.key1": "value1"}, None)]
    with pytest.raises(PayloadError) as e:
        decoder(schema)(42, payload, 0)
    assert e.value.field == "innerObject" and "nested is reject" in e.value.reason
    # unset optional fields are absent (humidity 0.0 above was sent: it has presence)
    assert points(decoder(schema), cls(temperature=1.0).SerializeToString(), None) == [({"temperature": 1.0}, {}, None)]


@needs_protoc
def test_every_scalar_kind_and_ts_values_as_thingsboard_prints_them(tmp_path):
    schema = (PROTOS / "timestamped.proto").read_text()
    cls = protoc_class(schema, "meter.Reading", tmp_path)
    msg = cls(ts=1_672_531_200_000)
    v = msg.values
    v.power_w, v.voltage, v.energy_wh, v.temp_c, v.relay_on = 120.5, 230.0, 2 ** 40, -12, True
    v.phase, v.state, v.raw, v.counter, v.offset = 2, "running", b"\x00\xff", 4_000_000_000, -5
    v.samples.extend([1, 2, 3])
    v.extra["pf"] = 0.95
    decode = decoder(schema, nested="json")
    [(numeric, strings, ts)] = points(decode, msg.SerializeToString())
    assert ts == 1_672_531_200_000
    assert numeric == {"powerW": 120.5, "voltage": 230.0, "energyWh": 2.0 ** 40, "tempC": -12.0, "relayOn": 1.0,
                       "counter": 4e9, "offset": -5.0}
    assert strings == {"phase": "L2", "state": "running", "raw": base64.b64encode(b"\x00\xff").decode(),
                       "samples": "[1,2,3]", "extra": '{"pf":0.95}'}
    # without presence, defaults are readings (0 is a temperature) and a ts of 0 is "not sent"
    [(numeric, strings, ts)] = points(decode, cls(values={"state": ""}).SerializeToString())
    assert ts is None
    assert numeric == {"powerW": 0.0, "voltage": 0.0, "energyWh": 0.0, "tempC": 0.0, "relayOn": 0.0,
                       "counter": 0.0, "offset": 0.0}
    assert strings == {"phase": "PHASE_UNKNOWN", "state": "", "raw": ""}  # empty lists and maps: absent
    # an enum number the schema does not know stays a number (as ThingsBoard's printer has it)
    unknown_phase = cls(values={"phase": 9}).SerializeToString()
    assert points(decode, unknown_phase)[0][0]["phase"] == 9.0


@needs_protoc
def test_maps_oneofs_nested_references_and_flattening(tmp_path):
    schema = (PROTOS / "kitchen_sink.proto").read_text()
    cls = protoc_class(schema, "Outer", tmp_path)
    msg = cls(seq=0, d=1.5, fl=0.5)
    msg.deep.v = 7
    msg.deep.s = -1  # BAD
    msg.by_id[3].__getattribute__("in").v = 9
    msg.flags[True] = 0
    msg.history.extend([0, -1])
    msg.m.SetInParent()
    [(numeric, strings, _)] = points(decoder(schema, message="Outer", nested="flatten"), msg.SerializeToString())
    assert numeric == {"deep.v": 7.0, "byId.3.in.v": 9.0, "seq": 0.0, "d": 1.5, "sf": 0.0, "fl": 0.5}
    assert strings == {"deep.s": "BAD", "flags.true": "OK", "history.0": "OK", "history.1": "BAD",
                       "LeadingUnder": "", "twoUnders": "", "byId.3.in.s": "OK"}
    # ... the oneof's other members, an unset message and empty lists are absent
    assert not {"raw", "inner", "z", "f32", "mid"} & {k.split(".")[0] for k in numeric | strings}


@needs_protoc
@settings(max_examples=200, deadline=None)
@given(power=st.floats(allow_nan=False, allow_infinity=False), temp=st.integers(-2 ** 31, 2 ** 31 - 1),
       energy=st.integers(0, 2 ** 53), state=st.text(max_size=20), relay=st.booleans(),
       samples=st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), max_size=5))
def test_what_protoc_encodes_decodes_to_the_same_values(tmp_path_factory, power, temp, energy, state, relay,
                                                        samples):
    schema = (PROTOS / "timestamped.proto").read_text()
    cls = protoc_class(schema, "meter.Reading", tmp_path_factory.mktemp("p"))
    msg = cls(ts=1, values={"power_w": power, "temp_c": temp, "energy_wh": energy, "state": state,
                            "relay_on": relay, "samples": samples})
    [(numeric, strings, ts)] = points(decoder(schema, nested="json"), msg.SerializeToString())
    assert ts == 1
    assert (numeric["powerW"], numeric["tempC"], numeric["energyWh"], numeric["relayOn"]) == (
        power, float(temp), float(energy), float(relay))
    assert strings["state"] == state
    assert json.loads(strings.get("samples", "[]")) == samples


@pytest.mark.parametrize("payload,field,reason", [
    (b"\x0a\x05abc", "temperature", "sent as length-delimited bytes, but the schema says double"),
    (b"\x09\x00\x00", "temperature", "the fixed64 runs past the end"),
    (b"\x1a\x05\x0a\x01x", "innerObject", "its length runs past the end"),
    (b"\x1a\x03\x0a\x01\xff", "innerObject.key1", "not UTF-8 text"),
    (b"\x1a\x02\x0f\x01", "innerObject.key1", "wire type 7 is not one proto3 writes"),
    (b"\x1a\x02\x20\xff", "innerObject.key4", "the varint runs past the end"),
    (b"\xff", None, "a field's tag runs past the end"),
])
def test_a_payload_that_does_not_parse_is_refused_naming_the_field(payload, field, reason):
    decode = decoder((PROTOS / "thingsboard.proto").read_text(), nested="json")
    with pytest.raises(PayloadError) as e:
        decode(42, payload, 0)
    assert (e.value.field, e.value.reason) == (field, f"not a SensorDataReading message: {reason}")


def test_content_formats_fields_and_rules():
    schema = (PROTOS / "thingsboard.proto").read_text()
    decode = decoder(schema, fields={"temperature": {"max": 85, "unit": "Cel"}, "humidity": {"rename": "rh"}})
    with pytest.raises(UnsupportedFormat):
        decode(50, b"\x09" + bytes(8), 0)
    # (no bytes is a message at its defaults -- proto3 writes none for them -- here every field
    # with presence unset: no readings)
    with pytest.raises(PayloadError, match="the map has no readings"):
        decode(42, b"", 0)
    [r] = decode(42, b"\x09" + bytes.fromhex("0000000000003440") + b"\x11" + bytes(8), 0)  # 20.0, 0.0
    assert (r.numeric, r.units) == ({"temperature": 20.0, "rh": 0.0}, {"temperature": "Cel"})
    with pytest.raises(RuleViolation) as e:
        decode(42, b"\x09" + bytes.fromhex("0000000000005940"), 0)  # 100.0
    assert e.value.field == "temperature" and "above 85" in e.value.reason
    # unknown fields (a newer device's) are skipped, as protobuf readers do
    assert decode(42, bytes.fromhex("0900000000000034407801"), 0)[0].numeric == {"temperature": 20.0}


def test_a_thingsboard_array_of_one_names_the_broken_rule_by_its_place():
    decode = compile_profile(profile_from({"format": "thingsboard", "fields": {"t": {"max": 1}}}))
    for payload in (b'[{"t": 5}]', b'[{"t": 0}, {"t": 5}]'):
        with pytest.raises(RuleViolation) as e:
            decode(50, payload, 0)
        assert e.value.field == f"[{payload.count(b'{') - 1}].t"
    with pytest.raises(RuleViolation) as e:
        decode(50, b'{"t": 5}', 0)
    assert e.value.field == "t"


def test_corem_profiles_add_takes_a_proto_file(tmp_path):
    d = tmp_path / "data"
    proto = tmp_path / "telemetry.proto"
    proto.write_text((PROTOS / "thingsboard.proto").read_text())
    out = corem_cli("profiles", "add", "sensor", "--proto", str(proto), "--json", '{"nested": "flatten"}',
                    data_dir=d)
    assert "added profile sensor format=protobuf" in out.stdout
    payload = (bytes.fromhex("0900000000000034401a03") + b"\x0a\x01a").hex()
    decoded = json.loads(corem_cli("profiles", "decode", "sensor", "--hex", payload, data_dir=d).stdout)
    assert decoded["points"][0]["numeric_values"] == {"temperature": 20.0}
    assert decoded["points"][0]["string_values"] == {"innerObject.key1": "a"}
    proto.write_text('syntax = "proto3";\nmessage A { int32 x = 1 }')
    bad = corem_cli("profiles", "add", "broken", "--proto", str(proto), data_dir=d, check=False)
    assert bad.returncode != 0 and "schema: line 2:25: expected ';', got '}'" in bad.stderr
