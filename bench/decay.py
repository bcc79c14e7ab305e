"""Decay under a shift the features cannot absorb (``ctrstream bench decay``;
docs/monitoring-decay.md).

For each scenario (by default ``taste_shift`` - the device x category taste redrawn at
``drift_at`` -, ``drift`` - one campaign's CTR shifted by a logit at the same time - and
``steady``, the control), on the same market, seed and volume:

1. generate the traffic with its truth (``ctrstream.study.data``: the freshness study's tools);
2. train one model (``--kind``, DCN-v2 by default: it can learn crosses) on the rows of
   ``[train_from, train_to)`` (hours from the start) with fresh point-in-time features, the
   labels the join gives (a click within the attribution window);
3. serve it from ``train_to`` to the end: its scores on fresh features, the labels the join
   gives, the oracle's true p on the same impressions - fed in event-time order, 5-minute
   micro-batches, to the decay monitor (``ctrstream.monitoring.decay.DecayMonitor``, its
   default configuration, the PSI profile from the training rows);
4. report the NE gap to the oracle per ``--step-min`` of event time, the alarm (when, after
   the shift by how long, which rule), the NE lost between the shift and the alarm (the
   served NE over those rows minus what it would have been at the pre-shift gap, and the
   excess log loss in nats summed over them), and - what the alarm is worth - a model
   retrained on the ``--retrain-hours`` after the alarm, its gap on the rows after that
   next to the stale model's.

Writes ``bench/results/decay.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from ctrstream import metrics as M
from ctrstream.bench.common import print_table, write_results
from ctrstream.monitoring.decay import DecayConfig, DecayMonitor, reference_profile

HOUR_MS = 3_600_000
PSI_FIELDS = (
    "ad_id",
    "campaign_id",
    "advertiser_id",
    "user_id",
    "site_id",
    "ad_category",
    "device_type",
    "country",
    "position",
)


def _quality(p: np.ndarray, o: np.ndarray, y: np.ndarray) -> dict[str, float]:
    ne, o_ne = M.normalized_entropy(p, y), M.normalized_entropy(o, y)
    return {"ne": ne, "oracle_ne": o_ne, "ne_gap": ne / o_ne - 1.0, "auc": M.auc(p, y)}


def run_scenario(
    name: str,
    events: int,
    hours: float,
    seed: int,
    kind: str,
    train_from_h: float,
    train_to_h: float,
    step_min: int,
    retrain_hours: float,
    cfg: DecayConfig,
    epochs: int | None,
) -> dict[str, Any]:
    from ctrstream.simulation.scenarios import load_scenario
    from ctrstream.study.data import dense_at, fit, labels_within, load_study_data, predict

    t0 = time.time()
    sc = load_scenario(name, events=events, hours=hours, seed=seed)
    data = load_study_data(sc, history_hours=train_from_h)
    shift_ms = int(sc.start_ms + round(sc.drift_at * sc.span_ms))
    window_ms = int(sc.attribution_window_s * 1000)
    y_join = labels_within(data, window_ms)
    tr = data.rows_between(
        sc.start_ms + int(train_from_h * HOUR_MS), sc.start_ms + int(train_to_h * HOUR_MS)
    )
    sv = data.rows_between(sc.start_ms + int(train_to_h * HOUR_MS), sc.end_ms - window_ms)
    dense_tr = dense_at(data, tr)
    dense_sv = dense_at(data, sv)
    t_gen = time.time() - t0
    kw = {} if epochs is None else {"epochs": epochs}
    net = fit(kind, data.sparse[tr], dense_tr, y_join[tr], data.t[tr], seed=seed, **kw)
    p = predict(net, data.sparse[sv], dense_sv)
    t_fit = time.time() - t0 - t_gen

    # the monitor, fed in event-time order, 5-minute micro-batches
    imps = data.impressions
    cols = {f: imps.column(f).to_numpy(zero_copy_only=False) for f in PSI_FIELDS}
    profile = reference_profile({f: v[tr] for f, v in cols.items()})
    version = f"ctr_{kind}@1"
    mon = DecayMonitor(cfg, default_profile=profile)
    t_sv, y_sv, o_sv = data.t[sv], y_join[sv].astype(np.float64), data.oracle_p[sv]
    step = 5 * 60_000
    edges = np.arange(t_sv[0] - t_sv[0] % step, t_sv[-1] + step, step)
    cuts = np.searchsorted(t_sv, edges)
    alarm_ev = None
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi <= lo:
            continue
        idx = sv[lo:hi]
        evs = mon.update_many(
            version,
            p[lo:hi],
            y_sv[lo:hi],
            t_sv[lo:hi],
            o_sv[lo:hi],
            {f: v[idx] for f, v in cols.items()} | {"event_time_ms": t_sv[lo:hi]},
        )
        if evs and alarm_ev is None:
            alarm_ev = evs[0]
    final = mon.get()["versions"][version]
    vd = mon.versions[version]

    # the timeline: the gap per step of event time
    timeline = []
    s_ms = step_min * 60_000
    for a in range(int(t_sv[0]), int(t_sv[-1]) + 1, s_ms):
        i0, i1 = np.searchsorted(t_sv, [a, a + s_ms])
        if i1 - i0 < 100 or y_sv[i0:i1].sum() < 5:
            continue
        q = _quality(p[i0:i1], o_sv[i0:i1], y_sv[i0:i1])
        timeline.append({"hour": (a - sc.start_ms) / HOUR_MS, "rows": int(i1 - i0), **q})

    pre = (t_sv >= shift_ms - HOUR_MS) & (t_sv < shift_ms)
    post = t_sv >= shift_ms
    q_pre = _quality(p[pre], o_sv[pre], y_sv[pre])
    q_post = _quality(p[post], o_sv[post], y_sv[post])
    out: dict[str, Any] = {
        "scenario": name,
        "events": events,
        "hours": hours,
        "seed": seed,
        "kind": kind,
        "train_hours": [train_from_h, train_to_h],
        "shift_hour": (shift_ms - sc.start_ms) / HOUR_MS,
        "serving_rows": int(len(sv)),
        "gap_hour_before_shift": q_pre["ne_gap"],
        "gap_after_shift": q_post["ne_gap"],
        "gap_growth": q_post["ne_gap"] - q_pre["ne_gap"],
        "ne_before": q_pre["ne"],
        "ne_after": q_post["ne"],
        "oracle_ne_before": q_pre["oracle_ne"],
        "oracle_ne_after": q_post["oracle_ne"],
        "baseline_gap": final["baseline_gap"],
        "alarm": bool(alarm_ev),
        "alarm_hour": None,
        "alarm_delay_min": None,
        "alarm_rule": None,
        "alarm_reason": None,
        "adwin_upward_detections": len(vd.adwin_detections),
        "psi_final": final["psi"],
        "timeline": timeline,
        "seconds": {"generate_and_features": t_gen, "fit": t_fit},
    }
    if alarm_ev is not None:
        at = int(alarm_ev["t_ms"])
        out["alarm_hour"] = (at - sc.start_ms) / HOUR_MS
        out["alarm_delay_min"] = (at - shift_ms) / 60_000
        out["alarm_rule"] = alarm_ev["reason"].split(":")[0]
        out["alarm_reason"] = alarm_ev["reason"]
        # NE lost between the shift and the alarm: the served NE there minus the NE at the
        # pre-shift gap (the oracle's NE on the same rows x (1 + pre-shift gap))
        m = (t_sv >= shift_ms) & (t_sv < at)
        if m.any() and y_sv[m].sum() > 0:
            q = _quality(p[m], o_sv[m], y_sv[m])
            out["until_alarm"] = {
                "rows": int(m.sum()),
                **q,
                "ne_lost": q["ne"] - q["oracle_ne"] * (1 + q_pre["ne_gap"]),
                "excess_log_loss_nats": float(
                    np.sum(_ll(p[m], y_sv[m]) - _ll(o_sv[m], y_sv[m]))
                    - q_pre["ne_gap"] * np.sum(_ll(o_sv[m], y_sv[m]))
                ),
            }
        # what the alarm is worth: a retrain it triggers can only learn the new market from
        # rows after the shift, so the challenger trains on the ``retrain_hours`` that follow
        # the alarm (labels closed) and both models are compared on the rows after that
        ready = at + int(retrain_hours * HOUR_MS)
        if retrain_hours > 0 and ready < t_sv[-1] - HOUR_MS / 2:
            rt = data.rows_between(at, ready - window_ms)
            net2 = fit(
                kind, data.sparse[rt], dense_at(data, rt), y_join[rt], data.t[rt], seed=seed, **kw
            )
            after = t_sv >= ready
            p2 = predict(net2, data.sparse[sv[after]], dense_sv[after])
            out["after_retrain"] = {
                "retrained_on_hours": [
                    (at - sc.start_ms) / HOUR_MS,
                    (ready - window_ms - sc.start_ms) / HOUR_MS,
                ],
                "evaluated_from_hour": (ready - sc.start_ms) / HOUR_MS,
                "rows": int(after.sum()),
                "stale": _quality(p[after], o_sv[after], y_sv[after]),
                "retrained": _quality(p2, o_sv[after], y_sv[after]),
            }
    out["seconds"]["total"] = time.time() - t0
    return out


def _ll(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    pc = np.clip(p, M.EPS, 1 - M.EPS)
    return -(y * np.log(pc) + (1 - y) * np.log1p(-pc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ctrstream bench decay", description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default="taste_shift,drift,steady")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--hours", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kind", default="deep", choices=("deep", "lr"))
    ap.add_argument("--train-from", type=float, default=0.5, help="hours from the start")
    ap.add_argument("--train-to", type=float, default=2.5, help="hours; serving starts here")
    ap.add_argument("--step-min", type=int, default=30, help="timeline step, minutes")
    ap.add_argument("--retrain-hours", type=float, default=3.0, help="0: no retrain")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default="decay", help="results name (bench/results/NAME.json)")
    a = ap.parse_args(argv)
    cfg = DecayConfig()
    rows = []
    for name in [s.strip() for s in a.scenarios.split(",") if s.strip()]:
        r = run_scenario(
            name,
            a.events,
            a.hours,
            a.seed,
            a.kind,
            a.train_from,
            a.train_to,
            a.step_min,
            a.retrain_hours,
            cfg,
            a.epochs,
        )
        rows.append(r)
        print_table(
            f"{name}: NE gap to the oracle over event time (shift at {r['shift_hour']:.1f} h)",
            r["timeline"],
            ["hour", "rows", "ne", "oracle_ne", "ne_gap", "auc"],
        )
        line = {
            k: r[k]
            for k in (
                "scenario",
                "gap_hour_before_shift",
                "gap_after_shift",
                "gap_growth",
                "alarm",
                "alarm_hour",
                "alarm_delay_min",
                "alarm_rule",
            )
        }
        if "until_alarm" in r:
            line["ne_lost"] = r["until_alarm"]["ne_lost"]
        if "after_retrain" in r:
            line["gap_stale"] = r["after_retrain"]["stale"]["ne_gap"]
            line["gap_retrained"] = r["after_retrain"]["retrained"]["ne_gap"]
        print_table(f"{name}: summary", [line])
    meta = {
        "argv": argv or [],
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    path = write_results(a.out, rows, meta)
    print(f"wrote {path}")
    return 0 if all(not math.isnan(r["gap_growth"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
