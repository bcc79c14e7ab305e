"""Sweep 1 of the freshness study (feature staleness) on small scenarios with known effects.

* stale features at a lag and the batch view alone equal counts computed directly from the
  events visible at that time (a brute-force count, row by row);
* a point of the curve equals the same model fitted and scored directly;
* the same-lag cost of a 1 h lag is positive (its bootstrap interval above 0) where the
  generator has recency effects, and not where it has none.
"""

from __future__ import annotations

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.batch.point_in_time import window_bounds
from ctrstream.simulation.scenarios import load_scenario
from ctrstream.study import staleness as S
from ctrstream.study.data import (
    DAY_MS,
    HOUR_MS,
    dense_at,
    fit,
    labels_within,
    load_study_data,
    predict,
    quality,
)

# a small market with many repeated (user, ad) exposures: strong recency effects
SMALL = dict(
    hours=6.0,
    events=60_000,
    n_users=3_000,
    n_ads=300,
    n_campaigns=60,
    n_advertisers=20,
    n_sites=100,
    seed=3,
)
# the default market's recency effects with stronger fatigue (so that the small LR model's
# interval separates from 0 with a margin); and none at all
RECENCY = dict(fatigue_ad=1.0, fatigue_advertiser=0.5)
NO_RECENCY = dict(fatigue_ad=0.0, fatigue_advertiser=0.0, trend_strength=0.0, heat_logit=0.0)
SPANS = dict(train_hours=2.0, eval_hours=2.0)
FIT = dict(batch_size=256)  # a few hundred steps on a small training set


@pytest.fixture(scope="module")
def recency():
    return load_study_data(load_scenario("steady", **SMALL, **RECENCY), history_hours=2.0)


@pytest.fixture(scope="module")
def flat():
    return load_study_data(load_scenario("steady", **SMALL, **NO_RECENCY), history_hours=2.0)


