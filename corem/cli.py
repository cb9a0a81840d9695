"""`corem serve`, `corem devices add|import|list|remove`, `corem profiles add|list|show|remove|decode`,
`corem telemetry tail`, and the runtime
commands that go through the admin API (`attributes`, `rpc`, `command`, `firmware`, `provisioning`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec
import trio

from .bus import read_records
from . import config_doc, datadir, logs
from .admin import schemas as api_schemas
from .bus import topics
from .build import version
from .config import ConfigError, Settings
from .errors import BadInput, CoremError, NotFound, StartRefused
from .inputs import add_flags, names
from .ingest.point import decode_point
from .profiles.compile import compile_profile
from .profiles.spec import DEFAULT as DEFAULT_PROFILE
from .profiles.spec import Profile, ProfileError, parse_profile, profile_from
from .profiles.trial import SampleError, decode_sample, sample_bytes
from .registry import Registry, bulk
from .registry.inputs import DeviceFields
from .registry.management import Management
from .registry.nudge import nudge
from .reload import reread as reread_settings
from .sdnotify import Notifier

log = logging.getLogger("corem")
#: the start and stop lines, logged whatever log_level says (corem/logs.py)
serve_log = logging.getLogger(logs.SERVE)


def _add_settings_flags(p: argparse.ArgumentParser, keys: list[str]) -> None:
    """A flag per setting, in argument groups by area (corem/config_doc.py), each with its
    default and its environment variable; the defaults themselves stay None (not given: the
    environment and the config file decide)."""
    p.add_argument("--config", metavar="FILE", help="TOML config file (env COREM_CONFIG); `corem config show` "
                                                    "prints a complete one")
    for title, about, group_keys in config_doc.grouped(keys):
        group = p.add_argument_group(f"{title} settings", about or None)
        for key in group_keys:
            text = f"{Settings.help(key)} [default: {config_doc.shown_default(key)}; env COREM_{key.upper()}]"
            group.add_argument(
                "--" + key.replace("_", "-"),
                dest=key,
                metavar=config_doc.metavar(key),
                help=text.replace("%", "%%"),
            )


def _settings(args: argparse.Namespace, keys: list[str]) -> Settings:
    return Settings.load({k: getattr(args, k) for k in keys}, config_file=args.config)


# -- serve -------------------------------------------------------------------------------------
def setup_logging(settings: Settings, worker: int | None = None) -> None:
    """Log lines to stderr as logfmt or JSON (`log_format`, corem/logs.py); in a worker, `worker=N`."""
    logs.setup_logging(settings.log_level, settings.log_format, worker)


async def run_until_signalled(server: Any, announce: bool = True,
                              reread: Callable[[], Settings] | None = None, notify: Notifier | None = None) -> None:
    """Run a Server (or the workers' Supervisor) until SIGINT or SIGTERM, then stop it gracefully.

    SIGHUP reloads (corem/reload.py): the settings are read again -- `reread()`, the config file,
    the environment and the flags as at start; without it, the running settings with their
    secrets' files -- and the server applies what can change without dropping a device.  A
    configuration that no longer loads is one error line, and nothing changes.  A SIGHUP before
    the start completed is ignored (its default action would end corem at once).

    `notify`: systemd is told (corem/sdnotify.py) READY=1 once every listener serves, RELOADING=1
    then READY=1 around each reload, STOPPING=1 when the stop begins."""
    started = trio.Event()
    notify = notify or Notifier(None)
    status = ""

    async def reload() -> None:
        notify.reloading()
        try:
            new = reread() if reread is not None else reread_settings(server.settings)
        except ConfigError as e:
            log.error("SIGHUP: the configuration is refused, nothing reloaded: %s", e)
            notify.ready(status)
            return
        try:
            await server.reload(new)
        except Exception:  # noqa: BLE001 - a reload must not end a serving corem
            log.exception("SIGHUP: the reload failed; corem goes on as before")
        finally:
            notify.ready(status)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as outer:

            async def stop_at_a_signal() -> None:  # from the start: a start that hangs stops too
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if started.is_set():
                            outer.start_soon(reload)
                        else:
                            log.warning("SIGHUP before corem started: ignored (send it again once it serves)")
                        continue
                    notify.stopping()
                    server.stop()
                    return

            outer.start_soon(stop_at_a_signal)
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(server.run)
                started.set()
                listening = []
                for name, on, addr in (("coap", "udp ", bound.coap), ("coaps", "udp ", bound.coaps),
                                       ("coap+tcp", "tcp ", bound.coap_tcp), ("coaps+tcp", "tcp ", bound.coaps_tcp),
                                       ("http", "http://", bound.http)):
                    if addr:
                        listening.append(f"{name} {on}{logs.address(addr)}")
                    if addr and announce:  # e.g. "coap listening on udp 0.0.0.0:5683", "http listening on http://…"
                        serve_log.info("%s listening on %s%s", name, on, addr,
                                       extra=logs.fields(listener=name, address=addr))
                status = "serving: " + ", ".join(listening)
                notify.ready(status)
            outer.cancel_scope.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    notify = Notifier.from_environ()  # (taken out of the environment: the workers do not speak to systemd)
    settings = _settings(args, Settings.keys())

    def reread() -> Settings:  # (SIGHUP: the same sources, read again)
        return _settings(args, Settings.keys())

    setup_logging(settings)
    n = settings.worker_count()
    if n > 1:
        from .workers.supervisor import Supervisor

        supervisor = Supervisor(settings, n)
        serve_log.info("%d workers", n, extra=logs.fields(workers=n))
        _run_or_refuse(supervisor, reread, notify)
    else:
        from .server import Server

        _run_or_refuse(Server(settings), reread, notify)
    return 0


def _run_or_refuse(server: Any, reread: Callable[[], Settings] | None = None, notify: Notifier | None = None) -> None:
    """Run until signalled; a ConfigError raised once Trio runs (a port another process holds, a
    setting only the workers check), or a store that cannot give what the start needs of it
    (StartRefused: the DTLS record marks of a run before), leaves its nurseries as an exception
    group: one line, status 2."""
    try:
        trio.run(run_until_signalled, server, True, reread, notify)
    except BaseExceptionGroup as group:
        found = group.subgroup((ConfigError, StartRefused))
        if found is None:
            raise
        refused: BaseException = found
        while isinstance(refused, BaseExceptionGroup):
            refused = refused.exceptions[0]
        raise refused from None


# -- devices -----------------------------------------------------------------------------------
_REGISTRY_KEYS = ["data_dir", "registry"]


def _registry(args: argparse.Namespace) -> Registry:
    settings = _settings(args, _REGISTRY_KEYS)
    if not settings.registry:  # (SQLite in the data dir: made, or refused if a newer corem wrote it)
        args.made_data_dir = not settings.data_path.exists()
        datadir.prepare(settings.data_path)
    return Registry(settings.registry_location())


def _nudge(reg: Registry, args: argparse.Namespace | None = None) -> None:
    """A running server on this registry reloads now (PostgreSQL: its NOTIFY has told every node).
    When no corem serve runs on the data dir, the change waits there, and stderr says so -- naming
    the data dirs the corem serve processes of this machine do run on: a CLI run from another
    directory (its own ./data) writes a registry no server reads."""
    if reg.path is None:
        return
    data = reg.path.parent
    if nudge(data) or datadir.holder(data) is not None:
        return
    made = " (made now)" if getattr(args, "made_data_dir", False) else ""
    others = [(pid, d) for pid, d in datadir.running() if d.resolve() != data.resolve()]
    where = ", ".join(f"{d} (pid {pid})" for pid, d in others)
    hint = (f"; corem serve runs here on {where}: use --data-dir "
            f"{others[0][1] if len(others) == 1 else 'DIR'} (or COREM_DATA_DIR) to change what it serves")
    print(f"corem: no corem serve runs on data dir {data.resolve()}{made}: the change is stored there, for a "
          f"server started on it" + (hint if others else ""), file=sys.stderr)


@contextlib.contextmanager
def _opened(args: argparse.Namespace) -> Iterator[Registry]:
    """The registry for one command, closed however the command ends."""
    reg = _registry(args)
    try:
        yield reg
    finally:
        reg.close()


def secret_file(path: str, key: str) -> bytes:
    """A key from a file (`--psk-file`, `--oscore-secret-file`): its bytes without a trailing
    newline, so that neither the command line (`ps`) nor the shell's history holds it."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise BadInput(f"{key}: cannot read {path}: {e.strerror or e}") from None
    raw = raw.removesuffix(b"\n").removesuffix(b"\r")
    if not raw:
        raise BadInput(f"{key}: {path} is empty")
    return raw


def _from_file(args: argparse.Namespace, name: str) -> str | None:
    """`--NAME-file`'s key as the hex `--NAME-hex` takes; None without the flag.  Only one of
    `--NAME`, `--NAME-hex`, `--NAME-file`."""
    path = getattr(args, name + "_file")
    if path is None:
        return None
    if getattr(args, name) is not None or getattr(args, name + "_hex") is not None:
        flag = "--" + name.replace("_", "-")
        raise BadInput(f"{name}: give {flag}, {flag}-hex or {flag}-file, not two of them")
    return secret_file(path, name + "_file").hex()


def cmd_devices_add(args: argparse.Namespace) -> int:
    """The device of the flags (registry/inputs.py's DeviceFields, as the API and the import take
    it), the keys of `--psk-file` and `--oscore-secret-file` as their hex."""
    given = {name: getattr(args, name) for name in names(DeviceFields)}
    psk_hex, secret_hex = _from_file(args, "psk"), _from_file(args, "oscore_secret")
    given["psk_hex"] = psk_hex or given["psk_hex"]
    given["oscore_secret_hex"] = secret_hex or given["oscore_secret_hex"]
    ask = DeviceFields(**given)
    cert = None
    if args.cert is not None:
        from .dtls import certificate_sha256

        try:
            cert = certificate_sha256(args.cert)
        except (OSError, ValueError) as e:
            raise BadInput(f"cert: {e}") from None
    token = api_schemas.generated_token(ask, cert)
    with _opened(args) as reg:
        d = reg.add_device(ask.tenant, ask.device, **ask.settings(cert_sha256=cert, token=token))
    _nudge(reg, args)  # a running server has it when this returns
    creds = [c for c, have in (("token", d.token), ("psk", d.psk_identity), ("cert", d.cert_sha256),
                               ("oscore", d.oscore)) if have]
    print(f"added {d.tenant}/{d.device} profile={d.profile} credentials={','.join(creds) or 'none'}")
    if token is not None and args.token is None:  # (generated: the only time it is shown)
        print(f"token {token}")
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    with _opened(args) as reg:
        devices = reg.list_devices(args.tenant)
    if args.json:  # as the API shows a device (corem/admin/schemas.py): its secrets only with --secrets
        view = api_schemas.DeviceSecrets if args.secrets else api_schemas.DeviceRecord
        for d in devices:
            sys.stdout.write(msgspec.json.encode(view.of(d)).decode() + "\n")
        return 0
    print(f"{'TENANT':<20} {'DEVICE':<28} {'PROFILE':<12} CREDENTIALS")
    for d in devices:
        creds = [
            c
            for c, have in (
                ("token", d.token),
                (f"psk:{d.psk_identity}", d.psk_identity),
                (f"cert:{(d.cert_sha256 or '')[:16]}", d.cert_sha256),
                (f"oscore:{d.oscore.recipient_id.hex() if d.oscore else ''}", d.oscore),
            )
            if have
        ]
        print(f"{d.tenant:<20} {d.device:<28} {d.profile:<12} {' '.join(creds) or '-'}")
    return 0


def cmd_devices_remove(args: argparse.Namespace) -> int:
    with _opened(args) as reg:
        removed = Management(reg).remove(args.tenant, args.device)  # (its attributes, claim, packages too)
    if removed:
        _nudge(reg, args)
    if not removed:
        print(f"corem: device {args.tenant}/{args.device} not found", file=sys.stderr)
        return 1
    print(f"removed {args.tenant}/{args.device}")
    return 0


def cmd_devices_import(args: argparse.Namespace) -> int:
    """Many devices from a .csv or .jsonl file; a progress bar on a terminal."""
    path = Path(args.file)
    kind = bulk.kind_of(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"file: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    total = sum(1 for line in text.splitlines() if line.strip()) - (1 if kind == "csv" else 0)
    started = time.monotonic()
    bar = _progress(total) if sys.stderr.isatty() else None
    try:
        with _opened(args) as reg:
            result = bulk.import_devices(reg, bulk.read_lines(text, kind), replace=args.replace, progress=bar)
    finally:
        if bar is not None:
            print(file=sys.stderr)  # (past the progress bar's line)
    _nudge(reg, args)  # a running server reloads (off its event loop) before this returns
    print(f"imported {total} devices in {time.monotonic() - started:.1f} s: {result.added} added, "
          f"{result.replaced} replaced, {result.unchanged} unchanged")
    return 0


def _progress(total: int) -> Callable[[int], None]:
    def show(done: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        print(f"\rimporting [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}", end="", file=sys.stderr,
              flush=True)

    return show


# -- profiles ----------------------------------------------------------------------------------
def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{what}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _profile(args: argparse.Namespace) -> Profile:
    """The profile from --file or --json, with a .proto from --proto (which alone is a protobuf
    profile of ThingsBoard's defaults)."""
    if args.file is not None and args.json is not None or (args.file is None and args.json is None
                                                               and args.proto is None):
        raise BadInput("profile: give it with --file FILE or --json TEXT (one of them), or --proto FILE")
    text = args.json if args.json is not None else _read_text(args.file, "file") if args.file else "{}"
    if args.proto is None:
        if args.message:
            raise BadInput("message: names a message of the schema given with --proto")
        return parse_profile(text)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ProfileError("profile: expected an object")
    raw.setdefault("format", "protobuf")
    raw["schema"] = _read_text(args.proto, "proto")
    if args.message:
        raw["message"] = args.message
    return profile_from(raw)


def cmd_profiles_add(args: argparse.Namespace) -> int:
    try:
        profile = _profile(args)
        compile_profile(profile)  # a script that does not load is refused now, not at the first reading
    except ProfileError as e:
        raise BadInput(str(e)) from None
    with _opened(args) as reg:
        created = reg.put_profile(args.name, profile)
    _nudge(reg, args)  # devices naming it decode with it when this returns
    print(f"{'added' if created else 'replaced'} profile {args.name} format={profile.format} "
          f"rules={len(profile.fields)}")
    return 0


def cmd_profiles_list(args: argparse.Namespace) -> int:
    with _opened(args) as reg:
        profiles = reg.list_profiles()
        used = Counter(d.profile for d in reg.list_devices())
    if args.json:
        for name, p in profiles.items():
            print(msgspec.json.encode({"name": name, "devices": used.get(name, 0), "profile": p}).decode())
        return 0
    print(f"{'PROFILE':<24} {'FORMAT':<12} {'RULES':>5} {'DEVICES':>8}")
    print(f"{'default':<24} {'flat':<12} {0:>5} {used.get('default', 0):>8}  (built in)")
    for name, p in profiles.items():
        print(f"{name:<24} {p.format:<12} {len(p.fields):>5} {used.get(name, 0):>8}")
    return 0


def _stored_profile(reg: Registry, name: str) -> Profile | None:
    if name == DEFAULT_PROFILE:
        return None
    profile = reg.list_profiles().get(name)
    if profile is None:
        raise NotFound(f"profile: {name!r} does not exist")
    return profile


def cmd_profiles_show(args: argparse.Namespace) -> int:
    with _opened(args) as reg:
        profile = _stored_profile(reg, args.name) or Profile()
    print(json.dumps(msgspec.to_builtins(profile), indent=2))
    return 0


def cmd_profiles_remove(args: argparse.Namespace) -> int:
    with _opened(args) as reg:
        removed = reg.remove_profile(args.name)
    if not removed:
        print(f"corem: profile {args.name} not found", file=sys.stderr)
        return 1
    _nudge(reg, args)
    print(f"removed profile {args.name}")
    return 0


def cmd_profiles_decode(args: argparse.Namespace) -> int:
    """Decode a sample offline, with the profile as stored: what the device would be answered."""
    with _opened(args) as reg:
        profile = _stored_profile(reg, args.name)
    try:
        payload = Path(args.file).read_bytes() if args.file else sample_bytes(args.hex, args.base64)
    except (SampleError, OSError) as e:
        raise BadInput(str(e)) from None
    result = decode_sample(profile, args.content_format, payload, int(time.time() * 1000))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 1 if "error" in result else 0


# -- telemetry ---------------------------------------------------------------------------------
_TAIL_KEYS = _REGISTRY_KEYS + ["bus", "topic_prefix"]


def cmd_telemetry_tail(args: argparse.Namespace) -> int:
    """The newest `--limit` points of the embedded bus (every one with 0), then with -f the new
    ones as they come.  A data dir whose server writes to Kafka is said so (nothing is there)."""
    settings = _settings(args, _TAIL_KEYS)
    data = settings.data_path
    datadir.check(data)
    last = datadir.last_server(data)
    # the topic prefix: the one given, else the one the data dir's server wrote with
    topics.configure(settings.topic_prefix or last.get("topic_prefix", ""))
    bus = settings.bus if settings.bus != "embedded" else last.get("bus", "embedded")
    if bus != "embedded":
        pid = datadir.holder(data)
        if settings.bus != "embedded":
            whose = f"bus = {bus}"
        elif pid:
            whose = f"its corem serve (pid {pid}) writes to {bus}"
        else:
            whose = f"its last corem serve wrote to {bus}"
        hosts = bus.removeprefix("kafka://")
        print(f"corem: telemetry of data dir {data.resolve()} is not kept there ({whose}): read the topics "
              f"{topics.telemetry('{tenant}')} there, e.g. kcat -C -b {hosts} -t "
              f"{topics.telemetry(args.tenant or 'TENANT')}", file=sys.stderr)
        return 1
    path = data / datadir.BUS_FILE
    if not path.exists() and not args.follow:
        servers = "; ".join(f"corem serve (pid {pid}) runs on {d}" for pid, d in datadir.running())
        print(f"corem: no readings stored in data dir {data.resolve()} (no bus.db)" + (f"; {servers}" if servers else ""),
              file=sys.stderr)
        return 0
    prefix = topics.telemetry(args.tenant) if args.tenant else topics.telemetry_all()
    newest = list(read_records(path, prefix, 0, args.limit or None, newest=True))
    _print_records(newest, args.json)
    if not args.follow:
        return 0
    after = newest[-1].offset if newest else 0  # (none yet: every one that comes is new)
    try:
        while True:
            records = list(read_records(path, prefix, after, 1000))
            _print_records(records, args.json)
            if records:
                after = records[-1].offset
            else:
                time.sleep(0.5)
    except KeyboardInterrupt:
        return 0


def _print_records(records: list, as_json: bool) -> None:
    for r in records:
        if as_json:
            sys.stdout.write(r.value.decode() + "\n")
            continue
        p = decode_point(r.value)
        when = datetime.fromtimestamp(p.ts / 1000, timezone.utc).isoformat(timespec="milliseconds")
        values = {**{k: _num(v) for k, v in p.numeric_values.items()}, **p.string_values}
        fields = " ".join(f"{k}={v}" for k, v in values.items())
        sys.stdout.write(f"{when} {p.tenant}/{p.device} {fields}\n")
    sys.stdout.flush()


def _num(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


# -- config ------------------------------------------------------------------------------------
def cmd_config_show(args: argparse.Namespace) -> int:
    """A complete commented corem.toml: the settings corem would run with here (the config file,
    COREM_* and the flags given), or with --defaults the defaults."""
    settings = Settings() if args.defaults else _settings(args, Settings.keys())
    sys.stdout.write(config_doc.show(settings, defaults=args.defaults, secrets=args.secrets))
    return 0


# -- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corem", description="the CORE-M device-link CoAP adapter")
    parser.add_argument("--version", action="version", version=f"corem {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the server (embedded defaults need no arguments)",
        usage="corem serve [-h] [--config FILE] [--SETTING VALUE ...]",
        description="Run corem. Every setting is a flag, an environment variable COREM_<KEY> or a key of the "
                    "--config file (flags win over the environment, which wins over the file). SIGTERM or SIGINT "
                    "stop it gracefully; SIGHUP reloads the config file and what can change without dropping a "
                    "device (log level, log format, rate limit, DTLS certificates and keys, admin token, registry).")
    _add_settings_flags(serve, Settings.keys())
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="the configuration").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", usage="corem config show [-h] [--defaults] [--secrets] [--config FILE] "
                                           "[--SETTING VALUE ...]", help="print a complete commented corem.toml: every setting, its help and its "
                                          "current value (or --defaults)")
    _add_settings_flags(show, Settings.keys())
    show.add_argument("--defaults", action="store_true", help="the defaults, not the current settings")
    show.add_argument("--secrets", action="store_true",
                      help="print secrets given as themselves (withheld otherwise; a secret from a file is shown as "
                           "its file)")
    show.set_defaults(func=cmd_config_show)

    devices = sub.add_parser("devices", help="manage registered devices").add_subparsers(dest="action", required=True)
    add = devices.add_parser("add", help="register a device")
    _add_settings_flags(add, _REGISTRY_KEYS)
    add_flags(add, DeviceFields)  # (the device's fields: registry/inputs.py, as the API and the import take them)
    add.add_argument("--psk-file", metavar="FILE", help="DTLS pre-shared key: the file's bytes, without a trailing "
                                                        "newline (kept out of the command line)")
    add.add_argument("--oscore-secret-file", metavar="FILE",
                     help="OSCORE master secret: the file's bytes, without a trailing newline")
    add.add_argument("--cert", metavar="PEM", help="the device's X.509 certificate (registered by SHA-256)")
    add.set_defaults(func=cmd_devices_add)
    ls = devices.add_parser("list", help="list devices")
    _add_settings_flags(ls, _REGISTRY_KEYS)
    ls.add_argument("--tenant")
    ls.add_argument("--json", action="store_true", help="one JSON object per line, as the API shows a device")
    ls.add_argument("--secrets", action="store_true", help="with --json: the token and keys too (hex)")
    ls.set_defaults(func=cmd_devices_list)
    imp = devices.add_parser("import", help="register many devices from a .csv or .jsonl file (idempotent)")
    _add_settings_flags(imp, _REGISTRY_KEYS)
    imp.add_argument("file", help="CSV with a header, or JSON Lines; fields: " + ", ".join(bulk.FIELDS))
    imp.add_argument("--replace", action="store_true", help="overwrite devices that exist with other settings")
    imp.set_defaults(func=cmd_devices_import)
    rm = devices.add_parser("remove", help="remove a device and its credentials")
    _add_settings_flags(rm, _REGISTRY_KEYS)
    rm.add_argument("--tenant", required=True)
    rm.add_argument("--device", required=True)
    rm.set_defaults(func=cmd_devices_remove)

    profiles = sub.add_parser("profiles", help="manage device profiles (payload formats and rules)").add_subparsers(
        dest="action", required=True)
    padd = profiles.add_parser("add", help="add or replace a profile (JSON: format, nested, fields)")
    _add_settings_flags(padd, _REGISTRY_KEYS)
    padd.add_argument("name")
    padd.add_argument("--file", help="the profile's JSON in a file")
    padd.add_argument("--json", help="the profile's JSON")
    padd.add_argument("--proto", metavar="FILE", help="a proto3 schema: the profile decodes protobuf payloads with "
                                                      "its last message (ThingsBoard's rule) or --message")
    padd.add_argument("--message", help="with --proto: the message a payload is")
    padd.set_defaults(func=cmd_profiles_add)
    pls = profiles.add_parser("list", help="list profiles and how many devices use each")
    _add_settings_flags(pls, _REGISTRY_KEYS)
    pls.add_argument("--json", action="store_true", help="one JSON object per line")
    pls.set_defaults(func=cmd_profiles_list)
    pshow = profiles.add_parser("show", help="print a profile's JSON")
    _add_settings_flags(pshow, _REGISTRY_KEYS)
    pshow.add_argument("name")
    pshow.set_defaults(func=cmd_profiles_show)
    prm = profiles.add_parser("remove", help="remove a profile no device uses")
    _add_settings_flags(prm, _REGISTRY_KEYS)
    prm.add_argument("name")
    prm.set_defaults(func=cmd_profiles_remove)
    pdec = profiles.add_parser("decode", help="decode a sample payload with a profile (exit 1 if refused)")
    _add_settings_flags(pdec, _REGISTRY_KEYS)
    pdec.add_argument("name")
    pdec.add_argument("--content-format", "-t", type=int, help="the CoAP Content-Format number (50, 60, 110, 112)")
    pdec.add_argument("--hex", help="the payload as hex")
    pdec.add_argument("--base64", help="the payload as base64")
    pdec.add_argument("--file", help="the payload in a file (raw bytes)")
    pdec.set_defaults(func=cmd_profiles_decode)

    telemetry = sub.add_parser("telemetry", help="read stored telemetry").add_subparsers(dest="action", required=True)
    tail = telemetry.add_parser("tail", help="print the points stored in the embedded bus, oldest first")
    _add_settings_flags(tail, _TAIL_KEYS)
    tail.add_argument("--tenant")
    tail.add_argument("--json", action="store_true", help="print each point as its JSON bus record")
    tail.add_argument("--limit", type=int, default=20, help="how many of the newest points (0: all); with -f, "
                                                             "before the new ones")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new points (Ctrl-C ends)")
    tail.set_defaults(func=cmd_telemetry_tail)

    from .admin import client

    client.add_parsers(sub, _add_settings_flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CoremError) as e:  # a refusal of corem/errors.py, by its kind: one line, status 2
        print(f"corem: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
