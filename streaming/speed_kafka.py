"""Kafka plumbing shared by the speed-layer dataflows (``features`` and ``join``).

* :class:`PartitionReader` - one consumer assigned to one topic-partition at an explicit
  offset, read in micro-batches (``consume(num_messages=N, timeout=0)``, never blocking the
  Bytewax worker). The dataflows keep the offset in their Bytewax snapshot, not in a
  consumer group: Kafka group offsets are never committed or used.
* **Watermark heartbeats.** A record whose value is null and whose key starts with
  :data:`HEARTBEAT_PREFIX` (``b"__ctrstream_watermark__:"`` + event time in ms) is not an
  event: it advances the watermark of the partition it is in to that event time. Because it
  lives in the log, a replay after a crash sees it at the same place, so watermarks (and
  with them lateness, bucket closing and join emission) are deterministic. Use
  :func:`send_heartbeat` (``ctrstream speed heartbeat``) to close windows at the end of a
  finite stream, or on partitions that go idle.
* :func:`dead_letter` builds the ``dlq`` record for a rejected input record.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from ctrstream.config import Settings
from ctrstream.kafkautil import make_consumer, make_producer
from streaming.events import DeadLetter, encode

log = logging.getLogger("ctrstream.speed")

HEARTBEAT_PREFIX = b"__ctrstream_watermark__:"
NO_TIME = -(2**62)  # "no event seen yet" watermark


def heartbeat_time(key: bytes | None) -> int | None:
    """The event time a heartbeat record carries, or None when the record is no heartbeat."""
    if key is None or not key.startswith(HEARTBEAT_PREFIX):
        return None
    try:
        return int(key[len(HEARTBEAT_PREFIX):])
    except ValueError:
        return None


def send_heartbeat(settings: Settings, event_time_ms: int,
                   kinds: tuple[str, ...] = ("impressions", "clicks")) -> int:
    """Write one watermark heartbeat at ``event_time_ms`` into every partition of the
    ``kinds`` topics; returns how many were written (and acknowledged)."""
    p = make_producer(settings)
    n = 0
    key = HEARTBEAT_PREFIX + str(int(event_time_ms)).encode()
    for kind in kinds:
        topic = getattr(settings.topics, kind)
        for part in range(topic.partitions):
            p.produce(topic.name, value=None, key=key, partition=part)
            n += 1
    left = p.flush(30)
    if left:
        raise RuntimeError(f"{left} heartbeat records not acknowledged by Kafka within 30 s")
    return n


def dead_letter(reason: str, topic: str, partition: int, offset: int, original: bytes | None,
                stage: str = "decode") -> bytes:
    return encode(DeadLetter(reason=reason, source_topic=topic, partition=partition,
                             offset=offset, original=original or b"", stage=stage))


class PartitionReader:
    """A consumer assigned to exactly one topic-partition, starting at ``offset``
    (``None``: the beginning). ``poll`` returns up to ``max_records`` messages without
    blocking; ``next_offset`` is the offset after the last returned message."""

    def __init__(self, settings: Settings, topic: str, partition: int, offset: int | None,
                 group: str, fetch_kbytes: int = 32_768):
        self.topic, self.partition = topic, partition
        self.consumer = make_consumer(settings, group, **{
            "queued.max.messages.kbytes": fetch_kbytes,
            "fetch.wait.max.ms": 20,
            "enable.auto.offset.store": False,
        })
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
                    log.warning("kafka consumer error on %s[%d]: %s", self.topic, self.partition, err)
        if good:
            self.next_offset = good[-1].offset() + 1
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


class DlqWriter:
    """Produces dead-letter records (at-least-once: a replay after a crash may repeat some)."""

    def __init__(self, settings: Settings):
        self.topic = settings.topics.dlq.name
        self.producer = make_producer(settings, **{"linger.ms": 5})

    def write(self, records: list[bytes]) -> None:
        for r in records:
            while True:
                try:
                    self.producer.produce(self.topic, value=r)
                    break
                except BufferError:
                    self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        t0 = time.monotonic()
        left = self.producer.flush(timeout)
        if left:
            raise RuntimeError(f"{left} dead letters not acknowledged by Kafka after "
                               f"{time.monotonic() - t0:.0f}s")
