"""Consumer group lag: how many records of its topics a group has not committed yet (what
``kafka-consumer-groups.sh --describe`` shows), for ``ctrstream run status``."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Consumer, TopicPartition

from ctrstream.config import Settings
from ctrstream.kafka.clients import consumer_config


def group_lag(
    settings: Settings, group: str, topics: Sequence[str], timeout: float = 5.0
) -> int | None:
    """Records of ``topics`` (topic names) after ``group``'s committed offsets, summed over
    every partition; a partition the group never committed counts from its first offset.
    None when the group has committed nothing on any of them (it has not started)."""
    c = Consumer(consumer_config(settings, group))  # never subscribes: does not join the group
    try:
        parts: list[TopicPartition] = []
        for topic in topics:
            md = c.list_topics(topic, timeout=timeout).topics.get(topic)
            if md is None or md.error is not None:
                continue
            parts += [TopicPartition(topic, p) for p in sorted(md.partitions)]
        if not parts:
            return None
        committed = c.committed(parts, timeout=timeout)
        if all(tp.offset < 0 for tp in committed):
            return None
        lag = 0
        for tp in committed:
            low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout)
            lag += max(0, high - (tp.offset if tp.offset >= 0 else low))
        return lag
    finally:
        c.close()


__all__ = ["group_lag"]
