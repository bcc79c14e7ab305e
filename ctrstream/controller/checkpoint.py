"""The controller's state on disk: the schedule and the cycle in progress, with every step's
outcome (its decision, why, and what it produced), replaced atomically (temporary file,
fsync, rename, fsync of the folder): a crash leaves the old state or the new one."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FORMAT = 1


@dataclass
class Cycle:
    """One cycle: its number, cut-off, why it started, each finished step's outcome
    (step name -> ``{"kind", "why", "at_ms", "data"}``) and where its training rows start."""

    number: int
    cutoff_ms: int
    reason: str
    started_at_ms: int
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the first event time trained on: the decay alarm's since_ms for a cycle the alarm
    # started (the hours before it do not help); None: the sliding window
    train_from_ms: int | None = None


@dataclass
class ControllerState:
    """What survives a restart: the schedule's anchor (the last finished cycle's cut-off),
    the decay alarm already acted on, the cycle in progress, the finished cycles' summaries."""

    format: int = STATE_FORMAT
    schedule_from_ms: int | None = None
    handled_alarm_since_ms: int | None = None
    requested: str | None = None  # an operator's request for a cycle now (``--now``), and why
    cycles_finished: int = 0
    cycle: Cycle | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControllerState:
        if d.get("format") != STATE_FORMAT:
            raise ValueError(
                f"controller state format {d.get('format')!r} is not {STATE_FORMAT}: it was "
                "written by another version; move it away to start the schedule afresh"
            )
        d = dict(d)
        c = d.pop("cycle", None)
        return cls(cycle=Cycle(**c) if c else None, **d)


def load(path: Path) -> ControllerState:
    """The state at ``path`` (a fresh one when there is none)."""
    if not path.exists():
        return ControllerState()
    try:
        return ControllerState.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(
            f"{path} is not a controller state ({e}): restore it, or move it away to start "
            "the schedule afresh"
        ) from e


def save(path: Path, state: ControllerState) -> None:
    """Replace the state at ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state.to_dict(), f, indent=1, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


__all__ = ["STATE_FORMAT", "Cycle", "ControllerState", "load", "save"]
