"""Challenger against champion on the same rows, fairly: the exploration slice.

The closed loop's training data is chosen by the champion: it ranked the candidates, so the
ads it likes are shown (and labelled) far more often than the ones it does not, and the top
slots - which get more clicks for being on top - went to its favourites. Evaluated on such
rows, a model that agrees with the champion looks good for agreeing. Two things undo most of
it (``docs/monitoring-decay.md``):

* **position is a feature.** Every model is trained with the slot it was shown in
  (``ctrstream.features.SPARSE_FIELDS`` has ``position``), ranks candidates at the reference
  position 0 and is scored at the logged slot; so the slot's own effect is learned apart
  from the ad's, and is not credited to whatever the champion put on top;
* **the exploration slice.** In an explored request (``ctrstream.serving.auction``: a share
  of requests) the winners' order over the slots is a uniform permutation and one slot may go
  to a new ad the champion did not pick, each row logged with ``explored`` and its
  ``propensity`` (the probability of that candidate in that slot given the branch). On those
  rows the slot does not depend on the champion's score, and weighting each row by
  ``1 / propensity`` (normalized) undoes the unequal chances that remain (new ads).

:func:`compare` scores every model on the same labelled rows - all of them, and the
exploration slice, weighted - next to the reference (the oracle, when there is one) on the
same rows, so that the gate compares gaps on one slice and not raw NEs on rows the champion
chose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ctrstream import metrics as M


def weighted_ne(p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None) -> float:
    """NE with row weights: weighted log loss / entropy of the weighted CTR (``nan`` without
    both a click and a non-click of positive weight).

    >>> p, y = [0.2, 0.2, 0.8], [0, 0, 1]
    >>> round(weighted_ne(p, y), 6) == round(M.normalized_entropy(p, y), 6)
    True
    >>> round(weighted_ne(p, y, [1, 1, 2]), 6) == round(M.normalized_entropy(p + [0.8], y + [1]), 6)
    True
    """
    pa = np.clip(np.asarray(p, dtype=np.float64), M.EPS, 1 - M.EPS)
    ya = np.asarray(y, dtype=np.float64)
    wa = np.ones(len(pa)) if w is None else np.asarray(w, dtype=np.float64)
    if not (len(pa) == len(ya) == len(wa)):
        raise ValueError("weighted_ne needs one prediction, label and weight per row")
    if len(pa) == 0 or wa.sum() <= 0:
        return math.nan
    ctr = float((wa * ya).sum() / wa.sum())
    if ctr <= 0.0 or ctr >= 1.0:
        return math.nan
    ll = float((wa * -(ya * np.log(pa) + (1 - ya) * np.log1p(-pa))).sum() / wa.sum())
    return ll / M.entropy(ctr)


def compare(
    scores: Mapping[str, ArrayLike],
    y: ArrayLike,
    *,
    explored: ArrayLike | None = None,
    propensity: ArrayLike | None = None,
    reference: ArrayLike | None = None,
) -> dict[str, Any]:
    """Every model of ``scores`` (name -> its probability per row, scored at the logged slot)
    on the same rows: ``all`` the rows and the ``exploration`` slice (rows with ``explored``,
    weighted ``1 / propensity``), each with ``ne``, ``auc`` (unweighted), ``ratio`` and, with
    a ``reference``, ``ne_gap`` = NE / reference NE - 1 on the same rows and weights.

    >>> r = compare({"a": [0.1, 0.1, 0.9, 0.9]}, [0, 0, 1, 1], explored=[1, 0, 1, 0],
    ...             propensity=[0.5, 1, 0.5, 1], reference=[0.1, 0.1, 0.9, 0.9])
    >>> r["rows"], r["exploration_rows"], round(r["exploration"]["a"]["ne_gap"], 6)
    (4, 2, 0.0)
    """
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    n = len(ya)
    ex = np.zeros(n, dtype=bool) if explored is None else np.asarray(explored, dtype=bool)
    prop = np.ones(n) if propensity is None else np.asarray(propensity, dtype=np.float64)
    if len(ex) != n or len(prop) != n:
        raise ValueError("explored and propensity need one value per row")
    if np.any(prop[ex] <= 0) or np.any(prop[ex] > 1):
        raise ValueError("propensities of explored rows must be in (0, 1]")
    ref = None if reference is None else np.asarray(reference, dtype=np.float64)
    w_ex = np.where(ex, 1.0 / np.where(prop > 0, prop, 1.0), 0.0)

    def part(mask: np.ndarray, w: np.ndarray) -> dict[str, dict[str, float]]:
        out = {}
        ref_ne = weighted_ne(ref[mask], ya[mask], w[mask]) if ref is not None else math.nan
        for name, s in scores.items():
            pa = np.asarray(s, dtype=np.float64).reshape(-1)
            if len(pa) != n:
                raise ValueError(f"{name}: {len(pa)} scores for {n} labels")
            ne = weighted_ne(pa[mask], ya[mask], w[mask])
            wm = w[mask]
            out[name] = {
                "ne": ne,
                "auc": M.auc(pa[mask], ya[mask]) if mask.any() else math.nan,
                "ratio": (
                    float((wm * pa[mask]).sum() / (wm * ya[mask]).sum())
                    if mask.any() and (wm * ya[mask]).sum() > 0
                    else math.nan
                ),
                "ne_gap": ne / ref_ne - 1.0 if ref is not None else math.nan,
            }
        return out

    return {
        "rows": n,
        "exploration_rows": int(ex.sum()),
        "all": part(np.ones(n, dtype=bool), np.ones(n)),
        "exploration": part(ex, w_ex),
    }


__all__ = ["compare", "weighted_ne"]
