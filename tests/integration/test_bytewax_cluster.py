"""``kill -9`` one process of a two-process Bytewax cluster mid-replay: the launcher stops
the whole cluster and says which process died; restarted from its recovery store, the
cluster resumes from its snapshot and Redis ends equal, cell for cell, to the uninterrupted
reference (``docs/bytewax-cluster.md``)."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

import redis
from test_speed_features import CTRSTREAM, PacedReplay, job_env, make_stream, produce, scrape

from ctrstream import events as E
from ctrstream.kafka.heartbeats import send_heartbeat
from ctrstream.kafka.topics import read_topic
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import free_port_range, pid_alive
from ctrstream.store.speed_view import read_speed_view
from ctrstream.streaming.reference import reference_features

REDIS_DB = 8  # this test's speed view, apart from the other tests' databases


def commit_epochs(store: Path) -> list[int]:
    """The epoch every recovery partition of ``store`` has committed a snapshot of (0: none
    yet), read from Bytewax's SQLite files while the cluster writes them."""
    out = []
    for part in sorted(store.glob("part-*.sqlite3")):
        con = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT MAX(commit_epoch) FROM commits").fetchone()
        except sqlite3.OperationalError:  # the schema is being created
            row = None
        finally:
            con.close()
        out.append((row and row[0]) or 0)
    return out


def member_pids(log: Path) -> dict[str, int]:
    """``{"features[0]": pid, ...}`` from the launcher's log."""
    text = log.read_text() if log.exists() else ""
    return {m[0]: int(m[1]) for m in re.findall(r"^(features\[\d\]) pid (\d+):", text, re.M)}


def test_kill9_one_process_stops_the_cluster_and_it_resumes_exactly(fresh_topics, tmp_path):
    s = fresh_topics.model_copy(
        update={
            "redis": fresh_topics.redis.model_copy(update={"db": REDIS_DB}),
            "metrics_port": free_port_range(4),  # each process serves on metrics_port + k
        }
    )
    r = redis.Redis.from_url(s.redis.url)
    r.flushdb()
    records, _ = make_stream(seed=19, n_imps=6000, lateness_ms=int(s.allowed_lateness_s * 1000))
    half = len(records) // 2
    produce(s, records[:half])
    store = tmp_path / "rec"
    argv = [CTRSTREAM, "speed", "features", "-w", "1", "-p", "2"]
    argv += ["--recovery-dir", str(store), "--snapshot-s", "1"]
    env = job_env(s)
    log = tmp_path / "cluster.log"
    job = start_job(argv, env=env, log_path=log)
    replay = None
    try:
        wait_until(lambda: len(member_pids(log)) == 2, 60, what=f"both processes ({log})")
        pids = member_pids(log)
        wait_until(lambda: len(read_speed_view(r)) > 0, 90, what=f"first features ({log})")
        # one partition per worker, in the one directory the host's processes share
        assert sorted(p.name for p in (store / "features").glob("part-*.sqlite3")) == [
            "part-0.sqlite3",
            "part-1.sqlite3",
        ]
        e0 = max(commit_epochs(store / "features"))
        replay = PacedReplay(s, records[half:], chunks=30)
        # kill mid-replay, after a snapshot that the second half's records are part of
        replay.wait_chunks(8)
        wait_until(
            lambda: min(commit_epochs(store / "features")) > e0 + 1,
            60,
            what="a snapshot during the second half",
        )
        assert len(replay.sent) < 30, "the replay ended before the kill: make it longer"
        victim = pids["features[1]"]
        subprocess.run(["kill", "-9", str(victim)], check=True)
        # the launcher notices, stops the other process and exits non-zero naming the dead one
        assert job.wait(60) == 137
        said = log.read_text()
        assert f"features[1] (pid {victim}) was killed by SIGKILL" in said, said[-2000:]
        wait_until(
            lambda: not pid_alive(pids["features[0]"]), 30, what="the other process to be gone"
        )
    finally:
        stop_job(job)
    assert replay is not None and replay.join(120) and replay.unsent == [0]
    total = len(records)
    restart_log = tmp_path / "restart.log"
    job = start_job(argv, env=env, log_path=restart_log)
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
        wait_until(
            lambda: read_speed_view(r) == ref.cells,
            120,
            what=f"the speed view to equal the uninterrupted reference ({restart_log})",
        )
        # it resumed from the snapshot: the restarted processes did not re-read everything
        read_again = sum(
            scrape(s.metrics_port + k).get("ctrstream_speed_events_in_total", 0) for k in (0, 1)
        )
        assert 0 < read_again < total, (read_again, total)
        assert "initialised recovery store" not in restart_log.read_text()
    finally:
        stop_job(job)


