"""Serving's feature assembly equals the training definition at the same moment.

Events are counted into Redis the way the speed layer (every bucket, events before ``t``) and
the batch view (closed buckets up to the cut-off, long windows over whole days) write them;
assembly's tensors must equal ``features.dense_from_counts`` / ``features.sparse_ids`` of a
brute-force, point-in-time count over the raw events (``event_time_ms < t``) - whatever the
cut-off that splits the buckets between the two views.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.events import Click, Impression
from ctrstream.serving.assembly import assemble, assemble_async, entity_ids, request_columns
from ctrstream.store import layout as L
from ctrstream.store.connection import redis_client
from ctrstream.store.reader import AsyncFeatureStore, FeatureStore

DAY0 = 1_750_000_000_000 // F.DAY_MS * F.DAY_MS
T = DAY0 + 20 * F.HOUR_MS + 17 * F.MINUTE_MS + 4_321
DEVICES = ("mobile", "desktop", "tablet")


def _events(base: int, seed: int = 5):
    """Impressions and clicks over the 8 days before ``T`` (some after ``T``, which never
    count), with few ids so that entities repeat."""
    rng = np.random.default_rng(seed)
    ads = {base + a: (base + 100 + a % 3, base + 200 + a % 2, base + 300 + a % 4) for a in range(6)}
    imps, clicks = [], []
    times = np.concatenate(
        [
            rng.integers(T - 8 * F.DAY_MS, T, 500),  # long windows
            rng.integers(T - 26 * F.HOUR_MS, T, 600),  # 24h / 1h
            rng.integers(T - 6 * F.MINUTE_MS, T, 200),  # 5m, the open bucket
            rng.integers(T, T + 10 * F.MINUTE_MS, 50),  # the future
        ]
    )
    for n, t in enumerate(times.tolist()):
        ad = base + int(rng.integers(0, 6))
        camp, adv, cat = ads[ad]
        imp = Impression(
            schema_version=1,
            impression_id=f"i{n}",
            event_time_ms=t,
            user_id=base + 400 + int(rng.integers(0, 3)),
            ad_id=ad,
            campaign_id=camp,
            advertiser_id=adv,
            site_id=base + 500 + int(rng.integers(0, 2)),
            ad_category=cat,
            device_type=DEVICES[n % 3],
            country="US",
            position=n % 3,
        )
        imps.append(imp)
        if rng.random() < 0.15:
            ct = t + int(rng.integers(1, 5 * F.MINUTE_MS))
            clicks.append(
                Click(
                    schema_version=1,
                    click_id=f"c{n}",
                    impression_id=imp.impression_id,
                    event_time_ms=ct,
                    user_id=imp.user_id,
                    ad_id=ad,
                    campaign_id=camp,
                    advertiser_id=adv,
                    site_id=imp.site_id,
                    ad_category=cat,
                )
            )
    return imps, clicks, ads


def _bucket_counts(imps, clicks, until_ms: int):
    """{(entity, id, res): Counter({field: n})} over events strictly before ``until_ms``."""
    out: dict = {}
    for kind, events in (("i", imps), ("c", clicks)):
        for ev in events:
            if ev.event_time_ms >= until_ms:
                continue
            for e in F.ENTITIES:
                eid = F.entity_id(e, ev)
                for res in F.RESOLUTIONS:
                    out.setdefault((e.name, eid, res.name), Counter())[
                        L.batch_field(kind, F.bucket_of(ev.event_time_ms, res))
                    ] += 1
    return out


def _long_counts(imps, clicks, at_ms: int):
    hi = at_ms // F.DAY_MS * F.DAY_MS
    out: dict = {}
    for kind, events in (("i", imps), ("c", clicks)):
        for ev in events:
            for w in F.LONG_WINDOWS:
                if hi - w.days * F.DAY_MS <= ev.event_time_ms < hi:
                    for e in F.ENTITIES:
                        out.setdefault((e.name, F.entity_id(e, ev)), Counter())[
                            L.long_field(kind, w)
                        ] += 1
    return out


def write_speed_view(r, imps, clicks, t_ms: int) -> None:
    """What the speed layer holds at ``t_ms``: absolute counts of every bucket so far, in the
    configured layout's hashes (``layout.SpeedLayout.cell_address``)."""
    sl = L.speed_layout()
    per_hash: dict = {}
    for (ent, eid, res), c in _bucket_counts(imps, clicks, t_ms).items():
        for f, n in c.items():
            key, fld = sl.cell_address(ent, eid, res, f[0], int(f[1:]))
            per_hash.setdefault(key, {})[fld] = n
    pipe = r.pipeline(transaction=False)
    for key, mapping in per_hash.items():
        pipe.hset(key, mapping=mapping)
    pipe.execute()


