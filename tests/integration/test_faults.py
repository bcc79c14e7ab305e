"""Every server killed, nothing lost: ``kill -9`` of Redis and of the Kafka broker in the
middle of a replay with the speed layer running, and of the speed job itself.

A test that kills a server starts its own (the stack's service classes on free ports, under
the test's temporary directory), so the session's stack and every other test are
unaffected. Recovery times (the server back and ready -> the speed layer caught up with the
reference) are printed (``pytest -s`` shows them; docs/faults.md records them).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
from test_speed_features import CTRSTREAM, PacedReplay, job_env, make_stream, produce, scrape

from ctrstream import events as E
from ctrstream import features as F
from ctrstream.config import REDIS_PASSWORD_FILE, KafkaSettings, RedisSettings, Settings
from ctrstream.kafka.clients import ensure_topics
from ctrstream.kafka.heartbeats import HEARTBEAT_PREFIX, create_control_secret, send_heartbeat
from ctrstream.kafka.topics import read_topic
from ctrstream.stack.procs import kill_hard, start_job, stop_job, wait_until
from ctrstream.stack.services import (
    KafkaService,
    PortInUseError,
    RedisService,
    Service,
    free_port,
    pid_alive,
    port_in_use,
)
from ctrstream.store.resp import Backoff
from ctrstream.store.speed_view import SpeedCells, SpeedViewWriter, WriterLoss, read_speed_view
from ctrstream.streaming.reference import reference_features, reference_labels


@contextmanager
def private(make: type[Service], settings: Settings, attempts: int = 3) -> Iterator[Service]:
    """A server of the test's own (``make(settings)`` started; stopped by PID at the end).
    A free port taken before the server binds it: again on other free ports."""
    for attempt in range(1, attempts + 1):
        svc = make(settings)
        try:
            svc.start()
            break
        except PortInUseError:
            if attempt == attempts:
                raise
            if make is RedisService:
                settings.redis = settings.redis.model_copy(update={"port": free_port()})
            else:
                settings.kafka = KafkaSettings(
                    port=free_port(), controller_port=free_port(), heap="384m"
                )
    try:
        yield svc
    finally:
        svc.stop()


def kill9(svc: Service) -> None:
    """``kill -9`` a server (our child: reaped, so that its PID is free)."""
    pid = svc.pid()
    assert pid is not None, f"{svc.name} is not running"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 10, what=f"{svc.name} (PID {pid}) to die")
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def private_redis_settings(base: Settings, tmp_path: Path) -> Settings:
    s = base.model_copy(
        update={
            "run_dir": tmp_path / "own",
            "redis": RedisSettings(port=free_port()),
            "metrics_port": free_port(),
        }
    )
    create_control_secret(s)  # what `stack up` does in a run directory: heartbeats are signed
    return s


def loss_reports(log: Path) -> list[dict]:
    """The ``redis_loss`` lines of a features job's output."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith('{"speed": "redis_loss"'):
            out.append(json.loads(line))
    return out


def max_event_time(records) -> int:
    return max(
        E.decode_impression(v).event_time_ms
        for k, _, v in records
        if k == "impressions" and v and v.startswith(b'{"schema_version":1,"imp')
    )


# --------------------------------------------------------------------------- Redis


def test_local_redis_has_a_password_and_an_append_only_file(settings):
    """The stack's Redis refuses a client without the password; the password was generated
    at start-up, lives in the run directory readable by its owner only, and reaches every
    client through the settings; writes go to an append-only file."""
    path = settings.run_dir / REDIS_PASSWORD_FILE
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert settings.redis.password and path.read_text().strip() == settings.redis.password
    host, port = settings.redis.host, settings.redis.port
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=host, port=port, socket_timeout=2).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=host, port=port, password="guess", socket_timeout=2).ping()
    # a process that only knows the run directory (as `ctrstream ...` does) authenticates
    own = Settings(run_dir=settings.run_dir, redis=RedisSettings(port=port))
    assert own.redis.password == settings.redis.password
    r = redis.Redis.from_url(own.redis.url, socket_timeout=2)
    assert r.ping()
    assert r.config_get("appendonly") == {"appendonly": "yes"}
    assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
    # the secret is not on the server's command line, and `config show` masks it
    pid = int((settings.run_dir / "redis.pid").read_text())
    assert settings.redis.password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert settings.redis.password not in json.dumps(settings.dump())
    r.close()


