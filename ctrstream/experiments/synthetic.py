"""Synthetic per-user experiment data with a known truth, for checking the analysis.

The closed loop is the real source of :class:`~ctrstream.experiments.analysis.ArmData`;
this module draws the same shape of data from a small generative model in numpy, fast
enough to run thousands of A/A and A/B experiments through
:func:`~ctrstream.experiments.analysis.analyze` (the unit tests' false-positive rate, power
and coverage; the numbers a docs page quotes). The model, per user ``i``:

* an arrival look (users enter over the first ``arrival_share`` of the looks) and a request
  rate ``lambda_i ~ Gamma(2, mean requests_per_look / 2)`` (heavy and light users); requests
  per look ``~ Poisson(lambda_i)`` from the arrival on;
* 1-3 slots per request (``1 + Binomial(2, 0.5)``), each filled with probability ``fill``;
* a user CTR ``c_i ~ Beta`` with mean ``ctr`` and concentration ``ctr_concentration``
  (heterogeneous users: their clicks are correlated, which is why the analysis aggregates
  per user); clicks ``~ Binomial(impressions, c_i (1 + lift))`` in the treatment arm;
* prices per click log-normal, ``exp(N(log price_median + u_i, price_sigma^2))`` with a
  per-user factor ``u_i ~ N(0, user_price_sigma^2)`` (users see different advertisers);
* the truth: ``exp_clicks = impressions * p``, ``exp_revenue = impressions * p * E[price]``;
* a pre-period covariate (what CUPED uses): the user's revenue over ``pre_looks`` looks
  before the start from the same model (0 when ``pre_looks`` is 0);
* ``predicted_clicks``: the truth (a calibrated model).

Users are split by :func:`~ctrstream.experiments.assignment.assign` with the experiment's
salt (the production split). A population lift of ``lift`` on the CTR is a lift of exactly
``lift`` on CTR, revenue per request and eCPM (prices do not depend on the arm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .analysis import ArmData
from .assignment import assign
from .design import Experiment


@dataclass(frozen=True)
class World:
    """The generative model's parameters (see the module doc)."""

    users: int = 2000
    looks: int = 12
    arrival_share: float = 0.5
    requests_per_look: float = 1.5
    fill: float = 0.85
    ctr: float = 0.02
    ctr_concentration: float = 50.0
    price_median: float = 0.5
    price_sigma: float = 0.8
    user_price_sigma: float = 0.3
    pre_looks: int = 0  # 0: no pre-period (the covariate is 0)


@dataclass
class Cohort:
    """Per-user cumulative totals after each look of one simulated experiment (users x
    looks)."""

    user_id: NDArray[np.int64]
    arm: NDArray[np.int64]  # index into exp.deciding_arms
    requests: NDArray[np.float64]
    slots: NDArray[np.float64]
    impressions: NDArray[np.float64]
    clicks: NDArray[np.float64]
    revenue: NDArray[np.float64]
    exp_clicks: NDArray[np.float64]
    exp_revenue: NDArray[np.float64]
    pre: NDArray[np.float64]  # per user

    def at(self, look: int, exp: Experiment, *, cuped: bool = False) -> dict[str, ArmData]:
        """Per arm, the cumulative per-user aggregates after look ``look`` (0-based) of the
        users seen so far (at least one request)."""
        out = {}
        cum = {
            k: getattr(self, k)[:, look]
            for k in (
                "requests",
                "slots",
                "impressions",
                "clicks",
                "revenue",
                "exp_clicks",
                "exp_revenue",
            )
        }
        seen = cum["requests"] > 0
        for j, a in enumerate(exp.deciding_arms):
            m = seen & (self.arm == j)
            n_req = int(cum["requests"][m].sum())
            out[a.name] = ArmData(
                user_id=self.user_id[m],
                requests=cum["requests"][m],
                impressions=cum["impressions"][m],
                clicks=cum["clicks"][m],
                revenue=cum["revenue"][m],
                filled_slots=cum["impressions"][m],
                slots=cum["slots"][m],
                exp_clicks=cum["exp_clicks"][m],
                exp_revenue=cum["exp_revenue"][m],
                predicted_clicks=cum["exp_clicks"][m],
                pre_metric=self.pre[m] if cuped else None,
                latency_ms=np.full(min(n_req, 64), 5.0),
            )
        return out


def simulate(
    exp: Experiment,
    rng: np.random.Generator,
    world: World | None = None,
    lifts: dict[str, float] | None = None,
) -> Cohort:
    """One experiment's users and their per-look activity; ``lifts``: arm name -> the
    relative CTR lift of that arm over the base CTR (absent: 0); ``world``: the model's
    parameters (None: the defaults)."""
    w = World() if world is None else world
    n, k = w.users, w.looks
    user_id = rng.integers(1, 2**62, size=n, dtype=np.int64)
    arm = assign(user_id, exp)
    lift = np.array([(lifts or {}).get(a.name, 0.0) for a in exp.deciding_arms])[arm]
    rate = rng.gamma(2.0, w.requests_per_look / 2.0, size=n)
    a_ = w.ctr * w.ctr_concentration
    ctr = rng.beta(a_, w.ctr_concentration - a_, size=n)
    p = np.minimum(ctr * (1.0 + lift), 1.0)
    mu = np.log(w.price_median) + rng.normal(0.0, w.user_price_sigma, size=n)
    mean_price = np.exp(mu + 0.5 * w.price_sigma**2)
    arrival = rng.integers(0, max(1, int(round(k * w.arrival_share))), size=n)
    active = np.arange(k)[None, :] >= arrival[:, None]

    def period(rate_mask: NDArray[np.bool_], p_: NDArray[np.float64]) -> tuple[np.ndarray, ...]:
        req = rng.poisson(rate[:, None] * rate_mask).astype(np.float64)
        slots = req + rng.binomial((2 * req).astype(np.int64), 0.5)
        imp = rng.binomial(slots.astype(np.int64), w.fill).astype(np.float64)
        clk = rng.binomial(imp.astype(np.int64), p_[:, None]).astype(np.float64)
        flat = clk.ravel().astype(np.int64)
        owner = np.repeat(np.arange(flat.size), flat)
        prices = np.exp(
            np.repeat(np.broadcast_to(mu[:, None], clk.shape).ravel(), flat)
            + rng.normal(0.0, w.price_sigma, size=owner.size)
        )
        rev = np.bincount(owner, weights=prices, minlength=flat.size).reshape(clk.shape)
        return req, slots, imp, clk, rev

    req, slots, imp, clk, rev = period(active, p)
    pre_rev = (
        period(np.ones((n, w.pre_looks), dtype=bool), ctr)[4].sum(axis=1)
        if w.pre_looks
        else np.zeros(n)
    )
    return Cohort(
        user_id=user_id,
        arm=arm,
        requests=req.cumsum(axis=1),
        slots=slots.cumsum(axis=1),
        impressions=imp.cumsum(axis=1),
        clicks=clk.cumsum(axis=1),
        revenue=rev.cumsum(axis=1),
        exp_clicks=imp.cumsum(axis=1) * p[:, None],
        exp_revenue=imp.cumsum(axis=1) * (p * mean_price)[:, None],
        pre=pre_rev,
    )
