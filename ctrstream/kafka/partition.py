"""One consumer assigned to one topic-partition at an explicit offset, read in micro-batches.

The speed-layer dataflows keep the offset in their Bytewax snapshot: the snapshot is the
source of truth, and a resumed flow assigns its partitions at the snapshot's offsets (or the
beginning), never at a group's committed offset. Reading is ``consume(num_messages=N,
timeout=0)``, never blocking the Bytewax worker.

So that standard lag tools (``kafka-consumer-groups.sh --describe``, Burrow, exporters) see
each flow's progress, :meth:`PartitionReader.checkpoint` - what a flow's ``snapshot()`` calls
for the offset it keeps - also commits that offset to the flow's consumer group (one group
per flow: ``ctrstream-speed-features``, ``ctrstream-speed-join``), asynchronously, and
:meth:`PartitionReader.close` commits the last position. The committed offsets are for
observers only; a failed commit is logged and costs nothing but a stale lag reading.
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
                "on_commit": self._on_commit,
            },
        )
        self.group = group
        self.next_offset = offset
        self.committed: int | None = None  # the last offset handed to the group
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

    def checkpoint(self) -> int | None:
        """The offset a snapshot keeps (:attr:`next_offset`), committed to the consumer group
        as well, asynchronously, when it moved (for lag tools; see the module docstring)."""
        offset = self.next_offset
        if offset is not None and offset != self.committed:
            self._commit(offset)
        return offset

    def _commit(self, offset: int) -> None:
        """Commit ``offset`` asynchronously: the Bytewax worker never waits on the group
        coordinator (the result arrives on a later ``consume`` or at ``close``)."""
        try:
            self.consumer.commit(
                offsets=[TopicPartition(self.topic, self.partition, offset)], asynchronous=True
            )
            self.committed = offset
        except KafkaException as e:  # observers get a stale reading; the flow goes on
            log.warning(
                "committing %s[%d]@%d to group %s failed: %s",
                self.topic,
                self.partition,
                offset,
                self.group,
                e,
            )

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:  # the next snapshot commits again
            self.committed = None
            log.warning("offset commit to group %s failed: %s", self.group, err)

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
        """Commit the last position (so a finished or stopped flow shows its true lag), then
        close the consumer."""
        try:
            if self.next_offset is not None and self.next_offset != self.committed:
                self._commit(self.next_offset)
            self.consumer.close()
        except RuntimeError:
            pass
