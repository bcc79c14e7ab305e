"""The supervisor of ``ctrstream run``: starts every job, restarts each on failure with
exponential backoff (restarts counted, exported to Prometheus and written to the run's state
file), and stops them all cleanly on SIGTERM or Ctrl-C.

A job is one process group, which dies with the supervisor: a multi-process Bytewax
job is its ``ctrstream speed -p N`` parent and that parent's processes, so when one process
dies the parent stops the others and exits, and the supervisor restarts the whole group as
one unit (what is left of the group is killed first: no process of the old cluster holds a
port or a recovery partition when the new one starts).

Stopping sends each job its stop signal (:attr:`Job.stop_signal`), waits for it to exit -
each job checkpoints its state on that signal - and kills the group only after a timeout. A
clean stop is every job exiting with one of its :attr:`Job.clean_exits` (0, or what its
server reports after a graceful shutdown).

The state file (``<run_dir>/run/state.json``, rewritten atomically on every change) is what
``ctrstream run status`` reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrstream.stack.jobs import Job
from ctrstream.stack.procs import die_with_parent

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
HISTORY = 20  # runs of a job kept in its history


def backoff_s(failures: int, base_s: float = 1.0, max_s: float = 60.0) -> float:
    """Seconds to wait before restarting a job after its ``failures``-th failure in a row:
    ``base_s``, doubling with each further failure, capped at ``max_s`` (0 before any)."""
    if failures <= 0:
        return 0.0
    if base_s < 0 or max_s < 0:
        raise ValueError("backoff base and cap must not be negative")
    return float(min(max_s, base_s * 2.0 ** min(failures - 1, 62)))


def executable(name: str) -> str:
    """The path of a console script: next to this interpreter first (a venv), else PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} is not installed next to {sys.executable} nor on PATH")
    return found


@dataclass
class Unit:
    """One job as the supervisor runs it."""

    job: Job
    metrics_port: int = 0  # its first Prometheus port (0: none on CTRSTREAM_METRICS_PORT)
    proc: subprocess.Popen | None = None
    state: str = "pending"  # pending, running, backoff, done, stopping, stopped, failed
    restarts: int = 0
    failures: int = 0  # in a row: the backoff's exponent (reset once it ran stable_s)
    started_at: float | None = None
    next_start: float = 0.0
    last_exit: int | None = None
    # its last runs: started_at, and ended_at and exit once it exited (newest last)
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.job.name,
            "role": self.job.role,
            "argv": list(self.job.argv),
            "pid": self.proc.pid if self.proc is not None and self.proc.poll() is None else None,
            "state": self.state,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_exit": self.last_exit,
            "metrics_port": self.metrics_port or None,
            "checkpoint": self.job.checkpoint,
            "group": self.job.group,
            "topics": list(self.job.topics),
            "processes": self.job.processes,
        }


