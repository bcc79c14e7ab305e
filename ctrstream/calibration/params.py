"""The served calibration: a parameter dump (JSON) and :func:`apply_params`, numpy only.

The calibration job (:mod:`ctrstream.calibration.job`) checkpoints each model version's
parameter dump; the scorer and the prediction API apply it vectorized, without River
(:class:`ctrstream.calibration.client.CalibratorClient`). The dump::

    {"model_version": str, "method": "platt" | "isotonic", "n_seen": int,
     "platt": {"intercept": float, "w_logit": float, "z_ref": float,
               "context": {"position=0": float, ...}, "context_names": [str, ...],
               "context_mean": {"position": float, ...}},
     "isotonic": {"x": [logit, ...], "p": [probability, ...]}}

Platt: ``sigmoid(intercept + w_logit * (logit(raw) - z_ref) + sum of the context weights of
the row's values)``; a context column that is not given contributes its running mean
(``context_mean``). Isotonic: the row's logit interpolated between the bin centres ``x`` in
logit space.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ctrstream import features as F

EPS = 1e-6  # raw scores are clipped to [EPS, 1 - EPS] before the logit ...
LOGIT_CLIP = 15.0  # ... and logits to [-LOGIT_CLIP, LOGIT_CLIP]

# Platt scaling is learned on the logit centred at the prior's logit: SGD on an uncentred
# feature (logits of CTRs sit near -4) couples slope and intercept badly and overshoots.
Z_REF = float(np.log(F.PRIOR.mean / (1 - F.PRIOR.mean)))

Params = dict[str, Any]  # a parameter dump, as above
Context = Mapping[str, ArrayLike]  # context column name -> one value per row


def logit(p: ArrayLike) -> NDArray[np.float64]:
    """``log(p / (1 - p))``, ``p`` clipped to ``[EPS, 1 - EPS]`` and the result to
    ``[-LOGIT_CLIP, LOGIT_CLIP]``."""
    pc = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.clip(np.log(pc) - np.log1p(-pc), -LOGIT_CLIP, LOGIT_CLIP)


def sigmoid(z: ArrayLike) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def apply_params(
    params: Params | None, raw_scores: ArrayLike, context: Context | None = None
) -> NDArray[np.float64]:
    """Apply a served parameter dump to raw scores (vectorized). ``None`` = identity."""
    raw = np.asarray(raw_scores, dtype=np.float64)
    if not params:
        return raw.copy()
    method = params.get("method", "platt")
    z = logit(raw)
    if method == "isotonic" and params.get("isotonic"):
        iso = params["isotonic"]
        xs, ys = np.asarray(iso["x"]), np.asarray(iso["p"])
        if len(xs) >= 1:
            return sigmoid(np.interp(z, xs, logit(ys)))
    pl = params["platt"]
    out = pl["intercept"] + pl["w_logit"] * (z - pl.get("z_ref", 0.0))
    ctx_w: dict[str, float] = pl.get("context", {})
    names = tuple(pl.get("context_names", ()))
    if names and ctx_w:
        if context:
            add = np.zeros(len(raw))
            for name in names:
                col = context.get(name)
                if col is None:
                    add += pl.get("context_mean", {}).get(name, 0.0)
                    continue
                values = np.asarray(col).astype(str)
                for value in np.unique(values):
                    w = ctx_w.get(f"{name}={value}")
                    if w:
                        add[values == value] += w
            out = out + add
        else:
            out = out + sum(pl.get("context_mean", {}).values())
    return sigmoid(out)


__all__ = ["EPS", "LOGIT_CLIP", "Z_REF", "Context", "Params", "apply_params", "logit", "sigmoid"]
