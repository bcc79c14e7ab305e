"""The timeline of a run: what the system did over event time, next to how well it served.

Assembled from what the running system leaves behind, not from the demo's own bookkeeping:

* the controller's audit log (``ctrstream.controller.audit``, JSON lines: every decision with
  its event time ``at_ms`` and cut-off ``cutoff_ms``): batch cut-offs (``view_switched``),
  models trained, gates, shadows, experiments started and decided, promotions, rollbacks;
* the decay monitor's state (``ctrstream.store.monitor.read_decay_state``: each version's
  alarm and the event time ``since_ms`` it fired);
* the closed loop's decision log (``ctrstream.loop.ledger.ImpressionLog``: per shown
  impression the model version that scored it, its calibrated score, the click and the true
  probability ``p_true``, i.e. the oracle): online NE per served version and the oracle's NE
  on the same impressions, over rolling windows of event time;
* experiment reports (``ctrstream.loop.session.report``): when each ran and what the
  sequential test decided;
* extra events the caller knows (the first model's publication, the market's shift).

:func:`assemble` is pure (dicts and arrays in, a :class:`Timeline` out) so it is unit-tested
on small synthetic inputs; :func:`timeline_png` and :func:`timeline_html` render it.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.metrics import entropy

# event kinds, in the order the plot draws their lanes (top to bottom)
KINDS = ("version", "cutoff", "drift", "alarm", "experiment", "decision")

# audit record kind -> timeline kind (records of other kinds are left out: steps that carry
# no decision an operator looks for on a timeline, e.g. archive_caught_up)
AUDIT_KINDS: dict[str, str] = {
    "cycle_started": "decision",
    "view_switched": "cutoff",
    "trained": "decision",
    "gate_passed": "decision",
    "gate_failed": "decision",
    "challenger_published": "version",
    "shadow_started": "experiment",
    "shadow_passed": "experiment",
    "shadow_failed": "experiment",
    "experiment_started": "experiment",
    "experiment_decided": "experiment",
    "promoted": "version",
    "rolled_back": "decision",
    "cycle_finished": "decision",
}

MODEL_FREE = ("", "prior", "oracle")  # decision-log model names that are no served model


@dataclass
class Event:
    t_ms: int  # event time
    kind: str  # one of KINDS
    label: str  # short: what happened
    detail: str = ""  # why, with the numbers
    source: str = ""  # audit | monitor | experiment | demo

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timeline:
    events: list[Event]
    # version -> {"t_ms": window ends, "ne": served NE, "oracle_ne": oracle NE on the same
    # impressions, "impressions": rows per window}
    series: dict[str, dict[str, list[float]]]
    window_ms: int
    t0_ms: int | None  # the origin of the plot's axis (the first event or row)
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": [e.to_dict() for e in self.events],
            "series": self.series,
            "window_ms": self.window_ms,
            "t0_ms": self.t0_ms,
            "numbers": self.numbers,
        }


# --------------------------------------------------------------------------- the sources


def audit_events(records: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Timeline events of the controller's audit records (``at_ms`` is their event time; a
    batch view's event time is its cut-off)."""
    out = []
    for r in records:
        kind = AUDIT_KINDS.get(str(r.get("kind")))
        if kind is None:
            continue
        at = r.get("cutoff_ms") if kind == "cutoff" else r.get("at_ms")
        if at is None:
            at = r.get("at_ms") or r.get("cutoff_ms")
        if at is None:
            continue
        data = r.get("data") or {}
        label = f"c{r.get('cycle')}: {r['kind']}"
        if r["kind"] == "promoted" and data.get("version") is not None:
            label += f" v{data['version']}"
        if r["kind"] == "view_switched" and data.get("version") is not None:
            label = f"c{r.get('cycle')}: batch view {data['version']}"
        out.append(Event(int(at), kind, label, str(r.get("why", "")), "audit"))
    return out


def alarm_events(decay_state: Mapping[str, Any] | None) -> list[Event]:
    """One event per version whose decay alarm fired (the monitor's state in the store)."""
    if not decay_state:
        return []
    versions = dict(decay_state.get("versions") or {})
    served = decay_state.get("version")
    if served is not None and served not in versions:
        versions[served] = decay_state
    out = []
    for v, s in sorted(versions.items()):
        if not s.get("alarm") or s.get("since_ms") is None:
            continue
        gap, base = s.get("ne_gap"), s.get("baseline_gap")
        detail = f"rule {s.get('reason', '?')}"
        if _finite(gap) and _finite(base):
            detail += f"; NE gap to the oracle {gap:.3f} against its baseline {base:.3f}"
        out.append(Event(int(s["since_ms"]), "alarm", f"decay alarm on {v}", detail, "monitor"))
    return out


