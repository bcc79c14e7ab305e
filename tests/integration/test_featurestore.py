"""The feature-store reader against a real Redis: lambda merge, modes, switches, freshness."""

from __future__ import annotations

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.store.connection import redis_client
from ctrstream.store.plan import unique_entity_keys as unique_keys
from ctrstream.store.reader import AsyncFeatureStore, FeatureStore

RES = {r.name: k for k, r in enumerate(F.RESOLUTIONS)}
T = 1_750_000_000_000 + 37 * F.MINUTE_MS + 12_345  # an arbitrary event time (15:43 UTC)
CUTOFF = F.align_cutoff(T - 5 * F.HOUR_MS)
# just after the next UTC midnight: every window, and the speed part after a cut-off five
# hours back, spans two days (two speed-view hashes per entity)
T_MIDNIGHT = (T // F.DAY_MS + 1) * F.DAY_MS + 2 * F.MINUTE_MS + 7_777
CUTOFF_MIDNIGHT = F.align_cutoff(T_MIDNIGHT - 5 * F.HOUR_MS)
METHODS = ["script", "pipeline"]


def _cell(ent: str, eid: str, res: str, t: str, b: int) -> tuple[str, str]:
    """``(key, field)`` of one speed-view cell in the configured layout."""
    return L.speed_layout().cell_address(ent, eid, res, t, b)


def _hset_speed(r, ent: str, eid: str, cells: dict) -> None:
    """Speed-view cells ``{(res, event type, bucket): count}`` into the entity's day hashes, as
    the speed layer writes them (``r``: a client or a pipeline)."""
    per_day: dict = {}
    for (res, t, b), v in cells.items():
        key, fld = _cell(ent, eid, res, t, b)
        per_day.setdefault(key, {})[fld] = v
    for key, mapping in per_day.items():
        r.hset(key, mapping=mapping)


def _own_fields(r, ent: str, eid: str, day: int) -> dict:
    """``{field: count}`` of the entity's own cells in its hash of ``day``, each field named as
    ``layout.speed_field`` names it (the hash may hold other entities' cells: the grouped
    layout)."""
    sl = L.speed_layout()
    key = sl.key(ent, eid, day)
    root, rid, _ = sl.parse_key(key)
    out = {}
    for a, v in r.hgetall(key).items():
        e, i, res, t, b = sl.parse_field(root, rid, a)
        if (e, i) == (ent, eid):
            out[L.speed_field(res, t, b)] = int(v)
    return out


def _delete_speed(r, ent: str, eid: str, days) -> None:
    """Delete the entity's own cells of ``days`` (not the other entities' of its hashes)."""
    sl = L.speed_layout()
    for day in days:
        fields = [sl.field_prefix(ent, eid) + f for f in _own_fields(r, ent, eid, day)]
        if fields:
            r.hdel(sl.key(ent, eid, day), *fields)


def _speed_cells(r, ent: str, eid: str, t: int) -> dict:
    """Every cell of the entity in its speed-view hashes of the days around ``t``."""
    out = {}
    for day in range(t // F.DAY_MS - 3, t // F.DAY_MS + 2):
        out.update(_own_fields(r, ent, eid, day))
    return out


def _speed_days(t: int, cutoff, resolutions=F.RESOLUTIONS) -> int:
    """How many day hashes hold the speed buckets of ``resolutions`` at ``t`` (cut-off: the
    batch view's, None: everything from the speed view)."""
    days = set()
    for res in resolutions:
        for b in F.window_buckets(t, res):
            if cutoff is None or (b + 1) * res.bucket_ms > cutoff or b == t // res.bucket_ms:
                days.add(L.speed_day(b, res))
    return len(days)


def _publish_batch(r, version: str, cutoff: int) -> None:
    r.hset(
        L.batch_meta_key(version),
        mapping={"cutoff_ms": cutoff, "created_ms": cutoff, "fingerprint": F.fingerprint()},
    )
    r.set(L.BATCH_POINTER_KEY, version)


def _fill_speed(r, eid: str, ent: str, imps_of, clicks_of, t=T, resolutions=F.RESOLUTIONS):
    """The entity's speed-view hashes (one per day, for every resolution): every bucket of
    every window at ``t`` with imps/clicks given by functions of the bucket."""
    cells = {}
    for res in resolutions:
        for b in F.window_buckets(t, res):
            cells[(res.name, "i", b)] = imps_of(res, b)
            cells[(res.name, "c", b)] = clicks_of(res, b)
    _hset_speed(r, ent, eid, cells)


def _fill(r, key_of, eid: str, ent: str, imps_of, clicks_of, t=T):
    """Batch view: every bucket of every window at ``t`` with imps/clicks given by functions
    of the bucket, one hash per resolution ``key_of(ent, eid, res)``."""
    for res in F.RESOLUTIONS:
        mapping = {}
        for b in F.window_buckets(t, res):
            mapping[L.batch_field("i", b)] = imps_of(res, b)
            mapping[L.batch_field("c", b)] = clicks_of(res, b)
        r.hset(key_of(ent, eid, res.name), mapping=mapping)


def _expected(cutoff, batch_val, speed_val, mode="lambda"):
    """Window sums when every batch bucket holds ``batch_val`` imps and every speed bucket
    ``speed_val`` (clicks = 1 per bucket in both)."""
    out = np.zeros((F.N_WINDOWS, 2), np.int64)
    for k, res in enumerate(F.RESOLUTIONS):
        for b in F.window_buckets(T, res):
            closed = (
                cutoff is not None and (b + 1) * res.bucket_ms <= cutoff and b != T // res.bucket_ms
            )
            from_batch = mode == "batch" or (mode == "lambda" and cutoff is not None and closed)
            out[k, 0] += batch_val if from_batch else speed_val
            out[k, 1] += 1
    return out


@pytest.mark.parametrize("method", METHODS)
def test_lambda_merge_takes_closed_buckets_from_batch_and_the_rest_from_speed(
    r, settings, unique, method
):
    version = f"v{unique}"
    eid = f"fs{unique}"
    _fill_speed(r, eid, "ad", lambda res, b: 7, lambda res, b: 1)
    _fill(
        r,
        lambda e, i, n: L.batch_key(version, e, i, n),
        eid,
        "ad",
        lambda res, b: 1000 if (b + 1) * res.bucket_ms <= CUTOFF else 999_999,
        lambda res, b: 1,
    )
    r.hset(L.batch_long_key(version, "ad", eid), mapping={"i7d": 123456, "c7d": 789})
    _publish_batch(r, version, CUTOFF)

    store = FeatureStore(redis_client(settings), method=method)
    fr = store.read([f"ad:{eid}"], T)
    want = _expected(CUTOFF, 1000, 7)
    np.testing.assert_array_equal(fr.counts[0, : len(F.RESOLUTIONS)], want[: len(F.RESOLUTIONS)])
    # the 5m window lies after the cut-off (speed only), 24h straddles it (both views)
    assert fr.counts[0, RES["5m"], 0] == 5 * 7
    assert fr.counts[0, RES["24h"], 0] not in (24 * 7, 24 * 1000)
    np.testing.assert_array_equal(fr.counts[0, len(F.RESOLUTIONS)], [123456, 789])
    assert fr.batch_version == version and fr.cutoff_ms == CUTOFF

    speed = FeatureStore(redis_client(settings), mode="speed", method=method).read([f"ad:{eid}"], T)
    np.testing.assert_array_equal(
        speed.counts[0, : len(F.RESOLUTIONS)], _expected(None, 0, 7, "speed")[: len(F.RESOLUTIONS)]
    )
    assert (speed.counts[0, len(F.RESOLUTIONS) :] == 0).all()
    assert speed.batch_version is None


@pytest.mark.parametrize("method", METHODS)
def test_batch_mode_reads_only_the_batch_view(r, settings, unique, method):
    version = f"v{unique}"
    eid = f"fs{unique}"
    _fill_speed(r, eid, "campaign", lambda res, b: 7, lambda res, b: 1)
    _fill(
        r,
        lambda e, i, n: L.batch_key(version, e, i, n),
        eid,
        "campaign",
        lambda res, b: 3,
        lambda res, b: 1,
    )
    _publish_batch(r, version, CUTOFF)
    fr = FeatureStore(redis_client(settings), mode="batch", method=method).read(
        [f"campaign:{eid}"], T
    )
    for k, res in enumerate(F.RESOLUTIONS):
        assert fr.counts[0, k, 0] == 3 * res.n_buckets
    assert (fr.counts[0, len(F.RESOLUTIONS) :] == 0).all()  # no long hash written


@pytest.mark.parametrize("method", METHODS)
def test_without_a_batch_view_everything_comes_from_the_speed_view(r, settings, unique, method):
    r.delete(L.BATCH_POINTER_KEY)
    eid = f"fs{unique}"
    _fill_speed(r, eid, "user", lambda res, b: 2, lambda res, b: 1)
    fr = FeatureStore(redis_client(settings), method=method).read(
        [f"user:{eid}", f"user:none{unique}"], T
    )
    for k, res in enumerate(F.RESOLUTIONS):
        assert fr.counts[0, k].tolist() == [2 * res.n_buckets, res.n_buckets]
    assert (fr.counts[1] == 0).all()
    assert fr.batch_version is None and fr.cutoff_ms is None


@pytest.mark.parametrize("method", METHODS)
def test_a_pointer_switch_is_noticed_on_the_next_read(r, settings, unique, method):
    eid = f"fs{unique}"
    for version, value in ((f"a{unique}", 10), (f"b{unique}", 20)):
        _fill(
            r,
            lambda e, i, n, v=version: L.batch_key(v, e, i, n),
            eid,
            "ad",
            lambda res, b, v=value: v,
            lambda res, b: 0,
        )
        r.hset(L.batch_long_key(version, "ad", eid), mapping={"i7d": value, "c7d": 0})
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
    n_batch = sum(
        1
        for b in F.window_buckets(T, F.RESOLUTIONS[k])
        if (b + 1) * F.RESOLUTIONS[k].bucket_ms <= new_cutoff
    )
    assert second.counts[0, k, 0] == 20 * n_batch  # speed view is empty for this id


@pytest.mark.parametrize(
    "t, cutoff", [(T, CUTOFF), (T_MIDNIGHT, CUTOFF_MIDNIGHT)], ids=["afternoon", "across-midnight"]
)
def test_script_and_pipeline_agree_with_a_per_key_reference_on_many_entities(
    r, settings, unique, t, cutoff
):
    """Random data for 300 entities, both methods vs a plain HGETALL-and-sum reference - at a
    time whose speed buckets lie on one day (but the 24h window on two), and just after a
    UTC midnight (every window, and the speed part after the cut-off, on two days)."""
    rng = np.random.default_rng(3)
    version = f"v{unique}"
    keys = [
        L.entity_key(e.name, ":".join(f"{unique}{k}{f}" for f in range(len(e.fields))))
        for k, e in ((k, F.ENTITIES[k % len(F.ENTITIES)]) for k in range(300))
    ]
    pipe = r.pipeline(transaction=False)
    for k, ek in enumerate(keys):
        ent, eid = ek.split(":", 1)
        for res in F.RESOLUTIONS:
            # some buckets outside the window too (older and newer), which must not count
            bs = range(t // res.bucket_ms - res.n_buckets - 2, t // res.bucket_ms + 3)
            if k % 7:  # some entities have no speed data at all
                _hset_speed(
                    pipe,
                    ent,
                    eid,
                    {(res.name, et, b): int(rng.integers(0, 50)) for b in bs for et in "ic"},
                )
            pipe.hset(
                L.batch_key(version, ent, eid, res.name),
                mapping={f"{et}{b}": int(rng.integers(0, 50)) for b in bs for et in "ic"},
            )
        pipe.hset(L.batch_long_key(version, ent, eid), mapping={"i7d": k * 10, "c7d": k})
    pipe.execute()
    _publish_batch(r, version, cutoff)

    ref = np.zeros((len(keys), F.N_WINDOWS, 2), np.int64)
    speed_ref = np.zeros_like(ref)
    for n, ek in enumerate(keys):
        ent, eid = ek.split(":", 1)
        sv_all = _speed_cells(r, ent, eid, t)
        for k, res in enumerate(F.RESOLUTIONS):
            # this resolution's fields of the entity's speed hashes, as batch-style fields
            sv = {
                f[len(res.name) + 1 :]: v for f, v in sv_all.items() if f.startswith(res.name + ":")
            }
            bv = {
                a.decode(): int(b)
                for a, b in r.hgetall(L.batch_key(version, ent, eid, res.name)).items()
            }
            for b in F.window_buckets(t, res):
                src = bv if ((b + 1) * res.bucket_ms <= cutoff and b < t // res.bucket_ms) else sv
                ref[n, k] += [src.get(f"i{b}", 0), src.get(f"c{b}", 0)]
                speed_ref[n, k] += [sv.get(f"i{b}", 0), sv.get(f"c{b}", 0)]
        ref[n, -1] = [n * 10, n]
    if t == T_MIDNIGHT:  # the case this parameter is for
        assert _speed_days(t, cutoff) == 2 and _speed_days(t, cutoff, F.RESOLUTIONS[:1]) == 2
    client = redis_client(settings)
    for method in METHODS:
        got = FeatureStore(client, method=method).read(keys, t)
        np.testing.assert_array_equal(got.counts, ref, err_msg=method)
        speed = FeatureStore(client, mode="speed", method=method).read(keys, t)
        np.testing.assert_array_equal(speed.counts, speed_ref, err_msg=f"speed {method}")
        assert speed.newest_bucket_ms == t // F.MINUTE_MS * F.MINUTE_MS  # the open 5m bucket


@pytest.mark.parametrize("method", METHODS)
def test_async_reader_and_freshness(r, settings, unique, method):
    import asyncio

    r.delete(L.BATCH_POINTER_KEY)
    eid = f"fs{unique}"
    res = F.RESOLUTIONS[0]
    newest = T // res.bucket_ms - 2  # data up to two minutes ago
    _hset_speed(
        r,
        "ad",
        eid,
        {(res.name, "i", newest): 4, (res.name, "c", newest): 1, (res.name, "i", newest - 1): 3},
    )

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


def test_async_script_connection_pipelines_reloads_scripts_and_recovers(r, settings, unique):
    """The API's EVALSHA connection (``AsyncScript``): concurrent reads share one connection
    and each gets its own answer; a flushed script cache is reloaded; a Redis that does not
    answer raises a timeout (the caller degrades) and the next read reconnects."""
    import asyncio

    from ctrstream.store.script import AsyncScript

    r.delete(L.BATCH_POINTER_KEY)
    res = F.RESOLUTIONS[0]
    b = T // res.bucket_ms - 1
    ids = [f"lean{unique}-{k}" for k in range(40)]
    for k, eid in enumerate(ids):
        _hset_speed(r, "ad", eid, {(res.name, "i", b): 10 + k, (res.name, "c", b): k})

    async def go():
        # a short reply deadline; opening a connection may take longer on a loaded machine
        client = redis_client(settings, asyncio=True, timeout_s=2.0, connect_timeout_s=10.0)
        store = AsyncFeatureStore(client)
        assert isinstance(store.script, AsyncScript)
        try:
            reads = await asyncio.gather(*(store.read([f"ad:{eid}"], T) for eid in ids))
            got = [fr.counts[0, 0].tolist() for fr in reads]
            r.script_flush()
            again = (await store.read([f"ad:{ids[3]}"], T)).counts[0, 0].tolist()
            r.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # EVALSHA waits, GET does not
            try:
                with pytest.raises(TimeoutError):
                    await store.read([f"ad:{ids[5]}"], T)
            finally:
                r.execute_command("CLIENT", "UNPAUSE")
            after = (await store.read([f"ad:{ids[7]}"], T)).counts[0, 0].tolist()
            return got, again, after
        finally:
            await store.close()
            await client.aclose()

    got, again, after = asyncio.run(go())
    assert got == [[10 + k, k] for k in range(len(ids))]
    assert again == [13, 3] and after == [17, 7]


def test_sync_script_reloads_scripts_and_reconnects(r, settings, unique):
    """The sync readers' EVALSHA connection (``SyncScript``): a flushed script cache is
    reloaded, a killed connection is replaced on the next read, a dead Redis raises."""
    import redis as redis_py

    from ctrstream.stack.services import free_port
    from ctrstream.store.script import SyncScript

    r.delete(L.BATCH_POINTER_KEY)
    res = F.RESOLUTIONS[0]
    b = T // res.bucket_ms - 1
    ids = [f"sync{unique}-{k}" for k in range(3)]
    for k, eid in enumerate(ids):
        _hset_speed(r, "ad", eid, {(res.name, "i", b): 10 + k, (res.name, "c", b): k})
    store = FeatureStore(redis_client(settings))
    assert isinstance(store.script, SyncScript)
    want = [[[10 + k, k]] for k in range(3)]
    assert store.read([f"ad:{ids[0]}"], T).counts[0, :1].tolist() == want[0]
    r.script_flush()
    assert store.read([f"ad:{ids[1]}"], T).counts[0, :1].tolist() == want[1]
    assert store.script.sock is not None
    r.client_kill_filter(_id=store.script.sock.call("CLIENT", "ID"))
    assert store.read([f"ad:{ids[2]}"], T).counts[0, :1].tolist() == want[2]
    dead = FeatureStore(redis_py.Redis(port=free_port(), socket_timeout=0.5), mode="speed")
    assert isinstance(dead.script, SyncScript)
    with pytest.raises(ConnectionError):  # the script's own connection: OSError's
        dead.read([f"ad:{ids[0]}"], T)


def test_read_rows_gathers_unique_keys_back_into_rows(r, settings, unique):
    r.delete(L.BATCH_POINTER_KEY)
    for n, eid in enumerate(("x", "y")):
        _hset_speed(r, "ad", f"{unique}{eid}", {("5m", "i", T // F.MINUTE_MS): n + 1})
    other = [":".join([f"{unique}o"] * len(e.fields)) for e in F.ENTITIES[1:]]  # one per field
    ids = np.array([[f"{unique}{a}", *other] for a in "xyx"], dtype=object)
    uniq, inv = unique_keys(ids)
    assert len(uniq) == 2 + (len(F.ENTITIES) - 1)
    fr = FeatureStore(redis_client(settings)).read_rows(ids, T)
    assert fr.counts.shape == (3, len(F.ENTITIES), F.N_WINDOWS, 2)
    assert fr.counts[:, 0, RES["5m"], 0].tolist() == [1, 2, 1]
    assert (fr.counts[:, 1:] == 0).all()


def test_rejects_unknown_mode_and_method(settings):
    with pytest.raises(ValueError, match="mode"):
        FeatureStore(redis_client(settings), mode="both")
    with pytest.raises(ValueError, match="method"):
        FeatureStore(redis_client(settings), method="mget")


def test_crossed_entities_of_an_empty_user_are_pruned_exactly(r, settings, unique):
    """user_x_ad counts are bounded by the user's: where the user's window is empty the
    script does not read the crossed key, nor a day hash that only pruned windows need.
    Shown with a deliberately inconsistent store."""
    r.delete(L.BATCH_POINTER_KEY)
    user, ad = f"u{unique}", f"a{unique}"
    _fill_speed(r, ad, "ad", lambda res, b: 5, lambda res, b: 1)
    _fill_speed(r, f"{user}:{ad}", "user_x_ad", lambda res, b: 2, lambda res, b: 1)
    keys = [f"ad:{ad}", f"user:{user}", f"user_x_ad:{user}:{ad}"]
    script = FeatureStore(redis_client(settings))
    pipeline = FeatureStore(redis_client(settings), method="pipeline")

    def hmgets(store):
        r.config_resetstat()
        counts = store.read(keys, T).counts
        return counts, int(r.info("commandstats")["cmdstat_hmget"]["calls"])

    # at T (15:43) the 24h window starts on the day before: two day hashes, the 5m and 1h
    # windows lie on the day of T
    days = _speed_days(T, None)
    old = F.RESOLUTION_BY_NAME["24h"]
    assert days == 2 and _speed_days(T, None, [r_ for r_ in F.RESOLUTIONS if r_ is not old]) == 1
    pruned, calls = hmgets(script)
    assert calls == 2 * days  # ad and user only: one HMGET per day hash each (all resolutions)
    unpruned, calls = hmgets(pipeline)
    assert calls == 3 * days  # the pipeline: one HMGET per key and day, no pruning
    assert (pruned[2] == 0).all() and unpruned[2, 0, 0] > 0
    # the user has events in old buckets of the 24h window only: its 5m and 1h windows are
    # empty, so the crossed key's are pruned, and its 24h window is read (both days)
    _fill_speed(
        r,
        user,
        "user",
        lambda res, b: 2 if b < (T - F.HOUR_MS) // res.bucket_ms else 0,
        lambda res, b: 0,
        resolutions=[old],
    )
    partly, calls = hmgets(script)
    assert calls == 2 * days + 2
    full = pipeline.read(keys, T).counts
    for k, res in enumerate(F.RESOLUTIONS):
        if res is old:
            np.testing.assert_array_equal(partly[2, k], full[2, k])
            assert partly[2, k, 0] == 2 * res.n_buckets
        else:
            assert (partly[1, k] == 0).all() and (partly[2, k] == 0).all() and full[2, k, 0] > 0
    np.testing.assert_array_equal(partly[:2], full[:2])
    # the user has events in its 5m window only (inconsistent): the crossed key's 1h and
    # 24h windows are pruned, so only the day of T is read for it - not the day before
    _delete_speed(r, "user", user, range(T // F.DAY_MS - 2, T // F.DAY_MS + 2))
    five = F.RESOLUTION_BY_NAME["5m"]
    _fill_speed(r, user, "user", lambda res, b: 1, lambda res, b: 0, resolutions=[five])
    recent, calls = hmgets(script)
    assert calls == 2 * days + 1
    full = pipeline.read(keys, T).counts
    np.testing.assert_array_equal(recent[2, RES["5m"]], full[2, RES["5m"]])
    assert recent[2, RES["5m"], 0] == 2 * five.n_buckets
    assert (recent[2, RES["1h"]] == 0).all() and (recent[2, RES["24h"]] == 0).all()
    np.testing.assert_array_equal(recent[:2], full[:2])
    # once the user has the events too, the crossed key is read
    _fill_speed(r, user, "user", lambda res, b: 2, lambda res, b: 1)
    np.testing.assert_array_equal(script.read(keys, T).counts, pipeline.read(keys, T).counts)
    assert script.read(keys, T).counts[2, 0, 0] == 2 * F.RESOLUTIONS[0].n_buckets


def test_cache_serves_shared_entities_until_ttl_window_move_or_switch(r, settings, unique):
    version = f"v{unique}"
    ad, user = f"a{unique}", f"u{unique}"
    _fill_speed(r, ad, "ad", lambda res, b: 5, lambda res, b: 0)
    _fill_speed(r, user, "user", lambda res, b: 5, lambda res, b: 0)
    r.hset(L.batch_long_key(version, "ad", ad), mapping={"i7d": 1, "c7d": 0})
    _publish_batch(r, version, CUTOFF)
    store = FeatureStore(redis_client(settings), cache_ttl_s=3600)
    keys = [f"ad:{ad}", f"user:{user}"]
    first = store.read(keys, T).counts
    b = T // F.MINUTE_MS
    r.hset(*_cell("ad", ad, "5m", "i", b), 1000)
    r.hset(*_cell("user", user, "5m", "i", b), 1000)
    second = store.read(keys, T + 1).counts  # same buckets: the ad is cached, the user is not
    assert second[0, 0, 0] == first[0, 0, 0] and second[1, 0, 0] == first[1, 0, 0] + 995
    assert store.cache_stats()["hits"] == 1
    moved = store.read(keys, T + F.MINUTE_MS).counts  # the windows moved: read again
    assert moved[0, 0, 0] == 3 * 5 + 1000  # b-3..b filled, b+1 (new open bucket) empty
    other = f"w{unique}"
    r.hset(L.batch_long_key(other, "ad", ad), mapping={"i7d": 2, "c7d": 0})
    _publish_batch(r, other, CUTOFF)
    switched = store.read(keys, T + F.MINUTE_MS)
    assert switched.batch_version == other and switched.counts[0, -1, 0] == 2
    uncached = FeatureStore(redis_client(settings)).read(keys, T + F.MINUTE_MS).counts
    np.testing.assert_array_equal(switched.counts, uncached)


# --------------------------------------------------------------------------- batch-view suffix sums


def _random_view_tables(rng, cutoff: int, n_ent: int, prefix: str):
    """Bucket and long-window tables as ``ctrstream.batch.views.compute_batch_view`` returns
    them: random counts in random buckets of the view (some entities sparse, some empty)."""
    import pyarrow as pa

    from ctrstream.batch.point_in_time import BUCKET_COUNTS_SCHEMA, LONG_COUNTS_SCHEMA

    rows = {k: [] for k in ("entity", "eid", "res", "bucket", "imps", "clicks")}
    longs = {k: [] for k in ("entity", "eid", "long_window", "imps", "clicks")}
    keys = []
    for n in range(n_ent):
        ent = F.ENTITIES[n % len(F.ENTITIES)].name
        eid = ":".join([f"{prefix}{n}"] * len(F.ENTITY_BY_NAME[ent].fields))  # one per field
        keys.append(f"{ent}:{eid}")
        if n % 5 == 4:
            continue  # no batch data at all
        for res in F.RESOLUTIONS:
            held = list(F.view_buckets(cutoff, res))
            for b in rng.choice(held, size=int(rng.integers(0, len(held) + 1)), replace=False):
                imps = int(rng.integers(1, 60))
                for col, v in zip(
                    rows, (ent, eid, res.name, int(b), imps, int(rng.integers(0, imps + 1)))
                ):
                    rows[col].append(v)
        if n % 3:
            for w in F.LONG_WINDOWS:
                for col, v in zip(
                    longs, (ent, eid, w.name, int(rng.integers(0, 9000)), int(rng.integers(0, 90)))
                ):
                    longs[col].append(v)
    bt = pa.table(rows).cast(BUCKET_COUNTS_SCHEMA)
    lt = pa.table(longs).cast(LONG_COUNTS_SCHEMA)
    return bt, lt, keys


def test_suffix_sums_of_the_batch_view_equal_the_per_bucket_view(r, settings, unique):
    """The script reads the batch part of every window from the view's ``:sums`` hash (two
    fields per count); the pipeline method sums the per-bucket hashes field by field. Both
    must agree for any read time - before, at and after the cut-off - in every mode, and the
    ``:sums`` hashes must hold exactly the suffix sums of the per-bucket ones."""
    from ctrstream.batch.views import read_view_counts, write_batch_view

    rng = np.random.default_rng(5)
    bt, lt, keys = _random_view_tables(rng, CUTOFF, 40, f"sx{unique}")
    # speed data around the cut-off too (some of it overlapping the view, as in real life)
    pipe = r.pipeline(transaction=False)
    for n, ek in enumerate(keys):
        ent, eid = ek.split(":", 1)
        for res in F.RESOLUTIONS:
            lo = CUTOFF // res.bucket_ms - res.n_buckets
            bs = range(lo, lo + 3 * res.n_buckets)
            if n % 4:
                _hset_speed(
                    pipe,
                    ent,
                    eid,
                    {(res.name, t, b): int(rng.integers(0, 30)) for b in bs for t in "ic"},
                )
    pipe.execute()
    version = write_batch_view(settings, bt, lt, CUTOFF, keep=1000, r=r)["version"]
    assert r.hget(L.batch_meta_key(version), L.BATCH_SUMS_FLAG) == b"1"

    # the :sums hash = suffix sums of the per-bucket hash (absent fields are 0)
    for ek in keys:
        ent, eid = ek.split(":", 1)
        sums = read_view_counts(r, version, ent, eid, "sums")
        for res in F.RESOLUTIONS:
            per = read_view_counts(r, version, ent, eid, res.name)
            for b in F.view_buckets(CUTOFF, res):
                for t in F.EVENT_TYPES:
                    want = sum(v for f, v in per.items() if f[0] == t and int(f[1:]) >= b)
                    assert sums.get(L.suffix_field(res.name, t, b), 0) == want, (ek, res.name, b, t)
        long = read_view_counts(r, version, ent, eid, "long")
        assert {f: v for f, v in sums.items() if ":" not in f} == long

    client = redis_client(settings)
    for mode in ("lambda", "batch", "speed"):
        for dt in (-30 * F.MINUTE_MS, -1, 0, 1, 7 * F.MINUTE_MS, 5 * F.HOUR_MS + 1, 30 * F.HOUR_MS):
            t = CUTOFF + dt
            script = FeatureStore(client, mode=mode).read(keys, t)
            pipeline = FeatureStore(client, mode=mode, method="pipeline").read(keys, t)
            np.testing.assert_array_equal(
                script.counts, pipeline.counts, err_msg=f"{mode} t=cutoff{dt:+d}"
            )
            assert script.batch_version == pipeline.batch_version
            assert script.newest_bucket_ms == pipeline.newest_bucket_ms


def test_script_reads_one_sums_hash_per_entity_for_the_batch_part(r, settings, unique):
    """The batch part of every window and the long windows: one HMGET of a few fields; the
    speed part of every window: one HMGET per day hash of the entity's speed buckets."""
    from ctrstream.batch.views import write_batch_view

    rng = np.random.default_rng(9)
    bt, lt, keys = _random_view_tables(rng, CUTOFF, 16, f"sy{unique}")
    write_batch_view(settings, bt, lt, CUTOFF, keep=1000, r=r)
    store = FeatureStore(redis_client(settings), mode="batch")
    r.config_resetstat()
    store.read(keys, CUTOFF + 5 * F.HOUR_MS)
    stats = r.info("commandstats")
    # batch mode reads no speed view: the meta, then one HMGET per entity
    assert stats["cmdstat_hmget"]["calls"] == 1 + len(keys)
    # lambda mode: plus ONE HMGET of the entity's speed hash for every resolution - its
    # speed buckets (after the cut-off, 10:00) all lie on one day
    t = CUTOFF + 5 * F.HOUR_MS
    assert _speed_days(t, CUTOFF) == 1
    r.config_resetstat()
    FeatureStore(redis_client(settings)).read(keys, t)
    assert r.info("commandstats")["cmdstat_hmget"]["calls"] == 1 + 2 * len(keys)
    # just after midnight the speed buckets lie on two days: two HMGETs of the speed view
    t = (CUTOFF // F.DAY_MS + 1) * F.DAY_MS + 30 * F.MINUTE_MS
    assert _speed_days(t, CUTOFF) == 2
    r.config_resetstat()
    FeatureStore(redis_client(settings)).read(keys, t)
    assert r.info("commandstats")["cmdstat_hmget"]["calls"] == 1 + 3 * len(keys)


def test_cache_staleness_is_bounded_by_the_ttl(r, settings, unique):
    """With a shared-entity cache of TTL ``ttl``, every value a read returns for a shared
    entity was the value in Redis at some moment within ``ttl`` before the read; user
    entities are never cached. A fake clock makes the property exact: writes are increasing
    values, so each value names the moment it was written."""
    r.delete(L.BATCH_POINTER_KEY)
    ttl = settings.flush_interval_ms / 1000.0
    now = [1000.0]
    store = FeatureStore(redis_client(settings), cache_ttl_s=ttl, clock=lambda: now[0])
    ad, user = f"ad:st{unique}", f"user:st{unique}"
    b = T // F.RESOLUTIONS[0].bucket_ms
    history = {ad: [(now[0], 0)], user: [(now[0], 0)]}  # (written at, value)
    rng = np.random.default_rng(2)
    value = 0
    for _ in range(300):
        now[0] += float(rng.uniform(0, ttl / 3))
        for key in (ad, user):
            if rng.random() < 0.4:
                value += 1
                ent, eid = key.split(":", 1)
                r.hset(*_cell(ent, eid, "5m", "i", b), value)
                history[key].append((now[0], value))
        fr = store.read([ad, user], T)
        got = {ad: int(fr.counts[0, 0, 0]), user: int(fr.counts[1, 0, 0])}
        assert got[user] == history[user][-1][1]  # always read
        # the ad's value: written within ttl, or the one current ttl ago
        recent = {v for at, v in history[ad] if at > now[0] - ttl}
        before = [v for at, v in history[ad] if at <= now[0] - ttl]
        assert got[ad] in recent | set(before[-1:]), (now[0], got[ad], history[ad][-4:])
        if fr.cache_hits:
            assert fr.cache_staleness_s < ttl
    assert store.cache_stats()["hits"] > 50 and store.cache_stats()["misses"] > 50
    last = history[ad][-1][1]
    stale = FeatureStore(redis_client(settings), cache_ttl_s=ttl, clock=lambda: now[0])
    stale.read([ad], T)
    r.hset(*_cell("ad", ad.split(":", 1)[1], "5m", "i", b), last + 1000)
    now[0] += ttl * 0.99
    assert stale.read([ad], T).counts[0, 0, 0] == last  # within the TTL: the cached value
    now[0] += ttl * 0.02
    assert stale.read([ad], T).counts[0, 0, 0] == last + 1000  # TTL passed: read again


def test_an_entry_invalidated_while_its_read_is_in_flight_is_not_cached(r, settings, unique):
    """A write reported between the script's read and storing its result must not leave the
    (possibly older) result in the cache."""
    r.delete(L.BATCH_POINTER_KEY)
    ad = f"ad:race{unique}"
    _fill_speed(r, ad.split(":", 1)[1], "ad", lambda res, b: 3, lambda res, b: 0)
    store = FeatureStore(redis_client(settings), cache_ttl_s=60)
    real = store.script

    def script_then_report(**kw):
        reply = real(**kw)
        store.invalidate([ad])  # the report of a write that raced the read
        return reply

    store.script = script_then_report
    store.read([ad], T)
    assert ad not in store.cache
    store.script = real
    store.read([ad], T)
    assert ad in store.cache  # an undisturbed read is cached
    store.invalidate_all()
    assert not store.cache


def test_tracked_cache_is_invalidated_by_writes_and_bounded_by_heartbeats(r, settings, unique):
    """With server-assisted invalidation (CLIENT TRACKING) a shared entity stays cached past
    the TTL while Redis reports no write to it; a write drops it; every value served lags
    Redis by less than the TTL; when the channel is cut, the cache falls back to the TTL and
    is dropped, and the channel comes back by itself."""
    import asyncio
    import time as _time

    r.delete(L.BATCH_POINTER_KEY)
    ttl = settings.flush_interval_ms / 1000.0
    ad, user = f"ad:tr{unique}", f"user:tr{unique}"
    b = T // F.RESOLUTIONS[0].bucket_ms
    ad_key, ad_field = _cell("ad", ad.split(":", 1)[1], "5m", "i", b)
    r.hset(ad_key, ad_field, 0)
    r.hset(*_cell("user", user.split(":", 1)[1], "5m", "i", b), 1)

    async def healthy(store, after=None, timeout=10.0):
        deadline = _time.monotonic() + timeout
        while _time.monotonic() < deadline:
            t = store.tracker.acked_sent_at
            if t is not None and (after is None or t > after):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"tracker not healthy: {store.tracker.status()}")

    async def go():
        client = redis_client(settings, asyncio=True)
        store = AsyncFeatureStore(client, cache_ttl_s=ttl, tracking=True, heartbeat_s=0.02)
        await store.start()
        try:
            await healthy(store)
            first = await store.read([ad, user], T)
            assert first.cache_hits == 0
            await asyncio.sleep(ttl * 2)  # older than the TTL, but vouched for by the tracker
            again = await store.read([ad, user], T)
            assert again.cache_hits == 1 and again.cache_staleness_s < ttl
            assert again.counts[0, 0, 0] == 0

            # a write is reported: once a later heartbeat is back, the entry is gone
            wrote = _time.monotonic()
            r.hset(ad_key, ad_field, 5)
            await healthy(store, after=wrote)
            fresh = await store.read([ad, user], T)
            assert fresh.cache_hits == 0 and fresh.counts[0, 0, 0] == 5

            # the bound, under a stream of writes: every value served was current in Redis
            # at some moment less than the TTL before the read
            history = [(wrote, 5)]
            value = 5
            rng = np.random.default_rng(4)
            hits = 0
            for _ in range(150):
                if rng.random() < 0.3:
                    value += 1
                    r.hset(ad_key, ad_field, value)
                    history.append((_time.monotonic(), value))
                await asyncio.sleep(float(rng.uniform(0, 0.02)))
                start = _time.monotonic()
                fr = await store.read([ad, user], T)
                hits += fr.cache_hits
                got = int(fr.counts[0, 0, 0])
                current_then = [v for at, v in history if at <= start - ttl][-1:]
                allowed = {v for at, v in history if at > start - ttl} | set(current_then)
                assert got in allowed, (got, history[-3:], start)
            assert hits > 0

            # cut the channel: no vouching, cache dropped; it comes back by itself
            assert store.cache
            for c in r.client_list():
                if c.get("name", "").startswith("ctrstream-invalidation"):
                    r.client_kill_filter(_id=c["id"])
            deadline = _time.monotonic() + 10
            while store.tracker.restarts < 1 and _time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert store.tracker.restarts >= 1 and store.tracker.last_error
            await healthy(store)
            assert store.tracker.status()["healthy"] and not store.cache
            ok = await store.read([ad, user], T)  # read again after the outage
            assert ok.cache_hits == 0 and ok.counts[0, 0, 0] == value
        finally:
            await store.close()
            await client.aclose()

    asyncio.run(go())


@pytest.mark.parametrize("layout_name", L.SPEED_LAYOUTS)
def test_the_grouped_script_reads_a_users_crosses_with_one_hmget_per_day(
    r, settings, unique, layout_name
):
    """The grouped layout keeps a user's crosses with every candidate in the user's hash of
    each day, and the script reads all of them with ONE HMGET per day (the entity layout:
    one per cross and day); both give the pipeline reference's counts."""
    sl = L.speed_layout(layout_name)
    r.delete(L.BATCH_POINTER_KEY)
    user, ads = f"g{unique}", [f"{unique}{k}" for k in range(20)]
    cells = {("user", user, 1 + len(ads))}
    cells |= {("ad", a, 3 + k) for k, a in enumerate(ads)}
    cells |= {("user_x_ad", f"{user}:{a}", 1 + k) for k, a in enumerate(ads)}
    cells |= {("user_x_advertiser", f"{user}:{a}", 2 + k) for k, a in enumerate(ads[:5])}
    for ent, eid, n in cells:
        for res in F.RESOLUTIONS:
            bb = T // res.bucket_ms
            r.hset(*sl.cell_address(ent, eid, res.name, "i", bb), n)
            r.hset(*sl.cell_address(ent, eid, res.name, "c", bb), 1)
    keys = sorted(L.entity_key(e, i) for e, i, _ in cells)
    script = FeatureStore(redis_client(settings), mode="speed", speed_layout=sl)
    pipeline = FeatureStore(
        redis_client(settings), mode="speed", method="pipeline", speed_layout=sl
    )
    r.config_resetstat()
    got = script.read(keys, T).counts
    calls = int(r.info("commandstats")["cmdstat_hmget"]["calls"])
    np.testing.assert_array_equal(got, pipeline.read(keys, T).counts)
    want = {L.entity_key(e, i): n for e, i, n in cells}
    assert [int(x) for x in got[:, 0, 0]] == [want[k] for k in keys]
    days = _speed_days(T, None)
    plain = 1 + len(ads)  # the user and every ad: one HMGET per day each
    crossed = len(ads) + 5
    assert calls == days * (plain + (1 if sl.grouped else crossed))
