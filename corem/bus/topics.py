"""Every topic corem writes or reads, named here and nowhere else, with `topic_prefix` in front.

| topic                          | corem     | what                                                       |
|--------------------------------|-----------|------------------------------------------------------------|
| `telemetry.raw.{tenant}`       | writes    | accepted readings: one TelemetryPoint (JSON) per record    |
| `attributes.{tenant}`          | writes    | client attributes a device published (ThingsBoard)         |
| `pubsub.{tenant}`              | writes    | messages devices published on /ps (EMQX CoAP)              |
| `device.presence.{tenant}`     | writes    | online/offline transitions                                 |
| `commands.{tenant}`            | reads     | downlink requests other systems put on Kafka               |
| `commands.results.{tenant}`    | writes    | what became of those requests and of the API's RPCs        |

`topic_prefix` (default empty) goes before each, e.g. `site-7.` makes `site-7.telemetry.raw.acme`,
so several corem deployments (or corem beside Hono's `hono.telemetry.*`) can share one cluster.  It is
one setting of the process: `configure` sets it once at start (corem serve, each worker, and the CLI
commands that read the embedded bus), before any record is made.
"""

from __future__ import annotations

import re

#: what a prefix may hold: Kafka's topic characters (a topic name is at most 249 of them)
PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{0,100}")

TELEMETRY = "telemetry.raw."
ATTRIBUTES = "attributes."
PUBSUB = "pubsub."
PRESENCE = "device.presence."
COMMANDS = "commands."
RESULTS = "commands.results."

_prefix = ""


def check_prefix(value: str, key: str = "topic_prefix") -> None:
    """ValueError naming `key` unless `value` is a usable prefix."""
    if not PREFIX_RE.fullmatch(value):
        raise ValueError(f"{key}: {value!r} is not a topic prefix: at most 100 of A-Z a-z 0-9 . _ - "
                         "(Kafka's topic characters), e.g. 'site-7.'")


def configure(prefix: str) -> None:
    """Set the prefix of every topic this process names (the `topic_prefix` setting)."""
    global _prefix
    check_prefix(prefix)
    _prefix = prefix


def prefix() -> str:
    return _prefix


def telemetry(tenant: str) -> str:
    return _prefix + TELEMETRY + tenant


def telemetry_all() -> str:
    """What every telemetry topic starts with (recovery and `corem telemetry tail` read them all)."""
    return _prefix + TELEMETRY


def attributes(tenant: str) -> str:
    return _prefix + ATTRIBUTES + tenant


def pubsub(tenant: str) -> str:
    return _prefix + PUBSUB + tenant


def presence(tenant: str) -> str:
    return _prefix + PRESENCE + tenant


def commands(tenant: str) -> str:
    return _prefix + COMMANDS + tenant


def results(tenant: str) -> str:
    return _prefix + RESULTS + tenant


def commands_tenant(topic: str) -> str:
    """The tenant of a `commands.{tenant}` topic (as `commands` made it)."""
    start = _prefix + COMMANDS
    if not topic.startswith(start):
        raise ValueError(f"{topic!r} is not a commands topic (they start with {start!r})")
    return topic[len(start):]