def _direct_counts(data, rows: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Window counts of ``rows`` counted one row at a time from the raw events: an event
    counts when it has the row's entity id and ``lo <= event time < min(hi, visible)``."""
    imps, clks = data.impressions, data.clicks
    out = np.zeros((len(rows), len(F.ENTITIES), F.N_WINDOWS, 2))
    t_i = imps.column("event_time_ms").to_numpy()
    t_c = clks.column("event_time_ms").to_numpy()
    q = data.impressions.take(rows)
    bounds = window_bounds(q.column("event_time_ms").to_numpy())
    for k, e in enumerate(F.ENTITIES):
        for j in range(len(rows)):
            m_i = np.ones(imps.num_rows, bool)
            m_c = np.ones(clks.num_rows, bool)
            for f in e.fields:
                v = q.column(f)[j].as_py()
                m_i &= imps.column(f).to_numpy() == v
                m_c &= clks.column(f).to_numpy() == v
            for w, (lo, hi) in enumerate(bounds):
                top = min(hi[j], visible[j])
                out[j, k, w, 0] = np.sum(m_i & (t_i >= lo[j]) & (t_i < top))
                out[j, k, w, 1] = np.sum(m_c & (t_c >= lo[j]) & (t_c < top))
    return out


@pytest.mark.parametrize("lag_s", [60.0, 3600.0, None])
def test_stale_features_equal_a_direct_count(recency, lag_s):
    data = recency
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(data.rows_between(data.history_end_ms, data.scenario.end_ms), 25))
    got = S.stale_dense(data, rows, lag_s, batch_every_ms=2 * HOUR_MS)
    t = data.t[rows]
    visible = t - int(lag_s * 1000) if lag_s is not None else (t // (2 * HOUR_MS)) * 2 * HOUR_MS
    want = F.dense_from_counts(_direct_counts(data, rows, visible))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # and it is stale: some window differs from the fresh one
    assert not np.allclose(got, dense_at(data, rows))


def test_batch_cutoff_is_the_last_midnight():
    t = np.array([DAY_MS * 3, DAY_MS * 3 + 1, DAY_MS * 4 - 1])
    assert S.batch_cutoff(t).tolist() == [DAY_MS * 3] * 3
    assert S.batch_cutoff(t, 6 * HOUR_MS).tolist() == [
        DAY_MS * 3,
        DAY_MS * 3,
        DAY_MS * 3 + 18 * HOUR_MS,
    ]
    with pytest.raises(ValueError, match="positive"):
        S.batch_cutoff(t, 0)


def test_point_names():
    assert [S.point_name(x) for x in (0, 10, 60, 300, 3600, 90, None)] == [
        "0s",
        "10s",
        "1m",
        "5m",
        "1h",
        "90s",
        "batch",
    ]


def _run(data, **kw):
    return S.run(
        data,
        kind="lr",
        lags_s=(0.0, 3600.0),
        batch=False,
        calibrate=False,
        log=lambda s: None,
        fit_opts=FIT,
        **SPANS,
        **kw,
    )


@pytest.fixture(scope="module")
def runs(recency, flat):
    return {"recency": _run(recency), "flat": _run(flat)}


def _row(result, variant, staleness):
    return next(
        r for r in result["rows"] if r["variant"] == variant and r["staleness"] == staleness
    )


def test_same_lag_staleness_hurts_only_with_recency_effects(runs):
    hot = _row(runs["recency"], "same_lag", "1h")
    cold = _row(runs["flat"], "same_lag", "1h")
    # recency effects: an hour of lag costs NE, the bootstrap interval is above 0
    assert hot["d_ne_lo_pct"] > 0, hot
    # none: not significantly positive, and below the recency interval
    assert cold["d_ne_lo_pct"] <= 0, cold
    assert cold["d_ne_hi_pct"] < hot["d_ne_lo_pct"], (cold, hot)


def test_a_point_equals_a_direct_computation(recency, runs):
    data, res = recency, runs["recency"]
    lo, mid, end = S.spans(data, **SPANS)
    tr, ev = data.rows_between(lo, mid), data.rows_between(mid, end)
    y = labels_within(data, int(data.scenario.attribution_window_s * 1000), tr)
    # lag 0: the fresh model on fresh features
    net0 = fit("lr", data.sparse[tr], dense_at(data, tr), y, data.t[tr], 0, **FIT)
    p0 = predict(net0, data.sparse[ev], dense_at(data, ev))
    q0 = quality(p0, data, ev)
    for variant in S.VARIANTS:
        assert _row(res, variant, "0s")["ne"] == pytest.approx(q0["ne"], rel=1e-9)
    # lag 1 h, same lag: a model trained and scored on windows visible until t - 1 h
    lag = HOUR_MS
    net = fit("lr", data.sparse[tr], dense_at(data, tr, data.t[tr] - lag), y, data.t[tr], 0, **FIT)
    d_ev = dense_at(data, ev, data.t[ev] - lag)
    q = quality(predict(net, data.sparse[ev], d_ev), data, ev)
    row = _row(res, "same_lag", "1h")
    assert row["ne"] == pytest.approx(q["ne"], rel=1e-9)
    assert row["auc"] == pytest.approx(q["auc"], rel=1e-9)
    assert row["d_ne_pct"] == pytest.approx(100 * (q["ne"] / q0["ne"] - 1), rel=1e-6)
    # skew: the fresh model on the stale windows
    qs = quality(predict(net0, data.sparse[ev], d_ev), data, ev)
    assert _row(res, "skew", "1h")["ne"] == pytest.approx(qs["ne"], rel=1e-9)


def test_result_is_the_sweep_contract(runs):
    res = runs["recency"]
    assert res["sweep"] == "staleness"
    assert {"params", "rows", "headline", "checks"} <= set(res)
    assert all(res["checks"].values())
    assert "same_lag_ne_cost_pct_1h" in res["headline"]
    import json

    json.dumps(res)  # JSON-able


def test_bad_input_is_refused(recency):
    with pytest.raises(ValueError, match="start with 0"):
        S.run(recency, kind="lr", lags_s=(60.0,), log=lambda s: None, **SPANS)
    with pytest.raises(ValueError, match="no room"):
        S.run(recency, kind="lr", train_hours=24.0, log=lambda s: None)
