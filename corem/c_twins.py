"""Where a C extension has a Python twin: the C one, unless it is not built or COREM_PURE_PYTHON is
set (then the twin serves: the reference, and what the tests compare C against)."""

from __future__ import annotations

import importlib
import os
from typing import Any


def c_twin(module: str, name: str, package: str | None) -> Any | None:
    """`name` from the C extension `module` (relative to `package`), or None"""
    if os.environ.get("COREM_PURE_PYTHON"):
        return None
    try:
        return getattr(importlib.import_module(module, package), name)
    except ImportError:
        return None
