"""The closed-loop world (ctrstream.simulation.world): one truth with the open-loop generator,
requests and candidates, state that the closed loop changes, clicks, checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from ctrstream.simulation.generator import (
    COUNTRIES,
    DEVICE_LOGIT,
    DEVICES,
    _market,
    generate,
    load_scenario,
)
from ctrstream.simulation.world import RequestBatch, Shown, World

MIN = 60_000


def _digest(tr) -> str:
    """sha256 over every column of the tables, the truth arrays and the meta."""
    h = hashlib.sha256()
    for name, tab in (("imps", tr.impressions), ("clicks", tr.clicks), ("oracle", tr.oracle)):
        for col in tab.column_names:
            h.update(f"{name}.{col}".encode())
            a = tab.column(col).combine_chunks()
            if a.type == "string":
                h.update(repr(a.to_pylist()).encode())
            else:
                h.update(a.to_numpy(zero_copy_only=False).tobytes())
    for k in sorted(tr.truth):
        h.update(k.encode())
        h.update(np.asarray(tr.truth[k], dtype=np.float64).tobytes())
    h.update(json.dumps(tr.meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def test_open_loop_generate_is_unchanged():
    # digests of generate() taken before the generator was refactored to share its truth with
    # the world (numpy 2.4 / pyarrow 26); the closed-loop Scenario fields do not enter it
    assert (
        _digest(generate(load_scenario("steady", events=40_000, seed=3)))
        == "2b6ad7d98cbd4141c0f61e1ca694402180c401871febea0e54c054b22e3ad173"
    )
    assert (
        _digest(generate(load_scenario("drift", events=60_000, seed=11, hours=2.0)))
        == "162e6b30476bc772c20b02f784d7bbb8347f447c3f8b4bb9245e031333596a84"
    )


def _first_slots(b: RequestBatch) -> Shown:
    """A stand-in decision: each request's first n_slots candidates, in order."""
    pos = np.arange(b.n_candidates) - b.cand_offsets[b.cand_request]
    ci = np.flatnonzero(pos < b.n_slots[b.cand_request])
    return Shown.of(b, ci, pos[ci])


def _run(w: World, t0: int, t1: int, step: int):
    """Requests in windows of ``step`` ms, each shown by _first_slots."""
    out = []
    for a in range(t0, t1, step):
        b = w.requests(a, min(a + step, t1))
        sh = _first_slots(b)
        out.append((b, sh, w.show(b, sh)))
    return out


def _cat(runs, f):
    return np.concatenate([f(*r) for r in runs])


@pytest.fixture(scope="module")
def steady():
    return load_scenario("steady", events=20_000, seed=4, hours=2.0, n_users=20_000)


def test_requests_deterministic_and_independent_of_the_windows(steady):
    t0 = steady.start_ms + 7 * MIN
    w1, w2 = World(steady, t0), World(steady, t0)
    r1 = _run(w1, t0, t0 + 3 * MIN, 10_000)
    r2 = _run(w2, t0, t0 + 3 * MIN, 45_000)
    for f in (
        lambda b, s, o: b.request_id,
        lambda b, s, o: b.event_time_ms,
        lambda b, s, o: b.user_id,
        lambda b, s, o: b.site_id,
        lambda b, s, o: b.device_type,
        lambda b, s, o: b.n_slots,
        lambda b, s, o: b.cand_ad_id,
        lambda b, s, o: b.cand_bid,
        lambda b, s, o: o.p_true,  # the truth of a shown ad does not depend on the batching
        lambda b, s, o: o.clicked,
        lambda b, s, o: o.click_time_ms,
    ):
        assert np.array_equal(_cat(r1, f), _cat(r2, f))
    t = _cat(r1, lambda b, s, o: b.event_time_ms)
    assert len(t) > 100 and (np.diff(t) >= 0).all() and t.min() >= t0 and t.max() < t0 + 3 * MIN
    ids = _cat(r1, lambda b, s, o: b.request_id)
    assert ids[0] == f"q{steady.seed}-000000000000" and len(set(ids.tolist())) == len(ids)
    # ~ the scenario's impression rate / mean slots, on average over the scenario's span
    assert 0.5 < len(t) / 180 / World(steady, t0).request_rate < 1.5