class Supervisor:
    """Runs ``jobs`` until :meth:`request_stop` (a signal) or ``finished()`` says the run is
    over; :meth:`run` returns the exit code (0: every job stopped cleanly)."""

    def __init__(
        self,
        jobs: list[Job],
        *,
        env: Mapping[str, str],
        state_dir: Path,
        metrics_ports: Mapping[str, int] | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        stable_s: float = 60.0,
        stop_timeout_s: float = 60.0,
        finished: Callable[[list[Unit]], bool] | None = None,
        tick_s: float = 0.2,
        echo: Callable[[str], None] = print,
    ):
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"job names must be unique: {names}")
        self.units = [Unit(j, (metrics_ports or {}).get(j.name, 0)) for j in jobs]
        self.env = dict(env)
        self.state_dir = Path(state_dir)
        self.log_dir = self.state_dir / "logs"
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.stable_s = stable_s
        self.stop_timeout_s = stop_timeout_s
        self.finished = finished
        self.tick_s = tick_s
        self.echo = echo
        self._stop = threading.Event()
        self._metrics: dict[str, Any] | None = None

    # -- control
    def request_stop(self, *_args: object) -> None:
        """Ask the run to stop (a signal handler: it only sets a flag)."""
        self._stop.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.job.name == name)

    # -- metrics
    def serve_metrics(self, port: int, host: str = "127.0.0.1") -> None:
        """Export ``ctrstream_job_up{job}`` and ``ctrstream_job_restarts_total{job}``."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        reg = CollectorRegistry()
        self._metrics = {
            "up": Gauge(
                "ctrstream_job_up", "1 while the job's process runs", ["job"], registry=reg
            ),
            "restarts": Counter(
                "ctrstream_job_restarts_total",
                "times the supervisor restarted the job after it exited",
                ["job"],
                registry=reg,
            ),
        }
        for u in self.units:
            self._metrics["up"].labels(u.job.name).set(0)
            self._metrics["restarts"].labels(u.job.name)
        start_http_server(port, addr=host, registry=reg)

    def _set_up(self, u: Unit, up: bool) -> None:
        if self._metrics is not None:
            self._metrics["up"].labels(u.job.name).set(1 if up else 0)

    # -- state file
    def write_state(self) -> None:
        doc = {
            "pid": os.getpid(),
            "updated_at": time.time(),
            "stopping": self._stop.is_set(),
            "jobs": [u.as_dict() for u in self.units],
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.state_dir / STATE_FILE)

    # -- one job
    def _start(self, u: Unit) -> None:
        argv = [executable(u.job.argv[0]), *u.job.argv[1:]]
        env = {**self.env, **u.job.env, "PYTHONUNBUFFERED": "1"}
        if u.metrics_port:
            env["CTRSTREAM_METRICS_PORT"] = str(u.metrics_port)
        elif "CTRSTREAM_METRICS_PORT" not in u.job.env:
            env["CTRSTREAM_METRICS_PORT"] = "0"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{u.job.name}.log", "ab") as out:
            # its own process group (stopped and reaped as one unit), and it dies with the
            # supervisor however the supervisor dies: no job outlives it holding its ports
            u.proc = subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        u.state = "running"
        u.started_at = time.time()
        u.history = [*u.history[-(HISTORY - 1) :], {"started_at": u.started_at}]
        self._set_up(u, True)
        self.echo(f"{u.job.name}: started (pid {u.proc.pid}): {' '.join(u.job.argv)}")

    def _reap(self, u: Unit) -> None:
        """Kill what is left of an exited job's process group (a cluster's other processes)."""
        assert u.proc is not None
        try:
            os.killpg(u.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _exited(self, u: Unit, code: int, now: float) -> None:
        self._reap(u)
        u.last_exit = code
        u.history[-1].update(ended_at=now, exit=code)
        self._set_up(u, False)
        ran = now - (u.started_at or now)
        if u.job.role == "driver" and code in u.job.clean_exits:
            u.state = "done"
            self.echo(f"{u.job.name}: finished (exit {code})")
            return
        u.failures = 1 if ran >= self.stable_s else u.failures + 1
        wait = backoff_s(u.failures, self.backoff_base_s, self.backoff_max_s)
        u.state = "backoff"
        u.next_start = time.monotonic() + wait
        self.echo(
            f"{u.job.name}: exited with {code} after {ran:.1f} s; restart in {wait:.1f} s "
            f"(log {self.log_dir / (u.job.name + '.log')})"
        )

    def _restart(self, u: Unit) -> None:
        u.restarts += 1
        if self._metrics is not None:
            self._metrics["restarts"].labels(u.job.name).inc()
        self._start(u)

    # -- the run
    def run(self) -> int:
        """Start every job, supervise until stopped, stop all; the exit code."""
        try:
            for u in self.units:
                self._start(u)
            self.write_state()
            while not self._stop.is_set():
                changed = False
                now = time.time()
                for u in self.units:
                    if u.state == "running" and u.proc is not None:
                        code = u.proc.poll()
                        if code is not None:
                            self._exited(u, code, now)
                            changed = True
                    elif u.state == "backoff" and time.monotonic() >= u.next_start:
                        self._restart(u)
                        changed = True
                if changed:
                    self.write_state()
                if self.finished is not None and self.finished(self.units):
                    self.echo("the run is over: stopping every job")
                    break
                self._stop.wait(self.tick_s)
        finally:
            code = self.stop_all()
            self.write_state()
        return code

    def stop_all(self) -> int:
        """Send every running job its stop signal at once, wait for each (kill after the
        timeout); 0 when each exited cleanly."""
        self._stop.set()
        live = [u for u in self.units if u.proc is not None and u.proc.poll() is None]
        for u in live:
            u.state = "stopping"
            assert u.proc is not None
            try:
                os.killpg(u.proc.pid, u.job.stop_signal)
            except ProcessLookupError:
                pass
        self.write_state()
        deadline = time.monotonic() + self.stop_timeout_s
        clean = True
        for u in live:
            assert u.proc is not None
            try:
                u.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.echo(f"{u.job.name}: did not stop in {self.stop_timeout_s:.0f} s: killed")
                os.killpg(u.proc.pid, signal.SIGKILL)
                u.proc.wait(10)
            self._reap(u)
            code = u.proc.returncode
            u.last_exit = code
            self._set_up(u, False)
            ok = code in u.job.clean_exits
            u.state = "stopped" if ok else "failed"
            clean = clean and ok
            self.echo(f"{u.job.name}: stopped (exit {code})")
        for u in self.units:
            if u.state == "backoff":
                u.state = "stopped"
        return 0 if clean else 1


def scrape_targets(units: list[Unit], api_port: int | None, host: str) -> list[tuple[str, str]]:
    """(job name, ``host:port``) of every Prometheus endpoint of the run's jobs, one per
    process (a Bytewax process k on its job's port + k), the API on its own port."""
    out: list[tuple[str, str]] = []
    for u in units:
        if u.job.api_metrics and api_port:
            out.append((u.job.name, f"{host}:{api_port}"))
        elif u.metrics_port:
            out += [
                (u.job.name, f"{host}:{u.metrics_port + k}") for k in range(u.job.metrics_ports)
            ]
    return out


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The supervisor's state file (None: no run has written one here)."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def last_checkpoint(location: str | None) -> float | None:
    """When a job's checkpoint was last written: the newest modification time under a path
    (a recovery store, the archive, an experiment's directory); None for none or elsewhere
    (a checkpoint kept in Redis)."""
    if not location or ":" in location.split("/")[0]:
        return None
    path = Path(location)
    if not path.exists():
        return None
    newest = path.stat().st_mtime
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for f in files:
                try:
                    newest = max(newest, os.stat(os.path.join(root, f)).st_mtime)
                except OSError:
                    continue
    return newest


__all__ = [
    "Supervisor",
    "Unit",
    "backoff_s",
    "executable",
    "last_checkpoint",
    "read_state",
    "scrape_targets",
]
