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


@pytest.mark.parametrize(
    "flags,message",
    [
        # checked at start whether their feature is on or not: a bad value is named before it is used
        ({"kafka_config": "no.such.property=1"}, "kafka_config: no.such.property=1: "),
        ({"coaps": "off", "dtls_ciphers": "TLS-BOGUS"}, "dtls_ciphers: 'TLS-BOGUS' is not a cipher suite"),
        ({"node_url": "notaurl"}, "node_url: 'notaurl' is not an http:// or https:// URL with a host"),
        ({"node_url": "http://10.0.0.7:port"}, "node_url: 'http://10.0.0.7:port' is not a URL"),
        ({"kafka_client_id": ""}, "kafka_client_id: empty"),
        ({"presence_profiles": "meter=abc"}, "presence_profiles: 'meter=abc' is not PROFILE=SECONDS"),
        ({"presence_tenants": "acme=abc"}, "presence_tenants: 'acme=abc' is not TENANT=SECONDS"),
        ({"dtls_state_key": "zz"}, "dtls_state_key: not hex; 32 or 64 hex digits"),
    ],
)
def test_settings_of_a_feature_that_is_off_are_checked_at_start(flags, message):
    with pytest.raises(ConfigError) as info:
        Settings.load(flags, env={})
    assert message in str(info.value)


def test_good_values_of_those_settings_start():
    s = Settings.load({"node_url": "https://10.0.0.7:8080", "kafka_config": "socket.keepalive.enable=true",
                       "dtls_ciphers": "TLS-PSK-WITH-AES-128-CCM", "coaps": "off"}, env={})
    assert s.node_url == "https://10.0.0.7:8080" and s.bus == "embedded"


@pytest.mark.parametrize("engine", ["corem", "mbedtls"])
@pytest.mark.parametrize("ciphers", ["TLS-BOGUS", "TLS-PSK-WITH-AES-128-CCM-8, NOPE", "TLS_PSK_WITH_AES_128_CCM_9"])
def test_a_cipher_suite_is_refused_at_start_in_the_engines_own_words(engine, ciphers):
    """Which suites an engine takes, and what its refusal says, is the DTLS side's (one check,
    `dtls.params.check_ciphers`): the settings refuse, at start, what the engine would refuse when
    its listener is made, with the same words.  (The settings had a copy of the check: for the
    mbedtls engine its words were not the engine's.)"""
    from corem.dtls import DtlsParams

    if engine == "mbedtls":
        pytest.importorskip("mbedtls")
        from corem.dtls.server import DtlsServer, PskStore

        def make(p: DtlsParams) -> object:
            return DtlsServer(PskStore({}.get), p)
    else:
        from corem.dtls.layer import engine_params as make
    with pytest.raises(ConfigError) as refused:
        Settings.load({"coaps": "off", "dtls_engine": engine, "dtls_ciphers": ciphers}, env={})
    with pytest.raises(ValueError) as engine_refused:
        make(DtlsParams(ciphers=tuple(c.strip() for c in ciphers.split(","))))
    assert str(refused.value) == str(engine_refused.value)
    assert str(refused.value).startswith(f"dtls_ciphers: {ciphers.split(',')[-1].strip()!r} is not a cipher suite ")


@pytest.mark.parametrize("engine", ["corem", "mbedtls"])
def test_the_default_ciphers_are_the_dtls_sides_and_each_engine_takes_them(engine):
    """The settings do not ask the DTLS side about their default (importing it costs every
    command ~0.2 s): it is the DTLS side's own default, which both engines take."""
    from corem.config import DEFAULT_CIPHERS
    from corem.dtls import DEFAULT_CIPHERS as DTLS_DEFAULT
    from corem.dtls.params import check_ciphers

    if engine == "mbedtls":
        pytest.importorskip("mbedtls")
    assert Settings.load({}, env={}).cipher_names() == DTLS_DEFAULT
    assert tuple(DEFAULT_CIPHERS.split(",")) == DTLS_DEFAULT
    check_ciphers(DTLS_DEFAULT, engine)


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


