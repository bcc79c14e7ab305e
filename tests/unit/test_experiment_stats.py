"""The experiment statistics against simulations and references (ctrstream.experiments.stats).

The per-user data are drawn as an ad system's users are: Poisson requests, 1-3 impressions
per request, clicks at ~2 % CTR with a user-level CTR drawn from a Beta (correlated clicks
within a user), log-normal prices.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats as sps

from ctrstream.experiments import Arm, Experiment, analyze, stats
from ctrstream.experiments.synthetic import World, simulate


def users(rng: np.random.Generator, reps: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(impressions, clicks), each (reps x n users)."""
    req = rng.poisson(rng.gamma(2.0, 5.0, size=(reps, n)))
    imp = req + rng.binomial(2 * req, 0.5)
    ctr = rng.beta(1.0, 49.0, size=(reps, n))
    return imp.astype(float), rng.binomial(imp, ctr).astype(float)


def test_delta_method_variance_matches_a_simulation() -> None:
    """The delta-method variance of CTR = sum clicks / sum impressions over users agrees with
    the variance of the estimate across 2,000 simulated arms within 12 % (the empirical
    variance itself has ~3 % relative standard error at 2,000 replications); the naive
    per-impression binomial variance, which ignores the user-level correlation, is off by
    more than that."""
    rng = np.random.default_rng(11)
    imp, clk = users(rng, 2000, 400)
    est, var, naive = [], [], []
    for i in range(imp.shape[0]):
        m = stats.Moments.of(np.column_stack([clk[i], imp[i]]))
        r = stats.ratio(m, 0, 1)
        est.append(r.value)
        var.append(r.var)
        naive.append(r.value * (1 - r.value) / imp[i].sum())
    empirical = float(np.var(est, ddof=1))
    assert float(np.mean(var)) / empirical == pytest.approx(1.0, abs=0.12)
    assert float(np.mean(naive)) / empirical < 0.85


def test_log_ratio_variance_matches_a_simulation() -> None:
    rng = np.random.default_rng(12)
    it, ct = users(rng, 2000, 300)
    ic, cc = users(rng, 2000, 300)
    theta, var = [], []
    for i in range(it.shape[0]):
        rt = stats.ratio(stats.Moments.of(np.column_stack([ct[i], it[i]])), 0, 1)
        rc = stats.ratio(stats.Moments.of(np.column_stack([cc[i], ic[i]])), 0, 1)
        t, v = stats.log_ratio(rt, rc)
        theta.append(t)
        var.append(v)
    assert abs(float(np.mean(theta))) < 3 * math.sqrt(float(np.mean(var)) / len(theta))
    assert float(np.mean(var)) / float(np.var(theta, ddof=1)) == pytest.approx(1.0, abs=0.12)


def test_cuped_reduces_variance_and_stays_unbiased() -> None:
    """200 A/B experiments with a 10 % true lift, analysed by the production path with and
    without the pre-period covariate: CUPED's standard error is smaller in every run, the
    spread of its estimates across runs is smaller, and the mean of its estimates is the
    true lift (within 3 standard errors of that mean)."""
    exp = Experiment(
        name="cuped",
        salt="s",
        arms=(Arm("a", "prior", 0.5), Arm("b", "prior", 0.5)),
        control="a",
        primary_metric="ctr",
        min_run_s=0,
    )
    world = World(users=3000, looks=4, ctr_concentration=8.0, pre_looks=12)
    rng = np.random.default_rng(5)
    raw, adj, reductions = [], [], []
    for r in range(200):
        e = replace(exp, salt=f"s{r}")
        cohort = simulate(e, rng, world, {"b": 0.10})
        last = world.looks - 1
        c0 = analyze(e, cohort.at(last, e), elapsed_s=1.0).comparison("b", "ctr")
        c1 = analyze(e, cohort.at(last, e, cuped=True), elapsed_s=1.0).comparison("b", "ctr")
        assert c1.cuped and not c0.cuped
        assert c1.hi - c1.lo < c0.hi - c0.lo
        raw.append(math.log1p(c0.lift))
        adj.append(math.log1p(c1.lift))
        reductions.append(c1.variance_reduction)
    print(f"CUPED: mean variance reduction {np.mean(reductions):.1%}")
    assert np.mean(reductions) > 0.2
    assert np.var(adj) < np.var(raw)
    se = float(np.std(adj, ddof=1)) / math.sqrt(len(adj))
    assert abs(float(np.mean(adj)) - math.log(1.10)) < 3 * se + 0.005


def test_msprt_p_value_and_interval_agree() -> None:
    """The interval's edge is exactly where 1 / Lambda = alpha; p falls as the estimate
    moves away from 0; no data (infinite variance) gives p = 1 and an unbounded interval."""
    v, tau, alpha = 0.004, 0.1, 0.05
    r = stats.msprt_radius(v, tau, alpha)
    assert stats.msprt_p(r, v, tau) == pytest.approx(alpha, rel=1e-9)
    assert stats.msprt_p(0.3 + r, v, tau, theta0=0.3) == pytest.approx(alpha, rel=1e-9)
    ps = [stats.msprt_p(t, v, tau) for t in (0.0, 0.05, 0.1, 0.2, 0.3)]
    assert ps == sorted(ps, reverse=True) and ps[0] == 1.0
    assert stats.msprt_p(0.1, math.nan, tau) == 1.0
    assert stats.msprt_radius(0.0, tau, alpha) == math.inf


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7])
def test_chi_square_tail_matches_scipy(df: int) -> None:
    for x in (0.0, 0.01, 0.5, 1.0, 3.84, 10.0, 32.0, 80.0):
        assert stats.chi2_sf(x, df) == pytest.approx(sps.chi2.sf(x, df), rel=1e-9, abs=1e-300)


def test_srm_statistic() -> None:
    chi2, p = stats.srm([10_400, 9_600], [0.5, 0.5])
    assert chi2 == pytest.approx(32.0)
    assert p == pytest.approx(sps.chi2.sf(32.0, 1), rel=1e-9)
    assert stats.srm([0, 0], [0.5, 0.5]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="one count per weight"):
        stats.srm([1, 2, 3], [0.5, 0.5])
