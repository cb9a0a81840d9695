"""The fuzz targets in fuzz/ (atheris): every crash input kept in fuzz/regressions/ replays clean,
and each target runs a bounded number of coverage-guided iterations (`make fuzz` runs longer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["codec", "payload", "endpoint", "dtls", "frontdoors", "http", "lane"]
RUNS = int(os.environ.get("COREM_FUZZ_RUNS", "30000"))

try:
    import atheris  # noqa: F401
except ImportError:
    atheris = None

pytestmark = pytest.mark.skipif(
    atheris is None and os.environ.get("CI") != "true", reason="atheris not installed (make test installs it)"
)


def run_target(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / f"fuzz_{name}.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


@pytest.mark.parametrize("name", TARGETS)
def test_regressions_replay_clean(name):
    inputs = sorted(str(p) for p in (ROOT / "fuzz" / "regressions").iterdir())
    r = run_target(name, *inputs)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("name", TARGETS)
def test_bounded_fuzz_run(name, tmp_path):
    r = run_target(name, f"-runs={RUNS}", "-max_len=300", "-seed=1", f"-artifact_prefix={tmp_path}/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done" in r.stderr
