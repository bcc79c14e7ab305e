"""Sweep 3 of the freshness study (label delay) on a small scenario.

* the share of real clicks a window labels as non-clicks equals the generator's delay
  distribution in closed form at every window, within a bootstrap interval of the clicks;
* the sweep's shares and training-CTR bias equal a direct count;
* the prequential calibrator never sees a label before it is final.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctrstream.simulation.scenarios import load_scenario
from ctrstream.study import label_delay as L
from ctrstream.study.data import load_study_data
from ctrstream.study.prequential import calibrate_prequential

# a high CTR for many clicks in little traffic (the shares' intervals are then narrow)
SMALL = dict(
    hours=6.0,
    events=100_000,
    base_ctr=0.15,
    n_users=5_000,
    n_ads=300,
    n_campaigns=60,
    n_advertisers=20,
    n_sites=100,
    seed=5,
)
SPANS = dict(train_hours=2.0, eval_hours=2.0)
FIT = dict(batch_size=256)  # a few hundred steps on a small training set


@pytest.fixture(scope="module")
def data():
    return load_study_data(load_scenario("steady", **SMALL), history_hours=2.0)


@pytest.fixture(scope="module")
def result(data):
    return L.run(
        data,
        kind="lr",
        windows_s=(60.0, 1800.0, 7200.0),
        calibrate=True,
        log=lambda s: None,
        fit_opts=FIT,
        **SPANS,
    )


def test_share_equals_the_closed_form_at_every_window(data):
    rows = np.arange(data.n)
    for w in L.WINDOWS_S:
        share, lo, hi, n = L.unlabelled_share(data, rows, int(w * 1000), n_boot=400, alpha=0.002)
        closed = L.unlabelled_share_closed_form(data.scenario, w)
        assert n > 8_000
        # a percentile bootstrap of a share of 0 is [0, 0]: widen by the rule of three
        # (3 / n, the 95 % upper bound when no event is seen) for the rare tail
        assert lo - 3 / n <= closed <= hi + 3 / n, (w, share, lo, hi, closed)
        assert hi - lo < 0.04  # an interval narrow enough to tell a wrong form apart


def test_closed_form_shape():
    sc = load_scenario("steady")
    f = sc.late_click_fraction
    # within the scenario's window: above the late fraction, falling; at the window: exactly
    # the late clicks; beyond it, the late clicks' tail
    shares = [L.unlabelled_share_closed_form(sc, w) for w in L.WINDOWS_S]
    assert all(a > b for a, b in zip(shares, shares[1:]))
    assert L.unlabelled_share_closed_form(sc, sc.attribution_window_s) == pytest.approx(f)
    # the median click delay: half the on-time clicks, a little less (truncating the
    # log-normal at the window removes some of its upper half), plus the late ones
    half = L.unlabelled_share_closed_form(sc, sc.click_delay_median_s)
    assert 0.49 * (1 - f) + f < half < 0.5 * (1 - f) + f
    with pytest.raises(ValueError, match=">= 0"):
        L.unlabelled_share_closed_form(sc, -1)


def test_the_sweep_equals_a_direct_count(data, result):
    lo, mid = result["params"]["train_ms"]
    tr = data.rows_between(lo, mid)
    after = data.rows_between(lo, data.scenario.end_ms)
    d = data.delay_ms
    for r in result["rows"]:
        w_ms = int(r["window_s"] * 1000)
        clicked = after[d[after] >= 0]
        assert r["share_clicks"] == len(clicked)
        assert r["share_unlabelled"] == pytest.approx(np.mean(d[clicked] > w_ms), abs=1e-12)
        labelled = np.sum((d[tr] >= 0) & (d[tr] <= w_ms))
        assert r["train_ctr_bias"] == pytest.approx(labelled / np.sum(d[tr] >= 0), rel=1e-12)
        assert r["rows_not_final_at_end"] == int(np.sum(data.t > data.t[-1] - w_ms))


def test_short_windows_bias_the_model_and_the_calibrator_keeps_the_bias(result):
    rows = {r["window_s"]: r for r in result["rows"]}
    short, ref = rows[60.0], rows[7200.0]
    # a 1 min window misses a large share of the clicks: the model predicts less than the
    # reference model (by about the missed share) ...
    assert short["share_unlabelled"] > 0.2
    assert short["calibration"] / ref["calibration"] < 1 - 0.5 * short["share_unlabelled"]
    # ... its NE is worse than the reference's, the interval above 0 ...
    assert short["d_ne_lo_pct"] > 0
    # ... the calibrator, learning the same labels, keeps the bias (calibrated to the
    # labelled CTR); dividing by the known labelled share removes most of it
    assert short["calibration_calibrated"] < 1 - 0.5 * short["share_unlabelled"]
    # the system's 30 min window: the calibrator repairs some of the model's own
    # miscalibration; a 2 h window gives it no label within a 2 h evaluation: nothing moves
    mid = rows[1800.0]
    assert abs(mid["calibration_calibrated"] - 1) < abs(mid["calibration"] - 1)
    assert ref["ne_calibrated"] == pytest.approx(ref["ne"], rel=1e-6)
    assert abs(short["calibration_delay_corrected"] / ref["calibration"] - 1) < 0.1
    assert short["ne_delay_corrected"] < short["ne"]
    assert result["checks"]["closed_form_within_bootstrap"]
    json.dumps(result)


def test_prequential_calibration_never_sees_an_unfinished_label():
    rng = np.random.default_rng(0)
    n = 20_000
    t = np.sort(rng.integers(0, 4 * 3_600_000, n)).astype(np.int64)
    raw = np.full(n, 0.05)
    y = (rng.random(n) < 0.05).astype(float)
    window = 1_800_000
    cut = 2 * 3_600_000
    y2 = y.copy()
    y2[t + window > cut] = 1.0  # labels not final before `cut` change
    a = calibrate_prequential(raw, t, y, window)
    b = calibrate_prequential(raw, t, y2, window)
    before = t < cut
    np.testing.assert_array_equal(a[before], b[before])
    assert not np.allclose(a[~before], b[~before])  # ... and they do matter once final
    with pytest.raises(ValueError, match="sorted"):
        calibrate_prequential(raw, t[::-1], y, window)


def test_bad_windows_are_refused(data):
    with pytest.raises(ValueError, match="positive"):
        L.run(data, kind="lr", windows_s=(0.0,), log=lambda s: None, **SPANS)
