"""Sweep 2 of the freshness study: what a model's age costs, by retraining cadence, down to
continuous training.

The setup (all times in event time; ``W`` = the scenario's attribution window, after which a
row's label is final and can be trained on):

* **The frozen model**: ``kind`` trained (``data.fit``, the ``ctrstream train`` loop) on the
  first ``train_hours`` after the history day, on the rows whose labels are final at
  ``T0 = history end + train_hours`` (``t < T0 - W``), with fresh features and the join's
  labels (clicked within ``W``). It is served unchanged on ``[T0, end)``; the **age curve**
  is its NE per ``bucket_hours`` bucket of ``delta = t - T0``, next to the continuous
  learner's NE on the same rows and next to the oracle's (``ne_gap``).
* **Continuous training** (the ``delta -> 0`` point): an :class:`OnlineLearner`
  warm-started from the frozen model steps through ``[T0, end)`` in ``step_minutes`` steps:
  it scores a step's rows, then learns (one optimizer step per micro-batch, the batch loop's
  optimizers and learning rates) from every row whose label became final by the step's end.
  Its model is at most ``W + step`` old.
* **Retraining cadences, warm** (``cadences_hours``): the model served on ``[r, r + k)`` is
  the continuous learner's state at ``r`` (it has learned every row with ``t < r - W``), i.e.
  incremental retraining from the last checkpoint every ``k`` hours - the same learning as
  continuous training, published later. The difference to the continuous learner is what
  the publishing delay alone costs.
* **Retraining cadences, from scratch** (``scratch_cadences_hours``): at each ``r`` a new
  model is trained on the sliding window ``[r - train_hours, r - W)`` (so every served model
  has seen as much data as the frozen one), served on ``[r, r + k)``.

Every model is evaluated on whether the row was clicked at all (``data.quality``), next to
the oracle. Model age of a served prediction = ``t`` minus the time of the newest row its
model learned from. Headline: the NE cost per day of model age (the slope of the frozen
model's NE relative to the continuous learner's over ``delta``, and the same slope across
cadences against their mean age), and continuous against frozen with a bootstrap interval.
``rows`` holds the cadence table (``series = "cadence"``) then the age curve
(``series = "age"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.models.online import OnlineLearner
from ctrstream.study.data import (
    HOUR_MS,
    StudyData,
    bootstrap_ne_diff,
    dense_at,
    fit,
    labels_within,
    predict,
    quality,
)

MINUTE_MS = 60_000

DEFAULTS: dict[str, Any] = dict(
    train_hours=None,  # None: min(24 h, half the span after the history day)
    bucket_hours=1.0,
    step_minutes=5.0,
    cadences_hours=(1.0, 3.0, 6.0, 12.0),
    scratch_cadences_hours=(6.0,),
    n_boot=200,
    online_lr_scale=1.0,  # the online learner's step sizes, times the batch loop's
)
QUICK: dict[str, Any] = dict(
    bucket_hours=2.0,
    step_minutes=10.0,
    cadences_hours=(1.0, 6.0),
    scratch_cadences_hours=(),
    n_boot=100,
)


class ModelAgeError(ValueError):
    pass


def _params(data: StudyData, quick: bool, opts: dict) -> dict:
    unknown = sorted(set(opts) - set(DEFAULTS))
    if unknown:
        raise ModelAgeError(
            f"unknown option(s) {unknown} for the model-age sweep: use {sorted(DEFAULTS)}"
        )
    p = {**DEFAULTS, **(QUICK if quick else {}), **opts}
    span_h = (data.scenario.end_ms - data.history_end_ms) / HOUR_MS
    if p["train_hours"] is None:
        p["train_hours"] = min(24.0, span_h / 2)
    window_h = data.scenario.attribution_window_s / 3600.0
    step_h = p["step_minutes"] / 60.0
    problems = []
    if not window_h < p["train_hours"] < span_h - step_h:
        problems.append(
            f"train_hours={p['train_hours']:g} must exceed the attribution window "
            f"({window_h:g} h) and leave at least a step after it in the "
            f"{span_h:g} h after the history day"
        )
    if p["bucket_hours"] <= 0 or p["step_minutes"] <= 0:
        problems.append("bucket_hours and step_minutes must be > 0")
    for k in (*p["cadences_hours"], *p["scratch_cadences_hours"]):
        ratio = k / step_h if step_h > 0 else 0.5
        if k <= 0 or abs(ratio - round(ratio)) > 1e-9:
            problems.append(f"cadence {k:g} h must be a positive multiple of the step")
    if problems:
        raise ModelAgeError("model-age sweep: " + "; ".join(problems))
    p["cadences_hours"] = tuple(float(k) for k in p["cadences_hours"])
    p["scratch_cadences_hours"] = tuple(float(k) for k in p["scratch_cadences_hours"])
    return p


def run(
    data: StudyData,
    *,
    kind: str = "deep",
    seed: int = 0,
    quick: bool = False,
    log: Callable[[str], Any] = print,
    **opts: Any,
) -> dict:
    """The model-age sweep on ``data`` (see the module docstring); the sweep contract's dict.

    Options (``opts``): ``train_hours``, ``bucket_hours``, ``step_minutes``,
    ``cadences_hours``, ``scratch_cadences_hours``, ``n_boot``."""
    p = _params(data, quick, opts)
    w_ms = int(round(data.scenario.attribution_window_s * 1000))
    step_ms = int(round(p["step_minutes"] * MINUTE_MS))
    start, end = data.history_end_ms, data.scenario.end_ms
    t0_ms = start + int(round(p["train_hours"] * HOUR_MS))
    clock = time.perf_counter()

    idx = data.rows_between(start, end)
    dense = dense_at(data, idx, key=f"fresh[{start},{end})")
    t = data.t[idx]
    sparse = data.sparse[idx]
    y_join = labels_within(data, w_ms, idx)

    def pos(ms: int) -> int:
        return int(np.searchsorted(t, ms, side="left"))

    def fit_until(r_ms: int) -> Any:
        a, b = pos(r_ms - int(round(p["train_hours"] * HOUR_MS))), pos(r_ms - w_ms)
        return fit(kind, sparse[a:b], dense[a:b], y_join[a:b], t[a:b], seed=seed)

    log(f"model age: {len(idx):,} rows, features {time.perf_counter() - clock:.1f} s")
    frozen = fit_until(t0_ms)
    e0 = pos(t0_ms)
    n_ev = len(t) - e0
    if n_ev == 0:
        raise ModelAgeError("no rows to evaluate after the training window")
    t_ev = t[e0:]
    log(f"model age: frozen {kind} trained, {time.perf_counter() - clock:.1f} s")

    # every served model's predictions of the evaluation rows and the time of the newest row
    # it learned from (the age of a prediction is t minus that)
    preds: dict[str, np.ndarray] = {"frozen": predict(frozen, sparse[e0:], dense[e0:])}
    learned_until: dict[str, np.ndarray] = {"frozen": np.full(n_ev, t0_ms - w_ms)}
    warm = {k: f"warm every {k:g} h" for k in p["cadences_hours"]}
    scratch = {k: f"scratch every {k:g} h" for k in p["scratch_cadences_hours"]}
    for name in ("continuous", *warm.values(), *scratch.values()):
        preds[name] = np.empty(n_ev)
        learned_until[name] = np.empty(n_ev, dtype=np.int64)

    from ctrstream.models.training import DEFAULTS as TRAIN_DEFAULTS

    learner = OnlineLearner(
        frozen,
        lr=TRAIN_DEFAULTS[kind]["lr"] * p["online_lr_scale"],
        sparse_lr=TRAIN_DEFAULTS[kind]["sparse_lr"] * p["online_lr_scale"],
    )
    learned = t0_ms - w_ms  # rows with t < learned have been learned from
    for a_ms in range(t0_ms, end, step_ms):
        i, j = pos(a_ms) - e0, pos(a_ms + step_ms) - e0
        for k, name in warm.items():
            k_ms = int(round(k * HOUR_MS))
            if (a_ms - t0_ms) % k_ms == 0:  # a retrain: publish the learner's state
                stop = pos(a_ms + k_ms) - e0
                # the learner's state now is the published model's for the whole period
                snap = frozen if a_ms == t0_ms else learner.net
                preds[name][i:stop] = predict(
                    snap, sparse[e0 + i : e0 + stop], dense[e0 + i : e0 + stop]
                )
                learned_until[name][i:stop] = learned
        if j > i:
            preds["continuous"][i:j] = learner.predict_many(
                sparse[e0 + i : e0 + j], dense[e0 + i : e0 + j]
            )
            learned_until["continuous"][i:j] = learned
        final = min(a_ms + step_ms, end) - w_ms  # labels final by the step's end
        la, lb = pos(learned), pos(final)
        if lb > la:
            learner.learn_many(sparse[la:lb], dense[la:lb], y_join[la:lb])
        learned = max(learned, final)
    log(
        f"model age: continuous pass ({learner.n_steps} steps on {learner.n_seen:,} rows), "
        f"{time.perf_counter() - clock:.1f} s"
    )

    for k, name in scratch.items():
        k_ms = int(round(k * HOUR_MS))
        for r_ms in range(t0_ms, end, k_ms):
            i, stop = pos(r_ms) - e0, pos(r_ms + k_ms) - e0
            net = frozen if r_ms == t0_ms else fit_until(r_ms)
            preds[name][i:stop] = predict(
                net, sparse[e0 + i : e0 + stop], dense[e0 + i : e0 + stop]
            )
            learned_until[name][i:stop] = r_ms - w_ms
        log(f"model age: {name} retrained, {time.perf_counter() - clock:.1f} s")

    ev_idx = idx[e0:]
    y_ev = data.clicked[ev_idx]
    order = ["continuous", *warm.values(), "frozen", *scratch.values()]
    cadence_of = {"continuous": 0.0, "frozen": float("inf")} | {n: k for k, n in warm.items()}
    cadence_of |= {n: k for k, n in scratch.items()}
    rows: list[dict] = []
    cont_ne = quality(preds["continuous"], data, ev_idx)["ne"]
    for name in order:
        q = quality(preds[name], data, ev_idx)
        diff, lo, hi = (
            (0.0, 0.0, 0.0)
            if name == "continuous"
            else bootstrap_ne_diff(
                preds[name], preds["continuous"], y_ev, n_boot=p["n_boot"], seed=seed
            )
        )
        age_h = (t_ev - learned_until[name]) / HOUR_MS
        rows.append(
            dict(
                series="cadence",
                model=name,
                retrain=(
                    "online"
                    if name == "continuous"
                    else "never"
                    if name == "frozen"
                    else name.split()[0]
                ),
                cadence_h=cadence_of[name] if np.isfinite(cadence_of[name]) else None,
                mean_age_h=float(age_h.mean()),
                max_age_h=float(age_h.max()),
                **q,
                ne_vs_continuous_pct=100.0 * (q["ne"] / cont_ne - 1.0),
                ne_diff=diff,
                ne_diff_lo=lo,
                ne_diff_hi=hi,
            )
        )

    # the age curve: the frozen model against the continuous learner per bucket of delta
    b_ms = int(round(p["bucket_hours"] * HOUR_MS))
    age_rows: list[dict] = []
    for b_lo in range(t0_ms, end, b_ms):
        i, j = pos(b_lo) - e0, pos(min(b_lo + b_ms, end)) - e0
        if j - i < 2 or y_ev[i:j].sum() == 0:
            continue
        qf = quality(preds["frozen"][i:j], data, ev_idx[i:j])
        qc = quality(preds["continuous"][i:j], data, ev_idx[i:j])
        age_rows.append(
            dict(
                series="age",
                model="frozen",
                delta_h=float((t_ev[i:j] - t0_ms).mean() / HOUR_MS),
                mean_age_h=float((t_ev[i:j] - (t0_ms - w_ms)).mean() / HOUR_MS),
                **qf,
                continuous_ne=qc["ne"],
                continuous_ne_gap=qc["ne_gap"],
                ne_vs_continuous_pct=100.0 * (qf["ne"] / qc["ne"] - 1.0),
            )
        )

    headline = _headline(rows, age_rows)
    by = {r["model"]: r for r in rows}
    checks = {
        "continuous_beats_frozen": bool(by["frozen"]["ne_diff_lo"] > 0),
        "warm_ages_grow_with_cadence": bool(
            np.all(np.diff([by[n]["mean_age_h"] for n in ("continuous", *warm.values())]) > 0)
        ),
    }
    log(f"model age: done, {time.perf_counter() - clock:.1f} s")
    return dict(
        sweep="model_age",
        params=dict(
            kind=kind,
            seed=seed,
            quick=quick,
            scenario=data.scenario.name,
            attribution_window_h=w_ms / HOUR_MS,
            history_end_ms=start,
            train_end_ms=t0_ms,
            end_ms=end,
            train_hours=p["train_hours"],
            eval_hours=(end - t0_ms) / HOUR_MS,
            bucket_hours=p["bucket_hours"],
            step_minutes=p["step_minutes"],
            cadences_hours=list(p["cadences_hours"]),
            scratch_cadences_hours=list(p["scratch_cadences_hours"]),
            n_boot=p["n_boot"],
            eval_rows=int(n_ev),
            online_steps=learner.n_steps,
        ),
        rows=rows + age_rows,
        headline=headline,
        checks=checks,
    )


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error (nan with < 3 points)."""
    if len(x) < 3 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    (b, a), cov = np.polyfit(x, y, 1, cov=True)
    return float(b), float(np.sqrt(cov[0, 0]))


