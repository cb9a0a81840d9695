"""SIGHUP: what a running corem takes from its configuration again without dropping a device.

On SIGHUP corem reads its settings again (the `--config` file, `COREM_*`, the flags it was started
with, and every `*_file` secret) and applies, without a restart and without ending a session or a
connection:

- `log_level`, and `log_format` (the handlers' formatter swapped: the next line is in the new format);
- the per-source rate limit (corem/net/limits.py): `rate_limit_per_source` from one rate to another,
  `rate_limit_exempt`, and `rate_limit_sources` -- in place, every source keeping its bucket (fewer
  sources tracked: the oldest go, as when the table is full), in the Python limiter and in the C
  fast lane (`FastLane.limit`, whose table of sources is made again with the newest kept, and
  `FastLane.exempt`); turning the limit on or off needs a restart (it rewires the edges);
- the DTLS and TLS credentials: `dtls_cert`, `dtls_key` and `dtls_ca` are read again (changed paths
  or changed files), for the handshakes that start from then on; established sessions keep theirs;
- `admin_token` (`admin_token_file` read again);
- the registry, read again whole.

Any other changed setting is named in the reload's line as needing a restart (listen addresses,
workers, the bus, ...), and the running corem keeps its value.  A configuration that no longer
loads is refused whole: one line, nothing changed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Protocol

from . import logs
from .admin import token as admin_token
from .config import SECRETS, Settings
from .net.limits import SourceLimiter, lane_networks

if TYPE_CHECKING:
    from .fastlane import FastLane


class Listening(Protocol):
    """What `apply` changes in a server's transports (corem/transports.py `Transports`)."""

    def limits(self) -> tuple[list[SourceLimiter], list[FastLane]]: ...
    def credential_swaps(self, new: Settings) -> list[Callable[[], None]]: ...


class Running(Protocol):
    """What `apply` changes in a running server (corem/server.py `Server`)."""

    settings: Settings

    @property
    def transports(self) -> Listening: ...
    def use_admin_token(self, token: str) -> None: ...
    async def reload_registry(self) -> None: ...

log = logging.getLogger("corem")

#: settings a reload applies (besides those, the credentials' files and the registry are read again)
RELOADED = frozenset({"log_level", "log_format", "rate_limit_per_source", "rate_limit_sources", "rate_limit_exempt",
                      "dtls_cert", "dtls_key", "dtls_ca", "admin_token", "admin_token_file"})
#: the rate limit's settings (`apply_limits`)
LIMITS = ("rate_limit_per_source", "rate_limit_sources", "rate_limit_exempt")
LISTENERS = ("coap", "coaps", "coap_tcp", "coaps_tcp", "http")
#: settings that stay secret in the reload's line (their names only)
_QUIET = frozenset(SECRETS) | {s + "_file" for s in SECRETS}


@dataclass
class Report:
    """What one reload did: `done` (what it applied, in words), `restart` (changed settings it could
    not apply), `failed` (what it tried and could not, in words: the old value stays)."""

    done: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: where it was applied, when not in this process alone ("2 of 2 workers")
    where: str = ""

    def merge(self, other: dict[str, list[str]], prefix: str = "") -> None:
        """Another process's report (a worker's, as its dict) into this one."""
        for item in other.get("done", []):
            if item not in self.done:
                self.done.append(item)
        for key in other.get("restart", []):
            if key not in self.restart:
                self.restart.append(key)
        self.failed.extend(prefix + f for f in other.get("failed", []))

    def line(self, signal: str = "SIGHUP") -> str:
        """The one log line: what was reloaded, what was not and why."""
        text = f"reloaded on {signal}{f' ({self.where})' if self.where else ''}: " + (", ".join(self.done) or "nothing")
        if self.failed:
            text += "; failed, kept as before: " + "; ".join(self.failed)
        if self.restart:
            listeners = [k for k in self.restart if k in LISTENERS]
            others = [k for k in self.restart if k not in LISTENERS]
            reasons = ([f"{', '.join(listeners)} (listen addresses need a restart)"] if listeners else []) + (
                [f"{', '.join(others)} (need a restart)"] if others else [])
            text += "; changed but not applied: " + "; ".join(reasons)
        return text

    @property
    def level(self) -> int:
        return logging.WARNING if self.failed or self.restart else logging.INFO


def changed(old: Settings, new: Settings) -> list[str]:
    return [k for k in Settings.keys() if getattr(old, k) != getattr(new, k)]


def restart_needed(keys: list[str]) -> list[str]:
    return [k for k in keys if k not in RELOADED]


