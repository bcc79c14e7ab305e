"""Capacity benchmark and plan: speed-layer throughput against Redis masters and processes,
Redis memory per entity-day hash, and the machines needed at internet scale.

``ctrstream bench capacity [--events N] [--masters 1,3] [--processes 1,2] [--skip-memory]``
``ctrstream bench capacity --plan [--set NAME=VALUE ...] [--doc docs/capacity.md]``

Measurement (an isolated Kafka + Redis on free loopback ports, stopped afterwards; the
traffic of generator scenario ``--scenario`` replayed once):

* ``kafka produce`` / ``kafka consume``: the replay into Kafka, then a bare consumer over
  every partition of both topics; ``broker_us_per_record`` = the broker process's CPU time
  (``/proc``) per record - the per-core figure the plan sizes brokers with.
* ``speed m=M p=P``: the features job (``get_flow(stop_at_end=True)``, no recovery) with P
  processes of one worker each writing to M Redis masters (M=1: one plain Redis; M>=3: a
  Redis Cluster from ``isolated_redis_cluster``, a replica per master; a cluster cannot have
  2 masters), from the first consumed batch until every
  partition reached its end offset. ``per_process`` = events/s / P, ``per_core`` = events/s /
  min(P, cores), ``job_us_per_event`` = the job processes' CPU time per event
  (``RUSAGE_CHILDREN``). Per master (``masters_detail``): ``us_per_event`` = Redis command
  time (``INFO commandstats``) per event of the whole run, ``cpu_us_per_event`` = the Redis
  process's CPU (``INFO cpu``, I/O included), ``share`` = its part of the commands. On a
  2-core machine the total flattens: the per-core and per-shard figures are the point.
* memory (``capacity-memory.json``, on the single node after ``m=1 p=1``): ``MEMORY USAGE``
  of a sample of the speed view's day hashes per entity family, the per-field cost fitted
  per hash encoding, ``used_memory`` per million events; then a batch view computed by the
  batch layer from the same traffic and written by its writer: bytes per entity.

``--plan`` reads those results and the other benchmarks' (``bench/capacity_model.py``, every
input named with its file) and prints the plan; ``--doc PATH`` rewrites the generated
section of ``docs/capacity.md``; the plan is also written to ``capacity-plan.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ctrstream.bench.common import positive_ints, print_table, process_cpu_s, write_results
from ctrstream.store.connection import redis_client

# Commands a benchmark or an operator sends, not the job: left out of the per-event cost.
ADMIN_COMMANDS = frozenset(
    [
        "info",
        "config",
        "cluster",
        "ping",
        "client",
        "hello",
        "command",
        "flushall",
        "flushdb",
        "dbsize",
        "memory",
        "object",
        "scan",
        "select",
        "readonly",
        "auth",
        "wait",
    ]
)


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- Redis nodes


def _node_clients(settings: Any) -> list[tuple[str, Any]]:
    """``(host:port, redis-py client)`` of every master: the single node, or each master of
    the cluster named by ``settings.redis.cluster``."""
    import redis

    seeds = list(getattr(settings.redis, "cluster", None) or [])
    if not seeds:
        r = redis_client(settings, timeout_s=60.0)
        return [(f"{settings.redis.host}:{settings.redis.port}", r)]
    pw = settings.redis.password
    host, port = seeds[0].rsplit(":", 1)
    seed = redis.Redis(host=host, port=int(port), password=pw)
    masters = []
    for line in seed.execute_command("CLUSTER", "NODES", NEVER_DECODE=True).decode().splitlines():
        parts = line.split()
        if len(parts) > 2 and "master" in parts[2].split(",") and "fail" not in parts[2]:
            addr = parts[1].split("@", 1)[0]
            h, p = addr.rsplit(":", 1)
            masters.append((addr, redis.Redis(host=h, port=int(p), password=pw, socket_timeout=60)))
    return sorted(masters)


def _node_stats(r: Any) -> tuple[int, int, float]:
    """(command microseconds, calls, process CPU seconds) of one node since it started."""
    usec = calls = 0
    for k, v in r.info("commandstats").items():
        name = k.removeprefix("cmdstat_").split("|", 1)[0].lower()
        if name not in ADMIN_COMMANDS:
            usec += int(v["usec"])
            calls += int(v["calls"])
    cpu = r.info("cpu")
    return usec, calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _flush(nodes: list[tuple[str, Any]]) -> None:
    for _, r in nodes:
        r.flushall()


@contextmanager
def _redis_target(base: Any, masters: int, log: Callable[[str], None]) -> Iterator[Any]:
    """Settings whose Redis is ``masters`` masters: the stack's own node for 1, else a Redis
    Cluster from :func:`ctrstream.stack.manager.isolated_redis_cluster`."""
    if masters == 1:
        yield base
        return
    if masters < 3:
        raise NotImplementedError(
            f"a Redis Cluster needs at least 3 masters (a majority elects a failed master's "
            f"replica), not {masters}: measure 1 (one Redis) and 3 or more"
        )
    from ctrstream.stack.manager import isolated_redis_cluster

    with isolated_redis_cluster(masters=masters, log=log) as cs:
        yield base.model_copy(update={"redis": cs.redis})


# --------------------------------------------------------------------------- phases


def _kafka_pid(stack: Any) -> int:
    pid = stack.by_name("kafka").pid()
    if pid is None:
        raise RuntimeError("the isolated Kafka is not running")
    return int(pid)


def _produce(settings: Any, traffic: Any, kafka_pid: int) -> dict:
    from ctrstream.simulation.replay import replay

    b0, c0, t0 = process_cpu_s(kafka_pid), _self_cpu_s(), time.perf_counter()
    summary = replay(settings, traffic, rate=None, progress=False)
    dt = time.perf_counter() - t0
    n = summary.sent
    broker = process_cpu_s(kafka_pid) - b0
    return {
        "row": "kafka produce",
        "records": n,
        "seconds": dt,
        "rec_per_s": n / dt,
        "broker_cpu_s": broker,
        "client_cpu_s": _self_cpu_s() - c0,
        "broker_us_per_record": broker / n * 1e6,
    }


def _consume(settings: Any, total: int, kafka_pid: int) -> dict:
    from confluent_kafka import Consumer, TopicPartition

    from ctrstream.kafka.clients import consumer_config

    c = Consumer(consumer_config(settings, f"bench-cap-{uuid.uuid4().hex[:6]}"))
    c.assign(
        [
            TopicPartition(getattr(settings.topics, k).name, p, 0)
            for k in ("impressions", "clicks")
            for p in range(getattr(settings.topics, k).partitions)
        ]
    )
    n, t0, b0 = 0, None, 0.0
    deadline = time.monotonic() + 300
    while n < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumed {n:,} of {total:,} records in 300 s")
        msgs = c.consume(num_messages=10_000, timeout=1.0)
        if msgs and t0 is None:
            t0, b0 = time.perf_counter(), process_cpu_s(kafka_pid)
        for m in msgs:
            m.value()
        n += len(msgs)
    assert t0 is not None
    dt = time.perf_counter() - t0
    broker = process_cpu_s(kafka_pid) - b0
    c.close()
    return {
        "row": "kafka consume",
        "records": n,
        "seconds": dt,
        "rec_per_s": n / dt,
        "broker_cpu_s": broker,
        "broker_us_per_record": broker / n * 1e6,
    }


def _speed_run(settings: Any, masters: int, procs: int, total: int, log_dir: Path) -> dict:
    from ctrstream.bench.speed import source_start_s, start_feature_jobs

    nodes = _node_clients(settings)
    _flush(nodes)
    before = {addr: _node_stats(r) for addr, r in nodes}
    tag = f"m{masters}p{procs}"
    logs = [log_dir / f"features-{tag}-{k}.log" for k in range(procs)]
    cpu0 = _children_cpu_s()
    children = start_feature_jobs(settings, 1, procs, logs)
    deadline = time.monotonic() + 900
    for p in children:
        p.wait(max(1.0, deadline - time.monotonic()))
    t_end = time.time()
    job_cpu = _children_cpu_s() - cpu0
    dt = t_end - source_start_s(children, logs)
    rate = total / dt
    detail: list[dict[str, Any]] = []
    for addr, r in nodes:
        u0, c0, p0 = before[addr]
        u1, c1, p1 = _node_stats(r)
        detail.append(
            {
                "node": addr,
                "calls": c1 - c0,
                "us_per_event": (u1 - u0) / total,
                "cpu_us_per_event": (p1 - p0) * 1e6 / total,
                "keys": int(r.dbsize()),
            }
        )
    calls = sum(d["calls"] for d in detail) or 1
    for d in detail:
        d["share"] = d["calls"] / calls
    busiest = max(detail, key=lambda d: d["cpu_us_per_event"])
    return {
        "row": f"speed m={masters} p={procs}",
        "masters": masters,
        "processes": procs,
        "cluster": masters > 1,
        "events": total,
        "seconds": dt,
        "events_per_s": rate,
        "per_process": rate / procs,
        "per_core": rate / min(procs, os.cpu_count() or 1),
        "job_us_per_event": job_cpu / total * 1e6,
        "redis_us_per_event": sum(d["us_per_event"] for d in detail),
        "redis_cpu_us_per_event": sum(d["cpu_us_per_event"] for d in detail),
        "busiest_master_cpu_us_per_event": busiest["cpu_us_per_event"],
        "redis_cmds_per_event": calls / total,
        "keys_written": sum(d["keys"] for d in detail),
        "masters_detail": detail,
    }


def _memory(settings: Any, traffic: Any, used_before: int, sample: int) -> list[dict]:
    """Memory rows: the speed view now in Redis (the m=1 p=1 run), then a batch view."""
    from ctrstream import features as F
    from ctrstream.batch.views import compute_batch_view, write_batch_view
    from ctrstream.store.usage import (
        batch_view_usage,
        listpack_limit,
        speed_view_usage,
        used_memory,
    )

    r = redis_client(settings, timeout_s=120.0)
    imps = traffic.impressions.num_rows
    used = used_memory(r) - used_before
    sv = speed_view_usage(r, sample=sample)
    rows: list[dict] = []
    est = 0.0
    for f in sv.families:
        est += f.bytes_mean * f.count
        rows.append(
            {
                "view": "speed",
                "family": f.family,
                "hashes": f.count,
                "sampled": f.sampled,
                "bytes_mean": f.bytes_mean,
                "bytes_p99": f.bytes_p99,
                "fields_mean": f.fields_mean,
                "events_per_hash": imps / f.count,
            }
        )
    for c in sv.field_costs:
        rows.append(
            {
                "view": "speed-fit",
                "encoding": c.encoding,
                "hashes": c.hashes,
                "base_bytes": c.base_bytes,
                "per_field_bytes": c.per_field_bytes,
                "max_fields": c.max_fields,
            }
        )
    rows.append(
        {
            "view": "server",
            "events": traffic.n_records,
            "used_memory_bytes": used,
            "per_million_events": used / traffic.n_records * 1e6,
            "overhead": used / est if est else 1.0,
            "listpack_limit": listpack_limit(r),
        }
    )
    r.flushall()
    end = int(max(traffic.impressions.column("event_time_ms").to_pylist()))
    cutoff = F.align_cutoff(end)
    buckets, longs = compute_batch_view(traffic.impressions, traffic.clicks, cutoff)
    version = write_batch_view(settings, buckets, longs, cutoff, keep=1, r=r)["version"]
    bv = batch_view_usage(r, version, sample=sample)
    for f in bv.families:
        rows.append(
            {
                "view": "batch",
                "family": f.family,
                "entities": f.count,
                "sampled": f.sampled,
                "bytes_per_entity": f.bytes_mean,
                "bytes_p99": f.bytes_p99,
                "fields_mean": f.fields_mean,
                "keys_per_entity": f.keys_per_item,
            }
        )
    r.flushall()
    return rows


# --------------------------------------------------------------------------- commands


def measure(args: argparse.Namespace) -> int:
    from ctrstream.config import get_settings
    from ctrstream.kafka.clients import topic_end_offsets
    from ctrstream.simulation.generator import generate, load_scenario
    from ctrstream.stack.manager import Stack, isolated_settings
    from ctrstream.store.usage import used_memory

    out_dir = Path(args.out) if args.out else None
    log_dir = (out_dir or get_settings().results_dir) / "capacity-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows: list[dict] = []
    memory_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ctrstream-capacity-") as tmp:
        settings = isolated_settings(Path(tmp), base=get_settings())
        stack = Stack(settings)
        stack.up(log=log, only=["kafka", "redis"])
        try:
            kpid = _kafka_pid(stack)
            t0 = time.time()
            traffic = generate(load_scenario(args.scenario, events=args.events, seed=1))
            log(f"generated {traffic.n_records:,} records in {time.time() - t0:.0f}s")
            rows.append(_produce(settings, traffic, kpid))
            total = sum(
                sum(topic_end_offsets(settings, getattr(settings.topics, k).name).values())
                for k in ("impressions", "clicks")
            )
            rows.append(_consume(settings, total, kpid))
            single = _node_clients(settings)[0][1]
            for m in args.masters:
                try:
                    target = _redis_target(settings, m, log)
                    with target as s:
                        for p in args.processes:
                            log(f"features job: {m} master(s), {p} process(es)")
                            used0 = used_memory(single) if m == 1 else 0
                            row = _speed_run(s, m, p, total, log_dir)
                            rows.append(row)
                            if m == 1 and p == 1 and not args.skip_memory:
                                memory_rows = _memory(s, traffic, used0, args.memory_sample)
                except NotImplementedError as e:
                    rows.append({"row": f"speed m={m}", "masters": m, "missing": str(e)})
                    log(f"masters={m}: skipped - {e}")
        finally:
            stack.down()
    meta = {**vars(args), "scenario_params": asdict(traffic.scenario)}
    print_table(
        "capacity: speed layer vs Redis masters and processes",
        rows,
        [
            "row",
            "records",
            "events",
            "seconds",
            "rec_per_s",
            "events_per_s",
            "per_process",
            "per_core",
            "broker_us_per_record",
            "job_us_per_event",
            "redis_us_per_event",
            "redis_cpu_us_per_event",
            "busiest_master_cpu_us_per_event",
            "redis_cmds_per_event",
            "missing",
        ],
    )
    path = write_results("capacity", rows, meta=meta, out_dir=out_dir)
    print(f"results: {path}")
    if memory_rows:
        cols = list(dict.fromkeys(k for r in memory_rows for k in r))
        print_table("capacity: Redis memory", memory_rows, cols)
        path = write_results("capacity-memory", memory_rows, meta=meta, out_dir=out_dir)
        print(f"results: {path}")
    return 0


def plan(args: argparse.Namespace) -> int:
    from ctrstream.bench import capacity_model as M
    from ctrstream.bench.common import results_dir

    src = Path(args.results) if args.results else results_dir()
    a = M.Assumptions().with_overrides(args.set or [])
    p = M.compute(M.load_inputs(src), a)
    command = "ctrstream bench capacity --plan" + "".join(f" --set {s}" for s in args.set or [])
    text = M.render_markdown(p, command)
    print(text)
    out = Path(args.out) if args.out else src
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity-plan.json").write_text(json.dumps(M.plan_json(p), indent=2, default=str))
    print(f"plan: {out / 'capacity-plan.json'}")
    if args.doc:
        doc = Path(args.doc)
        doc.write_text(M.replace_section(doc.read_text(), text))
        print(f"rewrote the generated section of {doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ctrstream bench capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--events", type=int, default=500_000, help="impressions generated")
    ap.add_argument("--scenario", default="steady", help="generator scenario")
    ap.add_argument(
        "--masters",
        type=positive_ints,
        default=[1, 3],
        help="1 (one Redis) and/or >= 3 (a cluster)",
    )
    ap.add_argument("--processes", type=positive_ints, default=[1, 2], help="e.g. 1,2")
    ap.add_argument("--memory-sample", type=int, default=20_000, help="hashes per family")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--plan", action="store_true", help="compute the plan from the results")
    ap.add_argument("--results", default=None, help="--plan: where the results are read")
    ap.add_argument(
        "--set", action="append", metavar="NAME=VALUE", help="--plan: change an assumption"
    )
    ap.add_argument("--doc", default=None, help="--plan: rewrite this doc's generated section")
    args = ap.parse_args(argv)
    if args.events < 1:
        ap.error("--events must be positive")
    try:
        return plan(args) if args.plan else measure(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
