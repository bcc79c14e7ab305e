"""The statistics of an online experiment, as pure functions of per-user moments.

Randomization unit and ratio metrics (the delta method)
-------------------------------------------------------
Users are randomized, so users - not requests or impressions - are the independent
observations: one user's impressions share the user's taste, their clicks are correlated,
and treating impressions as independent understates the variance (the unit-of-analysis
error of Deng, Knoblich & Lu 2018, "Applying the Delta Method in Metric Analytics"). Every
business metric of an ad system is a ratio of two per-user sums: CTR = clicks /
impressions, revenue per request = revenue / requests, eCPM = 1000 revenue / impressions,
fill rate = filled slots / slots, calibration = predicted clicks / clicks. With per-user
``Y_i`` and ``X_i`` over ``n`` users, the estimate ``M = sum Y / sum X = mean Y / mean X``
has, by the delta method (first-order Taylor expansion of ``f(a, b) = a / b`` around the
means),

    Var(M) ~= (1/n) [ s_YY / mX^2 - 2 mY s_XY / mX^3 + mY^2 s_XX / mX^4 ]

with the sample (co)variances ``s`` over users (:func:`ratio`). Equivalently ``M`` is the
mean of the linearized per-user values ``phi_i = (Y_i - M X_i) / mX`` around ``M``, and
``Var(M) = Var(phi) / n``: the form CUPED adjusts.

The lift (log ratio)
--------------------
A comparison estimates the **log ratio** ``theta = log(M_T / M_C)`` of treatment over
control; the relative lift is ``exp(theta) - 1``. Arms are independent samples of users,
so by the delta method ``Var(theta_hat) = Var(M_T) / M_T^2 + Var(M_C) / M_C^2``
(:func:`log_ratio`). The log scale makes the normal approximation better for a ratio of
positive quantities and its interval maps to an asymmetric lift interval that never goes
below -100 %.

CUPED (Deng, Xu, Kohavi & Walker 2013, "Improving the sensitivity of online controlled
experiments by utilizing pre-experiment data")
--------------------------------------------------------------------------
With a per-user covariate ``Z_i`` measured before the experiment (unaffected by the
treatment), each arm's linearized values are adjusted ``phi_i - theta_cv (Z_i - mean Z)``
with one ``theta_cv = pooled within-arm cov(phi, Z) / pooled within-arm var(Z)`` for both
arms, and the arm's estimate becomes ``M - theta_cv (mean_arm Z - mean_pooled Z)``. Since
``Z`` is independent of the assignment, the adjustment has mean 0 (the estimate stays
unbiased) and the variance shrinks by the factor ``1 - rho^2`` (``rho``: the correlation of
``phi`` and ``Z``) (:func:`cuped`).

Always-valid inference (Johari, Koomen, Pekelis & Walsh 2017, "Peeking at A/B tests: why it
matters, and what to do about it"; Robbins 1970 for the mixture)
--------------------------------------------------------------------------------------
A fixed-horizon z-test looked at repeatedly rejects a true null far more often than alpha.
The mixture sequential probability ratio test (mSPRT) with a normal mixture
``theta ~ N(theta_0, tau^2)`` over the alternative, on an estimate ``theta_hat`` with
variance ``V`` (approximately normal), has the likelihood ratio

    Lambda(theta_0) = sqrt(V / (V + tau^2))
                      * exp(tau^2 (theta_hat - theta_0)^2 / (2 V (V + tau^2)))

a nonnegative martingale under ``theta_0``; by Ville's inequality it exceeds ``1/alpha`` at
**any** look with probability at most alpha. Hence the always-valid p-value
``p_n = min(p_{n-1}, 1 / Lambda_n(0))`` and the confidence sequence
``{theta_0: Lambda_n(theta_0) < 1/alpha}`` = ``theta_hat +- r`` with

    r = sqrt( V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)) )

(:func:`msprt_p`, :func:`msprt_radius`); intersecting the intervals over looks keeps the
coverage (a running intersection of a confidence sequence is one). ``V`` is the plug-in
delta-method variance, as in Johari et al.'s treatment of large-sample tests: the guarantee
is asymptotic, which is why a look counts only once each arm has a minimum of users.

Sample ratio mismatch
---------------------
A chi-square goodness-of-fit test of the users per deciding arm against the design's
weights (:func:`srm`); a small p-value means the split or the logging is broken (Fabijan et
al. 2019, "Diagnosing sample ratio mismatch in online controlled experiments").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

_N = NormalDist()


def norm_ppf(q: float) -> float:
    """The standard normal quantile."""
    return _N.inv_cdf(q)


def norm_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True)
class Moments:
    """Per-user first and second moments of an arm's columns: what every metric needs.

    ``mean[j]`` and ``cov[j, k]`` (sample covariance, ddof 1) of the columns of an
    (n users x m columns) matrix; computed once per arm per look.
    """

    n: int
    mean: NDArray[np.float64]
    cov: NDArray[np.float64]

    @classmethod
    def of(cls, x: NDArray[np.float64]) -> Moments:
        n = int(x.shape[0])
        if n == 0:
            m = x.shape[1]
            return cls(0, np.zeros(m), np.full((m, m), np.nan))
        mean = x.mean(axis=0)
        if n < 2:
            return cls(n, mean, np.full((x.shape[1],) * 2, np.nan))
        xc = x - mean
        return cls(n, mean, (xc.T @ xc) / (n - 1))


@dataclass(frozen=True)
class Ratio:
    """A ratio-of-means estimate with its delta-method variance (and its CUPED form)."""

    value: float
    var: float  # Var(value): Var(phi) / n
    var_phi: float  # the per-user variance of the linearized values
    n: int

    @property
    def se(self) -> float:
        return math.sqrt(self.var) if self.var >= 0 else math.nan


def ratio(m: Moments, y: int, x: int) -> Ratio:
    """``mean(Y) / mean(X)`` over users with its delta-method variance (module doc)."""
    if m.n == 0:
        return Ratio(math.nan, math.nan, math.nan, 0)
    my, mx = float(m.mean[y]), float(m.mean[x])
    if mx <= 0:
        return Ratio(math.nan, math.nan, math.nan, m.n)
    r = my / mx
    syy, sxx, sxy = float(m.cov[y, y]), float(m.cov[x, x]), float(m.cov[x, y])
    var_phi = (syy - 2 * r * sxy + r * r * sxx) / (mx * mx)
    var_phi = max(var_phi, 0.0) if math.isfinite(var_phi) else math.nan
    return Ratio(r, var_phi / m.n, var_phi, m.n)


def cuped(
    arms: list[tuple[Moments, Ratio]], y: int, x: int, z: int
) -> tuple[list[Ratio], float, float]:
    """CUPED-adjusted ratios of several arms with the covariate in column ``z`` (module doc).

    Returns the adjusted ratios (same order), ``theta_cv`` and the pooled variance
    reduction ``1 - Var(phi - theta Z) / Var(phi)`` (0 when the covariate is useless).
    """
    cov_pz = 0.0
    var_z = 0.0
    var_p = 0.0
    total = 0
    z_sum = 0.0
    for m, r in arms:
        if m.n < 2 or not math.isfinite(r.value):
            return [r for _, r in arms], 0.0, 0.0
        mx = float(m.mean[x])
        c = (float(m.cov[y, z]) - r.value * float(m.cov[x, z])) / mx
        w = m.n - 1
        cov_pz += w * c
        var_z += w * float(m.cov[z, z])
        var_p += w * r.var_phi
        total += m.n
        z_sum += m.n * float(m.mean[z])
    if var_z <= 0 or var_p <= 0:
        return [r for _, r in arms], 0.0, 0.0
    theta = cov_pz / var_z
    z_pooled = z_sum / total
    out = []
    for m, r in arms:
        mx = float(m.mean[x])
        c = (float(m.cov[y, z]) - r.value * float(m.cov[x, z])) / mx
        vphi = max(r.var_phi - 2 * theta * c + theta * theta * float(m.cov[z, z]), 0.0)
        value = r.value - theta * (float(m.mean[z]) - z_pooled)
        out.append(Ratio(value, vphi / m.n, vphi, m.n))
    reduction = 1.0 - (var_p - 2 * theta * cov_pz + theta * theta * var_z) / var_p
    return out, theta, reduction


def log_ratio(t: Ratio, c: Ratio) -> tuple[float, float]:
    """``theta_hat = log(M_T / M_C)`` and its delta-method variance (independent arms)."""
    if not (t.value > 0 and c.value > 0):
        return math.nan, math.nan
    return (
        math.log(t.value / c.value),
        t.var / (t.value * t.value) + c.var / (c.value * c.value),
    )


def msprt_p(theta_hat: float, v: float, tau: float, theta0: float = 0.0) -> float:
    """``min(1, 1 / Lambda(theta0))`` of one look (the running minimum is the caller's)."""
    if not (math.isfinite(theta_hat) and math.isfinite(v) and v > 0):
        return 1.0
    t2 = tau * tau
    d = theta_hat - theta0
    log_lambda = 0.5 * math.log(v / (v + t2)) + t2 * d * d / (2 * v * (v + t2))
    return 1.0 if log_lambda <= 0 else math.exp(-log_lambda)


def msprt_radius(v: float, tau: float, alpha: float) -> float:
    """The half-width of the always-valid confidence interval of one look."""
    if not (math.isfinite(v) and v > 0):
        return math.inf
    t2 = tau * tau
    return math.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))


def _gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma Q(a, x) (series below a + 1, Lentz's
    continued fraction above: Numerical Recipes, section 6.2)."""
    if x <= 0:
        return 1.0
    gln = math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - gln))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - gln) * h


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x)."""
    if df < 1:
        raise ValueError(f"chi-square degrees of freedom must be >= 1, got {df}")
    return _gamma_q(df / 2.0, x / 2.0)


def srm(counts: NDArray[np.int64] | list[int], weights: list[float]) -> tuple[float, float]:
    """Chi-square goodness of fit of ``counts`` to the shares ``weights``: (statistic, p)."""
    obs = np.asarray(counts, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if obs.shape != w.shape or obs.size < 2:
        raise ValueError("srm needs one count per weight and at least two arms")
    total = obs.sum()
    if total <= 0:
        return 0.0, 1.0
    expected = total * w / w.sum()
    stat = float((((obs - expected) ** 2) / expected).sum())
    return stat, chi2_sf(stat, obs.size - 1)
