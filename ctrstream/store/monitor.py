"""The decay monitor's state in Redis: what ``ctrstream monitor`` found about the served model,
for the controller (``layout.DECAY_STATE_KEY``, one JSON document, replaced whole).

The document is a dict with at least ``version`` (str), ``alarm`` (bool), ``since_ms``
(int or None: the event time the alarm fired), ``reason`` (str) and ``ne_gap`` (float: the
rolling NE gap to the reference, NaN when undefined); the monitor adds the baseline gap, the
event time it describes and every version's alarm
(``ctrstream.monitoring.decay.DecayMonitor.decay_state``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ctrstream.store import layout as L

REQUIRED: dict[str, tuple[type, ...]] = {
    "version": (str,),
    "alarm": (bool,),
    "since_ms": (int, type(None)),
    "reason": (str,),
    "ne_gap": (float, int),
}


def check_decay_state(state: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming what is missing or mistyped in a decay state."""
    problems = [
        f"{k} must be {' or '.join(t.__name__ for t in types)}"
        for k, types in REQUIRED.items()
        if k not in state
        or not isinstance(state[k], types)
        or (k == "since_ms" and isinstance(state[k], bool))
    ]
    if problems:
        raise ValueError(
            "bad decay state: " + "; ".join(problems) + " (see ctrstream.store.monitor)"
        )


def write_decay_state(client: Any, state: dict) -> None:
    """Replace the decay state with ``state`` (checked; NaN is written as JSON's NaN)."""
    check_decay_state(state)
    client.set(L.DECAY_STATE_KEY, json.dumps(state, sort_keys=True, default=str))


def read_decay_state(client: Any) -> dict | None:
    """The decay state last written (None before the monitor wrote one)."""
    doc = client.get(L.DECAY_STATE_KEY)
    if doc is None:
        return None
    state = json.loads(doc)
    if not isinstance(state, dict):
        raise ValueError(
            f"the value at {L.DECAY_STATE_KEY!r} is not a decay state (a JSON object): "
            "delete it and let `ctrstream monitor` write it again"
        )
    gap = state.get("ne_gap")
    if gap is None:
        state["ne_gap"] = math.nan
    return state


__all__ = ["check_decay_state", "read_decay_state", "write_decay_state"]