def _headline(rows: list[dict], age_rows: list[dict]) -> dict:
    by = {r["model"]: r for r in rows}
    h: dict[str, Any] = {}
    if age_rows:
        d_days = np.array([r["delta_h"] for r in age_rows]) / 24.0
        rel = np.array([r["ne_vs_continuous_pct"] for r in age_rows])
        gap = 100.0 * np.array([r["ne_gap"] for r in age_rows])
        h["age_ne_pct_per_day"], h["age_ne_pct_per_day_se"] = _slope(d_days, rel)
        h["age_ne_gap_pct_per_day"], h["age_ne_gap_pct_per_day_se"] = _slope(d_days, gap)
    warm = [r for r in rows if r["retrain"] in ("online", "warm", "never")]
    ages = np.array([r["mean_age_h"] for r in warm]) / 24.0
    h["cadence_ne_pct_per_day"], h["cadence_ne_pct_per_day_se"] = _slope(
        ages, np.array([r["ne_vs_continuous_pct"] for r in warm])
    )
    f = by["frozen"]
    h |= dict(
        continuous_ne=by["continuous"]["ne"],
        continuous_ne_gap_pct=100.0 * by["continuous"]["ne_gap"],
        frozen_ne=f["ne"],
        frozen_ne_gap_pct=100.0 * f["ne_gap"],
        frozen_vs_continuous_pct=f["ne_vs_continuous_pct"],
        frozen_minus_continuous_ne=f["ne_diff"],
        frozen_minus_continuous_ne_lo=f["ne_diff_lo"],
        frozen_minus_continuous_ne_hi=f["ne_diff_hi"],
        frozen_mean_age_h=f["mean_age_h"],
    )
    for r in rows:
        if r["retrain"] in ("warm", "scratch"):
            key = f"{r['retrain']}_{r['cadence_h']:g}h_vs_continuous_pct".replace(".", "_")
            h[key] = r["ne_vs_continuous_pct"]
    return h


