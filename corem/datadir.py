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

This module is also the home of what a `corem serve` does to its data dir before it serves (the
file names are datafiles.py's) (`take`: made, locked, brought to FORMAT; `create_files`: its
SQLite files made before N workers open them at once).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
import tomllib
from pathlib import Path
from typing import Callable

from . import __version__
from .bus import topics
from .bus.sqlite import EmbeddedBus
from .config import ConfigError, Settings
from .registry import Registry
from .registry.presence import open_table as open_presence
from .datafiles import BUS_FILE, FORMAT_FILE, LOCK_FILE, PRESENCE_FILE, REGISTRY_FILE, SESSIONS_FILE
from .errors import NewerFormat
from .logs import fields

log = logging.getLogger("corem")



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
    """The data dir, made 0700 if it is not there (an existing one is left as it is until `prepare`);
    ConfigError naming it when it cannot be (a file there, a path under a file, no permission)."""
    try:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data_dir: cannot make {data}: {e.strerror or e}") from None


def read_format(data: Path) -> tuple[int, str]:
    """(the data dir's format, the corem that wrote it): (0, "") without the file."""
    try:
        with open(data / FORMAT_FILE, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return 0, ""
    except (OSError, ValueError) as e:  # (TOMLDecodeError, or bytes that are not UTF-8)
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
    old = fmt > 0 or any(e.name != LOCK_FILE for e in os.scandir(data))  # (not a data dir made just now)
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


# -- a corem serve's data dir -------------------------------------------------------------------------
def bus_path(settings: Settings) -> Path:
    return settings.data_path / BUS_FILE


def sessions_path(settings: Settings) -> Path:
    """The DTLS session store's SQLite file (when `dtls_session_store` names none elsewhere)."""
    return settings.data_path / SESSIONS_FILE


def take(settings: Settings) -> int:
    """Before `corem serve` (or its supervisor) opens anything in its data dir: made if needed,
    locked (one server per data dir: `lock`), refused if a newer corem wrote it and migrated if an
    older one did.  Returns the lock's fd (held for the process's life; `release`)."""
    data = settings.data_path
    make(data)
    fd = lock(data, {"bus": settings.bus, "topic_prefix": settings.topic_prefix})
    try:
        prepare(data)
    except OSError as e:  # (writing the format file on a full or read-only disk: one line)
        os.close(fd)
        raise ConfigError(f"data_dir: cannot prepare {data}: {e}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    """The lock `take` returned (-1: none taken, as in a worker, whose supervisor holds it)."""
    if fd >= 0:
        os.close(fd)


def create_files(settings: Settings) -> None:
    """Create the data dir's databases (and switch them to WAL), or open them once, before the
    server starts -- before the workers start, N processes making one new SQLite file at once
    collide ('database is locked') -- so that a damaged one is one line naming it, not an error
    inside the running server."""
    from .dtls.store import SessionStore  # (here: the CLI, which imports this module, needs no DTLS)

    data = settings.data_path

    def bus() -> None:
        b = EmbeddedBus(bus_path(settings), synchronous=settings.store_synchronous)
        b.open()
        b.close_sync()

    opens: list[tuple[Path, Callable[[], object]]] = []
    if not settings.registry:
        opens += [(data / REGISTRY_FILE, lambda: Registry(data / REGISTRY_FILE).close()),
                  (data / PRESENCE_FILE, lambda: open_presence(data / REGISTRY_FILE, data).close())]
    if not settings.dtls_session_store:
        opens.append((sessions_path(settings), lambda: SessionStore(sessions_path(settings)).close()))
    if settings.bus == "embedded":
        opens.append((bus_path(settings), bus))
    for path, open_it in opens:
        try:
            open_it()
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"data_dir: cannot open {path}: {e}") from None


# -- the lock: which corem serve runs on a data dir ---------------------------------------------------


def lock(data: Path, about: dict[str, str] | None = None) -> int:
    """Take the data dir's lock for this process (`flock`, released however the process ends) and
    write into the lock file who holds it: its pid and `about` (the bus, the topic prefix), which
    the CLI reads (`holder`, `last_server`).  ConfigError if another corem serve holds it."""
    import fcntl

    fd = os.open(data / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        held = holder(data)
        by = f" (pid {held})" if held else ""
        raise ConfigError(f"data_dir: {data} is in use by another corem serve{by}") from None
    lines = {"pid": str(os.getpid()), "started": str(int(time.time())), "written_by": f"corem {__version__}",
             **(about or {})}
    text = "".join(f'{k} = "{_toml_escape(v)}"\n' for k, v in lines.items())
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
    except OSError as e:  # (a full disk: the lock is what matters, and the start's own error, if it
        # cannot go on, is its one line: test_disk_full)
        log.debug("data dir: could not write %s: %s", data / LOCK_FILE, e.strerror)
    return fd


def _toml_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def last_server(data: Path) -> dict[str, str]:
    """What the last corem serve on `data` wrote into its lock file ({} if none did): pid, started,
    written_by, bus, topic_prefix.  It may have stopped since: `holder` says if it runs."""
    try:
        with open(data / LOCK_FILE, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, ValueError):  # (TOMLDecodeError, or bytes that are not UTF-8: a file half written)
        return {}
    out = {k: str(v) for k, v in doc.items()}
    try:
        topics.check_prefix(out.get("topic_prefix", ""))
    except ValueError:  # (not one corem wrote: read as if it had not said)
        out.pop("topic_prefix")
    return out


def _flocks() -> dict[tuple[int, int, int], int]:
    """The flock()s held on this machine: (major, minor, inode) -> pid (/proc/locks)."""
    out: dict[tuple[int, int, int], int] = {}
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE":
            try:
                major, minor, inode = parts[5].split(":")
                out[int(major, 16), int(minor, 16), int(inode)] = int(parts[4])
            except ValueError:
                continue
    return out


def _key(st: os.stat_result) -> tuple[int, int, int]:
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def holder(data: Path) -> int | None:
    """The pid of the corem serve running on `data` now (it holds the lock), or None."""
    try:
        st = os.stat(data / LOCK_FILE)
    except OSError:
        return None
    return _flocks().get(_key(st))


def running() -> list[tuple[int, Path]]:
    """The corem serve processes on this machine that this user may see, and their data dirs:
    the holders of a data dir's lock (/proc/locks, then the lock file among each one's open files)."""
    found = []
    for key, pid in sorted(_flocks().items(), key=lambda item: item[1]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"corem" not in f.read():
                    continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # another user's, or gone
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.endswith("/" + LOCK_FILE) and _key(os.stat(target)) == key:
                    found.append((pid, Path(target).parent))
                    break
            except OSError:
                continue
    return found
