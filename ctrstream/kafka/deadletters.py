"""The dead-letter topic: every rejected record, unchanged, with the error in its headers.

The format is Kafka Connect's dead-letter-queue convention, so any Kafka tool reads it
(``kcat -C -t dlq -J``, or ``-f '%h %s\\n'``): the dead letter's **value** is the original
record's value, byte for byte (a null value stays null), its **key** the original key, and
the error travels in headers:

==========================================  ==============================================
``__connect.errors.topic``                  the topic the record was read from
``__connect.errors.partition``              its partition (decimal)
``__connect.errors.offset``                 its offset (decimal)
``__connect.errors.connector.name``         the ctrstream job that rejected it (``features``,
                                            ``join``, ``archive``, ``scorer``, ``calibrate``)
``__connect.errors.stage``                  where it failed (``decode``, ``key``,
                                            ``lateness``, ``join``, ...)
``__connect.errors.exception.message``      the reason, in words
==========================================  ==============================================

Every header value is UTF-8 text. One bad record read by several jobs has one dead letter
per job (told apart by the connector name). The topic's and the dead-letter producers' size
limits are any source record's plus :data:`ctrstream.config.DEAD_LETTER_OVERHEAD_BYTES`, so
whatever a source topic accepted fits in its dead letter.
"""

from __future__ import annotations

import logging
import time

from ctrstream.config import DEAD_LETTER_OVERHEAD_BYTES, Settings
from ctrstream.events import DeadLetter
from ctrstream.kafka.clients import make_producer
from ctrstream.kafka.topics import Record, read_topic

log = logging.getLogger("ctrstream.deadletters")

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_JOB = "__connect.errors.connector.name"
H_STAGE = "__connect.errors.stage"
H_MESSAGE = "__connect.errors.exception.message"

# a reason is cut to this many characters (it quotes from the record at most a little), so
# the headers stay well inside DEAD_LETTER_OVERHEAD_BYTES
MAX_REASON_CHARS = DEAD_LETTER_OVERHEAD_BYTES // 8

Headers = list[tuple[str, str | bytes | None]]


def dead_letter(
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    original: bytes | None,
    stage: str = "decode",
    *,
    key: bytes | None = None,
    job: str = "",
) -> DeadLetter:
    """The dead letter of the record ``topic[partition]@offset`` (``original`` its value,
    ``key`` its key), rejected by ``job`` at ``stage`` for ``reason``."""
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 20] + " ... (reason cut)"
    return DeadLetter(
        reason=reason,
        source_topic=topic,
        partition=partition,
        offset=offset,
        original=original,
        stage=stage,
        key=key,
        job=job,
    )


def dead_letter_headers(dl: DeadLetter) -> Headers:
    """The ``__connect.errors.*`` headers of ``dl``."""
    return [
        (H_TOPIC, dl.source_topic.encode()),
        (H_PARTITION, str(dl.partition).encode()),
        (H_OFFSET, str(dl.offset).encode()),
        (H_JOB, dl.job.encode()),
        (H_STAGE, dl.stage.encode()),
        (H_MESSAGE, dl.reason.encode("utf-8", "backslashreplace")),
    ]


def from_record(rec: Record) -> DeadLetter | None:
    """The dead letter a dlq record carries, or None when it has not the Connect headers."""
    h: dict[str, str] = {}
    for name, value in rec.headers or ():
        h[name] = (value or b"").decode("utf-8", "replace")
    try:
        return DeadLetter(
            reason=h[H_MESSAGE],
            source_topic=h[H_TOPIC],
            partition=int(h[H_PARTITION]),
            offset=int(h[H_OFFSET]),
            original=rec.value,
            stage=h.get(H_STAGE, ""),
            key=rec.key,
            job=h.get(H_JOB, ""),
        )
    except (KeyError, ValueError):
        return None


def producer_overrides(settings: Settings) -> dict[str, int]:
    """Producer settings of a dead-letter producer: records up to the dlq topic's limit."""
    return {"message.max.bytes": settings.topics.dead_letter_max_bytes()}


class DlqWriter:
    """Produces dead-letter records (at-least-once: a replay after a crash may repeat some)."""

    def __init__(self, settings: Settings):
        self.topic = settings.topics.dlq.name
        self.producer = make_producer(settings, **{"linger.ms": 5, **producer_overrides(settings)})

    def write(self, letters: list[DeadLetter]) -> None:
        for dl in letters:
            headers = dead_letter_headers(dl)
            while True:
                try:
                    self.producer.produce(
                        self.topic, value=dl.original, key=dl.key, headers=headers
                    )
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


def read_dead_letters(settings: Settings, timeout_s: float = 60.0) -> list[DeadLetter]:
    """Every committed record of the dlq topic up to its current end, as ``DeadLetter``s.

    The join writes its dead letters in Kafka transactions, so the topic holds control
    records: ``read_topic`` tracks the consumer position instead of counting messages."""
    out = []
    for rec in read_topic(settings, settings.topics.dlq.name, timeout=timeout_s):
        dl = from_record(rec)
        if dl is None:  # written by something else than a dead-letter producer
            log.warning(
                "dlq record without __connect.errors headers at %s[%d]@%d",
                rec.topic,
                rec.partition,
                rec.offset,
            )
        else:
            out.append(dl)
    return out
