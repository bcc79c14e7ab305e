"""Model quality against the ground truth.

``evaluate(probs, labels, oracle_probs)`` reports, on the same examples, each metric for
the model and for the oracle's true click probabilities (the Bayes-optimal ceiling). The
metrics are :mod:`ctrstream.metrics`' (one definition for the evaluation, the live
calibrator and the demo's report); a model's entry carries

* ``log_loss``, ``ne`` (normalized entropy, 1.0 = no better than a constant), ``auc``;
* ``mean_pred`` / ``observed_ctr`` / ``calibration`` (= mean_pred / observed_ctr, 1.0 ideal);
* ``ece`` - expected calibration error over the equal-mass bins of the prediction
  (``ctrstream.metrics.reliability``, 20 bins unless ``n_bins`` says otherwise).

Plus ``ne_gap`` = model NE / oracle NE - 1 (0.03 = within 3% of the ceiling).
``reliability_diagram`` draws observed vs predicted CTR per bin (PNG, matplotlib Agg);
``write_model_card`` writes the JSON card with the training window and
``features.fingerprint()``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream import features
from ctrstream import metrics as M


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def metrics(probs, labels, n_bins: int = M.N_BINS) -> dict:
    """The model card's metrics of ``probs`` against ``labels`` (``ctrstream.metrics.summary``
    under the card's names: the calibration ratio is ``calibration``)."""
    s = M.summary(probs, labels, n_bins)
    return dict(
        log_loss=s["log_loss"],
        ne=s["ne"],
        auc=s["auc"],
        mean_pred=s["mean_pred"],
        observed_ctr=s["observed_ctr"],
        calibration=s["ratio"],
        ece=s["ece"],
    )


def evaluate(probs, labels, oracle_probs=None, n_bins: int = M.N_BINS) -> dict:
    """Metrics of ``probs`` and (when given) of ``oracle_probs`` on the same labeled rows.

    Returns ``{"n", "clicks", "model": {...}, "oracle": {...} | None, "ne_gap", "bins"}``.
    """
    p, y = _arr(probs), _arr(labels)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    if len(y) == 0:
        raise ValueError("nothing to evaluate: no rows")
    out: dict[str, Any] = dict(
        n=int(len(y)),
        clicks=int(y.sum()),
        model=metrics(p, y, n_bins),
        oracle=None,
        ne_gap=None,
        bins=dict(model=M.reliability(p, y, n_bins)),
    )
    if oracle_probs is not None:
        o = _arr(oracle_probs)
        if len(o) != len(y):
            raise ValueError(f"{len(o)} oracle probabilities for {len(y)} labels")
        out["oracle"] = metrics(o, y, n_bins)
        out["ne_gap"] = out["model"]["ne"] / out["oracle"]["ne"] - 1.0
        out["bins"]["oracle"] = M.reliability(o, y, n_bins)
    return out


def reliability_diagram(
    path: str | Path,
    curves: dict[str, np.ndarray],
    labels,
    title: str = "reliability",
    n_bins: int = M.N_BINS,
) -> Path:
    """PNG: observed CTR vs mean prediction per equal-mass bin, one curve per entry of
    ``curves`` (name -> probabilities), log-log axes, with prediction histograms below."""
    from ctrstream.plots import pyplot

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    y = _arr(labels)
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(6.5, 8), height_ratios=[3, 1.2])
    lo, hi = 1.0, 0.0
    for name, probs in curves.items():
        p = _arr(probs)
        b = M.reliability(p, y, n_bins)
        mp, oc = np.array(b["mean_pred"]), np.array(b["observed_ctr"])
        m = metrics(p, y, n_bins)
        ax.plot(
            mp,
            np.maximum(oc, 1e-5),
            "o-",
            ms=4,
            label=f"{name}  NE {m['ne']:.4f}  AUC {m['auc']:.4f}  ECE {m['ece']:.4f}",
        )
        lo, hi = min(lo, mp.min()), max(hi, mp.max())
        axh.hist(np.clip(p, 1e-5, 1), bins=np.logspace(-5, 0, 60), histtype="step", label=name)
    lo, hi = max(lo * 0.7, 1e-5), min(hi * 1.4, 1.0)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect calibration")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="mean predicted CTR (bin)",
        ylabel="observed CTR (bin)",
        title=f"{title}  (n={len(y):,}, CTR {y.mean():.4f})",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    axh.set(xscale="log", xlabel="predicted CTR", ylabel="rows")
    axh.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return None  # arrays (val_index, val_probs ...) stay out of the card
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_model_card(
    path: str | Path,
    *,
    name: str,
    evaluation: dict,
    info: dict | None = None,
    training_window_ms: tuple[int, int] | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the model card (JSON) and return it.

    The card carries the model name, the training window (event time, ms), the feature
    declaration fingerprint, the training info (hyper-parameters, split, timings; arrays
    dropped) and the evaluation (model vs oracle)."""
    info = {k: v for k, v in (info or {}).items() if not isinstance(v, np.ndarray)}
    window = training_window_ms or info.get("train_window_ms")
    card = dict(
        name=name,
        created_ms=int(time.time() * 1000),
        feature_fingerprint=features.fingerprint(),
        io=dict(
            inputs={
                features.INPUT_SPARSE: ["INT64", [-1, features.N_SPARSE]],
                features.INPUT_DENSE: ["FP32", [-1, features.N_DENSE]],
            },
            outputs={features.OUTPUT_PROB: ["FP32", [-1, 1]]},
        ),
        training_window_ms=list(window) if window else None,
        validation_window_ms=info.get("val_window_ms"),
        training=info,
        evaluation=evaluation,
        **(extra or {}),
    )
    card = _jsonable(card)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, sort_keys=False))
    return card


def format_table(rows: dict[str, dict]) -> list[list[str]]:
    """Rows for a printed comparison table: name -> metrics dict."""
    out = []
    for name, m in rows.items():
        out.append(
            [
                name,
                f"{m['log_loss']:.5f}",
                f"{m['ne']:.4f}",
                f"{m['auc']:.4f}",
                f"{m['mean_pred']:.5f}",
                f"{m['observed_ctr']:.5f}",
                f"{m['calibration']:.3f}",
                f"{m['ece']:.5f}",
            ]
        )
    return out


TABLE_HEADER = ["model", "log loss", "NE", "AUC", "mean pred", "observed CTR", "calib", "ECE"]

__all__ = [
    "TABLE_HEADER",
    "evaluate",
    "format_table",
    "metrics",
    "reliability_diagram",
    "write_model_card",
]