def test_scorer_runs_as_a_cluster_and_a_changed_layout_is_refused(fresh_topics, tmp_path):
    """``ctrstream score -p 2``: both processes score their share of the partitions (every
    impression gets its prediction); the store it wrote refuses another process count,
    for the scorer and for ``speed`` alike, with what to do."""
    from ctrstream.events import Impression, decode_prediction, encode
    from ctrstream.kafka.clients import make_producer

    s = fresh_topics.model_copy(update={"metrics_port": free_port_range(2)})
    p = make_producer(s)
    ids = [f"cl-{k}" for k in range(200)]
    for k, i in enumerate(ids):
        imp = Impression(
            schema_version=1,
            impression_id=i,
            event_time_ms=1_768_435_200_000 + k * 1000,
            user_id=k % 17,
            ad_id=k % 11,
            campaign_id=k % 11 // 2,
            advertiser_id=k % 11 // 4,
            site_id=k % 5,
            ad_category=k % 3,
            device_type="mobile",
            country="US",
            position=k % 4,
        )
        p.produce(s.topics.impressions.name, key=i.encode(), value=encode(imp))
    assert p.flush(30) == 0
    env = job_env(s)
    store = tmp_path / "score-rec"
    argv = [CTRSTREAM, "score", "-p", "2", "--until-end", "--recovery-dir", str(store)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "score[0] pid" in done.stdout and "score[1] pid" in done.stdout
    got = {
        decode_prediction(m.value).impression_id for m in read_topic(s, s.topics.predictions.name)
    }
    assert got == set(ids)
    for again in (
        [CTRSTREAM, "score", "--until-end", "--recovery-dir", str(store)],
        [CTRSTREAM, "score", "-p", "3", "--until-end", "--recovery-dir", str(store)],
        [CTRSTREAM, "speed", "join", "-p", "1", "--recovery-dir", str(tmp_path)],
    ):
        if again[1] == "speed":  # the speed job's store root holds one store per flow
            (tmp_path / "join").mkdir()
            for f in store.iterdir():
                (tmp_path / "join" / f.name).write_bytes(f.read_bytes())
        out = subprocess.run(again, env=env, capture_output=True, text=True, timeout=120)
        said = " ".join((out.stdout + out.stderr).split())
        assert out.returncode == 2, said[-3000:]
        assert "2 process(es) x 1 worker(s)" in said and "new --recovery-dir" in said, said


def test_changing_the_process_count_with_a_new_store_gives_the_same_result(fresh_topics, tmp_path):
    """The documented way to change the process count: stop the 2-process cluster, start
    1 process on a new store. The flows replay their topics from the beginning: Redis
    equals the reference and ``labeled`` holds every label exactly once (the join's fences)."""
    from collections import Counter

    from ctrstream.streaming.reference import reference_labels

    s = fresh_topics.model_copy(
        update={
            "redis": fresh_topics.redis.model_copy(update={"db": REDIS_DB}),
            "attribution_window_s": 90.0,
            "metrics_port": free_port_range(4),  # each process serves on metrics_port + k
        }
    )
    r = redis.Redis.from_url(s.redis.url)
    r.flushdb()
    records, _ = make_stream(seed=23, n_imps=4000, lateness_ms=int(s.allowed_lateness_s * 1000))
    half = len(records) // 2
    produce(s, records[:half])
    env = job_env(s)

    def n_labeled() -> int:
        return len(read_topic(s, s.topics.labeled.name, timeout=10))

    def speed(processes: int, store: Path, log: Path) -> subprocess.Popen:
        argv = [CTRSTREAM, "speed", "all", "-p", str(processes), "--recovery-dir", str(store)]
        return start_job(argv + ["--snapshot-s", "1"], env=env, log_path=log)

    job = speed(2, tmp_path / "rec-p2", tmp_path / "p2.log")
    try:
        wait_until(lambda: n_labeled() > 0, 120, what=f"first labels ({tmp_path / 'p2.log'})")
    finally:
        stop_job(job)
    before = n_labeled()
    produce(s, records[half:])
    # new ports for the new cluster: the old one's may not be released yet
    env = job_env(s.model_copy(update={"metrics_port": free_port_range(4)}))
    job = speed(1, tmp_path / "rec-p1", tmp_path / "p1.log")
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
        expected = reference_labels(ref, int(s.attribution_window_s * 1000))
        wait_until(
            lambda: read_speed_view(r) == ref.cells,
            120,
            what=f"the speed view to equal the reference ({tmp_path / 'p1.log'})",
        )
        counts: Counter = Counter()

        def all_labels() -> bool:
            counts.clear()
            for rec in read_topic(s, s.topics.labeled.name):
                counts[E.decode_labeled(rec.value).impression.impression_id] += 1
            return len(counts) >= len(expected)

        wait_until(all_labels, 120, what="every label")
        assert 0 < before < len(expected)
        assert set(counts) == set(expected)
        assert set(counts.values()) == {1}, "a label written twice"
    finally:
        stop_job(job)
