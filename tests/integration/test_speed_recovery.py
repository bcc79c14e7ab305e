"""kill -9 in the middle of a replay, restart from the Bytewax snapshot: Redis is exactly the
uninterrupted reference and ``labeled`` holds every impression exactly once."""

from __future__ import annotations

import threading
import time
from collections import Counter

import redis
from test_speed_features import CTRSTREAM, job_env, make_stream, produce

from ctrstream import events as E
from ctrstream.kafka.deadletters import read_dead_letters
from ctrstream.kafka.heartbeats import send_heartbeat
from ctrstream.kafka.topics import read_topic
from ctrstream.stack.procs import kill_hard, start_job, stop_job, wait_until
from ctrstream.store.speed_view import read_speed_view
from ctrstream.streaming.reference import reference_features, reference_labels


def test_kill9_and_restart_is_exactly_once(fresh_topics, tmp_path):
    s = fresh_topics.model_copy(
        update={
            "redis": fresh_topics.redis.model_copy(update={"db": 2}),
            "attribution_window_s": 90.0,
        }
    )
    r = redis.Redis.from_url(s.redis.url)
    r.flushdb()
    lateness = int(s.allowed_lateness_s * 1000)
    window = int(s.attribution_window_s * 1000)
    records, _ = make_stream(seed=11, n_imps=6000, lateness_ms=lateness)
    half = len(records) // 2
    produce(s, records[:half])
    argv = [
        CTRSTREAM,
        "speed",
        "all",
        "-w",
        "1",
        "-p",
        "2",
        "--recovery-dir",
        str(tmp_path / "rec"),
        "--snapshot-s",
        "3",
    ]
    env = job_env(s)
    log = tmp_path / "job.log"
    job = start_job(argv, env=env, log_path=log)
    try:

        def n_labeled():
            return len(read_topic(s, s.topics.labeled.name, timeout=10))

        first = wait_until(n_labeled, 120, what=f"first labels (log {log})")
        wait_until(lambda: len(read_speed_view(r)) > 0, 60, what="first features")
        # replay the second half at a steady pace (20 chunks, ~6 s), crash the job half way
        size = (len(records) - half) // 20 + 1
        chunks = [records[half + k * size : half + (k + 1) * size] for k in range(20)]
        sent = []

        def pace():
            for c in chunks:
                produce(s, c)
                sent.append(len(c))
                time.sleep(0.3)  # pacing of the replay, not synchronisation

        t = threading.Thread(target=pace)
        t.start()
        wait_until(
            lambda: len(sent) >= 12 and n_labeled() > first, 120, what="progress on the second half"
        )
    finally:
        kill_hard(job)
    t.join()
    before_restart = n_labeled()
    job = start_job(argv, env=env, log_path=log)
    try:
        max_t = max(
            E.decode_impression(v).event_time_ms
            for k, _, v in records
            if k == "impressions" and v and v.startswith(b'{"schema_version":1,"imp')
        )
        send_heartbeat(s, max_t + 2 * 3_600_000)
        recs = {
            kind: read_topic(s, getattr(s.topics, kind).name) for kind in ("impressions", "clicks")
        }
        ref = reference_features(s, recs)
        expected = reference_labels(ref, window)
        wait_until(
            lambda: read_speed_view(r) == ref.cells,
            180,
            what=f"the speed view to equal the uninterrupted reference (log {log})",
        )
        got: dict[str, tuple] = {}
        counts: Counter = Counter()

        def all_labels():
            got.clear()
            counts.clear()
            for rec in read_topic(s, s.topics.labeled.name):
                lab = E.decode_labeled(rec.value)
                got[lab.impression.impression_id] = (lab.clicked, lab.click_delay_ms)
                counts[lab.impression.impression_id] += 1
            return len(got) >= len(expected)

        wait_until(all_labels, 180, what=f"every label (log {log})")
        assert before_restart < len(expected)  # the crash really was in the middle
        dupes = {k: v for k, v in counts.items() if v > 1}
        assert not dupes, f"{len(dupes)} impressions labeled more than once"
        assert got == expected
        assert sum(c for c, _ in got.values()) > 50
        # the join's own dead letters (records it cannot use) are in its transactions, fenced
        # by offset: each exactly once across the crash; the features job's at least once
        bad = {w for w, (stage, _) in ref.dead.items() if stage in ("decode", "key", "future")}
        join_dead: Counter = Counter()
        features_dead: set = set()

        def dead_letters():
            join_dead.clear()
            features_dead.clear()
            for d in read_dead_letters(s):
                w = (d.source_topic, d.partition, d.offset)
                if d.job == "join" and d.stage != "join":
                    join_dead[w] += 1
                elif d.job == "features":
                    features_dead.add(w)
            return set(join_dead) >= bad and features_dead >= set(ref.dead)

        wait_until(dead_letters, 60, what="the dead letters of both jobs")
        assert bad and set(join_dead) == bad and set(join_dead.values()) == {1}
        assert features_dead == set(ref.dead)
    finally:
        stop_job(job)
