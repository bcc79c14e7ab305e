"""Experiments on disk: definitions, status and sequential state that survive a restart.

One folder per experiment under ``settings.run_dir / "experiments"`` (or any root):

    <root>/<name>/experiment.json   the definition (Experiment.to_dict), versions resolved
    <root>/<name>/status.json       running | stopped | stopped-by-guardrail, times, reason,
                                    the arms stopped by a guardrail while the others run on
    <root>/<name>/sequential.json   the SequentialState (running p-values, intervals, decisions)
    <root>/<name>/report.json       the latest Report.to_dict() (optional)

Every write is atomic: the JSON goes to a temporary file in the same folder, is flushed
and fsynced, and replaces the target with ``os.replace`` (a rename, atomic on POSIX), so a
crash leaves the old file or the new one, never half of one. Starting and stopping hold an
exclusive ``flock`` on ``<root>/.lock`` so two processes cannot both start an experiment
of one name. A stopped experiment's folder is moved to ``<root>/.archive/<name>-<stopped
at>`` when a new experiment of that name starts. Nothing lives in memory between calls:
a new :class:`Registry` on the same folder (a restarted process) sees the same state.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ctrstream.config import Settings

from .analysis import SequentialState
from .design import Experiment

Status = Literal["running", "stopped", "stopped-by-guardrail"]
STATUSES: tuple[str, ...] = ("running", "stopped", "stopped-by-guardrail")


class ExperimentExists(ValueError):
    """An experiment of that name is running already."""


class UnknownExperiment(KeyError):
    """No experiment of that name in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; say it plainly
        return str(self.args[0]) if self.args else ""


@dataclass
class ExperimentRecord:
    experiment: Experiment
    status: str
    started_at_ms: int
    stopped_at_ms: int | None
    reason: str
    state: SequentialState
    folder: Path
    # arm name -> {"reason": ..., "at_ms": ...}: arms a guardrail (or an operator) stopped
    # while the experiment runs on
    stopped_arms: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.status == "running"

    def status_dict(self) -> dict[str, Any]:
        """What ``status.json`` holds."""
        return {
            "status": self.status,
            "started_at_ms": self.started_at_ms,
            "stopped_at_ms": self.stopped_at_ms,
            "reason": self.reason,
            "stopped_arms": self.stopped_arms,
            "updated_unix_s": time.time(),
        }


def _write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the target is untouched; leave no half file beside it
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself reaches the disk
    finally:
        os.close(dfd)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore or delete it") from e