def _cells(n: int, bucket: int) -> list[SpeedCells]:
    """``n`` cells of a one-field entity in ``bucket`` of the first resolution, 1 impression."""
    e = next(i for i, ent in enumerate(F.ENTITIES) if len(ent.fields) == 1)
    return [
        SpeedCells(
            e,
            [np.arange(n, dtype=np.int64)],
            np.zeros(n, np.int64),
            np.full(n, bucket, np.int64),
            np.ones(n, np.int64),
            np.zeros(n, np.int64),
            np.ones(n, bool),
        )
    ]


def test_speed_view_writer_waits_for_redis_and_detects_a_loss(settings, tmp_path):
    """The speed view's writer (store level): a write while Redis is down is retried with
    back-off (each attempt reported) until Redis is back, then acknowledged - nothing
    dropped; a Redis back from its AOF lost nothing (no loss); a Redis back without its
    data is detected on the next write (its marker is gone): a loss of payloads 1..2."""
    s = private_redis_settings(settings, tmp_path)
    with private(RedisService, s) as svc:
        retries: list[int] = []
        losses: list[WriterLoss] = []
        w = SpeedViewWriter(
            s,
            marker="test",
            backoff=Backoff(first_s=0.01, max_s=0.2),
            on_retry=lambda attempt, _e, _wait: retries.append(attempt),
            on_loss=losses.append,
        )
        r = redis.Redis.from_url(s.redis.url, socket_timeout=5)
        try:
            w.write(_cells(10, 100))
            w.drain()
            kill9(svc)
            w.write(_cells(10, 101))  # queued: sent again until Redis answers
            wait_until(lambda: len(retries) >= 3, 10, what="the writer to retry")
            svc.start()  # from its AOF
            w.drain()
            assert len(read_speed_view(r)) == 20 and not losses
            kill9(svc)
            for f in svc.dir.glob("appendonly*"):  # the data set is lost
                for g in f.iterdir() if f.is_dir() else [f]:
                    g.unlink()
            svc.start()
            w.write(_cells(5, 102))
            w.drain()
            assert [(x.held_seq, x.acked_seq) for x in losses] == [(0, 2)]
            assert losses[0].run_id_before != losses[0].run_id_after
            assert len(read_speed_view(r)) == 5  # what the lost Redis got since
        finally:
            w.close()
            r.close()


def test_redis_kill9_during_replay_loses_nothing(fresh_topics, tmp_path):
    """kill -9 of Redis mid-replay: the features job stays up and retries (counted), Redis
    comes back from its append-only file on the same port, and the speed view equals the
    record-by-record reference; no loss is detected (the file held every acknowledged
    write)."""
    s = private_redis_settings(fresh_topics, tmp_path)
    with private(RedisService, s) as svc:
        r = redis.Redis.from_url(s.redis.url, socket_timeout=5)
        lateness = int(s.allowed_lateness_s * 1000)
        records, _ = make_stream(seed=23, n_imps=4000, lateness_ms=lateness)
        half = len(records) // 2
        produce(s, records[:half])
        log = tmp_path / "features.log"
        argv = [CTRSTREAM, "speed", "features", "-w", "1", "--recovery-dir", str(tmp_path / "rec")]
        job = start_job(argv + ["--snapshot-s", "2"], env=job_env(s), log_path=log)
        try:
            wait_until(lambda: len(read_speed_view(r)) > 0, 120, what=f"first features ({log})")
            before = len(read_speed_view(r))
            outage = _outage(s, svc, job, records, half, log)
            t_back = time.monotonic()
            recs = {k: read_topic(s, getattr(s.topics, k).name) for k in ("impressions", "clicks")}
            ref = reference_features(s, recs)
            wait_until(
                lambda: read_speed_view(r) == ref.cells,
                120,
                what=f"the speed view to equal the reference after Redis came back ({log})",
            )
            recovery = time.monotonic() - t_back
            print(f"\nredis kill -9: down {outage:.1f} s; Redis back -> caught up {recovery:.2f} s")
            assert job.poll() is None, f"the features job exited ({log})"
            m = scrape(s.metrics_port)
            assert m["ctrstream_speed_redis_retries_total"] >= 3
            assert m.get("ctrstream_speed_redis_losses_total", 0) == 0
            assert not loss_reports(log)
            assert 0 < before < len(ref.cells)
        finally:
            stop_job(job)
        r.close()


