"""The controller's audit log: one JSON object per line, appended, fsynced.

Every record has a ``key`` (``c<cycle>:<step>``): :meth:`AuditLog.append_once` writes a key at
most once, so a controller that redoes a step after a crash does not log its decision twice.
A record cut short by a crash (a last line without its newline) was never acknowledged: it
is dropped when the log is opened, and the checkpoint, which holds every decision, writes it
again (:meth:`ctrstream.controller.cycle.Controller.resume`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class AuditLog:
    """An append-only JSON-lines file (see the module doc)."""

    def __init__(self, path: Path | str, on_append: Callable[[dict[str, Any]], None] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._on_append = on_append
        self._drop_torn_tail()
        self._keys = {r["key"] for r in self.records()}

    def _drop_torn_tail(self) -> None:
        """Cut a last line that has no newline (a write a crash interrupted)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        """Every record, oldest first."""
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{self.path} line {n} is not JSON ({e}): the audit log was edited; "
                    "restore it from a backup or move it away to start a new one"
                ) from e
        return out

    def has(self, key: str) -> bool:
        return key in self._keys

    def append_once(self, key: str, kind: str, **fields: Any) -> bool:
        """Append ``{"key", "kind", "wall_ms", **fields}`` unless ``key`` is logged already;
        returns whether it wrote. The line is fsynced before this returns."""
        if key in self._keys:
            return False
        rec = {"key": key, "kind": kind, "wall_ms": int(time.time() * 1000), **fields}
        line = json.dumps(rec, sort_keys=True, default=str, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._keys.add(key)
        if self._on_append is not None:
            self._on_append(rec)
        return True


__all__ = ["AuditLog"]
