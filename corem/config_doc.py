"""The settings as documentation: their groups and metavars (`corem serve --help`), and a complete,
commented `corem.toml` (`corem config show [--defaults]`) that corem reads back as the same settings.
"""

from __future__ import annotations

import textwrap
from dataclasses import fields
from typing import Any

from .build import version
from .config import SECRETS, Settings

#: (title, what it is about, keys, key prefixes): the areas of `serve --help` and of the shown file.
#: A key is in the first group that names it, else in the first whose prefix it has.
GROUPS: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("transports", "the CoAP listeners and how their datagrams are read",
     ("coap", "coaps", "coap_tcp", "coaps_tcp", "max_datagram", "fast_lane", "workers"), ("tcp_",)),
    ("DTLS", "CoAPS (DTLS 1.2) and coaps+tcp (TLS 1.2): engine, credentials, sessions", (), ("dtls_",)),
    ("CoAP", "the message layer (RFC 7252)",
     ("piggyback_timeout", "ack_timeout", "max_retransmit", "exchange_lifetime", "dedup_max_entries"), ()),
    ("bus", "where accepted readings go: the embedded log or Kafka", ("bus",),
     ("bus_", "kafka_", "sink_", "store_", "topic_")),
    ("registry", "devices, credentials and the data dir", ("data_dir", "registry", "node_url"), ()),
    ("admin", "the admin HTTP: /metrics, /healthz, /readyz, /api, /ui", ("http", "diagnostics_samples"), ("admin_",)),
    ("limits", "what one source, one device or the fleet may hold", ("max_queued_commands",),
     ("rate_limit_", "max_", "pubsub_", "provisioning_")),
    ("devices", "presence and downlink timing", ("psm_activity_timer",), ("presence_",)),
    ("logs", "what corem logs and how", (), ("log_",)),
]
OTHER = "other"

#: metavars that say more than the type: addresses are HOST:PORT
_METAVARS = {
    "workers": "N|auto", "bus": "embedded|kafka://HOST:PORT,...", "data_dir": "DIR",
    "registry": "URL", "dtls_session_store": "URL", "node_url": "URL", "dtls_state_key": "HEX",
    "dtls_ciphers": "SUITE,...", "rate_limit_exempt": "NET,...", "presence_tenants": "TENANT=SECONDS,...",
    "presence_profiles": "PROFILE=SECONDS,...", "kafka_config": "KEY=VALUE,...", "admin_token": "TOKEN",
    "kafka_sasl_password": "PASSWORD",
}
ADDRESSES = ("coap", "coaps", "coap_tcp", "coaps_tcp", "http")


def group_of(key: str) -> str:
    for title, _, keys, _ in GROUPS:
        if key in keys:
            return title
    for title, _, _, prefixes in GROUPS:
        if key.startswith(prefixes):
            return title
    return OTHER


def grouped(keys: list[str]) -> list[tuple[str, str, list[str]]]:
    """`keys` by group, in the groups' order (each group's keys in the settings table's order)."""
    order = [title for title, *_ in GROUPS] + [OTHER]
    about = {title: text for title, text, *_ in GROUPS} | {OTHER: ""}
    by: dict[str, list[str]] = {}
    for key in keys:
        by.setdefault(group_of(key), []).append(key)
    return [(title, about[title], by[title]) for title in order if title in by]


def metavar(key: str) -> str:
    if key in ADDRESSES:
        return "HOST:PORT"
    if key in _METAVARS:
        return _METAVARS[key]
    opt = Settings.__dataclass_fields__[key]
    allowed = getattr(opt.metadata["check"], "allowed", None)
    if allowed:
        return "{" + ",".join(allowed) + "}"
    if key.endswith(("_file", "_cert", "_key", "_ca", "_cafile", "_certfile", "_keyfile")):
        return "FILE"
    kind = type(opt.default)
    if kind is int:
        return "N"
    if kind is float:
        if key.endswith(("_timeout", "_after", "_lifetime", "_timer", "_refresh")):
            return "SECONDS"
        return "MS" if key.endswith("_ms") else "NUMBER"
    return key.upper()


def shown_default(key: str) -> str:
    value = getattr(Settings(), key)
    if value == "":
        return "none: generated into data_dir/admin-token" if key == "admin_token" else "none"
    return _plain(value)


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- corem config show ------------------------------------------------------------------------------
def toml_value(value: Any) -> str:
    """A value as TOML writes it: a basic string, an integer or a (finite) float."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    out = []
    for ch in str(value):
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _setting_value(key: str, value: Any) -> str:
    if key == "workers" and value.isdigit():  # TOML's integer: workers = 4
        return str(int(value))
    return toml_value(value)


def _comment(text: str, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False,
                         break_long_words=False)


def show(settings: Settings, *, defaults: bool = False, secrets: bool = False) -> str:
    """Every setting, its help as a comment and its value, grouped: a corem.toml that
    `Settings.load(config_file=...)` reads back as `settings` -- except a secret given as itself
    (not from its file) unless `secrets`: it is withheld (a comment says so)."""
    base = Settings()
    lines = [f"# corem.toml: every setting of corem {version()} with its "
             f"{'default' if defaults else 'current'} value (corem config show{' --defaults' if defaults else ''}).",
             "# Read with `corem serve --config FILE` (or COREM_CONFIG); flags and COREM_<KEY> environment",
             "# variables win over it. Lines are in groups, as in `corem serve --help`.", ""]
    hidden = {s for s in SECRETS if getattr(settings, s) and not getattr(settings, s + "_file") and not secrets}
    from_file = {s for s in SECRETS if getattr(settings, s + "_file")}
    for title, about, keys in grouped(Settings.keys()):
        lines.append(f"# -- {title}{': ' + about if about else ''} " + "-" * max(3, 92 - len(title) - len(about)))
        lines.append("")
        for key in keys:
            value = getattr(settings, key)
            lines.extend(_comment(Settings.help(key)))
            if value != getattr(base, key) and key not in hidden and key not in from_file:
                lines.append(f"# (default: {_setting_value(key, getattr(base, key))})")
            if key in hidden:
                lines.append(f"# {key} = (set; withheld: `corem config show --secrets` prints it, or give it "
                             f"with {key}_file)")
            elif key in from_file:
                lines.append(f"# {key}: read from {key}_file")
            else:
                lines.append(f"{key} = {_setting_value(key, value)}")
            lines.append("")
    return "\n".join(lines)


def _check_every_key_is_grouped() -> list[str]:
    """Keys that fall in no group (the tests hold this empty)."""
    return [f.name for f in fields(Settings) if group_of(f.name) == OTHER]
