"""Reconciliation reports in Redis: the summary of each reconciled batch-view version, and
which version was reconciled last (``layout.reconcile_key``, ``layout.RECONCILE_LAST_KEY``).
The report itself (what is compared, the reasons) is ``ctrstream.batch.reconcile``'s."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ctrstream.store import layout as L
from ctrstream.store.scan import text


def save_reconcile_report(client: Any, version: str, summary: Mapping[str, Any]) -> None:
    """Keep ``summary`` (JSON; values JSON cannot hold are written as strings) as the report
    of ``version``, and mark ``version`` as the last one reconciled."""
    client.set(L.reconcile_key(version), json.dumps(summary, default=str))
    client.set(L.RECONCILE_LAST_KEY, version)


def load_reconcile_report(client: Any, version: str) -> dict[str, Any] | None:
    """The report summary kept for ``version`` (None when there is none)."""
    doc = client.get(L.reconcile_key(version))
    return None if doc is None else json.loads(doc)


def last_reconciled_version(client: Any) -> str | None:
    """The version reconciled last (None before the first reconciliation)."""
    v = client.get(L.RECONCILE_LAST_KEY)
    return None if v is None else text(v)
