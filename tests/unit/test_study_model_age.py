"""Sweep 2 of the freshness study (``ctrstream.study.model_age``) on a small market with a big
shift: the continuous learner beats the frozen model of the same family after the drift
(bootstrap interval excluding 0), points of the curves equal a direct computation, the
result follows the sweep contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ctrstream import metrics as M
from ctrstream.simulation.scenarios import load_scenario
from ctrstream.study import model_age
from ctrstream.study.data import HOUR_MS, StudyData, dense_at, fit, labels_within, load_study_data
from ctrstream.study.data import predict as study_predict

# 12 h, the first 3 h history; a small market (20 campaigns) whose largest campaign's CTR
# shifts by +2 logits at 6 h, exactly when the frozen model's training ends (train_hours=3)
OPTS = dict(train_hours=3.0, cadences_hours=(1.0,), online_lr_scale=0.3)


@pytest.fixture(scope="module")
def data() -> StudyData:
    sc = load_scenario(
        "drift",
        hours=12,
        events=100_000,
        drift_logit=2.0,
        n_ads=100,
        n_campaigns=20,
        n_advertisers=10,
        n_users=20_000,
    )
    return load_study_data(sc, history_hours=3)


@pytest.fixture(scope="module")
def result(data: StudyData) -> dict:
    return model_age.run(data, kind="lr", quick=True, log=lambda s: None, **OPTS)


def test_continuous_learner_beats_the_frozen_model_after_a_drift(result: dict) -> None:
    by = {r["model"]: r for r in result["rows"] if r["series"] == "cadence"}
    frozen = by["frozen"]
    assert frozen["ne_diff_lo"] > 0, frozen  # NE(frozen) - NE(continuous): interval > 0
    assert result["checks"]["continuous_beats_frozen"]
    assert by["continuous"]["ne"] < frozen["ne"]
    # and the gap opens as the frozen model ages past the shift
    age = [r for r in result["rows"] if r["series"] == "age"]
    assert age[-1]["ne_vs_continuous_pct"] > age[0]["ne_vs_continuous_pct"]
    assert result["headline"]["age_ne_pct_per_day"] > 0


def test_result_follows_the_sweep_contract(result: dict) -> None:
    json.dumps(result)  # JSON-able
    assert result["sweep"] == "model_age"
    assert set(result) >= {"params", "rows", "headline", "checks"}
    p = result["params"]
    assert p["kind"] == "lr" and p["train_hours"] == 3.0 and p["eval_hours"] == pytest.approx(6)
    names = [r["model"] for r in result["rows"] if r["series"] == "cadence"]
    assert names == ["continuous", "warm every 1 h", "frozen"]
    by = {r["model"]: r for r in result["rows"] if r["series"] == "cadence"}
    w = p["attribution_window_h"]
    # ages: continuous within a step of the window; hourly retrain ~ window + half an hour
    assert w <= by["continuous"]["mean_age_h"] <= w + p["step_minutes"] / 60
    assert by["warm every 1 h"]["mean_age_h"] == pytest.approx(w + 0.5, abs=0.1)
    assert by["frozen"]["mean_age_h"] == pytest.approx(w + 3.0, abs=0.2)
    assert result["checks"]["warm_ages_grow_with_cadence"]


def test_two_points_equal_a_direct_computation(data: StudyData, result: dict) -> None:
    """The frozen model's NE over the evaluation span and in its first age bucket, from a
    model trained directly on the rows labelled final at T0."""
    sc = data.scenario
    w = int(sc.attribution_window_s * 1000)
    t0 = data.history_end_ms + 3 * HOUR_MS
    idx = data.rows_between(data.history_end_ms, sc.end_ms)
    t = data.t[idx]
    train = idx[t < t0 - w]
    ev = idx[t >= t0]
    dense = dense_at(data, idx)
    d_train, d_ev = dense[: len(train)], dense[np.searchsorted(t, t0) :]
    net = fit("lr", data.sparse[train], d_train, labels_within(data, w, train), data.t[train])
    p = study_predict(net, data.sparse[ev], d_ev)
    y = data.clicked[ev]
    by = {r["model"]: r for r in result["rows"] if r["series"] == "cadence"}
    assert by["frozen"]["ne"] == pytest.approx(M.normalized_entropy(p, y), rel=1e-9)
    first = [r for r in result["rows"] if r["series"] == "age"][0]
    in_bucket = data.t[ev] < t0 + 2 * HOUR_MS  # quick: 2 h buckets
    assert first["rows"] == int(in_bucket.sum())
    assert first["ne"] == pytest.approx(M.normalized_entropy(p[in_bucket], y[in_bucket]), rel=1e-9)


def test_deterministic(data: StudyData, result: dict) -> None:
    again = model_age.run(data, kind="lr", quick=True, log=lambda s: None, **OPTS)
    assert again == result


def test_bad_options_are_refused_clearly(data: StudyData) -> None:
    with pytest.raises(model_age.ModelAgeError, match="unknown option"):
        model_age.run(data, kind="lr", quick=True, cadence=3)
    with pytest.raises(model_age.ModelAgeError, match="train_hours"):
        model_age.run(data, kind="lr", quick=True, train_hours=20.0)
    with pytest.raises(model_age.ModelAgeError, match="multiple of the step"):
        model_age.run(data, kind="lr", quick=True, cadences_hours=(0.25,), step_minutes=10.0)


def test_plot_writes_a_png(result: dict, tmp_path: Path) -> None:
    out = model_age.plot(result, tmp_path / "model_age.png")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
