"""The controller's Prometheus metrics (names shared with the alert rules and the dashboard)."""

from __future__ import annotations

from functools import cache
from typing import Any

DECISION_KINDS = (
    "cycle_started",
    "archive_caught_up",
    "view_switched",
    "reconciled",
    "trained",
    "gate_passed",
    "gate_failed",
    "challenger_published",
    "shadow_started",
    "shadow_passed",
    "shadow_failed",
    "experiment_started",
    "experiment_decided",
    "promoted",
    "rolled_back",
    "cycle_finished",
)


@cache
def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge

    return {
        "decisions": Counter(
            "ctrstream_controller_decisions_total",
            "controller decisions written to the audit log, by kind",
            ["kind"],
        ),
        "cycle_time": Gauge(
            "ctrstream_controller_cycle_event_time_ms",
            "the cut-off (event time, ms) of the controller's latest cycle",
        ),
        "served": Gauge(
            "ctrstream_served_model_version",
            "the model version that serves unpinned requests (the champion)",
            ["model"],
        ),
    }


def count_decision(record: dict[str, Any]) -> None:
    _metrics()["decisions"].labels(kind=str(record.get("kind", "?"))).inc()


def set_cycle_time(cutoff_ms: int) -> None:
    _metrics()["cycle_time"].set(cutoff_ms)


def set_served_version(model: str, version: int) -> None:
    _metrics()["served"].labels(model=model).set(version)


__all__ = ["DECISION_KINDS", "count_decision", "set_cycle_time", "set_served_version"]
