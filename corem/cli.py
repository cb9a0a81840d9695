"""`corem serve`, `corem devices add|list|remove`, `corem telemetry tail`, and the runtime
commands that go through the admin API (`attributes`, `rpc`, `command`, `firmware`, `provisioning`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from datetime import datetime, timezone

import msgspec
import trio

from .bus import read_records
from .config import ConfigError, Settings
from .errors import StorageUnavailable
from .ingest.point import decode_point
from .registry import Registry, RegistryError
from .registry.nudge import nudge
from .registry.store import parse_psk


def _add_settings_flags(p: argparse.ArgumentParser, keys: list[str]) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (env COREM_CONFIG)")
    for key in keys:
        p.add_argument(
            "--" + key.replace("_", "-"),
            dest=key,
            metavar=key.upper(),
            help=f"{Settings.help(key)} (env COREM_{key.upper()})",
        )


def _settings(args: argparse.Namespace, keys: list[str]) -> Settings:
    return Settings.load({k: getattr(args, k) for k in keys}, config_file=args.config)


def _fmt_addr(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


# -- serve -------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args, Settings.keys())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if settings.log_format == "json"
        else logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    )
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    from .server import Server

    async def main() -> None:
        server = Server(settings)
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                bound = await nursery.start(server.run)
                if bound.coap:
                    print(f"corem: coap listening on udp {_fmt_addr(bound.coap)}", flush=True)
                if bound.coaps:
                    print(f"corem: coaps listening on udp {_fmt_addr(bound.coaps)}", flush=True)
                if bound.http:
                    print(f"corem: http listening on http://{_fmt_addr(bound.http)}", flush=True)
                async for _ in signals:
                    server.stop()
                    break

    trio.run(main)
    print("corem: stopped", flush=True)
    return 0


# -- devices -----------------------------------------------------------------------------------
_REGISTRY_KEYS = ["data_dir"]


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(_settings(args, _REGISTRY_KEYS).data_path / "registry.db")


def cmd_devices_add(args: argparse.Namespace) -> int:
    psk = parse_psk(args.psk, args.psk_hex)
    cert = None
    if args.cert is not None:
        from .dtls import certificate_sha256

        try:
            cert = certificate_sha256(args.cert)
        except (OSError, ValueError) as e:
            raise RegistryError(f"cert: {e}") from None
    reg = _registry(args)
    try:
        d = reg.add_device(
            args.tenant, args.device, token=args.token, profile=args.profile, psk_identity=args.psk_identity, psk=psk,
            cert_sha256=cert, power_mode=args.power_mode, topics=args.topics, gateways=args.gateways,
        )
    finally:
        reg.close()
    nudge(reg.path.parent)  # a running server has it when this returns
    creds = [c for c, have in (("token", d.token), ("psk", d.psk_identity), ("cert", d.cert_sha256)) if have]
    print(f"added {d.tenant}/{d.device} profile={d.profile} credentials={','.join(creds) or 'none'}")
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    try:
        devices = reg.list_devices(args.tenant)
    finally:
        reg.close()
    if args.json:
        for d in devices:  # secrets stay in the registry: say that a key exists, not what it is
            print(msgspec.json.encode(msgspec.structs.replace(d, psk=None)).decode())
        return 0
    print(f"{'TENANT':<20} {'DEVICE':<28} {'PROFILE':<12} CREDENTIALS")
    for d in devices:
        creds = [
            c
            for c, have in (
                ("token", d.token),
                (f"psk:{d.psk_identity}", d.psk_identity),
                (f"cert:{(d.cert_sha256 or '')[:16]}", d.cert_sha256),
            )
            if have
        ]
        print(f"{d.tenant:<20} {d.device:<28} {d.profile:<12} {' '.join(creds) or '-'}")
    return 0


def cmd_devices_remove(args: argparse.Namespace) -> int:
    reg = _registry(args)
    try:
        removed = reg.remove_device(args.tenant, args.device)
    finally:
        reg.close()
    if removed:
        nudge(reg.path.parent)
    if not removed:
        print(f"corem: device {args.tenant}/{args.device} not found", file=sys.stderr)
        return 1
    print(f"removed {args.tenant}/{args.device}")
    return 0


# -- telemetry ---------------------------------------------------------------------------------
def cmd_telemetry_tail(args: argparse.Namespace) -> int:
    settings = _settings(args, _REGISTRY_KEYS)
    path = settings.data_path / "bus.db"
    prefix = "telemetry.raw." + (args.tenant if args.tenant else "")
    after = 0
    if not args.follow:
        _print_records(list(read_records(path, prefix, 0, args.limit or None, newest=True)), args.json)
        return 0
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


# -- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corem", description="the CORE-M device-link CoAP adapter")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (embedded defaults need no arguments)")
    _add_settings_flags(serve, Settings.keys())
    serve.set_defaults(func=cmd_serve)

    devices = sub.add_parser("devices", help="manage registered devices").add_subparsers(dest="action", required=True)
    add = devices.add_parser("add", help="register a device")
    _add_settings_flags(add, _REGISTRY_KEYS)
    add.add_argument("--tenant", required=True)
    add.add_argument("--device", required=True)
    add.add_argument("--token", help="access token for POST /api/v1/{token}/telemetry")
    add.add_argument("--profile", default="default", help="payload decoder profile (default: default)")
    add.add_argument("--psk-identity", help="DTLS-PSK identity (CoAPS)")
    add.add_argument("--psk", help="DTLS pre-shared key as text")
    add.add_argument("--psk-hex", help="DTLS pre-shared key as hex")
    add.add_argument("--cert", metavar="PEM", help="the device's X.509 certificate (registered by SHA-256)")
    add.add_argument("--power-mode", choices=["drx", "psm"], default="drx",
                     help="psm: reachable only psm_activity_timer after it talks; downlink queues meanwhile")
    add.add_argument("--topics", default="#", help="MQTT filters the device may use on /ps and /mqtt (default: #)")
    add.add_argument("--gateways", default="", help="devices (same tenant) that may publish for this one (Drogue as=)")
    add.set_defaults(func=cmd_devices_add)
    ls = devices.add_parser("list", help="list devices")
    _add_settings_flags(ls, _REGISTRY_KEYS)
    ls.add_argument("--tenant")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=cmd_devices_list)
    rm = devices.add_parser("remove", help="remove a device and its credentials")
    _add_settings_flags(rm, _REGISTRY_KEYS)
    rm.add_argument("--tenant", required=True)
    rm.add_argument("--device", required=True)
    rm.set_defaults(func=cmd_devices_remove)

    telemetry = sub.add_parser("telemetry", help="read stored telemetry").add_subparsers(dest="action", required=True)
    tail = telemetry.add_parser("tail", help="print stored points, oldest first")
    _add_settings_flags(tail, _REGISTRY_KEYS)
    tail.add_argument("--tenant")
    tail.add_argument("--json", action="store_true", help="print each point as its JSON bus record")
    tail.add_argument("--limit", type=int, default=20, help="how many of the newest points (0: all)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new points")
    tail.set_defaults(func=cmd_telemetry_tail)

    from .admin import client

    client.add_parsers(sub, _add_settings_flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RegistryError, StorageUnavailable) as e:
        print(f"corem: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
