"""The contracts corem publishes (issue 30): the admin API's OpenAPI document (valid, every
operation named, tagged and its answers described, and real answers as it says), the JSON Schemas
of the bus records (up to date with the Structs, and the records a running server writes valid
against them), the standard record headers (content-type, device_id, creation-time) on every
record, and `topic_prefix` before every topic corem writes and reads."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cbor2
import msgspec
import pytest

from corem import contracts
from corem.bus import read_records
from corem.ingest.point import TelemetryPoint
from corem.ingest.presence import PresenceEvent

from .conftest import coap_client, corem_cli, needs_libcoap, post, serving_one_device, start_corem, wait_for

CI = os.environ.get("CI") == "true"
jsonschema_rs = pytest.importorskip("jsonschema_rs") if not CI else __import__("jsonschema_rs")
STANDARD = ("content-type", "device_id", "creation-time")


def _openapi_validator():
    try:
        from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
    except ImportError:
        if CI:
            raise
        pytest.skip("schemathesis (its OpenAPI 3.1 meta-schema) is not installed")
    return OPENAPI_31_VALIDATOR


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving_one_device(tmp_path_factory, "contracts")


# -- the OpenAPI document ---------------------------------------------------------------------------
def test_openapi_document_is_valid_and_every_operation_is_named_tagged_and_described(server):
    status, doc = server.api("GET", "/api/openapi.json", token=None)
    assert status == 200
    errors = [str(e) for e in _openapi_validator().iter_errors(doc)]
    assert errors == []
    tags = {t["name"] for t in doc["tags"]}
    ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            ids.append(op["operationId"])
            assert op["tags"] and set(op["tags"]) <= tags, where
            assert op["responses"], where
            for code, answer in op["responses"].items():
                assert answer["description"], (where, code)
                if code != "204":  # every answer with a body says what it is
                    [(media, content)] = answer["content"].items()
                    assert content["schema"], (where, code)
            if op.get("security"):
                assert {"400", "401"} <= set(op["responses"]), where
    assert len(ids) == len(set(ids)) >= 25
    # the operator's endpoints are in it, as text
    for path in ("/metrics", "/healthz", "/readyz"):
        op = doc["paths"][path]["get"]
        assert op["tags"] == ["operations"] and "security" not in op
        assert "text/plain" in op["responses"]["200"]["content"]
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]
    # every schema in it is a valid JSON Schema (2020-12, OpenAPI 3.1's dialect)
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_request_bodies_are_the_definitions_the_handlers_check_with(server):
    """The document's bodies are BODIES (what `_fields` checks) and the Profile Struct's schema."""
    from corem.admin.api import BODIES
    from corem.profiles.spec import Profile

    doc = server.api("GET", "/api/openapi.json", token=None)[1]
    schemas = doc["components"]["schemas"]
    for name, (allowed, required) in BODIES.items():
        assert schemas[name]["properties"] == json.loads(json.dumps(allowed))
        assert schemas[name].get("required", []) == list(required)
        assert schemas[name]["additionalProperties"] is False
    post_device = doc["paths"]["/api/devices"]["post"]
    assert post_device["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/DeviceNew"}
    _, made = msgspec.json.schema_components([Profile], ref_template="#/components/schemas/{name}")
    assert schemas["Profile"] == made["Profile"]
    put = doc["paths"]["/api/profiles/{name}"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Profile"}


def _answer_validator(doc: dict, path: str, method: str, status: int):
    answer = doc["paths"][path][method]["responses"][str(status)]
    schema = answer["content"]["application/json"]["schema"]
    return jsonschema_rs.Draft202012Validator({**schema, "components": doc["components"]})


def test_answers_are_what_the_document_says(server, tmp_path):
    """Real answers of the API, each validated against its documented schema."""
    doc = server.api("GET", "/api/openapi.json", token=None)[1]
    dev = "/api/devices/{tenant}/{device}"
    calls = [
        ("POST", "/api/devices", "/api/devices", {"tenant": "acme", "device": "c-1"}, 201),
        ("POST", "/api/devices", "/api/devices", {"tenant": "acme", "device": "c-2", "oscore_sender_id": "",
                                                  "oscore_recipient_id": "0c", "oscore_secret": "0123456789abcdef"}, 201),
        ("POST", "/api/devices", "/api/devices", {"tenant": "acme", "device": "c-1"}, 409),
        ("POST", "/api/devices", "/api/devices", {"tenant": "acme"}, 400),
        ("GET", "/api/devices", "/api/devices", None, 200),
        ("GET", "/api/devices/acme/c-2", dev, None, 200),
        ("GET", "/api/devices/acme/nobody", dev, None, 404),
        ("GET", "/api/devices/acme/c-1/attributes", dev + "/attributes", None, 200),
        ("PUT", "/api/devices/acme/c-1/attributes", dev + "/attributes", {"interval": 5}, 200),
        ("POST", "/api/devices/acme/c-1/rpc", dev + "/rpc", {"method": "m", "timeout": 0.2}, 504),
        ("POST", "/api/devices/acme/c-1/commands", dev + "/commands", {"command": "blink"}, 202),
        ("POST", "/api/provisioning-keys", "/api/provisioning-keys", {"key": "k1", "secret": "s1", "tenant": "acme"}, 201),
        ("GET", "/api/packages", "/api/packages", None, 200),
        ("GET", "/api/status", "/api/status", None, 200),
        ("GET", "/api/diagnostics/samples", "/api/diagnostics/samples", None, 200),
        ("GET", "/api/diagnostics/history", "/api/diagnostics/history", None, 200),
        ("PUT", "/api/profiles/p1", "/api/profiles/{name}", {"format": "senml"}, 201),
        ("PUT", "/api/profiles/p1", "/api/profiles/{name}", {"format": "senml", "description": "x"}, 200),
        ("GET", "/api/profiles", "/api/profiles", None, 200),
        ("GET", "/api/profiles/default", "/api/profiles/{name}", None, 200),
        ("POST", "/api/profiles/default/decode", "/api/profiles/{name}/decode",
         {"content_format": 50, "hex": b'{"t": 1}'.hex()}, 200),
        ("POST", "/api/profiles/default/decode", "/api/profiles/{name}/decode", {"content_format": 50, "hex": "00"}, 422),
        ("DELETE", "/api/profiles/default", "/api/profiles/{name}", None, 409),
    ]
    for method, url, path, body, want in calls:
        status, answer = server.api(method, url, body)
        assert status == want, (method, url, answer)
        errors = [e.message for e in _answer_validator(doc, path, method.lower(), status).iter_errors(answer)]
        assert errors == [], (method, url, status, answer)
    # an upload (raw body) and an assignment
    status, package = server.api("POST", "/api/packages?kind=firmware&title=fw&version=1", raw=b"\x00" * 10)
    assert status == 201 and _answer_validator(doc, "/api/packages", "post", 201).is_valid(package)
    status, assigned = server.api("PUT", "/api/devices/acme/c-1/firmware", {"package": package["id"]})
    assert status == 200 and _answer_validator(doc, dev + "/firmware", "put", 200).is_valid(assigned)
    status, imported = server.api("POST", "/api/devices/import?format=jsonl",
                                  raw=b'{"tenant": "acme", "device": "c-3", "token": "c3-token"}\n')
    assert status == 200 and _answer_validator(doc, "/api/devices/import", "post", 200).is_valid(imported)


# -- the records' schemas --------------------------------------------------------------------------
def test_the_published_schemas_are_made_from_the_structs():
    """docs/schemas/*.schema.json are what `python -m corem.contracts` makes now: a change to the
    Structs without the files (or the other way round) fails here."""
    assert contracts.stale() == [], "run: python -m corem.contracts"
    for name in contracts.schemas():
        published = json.loads((contracts.PUBLISHED / name).read_text())
        assert jsonschema_rs.meta.is_valid(published) and published["$schema"].endswith("2020-12/schema")


def _published(name: str):
    return jsonschema_rs.Draft202012Validator(json.loads((contracts.PUBLISHED / name).read_text()))


def _bus(data: Path) -> list:
    return list(read_records(data / "bus.db", ""))


@needs_libcoap
def test_every_record_has_the_prefix_the_standard_headers_and_a_valid_value(tmp_path):
    """A corem serve with topic_prefix = 'site-7.': readings (the C lane's, and the Python path's
    for a device whose stored profile decodes SenML), a ThingsBoard client attribute, an EMQX /ps
    publish, a presence transition and an RPC's result all go on topics under the prefix, each
    record with content-type, device_id and creation-time; the readings and presence events
    validate against the published schemas and decode strictly with their Structs; a reading's
    creation-time is its received_at on both paths, which give the same headers."""
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "TOK-d1", data_dir=data)
    corem_cli("profiles", "add", "senml", "--json", '{"format": "senml"}', data_dir=data)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d2", "--token", "TOK-d2", "--profile", "senml",
              data_dir=data)
    server = start_corem(data, "--topic-prefix", "site-7.", "--fast-lane", "on")
    try:
        assert post(server.coap_port, "TOK-d1", cbor2.dumps({"t": 21.5}), 0x100)[1] == 0x44  # the C lane's (tests/test_fastlane.py)
        assert coap_client(f"{server.coap}/api/v1/TOK-d2/telemetry", "-m", "post", "-t", "110",
                           "-e", '[{"n": "t", "v": 22.5, "u": "Cel"}]').code == "2.04"  # Python's (a profile)
        assert coap_client(f"{server.coap}/api/v1/TOK-d1/attributes", "-m", "post", "-t", "50",
                           "-e", '{"fw": "1.2"}').code == "2.04"
        assert coap_client(f"{server.coap}/ps/room/temp?c=c1&u=d1&p=TOK-d1", "-m", "post", "-t", "0",
                           "-e", "21").code == "2.04"
        status, _ = server.api("POST", "/api/devices/acme/d1/rpc", {"method": "m", "timeout": 0.2})
        assert status == 504
        wait_for(lambda: {r.topic for r in _bus(data)} >= {
            "site-7.telemetry.raw.acme", "site-7.attributes.acme", "site-7.pubsub.acme",
            "site-7.device.presence.acme", "site-7.commands.results.acme"}, what="a record on every topic")
        # the CLI reads the prefixed topics: given the prefix, or as the data dir's server recorded it
        for args in (("--topic-prefix", "site-7."), ()):
            out = corem_cli("telemetry", "tail", "--json", "--limit", "0", *args, data_dir=data).stdout
            assert len(out.splitlines()) == 2, args
    finally:
        server.stop()
    records = _bus(data)
    assert records and all(r.topic.startswith("site-7.") for r in records)
    now = int(time.time() * 1000)
    for r in records:
        assert set(STANDARD) <= set(r.headers), (r.topic, r.headers)
        assert r.headers["device_id"] in ("d1", "d2")
        # (a /ps message is keyed by its topic; every other record by its device)
        assert r.key == (b"room/temp" if r.topic == "site-7.pubsub.acme" else r.headers["device_id"].encode())
        assert now - 600_000 < int(r.headers["creation-time"]) <= now
    point_schema, presence_schema = _published("telemetry-point.schema.json"), _published("presence-event.schema.json")
    readings = [r for r in records if r.topic == "site-7.telemetry.raw.acme"]
    assert len(readings) == 2
    strict = msgspec.json.Decoder(TelemetryPoint, strict=True)
    for r in readings:
        value = json.loads(r.value)
        assert [e.message for e in point_schema.iter_errors(value)] == []
        assert set(value) <= set(json.loads((contracts.PUBLISHED / "telemetry-point.schema.json").read_text())["properties"])
        point = strict.decode(r.value)
        assert r.headers["content-type"] == "application/json"
        assert r.headers["creation-time"] == str(point.received_at)
        assert r.headers["protocol"] == "coap" and r.headers["coap-exchange"].startswith("udp 127.0.0.1 ")
    # the two paths give the same headers (names; the values differ by device, exchange and time only)
    assert set(readings[0].headers) == set(readings[1].headers)
    assert [r.headers["profile"] for r in readings] == ["default", "senml"]
    assert json.loads(readings[1].value)["units"] == {"t": "Cel"}
    presence = [r for r in records if r.topic == "site-7.device.presence.acme"]
    for r in presence:
        assert presence_schema.is_valid(json.loads(r.value))
        msgspec.json.Decoder(PresenceEvent, strict=True).decode(r.value)
        assert r.headers["type"] == "presence"
    [ps] = [r for r in records if r.topic == "site-7.pubsub.acme"]
    assert ps.headers["content-type"] == "text/plain; charset=utf-8" and ps.value == b"21"
    assert all(r.headers["content-type"] == "application/json" for r in records if r.topic != "site-7.pubsub.acme")


def test_topic_prefix_is_checked():
    r = corem_cli("config", "show", "--topic-prefix", "bad prefix/", data_dir=Path("/nonexistent"), check=False)
    assert r.returncode == 2 and r.stderr.startswith("corem: topic_prefix: 'bad prefix/' is not a topic prefix")


def test_one_owner_names_every_topic():
    """No topic is spelled outside corem/bus/topics.py (the prefix would miss it)."""
    root = Path(__file__).resolve().parent.parent / "corem"
    spelled = []
    for path in root.rglob("*.py"):
        if path.name == "topics.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for name in ('"telemetry.raw.', '"attributes."', '"pubsub."', '"device.presence."', '"commands.',
                         "'telemetry.raw."):
                if name in code:
                    spelled.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert spelled == []


# -- Kafka: the prefix on what corem reads too ---------------------------------------------------
from .test_kafka import BINARY, EXTERNAL, broker, consume, produce, unique_topic_tenant  # noqa: E402,F401


@pytest.mark.skipif(not EXTERNAL and BINARY is None and not CI, reason="no Kafka-protocol broker")
def test_kafka_topics_under_the_prefix_readings_commands_and_results(broker, tmp_path):
    tenant = unique_topic_tenant()
    prefix = "p7."
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", tenant, "--device", "d1", "--token", "TOK-P7", data_dir=data)
    server = start_corem(data, "--bus", f"kafka://{broker.bootstrap}", "--topic-prefix", prefix,
                         "--kafka-commands-refresh", "0.3")
    try:
        assert post(server.coap_port, "TOK-P7", cbor2.dumps({"t": 1.5}), 0x200)[1] == 0x44
        [reading] = consume(broker.bootstrap, f"{prefix}telemetry.raw.{tenant}", 1)
        headers = {k: v.decode() for k, v in reading.headers}
        point = msgspec.json.decode(reading.value, type=TelemetryPoint)
        assert headers["content-type"] == "application/json" and headers["device_id"] == "d1"
        assert headers["creation-time"] == str(point.received_at)
        assert _published("telemetry-point.schema.json").is_valid(json.loads(reading.value))
        produce(broker.bootstrap, f"{prefix}commands.{tenant}",
                [json.dumps({"device": "d1", "type": "attributes", "values": {"n": 1}, "request_id": "r1"}).encode()])
        [result] = consume(broker.bootstrap, f"{prefix}commands.results.{tenant}", 1)
        assert json.loads(result.value)["request_id"] == "r1"
        assert {k: v.decode() for k, v in result.headers}["device_id"] == "d1"
    finally:
        server.stop()
