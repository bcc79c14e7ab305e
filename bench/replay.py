"""Replay throughput: generation + encoding, generation + producing, and a bare producer loop.

``ctrstream bench replay [--events N] [--scenario S] [--seed S] [--keep-topics]``

Rows (records = impressions + clicks, plus injections in ``dirty``):

* ``gen+encode``: ``generate()`` and encoding every record of the replay stream;
* ``gen+produce``: ``generate()`` then ``ctrstream.simulation.replay.replay()`` (idempotent producer,
  acks=all, lz4) until every record is acknowledged;
* ``produce only``: the replay part of the row above alone;
* ``cpu_s`` / ``rec_per_cpu_s``: CPU seconds of this process (Python and librdkafka
  threads; the broker not included) - on a shared machine wall-clock rates understate what
  the process can do;
* ``bare loop``: the same records, pre-encoded into Python lists, sent with a bare
  ``confluent_kafka.Producer`` loop (same producer configuration, no delivery callbacks) -
  the ceiling for one Python process; ``vs_bare`` is each row's rate over it.

The Kafka rows write to throw-away topics (``bench-replay-*-<id>``, same partition counts as
``settings.topics``) that are deleted afterwards unless ``--keep-topics``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
import uuid
from typing import Any

from ctrstream.bench.common import print_table, write_results


def _cpu() -> float:
    """CPU seconds of this process so far (all threads: Python and librdkafka's)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _bare_loop(settings, topic_names: dict, kinds, keys, values, ts) -> tuple[float, int]:
    from confluent_kafka import Producer

    from ctrstream.kafka.clients import producer_config

    p = Producer(producer_config(settings))
    produce, poll = p.produce, p.poll
    names = [topic_names[k] for k in kinds]
    t0 = time.perf_counter()
    i = 0
    for topic, key, value, t in zip(names, keys, values, ts):
        try:
            produce(topic, value, key, timestamp=t)
        except BufferError:
            while True:
                p.poll(0.05)
                try:
                    produce(topic, value, key, timestamp=t)
                    break
                except BufferError:
                    continue
        i += 1
        if not i & 1023:
            poll(0)
    remaining = p.flush(120)
    if remaining:
        p.purge()
    p.close()
    return time.perf_counter() - t0, remaining


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ctrstream bench replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--events", type=int, default=1_000_000, help="impressions to generate")
    ap.add_argument("--scenario", default="steady")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-topics", action="store_true", help="do not delete the bench topics")
    ap.add_argument("--skip-kafka", action="store_true", help="only the generate+encode row")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)

    from ctrstream.config import Topic, get_settings
    from ctrstream.kafka.clients import admin, ensure_topics
    from ctrstream.simulation.generator import generate, load_scenario
    from ctrstream.simulation.replay import replay

    logging.basicConfig(level=logging.WARNING)
    # bench topics are deleted afterwards: the old-event-time retention warning is noise here
    logging.getLogger("ctrstream.replay").setLevel(logging.ERROR)
    settings = get_settings()
    sc = load_scenario(
        args.scenario,
        events=args.events,
        seed=args.seed,
        attribution_window_s=settings.attribution_window_s,
        allowed_lateness_s=settings.allowed_lateness_s,
    )
    rows: list[dict[str, Any]] = []

    # (a) generate + encode
    t0, c0 = time.perf_counter(), _cpu()
    tr = generate(sc)
    t_gen = time.perf_counter() - t0
    n_rec, n_bytes = 0, 0
    for _kinds, keys, values, _ts in tr.record_blocks():
        n_rec += len(values)
        n_bytes += sum(map(len, values)) + sum(map(len, keys))
    t_enc = time.perf_counter() - t0
    rows.append(
        {
            "mode": "gen+encode",
            "records": n_rec,
            "seconds": t_enc,
            "rec_per_s": n_rec / t_enc,
            "MB_per_s": n_bytes / t_enc / 1e6,
            "cpu_s": _cpu() - c0,
            "failed": 0,
        }
    )
    meta = {
        "scenario": sc.to_dict(),
        "generate_seconds": t_gen,
        "records": n_rec,
        "bytes": n_bytes,
        "impressions": tr.impressions.num_rows,
        "clicks": tr.clicks.num_rows,
        "realized_ctr": tr.meta["realized_ctr"],
        "mean_p_click": tr.meta["mean_p_click"],
        "late_clicks": tr.meta["late_clicks"],
    }

    if not args.skip_kafka:
        run = uuid.uuid4().hex[:8]
        bench_topics = {}

        def topics_for(tag: str):
            t = settings.topics
            upd = {
                k: Topic(name=f"bench-replay-{tag}-{k}-{run}", partitions=getattr(t, k).partitions)
                for k in ("impressions", "clicks")
            }
            s = settings.model_copy(update={"topics": t.model_copy(update=upd)})
            ensure_topics(s, [s.topics.impressions, s.topics.clicks])
            bench_topics.update({v.name: v for v in upd.values()})
            return s

        try:
            # (b) generate + produce (a fresh generation, timed end to end)
            s_b = topics_for("gen")
            del tr
            t0, c0 = time.perf_counter(), _cpu()
            tr = generate(sc)
            t_g = time.perf_counter() - t0
            c_g = _cpu()
            summ = replay(s_b, tr, progress=False, create_topics=False)
            t_b = time.perf_counter() - t0
            c_b = _cpu()
            rows.append(
                {
                    "mode": "gen+produce",
                    "records": summ.sent,
                    "seconds": t_b,
                    "rec_per_s": summ.sent / t_b,
                    "MB_per_s": summ.bytes / t_b / 1e6,
                    "cpu_s": c_b - c0,
                    "failed": summ.failed,
                }
            )
            rows.append(
                {
                    "mode": "produce only",
                    "records": summ.sent,
                    "seconds": summ.seconds,
                    "rec_per_s": summ.rate,
                    "MB_per_s": summ.bytes / summ.seconds / 1e6,
                    "cpu_s": c_b - c_g,
                    "failed": summ.failed,
                }
            )
            meta["generate_seconds_b"] = t_g
            meta["replay_errors"] = summ.errors

            # (c) bare producer loop over pre-encoded bytes
            s_c = topics_for("bare")
            kinds, keys, values, ts = [], [], [], []
            for k, ky, v, t in tr.record_blocks():
                kinds += k
                keys += ky
                values += v
                ts += t
            names = {"impressions": s_c.topics.impressions.name, "clicks": s_c.topics.clicks.name}
            c0 = _cpu()
            t_c, remaining = _bare_loop(s_c, names, kinds, keys, values, ts)
            c_c = _cpu() - c0
            n_c = len(values) - remaining
            rows.append(
                {
                    "mode": "bare loop",
                    "records": n_c,
                    "seconds": t_c,
                    "rec_per_s": n_c / t_c,
                    "MB_per_s": (sum(map(len, values)) + sum(map(len, keys))) / t_c / 1e6,
                    "cpu_s": c_c,
                    "failed": remaining,
                }
            )
            bare = n_c / t_c
            for r in rows:
                r["vs_bare"] = r["rec_per_s"] / bare
        finally:
            if bench_topics and not args.keep_topics:
                client = admin(settings)
                for f in client.delete_topics(list(bench_topics), operation_timeout=30).values():
                    try:
                        f.result(30)
                    except Exception as e:  # noqa: BLE001 - clean-up: a topic left behind is warned about, not fatal
                        logging.warning("could not delete bench topic: %s", e)
        meta["kafka"] = settings.kafka.bootstrap_servers
        meta["partitions"] = {
            "impressions": settings.topics.impressions.partitions,
            "clicks": settings.topics.clicks.partitions,
        }

    for r in rows:  # what one uncontended core-set would do: records per CPU second
        r["rec_per_cpu_s"] = r["records"] / r["cpu_s"] if r.get("cpu_s") else None
    cols = [
        "mode",
        "records",
        "seconds",
        "rec_per_s",
        "MB_per_s",
        "cpu_s",
        "rec_per_cpu_s",
        "failed",
    ]
    if any("vs_bare" in r for r in rows):
        cols.append("vs_bare")
    print_table(
        f"replay throughput ({args.scenario}, {args.events:,} impressions, one process)", rows, cols
    )
    path = write_results("replay", rows, meta, out_dir=args.out)
    print(f"results: {path}")
    failed = sum(r.get("failed", 0) for r in rows)
    return 1 if failed else 0
