"""Set-up of the three servers (``ctrstream setup``, run by ``make setup``; idempotent, fast the second time).

* **Apache Kafka**: the broker jars are resolved by Maven from Maven Central through
  ``kafka-pom.xml`` (package data beside this module) and copied into
  ``<cache_dir>/kafka-<version>/libs``.
* **Redis**: Debian's ``redis-server`` package, installed with apt when no ``redis-server``
  is on the PATH.
* **Prometheus**: Debian's ``prometheus`` package (the server and ``promtool``, which checks
  and unit-tests the alert rules), installed with apt when no ``prometheus`` is on the PATH.
  The package's own system service is not used: ``ctrstream stack up`` starts its own
  Prometheus on 127.0.0.1 with its data in the run directory (:mod:`ctrstream.stack.prometheus`).
* **Chromium** (for the browser test of the demo's report): Debian's ``chromium`` package,
  installed with apt when no ``chromium`` is on the PATH.
* **Triton Inference Server**: the ``tritonserver`` binary and its Python backend from the
  ``nvidia-pytriton`` wheel, unpacked into ``.cache/pytriton-<version>`` (the wheel is not
  installed into the project's venv: it pins numpy<2, the project uses numpy 2, and only its
  server binary is needed). The Python backend's stub for the running Python version is put
  where the backend looks for it, and the stub gets its own site directory
  ``.cache/triton-pyenv`` with numpy<2 (the stub's C++ side needs numpy 1.x) and onnxruntime.

``ctrstream setup`` (or ``python -m ctrstream.stack.provision``) runs all of it; ``--check``
only reports. ``<cache_dir>`` is ``settings.cache_dir`` (``.cache`` under the current
directory unless ``CTRSTREAM_CACHE_DIR`` says otherwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from ctrstream.config import Settings, get_settings

POM = Path(__file__).resolve().with_name("kafka-pom.xml")
PYTRITON_VERSION = "0.7.0"
TRITON_STUB_REQUIREMENTS = ["numpy==1.26.4", "onnxruntime-gpu>=1.20,<2"]


class PrerequisiteError(RuntimeError):
    """A missing prerequisite; the message names it and how to get it."""


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------- lookups


def kafka_version() -> str:
    m = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    assert m, f"no <kafka.version> in {POM}"
    return m.group(1)


def kafka_libs(settings: Settings) -> Path:
    return settings.cache_dir / f"kafka-{kafka_version()}" / "libs"


def kafka_classpath(settings: Settings) -> str:
    libs = kafka_libs(settings)
    if not (libs / ".complete").exists():
        raise PrerequisiteError(
            f"Kafka {kafka_version()} is not set up in {libs}. Run `ctrstream setup` (or "
            f"`make setup` in a checkout; it resolves the broker with Maven from {POM}), or "
            f"point CTRSTREAM_CACHE_DIR at a cache that has it."
        )
    return str(libs / "*")


def java() -> str:
    path = shutil.which("java")
    if not path:
        raise PrerequisiteError(
            "Java 17 or newer is required to run the Kafka broker, and `java` is not on the "
            "PATH. Install it, for example: apt-get install -y openjdk-17-jre-headless"
        )
    return path


def java_major(path: str) -> int:
    out = _run([path, "-version"]).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        raise PrerequisiteError(f"could not read the Java version from `{path} -version`: {out!r}")
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


def _debian_binary(name: str, why: str = "") -> str:
    """``name`` on the PATH or in /usr/bin, else a clear error naming the Debian package."""
    path = shutil.which(name) or (
        f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
    )
    if not path:
        raise PrerequisiteError(
            f"{name} is not installed{why}. Run `ctrstream setup` (it installs Debian's {name} "
            f"package), or: apt-get install -y {name}"
        )
    return path


def redis_server() -> str:
    return _debian_binary("redis-server")


def prometheus() -> str:
    """Debian's Prometheus server (``/usr/bin/prometheus``), started by ``stack up``."""
    return _debian_binary("prometheus", " (`ctrstream stack up` starts it)")


def promtool() -> str:
    """``promtool`` from Debian's ``prometheus`` package: checks and unit-tests alert rules."""
    path = shutil.which("promtool") or (
        "/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None
    )
    if not path:
        raise PrerequisiteError(
            "promtool is not installed (it checks and tests the alert rules). Run "
            "`ctrstream setup` (it installs Debian's prometheus package, which has it), or: "
            "apt-get install -y prometheus"
        )
    return path


def chromium() -> str:
    """Debian's headless-capable Chromium (``/usr/bin/chromium``), used by the browser test
    of the demo's report (``tests/test_report_browser.py``)."""
    return _debian_binary("chromium", " (the browser test of the demo's report needs it)")


