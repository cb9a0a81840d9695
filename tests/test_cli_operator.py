"""The command line as a new operator meets it (issue 30): `tail -f --limit N`, a write to a data dir
no server uses, `tail` on a Kafka data dir, a device added without credentials, `devices list
--json` as the API shows it, and the defaults the CLI and the API share."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import cbor2
import pytest

from corem.admin import schemas
from corem.admin.api import AdminApi, openapi
from corem.cli import build_parser

from .conftest import coap_client, corem_cli, needs_libcoap, post, start_corem, wait_for
from .ports import refused_tcp_port


class Lines:
    """A running CLI's stdout, line by line (select on the pipe; `timeout` only detects a line that
    never comes)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.buffer = b""

    def take(self, n: int, timeout: float = 60.0) -> list[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while self.buffer.count(b"\n") < n:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.proc.stdout], [], [], 0)[0]:
                raise AssertionError(f"wanted {n} lines, have {self.buffer!r}")
            if select.select([self.proc.stdout], [], [], min(left, 1.0))[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk and self.proc.poll() is not None:
                    continue
                self.buffer += chunk
        lines = self.buffer.split(b"\n")
        self.buffer = b"\n".join(lines[n:])
        return [line.decode() for line in lines[:n]]

    def nothing_more(self) -> bool:
        return self.buffer == b"" and not select.select([self.proc.stdout], [], [], 0)[0]


def test_tail_follow_prints_only_the_last_n_then_the_new_ones(tmp_path):
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "TOK-1", data_dir=data)
    server = start_corem(data)
    tail = None
    try:
        for i in range(5):
            assert post(server.coap_port, "TOK-1", cbor2.dumps({"seq": i}), 0x300 + i)[1] == 0x44
        wait_for(lambda: len(server.points()) == 5, what="5 points stored")
        tail = subprocess.Popen([sys.executable, "-m", "corem", "telemetry", "tail", "-f", "--limit", "2", "--json",
                                 "--data-dir", str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                # (Ctrl-C's default back: a shell's background job, or a runner, may
                                # have started the tests with SIGINT ignored, which the child inherits)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines = Lines(tail)
        first = [json.loads(line)["numeric_values"]["seq"] for line in lines.take(2)]
        assert first == [3, 4]
        assert post(server.coap_port, "TOK-1", cbor2.dumps({"seq": 5}), 0x310)[1] == 0x44
        assert json.loads(lines.take(1)[0])["numeric_values"]["seq"] == 5
        assert lines.nothing_more()  # (and nothing of the history before the last 2)
    finally:
        try:
            if tail is not None:
                tail.send_signal(signal.SIGINT)
                try:
                    assert tail.wait(60) == 0
                finally:
                    tail.kill()  # (gone already, unless it did not stop)
        finally:
            server.stop()


def test_a_write_to_a_data_dir_no_server_uses_says_so_and_names_the_running_one(tmp_path):
    served = tmp_path / "served"
    elsewhere = tmp_path / "elsewhere"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d0", "--token", "TOK-0", data_dir=served)
    server = start_corem(served)
    try:
        r = corem_cli("devices", "add", "--tenant", "acme", "--device", "lost", "--token", "TOK-L", data_dir=elsewhere)
        assert "added acme/lost" in r.stdout
        [line] = r.stderr.splitlines()
        assert line.startswith(f"corem: no corem serve runs on data dir {elsewhere.resolve()} (made now): ")
        assert "corem serve runs here on " in line and f"{served.resolve()} (pid {server.proc.pid})" in line
        assert "use --data-dir " in line  # (DIR when other servers run on this machine too)
        again = corem_cli("devices", "remove", "--tenant", "acme", "--device", "lost", data_dir=elsewhere)
        assert "(made now)" not in again.stderr and "no corem serve runs on data dir" in again.stderr
        # the served data dir: the server is told, nothing is said
        ok = corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "TOK-1", data_dir=served)
        assert ok.stderr == "" and post(server.coap_port, "TOK-1", cbor2.dumps({"t": 1}), 0x400)[1] == 0x44
    finally:
        server.stop()
    # no server at all: said, with nothing to name
    r = corem_cli("profiles", "add", "p1", "--json", '{"format": "senml"}', data_dir=served)
    assert r.stderr.startswith(f"corem: no corem serve runs on data dir {served.resolve()}: ")
    assert f"{served.resolve()} (pid" not in r.stderr


def test_tail_on_a_kafka_data_dir_says_so(tmp_path):
    """The server writes to Kafka: `tail` on its data dir says where the readings are instead of
    printing nothing -- while it runs, after it stopped, and when told the bus itself."""
    data = tmp_path / "data"
    with refused_tcp_port() as port:  # (no broker needed: corem starts and waits for it)
        bus = f"kafka://127.0.0.1:{port}"
        server = start_corem(data, "--bus", bus, "--topic-prefix", "x.", "--kafka-timeout", "1")  # (serves after 1 s)
        try:
            r = corem_cli("telemetry", "tail", "--tenant", "acme", data_dir=data, check=False)
            assert r.returncode == 1 and r.stdout == ""
            assert f"its corem serve (pid {server.proc.pid}) writes to {bus}" in r.stderr
            assert "x.telemetry.raw.{tenant}" in r.stderr and "-t x.telemetry.raw.acme" in r.stderr
        finally:
            server.stop()
    r = corem_cli("telemetry", "tail", data_dir=data, check=False)
    assert r.returncode == 1 and f"its last corem serve wrote to {bus}" in r.stderr
    r = corem_cli("telemetry", "tail", "--bus", bus, data_dir=tmp_path / "other", check=False)
    assert r.returncode == 1 and f"bus = {bus}" in r.stderr


def test_tail_of_a_data_dir_without_readings_says_so(tmp_path):
    r = corem_cli("telemetry", "tail", data_dir=tmp_path / "nothing")
    assert r.stdout == "" and r.stderr.startswith("corem: no readings stored in data dir")


@needs_libcoap
def test_devices_add_without_credentials_gets_a_token_as_through_the_api(tmp_path):
    data = tmp_path / "data"
    r = corem_cli("devices", "add", "--tenant", "acme", "--device", "fresh", data_dir=data)
    added, token_line = r.stdout.splitlines()
    assert added == "added acme/fresh profile=default credentials=token"
    token = token_line.removeprefix("token ")
    assert token_line.startswith("token ") and len(token) == 24
    server = start_corem(data)
    try:
        reading = coap_client(f"{server.coap}/api/v1/{token}/telemetry", "-m", "post", "-t", "50", "-e", '{"t": 1}')
        assert reading.code == "2.04", reading.output  # it works
        status, made = server.api("POST", "/api/devices", {"tenant": "acme", "device": "by-api"})
        assert status == 201 and len(made["token"]) == len(token)
    finally:
        server.stop()
    # a device with another credential gets no token, in both
    r = corem_cli("devices", "add", "--tenant", "acme", "--device", "psk", "--psk-identity", "i", "--psk", "12345678",
                  data_dir=data)
    assert r.stdout.splitlines() == ["added acme/psk profile=default credentials=psk"]


def test_devices_list_json_shows_a_device_as_the_api_does(tmp_path):
    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "TOK-1", "--power-mode", "psm",
              data_dir=data)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d2", "--psk-identity", "id-2", "--psk-hex",
              "00112233445566778899", data_dir=data)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d3", "--oscore-sender-id", "", "--oscore-recipient-id",
              "0a", "--oscore-secret", "0123456789abcdef", data_dir=data)
    cli = [json.loads(line) for line in corem_cli("devices", "list", "--json", data_dir=data).stdout.splitlines()]
    server = start_corem(data)
    try:
        api = server.api("GET", "/api/devices?tenant=acme")[1]
    finally:
        server.stop()
    record = set(schemas.DeviceRecord.__struct_fields__)
    assert [{k: v for k, v in d.items() if k in record} for d in api] == cli
    text = json.dumps(cli)
    assert "TOK-1" not in text and "00112233" not in text and "30313233" not in text  # no secret
    secret = [json.loads(line) for line in
              corem_cli("devices", "list", "--json", "--secrets", data_dir=data).stdout.splitlines()]
    assert [(d["device"], d["token"], d["psk_hex"]) for d in secret] == [
        ("d1", "TOK-1", None), ("d2", None, "00112233445566778899"), ("d3", None, None)]
    assert secret[2]["oscore_secret_hex"] == b"0123456789abcdef".hex()


