"""Batch views in the test stack's Redis: contents equal a brute-force reference, batch view +
speed-layer buckets reproduce the training features (the lambda contract), and the version
pointer switches only after a version is complete."""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.batch.archive import write_partitioned
from ctrstream.batch.point_in_time import long_window_range, training_set
from ctrstream.batch.views import (
    VERSIONS_KEY, default_cutoff, publish_batch_view, read_view_counts, redis_client,
)
from test_batch_features import T0, W, make_traffic, unique_events

REDIS_DB = 11  # batch-view tests own this logical database of the session's Redis


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
                        for j, et in enumerate(F.EVENT_TYPES):
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
        prefix = f"bv:{version}:{e.name}:"
        eids = {k[len(prefix):].rsplit(":", 1)[0] for k in list(ref) if k.startswith(prefix)}
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
                            v for f, v in per.items() if f[0] == et and int(f[1:]) >= b)
            if sums:
                ref[L.batch_sums_key(version, e.name, eid)] = sums
    return ref


def dump_version(r, version: str) -> dict[str, dict[str, int]]:
    out = {}
    for key in r.scan_iter(match=f"bv:{version}:*", count=5000):
        k = key.decode()
        if k != L.batch_meta_key(version):
            out[k] = {f.decode(): int(v) for f, v in r.hgetall(key).items()}
    return out


def test_batch_view_equals_reference(bv_settings, archive):
    data_dir, it, ct = archive
    T = F.align_cutoff(T0 + 8 * F.DAY_MS + 5 * F.HOUR_MS + 1234)
    res = publish_batch_view(bv_settings, data_dir, T)
    r = redis_client(bv_settings)
    v = res["version"]
    assert r.get(L.BATCH_POINTER_KEY).decode() == v
    meta = {k.decode(): x.decode() for k, x in r.hgetall(L.batch_meta_key(v)).items()}
    assert int(meta["cutoff_ms"]) == T and meta["fingerprint"] == F.fingerprint()
    got = dump_version(r, v)
    ref = reference_view(it, ct, T, v)
    assert got == dict(ref)
    assert res["keys_written"] == len(ref) + 1 and res["buckets"] > 0
    assert any(k.endswith(":long") for k in ref) and any(k.endswith(":24h") for k in ref)
    assert any(k.endswith(":sums") for k in ref) and meta[L.BATCH_SUMS_FLAG] == "1"


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
    speed = [(e, 0) for e in imps if e["event_time_ms"] >= T] + [(e, 1) for e in clks if e["event_time_ms"] >= T]
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
                    if ev["event_time_ms"] < t and ev["event_time_ms"] // res.bucket_ms in \
                            F.window_buckets(t, res) and F.entity_id(e, ev) == eid:
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
    r.zadd(VERSIONS_KEY, {"999-1": 1})
    r.hset(L.batch_key("999-1", "ad", "1", "5m"), mapping={"i1": 1})

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

    writes = [i for i, c in enumerate(seen) if c.startswith("HSET") and f"bv:{v2}:" in c]
    meta = [i for i, c in enumerate(seen) if c.startswith(f"HSET bv:{v2}:meta")]
    switch = [i for i, c in enumerate(seen) if c.startswith(f"SET {L.BATCH_POINTER_KEY} {v2}")]
    assert len(meta) == 1 and len(switch) == 1
    assert len(writes) == res["keys_written"]  # data keys + meta
    assert max(writes) == meta[0] < switch[0]
    assert r.get(L.BATCH_POINTER_KEY).decode() == v2
    # keep=2: the previous complete version stays, the half-written one is gone
    assert set(res["deleted_versions"]) == {"999-1"}
    assert r.exists(L.batch_meta_key(v1)) and not list(r.scan_iter(match="bv:999-1:*"))

    v3 = publish_batch_view(bv_settings, data_dir, T2, keep=2)
    assert v3["deleted_versions"] == [v1] and not list(r.scan_iter(match=f"bv:{v1}:*"))
    assert {x.decode() for x in r.zrange(VERSIONS_KEY, 0, -1)} == {v2, v3["version"]}


def test_cutoff_rules(bv_settings, archive, tmp_path):
    data_dir, it, ct = archive
    max_t = max(it.column("event_time_ms").to_numpy().max(), ct.column("event_time_ms").to_numpy().max())
    T = default_cutoff(bv_settings, data_dir)
    assert T == F.align_cutoff(int(max_t) - int(bv_settings.allowed_lateness_s * 1000))
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
    out = subprocess.run([str(Path(sys.executable).parent / "ctrstream"), "batch-views"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cutoff_ms"] == default_cutoff(bv_settings, data_dir)
    assert redis_client(bv_settings).get(L.BATCH_POINTER_KEY).decode() == res["version"]
