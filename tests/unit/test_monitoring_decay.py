"""The decay statistics (``ctrstream.monitoring.decay``), the job's logic without Kafka
(``ctrstream.monitoring.job.Monitor``), the store's decay state and the ``taste_shift``
scenario: doctests, the metrics against ``ctrstream.metrics``, the alarm rules (fires on a
model that went wrong, stays quiet on a stationary one and on a harder market), the PSI, the
label statistics, the join."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from ctrstream import metrics as M
from ctrstream.monitoring import decay as D
from ctrstream.monitoring.decay import (
    DecayConfig,
    DecayMonitor,
    LabelStats,
    VersionDecay,
    psi,
    reference_profile,
)

HOUR = 3_600_000


def test_doctests() -> None:
    result = doctest.testmod(D, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def _stream(n: int, hours: float, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).integers(0, int(hours * HOUR), n))


def _feed(mon: VersionDecay, p, y, t, o, cols=None, chunk_ms: int = 300_000) -> list[dict]:
    events = []
    edges = np.arange(0, int(t[-1]) + chunk_ms, chunk_ms)
    cuts = np.searchsorted(t, edges)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi > lo:
            c = None if cols is None else {k: v[lo:hi] for k, v in cols.items()}
            events += mon.update_many(p[lo:hi], y[lo:hi], t[lo:hi], o[lo:hi], c)
    return events


def test_window_metrics_equal_the_metrics_module() -> None:
    rng = np.random.default_rng(1)
    t = _stream(20_000, 3.0)
    o = rng.uniform(0.01, 0.1, len(t))
    p = np.clip(o * rng.lognormal(0, 0.3, len(t)), 0, 1)
    y = (rng.random(len(t)) < o).astype(float)
    mon = VersionDecay("m@1", DecayConfig(window_ms=HOUR, bucket_ms=60_000))
    _feed(mon, p, y, t, o)
    s = mon.get()
    w = t >= (t[-1] // 60_000 - 59) * 60_000  # the last 60 buckets
    assert s["n"] == int(w.sum())
    assert s["ne"] == pytest.approx(M.normalized_entropy(p[w], y[w]), rel=1e-9)
    assert s["oracle_ne"] == pytest.approx(M.normalized_entropy(o[w], y[w]), rel=1e-9)
    assert s["ne_gap"] == pytest.approx(s["ne"] / s["oracle_ne"] - 1, rel=1e-9)
    assert s["auc"] == pytest.approx(M.auc(p[w], y[w]))
    assert s["calibration_ratio"] == pytest.approx(M.calibration_ratio(p[w], y[w]))
    assert s["ece"] == pytest.approx(M.ece(p[w], y[w]))
    # the baseline: the gap over the first hour of labelled event time
    b = t < t[0] + HOUR
    expect = (M.log_loss(p[b], y[b]) * b.sum() / (M.log_loss(o[b], y[b]) * b.sum())) - 1
    assert s["baseline_gap"] == pytest.approx(expect, rel=1e-9)


def _world(n: int, hours: float, wrong_at_h: float | None, harder_at_h: float | None, seed: int):
    """Rows of a market with a true p; the served model equals the truth (a bit noisy) until
    ``wrong_at_h``, then loses its ranking; the market's CTR halves at ``harder_at_h``."""
    rng = np.random.default_rng(seed)
    t = _stream(n, hours, seed)
    logit = rng.normal(-3.5, 0.8, n)
    if harder_at_h is not None:
        logit = np.where(t >= harder_at_h * HOUR, logit - 0.7, logit)
    o = 1 / (1 + np.exp(-logit))
    noise = rng.normal(0, 0.15, n)
    served_logit = logit + noise
    if wrong_at_h is not None:
        # after the shift the model ranks by a stale half of the signal
        late = t >= wrong_at_h * HOUR
        served_logit = np.where(late, -3.5 + 0.4 * (logit + 3.5) + noise, served_logit)
    p = 1 / (1 + np.exp(-served_logit))
    y = (rng.random(n) < o).astype(float)
    return p, y, t, o


def test_alarm_fires_after_the_model_goes_wrong() -> None:
    p, y, t, o = _world(300_000, 6.0, wrong_at_h=3.0, harder_at_h=None, seed=2)
    mon = VersionDecay("m@1")
    events = _feed(mon, p, y, t, o)
    assert len(events) == 1, events  # latched: one alarm
    ev = events[0]
    assert 3 * HOUR <= ev["t_ms"] < 4 * HOUR
    s = mon.get()
    assert s["alarm"] and s["since_ms"] == ev["t_ms"] and s["reason"] == ev["reason"]
    assert s["ne_gap"] - s["baseline_gap"] > 0.03