def triton_home(settings: Settings) -> Path:
    home = settings.cache_dir / f"pytriton-{PYTRITON_VERSION}" / "pytriton" / "tritonserver"
    if not (home.parent.parent / ".complete").exists():
        raise PrerequisiteError(
            f"the Triton server binary is not set up in {home}. Run `ctrstream setup` (it unpacks "
            f"it from the nvidia-pytriton {PYTRITON_VERSION} wheel on PyPI)."
        )
    return home


def triton_pyenv(settings: Settings) -> Path:
    return settings.cache_dir / "triton-pyenv"


def triton_env(settings: Settings) -> dict[str, str]:
    """Environment for ``tritonserver``: the Python backend stub embeds libpython of this
    interpreter and imports numpy/onnxruntime from the stub's own site directory.

    The stub starts Python in isolated mode (it ignores PYTHONPATH), so ctrstream's
    Python-backend models add these directories to ``sys.path`` themselves
    (``CTRSTREAM_TRITON_SITE``)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = os.pathsep.join(p for p in [libdir, os.environ.get("LD_LIBRARY_PATH", "")] if p)
    site = str(triton_pyenv(settings))
    return {"LD_LIBRARY_PATH": ld, "CTRSTREAM_TRITON_SITE": site, "PYTHONPATH": site}


# --------------------------------------------------------------------------- set-up steps


def check_java() -> str:
    path = java()
    if shutil.which("mvn") is None:
        raise PrerequisiteError(
            "Maven (`mvn`) is required to resolve the Kafka broker from Maven Central and is "
            "not on the PATH. Install it, for example: apt-get install -y maven"
        )
    major = java_major(path)
    if major < 17:
        raise PrerequisiteError(
            f"Java {major} found at {path}; Kafka {kafka_version()} needs Java 17 or newer. "
            "Install it, for example: apt-get install -y openjdk-17-jre-headless"
        )
    return f"java {major}"


def setup_kafka(settings: Settings) -> str:
    libs = kafka_libs(settings)
    if (libs / ".complete").exists():
        return f"Kafka {kafka_version()}: cached in {libs}"
    tmp = libs.parent / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    res = _run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
    )
    if res.returncode != 0:
        raise PrerequisiteError(
            f"Maven could not resolve Kafka {kafka_version()} from Maven Central "
            f"(is the network to Maven Central up?):\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
        )
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    (libs / ".complete").write_text(kafka_version())
    return f"Kafka {kafka_version()}: {len(list(libs.glob('*.jar')))} jars resolved into {libs}"


def setup_redis() -> str:
    """Debian's ``redis-server`` when none is on the PATH."""
    if shutil.which("redis-server"):
        return f"Redis: {shutil.which('redis-server')}"
    _apt_install(
        "redis-server",
        lambda: shutil.which("redis-server") is not None,
        "redis-server (Redis 7, for the local stack)",
    )
    return f"Redis: installed {shutil.which('redis-server')} from Debian"


def setup_prometheus() -> str:
    """Debian's ``prometheus`` (server and ``promtool``) when either is missing."""

    def installed() -> bool:
        try:
            prometheus()
            promtool()
            return True
        except PrerequisiteError:
            return False

    was_installed = installed()
    _apt_install("prometheus", installed, "prometheus (the stack's metrics server, promtool)")
    path = prometheus()
    if was_installed:
        return f"Prometheus: {path}"
    version = _run([path, "--version"]).stdout.splitlines()[:1]
    return f"Prometheus: installed {path} from Debian ({' '.join(version)})"


