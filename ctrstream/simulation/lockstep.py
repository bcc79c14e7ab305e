"""Replay in event-time lockstep with a streaming scorer: impressions scored before the future
exists.

A time-compressed replay runs ahead of a scorer: by the time the scorer reads an
impression's windows, the speed layer has counted later events and the impression's own
click (training counts only strictly earlier events: a train/serve skew that showed as a
live AUC of 0.27, ``docs/demo.md``). :func:`replay_lockstep` instead sends the records in
steps of ``step_ms`` of event time, and per step:

1. the step's impressions are sent and acknowledged by Kafka;
2. it waits until the scorer has handled every one of them (``scored()``: how many
   impressions-topic records the scorer has read features for and scored - skipped and
   undecodable ones included - since it started; ``base``: that count before the replay);
3. only then the step's clicks are sent.

So no impression is scored with its own click in the features, and later impressions can
be in them only within the same step (at most ``step_ms`` of event time ahead) - the same
bounded skew as a real-time scorer with that much lag. The price is wall time: one scorer
round trip per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import Producer

from ctrstream.config import Settings
from ctrstream.kafka.clients import producer_config

Record = tuple[str, bytes, bytes, int]  # (topic kind, key, value, event time ms)


class LockstepError(RuntimeError):
    """The replay could not keep in step: a record was not delivered, or the scorer did
    not catch up in time."""


@dataclass
class LockstepSummary:
    sent: int
    seconds: float
    rate: float
    by_topic: dict[str, int]
    step_ms: int
    steps: int
    scorer_wait_s: float  # wall time spent waiting for the scorer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay_lockstep(
    settings: Settings,
    records: Iterable[Record],
    step_ms: int,
    scored: Callable[[], int | None],
    base: int,
    *,
    check: Callable[[], None] = lambda: None,
    step_timeout_s: float = 120.0,
    poll_s: float = 0.01,
    total: int | None = None,
    description: str = "replay (lockstep)",
    progress: bool = True,
) -> LockstepSummary:
    """Send ``records`` (in event-time order) in lockstep with the scorer (module docstring).

    ``scored()`` returns the scorer's count of handled impressions (None: unknown right
    now, e.g. a failed metrics scrape); ``check()`` raises when the scorer is known to be
    dead, so a wait fails at once instead of timing out; ``poll_s`` is how often the count is
    asked for while waiting (each ask may cost the scorer some CPU)."""
    if step_ms <= 0:
        raise ValueError(f"step_ms must be > 0 ms of event time, not {step_ms}")
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    producer = Producer(producer_config(settings, on_delivery=on_delivery))
    topics = {
        "impressions": settings.topics.impressions.name,
        "clicks": settings.topics.clicks.name,
    }
    counts = {"impressions": 0, "clicks": 0}
    imps: list[Record] = []
    clicks: list[Record] = []
    steps = 0
    waited = 0.0
    t0 = time.monotonic()

    def send(batch: list[Record]) -> None:
        for kind, key, value, ts in batch:
            while True:
                try:
                    producer.produce(topics[kind], value, key, timestamp=ts)
                    break
                except BufferError:
                    producer.poll(0.05)
            counts[kind] += 1
        producer.poll(0)

    def step() -> None:
        nonlocal steps, waited
        send(imps)
        if producer.flush(60):
            raise LockstepError("Kafka did not acknowledge the replay's records within 60 s")
        target = base + counts["impressions"]
        w0 = time.monotonic()
        deadline = w0 + step_timeout_s
        while (scored() or 0) < target:
            check()
            if time.monotonic() > deadline:
                raise LockstepError(
                    f"the scorer did not score the step ending at impression "
                    f"{counts['impressions']:,} within {step_timeout_s:g} s"
                )
            time.sleep(poll_s)
        waited += time.monotonic() - w0
        send(clicks)
        steps += 1
        imps.clear()
        clicks.clear()

    bar = _Bar(description, total) if progress else None
    try:
        end = None
        for rec in records:
            if end is None:
                end = rec[3] + step_ms
            elif rec[3] >= end:
                step()
                if bar is not None:
                    bar.update(sum(counts.values()))
                end = rec[3] + step_ms
            (imps if rec[0] == "impressions" else clicks).append(rec)
        step()
    finally:
        if bar is not None:
            bar.close()
    if producer.flush(60) or errors:
        raise LockstepError(f"{len(errors)} records could not be delivered to Kafka: {errors[:3]}")
    seconds = time.monotonic() - t0
    sent = sum(counts.values())
    return LockstepSummary(
        sent, seconds, sent / max(seconds, 1e-9), dict(counts), step_ms, steps, waited
    )


class _Bar:
    """A transient progress bar on stderr (records sent of ``total``)."""

    def __init__(self, description: str, total: int | None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total)

    def update(self, completed: int) -> None:
        self.progress.update(self.task, completed=completed)

    def close(self) -> None:
        self.progress.stop()
