"""The ledger, analysed: per-user aggregates into the experiment's analysis, the sequential
state and guardrails into the registry, and the plot of the arms over event time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.loop.ledger import Ledger


def arm_data(exp: Any, ledger: Ledger) -> dict[str, Any]:
    """``ArmData`` per arm: for a deciding arm the per-user columns of the users assigned to
    it; for a shadow every counted user (it scored every request) with its own predictions
    on the shown impressions."""
    from ctrstream.experiments.analysis import ArmData

    def columns(u: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
        col = ledger.users
        return dict(
            user_id=u,
            requests=col["requests"][u],
            impressions=col["impressions"][u],
            clicks=col["clicks"][u],
            revenue=col["revenue"][u],
            filled_slots=col["filled"][u],
            slots=col["slots"][u],
            exp_clicks=col["exp_clicks"][u],
            exp_revenue=col["exp_revenue"][u],
            predicted_clicks=predicted[u],
        )

    out = {}
    for k, name in enumerate(ledger.arms):
        u = ledger.arm_users(k)
        u = u[ledger.users["requests"][u] > 0]
        out[name] = ArmData(
            **columns(u, ledger.users["predicted"]),
            latency_ms=np.asarray(ledger.latency_ms.get(name, []), dtype=np.float64),
            errors=int(ledger.errors[k]),
            degraded=int(ledger.degraded[k]),
        )
    everyone = np.flatnonzero(ledger.users["requests"] > 0)
    for s, name in enumerate(ledger.shadows):
        out[name] = ArmData(**columns(everyone, ledger.shadow_predicted[s]))
    return out


def analyze_ledger(
    exp: Any, ledger: Ledger, registry: Any, now_ms: int, *, act: bool = True
) -> Any:
    """One look of the sequential test at event time ``now_ms``. The sequential state (the
    first look at which a comparison decided stays its decision) and the report are saved;
    with ``act``, an arm that breaks a guardrail is stopped (its users are served by the
    control from then on) and a sample ratio mismatch stops the experiment. Returns the
    report."""
    from ctrstream.experiments.analysis import analyze

    rec = registry.get(exp.name)
    state = rec.state
    elapsed_s = max(0.0, (now_ms - rec.started_at_ms) / 1000.0)
    rep = analyze(
        exp,
        arm_data(exp, ledger),
        elapsed_s=elapsed_s,
        at_ms=now_ms,
        state=state,
        stopped=set(rec.stopped_arms),
    )
    if not rec.running:
        return rep
    registry.record_decision(exp.name, state)
    registry.save_report(exp.name, rep.to_dict())
    if not act:
        return rep
    deciding = {a.name for a in exp.arms if a.deciding}
    for b in rep.breaches:
        if b.arm in deciding and b.arm != exp.control and b.arm not in rec.stopped_arms:
            registry.stop_arm(exp.name, b.arm, b.message, at_ms=now_ms)
    if rep.stop_experiment:
        reasons = "; ".join(b.message for b in rep.breaches if b.arm is None)
        registry.stop(exp.name, reasons, at_ms=now_ms, by_guardrail=True)
    return rep


def write_plot(ledger: Ledger, path: Path, title: str = "") -> Path | None:
    """Cumulative CTR and revenue per request of every arm over event time (the oracle arm
    is the ceiling of the expected value) - solid: observed, dashed: the truth."""
    from ctrstream.plots import pyplot

    if len(ledger.series) < 2:
        return None
    plt = pyplot()
    t0 = ledger.series[0]["t_ms"]
    hours = np.array([(s["t_ms"] - t0) / 3_600_000 for s in ledger.series])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in ledger.arms:
        rows = [s["arms"][arm] for s in ledger.series]
        imps = np.array([r["impressions"] for r in rows])
        req = np.array([r["requests"] for r in rows])
        with np.errstate(divide="ignore", invalid="ignore"):
            ctr = np.array([r["clicks"] for r in rows]) / imps
            true_ctr = np.array([r["exp_clicks"] for r in rows]) / imps
            rpr = np.array([r["revenue"] for r in rows]) / req
            true_rpr = np.array([r["exp_revenue"] for r in rows]) / req
        (line,) = ax1.plot(hours, ctr * 100, label=arm)
        ax1.plot(hours, true_ctr * 100, "--", color=line.get_color(), alpha=0.6)
        ax2.plot(hours, rpr * 1000, label=arm, color=line.get_color())
        ax2.plot(hours, true_rpr * 1000, "--", color=line.get_color(), alpha=0.6)
    ax1.set_xlabel("event time since start (h)")
    ax1.set_ylabel("cumulative CTR (%)")
    ax2.set_xlabel("event time since start (h)")
    ax2.set_ylabel("cumulative revenue per 1,000 requests")
    ax1.legend(fontsize=8)
    ax1.set_title("CTR per arm (dashed: true expected)")
    ax2.set_title("revenue per arm (dashed: true expected)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["arm_data", "analyze_ledger", "write_plot"]
