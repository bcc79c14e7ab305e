"""A 3-broker Kafka (``ctrstream stack up --kafka-brokers 3``): its topology and replication,
``kill -9`` of one broker in the middle of a replay through the join (nothing lost, nothing
repeated, the cluster keeps serving without it), and the co-partitioning check of
``impressions`` and ``clicks``.

The module starts its own cluster (three KRaft nodes on free loopback ports under a
temporary directory) with the CLI, and stops it with ``ctrstream stack down`` (by PID); the
session's stack is not used. The outage's timings are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import ConfigResource, NewPartitions
from test_speed_features import CTRSTREAM, PacedReplay, job_env, make_stream, produce

from ctrstream import events as E
from ctrstream.config import KAFKA_NODES_FILE, Settings
from ctrstream.kafka.clients import (
    CopartitioningError,
    admin,
    ensure_topics,
    producer_config,
)
from ctrstream.kafka.heartbeats import HEARTBEAT_PREFIX, send_heartbeat
from ctrstream.kafka.topics import read_topic
from ctrstream.stack.manager import isolated_settings, settings_env
from ctrstream.stack.procs import start_job, stop_job, wait_until
from ctrstream.stack.services import free_port, pid_alive, port_in_use
from ctrstream.streaming.reference import reference_features, reference_labels

BROKERS = 3


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CTRSTREAM, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _cli_env(s: Settings) -> dict[str, str]:
    """The cluster's run directory and ports, but neither its broker count nor its bootstrap
    servers: ``--kafka-brokers`` gives the first, the run directory's record the rest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTRSTREAM_")}
    env.update(settings_env(s))
    del env["CTRSTREAM_KAFKA__BROKERS"], env["CTRSTREAM_KAFKA__BOOTSTRAP"]
    env["COLUMNS"] = "200"  # rich wraps long lines at the terminal width
    return env


def _pids(run_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in run_dir.glob("kafka*.pid")}


class Cluster:
    def __init__(self, settings: Settings, env: dict[str, str], up: str, seconds: float):
        self.settings, self.env, self.up_output, self.up_seconds = settings, env, up, seconds

    def pids(self) -> dict[str, int]:
        return _pids(self.settings.run_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """Three KRaft nodes started by ``ctrstream stack up --only kafka --kafka-brokers 3``
    (other free ports when one was taken meanwhile), stopped by ``stack down``; any node
    still running after that is killed by its PID."""
    for _attempt in range(3):
        # a "stack*" folder with its owner's PID: a later session stops the nodes of one
        # killed before it could (tests/conftest.py, _stop_stale_stacks)
        run_dir = tmp_path_factory.mktemp("stack-kafka3")
        (run_dir / "owner.pid").write_text(str(os.getpid()))
        s = isolated_settings(run_dir, kafka_brokers=BROKERS)
        s = s.model_copy(update={"metrics_port": free_port(), "attribution_window_s": 90.0})
        env = _cli_env(s)
        t0 = time.monotonic()
        res = _cli(["stack", "up", "--only", "kafka", "--kafka-brokers", str(BROKERS)], env)
        seconds = time.monotonic() - t0
        if res.returncode == 0 or "already in use" not in res.stdout + res.stderr:
            break
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"\n3-broker cluster up in {seconds:.1f} s (`stack up`, fresh run directory)")
    started = _pids(s.run_dir)
    try:
        yield Cluster(s, env, res.stdout, seconds)
    finally:
        down = _cli(["stack", "down"], env, timeout=180)
        for pid in started.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert down.returncode == 0, down.stdout + down.stderr


def _fresh(s: Settings, unique: str) -> Settings:
    """``s`` with new, unique topic names (the same partition counts), created."""
    t = s.topics
    topics = t.model_copy(
        update={
            n: getattr(t, n).model_copy(update={"name": f"{getattr(t, n).name}-{unique}"})
            for n in ("impressions", "clicks", "labeled", "predictions", "dlq")
        }
    )
    out = s.model_copy(update={"topics": topics})
    ensure_topics(out, out.topics.all())
    return out