def test_the_docs_table_lists_every_setting_with_its_default():
    """The configuration table in docs/configuration.md against the settings table: every key is
    there, and its default is the one corem uses (so neither can change without the other)."""
    import re
    from dataclasses import fields
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    start = page.index("| key (flag `--key-name`) | default | meaning |")
    documented: dict[str, str] = {}
    for row in page[start:].split("\n\n")[0].splitlines()[2:]:
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


# -- TOML's own types, finite numbers, secrets from files (issue 30) -------------------------------
def test_toml_native_types(tmp_path):
    f = tmp_path / "corem.toml"
    f.write_text('workers = 4\nfast_lane = false\ndtls_checkpoint = true\nkafka_acks = 1\npiggyback_timeout = 1\n'
                 'kafka_linger_ms = 0\nrate_limit_per_source = 2.5\nmax_retransmit = 3\n'
                 'dtls_ciphers = ["TLS-PSK-WITH-AES-128-CCM-8", "TLS-PSK-WITH-AES-128-CCM"]\n'
                 'rate_limit_exempt = ["10.0.0.0/8", "2001:db8::/32"]\n'
                 '[presence_tenants]\nacme = 30\nglobex = 600.5\n[presence_profiles]\nmeter = 7200\n')
    s = Settings.load({}, env={}, config_file=str(f))
    assert (s.workers, s.worker_count(), s.fast_lane, s.dtls_checkpoint, s.kafka_acks) == ("4", 4, "off", "on", "1")
    assert (s.piggyback_timeout, s.kafka_linger_ms, s.rate_limit_per_source, s.max_retransmit) == (1.0, 0.0, 2.5, 3)
    assert s.dtls_ciphers == "TLS-PSK-WITH-AES-128-CCM-8,TLS-PSK-WITH-AES-128-CCM"
    assert s.dtls_params().ciphers == ("TLS-PSK-WITH-AES-128-CCM-8", "TLS-PSK-WITH-AES-128-CCM")
    assert len(s.exempt_networks()) == 2
    assert s.presence_thresholds() == ({"acme": 30.0, "globex": 600.5}, {"meter": 7200.0})
    # the same as text, as before
    f.write_text('workers = "auto"\nfast_lane = "off"\n')
    s = Settings.load({}, env={}, config_file=str(f))
    assert (s.workers, s.fast_lane) == ("auto", "off")


@pytest.mark.parametrize("text,message", [
    ("fast_lane = 1", "fast_lane: '1' is not allowed; use one of on, off"),
    ("log_level = true", "log_level: expected text, got bool True"),  # no on/off to map it to
    ("coap = 5683", "coap: '5683' is not HOST:PORT"),
    ("workers = 4.5", "workers: expected text, got float 4.5"),
    ("workers = 0", "workers: 0 must be 1 to 1024"),
    ("http = [\"a\"]", "http: expected text, got list"),
    ("dtls_ciphers = [[\"x\"]]", "dtls_ciphers: expected text or a number in it, got list"),
    ("presence_tenants = [\"acme\"]", "presence_tenants: expected text or a table, got list"),
    ("[presence_tenants]\nacme = \"soon\"", "presence_tenants: 'acme=soon' is not TENANT=SECONDS"),
    ("max_retransmit = 4.0", "max_retransmit: expected int, got float 4.0"),
])
def test_toml_types_that_do_not_fit_name_the_key(tmp_path, text, message):
    f = tmp_path / "corem.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        Settings.load({}, env={}, config_file=str(f))
    assert message in str(info.value)


def _numeric_keys() -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(Settings) if type(f.default) in (int, float)]


@pytest.mark.parametrize("key", _numeric_keys())
def test_non_finite_numbers_are_refused_for_every_numeric_setting(tmp_path, key):
    f = tmp_path / "corem.toml"
    for toml, text in (("nan", "nan"), ("inf", "inf"), ("-inf", "-Infinity")):
        f.write_text(f"{key} = {toml}\n")
        with pytest.raises(ConfigError) as info:
            Settings.load({}, env={}, config_file=str(f))
        assert str(info.value).startswith(f"{key}: "), info.value
        assert "finite" in str(info.value) or "expected int" in str(info.value), info.value
        for where in ({"flags": {key: text}}, {"env": {"COREM_" + key.upper(): text}}):
            with pytest.raises(ConfigError) as info:
                Settings.load(where.get("flags", {}), env=where.get("env", {}))
            assert str(info.value).startswith(f"{key}: "), info.value
            assert "not a finite number" in str(info.value) or "is not an integer" in str(info.value)


