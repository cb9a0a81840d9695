"""The command line: device management, telemetry tail, and start-up errors that name the key."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from .conftest import corem_cli, needs_libcoap


def serve(*args: str, data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corem", "serve", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=60)


def test_devices_add_list_remove(tmp_path):
    d = tmp_path / "data"
    out = corem_cli("devices", "add", "--tenant", "t1", "--device", "a", "--token", "tok-a", data_dir=d).stdout
    assert "added t1/a" in out and "credentials=token" in out
    corem_cli("devices", "add", "--tenant", "t1", "--device", "b", "--psk-identity", "id-b", "--psk-hex",
              "00112233445566778899", data_dir=d)
    rows = [json.loads(line) for line in corem_cli("devices", "list", "--json", data_dir=d).stdout.splitlines()]
    assert [(r["tenant"], r["device"], r["has_token"], r["psk_identity"]) for r in rows] == [
        ("t1", "a", True, None), ("t1", "b", False, "id-b")]
    assert all("psk" not in r and "token" not in r for r in rows)  # secrets only with --secrets
    table = corem_cli("devices", "list", data_dir=d).stdout
    assert "psk:id-b" in table and "00112233" not in table
    assert "removed t1/a" in corem_cli("devices", "remove", "--tenant", "t1", "--device", "a", data_dir=d).stdout
    gone = corem_cli("devices", "remove", "--tenant", "t1", "--device", "a", data_dir=d, check=False)
    assert gone.returncode == 1 and "not found" in gone.stderr


def test_device_errors_name_the_field(tmp_path):
    d = tmp_path / "data"
    cases = [
        (["--tenant", "bad tenant", "--device", "x"], "tenant: 'bad tenant' is not valid"),
        (["--tenant", "t", "--device", "x", "--token", "a/b"], "token: not valid; allowed"),  # the token itself is not repeated
        (["--tenant", "t", "--device", "x", "--psk-identity", "i"], "psk: a PSK identity and a key go together"),
        (["--tenant", "t", "--device", "x", "--psk-identity", "i", "--psk", "short"], "psk: 5 bytes"),
        (["--tenant", "t", "--device", "x", "--psk-identity", "i", "--psk-hex", "zz"], "psk_hex: not hexadecimal"),
    ]
    for args, message in cases:
        r = corem_cli("devices", "add", *args, data_dir=d, check=False)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    corem_cli("devices", "add", "--tenant", "t", "--device", "x", "--token", "same", data_dir=d)
    dup = corem_cli("devices", "add", "--tenant", "t", "--device", "y", "--token", "same", data_dir=d, check=False)
    assert dup.returncode == 2 and "token: already used" in dup.stderr


def test_tail_on_an_empty_data_dir(tmp_path):
    assert corem_cli("telemetry", "tail", data_dir=tmp_path / "nothing").stdout == ""


def test_start_up_errors_are_one_line_naming_the_key(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    r = serve("--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--http", "off", "--dtls-cert", str(bad),
              "--dtls-key", str(bad), "--dtls-ca", str(bad), data_dir=tmp_path / "d1")
    assert r.returncode == 2 and "corem: dtls:" in r.stderr and "Traceback" not in r.stderr
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        r = serve("--coap", f"127.0.0.1:{busy.getsockname()[1]}", "--coaps", "off", "--http", "off",
                  data_dir=tmp_path / "d2")
    finally:
        busy.close()
    assert r.returncode == 2 and "corem: coap: cannot listen on" in r.stderr and "Traceback" not in r.stderr
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    r = serve("--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--http", "off", "--dtls-cert", str(cert),
              data_dir=tmp_path / "d4")
    assert r.returncode == 2 and "corem: dtls: dtls_cert and dtls_key go together" in r.stderr, r.stderr
    r = serve("--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--http", "off", "--dtls-cert", str(cert),
              "--dtls-key", str(cert), data_dir=tmp_path / "d5")
    assert r.returncode == 2 and "corem: dtls: dtls_ca is needed" in r.stderr, r.stderr
    r = serve("--coap", "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--http", "off", "--dtls-ciphers", "TLS-NOPE",
              data_dir=tmp_path / "d6")
    assert r.returncode == 2 and "corem: dtls_ciphers: 'TLS-NOPE' is not a cipher suite" in r.stderr, r.stderr
    r = serve("--coap", "nowhere", data_dir=tmp_path / "d3")
    assert r.returncode == 2 and "corem: coap: 'nowhere' is not HOST:PORT" in r.stderr


def test_json_logs_are_one_object_per_line(tmp_path):
    from .conftest import start_corem

    server = start_corem(tmp_path / "data", "--log-format", "json")
    assert server.stop() == 0
    lines = [json.loads(line) for line in server.stderr().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert any(line["msg"].startswith("started") for line in lines) and lines[-1]["msg"] == "stopped"


def test_runtime_commands_go_through_the_admin_api(tmp_path):
    from .conftest import start_corem

    d = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "t1", "--device", "s", "--token", "tok-s", "--power-mode", "psm",
              "--topics", "room/# hall/+", data_dir=d)
    server = start_corem(d, "--admin-token", "")  # generated into data_dir/admin-token: the CLI finds it there
    try:
        http = ["--http", f"127.0.0.1:{server.http_port}"]
        out = corem_cli("attributes", "set", "--tenant", "t1", "--device", "s", "mode=eco", "limit=5", *http, data_dir=d)
        assert json.loads(out.stdout) == {"delivery": "queued"}  # a PSM device that has not talked sleeps
        got = json.loads(corem_cli("attributes", "get", "--tenant", "t1", "--device", "s", *http, data_dir=d).stdout)
        assert got["shared"] == {"mode": "eco", "limit": 5}
        (tmp_path / "fw.bin").write_bytes(b"\x01" * 3000)
        pkg = json.loads(corem_cli("firmware", "upload", str(tmp_path / "fw.bin"), "--title", "fw", "--version", "3",
                                   *http, data_dir=d).stdout)
        assert pkg["size"] == 3000
        for missing in (tmp_path / "nope.bin", tmp_path):  # (one line, as profiles add --file: no traceback)
            bad = corem_cli("firmware", "upload", str(missing), "--title", "fw", "--version", "4", *http, data_dir=d,
                            check=False)
            assert bad.returncode == 2 and bad.stderr.startswith(f"corem: file: cannot read {missing}: "), bad.stderr
        corem_cli("firmware", "assign", "--tenant", "t1", "--device", "s", "--package", str(pkg["id"]), *http, data_dir=d)
        assert server.api("GET", "/api/devices/t1/s/attributes", token=(d / "admin-token").read_text().strip())[1][
            "shared"]["fw_version"] == "3"
        queued = json.loads(corem_cli("command", "--tenant", "t1", "--device", "s", "--name", "blink", *http,
                                      data_dir=d).stdout)
        assert queued == {"delivery": "queued"}
        timeout = corem_cli("rpc", "--tenant", "t1", "--device", "s", "--method", "m", "--timeout", "0.2", *http,
                            data_dir=d, check=False)
        assert timeout.returncode == 1 and "504" in timeout.stderr
        refused = corem_cli("rpc", "--tenant", "t1", "--device", "s", "--method", "m", *http, "--admin-token", "bad",
                            data_dir=d, check=False)
        assert refused.returncode == 1 and "401" in refused.stderr
        listed = json.loads(corem_cli("devices", "list", "--json", data_dir=d).stdout)
        assert listed["power_mode"] == "psm" and listed["topics"] == "room/# hall/+"
    finally:
        server.stop()


@needs_libcoap
def test_a_device_added_while_the_server_runs_is_served_the_moment_the_cli_returns(tmp_path):
    """`corem devices add` tells the running server (registry/nudge.py) and waits for it: the
    very next request is served, with no wait for the half-second poll; so is a removal."""
    import time as _time

    from .conftest import coap_client, corem_cli, start_corem, write_cbor

    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "first", "--token", "FIRST", data_dir=data)
    server = start_corem(data)
    try:
        reading = write_cbor(tmp_path / "r.cbor", {"t": 1.0})
        for i in range(3):
            token = f"NEW-{i}"
            t0 = _time.monotonic()
            corem_cli("devices", "add", "--tenant", "acme", "--device", f"new-{i}", "--token", token, data_dir=data)
            r = coap_client(f"{server.coap}/api/v1/{token}/telemetry", "-m", "post", "-t", "60", "-f", str(reading))
            assert r.code == "2.04", (r.output, _time.monotonic() - t0)
        corem_cli("devices", "remove", "--tenant", "acme", "--device", "new-0", data_dir=data)
        r = coap_client(f"{server.coap}/api/v1/NEW-0/telemetry", "-m", "post", "-t", "60", "-f", str(reading))
        assert r.code == "4.01", r.output
    finally:
        server.stop()


def test_device_keys_from_files(tmp_path):
    """--psk-file and --oscore-secret-file: the keys stay out of the command line (issue 30)."""
    d = tmp_path / "data"
    psk = tmp_path / "psk"
    psk.write_text("secretPSK123\n")  # the trailing newline is not part of the key
    secret = tmp_path / "oscore"
    secret.write_bytes(bytes(range(16)) + b"\n")  # any bytes
    corem_cli("devices", "add", "--tenant", "t", "--device", "a", "--psk-identity", "id-a", "--psk-file", str(psk),
              "--oscore-sender-id", "01", "--oscore-recipient-id", "02", "--oscore-secret-file", str(secret),
              data_dir=d)
    from corem.registry import Registry

    reg = Registry(d / "registry.db")
    try:
        device = reg.list_devices("t")[0]
    finally:
        reg.close()
    assert device.psk == b"secretPSK123" and device.oscore is not None and device.oscore.secret == bytes(range(16))
    for args, message in [
        (["--psk-identity", "i", "--psk", "x" * 8, "--psk-file", str(psk)], "psk: give --psk, --psk-hex or --psk-file"),
        (["--psk-identity", "i", "--psk-file", str(tmp_path / "none")], "psk_file: cannot read"),
    ]:
        r = corem_cli("devices", "add", "--tenant", "t", "--device", "b", *args, data_dir=d, check=False)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_help_texts_say_what_the_docs_say(capsys):
    """`--help` against docs/configuration.md on the points a review found apart, and a choice
    list without the empty choice's dangling comma (`{drx,psm,}`)"""
    from corem.cli import build_parser

    parser = build_parser()
    for argv in (["serve", "--help"], ["devices", "add", "--help"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "/metrics, /healthz, /readyz, /api, /ui" in text and "provisioning keys, claims" in text
    assert "(B, kB, MB, GB, TB, KiB, MiB, GiB, TiB;" in text and "~1 KB" not in text
    assert "CBOR telemetry POSTs" not in text and "log level, log format," in text
    assert "--power-mode {drx,psm}" in text and "psm,}" not in text
    assert parser.parse_args(["devices", "add", "--tenant", "t", "--device", "d", "--power-mode", ""]).power_mode == ""
