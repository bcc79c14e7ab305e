"""The built wheel: one top-level package, its assets as package data, and a ctrstream that
works from a directory outside the checkout (``--help``, ``python -m ctrstream``, ``stack up``
and ``down``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ctrstream.stack.services import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (setuptools builds in the source tree)."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".cache",
            ".stack",
            ".demo",
            "data",
            "build",
            "triton_repo",
            "*.egg-info",
            "__pycache__",
            "results",
        ),
    )
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (path,) = out.glob("ctrstream-*.whl")
    return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as an installer would place it in site-packages."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def test_the_wheel_installs_only_the_ctrstream_namespace(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"ctrstream"}, tops
    for asset in (
        "ctrstream/stack/kafka-pom.xml",
        "ctrstream/stack/alerts.yml",  # the alert rules the stack's Prometheus loads
        "ctrstream/store/read.lua",
        "ctrstream/models/triton_model.py",
        "ctrstream/streaming/features_flow.py",
        "ctrstream/serving/api.py",
        "ctrstream/bench/speed.py",
        "ctrstream/py.typed",
    ):
        assert asset in names, f"{asset} is missing from the wheel"
    # every package of the checkout's namespace folder is in the wheel (pyproject lists them)
    root = Path(__file__).resolve().parents[2] / "ctrstream"
    for init in sorted(root.glob("*/__init__.py")):
        pkg = f"ctrstream/{init.parent.name}/__init__.py"
        assert pkg in names, f"{pkg} is missing from the wheel: add it to pyproject.toml"
    assert not [n for n in names if "/results/" in n], "benchmark results are not package data"
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        assert "ctrstream = ctrstream.__main__:main" in zf.read(info).decode()


def _run(
    site: Path, cwd: Path, *argv: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """``python argv`` with the unpacked wheel first on the path, from ``cwd``."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_installed_package_runs_from_another_directory(site, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        site, elsewhere, "-c", "import ctrstream.streaming.features_flow as m; print(m.__file__)"
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(site)), where.stdout  # not the checkout
    for argv in (
        ["-m", "ctrstream", "--help"],
        ["-c", "from ctrstream.__main__ import main; main()", "--help"],
    ):
        res = _run(site, elsewhere, *argv)
        assert res.returncode == 0, res.stderr
        assert "stack" in res.stdout and "demo" in res.stdout and "bench" in res.stdout
    # settings' folders come from the current directory, not from the package's location
    shown = _run(site, elsewhere, "-m", "ctrstream", "config", "show")
    assert shown.returncode == 0, shown.stderr
    assert f'"run_dir": "{elsewhere / ".stack"}"' in shown.stdout


def test_stack_up_and_down_from_another_directory(site, tmp_path, settings):
    """``ctrstream stack up`` / ``down`` of the installed package in an empty directory,
    with the set-up cache of this checkout (``CTRSTREAM_CACHE_DIR``)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "CTRSTREAM_CACHE_DIR": str(settings.cache_dir),
        "CTRSTREAM_KAFKA__PORT": str(free_port()),
        "CTRSTREAM_KAFKA__CONTROLLER_PORT": str(free_port()),
        "CTRSTREAM_KAFKA__HEAP": "512m",
        "CTRSTREAM_REDIS__PORT": str(free_port()),
        "CTRSTREAM_TRITON__HTTP_PORT": str(free_port()),
        "CTRSTREAM_TRITON__GRPC_PORT": str(free_port()),
        "CTRSTREAM_TRITON__METRICS_PORT": str(free_port()),
        "CTRSTREAM_PROMETHEUS__PORT": str(free_port()),
    }
    up = _run(site, elsewhere, "-m", "ctrstream", "stack", "up", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = _run(site, elsewhere, "-m", "ctrstream", "stack", "status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert (elsewhere / ".stack" / "kafka.pid").exists()
        assert (elsewhere / "triton_repo").is_dir()  # the model repository: current directory
    finally:
        down = _run(site, elsewhere, "-m", "ctrstream", "stack", "down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped" in down.stdout
    after = _run(site, elsewhere, "-m", "ctrstream", "stack", "status", env=env)
    assert after.returncode == 1  # every service is down
