"""The local stack's Prometheus: Debian's ``prometheus`` started by ``ctrstream stack up``.

It listens on ``settings.prometheus`` (127.0.0.1, port 19090 by default), keeps its data in
``<run_dir>/prometheus/data``, loads the alert rules (``ops/prometheus/alerts.yml``, shipped
as package data ``alerts.yml`` beside this module) and scrapes three jobs:

* ``prometheus`` - itself;
* ``triton`` - Triton's metrics port;
* ``ctrstream`` - every ctrstream job that serves metrics (the speed flows, archive, scorer,
  calibrator, ad server, decay monitor, controller, the API's ``/metrics``), each target
  labelled ``service=<job name>`` as in the compose deployment (``docker/prometheus.yml``).
  Its targets are static ones given to :func:`prometheus_config`, plus the files in
  ``<run_dir>/prometheus/targets/*.json`` that whoever starts the jobs writes with
  :func:`write_targets` (``ctrstream run``'s supervisor, a test): Prometheus watches that
  folder, so jobs started after the stack are scraped without a restart or a reload.
  ``honor_labels`` is on for this job: a job's own ``job`` label (the supervisor's
  ``ctrstream_job_up{job=...}``) is kept rather than renamed ``exported_job``.

The package's own system service (port 9090) is neither used nor touched.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

from ctrstream.config import Settings
from ctrstream.stack import provision
from ctrstream.stack.services import Service, StackError

# the alert rules: ops/prometheus/alerts.yml in a checkout, package data when installed
RULES = Path(__file__).resolve().with_name("alerts.yml")

SCRAPE_JOB = "ctrstream"  # the scrape job of ctrstream's own processes
TARGET_GROUP = "run"  # the target file of ``ctrstream run``'s jobs (<targets_dir>/run.json)
OWN_JOBS = ("prometheus", "triton")  # targets with these names get a scrape job of their own

_ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:(\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _duration(seconds: float) -> str:
    """A Prometheus duration: ``5s``, or ``500ms`` below or between whole seconds."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"a scrape or evaluation interval must be positive, not {seconds!r} s")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def check_target(name: str, address: str) -> None:
    """Raise ValueError, saying what is wrong, unless ``(name, address)`` is a scrape target:
    a job name of letters, digits, ``_``, ``.`` and ``-``, and ``host:port``."""
    if not _NAME.match(name):
        raise ValueError(
            f"scrape target name {name!r}: use letters, digits, '_', '.' and '-' (a job name)"
        )
    m = _ADDRESS.match(address)
    if not m or not 0 < int(m.group(1)) < 65536:
        raise ValueError(
            f"scrape target {name!r}: {address!r} is not host:port (e.g. 127.0.0.1:9100)"
        )


