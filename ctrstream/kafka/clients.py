"""Kafka client settings shared by every producer, consumer and admin call in ctrstream."""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from ctrstream.config import Settings, Topic

log = logging.getLogger("ctrstream.kafka")


def producer_config(settings: Settings, **overrides) -> dict:
    """An idempotent, batching, compressing producer (acks=all)."""
    from ctrstream.events import PARTITIONER

    conf = {
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "partitioner": PARTITIONER,
    }
    conf.update(overrides)
    return conf


def consumer_config(settings: Settings, group_id: str, **overrides) -> dict:
    conf = {
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        "fetch.min.bytes": 1,
        "fetch.wait.max.ms": 100,
        "queued.max.messages.kbytes": 262_144,
    }
    conf.update(overrides)
    return conf


def make_producer(settings: Settings, **overrides) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(settings: Settings, group_id: str, **overrides) -> Consumer:
    return Consumer(consumer_config(settings, group_id, **overrides))


def admin(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})


def topic_config(settings: Settings, topic: Topic) -> dict[str, str]:
    """The topic-level configuration ctrstream sets on ``topic``: its retention (see
    :class:`ctrstream.config.Topics` for why each topic keeps what it keeps) and its record
    size limit (the dlq's fits any source record plus its dead letter's headers)."""
    return {
        "retention.ms": str(topic.retention_ms),
        "max.message.bytes": str(settings.topics.max_message_bytes(topic)),
    }


REPARTITION_DOC = "docs/kafka.md, 'Adding partitions to impressions and clicks'"


class CopartitioningError(RuntimeError):
    """``impressions`` and ``clicks`` do not have one partition count: the join would miss
    clicks (a click must be in its impression's partition number)."""


def check_copartitioned(settings: Settings, existing: dict[str, int] | None = None) -> None:
    """Raise :class:`CopartitioningError` when ``impressions`` and ``clicks`` are configured
    with different partition counts, or exist (``existing``: topic name -> partition count)
    with different counts. The join reads ``impressions[p]`` with ``clicks[p]``: both topics
    must hash one key to one partition number, so they need one count, changed together
    and only by the procedure in ``REPARTITION_DOC``."""
    t = settings.topics
    problems = []
    if t.impressions.partitions != t.clicks.partitions:
        problems.append(
            f"the configuration gives {t.impressions.name} {t.impressions.partitions} "
            f"partitions and {t.clicks.name} {t.clicks.partitions}"
        )
    have = existing or {}
    if t.impressions.name in have and t.clicks.name in have:
        n_i, n_c = have[t.impressions.name], have[t.clicks.name]
        if n_i != n_c:
            problems.append(
                f"topic {t.impressions.name} has {n_i} partitions and {t.clicks.name} {n_c}"
            )
    if problems:
        raise CopartitioningError(
            "impressions and clicks are not co-partitioned: "
            + "; ".join(problems)
            + ". The join needs one partition count for both (a click is read from its "
            "impression's partition number): set CTRSTREAM_TOPICS__IMPRESSIONS__PARTITIONS and "
            "CTRSTREAM_TOPICS__CLICKS__PARTITIONS to the same count, and change an existing "
            f"pair's count only by the procedure in {REPARTITION_DOC}."
        )


def ensure_topics(settings: Settings, topics: list[Topic], timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet (explicit partition counts, their own
    :func:`topic_config`), and set :func:`topic_config` on the existing ones where it
    differs. Returns the names created. An existing topic with a different partition count
    is an error, and so are ``impressions`` and ``clicks`` with different partition counts
    (:func:`check_copartitioned`). New topics get ``settings.kafka.replication_factor``
    replicas (one per broker, at most 3)."""
    client = admin(settings)
    existing = client.list_topics(timeout=timeout).topics
    check_copartitioned(settings, {n: len(m.partitions) for n, m in existing.items()})
    created, wrong = [], []
    new, present = [], []
    for t in topics:
        if t.name in existing:
            n = len(existing[t.name].partitions)
            if n != t.partitions:
                wrong.append(f"{t.name} has {n} partitions, configuration says {t.partitions}")
            present.append(t)
        else:
            new.append(
                NewTopic(
                    t.name,
                    num_partitions=t.partitions,
                    replication_factor=settings.kafka.replication_factor,
                    config=topic_config(settings, t),
                )
            )
    if wrong:
        raise RuntimeError(
            "topic configuration mismatch: "
            + "; ".join(wrong)
            + ". Delete the topics (or the stack's data with `ctrstream stack down --purge`) "
            "or change CTRSTREAM_TOPICS__*__PARTITIONS (adding partitions to impressions and "
            f"clicks: {REPARTITION_DOC})."
        )
    if present:
        _align_configs(client, settings, present, timeout)
    if new:
        for name, fut in client.create_topics(new, operation_timeout=timeout).items():
            try:
                fut.result(timeout)
                created.append(name)
            except (
                Exception
            ) as e:  # confluent-kafka's KafkaException: re-raised unless the topic exists
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise
    return created


def _align_configs(
    client: AdminClient, settings: Settings, topics: list[Topic], timeout: float
) -> None:
    """Set :func:`topic_config` on existing topics whose values differ (a topic created
    before its retention was declared, or by another tool). The settings are the source of
    truth: change a topic's retention with ``CTRSTREAM_TOPICS__<TOPIC>__RETENTION_MS``, not
    with ``kafka-configs`` (the next start sets the declared value again, and says so)."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    resources = [ConfigResource(ConfigResource.Type.TOPIC, t.name) for t in topics]
    wanted = {t.name: topic_config(settings, t) for t in topics}
    deadline = time.monotonic() + timeout
    while True:  # a topic another process has just created may not be describable yet
        try:
            described = {
                res.name: fut.result(timeout)
                for res, fut in client.describe_configs(resources, request_timeout=timeout).items()
            }
            break
        except KafkaException as e:
            if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    changes = []
    for name, current in described.items():
        entries = [
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in wanted[name].items()
            if k not in current or current[k].value != v
        ]
        for entry in entries:
            was = current[entry.name].value if entry.name in current else None
            log.warning("topic %s: setting %s=%s (was %s)", name, entry.name, entry.value, was)
        if entries:
            changes.append(
                ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=entries)
            )
    if changes:
        for fut in client.incremental_alter_configs(changes, request_timeout=timeout).values():
            fut.result(timeout)


def topic_end_offsets(settings: Settings, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """High watermark of every partition of ``topic``."""
    from confluent_kafka import TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": "ctrstream-offsets-probe",
            "enable.auto.commit": False,
        }
    )
    try:
        md = c.list_topics(topic, timeout=timeout).topics[topic]
        out = {}
        for p in md.partitions:
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            out[p] = high
        return out
    finally:
        c.close()
