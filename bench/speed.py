"""Speed-layer benchmark: Kafka -> features dataflow -> Redis, and the join's memory.

``ctrstream bench speed [--events N] [--workers 1,2] [--layouts grouped,entity] [--repeat 1]
[--rate 20000] [--seconds 30] [--flush-curve 100,300,1000] [--skip-fresh]``

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
* ``--layouts``: every features row is measured in each speed-view layout
  (``CTRSTREAM_SPEED__LAYOUT``, ``ctrstream.store.layout.SpeedLayout``) on the same records,
  alternately (``--repeat`` rounds), and ``ratio grouped / entity`` rows give the new layout's
  figures over the old one's (the median of the rounds): events/s, Redis commands and Redis
  microseconds per event, with the per-command split (``redis_us_per_hset``,
  ``fields_per_hset`` = fields written per HSET).
* ``freshness @R/s``: the features job running, records produced at a steady R events/s
  with event time = now; every 50 ms one probe impression of a unique user is among them.
  Freshness = time the speed-view hash of the probe's user and event day became visible in
  Redis (polled every 2 ms) - its produce time (= its Kafka CreateTime). p50/p99 over the
  probes; ``redis_us_per_event``: Redis' execution time of the phase's writes per event
  sent. Measured in each layout at the settings' flush interval, and for the first layout at
  every ``--flush-curve`` interval (the trade-off of freshness against Redis work: a longer
  flush coalesces more writes into one command but ages the features).
* ``join rss``: the join dataflow during a last steady phase of its own (the first layout,
  ``... with the join``) with a short attribution window (``--join-window-s``): its RSS
  sampled at each quarter of the phase must level off once windows start closing (bounded
  state).
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
        "CTRSTREAM_SPEED__LAYOUT": settings.speed.layout,
    }


WRITE_COMMANDS = ("cmdstat_hset", "cmdstat_pexpire", "cmdstat_hdel", "cmdstat_evalsha")


def _redis_usec(r) -> dict[str, tuple[int, int]]:
    """``INFO commandstats``: command -> (microseconds spent, calls) since the server started."""
    return {
        k: (int(v["usec"]), int(v["calls"]))
        for k, v in r.info("commandstats").items()
        if k in WRITE_COMMANDS
    }


def _redis_delta(r, before: dict[str, tuple[int, int]], events: int) -> dict:
    """Redis' execution time and calls of the write commands since ``before``, per event, with
    the HSETs' share (where Redis spends its time: per command or per field)."""
    now = _redis_usec(r)
    used = {k: v - before.get(k, (0, 0))[0] for k, (v, _) in now.items()}
    calls = {k: c - before.get(k, (0, 0))[1] for k, (_, c) in now.items()}
    busy = sum(used.values())
    hset_calls = calls.get("cmdstat_hset", 0)
    return {
        "redis_cmds_per_event": sum(calls.values()) / events,
        "redis_us_per_event": busy / events,
        "redis_ceiling_per_s": events / (busy / 1e6) if busy else None,
        "hset_per_event": hset_calls / events,
        "pexpire_per_event": calls.get("cmdstat_pexpire", 0) / events,
        "redis_us_per_hset": used.get("cmdstat_hset", 0) / hset_calls if hset_calls else None,
    }


def _fields_per_hset(r, hset_calls: int) -> float | None:
    """Fields held by the database (every field is written at least once) per HSET sent: a
    lower bound of the fields per HSET (a field written by several flushes counts once)."""
    if not hset_calls:
        return None
    fields, keys = 0, list[bytes]()

    def count() -> int:
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.hlen(k)
        return sum(x for x in pipe.execute(raise_on_error=False) if isinstance(x, int))

    for key in r.scan_iter(count=10_000):
        keys.append(key)
        if len(keys) >= 20_000:
            fields += count()
            keys = []
    fields += count() if keys else 0
    return fields / hset_calls


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


def start_feature_jobs(
    settings, workers: int, processes: int, logs: list[Path]
) -> list[subprocess.Popen]:
    """The features flow over the whole topic (it stops at its end) as ``processes``
    processes of ``workers`` workers each, each writing its output to its log."""
    from ctrstream.cli.speed import job_commands

    procs = []
    for argv, log in zip(job_commands("features", workers, processes, stop_at_end=True), logs):
        with open(log, "wb") as out:  # the child holds its own copy of the descriptor
            procs.append(
                subprocess.Popen(argv, env=_env(settings), stdout=out, stderr=subprocess.STDOUT)
            )
    return procs


def source_start_s(procs: list[subprocess.Popen], logs: list[Path]) -> float:
    """The wall time the first process began reading (its ``source_start`` line), after
    every process exited 0 (else an error naming the log to read)."""
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise RuntimeError(f"features job failed ({p.returncode}); see {log}")
    starts = [
        json.loads(m)["t"]
        for log in logs
        for m in re.findall(r'\{"speed": "source_start"[^}]*\}', log.read_text())
    ]
    if not starts:
        raise RuntimeError(f"no features job said when it started reading; see {logs[0]}")
    return min(starts)