@pytest.mark.parametrize("harder", [None, 3.0])
def test_no_alarm_on_a_stationary_model_even_when_the_market_gets_harder(harder) -> None:
    p, y, t, o = _world(300_000, 6.0, wrong_at_h=None, harder_at_h=harder, seed=3)
    mon = VersionDecay("m@1")
    assert _feed(mon, p, y, t, o) == []
    s = mon.get()
    assert not s["alarm"] and s["since_ms"] is None and s["reason"] == ""
    if harder is not None:  # the market did change: NE moved, the gap did not
        assert abs(s["ne_gap"] - s["baseline_gap"]) < 0.02


def test_no_rule_fires_without_a_reference_or_before_enough_clicks() -> None:
    p, y, t, o = _world(100_000, 4.0, wrong_at_h=2.0, harder_at_h=None, seed=4)
    mon = VersionDecay("m@1")
    assert _feed(mon, p, y, t, np.full(len(t), np.nan)) == []
    s = mon.get()
    assert math.isnan(s["ne_gap"]) and math.isnan(s["oracle_ne"]) and not s["alarm"]
    assert not math.isnan(s["ne"])
    mon2 = VersionDecay("m@1", DecayConfig(min_clicks=10**9))
    assert _feed(mon2, p, y, t, o) == []


def test_update_many_refuses_bad_input() -> None:
    mon = VersionDecay("m@1")
    with pytest.raises(ValueError, match="one of each per row"):
        mon.update_many([0.1], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="probabilities"):
        mon.update_many([1.5], [0], [0])
    with pytest.raises(ValueError, match="0 or 1"):
        mon.update_many([0.5], [2], [0])
    with pytest.raises(ValueError, match="reference"):
        mon.update_many([0.5], [1], [0], [7.0])
    with pytest.raises(ValueError, match="bucket_ms"):
        DecayConfig(bucket_ms=0)


def test_rows_out_of_order_land_in_their_bucket() -> None:
    p, y, t, o = _world(20_000, 2.0, None, None, seed=5)
    a = VersionDecay("m@1")
    a.update_many(p, y, t, o)
    b = VersionDecay("m@1")
    rng = np.random.default_rng(0)
    perm = np.argsort(t + rng.integers(-30_000, 30_000, len(t)))  # within half a bucket
    for lo in range(0, len(t), 2000):
        sel = perm[lo : lo + 2000]
        b.update_many(p[sel], y[sel], t[sel], o[sel])
    sa, sb = a.get(), b.get()
    assert sa["n"] == sb["n"]
    assert sa["ne_gap"] == pytest.approx(sb["ne_gap"], rel=1e-9)


# --------------------------------------------------------------------------- PSI