def experiment_events(reports: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Start, stop and every decided comparison of each experiment report."""
    out = []
    for doc in reports:
        name = (doc.get("definition") or {}).get("name") or doc.get("name") or "experiment"
        status = doc.get("status") or {}
        start = status.get("started_at_ms")
        if start is not None:
            out.append(Event(int(start), "experiment", f"{name} started", "", "experiment"))
        for c in doc.get("comparisons") or []:
            if not c.get("decided") or start is None or c.get("decided_elapsed_s") is None:
                continue
            out.append(
                Event(
                    int(start + 1000 * float(c["decided_elapsed_s"])),
                    "decision",
                    f"{name}: {c['treatment']} vs {c['control']} decided {c.get('direction')}",
                    comparison_text(c),
                    "experiment",
                )
            )
        if status.get("stopped_at_ms") is not None:
            out.append(
                Event(
                    int(status["stopped_at_ms"]),
                    "experiment",
                    f"{name} stopped",
                    str(status.get("reason", "")),
                    "experiment",
                )
            )
    return out


def _pct(x: Any) -> str:
    return f"{100 * x:+.1f} %"


def comparison_text(c: Mapping[str, Any]) -> str:
    """A comparison of an experiment report in words: the measured lift with its always-valid
    interval and p-value at the report's last look, next to the true lift (the world's click
    probabilities: what the simulator knows and the test does not)."""
    lift = c.get("lift")
    if not _finite(lift):
        return ""
    text = f"{c.get('metric')}: lift {_pct(lift)}"
    if _finite(c.get("lo")) and _finite(c.get("hi")):
        text += f" [{_pct(c['lo'])}, {_pct(c['hi'])}]"
    if _finite(c.get("p_value")):
        text += f", p {c['p_value']:.3g}"
    if _finite(c.get("true_lift")):
        text += f"; true lift {_pct(c['true_lift'])}"
    return text


def verdict_numbers(reports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The controller's experiments (a ``challenger`` arm against the ``champion``): each
    comparison's measured lift, interval, p-value and decision at the report's last look,
    next to its true lift."""
    out = []
    for doc in reports:
        name = (doc.get("definition") or {}).get("name") or doc.get("name") or "experiment"
        for c in doc.get("comparisons") or []:
            if c.get("treatment") != "challenger" or c.get("control") != "champion":
                continue
            out.append(
                {
                    "experiment": name,
                    "metric": c.get("metric"),
                    "lift": c.get("lift"),
                    "lo": c.get("lo"),
                    "hi": c.get("hi"),
                    "p_value": c.get("p_value"),
                    "decided": bool(c.get("decided")),
                    "direction": c.get("direction"),
                    "decided_elapsed_s": c.get("decided_elapsed_s"),
                    "true_lift": c.get("true_lift"),
                    "users": c.get("users"),
                    "text": comparison_text(c),
                }
            )
    return out


def ne_series(cols: Mapping[str, np.ndarray], window_ms: int) -> dict[str, dict[str, list]]:
    """Online NE of each served version and the oracle's NE on the same impressions, per
    window of event time (tumbling, aligned to multiples of ``window_ms``).

    ``cols`` are decision-log columns: ``event_time_ms``, ``model_name``, ``model_version``,
    ``calibrated_score``, ``clicked``, ``p_true`` (``degraded`` rows - fallback scores - are
    left out when the column is there). NE = mean log loss / entropy of the window's observed
    CTR (``ctrstream.metrics``); a window without a click has no NE and is skipped.
    """
    if window_ms <= 0:
        raise ValueError(f"window_ms must be > 0, not {window_ms}")
    names = np.asarray(cols["model_name"]).astype(str)
    vers = np.asarray(cols["model_version"]).astype(str)
    keep = ~np.isin(names, MODEL_FREE) & (vers != "")
    if "degraded" in cols:
        keep &= ~np.asarray(cols["degraded"]).astype(bool)
    t = np.asarray(cols["event_time_ms"], dtype=np.int64)[keep]
    p = np.clip(np.asarray(cols["calibrated_score"], dtype=float)[keep], 1e-7, 1 - 1e-7)
    q = np.clip(np.asarray(cols["p_true"], dtype=float)[keep], 1e-7, 1 - 1e-7)
    y = np.asarray(cols["clicked"], dtype=float)[keep]
    key = np.char.add(np.char.add(names[keep], "@"), vers[keep])
    out: dict[str, dict[str, list]] = {}
    for v in sorted(set(key.tolist())):
        m = key == v
        w = t[m] // window_ms
        ll = -(y[m] * np.log(p[m]) + (1 - y[m]) * np.log(1 - p[m]))
        llq = -(y[m] * np.log(q[m]) + (1 - y[m]) * np.log(1 - q[m]))
        ser: dict[str, list] = {"t_ms": [], "ne": [], "oracle_ne": [], "impressions": []}
        for b in np.unique(w):
            sel = w == b
            ctr = float(y[m][sel].mean())
            h = entropy(ctr) if 0 < ctr < 1 else 0.0
            if h <= 0:
                continue
            ser["t_ms"].append(int((b + 1) * window_ms))
            ser["ne"].append(float(ll[sel].mean() / h))
            ser["oracle_ne"].append(float(llq[sel].mean() / h))
            ser["impressions"].append(int(sel.sum()))
        if ser["t_ms"]:
            out[v] = ser
    return out


