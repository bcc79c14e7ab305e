"""Click-prediction metrics: one definition of each, used by every caller.

The batch evaluation (:mod:`ctrstream.models.evaluation`), the live calibrator's rolling
metrics (:mod:`ctrstream.calibration.calibrator`, the ``ctrstream_calibration_*`` gauges)
and the demo's report all compute their numbers here, so a number means the same thing in
the model card, in Prometheus and in ``report.html``. numpy only.

``p`` is a predicted click probability per row, ``y`` the label per row (1 clicked, 0 not).

* :func:`log_loss` - mean negative log-likelihood, predictions clipped to
  ``[EPS, 1 - EPS]`` (``EPS = 1e-7``) so that a confident mistake costs a finite amount;
* :func:`normalized_entropy` (NE) - log loss / :func:`entropy` of the observed CTR (the log
  loss of always predicting the observed CTR): 1.0 is no better than a constant, lower is
  better;
* :func:`auc` - ROC AUC by the rank-sum formula, tied predictions get average ranks (half
  credit), as ``sklearn.metrics.roc_auc_score``;
* :func:`calibration_ratio` - mean prediction / observed CTR (1.0 ideal);
* :func:`reliability` and :func:`ece` - per-bin mean prediction and observed CTR, and the
  expected calibration error ``sum_b (n_b / n) |mean_pred_b - ctr_b|``, over the bins below;
* :func:`summary` - all of the above in one dict.

The bins (one definition, everywhere)
-------------------------------------
**Equal-mass bins of the prediction**, ``n_bins`` of them (default :data:`N_BINS` = 20): the
inner edges are the ``k / n_bins`` quantiles of ``p`` (``numpy.quantile``, linear
interpolation), duplicates removed, and a row goes to the bin of the edges it lies between,
a row equal to an edge to the bin above it (``searchsorted(..., side="right")``). Equal
predictions therefore always share a bin (there may be fewer than ``n_bins``), and empty
bins are dropped. Equal-mass rather than equal-width: CTR predictions sit in a narrow band
near 0, equal-width bins would put nearly every row in the first one.
``sklearn.calibration.calibration_curve(strategy="quantile")`` uses the same edges and
differs only for a row exactly on an inner edge (it goes to the bin below there).

Degenerate inputs give ``nan`` rather than an error: no rows (every metric), labels of one
class only (AUC and NE are undefined), no clicks (the calibration ratio).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

EPS = 1e-7  # predictions are clipped to [EPS, 1 - EPS] in the log loss
N_BINS = 20  # equal-mass bins of the prediction in the ECE and the reliability bins

Floats = NDArray[np.float64]


def _arrays(p: ArrayLike, y: ArrayLike) -> tuple[Floats, Floats]:
    """``p`` and ``y`` as flat float64 arrays, checked: same length, ``p`` in [0, 1],
    ``y`` 0 or 1."""
    pa = np.asarray(p, dtype=np.float64).reshape(-1)
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(pa) != len(ya):
        raise ValueError(
            f"{len(pa)} predictions for {len(ya)} labels: pass one prediction per label"
        )
    if len(pa) and not (np.all(pa >= 0.0) and np.all(pa <= 1.0)):  # NaN fails both
        bad = pa[~((pa >= 0.0) & (pa <= 1.0))][:3].tolist()
        raise ValueError(
            f"predictions must be probabilities in [0, 1]; got {bad}: pass "
            "probabilities, not logits, and no NaN"
        )
    if len(ya) and not np.all((ya == 0.0) | (ya == 1.0)):
        bad = ya[(ya != 0.0) & (ya != 1.0)][:3].tolist()
        raise ValueError(f"labels must be 0 or 1; got {bad}")
    return pa, ya


def log_loss(p: ArrayLike, y: ArrayLike) -> float:
    """Mean negative log-likelihood of ``y`` under ``p`` (clipped to ``[EPS, 1 - EPS]``)."""
    return _log_loss(*_arrays(p, y))


def entropy(ctr: float) -> float:
    """Entropy (nats) of a click with probability ``ctr`` (clipped to ``[EPS, 1 - EPS]``):
    the log loss of always predicting ``ctr`` when ``ctr`` is the observed rate."""
    c = min(max(float(ctr), EPS), 1 - EPS)
    return float(-(c * np.log(c) + (1 - c) * np.log1p(-c)))


def normalized_entropy(p: ArrayLike, y: ArrayLike) -> float:
    """NE: :func:`log_loss` / :func:`entropy` of the observed CTR; ``nan`` without both a
    click and a non-click (the observed CTR's entropy is 0 then)."""
    return _ne(*_arrays(p, y))


def auc(p: ArrayLike, y: ArrayLike) -> float:
    """ROC AUC: the probability that a random click is scored above a random non-click, ties
    counting one half (average ranks); ``nan`` when ``y`` holds one class only."""
    return _auc(*_arrays(p, y))


def calibration_ratio(p: ArrayLike, y: ArrayLike) -> float:
    """Mean prediction / observed CTR (1.0: calibrated in the mean); ``nan`` without clicks."""
    return _ratio(*_arrays(p, y))


def bin_edges(p: ArrayLike, n_bins: int = N_BINS) -> Floats:
    """The inner edges of the equal-mass bins of ``p`` (see the module's docstring)."""
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    pa = np.asarray(p, dtype=np.float64).reshape(-1)
    if len(pa) == 0:
        return np.zeros(0)
    return np.unique(np.quantile(pa, np.linspace(0, 1, int(n_bins) + 1)[1:-1]))


def reliability(p: ArrayLike, y: ArrayLike, n_bins: int = N_BINS) -> dict[str, list[Any]]:
    """Per non-empty equal-mass bin of ``p``, lowest first: ``mean_pred`` (mean prediction),
    ``observed_ctr`` (mean label) and ``count`` (rows)."""
    return _reliability(*_arrays(p, y), n_bins)


def ece_of_bins(bins: dict[str, list[Any]]) -> float:
    """ECE of :func:`reliability`'s bins: ``sum_b (n_b / n) |mean_pred_b - ctr_b|``."""
    n = sum(bins["count"])
    if n == 0:
        return math.nan
    return float(
        sum(
            c / n * abs(m - o)
            for m, o, c in zip(bins["mean_pred"], bins["observed_ctr"], bins["count"])
        )
    )


def ece(p: ArrayLike, y: ArrayLike, n_bins: int = N_BINS) -> float:
    """Expected calibration error over the equal-mass bins of ``p``; ``nan`` without rows."""
    return ece_of_bins(reliability(p, y, n_bins))


def summary(p: ArrayLike, y: ArrayLike, n_bins: int = N_BINS) -> dict[str, Any]:
    """Every metric of ``p`` against ``y``: ``n``, ``log_loss``, ``ne``, ``auc``,
    ``mean_pred``, ``observed_ctr``, ``ratio`` (:func:`calibration_ratio`) and ``ece``.

    >>> s = summary([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], n_bins=2)
    >>> s["n"], s["auc"], s["ratio"], round(s["ece"], 6)
    (4, 1.0, 0.5, 0.4)
    """
    pa, ya = _arrays(p, y)
    if len(pa) == 0:
        return {
            "n": 0,
            "log_loss": math.nan,
            "ne": math.nan,
            "auc": math.nan,
            "mean_pred": math.nan,
            "observed_ctr": math.nan,
            "ratio": math.nan,
            "ece": math.nan,
        }
    return {
        "n": len(pa),
        "log_loss": _log_loss(pa, ya),
        "ne": _ne(pa, ya),
        "auc": _auc(pa, ya),
        "mean_pred": float(pa.mean()),
        "observed_ctr": float(ya.mean()),
        "ratio": _ratio(pa, ya),
        "ece": ece_of_bins(_reliability(pa, ya, n_bins)),
    }


# --------------------------------------------------------------------------- the kernels
# (on checked float64 arrays: the public functions above check their inputs once)


def _log_loss(p: Floats, y: Floats) -> float:
    if len(p) == 0:
        return math.nan
    pc = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(pc) + (1 - y) * np.log1p(-pc)))


