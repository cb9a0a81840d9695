"""The admin token: given in the settings, or generated once into the data dir (mode 0600), where
the CLI's runtime commands find it too."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from ..config import ConfigError
from ..datafiles import TOKEN_FILE

log = logging.getLogger("corem.admin")


def read(data_dir: Path) -> str | None:
    try:
        return (Path(data_dir) / TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def read_or_create(data_dir: Path) -> str:
    """The data dir's token, made on first start.  Written to a temporary file and renamed into
    place, so a full disk leaves no empty token file behind (which would stop every later start);
    one that cannot be written stops this start with a one-line reason."""
    token = read(data_dir)
    if token is not None:
        return token
    token = secrets.token_urlsafe(24)
    path = Path(data_dir) / TOKEN_FILE
    tmp = path.with_name(f"{TOKEN_FILE}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"admin_token: cannot write {path}: {e.strerror or e}") from None
    log.info("generated an admin token in %s", path)
    return token