def prometheus_config(
    targets: list[tuple[str, str]],
    *,
    rule_files: list[Path] | tuple[Path, ...] = (),
    file_sd_dir: Path | None = None,
    scrape_interval_s: float = 5.0,
    evaluation_interval_s: float = 15.0,
) -> str:
    """Prometheus's configuration (YAML) scraping ``targets``, each ``(job name, "host:port")``.

    Targets named ``prometheus`` or ``triton`` get a scrape job of that name; every other
    target is scraped by the ``ctrstream`` job with the label ``service=<name>`` (several
    targets may share a name: a multi-process job serves one port per process). With
    ``file_sd_dir`` the ``ctrstream`` job also reads the targets of ``<file_sd_dir>/*.json``
    (:func:`write_targets`), re-read when they change."""
    for name, address in targets:
        check_target(name, address)
    scrape_configs: list[dict] = []
    for job in OWN_JOBS:
        addresses = [a for n, a in targets if n == job]
        if addresses:
            scrape_configs.append({"job_name": job, "static_configs": [{"targets": addresses}]})
    ours = [(n, a) for n, a in targets if n not in OWN_JOBS]
    job_cfg: dict = {"job_name": SCRAPE_JOB, "honor_labels": True, "metrics_path": "/metrics"}
    if ours:
        job_cfg["static_configs"] = [
            {"targets": [a for n2, a in ours if n2 == name], "labels": {"service": name}}
            for name in dict.fromkeys(n for n, _ in ours)
        ]
    if file_sd_dir is not None:
        job_cfg["file_sd_configs"] = [
            {"files": [str(file_sd_dir / "*.json")], "refresh_interval": "5s"}
        ]
    if ours or file_sd_dir is not None:
        scrape_configs.append(job_cfg)
    doc = {
        "global": {
            "scrape_interval": _duration(scrape_interval_s),
            "scrape_timeout": _duration(min(scrape_interval_s, 10.0)),
            "evaluation_interval": _duration(evaluation_interval_s),
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": scrape_configs,
    }
    # JSON is YAML: no YAML library needed, and Prometheus reads it as is
    header = "# generated by ctrstream (ctrstream.stack.prometheus.prometheus_config)\n"
    return header + json.dumps(doc, indent=2) + "\n"


def targets_dir(settings: Settings) -> Path:
    """The folder of target files the stack's Prometheus watches."""
    return settings.run_dir / "prometheus" / "targets"


def write_targets(settings: Settings, group: str, targets: list[tuple[str, str]]) -> Path:
    """Have the stack's Prometheus scrape ``targets`` (``(job name, "host:port")``, each
    labelled ``service=<job name>``) under the file ``<group>.json`` of :func:`targets_dir`,
    replacing what that file listed. Written atomically: Prometheus never reads half a file.
    An empty list scrapes nothing more (the file stays, empty)."""
    if not _NAME.match(group):
        raise ValueError(f"target group {group!r}: use letters, digits, '_', '.' and '-'")
    for name, address in targets:
        check_target(name, address)
    by_name: dict[str, list[str]] = {}
    for name, address in targets:
        by_name.setdefault(name, []).append(address)
    doc = [{"targets": a, "labels": {"service": n}} for n, a in by_name.items()]
    folder = targets_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{group}.json"
    tmp = folder / f".{group}.json.{os.getpid()}"  # not *.json: Prometheus ignores it
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def remove_targets(settings: Settings, group: str) -> bool:
    """Stop scraping the targets of :func:`write_targets`'s ``group``; False: there were none."""
    path = targets_dir(settings) / f"{group}.json"
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def stack_targets(settings: Settings) -> list[tuple[str, str]]:
    """The targets every stack has: Prometheus itself and Triton's metrics port."""
    p, t = settings.prometheus, settings.triton
    return [("prometheus", f"{p.host}:{p.port}"), ("triton", f"{t.host}:{t.metrics_port}")]


class PrometheusService(Service):
    """Debian's ``prometheus`` on ``settings.prometheus``, data and configuration in
    ``<run_dir>/prometheus``; ready when ``/-/ready`` answers 200 (its storage is open and
    its configuration and rules are loaded)."""

    start_timeout = 60.0

    def __init__(self, settings: Settings):
        super().__init__("prometheus", settings)

    @property
    def config_path(self) -> Path:
        return self.dir / "prometheus.yml"

    def ports(self) -> list[int]:
        return [self.settings.prometheus.port]

    def address(self) -> str:
        return self.settings.prometheus.url

    def check_ports(self) -> None:
        """The port, and the binary: ``stack up`` checks every service before it starts any,
        so a machine without Prometheus fails before Kafka, Redis and Triton start."""
        try:
            provision.prometheus()
        except provision.PrerequisiteError as e:
            raise provision.PrerequisiteError(
                f"{e} (or start the stack without it: CTRSTREAM_PROMETHEUS__ENABLED=false)"
            ) from None
        super().check_ports()

    def rule_files(self) -> list[Path]:
        if not RULES.is_file():
            raise StackError(
                f"the alert rules {RULES} are missing (ops/prometheus/alerts.yml in a "
                "checkout): reinstall ctrstream, or set CTRSTREAM_PROMETHEUS__ENABLED=false"
            )
        return [RULES]

    def prepare(self) -> None:
        p = self.settings.prometheus
        targets_dir(self.settings).mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        text = prometheus_config(
            stack_targets(self.settings),
            rule_files=self.rule_files(),
            file_sd_dir=targets_dir(self.settings),
            scrape_interval_s=p.scrape_interval_s,
            evaluation_interval_s=p.evaluation_interval_s,
        )
        tmp = self.config_path.with_name(f".{self.config_path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def command(self) -> tuple[list[str], dict[str, str]]:
        p = self.settings.prometheus
        argv = [
            provision.prometheus(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--storage.tsdb.retention.time={p.retention}",
            f"--web.listen-address={p.host}:{p.port}",
            "--log.level=warn",
        ]
        return argv, {}

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.address()}/-/ready", timeout=1) as resp:
            return bool(resp.status == 200)


__all__ = [
    "OWN_JOBS",
    "RULES",
    "SCRAPE_JOB",
    "TARGET_GROUP",
    "PrometheusService",
    "check_target",
    "prometheus_config",
    "remove_targets",
    "stack_targets",
    "targets_dir",
    "write_targets",
]
