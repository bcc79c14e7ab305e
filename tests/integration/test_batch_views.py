"""Batch views in the test stack's Redis: contents equal a brute-force reference, batch view +
speed-layer buckets reproduce the training features (the lambda contract), and the version
pointer switches only after a version is complete."""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np
import pytest
from batch_traffic import T0, W, make_traffic, unique_events

from ctrstream import features as F
from ctrstream.batch.archive import write_partitioned
from ctrstream.batch.point_in_time import long_window_range, training_set
from ctrstream.batch.views import default_cutoff, publish_batch_view, read_view_counts
from ctrstream.store import batch_view as BV
from ctrstream.store import layout as L

REDIS_DB = 11  # batch-view tests own this logical database of the session's Redis


def redis_client(settings):
    """A client without socket timeouts (MONITOR below waits for commands)."""
    import redis

    return redis.Redis.from_url(settings.redis.url)


@pytest.fixture
def bv_settings(settings):
    s = settings.model_copy(update={"redis": settings.redis.model_copy(update={"db": REDIS_DB})})
    redis_client(s).flushdb()
    return s


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("bv")
    it, ct = make_traffic(n_imps=900, seed=7)
    write_partitioned(data_dir, "impressions", it)
    write_partitioned(data_dir, "impressions", it.slice(0, 50))  # re-delivered copies
    write_partitioned(data_dir, "clicks", ct)
    return data_dir, it, ct


def reference_view(it, ct, T: int, version: str) -> dict[str, dict[str, int]]:
    """Every hash the view must hold, from the definition in ctrstream.batch.views."""
    imps, clks = unique_events(it, ct)
    ref: dict[str, dict[str, int]] = defaultdict(dict)
    for c, evs in ((0, imps), (1, clks)):
        for ev in evs:
            t = ev["event_time_ms"]
            if t >= T:
                continue
            for e in F.ENTITIES:
                eid = F.entity_id(e, ev)
                for r in F.RESOLUTIONS:
                    b = t // r.bucket_ms
                    if T - r.window_ms <= b * r.bucket_ms and (b + 1) * r.bucket_ms <= T:
                        h = ref[L.batch_key(version, e.name, eid, r.name)]
                        for et in F.EVENT_TYPES:
                            h.setdefault(L.batch_field(et, b), 0)
                        h[L.batch_field(F.EVENT_TYPES[c], b)] += 1
                for w in F.LONG_WINDOWS:
                    lo, hi = long_window_range(T, w)
                    if lo <= t < hi:
                        h = ref[L.batch_long_key(version, e.name, eid)]
                        for et in F.EVENT_TYPES:
                            h.setdefault(L.long_field(et, w), 0)
                        h[L.long_field(F.EVENT_TYPES[c], w)] += 1
    # the :sums hash of every entity with view data: its long windows, and per resolution the
    # suffix sums S[b] = counts of the view's buckets >= b, for every bucket of the view from
    # its first one up to the entity's last non-empty one
    for e in F.ENTITIES:
        parsed = [L.batch_entity_of(version, k) for k in list(ref)]
        eids = {p[1] for p in parsed if p is not None and p[0] == e.name}
        for eid in eids:
            sums = {}
            sums.update(ref.get(L.batch_long_key(version, e.name, eid), {}))
            for r in F.RESOLUTIONS:
                per = ref.get(L.batch_key(version, e.name, eid, r.name))
                if not per:
                    continue
                last = max(int(f[1:]) for f in per)
                for b in range(F.view_buckets(T, r).start, last + 1):
                    for et in F.EVENT_TYPES:
                        sums[L.suffix_field(r.name, et, b)] = sum(
                            v for f, v in per.items() if f[0] == et and int(f[1:]) >= b
                        )
            if sums:
                ref[L.batch_sums_key(version, e.name, eid)] = sums
    return ref


def dump_version(r, version: str) -> dict[str, dict[str, int]]:
    """Every data hash of the version by key (the store reads them, and refuses any key of
    the version that is not one of its hashes)."""
    return {
        L.batch_key(version, e, i, part): h
        for (e, i, part), h in BV.read_version(r, version).items()
    }


def test_batch_view_equals_reference(bv_settings, archive):
    data_dir, it, ct = archive
    T = F.align_cutoff(T0 + 8 * F.DAY_MS + 5 * F.HOUR_MS + 1234)
    res = publish_batch_view(bv_settings, data_dir, T)
    r = redis_client(bv_settings)
    v = res["version"]
    assert BV.served_version(r) == v
    meta = BV.read_meta(r, v)
    assert int(meta["cutoff_ms"]) == T and meta["fingerprint"] == F.fingerprint()
    got = dump_version(r, v)
    ref = reference_view(it, ct, T, v)
    assert got == dict(ref)
    assert res["keys_written"] == len(ref) + 1 and res["buckets"] > 0
    parts = {L.batch_entity_of(v, k)[2] for k in ref}
    assert L.LONG_SUFFIX in parts and "24h" in parts
    assert L.SUMS_SUFFIX in parts and meta[L.BATCH_SUMS_FLAG] == "1"