def ne_between(
    series: Mapping[str, Mapping[str, list]], version: str, lo_ms: int | None, hi_ms: int | None
) -> dict[str, float] | None:
    """A version's impression-weighted NE and the oracle's over the windows ending in
    (lo_ms, hi_ms], with their gap (NE / oracle NE - 1); None without rows."""
    s = series.get(version)
    if not s:
        return None
    t = np.asarray(s["t_ms"])
    sel = np.ones(len(t), bool)
    if lo_ms is not None:
        sel &= t > lo_ms
    if hi_ms is not None:
        sel &= t <= hi_ms
    n = np.asarray(s["impressions"], dtype=float)[sel]
    if n.sum() == 0:
        return None
    ne = float(np.average(np.asarray(s["ne"])[sel], weights=n))
    oracle = float(np.average(np.asarray(s["oracle_ne"])[sel], weights=n))
    return {"ne": ne, "oracle_ne": oracle, "gap": ne / oracle - 1, "impressions": int(n.sum())}


def read_audit(path: Path | str) -> list[dict[str, Any]]:
    """The audit log's records (JSON lines; a torn last line - a write a crash cut - is
    skipped, as the controller itself drops it)."""
    import json

    p = Path(path)
    if not p.exists():
        return []
    out = []
    lines = p.read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # the torn last line
                break
            raise ValueError(f"{p} line {n} is not JSON ({e}): not a controller audit log") from e
    return out


DECISION_COLUMNS = (
    "event_time_ms",
    "model_name",
    "model_version",
    "calibrated_score",
    "clicked",
    "p_true",
    "degraded",
)