def test_candidates_obey_targeting_are_distinct_and_include_new_ads():
    sc = load_scenario(
        "steady",
        events=20_000,
        seed=5,
        n_users=20_000,
        country_targeting_share=0.7,
        device_targeting_share=0.5,
        new_ad_share=0.15,
        candidates_per_request=30,
    )
    w = World(sc, sc.start_ms + 30 * MIN)
    b = w.requests(w.start_ms, w.start_ms + 10 * MIN)
    n, K = len(b), sc.candidates_per_request
    assert n > 300
    assert (np.diff(b.cand_offsets) == K).all()
    r = b.cand_request
    assert w.market.eligible(
        b.cand_ad_id, b.country_code[r], b.device_code[r], b.event_time_ms[r]
    ).all()
    # targeting is real: many (ad, request) pairs would not be eligible
    other = np.roll(b.country_code, 1)[r]
    assert not w.market.eligible(b.cand_ad_id, other, b.device_code[r], b.event_time_ms[r]).all()
    assert len(np.unique(r * sc.n_ads + b.cand_ad_id)) == b.n_candidates  # distinct
    # new ads: created less than new_ad_window_s before the request, at the stated share
    created = w.market.ad_created_ms[b.cand_ad_id]
    age = b.event_time_ms[r] - created
    assert np.array_equal(b.cand_new, (created > 0) & (age >= 0) & (age < 3_600_000))
    share = b.cand_new.mean()
    assert abs(share - sc.new_ad_share) < 0.01, share
    assert w.market.ad_created_ms[b.cand_ad_id].max() <= b.event_time_ms.max()
    assert np.array_equal(b.cand_bid, w.market.bid_cpc[b.cand_campaign_id])
    assert np.array_equal(b.cand_campaign_id, w.market.ad_campaign[b.cand_ad_id])
    assert np.array_equal(b.device_type, np.asarray(DEVICES, dtype=object)[b.device_code])
    # bids: log-normal around bid_median
    assert abs(np.log(np.median(w.market.bid_cpc)) - np.log(sc.bid_median)) < 0.1


