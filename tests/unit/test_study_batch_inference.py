"""The batch-inference sweep without a server: its precompute rule, the inputs a pair is scored
with and the prior fallback each equal a direct computation from the events; the sweep run
against an in-memory prediction store keeps the sweep contract, checks itself, and its miss
share and computation counts equal a direct count; the prediction store rejects bad input
before it sends anything."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.batch.point_in_time import window_bounds
from ctrstream.config import Settings
from ctrstream.simulation.scenarios import load_scenario
from ctrstream.store.predictions import PredictionStore
from ctrstream.study import batch_inference as BI
from ctrstream.study.data import HOUR_MS, load_study_data

AD = [e.name for e in F.ENTITIES].index("ad")
USER = [e.name for e in F.ENTITIES].index("user")


@pytest.fixture(scope="module")
def data():
    # a day of history, then 12 h: the quick options train on 6 h and evaluate the next 6 h
    return load_study_data(load_scenario("freshness", events=30_000, hours=36, seed=3))


class MemoryStore:
    """An in-memory stand-in for PredictionStore (same methods, float32 values)."""

    def __init__(self) -> None:
        self.spaces: dict[str, dict[tuple[int, int], float]] = {}
        self.puts: list[tuple[str, int]] = []

    def put_many(self, namespace, users, ads, p, ttl_ms):
        assert ttl_ms > 0
        space = self.spaces.setdefault(namespace, {})
        for u, a, v in zip(users.tolist(), ads.tolist(), np.float32(p).tolist()):
            space[(u, a)] = v
        self.puts.append((namespace, len(p)))
        return len(p)

    def get_many(self, namespace, users, ads):
        space = self.spaces.get(namespace, {})
        return np.array([space.get(k, np.nan) for k in zip(users.tolist(), ads.tolist())])

    def clear(self, namespace):
        return len(self.spaces.pop(namespace, {}))

    def memory_used_bytes(self):
        return 64 * sum(len(s) for s in self.spaces.values())


def _col(data, name, rows):
    return data.impressions.column(name).to_numpy(zero_copy_only=False)[rows]


def test_candidates_are_the_latest_impression_of_each_recent_pair(data):
    at = data.history_end_ms + 3 * HOUR_MS
    lookback = 5 * HOUR_MS
    got = BI.candidate_pairs(data, at, lookback)
    want: dict[tuple[int, int], int] = {}
    for i in np.flatnonzero((data.t >= at - lookback) & (data.t < at)).tolist():
        want[(int(_col(data, "user_id", i)), int(_col(data, "ad_id", i)))] = i  # the last wins
    assert got.tolist() == sorted(want.values())


def test_a_pair_is_scored_at_the_precompute_time_with_every_earlier_event(data):
    at = data.history_end_ms + 4 * HOUR_MS
    rows = BI.candidate_pairs(data, at, 6 * HOUR_MS)[::97][:40]
    sparse, dense = BI.precompute_inputs(data, rows, at)
    # sparse: the row's own context, at the precompute's hour of day
    cols = {n: _col(data, n, rows) for n in F.SPARSE_FIELDS if n != "hour"}
    want_sparse = F.sparse_ids(cols | {"event_time_ms": np.full(len(rows), at)})
    assert np.array_equal(sparse, want_sparse)
    assert not np.array_equal(sparse, F.sparse_ids(cols | {"event_time_ms": data.t[rows]}))
    # dense: the ad's and the user's windows anchored at `at`, counted directly from events
    it = data.impressions.column("event_time_ms").to_numpy()
    ct = data.clicks.column("event_time_ms").to_numpy()
    counts = np.zeros((len(rows), len(F.ENTITIES), F.N_WINDOWS, 2))
    for k, field in ((AD, "ad_id"), (USER, "user_id")):
        iv = data.impressions.column(field).to_numpy()
        cv = data.clicks.column(field).to_numpy()
        for w, (lo, hi) in enumerate(window_bounds(np.full(len(rows), at))):
            for j, key in enumerate(_col(data, field, rows).tolist()):
                counts[j, k, w, 0] = np.sum((iv == key) & (it >= lo[j]) & (it < hi[j]))
                counts[j, k, w, 1] = np.sum((cv == key) & (ct >= lo[j]) & (ct < hi[j]))
    assert counts[:, AD, :, 0].sum() > 0 and counts[:, USER, :, 0].sum() > 0
    want = F.dense_from_counts(counts).reshape(len(rows), len(F.ENTITIES), -1)
    got = dense.reshape(len(rows), len(F.ENTITIES), -1)
    assert np.array_equal(got[:, [AD, USER]], want[:, [AD, USER]])


def test_the_prior_fallback_is_the_ads_smoothed_ctr_from_clicks_seen_by_then(data):
    at = data.history_end_ms + 5 * HOUR_MS
    lookback, window = 4 * HOUR_MS, 30 * 60_000
    prior = BI.ad_prior(data, at, lookback, window)
    rows = np.flatnonzero((data.t >= at - lookback) & (data.t < at))
    ads = _col(data, "ad_id", rows)
    for ad in np.unique(ads)[:25].tolist():
        mine = rows[ads == ad]
        d = data.delay_ms[mine]
        seen = int(np.sum((d >= 0) & (d <= window) & (data.t[mine] + d < at)))
        want = (seen + F.PRIOR.alpha) / (len(mine) + F.PRIOR.alpha + F.PRIOR.beta)
        assert prior[ad] == pytest.approx(want)


def test_the_sweep_keeps_the_contract_and_counts_its_misses(data, tmp_path):
    store = MemoryStore()
    opts = dict(every_h=(2, 6), latency_batches=0, n_boot=50)
    res = BI.sweep(data, store, kind="lr", quick=True, log=lambda m: None, **opts)
    json.dumps(res)  # JSON-able
    assert res["sweep"] == "batch_inference"
    assert set(res) >= {"sweep", "params", "rows", "headline", "checks"}
    assert all(res["checks"].values()), res["checks"]
    rows = {r["every_h"]: r for r in res["rows"]}
    assert sorted(rows) == [0, 2, 6]
    assert store.spaces == {}  # every precompute run's namespace was cleared

    # a direct count: which requests find their pair in the precompute run before them
    e0 = res["params"]["eval_start_ms"]
    ev = data.rows_between(e0, e0 + 6 * HOUR_MS)
    assert res["params"]["requests"] == len(ev)
    for n in (2, 6):
        misses, pairs = 0, 0
        for at in range(e0, e0 + 6 * HOUR_MS, n * HOUR_MS):
            cand = BI.candidate_pairs(data, at, int(BI.QUICK["lookback_h"] * HOUR_MS))
            pairs += len(cand)
            have = set(
                zip(_col(data, "user_id", cand).tolist(), _col(data, "ad_id", cand).tolist())
            )
            req = ev[(data.t[ev] >= at) & (data.t[ev] < at + n * HOUR_MS)]
            misses += sum(
                (u, a) not in have
                for u, a in zip(
                    _col(data, "user_id", req).tolist(), _col(data, "ad_id", req).tolist()
                )
            )
        assert rows[n]["miss_share"] == pytest.approx(misses / len(ev))
        assert rows[n]["batch_predictions"] == pairs
        assert rows[n]["online_predictions"] == misses
        assert 0 < rows[n]["mean_age_min"] < n * 60
        lo, d, hi = rows[n]["ne_diff_lo"], rows[n]["ne_diff"], rows[n]["ne_diff_hi"]
        assert lo <= d <= hi
        assert math.isnan(rows[n]["p50_ms"])  # no Redis: no latency measured
    assert rows[2]["batch_predictions"] > rows[6]["batch_predictions"]
    # the online arm's NE next to the oracle's on the same rows
    assert rows[0]["oracle_ne"] == rows[2]["oracle_ne"] < rows[0]["ne"]
    assert res["headline"]["miss_share"] == rows[6]["miss_share"]

    # deterministic for a given (data, seed)
    again = BI.sweep(data, MemoryStore(), kind="lr", quick=True, log=lambda m: None, **opts)
    assert json.dumps(again["rows"]) == json.dumps(res["rows"])

    png = BI.plot(res, tmp_path / "bi.png")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_options_say_what_to_do(data):
    with pytest.raises(ValueError, match="unknown option"):
        BI.sweep(data, MemoryStore(), quick=True, every_hour=1)
    with pytest.raises(ValueError, match="every_h"):
        BI.sweep(data, MemoryStore(), quick=True, every_h=(0,))
    with pytest.raises(TypeError, match="Settings"):
        BI.run(data, redis="redis://localhost:6379")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no rows"):
        BI.sweep(data, MemoryStore(), quick=True, train_hours=20.0, latency_batches=0)


def test_the_prediction_store_rejects_bad_input_before_sending():
    store = PredictionStore(Settings())  # connects on first use only: nothing is sent here
    one = np.array([1])
    with pytest.raises(ValueError, match="differ in length"):
        store.put_many("ns", one, np.array([1, 2]), np.array([0.5]), 1000)
    with pytest.raises(ValueError, match="probabilities"):
        store.put_many("ns", one, one, np.array([1.5]), 1000)
    with pytest.raises(ValueError, match="probabilities"):
        store.put_many("ns", one, one, np.array([np.nan]), 1000)
    with pytest.raises(ValueError, match="ttl_ms"):
        store.put_many("ns", one, one, np.array([0.5]), 0)
    with pytest.raises(ValueError, match="integer ids"):
        store.get_many("ns", np.array(["a"]), one)
    with pytest.raises(ValueError, match="namespace"):
        store.get_many("a:b", one, one)
    assert store.pipe.conn is None
