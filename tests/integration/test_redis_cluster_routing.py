"""The store's own RESP clients on a real 3-master Redis Cluster: the speed writer's per-node
pipelines write exactly what one Redis holds, the readers read the same counts as on one
Redis, and a slot migration (``redis-cli --cluster reshard``) under load loses nothing:
writes and reads go on through ``MOVED`` and ``ASK``."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from ctrstream import features as F
from ctrstream.config import Settings
from ctrstream.stack.manager import isolated_redis, isolated_redis_cluster
from ctrstream.stack.services import wait_until
from ctrstream.store import layout as L
from ctrstream.store import speed_view as SV
from ctrstream.store.cluster import connections_for, copy_to_cluster, key_slot
from ctrstream.store.connection import redis_client
from ctrstream.store.reader import AsyncFeatureStore, FeatureStore

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="needs Debian's redis-server and redis-cli",
)

MIDNIGHT = 1_767_571_200_000  # 2026-01-05 00:00 UTC
RES = {r.name: k for k, r in enumerate(F.RESOLUTIONS)}
ENT = {e.name: k for k, e in enumerate(F.ENTITIES)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Settings]:
    """A 3-master Redis Cluster (a replica each) of its own (part of ``stack up
    --redis-cluster 3``), on free loopback ports."""
    with isolated_redis_cluster(masters=3) as s:
        yield s


def _node(s: Settings, port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, password=s.redis.password)


@pytest.fixture(scope="module")
def cluster_nodes(cluster) -> list[int]:
    """The masters' ports."""
    out = []
    for seed in cluster.redis.cluster:
        port = int(seed.rpartition(":")[2])
        if _node(cluster, port).info("replication")["role"] == "master":
            out.append(port)
    assert len(out) == 3
    return out


@pytest.fixture
def on_cluster(cluster, cluster_nodes) -> Iterator[Settings]:
    for p in cluster_nodes:
        _node(cluster, p).flushall()
    yield cluster


@pytest.fixture(scope="module")
def single() -> Iterator[Settings]:
    with isolated_redis() as s:
        yield s


def _read_all(s: Settings, ports: list[int]) -> dict[SV.Cell, int]:
    """The speed view of every master, merged (each key lives on one master)."""
    out: dict[SV.Cell, int] = {}
    for p in ports:
        got = SV.read_speed_view(_node(s, p))
        assert not out.keys() & got.keys()
        out.update(got)
    return out


