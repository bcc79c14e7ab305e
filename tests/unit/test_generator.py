"""The synthetic traffic generator: statistics match the configuration, the truth is coherent,
output is deterministic, and dirty injections are exactly what ``Traffic`` says they are."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.compute as pc
import pytest

from ctrstream.events import Click, DecodeError, Impression, decode_click, decode_impression, encode
from ctrstream.simulation.generator import (
    EXPECTED_REASON,
    MALFORMED_KINDS,
    generate,
    load_scenario,
    read_traffic,
    write_traffic,
    zipf_probabilities,
)


@pytest.fixture(scope="module")
def steady():
    return generate(load_scenario("steady", events=100_000, seed=11, base_ctr=0.03))


@pytest.fixture(scope="module")
def dirty():
    return generate(load_scenario("dirty", events=20_000, seed=5))


def _delays(tr) -> np.ndarray:
    imp_t = dict(
        zip(
            tr.impressions["impression_id"].to_pylist(), tr.impressions["event_time_ms"].to_pylist()
        )
    )
    return np.array(
        [
            t - imp_t[i]
            for i, t in zip(
                tr.clicks["impression_id"].to_pylist(), tr.clicks["event_time_ms"].to_pylist()
            )
        ]
    )


def test_schema_and_order(steady):
    # the open-loop traffic has the required fields; the optional ones (the closed loop's
    # request_id, arm, price) stay at their defaults and are not columns of it
    optional = len(Impression.__struct_defaults__)
    assert optional == 3
    assert steady.impressions.column_names == list(Impression.__struct_fields__[:-optional])
    assert steady.clicks.column_names == list(Click.__struct_fields__)
    assert steady.oracle.column_names == ["impression_id", "p_click"]
    assert steady.impressions.num_rows == 100_000
    for t in (steady.impressions, steady.clicks):
        ts = t["event_time_ms"].to_numpy()
        assert np.all(np.diff(ts) >= 0)
    ids = steady.impressions["impression_id"]
    assert pc.count_distinct(ids).as_py() == steady.impressions.num_rows
    assert steady.oracle["impression_id"].equals(ids)
    sc = steady.scenario
    ts = steady.impressions["event_time_ms"].to_numpy()
    assert sc.start_ms <= ts.min() and ts.max() < sc.end_ms


@pytest.mark.parametrize("base_ctr", [0.01, 0.03])
def test_realized_ctr_matches_config_and_oracle(base_ctr):
    tr = generate(load_scenario("steady", events=100_000, seed=3, base_ctr=base_ctr))
    n, c = tr.impressions.num_rows, tr.clicks.num_rows
    ctr = c / n
    # the intercept is solved for base_ctr; the trending term may shift it a little
    assert abs(ctr / base_ctr - 1) < 0.12, (ctr, base_ctr)
    p = tr.oracle["p_click"].to_numpy()
    assert np.all((p > 0) & (p < 1))
    se = np.sqrt(np.sum(p * (1 - p))) / n  # sd of the realized CTR given the true p
    assert abs(p.mean() - ctr) < 4 * se, (p.mean(), ctr, se)
    # the truth is informative: clicked impressions have a much higher true p on average
    clicked = pc.is_in(tr.oracle["impression_id"], value_set=tr.clicks["impression_id"]).to_numpy(
        zero_copy_only=False
    )
    assert p[clicked].mean() > 1.5 * p[~clicked].mean()


def test_click_delay_distribution(steady):
    sc = steady.scenario
    d = _delays(steady)
    assert len(d) == steady.clicks.num_rows > 2000
    assert d.min() >= 1
    window = sc.attribution_window_s * 1000
    late = d > window
    se = np.sqrt(sc.late_click_fraction * (1 - sc.late_click_fraction) / len(d))
    assert abs(late.mean() - sc.late_click_fraction) < 4 * se + 1e-3
    assert (d[late] - window).min() > 0
    log_d = np.log(d[~late] / 1000.0)
    # log-normal within the window: median and spread as configured (truncation is tiny)
    assert abs(np.median(log_d) - np.log(sc.click_delay_median_s)) < 0.1
    assert abs(log_d.std() / sc.click_delay_sigma - 1) < 0.08
    assert d[~late].max() < window
    assert np.quantile(d, 0.9) > 60_000  # "seconds to many minutes"


def test_popularity_skew(steady):
    sc = steady.scenario
    n = steady.impressions.num_rows
    for col, size, s, q in (
        ("site_id", sc.n_sites, sc.site_zipf, sc.site_zipf_offset),
        ("user_id", sc.n_users, sc.user_zipf, sc.user_zipf_offset),
    ):
        counts = np.bincount(steady.impressions[col].to_numpy(), minlength=size)
        expected = zipf_probabilities(size, s, q)
        # the 20 most popular ids: each within 5 standard errors of its Zipf expectation
        top = np.arange(20)
        sd = np.sqrt(n * expected[top] * (1 - expected[top]))
        assert np.all(np.abs(counts[top] - n * expected[top]) < 5 * sd + 1), col
        # head share of the top 1% of ids as configured (within 3 points)
        k = max(1, size // 100)
        assert abs(counts[:k].sum() / n - expected[:k].sum()) < 0.03, col
    ads = np.sort(np.bincount(steady.impressions["ad_id"].to_numpy(), minlength=sc.n_ads))[::-1]
    assert ads[: sc.n_ads // 100].sum() / n > 0.2  # heavy tail: top 1% of ads > 20% of traffic


def test_same_seed_identical_different_seed_different(tmp_path):
    sc = load_scenario("dirty", events=5_000, seed=42)
    a, b = generate(sc), generate(sc)
    c = generate(sc.replace(seed=43))
    assert a.impressions.equals(b.impressions) and a.clicks.equals(b.clicks)
    assert a.oracle.equals(b.oracle)
    ra, rb = list(a.records()), list(b.records())
    assert ra == rb
    assert a.injected == b.injected
    assert list(c.records()) != ra
    assert not c.impressions.equals(a.impressions)
    assert not np.array_equal(c.oracle["p_click"].to_numpy(), a.oracle["p_click"].to_numpy())
    write_traffic(a, tmp_path / "a", jsonl=True)
    write_traffic(b, tmp_path / "b", jsonl=True)
    write_traffic(c, tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {
        "impressions.parquet",
        "clicks.parquet",
        "oracle.parquet",
        "scenario.json",
        "malformed.parquet",
        "impressions.jsonl",
        "clicks.jsonl",
    } <= set(files)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "impressions.parquet").read_bytes() != (
        tmp_path / "c" / "impressions.parquet"
    ).read_bytes()
    # recorded traffic replays exactly like the generated one
    back = read_traffic(tmp_path / "a")
    assert back.scenario == a.scenario
    assert back.impressions.equals(a.impressions) and back.oracle.equals(a.oracle)
    assert list(back.records()) == ra


def test_clean_records_use_the_codec(steady):
    recs = list(steady.records())
    n_i, n_c = steady.impressions.num_rows, steady.clicks.num_rows
    assert len(recs) == len(steady) == n_i + n_c
    kinds = [r[0] for r in recs]
    assert kinds.count("impressions") == n_i and kinds.count("clicks") == n_c
    ts = np.array([r[3] for r in recs])
    assert np.all(np.diff(ts) >= 0)  # clean traffic is in event-time order
    rows = {r["impression_id"]: r for r in steady.impressions.slice(0, 2000).to_pylist()}
    seen = 0
    for kind, key, value, t in recs:
        ev = decode_impression(value) if kind == "impressions" else decode_click(value)
        assert key == ev.impression_id.encode() and t == ev.event_time_ms
        assert encode(ev) == value
        if kind == "impressions" and ev.impression_id in rows:
            assert value == encode(Impression(**rows[ev.impression_id]))
            seen += 1
    assert seen == 2000
    # every click comes after its impression, and carries the impression's ids
    first = {}
    for kind, key, _, t in recs:
        if kind == "impressions":
            first[key] = t
        else:
            assert key in first and first[key] < t


def test_dirty_injections_are_exactly_what_is_reported(dirty):
    sc, inj = dirty.scenario, dirty.injected
    n_clean = dirty.impressions.num_rows + dirty.clicks.num_rows
    assert inj["duplicates"] == round(sc.duplicate_rate * n_clean) > 0
    assert inj["out_of_order"] == round(sc.out_of_order_rate * n_clean) > 0
    assert inj["late"] == round(sc.late_event_rate * n_clean) > 0
    per_kind = round(sc.malformed_rate * n_clean)
    assert inj["malformed"] == {k: per_kind for k in MALFORMED_KINDS} and per_kind > 0
    recs = list(dirty.records())
    assert len(recs) == inj["records"] == n_clean + inj["duplicates"] + 4 * per_kind
    for tk in ("impressions", "clicks"):
        assert sum(r[0] == tk for r in recs) == inj["by_topic"][tk]["records"]

    expected = {
        k.encode(): (kind, topic)
        for k, kind, topic in zip(
            dirty.malformed["key"].to_pylist(),
            dirty.malformed["kind"].to_pylist(),
            dirty.malformed["topic"].to_pylist(),
        )
    }
    failed, values = {}, []
    lateness = sc.allowed_lateness_s * 1000
    running_max, behind_any, behind_late = 0, 0, 0
    last_ts_of_key: dict[bytes, int] = {}
    for kind, key, value, ts in recs:
        try:
            ev = decode_impression(value) if kind == "impressions" else decode_click(value)
        except DecodeError as e:
            failed[key] = (e.reason, kind)
            continue
        values.append(value)
        if ts < running_max:
            behind_any += 1
            behind_late += ts < running_max - lateness
        running_max = max(running_max, ts)
        # event-time order per key survives the injections
        assert ts >= last_ts_of_key.get(key, 0)
        last_ts_of_key[key] = ts
        assert ev.event_time_ms == ts
    # exactly the injected malformed records fail, each with the reason of its kind
    assert set(failed) == set(expected)
    for key, (reason, topic) in failed.items():
        kind, want_topic = expected[key]
        assert topic == want_topic
        assert reason.startswith(EXPECTED_REASON[kind]), (kind, reason)
    # duplicates are exact copies
    assert len(values) - len(set(values)) == inj["duplicates"]
    # late records are behind the stream by more than the allowed lateness
    assert behind_late == inj["late"]
    assert behind_any >= inj["late"] + 0.9 * inj["out_of_order"]


def test_recency_effects_are_in_the_truth():
    def fatigue_gap(**ov):
        tr = generate(load_scenario("steady", events=60_000, seed=2, n_users=20_000, hours=2, **ov))
        user = tr.impressions["user_id"].to_numpy().astype(np.int64)
        ad = tr.impressions["ad_id"].to_numpy().astype(np.int64)
        t = tr.impressions["event_time_ms"].to_numpy()
        key = user * 100_000 + ad
        o = np.lexsort((t, key))
        ks, ts = key[o], t[o]
        n_prev = np.zeros(len(ks), dtype=np.int64)
        for i in range(1, len(ks)):  # earlier impressions of the same (user, ad) in 1 h
            j = i - 1
            while j >= 0 and ks[j] == ks[i] and ts[i] - ts[j] <= 3_600_000:
                j -= 1
            n_prev[i] = i - 1 - j
        counts = np.empty_like(n_prev)
        counts[o] = n_prev
        p = tr.oracle["p_click"].to_numpy()
        logit = np.log(p / (1 - p))
        return logit[counts >= 3].mean() - logit[counts == 0].mean(), (counts >= 3).sum()

    gap, n_rep = fatigue_gap()
    assert n_rep > 1000
    assert gap < -0.6  # fatigue: ~ -(0.5 log 4 + 0.25 log 4) and more
    gap_off, _ = fatigue_gap(fatigue_ad=0.0, fatigue_advertiser=0.0)
    assert gap_off > gap + 0.5


def test_drift_shifts_one_campaign():
    tr = generate(load_scenario("drift", events=60_000, seed=4))
    camp, t0 = tr.meta["drift_campaign"], tr.meta["drift_time_ms"]
    assert camp is not None and tr.scenario.start_ms < t0 < tr.scenario.end_ms
    p = tr.oracle["p_click"].to_numpy()
    logit = np.log(p / (1 - p))
    c = tr.impressions["campaign_id"].to_numpy() == camp
    after = tr.impressions["event_time_ms"].to_numpy() >= t0
    assert c.sum() > 500
    shift = logit[c & after].mean() - logit[c & ~after].mean()
    other = logit[~c & after].mean() - logit[~c & ~after].mean()
    assert abs((shift - other) - tr.scenario.drift_logit) < 0.3


def test_generation_is_fast():
    t = time.perf_counter()
    tr = generate(load_scenario("dirty", events=100_000, seed=1))
    n = sum(1 for _ in tr.records())
    assert n > 100_000
    assert time.perf_counter() - t < 5.0  # generously above the ~0.5 s it takes


def test_scenario_validation():
    with pytest.raises(ValueError, match="unknown scenario"):
        load_scenario("nope")
    with pytest.raises(ValueError, match="unknown scenario field"):
        load_scenario("steady", bogus=1)
    with pytest.raises(ValueError, match="base_ctr"):
        load_scenario("steady", base_ctr=0.9)


def test_ad_walk_is_a_random_walk_of_each_ads_effect():
    sc = load_scenario("steady", events=60_000, hours=48.0, ad_walk_sigma_per_day=0.4)
    tr = generate(sc)
    walk = tr.truth["ad_walk"]
    t = tr.impressions.column("event_time_ms").to_numpy()
    day = (t - sc.start_ms) // 86_400_000
    hour = (t - sc.start_ms) // 3_600_000
    # 0 at the start, spread growing like sqrt(time): std ~0.4 after one day, ~0.57 after two
    assert walk[hour == 0].std() < 0.08  # one hourly step: 0.4 * sqrt(1 / 24) = 0.082 at its end
    assert 0.3 < walk[(hour >= 23) & (hour < 25)].std() < 0.5
    assert walk[day == 1].std() > walk[day == 0].std() * 1.5
    # the term is part of the truth's logit, and the same ad at the same time has one value
    ads = tr.impressions.column("ad_id").to_numpy()
    same = (ads == ads[-1]) & (hour == hour[-1])
    assert np.ptp(walk[same]) < 0.4 * np.sqrt(1 / 24) * 4
    # no walk: the truth has no such term and the traffic is what it was
    flat = generate(load_scenario("steady", events=60_000, hours=48.0))
    assert "ad_walk" not in flat.truth
    assert not np.array_equal(flat.oracle.column("p_click"), tr.oracle.column("p_click"))