@pytest.mark.parametrize("key", ["presence_tenants", "presence_profiles"])
def test_non_finite_thresholds_are_refused(key):
    for value in ("a=inf", "a=nan"):
        with pytest.raises(ConfigError, match=f"{key}: .* a finite number"):
            Settings.load({key: value}, env={})


def test_secrets_from_files(tmp_path):
    token = tmp_path / "admin-token"
    token.write_text("s3cret-token\n")  # as `echo` writes it: the newline is not part of it
    password = tmp_path / "password"
    password.write_bytes(b"pass word\r\n")
    key = tmp_path / "state-key"
    key.write_text("00" * 32)
    f = tmp_path / "corem.toml"
    f.write_text(f'admin_token_file = "{token}"\nkafka_sasl_password_file = "{password}"\n')
    s = Settings.load({}, env={}, config_file=str(f))
    assert (s.admin_token, s.admin_token_file, s.kafka_sasl_password) == ("s3cret-token", str(token), "pass word")
    s = Settings.load({"dtls_state_key_file": str(key)}, env={"COREM_ADMIN_TOKEN_FILE": str(token)})
    assert (s.admin_token, s.dtls_state_key) == ("s3cret-token", "00" * 32)
    # a higher source's secret replaces a lower source's file, and the other way round
    s = Settings.load({"admin_token": "from-flag"}, env={}, config_file=str(f))
    assert (s.admin_token, s.admin_token_file) == ("from-flag", "")
    s = Settings.load({"admin_token_file": str(token)}, env={"COREM_ADMIN_TOKEN": "from-env"})
    assert s.admin_token == "s3cret-token"
    # what the file holds is checked as the secret itself
    key.write_text("not hex\n")
    with pytest.raises(ConfigError, match="dtls_state_key: not hex"):
        Settings.load({"dtls_state_key_file": str(key)}, env={})


@pytest.mark.parametrize("flags,env,message", [
    ({"admin_token_file": "/nonexistent/token"}, {}, "admin_token_file: cannot read /nonexistent/token: No such file"),
    ({}, {"COREM_KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"}, "kafka_sasl_password_file: cannot read /nonexistent/pw"),
    ({"admin_token": "a", "admin_token_file": "/x"}, {}, "admin_token: admin_token and admin_token_file are both given "
                                                       "in the flags; give one of them"),
    ({}, {"COREM_DTLS_STATE_KEY": "00" * 16, "COREM_DTLS_STATE_KEY_FILE": "/x"}, "dtls_state_key: dtls_state_key and "
                                                                              "dtls_state_key_file are both given in the environment"),
])
def test_secret_file_errors(flags, env, message):
    with pytest.raises(ConfigError) as info:
        Settings.load(flags, env=env)
    assert message in str(info.value)


def test_secret_file_errors_in_the_config_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    f = tmp_path / "corem.toml"
    f.write_text(f'admin_token = "x"\nadmin_token_file = "{empty}"\n')
    with pytest.raises(ConfigError, match=f"both given in the config file {f}"):
        Settings.load({}, env={}, config_file=str(f))
    f.write_text(f'admin_token_file = "{empty}"\n')
    with pytest.raises(ConfigError, match=f"admin_token_file: {empty} is empty"):
        Settings.load({}, env={}, config_file=str(f))


def test_a_misspelt_environment_variable_is_named_in_a_warning(caplog):
    """An unknown COREM_* variable leaves its setting at the default: the log says so, with the
    setting it probably meant; the variables that are not settings are not named."""
    with caplog.at_level("WARNING", logger="corem.config"):
        s = Settings.load(env={"COREM_ADMIN_TOKN": "x", "COREM_PURE_PYTHON": "1", "COREM_CONFIG": "",
                               "COREM_COAP": "127.0.0.1:0", "OTHER_TOOL": "1"})
    assert s.coap == "127.0.0.1:0" and not s.admin_token
    assert [r.getMessage() for r in caplog.records] == [
        "COREM_ADMIN_TOKN: not a setting; ignored (did you mean COREM_ADMIN_TOKEN?)"]