def _cli_default(*command: str, dest: str):
    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
        parser = sub.choices[name]
    return next(a.default for a in parser._actions if a.dest == dest)


def test_the_cli_and_the_api_agree_on_defaults():
    doc = openapi(AdminApi(None).routes())  # type: ignore[arg-type]
    new = doc["components"]["schemas"]["DeviceNew"]["properties"]
    for key in ("profile", "power_mode", "topics", "gateways"):
        assert _cli_default("devices", "add", dest=key) == new[key]["default"] == schemas.DEVICE_DEFAULTS[key], key
    rpc = doc["components"]["schemas"]["RpcRequest"]["properties"]["timeout"]["default"]
    ttl = doc["components"]["schemas"]["CommandRequest"]["properties"]["ttl"]["default"]
    assert _cli_default("rpc", dest="timeout") == rpc and _cli_default("command", dest="ttl") == ttl


def test_an_empty_choice_on_the_command_line_is_the_default_as_in_the_api(data_dir):
    """`--power-mode ''` (a Literal's flag) is the default, as an empty power_mode is in the API and
    the import: not argparse's 'invalid choice'."""
    corem_cli("devices", "add", "--tenant", "acme", "--device", "e1", "--token", "TOK-E", "--power-mode", "",
              "--profile", "", data_dir=data_dir)
    [row] = json.loads(corem_cli("devices", "list", "--json", data_dir=data_dir).stdout.splitlines()[0].join("[]"))
    assert (row["power_mode"], row["profile"]) == ("drx", "default")


@pytest.mark.parametrize("made_by", ["cli", "api"])
def test_a_device_added_with_nothing_but_its_name_is_the_same_through_both(tmp_path, made_by):
    data = tmp_path / "data"
    if made_by == "cli":
        corem_cli("devices", "add", "--tenant", "acme", "--device", "plain", data_dir=data)
    server = start_corem(data)
    try:
        if made_by == "api":
            assert server.api("POST", "/api/devices", {"tenant": "acme", "device": "plain"})[0] == 201
        got = server.api("GET", "/api/devices/acme/plain")[1]
    finally:
        server.stop()
    assert {k: got[k] for k in ("profile", "power_mode", "topics", "gateways", "has_token", "psk_identity")} == {
        "profile": "default", "power_mode": "drx", "topics": "#", "gateways": "", "has_token": True,
        "psk_identity": None}