def _random_cells(
    rng: np.random.Generator, n: int, t0_ms: int, scale: int = 1
) -> list[SV.SpeedCells]:
    """Cells of a plain and a crossed entity over two days (negative ids too: the packed
    path)."""
    out = []
    for name, nparts, lo in (("ad", 1, 0), ("user_x_ad", 2, 0), ("user", 1, -50)):
        res = rng.integers(0, len(F.RESOLUTIONS), n)
        bms = np.array([F.RESOLUTIONS[r].bucket_ms for r in res])
        t = t0_ms + rng.integers(-F.DAY_MS // 2, F.DAY_MS // 2, n)
        out.append(
            SV.SpeedCells(
                ENT[name],
                [rng.integers(lo, 5000, n) for _ in range(nparts)],
                res,
                t // bms,
                rng.integers(0, 1000, n) * scale,
                rng.integers(0, 50, n),
                rng.random(n) < 0.5,
            )
        )
    return out


def _dedup(cells: list[SV.SpeedCells]) -> list[SV.SpeedCells]:
    """One value per cell (random cells may repeat one; a write holds the last)."""
    out = []
    for c in cells:
        key = np.stack([*c.id_parts, c.res, c.bucket])
        _, first = np.unique(key, axis=1, return_index=True)
        out.append(
            SV.SpeedCells(
                c.entity, [p[first] for p in c.id_parts], c.res[first], c.bucket[first],
                c.imps[first], c.clicks[first], c.new[first],
            )
        )  # fmt: skip
    return out


def test_cluster_writer_writes_what_one_redis_holds(on_cluster, cluster_nodes, single):
    """Cell for cell, and with the same TTLs: the payload split per node loses and adds
    nothing; every node got a part (the cells spread over all slots)."""
    rng = np.random.default_rng(11)
    cells = _dedup(_random_cells(rng, 3000, MIDNIGHT))
    r1 = redis.Redis.from_url(single.redis.url)
    r1.flushall()
    with SV.SpeedViewWriter(single, marker="one") as w:
        w.write(cells)
    with SV.SpeedViewWriter(on_cluster, marker="many") as w:
        assert w.write(cells) > 0
        w.drain()
        assert w.held_seq("many") == 1
    want = SV.read_speed_view(r1)
    got = _read_all(on_cluster, cluster_nodes)
    assert got == want and len(got) > 3000
    for p in cluster_nodes:
        node = _node(on_cluster, p)
        keys = list(node.scan_iter(match="sv:*", count=1000))
        assert keys, f"node {p} got no day hash"
        for k in keys[:50]:  # slot owner and TTL as on one Redis
            assert node.cluster("keyslot", k) == key_slot(k)
            assert abs(node.pttl(k) - r1.pttl(k)) < 60_000


# --------------------------------------------------------------------------- reads

T = 1_750_000_000_000 + 37 * F.MINUTE_MS + 12_345  # 15:43 UTC: speed buckets on one day
CUTOFF = F.align_cutoff(T - 5 * F.HOUR_MS)


def _copy_to_cluster(src: redis.Redis, dst: Settings) -> int:
    return copy_to_cluster(src, dst)


def _cluster_client(s: Settings) -> RedisCluster:
    return redis_client(s, timeout_s=5.0)


@pytest.fixture(scope="module")
def read_data(cluster, cluster_nodes, single) -> Iterator[tuple[Settings, Settings, list[str]]]:
    """The same data on one Redis and on the cluster: speed cells of 400 entities (some over
    two days) through the writer, and a batch view (per-bucket hashes, long windows) whose
    cut-off splits the windows."""
    rng = np.random.default_rng(5)
    r1 = redis.Redis.from_url(single.redis.url)
    r1.flushall()
    for p in cluster_nodes:
        _node(cluster, p).flushall()
    keys = []
    cells = []
    for k, ent in enumerate(F.ENTITIES):
        n = 400 // len(F.ENTITIES)
        ids = [rng.integers(1, 10_000, n) for _ in ent.fields]
        keys += [f"{ent.name}:" + ":".join(str(int(p[i])) for p in ids) for i in range(n)]
        for res_k, res in enumerate(F.RESOLUTIONS):
            b1 = T // res.bucket_ms
            for b in range(b1 - res.n_buckets - 1, b1 + 2):
                cells.append(
                    SV.SpeedCells(
                        k, ids, np.full(n, res_k), np.full(n, b),
                        rng.integers(0, 40, n), rng.integers(0, 4, n), np.ones(n, bool),
                    )
                )  # fmt: skip
    with SV.SpeedViewWriter(single) as w:
        w.write(cells)
    version = "v1"
    pipe = r1.pipeline(transaction=False)
    for k, ek in enumerate(keys):
        ent, eid = L.split_entity_key(ek)
        for res in F.RESOLUTIONS:
            bs = range(T // res.bucket_ms - res.n_buckets - 2, T // res.bucket_ms + 1)
            pipe.hset(
                L.batch_key(version, ent, eid, res.name),
                mapping={L.batch_field(et, b): int(rng.integers(0, 50)) for b in bs for et in "ic"},
            )
        pipe.hset(L.batch_long_key(version, ent, eid), mapping={"i7d": k * 10, "c7d": k})
    pipe.execute()
    r1.hset(
        L.batch_meta_key(version),
        mapping={"cutoff_ms": CUTOFF, "created_ms": CUTOFF, "fingerprint": F.fingerprint()},
    )
    r1.set(L.BATCH_POINTER_KEY, version)
    assert _copy_to_cluster(r1, cluster) > 1000
    yield single, cluster, keys


@pytest.mark.parametrize("mode", ["lambda", "speed", "batch"])
@pytest.mark.parametrize("method", ["script", "pipeline"])
def test_cluster_reads_equal_single_node_reads(read_data, mode, method):
    single, on_cluster, keys = read_data
    want = FeatureStore(redis_client(single), mode=mode, method=method).read(keys, T)
    store = FeatureStore(_cluster_client(on_cluster), mode=mode, method=method)
    try:
        got = store.read(keys, T)
        np.testing.assert_array_equal(got.counts, want.counts)
        assert store.core.cluster_fallbacks == 0  # per-node scripts, nothing key by key
        assert (got.batch_version, got.cutoff_ms, got.newest_bucket_ms) == (
            want.batch_version,
            want.cutoff_ms,
            want.newest_bucket_ms,
        )
        assert want.counts.sum() > 0
    finally:
        store.close()

    async def read_async() -> Any:
        a = AsyncFeatureStore(
            redis_client(on_cluster, asyncio=True, timeout_s=5.0),
            mode=mode,
            method=method,
        )
        try:
            return await a.read(keys, T)
        finally:
            await a.close()

    got = asyncio.run(read_async())
    np.testing.assert_array_equal(got.counts, want.counts)


def test_the_read_script_runs_once_per_node_when_an_entity_lives_on_one_node(read_data):
    """In speed mode at 23:30 UTC every window lies on one day: every entity's keys are one
    day hash (one slot), so the script runs once per node and nothing falls back."""
    single, on_cluster, _ = read_data
    t = (T // F.DAY_MS) * F.DAY_MS + 23 * F.HOUR_MS + 30 * F.MINUTE_MS
    rng = np.random.default_rng(8)
    n = 300
    ids = [rng.integers(1, 10**6, n)]
    cells = [
        SV.SpeedCells(
            ENT["ad"], ids, np.full(n, k), np.full(n, t // r.bucket_ms - j),
            rng.integers(1, 40, n), rng.integers(0, 4, n), np.ones(n, bool),
        )
        for k, r in enumerate(F.RESOLUTIONS)
        for j in range(3)
    ]  # fmt: skip
    for s in (single, on_cluster):
        with SV.SpeedViewWriter(s) as w:
            w.write(cells)
    keys = [f"ad:{int(x)}" for x in ids[0]]
    want = FeatureStore(redis_client(single), mode="speed").read(keys, t)
    store = FeatureStore(_cluster_client(on_cluster), mode="speed")
    try:
        got = store.read(keys, t)
        np.testing.assert_array_equal(got.counts, want.counts)
        assert want.counts.sum() > 0
        assert store.core.cluster_fallbacks == 0
        assert store.cluster is not None and len(store.cluster.conns) == 3
    finally:
        store.close()
    # lambda mode: an entity's batch and speed keys hash to different slots (no hash tags):
    # each node reads the part it holds, the parts add up
    keys = read_data[2]
    store = FeatureStore(_cluster_client(on_cluster))
    try:
        want = FeatureStore(redis_client(single)).read(keys[:50], T)
        np.testing.assert_array_equal(store.read(keys[:50], T).counts, want.counts)
        assert store.core.cluster_fallbacks == 0
        # a pointer switch is noticed on the pointer's node
        c = _cluster_client(on_cluster)
        c.set(L.BATCH_POINTER_KEY, "v2")
        c.hset(L.batch_meta_key("v2"), mapping={"cutoff_ms": CUTOFF, "created_ms": CUTOFF})
        assert store.read(keys[:5], T).batch_version == "v2"
        c.set(L.BATCH_POINTER_KEY, "v1")
    finally:
        store.close()


# --------------------------------------------------------------------------- slot migration


def test_slot_migration_under_load_loses_nothing(on_cluster, cluster_nodes, single):
    """``redis-cli --cluster reshard`` moves 1500 slots (and their keys) from one master to
    another while a writer rewrites every cell round after round and a reader reads them:
    both go on through MOVED and ASK without an error, and at the end the cluster holds
    exactly what one Redis holds after the same writes."""
    t = (T // F.DAY_MS) * F.DAY_MS + 23 * F.HOUR_MS + 30 * F.MINUTE_MS  # windows on one day
    n = 3000
    ids = [np.arange(1, n + 1, dtype=np.int64) * 7919]
    keys = [f"ad:{int(x)}" for x in ids[0]]

    def cells(round_: int) -> list[SV.SpeedCells]:
        return [
            SV.SpeedCells(
                ENT["ad"], ids, np.full(n, k), np.full(n, t // r.bucket_ms),
                np.full(n, round_) + ids[0] % 5, np.full(n, round_ // 3),
                np.full(n, round_ == 1),
            )
            for k, r in enumerate(F.RESOLUTIONS)
        ]  # fmt: skip

    writer = SV.SpeedViewWriter(on_cluster, marker="reshard", backoff=SV.Backoff())
    writer.write(cells(1))
    writer.drain()
    reader = FeatureStore(_cluster_client(on_cluster), mode="speed")
    assert reader.read(keys, t).counts.sum() > 0
    stop = threading.Event()
    errors: list[BaseException] = []
    done = {"writes": 1, "reads": 0}

    def write_loop() -> None:
        try:
            while not stop.is_set():
                done["writes"] += 1
                writer.write(cells(done["writes"]))
            writer.drain()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def read_loop() -> None:
        try:
            while not stop.is_set():
                got = reader.read(keys, t)
                assert (got.counts[:, 0, 0] > 0).all()  # every entity seen, none lost
                done["reads"] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    src, dst = cluster_nodes[0], cluster_nodes[1]
    ids_of = {p: _node(on_cluster, p).cluster("myid") for p in (src, dst)}
    threads = [threading.Thread(target=write_loop), threading.Thread(target=read_loop)]
    for th in threads:
        th.start()
    try:
        wait_until(lambda: done["reads"] >= 2 and done["writes"] >= 3, 30, what="load")
        t0 = time.monotonic()
        proc = subprocess.run(
            ["redis-cli", "-a", str(on_cluster.redis.password), "--no-auth-warning",
             "--cluster", "reshard", f"127.0.0.1:{src}",
             "--cluster-from", ids_of[src], "--cluster-to", ids_of[dst],
             "--cluster-slots", "1500", "--cluster-yes", "--cluster-pipeline", "10"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        reshard_s = time.monotonic() - t0
        during = dict(done)
        wait_until(lambda: done["writes"] > during["writes"] + 3, 30, what="writes after")
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    assert not errors, errors
    writer.close()
    reader.close()
    assert writer.cluster is not None
    stats = writer.cluster.stats
    assert stats.moved > 0, stats  # the writer's map was stale once the slots moved
    assert not writer.losses
    # the reference: the last round written to one Redis
    r1 = redis.Redis.from_url(single.redis.url)
    r1.flushall()
    with SV.SpeedViewWriter(single) as w:
        w.write(cells(1))
        w.write(cells(done["writes"]))
    assert _read_all(on_cluster, cluster_nodes) == SV.read_speed_view(r1)
    assigned = int(_node(on_cluster, dst).cluster("info")["cluster_slots_assigned"])
    assert assigned == 16384
    print(
        f"reshard of 1500 slots: {reshard_s:.1f} s, {done['writes']} payloads, "
        f"{done['reads']} reads, reader fallbacks {reader.core.cluster_fallbacks}, "
        f"writer {stats}"
    )


# --------------------------------------------------------------------------- tracking


def test_invalidation_tracking_covers_every_node(on_cluster, cluster_nodes):
    """The shared-entity cache on a cluster: a tracker per master; cached ads on every node
    stay cached past the TTL while no write is reported, and a write to any of them (through
    the cluster writer) is reported by its node and drops it."""
    t = (T // F.DAY_MS) * F.DAY_MS + 23 * F.HOUR_MS + 30 * F.MINUTE_MS
    b = t // F.RESOLUTIONS[0].bucket_ms
    n = 30
    ids = [np.arange(1, n + 1, dtype=np.int64) * 104729]
    keys = [f"ad:{int(x)}" for x in ids[0]]
    nodes_of = {
        connections_for(on_cluster).ensure_map().node_of_key(L.speed_key("ad", k[3:], b // 1440))
        for k in keys
    }
    assert len(nodes_of) == 3  # the ads' hashes are spread over every master

    def write(value: int) -> None:
        with SV.SpeedViewWriter(on_cluster) as w:
            w.write(
                [SV.SpeedCells(ENT["ad"], ids, np.zeros(n, np.int64), np.full(n, b),
                               np.full(n, value), np.zeros(n, np.int64), np.ones(n, bool))]
            )  # fmt: skip

    write(1)
    ttl = 0.2

    async def healthy(store: AsyncFeatureStore, after: float | None = None) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            at = store.tracker.acked_sent_at if store.tracker else None
            if at is not None and (after is None or at > after):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"tracker not healthy: {store.tracker and store.tracker.status()}")

    async def go() -> None:
        client = redis_client(on_cluster, asyncio=True, timeout_s=5.0)
        store = AsyncFeatureStore(
            client, mode="speed", cache_ttl_s=ttl, tracking=True, heartbeat_s=0.02
        )
        await store.start()
        try:
            assert store.tracker is not None and len(store.tracker.status()["nodes"]) == 3
            await healthy(store)
            first = await store.read(keys, t)
            assert first.cache_hits == 0 and (first.counts[:, 0, 0] == 1).all()
            await asyncio.sleep(ttl * 2)  # older than the TTL, vouched for by every node
            again = await store.read(keys, t)
            assert again.cache_hits == n
            wrote = time.monotonic()
            write(7)
            await healthy(store, after=wrote)
            fresh = await store.read(keys, t)
            assert fresh.cache_hits == 0 and (fresh.counts[:, 0, 0] == 7).all()
        finally:
            await store.close()
            await client.aclose()

    asyncio.run(go())
