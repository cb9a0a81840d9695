"""The data dir: private (the directory 0700, every file in it 0600), and versioned.

`data_dir/format.toml` says which format the data dir is in and which corem wrote it.  A corem
opens a data dir of its own format or an older one, which it first brings to its own by the
numbered migrations below (a data dir without the file is format 0: made by a corem from before
there were formats); it refuses, in one line naming both, a format newer than it knows -- a data
dir an upgraded corem already changed, which this older one would misread.

The tables inside the SQLite files (and in a shared PostgreSQL registry) are numbered too, each
component on its own (`corem_schema`, `Db.migrate` in corem/registry/db.py): a data dir's format
says how the directory is laid out, a component's version what its tables hold.

A new format: add its migration to MIGRATIONS (a function of the data dir's path, which must be
safe to run again should a start be cut short before the file is written).
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from pathlib import Path
from typing import Callable

from . import __version__
from .config import ConfigError
from .errors import NewerFormat
from .logs import fields

log = logging.getLogger("corem")

FORMAT_FILE = "format.toml"


def _private(data: Path) -> None:
    """Format 1: the data dir 0700 and every file in it 0600 (bus.db and its -wal and -shm were
    0644: readings readable by every local user).  What corem may not change (a directory another
    user owns) is said, not fatal."""
    paths = [data] + [Path(e.path) for e in os.scandir(data) if e.is_file(follow_symlinks=False)]
    for path in paths:
        mode = 0o700 if path == data else 0o600
        if stat.S_IMODE(path.stat().st_mode) & ~mode:
            try:
                os.chmod(path, mode)
            except PermissionError as e:
                log.warning("data dir: could not make %s private (mode %o): %s", path, mode, e.strerror)


#: format -> (what it changes, the migration to it from the format before)
MIGRATIONS: dict[int, tuple[str, Callable[[Path], None]]] = {
    1: ("the data dir 0700 and its files 0600", _private),
}
#: the format this corem writes (and the newest it reads)
FORMAT = max(MIGRATIONS)


def make(data: Path) -> None:
    """The data dir, made 0700 if it is not there (an existing one is left as it is until `prepare`)."""
    data.mkdir(mode=0o700, parents=True, exist_ok=True)


def read_format(data: Path) -> tuple[int, str]:
    """(the data dir's format, the corem that wrote it): (0, "") without the file."""
    try:
        with open(data / FORMAT_FILE, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return 0, ""
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"data_dir: {data / FORMAT_FILE} cannot be read: {e}") from None
    fmt = doc.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 0:
        raise ConfigError(f"data_dir: {data / FORMAT_FILE}: 'format' is not a number")
    return fmt, str(doc.get("written_by", ""))


def check(data: Path) -> int:
    """The data dir's format; NewerFormat if a newer corem wrote it (nothing is changed here)."""
    fmt, by = read_format(data)
    if fmt > FORMAT:
        raise NewerFormat(
            f"data_dir: {data} is in format {fmt}, written by {by or 'a newer corem'}; this corem ({__version__}) "
            f"reads formats up to {FORMAT}: run the newer corem, or a copy of the data dir from before it")
    return fmt


def prepare(data: Path) -> None:
    """Make the data dir if needed, refuse a newer one, bring an older one to FORMAT (in order,
    each migration logged) and write the format file.  Run by whoever writes the data dir:
    `corem serve` (under the data dir's lock) and the CLI's registry commands."""
    make(data)
    fmt = check(data)
    if fmt == FORMAT:
        return
    old = fmt > 0 or any(e.name != ".lock" for e in os.scandir(data))  # (not a data dir made just now)
    for number in range(fmt + 1, FORMAT + 1):
        what, migrate = MIGRATIONS[number]
        try:
            migrate(data)
        except OSError as e:
            raise ConfigError(f"data_dir: {data}: migrating to format {number} ({what}) failed: {e}") from None
        if old:  # (a new data dir is made in the newest format: nothing to say)
            log.info("data dir %s migrated to format %d: %s", data, number, what,
                     extra=fields(data_dir=data, format=number, change=what))
    write_format(data)


def write_format(data: Path) -> None:
    tmp = data / f".{FORMAT_FILE}.{os.getpid()}"
    text = (f"# corem's data dir: the format it is in, and the corem that wrote it (corem refuses a format\n"
            f"# newer than it knows).  Written by corem: do not edit.\n"
            f"format = {FORMAT}\nwritten_by = \"corem {__version__}\"\n")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, data / FORMAT_FILE)
