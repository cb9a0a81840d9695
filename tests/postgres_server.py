"""A real PostgreSQL (Debian's `postgresql`) for the tests, started in a temporary directory on a
loopback port; `make test` installs the package when it is missing and runs as root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

from .ports import free_tcp_port


def binaries() -> str | None:
    """The directory of initdb and pg_ctl (Debian keeps them out of PATH), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


class Postgres:
    """initdb + pg_ctl start; as root, as the `postgres` user (initdb refuses root)."""

    def __init__(self) -> None:
        bindir = binaries()
        assert bindir is not None
        self.bindir = bindir
        self.base = tempfile.mkdtemp(prefix="corem-pg-")
        self.port = free_tcp_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            os.chmod(self.base, 0o755)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        data = os.path.join(self.base, "data")
        self._run("initdb", "-D", data, "-U", "corem", "--auth=trust", "-E", "UTF8")
        for attempt in range(5):  # a port picked free and released can be taken before postgres binds it
            try:
                self._run("pg_ctl", "-D", data, "-w", "-l", os.path.join(self.base, "log"), "-o",
                          f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
                break
            except subprocess.CalledProcessError:
                if attempt == 4:
                    raise
                self.port = free_tcp_port()
        self.data = data

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, os.path.join(self.bindir, tool), *args], check=True, capture_output=True,
                       timeout=180)  # (pg_ctl -w itself waits up to 60 s)

    @property
    def url(self) -> str:
        return f"postgresql://corem@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def empty(url: str) -> str:
    """The database at url, emptied (every table dropped): each test starts from no tables."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return url
