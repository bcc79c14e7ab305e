"""One consumer assigned to one topic-partition at an explicit offset, read in micro-batches.

The speed-layer dataflows keep the offset in their Bytewax snapshot, not in a consumer
group: Kafka group offsets are never committed or used (``consume(num_messages=N,
timeout=0)``, never blocking the Bytewax worker).
"""

from __future__ import annotations

import logging

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from ctrstream.config import Settings
from ctrstream.kafka.clients import make_consumer

log = logging.getLogger("ctrstream.speed")


class PartitionReader:
    """A consumer assigned to exactly one topic-partition, starting at ``offset``
    (``None``: the beginning). ``poll`` returns up to ``max_records`` messages without
    blocking; ``next_offset`` is the offset after the last returned message."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        partition: int,
        offset: int | None,
        group: str,
        fetch_kbytes: int = 32_768,
    ):
        self.topic, self.partition = topic, partition
        self.consumer = make_consumer(
            settings,
            group,
            **{
                "queued.max.messages.kbytes": fetch_kbytes,
                "fetch.wait.max.ms": 20,
                "enable.auto.offset.store": False,
            },
        )
        self.next_offset = offset
        self.tp = TopicPartition(topic, partition, OFFSET_BEGINNING if offset is None else offset)
        self.consumer.assign([self.tp])

    def poll(self, max_records: int) -> list:
        msgs = self.consumer.consume(num_messages=max_records, timeout=0)
        if not msgs:
            return msgs
        good = msgs
        if any(m.error() is not None for m in msgs):
            good = []
            for m in msgs:
                err = m.error()
                if err is None:
                    good.append(m)
                elif err.code() == KafkaError._PARTITION_EOF:
                    continue
                elif err.fatal():
                    raise KafkaException(err)
                else:
                    log.warning(
                        "kafka consumer error on %s[%d]: %s", self.topic, self.partition, err
                    )
        if good:
            last = good[-1].offset()
            assert last is not None  # set on every consumed record
            self.next_offset = last + 1
        return good

    def lag(self) -> int | None:
        """High watermark minus the next offset (None when unknown)."""
        try:
            _, high = self.consumer.get_watermark_offsets(self.tp, cached=True)
        except KafkaException:
            return None
        if high is None or high < 0:
            return None
        return max(0, high - (self.next_offset or 0))

    def high_watermark(self, timeout: float = 10.0) -> int:
        _, high = self.consumer.get_watermark_offsets(self.tp, timeout=timeout)
        return high

    def close(self) -> None:
        try:
            self.consumer.close()
        except RuntimeError:
            pass