def _run_features(settings, workers: int, total: int, log_dir: Path, processes: int = 1) -> dict:
    tag = f"w{workers}" + (f"p{processes}" if processes > 1 else "") + settings.speed.layout
    logs = [log_dir / f"features-{tag}-{k}.log" for k in range(processes)]
    procs = start_feature_jobs(settings, workers, processes, logs)
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, sum(rss_kb(p.pid) for p in procs))
        time.sleep(0.05)
    t_end = time.time()
    dt = t_end - source_start_s(procs, logs)
    rate = total / dt
    cores = min(workers * processes, os.cpu_count() or 1)
    return {
        "row": f"features -w {workers}"
        + (f" -p {processes}" if processes > 1 else "")
        + f" [{settings.speed.layout}]",
        "layout": settings.speed.layout,
        "events": total,
        "seconds": dt,
        "events_per_s": rate,
        "per_core": rate / cores,
        "peak_rss_mb": peak / 1024,
    }


def _steady(
    settings, rate: int, seconds: float, join_window_s: float | None, log_dir: Path
) -> list[dict]:
    """The steady phase (freshness at ``rate``; the join's memory unless ``join_window_s``
    is None) in the settings' layout and flush interval."""
    from ctrstream import events as E
    from ctrstream import features as F
    from ctrstream.kafka.clients import make_producer
    from ctrstream.store.layout import speed_layout

    sl = speed_layout(settings.speed.layout)
    tag = f"{settings.speed.layout}-{settings.flush_interval_ms}"
    r = redis_client(settings, timeout_s=30.0)
    jset = settings.model_copy(
        update={
            "attribution_window_s": join_window_s or 0.0,
            "allowed_lateness_s": min(settings.allowed_lateness_s, 2.0),
        }
    )
    # each child holds its own copy of its log's descriptor
    with open(log_dir / f"fresh-features-{tag}.log", "wb") as out:
        feat = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "ctrstream.streaming.features_flow:get_flow()"],
            env=_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    join = None
    if join_window_s is not None:
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
                there = speed_hashes_exist(r, [("user", str(u), probe_day[u]) for u in pending], sl)
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
        warm_hash = ("user", str(warm_uid), warm.event_time_ms // F.DAY_MS)
        while not speed_hashes_exist(r, [warm_hash], sl)[0]:
            if time.time() > deadline:
                raise RuntimeError("features job did not start within 120 s")
            time.sleep(0.05)
        poller.start()
        before = _redis_usec(r)
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
            if time.time() >= next_q and join is not None:
                rss.append(rss_kb(join.pid, "VmRSS") / 1024)
                next_q += quarter
            left = tick - (time.time() - start)
            if left > 0:
                time.sleep(left)
        sent_s = time.time() - t0
        if join is not None:
            rss.append(rss_kb(join.pid, "VmRSS") / 1024)
        p.flush(30)
        stop_t[0] = time.time()
        stop.set()
        poller.join(20)
        sent = k + len(probes)
        lat = np.array([seen[u] - probes[u] for u in probes if u in seen])
        rows = [
            {
                "row": f"freshness @{rate}/s [{settings.speed.layout}, "
                f"flush {settings.flush_interval_ms} ms]",
                "layout": settings.speed.layout,
                "flush_ms": settings.flush_interval_ms,
                "events": sent,
                "events_per_s": sent / sent_s,
                "probes": len(probes),
                "visible": len(lat),
                "p50_ms": float(np.percentile(lat, 50) * 1000) if len(lat) else None,
                "p99_ms": float(np.percentile(lat, 99) * 1000) if len(lat) else None,
                "peak_rss_mb": rss_kb(feat.pid) / 1024,
                **_redis_delta(r, before, sent),
            }
        ]
        if join is not None:
            rows.append(
                {
                    "row": f"join rss (window {join_window_s:g}s)",
                    "rss_mb_quarters": " / ".join(f"{x:.0f}" for x in rss),
                    "peak_rss_mb": rss_kb(join.pid) / 1024,
                }
            )
        return rows
    finally:
        for proc in (feat, join):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _in_layout(settings, name: str):
    """``settings`` with the speed-view layout ``name``."""
    return settings.model_copy(update={"speed": settings.speed.model_copy(update={"layout": name})})


RATIO_KEYS = (
    "events_per_s",
    "redis_cmds_per_event",
    "redis_us_per_event",
    "hset_per_event",
    "redis_us_per_hset",
    "fields_per_hset",
)


def _ratios(rows: list[dict], new: str, old: str) -> list[dict]:
    """Per features configuration, ``new`` over ``old``: the median of each layout's rounds."""
    out = []
    configs = dict.fromkeys(r["row"].rsplit(" [", 1)[0] for r in rows)
    for cfg in configs:
        mine = {name: [r for r in rows if r["row"] == f"{cfg} [{name}]"] for name in (new, old)}
        if not all(mine.values()):
            continue
        mean = {
            name: {
                k: float(np.median([r[k] for r in rs if r.get(k) is not None] or [np.nan]))
                for k in RATIO_KEYS
            }
            for name, rs in mine.items()
        }
        row: dict = {"row": f"ratio {new} / {old} ({cfg})", "rounds": len(mine[new])}
        for k in RATIO_KEYS:
            a, b = mean[new][k], mean[old][k]
            row[k] = a / b if b else None
        out.append(row)
    return out


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
    ap.add_argument(
        "--layouts",
        default="grouped,entity",
        help="speed-view layouts to measure, the new one first (ratios: first / second)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the layouts' features runs")
    ap.add_argument(
        "--flush-curve",
        default="100,300,1000",
        help="flush intervals (ms) of the freshness trade-off curve of the first layout",
    )
    ap.add_argument(
        "--redis-config",
        default="",
        help="Redis settings for the runs, NAME=VALUE,... (CONFIG SET, restored afterwards), "
        "e.g. hash-max-listpack-entries=32",
    )
    ap.add_argument("--rate", type=int, default=20_000, help="steady rate of the freshness phase")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the freshness phase")
    ap.add_argument("--join-window-s", type=float, default=5.0)
    ap.add_argument("--redis-db", type=int, default=15)
    ap.add_argument("--skip-fresh", action="store_true")
    ap.add_argument(
        "--skip-throughput", action="store_true", help="only the steady (freshness) phases"
    )
    ap.add_argument("--keep-topics", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from ctrstream.store.layout import SPEED_LAYOUTS

    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in SPEED_LAYOUTS]
    if bad or not layouts:
        ap.error(f"--layouts: give some of {', '.join(SPEED_LAYOUTS)}, not {args.layouts!r}")
    try:
        curve = [int(x) for x in args.flush_curve.split(",") if x.strip()]
    except ValueError:
        ap.error(
            f"--flush-curve: give flush intervals in ms, e.g. 100,300,1000, not {args.flush_curve!r}"
        )
    if any(x <= 0 for x in curve) or args.repeat < 1:
        ap.error("--flush-curve intervals and --repeat must be positive")
    redis_config = dict(x.split("=", 1) for x in args.redis_config.split(",") if "=" in x)
    if args.redis_config and len(redis_config) != len(args.redis_config.split(",")):
        ap.error(f"--redis-config: give NAME=VALUE,..., not {args.redis_config!r}")

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
    restore: dict[str, str] = {}
    try:
        r = redis_client(s, timeout_s=120.0)
        for name, value in redis_config.items():
            restore[name] = r.config_get(name)[name]
            r.config_set(name, value)
        total, raw = 0, 0.0
        if not args.skip_throughput:
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
        runs = [] if args.skip_throughput else [(int(x), 1) for x in args.workers.split(",")]
        runs += [(1, int(x)) for x in args.processes.split(",") if x and int(x) > 1 and runs]
        feature_rows = []
        for _round in range(args.repeat):
            for w, procs in runs:
                for name in layouts:  # alternately, so that drift hits every layout alike
                    r.flushdb()
                    before = _redis_usec(r)
                    row = _run_features(_in_layout(s, name), w, total, log_dir, procs)
                    row["round"] = _round + 1
                    row["vs_raw"] = row["events_per_s"] / raw
                    row["keys_written"] = r.dbsize()
                    # Redis' own execution time for the job's writes (INFO commandstats), per
                    # event: the ceiling a single Redis thread puts on the flow, whatever the
                    # flow does.
                    row.update(_redis_delta(r, before, total))
                    hsets = round(row["hset_per_event"] * total)
                    row["fields_per_hset"] = _fields_per_hset(r, hsets)
                    feature_rows.append(row)
                    print(json.dumps(row), flush=True)
        rows += feature_rows
        if len(layouts) > 1:
            rows += _ratios(feature_rows, layouts[0], layouts[1])
        if not args.skip_fresh:
            f = bench_settings("fresh")
            ensure_topics(f, f.topics.all())
            made.append(f)
            # the layouts and the flush curve without the join (same load in every phase),
            # then the join's memory in a phase of its own
            steady = [(name, f.flush_interval_ms, False) for name in layouts]
            steady += [(layouts[0], ms, False) for ms in curve if ms != f.flush_interval_ms]
            steady.append((layouts[0], f.flush_interval_ms, True))
            # a warm-up phase, not reported: the first phase on fresh topics is slower
            r.flushdb()
            _steady(_in_layout(f, layouts[-1]), args.rate, min(10.0, args.seconds), None, log_dir)
            for name, ms, with_join in steady:
                r.flushdb()
                fs = _in_layout(f, name).model_copy(update={"flush_interval_ms": ms})
                got = _steady(
                    fs, args.rate, args.seconds, args.join_window_s if with_join else None, log_dir
                )
                if with_join:
                    got[0]["row"] += " with the join"
                print(json.dumps(got), flush=True)
                rows += got
    finally:
        if restore:
            rc = redis_client(s, timeout_s=30.0)
            for name, value in restore.items():
                rc.config_set(name, value)
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
        "redis_us_per_hset",
        "fields_per_hset",
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
