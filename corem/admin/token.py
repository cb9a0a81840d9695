"""The admin token: given in the settings, or generated once into the data dir (mode 0600), where
the CLI's runtime commands find it too."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("corem.admin")

TOKEN_FILE = "admin-token"


def read(data_dir: Path) -> str | None:
    try:
        return (Path(data_dir) / TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def read_or_create(data_dir: Path) -> str:
    """The data dir's token, made on first start."""
    token = read(data_dir)
    if token is not None:
        return token
    token = secrets.token_urlsafe(24)
    path = Path(data_dir) / TOKEN_FILE
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("generated an admin token in %s", path)
    return token
