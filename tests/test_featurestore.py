"""The feature-store reader against a real Redis: lambda merge, modes, switches, freshness."""

from __future__ import annotations

import numpy as np
import pytest

from ctrstream import features as F
from streaming.featurestore import (
    AsyncFeatureStore, FeatureStore, historical_ctr, redis_client, smoothed_rates, unique_keys,
)

RES = {r.name: k for k, r in enumerate(F.RESOLUTIONS)}
T = 1_750_000_000_000 + 37 * F.MINUTE_MS + 12_345  # an arbitrary event time
CUTOFF = F.align_cutoff(T - 5 * F.HOUR_MS)
METHODS = ["script", "pipeline"]


def _publish_batch(r, version: str, cutoff: int) -> None:
    r.hset(F.batch_meta_key(version), mapping={"cutoff_ms": cutoff, "created_ms": cutoff,
                                               "fingerprint": F.fingerprint()})
    r.set(F.BATCH_POINTER_KEY, version)


def _fill(r, key_of, eid: str, ent: str, imps_of, clicks_of, t=T):
    """Every bucket of every window at ``t`` with imps/clicks given by functions of the bucket."""
    for res in F.RESOLUTIONS:
        mapping = {}
        for b in F.window_buckets(t, res):
            mapping[F.field("i", b)] = imps_of(res, b)
            mapping[F.field("c", b)] = clicks_of(res, b)
        r.hset(key_of(ent, eid, res.name), mapping=mapping)


def _expected(cutoff, batch_val, speed_val, mode="lambda"):
    """Window sums when every batch bucket holds ``batch_val`` imps and every speed bucket
    ``speed_val`` (clicks = 1 per bucket in both)."""
    out = np.zeros((F.N_WINDOWS, 2), np.int64)
    for k, res in enumerate(F.RESOLUTIONS):
        for b in F.window_buckets(T, res):
            closed = cutoff is not None and (b + 1) * res.bucket_ms <= cutoff and b != T // res.bucket_ms
            from_batch = mode == "batch" or (mode == "lambda" and cutoff is not None and closed)
            out[k, 0] += batch_val if from_batch else speed_val
            out[k, 1] += 1
    return out


@pytest.mark.parametrize("method", METHODS)
def test_lambda_merge_takes_closed_buckets_from_batch_and_the_rest_from_speed(r, settings, unique, method):
    version = f"v{unique}"
    eid = f"fs{unique}"
    _fill(r, F.speed_key, eid, "ad", lambda res, b: 7, lambda res, b: 1)
    _fill(r, lambda e, i, n: F.batch_key(version, e, i, n), eid, "ad",
          lambda res, b: 1000 if (b + 1) * res.bucket_ms <= CUTOFF else 999_999, lambda res, b: 1)
    r.hset(F.batch_long_key(version, "ad", eid), mapping={"i7d": 123456, "c7d": 789})
    _publish_batch(r, version, CUTOFF)

    store = FeatureStore(redis_client(settings), method=method)
    fr = store.read([f"ad:{eid}"], T)
    want = _expected(CUTOFF, 1000, 7)
    np.testing.assert_array_equal(fr.counts[0, :len(F.RESOLUTIONS)], want[:len(F.RESOLUTIONS)])
    # the 5m window lies after the cut-off (speed only), 24h straddles it (both views)
    assert fr.counts[0, RES["5m"], 0] == 5 * 7
    assert fr.counts[0, RES["24h"], 0] not in (24 * 7, 24 * 1000)
    np.testing.assert_array_equal(fr.counts[0, len(F.RESOLUTIONS)], [123456, 789])
    assert fr.batch_version == version and fr.cutoff_ms == CUTOFF

    speed = FeatureStore(redis_client(settings), mode="speed", method=method).read([f"ad:{eid}"], T)
    np.testing.assert_array_equal(speed.counts[0, :len(F.RESOLUTIONS)],
                                  _expected(None, 0, 7, "speed")[:len(F.RESOLUTIONS)])
    assert (speed.counts[0, len(F.RESOLUTIONS):] == 0).all()
    assert speed.batch_version is None


