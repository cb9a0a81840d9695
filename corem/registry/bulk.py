"""Fleet onboarding: many devices from a CSV or JSON Lines file, one transaction per chunk.

Each line is a device with the fields of `corem devices add` (inputs.py's `DeviceLine`: `tenant`,
`device`, `profile`, `token`, `psk_identity`, `psk` or `psk_hex`, `power_mode`, `topics`,
`gateways`, the OSCORE context's `oscore_sender_id`, `oscore_recipient_id`, `oscore_secret` or
`oscore_secret_hex`, `oscore_salt`, `oscore_id_context`, and `cert_sha256`); CSV has them as its
header.  Every line is checked before its chunk is written, and
an error names the line and the field.  The import is idempotent: a device that is already there
with the same settings is counted `unchanged`; with other settings it is an error, or replaced
with `replace`.  Chunks before an error stay written, so the same import run again after a fix
goes on where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from ..errors import BadInput, Conflict, StorageUnavailable
from ..inputs import check, names
from .inputs import DeviceLine
from .store import _COLUMNS, COLUMNS, Device, Registry, new_device, row

#: Devices written per transaction: large enough that the commit's fsync is paid rarely, small
#: enough that a running server's registry poll never waits long for the write lock.
CHUNK = 5000
#: the columns of a CSV, the fields of a JSON line
FIELDS = names(DeviceLine)
_AT = {name: i for i, name in enumerate(COLUMNS)}
#: what makes two registrations the same device with the same settings (every column but created_at)
_SAME = tuple(i for i, name in enumerate(COLUMNS) if name != "created_at")
#: the unique credentials: (column index in a row, the field that gives it)
_UNIQUE = ((_AT["token"], "token"), (_AT["psk_identity"], "psk_identity"), (_AT["cert_sha256"], "cert_sha256"),
           (_AT["oscore_kid"], "oscore_recipient_id"))
#: what an import's UPDATE sets: every column but the key and created_at
_SET = tuple(name for name in COLUMNS if name not in ("tenant", "device", "created_at"))


def _same(r: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(r[i] for i in _SAME)


class Imported(NamedTuple):
    added: int
    unchanged: int
    replaced: int


def read_lines(text: str, kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, fields) of a CSV (header first) or JSON Lines document."""
    if kind == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except RecursionError:
                raise BadInput(f"line {n}: not a JSON object (nested too deep)") from None
            except ValueError as e:
                raise BadInput(f"line {n}: not a JSON object ({e.args[0]})") from None
            if not isinstance(value, dict):
                raise BadInput(f"line {n}: not a JSON object")
            yield n, value
        return
    reader = csv.DictReader(io.StringIO(text))
    try:
        unknown = [f for f in reader.fieldnames or () if f not in FIELDS]
        if unknown or not reader.fieldnames:
            raise BadInput(f"line 1: the header names {', '.join(unknown) or 'nothing'}; columns: {', '.join(FIELDS)}")
        for fields in reader:
            yield reader.line_num, {k: v for k, v in fields.items() if v not in ("", None)}
    except csv.Error as e:  # (a field past csv's limit, an unterminated quote: where it stopped)
        raise BadInput(f"file: not CSV after line {reader.line_num} ({e})") from None


def kind_of(path: Path) -> str:
    if path.suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix == ".csv":
        return "csv"
    raise BadInput(f"file: {path.name}: give a .csv or a .jsonl file")


def device_of(n: int, fields: dict[str, Any]) -> Device:
    """Line `n`'s device, every field checked (BadInput names the line and the field)."""
    try:
        line = check(DeviceLine, fields, listing="fields", words={"string": "text"})
        return new_device(line.tenant, line.device, **line.settings())
    except BadInput as e:
        raise BadInput(f"line {n}: {e}") from None


def import_devices(
    registry: Registry, lines: Iterable[tuple[int, dict[str, Any]]], *, replace: bool = False, chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
) -> Imported:
    """Write the devices of `lines`, a transaction per `chunk` (see the module docstring)."""
    conn = registry.conn
    existing = {(r[0], r[1]): r for r in conn.execute(f"SELECT {_COLUMNS} FROM devices")}
    owners = {}  # credential -> the device that has it, to name a clash by its line
    for r in existing.values():
        for i, what in _UNIQUE:
            if r[i] is not None:
                owners[what, r[i]] = (r[0], r[1])
    added = unchanged = replaced = done = 0
    #: (line, the device's row, whether it replaces one)
    batch: list[tuple[int, tuple[Any, ...], bool]] = []

    def write() -> None:
        try:
            conn.execute("BEGIN" if conn.shared else "BEGIN IMMEDIATE")
            # (the replacements first: one may free a credential a new device of the same chunk
            # takes -- the other way round, the INSERT met it still held, and the import failed
            # every time, found by a review; an INSERT never frees one)
            conn.executemany(
                f"UPDATE devices SET {', '.join(f'{c} = ?' for c in _SET)} WHERE tenant = ? AND device = ?",
                [(*(r[_AT[c]] for c in _SET), r[0], r[1]) for _, r, update in batch if update])
            conn.executemany(f"INSERT INTO devices ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [r for _, r, update in batch if not update])
            conn.execute("COMMIT")
        except conn.IntegrityError:  # (clashes were looked for above: this is a race with a writer)
            conn.rollback()
            raise Conflict(f"lines {batch[0][0]}-{batch[-1][0]}: a device, token or credential another writer "
                           "stored meanwhile; nothing of them was written (import them again)") from None
        except conn.Error as e:
            conn.rollback()
            raise StorageUnavailable(f"storage: {e}") from None

    for n, fields in lines:
        d = device_of(n, fields)
        key = (d.tenant, d.device)
        old = existing.get(key)
        new = row(d)
        if old is not None and _same(old) == _same(new):
            unchanged += 1
            done += 1
            continue
        if old is not None and not replace:
            raise Conflict(f"line {n}: device {d.tenant}/{d.device} exists with other settings "
                                "(import with replace to overwrite)")
        for i, what in _UNIQUE:
            value = new[i]
            owner = owners.get((what, value)) if value is not None else None
            if owner is not None and owner != key:
                raise Conflict(f"line {n}: {what}: already used by {owner[0]}/{owner[1]}")
            if value is not None:
                owners[what, value] = key
        if old is not None:
            for i, what in _UNIQUE:
                if old[i] is not None and old[i] != new[i]:
                    owners.pop((what, old[i]), None)
        existing[key] = new
        batch.append((n, new, old is not None))
        if old is None:
            added += 1
        else:
            replaced += 1
        if len(batch) >= chunk:
            write()
            done += len(batch)
            batch.clear()
            if progress is not None:
                progress(done)
    if batch:
        write()
        done += len(batch)
    if progress is not None:
        progress(done)
    return Imported(added, unchanged, replaced)
