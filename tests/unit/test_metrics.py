"""ctrstream.metrics against scikit-learn and direct computations (no servers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from ctrstream import metrics as M


def _ctr_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions spread like CTRs (logit ~ N(-3.5, 1)) and labels drawn from them."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(-3.5, 1.0, n)))
    y = (rng.random(n) < p).astype(float)
    return p, y


def _direct_bins(p: np.ndarray, y: np.ndarray, n_bins: int) -> dict[str, list]:
    """The documented bin definition, row by row: inner edges at the k / n_bins quantiles,
    duplicates dropped, a row on an edge goes to the bin above, empty bins dropped."""
    edges = sorted({float(np.quantile(p, k / n_bins)) for k in range(1, n_bins)})
    members: dict[int, list[int]] = {}
    for i, v in enumerate(p):
        b = sum(1 for e in edges if v >= e)
        members.setdefault(b, []).append(i)
    out: dict[str, list] = {"mean_pred": [], "observed_ctr": [], "count": []}
    for b in sorted(members):
        rows = members[b]
        out["mean_pred"].append(float(np.mean(p[rows])))
        out["observed_ctr"].append(float(np.mean(y[rows])))
        out["count"].append(len(rows))
    return out


def _direct_ece(bins: dict[str, list]) -> float:
    n = sum(bins["count"])
    return sum(
        c / n * abs(m - o)
        for m, o, c in zip(bins["mean_pred"], bins["observed_ctr"], bins["count"])
    )


# --------------------------------------------------------------------------- log loss, NE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_loss_matches_sklearn(seed):
    p, y = _ctr_like(5000, seed)
    assert M.log_loss(p, y) == pytest.approx(sk_log_loss(y, p, labels=[0, 1]), rel=1e-12)


def test_log_loss_of_one_class_labels_matches_sklearn():
    p, _ = _ctr_like(300, 4)
    for label in (0.0, 1.0):
        y = np.full(300, label)
        assert M.log_loss(p, y) == pytest.approx(sk_log_loss(y, p, labels=[0, 1]), rel=1e-12)


def test_log_loss_clips_certain_mistakes_to_eps():
    """sklearn clips at the float64 machine epsilon; ctrstream at EPS = 1e-7, so that one
    certain mistake costs -log(1e-7) (about 16.1), not 36."""
    p = np.array([0.0, 1.0, 0.0, 1.0])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    lo, hi = M.EPS, 1 - M.EPS  # the clipped predictions
    expected = -(np.log(lo) + np.log1p(-hi) + np.log1p(-lo) + np.log(hi)) / 4
    assert expected == pytest.approx(-np.log(1e-7) / 2, rel=1e-6)
    assert M.log_loss(p, y) == pytest.approx(expected, rel=1e-12)


def test_normalized_entropy_is_log_loss_over_the_constant_predictor():
    p, y = _ctr_like(5000, 5)
    ctr = y.mean()
    const = np.full(len(y), ctr)
    assert M.normalized_entropy(const, y) == pytest.approx(1.0, rel=1e-12)
    assert M.entropy(ctr) == pytest.approx(sk_log_loss(y, const, labels=[0, 1]), rel=1e-12)
    assert M.normalized_entropy(p, y) == pytest.approx(
        sk_log_loss(y, p, labels=[0, 1]) / sk_log_loss(y, const, labels=[0, 1]), rel=1e-12
    )
    assert M.normalized_entropy(p, y) < 1.0  # the true probabilities beat the constant


def test_normalized_entropy_is_undefined_for_one_class():
    p, _ = _ctr_like(100, 6)
    assert math.isnan(M.normalized_entropy(p, np.zeros(100)))
    assert math.isnan(M.normalized_entropy(p, np.ones(100)))


# --------------------------------------------------------------------------- AUC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn(seed):
    p, y = _ctr_like(5000, seed)
    assert M.auc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_auc_with_ties_matches_sklearn(decimals):
    rng = np.random.default_rng(decimals)
    p = np.round(rng.random(3000), decimals)  # many ties
    y = (rng.random(3000) < p).astype(int)
    assert M.auc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_of_constant_and_tiny_inputs():
    assert M.auc([0.3, 0.3, 0.3], [0, 1, 0]) == roc_auc_score([0, 1, 0], [0.3, 0.3, 0.3]) == 0.5
    assert M.auc([0.1, 0.9], [0, 1]) == roc_auc_score([0, 1], [0.1, 0.9]) == 1.0
    assert M.auc([0.9, 0.1], [0, 1]) == roc_auc_score([0, 1], [0.9, 0.1]) == 0.0


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_auc_is_undefined_for_one_class():
    """nan, as scikit-learn (which warns) gives; the live metrics must not fail there."""
    p, _ = _ctr_like(100, 7)
    for label in (0.0, 1.0):
        y = np.full(100, label)
        assert math.isnan(M.auc(p, y)) and math.isnan(roc_auc_score(y, p))


# --------------------------------------------------------------------------- bins, ECE


@pytest.mark.parametrize("n_bins", [5, 10, 20])
def test_reliability_and_ece_match_a_direct_computation(n_bins):
    p, y = _ctr_like(3000, n_bins)
    bins = M.reliability(p, y, n_bins)
    direct = _direct_bins(p, y, n_bins)
    assert bins["count"] == direct["count"]
    np.testing.assert_allclose(bins["mean_pred"], direct["mean_pred"], rtol=1e-12)
    np.testing.assert_allclose(bins["observed_ctr"], direct["observed_ctr"], rtol=1e-12)
    assert len(bins["count"]) == n_bins and sum(bins["count"]) == 3000
    assert max(bins["count"]) - min(bins["count"]) <= 1  # equal mass
    assert M.ece(p, y, n_bins) == pytest.approx(_direct_ece(direct), rel=1e-12)


@pytest.mark.parametrize("n_bins", [10, 20])
def test_reliability_matches_sklearn_calibration_curve(n_bins):
    """Same quantile edges as calibration_curve(strategy="quantile"). 2002 rows: (n - 1) k /
    n_bins is never an integer, so no edge coincides with a row and the two agree exactly
    (on an edge, sklearn puts the row in the bin below)."""
    p, y = _ctr_like(2002, 11)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="quantile")
    bins = M.reliability(p, y, n_bins)
    np.testing.assert_allclose(bins["mean_pred"], prob_pred, rtol=1e-12)
    np.testing.assert_allclose(bins["observed_ctr"], prob_true, rtol=1e-12)
    counts = np.array(bins["count"])
    assert M.ece(p, y, n_bins) == pytest.approx(
        float(np.sum(counts / len(p) * np.abs(prob_pred - prob_true))), rel=1e-12
    )


def test_the_default_bins_are_twenty_equal_mass_bins():
    p, y = _ctr_like(4000, 12)
    assert M.N_BINS == 20
    assert M.reliability(p, y)["count"] == [200] * 20
    assert M.ece(p, y) == M.ece(p, y, 20) == M.summary(p, y)["ece"]


def test_equal_predictions_share_a_bin():
    """Six rows at 0.1 fill more than one fifth of the rows: they still share one bin (the
    edges at the 20 % and 40 % quantiles are both 0.1 and collapse); 0.2 and 0.5 meet in
    the last bin (edges 0.1, 0.14, 0.2)."""
    p = np.array([0.1] * 6 + [0.2] * 3 + [0.5])
    y = np.array([0, 0, 1, 0, 0, 0, 1, 0, 1, 1], dtype=float)
    np.testing.assert_allclose(M.bin_edges(p, 5), [0.1, 0.14, 0.2])
    bins = M.reliability(p, y, 5)
    assert bins["count"] == [6, 4]
    np.testing.assert_allclose(bins["mean_pred"], [0.1, 1.1 / 4])
    np.testing.assert_allclose(bins["observed_ctr"], [1 / 6, 3 / 4])
    assert bins["count"] == _direct_bins(p, y, 5)["count"]
    # with many ties at random, a value never spans two bins
    rng = np.random.default_rng(15)
    q = np.round(rng.random(2000) * 0.1, 2)
    yq = (rng.random(2000) < q).astype(float)
    edges = M.bin_edges(q, 20)
    b = np.searchsorted(edges, q, side="right")
    for v in np.unique(q):
        assert len(np.unique(b[q == v])) == 1
    got, direct = M.reliability(q, yq, 20), _direct_bins(q, yq, 20)
    assert got["count"] == direct["count"]
    np.testing.assert_allclose(got["mean_pred"], direct["mean_pred"], rtol=1e-12)
    np.testing.assert_allclose(got["observed_ctr"], direct["observed_ctr"], rtol=1e-12)
    # all equal: one bin, the ECE is the gap in the mean
    const = np.full(10, 0.3)
    assert M.reliability(const, y, 20)["count"] == [10]
    assert M.ece(const, y) == pytest.approx(abs(0.3 - y.mean()), abs=1e-15)


def test_tiny_inputs():
    assert M.reliability([0.4], [1]) == {"mean_pred": [0.4], "observed_ctr": [1.0], "count": [1]}
    assert M.ece([0.4], [1]) == pytest.approx(0.6)
    assert M.reliability([0.2, 0.6], [0, 1], 20)["count"] == [1, 1]
    assert M.ece([0.2, 0.6], [0, 1], 20) == pytest.approx(0.5 * 0.2 + 0.5 * 0.4)
    assert M.reliability([], []) == {"mean_pred": [], "observed_ctr": [], "count": []}
    empty = M.summary([], [])
    assert empty["n"] == 0
    assert all(math.isnan(v) for k, v in empty.items() if k != "n")
    assert math.isnan(M.log_loss([], [])) and math.isnan(M.ece([], []))


def test_ece_of_one_class_labels_is_the_mean_prediction():
    p, _ = _ctr_like(1000, 13)
    assert M.ece(p, np.zeros(1000)) == pytest.approx(p.mean(), rel=1e-12)
    assert M.ece(p, np.ones(1000)) == pytest.approx(1 - p.mean(), rel=1e-12)


# --------------------------------------------------------------------------- summary, errors


def test_summary_gathers_every_metric():
    p, y = _ctr_like(5000, 14)
    s = M.summary(p, y)
    assert s == {
        "n": 5000,
        "log_loss": M.log_loss(p, y),
        "ne": M.normalized_entropy(p, y),
        "auc": M.auc(p, y),
        "mean_pred": float(p.mean()),
        "observed_ctr": float(y.mean()),
        "ratio": M.calibration_ratio(p, y),
        "ece": M.ece(p, y),
    }
    assert s["ratio"] == pytest.approx(p.mean() / y.mean(), rel=1e-12)
    no_clicks = M.summary(p, np.zeros(5000))
    assert math.isnan(no_clicks["ratio"]) and math.isnan(no_clicks["auc"])
    assert no_clicks["observed_ctr"] == 0.0 and no_clicks["ece"] > 0


def test_summary_accepts_lists_ints_and_columns():
    a = M.summary([0.2, 0.7, 0.4], [0, 1, 1])
    b = M.summary(np.array([[0.2], [0.7], [0.4]]), np.array([0, 1, 1], dtype=np.int8))
    assert a == b


@pytest.mark.parametrize(
    "p, y, message",
    [
        ([0.1, 0.2], [0], "2 predictions for 1 labels"),
        ([0.1, 1.2], [0, 1], "probabilities in [0, 1]"),
        ([0.1, -3.0], [0, 1], "not logits"),
        ([0.1, float("nan")], [0, 1], "no NaN"),
        ([0.1, 0.2], [0, 2], "labels must be 0 or 1"),
    ],
)
def test_bad_input_says_what_is_wrong(p, y, message):
    for fn in (
        M.log_loss,
        M.auc,
        M.ece,
        M.reliability,
        M.summary,
        M.calibration_ratio,
        M.normalized_entropy,
    ):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            fn(p, y)


@pytest.mark.parametrize("n_bins", [0, -1, 2.5])
def test_bad_bin_count(n_bins):
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        M.ece([0.1, 0.2], [0, 1], n_bins)
