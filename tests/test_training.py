"""Training and evaluation of the LR baseline and DCN-v2 against a known truth.

The data set is synthetic with the training-set shapes of ``models.batch_features`` and a
known click probability per row (the oracle). It is built so that an interaction (a
user's hidden group x the ad's category) carries signal that a sum of per-id weights (the
LR baseline) cannot represent, while DCN-v2's crosses can.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctrstream.features import (
    DAY_MS, ENTITIES, N_DENSE, N_SPARSE, N_WINDOWS, dense_from_counts, fingerprint, sparse_ids,
)


def synthetic_dataset(n: int, seed: int = 0) -> dict:
    """A training set (dict of numpy arrays) with an ``oracle_p`` column of true probabilities."""
    rng = np.random.default_rng(seed)
    n_users, n_ads, n_groups, n_cats = 400, 200, 4, 12
    user = rng.integers(0, n_users, n)
    ad = rng.integers(0, n_ads, n)
    site = rng.integers(0, 40, n)
    position = rng.integers(0, 4, n)
    ad_cat = (np.arange(n_ads) * 7919) % n_cats
    user_group = rng.integers(0, n_groups, n_users)
    inter = rng.normal(0, 1.5, (n_groups, n_cats))
    ad_bias = rng.normal(0, 0.5, n_ads)
    site_bias = rng.normal(0, 0.3, 40)
    logit = (-3.6 + ad_bias[ad] + site_bias[site] - 0.4 * position
             + inter[user_group[user], ad_cat[ad]])
    p = 1 / (1 + np.exp(-logit))
    y = (rng.random(n) < p).astype(np.int8)
    t = np.sort(rng.integers(0, 2 * DAY_MS, n)) + 1_700_000_000_000
    counts = np.zeros((n, len(ENTITIES), N_WINDOWS, 2))
    imps = rng.poisson(40, (n, len(ENTITIES), N_WINDOWS))
    base = 1 / (1 + np.exp(-(-3.6 + ad_bias[ad])))  # the ad's historical CTR is informative
    counts[..., 0] = imps
    counts[..., 1] = rng.binomial(imps, base[:, None, None])
    cols = dict(user_id=user, ad_id=ad, campaign_id=ad // 4, advertiser_id=ad // 20,
                site_id=site, ad_category=ad_cat[ad],
                device_type=np.array(["mobile", "desktop", "tablet", "ctv"])[rng.integers(0, 4, n)],
                country=np.array(["US", "DE", "FR", "IN", "BR"])[rng.integers(0, 5, n)],
                position=position, event_time_ms=t)
    return dict(
        impression_id=np.array([f"imp-{i}" for i in range(n)], dtype=object),
        event_time_ms=t, label=y, counts=counts.astype(np.int64),
        dense=dense_from_counts(counts), sparse=sparse_ids(cols), oracle_p=p,
    )


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(80_000, seed=3)


# --------------------------------------------------------------------------- evaluation


def test_metrics_against_brute_force_and_known_values():
    from models.evaluation import auc, entropy, evaluate, log_loss

    rng = np.random.default_rng(0)
    p = np.round(rng.random(400), 2)  # many ties
    y = (rng.random(400) < p).astype(int)
    pos, neg = p[y == 1], p[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg))
    assert auc(p, y) == pytest.approx(brute, abs=1e-12)
    # a constant prediction at the observed CTR has NE exactly 1 and perfect calibration
    const = np.full(400, y.mean())
    ev = evaluate(const, y, oracle_probs=p)
    assert ev["model"]["ne"] == pytest.approx(1.0)
    assert ev["model"]["calibration"] == pytest.approx(1.0)
    assert ev["model"]["ece"] == pytest.approx(0.0, abs=1e-12)
    assert log_loss(const, y) == pytest.approx(entropy(y.mean()))
    # the true probabilities beat the constant; the gap is reported relative to them
    assert ev["oracle"]["ne"] < 1.0 and ev["oracle"]["auc"] > 0.7
    assert ev["ne_gap"] == pytest.approx(1.0 / ev["oracle"]["ne"] - 1.0)
    # a predictor that is twice too high is miscalibrated and says so
    ev2 = evaluate(np.clip(2 * p, 0, 0.99), y)
    assert ev2["model"]["calibration"] > 1.5 and ev2["model"]["ece"] > 0.1


# --------------------------------------------------------------------------- training


def test_time_split_holds_out_the_last_part_of_event_time(data):
    from models.training import time_split

    tr, va, cut = time_split(data["event_time_ms"], 0.2)
    t = data["event_time_ms"]
    assert t[tr].max() < cut <= t[va].min()
    assert len(tr) + len(va) == len(t)
    span = t.max() - t.min()
    assert cut - t.min() == pytest.approx(0.8 * span, abs=1)
