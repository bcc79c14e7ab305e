"""The dead-letter topic: every rejected record with its reason and its original bytes."""

from __future__ import annotations

import logging
import time

from ctrstream.config import Settings
from ctrstream.events import DeadLetter, decode_dead_letter, encode
from ctrstream.kafka.clients import make_producer
from ctrstream.kafka.topics import read_topic

log = logging.getLogger("ctrstream.deadletters")


def dead_letter(
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    original: bytes | None,
    stage: str = "decode",
) -> bytes:
    return encode(
        DeadLetter(
            reason=reason,
            source_topic=topic,
            partition=partition,
            offset=offset,
            original=original or b"",
            stage=stage,
        )
    )


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
            raise RuntimeError(
                f"{left} dead letters not acknowledged by Kafka after {time.monotonic() - t0:.0f}s"
            )


def read_dead_letters(settings, timeout_s: float = 60.0) -> list:
    """Every committed record of the dlq topic up to its current end (decoded ``DeadLetter``s).

    The join writes its dead letters in Kafka transactions, so the topic holds control
    records: ``read_topic`` tracks the consumer position instead of counting messages."""
    out = []
    for rec in read_topic(settings, settings.topics.dlq.name, timeout=timeout_s):
        try:
            out.append(decode_dead_letter(rec.value or b""))  # no value: undecodable too
        except Exception:  # noqa: BLE001 - an undecodable dead letter is logged and skipped
            log.warning(
                "undecodable dead letter at %s[%d]@%d", rec.topic, rec.partition, rec.offset
            )
    return out
