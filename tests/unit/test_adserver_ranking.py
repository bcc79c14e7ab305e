"""The ad server with a fake store and fake models (no servers): one read per event-time
minute at or before every row's time, one scoring call per model per batch plus one for the
shown slots, arms, shadows that never change what is shown, degraded answers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.serving.adserver import AdServer, Ranker, candidate_columns
from ctrstream.serving.auction import AuctionConfig, n_uniforms, request_uniforms
from ctrstream.serving.triton_client import ScoreResult, fallback_scores
from ctrstream.store.reader import FeatureRead

T0 = 1_768_435_200_000
AD = [e.name for e in F.ENTITIES].index("ad")
POS = F.SPARSE_FIELDS.index("position")
POS0 = int(
    F.sparse_ids(
        {
            **{f: np.zeros(1, np.int64) for f in F.SPARSE_FIELDS if f != "hour"},
            "event_time_ms": np.zeros(1, np.int64),
        }
    )[0, POS]
)


class FakeStore:
    """Counts from the ad id (ad k: 1000 impressions, 5 * (k % 7) clicks); records reads."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[int, np.ndarray]] = []
        self.fail = fail

    def read_columns(self, cols: dict, t_ms: int) -> FeatureRead:
        self.calls.append((t_ms, np.asarray(cols["ad_id"]).copy()))
        if self.fail:
            raise ConnectionError("redis is down")
        n = len(cols["ad_id"])
        counts = np.zeros((n, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.int64)
        counts[:, AD, :, 0] = 1000
        counts[:, AD, :, 1] = (5 * (np.asarray(cols["ad_id"]) % 7))[:, None]
        return FeatureRead(counts, t_ms, None, None, None)


class FakeModel:
    """pCTR = the ad's smoothed CTR at position 0, half of it elsewhere; records calls."""

    def __init__(self, version: str = "3", fail: bool = False, scale: float = 1.0):
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []
        self.version, self.fail, self.scale = version, fail, scale

    def score(self, sparse: np.ndarray, dense: np.ndarray) -> ScoreResult:
        self.calls.append((sparse.copy(), dense.copy()))
        if self.fail:
            return ScoreResult(fallback_scores(dense), "", True, "fake", "down")
        p = fallback_scores(dense) * np.where(sparse[:, POS] == POS0, 1.0, 0.5) * self.scale
        return ScoreResult(p.astype(np.float32), self.version, False, "fake")


def make_batch(n: int = 40, m: int = 6, seed: int = 1, span_ms: int = 150_000):
    rng = np.random.default_rng(seed)
    counts = rng.integers(m - 2, m + 1, n)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(off[-1])
    ad = rng.integers(0, 200, total)
    return SimpleNamespace(
        request_id=np.array([f"q{seed}-{k:012d}" for k in range(n)], dtype=object),
        event_time_ms=np.sort(T0 + rng.integers(0, span_ms, n)).astype(np.int64),
        user_id=rng.integers(0, 1000, n),
        site_id=rng.integers(0, 20, n),
        device_type=np.array(["mobile", "desktop"], dtype=object)[rng.integers(0, 2, n)],
        country=np.array(["US", "DE"], dtype=object)[rng.integers(0, 2, n)],
        n_slots=rng.integers(1, 4, n),
        cand_offsets=off,
        cand_ad_id=ad,
        cand_campaign_id=ad // 2,
        cand_advertiser_id=ad // 10,
        cand_ad_category=ad % 7,
        cand_bid=rng.lognormal(0, 0.3, total),
        cand_new=rng.random(total) < 0.1,
    )


def test_one_read_per_minute_never_after_a_row_and_one_call_per_model():
    batch = make_batch()
    store, model = FakeStore(), FakeModel()
    server = AdServer(None, store, AuctionConfig(explore_share=0.0))
    d = server.decide(batch, np.zeros(40, np.int64), {"m": Ranker("m", "model", model.score)})
    minutes = np.unique(batch.event_time_ms // F.MINUTE_MS)
    assert len(store.calls) == len(minutes) == d.timings["feature_reads"]
    cols, req_of = candidate_columns(batch)
    row_t = batch.event_time_ms[req_of]
    seen = 0
    for t, ads in store.calls:
        rows = np.flatnonzero(row_t // F.MINUTE_MS == t // F.MINUTE_MS)
        assert np.all(t <= row_t[rows]), "a read later than one of its rows"
        assert len(ads) == len(rows)
        seen += len(ads)
    assert seen == len(req_of)
    # one call for every candidate at position 0, one for the shown impressions at their slots
    assert len(model.calls) == 2
    sparse0, _ = model.calls[0]
    assert len(sparse0) == len(req_of) and np.all(sparse0[:, POS] == POS0)
    assert len(model.calls[1][0]) == len(d)
    # ranks by bid x pCTR0; the pCTR at slot > 0 is the model's there (half)
    assert d.request_filled.sum() == len(d) and np.array_equal(d.request_slots, batch.n_slots)
    np.testing.assert_allclose(d.pctr[d.slot == 0], d.pctr0[d.slot == 0], rtol=1e-6)
    np.testing.assert_allclose(d.pctr[d.slot > 0], d.pctr0[d.slot > 0] / 2, rtol=1e-6)
    assert set(d.model_version) == {"3"} and set(d.model_name) == {"fake"}
    assert not d.degraded.any() and not d.request_degraded.any()
    assert np.all(d.request_latency_ms > 0)
    for i in range(40):  # the top slot holds the request's best qualifying candidate
        a, b = batch.cand_offsets[i], batch.cand_offsets[i + 1]
        ev = batch.cand_bid[a:b] * fallback_scores(F.dense_from_counts(_counts(batch, a, b)))
        top = d.candidate_index[(d.request_index == i) & (d.slot == 0)]
        assert top.tolist() == [a + int(np.argmax(ev))]


def _counts(batch, a: int, b: int) -> np.ndarray:
    return FakeStore().read_columns({"ad_id": batch.cand_ad_id[a:b]}, T0).counts


def test_arms_use_their_own_ranker_and_calibration():
    batch = make_batch(n=60)
    lr, deep = FakeModel("1"), FakeModel("2", scale=0.5)
    truth_calls = []

    def truth(b, cand, slot):
        truth_calls.append((cand.copy(), slot.copy()))
        return np.where(slot == 0, 0.3, 0.1) * (b.cand_ad_id[cand] % 3 + 1) / 3

    rankers = {
        "lr": Ranker("lr", "model", lr.score, lambda raw, v, ctx: raw * 2),
        "deep": Ranker("deep", "model", deep.score),
        "prior": Ranker("prior", "prior"),
        "oracle": Ranker("oracle", "oracle", truth=truth),
    }
    arm = np.array(["lr", "deep", "prior", "oracle"], dtype=object)[np.arange(60) % 4]
    d = AdServer(None, FakeStore(), AuctionConfig(explore_share=0.0)).decide(batch, arm, rankers)
    assert np.array_equal(d.request_arm, arm)
    assert np.array_equal(d.arm, arm[d.request_index])
    assert set(d.model_version[d.arm == "lr"]) == {"1"}
    assert set(d.model_version[d.arm == "deep"]) == {"2"}
    assert set(d.model_name[d.arm == "prior"]) == {"prior"}
    assert set(d.model_name[d.arm == "oracle"]) == {"oracle"}
    # each model saw only its own requests' candidates (and their shown impressions)
    rows_of = np.repeat(np.arange(60), np.diff(batch.cand_offsets))
    assert len(lr.calls[0][0]) == int(np.sum(arm[rows_of] == "lr"))
    assert len(lr.calls[1][0]) == int(np.sum(d.arm == "lr"))
    # lr is calibrated (x2), at its slot as well; prior: no position effect
    sel = d.arm == "lr"
    np.testing.assert_allclose(d.pctr[sel], 2 * d.pctr_raw[sel])
    sel = d.arm == "prior"
    np.testing.assert_allclose(d.pctr[sel], d.pctr0[sel])
    # the oracle ranked by the truth at slot 0 and reports the truth at the shown slot
    assert np.all(truth_calls[0][1] == 0)
    sel = d.arm == "oracle"
    expect = truth(batch, d.candidate_index[sel], d.slot[sel])
    np.testing.assert_allclose(d.pctr[sel], expect)


def test_shadows_never_change_what_is_shown():
    batch = make_batch(n=80)
    u = request_uniforms(batch.request_id, n=n_uniforms(3))
    cfg = AuctionConfig(explore_share=0.3, reserve_ecpm=0.1)
    rankers = {"a": Ranker("a", "model", FakeModel("1").score), "p": Ranker("p", "prior")}
    arm = np.arange(80) % 2
    plain = AdServer(None, FakeStore(), cfg).decide(batch, arm, rankers, uniforms=u)
    shadow_model = FakeModel("9", scale=0.2)
    shadows = [Ranker("s", "model", shadow_model.score), Ranker("sp", "prior")]
    with_shadow = AdServer(None, FakeStore(), cfg).decide(batch, arm, rankers, shadows, u)
    for f in (
        "request_index",
        "candidate_index",
        "arm",
        "slot",
        "price",
        "pctr0",
        "pctr",
        "pctr_raw",
        "model_version",
        "propensity",
        "explored",
        "new_ad",
        "degraded",
        "request_filled",
    ):
        np.testing.assert_array_equal(getattr(plain, f), getattr(with_shadow, f), err_msg=f)
    assert plain.explored.any() and not plain.shadows
    s = with_shadow.shadows["s"]
    # the shadow scored every request once, then the shown impressions at their slots
    assert len(shadow_model.calls) == 2 and len(shadow_model.calls[0][0]) == len(batch.cand_bid)
    assert len(s.pctr) == len(with_shadow) and s.model_version == "9"
    ad = batch.cand_ad_id[with_shadow.candidate_index]
    prior = fallback_scores(F.dense_from_counts(FakeStore().read_columns({"ad_id": ad}, T0).counts))
    half = np.where(with_shadow.slot == 0, 1.0, 0.5)
    np.testing.assert_allclose(s.pctr, prior * half * 0.2, rtol=1e-5)
    assert s.top_candidate.shape == (80, 3)
    # its own choices: where the deciding arm ranks by the same prior without exploring,
    # the prior shadow's top choice is what was shown on top
    sp = with_shadow.shadows["sp"]
    top = with_shadow.slot == 0
    same = top & (with_shadow.arm == "p") & ~with_shadow.explored
    assert same.sum() > 10
    np.testing.assert_array_equal(
        sp.top_candidate[with_shadow.request_index[same], 0], with_shadow.candidate_index[same]
    )
    assert np.all(s.top_candidate[batch.n_slots == 1, 1:] == -1)


def test_redis_or_model_down_degrades_and_never_raises():
    batch = make_batch(n=30)
    rankers = {"a": Ranker("a", "model", FakeModel("1", fail=True).score)}
    d = AdServer(None, FakeStore(), AuctionConfig(explore_share=0)).decide(
        batch, np.zeros(30, np.int64), rankers
    )
    assert len(d) > 0 and d.degraded.all() and d.request_degraded.all()
    assert set(d.model_version) == {""}

    def boom(sparse, dense):
        raise RuntimeError("no route to Triton")

    d = AdServer(None, FakeStore(fail=True), AuctionConfig(explore_share=0)).decide(
        batch, np.zeros(30, np.int64), {"a": Ranker("a", "model", boom)}
    )
    assert len(d) > 0 and d.degraded.all() and d.request_degraded.all()
    # all-zero counts: every candidate's pCTR0 is the prior mean
    np.testing.assert_allclose(d.pctr0, F.PRIOR.mean, rtol=1e-6)


def test_bad_arms_say_what_is_wrong():
    batch = make_batch(n=5)
    server = AdServer(None, FakeStore())
    with pytest.raises(ValueError, match="no ranker"):
        server.decide(batch, np.array(["x"] * 5, dtype=object), {"a": Ranker("a", "prior")})
    with pytest.raises(ValueError, match="one arm per request"):
        server.decide(batch, np.zeros(4, np.int64), {"a": Ranker("a", "prior")})
    with pytest.raises(ValueError, match="needs a score"):
        Ranker("m", "model")


def test_a_shadow_of_a_deciding_arms_model_version_reuses_its_scores():
    """A shadow with the deciding arm's key (same model version, same calibrator) scores
    only the other arms' rows, and its outputs equal a shadow that scores everything."""
    batch = make_batch(n=80)
    u = request_uniforms(batch.request_id, n=n_uniforms(3))
    cfg = AuctionConfig(explore_share=0.3, reserve_ecpm=0.1)
    arm = np.arange(80) % 2
    m = FakeModel("4")
    rankers = {"a": Ranker("a", "model", m.score, key="fake@4"), "p": Ranker("p", "prior")}
    full_model = FakeModel("4")
    full = AdServer(None, FakeStore(), cfg).decide(
        batch, arm, rankers, [Ranker("s", "model", full_model.score)], u
    )
    reused_model = FakeModel("4")
    reused = AdServer(None, FakeStore(), cfg).decide(
        batch, arm, rankers, [Ranker("s", "model", reused_model.score, key="fake@4")], u
    )
    for f in ("pctr", "pctr_raw", "top_candidate", "top_pctr0"):
        np.testing.assert_allclose(
            getattr(full.shadows["s"], f), getattr(reused.shadows["s"], f), err_msg=f
        )
    assert reused.shadows["s"].model_version == "4"
    rows_full = sum(len(c[0]) for c in full_model.calls)
    rows_reused = sum(len(c[0]) for c in reused_model.calls)
    arm_a_rows = int(np.diff(batch.cand_offsets)[arm == 0].sum())
    assert rows_reused < rows_full and rows_full - rows_reused >= arm_a_rows
