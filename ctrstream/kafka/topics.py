"""Reading a whole topic back: every committed record up to its current end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from confluent_kafka import Consumer, TopicPartition

from ctrstream.config import Settings


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: list[tuple[str, bytes]] | None = None


def read_topic(
    settings: Settings, topic: str, timeout: float = 30.0, isolation: str = "read_committed"
) -> list[Record]:
    """Every record of ``topic`` up to its current end, in (partition, offset) order."""
    import time

    c = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": "ctrstream-speed-reference",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    try:
        md = c.list_topics(topic, timeout=timeout).topics[topic]
        ends = {}
        tps = []
        for p in md.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            ends[p] = hi
            if hi > lo:
                tps.append(TopicPartition(topic, p, lo))
        out: list[Record] = []
        if not tps:
            return out
        c.assign(tps)
        pos = {tp.partition: tp.offset for tp in tps}
        deadline = time.monotonic() + timeout
        while any(pos[p] < ends[p] for p in pos):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: positions {pos}, ends {ends}")
            for m in c.consume(num_messages=10_000, timeout=0.5):
                if m.error():
                    continue
                part, off = m.partition(), m.offset()
                assert part is not None and off is not None  # set on every consumed record
                # a transaction marker occupies an offset: track the position, not the count
                pos[part] = off + 1
                headers = cast(list[tuple[str, bytes]] | None, m.headers())
                out.append(Record(topic, part, off, m.key(), m.value(), m.timestamp()[1], headers))
            for p in pos:  # read_committed skips control records: use the consumer position
                if pos[p] < ends[p]:
                    got = c.position([TopicPartition(topic, p)])[0].offset
                    if got >= 0:
                        pos[p] = max(pos[p], got)
        out.sort(key=lambda r: (r.partition, r.offset))
        return out
    finally:
        c.close()
