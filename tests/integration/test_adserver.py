"""The ad server and ``POST /v1/auction`` against the real stack (Redis, Triton with a
published model): decisions per arm, features at each request's own event time, shadows that
never change what is shown, degraded answers when Redis or Triton are out of reach, the
API's auction and its validation, and decide()'s throughput (printed)."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from ctrstream import features as F
from ctrstream.bench.api import write_demo_model
from ctrstream.calibration.client import CalibratorClient
from ctrstream.models.publish import control_client
from ctrstream.serving.adserver import AdServer, Ranker, model_ranker
from ctrstream.serving.api import create_app
from ctrstream.serving.auction import AuctionConfig
from ctrstream.serving.triton_client import Scorer
from ctrstream.stack.services import free_port
from ctrstream.store.connection import redis_client
from ctrstream.store.reader import FeatureStore
from ctrstream.store.speed_view import SpeedCells, SpeedViewWriter

W = np.linspace(-0.2, 0.3, F.N_DENSE).astype(np.float32)
BIAS = -3.0
MODEL = "adserver_demo_py"
RES_5M = 0  # features.RESOLUTIONS[0]: one-minute buckets
AD_ENTITY = F.ENTITIES.index(F.ENTITY_BY_NAME["ad"])


@pytest.fixture(scope="module")
def model(settings):
    write_demo_model(settings.triton.model_repository, MODEL, version=1, weights=W, bias=BIAS)
    client = control_client(settings)
    client.load_model(MODEL)
    yield MODEL
    try:
        client.unload_model(MODEL)
    finally:
        client.close()


@pytest.fixture(scope="module")
def scorer(settings, model):
    with Scorer(settings, model_name=model, max_rows=1024) as s:
        yield s


class CountingStore:
    """A FeatureStore that counts its reads."""

    def __init__(self, store: FeatureStore):
        self.store, self.times = store, []

    def read_columns(self, cols, t_ms):
        self.times.append(t_ms)
        return self.store.read_columns(cols, t_ms)


def _write_ad_counts(settings, ads: np.ndarray, bucket_ms: int, imps, clicks) -> None:
    """Absolute counts of ``ads`` in the one-minute bucket starting at ``bucket_ms``."""
    n = len(ads)
    with SpeedViewWriter(settings) as writer:
        writer.write(
            [
                SpeedCells(
                    AD_ENTITY,
                    [np.asarray(ads, np.int64)],
                    np.full(n, RES_5M),
                    np.full(n, bucket_ms // F.MINUTE_MS),
                    np.broadcast_to(np.asarray(imps, np.int64), n).copy(),
                    np.broadcast_to(np.asarray(clicks, np.int64), n).copy(),
                    np.zeros(n, bool),
                )
            ]
        )


def make_batch(n: int, m: int, t0: int, span_ms: int, base: int, seed: int = 0):
    """``n`` requests of ``m`` candidates each (ads ``base + 0..199``) in ``[t0, t0+span)``."""
    rng = np.random.default_rng(seed)
    off = np.arange(0, n * m + 1, m, dtype=np.int64)
    ad = base + np.concatenate([rng.choice(200, m, replace=False) for _ in range(n)])
    return SimpleNamespace(
        request_id=np.array([f"q{seed}-{k:012d}" for k in range(n)], dtype=object),
        event_time_ms=np.sort(t0 + rng.integers(0, span_ms, n)).astype(np.int64),
        user_id=base + rng.integers(0, 5000, n),
        site_id=base + rng.integers(0, 20, n),
        device_type=np.array(["mobile", "desktop"], dtype=object)[rng.integers(0, 2, n)],
        country=np.array(["US", "DE"], dtype=object)[rng.integers(0, 2, n)],
        n_slots=rng.integers(1, 4, n),
        cand_offsets=off,
        cand_ad_id=ad,
        cand_campaign_id=ad // 2,
        cand_advertiser_id=ad // 10,
        cand_ad_category=ad % 7,
        cand_bid=rng.lognormal(0, 0.3, n * m),
        cand_new=rng.random(n * m) < 0.05,
    )


def _minute_start(now_ms: int) -> int:
    return (now_ms // F.MINUTE_MS - 2) * F.MINUTE_MS


def test_decide_ranks_per_arm_with_the_published_model(settings, scorer, capsys):
    base = 50_000_000 + uuid.uuid4().int % 10**6 * 1000
    t0 = _minute_start(int(time.time() * 1000))
    ads = base + np.arange(200)
    _write_ad_counts(settings, ads, t0 - F.MINUTE_MS, 1000, (ads - base) % 40)
    batch = make_batch(1000, 20, t0, 2 * F.MINUTE_MS, base)
    store = CountingStore(FeatureStore(redis_client(settings)))
    server = AdServer(settings, store, AuctionConfig(reserve_cpc=0.1, reserve_ecpm=0.5))
    truth_calls = []

    def truth(b, cand, slot):
        truth_calls.append(len(cand))
        return 0.05 / (1 + slot) * (1 + (b.cand_ad_id[cand] % 5))

    rankers = {
        "model": model_ranker("model", scorer, CalibratorClient(settings)),
        "prior": Ranker("prior", "prior"),
        "oracle": Ranker("oracle", "oracle", truth=truth),
    }
    arm = np.array(list(rankers), dtype=object)[np.arange(1000) % 3]
    server.decide(batch, arm, rankers)  # warm-up (gRPC channel, script load)
    store.times.clear()
    d = server.decide(batch, arm, rankers)
    assert len(store.times) == 2  # one read per event-time minute
    assert not d.degraded.any() and not d.request_degraded.any()
    assert len(d) == d.request_filled.sum() > 1000
    assert np.all(d.request_filled <= batch.n_slots)
    assert set(d.model_version[d.arm == "model"]) == {"1"}
    assert set(d.model_name[d.arm == "model"]) == {MODEL}
    assert np.all(d.price <= batch.cand_bid[d.candidate_index] + 1e-12)
    assert np.all(d.price >= 0.1 - 1e-12)
    assert d.explored.any() and np.all(d.propensity[~d.explored] == 1.0)
    # the model's pCTR0 is the published model of exactly these features at position 0
    sel = (d.arm == "model") & (d.slot == 0)
    assert sel.sum() > 100
    assert np.all((d.pctr0 > 0) & (d.pctr0 < 1)) and np.all((d.pctr > 0) & (d.pctr < 1))
    # timings: decide()'s throughput in candidate rows per second
    rows = len(batch.cand_bid)
    reps = 3
    t = time.perf_counter()
    for _ in range(reps):
        server.decide(batch, arm, rankers)
    dt = (time.perf_counter() - t) / reps
    with capsys.disabled():
        print(
            f"\ndecide: {rows / dt:,.0f} candidate rows/s, {1000 / dt:,.0f} requests/s "
            f"(1000 requests x 20 candidates, 3 arms, in {dt * 1000:.0f} ms; stages "
            + ", ".join(
                f"{k} {v * 1000:.1f} ms" for k, v in d.timings.items() if k != "feature_reads"
            )
            + ")"
        )


def test_features_are_read_as_of_each_requests_own_minute(settings, scorer):
    """Counts written into minute m+1 change the prior pCTR0 of the ad for the requests of
    minute m+1 only, though both minutes are one batch."""
    base = 60_000_000 + uuid.uuid4().int % 10**6 * 1000
    t0 = _minute_start(int(time.time() * 1000))
    batch = make_batch(200, 10, t0, 2 * F.MINUTE_MS, base, seed=3)
    late = batch.event_time_ms >= t0 + F.MINUTE_MS
    assert late.any() and (~late).any()
    ads = np.unique(batch.cand_ad_id)
    _write_ad_counts(settings, ads, t0 + F.MINUTE_MS, 1000, 300)  # smoothed CTR ~0.27
    server = AdServer(settings, FeatureStore(redis_client(settings)), AuctionConfig())
    d = server.decide(batch, np.zeros(200, np.int64), {"prior": Ranker("prior", "prior")})
    is_late = late[d.request_index]
    np.testing.assert_allclose(d.pctr0[~is_late], F.PRIOR.mean, rtol=1e-6)
    np.testing.assert_allclose(d.pctr0[is_late], (300 + 2) / (1000 + 100), rtol=1e-5)


def test_shadows_never_change_what_is_shown(settings, scorer):
    base = 70_000_000 + uuid.uuid4().int % 10**6 * 1000
    t0 = _minute_start(int(time.time() * 1000))
    ads = base + np.arange(200)
    _write_ad_counts(settings, ads, t0 - F.MINUTE_MS, 500, (ads - base) % 25)
    batch = make_batch(300, 20, t0, 90_000, base, seed=5)
    server = AdServer(settings, FeatureStore(redis_client(settings)), AuctionConfig())
    rankers = {"model": model_ranker("model", scorer), "prior": Ranker("prior", "prior")}
    arm = np.arange(300) % 2
    plain = server.decide(batch, arm, rankers)
    with Scorer(settings, model_name=MODEL, max_rows=1024) as shadow_scorer:
        shadows = [model_ranker("shadow", shadow_scorer), Ranker("prior-shadow", "prior")]
        shadowed = server.decide(batch, arm, rankers, shadows)
    for f in (
        "request_index",
        "candidate_index",
        "arm",
        "slot",
        "price",
        "pctr0",
        "pctr",
        "model_version",
        "propensity",
        "explored",
        "request_filled",
    ):
        np.testing.assert_array_equal(getattr(plain, f), getattr(shadowed, f), err_msg=f)
    s = shadowed.shadows["shadow"]
    assert s.model_version == "1" and not s.degraded
    # the same model as the deciding arm: the same pCTR at the shown slots
    sel = shadowed.arm == "model"
    np.testing.assert_allclose(s.pctr_raw[sel], shadowed.pctr_raw[sel], rtol=1e-6)
    assert s.top_candidate.shape == (300, int(batch.n_slots.max()))
    top = (shadowed.slot == 0) & sel & ~shadowed.explored
    np.testing.assert_array_equal(
        s.top_candidate[shadowed.request_index[top], 0], shadowed.candidate_index[top]
    )


def test_decide_degrades_when_redis_or_triton_are_out_of_reach(settings, model):
    base = 80_000_000 + uuid.uuid4().int % 10**6 * 1000
    t0 = _minute_start(int(time.time() * 1000))
    batch = make_batch(100, 10, t0, 60_000, base, seed=7)
    dead_redis = redis.Redis(port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)
    dead_triton = Scorer(settings, model_name=MODEL, url=f"127.0.0.1:{free_port()}", timeout_s=0.5)
    try:
        t = time.monotonic()
        d = AdServer(settings, FeatureStore(dead_redis), AuctionConfig()).decide(
            batch, np.zeros(100, np.int64), {"m": model_ranker("m", dead_triton)}
        )
        assert time.monotonic() - t < 10
    finally:
        dead_triton.close()
    assert len(d) > 0 and d.degraded.all() and d.request_degraded.all()
    assert set(d.model_version) == {""}
    np.testing.assert_allclose(d.pctr0, F.PRIOR.mean, rtol=1e-6)  # zero counts: the prior


# ----------------------------------------------------------------------- POST /v1/auction


@pytest.fixture(scope="module")
def api(settings, model):
    with TestClient(create_app(settings, model_name=model)) as client:
        yield client


@pytest.fixture
def body(settings):
    base = 90_000_000 + uuid.uuid4().int % 10**6 * 100
    now = int(time.time() * 1000)
    k = np.arange(6)
    _write_ad_counts(
        settings, base + k, (now // F.MINUTE_MS - 1) * F.MINUTE_MS, 60 * (k + 1), 4 * k * k
    )
    return {
        "user_id": base + 99,
        "context": {
            "site_id": base + 98,
            "device_type": "mobile",
            "country": "US",
            "event_time_ms": now,
        },
        "slots": 3,
        "candidates": [
            {
                "ad_id": int(base + j),
                "campaign_id": int(base + 10 + j % 2),
                "advertiser_id": int(base + 20),
                "ad_category": 3,
                "bid_cpc": [0.5, 1.0, 2.0, 0.8, 1.5, 0.3][j],
            }
            for j in range(6)
        ],
    }


def test_auction_ranks_by_bid_times_pctr0_and_prices_by_gsp(api, body):
    resp = api.post("/v1/auction", json=body)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["degraded"] is False and doc["model_name"] == MODEL and doc["model_version"] == "1"
    win = doc["winners"]
    assert [w["slot"] for w in win] == [0, 1, 2] and doc["filled"] == 3 and doc["qualified"] == 6
    # the same candidates at position 0 through /v1/predict: the ranking is bid x calibrated
    predict = {
        "user_id": body["user_id"],
        "context": {**body["context"], "position": 0},
        "candidates": [{k: v for k, v in c.items() if k != "bid_cpc"} for c in body["candidates"]],
    }
    got = api.post("/v1/predict", json=predict)
    assert got.status_code == 200, got.text
    scored = {c["ad_id"]: c["calibrated_score"] for c in got.json()["candidates"]}
    bids = {c["ad_id"]: c["bid_cpc"] for c in body["candidates"]}
    ev = sorted(((bids[a] * p, a) for a, p in scored.items()), reverse=True)
    assert [w["ad_id"] for w in win] == [a for _, a in ev[:3]]
    for r, w in enumerate(win):
        assert w["pctr0"] == pytest.approx(scored[w["ad_id"]], rel=1e-6)
        assert w["price"] == pytest.approx(ev[r + 1][0] / w["pctr0"], rel=1e-6)
        assert w["price"] <= w["bid_cpc"] and 0 < w["calibrated_score"] < 1
    assert "auction;dur=" in resp.headers["server-timing"]


def test_auction_reserve_and_fill(api, body):
    body["slots"] = 10
    doc = api.post("/v1/auction", json=body).json()
    assert doc["filled"] == 6 and len(doc["winners"]) == 6
    assert doc["winners"][-1]["price"] == 0.0  # the last winner pays the reserve (0)
    body["reserve"] = {"cpc": 0.9}  # drops the bids 0.5, 0.8 and 0.3
    doc = api.post("/v1/auction", json=body).json()
    assert doc["qualified"] == 3 and doc["filled"] == 3 and doc["reserve_cpc"] == 0.9
    assert all(w["price"] >= 0.9 and w["bid_cpc"] >= 0.9 for w in doc["winners"])
    body["reserve"] = {"ecpm": 1e9}
    doc = api.post("/v1/auction", json=body).json()
    assert doc["winners"] == [] and doc["filled"] == 0 and doc["qualified"] == 0


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda b: b.update(slots=0), "slots"),
        (lambda b: b.update(slots=2.5), "slots"),
        (lambda b: b["candidates"][0].update(bid_cpc=-1), "bid_cpc"),
        (lambda b: b["candidates"][0].pop("bid_cpc"), "bid_cpc"),
        (lambda b: b.update(candidates=[]), "candidates"),
        (lambda b: b.update(reserve={"cpc": -0.1}), "reserve.cpc"),
        (lambda b: b.update(bid=1), "bid"),
        (lambda b: b["context"].update(position=2), "position"),
    ],
)
def test_auction_refuses_bad_input_with_a_clear_422(api, body, change, where):
    change(body)
    resp = api.post("/v1/auction", json=body)
    assert resp.status_code == 422, resp.text
    doc = resp.json()
    assert where in doc["detail"] and doc["errors"], doc


def test_auction_takes_integral_floats_and_refuses_other_content_types(api, body):
    body["slots"] = 2.0
    resp = api.post("/v1/auction", json=body)
    assert resp.status_code == 200 and len(resp.json()["winners"]) == 2
    resp = api.post("/v1/auction", content=b"slots=2", headers={"content-type": "text/plain"})
    assert resp.status_code == 415 and "content-type" in resp.json()["detail"]
    resp = api.post(
        "/v1/auction", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422


def test_the_openapi_document_declares_the_auction(api):
    doc = api.get("/openapi.json").json()
    op = doc["paths"]["/v1/auction"]["post"]
    for code in ("200", "413", "415", "422"):
        assert code in op["responses"], code
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/AuctionRequest"
    )
    assert "AuctionCandidate" in doc["components"]["schemas"]
