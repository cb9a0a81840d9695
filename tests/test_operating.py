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