def test_three_nodes_one_quorum_replicated_topics(cluster):
    """``stack up --kafka-brokers 3``: three nodes, each its own PID, log directory and node
    id, one controller quorum of all three; topics replicated 3 times, 2 in sync needed;
    ``stack status`` shows each node and ``stack up`` again restarts nothing; clients get
    every broker as bootstrap servers from the run directory's record."""
    s, env = cluster.settings, cluster.env
    pids = cluster.pids()
    assert set(pids) == {f"kafka-{i}" for i in range(1, BROKERS + 1)}, pids
    assert len(set(pids.values())) == BROKERS and all(pid_alive(p) for p in pids.values())
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in s.kafka.nodes())
    for node in s.kafka.nodes():
        d = s.run_dir / f"kafka-{node.node_id}"
        props = dict(
            line.split("=", 1) for line in (d / "server.properties").read_text().splitlines()
        )
        assert props["node.id"] == str(node.node_id)
        assert props["controller.quorum.voters"] == voters
        assert props["log.dirs"] == str(d / "data")
        assert f"node.id={node.node_id}" in (d / "data" / "meta.properties").read_text()
        for key, want in {
            "default.replication.factor": "3",
            "min.insync.replicas": "2",
            "offsets.topic.replication.factor": "3",
            "transaction.state.log.replication.factor": "3",
            "transaction.state.log.min.isr": "2",
        }.items():
            assert props[key] == want, (node, key, props[key])

    status = _cli(["stack", "status"], env, timeout=60)
    for node in s.kafka.nodes():
        name = f"kafka-{node.node_id}"
        row = rf"{name}\s.*{pids[name]}.*ready.*127\.0\.0\.1:{node.port}"
        assert re.search(row, status.stdout), status.stdout
    again = _cli(["stack", "up", "--only", "kafka"], env)  # the record gives the topology
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == BROKERS, again.stdout
    assert cluster.pids() == pids
    wrong = _cli(["stack", "up", "--only", "kafka", "--kafka-brokers", "1"], env)
    assert wrong.returncode != 0 and "3-broker Kafka" in wrong.stdout + wrong.stderr
    assert "--purge" in wrong.stdout + wrong.stderr and cluster.pids() == pids

    shown = _cli(["config", "show"], env, timeout=60)
    kafka = json.loads(shown.stdout)["kafka"]
    assert kafka["brokers"] == BROKERS
    recorded = Settings(_env_file=None, run_dir=s.run_dir)  # no topology given: the record's
    assert recorded.kafka.bootstrap_servers == s.kafka.bootstrap_servers
    assert len(recorded.kafka.bootstrap_servers.split(",")) == BROKERS
    assert (s.run_dir / KAFKA_NODES_FILE).exists()

    md = admin(s).list_topics(timeout=30)
    assert set(md.brokers) == {1, 2, 3}
    for t in s.topics.all():
        parts = md.topics[t.name].partitions
        assert len(parts) == t.partitions
        assert all(len(p.replicas) == 3 for p in parts.values()), (t.name, parts)
    broker = ConfigResource(ConfigResource.Type.BROKER, "2")
    client = admin(s)  # kept: a collected client cancels its requests
    cfg = client.describe_configs([broker])[broker].result(30)
    assert cfg["min.insync.replicas"].value == "2"
    conf = producer_config(s)  # every producer writes to all in-sync replicas, once
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True


def test_partitions_added_to_one_of_impressions_and_clicks_is_refused(cluster, unique):
    """Partitions added to ``impressions`` alone break its co-partitioning with ``clicks``:
    the topic check (``ensure_topics``, run by `stack up`, `speed` and the replays) refuses,
    naming both counts and the procedure; once both have the new count and the settings say
    so (the procedure's last step), it accepts them."""
    s = _fresh(cluster.settings, unique)
    client = admin(s)
    ti, tc = s.topics.impressions.name, s.topics.clicks.name
    client.create_partitions([NewPartitions(ti, 8)])[ti].result(30)
    wait_until(
        lambda: len(client.list_topics(ti, timeout=10).topics[ti].partitions) == 8,
        30,
        what="impressions to have 8 partitions",
    )
    # every broker learns the new count by metadata propagation: the check, asking whichever
    # broker it reaches, must refuse once that broker knows it
    refused: list[CopartitioningError] = []

    def check_refuses() -> bool:
        try:
            ensure_topics(s, s.topics.all())
        except CopartitioningError as err:
            refused.append(err)
            return True
        return False

    wait_until(check_refuses, 30, what="the topic check to refuse impressions at 8, clicks at 4")
    msg = str(refused[-1])
    assert f"{ti} has 8 partitions and {tc} 4" in msg, msg
    assert "docs/kafka.md" in msg and "CTRSTREAM_TOPICS__CLICKS__PARTITIONS" in msg, msg

    client.create_partitions([NewPartitions(tc, 8)])[tc].result(30)
    wait_until(
        lambda: len(client.list_topics(tc, timeout=10).topics[tc].partitions) == 8,
        30,
        what="clicks to have 8 partitions",
    )
    t = s.topics
    eight = s.model_copy(
        update={
            "topics": t.model_copy(
                update={
                    "impressions": t.impressions.model_copy(update={"partitions": 8}),
                    "clicks": t.clicks.model_copy(update={"partitions": 8}),
                }
            )
        }
    )
    accepted: list[list[str]] = []

    def check_accepts() -> bool:
        try:
            accepted.append(ensure_topics(eight, eight.topics.all()))
        except (CopartitioningError, RuntimeError):  # a broker not yet told of clicks at 8
            return False
        return True

    wait_until(check_accepts, 30, what="the topic check to accept both topics at 8")
    assert accepted[-1] == [], accepted  # nothing created: both topics existed