def test_batch_plus_speed_reproduces_training(bv_settings, archive):
    """The serving path's merge - batch view buckets before the cut-off, speed-layer buckets
    from it on, long windows from the view - gives every impression of the cut-off's day
    exactly its training features."""
    data_dir, it, ct = archive
    T = F.align_cutoff(T0 + 7 * F.DAY_MS + 9 * F.HOUR_MS)
    v = publish_batch_view(bv_settings, data_dir, T)["version"]
    r = redis_client(bv_settings)
    ts = training_set(data_dir, attribution_window_ms=W)
    imps, clks = unique_events(it, ct)
    day_end = (T // F.DAY_MS + 1) * F.DAY_MS
    rows = np.flatnonzero((ts["event_time_ms"] >= T) & (ts["event_time_ms"] < day_end))
    assert len(rows) > 20
    by_id = {e["impression_id"]: e for e in imps}
    speed = [(e, 0) for e in imps if e["event_time_ms"] >= T] + [
        (e, 1) for e in clks if e["event_time_ms"] >= T
    ]
    for i in rows[:60]:
        q = by_id[ts["impression_id"][i]]
        t = q["event_time_ms"]
        for k, e in enumerate(F.ENTITIES):
            eid = F.entity_id(e, q)
            for w, res in enumerate(F.RESOLUTIONS):
                view = read_view_counts(r, v, e.name, eid, res.name)
                got = [0, 0]
                for b in F.window_buckets(t, res):
                    if (b + 1) * res.bucket_ms <= T:  # closed by the cut-off: batch view
                        for j, et in enumerate(F.EVENT_TYPES):
                            got[j] += view.get(L.batch_field(et, b), 0)
                for ev, c in speed:  # speed layer: at or after T, strictly before t
                    if (
                        ev["event_time_ms"] < t
                        and ev["event_time_ms"] // res.bucket_ms in F.window_buckets(t, res)
                        and F.entity_id(e, ev) == eid
                    ):
                        got[c] += 1
                assert got == list(ts["counts"][i, k, w]), (e.name, res.name)
            long = read_view_counts(r, v, e.name, eid, "long")
            for j, lw in enumerate(F.LONG_WINDOWS):
                got = [long.get(L.long_field(et, lw), 0) for et in F.EVENT_TYPES]
                assert got == list(ts["counts"][i, k, len(F.RESOLUTIONS) + j])


def test_pointer_switches_after_complete_version(bv_settings, archive):
    """Redis MONITOR (the server's own command order): every data key and the meta of a
    version are written before the pointer moves; old and half-written versions go."""
    data_dir, _, _ = archive
    r = redis_client(bv_settings)
    T1 = F.align_cutoff(T0 + 6 * F.DAY_MS)
    v1 = publish_batch_view(bv_settings, data_dir, T1)["version"]
    # a publisher that died half way: registered, some keys, no meta, never pointed to
    BV.register_version(r, "999-1", 1)
    r.hset(L.batch_key("999-1", "ad", "1", "5m"), mapping={L.batch_field("i", 1): 1})

    seen, ready = [], threading.Event()
    sentinel = "bv-test-monitor-done"

    def monitor():
        with r.monitor() as m:
            ready.set()
            for cmd in m.listen():
                seen.append(cmd["command"])
                if sentinel in cmd["command"]:
                    return

    th = threading.Thread(target=monitor, daemon=True)
    th.start()
    assert ready.wait(10)
    T2 = F.align_cutoff(T0 + 7 * F.DAY_MS)
    res = publish_batch_view(bv_settings, data_dir, T2, keep=2)
    r2 = redis_client(bv_settings)
    r2.echo(sentinel)
    th.join(20)
    v2 = res["version"]
    assert not th.is_alive()

    writes = [
        i for i, c in enumerate(seen) if c.startswith("HSET") and L.batch_version_prefix(v2) in c
    ]
    meta = [i for i, c in enumerate(seen) if c.startswith(f"HSET {L.batch_meta_key(v2)}")]
    switch = [i for i, c in enumerate(seen) if c.startswith(f"SET {L.BATCH_POINTER_KEY} {v2}")]
    assert len(meta) == 1 and len(switch) == 1
    assert len(writes) == res["keys_written"]  # data keys + meta
    assert max(writes) == meta[0] < switch[0]
    assert BV.served_version(r) == v2
    # keep=2: the previous complete version stays, the half-written one is gone
    assert set(res["deleted_versions"]) == {"999-1"}
    assert r.exists(L.batch_meta_key(v1)) and not list(
        r.scan_iter(match=L.batch_version_pattern("999-1"))
    )

    v3 = publish_batch_view(bv_settings, data_dir, T2, keep=2)
    assert v3["deleted_versions"] == [v1] and not list(
        r.scan_iter(match=L.batch_version_pattern(v1))
    )
    assert set(BV.versions(r)) == {v2, v3["version"]}


def test_cutoff_rules(bv_settings, archive, tmp_path):
    data_dir, it, ct = archive
    max_t = max(
        it.column("event_time_ms").to_numpy().max(), ct.column("event_time_ms").to_numpy().max()
    )
    T = default_cutoff(bv_settings, data_dir)
    assert F.align_cutoff(int(max_t) - int(bv_settings.allowed_lateness_s * 1000)) == T
    with pytest.raises(ValueError, match="not aligned"):
        publish_batch_view(bv_settings, data_dir, T + 1)
    with pytest.raises(ValueError, match="empty"):
        publish_batch_view(bv_settings, tmp_path)


def test_cli_batch_views(bv_settings, archive, stack_env):
    import json
    import subprocess
    import sys
    from pathlib import Path

    data_dir, _, _ = archive
    env = {**stack_env, "CTRSTREAM_DATA_DIR": str(data_dir), "CTRSTREAM_REDIS__DB": str(REDIS_DB)}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ctrstream"), "batch-views"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cutoff_ms"] == default_cutoff(bv_settings, data_dir)
    assert BV.served_version(redis_client(bv_settings)) == res["version"]