def write_batch_view(r, version: str, imps, clicks, cutoff_ms: int) -> None:
    """A batch view with cut-off ``cutoff_ms``: closed buckets up to it, long windows at it."""
    pipe = r.pipeline(transaction=False)
    for (ent, eid, res), c in _bucket_counts(imps, clicks, cutoff_ms).items():
        bms = F.RESOLUTION_BY_NAME[res].bucket_ms
        closed = {f: n for f, n in c.items() if (int(f[1:]) + 1) * bms <= cutoff_ms}
        if closed:
            pipe.hset(L.batch_key(version, ent, eid, res), mapping=closed)
    for (ent, eid), c in _long_counts(imps, clicks, cutoff_ms).items():
        pipe.hset(L.batch_long_key(version, ent, eid), mapping=dict(c))
    pipe.hset(
        L.batch_meta_key(version),
        mapping={"cutoff_ms": cutoff_ms, "created_ms": cutoff_ms, "fingerprint": F.fingerprint()},
    )
    pipe.set(L.BATCH_POINTER_KEY, version)
    pipe.execute()


def brute_force_counts(rows: list[dict], imps, clicks, t_ms: int) -> np.ndarray:
    """The training definition, event by event: resolution windows count events in
    ``[(b(t) - n + 1) * bucket, t)``, long windows whole days ``[day(t) - d, day(t))``."""
    out = np.zeros((len(rows), len(F.ENTITIES), F.N_WINDOWS, 2), np.int64)
    day = t_ms // F.DAY_MS * F.DAY_MS
    for n, row in enumerate(rows):
        for k, e in enumerate(F.ENTITIES):
            eid = F.entity_id(e, row)
            for j, kind_events in enumerate((imps, clicks)):
                for ev in kind_events:
                    if F.entity_id(e, ev) != eid or ev.event_time_ms >= t_ms:
                        continue
                    for w, res in enumerate(F.RESOLUTIONS):
                        lo = (t_ms // res.bucket_ms - res.n_buckets + 1) * res.bucket_ms
                        if ev.event_time_ms >= lo:
                            out[n, k, w, j] += 1
                    for w, lw in enumerate(F.LONG_WINDOWS):
                        if day - lw.days * F.DAY_MS <= ev.event_time_ms < day:
                            out[n, k, len(F.RESOLUTIONS) + w, j] += 1
    return out


@pytest.fixture
def world(r):
    base = 10_000 + uuid.uuid4().int % 10**9 * 1000
    imps, clicks, ads = _events(base)
    user, site = base + 401, base + 500
    ctx = {"site_id": site, "device_type": "tablet", "country": "DE", "position": 2}
    cands = [
        {"ad_id": a, "campaign_id": c, "advertiser_id": v, "ad_category": g}
        for a, (c, v, g) in ads.items()
    ]
    rows = [{"user_id": user, **ctx, **c} for c in cands]
    write_speed_view(r, imps, clicks, T)
    return imps, clicks, user, ctx, cands, rows


@pytest.mark.parametrize("method", ["script", "pipeline"])
def test_assembly_equals_point_in_time_training_features_for_any_cutoff(
    r, settings, world, unique, method
):
    imps, clicks, user, ctx, cands, rows = world
    want_counts = brute_force_counts(rows, imps, clicks, T)
    assert want_counts[:, :, :, 0].sum() > 0 and want_counts[..., 1].sum() > 0
    assert (want_counts[:, :, len(F.RESOLUTIONS) :, 0] > 0).any()  # long windows are exercised
    want_dense = F.dense_from_counts(want_counts)
    columns = request_columns(user, ctx, cands, T)
    store = FeatureStore(redis_client(settings), method=method, pointer_ttl_s=0)

    denses = []
    # the cut-off moves from early on the day of T to the last aligned boundary before T
    for h in (19, 6, 1):
        cutoff = F.align_cutoff(T - h * F.HOUR_MS)
        assert cutoff // F.DAY_MS == T // F.DAY_MS
        write_batch_view(r, f"{unique}h{h}", imps, clicks, cutoff)
        got = assemble(store, columns, T)
        assert got.read.batch_version == f"{unique}h{h}" and got.read.cutoff_ms == cutoff
        np.testing.assert_array_equal(got.counts, want_counts, err_msg=f"cut-off {h}h before t")
        np.testing.assert_array_equal(got.dense, want_dense)
        denses.append(got.dense)
    assert all(np.array_equal(denses[0], d) for d in denses[1:])
    # the speed view alone: every bucket of the windows, the 24h one on both days of T and
    # the day before (two day hashes per entity)
    speed = assemble(FeatureStore(redis_client(settings), mode="speed", method=method), columns, T)
    day_w = F.window_buckets(T, F.RESOLUTION_BY_NAME["24h"])
    assert len({L.speed_day(b, F.RESOLUTION_BY_NAME["24h"]) for b in day_w}) == 2
    np.testing.assert_array_equal(
        speed.counts[:, :, : len(F.RESOLUTIONS)], want_counts[:, :, : len(F.RESOLUTIONS)]
    )
    assert (speed.counts[:, :, len(F.RESOLUTIONS) :] == 0).all()

    # sparse: the training columns of the same impressions give the same ids
    train_cols = {f: np.array([row[f] for row in rows]) for f in F.SPARSE_FIELDS if f != "hour"}
    train_cols["event_time_ms"] = np.full(len(rows), T)
    np.testing.assert_array_equal(got.sparse, F.sparse_ids(train_cols))
    assert got.sparse.dtype == np.int64 and got.sparse.shape == (len(cands), F.N_SPARSE)
    assert got.dense.dtype == np.float32 and got.dense.shape == (len(cands), F.N_DENSE)


def _event_tables(imps, clicks):
    import msgspec
    import pyarrow as pa

    from ctrstream.batch.archive import SCHEMAS

    return (
        pa.Table.from_pylist(
            [msgspec.structs.asdict(e) for e in imps], schema=SCHEMAS["impressions"]
        ),
        pa.Table.from_pylist([msgspec.structs.asdict(e) for e in clicks], schema=SCHEMAS["clicks"]),
    )


@pytest.mark.parametrize("method", ["script", "pipeline"])
def test_the_batch_layers_own_view_with_suffix_sums_serves_the_training_features(
    r, settings, world, unique, method
):
    """The same contract, with the batch view computed from the raw events by the batch layer
    itself (``ctrstream.batch.views.compute_batch_view``) and written by its writer: per-bucket
    hashes plus the ``:sums`` hashes (suffix sums) the script reads the batch part from -
    two fields per count whatever the number of buckets. Equal to the brute-force training
    counts for every cut-off."""
    from ctrstream.batch.views import compute_batch_view
    from ctrstream.batch.views import write_batch_view as publish

    imps, clicks, user, ctx, cands, rows = world
    want_counts = brute_force_counts(rows, imps, clicks, T)
    it, ct = _event_tables(imps, clicks)
    columns = request_columns(user, ctx, cands, T)
    store = FeatureStore(redis_client(settings), method=method, pointer_ttl_s=0)
    for h in (19, 6, 1):
        cutoff = F.align_cutoff(T - h * F.HOUR_MS)
        buckets, longs = compute_batch_view(it, ct, cutoff)
        version = publish(settings, buckets, longs, cutoff, keep=1000, r=r)["version"]
        assert r.hget(L.batch_meta_key(version), L.BATCH_SUMS_FLAG) == b"1"
        got = assemble(store, columns, T)
        assert got.read.batch_version == version and got.read.cutoff_ms == cutoff
        np.testing.assert_array_equal(got.counts, want_counts, err_msg=f"cut-off {h}h before t")
        np.testing.assert_array_equal(got.dense, F.dense_from_counts(want_counts))


def test_disagreeing_views_show_the_batch_view_wins_for_closed_buckets(r, settings, world, unique):
    """Guard against a merge that silently reads one view only: corrupt the speed view's
    closed buckets - serving must not change; corrupt the open bucket - it must."""
    imps, clicks, user, ctx, cands, rows = world
    cutoff = F.align_cutoff(T - 3 * F.HOUR_MS)
    write_batch_view(r, f"{unique}w", imps, clicks, cutoff)
    columns = request_columns(user, ctx, cands, T)
    store = FeatureStore(redis_client(settings), pointer_ttl_s=0)
    before = assemble(store, columns, T).counts
    ad = str(cands[0]["ad_id"])
    sl = L.speed_layout()
    closed_b = cutoff // F.HOUR_MS - 2
    r.hset(*sl.cell_address("ad", ad, "24h", "i", closed_b), 10**6)
    np.testing.assert_array_equal(assemble(store, columns, T).counts, before)
    open_b = T // F.HOUR_MS
    r.hset(*sl.cell_address("ad", ad, "24h", "i", open_b), 10**6)
    after = assemble(store, columns, T).counts
    assert after[0, 0, 2, 0] >= 10**6 and (after[1:] == before[1:]).all()


def test_entity_ids_match_the_feature_declarations():
    cols = request_columns(
        17,
        {"site_id": 3, "device_type": "ctv", "country": "US", "position": 1},
        [{"ad_id": 4, "campaign_id": 5, "advertiser_id": 6, "ad_category": 7}],
        T,
    )
    ids = entity_ids(cols)
    row = {f: (int(v[0]) if v.dtype.kind == "i" else v[0]) for f, v in cols.items()}
    assert ids[0].tolist() == [F.entity_id(e, row) for e in F.ENTITIES]
    assert ids[0, [e.name for e in F.ENTITIES].index("user_x_ad")] == "17:4"


def test_async_assembly_degrades_to_the_prior_when_redis_is_down(settings, world):
    imps, clicks, user, ctx, cands, rows = world
    from ctrstream.stack.services import free_port

    dead = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"port": free_port()})}
    )

    async def go(s):
        client = redis_client(s, asyncio=True, timeout_s=2.0, connect_timeout_s=10.0)
        try:
            return await assemble_async(
                AsyncFeatureStore(client), request_columns(user, ctx, cands, T), T
            )
        finally:
            await client.aclose()

    bad = asyncio.run(go(dead))
    assert bad.degraded and "feature store unavailable" in bad.error
    assert (bad.counts == 0).all()
    np.testing.assert_allclose(
        bad.dense.reshape(len(cands), -1, 3)[..., 2], F.PRIOR.mean, rtol=1e-6
    )
    good = asyncio.run(go(settings))
    assert not good.degraded and good.counts.sum() > 0
