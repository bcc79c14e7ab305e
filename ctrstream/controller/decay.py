"""The decay monitor's alarm as the controller reads it.

The monitor (``ctrstream monitor``) writes its state to the store with
``ctrstream.store.monitor.write_decay_state``; the controller reads it with
:func:`read_decay_state`. The state is a dict with at least
``{"version": str, "alarm": bool, "since_ms": int | None, "reason": str, "ne_gap": float}``.
"""

from __future__ import annotations

from typing import Any

from ctrstream.store import monitor


def read_decay_state(client: Any) -> dict | None:
    """The decay monitor's latest state (None: the monitor wrote nothing yet)."""
    return monitor.read_decay_state(client)


def alarm_since(state: dict | None) -> int | None:
    """The event time the alarm was raised at, when the state says alarm (None otherwise)."""
    if not state or not state.get("alarm"):
        return None
    since = state.get("since_ms")
    return int(since) if since is not None else 0


__all__ = ["read_decay_state", "alarm_since"]
