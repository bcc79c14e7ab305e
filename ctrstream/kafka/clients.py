"""Kafka client settings shared by every producer, consumer and admin call in ctrstream."""

from __future__ import annotations

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from ctrstream.config import Settings, Topic


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
    """The topic-level configuration ctrstream sets on ``topic``: its record size limit (the
    dlq's fits any source record plus its dead letter's headers)."""
    return {"max.message.bytes": str(settings.topics.max_message_bytes(topic))}


def _align_size_limits(client: AdminClient, settings: Settings, topics: list[Topic]) -> None:
    """Set the record size limit on existing topics too (one created before it was declared
    would refuse the dead letter of a record its source accepted)."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    res = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            t.name,
            incremental_configs=[
                ConfigEntry(
                    "max.message.bytes",
                    topic_config(settings, t)["max.message.bytes"],
                    incremental_operation=AlterConfigOpType.SET,
                )
            ],
        )
        for t in topics
    ]
    if res:
        for fut in client.incremental_alter_configs(res).values():
            fut.result(30)


def ensure_topics(settings: Settings, topics: list[Topic], timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet (explicit partition counts and the
    configuration of :func:`topic_config`; an existing topic gets the size limit set).
    Returns the names created. An existing topic with a different partition count is an
    error."""
    client = admin(settings)
    existing = client.list_topics(timeout=timeout).topics
    created, wrong = [], []
    new, old = [], []
    for t in topics:
        if t.name in existing:
            old.append(t)
            n = len(existing[t.name].partitions)
            if n != t.partitions:
                wrong.append(f"{t.name} has {n} partitions, configuration says {t.partitions}")
        else:
            new.append(
                NewTopic(
                    t.name,
                    num_partitions=t.partitions,
                    replication_factor=1,
                    config=topic_config(settings, t),
                )
            )
    if wrong:
        raise RuntimeError(
            "topic configuration mismatch: "
            + "; ".join(wrong)
            + ". Delete the topics (or the stack's data with `ctrstream stack down --purge`) "
            "or change CTRSTREAM_TOPICS__*__PARTITIONS."
        )
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
    _align_size_limits(client, settings, old)
    return created


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
