"""Settings: precedence flag > env > file > default, and errors that name the key."""

from __future__ import annotations

import pytest

from corem.config import ConfigError, Settings


def test_defaults():
    s = Settings.load({}, env={})
    assert s.coap == "0.0.0.0:5683" and s.bus == "embedded" and s.piggyback_timeout == 0.5


def test_precedence(tmp_path):
    f = tmp_path / "corem.toml"
    f.write_text('coap = "127.0.0.1:1000"\nhttp = "127.0.0.1:1001"\nmax_retransmit = 3\n')
    s = Settings.load({}, env={"COREM_HTTP": "127.0.0.1:2001"}, config_file=str(f))
    assert (s.coap, s.http, s.max_retransmit) == ("127.0.0.1:1000", "127.0.0.1:2001", 3)
    s = Settings.load({"http": "127.0.0.1:3001"}, env={"COREM_HTTP": "127.0.0.1:2001"}, config_file=str(f))
    assert s.http == "127.0.0.1:3001"
    s = Settings.load({}, env={"COREM_CONFIG": str(f), "COREM_PIGGYBACK_TIMEOUT": "0.25"})
    assert s.coap == "127.0.0.1:1000" and s.piggyback_timeout == 0.25


KAFKA = {"bus": "kafka://127.0.0.1:9"}  # nothing listens there: only the configuration is checked


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"coap": "localhost"}, "coap: 'localhost' is not HOST:PORT"),
        ({"coap": "127.0.0.1:70000"}, "coap: port 70000 is outside 0-65535"),
        ({"http": "127.0.0.1:http"}, "http: port 'http' is not a number"),
        ({"max_retransmit": "many"}, "max_retransmit: 'many' is not an integer"),
        ({"piggyback_timeout": "0"}, "piggyback_timeout: 0.0 must be > 0"),
        ({"store_synchronous": "SOMETIMES"}, "store_synchronous: 'SOMETIMES' is not allowed"),
        ({"bus": "mqtt://x"}, "bus: 'mqtt://x' is neither 'embedded' nor kafka://"),
        ({"bus": "kafka://"}, "bus: kafka:// needs at least one host:port"),
        ({"bus": "kafka://h:99999"}, "bus: 'h:99999' is not host:port"),
        ({"kafka_acks": "some"}, "kafka_acks: 'some' is not allowed"),
        ({"kafka_sasl_mechanism": "PLAIN"}, "kafka_sasl_mechanism: needs kafka_security_protocol"),
        ({"log_level": "loud"}, "log_level: 'loud' is not allowed"),
        ({"rate_limit_exempt": "10.0.0.0/8,gateway"}, "rate_limit_exempt: 'gateway' is not an IPv4 or IPv6 network"),
        # Kafka: checked by librdkafka itself at start
        ({**KAFKA, "kafka_config": "no.such.property=1"}, "kafka_config: no.such.property=1: "),
        ({**KAFKA, "kafka_config": "socket.keepalive.enable=perhaps"}, "kafka_config: socket.keepalive.enable=perhaps"),
        ({**KAFKA, "kafka_config": "linger.ms=3"}, "kafka_config: linger.ms is set by corem's own settings"),
        ({**KAFKA, "kafka_config": "Bad Key=1"}, "kafka_config: 'Bad Key' is not a librdkafka property name"),
        ({**KAFKA, "kafka_config": "socket.nagle.disable"}, "kafka_config: 'socket.nagle.disable' is not property=value"),
        ({**KAFKA, "kafka_idempotence": "on", "kafka_acks": "1"}, "kafka_idempotence: 'on' needs kafka_acks = all"),
        ({**KAFKA, "kafka_idempotence": "maybe"}, "kafka_idempotence: 'maybe' is not allowed"),
    ],
)
def test_bad_values_name_the_key(flags, message):
    with pytest.raises(ConfigError) as info:
        Settings.load(flags, env={})
    assert message in str(info.value)


def test_bad_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match="nonsense: unknown key"):
        Settings.load({}, env={}, config_file=str(f))
    f.write_text("coap = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load({}, env={}, config_file=str(f))
    with pytest.raises(ConfigError, match="not found"):
        Settings.load({}, env={}, config_file=str(tmp_path / "missing.toml"))
    f.write_text("max_retransmit = true\n")
    with pytest.raises(ConfigError, match="max_retransmit: expected int"):
        Settings.load({}, env={}, config_file=str(f))


def test_off_disables_listener():
    s = Settings.load({"http": "off"}, env={})
    assert s.http == "off"


def test_kafka_settings_reach_librdkafka(tmp_path):
    f = tmp_path / "corem.toml"
    f.write_text('bus = "kafka://b1:9092,b2:9092"\nkafka_acks = "1"\nkafka_compression = "zstd"\n'
                 '[kafka_config]\n"socket.keepalive.enable" = true\n"ssl.cipher.suites" = "A,B"\n')
    s = Settings.load({"kafka_linger_ms": "2.5"}, env={"COREM_KAFKA_TIMEOUT": "4"}, config_file=str(f))
    k = s.kafka_settings()
    cfg = k.producer_config(max_pending=5000)
    assert cfg["bootstrap.servers"] == "b1:9092,b2:9092" and cfg["acks"] == "1" and cfg["compression.type"] == "zstd"
    assert cfg["enable.idempotence"] is False  # auto: acks=1 cannot be idempotent
    assert cfg["linger.ms"] == 2.5 and cfg["message.timeout.ms"] == 4000 and cfg["queue.buffering.max.messages"] == 5000
    assert cfg["socket.keepalive.enable"] == "true" and cfg["ssl.cipher.suites"] == "A,B"
    d = Settings.load(KAFKA, env={}).kafka_settings().producer_config()
    assert d["enable.idempotence"] is True and d["acks"] == "all"
    sasl = Settings.load({**KAFKA, "kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512",
                          "kafka_sasl_username": "u", "kafka_sasl_password": "p"}, env={}).kafka_settings()
    c = sasl.consumer_config()
    assert (c["security.protocol"], c["sasl.mechanism"], c["sasl.username"], c["sasl.password"]) == (
        "SASL_SSL", "SCRAM-SHA-512", "u", "p")
    assert c["enable.auto.commit"] is False


def test_the_readme_table_lists_every_setting_with_its_default():
    """The configuration table in README.md against the settings table: every key is there, and
    its default is the one corem uses (so neither can change without the other)."""
    import re
    from dataclasses import fields
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("| key (flag `--key-name`) | default | meaning |")
    documented: dict[str, str] = {}
    for row in readme[start:].split("\n\n")[0].splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        keys = re.findall(r"`([a-z0-9_]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1]) or [cells[1]]
        for i, key in enumerate(keys):  # "`a`, …": the first key's default; the rest have none
            documented[key] = defaults[i] if i < len(defaults) else "(none)"

    def shown(value) -> str:
        if value == "":
            return "(none)"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    defaults = Settings()
    assert set(documented) == set(Settings.keys()), set(documented) ^ set(Settings.keys())
    for f in fields(Settings):
        want = shown(getattr(defaults, f.name))
        got = documented[f.name]
        assert got == want or (f.name == "admin_token" and got == "(generated)"), (f.name, got, want)
