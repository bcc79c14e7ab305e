"""Watermark heartbeats: control records in the event topics that move event time forward.

A record whose value is null and whose key starts with :data:`HEARTBEAT_PREFIX`
(``b"__ctrstream_watermark__:"`` + event time in ms) is not an event: it advances the
watermark of the partition it is in to that event time. Because it lives in the log, a
replay after a crash sees it at the same place, so watermarks (and with them lateness,
bucket closing and join emission) are deterministic. :func:`send_heartbeat` (``ctrstream
speed heartbeat``) closes windows at the end of a finite stream, or on partitions that go
idle. Every consumer of ``impressions``/``clicks`` skips these records.
"""

from __future__ import annotations

from ctrstream.config import Settings
from ctrstream.kafka.clients import make_producer

HEARTBEAT_PREFIX = b"__ctrstream_watermark__:"
NO_TIME = -(2**62)  # "no event seen yet" watermark


def heartbeat_time(key: bytes | None) -> int | None:
    """The event time a heartbeat record carries, or None when the record is no heartbeat."""
    if key is None or not key.startswith(HEARTBEAT_PREFIX):
        return None
    try:
        return int(key[len(HEARTBEAT_PREFIX) :])
    except ValueError:
        return None


def send_heartbeat(
    settings: Settings, event_time_ms: int, kinds: tuple[str, ...] = ("impressions", "clicks")
) -> int:
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
