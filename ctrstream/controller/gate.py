"""The offline gate: the challenger against the serving champion on the same validation rows,
both against the oracle (pure numbers, no I/O).

Both models score the **same** rows: the last ``val_fraction`` of the challenger's training
window, after every row it was trained on and after every row the champion was trained on
(the champion is older), so neither has seen them. When the rows come from the closed loop
the champion chose what was shown; on those rows its errors are selected (it showed what it
over-estimated, the winner's curse), and the rows say nothing about what it did not show. The
gate therefore evaluates on the **exploration slice** (impressions whose slot or ad the ad
server randomised, the ``explored`` flag of the decision log), each row weighted by
``1 / propensity`` when the propensities are known, when it holds at least ``min_rows`` rows
and ``min_clicks`` clicks, and on every validation row otherwise, and says which (``slice``).
Position is a model input of both, so neither is credited or blamed for the slot it was shown
at. The models' NE, AUC, calibration ratio and gap to the oracle on the slice are
:func:`ctrstream.monitoring.offline.compare`'s (the decay monitor's offline comparison: one
implementation); the gate adds the paired interval and the verdict.

The rule: the challenger fails when it is worse than the champion with confidence - the
lower end of a 95 % paired interval of its NE minus the champion's (per-row log-loss
differences: one set of rows, so the noise of the rows cancels) above ``max_ne_regression``
- or when its calibration ratio (predicted / observed clicks) is outside
``calibration_band``, or when the rows are too few. Near-equals pass: the online experiment
decides between them on the business metric, which the offline rows cannot measure. With the
oracle, the calibration is judged relative to the oracle's own ratio on the same rows (the
truth's ratio is the label noise of a small slice), otherwise as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ctrstream import metrics as M
from ctrstream.monitoring.offline import compare

Z95 = 1.959963984540054


@dataclass(frozen=True)
class GateRule:
    """The thresholds of :func:`offline_gate` (see the module doc)."""

    max_ne_regression: float = 0.005
    calibration_band: tuple[float, float] = (0.8, 1.25)
    min_rows: int = 500
    min_clicks: int = 20

    def validate(self) -> GateRule:
        lo, hi = self.calibration_band
        if not 0 < lo < 1 < hi:
            raise ValueError(
                f"gate: calibration_band {self.calibration_band} must be (lo, hi) with "
                "0 < lo < 1 < hi"
            )
        if self.min_rows < 1 or self.min_clicks < 1:
            raise ValueError("gate: min_rows and min_clicks must be >= 1")
        return self


@dataclass
class GateResult:
    passed: bool
    why: str
    slice: str  # "exploration" or "all"
    rows: int
    clicks: int
    challenger: dict[str, float]
    champion: dict[str, float] | None
    oracle: dict[str, float] | None
    ne_diff: float | None  # challenger - champion
    ne_diff_lo: float | None  # its 95 % paired interval
    ne_diff_hi: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


def _summary(m: dict[str, float]) -> dict[str, float]:
    """One model's numbers of :func:`compare` under the gate's names."""
    return {"ne": m["ne"], "auc": m["auc"], "calibration": m["ratio"], "ne_gap": m["ne_gap"]}


def _row_log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, M.EPS, 1 - M.EPS)
    out: np.ndarray = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    return out


def offline_gate(
    labels: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray | None,
    oracle: np.ndarray | None = None,
    explored: np.ndarray | None = None,
    rule: GateRule | None = None,
    propensity: np.ndarray | None = None,
) -> GateResult:
    """The gate's verdict on one set of validation rows (see the module doc). ``champion``
    None: there is no champion yet, the challenger passes on its own calibration and rows.
    ``explored``: a boolean mask of the exploration slice (None: unknown); ``propensity``:
    each row's probability of being shown where it was (the explored rows are weighted by
    its inverse; None: unweighted)."""
    rule = (rule or GateRule()).validate()
    y_all = np.asarray(labels, dtype=np.float64)
    pc_all = np.asarray(challenger, dtype=np.float64)
    if len(pc_all) != len(y_all) or (champion is not None and len(champion) != len(y_all)):
        raise ValueError("challenger, champion and labels must score the same rows")
    sel = np.ones(len(y_all), dtype=bool)
    slice_ = "all"
    if explored is not None:
        e = np.asarray(explored, dtype=bool)
        if len(e) != len(y_all):
            raise ValueError(f"{len(e)} exploration flags for {len(y_all)} rows")
        if e.sum() >= rule.min_rows and y_all[e].sum() >= rule.min_clicks:
            sel, slice_ = e, "exploration"
    # each row's chance of being shown where it was (1: unweighted), on the judged rows
    chance = np.ones(len(y_all))
    if slice_ == "exploration" and propensity is not None:
        chance = np.asarray(propensity, dtype=np.float64)
        if len(chance) != len(y_all):
            raise ValueError(f"{len(chance)} propensities for {len(y_all)} rows")
    y, pc, prop = y_all[sel], pc_all[sel], chance[sel]
    w = 1.0 / np.where(prop > 0, prop, 1.0)
    pk = None if champion is None else np.asarray(champion, dtype=np.float64)[sel]
    po = None if oracle is None else np.asarray(oracle, dtype=np.float64)[sel]
    n, clicks = int(len(y)), int(y.sum())
    if n < rule.min_rows or clicks < rule.min_clicks:
        return GateResult(
            False,
            f"too few validation rows to judge: {n} rows, {clicks} clicks "
            f"(needs {rule.min_rows} and {rule.min_clicks}); widen the training window",
            slice_,
            n,
            clicks,
            {},
            None,
            None,
            None,
            None,
            None,
        )
    scores = {"challenger": pc}
    scores |= {} if pk is None else {"champion": pk}
    scores |= {} if po is None else {"oracle": po}
    # the judged rows as compare's exploration slice, each weighted 1 / its propensity
    rows = compare(scores, y, explored=np.ones(n, dtype=bool), propensity=prop, reference=po)
    part = rows["exploration"]
    ch = _summary(part["challenger"])
    champ = None if pk is None else _summary(part["champion"])
    orc = None if po is None else _summary(part["oracle"])
    reasons = []
    lo, hi = rule.calibration_band
    cal = ch["calibration"]
    rel = cal / orc["calibration"] if orc is not None and orc["calibration"] > 0 else None
    judged = cal if rel is None else rel
    if not lo <= judged <= hi:
        reasons.append(
            f"challenger calibration {cal:.3f}"
            + ("" if rel is None else f" ({rel:.3f} of the oracle's)")
            + f" outside [{lo}, {hi}]"
        )
    diff = diff_lo = diff_hi = None
    if champ is not None and pk is not None:
        # the paired per-row difference of NE (the same weights as compare's NEs, so its
        # mean is their difference); a weighted mean's standard error, n / (n - 1) corrected
        h = M.entropy(float((w * y).sum() / w.sum()))
        d = (_row_log_loss(pc, y) - _row_log_loss(pk, y)) / h
        diff = float((w * d).sum() / w.sum())
        se = math.sqrt(float((w**2 * (d - diff) ** 2).sum()) * n / (n - 1)) / float(w.sum())
        half = Z95 * se
        diff_lo, diff_hi = diff - half, diff + half
        if diff_lo > rule.max_ne_regression:
            reasons.append(
                f"challenger NE {ch['ne']:.4f} vs champion {champ['ne']:.4f}: worse by "
                f"{diff:+.4f} (95 % paired [{diff_lo:+.4f}, {diff_hi:+.4f}]), beyond the "
                f"tolerated {rule.max_ne_regression}"
            )
    oracle_note = "" if orc is None else f"; oracle NE {orc['ne']:.4f}"
    if reasons:
        return GateResult(
            False,
            "; ".join(reasons) + oracle_note,
            slice_,
            n,
            clicks,
            ch,
            champ,
            orc,
            diff,
            diff_lo,
            diff_hi,
        )
    vs = (
        "no champion"
        if champ is None
        else f"champion NE {champ['ne']:.4f}, difference {diff:+.4f} "
        f"(95 % paired [{diff_lo:+.4f}, {diff_hi:+.4f}])"
    )
    why = (
        f"challenger NE {ch['ne']:.4f} ({vs}){oracle_note}, calibration "
        f"{ch['calibration']:.3f}, on {n} {slice_} rows"
    )
    return GateResult(True, why, slice_, n, clicks, ch, champ, orc, diff, diff_lo, diff_hi)


__all__ = ["GateRule", "GateResult", "offline_gate"]