def _outage(s: Settings, svc: Service, job, records, half: int, log: Path) -> float:
    """Replay the second half of ``records`` at a steady pace, kill -9 Redis a third of the
    way, keep it down until the replay is produced and the job has retried, restart Redis on
    the same port from its directory, then close every bucket with a heartbeat. Returns how
    long Redis was down."""
    replay = PacedReplay(s, records[half:], chunks=10)
    replay.wait_chunks(3)  # a third of the way
    kill9(svc)
    t_down = time.monotonic()
    try:
        # the job keeps going: it retries its write (counted), it does not exit
        wait_until(
            lambda: scrape(s.metrics_port).get("ctrstream_speed_redis_retries_total", 0) >= 3,
            60,
            what=f"the job to retry its writes ({log})",
        )
    finally:
        replay.join()
    assert replay.unsent == [0], "the producer did not deliver every record"
    assert job.poll() is None, f"the features job exited while Redis was down ({log})"
    svc.start()  # same port, same directory: from its append-only file
    down = time.monotonic() - t_down
    send_heartbeat(s, max_event_time(records) + 2 * 3_600_000)  # closes every bucket
    return down


def test_redis_that_lost_its_data_is_repaired_or_reported(fresh_topics, tmp_path):
    """kill -9 of Redis mid-replay and a restart WITHOUT its data (its append-only file
    deleted: what a Redis without persistence does): the job detects the loss (its writer
    marker is gone), re-writes every open cell from its state, and reports every cell it
    cannot re-write (buckets already closed) - in its output, its log and a metric. Every
    cell that differs from the reference afterwards is in a reported bucket: no silent
    loss."""
    s = private_redis_settings(fresh_topics, tmp_path)
    with private(RedisService, s) as svc:
        r = redis.Redis.from_url(s.redis.url, socket_timeout=5)
        lateness = int(s.allowed_lateness_s * 1000)
        records, _ = make_stream(seed=29, n_imps=4000, lateness_ms=lateness)
        half = len(records) // 2
        produce(s, records[:half])
        log = tmp_path / "features.log"
        argv = [CTRSTREAM, "speed", "features", "-w", "1", "--recovery-dir", str(tmp_path / "rec")]
        job = start_job(argv + ["--snapshot-s", "2"], env=job_env(s), log_path=log)
        try:
            wait_until(lambda: len(read_speed_view(r)) > 0, 120, what=f"first features ({log})")
            # the data set is lost: Redis restarts empty
            real_start = svc.start

            def start_empty() -> float | None:
                for f in svc.dir.glob("appendonly*"):
                    for g in f.iterdir() if f.is_dir() else [f]:
                        g.unlink()
                return real_start()

            svc.start = start_empty  # type: ignore[method-assign]
            _outage(s, svc, job, records, half, log)
            t_back = time.monotonic()
            recs = {k: read_topic(s, getattr(s.topics, k).name) for k in ("impressions", "clicks")}
            ref = reference_features(s, recs)
            reports = wait_until(lambda: loss_reports(log), 60, what=f"a loss report ({log})")
            m = wait_until(
                lambda: (lambda m: m if m.get("ctrstream_speed_redis_losses_total") else None)(
                    scrape(s.metrics_port)
                ),
                30,
                what="the loss metric",
            )
            assert sum(rep["rewritten_cells"] for rep in reports) > 0
            unreported: set = set()

            def only_reported_cells_differ() -> bool:
                # every shard reports its own lost buckets, each at its next wake-up: the
                # reports are read again at every look, not only the first one found
                reported = {tuple(b) for rep in loss_reports(log) for b in rep["buckets"]}
                view = read_speed_view(r)
                differ = {
                    c for c in ref.cells.keys() | view.keys() if view.get(c) != ref.cells.get(c)
                }
                unreported.clear()
                unreported.update(c for c in differ if (c[0], c[2], c[4]) not in reported)
                return not unreported

            try:
                wait_until(
                    only_reported_cells_differ,
                    120,
                    what=f"every cell outside the reported buckets to equal the reference ({log})",
                )
            except TimeoutError as e:
                raise AssertionError(
                    f"{e}: {len(unreported)} cells differ outside the reported buckets, e.g. "
                    f"{sorted(unreported)[:3]}"
                ) from None
            recovery = time.monotonic() - t_back
            reports = loss_reports(log)
            reported = {tuple(b) for rep in reports for b in rep["buckets"]}
            view = read_speed_view(r)
            missing = sum(1 for c, v in ref.cells.items() if view.get(c) != v)
            unrepaired = sum(rep["unrepaired_cells"] for rep in reports)
            print(
                f"\nredis lost its data: Redis back -> open cells re-written {recovery:.2f} s; "
                f"{missing} of {len(ref.cells)} reference cells differ, all in the "
                f"{len(reported)} reported buckets ({unrepaired} cells reported)"
            )
            assert job.poll() is None, f"the features job exited ({log})"
            assert m["ctrstream_speed_redis_losses_total"] >= 1
            if missing:
                assert m["ctrstream_speed_redis_unrepaired_cells_total"] >= 1
                assert "cannot be re-written" in log.read_text()
            # the open buckets (every 24h bucket here: the heartbeat came after the loss)
            # were re-written in full
            assert all(view.get(c) == v for c, v in ref.cells.items() if c[2] == "24h"), (
                "an open bucket was not re-written"
            )
        finally:
            stop_job(job)
        r.close()


