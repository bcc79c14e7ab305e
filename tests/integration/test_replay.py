"""Replay through a real Kafka broker: exact counts back, codec-clean, order per key kept,
dirty records fail decoding exactly as injected, pacing works, failures are counted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from ctrstream.config import Topic
from ctrstream.events import DecodeError, decode_click, decode_impression
from ctrstream.kafka.clients import admin, make_consumer, topic_end_offsets
from ctrstream.simulation.generator import EXPECTED_REASON, generate, load_scenario
from ctrstream.simulation.replay import replay

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def topics(fresh_topics):
    """Fresh topics without time retention: the records carry event times from 2026-01 and
    the broker would otherwise delete them at its next retention check."""
    s = fresh_topics
    res = [
        ConfigResource(
            ResourceType.TOPIC,
            t.name,
            incremental_configs=[
                ConfigEntry("retention.ms", "-1", incremental_operation=AlterConfigOpType.SET)
            ],
        )
        for t in (s.topics.impressions, s.topics.clicks)
    ]
    client = admin(s)  # keep the handle alive until the futures are done
    for fut in client.incremental_alter_configs(res).values():
        fut.result(30)
    return s


def consume_all(settings, topic: str, expected: int, timeout: float = 60.0) -> list:
    """Every record of ``topic`` as (partition, offset, key, value, timestamp); waits until
    ``expected`` records arrived (or the timeout), then checks nothing more is there."""
    c = make_consumer(settings, f"test-{uuid.uuid4().hex[:8]}")
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for m in c.consume(5000, 0.5):
                assert m.error() is None, m.error()
                out.append((m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]))
        return out
    finally:
        c.close()


def test_replay_round_trip_exact(topics):
    tr = generate(load_scenario("steady", events=5_000, seed=1, base_ctr=0.05))
    n_i, n_c = tr.impressions.num_rows, tr.clicks.num_rows
    s = replay(topics, tr, progress=False)
    assert (s.sent, s.failed, s.attempted) == (n_i + n_c, 0, n_i + n_c)
    assert s.by_topic == {"impressions": n_i, "clicks": n_c}
    assert s.bytes == sum(len(k) + len(v) for _, k, v, _ in tr.records())
    assert s.rate > 0 and not s.interrupted

    imps = consume_all(topics, topics.topics.impressions.name, n_i)
    clicks = consume_all(topics, topics.topics.clicks.name, n_c)
    # exactly N per topic: what we read is all there is (idempotent producer: no duplicates)
    assert len(imps) == n_i and len(clicks) == n_c
    assert sum(topic_end_offsets(topics, topics.topics.impressions.name).values()) == n_i
    assert sum(topic_end_offsets(topics, topics.topics.clicks.name).values()) == n_c

    partition_of = {}
    last = defaultdict(lambda: -1)
    for part, _off, key, value, ts in sorted(imps, key=lambda r: (r[0], r[1])):
        ev = decode_impression(value)
        assert key == ev.impression_id.encode() and ts == ev.event_time_ms
        assert ts >= last[part]  # event-time order within each partition
        last[part] = ts
        partition_of[key] = part
    assert set(partition_of) == set(tr.impressions["impression_id"].cast("binary").to_pylist())
    imp_time = dict(
        zip(
            tr.impressions["impression_id"].to_pylist(), tr.impressions["event_time_ms"].to_pylist()
        )
    )
    for part, _off, key, value, ts in clicks:
        ev = decode_click(value)
        assert key == ev.impression_id.encode() and ts == ev.event_time_ms
        assert partition_of[key] == part  # same partition number as its impression
        assert ts > imp_time[ev.impression_id]
    sent = sorted(v for k, _, v, _ in tr.records() if k == "clicks")
    assert sorted(r[3] for r in clicks) == sent


def test_dirty_replay_exactly_the_malformed_fail(topics):
    tr = generate(load_scenario("dirty", events=5_000, seed=8))
    inj = tr.injected
    s = replay(topics, tr, progress=False)
    assert s.failed == 0 and s.sent == inj["records"]
    failed = {}
    n_ok = 0
    for kind, topic, decode in (
        ("impressions", topics.topics.impressions.name, decode_impression),
        ("clicks", topics.topics.clicks.name, decode_click),
    ):
        recs = consume_all(topics, topic, inj["by_topic"][kind]["records"])
        assert len(recs) == inj["by_topic"][kind]["records"]
        for _, _, key, value, _ in recs:
            try:
                decode(value)
                n_ok += 1
            except DecodeError as e:
                failed[key.decode()] = (e.reason, kind)
    mal = tr.malformed.to_pylist()
    assert len(mal) == inj["malformed_total"] > 0
    assert set(failed) == {m["key"] for m in mal}
    for m in mal:
        reason, kind = failed[m["key"]]
        assert kind == m["topic"]
        assert reason.startswith(EXPECTED_REASON[m["kind"]]), (m["kind"], reason)
    assert n_ok == tr.impressions.num_rows + tr.clicks.num_rows + inj["duplicates"]


def test_rate_limit_and_time_compression(topics):
    recs = [("impressions", f"k{i}".encode(), b"{}", 1_767_571_200_000 + i) for i in range(3000)]
    s = replay(topics, recs, rate=5000, progress=False)
    assert s.sent == 3000 and s.failed == 0
    assert s.seconds >= 0.55  # 3000 records at 5000/s
    assert s.rate < 5000 * 1.1
    # event time runs 10x faster than wall time: 6 records 1 s apart take >= 0.5 s
    recs = [("clicks", b"k", b"{}", 1_767_571_200_000 + 1000 * i) for i in range(6)]
    s = replay(topics, recs, time_compression=10, progress=False)
    assert s.sent == 6 and 0.48 <= s.seconds < 5
    got = consume_all(topics, topics.topics.clicks.name, 6)
    assert [r[4] for r in sorted(got, key=lambda r: r[1])] == [r[3] for r in recs]


def test_delivery_failures_are_counted_not_raised(settings):
    name = f"missing-{uuid.uuid4().hex[:8]}"  # auto topic creation is off: cannot be delivered
    s_missing = settings.model_copy(
        update={
            "topics": settings.topics.model_copy(
                update={"impressions": Topic(name=name, partitions=1)}
            )
        }
    )
    recs = [("impressions", f"k{i}".encode(), b"{}", 1_767_571_200_000 + i) for i in range(50)]
    s = replay(
        s_missing,
        recs,
        progress=False,
        create_topics=False,
        flush_timeout=30,
        producer_overrides={"message.timeout.ms": 3000, "topic.metadata.propagation.max.ms": 1000},
    )
    assert s.failed == 50 and s.sent == 0 and s.attempted == 50
    assert sum(s.errors.values()) == 50
    assert any(
        "topic" in r.lower() or "partition" in r.lower() or "timed out" in r.lower()
        for r in s.errors
    ), s.errors


def test_cli_generate_then_replay_recorded(topics, stack_env, tmp_path):
    env = {
        **stack_env,
        "CTRSTREAM_TOPICS__IMPRESSIONS__NAME": topics.topics.impressions.name,
        "CTRSTREAM_TOPICS__IMPRESSIONS__PARTITIONS": str(topics.topics.impressions.partitions),
        "CTRSTREAM_TOPICS__CLICKS__NAME": topics.topics.clicks.name,
        "CTRSTREAM_TOPICS__CLICKS__PARTITIONS": str(topics.topics.clicks.partitions),
    }
    exe = os.path.join(os.path.dirname(sys.executable), "ctrstream")
    out = tmp_path / "traffic"
    r = subprocess.run(
        [exe, "generate", "-s", "dirty", "-n", "3000", "--seed", "9", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "malformed.parquet").exists() and (out / "oracle.parquet").exists()
    r = subprocess.run(
        [exe, "replay", "--from", str(out), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replay summary" in r.stdout
    from ctrstream.simulation.generator import read_traffic

    inj = read_traffic(out).injected
    for kind in ("impressions", "clicks"):
        t = getattr(topics.topics, kind).name
        assert sum(topic_end_offsets(topics, t).values()) == inj["by_topic"][kind]["records"]


def _topic_env(stack_env, s) -> dict:
    return {
        **stack_env,
        "CTRSTREAM_TOPICS__IMPRESSIONS__NAME": s.topics.impressions.name,
        "CTRSTREAM_TOPICS__IMPRESSIONS__PARTITIONS": str(s.topics.impressions.partitions),
        "CTRSTREAM_TOPICS__CLICKS__NAME": s.topics.clicks.name,
        "CTRSTREAM_TOPICS__CLICKS__PARTITIONS": str(s.topics.clicks.partitions),
    }


def test_ctrl_c_stops_cleanly_after_flushing(topics, stack_env):
    import re
    import signal

    exe = os.path.join(os.path.dirname(sys.executable), "ctrstream")
    proc = subprocess.Popen(
        [exe, "replay", "-s", "steady", "-n", "100000", "--rate", "5000", "--no-progress"],
        env=_topic_env(stack_env, topics),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90

        def total() -> int:
            try:
                return sum(topic_end_offsets(topics, topics.topics.impressions.name).values())
            except KafkaException:  # e.g. a leader not known yet: ask again
                return 0

        while total() < 2000:  # wait until it is visibly replaying
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "replay did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    m = re.search(r"sent \(acknowledged\)\s*│\s*([\d,]+)", out)
    assert m, out
    sent = int(m.group(1).replace(",", ""))
    on_broker = sum(
        sum(topic_end_offsets(topics, t.name).values())
        for t in (topics.topics.impressions, topics.topics.clicks)
    )
    assert 2000 <= sent < 100_000 and sent == on_broker  # flushed: everything counted is there
    assert "interrupted" in out