def _apt_install(package: str, installed, what: str) -> None:
    """``apt-get install`` Debian's ``package`` (for ``what``) unless ``installed()`` is
    already true; runs ``apt-get update`` once when the package cannot be found or fetched
    (empty or stale package lists). Raises :class:`PrerequisiteError` naming the package when
    there is no apt-get, no root (or password-less sudo), or the installation fails."""
    if installed():
        return
    if shutil.which("apt-get") is None:
        raise PrerequisiteError(
            f"{what} is not installed and there is no apt-get to install Debian's {package} "
            f"package. Install {package} with your package manager."
        )
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        raise PrerequisiteError(
            f"{what} is not installed; installing it needs root. Run: "
            f"sudo apt-get install -y {package}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = sudo + [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
        package,
    ]
    res = _run(install, env=env)
    if res.returncode != 0:  # not in the (empty or stale) package lists: update them once
        _run(sudo + ["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], env=env)
        res = _run(install, env=env)
    if res.returncode != 0 or not installed():
        raise PrerequisiteError(
            f"apt-get could not install {package} ({what}):\n"
            f"{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )


def setup_chromium() -> str:
    """Debian's ``chromium`` for the browser test of the demo's report."""

    def installed() -> bool:
        try:
            chromium()
            return True
        except PrerequisiteError:
            return False

    was_installed = installed()
    _apt_install("chromium", installed, "chromium (for the browser test of the report)")
    path = chromium()
    if was_installed:
        return f"Chromium: {path}"
    version = _run([path, "--version"]).stdout.strip()
    return f"Chromium: installed {path} from Debian ({version})"


def setup_triton(settings: Settings) -> str:
    root = settings.cache_dir / f"pytriton-{PYTRITON_VERSION}"
    if not (root / ".complete").exists():
        wheels = settings.cache_dir / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        res = _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(wheels),
                f"nvidia-pytriton=={PYTRITON_VERSION}",
            ]
        )
        found = sorted(wheels.glob(f"nvidia_pytriton-{PYTRITON_VERSION}-*.whl"))
        if res.returncode != 0 or not found:
            raise PrerequisiteError(
                f"pip could not download nvidia-pytriton=={PYTRITON_VERSION} from PyPI "
                f"(it carries the tritonserver binary):\n{res.stderr[-2000:]}"
            )
        tmp = Path(tempfile.mkdtemp(dir=settings.cache_dir, prefix="pytriton."))
        with zipfile.ZipFile(found[-1]) as zf:
            zf.extractall(tmp)
        home = tmp / "pytriton" / "tritonserver"
        for p in [home / "bin" / "tritonserver", *home.glob("python_backend_stubs/*/*")]:
            p.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        (root / ".complete").write_text(PYTRITON_VERSION)
    home = root / "pytriton" / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise PrerequisiteError(
            f"nvidia-pytriton {PYTRITON_VERSION} has no Python backend stub for Python {pyver}; "
            f"use Python 3.10-3.13 for the project's venv."
        )
    # the stub's RPATH ($ORIGIN/../../../../nvidia_pytriton.libs) resolves from backends/python too
    target = home / "backends" / "python" / "triton_python_backend_stub"
    if not target.exists() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if not list(Path(libdir).glob(f"libpython{pyver}*.so*")):
        raise PrerequisiteError(
            f"the Triton Python backend embeds libpython{pyver}.so, but this Python "
            f"({sys.executable}) has no shared library in {libdir}. Use a Python built "
            f"with --enable-shared (Debian's python3, or pyenv with "
            f"PYTHON_CONFIGURE_OPTS=--enable-shared)."
        )
    return f"Triton: {home / 'bin' / 'tritonserver'} (stub for Python {pyver})"


def setup_triton_pyenv(settings: Settings) -> str:
    site = triton_pyenv(settings)
    stamp = site / ".complete"
    want = " ".join(TRITON_STUB_REQUIREMENTS)
    if stamp.exists() and stamp.read_text() == want:
        return f"Triton Python-backend environment: cached in {site}"
    shutil.rmtree(site, ignore_errors=True)
    res = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-compile",
            "--target",
            str(site),
            *TRITON_STUB_REQUIREMENTS,
        ]
    )
    if res.returncode != 0:
        raise PrerequisiteError(
            f"pip could not install the Triton Python-backend environment ({want}) into "
            f"{site}:\n{res.stderr[-2000:]}"
        )
    stamp.write_text(want)
    return f"Triton Python-backend environment: {want} in {site}"


def compose_validator() -> list[str] | None:
    """The command that validates a Compose file without a container engine: Docker's
    ``docker compose`` plugin when installed, else the standalone ``docker-compose``
    (Debian's package). ``<cmd> -f FILE config -q`` parses, interpolates and checks the
    file against the Compose specification; neither needs a running engine for it."""
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone and _run([standalone, "version"]).returncode == 0:
        return [standalone]
    return None


def setup_compose_validator() -> str:
    """Install a Compose validator for the test suite's static check of docker-compose.yml:
    Debian's ``docker-compose`` package (Compose 1.29, which knows the Compose
    specification's profiles, GPU device reservations and depends_on conditions)."""
    found = compose_validator()
    if found:
        return f"Compose validator: {' '.join(found)}"
    _apt_install(
        "docker-compose",
        lambda: compose_validator() is not None,
        "a Compose validator (`docker compose` or `docker-compose`, to validate "
        "docker-compose.yml)",
    )
    return f"Compose validator: installed {' '.join(compose_validator() or [])} from Debian"


def setup(settings: Settings | None = None, log=print) -> None:
    settings = settings or get_settings()
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    log(check_java())
    log(setup_kafka(settings))
    log(setup_redis())
    log(setup_prometheus())
    log(setup_triton(settings))
    log(setup_triton_pyenv(settings))
    log(setup_compose_validator())
    log(setup_chromium())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--check" in argv:
            s = get_settings()
            print(check_java())
            print("kafka classpath:", kafka_classpath(s))
            print("redis-server:", redis_server())
            print("prometheus:", prometheus(), "promtool:", promtool())
            print("tritonserver:", triton_home(s) / "bin" / "tritonserver")
            print("chromium:", chromium())
        else:
            setup()
    except PrerequisiteError as e:
        print(f"ctrstream set-up: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
