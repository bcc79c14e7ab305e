"""Sweep 1 of the freshness study: what stale features cost.

A speed layer lagging by ``lag`` serves, at time ``t``, windows that count only the events
before ``t - lag``; with no speed layer at all, serving reads the batch view, which counts
only the events before the last batch cut-off. Both are computed exactly with the batch
layer's point-in-time machinery (``point_in_time_counts(..., visible_until_ms=)`` through
:func:`ctrstream.study.data.dense_at`): no replay.

Design (what is trained and evaluated where)
--------------------------------------------
* **Train** on the first ``train_hours`` after the history (day 2 of the ``freshness``
  scenario, which holds the largest campaign's shift at 36 h) with the system's labels (a
  click within the scenario's attribution window); **evaluate** on the next ``eval_hours``
  (day 3) against whether each impression was clicked at all, next to the oracle's NE/AUC on
  the same rows.
* Two variants per staleness point:

  - ``skew``: the model trained on fresh features, served stale ones (train/serve skew: a
    pipeline that falls behind after the model was trained);
  - ``same_lag``: a model trained and served at the same staleness (the steady state of a
    slower pipeline: the model has learned what the stale windows mean).

* Points: ``lags_s`` (default 0, 10 s, 1 min, 5 min, 1 h) and ``batch`` (no speed layer:
  visible until the last cut-off of a batch layer run every ``batch_every_h`` hours, aligned
  to 00:00 UTC; the time a batch job itself takes is not counted).
* Per point: NE, AUC, calibration (mean prediction / CTR), the NE difference to the same
  variant at lag 0 (relative, %, with a bootstrap interval over the evaluation rows), and
  the NE after the project's online calibrator run prequentially on the system's labels
  (:mod:`ctrstream.study.prequential`): how much of the loss is a calibration shift, which
  the calibration job would repair by itself, and how much is lost ranking information.
* The bootstrap interval is over evaluation rows only; two separately trained models also
  differ by training noise, which ``headline["seed_noise_ne_pct"]`` measures (the lag-0
  model trained with another seed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.study.data import (
    DAY_MS,
    HOUR_MS,
    StudyData,
    bootstrap_ne_diff,
    dense_at,
    fit,
    labels_within,
    predict,
    quality,
)
from ctrstream.study.prequential import calibrate_prequential

LAGS_S: tuple[float, ...] = (0.0, 10.0, 60.0, 300.0, 3600.0)
QUICK_LAGS_S: tuple[float, ...] = (0.0, 60.0, 3600.0)
BATCH = "batch"
VARIANTS = ("skew", "same_lag")


# --------------------------------------------------------------------------- what is visible


def visible_until_lag(t: np.ndarray, lag_ms: int) -> np.ndarray:
    """Event time up to which a speed layer lagging by ``lag_ms`` has counted, per row."""
    return np.asarray(t, dtype=np.int64) - int(lag_ms)


def batch_cutoff(t: np.ndarray, every_ms: int = DAY_MS) -> np.ndarray:
    """The last batch cut-off at or before each ``t`` (cut-offs every ``every_ms`` from the
    epoch, so a daily batch layer cuts at 00:00 UTC)."""
    if every_ms <= 0:
        raise ValueError(f"the batch cadence must be positive, got {every_ms} ms")
    t = np.asarray(t, dtype=np.int64)
    return (t // int(every_ms)) * int(every_ms)


def point_name(lag_s: float | None) -> str:
    """``0s``, ``10s``, ``1m``, ``5m``, ``1h`` ...; ``batch`` for None."""
    if lag_s is None:
        return BATCH
    s = float(lag_s)
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s:g}s"


def span_rows(data: StudyData, lo_ms: int, hi_ms: int) -> np.ndarray:
    return data.rows_between(int(lo_ms), int(hi_ms))


def fresh_dense(data: StudyData, lo_ms: int, hi_ms: int) -> np.ndarray:
    """Fresh dense inputs of the rows in ``[lo_ms, hi_ms)``, cached in ``data`` under
    ``dense:{lo}:{hi}:fresh`` (the key every sweep uses for the same rows)."""
    return dense_at(data, span_rows(data, lo_ms, hi_ms), key=f"dense:{lo_ms}:{hi_ms}:fresh")


def stale_dense(
    data: StudyData, idx: np.ndarray, lag_s: float | None, batch_every_ms: int = DAY_MS
) -> np.ndarray:
    """Dense inputs of rows ``idx`` at a staleness: a lag in seconds, or None for the batch
    view alone (not cached: each is used once per sweep)."""
    t = data.t[idx]
    if lag_s is None:
        vis = batch_cutoff(t, batch_every_ms)
    else:
        vis = visible_until_lag(t, int(round(float(lag_s) * 1000)))
    return dense_at(data, idx, vis)


def spans(data: StudyData, train_hours: float, eval_hours: float) -> tuple[int, int, int]:
    """(train start, train end = eval start, eval end) in ms; a clear error when the data is
    too short."""
    lo = data.history_end_ms
    mid = lo + int(round(train_hours * HOUR_MS))
    end = min(mid + int(round(eval_hours * HOUR_MS)), int(data.scenario.end_ms))
    if train_hours <= 0 or eval_hours <= 0 or end <= mid:
        raise ValueError(
            f"the scenario ends {(data.scenario.end_ms - lo) / HOUR_MS:g} h after its history: "
            f"no room for {train_hours:g} h of training and {eval_hours:g} h of evaluation "
            "(give a longer scenario or smaller train_hours / eval_hours)"
        )
    return lo, mid, end


# --------------------------------------------------------------------------- the sweep


def run(
    data: StudyData,
    *,
    kind: str = "deep",
    seed: int = 0,
    quick: bool = False,
    log: Callable[[str], Any] = print,
    lags_s: tuple[float, ...] | None = None,
    batch: bool = True,
    batch_every_h: float = 24.0,
    train_hours: float = 24.0,
    eval_hours: float = 24.0,
    calibrate: bool | None = None,
    n_boot: int | None = None,
    fit_opts: dict | None = None,
) -> dict:
    """Feature staleness: NE/AUC of the served model against the oracle's for each
    staleness point and variant (see the module docstring). Returns the sweep contract's
    dict; ``quick`` keeps lags 0, 1 min, 1 h and the batch view, skips the calibrated
    column and the seed-noise model, and uses 100 bootstrap resamples."""
    lags = tuple(lags_s) if lags_s is not None else (QUICK_LAGS_S if quick else LAGS_S)
    if not lags or float(lags[0]) != 0.0 or any(float(x) < 0 for x in lags):
        raise ValueError(f"lags_s must start with 0 (the reference) and be >= 0, got {lags}")
    calibrate = (not quick) if calibrate is None else calibrate
    fo = dict(fit_opts or {})  # passed to the training loop (e.g. batch_size for small data)
    n_boot = n_boot or (100 if quick else 200)
    batch_every_ms = int(round(batch_every_h * HOUR_MS))
    if batch_every_ms <= 0:
        raise ValueError(f"batch_every_h must be positive, got {batch_every_h}")
    window_ms = int(round(data.scenario.attribution_window_s * 1000))
    t_lo, t_mid, t_end = spans(data, train_hours, eval_hours)
    tr, ev = span_rows(data, t_lo, t_mid), span_rows(data, t_mid, t_end)
    y_tr = labels_within(data, window_ms, tr)
    y_ev = data.clicked[ev].astype(np.float64)
    log(
        f"staleness: train {len(tr):,} rows ({train_hours:g} h), evaluate {len(ev):,} rows "
        f"({(t_end - t_mid) / HOUR_MS:g} h), kind={kind}, points "
        f"{[point_name(x) for x in lags] + ([BATCH] if batch else [])}"
    )

    d_tr0 = fresh_dense(data, t_lo, t_mid)
    d_ev0 = fresh_dense(data, t_mid, t_end)
    net0 = fit(kind, data.sparse[tr], d_tr0, y_tr, data.t[tr], seed, **fo)
    p0 = predict(net0, data.sparse[ev], d_ev0)
    labels_ev = labels_within(data, window_ms, ev)  # what the calibration job learns from

    def calibrated(p: np.ndarray) -> float | None:
        if not calibrate:
            return None
        pc = calibrate_prequential(p, data.t[ev], labels_ev, window_ms)
        return float(quality(pc, data, ev)["ne"])

    ref_q = quality(p0, data, ev)
    ref_cal = calibrated(p0)
    points: list[float | None] = [float(x) for x in lags] + ([None] if batch else [])
    rows: list[dict] = []
    for lag in points:
        name = point_name(lag)
        if lag == 0.0:
            per_variant = {v: p0 for v in VARIANTS}
            mean_stale_s = 0.0
        else:
            d_ev = stale_dense(data, ev, lag, batch_every_ms)
            d_tr = stale_dense(data, tr, lag, batch_every_ms)
            net = fit(kind, data.sparse[tr], d_tr, y_tr, data.t[tr], seed, **fo)
            del d_tr
            per_variant = {
                "skew": predict(net0, data.sparse[ev], d_ev),
                "same_lag": predict(net, data.sparse[ev], d_ev),
            }
            del d_ev, net
            if lag is None:
                mean_stale_s = float(np.mean(data.t[ev] - batch_cutoff(data.t[ev], batch_every_ms)))
                mean_stale_s /= 1000.0
            else:
                mean_stale_s = float(lag)
        for variant, p in per_variant.items():
            q = ref_q if lag == 0.0 else quality(p, data, ev)
            if lag == 0.0:
                diff = lo = hi = 0.0
            else:
                diff, lo, hi = bootstrap_ne_diff(p, p0, y_ev, n_boot=n_boot, seed=seed)
            ne_cal = ref_cal if lag == 0.0 else calibrated(p)
            row = {
                "variant": variant,
                "staleness": name,
                "lag_s": None if lag is None else float(lag),
                "mean_staleness_s": round(mean_stale_s, 1),
                **q,
                "d_ne_pct": 100.0 * diff / ref_q["ne"],
                "d_ne_lo_pct": 100.0 * lo / ref_q["ne"],
                "d_ne_hi_pct": 100.0 * hi / ref_q["ne"],
                "ne_calibrated": ne_cal,
                "d_ne_calibrated_pct": (
                    None
                    if ne_cal is None or ref_cal is None
                    else 100.0 * (ne_cal - ref_cal) / ref_cal
                ),
            }
            rows.append(row)
            log(
                f"  {variant:8s} {name:>6s}: NE {q['ne']:.4f} (oracle {q['oracle_ne']:.4f}) "
                f"AUC {q['auc']:.4f} cal {q['calibration']:.3f}  dNE {row['d_ne_pct']:+.2f}% "
                f"[{row['d_ne_lo_pct']:+.2f}, {row['d_ne_hi_pct']:+.2f}]"
                + ("" if ne_cal is None else f"  calibrated dNE {row['d_ne_calibrated_pct']:+.2f}%")
            )

    headline: dict[str, Any] = {
        "ne_lag0": ref_q["ne"],
        "oracle_ne": ref_q["oracle_ne"],
        "ne_gap_lag0": ref_q["ne_gap"],
    }
    for r in rows:
        if r["lag_s"] != 0.0:
            headline[f"{r['variant']}_ne_cost_pct_{r['staleness']}"] = r["d_ne_pct"]
    # NE cost per minute of lag at each lag (same-lag: the steady state of a slower
    # pipeline); falling with the lag when the first minutes cost the most
    for r in rows:
        if r["variant"] == "same_lag" and r["lag_s"]:
            per_min = r["d_ne_pct"] / (r["lag_s"] / 60.0)
            headline[f"same_lag_ne_cost_pct_per_min_{r['staleness']}"] = per_min
    bat = [r for r in rows if r["staleness"] == BATCH and r["variant"] == "same_lag"]
    if bat:
        headline["speed_layer_value_ne_pct"] = bat[0]["d_ne_pct"]
    if not quick:
        net_b = fit(kind, data.sparse[tr], d_tr0, y_tr, data.t[tr], seed + 1, **fo)
        p_b = predict(net_b, data.sparse[ev], d_ev0)
        headline["seed_noise_ne_pct"] = 100.0 * (quality(p_b, data, ev)["ne"] / ref_q["ne"] - 1.0)
    return {
        "sweep": "staleness",
        "params": {
            "kind": kind,
            "seed": seed,
            "quick": quick,
            "lags_s": [float(x) for x in lags],
            "batch": batch,
            "batch_every_h": batch_every_h,
            "train_ms": [t_lo, t_mid],
            "eval_ms": [t_mid, t_end],
            "train_rows": int(len(tr)),
            "eval_rows": int(len(ev)),
            "attribution_window_s": window_ms / 1000.0,
            "n_boot": n_boot,
            "calibrated": calibrate,
            "fit_opts": fo,
        },
        "rows": rows,
        "headline": headline,
        "checks": {
            "lag0_variants_equal": all(r["ne"] == ref_q["ne"] for r in rows if r["lag_s"] == 0.0),
        },
    }


# --------------------------------------------------------------------------- the plot


def plot(result: dict, path: Path) -> Path:
    """NE cost (%, with its bootstrap interval) against staleness, one line per variant;
    and the served model's calibration at each point."""
    from ctrstream.plots import pyplot, save

    plt = pyplot()
    path = Path(path)
    rows = result["rows"]
    names = list(dict.fromkeys(r["staleness"] for r in rows))
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, variant in enumerate(VARIANTS):
        rs = {r["staleness"]: r for r in rows if r["variant"] == variant}
        ys = np.array([rs[n]["d_ne_pct"] for n in names])
        err = np.array(
            [
                [rs[n]["d_ne_pct"] - rs[n]["d_ne_lo_pct"] for n in names],
                [rs[n]["d_ne_hi_pct"] - rs[n]["d_ne_pct"] for n in names],
            ]
        )
        label = {"skew": "trained fresh, served stale", "same_lag": "trained and served stale"}
        a.errorbar(x + 0.06 * (k - 0.5), ys, yerr=err, fmt="o-", capsize=3, label=label[variant])
        cal = [rs[n]["d_ne_calibrated_pct"] for n in names]
        if all(c is not None for c in cal):
            a.plot(x, cal, "x:", label=f"{label[variant]}, online-calibrated")
        b.plot(x, [rs[n]["calibration"] for n in names], "o-", label=label[variant])
    a.axhline(0, color="grey", lw=0.8)
    a.set_xticks(x, names)
    a.set_xlabel("feature staleness (speed-layer lag; batch = batch view only)")
    a.set_ylabel("NE change vs lag 0 (%)")
    a.set_title(f"feature staleness ({result['params']['kind']})")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.axhline(1, color="grey", lw=0.8)
    b.set_xticks(x, names)
    b.set_xlabel("feature staleness")
    b.set_ylabel("mean prediction / CTR")
    b.set_title("calibration of the served model")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    return save(fig, path)


__all__ = [
    "LAGS_S",
    "QUICK_LAGS_S",
    "BATCH",
    "VARIANTS",
    "visible_until_lag",
    "batch_cutoff",
    "point_name",
    "span_rows",
    "fresh_dense",
    "stale_dense",
    "spans",
    "run",
    "plot",
]