def describe(key: str, old: Settings, new: Settings) -> str:
    if key in _QUIET:
        return key
    before, after = (_shown(getattr(s, key)) for s in (old, new))
    return f"{key} {before} -> {after}"


def _shown(value: Any) -> str:
    """A setting's value in the reload's line: an empty one as `""`."""
    return '""' if value == "" else str(value)


def apply_log_level(old: Settings, new: Settings, report: Report) -> None:
    """The process's log level (every logger of corem inherits the root's)."""
    if new.log_level != old.log_level:
        logging.getLogger().setLevel(new.log_level.upper())
        report.done.append(describe("log_level", old, new))


def apply_log_format(old: Settings, new: Settings, report: Report) -> None:
    """The process's log lines as logfmt or JSON from the next one (corem/logs.py `use_format`)."""
    if new.log_format != old.log_format:
        logs.use_format(new.log_format)
        report.done.append(describe("log_format", old, new))


def apply_limits(old: Settings, new: Settings, limiters: list[SourceLimiter], lanes: list[FastLane],
                 report: Report) -> list[str]:
    """The per-source rate limit's settings on the running edges: `limiters`, the Python ones
    (corem/net/limits.py), and `lanes`, the C lanes that apply the limit themselves.  Each key is
    applied everywhere or nowhere (then named as needing a restart).  Returns the keys applied."""
    keys = [k for k in LIMITS if getattr(old, k) != getattr(new, k)]
    if not keys:
        return []
    if not old.rate_limit_per_source and not new.rate_limit_per_source:  # nothing limits: nothing to change
        report.done += [describe(k, old, new) + " (the limit is off)" for k in keys]
        return keys
    if not (old.rate_limit_per_source and new.rate_limit_per_source):  # on <-> off rewires the edges
        report.restart += keys
        return []
    sources = new.rate_limit_sources
    exempt, rate = new.exempt_networks(), new.rate_limit_per_source
    for lane in lanes:
        if keys != ["rate_limit_exempt"]:  # (a new rate or bound: the C table made again, the newest kept)
            lane.limit(rate, 2 * rate, sources)
        if "rate_limit_exempt" in keys:
            lane.exempt(lane_networks(exempt))
    for limiter in limiters:
        limiter.retune(rate, sources, exempt)
    report.done += [describe(k, old, new) for k in keys]
    return keys


async def apply(server: Running, new: Settings) -> Report:
    """Apply to `server` what of `new` can change without dropping a device: the log level and
    format, the rate limit, the DTLS/TLS credentials (read again), the admin token and the registry
    (read again); the other changed settings are reported as needing a restart and keep their
    running values (`server.settings` takes only what was applied)."""
    old, report = server.settings, Report()
    keys = changed(old, new)
    apply_log_level(old, new, report)
    apply_log_format(old, new, report)
    taken: list[str] = [k for k in ("log_level", "log_format") if k in keys]
    taken += apply_limits(old, new, *server.transports.limits(), report)
    credentials = ("dtls_cert", "dtls_key", "dtls_ca")
    if any(getattr(s, k) for s in (old, new) for k in credentials):
        try:
            swaps = server.transports.credential_swaps(new)
        except (ValueError, OSError) as e:
            report.failed.append(f"dtls credentials ({e})")
        else:
            for swap in swaps:
                swap()
            if swaps:  # (no CoAPS nor coaps+tcp listener: nothing uses them)
                report.done.append("dtls credentials (dtls_cert, dtls_key, dtls_ca read again)")
            taken += [k for k in credentials if k in keys]
    if "admin_token" in keys or "admin_token_file" in keys:
        server.use_admin_token(new.admin_token or admin_token.read_or_create(new.data_path))
        report.done.append("admin_token")
        taken += ["admin_token", "admin_token_file"]
    await server.reload_registry()
    report.done.append("registry (read again)")
    report.restart += [k for k in restart_needed(keys) if k not in report.restart]
    server.settings = applied(old, new, taken)
    return report


def reread(settings: Settings) -> Settings:
    """`settings` loaded again as they are (a worker's, or a process started without a way to
    read its sources again): the secrets' files are read again."""
    values: dict[str, Any] = asdict(settings)
    for secret in SECRETS:
        if values[secret + "_file"]:
            values[secret] = ""
    return Settings.load(values, env={})


def applied(old: Settings, new: Settings, keys: list[str]) -> Settings:
    """`old` with the values of `keys` (those the reload applied) from `new`."""
    return replace(old, **{k: getattr(new, k) for k in keys})