# --------------------------------------------------------------------------- the speed job


def _two_free_ports() -> int:
    """A free port ``p`` with ``p + 1`` free too (``speed all``: one metrics port per
    process, the features flow's first)."""
    for _ in range(50):
        p = free_port()
        if p < 65535 and not port_in_use("127.0.0.1", p + 1):
            return p
    raise RuntimeError("no two adjacent free ports")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _start_times(ports: list[int]) -> list[float] | None:
    """``process_start_time_seconds`` served on each metrics port (None: one does not
    answer yet)."""
    try:
        return [scrape(p)["process_start_time_seconds"] for p in ports]
    except OSError:
        return None


def test_speed_job_killed_restarts_on_its_metrics_ports(fresh_topics, tmp_path):
    """``ctrstream speed all`` with a metrics port serves each flow's metrics on a port of
    its own (features on the port, join on the next); ``kill -9`` of the job and a restart
    right away: its processes went with it (no port left in use) and the new ones bind the
    same metrics ports."""
    s = fresh_topics.model_copy(
        update={
            "redis": fresh_topics.redis.model_copy(update={"db": 4}),
            "metrics_port": _two_free_ports(),
        }
    )
    ports = [s.metrics_port, s.metrics_port + 1]
    argv = [CTRSTREAM, "speed", "all", "-w", "1", "--recovery-dir", str(tmp_path / "rec")]
    argv += ["--snapshot-s", "2"]
    log = tmp_path / "speed.log"
    leftovers: list[int] = []
    job = start_job(argv, env=job_env(s), log_path=log)
    job2 = None
    try:
        first = wait_until(lambda: _start_times(ports), 120, what=f"both flows' metrics ({log})")
        assert job.poll() is None
        leftovers = _children(job.pid)
        assert len(leftovers) == 2, leftovers  # one process per flow
        os.kill(job.pid, signal.SIGKILL)  # the job, as `kill -9 PID` does it
        job.wait(10)
        t0 = time.monotonic()
        job2 = start_job(argv, env=job_env(s), log_path=log)
        second = wait_until(
            lambda: (lambda t: t if t and all(a > b for a, b in zip(t, first)) else None)(
                _start_times(ports)
            ),
            120,
            what=f"the restarted flows' metrics on the same ports ({log})",
        )
        print(
            f"\nspeed job kill -9 -> restarted, metrics served again: {time.monotonic() - t0:.2f} s"
        )
        assert job2.poll() is None, f"the restarted job exited ({log})"
        assert all(not pid_alive(p) for p in leftovers), "a flow outlived its job"
        assert second
    finally:
        if job2 is not None:
            stop_job(job2)
        kill_hard(job)
        for pid in leftovers:  # a flow that outlived its job (the failure this test finds)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- Kafka


