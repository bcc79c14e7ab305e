"""The pure calibrator (no Redis, no Kafka): identity start, a known Platt map learnt,
River's SGD update, the drift boost, the prequential metrics, its doctests, its state."""

from __future__ import annotations

import ast
import doctest
from pathlib import Path

import numpy as np
import pytest

from ctrstream import metrics as M
from ctrstream.calibration import calibrator as C
from ctrstream.calibration import params as P
from ctrstream.calibration.calibrator import (
    CalibrationConfig,
    Calibrator,
    PlattSGD,
    VersionCalibrator,
)
from ctrstream.calibration.params import Z_REF, apply_params, logit, sigmoid


def _platt_stream(n: int, a: float, b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores around the prior's CTR whose true click probability is
    sigmoid(Z_REF + a + b * (logit(raw) - Z_REF)): the Platt map intercept Z_REF + a, slope b."""
    rng = np.random.default_rng(seed)
    raw = sigmoid(rng.normal(Z_REF, 1.0, n))
    y = (rng.random(n) < sigmoid(Z_REF + a + b * (logit(raw) - Z_REF))).astype(float)
    return raw, y


# --------------------------------------------------------------------------- the doctests


@pytest.mark.parametrize("module", [C, P, M], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 or module is P
    assert result.failed == 0


def test_the_calibrator_module_does_no_io():
    """No Redis, Kafka, store or network import in the learner or the served maths."""
    for module in (C, P):
        tree = ast.parse(Path(module.__file__).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        bad = {
            n
            for n in names
            if n.split(".")[0]
            in {"redis", "confluent_kafka", "socket", "hiredis", "requests", "httpx"}
            or n.startswith(("ctrstream.store", "ctrstream.kafka"))
        }
        assert not bad, f"{module.__name__} imports {bad}"


# --------------------------------------------------------------------------- identity start


def test_it_starts_as_the_identity():
    cal = Calibrator()
    raw = np.array([1e-4, 0.003, 0.02, 0.05, 0.3, 0.9])
    np.testing.assert_allclose(cal.predict_many(raw), raw, rtol=1e-9)
    inside = raw[(logit(raw) > cal.cfg.iso_lo) & (logit(raw) < cal.cfg.iso_hi)]  # binned range
    np.testing.assert_allclose(cal.predict_many(inside, method="isotonic"), inside, rtol=0.2)
    for r in raw:
        assert cal.predict_one({"raw": r}) == pytest.approx(r, rel=1e-9)
        proba = cal.predict_proba_one({"raw": r})
        assert proba[True] == pytest.approx(r, rel=1e-9) and proba[False] == 1 - proba[True]
    pl = cal.params()["platt"]
    assert pl["intercept"] == Z_REF and pl["w_logit"] == 1.0 and pl["context"] == {}
    assert cal.platt.weights == {"logit": 1.0} and cal.platt.intercept == Z_REF
    # context features start at weight 0: still the identity with context
    ctx = Calibrator(CalibrationConfig(context=("position", "device_type")))
    assert ctx.predict_one({"raw": 0.05, "position": 3, "device_type": "tablet"}) == pytest.approx(
        0.05, rel=1e-9
    )


# --------------------------------------------------------------------------- what it learns


def test_it_learns_a_known_platt_map():
    """Labels from sigmoid(Z_REF - 0.7 + 0.6 (logit(raw) - Z_REF)): the served (averaged)
    intercept and slope end near the truth, and the served probabilities near the true ones.
    (Constant-rate SGD keeps moving: over seeds, the served slope and intercept wander about
    +-0.1 around the truth at this rate; the tolerances are that noise, not a bias.)"""
    a, b = -0.7, 0.6
    raw, y = _platt_stream(300_000, a, b, seed=1)
    cal = Calibrator()
    for s in range(0, len(raw), 2000):
        cal.learn_many(raw[s : s + 2000], y[s : s + 2000])
    pl = cal.params()["platt"]
    assert pl["intercept"] - Z_REF == pytest.approx(a, abs=0.15)
    assert pl["w_logit"] == pytest.approx(b, abs=0.15)
    test = sigmoid(np.linspace(Z_REF - 2, Z_REF + 2, 50))
    truth = sigmoid(Z_REF + a + b * (logit(test) - Z_REF))
    np.testing.assert_allclose(cal.predict_many(test), truth, rtol=0.15)
    # far better than the identity it started from
    held_raw, held_y = _platt_stream(100_000, a, b, seed=2)
    assert M.log_loss(cal.predict_many(held_raw), held_y) < 0.97 * M.log_loss(held_raw, held_y)
    assert abs(M.calibration_ratio(cal.predict_many(held_raw), held_y) - 1) < 0.1
    assert cal.n_seen == 300_000 and cal.n_clicks == int(y.sum())


def test_the_isotonic_map_is_monotone_and_calibrated():
    raw, y = _platt_stream(100_000, -0.5, 1.4, seed=3)
    cal = Calibrator(CalibrationConfig(method="isotonic"))
    for s in range(0, len(raw), 2000):
        cal.learn_many(raw[s : s + 2000], y[s : s + 2000])
    iso = cal.params()["isotonic"]
    assert np.all(np.diff(iso["p"]) >= 0)
    held_raw, held_y = _platt_stream(50_000, -0.5, 1.4, seed=4)
    p = cal.predict_many(held_raw)
    assert np.all(np.diff(p[np.argsort(held_raw)]) >= -1e-12)
    assert abs(M.calibration_ratio(p, held_y) - 1) < 0.05
    # the served method is the isotonic map; Platt is reported alongside
    assert np.array_equal(p, apply_params({**cal.params(), "method": "isotonic"}, held_raw))
    assert not np.array_equal(p, cal.predict_many(held_raw, method="platt"))


def test_sgd_is_rivers_logistic_regression_update():
    """From River's own start (zero weights), PlattSGD and River's LogisticRegression with
    the same rates take the same steps, context features included."""
    from river import linear_model, optim

    rng = np.random.default_rng(5)
    ours = PlattSGD(lr=0.02, intercept_lr=0.05, intercept_init=-2.0)
    river = linear_model.LogisticRegression(
        optimizer=optim.SGD(0.02), intercept_lr=0.05, intercept_init=-2.0
    )
    for _ in range(3000):
        x = {"logit": float(rng.normal(0, 1.5)), f"position={rng.integers(0, 4)}": 1.0}
        yi = int(rng.random() < 0.2)
        assert ours.predict_proba_one(x) == pytest.approx(
            river.predict_proba_one(x)[True], rel=1e-12
        )
        ours.learn_one(x, yi)
        river.learn_one(x, yi)
    assert ours.intercept == pytest.approx(river.intercept, rel=1e-12)
    assert ours.weights.keys() == river.weights.keys()
    for k, w in river.weights.items():
        assert ours.weights[k] == pytest.approx(w, rel=1e-9, abs=1e-12)


def test_learn_one_is_learn_many_of_one_example():
    cfg = CalibrationConfig(context=("position",))
    one, many = Calibrator(cfg), Calibrator(cfg)
    raw, y = _platt_stream(300, -0.5, 0.8, seed=6)
    pos = np.arange(300) % 3
    for i in range(300):
        one.learn_one({"raw": raw[i], "position": int(pos[i])}, bool(y[i]))
        many.learn_many(raw[i : i + 1], y[i : i + 1], {"position": pos[i : i + 1]})
    assert one.params() == many.params()
    assert one.n_seen == 300
    with pytest.raises(ValueError, match="raw score under 'raw'"):
        one.learn_one({"score": 0.1}, 1)
    with pytest.raises(ValueError, match="3 raw scores for 2 labels"):
        one.learn_many([0.1, 0.2, 0.3], [0, 1])


def test_drift_boosts_the_learning_rates_then_restores_them():
    cfg = CalibrationConfig(drift_boost=5.0, drift_boost_examples=3000)
    cal = Calibrator(cfg)
    rng = np.random.default_rng(8)
    z = rng.normal(-3.2, 0.8, 60_000)
    y = rng.random(60_000) < sigmoid(z + np.where(np.arange(60_000) < 30_000, 0.0, 1.0))
    events, multiplier_after_a_drift = [], []
    for s in range(0, 60_000, 1000):
        new = cal.learn_many(sigmoid(z[s : s + 1000]), y[s : s + 1000].astype(float))
        if new:  # boosted for 3000 examples: still at the end of the batch that fired
            multiplier_after_a_drift.append(cal.platt.lr_multiplier)
        events += new
    assert multiplier_after_a_drift and set(multiplier_after_a_drift) == {5.0}
    first = [e for e in events if e["n_seen"] > 30_000]
    assert first and first[0]["n_seen"] < 35_000
    assert first[0]["window_mean_residual"] > 0  # more clicks than predicted
    assert set(first[0]) == {"n_seen", "event_time_ms", "signal", "window_mean_residual"}
    assert cal.drift_events == events
    assert cal.n_seen - events[-1]["n_seen"] >= 3000  # the boost is over ...
    assert cal.platt.lr_multiplier == 1.0  # ... and the rates are back
    # the served map followed the shift
    held = rng.normal(-3.2, 0.8, 50_000)
    yy = rng.random(50_000) < sigmoid(held + 1.0)
    assert abs(M.calibration_ratio(cal.predict_many(sigmoid(held)), yy) - 1) < 0.1


# --------------------------------------------------------------------------- per model version


def test_rolling_metrics_are_the_metrics_module_on_the_prequential_scores():
    """Each batch is scored with the parameters served before it, then learnt; the rolling
    metrics are ctrstream.metrics.summary over the last `window` of those scores."""
    cfg = CalibrationConfig(window=5000)
    vc = VersionCalibrator("v1", cfg)
    raw, y = _platt_stream(12_000, -0.8, 1.0, seed=9)
    platt_seen = []
    for s in range(0, 12_000, 1000):
        platt_seen.append(vc.predict_many(raw[s : s + 1000], method="platt"))
        vc.learn_many(raw[s : s + 1000], y[s : s + 1000], event_time_ms=np.full(1000, 10 + s))
    m = vc.metrics()
    assert m["window"] == 5000 and m["n_seen"] == 12_000 and m["model_version"] == "v1"
    assert m["raw"] == M.summary(raw[-5000:], y[-5000:])
    assert m["platt"] == M.summary(np.concatenate(platt_seen)[-5000:], y[-5000:])
    assert m["calibrated"] == m["platt"]
    assert m["last_event_time_ms"] == 10 + 11_000
    assert m["platt"]["log_loss"] < m["raw"]["log_loss"]
    params = vc.params()
    assert params["model_version"] == "v1" and params["n_seen"] == 12_000
    assert list(params) == ["model_version", "method", "platt", "isotonic", "n_seen"]
    np.testing.assert_array_equal(vc.predict_many(raw[:10]), apply_params(params, raw[:10]))


def _checkpointed(vc: VersionCalibrator) -> VersionCalibrator:
    """``vc`` written as the calibration job's checkpoint does and read back."""
    from ctrstream.calibration.job import LEARNER_CODEC
    from ctrstream.store.calibration import decode_state, encode_state

    return decode_state(encode_state(vc.to_state()), LEARNER_CODEC, "k", "the calibrator")


def _same_learner(a: VersionCalibrator, b: VersionCalibrator) -> None:
    """Equal in every field (the drift detector's window included), but the wall-clock time
    at which each one detected a drift."""
    assert a.params() == b.params() and a.metrics() == b.metrics()
    sa, sb = a.to_state(), b.to_state()
    for st in (sa, sb):
        st.drift_events = [
            {k: v for k, v in e.items() if k != "detected_ms"} for e in st.drift_events
        ]
    assert sa == sb
    raw, _ = _platt_stream(500, 0.0, 1.0, seed=12)
    ctx = {"position": np.arange(500) % 3, "device_type": np.array(["mobile", "tablet"] * 250)}
    for method in ("platt", "isotonic"):
        np.testing.assert_array_equal(
            a.predict_many(raw, ctx, method), b.predict_many(raw, ctx, method)
        )


def test_a_checkpointed_learner_resumes_exactly():
    """Checkpoint (to data and back) before a drift, right after one (boost on, average
    restarting, ADWIN just fired) and at the end: the resumed learner predicts identically
    and, fed the same examples, learns identically - drift detections included."""
    cfg = CalibrationConfig(context=("position", "device_type"), window=4000)
    vc = VersionCalibrator("v2", cfg)
    rng = np.random.default_rng(10)
    n = 40_000
    z = rng.normal(-3.2, 0.8, n)
    y = (rng.random(n) < sigmoid(z + np.where(np.arange(n) < 20_000, 0.0, 1.2))).astype(float)
    pos = rng.integers(0, 3, n)
    dev = rng.choice(np.array(["mobile", "desktop", "tablet"]), n)
    resumed: list[VersionCalibrator] = []
    for s in range(0, n, 1000):
        sl = slice(s, s + 1000)
        batch = (sigmoid(z[sl]), y[sl], {"position": pos[sl], "device_type": dev[sl]})
        times = np.arange(s, s + 1000) * 10
        for r in resumed:
            r.learn_many(*batch, event_time_ms=times)
        events = vc.learn_many(*batch, event_time_ms=times)
        if s == 10_000 or (events and len(resumed) < 2):
            back = _checkpointed(vc)
            _same_learner(back, vc)
            assert back.calibrator._boost_left > 0 or not events  # resumed mid-boost
            resumed.append(back)
    assert len(resumed) == 2, "no drift happened: the test checks nothing"
    assert resumed[1].calibrator.platt.lr_multiplier == 1.0  # the boost ran out after resuming
    for r in resumed:
        _same_learner(r, vc)
    _same_learner(_checkpointed(vc), vc)


def test_the_drift_detector_resumes_exactly_at_a_detection():
    """ADWIN's window written out field by field and read back, at the very update that
    detected a drift (the next update resets the detector): both continue identically."""
    from river import drift

    from ctrstream.calibration.state import adwin_blob, adwin_state

    rng = np.random.default_rng(3)
    stream = np.concatenate([rng.normal(0, 0.1, 3000), rng.normal(0.5, 0.1, 3000)])
    a = drift.ADWIN(delta=0.002)
    k = 0
    while not a.drift_detected:
        a.update(float(stream[k]))
        k += 1
    st = adwin_state(a._helper.__getstate__(), a.drift_detected)
    assert adwin_blob(st) == a._helper.__getstate__()
    b = C._adwin_from_state(st)
    assert b.drift_detected and b.width == a.width and b.estimation == a.estimation
    for x in stream[k:]:
        a.update(float(x))
        b.update(float(x))
        assert (a.drift_detected, a.width, a.total) == (b.drift_detected, b.width, b.total)
    assert a._helper.__getstate__() == b._helper.__getstate__()


def test_config_checks_the_method():
    with pytest.raises(ValueError, match="method must be 'platt' or 'isotonic'"):
        CalibrationConfig(method="beta")
