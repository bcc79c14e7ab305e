"""Sweep 3 of the freshness study: what the join's attribution window costs.

The join labels an impression clicked when its click arrives within the attribution window;
a click that comes later is a real click labelled as a non-click. A short window gives
labels sooner (fresher training data, a calibrator that reacts faster), a long one gives
more of them right. The generator knows every click's delay, so each cost is measured
exactly.

Per window (default 1, 5, 15, 30 min, 1, 2, 4 h):

* ``share_unlabelled``: the share of real clicks (after the history) that the window labels
  as non-clicks, with a bootstrap interval over the clicks, next to
  ``share_closed_form``: the same share from the generator's delay distribution
  (:func:`unlabelled_share_closed_form`);
* ``train_ctr_bias``: labelled CTR / real CTR on the training rows;
* the model trained on those labels (the first ``train_hours`` after the history, fresh
  features), evaluated on the next ``eval_hours`` against real clicks: NE, AUC, calibration
  (``ne``), the NE change against the longest window's model (``d_ne_pct``, with a
  bootstrap interval);
* ``ne_calibrated``: the same scores through the project's online calibrator learning the
  same window's labels in event time, each once final at ``t + window``
  (:mod:`ctrstream.study.prequential`). The calibrator learns the labels the join gives, so
  it calibrates to the *labelled* CTR: it cannot undo the bias of a short window, it only
  repairs the model's other miscalibration;
* ``ne_delay_corrected``: the raw scores divided by the labelled share of clicks,
  ``1 - share_closed_form`` (the correction a known delay distribution allows, as in
  Chapelle 2014): what fixes the bias when the delay distribution is known;
* ``rows_not_final_at_end``: rows within one window of the data's end, whose labels are not
  final yet (a pipeline cannot train on its newest ``window`` of traffic).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.simulation.scenarios import Scenario
from ctrstream.study.data import (
    StudyData,
    bootstrap_ne_diff,
    fit,
    labels_within,
    predict,
    quality,
)
from ctrstream.study.prequential import calibrate_prequential
from ctrstream.study.staleness import fresh_dense, span_rows, spans

WINDOWS_S: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
QUICK_WINDOWS_S: tuple[float, ...] = (60.0, 300.0, 1800.0, 14400.0)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def unlabelled_share_closed_form(sc: Scenario, window_s: float) -> float:
    """The share of clicks whose delay exceeds ``window_s``, from the generator's delay
    distribution (``ctrstream.simulation.generator._click_delays_ms``): with probability
    ``1 - late_click_fraction`` a log-normal (median ``click_delay_median_s``, sigma
    ``click_delay_sigma``) truncated below the scenario's attribution window by redrawing;
    otherwise the window plus a log-normal (median ``late_click_extra_median_s``, sigma 1).
    Delays are rounded to whole ms: ``delay_ms > window_ms`` is ``delay > window + 0.5 ms``."""
    if window_s < 0:
        raise ValueError(f"the attribution window must be >= 0 s, got {window_s}")
    a = float(sc.attribution_window_s)
    f = float(sc.late_click_fraction)
    w = float(window_s) + 0.0005
    mu, sigma = math.log(sc.click_delay_median_s), float(sc.click_delay_sigma)
    if w < a:
        cdf_w = _phi((math.log(w) - mu) / sigma)
        cdf_a = _phi((math.log(a) - mu) / sigma)
        return (1.0 - f) * (1.0 - cdf_w / cdf_a) + f
    return f * (1.0 - _phi(math.log(w - a) - math.log(sc.late_click_extra_median_s)))


def unlabelled_share(
    data: StudyData,
    idx: np.ndarray,
    window_ms: int,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float, int]:
    """Among the clicked rows of ``idx``, the share whose click came after ``window_ms``:
    (share, ``1 - alpha`` bootstrap lo, hi, clicks)."""
    d = data.delay_ms[idx]
    late = (d[d >= 0] > int(window_ms)).astype(np.float64)
    n = len(late)
    if n == 0:
        raise ValueError("no clicked rows in the span: the label-delay share is undefined")
    rng = np.random.default_rng(seed)
    boots = late[rng.integers(0, n, (n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(late.mean()), float(lo), float(hi), n


def run(
    data: StudyData,
    *,
    kind: str = "deep",
    seed: int = 0,
    quick: bool = False,
    log: Callable[[str], Any] = print,
    windows_s: tuple[float, ...] | None = None,
    train_hours: float = 24.0,
    eval_hours: float = 24.0,
    calibrate: bool = True,
    n_boot: int | None = None,
    fit_opts: dict | None = None,
) -> dict:
    """Label delay: for each attribution window, the unlabelled share of real clicks (data
    and closed form), the training CTR's bias and the NE of a model trained on those labels,
    raw, online-calibrated and delay-corrected (see the module docstring). ``quick`` keeps
    the windows 1 min, 5 min, 30 min and 4 h and 100 bootstrap resamples."""
    windows = (
        tuple(windows_s) if windows_s is not None else (QUICK_WINDOWS_S if quick else WINDOWS_S)
    )
    if not windows or any(float(w) <= 0 for w in windows):
        raise ValueError(f"windows_s must be positive seconds, got {windows}")
    windows = tuple(sorted(float(w) for w in windows))
    fo = dict(fit_opts or {})  # passed to the training loop (e.g. batch_size for small data)
    n_boot = n_boot or (100 if quick else 200)
    sc = data.scenario
    t_lo, t_mid, t_end = spans(data, train_hours, eval_hours)
    tr, ev = span_rows(data, t_lo, t_mid), span_rows(data, t_mid, t_end)
    after = span_rows(data, t_lo, int(sc.end_ms))
    d_tr, d_ev = fresh_dense(data, t_lo, t_mid), fresh_dense(data, t_mid, t_end)
    y_ev = data.clicked[ev].astype(np.float64)
    real_ctr_tr = float(data.clicked[tr].mean())
    last_t = int(data.t[-1])
    log(
        f"label delay: train {len(tr):,} rows, evaluate {len(ev):,} rows, kind={kind}, "
        f"windows {[f'{w:g}s' for w in windows]}"
    )

    preds: dict[float, np.ndarray] = {}
    rows: list[dict] = []
    for w in windows:
        w_ms = int(round(w * 1000))
        share, s_lo, s_hi, n_clicks = unlabelled_share(data, after, w_ms, n_boot, seed)
        closed = unlabelled_share_closed_form(sc, w)
        y_tr = labels_within(data, w_ms, tr)
        net = fit(kind, data.sparse[tr], d_tr, y_tr, data.t[tr], seed, **fo)
        p = predict(net, data.sparse[ev], d_ev)
        preds[w] = p
        q = quality(p, data, ev)
        row: dict[str, Any] = {
            "window_s": w,
            "share_clicks": n_clicks,
            "share_unlabelled": share,
            "share_lo": s_lo,
            "share_hi": s_hi,
            "share_closed_form": closed,
            "train_ctr_bias": float(y_tr.mean()) / real_ctr_tr,
            "rows_not_final_at_end": int(np.sum(data.t > last_t - w_ms)),
            **q,
        }
        if calibrate:
            labels_ev = labels_within(data, w_ms, ev)
            pc = calibrate_prequential(p, data.t[ev], labels_ev, w_ms)
            qc = quality(pc, data, ev)
            row["ne_calibrated"] = qc["ne"]
            row["calibration_calibrated"] = qc["calibration"]
        p_corr = np.clip(p / max(1.0 - closed, 1e-9), 1e-7, 1 - 1e-7)
        qk = quality(p_corr, data, ev)
        row["ne_delay_corrected"] = qk["ne"]
        row["calibration_delay_corrected"] = qk["calibration"]
        rows.append(row)
        log(
            f"  window {w:>6g}s: unlabelled {share:.4f} [{s_lo:.4f}, {s_hi:.4f}] "
            f"(closed form {closed:.4f}), CTR bias {row['train_ctr_bias']:.3f}, "
            f"NE {q['ne']:.4f} cal {q['calibration']:.3f}"
            + (f", calibrated NE {row['ne_calibrated']:.4f}" if calibrate else "")
            + f", corrected NE {qk['ne']:.4f}"
        )

    ref_w = windows[-1]
    ref_ne = next(r["ne"] for r in rows if r["window_s"] == ref_w)
    for r in rows:
        if r["window_s"] == ref_w:
            r["d_ne_pct"] = r["d_ne_lo_pct"] = r["d_ne_hi_pct"] = 0.0
            continue
        diff, lo, hi = bootstrap_ne_diff(preds[r["window_s"]], preds[ref_w], y_ev, n_boot, seed)
        r["d_ne_pct"] = 100.0 * diff / ref_ne
        r["d_ne_lo_pct"] = 100.0 * lo / ref_ne
        r["d_ne_hi_pct"] = 100.0 * hi / ref_ne

    by_w = {r["window_s"]: r for r in rows}
    headline: dict[str, Any] = {"reference_window_s": ref_w, "ne_reference": ref_ne}
    for w, r in by_w.items():
        tag = f"{w / 60:g}m"
        headline[f"share_unlabelled_{tag}"] = r["share_unlabelled"]
        headline[f"ne_cost_pct_{tag}"] = r["d_ne_pct"]
    system_w = float(sc.attribution_window_s)
    if system_w in by_w:
        r = by_w[system_w]
        headline["system_window_s"] = system_w
        headline["system_share_unlabelled"] = r["share_unlabelled"]
        headline["system_train_ctr_bias"] = r["train_ctr_bias"]
    # the closed form within the bootstrap interval of the data at every window (widened by
    # 3 / clicks, the rule of three, where the share is so small that the bootstrap is [0, 0])
    tol = [
        max(r["share_closed_form"] - r["share_hi"], r["share_lo"] - r["share_closed_form"])
        - 3.0 / r["share_clicks"]
        for r in rows
    ]
    return {
        "sweep": "label_delay",
        "params": {
            "kind": kind,
            "seed": seed,
            "quick": quick,
            "windows_s": list(windows),
            "train_ms": [t_lo, t_mid],
            "eval_ms": [t_mid, t_end],
            "train_rows": int(len(tr)),
            "eval_rows": int(len(ev)),
            "share_rows_ms": [t_lo, int(sc.end_ms)],
            "reference_window_s": ref_w,
            "n_boot": n_boot,
            "calibrated": calibrate,
            "fit_opts": fo,
        },
        "rows": rows,
        "headline": headline,
        "checks": {"closed_form_within_bootstrap": bool(max(tol) <= 0.0)},
    }


def plot(result: dict, path: Path) -> Path:
    """Left: the unlabelled share of clicks (data with its interval, closed form) and the
    training CTR's bias against the window; right: the NE gap to the oracle of the model
    trained at each window, raw, online-calibrated and delay-corrected."""
    from ctrstream.plots import pyplot, save

    plt = pyplot()
    path = Path(path)
    rows = result["rows"]
    x = np.array([r["window_s"] / 60.0 for r in rows])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    share = np.array([r["share_unlabelled"] for r in rows])
    err = np.array([share - [r["share_lo"] for r in rows], [r["share_hi"] for r in rows] - share])
    a.errorbar(x, share, yerr=err, fmt="o", capsize=3, label="real clicks labelled 0 (data)")
    a.plot(x, [r["share_closed_form"] for r in rows], "-", label="closed form (generator)")
    a.plot(x, [1 - r["train_ctr_bias"] for r in rows], "s:", label="1 - labelled CTR / real CTR")
    a.set_xscale("log")
    a.set_xlabel("attribution window (min)")
    a.set_ylabel("share")
    a.set_title("clicks the join misses")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    oracle = np.array([r["oracle_ne"] for r in rows])
    for key, style, label in (
        ("ne", "o-", "raw"),
        ("ne_calibrated", "x--", "online-calibrated (same labels)"),
        ("ne_delay_corrected", "s:", "divided by the labelled share"),
    ):
        if all(key in r for r in rows):
            b.plot(x, 100 * (np.array([r[key] for r in rows]) / oracle - 1), style, label=label)
    b.set_xscale("log")
    b.set_xlabel("attribution window (min)")
    b.set_ylabel("NE gap to the oracle (%)")
    b.set_title(f"model trained on the window's labels ({result['params']['kind']})")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    return save(fig, path)


__all__ = [
    "WINDOWS_S",
    "QUICK_WINDOWS_S",
    "unlabelled_share_closed_form",
    "unlabelled_share",
    "run",
    "plot",
]