def test_kafka_broker_kill9_during_replay_loses_and_repeats_nothing(fresh_topics, tmp_path):
    """kill -9 of the Kafka broker mid-replay, down for 10 s, restarted on the same ports
    from its log directory, with the features and join flows running and a producer
    replaying: the producer resumes (every record in its topic exactly once: idempotent),
    the flows stay up and resume, the speed view equals the reference and ``labeled``
    holds every impression exactly once."""
    base = fresh_topics.model_copy(
        update={
            "run_dir": tmp_path / "own",
            "kafka": KafkaSettings(port=free_port(), controller_port=free_port(), heap="384m"),
            "redis": fresh_topics.redis.model_copy(update={"db": 5}),
            "metrics_port": free_port(),
            "attribution_window_s": 90.0,
        }
    )
    create_control_secret(base)  # what `stack up` does in a run directory
    with private(KafkaService, base) as svc:
        s = base
        ensure_topics(s, s.topics.all())
        r = redis.Redis.from_url(s.redis.url, socket_timeout=5)
        r.flushdb()
        lateness = int(s.allowed_lateness_s * 1000)
        window = int(s.attribution_window_s * 1000)
        records, _ = make_stream(seed=31, n_imps=4000, lateness_ms=lateness)
        half = len(records) // 2
        produce(s, records[:half])
        log = tmp_path / "speed.log"
        argv = [CTRSTREAM, "speed", "all", "-w", "1", "--recovery-dir", str(tmp_path / "rec")]
        job = start_job(argv + ["--snapshot-s", "2"], env=job_env(s), log_path=log)
        try:
            wait_until(
                lambda: len(read_topic(s, s.topics.labeled.name, timeout=10)) > 0,
                120,
                what=f"first labels ({log})",
            )
            # one producer replays the second half at a steady pace through the outage
            replay = PacedReplay(s, records[half:], chunks=12)
            replay.wait_chunks(4)  # a third of the way
            kill9(svc)
            time.sleep(10)  # the outage itself: the broker stays down for 10 s
            assert job.poll() is None, f"the speed job exited while Kafka was down ({log})"
            svc.start()  # same ports, same log directory
            t_back = time.monotonic()
            replay.join()
            assert replay.unsent == [0], (
                "the producer did not deliver every record after the outage"
            )
            send_heartbeat(s, max_event_time(records) + 2 * 3_600_000)
            recs = {k: read_topic(s, getattr(s.topics, k).name) for k in ("impressions", "clicks")}
            # every produced record is in its topic exactly once (heartbeats aside)
            got_records = Counter(
                (kind, x.key, x.value)
                for kind, xs in recs.items()
                for x in xs
                if not (x.key or b"").startswith(HEARTBEAT_PREFIX)
            )
            assert got_records == Counter(
                (kind, k if isinstance(k, bytes) else k.encode(), v) for kind, k, v in records
            )
            ref = reference_features(s, recs)
            expected = reference_labels(ref, window)
            wait_until(
                lambda: read_speed_view(r) == ref.cells,
                180,
                what=f"the speed view to equal the reference after the outage ({log})",
            )
            labels: dict[str, tuple] = {}
            counts: Counter = Counter()

            def all_labels() -> bool:
                labels.clear()
                counts.clear()
                for rec in read_topic(s, s.topics.labeled.name):
                    lab = E.decode_labeled(rec.value)
                    labels[lab.impression.impression_id] = (lab.clicked, lab.click_delay_ms)
                    counts[lab.impression.impression_id] += 1
                return len(labels) >= len(expected)

            wait_until(all_labels, 180, what=f"every label ({log})")
            recovery = time.monotonic() - t_back
            print(f"\nkafka kill -9, 10 s down: broker back -> caught up {recovery:.2f} s")
            assert job.poll() is None, f"the speed job exited ({log})"
            dupes = {k: v for k, v in counts.items() if v > 1}
            assert not dupes, f"{len(dupes)} impressions labeled more than once"
            assert labels == expected
        finally:
            stop_job(job)
        r.close()