def test_psi_is_zero_on_the_training_distribution_and_grows_with_new_ids() -> None:
    rng = np.random.default_rng(6)
    ads = rng.zipf(1.5, 50_000) % 500
    prof = reference_profile({"ad_id": ads, "device_type": rng.choice(["a", "b"], 50_000)})
    assert set(prof) == {"ad", "device"}
    assert sum(prof["ad"]["shares"]) + prof["ad"]["other"] == pytest.approx(1.0)
    same = D.family_psi(prof, {"ad_id": rng.zipf(1.5, 50_000) % 500})
    assert same["ad"] < 0.01
    # a new cohort of ads takes 40 % of the traffic
    new = np.where(rng.random(50_000) < 0.4, 10_000 + rng.integers(0, 100, 50_000), ads)
    assert D.family_psi(prof, {"ad_id": new})["ad"] > 0.25
    with pytest.raises(ValueError, match="different lengths"):
        psi([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="top"):
        reference_profile({"ad_id": ads}, top=0)


def test_version_reports_psi_per_family() -> None:
    p, y, t, o = _world(30_000, 2.0, None, None, seed=7)
    rng = np.random.default_rng(7)
    cols = {"ad_category": rng.integers(0, 24, len(t)), "event_time_ms": t}
    prof = reference_profile(cols)
    mon = VersionDecay("m@1", profile=prof)
    _feed(mon, p, y, t, o, cols)
    s = mon.get()
    assert set(s["psi"]) == {"category", "hour"}
    assert s["psi"]["category"] < 0.01


# --------------------------------------------------------------------------- labels


def test_label_stats_window_and_late_share() -> None:
    ls = LabelStats(window_ms=HOUR)
    ls.update_labels([0, 10, 20], [1, 0, 1], [5_000, None, 15_000])
    ls.update_late([30])
    g = ls.get()
    assert g["clicks"] == 2 and g["late_clicks"] == 1
    assert g["late_share"] == pytest.approx(1 / 3)
    assert g["delay_mean_s"] == pytest.approx(10.0)
    ls.update_labels([2 * HOUR], [0], [None])  # everything earlier leaves the window
    g = ls.get()
    assert g["clicks"] == 0 and g["late_clicks"] == 0 and math.isnan(g["late_share"])
    with pytest.raises(ValueError, match="window_ms"):
        LabelStats(0)


# --------------------------------------------------------------------------- the monitor + state


def test_decay_state_names_the_served_version() -> None:
    mon = DecayMonitor()
    assert mon.decay_state() is None
    p, y, t, o = _world(60_000, 3.0, wrong_at_h=None, harder_at_h=None, seed=8)
    half = len(t) // 2
    mon.update_many("ctr_deep@1", p[:half], y[:half], t[:half], o[:half])
    mon.update_many("ctr_deep@2", p[half:], y[half:], t[half:], o[half:])
    st = mon.decay_state()
    assert st is not None
    assert st["version"] == "ctr_deep@2"
    assert st["alarm"] is False and st["since_ms"] is None and st["reason"] == ""
    assert isinstance(st["ne_gap"], float)
    assert set(st["versions"]) == {"ctr_deep@1", "ctr_deep@2"}
    from ctrstream.store.monitor import check_decay_state

    check_decay_state(st)


class FakeRedis:
    """What ``ctrstream.store.monitor`` uses of a redis client: get and set."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}

    def set(self, k: str, v: str) -> None:
        self.kv[k] = v.encode()

    def get(self, k: str) -> bytes | None:
        return self.kv.get(k)


def test_store_round_trip_and_refusals() -> None:
    from ctrstream.store import layout as L
    from ctrstream.store.monitor import read_decay_state, write_decay_state

    r = FakeRedis()
    assert read_decay_state(r) is None
    st = {"version": "ctr_deep@1", "alarm": True, "since_ms": 5, "reason": "gap", "ne_gap": 0.1}
    write_decay_state(r, st)
    assert read_decay_state(r) == st
    write_decay_state(r, st | {"ne_gap": math.nan, "since_ms": None, "alarm": False})
    back = read_decay_state(r)
    assert back is not None and math.isnan(back["ne_gap"]) and back["since_ms"] is None
    with pytest.raises(ValueError, match="alarm must be bool"):
        write_decay_state(r, st | {"alarm": 1})
    with pytest.raises(ValueError, match="version"):
        write_decay_state(r, {k: v for k, v in st.items() if k != "version"})
    r.kv[L.DECAY_STATE_KEY] = b"[1, 2]"
    with pytest.raises(ValueError, match="not a decay state"):
        read_decay_state(r)


# --------------------------------------------------------------------------- the job's logic


def _records(n: int, wrong_at_h: float | None, seed: int):
    from ctrstream.events import SCHEMA_VERSION, Impression, Labeled, Prediction

    p, y, t, o = _world(n, 4.0, wrong_at_h=wrong_at_h, harder_at_h=None, seed=seed)
    preds, labs, oracle = [], [], {}
    for i in range(n):
        iid = f"i-{i}"
        preds.append(
            Prediction(
                impression_id=iid,
                event_time_ms=int(t[i]),
                model_version="1",
                raw_score=float(p[i]),
                calibrated_score=float(p[i]),
                degraded=False,
                model_name="ctr_deep",
            )
        )
        imp = Impression(
            schema_version=SCHEMA_VERSION,
            impression_id=iid,
            event_time_ms=int(t[i]),
            user_id=i % 97,
            ad_id=i % 13,
            campaign_id=1,
            advertiser_id=1,
            site_id=i % 7,
            ad_category=i % 5,
            device_type="mobile",
            country="US",
            position=0,
        )
        labs.append(
            Labeled(impression=imp, clicked=int(y[i]), click_delay_ms=20_000 if y[i] else None)
        )
        oracle[iid] = float(o[i])
    return preds, labs, oracle


def test_monitor_joins_either_order_and_keeps_a_restored_alarm() -> None:
    from ctrstream.monitoring.job import Monitor, OracleSource
    from ctrstream.store.monitor import read_decay_state, write_decay_state

    preds, labs, oracle = _records(120_000, wrong_at_h=2.0, seed=9)
    src = OracleSource(None)
    src.p = oracle
    r = FakeRedis()
    job = Monitor(oracle=src, store=r)
    # labels first for the first half, predictions first for the rest, in 10k batches
    for lo in range(0, len(preds), 10_000):
        ps, ls = preds[lo : lo + 10_000], labs[lo : lo + 10_000]
        if lo < len(preds) // 2:
            job.process([], ls)
            job.process(ps, [])
        else:
            job.process(ps, ls)
    assert job.n_joined == len(preds)
    st = job.publish()
    assert st is not None and st["version"] == "ctr_deep@1"
    assert st["alarm"] and 2 * HOUR <= st["since_ms"] < 3 * HOUR
    assert read_decay_state(r) == st | {"ne_gap": pytest.approx(st["ne_gap"])}
    # duplicates are not counted twice
    assert job.process(preds[:100], labs[:100]) == 0
    # a restarted monitor keeps the raised alarm of the same version
    job2 = Monitor(oracle=src, store=r)
    job2.process(preds[-5000:], labs[-5000:])
    st2 = job2.publish()
    assert st2 is not None and st2["alarm"] and st2["since_ms"] == st["since_ms"]
    # ... and the baseline gap measured when the version started serving, not a new one
    assert job2.monitor.versions["ctr_deep@1"].baseline_gap == pytest.approx(
        job.monitor.versions["ctr_deep@1"].baseline_gap
    )
    write_decay_state(r, st | {"alarm": False, "since_ms": None, "reason": ""})


def test_oracle_source_reads_parquet_files(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctrstream.monitoring.job import OracleSource

    pq.write_table(
        pa.table({"impression_id": ["a", "b"], "p_click": [0.1, 0.2]}), tmp_path / "o.parquet"
    )
    src = OracleSource(tmp_path)
    assert src.refresh() == 2
    (tmp_path / "loop").mkdir()
    pq.write_table(
        pa.table({"impression_id": ["c"], "p_true": [0.3]}),
        tmp_path / "loop" / "impressions-1.parquet",
    )
    assert src.refresh() == 3
    (tmp_path / "loop" / "impressions-2.parquet").write_bytes(b"PAR1 half written")
    assert src.refresh() == 3  # an unreadable part is skipped, read again next time
    got = src.lookup(["a", "c", "zz"])
    assert got[:2].tolist() == [0.1, 0.3] and math.isnan(got[2])
    with pytest.raises(ValueError, match="does not exist"):
        OracleSource(tmp_path / "nope")


# --------------------------------------------------------------------------- the scenario


def test_taste_shift_is_a_centred_interaction_redrawn_at_the_shift() -> None:
    from ctrstream.simulation.generator import generate, taste_matrices, taste_shift_time_ms
    from ctrstream.simulation.scenarios import load_scenario

    sc = load_scenario("taste_shift", events=20_000, hours=2.0, n_users=5000)
    before, after = taste_matrices(sc)
    for z in (before, after):
        assert np.allclose(z.mean(axis=0), 0) and np.allclose(z.mean(axis=1), 0)
    assert not np.allclose(before, after)
    tr = generate(sc)
    assert tr.truth is not None and "taste" in tr.truth
    t = tr.impressions.column("event_time_ms").to_numpy()
    shift = taste_shift_time_ms(sc)
    assert tr.meta["taste_shift_time_ms"] == shift
    dev = tr.impressions.column("device_type").to_pylist()
    from ctrstream.simulation.generator import DEVICES

    d = np.asarray([DEVICES.index(x) for x in dev])
    c = tr.impressions.column("ad_category").to_numpy()
    expect = sc.taste_logit * np.where(t >= shift, after[d, c], before[d, c])
    assert np.allclose(tr.truth["taste"], expect)
    # the other scenarios' truth is unchanged by the new field
    steady = generate(load_scenario("steady", events=5000, hours=1.0, n_users=5000))
    assert steady.truth is not None and "taste" not in steady.truth
    with pytest.raises(ValueError, match="taste_logit"):
        load_scenario("steady", taste_logit=-1.0)


# --------------------------------------------------------------------------- the offline slice


def test_exploration_slice_weights_rows_by_inverse_propensity() -> None:
    from ctrstream.monitoring import offline as O

    assert doctest.testmod(O).failed == 0
    rng = np.random.default_rng(12)
    n = 4000
    o = rng.uniform(0.01, 0.2, n)
    y = (rng.random(n) < o).astype(float)
    a = np.clip(o * 1.3, 0, 1)
    explored = rng.random(n) < 0.3
    prop = np.where(explored, rng.choice([0.5, 0.25], n), 1.0)
    r = O.compare({"a": a, "truth": o}, y, explored=explored, propensity=prop, reference=o)
    assert r["rows"] == n and r["exploration_rows"] == int(explored.sum())
    assert r["all"]["truth"]["ne_gap"] == pytest.approx(0.0)
    assert r["all"]["a"]["ne"] == pytest.approx(M.normalized_entropy(a, y))
    # weighting by 1/propensity = repeating each explored row 1/propensity times
    rep = np.repeat(np.flatnonzero(explored), (1 / prop[explored]).astype(int))
    assert r["exploration"]["a"]["ne"] == pytest.approx(M.normalized_entropy(a[rep], y[rep]))
    assert r["exploration"]["a"]["ratio"] == pytest.approx(a[rep].mean() / y[rep].mean())
    with pytest.raises(ValueError, match="propensities"):
        O.compare({"a": a}, y, explored=explored, propensity=np.zeros(n))
    with pytest.raises(ValueError, match="scores for"):
        O.compare({"a": a[:10]}, y)


def test_taste_shift_decays_a_model_that_knew_the_old_tastes() -> None:
    """A small replay of ``taste_shift`` in event-time order: the served model is the truth
    with the tastes of before the shift (the best a model trained before it can be). The
    monitor sees no gap before the shift, and raises the alarm after it."""
    from ctrstream.simulation.generator import DEVICES, taste_matrices, taste_shift_time_ms
    from ctrstream.simulation.scenarios import load_scenario
    from ctrstream.study.data import labels_within, load_study_data

    sc = load_scenario("taste_shift", events=80_000, hours=4.0, n_users=20_000, seed=3)
    data = load_study_data(sc, history_hours=0.0)
    tr = data.traffic
    assert tr.truth is not None
    # the truth is in the generator's order; the study's rows are sorted by (time, id)
    order = np.argsort(tr.impressions.column("impression_id").to_numpy(zero_copy_only=False))
    rows = np.argsort(data.impressions.column("impression_id").to_numpy(zero_copy_only=False))
    logit = np.empty(data.n)
    taste = np.empty(data.n)
    logit[rows] = tr.truth["logit"][order]
    taste[rows] = tr.truth["taste"][order]
    dev = np.asarray([DEVICES.index(x) for x in data.impressions.column("device_type").to_pylist()])
    cat = data.impressions.column("ad_category").to_numpy()
    before, _ = taste_matrices(sc)
    stale = 1 / (1 + np.exp(-(logit - taste + sc.taste_logit * before[dev, cat])))
    assert np.allclose(1 / (1 + np.exp(-logit)), data.oracle_p)
    y = labels_within(data, int(sc.attribution_window_s * 1000)).astype(float)
    shift = taste_shift_time_ms(sc)
    mon = VersionDecay("stale@1", DecayConfig(min_clicks=150))
    events = _feed(mon, stale, y, data.t, data.oracle_p)
    assert mon.baseline_gap is not None and abs(mon.baseline_gap) < 0.01  # the old market
    assert len(events) == 1 and shift <= events[0]["t_ms"] <= shift + HOUR, events
    assert mon.get()["ne_gap"] > 0.03


def test_monitor_command_refuses_bad_options_before_touching_kafka(tmp_path) -> None:
    from typer.testing import CliRunner

    from ctrstream.cli.app import build_app

    res = CliRunner().invoke(build_app(), ["monitor", "--window-min", "0"])
    assert res.exit_code == 2 and "bucket_ms" in res.output
    bad = tmp_path / "profile.json"
    bad.write_text("{not json")
    res = CliRunner().invoke(build_app(), ["monitor", "--profile", str(bad)])
    assert res.exit_code == 2 and "reference_profile" in res.output
