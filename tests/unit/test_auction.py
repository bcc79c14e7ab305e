"""The auction on hand-computed cases: ranking, reserves, GSP prices, fill, exploration,
determinism (``ctrstream.serving.auction``)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ctrstream.serving.auction import (
    U_EXPLORE,
    U_NEW,
    U_NEW_PICK,
    U_PERM,
    AuctionConfig,
    auction,
    explore_mask,
    n_uniforms,
    request_uniforms,
)


def run(bids, pctrs, slots, cfg=None, explore=None, u=None, new=None):
    """One auction over requests given as lists of per-candidate bids and pCTR0s."""
    counts = [len(b) for b in bids]
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = len(bids)
    if u is None:
        u = np.full((n, n_uniforms(max(slots) if slots else 1)), 0.5)
    return auction(
        off,
        np.array([x for b in bids for x in b], dtype=np.float64),
        np.array([x for p in pctrs for x in p], dtype=np.float64),
        np.array(slots, dtype=np.int64),
        np.zeros(n, bool) if explore is None else np.asarray(explore),
        u,
        cfg or AuctionConfig(),
        None if new is None else np.array([x for b in new for x in b], dtype=bool),
    )


def test_ranks_by_bid_times_pctr0_and_prices_by_the_next_qualifying_bidder():
    # scores: a 2*0.01=0.020, b 1*0.03=0.030, c 4*0.004=0.016, d 0.5*0.02=0.010
    r = run([[2.0, 1.0, 4.0, 0.5]], [[0.01, 0.03, 0.004, 0.02]], [3])
    assert r.candidate_index.tolist() == [1, 0, 2]  # b, a, c
    assert r.slot.tolist() == [0, 1, 2]
    # b pays a's score / its pCTR0: 0.020/0.03; a pays c's: 0.016/0.01; c pays d's: 0.010/0.004
    np.testing.assert_allclose(r.price, [0.02 / 0.03, 0.016 / 0.01, 0.010 / 0.004])
    np.testing.assert_allclose(r.rank_score, [0.03, 0.02, 0.016])
    np.testing.assert_allclose(r.pctr0, [0.03, 0.01, 0.004])
    assert r.filled.tolist() == [3] and r.qualified.tolist() == [4]
    assert r.propensity.tolist() == [1.0, 1.0, 1.0] and not r.explored.any()


def test_ties_keep_the_candidate_order():
    r = run([[1.0, 2.0, 1.0]], [[0.02, 0.01, 0.02]], [3])
    assert r.candidate_index.tolist() == [0, 1, 2]
    # a pays b's 0.02 / 0.02, b pays c's 0.02 / 0.01, c (no one after it, no reserve) pays 0
    np.testing.assert_allclose(r.price, [1.0, 2.0, 0.0])


def test_the_reserves_exclude_candidates():
    bids, pctrs = [[2.0, 0.2, 1.0, 3.0]], [[0.01, 0.5, 0.005, 0.001]]
    # cpc reserve 0.5 drops b (bid 0.2) though its score 0.1 is the highest
    r = run(bids, pctrs, [4], AuctionConfig(reserve_cpc=0.5))
    assert r.candidate_index.tolist() == [0, 2, 3]
    assert r.qualified.tolist() == [3]
    # eCPM reserve 4.0 (bid*pctr0*1000 >= 4): a 20 and b 100 stay; c 5 stays; d 3 goes
    r = run(bids, pctrs, [4], AuctionConfig(reserve_ecpm=4.0))
    assert r.candidate_index.tolist() == [1, 0, 2]
    # a pCTR0 of 0 never qualifies
    r = run([[1.0, 1.0]], [[0.0, 0.01]], [2])
    assert r.candidate_index.tolist() == [1]


def test_the_last_winner_pays_the_reserve_and_prices_respect_the_floors():
    cfg = AuctionConfig(reserve_cpc=0.3, reserve_ecpm=2.0)
    # a: 2*0.01 = 0.02 (eCPM 20), b: 1*0.004 = 0.004 (eCPM 4); 2 slots, nobody after b
    r = run([[2.0, 1.0]], [[0.01, 0.004]], [2], cfg)
    assert r.candidate_index.tolist() == [0, 1]
    # a: max(0.3, 0.004/0.01 = 0.4, 0.002/0.01 = 0.2) = 0.4
    # b: no next bidder: max(0.3, 0, 0.002/0.004 = 0.5) = 0.5 (the eCPM reserve in CPC)
    np.testing.assert_allclose(r.price, [0.4, 0.5])
    # the cpc floor binds: a pays 0.3 when the second price is lower
    r = run([[2.0, 1.0]], [[0.01, 0.001]], [1], AuctionConfig(reserve_cpc=0.3))
    np.testing.assert_allclose(r.price, [0.3])  # second price 0.001/0.01 = 0.1 < 0.3


def test_a_price_is_never_above_the_bid():
    rng = np.random.default_rng(7)
    n, m = 500, 12
    bids = rng.lognormal(0, 1, (n, m)).tolist()
    pctrs = rng.beta(1, 40, (n, m)).tolist()
    slots = rng.integers(1, 5, n).tolist()
    cfg = AuctionConfig(reserve_cpc=0.2, reserve_ecpm=5.0)
    r = run(bids, pctrs, slots, cfg)
    bid = np.array(bids).reshape(-1)[r.candidate_index]
    p0 = np.array(pctrs).reshape(-1)[r.candidate_index]
    assert len(r) > 0
    assert np.all(r.price <= bid + 1e-12)
    assert np.all(r.price * p0 <= bid * p0 + 1e-12)
    assert np.all(r.price >= cfg.reserve_cpc - 1e-12)
    assert np.all(r.price * p0 * 1000 >= cfg.reserve_ecpm - 1e-9)
    # within a request, ranks are by expected value, and prices by rank never exceed the bid
    for i in range(20):
        sel = r.request_index == i
        assert np.all(np.diff(r.rank_score[sel]) <= 0)


def test_fewer_qualifying_candidates_than_slots_fill_fewer_slots():
    r = run([[1.0, 1.0, 1.0], [1.0], []], [[0.01, 0.0, 0.02], [0.03], []], [3, 2, 1])
    assert r.filled.tolist() == [2, 1, 0]
    assert r.request_index.tolist() == [0, 0, 1]
    assert r.slot.tolist() == [0, 1, 0]
    assert r.candidate_index.tolist() == [2, 0, 3]  # global indices
    # zero slots: nothing shown
    r = run([[1.0]], [[0.5]], [0])
    assert len(r) == 0 and r.filled.tolist() == [0]


def test_exploration_permutes_the_winners_with_propensity_one_over_k():
    bids, pctrs = [[4.0, 3.0, 2.0, 1.0]], [[0.01] * 4]
    u = np.full((1, n_uniforms(3)), 0.5)
    u[0, U_PERM : U_PERM + 3] = [0.9, 0.1, 0.5]  # rank 0 -> slot 2, rank 1 -> 0, rank 2 -> 1
    r = run(bids, pctrs, [3], explore=[True], u=u)
    assert r.candidate_index.tolist() == [1, 2, 0]  # sorted by slot
    assert r.slot.tolist() == [0, 1, 2]
    np.testing.assert_allclose(r.propensity, [1 / 3] * 3)
    assert r.explored.all() and not r.new_ad.any()
    # prices stay those of the ranks (0.03/0.01, 0.02/0.01 for a, b; c pays d's 0.01/0.01)
    np.testing.assert_allclose(r.price, [2.0, 1.0, 3.0])


def test_exploration_frequencies_match_the_logged_propensities():
    """Two slots, winners a and b, non-winning c, new ads d and e; every request explored.
    Hand-computed: w.p. 1/2 no new ad (a, b permuted: 1/2 each per slot); w.p. 1/2 a new ad
    (d or e, 1/2 each) replaces b and {a, new} are permuted. Marginals per slot: a 1/2,
    b 1/4, c 0, d 1/8, e 1/8."""
    rng = np.random.default_rng(3)
    trials = 8000
    bids = [[4.0, 3.0, 2.0, 1.5, 1.0]] * trials
    pctrs = [[0.01] * 5] * trials
    new = [[False, False, False, True, True]] * trials
    u = rng.random((trials, n_uniforms(2)))
    r = run(bids, pctrs, [2] * trials, explore=[True] * trials, u=u, new=new)
    local = r.candidate_index % 5
    for s in (0, 1):
        freq = np.bincount(local[r.slot == s], minlength=5) / trials
        np.testing.assert_allclose(freq, [0.5, 0.25, 0.0, 0.125, 0.125], atol=0.025)
    # the logged propensities are the hand-computed ones, given the branch ...
    branch = np.zeros(trials, bool)
    branch[r.request_index[r.new_ad]] = True
    b_imp = branch[r.request_index]
    np.testing.assert_allclose(r.propensity[~b_imp], 1 / 2)  # a or b: 1/m
    np.testing.assert_allclose(r.propensity[b_imp & (local == 0)], 1 / 2)
    np.testing.assert_allclose(r.propensity[r.new_ad], 1 / 4)  # 1/n_new * 1/m
    # ... so over the candidates a slot can hold in a branch they sum to 1
    for in_branch in (False, True):
        sel = (b_imp == in_branch) & (r.slot == 0)
        per_cand = {int(c): float(p) for c, p in zip(local[sel], r.propensity[sel])}
        assert abs(sum(per_cand.values()) - 1.0) < 1e-12, per_cand
    assert r.new_ad.sum() == np.sum(u[:, U_NEW] < 0.5)
    assert r.filled.tolist() == [2] * trials


def test_a_new_ad_takes_a_free_slot_or_replaces_the_last_winner():
    bids, pctrs = [[4.0, 3.0, 2.0], [4.0, 3.0, 2.0]], [[0.01, 0.01, 0.0001]] * 2
    new = [[False, False, True]] * 2
    u = np.full((2, n_uniforms(3)), 0.5)
    u[:, U_NEW] = 0.0
    u[:, U_NEW_PICK] = 0.0
    u[:, U_PERM : U_PERM + 3] = [0.1, 0.2, 0.3]  # keep the rank order
    cfg = AuctionConfig(reserve_ecpm=1.0)  # the new ad (eCPM 0.2) is below it: waived
    r = run(bids, pctrs, [3, 2], cfg, explore=[True, True], u=u, new=new)
    got = [(i, c % 3, s) for i, c, s in zip(r.request_index, r.candidate_index, r.slot)]
    assert got == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 0), (1, 2, 1)]
    assert r.new_ad.tolist() == [False, False, True, False, True]
    assert r.filled.tolist() == [3, 2]
    # the new ad pays the floor: max(0, 0.001 / 0.0001 = 10) capped at its bid 2
    np.testing.assert_allclose(r.price[r.new_ad], [2.0, 2.0])
    np.testing.assert_allclose(r.propensity, [1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2])
    # not explored: no new ad, however the uniforms fall
    r = run(bids, pctrs, [3, 2], cfg, explore=[False, False], u=u, new=new)
    assert not r.new_ad.any() and r.filled.tolist() == [2, 2]


def test_results_are_deterministic_per_request():
    ids = np.array([f"q1-{k:012d}" for k in range(300)], dtype=object)
    u = request_uniforms(ids, seed=1)
    assert u.shape == (300, n_uniforms()) and np.all((u >= 0) & (u < 1))
    np.testing.assert_array_equal(u, request_uniforms(ids, seed=1))
    np.testing.assert_array_equal(u[100:110], request_uniforms(ids[100:110], seed=1))
    assert not np.array_equal(u, request_uniforms(ids, seed=2))
    cfg = AuctionConfig(explore_share=0.3)
    ex = explore_mask(u, cfg)
    assert 0.2 < ex.mean() < 0.4
    assert np.array_equal(ex, u[:, U_EXPLORE] < 0.3)
    rng = np.random.default_rng(5)
    bids = rng.lognormal(0, 1, (300, 8)).tolist()
    pctrs = rng.beta(1, 40, (300, 8)).tolist()
    new = (rng.random((300, 8)) < 0.2).tolist()
    a = run(bids, pctrs, [3] * 300, cfg, explore=ex, u=u, new=new)
    b = run(bids, pctrs, [3] * 300, cfg, explore=ex, u=u, new=new)
    for f in ("request_index", "candidate_index", "slot", "price", "propensity", "new_ad"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    # a request's result does not depend on the other requests of its batch
    c = run(bids[150:], pctrs[150:], [3] * 150, cfg, explore=ex[150:], u=u[150:], new=new[150:])
    sel = a.request_index >= 150
    np.testing.assert_array_equal(a.candidate_index[sel] - 150 * 8, c.candidate_index)
    np.testing.assert_array_equal(a.slot[sel], c.slot)


def test_bad_input_says_what_is_wrong():
    with pytest.raises(ValueError, match="reserve_cpc"):
        AuctionConfig(reserve_cpc=-1)
    with pytest.raises(ValueError, match="explore_share"):
        AuctionConfig(explore_share=2)
    with pytest.raises(ValueError, match="rng_u"):
        auction(
            np.array([0, 2]),
            np.ones(2),
            np.ones(2) / 10,
            np.array([3]),
            np.zeros(1, bool),
            np.zeros((1, 2)),
            AuctionConfig(),
        )
    with pytest.raises(ValueError, match="pctr0"):
        auction(
            np.array([0, 2]),
            np.ones(2),
            np.ones(3),
            np.array([1]),
            np.zeros(1, bool),
            np.zeros((1, 9)),
            AuctionConfig(),
        )


def test_auctions_per_second(capsys):
    """1,000 requests x 20 candidates, 3 slots, 5 % explored (printed; a loose floor)."""
    rng = np.random.default_rng(11)
    n, m = 1000, 20
    off = np.arange(0, n * m + 1, m, dtype=np.int64)
    bid = rng.lognormal(0, 0.5, n * m)
    p = rng.beta(1, 50, n * m)
    slots = rng.integers(1, 4, n)
    u = rng.random((n, n_uniforms(3)))
    cfg = AuctionConfig(reserve_cpc=0.05, reserve_ecpm=0.5)
    ex = explore_mask(u, cfg)
    new = rng.random(n * m) < 0.05
    auction(off, bid, p, slots, ex, u, cfg, new)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        auction(off, bid, p, slots, ex, u, cfg, new)
    dt = (time.perf_counter() - t0) / reps
    with capsys.disabled():
        print(f"\nauction: {n / dt:,.0f} auctions/s ({n}x{m} candidates in {dt * 1000:.2f} ms)")
    assert n / dt > 20_000