def _snapshots_after(rec: Path, t: float, n: int = 2) -> bool:
    """The recovery store has been written ``n`` snapshot intervals after wall time ``t``
    (its files' newest change is that much later)."""
    files = list(rec.rglob("*.sqlite3*"))
    return bool(files) and max(f.stat().st_mtime for f in files) > t + n


def test_redis_lost_while_the_job_was_down_is_found_at_restart(fresh_topics, tmp_path):
    """The features job killed with kill -9, then Redis killed and restarted WITHOUT its data
    while the job is down, then the job restarted from its snapshot: the restored shards
    read the previous run's writer marker, find the loss, re-write every open cell (here:
    every cell, no bucket has closed) and report it - the speed view equals the reference
    again, and the report line says that buckets closed before the snapshot may be lost."""
    s = private_redis_settings(fresh_topics, tmp_path)
    with private(RedisService, s) as svc:
        r = redis.Redis.from_url(s.redis.url, socket_timeout=5)
        lateness = int(s.allowed_lateness_s * 1000)
        # 30 s of events, less than the allowed lateness, and no heartbeat: the watermark
        # stays before the end of every bucket, so every bucket stays open (in the state)
        records, _ = make_stream(seed=37, n_imps=2000, lateness_ms=lateness, span_ms=30_000)
        produce(s, records)
        recs = {k: read_topic(s, getattr(s.topics, k).name) for k in ("impressions", "clicks")}
        ref = reference_features(s, recs)
        log = tmp_path / "features.log"
        rec = tmp_path / "rec"
        argv = [CTRSTREAM, "speed", "features", "-w", "1", "--recovery-dir", str(rec)]
        argv += ["--snapshot-s", "1"]
        job = start_job(argv, env=job_env(s), log_path=log)
        try:
            wait_until(lambda: read_speed_view(r) == ref.cells, 120, what=f"the view ({log})")
            t_equal = time.time()
            wait_until(lambda: _snapshots_after(rec, t_equal), 60, what="a snapshot after it")
        finally:
            kill_hard(job)
        kill9(svc)
        for f in svc.dir.glob("appendonly*"):  # Redis restarts empty
            for g in f.iterdir() if f.is_dir() else [f]:
                g.unlink()
        svc.start()
        assert read_speed_view(r) == {}
        job = start_job(argv, env=job_env(s), log_path=log)
        t0 = time.monotonic()
        try:
            wait_until(
                lambda: read_speed_view(r) == ref.cells,
                120,
                what=f"the restarted job to re-write every cell ({log})",
            )
            print(
                f"\nredis lost while the job was down: restart -> re-written {time.monotonic() - t0:.2f} s"
            )
            reports = [rep for rep in loss_reports(log) if rep["before_restart"]]
            assert reports and sum(rep["rewritten_cells"] for rep in reports) > 0
            assert all(rep["unrepaired_cells"] is None for rep in reports)  # not known: said
            assert "Redis lost writes of the job's previous run" in log.read_text()
            m = scrape(s.metrics_port)
            assert m["ctrstream_speed_redis_losses_total"] >= 1
        finally:
            stop_job(job)
        r.close()