class Registry:
    """The file store of experiments (see the module doc)."""

    def __init__(self, where: Settings | Path | str) -> None:
        """``where``: a stack's settings (the registry is ``settings.run_dir /
        "experiments"``) or the registry's folder itself."""
        self.root = where.run_dir / "experiments" if isinstance(where, Settings) else Path(where)

    @classmethod
    def of(cls, settings: Settings) -> Registry:
        """The registry of a stack: ``settings.run_dir / "experiments"``."""
        return cls(settings)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _folder(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"experiment name {name!r} is not allowed")
        return self.root / name

    def start(self, exp: Experiment, at_ms: int) -> ExperimentRecord:
        """Registers ``exp`` as running from event time ``at_ms``.

        Refuses (:class:`ExperimentExists`) while an experiment of that name runs; a
        stopped one of that name is archived first.
        """
        exp.validate()
        with self._locked():
            folder = self._folder(exp.name)
            if (folder / "status.json").exists():
                old = self.get(exp.name)
                if old.running:
                    raise ExperimentExists(
                        f"experiment {exp.name!r} is already running (started at event time "
                        f"{old.started_at_ms} ms): stop it first (`ctrstream experiment stop "
                        f"{exp.name}`) or start the new one under another name"
                    )
                archive = self.root / ".archive"
                archive.mkdir(exist_ok=True)
                target = archive / f"{exp.name}-{old.stopped_at_ms or 0}"
                i = 1
                while target.exists():
                    target = archive / f"{exp.name}-{old.stopped_at_ms or 0}.{i}"
                    i += 1
                os.replace(folder, target)
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(folder / "experiment.json", exp.to_dict())
            _write_json(folder / "sequential.json", SequentialState().to_dict())
            fresh = ExperimentRecord(
                exp, "running", int(at_ms), None, "", SequentialState(), folder
            )
            _write_json(folder / "status.json", fresh.status_dict())
        return self.get(exp.name)

    def stop(
        self,
        name: str,
        reason: str,
        *,
        at_ms: int | None = None,
        by_guardrail: bool = False,
    ) -> ExperimentRecord:
        """Marks the experiment stopped (``stopped-by-guardrail`` when a guardrail did it);
        stopping a stopped experiment is an error that says so."""
        with self._locked():
            rec = self.get(name)
            if not rec.running:
                raise ValueError(
                    f"experiment {name!r} is not running (status {rec.status}, "
                    f"reason {rec.reason!r})"
                )
            rec = replace(
                rec,
                status="stopped-by-guardrail" if by_guardrail else "stopped",
                stopped_at_ms=None if at_ms is None else int(at_ms),
                reason=reason,
            )
            _write_json(rec.folder / "status.json", rec.status_dict())
        return self.get(name)

    def stop_arm(
        self, name: str, arm: str, reason: str, *, at_ms: int | None = None
    ) -> ExperimentRecord:
        """Records that ``arm`` of a running experiment is stopped (a broken guardrail).

        The split does not change (the other arms keep their users): the caller serves the
        stopped arm's users as control from now on and its data stop growing. The control
        arm cannot be stopped alone: stop the experiment instead.
        """
        with self._locked():
            rec = self.get(name)
            if not rec.running:
                raise ValueError(f"experiment {name!r} is not running (status {rec.status})")
            exp = rec.experiment
            if arm not in {a.name for a in exp.deciding_arms}:
                raise ValueError(
                    f"experiment {name!r} has no deciding arm {arm!r} (its deciding arms: "
                    f"{[a.name for a in exp.deciding_arms]})"
                )
            if arm == exp.control:
                raise ValueError(
                    f"arm {arm!r} is the control of {name!r}: stop the experiment instead "
                    f"(`ctrstream experiment stop {name}`)"
                )
            if arm not in rec.stopped_arms:
                stopped = {**rec.stopped_arms, arm: {"reason": reason, "at_ms": at_ms}}
                _write_json(
                    rec.folder / "status.json", replace(rec, stopped_arms=stopped).status_dict()
                )
        return self.get(name)

    def get(self, name: str) -> ExperimentRecord:
        folder = self._folder(name)
        if not (folder / "status.json").exists():
            known = [r.experiment.name for r in self.list()] if self.root.exists() else []
            raise UnknownExperiment(
                f"no experiment {name!r} in {self.root} (known: {known or 'none'}); start one "
                "with `ctrstream experiment start`"
            )
        status = _read_json(folder / "status.json")
        seq = folder / "sequential.json"
        return ExperimentRecord(
            experiment=Experiment.from_dict(_read_json(folder / "experiment.json")),
            status=status["status"],
            started_at_ms=int(status["started_at_ms"]),
            stopped_at_ms=status.get("stopped_at_ms"),
            reason=status.get("reason", ""),
            state=SequentialState.from_dict(_read_json(seq)) if seq.exists() else SequentialState(),
            folder=folder,
            stopped_arms=dict(status.get("stopped_arms", {})),
        )

    def list(self) -> builtins.list[ExperimentRecord]:
        """Every experiment in the registry (not the archived ones), by name."""
        if not self.root.exists():
            return []
        return [
            self.get(p.name)
            for p in sorted(self.root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "status.json").exists()
        ]

    def running(self) -> builtins.list[ExperimentRecord]:
        return [r for r in self.list() if r.running]

    def _existing(self, name: str) -> Path:
        folder = self._folder(name)
        if not (folder / "status.json").exists():
            self.get(name)  # raises UnknownExperiment with the known names
        return folder

    def record_decision(self, name: str, state: SequentialState) -> None:
        """Stores the sequential state after a look (atomic)."""
        _write_json(self._existing(name) / "sequential.json", state.to_dict())

    def save_report(self, name: str, report: dict[str, Any]) -> Path:
        """Stores a look's ``Report.to_dict()`` as ``report.json`` (atomic)."""
        path = self._existing(name) / "report.json"
        _write_json(path, report)
        return path

    def load_report(self, name: str) -> dict[str, Any] | None:
        path = self._folder(name) / "report.json"
        return _read_json(path) if path.exists() else None