@pytest.mark.parametrize("method", METHODS)
def test_batch_mode_reads_only_the_batch_view(r, settings, unique, method):
    version = f"v{unique}"
    eid = f"fs{unique}"
    _fill(r, F.speed_key, eid, "campaign", lambda res, b: 7, lambda res, b: 1)
    _fill(r, lambda e, i, n: F.batch_key(version, e, i, n), eid, "campaign",
          lambda res, b: 3, lambda res, b: 1)
    _publish_batch(r, version, CUTOFF)
    fr = FeatureStore(redis_client(settings), mode="batch", method=method).read([f"campaign:{eid}"], T)
    for k, res in enumerate(F.RESOLUTIONS):
        assert fr.counts[0, k, 0] == 3 * res.n_buckets
    assert (fr.counts[0, len(F.RESOLUTIONS):] == 0).all()  # no long hash written


@pytest.mark.parametrize("method", METHODS)
def test_without_a_batch_view_everything_comes_from_the_speed_view(r, settings, unique, method):
    r.delete(F.BATCH_POINTER_KEY)
    eid = f"fs{unique}"
    _fill(r, F.speed_key, eid, "user", lambda res, b: 2, lambda res, b: 1)
    fr = FeatureStore(redis_client(settings), method=method).read([f"user:{eid}", f"user:none{unique}"], T)
    for k, res in enumerate(F.RESOLUTIONS):
        assert fr.counts[0, k].tolist() == [2 * res.n_buckets, res.n_buckets]
    assert (fr.counts[1] == 0).all()
    assert fr.batch_version is None and fr.cutoff_ms is None


@pytest.mark.parametrize("method", METHODS)
def test_a_pointer_switch_is_noticed_on_the_next_read(r, settings, unique, method):
    eid = f"fs{unique}"
    for version, value in ((f"a{unique}", 10), (f"b{unique}", 20)):
        _fill(r, lambda e, i, n, v=version: F.batch_key(v, e, i, n), eid, "ad",
              lambda res, b, v=value: v, lambda res, b: 0)
        r.hset(F.batch_long_key(version, "ad", eid), mapping={"i7d": value, "c7d": 0})
    _publish_batch(r, f"a{unique}", CUTOFF)
    # a long meta cache: the switch must still be seen (the pointer is read in the same trip)
    store = FeatureStore(redis_client(settings), method=method, pointer_ttl_s=3600)
    first = store.read([f"ad:{eid}"], T)
    assert first.batch_version == f"a{unique}" and first.counts[0, -1, 0] == 10
    new_cutoff = CUTOFF - F.CUTOFF_ALIGN_MS
    _publish_batch(r, f"b{unique}", new_cutoff)
    second = store.read([f"ad:{eid}"], T)
    assert second.batch_version == f"b{unique}" and second.cutoff_ms == new_cutoff
    assert second.counts[0, -1, 0] == 20
    k = RES["24h"]
    n_batch = sum(1 for b in F.window_buckets(T, F.RESOLUTIONS[k])
                  if (b + 1) * F.RESOLUTIONS[k].bucket_ms <= new_cutoff)
    assert second.counts[0, k, 0] == 20 * n_batch  # speed view is empty for this id


