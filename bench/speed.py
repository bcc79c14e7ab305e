"""Speed-layer benchmark: Kafka -> features dataflow -> Redis, and the join's memory.

``ctrstream bench speed [--events N] [--workers 1,2] [--rate 20000] [--seconds 30] [--skip-fresh]``

Uses ``get_settings()`` (the running local stack) with throw-away topics
(``bench-speed-*-<id>``, same partition counts, deleted afterwards) and Redis database
``--redis-db`` (default 15, flushed first) so the served speed view is not touched.

Rows:

* ``raw consume``: a bare confluent-kafka loop (``consume(num_messages=10000)`` over every
  partition of both topics, touching each value) on the same records - the ceiling.
* ``features -w N`` / ``-p N``: the features dataflow (``get_flow(stop_at_end=True)``, no
  recovery) with N worker threads in one process, or N processes of one worker (a Bytewax
  cluster on loopback, as ``ctrstream speed -p N`` runs it)
  from the first consumed batch until every partition reached its end offset, the final
  Redis flush included; ``vs_raw`` = its rate / the raw rate (the headline), ``per_core`` =
  rate / min(N, cores), ``peak_rss_mb`` = the job's VmHWM. ``redis_us_per_event`` is the
  time Redis itself spent executing the job's writes (``INFO commandstats`` delta of HSET and
  PEXPIRE) per event, and ``redis_ceiling_per_s`` = 1 s / that: the most a single Redis
  thread could absorb with this feature declaration, however fast the flow was.
* ``freshness @R/s``: the features job running, records produced at a steady R events/s
  with event time = now; every 50 ms one probe impression of a unique user is among them.
  Freshness = time the speed-view hash of the probe's user and event day became visible in
  Redis (polled every 2 ms) - its produce time (= its Kafka CreateTime). p50/p99 over the
  probes.
* ``join rss``: the join dataflow during the same steady phase with a short attribution
  window (``--join-window-s``): its RSS sampled at each quarter of the phase must level off
  once windows start closing (bounded state).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from ctrstream.bench.common import print_table, rss_kb, write_results
from ctrstream.store.connection import redis_client
from ctrstream.store.speed_view import speed_hashes_exist


def _env(settings) -> dict:
    from ctrstream.stack.manager import settings_env

    return {
        **os.environ,
        **settings_env(settings),
        "CTRSTREAM_REDIS__DB": str(settings.redis.db),
        "CTRSTREAM_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
        "CTRSTREAM_ALLOWED_LATENESS_S": str(settings.allowed_lateness_s),
        "CTRSTREAM_ATTRIBUTION_WINDOW_S": str(settings.attribution_window_s),
        "CTRSTREAM_FLUSH_INTERVAL_MS": str(settings.flush_interval_ms),
    }


def _redis_usec(r) -> dict[str, tuple[int, int]]:
    """``INFO commandstats``: command -> (microseconds spent, calls) since the server started."""
    return {
        k: (int(v["usec"]), int(v["calls"]))
        for k, v in r.info("commandstats").items()
        if k in ("cmdstat_hset", "cmdstat_pexpire", "cmdstat_hdel", "cmdstat_evalsha")
    }


def _raw_consume(settings, total: int) -> float:
    from confluent_kafka import Consumer, TopicPartition

    from ctrstream.kafka.clients import consumer_config

    c = Consumer(consumer_config(settings, f"bench-raw-{uuid.uuid4().hex[:6]}"))
    tps = [
        TopicPartition(getattr(settings.topics, k).name, p, 0)
        for k in ("impressions", "clicks")
        for p in range(getattr(settings.topics, k).partitions)
    ]
    c.assign(tps)
    n = 0
    t0: float | None = None
    while n < total:
        msgs = c.consume(num_messages=10_000, timeout=1.0)
        if msgs and t0 is None:
            t0 = time.perf_counter()
        for m in msgs:
            m.value()
        n += len(msgs)
    if t0 is None:
        raise ValueError(f"nothing was consumed: total must be positive, not {total}")
    dt = time.perf_counter() - t0
    c.close()
    return n / dt


def _run_features(settings, workers: int, total: int, log_dir: Path, processes: int = 1) -> dict:
    from ctrstream.cli.speed import job_commands

    tag = f"w{workers}" + (f"p{processes}" if processes > 1 else "")
    logs = [log_dir / f"features-{tag}-{k}.log" for k in range(processes)]
    procs = []
    for argv, log in zip(job_commands("features", workers, processes, stop_at_end=True), logs):
        with open(log, "wb") as out:  # the child holds its own copy of the descriptor
            procs.append(
                subprocess.Popen(argv, env=_env(settings), stdout=out, stderr=subprocess.STDOUT)
            )
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, sum(rss_kb(p.pid) for p in procs))
        time.sleep(0.05)
    t_end = time.time()
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise RuntimeError(f"features job failed ({p.returncode}); see {log}")
    starts = [
        json.loads(m)["t"]
        for log in logs
        for m in re.findall(r'\{"speed": "source_start"[^}]*\}', log.read_text())
    ]
    dt = t_end - min(starts)
    rate = total / dt
    cores = min(workers * processes, os.cpu_count() or 1)
    return {
        "row": f"features -w {workers}" + (f" -p {processes}" if processes > 1 else ""),
        "events": total,
        "seconds": dt,
        "events_per_s": rate,
        "per_core": rate / cores,
        "peak_rss_mb": peak / 1024,
    }


def _steady(settings, rate: int, seconds: float, join_window_s: float, log_dir: Path) -> list[dict]:
    from ctrstream import events as E
    from ctrstream import features as F
    from ctrstream.kafka.clients import make_producer

    r = redis_client(settings, timeout_s=30.0)
    jset = settings.model_copy(
        update={
            "attribution_window_s": join_window_s,
            "allowed_lateness_s": min(settings.allowed_lateness_s, 2.0),
        }
    )
    # each child holds its own copy of its log's descriptor
    with open(log_dir / "fresh-features.log", "wb") as out:
        feat = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "ctrstream.streaming.features_flow:get_flow()"],
            env=_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    with open(log_dir / "fresh-join.log", "wb") as out:
        join = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "ctrstream.streaming.join_flow:get_flow()"],
            env=_env(jset),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    rng = random.Random(1)
    p = make_producer(settings, **{"linger.ms": 5})
    ti, tc = settings.topics.impressions.name, settings.topics.clicks.name
    probes: dict[int, float] = {}
    probe_day: dict[int, int] = {}  # the day part of the probe's speed-view key
    seen: dict[int, float] = {}
    stop = threading.Event()

    def poll_redis():
        while not stop.is_set() or len(seen) < len(probes):
            pending = [u for u in list(probes) if u not in seen]
            if pending:
                there = speed_hashes_exist(r, [("user", str(u), probe_day[u]) for u in pending])
                now = time.time()
                for u, ok in zip(pending, there):
                    if ok:
                        seen[u] = now
            if stop.is_set() and time.time() > stop_t[0] + 10:
                break
            time.sleep(0.002)

    stop_t = [0.0]
    poller = threading.Thread(target=poll_redis, daemon=True)
    try:
        # warm up: wait until both jobs consume (a first probe becomes visible)
        warm_uid = 2_000_000_000
        warm = _imp("warm", warm_uid, rng)
        p.produce(ti, key=E.key_of(warm), value=E.encode(warm))
        p.flush(10)
        deadline = time.time() + 120
        while not speed_hashes_exist(r, [("user", str(warm_uid), warm.event_time_ms // F.DAY_MS)])[
            0
        ]:
            if time.time() > deadline:
                raise RuntimeError("features job did not start within 120 s")
            time.sleep(0.05)
        poller.start()
        tick = 0.05
        per_tick = int(rate * tick)
        t0 = time.time()
        k = 0
        rss = []
        quarter = seconds / 4
        next_q = t0 + quarter
        while time.time() - t0 < seconds:
            start = time.time()
            for _ in range(per_tick - 1):
                k += 1
                imp = _imp(f"s{k}", rng.randrange(100_000), rng)
                p.produce(ti, key=E.key_of(imp), value=E.encode(imp))
                if k % 50 == 0:  # ~2% clicks
                    c = E.Click(
                        schema_version=1,
                        click_id=f"c{k}",
                        impression_id=imp.impression_id,
                        event_time_ms=imp.event_time_ms + 100,
                        user_id=imp.user_id,
                        ad_id=imp.ad_id,
                        campaign_id=imp.campaign_id,
                        advertiser_id=imp.advertiser_id,
                        site_id=imp.site_id,
                        ad_category=imp.ad_category,
                    )
                    p.produce(tc, key=E.key_of(c), value=E.encode(c))
            uid = 1_000_000_000 + len(probes)
            probe = _imp(f"probe{uid}", uid, rng)
            probe_day[uid] = probe.event_time_ms // F.DAY_MS  # before probes: the poller reads it
            probes[uid] = time.time()
            p.produce(ti, key=E.key_of(probe), value=E.encode(probe))
            p.poll(0)
            if time.time() >= next_q:
                rss.append(rss_kb(join.pid, "VmRSS") / 1024)
                next_q += quarter
            left = tick - (time.time() - start)
            if left > 0:
                time.sleep(left)
        sent_s = time.time() - t0
        rss.append(rss_kb(join.pid, "VmRSS") / 1024)
        p.flush(30)
        stop_t[0] = time.time()
        stop.set()
        poller.join(20)
        lat = np.array([seen[u] - probes[u] for u in probes if u in seen])
        rows = [
            {
                "row": f"freshness @{rate}/s",
                "events": k + len(probes),
                "events_per_s": (k + len(probes)) / sent_s,
                "probes": len(probes),
                "visible": len(lat),
                "p50_ms": float(np.percentile(lat, 50) * 1000) if len(lat) else None,
                "p99_ms": float(np.percentile(lat, 99) * 1000) if len(lat) else None,
                "peak_rss_mb": rss_kb(feat.pid) / 1024,
            },
            {
                "row": f"join rss (window {join_window_s:g}s)",
                "rss_mb_quarters": " / ".join(f"{x:.0f}" for x in rss),
                "peak_rss_mb": rss_kb(join.pid) / 1024,
            },
        ]
        return rows
    finally:
        for proc in (feat, join):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _imp(iid: str, user: int, rng: random.Random):
    from ctrstream import events as E

    ad = rng.randrange(5000)
    return E.Impression(
        schema_version=1,
        impression_id=iid,
        event_time_ms=int(time.time() * 1000),
        user_id=user,
        ad_id=ad,
        campaign_id=ad // 10,
        advertiser_id=ad // 100,
        site_id=rng.randrange(500),
        ad_category=ad % 30,
        device_type="mobile",
        country="US",
        position=rng.randrange(4),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ctrstream bench speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--events", type=int, default=2_000_000, help="records replayed for throughput")
    ap.add_argument("--scenario", default="steady", help="generator scenario")
    ap.add_argument(
        "--workers", default="1,2", help="worker counts (threads, one process) to measure"
    )
    ap.add_argument("--processes", default="2", help="process counts (one worker each) to measure")
    ap.add_argument("--rate", type=int, default=20_000, help="steady rate of the freshness phase")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the freshness phase")
    ap.add_argument("--join-window-s", type=float, default=5.0)
    ap.add_argument("--redis-db", type=int, default=15)
    ap.add_argument("--skip-fresh", action="store_true")
    ap.add_argument("--keep-topics", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from ctrstream.config import RedisSettings, Topic, get_settings
    from ctrstream.kafka.clients import admin, ensure_topics, topic_end_offsets

    base = get_settings()
    uid = uuid.uuid4().hex[:6]

    def bench_settings(tag: str):
        t = base.topics
        topics = t.model_copy(
            update={
                n: Topic(name=f"bench-speed-{tag}-{n}-{uid}", partitions=getattr(t, n).partitions)
                for n in ("impressions", "clicks", "labeled", "predictions", "dlq")
            }
        )
        return base.model_copy(
            update={
                "topics": topics,
                "redis": RedisSettings(
                    host=base.redis.host,
                    port=base.redis.port,
                    password=base.redis.password,
                    db=args.redis_db,
                ),
            }
        )

    log_dir = Path(args.out or "bench/results") / "speed-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    s = bench_settings("tput")
    ensure_topics(s, s.topics.all())
    made = [s]
    rows = []
    try:
        from ctrstream.simulation.generator import generate, load_scenario
        from ctrstream.simulation.replay import replay

        t0 = time.time()
        tr = generate(load_scenario(args.scenario, events=args.events, seed=1))
        summary = replay(s, tr.records(), rate=None, progress=False)
        total = sum(
            sum(topic_end_offsets(s, getattr(s.topics, k).name).values())
            for k in ("impressions", "clicks")
        )
        print(f"replayed {total:,} records in {time.time() - t0:.0f}s ({summary.describe()})")
        raw = _raw_consume(s, total)
        rows.append({"row": "raw consume", "events": total, "events_per_s": raw, "vs_raw": 1.0})
        r = redis_client(s, timeout_s=120.0)
        runs = [(int(x), 1) for x in args.workers.split(",")]
        runs += [(1, int(x)) for x in args.processes.split(",") if x and int(x) > 1]
        for w, procs in runs:
            r.flushdb(asynchronous=True)
            before = _redis_usec(r)
            row = _run_features(s, w, total, log_dir, procs)
            used = {k: v - before.get(k, (0, 0))[0] for k, (v, _) in _redis_usec(r).items()}
            calls = {k: c - before.get(k, (0, 0))[1] for k, (_, c) in _redis_usec(r).items()}
            row["vs_raw"] = row["events_per_s"] / raw
            row["keys_written"] = r.dbsize()
            # Redis' own execution time for the job's writes (INFO commandstats), per event:
            # the ceiling a single Redis thread puts on the flow, whatever the flow does.
            busy = sum(used.values())
            row["redis_cmds_per_event"] = sum(calls.values()) / total
            row["redis_us_per_event"] = busy / total
            row["redis_ceiling_per_s"] = total / (busy / 1e6) if busy else None
            rows.append(row)
        if not args.skip_fresh:
            f = bench_settings("fresh")
            ensure_topics(f, f.topics.all())
            made.append(f)
            r.flushdb(asynchronous=True)
            rows += _steady(f, args.rate, args.seconds, args.join_window_s, log_dir)
    finally:
        if not args.keep_topics:
            names = [t.name for st in made for t in st.topics.all()]
            names += [f"{st.topics.labeled.name}.join-fence" for st in made]
            existing = admin(base).list_topics(timeout=30).topics
            futs = admin(base).delete_topics(
                [n for n in names if n in existing], operation_timeout=30
            )
            for fut in futs.values():
                try:
                    fut.result(30)
                except Exception:  # noqa: BLE001 - best effort clean-up
                    pass
    cols = [
        "row",
        "events",
        "seconds",
        "events_per_s",
        "vs_raw",
        "per_core",
        "peak_rss_mb",
        "keys_written",
        "redis_cmds_per_event",
        "redis_us_per_event",
        "redis_ceiling_per_s",
        "probes",
        "visible",
        "p50_ms",
        "p99_ms",
        "rss_mb_quarters",
    ]
    print_table("speed layer", rows, cols)
    path = write_results("speed", rows, meta=vars(args), out_dir=args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
