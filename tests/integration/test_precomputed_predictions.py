"""Precomputed predictions in a real Redis: the store's multi-put and multi-get round-trip
float32 probabilities with a TTL per user hash, keep namespaces apart and clear them; the
batch-inference sweep runs against a real Redis (a database of its own: its latency
measurement publishes a throw-away batch view) and measures both arms; a private Redis
starts and stops by PID."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctrstream.simulation.scenarios import load_scenario
from ctrstream.stack.manager import isolated_redis
from ctrstream.stack.services import pid_alive, wait_until
from ctrstream.store import layout as L
from ctrstream.store.connection import redis_client
from ctrstream.store.predictions import PredictionStore
from ctrstream.study import batch_inference as BI
from ctrstream.study.data import load_study_data

SWEEP_DB = 7  # the sweep's own database in the session's Redis


@pytest.fixture
def store(settings):
    with PredictionStore(settings) as s:
        yield s


def test_multi_put_and_multi_get_round_trip_with_a_ttl(store, settings, unique):
    rng = np.random.default_rng(5)
    n = 5_000
    users = rng.integers(1, 800, n)
    ads = rng.integers(1, 3_000, n)
    keep = np.unique(np.stack([users, ads], 1), axis=0, return_index=True)[1]
    users, ads = users[keep], ads[keep]
    p = rng.random(len(users))
    ns = f"test-{unique}"
    assert store.put_many(ns, users, ads, p, ttl_ms=60_000) == len(users)

    got = store.get_many(ns, users, ads)
    assert np.array_equal(got.astype(np.float32), p.astype(np.float32))
    # a micro-batch mixing stored pairs and pairs never written: misses are NaN, in order
    q_users = np.concatenate([users[:50], users[:50]])
    q_ads = np.concatenate([ads[:50], ads[:50] + 10_000])
    mixed = store.get_many(ns, q_users, q_ads)
    assert np.array_equal(mixed[:50].astype(np.float32), p[:50].astype(np.float32))
    assert np.isnan(mixed[50:]).all()
    assert store.get_many(ns, users[:0], ads[:0]).shape == (0,)

    client = redis_client(settings)
    try:
        pttl = client.pttl(L.prediction_key(ns, int(users[0])))
        assert 0 < pttl <= 60_000
    finally:
        client.close()
    assert store.count_users(ns) == len(np.unique(users))

    # namespaces are apart; a pair written again is overwritten
    other = f"{ns}-b"
    store.put_many(other, users[:1], ads[:1], np.array([0.25]), ttl_ms=60_000)
    assert np.isnan(store.get_many(other, users[1:3], ads[1:3])).all()
    assert store.get_many(ns, users[:1], ads[:1])[0] == pytest.approx(p[0], rel=1e-6)
    store.put_many(ns, users[:1], ads[:1], np.array([0.125]), ttl_ms=60_000)
    assert store.get_many(ns, users[:1], ads[:1])[0] == 0.125

    assert store.clear(ns) == len(np.unique(users))
    assert np.isnan(store.get_many(ns, users, ads)).all()
    assert store.get_many(other, users[:1], ads[:1])[0] == 0.25
    store.clear(other)


def test_the_memory_of_a_precompute_run_is_measured(store, unique):
    ns = f"mem-{unique}"
    before = store.memory_used_bytes()
    n = 20_000
    store.put_many(ns, np.arange(n) // 2, np.arange(n) % 97, np.full(n, 0.01), ttl_ms=60_000)
    grown = store.memory_used_bytes() - before
    store.clear(ns)
    assert 10 * n < grown < 1_000 * n  # tens of bytes per pair, not nothing


def test_the_sweep_runs_against_a_real_redis(settings):
    own = settings.model_copy(update={"redis": settings.redis.model_copy(update={"db": SWEEP_DB})})
    data = load_study_data(load_scenario("freshness", events=30_000, hours=36, seed=4))
    lines: list[str] = []
    res = BI.run(
        data,
        kind="lr",
        quick=True,
        log=lines.append,
        redis=own,
        every_h=(3, 6),
        latency_batch=50,
        latency_batches=10,
        n_boot=50,
    )
    assert all(res["checks"].values()), res["checks"]
    lat = res["params"]["latency"]
    assert lat["micro_batches"] >= 1
    for k in ("batch_read_p50_ms", "online_p50_ms", "online_feature_read_p50_ms"):
        assert 0 < lat[k] < 10_000, (k, lat[k])
    rows = {r["every_h"]: r for r in res["rows"]}
    assert not math.isnan(rows[0]["p50_ms"]) and not math.isnan(rows[3]["p99_ms"])
    assert 0 < rows[6]["miss_share"] < 1
    assert res["headline"]["redis_bytes_per_pair"] > 0
    # the run's predictions are gone from Redis
    client = redis_client(own)
    try:
        assert not list(client.scan_iter(match=L.PREDICTION_PREFIX + "*", count=1000))
    finally:
        client.close()


def test_a_private_redis_starts_and_stops(tmp_path):
    with isolated_redis(tmp_path / "r") as s:
        client = redis_client(s)
        try:
            assert client.ping()
        finally:
            client.close()
        pid = int((tmp_path / "r" / "redis.pid").read_text())
        assert pid_alive(pid)
    wait_until(lambda: not pid_alive(pid), timeout=10, what="the private redis to stop")