def _leader(s: Settings, topic: str, partition: int) -> int:
    return admin(s).list_topics(topic, timeout=10).topics[topic].partitions[partition].leader


def test_broker_kill9_during_replay_loses_and_repeats_nothing(cluster, unique, tmp_path):
    """kill -9 of the broker that leads ``impressions`` partition 0, a third of the way
    through a replay with the join running, and never restarted: the two others take over
    (new leaders, ``min.insync.replicas=2`` still met), the producer delivers every record
    exactly once (acks=all, idempotent), the join stays up, and ``labeled`` read with
    read_committed holds every expected label exactly once."""
    s = _fresh(cluster.settings, unique)
    lateness = int(s.allowed_lateness_s * 1000)
    window = int(s.attribution_window_s * 1000)
    records, _ = make_stream(seed=43, n_imps=3000, lateness_ms=lateness)
    half = len(records) // 2
    produce(s, records[:half])
    log = tmp_path / "join.log"
    argv = [CTRSTREAM, "speed", "join", "-w", "1", "--recovery-dir", str(tmp_path / "rec")]
    job = start_job(argv + ["--snapshot-s", "2"], env=job_env(s), log_path=log)
    try:
        wait_until(
            lambda: len(read_topic(s, s.topics.labeled.name, timeout=10)) > 0,
            120,
            what=f"first labels ({log})",
        )
        replay = PacedReplay(s, records[half:], chunks=12)
        replay.wait_chunks(4)  # a third of the way
        victim = _leader(s, s.topics.impressions.name, 0)
        name = f"kafka-{victim}"
        pid = cluster.pids()[name]
        port = s.kafka.nodes()[victim - 1].port
        os.kill(pid, signal.SIGKILL)  # not our child (the CLI started it): nothing to reap
        t_kill = time.monotonic()
        wait_until(lambda: not pid_alive(pid), 10, what=f"{name} (PID {pid}) to die")
        assert replay.join(180), "the replay did not finish with one broker down"
        t_replayed = time.monotonic() - t_kill
        assert replay.unsent == [0], "the producer did not deliver every record without the broker"
        new_leader = wait_until(
            lambda: (lead := _leader(s, s.topics.impressions.name, 0)) not in (victim, -1) and lead,
            60,
            what="a new leader of impressions-0",
        )
        send_heartbeat(s, max_event_time(records) + 2 * 3_600_000)
        recs = {k: read_topic(s, getattr(s.topics, k).name) for k in ("impressions", "clicks")}
        got = Counter(
            (kind, x.key, x.value)
            for kind, xs in recs.items()
            for x in xs
            if not (x.key or b"").startswith(HEARTBEAT_PREFIX)
        )
        assert got == Counter(
            (kind, k if isinstance(k, bytes) else k.encode(), v) for kind, k, v in records
        ), "a record is missing from its topic or there twice"
        expected = reference_labels(reference_features(s, recs), window)
        labels: dict[str, tuple] = {}
        counts: Counter = Counter()

        def all_labels() -> bool:
            labels.clear()
            counts.clear()
            for rec in read_topic(s, s.topics.labeled.name, isolation="read_committed"):
                lab = E.decode_labeled(rec.value)
                labels[lab.impression.impression_id] = (lab.clicked, lab.click_delay_ms)
                counts[lab.impression.impression_id] += 1
            return len(labels) >= len(expected)

        wait_until(all_labels, 180, what=f"every label ({log})")
        t_labeled = time.monotonic() - t_kill
        print(
            f"\n{name} (leader of impressions-0) kill -9: replay finished "
            f"{t_replayed:.1f} s after, every label {t_labeled:.1f} s after; new leader "
            f"kafka-{new_leader}"
        )
        assert job.poll() is None, f"the join exited ({log})"
        dupes = {k: v for k, v in counts.items() if v > 1}
        assert not dupes, f"{len(dupes)} impressions labeled more than once"
        assert labels == expected
        # all of it without the dead broker
        assert not pid_alive(pid) and not port_in_use("127.0.0.1", port)
        md = admin(s).list_topics(timeout=30)
        assert victim not in md.brokers
        isr = md.topics[s.topics.impressions.name].partitions[0].isrs
        assert victim not in isr and len(isr) >= 2, isr
    finally:
        stop_job(job)


def max_event_time(records) -> int:
    return max(
        E.decode_impression(v).event_time_ms
        for k, _, v in records
        if k == "impressions" and v and v.startswith(b'{"schema_version":1,"imp')
    )