def test_true_p_is_the_generators_formula_by_hand():
    sc = load_scenario("steady", events=20_000, seed=6, n_users=20_000, heat_logit=0.0)
    w = World(sc, sc.start_ms + 90 * MIN)
    # the same market and intercept as the open-loop traffic of the scenario
    mk = _market(sc, np.random.default_rng([sc.seed, 0xC7]))
    assert np.array_equal(mk.user_eff, w._mk.user_eff) and np.array_equal(mk.ad_eff, w._mk.ad_eff)
    assert w.intercept == generate(sc).meta["intercept"]
    b = w.requests(w.start_ms, w.start_ms + 2 * MIN)
    ci = np.arange(b.n_candidates)
    r = b.cand_request
    u, a, s = b.user_id[r], b.cand_ad_id, b.site_id[r]
    cat = mk.ad_category[a]
    hour = (b.event_time_ms[r] // 3_600_000) % 24
    for slot in range(sc.max_slots):
        logit = (
            w.intercept
            + mk.user_eff[u]
            + mk.ad_eff[a]
            + mk.site_eff[s]
            + sc.position_logit[slot]
            + DEVICE_LOGIT[b.device_code[r]]
            + mk.country_eff[mk.user_country[u]]
            + sc.hour_amplitude * np.cos(2 * np.pi * (hour - 21) / 24.0)
            + sc.interest_logit
            * ((mk.user_interest[u, 0] == cat) | (mk.user_interest[u, 1] == cat))
            + (mk.site_latent[s] * mk.cat_latent[cat]).sum(axis=1)
        )
        # no fatigue and no trend yet: nothing was shown (the trend term is 0 on no data)
        np.testing.assert_allclose(w.true_p(b, ci, slot), 1 / (1 + np.exp(-logit)), rtol=1e-12)
    assert np.array_equal(b.country_code, mk.user_country[b.user_id])
    assert set(b.country.tolist()) <= set(COUNTRIES)
    p0, p2 = w.true_p(b, ci, 0), w.true_p(b, ci, 2)
    assert (p2 < p0).all()  # position effects


def test_the_world_continues_the_open_loop_truth():
    """Shown exactly what the generator showed in the minute after a cut, the world's true p
    is the oracle's: market, intercept, heat episodes, fatigue and trend warm-started from
    the history, drift."""
    sc = load_scenario("drift", events=40_000, seed=7, hours=2.0, n_users=5_000)
    tr = generate(sc)
    cut = sc.start_ms + 61 * MIN  # the drift starts at 60 min
    ws = sc.replace(max_slots=5, slot_count_weights=(1.0,) * 5)  # the generator's 5 positions
    w = World(ws, cut, history=tr)
    imps = tr.impressions
    t = imps.column("event_time_ms").to_numpy()
    rows = np.flatnonzero((t >= cut) & (t < cut + MIN))
    n = len(rows)
    assert n > 100
    col = {c: imps.column(c).to_numpy(zero_copy_only=False)[rows] for c in imps.column_names}
    dev = np.array([DEVICES.index(d) for d in col["device_type"]], dtype=np.int64)
    ctry = np.array([COUNTRIES.index(c) for c in col["country"]], dtype=np.int64)
    one = np.arange(n, dtype=np.int64)
    b = RequestBatch(
        t0_ms=cut,
        t1_ms=cut + MIN,
        request_id=np.array([f"x{i}" for i in one], dtype=object),
        request_seq=one,
        event_time_ms=col["event_time_ms"],
        user_id=col["user_id"],
        site_id=col["site_id"],
        device_type=col["device_type"],
        country=col["country"],
        device_code=dev,
        country_code=ctry,
        n_slots=col["position"] + 1,
        cand_offsets=np.arange(n + 1, dtype=np.int64),
        cand_request=one,
        cand_ad_id=col["ad_id"],
        cand_campaign_id=col["campaign_id"],
        cand_advertiser_id=col["advertiser_id"],
        cand_ad_category=col["ad_category"],
        cand_bid=np.ones(n),
        cand_new=np.zeros(n, dtype=bool),
    )
    drifted = col["campaign_id"] == w.drift_campaign
    assert w.drift_campaign == tr.meta["drift_campaign"] and drifted.any()
    truth = {k: v[rows] for k, v in tr.truth.items() if k != "intercept"}
    assert (
        (truth["fatigue"] < 0).any() and (truth["heat"] > 0).any() and (truth["trend"] != 0).any()
    )
    out = w.show(b, Shown.of(b, one, col["position"]))
    p_oracle = tr.oracle.column("p_click").to_numpy()[rows]
    np.testing.assert_allclose(out.p_true, p_oracle, rtol=1e-9)


def _quiet(**kw):
    return load_scenario(
        "steady",
        events=20_000,
        seed=8,
        n_users=20_000,
        trend_strength=0.0,
        heat_logit=0.0,
        **kw,
    )


def test_fatigue_rises_when_the_same_user_sees_the_same_ad_again():
    sc = _quiet()
    start = sc.start_ms + 10 * MIN
    w = World(sc, start)
    b = w.requests(start, start + 20_000)
    c = np.array([0], dtype=np.int64)  # request 0's first candidate
    later = dataclasses.replace(b, event_time_ms=b.event_time_ms + 1_000)  # same hour
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    base = logit(w.true_p(later, c, 0))
    assert np.array_equal(logit(w.true_p(later, c, 0)), base)  # no show: no change
    drop = []
    for k in (1, 2, 3):
        w.show(
            b if k == 1 else dataclasses.replace(b, event_time_ms=b.event_time_ms - k),
            Shown.of(b, c, [0]),
        )
        drop.append(float((base - logit(w.true_p(later, c, 0)))[0]))
    want = [(sc.fatigue_ad + sc.fatigue_advertiser) * np.log1p(k) for k in (1, 2, 3)]
    np.testing.assert_allclose(drop, want, rtol=1e-9)
    # the fatigue window ends: an hour later the impressions no longer count
    far = dataclasses.replace(b, event_time_ms=b.event_time_ms + 3_600_000 + 1)
    near = dataclasses.replace(b, event_time_ms=b.event_time_ms + 3_600_000 - 10)
    assert w.true_p(far, c, 0)[0] > w.true_p(near, c, 0)[0]


def test_clicks_at_rate_p_with_the_scenarios_delays():
    sc = _quiet(base_ctr=0.1)
    start = sc.start_ms + 10 * MIN
    runs = _run(World(sc, start, request_rate=5.0), start, start + 40 * MIN, 60_000)
    p = _cat(runs, lambda b, s, o: o.p_true)
    clicked = _cat(runs, lambda b, s, o: o.clicked)
    assert len(p) > 5_000
    assert abs(clicked.sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum())
    # clicks are likelier at higher p
    hi = p > np.median(p)
    assert clicked[hi].mean() > clicked[~hi].mean()
    t = _cat(runs, lambda b, s, o: b.event_time_ms[s.request_index])
    ct = _cat(runs, lambda b, s, o: o.click_time_ms)
    assert (ct[~clicked] == -1).all()
    d = (ct[clicked] - t[clicked]) / 1000.0
    window = sc.attribution_window_s
    late = d > window
    k = clicked.sum()
    assert abs(late.mean() - sc.late_click_fraction) < 4 * np.sqrt(0.02 * 0.98 / k) + 1e-9
    inside = d[~late]
    assert (inside > 0).all()
    assert abs(np.log(np.median(inside)) - np.log(sc.click_delay_median_s)) < 0.15
    assert abs(np.log(inside).std() - sc.click_delay_sigma) < 0.12


def test_state_round_trip_continues_identically(tmp_path, steady):
    start = steady.start_ms + 20 * MIN
    w1 = World(steady, start)
    _run(w1, start, start + 3 * MIN, 40_000)
    path = tmp_path / "world.npz"
    np.savez(path, **w1.state())
    with np.load(path, allow_pickle=False) as z:
        st = {k: z[k] for k in z.files}
    w2 = World(steady, start)
    w2.load_state(st)
    a = start + 3 * MIN
    r1 = _run(w1, a, a + 4 * MIN, 30_000)
    r2 = _run(w2, a, a + 4 * MIN, 30_000)
    for f in (
        lambda b, s, o: b.request_id,
        lambda b, s, o: b.cand_ad_id,
        lambda b, s, o: o.p_true,
        lambda b, s, o: o.clicked,
        lambda b, s, o: o.click_time_ms,
    ):
        assert np.array_equal(_cat(r1, f), _cat(r2, f))
    b1 = w1.requests(a + 4 * MIN, a + 5 * MIN)
    b2 = w2.requests(a + 4 * MIN, a + 5 * MIN)
    ci = np.arange(b1.n_candidates)
    assert np.array_equal(w1.true_p(b1, ci, 1), w2.true_p(b2, ci, 1))
    # the state moved: a fresh world gives other probabilities for the same shown ads
    fresh = World(steady, start)
    fresh._next_t0 = a
    fb = fresh.requests(a, a + 30_000)
    fs = _first_slots(fb)
    assert not np.array_equal(fresh.true_p(fb, fs.candidate_index, fs.slot), r1[0][2].p_true)


def test_bad_input_is_refused_with_a_clear_error(steady):
    start = steady.start_ms + 5 * MIN
    w = World(steady, start)
    with pytest.raises(ValueError, match="consecutive"):
        w.requests(start + 1, start + 10)
    b = w.requests(start, start + MIN)
    sh = _first_slots(b)
    bad = dataclasses.replace(sh, request_index=sh.request_index + 1)
    with pytest.raises(ValueError, match="request_index"):
        w.show(b, bad)
    with pytest.raises(ValueError, match="shown twice"):
        w.show(b, Shown.of(b, np.r_[sh.candidate_index[:1], sh.candidate_index[:1]], [0, 0]))
    with pytest.raises(ValueError, match="slot"):
        w.true_p(b, np.array([0]), steady.max_slots)
    other = load_scenario("steady", events=5_000, seed=99, hours=2.0)
    with pytest.raises(ValueError, match="another market"):
        World(steady, start, history=generate(other))
    w2 = World(steady.replace(seed=5), start)
    with pytest.raises(ValueError, match="another world"):
        w2.load_state(w.state())
    with pytest.raises(ValueError, match="max_slots"):
        load_scenario("steady", max_slots=7)


def test_the_trend_term_counts_what_the_closed_loop_showed_and_clicked():
    sc = load_scenario("steady", events=20_000, seed=9, n_users=20_000, base_ctr=0.1)
    start = sc.start_ms + 10 * MIN
    w = World(sc, start, request_rate=5.0)
    runs = _run(w, start, start + 20 * MIN, 45_000)
    ad = _cat(runs, lambda b, s, o: b.cand_ad_id[s.candidate_index])
    t = _cat(runs, lambda b, s, o: b.event_time_ms[s.request_index])
    ct = _cat(runs, lambda b, s, o: o.click_time_ms)
    b = w.requests(start + 20 * MIN, start + 21 * MIN)
    ci = np.arange(b.n_candidates)
    a = b.cand_ad_id
    k = (b.event_time_ms[b.cand_request] - sc.start_ms) // MIN  # the generator's minute grid
    win = int(sc.trend_window_s / 60)

    def per_ad(times, ads, lo, hi):  # events of each candidate's ad in minutes [lo, hi)
        m = (times - sc.start_ms) // MIN
        return np.array(
            [((ads == x) & (m >= f) & (m < g)).sum() for x, f, g in zip(a, lo, hi)], float
        )

    c = ct >= 0
    win_i, cum_i = per_ad(t, ad, k - win, k), per_ad(t, ad, k - 10**6, k)
    win_c, cum_c = per_ad(ct[c], ad[c], k - win, k), per_ad(ct[c], ad[c], k - 10**6, k)
    assert (win_c > 0).any() and (cum_i > win_i).any()
    m = w.prior[a]
    recent, long_run = (win_c + 50 * m) / (win_i + 50), (cum_c + 200 * m) / (cum_i + 200)
    trend = sc.trend_strength * np.clip(np.log(recent / long_run), -1, 1)
    assert (np.abs(trend) > 0.01).mean() > 0.2
    logit_wo_trend = w._logit(b, ci, np.zeros_like(ci))[0]
    np.testing.assert_allclose(
        w.true_p(b, ci, 0), 1 / (1 + np.exp(-(logit_wo_trend + trend))), rtol=1e-9
    )


def test_a_late_show_still_counts_in_the_trend_totals(steady):
    start = steady.start_ms + 10 * MIN
    w1, w2 = World(steady, start), World(steady, start)
    b1 = w1.requests(start, start + MIN)
    b2 = w1.requests(start + MIN, start + 3 * MIN)
    w2.requests(start, start + MIN), w2.requests(start + MIN, start + 3 * MIN)
    w1.show(b1, _first_slots(b1))
    w1.show(b2, _first_slots(b2))
    w2.show(b2, _first_slots(b2))  # out of event-time order
    w2.show(b1, _first_slots(b1))
    s1, s2 = w1.state(), w2.state()
    assert s1["trend_cum_i"].sum() == s2["trend_cum_i"].sum() > 0
    np.testing.assert_array_equal(s1["trend_cum_i"], s2["trend_cum_i"])
