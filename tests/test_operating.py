"""Operating corem as a service (issue 30): the configuration as a file corem prints and reads back,
`serve --help` by area, `corem --version`, SIGHUP's reload and a listen address in use, through
the command line and real `corem serve` processes on loopback ports they pick."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata

import pytest

from corem import config_doc
from corem.config import SECRETS, Settings

from .conftest import coap_pings, log_line


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COREM_")}
    return subprocess.run([sys.executable, "-m", "corem", *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})}, check=check)


# -- corem --version, corem config show, serve --help ---------------------------------------------------
def test_version_is_the_package_metadata():
    r = cli("--version")
    assert r.stdout.strip() == f"corem {metadata.version('corem')}" and r.returncode == 0


def test_build_info_metric():
    from prometheus_client.parser import text_string_to_metric_families

    from corem.build import BuildInfo
    from corem.fastlane import Lane
    from corem.metrics import render

    families = {f.name: f for f in text_string_to_metric_families(render(lambda: [(BuildInfo(), {})]).decode())}
    (sample,) = families["corem_build_info"].samples
    assert sample.value == 1 and sample.labels == {
        "version": metadata.version("corem"), "python": sys.version.split()[0],
        "c_lane": "missing" if Lane is None else "built"}


def test_config_show_defaults_is_complete_and_read_back_as_the_defaults(tmp_path):
    text = cli("config", "show", "--defaults").stdout
    for key in Settings.keys():
        assert re.search(rf"^{key} = ", text, re.M), key  # every setting, with its value
        first_words = " ".join(Settings.help(key).split()[:6])
        assert first_words in " ".join(line.removeprefix("# ") for line in text.splitlines()), key  # its help
    f = tmp_path / "corem.toml"
    f.write_text(text)
    assert Settings.load({}, env={}, config_file=str(f)) == Settings()


def test_config_show_prints_the_current_settings_and_corem_reads_them_back(tmp_path):
    token = tmp_path / "token"
    token.write_text("t0ken-in-a-file\n")
    source = tmp_path / "source.toml"
    source.write_text(
        'workers = 3\nfast_lane = false\npiggyback_timeout = 0.25\nkafka_linger_ms = 1e-3\n'
        'dtls_ciphers = ["TLS-PSK-WITH-AES-128-CCM-8"]\nrate_limit_exempt = "10.0.0.0/8, 192.0.2.0/24"\n'
        f'admin_token_file = "{token}"\ndata_dir = "/var/lib/corem \\"quoted\\""\n'
        '[presence_tenants]\nacme = 30\n[kafka_config]\n"socket.keepalive.enable" = true\n')
    env = {"COREM_HTTP": "127.0.0.1:9100", "COREM_KAFKA_SASL_PASSWORD": "pass\tword"}
    flags = ["--coap", "127.0.0.1:5999", "--max-retransmit", "2"]
    want = Settings.load({"coap": "127.0.0.1:5999", "max_retransmit": "2"}, env=env, config_file=str(source))
    shown = cli("config", "show", "--config", str(source), *flags, env=env).stdout
    assert "pass\\tword" not in shown and "withheld" in shown  # a secret given as itself is not printed
    assert "t0ken-in-a-file" not in shown and f'admin_token_file = "{token}"' in shown
    assert "# (default: 1)" in shown and "workers = 3" in shown
    back = tmp_path / "back.toml"
    back.write_text(shown)
    got = Settings.load({}, env={}, config_file=str(back))
    assert {k: getattr(got, k) for k in Settings.keys() if k != "kafka_sasl_password"} == {
        k: getattr(want, k) for k in Settings.keys() if k != "kafka_sasl_password"}
    # --secrets: the whole of it, read back identically
    back.write_text(cli("config", "show", "--secrets", "--config", str(source), *flags, env=env).stdout)
    assert Settings.load({}, env={}, config_file=str(back)) == want
    # a bad setting is the one line serve would print
    r = cli("config", "show", "--workers", "0", check=False)
    assert r.returncode == 2 and r.stderr.strip() == "corem: workers: 0 must be 1 to 1024"


def test_toml_strings_are_escaped():
    assert config_doc.toml_value('a"b\\c\n\x7f') == '"a\\"b\\\\c\\n\\u007f"'
    assert config_doc.toml_value(0.5) == "0.5" and config_doc.toml_value(3) == "3"


def test_every_setting_is_in_a_group():
    assert config_doc._check_every_key_is_grouped() == []
    assert {s + "_file" for s in SECRETS} <= set(Settings.keys())


def test_serve_help_is_grouped_with_defaults_and_address_metavars():
    text = cli("serve", "--help").stdout
    headings = re.findall(r"^(\S[^\n]*) settings:$", text, re.M)
    assert headings == ["transports", "DTLS", "CoAP", "bus", "registry", "admin", "limits", "devices", "logs"]
    for key in ("coap", "coaps", "coap_tcp", "coaps_tcp", "http"):
        assert f"--{key.replace('_', '-')} HOST:PORT" in text
    flat = " ".join(text.split())
    assert "[default: 0.0.0.0:5683; env COREM_COAP]" in flat and "[default: 127.0.0.1:8080; env COREM_HTTP]" in flat
    assert "--fast-lane {on,off}" in flat and "--workers N|auto" in flat and "--admin-token-file FILE" in flat
    for key in Settings.keys():
        assert f"--{key.replace('_', '-')} " in flat, key
    # and in its area: --dtls-cert under DTLS, --log-level under logs
    assert text.index("DTLS settings:") < text.index("--dtls-cert") < text.index("CoAP settings:")
    assert text.index("logs settings:") < text.index("--log-level")


# -- SIGHUP: a reload, not an end ------------------------------------------------------------------------
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_reloads_without_dropping_a_device(data_dir, tmp_path, workers):
    """SIGHUP reads the config file again: the log level and the rate limit change in the running
    process (its workers too), what needs a restart is named, a DTLS session made before carries
    readings after, and a configuration that no longer loads changes nothing."""
    import signal

    import cbor2

    from corem.codec import Code

    from .conftest import SPEC_IDENTITY, SPEC_KEY, corem_cli, post, start_corem, wait_for
    from .dtls_udp_client import DtlsUdpClient

    cfg = tmp_path / "corem.toml"
    cfg.write_text('log_level = "warning"\nrate_limit_per_source = 1000\ncoap_tcp = "off"\n')
    server = start_corem(data_dir, "--config", str(cfg), "--workers", workers, timeout=60)
    device = DtlsUdpClient(server.coaps_port, SPEC_IDENTITY, SPEC_KEY.encode())
    try:
        assert "msg=started" not in server.stderr()  # at warning, the start's info lines are not logged
        device.handshake()
        assert device.post(["telemetry"], cbor2.dumps({"before": 1})).code == Code.CHANGED
        assert coap_pings(server.coap_port, 20, answers=20) == 20  # (1000/s, a burst of 2000: all answered)
        cfg.write_text('log_level = "info"\nrate_limit_per_source = 1\ncoap_tcp = "127.0.0.1:0"\n'
                       'max_observers = 7\n')
        server.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: log_line(server.stderr(), "reloaded on SIGHUP"), 60, "the reload's line")
        assert "log_level warning -> info" in line and "rate_limit_per_source 1000.0 -> 1.0" in line, line
        assert "registry (read again)" in line, line
        assert "coap_tcp (listen addresses need a restart)" in line and "max_observers (need a restart)" in line
        assert ("(2 of 2 workers)" in line) == (workers == "2"), line
        assert len([x for x in server.stderr().splitlines() if "reloaded on SIGHUP" in x]) == 1  # one line
        # the new level in the process that serves (a worker with --workers): its info lines now show
        corem_cli("devices", "add", "--tenant", "acme", "--device", "sensor-9", "--token", "T0KEN-9",
                  data_dir=data_dir)
        wait_for(lambda: "registry changed" in server.stderr(), 60,  # (logfmt quotes the message: msg="…")
                 "an info line from the server after the reload")
        # the new rate (1/s, a burst of 2) on the running listener: most of 20 pings are dropped and counted
        assert coap_pings(server.coap_port, 20) < 20
        assert server.metrics()['corem_rate_limited_datagrams_total{transport="udp"}'] > 0
        # nothing dropped: the session made before the reload, a plain reading, the new device
        # (over its source's rate, a live DTLS session and a known token still go through)
        assert device.post(["telemetry"], cbor2.dumps({"after": 1})).code == Code.CHANGED
        for token, n in (("T0KEN-1", 1), ("T0KEN-9", 2)):
            answer = post(server.coap_port, token, cbor2.dumps({"n": n}), 4200 + n, timeout=30)
            assert answer is not None and answer[1] == 0x44
        assert server.proc.poll() is None
        # a file that no longer loads: one error line, nothing changed, still serving
        cfg.write_text("log_level = \n")
        server.proc.send_signal(signal.SIGHUP)
        refused = wait_for(lambda: log_line(server.stderr(), "SIGHUP: the configuration is refused"), 60, "the refusal")
        assert "nothing reloaded" in refused and "not valid TOML" in refused
        answer = post(server.coap_port, "T0KEN-1", cbor2.dumps({"n": 3}), 4203, timeout=30)
        assert answer is not None and answer[1] == 0x44
        build = [k for k in server.metrics() if k.startswith("corem_build_info{")]
        assert len(build) == 1 and 'c_lane="' in build[0], build  # one series, with --workers too
    finally:
        device.close()
        assert server.stop() == 0  # SIGTERM: still the graceful stop, status 0
    values = [p["numeric_values"] for p in server.points("acme")]
    assert {"before": 1.0} in values and {"after": 1.0} in values and len(values) == 5


def test_sighup_reads_the_certificates_again(data_dir, tmp_path):
    """dtls_cert, dtls_key and dtls_ca rewritten in place (a renewal, a new CA) and SIGHUP: the
    handshakes from then on -- TLS on coaps+tcp, DTLS on coaps -- present and verify with the new
    ones, while a connection made before goes on."""
    import shutil
    import signal
    import socket
    import ssl

    from corem.coap.stream import CSM
    from corem.codec import Code

    from .conftest import DTLS_CLIENTS, corem_cli, start_corem, wait_for, write_cbor
    from .test_tcp import READING, frame, read_frames, ssl_context, tls_exchange
    from .test_tls_engine import der, make_pki

    old, new, live = make_pki(tmp_path / "old"), make_pki(tmp_path / "new"), tmp_path / "live"
    live.mkdir()

    def install(pki):
        for name in ("server.pem", "server.key.pem", "ca.pem"):
            shutil.copyfile(pki / name, live / f".{name}")
            os.replace(live / f".{name}", live / name)  # (each file whole, as a renewal tool writes it)

    install(old)
    for name, pki in (("old-dev", old), ("new-dev", new)):
        corem_cli("devices", "add", "--tenant", "acme", "--device", name, "--cert", str(pki / "dev1.pem"),
                  data_dir=data_dir)
    server = start_corem(data_dir, "--coaps-tcp", "127.0.0.1:0", "--dtls-cert", str(live / "server.pem"),
                         "--dtls-key", str(live / "server.key.pem"), "--dtls-ca", str(live / "ca.pem"))

    def connect(pki) -> ssl.SSLSocket:
        return ssl_context(pki, "dev1").wrap_socket(
            socket.create_connection(("127.0.0.1", server.coaps_tcp_port), timeout=30))

    try:
        before = connect(old)
        assert before.getpeercert(binary_form=True) == der(old, "server")
        assert [c for c, _, _ in tls_exchange(before, b"b1")] == [CSM, Code.CHANGED]
        with pytest.raises((ssl.SSLError, OSError)):  # the new CA does not know the old server certificate
            connect(new).close()
        install(new)
        server.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: log_line(server.stderr(), "reloaded on SIGHUP"), 60, "the reload's line")
        assert "dtls credentials (dtls_cert, dtls_key, dtls_ca read again)" in line and "failed" not in line, line
        after = connect(new)
        assert after.getpeercert(binary_form=True) == der(new, "server")
        assert [c for c, _, _ in tls_exchange(after, b"a1")] == [CSM, Code.CHANGED]
        after.close()
        with pytest.raises((ssl.SSLError, OSError)):  # a device of the old CA: not verified any more
            s = connect(old)
            s.sendall(frame(Code.POST, b"x", READING))
            assert s.recv(100)
        # the connection made before the reload carries readings still
        before.sendall(frame(Code.POST, b"b2", READING))
        assert [c for c, _, _ in read_frames(before, 1)] == [Code.CHANGED]
        before.close()
        # DTLS: a new handshake with the new CA's device (libcoap on OpenSSL or GnuTLS)
        reading = write_cbor(tmp_path / "r.cbor", {"t": 5})
        for client in DTLS_CLIENTS:
            r = subprocess.run([client, "-m", "post", "-C", str(new / "ca.pem"), "-c", str(new / "dev1.pem"),
                                "-j", str(new / "dev1.key.pem"), "-t", "60", "-f", str(reading), "-v", "6", "-B",
                                "30", f"coaps://127.0.0.1:{server.coaps_port}/telemetry"],
                               capture_output=True, text=True, timeout=90)
            assert "c:2.04" in r.stdout + r.stderr, r.stdout + r.stderr
        # a broken key file: refused at the reload, the credentials in use stay
        (live / "server.key.pem").write_text("not a key\n")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "failed, kept as before: dtls credentials" in server.stderr(), 60, "the refused key")
        with connect(new) as again:
            assert again.getpeercert(binary_form=True) == der(new, "server")
    finally:
        assert server.stop() == 0
    devices = [p["device"] for p in server.points("acme")]
    assert devices.count("old-dev") == 2 and devices.count("new-dev") == 1 + len(DTLS_CLIENTS)


def test_the_reload_line():
    from corem.reload import Report

    r = Report(done=["log_level info -> debug", "registry (read again)"], restart=["coap", "workers", "http"],
               failed=["dtls credentials (server.key.pem: not a PEM private key)"], where="2 of 2 workers")
    assert r.line() == ("reloaded on SIGHUP (2 of 2 workers): log_level info -> debug, registry (read again); "
                        "failed, kept as before: dtls credentials (server.key.pem: not a PEM private key); changed "
                        "but not applied: coap, http (listen addresses need a restart); workers (need a restart)")
    assert Report(done=["registry (read again)"]).line() == "reloaded on SIGHUP: registry (read again)"


# -- a listen address that cannot be had: one line, not a traceback ----------------------------------------
@pytest.mark.parametrize("key", ["coap", "coaps", "coap_tcp", "coaps_tcp", "http"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_listen_address_that_cannot_be_bound_is_one_line(tmp_path, key, workers):
    """(A port another process holds: tests/test_ports_and_signals.py.)  An address this machine
    does not have, on any listener, with or without workers: one line naming the setting and the
    address, status 2."""
    listeners = {"coap": "127.0.0.1:0", "coaps": "127.0.0.1:0", "http": "127.0.0.1:0", key: "192.0.2.1:5999"}
    flags = [arg for k, v in listeners.items() for arg in (f"--{k.replace('_', '-')}", v)]
    r = cli("serve", "--data-dir", str(tmp_path / "d"), "--workers", workers, *flags, check=False)
    said = [line for line in r.stderr.splitlines() if line.startswith("corem")]
    tcp = "tcp " if key not in ("coap", "coaps") else ""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert said == [f"corem: {key}: cannot listen on {tcp}192.0.2.1:5999: Cannot assign requested address"], r.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_admin_token_from_a_file_and_rotated_by_sighup(data_dir, tmp_path, workers):
    """admin_token_file: the token never on the command line; rewritten and SIGHUP, the new one
    opens the API (the front's own routes and those its workers serve) and the old one no longer."""
    import signal

    from .conftest import start_corem, wait_for

    token = tmp_path / "admin-token"
    token.write_text("first-t0ken\n")
    cfg = tmp_path / "corem.toml"
    cfg.write_text(f'admin_token_file = "{token}"\n')
    server = start_corem(data_dir, "--config", str(cfg), "--admin-token", "", "--workers", workers, timeout=60)
    try:
        assert "first-t0ken" not in " ".join(server.proc.args)  # type: ignore[arg-type]
        for path in ("/api/devices", "/api/status"):
            assert server.api("GET", path, token="first-t0ken")[0] == 200
            assert server.api("GET", path, token="second-t0ken")[0] == 401
        token.write_text("second-t0ken\n")
        server.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: log_line(server.stderr(), "reloaded on SIGHUP"), 60, "the reload's line")
        assert line.count("admin_token") == 1 and "t0ken" not in line, line  # named once, never shown
        for path in ("/api/devices", "/api/status"):
            assert server.api("GET", path, token="second-t0ken")[0] == 200
            assert server.api("GET", path, token="first-t0ken")[0] == 401
    finally:
        code = server.stop()
        assert code == 0, server.stderr()[-4000:]  # (what ended it otherwise: once, under load, status 1)


def test_provisioning_secret_file_errors(tmp_path):
    r = cli("provisioning", "add", "--key", "k", "--tenant", "t", "--data-dir", str(tmp_path), check=False)
    assert r.returncode == 2 and r.stderr.strip() == "corem: secret: give --secret or --secret-file"
    r = cli("provisioning", "add", "--key", "k", "--tenant", "t", "--secret", "s", "--secret-file", "/nonexistent",
            "--data-dir", str(tmp_path), check=False)
    assert r.returncode == 2 and "secret: give --secret or --secret-file, not both" in r.stderr
    r = cli("provisioning", "add", "--key", "k", "--tenant", "t", "--secret-file", str(tmp_path / "none"),
            "--data-dir", str(tmp_path), check=False)
    assert r.returncode == 2 and f"corem: secret_file: cannot read {tmp_path / 'none'}" in r.stderr
