"""Fleet onboarding: `corem devices import`, `POST /api/devices/import`, and a running server
that serves the imported devices as soon as the command returns."""

from __future__ import annotations

import json

import pytest

from corem.errors import BadInput
from corem.registry import Registry, RegistryError
from corem.registry.bulk import import_devices, read_lines

from .conftest import coap_client, corem_cli, needs_libcoap, start_corem

CSV = "tenant,device,token,profile,psk_identity,psk\n" + "".join(
    f"fleet,dev-{i},tok-{i},default,id-{i},key-{i:08d}\n" for i in range(250))


def test_import_is_idempotent_and_written_a_chunk_at_a_time(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    try:
        seen = []
        assert import_devices(reg, read_lines(CSV, "csv"), chunk=100, progress=seen.append) == (250, 0, 0)
        assert seen == [100, 200, 250]
        assert import_devices(reg, read_lines(CSV, "csv"), chunk=100) == (0, 250, 0)  # again: nothing new
        d = {x.device: x for x in reg.list_devices("fleet")}["dev-7"]
        assert (d.token, d.psk_identity, d.psk) == ("tok-7", "id-7", b"key-00000007")
        changed = "tenant,device,token\nfleet,dev-7,tok-7b\n"
        with pytest.raises(RegistryError, match="line 2: device fleet/dev-7 exists with other settings"):
            import_devices(reg, read_lines(changed, "csv"))
        assert import_devices(reg, read_lines(changed, "csv"), replace=True) == (0, 0, 1)
        assert {x.device: x for x in reg.list_devices("fleet")}["dev-7"].token == "tok-7b"
    finally:
        reg.close()


def test_oscore_contexts_are_imported_and_their_recipient_ids_are_unique(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    try:
        lines = [{"tenant": "fleet", "device": f"o{i}", "oscore_sender_id": "", "oscore_recipient_id": f"{i:02x}",
                  "oscore_secret_hex": "00" * 16} for i in range(3)]
        text = "".join(json.dumps(x) + "\n" for x in lines)
        assert import_devices(reg, read_lines(text, "jsonl")) == (3, 0, 0)
        assert import_devices(reg, read_lines(text, "jsonl")) == (0, 3, 0)
        d = {x.device: x for x in reg.list_devices("fleet")}["o2"]
        assert (d.oscore.sender_id, d.oscore.recipient_id, d.oscore.secret) == (b"", b"\x02", bytes(16))
        clash = json.dumps({"tenant": "fleet", "device": "o9", "oscore_sender_id": "", "oscore_recipient_id": "01",
                            "oscore_secret_hex": "11" * 16})
        with pytest.raises(RegistryError, match="line 1: oscore_recipient_id: already used by fleet/o1"):
            import_devices(reg, read_lines(clash, "jsonl"))
    finally:
        reg.close()


@pytest.mark.parametrize("text, kind, error", [
    ("tenant,device,tokn\nx,y,z\n", "csv", "line 1: the header names tokn"),
    ("tenant,device\nacme,bad device\n", "csv", "line 2: device: 'bad device' is not valid"),
    ("tenant,device,token\nacme,a,T\nacme,b,T\n", "csv", "line 3: token: already used by acme/a"),
    ("tenant,device,psk_identity\nacme,a,id\n", "csv", "line 2: psk: a PSK identity and a key go together"),
    ('{"tenant": "acme", "device": "a"}\n[1]\n', "jsonl", "line 2: not a JSON object"),
    ('{"tenant": "acme"}\n', "jsonl", "line 1: device: required"),
    ('{"tenant": "acme", "device": "a", "colour": "red"}\n', "jsonl", "line 1: colour: unknown field"),
    ('{"tenant": "acme", "device": "a", "token": 5}\n', "jsonl", "line 1: token: expected text"),
    # (found by review: a lone surrogate in a key was a UnicodeEncodeError, a 500 and a traceback)
    ('{"tenant": "acme", "device": "a", "psk_identity": "i", "psk": "\\ud800abcdefgh"}\n', "jsonl",
     "line 1: psk: not valid Unicode text"),
])
def test_a_bad_line_is_named_and_the_chunks_before_it_stay(tmp_path, text, kind, error):
    reg = Registry(tmp_path / "registry.db")
    try:
        with pytest.raises(RegistryError) as e:
            import_devices(reg, read_lines(text, kind), chunk=1)
        assert str(e.value).startswith(error), e.value
        assert len(reg.list_devices()) == (1 if error.startswith(("line 3", "line 2: not a JSON")) else 0)
    finally:
        reg.close()


@needs_libcoap
def test_a_running_server_serves_imported_devices_when_the_command_returns(tmp_path):
    d = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "first", "--token", "FIRST", data_dir=d)
    server = start_corem(d)
    try:
        (tmp_path / "fleet.csv").write_text(CSV)
        out = corem_cli("devices", "import", str(tmp_path / "fleet.csv"), data_dir=d).stdout
        assert "imported 250 devices" in out and "250 added" in out
        r = coap_client(f"{server.coap}/api/v1/tok-249/telemetry", "-m", "post", "-t", "50", "-e", '{"t": 1}')
        assert r.code == "2.04", r.output  # no wait for the registry poll: the import nudged it
        lines = "\n".join(json.dumps({"tenant": "api", "device": f"a{i}", "token": f"api-{i}"}) for i in range(3))
        status, body = server.api("POST", "/api/devices/import?format=jsonl", raw=lines.encode())
        assert (status, body) == (200, {"added": 3, "unchanged": 0, "replaced": 0})
        assert server.api("POST", "/api/devices/import?format=jsonl", raw=lines.encode())[1]["unchanged"] == 3
        status, body = server.api("POST", "/api/devices/import", raw=b"tenant,device,token\napi,a0,other\n")
        assert status == 409 and body["error"].startswith("line 2: device api/a0 exists with other settings")
        r = coap_client(f"{server.coap}/api/v1/api-2/telemetry", "-m", "post", "-t", "50", "-e", '{"t": 2}')
        assert r.code == "2.04", r.output
        assert server.metrics()["corem_registry_devices"] == 254
    finally:
        server.stop()


@pytest.mark.parametrize("text, kind, why", [
    ("[" * 100_000 + "\n", "jsonl", "line 1: not a JSON object (nested too deep)"),
    ("tenant,device,token\nacme,d1," + "x" * 200_000 + "\n", "csv", "file: not CSV after line 1 (field larger than"),
    ('tenant,device,token\nacme,d1,"' + "x" * 200_000 + "\n", "csv", "file: not CSV after line "),
])
def test_a_document_the_readers_cannot_take_is_refused_naming_the_line(text, kind, why):
    """The admin API's import answered 500 with a traceback for these (an adversarial run)"""
    with pytest.raises(BadInput) as e:
        list(read_lines(text, kind))
    assert str(e.value).startswith(why) and ("CSV" in str(e.value) or kind == "jsonl"), e.value


def test_an_import_that_moves_a_token_to_a_new_device_in_one_chunk_works(tmp_path):
    """A line replacing an existing device's token, then a line giving that token to a new device:
    the replacement is written first in the chunk's transaction (the insert met the token still
    held, and the import failed every time, saying another writer had stored meanwhile)."""
    reg = Registry(tmp_path / "registry.db")
    reg.add_device("acme", "old", token="T1")
    text = "tenant,device,token\nacme,old,T2\nacme,new,T1\n"
    assert import_devices(reg, read_lines(text, "csv"), replace=True) == (1, 0, 1)
    assert {d.device: d.token for d in reg.list_devices()} == {"old": "T2", "new": "T1"}
