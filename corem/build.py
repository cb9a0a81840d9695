"""What this corem is: its version (from the installed package's metadata) and whether its C fast
lane is built -- `corem --version` and the `corem_build_info` metric."""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata
from typing import Iterator

from .stats import Sample, gauge


@cache
def version() -> str:
    """The installed distribution's version (`pip install`, `pip install -e`); corem.__version__
    when it runs from a tree that was never installed."""
    try:
        return metadata.version("corem")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def c_lane() -> str:
    """"built" when the C fast lane (corem/fastlane/_lane.c) is importable, else "missing"."""
    from .fastlane import Lane

    return "missing" if Lane is None else "built"


class BuildInfo:
    """A component for /metrics: `corem_build_info{version, python, c_lane} 1`."""

    def metrics(self) -> Iterator[Sample]:
        yield gauge("corem_build_info", 1, version=version(), python=platform.python_version(), c_lane=c_lane())
