"""Online calibration: Platt on a down-sampling distortion, drift, the join, the job."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from ctrstream.calibration.calibrator import CalibrationConfig, VersionCalibrator
from ctrstream.calibration.client import CalibratorClient
from ctrstream.calibration.job import Calibrate, run
from ctrstream.calibration.params import sigmoid
from ctrstream.events import Impression, Labeled, Prediction, encode
from ctrstream.metrics import log_loss
from ctrstream.metrics import summary as calibration_summary
from ctrstream.store.calibration import CalibrationStore

W = 0.1  # negatives kept when the (miscalibrated) model was trained


def downsample_distort(p):
    """What a model trained on 10%-down-sampled negatives without correction predicts."""
    return p / (p + (1 - p) * W)


def _imp(iid: str, t: int, position: int = 0, device: str = "mobile") -> Impression:
    return Impression(
        schema_version=1,
        impression_id=iid,
        event_time_ms=int(t),
        user_id=1,
        ad_id=2,
        campaign_id=3,
        advertiser_id=4,
        site_id=5,
        ad_category=6,
        device_type=device,
        country="US",
        position=int(position),
    )


def _records(ids, t, raw, y, mv, positions=None, devices=None):
    preds, labs = [], []
    for k in range(len(ids)):
        pos = int(positions[k]) if positions is not None else 0
        dev = str(devices[k]) if devices is not None else "mobile"
        preds.append(
            Prediction(
                impression_id=ids[k],
                event_time_ms=int(t[k]),
                model_version=mv,
                raw_score=float(raw[k]),
                calibrated_score=float(raw[k]),
                degraded=False,
            )
        )
        labs.append(
            Labeled(
                impression=_imp(ids[k], t[k], pos, dev),
                clicked=int(y[k]),
                click_delay_ms=1000 if y[k] else None,
            )
        )
    return preds, labs


def _generator_stream(events: int, seed: int):
    """Impressions of the synthetic generator in event-time order with their oracle
    probability and their label (a click attributed within the window)."""
    from ctrstream.simulation.generator import generate, load_scenario

    tr = generate(load_scenario("steady", events=events, seed=seed))
    imp = tr.impressions
    ids = imp["impression_id"].to_pylist()
    t = imp["event_time_ms"].to_numpy()
    oracle = dict(zip(tr.oracle["impression_id"].to_pylist(), tr.oracle["p_click"].to_numpy()))
    p = np.array([oracle[i] for i in ids])
    clicks = tr.clicks
    c_t = dict(zip(clicks["impression_id"].to_pylist(), clicks["event_time_ms"].to_numpy()))
    win = tr.scenario.attribution_window_s * 1000
    y = np.array([1.0 if (i in c_t and c_t[i] - tt <= win) else 0.0 for i, tt in zip(ids, t)])
    order = np.argsort(t, kind="stable")
    return (
        [ids[k] for k in order],
        t[order],
        p[order],
        y[order],
        imp["position"].to_numpy()[order],
        np.asarray(imp["device_type"].to_pylist())[order],
    )


@pytest.fixture
def store(settings):
    r = redis.Redis.from_url(settings.redis.url)
    yield CalibrationStore(r)
    r.close()


# --------------------------------------------------------------------------- the acceptance test

N_TRAIN = 120_000  # labeled examples learned from before the check


def test_platt_corrects_downsampling_distortion(settings, store, unique):
    """Raw scores = oracle p through p' = p/(p+(1-p)*0.1): about 9x too high. After
    N_TRAIN labeled examples through the job's join, the served calibrator (read by
    CalibratorClient from Redis) gets the mean within 10% of the observed CTR on held-out
    traffic and cuts the ECE by far."""
    ids, t, p, y, pos, dev = _generator_stream(160_000, seed=3)
    raw = downsample_distort(p)
    mv = f"m-{unique}"
    job = Calibrate(settings, job_name=f"t-{unique}", resume=False)
    for s in range(0, N_TRAIN, 2000):
        sl = slice(s, min(s + 2000, N_TRAIN))
        preds, labs = _records(ids[sl], t[sl], raw[sl], y[sl], mv, pos[sl], dev[sl])
        # labels first for half of each batch, predictions first for the other half
        h = len(preds) // 2
        job.process([], labs[:h])
        job.process(preds, [])
        job.process([], labs[h:])
    assert job.n_joined == N_TRAIN
    job.checkpoint()

    client = CalibratorClient(settings)
    held = slice(N_TRAIN, None)
    cal = client.calibrate(raw[held], mv)
    before = calibration_summary(raw[held], y[held])
    after = calibration_summary(cal, y[held])
    oracle = calibration_summary(p[held], y[held])
    print(f"\nheld-out {len(cal)} impressions, {int(y[held].sum())} clicks")
    for name, m in (("raw", before), ("calibrated", after), ("oracle", oracle)):
        print(
            f"{name:10s} mean/obs {m['ratio']:.3f}  ECE {m['ece']:.4f}  logloss {m['log_loss']:.4f}"
        )
    assert before["ratio"] > 5
    assert abs(after["ratio"] - 1) < 0.10
    assert after["ece"] < before["ece"] / 10
    assert after["log_loss"] < before["log_loss"] * 0.8
    # the calibrated score ranks like the raw one (a monotone map)
    assert np.all(np.diff(cal[np.argsort(raw[held])]) >= -1e-12)
    # metrics in Redis for the report
    m = store.metrics(mv)
    assert m["n_seen"] == N_TRAIN and m["raw"]["ratio"] > 5


# --------------------------------------------------------------------------- drift


def _synthetic(n, rng, shift=0.0):
    z = rng.normal(-3.2, 0.8, n)
    p_model = sigmoid(z)  # what the (stale) model believes
    p_true = sigmoid(z + shift)
    y = (rng.random(n) < p_true).astype(float)
    return p_model, p_true, y


def test_drift_is_detected_and_calibration_recovers():
    """A calibrated stream whose true CTR jumps (+0.9 logit, ~2.3x) at example 40,000: ADWIN
    on the residual fires soon after the shift, and the windowed mean/observed ratio is back
    within 10% within 15,000 examples of the shift."""
    rng = np.random.default_rng(7)
    cfg = CalibrationConfig(window=8000)
    vc = VersionCalibrator("drift-test", cfg)
    pre_m, _, pre_y = _synthetic(40_000, rng)
    for s in range(0, 40_000, 1000):
        vc.learn_many(pre_m[s : s + 1000], pre_y[s : s + 1000])
    n_drift_before = len(vc.drift_events)
    pre = vc.metrics()["calibrated"]
    assert abs(pre["ratio"] - 1) < 0.1

    post_m, post_p, post_y = _synthetic(40_000, rng, shift=0.9)
    # right after the shift the stale calibration is far off
    stale = calibration_summary(vc.predict_many(post_m[:5000]), post_y[:5000])
    assert stale["ratio"] < 0.7, stale
    ratios = []
    for s in range(0, 40_000, 1000):
        vc.learn_many(post_m[s : s + 1000], post_y[s : s + 1000])
        ratios.append((s + 1000, vc.metrics()["calibrated"]["ratio"]))
    new = vc.drift_events[n_drift_before:]
    assert new, "the drift detector did not fire after the shift"
    assert new[0]["n_seen"] - 40_000 < 5000, new[0]
    assert new[0]["window_mean_residual"] > 0  # more clicks than predicted
    # the windowed calibration is back within tolerance 15k examples later, and stays
    late = [r for n, r in ratios if n >= 15_000]
    print("\npost-shift windowed mean/obs:", [(n, round(r, 3)) for n, r in ratios[::5]])
    assert all(abs(r - 1) < 0.10 for r in late), late
    # a held-out post-shift check of the served map
    m, p_true, yy = _synthetic(50_000, rng, shift=0.9)
    assert abs(calibration_summary(vc.predict_many(m), yy)["ratio"] - 1) < 0.08


def test_drift_events_and_metrics_reach_redis_and_prometheus(settings, store, unique):
    from prometheus_client import REGISTRY

    rng = np.random.default_rng(11)
    mv = f"d-{unique}"
    job = Calibrate(settings, job_name=f"t-{unique}", resume=False)
    n = 0
    for shift in (0.0, 1.0):
        m, _, y = _synthetic(30_000, rng, shift)
        raw = m
        for s in range(0, 30_000, 3000):
            ids = [f"{unique}-{n + k}" for k in range(3000)]
            preds, labs = _records(
                ids, np.full(3000, 1_700_000_000_000 + n), raw[s : s + 3000], y[s : s + 3000], mv
            )
            job.process(preds, labs)
            n += 3000
    job.checkpoint()
    drift = store.drift_events(mv)
    assert drift, "no drift event in Redis"
    # predictions without a model name: label model="" (calibrated by their version alone)
    assert REGISTRY.get_sample_value(
        "ctrstream_calibration_drift_total", {"model": "", "model_version": mv}
    ) == len(drift)
    assert (
        REGISTRY.get_sample_value(
            "ctrstream_calibration_joined_total", {"model": "", "model_version": mv}
        )
        == 60_000
    )
    ece = REGISTRY.get_sample_value(
        "ctrstream_calibration_ece", {"model": "", "model_version": mv, "score": "platt"}
    )
    assert ece is not None and 0 <= ece < 0.05


# --------------------------------------------------------------------------- the join


def test_join_either_order_duplicates_and_expiry(settings, unique):
    job = Calibrate(settings, job_name=f"t-{unique}", resume=False, retention_ms=60_000)
    mv = f"j-{unique}"
    t0 = 1_700_000_000_000
    ids = [f"{unique}-{k}" for k in range(6)]
    preds, labs = _records(ids, [t0] * 6, [0.1] * 6, [1, 0, 0, 1, 0, 0], mv)
    assert job.process(preds[:3], labs[3:]) == 0  # no pair yet
    assert job.process(preds[3:], labs[:3]) == 6  # each completes the other side
    assert job.calibrator(mv).n_seen == 6
    assert job.calibrator(mv).n_clicks == 2
    assert job.process(preds[:2], labs[4:]) == 0  # replays are not learned twice
    assert job.dropped["duplicate"] == 4
    # an unmatched prediction expires when the label stream is 60 s past it, not before
    lonely, _ = _records([f"{unique}-lonely"], [t0], [0.2], [0], mv)
    job.process(lonely, [])
    _, later = _records([f"{unique}-x"], [t0 + 59_000], [0.2], [0], mv)
    job.process([], later)
    assert f"{unique}-lonely" in job.state.preds
    _, later = _records([f"{unique}-y"], [t0 + 61_000], [0.2], [0], mv)
    job.process([], later)
    assert f"{unique}-lonely" not in job.state.preds
    assert job.dropped["pred_expired"] == 1
    # the cap bounds the held state
    small = Calibrate(settings, job_name=f"t2-{unique}", resume=False, max_pending=100)
    preds, _ = _records(
        [f"{unique}-c{k}" for k in range(250)], [t0] * 250, [0.1] * 250, [0] * 250, mv
    )
    small.process(preds, [])
    assert len(small.state.preds) == 100 and small.dropped["pred_capped"] == 150


def test_client_reloads_when_a_new_checkpoint_lands(settings, store, unique):
    mv = f"c-{unique}"
    client = CalibratorClient(settings, check_interval_s=0.0)
    x = np.array([0.05, 0.2, 0.5])
    assert np.allclose(client.calibrate(x, mv), x)  # no calibrator yet: identity
    job = Calibrate(settings, job_name=f"t-{unique}", resume=False)
    rng = np.random.default_rng(3)
    p = sigmoid(rng.normal(-3, 0.7, 20_000))
    y = (rng.random(20_000) < p).astype(float)
    raw = downsample_distort(p)
    ids = [f"{unique}-{k}" for k in range(20_000)]
    preds, labs = _records(ids, np.full(20_000, 1_700_000_000_000), raw, y, mv)
    job.process(preds[:2000], labs[:2000])
    job.checkpoint()
    v1 = store.checkpoints(mv)
    assert v1 >= 1
    first = client.calibrate(x, mv)
    assert not np.allclose(first, x)
    job.process(preds[2000:], labs[2000:])
    job.checkpoint()
    assert store.checkpoints(mv) == v1 + 1
    second = client.calibrate(x, mv)  # same client, no restart
    truth = W * x / (1 - x + W * x)  # the inverse of the distortion
    assert np.abs(second - truth).sum() < np.abs(first - truth).sum()  # it learned more
    # with the interval not elapsed, no Redis read at all
    lazy = CalibratorClient(settings, check_interval_s=3600)
    lazy.calibrate(x, mv)
    reloads = lazy.reloads
    store.announce()
    lazy.calibrate(x, mv)
    assert lazy.reloads == reloads


def test_client_survives_redis_down():
    client = CalibratorClient(
        redis_client=redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    )
    x = np.array([0.01, 0.3])
    assert np.allclose(client.calibrate(x, "any"), x)


# --------------------------------------------------------------------------- the Kafka job


def _produce(settings, preds, labs):
    from ctrstream.kafka.clients import make_producer

    prod = make_producer(settings)
    for p in preds:
        prod.produce(
            settings.topics.predictions.name, key=p.impression_id.encode(), value=encode(p)
        )
    for lb in labs:
        prod.produce(
            settings.topics.labeled.name, key=lb.impression.impression_id.encode(), value=encode(lb)
        )
    assert prod.flush(30) == 0


def _deadline(seconds):
    end = time.monotonic() + seconds

    def check():
        if time.monotonic() > end:
            raise TimeoutError("the calibration job did not get there in time")

    return check


def test_kafka_job_joins_learns_checkpoints_and_resumes(fresh_topics, store, unique):
    s = fresh_topics
    mv = f"k-{unique}"
    rng = np.random.default_rng(5)
    n = 6000
    p = sigmoid(rng.normal(-3, 0.7, n))
    y = (rng.random(n) < p).astype(float)
    raw = downsample_distort(p)
    ids = [f"{unique}-{k}" for k in range(n)]
    preds, labs = _records(ids, 1_700_000_000_000 + np.arange(n) * 100, raw, y, mv)
    # first half: labels of the first 3000 and predictions of the first 2000 only
    _produce(s, preds[:2000], labs[:3000])
    tick = _deadline(60)
    job = run(
        s,
        job_name=f"k-{unique}",
        checkpoint_interval_s=0.2,
        stop=lambda j: tick() or j.n_joined >= 2000 and len(j.state.labels) == 1000,
    )
    assert job.calibrator(mv).n_seen == 2000
    v1 = store.checkpoints(mv)
    assert v1 >= 1
    # restart: the held labels and the positions come back from the checkpoint
    _produce(s, preds[2000:], labs[3000:])
    tick = _deadline(60)
    job2 = run(
        s,
        job_name=f"k-{unique}",
        checkpoint_interval_s=0.2,
        stop=lambda j: tick() or j.calibrator(mv).n_seen >= n,
    )
    c = job2.calibrator(mv)
    assert c.n_seen == n  # nothing learned twice, nothing lost
    assert c.n_clicks == int(y.sum())
    assert not job2.state.labels and not job2.state.preds
    assert store.checkpoints(mv) > v1
    assert store.has_job(f"k-{unique}")
    # the served map moved towards the truth: the raw mean is over 4x the observed CTR; the
    # served one has at most a fifth of that error, and a lower log loss, after only 6000
    # examples. (The job learns in whatever micro-batches Kafka delivers, so the learning
    # order, and with it the drift detector's boost, varies between runs: 20-36 % off the
    # observed CTR in the runs on record. The convergence claim itself is tested offline, in
    # order, above.)
    cal = CalibratorClient(s).calibrate(raw, mv)
    raw_error = raw.mean() / y.mean() - 1
    assert raw_error > 3
    assert abs(cal.mean() / y.mean() - 1) < raw_error / 5
    assert log_loss(cal, y) < log_loss(raw, y)


class _Payload:
    """A pickle that creates a directory when unpickled: what a plain SET can plant."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize("target", ["job", "learner"])
def test_a_pickle_set_at_a_state_key_is_refused_by_calibrate_and_runs_nothing(
    settings, fresh_topics, stack_env, unique, tmp_path, target
):
    """``ctrstream calibrate`` started over a state key that someone SET to a malicious
    pickle exits with a clear error naming the key and what to do; the payload never runs."""
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    from ctrstream.stack.manager import settings_env
    from ctrstream.store import layout as L

    marker = tmp_path / "ran"
    name = f"evil-{unique}"
    mv = f"evil-m-{unique}"
    key = L.cal_job_key(name) if target == "job" else L.cal_state_key(mv)
    r = redis.Redis.from_url(settings.redis.url)
    try:
        r.set(key, pickle.dumps(_Payload(marker)))
        if target == "learner":
            r.sadd(L.CAL_VERSIONS_KEY, mv)
        env = {**stack_env, **settings_env(fresh_topics)}
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "ctrstream"),
                "calibrate",
                "--job-name",
                name,
                "--until-idle",
                "1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        r.delete(key)
        r.srem(L.CAL_VERSIONS_KEY, mv)
        r.close()
    assert proc.returncode == 2, proc.stderr
    assert "not a ctrstream state" in proc.stderr and repr(key) in proc.stderr
    assert f"DEL {key}" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
