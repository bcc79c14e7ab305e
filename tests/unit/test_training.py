"""Training and evaluation of the LR baseline and DCN-v2 against a known truth.

The data set is synthetic with the training-set shapes of ``ctrstream.batch.point_in_time`` and a
known click probability per row (the oracle). It is built so that an interaction (a
user's hidden group x the ad's category) carries signal that a sum of per-id weights (the
LR baseline) cannot represent, while DCN-v2's crosses can.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctrstream.features import (
    DAY_MS,
    ENTITIES,
    N_WINDOWS,
    dense_from_counts,
    fingerprint,
    sparse_ids,
)


def synthetic_dataset(n: int, seed: int = 0) -> dict:
    """A training set (dict of numpy arrays) with an ``oracle_p`` column of true probabilities."""
    rng = np.random.default_rng(seed)
    n_users, n_ads, n_groups, n_cats = 100, 200, 3, 12
    user = rng.integers(0, n_users, n)
    ad = rng.integers(0, n_ads, n)
    site = rng.integers(0, 40, n)
    position = rng.integers(0, 4, n)
    ad_cat = (np.arange(n_ads) * 7919) % n_cats
    user_group = rng.integers(0, n_groups, n_users)
    inter = rng.normal(0, 1.5, (n_groups, n_cats))
    ad_bias = rng.normal(0, 0.5, n_ads)
    site_bias = rng.normal(0, 0.3, 40)
    logit = (
        -3.6 + ad_bias[ad] + site_bias[site] - 0.4 * position + inter[user_group[user], ad_cat[ad]]
    )
    p = 1 / (1 + np.exp(-logit))
    y = (rng.random(n) < p).astype(np.int8)
    t = np.sort(rng.integers(0, 2 * DAY_MS, n)) + 1_700_000_000_000
    counts = np.zeros((n, len(ENTITIES), N_WINDOWS, 2))
    imps = rng.poisson(40, (n, len(ENTITIES), N_WINDOWS))
    base = 1 / (1 + np.exp(-(-3.6 + ad_bias[ad])))  # the ad's historical CTR is informative
    counts[..., 0] = imps
    counts[..., 1] = rng.binomial(imps, base[:, None, None])
    cols = dict(
        user_id=user,
        ad_id=ad,
        campaign_id=ad // 4,
        advertiser_id=ad // 20,
        site_id=site,
        ad_category=ad_cat[ad],
        device_type=np.array(["mobile", "desktop", "tablet", "ctv"])[rng.integers(0, 4, n)],
        country=np.array(["US", "DE", "FR", "IN", "BR"])[rng.integers(0, 5, n)],
        position=position,
        event_time_ms=t,
    )
    return dict(
        impression_id=np.array([f"imp-{i}" for i in range(n)], dtype=object),
        event_time_ms=t,
        label=y,
        counts=counts.astype(np.int64),
        dense=dense_from_counts(counts),
        sparse=sparse_ids(cols),
        oracle_p=p,
    )


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(80_000, seed=3)


# --------------------------------------------------------------------------- evaluation


def test_metrics_against_brute_force_and_known_values():
    from ctrstream.metrics import auc, entropy, log_loss
    from ctrstream.models.evaluation import evaluate

    rng = np.random.default_rng(0)
    p = np.round(rng.random(400), 2)  # many ties
    y = (rng.random(400) < p).astype(int)
    pos, neg = p[y == 1], p[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
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
    # a predictor that is half as high as the truth is miscalibrated and says so
    ev2 = evaluate(0.5 * p, y)
    assert ev2["model"]["calibration"] < 0.6 and ev2["model"]["ece"] > 0.1


# --------------------------------------------------------------------------- training


def test_dense_inputs_follow_the_formula_across_row_blocks():
    """``dense_from_counts`` works through large inputs in blocks of rows; every row, on both
    sides of a block boundary, gets log1p(impressions), log1p(clicks) and the smoothed CTR."""
    from ctrstream import features as F

    n = F._DENSE_BLOCK_ROWS + 3
    rng = np.random.default_rng(5)
    counts = np.zeros((n, len(ENTITIES), N_WINDOWS, 2), dtype=np.int64)
    counts[..., 0] = rng.integers(0, 5000, counts.shape[:-1])
    counts[..., 1] = rng.binomial(counts[..., 0], 0.03)
    dense = dense_from_counts(counts)
    assert dense.shape == (n, F.N_DENSE) and dense.dtype == np.float32
    names = F.dense_feature_names()
    for row in (0, F._DENSE_BLOCK_ROWS - 1, F._DENSE_BLOCK_ROWS, n - 1):
        for k, e in enumerate(ENTITIES):
            for w, res in enumerate(F.RESOLUTIONS):
                i, c = counts[row, k, w]
                j = names.index(f"{e.name}_{res.name}_log_imps")
                want = [
                    np.log1p(i),
                    np.log1p(c),
                    (c + F.PRIOR.alpha) / (i + F.PRIOR.alpha + F.PRIOR.beta),
                ]
                np.testing.assert_allclose(dense[row, j : j + 3], want, rtol=1e-6)


def test_warmup_rows_are_dropped_without_copying_sorted_sets(data):
    from ctrstream.batch.pipeline import drop_warmup

    t = data["event_time_ms"]
    hour = 3_600_000
    kept = drop_warmup(data, hour)
    want = t >= t.min() + hour
    assert 0 < want.sum() < len(t)
    for k in ("event_time_ms", "label", "dense", "sparse", "counts"):
        np.testing.assert_array_equal(kept[k], data[k][want])
        assert np.shares_memory(kept[k], data[k])  # a view of the rows in time order
    shuffled = {k: v[::-1] if isinstance(v, np.ndarray) else v for k, v in data.items()}
    back = drop_warmup(shuffled, hour)  # any order: the same rows, selected by time
    np.testing.assert_array_equal(back["event_time_ms"], t[::-1][want[::-1]])
    assert drop_warmup(data, 0) is data


def test_time_split_holds_out_the_last_part_of_event_time(data):
    from ctrstream.models.training import time_split

    tr, va, cut = time_split(data["event_time_ms"], 0.2)
    t = data["event_time_ms"]
    assert t[tr].max() < cut <= t[va].min()
    assert len(tr) + len(va) == len(t)
    span = t.max() - t.min()
    assert cut - t.min() == pytest.approx(0.8 * span, abs=1)


DEEP_FAST = dict(epochs=2, batch_size=1024, lr=0.003, sparse_lr=0.01)
LR_FAST = dict(epochs=2, batch_size=1024)


@pytest.fixture(scope="module")
def trained(data):
    from ctrstream.models.training import train

    deep, deep_info = train(data, "deep", seed=0, progress=False, **DEEP_FAST)
    lr, lr_info = train(data, "lr", seed=0, progress=False, **LR_FAST)
    return deep, deep_info, lr, lr_info


def test_deep_model_beats_the_baseline_and_a_constant_on_held_out_data(data, trained):
    from ctrstream.models.evaluation import evaluate

    _, deep_info, _, lr_info = trained
    vi = deep_info["val_index"]
    assert np.array_equal(vi, lr_info["val_index"])  # same held-out rows
    assert data["event_time_ms"][vi].min() >= deep_info["split_time_ms"]
    y, oracle = data["label"][vi], data["oracle_p"][vi]
    deep = evaluate(deep_info["val_probs"], y, oracle)
    lr = evaluate(lr_info["val_probs"], y, oracle)
    const = evaluate(np.full(len(y), deep_info["train_ctr"]), y, oracle)
    assert lr["model"]["ne"] < const["model"]["ne"] - 0.05
    assert deep["model"]["ne"] < lr["model"]["ne"] - 0.02
    assert deep["model"]["auc"] > lr["model"]["auc"]
    assert deep["oracle"]["ne"] < deep["model"]["ne"]  # nothing beats the truth
    assert 0.8 < deep["model"]["calibration"] < 1.2


def test_training_is_reproducible_with_a_seed(data):
    from ctrstream.models.training import train

    small = {k: v[:30_000] for k, v in data.items()}
    _, a = train(small, "deep", seed=7, progress=False, epochs=1, batch_size=2048)
    _, b = train(small, "deep", seed=7, progress=False, epochs=1, batch_size=2048)
    _, c = train(small, "deep", seed=8, progress=False, epochs=1, batch_size=2048)
    np.testing.assert_array_equal(a["val_probs"], b["val_probs"])
    assert np.max(np.abs(a["val_probs"] - c["val_probs"])) > 1e-4


def test_negative_downsampling_is_recalibrated(data):
    from ctrstream.models.training import train

    net, info = train(data, "lr", seed=0, progress=False, neg_downsample=0.2, **LR_FAST)
    assert info["fit_rows"] < 0.4 * info["train_rows"]  # negatives really were dropped
    assert float(net.logit_offset) == pytest.approx(np.log(0.2))
    y = data["label"][info["val_index"]]
    # without the correction the mean prediction would be ~4x the CTR
    assert 0.8 < info["val_probs"].mean() / y.mean() < 1.25


def test_run_writes_cards_plots_and_onnx(data, tmp_path):
    from ctrstream.batch.pipeline import run_training
    from ctrstream.config import Settings

    settings = Settings(data_dir=tmp_path / "data")

    small = {k: v[:30_000] for k, v in data.items()}
    summary = run_training(
        settings,
        small,
        None,
        ("lr",),
        tmp_path / "run",
        progress=False,
        log=lambda m: None,
        train_kwargs={"lr": LR_FAST},
    )
    card = json.loads((tmp_path / "run" / "lr" / "card.json").read_text())
    assert card["feature_fingerprint"] == fingerprint()
    t = small["event_time_ms"]
    assert card["training_window_ms"][0] == t.min()
    assert card["training_window_ms"][1] < card["validation_window_ms"][0]
    ev = card["evaluation"]
    assert ev["oracle"] is not None and ev["oracle"]["ne"] < ev["model"]["ne"] < 1.0
    assert card["onnx"]["parity_max_abs_diff"] <= 1e-5
    for png in (tmp_path / "run" / "lr" / "reliability.png", tmp_path / "run" / "reliability.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["models"]["lr"]["evaluation"]["model"]["ne"] == ev["model"]["ne"]