def _ne(p: Floats, y: Floats) -> float:
    if len(y) == 0:
        return math.nan
    ctr = float(y.mean())
    if ctr in (0.0, 1.0):
        return math.nan
    return _log_loss(p, y) / entropy(ctr)


def _auc(p: Floats, y: Floats) -> float:
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average rank of each run of ties
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]
    ends = np.r_[starts[1:], len(ps)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(p: Floats, y: Floats) -> float:
    if len(p) == 0:
        return math.nan
    obs = float(y.mean())
    return float(p.mean()) / obs if obs > 0 else math.nan


def _reliability(p: Floats, y: Floats, n_bins: int) -> dict[str, list[Any]]:
    edges = bin_edges(p, n_bins)
    if len(p) == 0:
        return {"mean_pred": [], "observed_ctr": [], "count": []}
    b = np.searchsorted(edges, p, side="right")
    cnt = np.bincount(b, minlength=len(edges) + 1)
    sp = np.bincount(b, weights=p, minlength=len(edges) + 1)
    sy = np.bincount(b, weights=y, minlength=len(edges) + 1)
    nz = cnt > 0
    return {
        "mean_pred": (sp[nz] / cnt[nz]).tolist(),
        "observed_ctr": (sy[nz] / cnt[nz]).tolist(),
        "count": cnt[nz].astype(int).tolist(),
    }


__all__ = [
    "EPS",
    "N_BINS",
    "auc",
    "bin_edges",
    "calibration_ratio",
    "ece",
    "ece_of_bins",
    "entropy",
    "log_loss",
    "normalized_entropy",
    "reliability",
    "summary",
]
