"""The CLI's runtime commands: they call the running server's admin API (the same operations the
REST clients use), with the token from `--admin-token` (or `--admin-token-file`), COREM_ADMIN_TOKEN
(COREM_ADMIN_TOKEN_FILE) or data_dir/admin-token.

    corem attributes get|set   corem rpc   corem command   corem firmware upload|assign
    corem provisioning add
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from ..config import ConfigError, Settings, parse_hostport, read_secret
from ..devices.requests import COMMAND_TTL, RPC_TIMEOUT
from ..errors import BadInput
from ..registry.management import KINDS
from .. import logs
from . import token as admin_token

KEYS = ["data_dir", "http", "admin_token", "admin_token_file"]


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, raw: bytes | None = None,
         timeout: float = 330.0) -> int:
    """One API call; prints the JSON answer; 0 on 2xx, 1 otherwise (the error on stderr)."""
    settings = Settings.load({k: getattr(args, k, None) for k in KEYS}, config_file=getattr(args, "config", None))
    hostport = parse_hostport(settings.http, "http", allow_off=True)
    if hostport is None:
        raise ConfigError("http: the server's admin listener is off; these commands need it")
    where = logs.address(("127.0.0.1" if hostport[0] in ("0.0.0.0", "") else hostport[0], hostport[1]))
    token = settings.admin_token or admin_token.read(settings.data_path)
    if not token:
        raise ConfigError(f"admin_token: not given and no {admin_token.TOKEN_FILE} in the data dir "
                          "(start corem serve once)")
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://{where}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    except OSError as e:
        print(f"corem: cannot reach the admin API at {where}: {e}", file=sys.stderr)
        return 1
    if 200 <= status < 300:
        if text.strip():
            print(json.dumps(json.loads(text), indent=2))
        return 0
    try:
        message = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        message = text.decode(errors="replace")
    print(f"corem: {status}: {message}", file=sys.stderr)
    return 1


def _device_path(args: argparse.Namespace, suffix: str = "") -> str:
    return f"/api/devices/{quote(args.tenant, safe='')}/{quote(args.device, safe='')}{suffix}"


def _value(text: str) -> Any:
    """`key=value` values are JSON when they parse (numbers, true, objects), text otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def attributes_set(args: argparse.Namespace) -> int:
    values = {}
    for pair in args.values:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"attributes: {pair!r} is not KEY=VALUE")
        values[key] = _value(value)
    return call(args, "PUT", _device_path(args, "/attributes"), values)


def attributes_get(args: argparse.Namespace) -> int:
    return call(args, "GET", _device_path(args, "/attributes"))


def rpc(args: argparse.Namespace) -> int:
    body = {"method": args.method, "params": _value(args.params) if args.params else None, "timeout": args.timeout,
            "oneway": args.oneway}
    return call(args, "POST", _device_path(args, "/rpc"), body)


def command(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"command": args.name, "ttl": args.ttl}
    if args.payload is not None:
        body["payload"] = args.payload
    return call(args, "POST", _device_path(args, "/commands"), body)


def firmware_upload(args: argparse.Namespace) -> int:
    query = urlencode({"kind": args.kind, "title": args.title, "version": args.version})
    try:
        package = Path(args.file).read_bytes()
    except OSError as e:  # (missing, a directory, unreadable: one line, as `profiles add --file`)
        raise BadInput(f"file: cannot read {args.file}: {e.strerror or e}") from None
    return call(args, "POST", f"/api/packages?{query}", raw=package)


def firmware_assign(args: argparse.Namespace) -> int:
    return call(args, "PUT", _device_path(args, f"/{args.kind}"), {"package": args.package})


def provisioning_add(args: argparse.Namespace) -> int:
    secret = args.secret
    if args.secret_file is not None:
        if secret is not None:
            raise ConfigError("secret: give --secret or --secret-file, not both")
        secret = read_secret(args.secret_file, "secret_file")
    if secret is None:
        raise ConfigError("secret: give --secret or --secret-file")
    return call(args, "POST", "/api/provisioning-keys",
                {"key": args.key, "secret": secret, "tenant": args.tenant, "profile": args.profile,
                 **({} if args.max_devices is None else {"max_devices": args.max_devices})})


def add_parsers(sub, add_flags) -> None:
    """Register the runtime commands on the CLI's subparsers; `add_flags(parser, keys)` adds the
    settings flags (--http, --admin-token, --data-dir, --config)."""

    def device(p):
        add_flags(p, KEYS)
        p.add_argument("--tenant", required=True)
        p.add_argument("--device", required=True)
        return p

    attrs = sub.add_parser("attributes", help="a device's attributes (through the admin API)").add_subparsers(
        dest="action", required=True)
    p = device(attrs.add_parser("set", help="set shared attributes: KEY=VALUE ... (VALUE as JSON, else text)"))
    p.add_argument("values", nargs="+", metavar="KEY=VALUE")
    p.set_defaults(func=attributes_set)
    device(attrs.add_parser("get", help="client and shared attributes")).set_defaults(func=attributes_get)

    p = device(sub.add_parser("rpc", help="send an RPC request to a device and wait for its answer"))
    p.add_argument("--method", required=True)
    p.add_argument("--params", help="JSON")
    p.add_argument("--timeout", type=float, default=RPC_TIMEOUT, help=f"seconds (default: {RPC_TIMEOUT:g})")
    p.add_argument("--oneway", action="store_true", help="wait only for delivery")
    p.set_defaults(func=rpc)

    p = device(sub.add_parser("command", help="send a Drogue-style command (delivered on a ct response)"))
    p.add_argument("--name", required=True)
    p.add_argument("--payload")
    p.add_argument("--ttl", type=float, default=COMMAND_TTL,
                   help=f"seconds it waits for the device (default: {COMMAND_TTL:g})")
    p.set_defaults(func=command)

    fw = sub.add_parser("firmware", help="OTA packages (through the admin API)").add_subparsers(
        dest="action", required=True)
    p = fw.add_parser("upload", help="upload a package")
    add_flags(p, KEYS)
    p.add_argument("file")
    p.add_argument("--title", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--kind", choices=KINDS, default="firmware")
    p.set_defaults(func=firmware_upload)
    p = device(fw.add_parser("assign", help="assign a package to a device"))
    p.add_argument("--package", type=int, required=True)
    p.add_argument("--kind", choices=KINDS, default="firmware")
    p.set_defaults(func=firmware_assign)

    prov = sub.add_parser("provisioning", help="device provisioning keys").add_subparsers(dest="action", required=True)
    p = prov.add_parser("add", help="add a provisioning key and secret")
    add_flags(p, KEYS)
    p.add_argument("--key", required=True)
    p.add_argument("--secret", help="the provisioning secret (or --secret-file)")
    p.add_argument("--secret-file", metavar="FILE", help="the provisioning secret: the file's text, without a "
                                                         "trailing newline (kept out of the command line)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--profile", default="default")
    p.add_argument("--max-devices", type=int, metavar="N",
                   help="devices this key may have registered (still registered) at most (default: no bound of its own)")
    p.set_defaults(func=provisioning_add)