def test_script_and_pipeline_agree_with_a_per_key_reference_on_many_entities(r, settings, unique):
    """Random data for 300 entities, both methods vs a plain HGETALL-and-sum reference."""
    rng = np.random.default_rng(3)
    version = f"v{unique}"
    keys = [f"{F.ENTITIES[k % len(F.ENTITIES)].name}:{unique}{k}" for k in range(300)]
    pipe = r.pipeline(transaction=False)
    for k, ek in enumerate(keys):
        ent, eid = ek.split(":", 1)
        for res in F.RESOLUTIONS:
            # some buckets outside the window too (older and newer), which must not count
            bs = range(T // res.bucket_ms - res.n_buckets - 2, T // res.bucket_ms + 3)
            if k % 7:  # some entities have no speed data at all
                pipe.hset(F.speed_key(ent, eid, res.name), mapping={
                    f"{t}{b}": int(rng.integers(0, 50)) for b in bs for t in "ic"})
            pipe.hset(F.batch_key(version, ent, eid, res.name), mapping={
                f"{t}{b}": int(rng.integers(0, 50)) for b in bs for t in "ic"})
        pipe.hset(F.batch_long_key(version, ent, eid), mapping={"i7d": k * 10, "c7d": k})
    pipe.execute()
    _publish_batch(r, version, CUTOFF)

    ref = np.zeros((len(keys), F.N_WINDOWS, 2), np.int64)
    for n, ek in enumerate(keys):
        ent, eid = ek.split(":", 1)
        for k, res in enumerate(F.RESOLUTIONS):
            sv = {a.decode(): int(b) for a, b in r.hgetall(F.speed_key(ent, eid, res.name)).items()}
            bv = {a.decode(): int(b) for a, b in r.hgetall(F.batch_key(version, ent, eid, res.name)).items()}
            for b in F.window_buckets(T, res):
                src = bv if ((b + 1) * res.bucket_ms <= CUTOFF and b < T // res.bucket_ms) else sv
                ref[n, k] += [src.get(f"i{b}", 0), src.get(f"c{b}", 0)]
        ref[n, -1] = [n * 10, n]
    client = redis_client(settings)
    for method in METHODS:
        got = FeatureStore(client, method=method).read(keys, T).counts
        np.testing.assert_array_equal(got, ref, err_msg=method)


@pytest.mark.parametrize("method", METHODS)
def test_async_reader_and_freshness(r, settings, unique, method):
    import asyncio

    r.delete(F.BATCH_POINTER_KEY)
    eid = f"fs{unique}"
    res = F.RESOLUTIONS[0]
    newest = T // res.bucket_ms - 2  # data up to two minutes ago
    r.hset(F.speed_key("ad", eid, res.name), mapping={f"i{newest}": 4, f"c{newest}": 1,
                                                      f"i{newest - 1}": 3})

    async def go():
        client = redis_client(settings, asyncio=True)
        try:
            return await AsyncFeatureStore(client, method=method).read([f"ad:{eid}"], T)
        finally:
            await client.aclose()

    fr = asyncio.run(go())
    assert fr.counts[0, 0].tolist() == [7, 1]
    assert fr.newest_bucket_ms == newest * res.bucket_ms
    assert fr.staleness_ms == T - newest * res.bucket_ms


def test_read_rows_gathers_unique_keys_back_into_rows(r, settings, unique):
    r.delete(F.BATCH_POINTER_KEY)
    for n, eid in enumerate(("x", "y")):
        r.hset(F.speed_key("ad", f"{unique}{eid}", "5m"), mapping={f"i{T // F.MINUTE_MS}": n + 1})
    ids = np.array([[f"{unique}{a}"] + [f"{unique}o"] * (len(F.ENTITIES) - 1) for a in "xyx"],
                   dtype=object)
    uniq, inv = unique_keys(ids)
    assert len(uniq) == 2 + (len(F.ENTITIES) - 1)
    fr = FeatureStore(redis_client(settings)).read_rows(ids, T)
    assert fr.counts.shape == (3, len(F.ENTITIES), F.N_WINDOWS, 2)
    assert fr.counts[:, 0, RES["5m"], 0].tolist() == [1, 2, 1]
    assert (fr.counts[:, 1:] == 0).all()


def test_rate_helpers():
    counts = np.zeros((2, len(F.ENTITIES), F.N_WINDOWS, 2))
    counts[0, 0, 2] = [1000, 100]  # ad: 24h window has the most impressions
    counts[0, 0, 0] = [10, 10]
    rates = smoothed_rates(counts)
    assert rates.shape == (2, len(F.ENTITIES), F.N_WINDOWS)
    assert rates[1, 0, 0] == pytest.approx(F.PRIOR.mean)
    h = historical_ctr(counts)
    assert h[0] == pytest.approx((100 + F.PRIOR.alpha) / (1000 + F.PRIOR.strength))
    assert h[1] == pytest.approx(F.PRIOR.mean)


def test_rejects_unknown_mode_and_method(settings):
    with pytest.raises(ValueError, match="mode"):
        FeatureStore(redis_client(settings), mode="both")
    with pytest.raises(ValueError, match="method"):
        FeatureStore(redis_client(settings), method="mget")


def test_crossed_entities_of_an_empty_user_are_pruned_exactly(r, settings, unique):
    """user_x_ad counts are bounded by the user's: where the user's window is empty the
    script does not read the crossed key. Shown with a deliberately inconsistent store."""
    r.delete(F.BATCH_POINTER_KEY)
    user, ad = f"u{unique}", f"a{unique}"
    _fill(r, F.speed_key, ad, "ad", lambda res, b: 5, lambda res, b: 1)
    _fill(r, F.speed_key, f"{user}:{ad}", "user_x_ad", lambda res, b: 2, lambda res, b: 1)
    keys = [f"ad:{ad}", f"user:{user}", f"user_x_ad:{user}:{ad}"]
    script = FeatureStore(redis_client(settings))
    pipeline = FeatureStore(redis_client(settings), method="pipeline")
    r.config_resetstat()
    pruned = script.read(keys, T).counts
    calls = int(r.info("commandstats")["cmdstat_hmget"]["calls"])
    assert calls == 2 * len(F.RESOLUTIONS)  # ad and user only
    assert (pruned[2] == 0).all() and pipeline.read(keys, T).counts[2, 0, 0] > 0
    # once the user has the events too, the crossed key is read
    _fill(r, F.speed_key, user, "user", lambda res, b: 2, lambda res, b: 1)
    np.testing.assert_array_equal(script.read(keys, T).counts, pipeline.read(keys, T).counts)
    assert script.read(keys, T).counts[2, 0, 0] == 2 * F.RESOLUTIONS[0].n_buckets


def test_cache_serves_shared_entities_until_ttl_window_move_or_switch(r, settings, unique):
    version = f"v{unique}"
    ad, user = f"a{unique}", f"u{unique}"
    _fill(r, F.speed_key, ad, "ad", lambda res, b: 5, lambda res, b: 0)
    _fill(r, F.speed_key, user, "user", lambda res, b: 5, lambda res, b: 0)
    r.hset(F.batch_long_key(version, "ad", ad), mapping={"i7d": 1, "c7d": 0})
    _publish_batch(r, version, CUTOFF)
    store = FeatureStore(redis_client(settings), cache_ttl_s=3600)
    keys = [f"ad:{ad}", f"user:{user}"]
    first = store.read(keys, T).counts
    b = T // F.MINUTE_MS
    r.hset(F.speed_key("ad", ad, "5m"), F.field("i", b), 1000)
    r.hset(F.speed_key("user", user, "5m"), F.field("i", b), 1000)
    second = store.read(keys, T + 1).counts  # same buckets: the ad is cached, the user is not
    assert second[0, 0, 0] == first[0, 0, 0] and second[1, 0, 0] == first[1, 0, 0] + 995
    assert store.cache_hits == 1
    moved = store.read(keys, T + F.MINUTE_MS).counts  # the windows moved: read again
    assert moved[0, 0, 0] == 3 * 5 + 1000  # b-3..b filled, b+1 (new open bucket) empty
    other = f"w{unique}"
    r.hset(F.batch_long_key(other, "ad", ad), mapping={"i7d": 2, "c7d": 0})
    _publish_batch(r, other, CUTOFF)
    switched = store.read(keys, T + F.MINUTE_MS)
    assert switched.batch_version == other and switched.counts[0, -1, 0] == 2
    uncached = FeatureStore(redis_client(settings)).read(keys, T + F.MINUTE_MS).counts
    np.testing.assert_array_equal(switched.counts, uncached)