def concat_columns(tables: Iterable[Any]) -> dict[str, np.ndarray] | None:
    """The decision-log columns :func:`ne_series` reads, over several Arrow tables."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in DECISION_COLUMNS}
    for t in tables:
        if t is None or t.num_rows == 0:
            continue
        for c in DECISION_COLUMNS:
            parts[c].append(t.column(c).to_numpy(zero_copy_only=False))
    if not parts["event_time_ms"]:
        return None
    return {c: np.concatenate(v) for c, v in parts.items()}


# --------------------------------------------------------------------------- assembly


def assemble(
    *,
    audit: Iterable[Mapping[str, Any]] = (),
    decay_state: Mapping[str, Any] | None = None,
    decisions: Mapping[str, np.ndarray] | None = None,
    experiments: Iterable[Mapping[str, Any]] = (),
    extra: Iterable[Event] = (),
    window_ms: int = 10 * 60_000,
    monitor_window_min: float | None = None,
) -> Timeline:
    """The run's timeline from its sources (see the module doc), events in event-time order,
    plus the story's numbers: when the market drifted (an ``extra`` event of kind ``drift``),
    when the first alarm fired after it, when a version was promoted, and NE before / after
    against the oracle. ``monitor_window_min``: the decay monitor's window, for telling an
    alarm whose window was mostly before the drift."""
    experiments = list(experiments)  # read twice: the events and the verdicts
    events = [
        *audit_events(audit),
        *alarm_events(decay_state),
        *experiment_events(experiments),
        *extra,
    ]
    events.sort(key=lambda e: e.t_ms)  # stable: the audit log's order within a minute
    series = ne_series(decisions, window_ms) if decisions is not None else {}
    starts = [e.t_ms for e in events] + [s["t_ms"][0] - window_ms for s in series.values()]
    t0 = min(starts) if starts else None
    numbers = story_numbers(events, series)
    numbers["verdicts"] = verdict_numbers(experiments)
    numbers["monitor_window_min"] = monitor_window_min
    return Timeline(events, series, window_ms, t0, numbers)


def story_numbers(events: list[Event], series: Mapping[str, Mapping[str, list]]) -> dict:
    """The numbers the story is told with: drift, first alarm after it (and the delay),
    first promotion after it, and each served version's NE against the oracle before the
    drift, between the drift and the promotion, and after the promotion."""
    first = {
        k: next((e for e in events if e.kind == k), None) for k in ("drift", "alarm", "version")
    }
    drift = first["drift"]
    # the first alarm after the drift, else the first at all (one before the drift is a
    # false alarm: the story says so)
    alarm = next(
        (e for e in events if e.kind == "alarm" and (drift is None or e.t_ms >= drift.t_ms)),
        first["alarm"],
    )
    promoted = next(
        (
            e
            for e in events
            if e.source == "audit"
            and "promoted" in e.label
            and (alarm is None or e.t_ms >= alarm.t_ms)
        ),
        None,
    )
    rolled = [e for e in events if e.source == "audit" and "rolled_back" in e.label]
    out: dict[str, Any] = {
        "drift_ms": drift.t_ms if drift else None,
        "alarm_ms": alarm.t_ms if alarm else None,
        "alarm_after_drift_min": (alarm.t_ms - drift.t_ms) / 60_000 if alarm and drift else None,
        "promoted_ms": promoted.t_ms if promoted else None,
        "promoted_label": promoted.label if promoted else None,
        "rolled_back_ms": [e.t_ms for e in rolled],
        "ne": {},
    }
    d = drift.t_ms if drift else None
    pr = promoted.t_ms if promoted else None
    for v in series:
        out["ne"][v] = {
            "before_drift": ne_between(series, v, None, d),
            "after_drift": ne_between(series, v, d, pr),
            "after_promotion": ne_between(series, v, pr, None) if pr is not None else None,
        }
    return out


# --------------------------------------------------------------------------- rendering


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def clock(t_ms: int | None) -> str:
    """Event time as UTC ``HH:MM`` (the scenario's clock)."""
    return "-" if t_ms is None else time.strftime("%H:%M", time.gmtime(t_ms / 1000))


def event_rows(tl: Timeline) -> list[dict[str, Any]]:
    """The table of events: event time, minutes from the start, kind, what, why."""
    return [
        {
            "event time": clock(e.t_ms),
            "min": None if tl.t0_ms is None else round((e.t_ms - tl.t0_ms) / 60_000, 1),
            "kind": e.kind,
            "what": e.label,
            "why": e.detail,
            "source": e.source,
        }
        for e in tl.events
    ]


_COLORS = {
    "version": "tab:green",
    "cutoff": "tab:gray",
    "drift": "crimson",
    "alarm": "tab:orange",
    "experiment": "tab:purple",
    "decision": "tab:blue",
}


def timeline_png(path: Path, tl: Timeline) -> Path | None:
    """Online NE per version (solid) and the oracle's on the same impressions (dashed, same
    colour) over event time, with the events as vertical lines; a lane per kind below."""
    from ctrstream.plots import pyplot, save

    if tl.t0_ms is None:
        return None
    plt = pyplot()
    fig, (ax, lanes) = plt.subplots(
        2, 1, figsize=(9.0, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )

    def minutes(t: Iterable[float]) -> list[float]:
        return [(x - tl.t0_ms) / 60_000 for x in t]  # type: ignore[operator]

    for i, (v, s) in enumerate(tl.series.items()):
        c = f"C{i % 10}"
        ax.plot(minutes(s["t_ms"]), s["ne"], "-o", ms=3, color=c, lw=1.4, label=f"{v} (online)")
        ax.plot(minutes(s["t_ms"]), s["oracle_ne"], "--", color=c, lw=1, label=f"oracle on {v}'s")
    for e in tl.events:
        if e.kind in ("drift", "alarm", "version", "cutoff"):
            ls = ":" if e.kind == "cutoff" else "--"
            ax.axvline(minutes([e.t_ms])[0], color=_COLORS[e.kind], ls=ls, lw=1, alpha=0.8)
    ax.set_ylabel("NE (lower is better)")
    ax.set_title(
        f"online NE per served version vs the oracle ({tl.window_ms // 60_000} min windows)"
    )
    if tl.series:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    for e in tl.events:
        y = KINDS.index(e.kind) if e.kind in KINDS else len(KINDS)
        lanes.plot(minutes([e.t_ms]), [y], "o", color=_COLORS.get(e.kind, "k"), ms=5)
    lanes.set_yticks(range(len(KINDS)), KINDS, fontsize=7)
    lanes.set_ylim(len(KINDS) - 0.5, -0.5)
    lanes.set_xlabel("event-time minutes from the start of the timeline")
    lanes.grid(alpha=0.3)
    return save(fig, path)


def story_text(n: Mapping[str, Any]) -> str:
    """The story in sentences, with this run's numbers (:func:`story_numbers`)."""
    parts = []
    if n.get("drift_ms") is not None:
        parts.append(f"The market drifted at {clock(n['drift_ms'])} (event time).")
    if n.get("alarm_ms") is not None:
        delay = n.get("alarm_after_drift_min")
        if delay is not None and delay < 0:
            when = (
                f", {-delay:.0f} min of event time before the drift: a false alarm (noise "
                "in the window's gap), which the shift then made true."
            )
        elif delay is not None:
            when = f", {delay:.0f} min of event time after the drift."
            window = n.get("monitor_window_min")
            if window and delay < window / 2:
                when += (
                    f" Its {window:g}-minute window was mostly before the drift: the alarm is "
                    "for a gap to the oracle that had grown before it (the NE per window shows "
                    "when), not a detection of the drift itself."
                )
        else:
            when = "."
        parts.append(f"The decay monitor's alarm fired at {clock(n['alarm_ms'])}" + when)
    elif n.get("drift_ms") is not None:
        parts.append("The decay monitor raised no alarm in this run.")
    if n.get("promoted_ms") is not None:
        parts.append(f"The controller promoted a new version at {clock(n['promoted_ms'])}.")
    elif n.get("rolled_back_ms"):
        parts.append(
            "The controller rolled its challenger back at "
            + ", ".join(clock(t) for t in n["rolled_back_ms"])
            + ": no new version was promoted."
        )
    else:
        parts.append("No new version was promoted in this run.")
    for v in n.get("verdicts") or []:
        if not v.get("text"):
            continue
        if v.get("decided") and _finite(v.get("decided_elapsed_s")):
            how = (
                f"the sequential test decided {v.get('direction')} after "
                f"{v['decided_elapsed_s'] / 60:.0f} min"
            )
        else:
            how = "undecided"
        parts.append(
            f"Experiment {v['experiment']}, challenger vs champion: {how}; at its last look "
            f"{v['text']} (true: from the world's click probabilities)."
        )
    return " ".join(parts)


def ne_rows(n: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each served version's NE next to the oracle's, before the drift, between the drift
    and the promotion, after the promotion."""
    rows = []
    for v, d in (n.get("ne") or {}).items():
        for span, r in d.items():
            if r:
                rows.append(
                    {
                        "version": v,
                        "span": span.replace("_", " "),
                        "impressions": r["impressions"],
                        "online NE": r["ne"],
                        "oracle NE": r["oracle_ne"],
                        "gap": r["gap"],
                    }
                )
    return rows


def story_html(tl: Timeline) -> str:
    """The story in sentences and the NE table, with this run's numbers."""
    from ctrstream.demo.html import table_html

    rows = ne_rows(tl.numbers)
    return "<p>" + html.escape(story_text(tl.numbers)) + "</p>" + (table_html(rows) if rows else "")


def timeline_html(tl: Timeline, png: Path | None) -> str:
    from ctrstream.demo.html import img_html, table_html

    return (
        "<p>What the running system did, over event time: model versions served, batch "
        "cut-offs, drift alarms, experiments and their decisions (the controller's audit log, "
        "the decay monitor's state, the experiment reports), next to the online NE of each "
        "served version and the oracle's NE on the same impressions (the closed loop's "
        "decision log).</p>"
        + story_html(tl)
        + (img_html(png, "timeline of the run") if png is not None else "")
        + table_html(event_rows(tl), cls="timeline")
    )


__all__ = [
    "AUDIT_KINDS",
    "KINDS",
    "Event",
    "Timeline",
    "alarm_events",
    "assemble",
    "audit_events",
    "concat_columns",
    "read_audit",
    "clock",
    "comparison_text",
    "event_rows",
    "experiment_events",
    "ne_between",
    "ne_series",
    "story_html",
    "story_text",
    "ne_rows",
    "story_numbers",
    "timeline_html",
    "timeline_png",
    "verdict_numbers",
]
