"""Downlink requests as records of `commands.{tenant}` (corem/devices/commands.py), sans-IO: parsed
by the same Structs as the admin API's bodies (corem/devices/requests.py), refused by kind with
the field named, never crashing the reader."""

from __future__ import annotations

import json

import pytest

from corem.devices.commands import apply
from corem.devices.requests import COMMAND_TTL, RPC_TIMEOUT, CommandRequest, RpcRequest
from corem.errors import BadInput
from corem.inputs import check

from .test_downlink import Stack


@pytest.fixture
def stack(tmp_path):
    return Stack(tmp_path, max_queued=1)


def run(stack: Stack, record: dict | bytes) -> dict:
    value = record if isinstance(record, bytes) else json.dumps(record).encode()
    return apply("acme", value, stack.directory, stack.downlink, stack.management)


def test_each_type_is_carried_out_and_answered(stack):
    got = run(stack, {"device": "awake", "type": "rpc", "method": "reboot", "request_id": "r1"})
    assert got["status"] == "accepted" and got["rpc_id"] >= 1 and got["request_id"] == "r1"
    call = stack.downlink._rpcs[got["rpc_id"]]
    assert call.deadline == pytest.approx(stack.now + RPC_TIMEOUT)  # the API's default: one definition
    got = run(stack, {"device": "awake", "type": "command", "command": "blink", "payload_base64": "AAE="})
    assert got["status"] == "accepted" and got["delivery"] == "queued"
    assert stack.downlink._queues[("acme", "awake")].commands[0][1:] == (b"\x00\x01", stack.now + COMMAND_TTL)
    got = run(stack, {"device": "awake", "type": "attributes", "values": {"interval": 15}})
    assert got["status"] == "accepted" and stack.management.attributes("acme", "awake", "shared") == {"interval": 15}


@pytest.mark.parametrize("record, reason", [
    (b"not json", "value: not valid JSON"),
    (b"[1]", "value: expected a JSON object"),
    (b"[" * 100_000, "value: not valid JSON"),  # (past the parser's depth: RecursionError, found by review)
    ({"device": "ghost", "type": "rpc", "method": "m"}, "device: 'ghost' is not registered in tenant 'acme'"),
    ({"device": "awake", "type": "reboot"}, "type: 'reboot' is not one of rpc, command, attributes, firmware"),
    ({"device": "awake", "type": "rpc"}, "method: required"),
    ({"device": "awake", "type": "rpc", "method": "m", "oneway": "yes"}, "oneway: expected a boolean"),
    ({"device": "awake", "type": "rpc", "method": "m", "timeout": -1}, "timeout: seconds, more than 0"),
    ({"device": "awake", "type": "rpc", "method": "m", "colour": 1}, "colour: unknown field; allowed: method"),
    ({"device": "awake", "type": "command", "command": "c", "payload": 5}, "payload: expected a string"),
    ({"device": "awake", "type": "command", "command": "c", "payload": "a", "payload_base64": "AA=="},
     "payload: give payload or payload_base64, not both"),
    ({"device": "awake", "type": "attributes", "values": {"bad key": 1}}, "attributes.bad key: not a valid key"),
    ({"device": "awake", "type": "firmware", "package": 99}, "package: no package with id 99"),
    # (found by review: a lone surrogate raised UnicodeEncodeError out of the reader, which then
    # ended corem -- and read the same record again at every start)
    ({"device": "awake", "type": "command", "command": "\ud800"}, "command: not valid Unicode text"),
    ({"device": "awake", "type": "command", "command": "c", "payload": "\ud800"}, "payload: not valid Unicode text"),
])
def test_a_bad_record_is_rejected_naming_the_field(stack, record, reason):
    got = run(stack, record)
    assert got["status"] == "rejected" and got["reason"].startswith(reason), got


def test_a_bug_a_record_finds_is_a_logged_rejection_not_the_readers_end(stack, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(stack.downlink, "send_rpc", broken)
    got = run(stack, {"device": "awake", "type": "rpc", "method": "m"})
    assert got["status"] == "rejected" and got["reason"] == "internal error (logged)"
    assert "could not be carried out" in caplog.text


def test_a_record_too_deep_to_parse_names_no_device_and_is_rejected():
    from corem.cluster import command_device
    assert command_device("acme", b"[" * 100_000) is None and command_device("acme", b'{"device": "d"}') == ("acme", "d")


def test_a_full_queue_is_a_rejection_not_a_crash(stack):
    assert run(stack, {"device": "awake", "type": "command", "command": "one"})["status"] == "accepted"
    got = run(stack, {"device": "awake", "type": "command", "command": "two"})
    assert got["status"] == "rejected" and "1 commands queued already" in got["reason"]


def test_the_api_and_the_bus_parse_a_request_alike():
    """One parse: the API's body and the record's fields give the same request, or the same refusal."""
    body = {"method": "m", "params": {"a": 1}, "timeout": 5, "oneway": True}
    assert check(RpcRequest, body) == RpcRequest(method="m", params={"a": 1}, timeout=5, oneway=True)
    assert check(CommandRequest, {"command": "c"}).payload_bytes() == b""
    with pytest.raises(BadInput, match="^ttl: expected a number$"):
        check(CommandRequest, {"command": "c", "ttl": "soon"})
