"""`python -m corem.workers`: one worker of `corem serve --workers N`, started by the supervisor.

Its spec (index, inherited fds) and its settings arrive in the environment (link.py); it runs a
whole `Server` on them until SIGTERM (or until the supervisor goes away).
"""

from __future__ import annotations

import json
import os
import sys

import trio

from ..cli import run_until_signalled, setup_logging
from ..config import ConfigError, Settings
from ..server import Server
from .link import ENV, WorkerSpec


def main() -> int:
    if ENV not in os.environ:
        print("corem.workers: started by `corem serve --workers N`, not by hand", file=sys.stderr)
        return 2
    spec = WorkerSpec.loads(os.environ[ENV])
    try:
        settings = Settings.load(json.loads(os.environ["COREM_WORKER_SETTINGS"]), env={})
        setup_logging(settings, worker=spec.index)
        server = Server(settings, worker=spec)
    except ConfigError as e:
        print(f"corem worker {spec.index}: {e}", file=sys.stderr)
        return 2
    trio.run(run_until_signalled, server, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