def plot(result: dict, path: Path) -> Path:
    """Two panels: the frozen model's NE against the continuous learner's over its age (with
    the fitted slope), and every cadence's NE against its mean model age."""
    from ctrstream.plots import pyplot, save

    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    age = [r for r in result["rows"] if r["series"] == "age"]
    cad = [r for r in result["rows"] if r["series"] == "cadence"]
    h = result["headline"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    if age:
        x = np.array([r["delta_h"] for r in age])
        a.plot(x, [r["ne_vs_continuous_pct"] for r in age], "o-", label="frozen vs continuous")
        a.plot(x, [100 * r["ne_gap"] for r in age], "s--", alpha=0.6, label="frozen vs oracle")
        a.plot(
            x,
            [100 * r["continuous_ne_gap"] for r in age],
            "^--",
            alpha=0.6,
            label="continuous vs oracle",
        )
        slope = h.get("age_ne_pct_per_day", float("nan"))
        if np.isfinite(slope):
            rel = np.array([r["ne_vs_continuous_pct"] for r in age])
            c = rel.mean() - slope * (x / 24).mean()
            a.plot(x, c + slope * x / 24, "k:", label=f"slope {slope:+.2f} % NE / day")
    a.axhline(0, color="grey", lw=0.8)
    a.set_xlabel("hours since the frozen model was trained (delta)")
    a.set_ylabel("NE difference (%)")
    a.set_title("model age: a frozen model ages")
    a.legend(fontsize=8)
    for r in cad:
        err = 100 * np.array([[r["ne_diff"] - r["ne_diff_lo"]], [r["ne_diff_hi"] - r["ne_diff"]]])
        err = err / max(r["ne"] - r["ne_diff"], 1e-12)
        mark = {"online": "*", "warm": "o", "never": "X", "scratch": "D"}.get(r["retrain"], "o")
        b.errorbar(
            r["mean_age_h"],
            r["ne_vs_continuous_pct"],
            yerr=err,
            fmt=mark,
            capsize=3,
            label=r["model"],
        )
    b.axhline(0, color="grey", lw=0.8)
    b.set_xlabel("mean model age of served predictions (h)")
    b.set_ylabel("NE vs continuous training (%)")
    b.set_title("retraining cadence (95 % bootstrap intervals)")
    b.legend(fontsize=8)
    return save(fig, path)


__all__ = ["DEFAULTS", "QUICK", "ModelAgeError", "plot", "run"]
