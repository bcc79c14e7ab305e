"""The speed layer's Kafka positions are visible to standard lag tools: each flow commits
the offsets of its snapshots to its own consumer group (the snapshot stays the source of
truth on resume), so ``kafka-consumer-groups.sh --describe`` shows its lag."""

from __future__ import annotations

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from test_speed_features import BASE, CTRSTREAM, job_env, produce
from test_speed_join import click, imp

from ctrstream import events as E
from ctrstream.kafka.clients import admin, topic_end_offsets
from ctrstream.kafka.heartbeats import send_heartbeat
from ctrstream.stack.procs import start_job, stop_job, wait_until

GROUPS = {"features": "ctrstream-speed-features", "join": "ctrstream-speed-join"}
REDIS_DB = 6  # the features flow's speed view, apart from other tests' databases


@pytest.fixture
def offsets_settings(fresh_topics):
    return fresh_topics.model_copy(
        update={"redis": fresh_topics.redis.model_copy(update={"db": REDIS_DB})}
    )


def _traffic(s) -> None:
    imps = [imp(i, BASE + i * 1000) for i in range(40)]
    clicks = [click(f"c-{i}", imps[i], 2000) for i in range(0, 40, 3)]
    events = [("impressions", e) for e in imps] + [("clicks", c) for c in clicks]
    events.sort(key=lambda e: e[1].event_time_ms)
    produce(s, [(k, E.key_of(e), E.encode(e)) for k, e in events])
    send_heartbeat(s, BASE + 3_600_000)


def _ends(s) -> dict[tuple[str, int], int]:
    out = {}
    for topic in (s.topics.impressions.name, s.topics.clicks.name):
        for p, high in topic_end_offsets(s, topic).items():
            out[(topic, p)] = high
    return out


def _committed(s, group: str, ends: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
    """What ``kafka-consumer-groups.sh --describe`` reads: the group's committed offsets."""
    req = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in ends])
    client = admin(s)  # kept alive until its future completes
    result = client.list_consumer_group_offsets([req])[group].result(30)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions}


def test_each_flow_commits_its_snapshot_offsets_to_its_group(offsets_settings, tmp_path):
    s = offsets_settings
    _traffic(s)
    ends = _ends(s)
    assert sum(ends.values()) > 0
    for flow, group in GROUPS.items():
        job = start_job(
            [
                CTRSTREAM,
                "speed",
                flow,
                "--recovery-dir",
                str(tmp_path / f"rec-{flow}"),
                "--snapshot-s",
                "1",
            ],
            env=job_env(s),
            log_path=tmp_path / f"{flow}.log",
        )
        try:
            # while the flow runs: every snapshot commits; lag reaches 0 on every partition
            wait_until(
                lambda group=group: _committed(s, group, ends) == ends,
                90,
                what=f"group {group} to commit the end offsets (log {tmp_path / f'{flow}.log'})",
            )
        finally:
            stop_job(job)


def test_a_finished_flow_leaves_its_last_position_committed(offsets_settings, tmp_path):
    """``--stop-at-end`` runs until the end offsets seen at start and exits: the group shows
    no lag afterwards."""
    s = offsets_settings
    _traffic(s)
    ends = _ends(s)
    job = start_job(
        [CTRSTREAM, "speed", "features", "--stop-at-end", "--recovery-dir", str(tmp_path / "r")],
        env=job_env(s),
        log_path=tmp_path / "features.log",
    )
    try:
        wait_until(lambda: job.poll() is not None, 90, what="the features flow to finish")
        assert job.returncode == 0
    finally:
        stop_job(job)
    assert _committed(s, GROUPS["features"], ends) == ends
