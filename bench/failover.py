"""What a Redis Cluster master failover loses of the speed view, with and without ``WAIT``.

Redis replicates asynchronously: a master acknowledges a write once it executed it, and its
replica receives it a moment later. When the master dies in that moment, the replica that
takes over its slots never had the write. The speed writer
(:class:`ctrstream.store.speed_view.SpeedViewWriter`) therefore ends each master's part of
a payload with ``WAIT redis.wait_replicas redis.wait_timeout_ms``: the payload is
acknowledged (and a snapshot's drain returns) once the replicas have it.

Each trial starts a fresh 3-master cluster (a replica each,
:func:`ctrstream.stack.manager.isolated_redis_cluster`), writes ``N`` random speed-view cells
with the real writer in one payload, and the moment the payload is acknowledged (its
``done`` callback, in the writer thread) ``kill -9``s a master (the cells spread evenly: it served about a third). Once its replica is
promoted (``cluster_state:ok`` on every live node), the cluster is read back and compared
cell for cell with the same payload written to one Redis: what differs was acknowledged and
lost. With ``--wait 0,1`` every size is measured without and with ``WAIT 1``. Also reported:
the drain time (what ``WAIT`` costs a flush) and the failover time (kill to a served slot
map), and whether the writer's per-master sequence marker told of the loss on its next
write (what makes the features job re-write its open buckets).

Run: ``ctrstream bench failover`` (``--cells 1000,20000,100000 --trials 3 --wait 0,1``).
Results: ``bench/results/redis-failover.json``; see docs/redis-cluster.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
from typing import Any

import numpy as np

from ctrstream import features as F
from ctrstream.bench.common import positive_ints, print_table, write_results
from ctrstream.config import Settings
from ctrstream.stack.manager import Stack, isolated_redis, isolated_redis_cluster
from ctrstream.stack.redis_cluster import cluster_roles, masters, wait_failover
from ctrstream.store import speed_view as SV
from ctrstream.store.connection import redis_client
from ctrstream.store.resp import Backoff

T0_MS = 1_767_571_200_000 + 15 * F.HOUR_MS  # 2026-01-05 15:00 UTC


def random_cells(rng: np.random.Generator, n: int, first_id: int = 0) -> list[SV.SpeedCells]:
    """About ``n`` distinct cells of three entities (a user, an ad, a cross) over half a day,
    ids from ``first_id`` (the small payloads around the measured one use ids of their own,
    so that they never overwrite a measured cell)."""
    out = []
    per = max(1, n // 3)
    for name in ("ad", "user", "user_x_ad"):
        ent = F.ENTITY_BY_NAME[name]
        k = F.ENTITIES.index(ent)
        res = rng.integers(0, len(F.RESOLUTIONS), per)
        bms = np.array([F.RESOLUTIONS[r].bucket_ms for r in res])
        t = T0_MS - rng.integers(0, F.DAY_MS // 2, per)
        parts = [first_id + rng.integers(0, 200_000, per) for _ in ent.fields]
        key = np.stack([*parts, res, t // bms])
        _, first = np.unique(key, axis=1, return_index=True)
        out.append(
            SV.SpeedCells(
                k,
                [p[first] for p in parts],
                res[first],
                (t // bms)[first],
                rng.integers(1, 1000, per)[first],
                rng.integers(0, 50, per)[first],
                np.ones(len(first), dtype=bool),
            )
        )
    return out


def _with_wait(s: Settings, replicas: int, timeout_ms: int | None) -> Settings:
    update: dict[str, int] = {"wait_replicas": replicas}
    if timeout_ms is not None:
        update["wait_timeout_ms"] = timeout_ms
    return s.model_copy(update={"redis": s.redis.model_copy(update=update)})


def trial(
    n_cells: int,
    wait_replicas: int,
    seed: int,
    single: Settings,
    node_timeout_ms: int,
    lag_ms: int = 0,
    wait_timeout_ms: int | None = None,
) -> dict[str, Any]:
    """One write of ``n_cells`` cells, one kill -9 of a master the moment they are
    acknowledged (its replica ``lag_ms`` behind), one failover: what was acknowledged and
    lost, and whether the writer told of it. ``wait_timeout_ms``: the settings' unless
    given."""
    rng = np.random.default_rng(seed)
    cells = random_cells(rng, n_cells)
    r1 = redis_client(single, timeout_s=30.0)
    try:
        r1.flushall()
        with SV.SpeedViewWriter(single) as w:
            w.write(cells)
        want = SV.read_speed_view(r1)
    finally:
        r1.close()
    with isolated_redis_cluster(masters=3, node_timeout_ms=node_timeout_ms) as base:
        s = _with_wait(base, wait_replicas, wait_timeout_ms)
        losses: list[SV.WriterLoss] = []
        w = SV.SpeedViewWriter(
            s, marker="failover", backoff=Backoff(0.05, 0.5), on_loss=losses.append
        )
        # the writer learns the slot map and its markers with a first, small payload
        w.write(random_cells(np.random.default_rng(seed + 1), 30, 10**6))
        w.drain()
        nodes = Stack(s).cluster_nodes()
        victim = masters(nodes)[0]  # the cells spread evenly: it serves about a third
        pid = victim.pid()
        assert pid is not None
        roles = cluster_roles(nodes)
        replica = next(n for n in nodes if roles[n.name] == f"replica of {victim.address()}")
        replica_pid = replica.pid()
        assert replica_pid is not None
        resume = None
        if lag_ms:  # the replica lags: it reads nothing for lag_ms from the write's start
            os.kill(replica_pid, signal.SIGSTOP)
            resume = threading.Timer(lag_ms / 1000, os.kill, (replica_pid, signal.SIGCONT))
            resume.start()
        killed: list[float] = []

        def kill() -> None:  # in the writer thread, the moment the payload is acknowledged
            os.kill(pid, signal.SIGKILL)
            killed.append(time.perf_counter())

        t = time.perf_counter()
        w.write(cells, done=kill)
        w.drain()
        t_kill = killed[0]
        drain_ms = (t_kill - t) * 1000
        if resume is not None:
            resume.join()
        failover_s = wait_failover(nodes, victim, timeout=60)
        # a next payload: the writer reconnects and reads its marker on the promoted node
        w.write(random_cells(np.random.default_rng(seed + 2), 30, 10**6))
        w.drain()
        resumed_s = time.perf_counter() - t_kill
        w.close()
        client = redis_client(s, timeout_s=30.0)
        try:
            got = SV.read_speed_view(client)
        finally:
            client.close()
    lost = sum(1 for cell, n in want.items() if got.get(cell) != n)
    return {
        "cells": len(want),
        "replica_lag_ms": lag_ms,
        "wait_replicas": wait_replicas,
        "drain_ms": round(drain_ms, 1),
        "failover_s": round(failover_s, 2),
        "writer_resumed_s": round(resumed_s, 2),
        "lost_cells": lost,
        "lost_share": round(lost / max(1, len(want)), 4),
        "loss_reported": bool(losses),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ctrstream bench failover", description=__doc__)
    ap.add_argument("--cells", type=positive_ints, default=[1000, 20_000, 100_000])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument(
        "--wait", default="0,1", help="redis.wait_replicas values to compare (0: no WAIT)"
    )
    ap.add_argument(
        "--lag-ms",
        default="0,300",
        help="replica lags to compare: the dying master's replica stopped (SIGSTOP) from the "
        "write's start for this long (0: a healthy replica)",
    )
    ap.add_argument("--node-timeout-ms", type=int, default=1000)
    ap.add_argument("--name", default="redis-failover")
    args = ap.parse_args(argv)
    waits = [int(x) for x in args.wait.split(",") if x.strip()]
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    lags = [int(x) for x in args.lag_ms.split(",") if x.strip()]
    with isolated_redis() as single:
        for lag in lags:
            for n in args.cells:
                for wr in waits:
                    got = [
                        trial(n, wr, 1000 * k + n % 997, single, args.node_timeout_ms, lag)
                        for k in range(args.trials)
                    ]
                    rows += got
                    summary.append(
                        {
                            "cells": got[0]["cells"],
                            "replica_lag_ms": lag,
                            "wait_replicas": wr,
                            "trials": len(got),
                            "lost_cells_max": max(g["lost_cells"] for g in got),
                            "lost_cells_mean": statistics.fmean(g["lost_cells"] for g in got),
                            "trials_losing": sum(g["lost_cells"] > 0 for g in got),
                            "loss_reported": sum(g["loss_reported"] for g in got),
                            "drain_ms_median": statistics.median(g["drain_ms"] for g in got),
                            "failover_s_median": statistics.median(g["failover_s"] for g in got),
                            "writer_resumed_s_max": max(g["writer_resumed_s"] for g in got),
                        }
                    )
                    print_table(f"{n} cells, replica lag {lag} ms, wait_replicas={wr}", got)
    print_table("Redis Cluster master kill -9 right after the acknowledgement", summary)
    path = write_results(
        args.name,
        rows,
        meta={
            "summary": summary,
            "masters": 3,
            "node_timeout_ms": args.node_timeout_ms,
            "wait_timeout_ms": Settings().redis.wait_timeout_ms,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
