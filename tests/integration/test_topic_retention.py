"""Retention is a property of each topic, set when ctrstream creates it, not of the broker:
the event topics keep everything, predictions and dead letters are bounded
(:class:`ctrstream.config.Topics` says why)."""

from __future__ import annotations

import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import ConfigResource, ConfigSource, NewTopic

from ctrstream.config import DAY_MS, Topic
from ctrstream.kafka.clients import admin, ensure_topics


def _topic_configs(settings, names: list[str]) -> dict[str, dict]:
    """The topics' configurations, once the broker knows them all (a topic just created may
    not be describable yet: poll, with a deadline)."""
    client = admin(settings)
    res = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    deadline = time.monotonic() + 30
    while True:
        try:
            return {r.name: f.result(30) for r, f in client.describe_configs(res).items()}
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_every_topic_gets_its_own_retention_at_creation(fresh_topics):
    t = fresh_topics.topics
    configs = _topic_configs(fresh_topics, [x.name for x in t.all()])
    want = {
        t.impressions.name: "-1",
        t.clicks.name: "-1",
        t.labeled.name: "-1",
        t.predictions.name: str(7 * DAY_MS),
        t.dlq.name: str(14 * DAY_MS),
    }
    for name, value in want.items():
        entry = configs[name]["retention.ms"]
        assert entry.value == value, f"{name}: retention.ms={entry.value}, expected {value}"
        # a topic-level setting, not the broker's default showing through
        assert entry.source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value, (name, entry.source)


def test_the_broker_has_no_retention_of_its_own(settings):
    """The broker keeps Kafka's defaults: a topic ctrstream did not declare is not kept
    forever by a broker-wide setting."""
    props = (settings.run_dir / "kafka" / "server.properties").read_text()
    assert "retention" not in props
    client = admin(settings)
    broker = ConfigResource(ConfigResource.Type.BROKER, "1")
    cfg = client.describe_configs([broker])[broker].result(30)
    assert cfg["log.retention.hours"].value == "168" and cfg["log.retention.ms"].value is None


def test_an_existing_topic_is_given_its_declared_retention(settings, unique):
    name = f"old-{unique}"
    client = admin(settings)
    client.create_topics([NewTopic(name, 2, 1)])[name].result(30)  # another tool's topic
    assert _topic_configs(settings, [name])[name]["retention.ms"].value == str(7 * DAY_MS)
    topic = Topic(name=name, partitions=2, retention_ms=3 * DAY_MS)
    assert ensure_topics(settings, [topic]) == []  # exists: not created, aligned
    assert _topic_configs(settings, [name])[name]["retention.ms"].value == str(3 * DAY_MS)
    assert ensure_topics(settings, [topic]) == []  # idempotent
