"""Replay traffic into Kafka: rate-controlled, time-compressed, idempotent, nothing lost silently.

``replay(settings, records, rate=None, time_compression=None, progress=True)`` sends
``(topic kind, key, value, timestamp_ms)`` records (``Traffic.records()`` or anything shaped
like it, e.g. re-read files) to ``settings.topics.impressions`` / ``settings.topics.clicks``
in the given order with an idempotent producer (``ctrstream.kafka.clients.producer_config``:
``enable.idempotence``, ``acks=all``, lz4, large batches), so the order per key - and thus
event-time order per impression id - is kept within its partition. The Kafka record
timestamp is the event time.

* ``rate``: target records/s (None: as fast as possible).
* ``time_compression``: event time runs N x faster than wall time (record at event time
  ``t`` is sent ``(t - t_first) / N`` after the start). Combined with ``rate``, the slower wins.
* Delivery failures never raise: they are counted per reason, logged, and reported in the
  :class:`ReplaySummary` (``failed``); records still queued when the final flush times out
  count as failed too.
* Ctrl-C stops reading records, flushes what was produced, and returns the summary with
  ``interrupted=True``.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sized
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException, Producer

from ctrstream.config import Settings
from ctrstream.kafka.clients import ensure_topics, producer_config

if TYPE_CHECKING:
    from ctrstream.simulation.generator import Traffic

log = logging.getLogger("ctrstream.replay")

_POLL_EVERY = 1024  # records between poll(0) / progress updates in the unpaced loop
_MAX_LOGGED_FAILURES = 20


@dataclass
class ReplaySummary:
    sent: int  # acknowledged by the broker (acks=all)
    failed: int  # delivery failures + records still queued when the final flush timed out
    seconds: float
    bytes: int  # key + value bytes of the records produced
    rate: float  # sent / seconds
    attempted: int = 0  # records handed to the producer (and rejected synchronously)
    by_topic: dict = field(default_factory=dict)  # topic kind -> records handed to the producer
    errors: dict = field(default_factory=dict)  # failure reason -> count
    interrupted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        s = (
            f"sent {self.sent:,} records ({self.bytes / 1e6:,.1f} MB) in {self.seconds:,.2f} s "
            f"= {self.rate:,.0f} records/s; failed {self.failed:,}"
        )
        if self.errors:
            s += " (" + "; ".join(f"{r}: {n:,}" for r, n in self.errors.items()) + ")"
        if self.interrupted:
            s += "; interrupted by Ctrl-C after flushing"
        return s


class _Failures:
    """Delivery-report callback state (only failures are reported: delivery.report.only.error)."""

    def __init__(self):
        self.count = 0
        self.reasons: Counter = Counter()

    def add(self, reason: str, topic: str | None = None) -> None:
        self.count += 1
        self.reasons[reason] += 1
        if self.count <= _MAX_LOGGED_FAILURES:
            log.error("delivery failed%s: %s", f" on topic {topic}" if topic else "", reason)
        elif self.count == _MAX_LOGGED_FAILURES + 1:
            log.error("more delivery failures; they are counted in the replay summary")

    closed = False  # set once the summary is computed: purge reports are not counted twice

    def on_delivery(self, err, msg) -> None:
        if err is not None and not self.closed:
            self.add(err.str(), msg.topic())


def replay(
    settings: Settings,
    records: Iterable[tuple[str, bytes, bytes, int]] | Traffic,
    rate: float | None = None,
    time_compression: float | None = None,
    progress: bool = True,
    *,
    flush_timeout: float = 120.0,
    create_topics: bool = True,
    producer_overrides: dict | None = None,
    description: str = "replay",
) -> ReplaySummary:
    """Send the records to Kafka; see the module docstring. Never raises on delivery failure.

    ``records`` is an iterable of ``(topic kind, key, value, timestamp_ms)`` or a
    ``ctrstream.simulation.generator.Traffic`` (its records, taken block by block).
    """
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 records/s (or None for as fast as possible)")
    if time_compression is not None and time_compression <= 0:
        raise ValueError("time_compression must be > 0")
    topics = {
        "impressions": settings.topics.impressions.name,
        "clicks": settings.topics.clicks.name,
    }
    if create_topics:
        ensure_topics(settings, [settings.topics.impressions, settings.topics.clicks])
    failures = _Failures()
    conf = producer_config(
        settings,
        **{
            "delivery.report.only.error": True,
            "on_delivery": failures.on_delivery,
            **(producer_overrides or {}),
        },
    )
    producer = Producer(conf)
    total = len(records) if isinstance(records, Sized) else None
    if hasattr(records, "record_blocks"):  # a Traffic
        blocks = iter(records.record_blocks(block=_BLOCK))
    else:
        blocks = _blocks(records, _BLOCK)
    first = next(blocks, None)
    if first is not None:
        blocks = itertools.chain([first], blocks)
        _warn_if_beyond_retention(settings, list(topics.values()), first[3][0])

    state = _State()
    bar = _Bar(progress, total, description)
    start = time.perf_counter()
    with _StopOnCtrlC() as stop:
        try:
            with bar:
                if rate is None and time_compression is None:
                    _fast_loop(producer, blocks, topics, state, failures, bar, start, stop)
                else:
                    _paced_loop(
                        producer,
                        blocks,
                        topics,
                        state,
                        failures,
                        bar,
                        start,
                        stop,
                        rate,
                        time_compression,
                    )
        except KeyboardInterrupt:  # not in the main thread, or a second Ctrl-C
            stop.requested = True
        state.interrupted = stop.requested
        if stop.requested:
            log.warning("interrupted: flushing %d queued records before stopping", len(producer))
        stop.flushing = True
        remaining = _flush(producer, flush_timeout)
    if remaining:
        reason = (
            f"not delivered when the final flush ended ({flush_timeout:.0f} s timeout "
            "or a second Ctrl-C; broker unreachable or too slow?)"
        )
        failures.count += remaining
        failures.reasons[reason] += remaining
        log.error("%d records %s", remaining, reason)
    failures.closed = True
    _close(producer, remaining)
    seconds = time.perf_counter() - start
    sent = state.produced - (failures.count - state.sync_failed)
    summary = ReplaySummary(
        sent=sent,
        failed=failures.count,
        seconds=seconds,
        bytes=state.bytes,
        rate=sent / seconds if seconds > 0 else 0.0,
        attempted=state.produced + state.sync_failed,
        by_topic=dict(state.by_topic),
        errors=dict(failures.reasons),
        interrupted=state.interrupted,
    )
    (log.warning if summary.failed or summary.interrupted else log.info)(summary.describe())
    return summary


_BLOCK = 16_384  # records per block: poll(0), progress and Ctrl-C checks happen between blocks


def _blocks(records: Iterable, n: int) -> Iterator[tuple[list, list, list, list]]:
    """Records as blocks of parallel lists (kinds, keys, values, timestamps)."""
    it = iter(records)
    while chunk := list(itertools.islice(it, n)):
        kinds, keys, values, ts = map(list, zip(*chunk))
        yield kinds, keys, values, ts


class _StopOnCtrlC:
    """The first Ctrl-C asks the loops to stop at the next block boundary (nothing is cut in
    half, every produced record is accounted for); a Ctrl-C during the final flush stops
    waiting for it (the undelivered records are reported as failed). Main thread only."""

    def __init__(self):
        self.requested = False
        self._old = None

    flushing = False

    def _handler(self, signum, frame):
        if self.requested and self.flushing:
            raise KeyboardInterrupt
        if self.requested:
            return  # already stopping at the block boundary
        self.requested = True
        log.warning(
            "Ctrl-C: stopping after the current block, then flushing "
            "(Ctrl-C again to abort the flush wait)"
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class _State:
    def __init__(self):
        self.produced = 0  # accepted by produce()
        self.sync_failed = 0  # rejected by produce() (counted in failures too)
        self.bytes = 0
        self.by_topic: Counter = Counter()
        self.interrupted = False


def _produce_slow(producer: Producer, topic: str, value, key, ts, failures: _Failures) -> bool:
    """produce() with the queue full (BufferError) or a synchronous error."""
    while True:
        try:
            producer.produce(topic, value, key, timestamp=ts)
            return True
        except BufferError:
            producer.poll(0.05)  # serve delivery reports, let the queue drain
        except KafkaException as e:
            failures.add(f"produce rejected: {e.args[0].str() if e.args else e}", topic)
            return False
        except (TypeError, ValueError) as e:
            failures.add(f"produce rejected: {e}", topic)
            return False


def _account(state: _State, kinds, keys, values, rejected: list[int]) -> None:
    state.produced += len(values) - len(rejected)
    state.sync_failed += len(rejected)
    state.bytes += sum(map(len, values)) + sum(map(len, keys))
    state.by_topic.update(kinds)
    for j in rejected:
        state.bytes -= len(values[j]) + len(keys[j])
        state.by_topic[kinds[j]] -= 1


def _fast_loop(producer, blocks, topics, state, failures, bar, start, stop) -> None:
    """The hot path: one produce() per record and nothing else per record."""
    produce, poll = producer.produce, producer.poll
    name_of = topics.__getitem__
    for kinds, keys, values, ts in blocks:
        rejected = []
        names = list(map(name_of, kinds))
        for j, (topic, key, value, t) in enumerate(zip(names, keys, values, ts)):
            try:
                produce(topic, value, key, timestamp=t)
            except Exception:  # noqa: BLE001 - BufferError / KafkaException, handled there
                if not _produce_slow(producer, topic, value, key, t, failures):
                    rejected.append(j)
        _account(state, kinds, keys, values, rejected)
        poll(0)
        bar.update(state.produced + state.sync_failed, start)
        if stop.requested:
            break
    bar.update(state.produced + state.sync_failed, start, force=True)


def _paced_loop(
    producer, blocks, topics, state, failures, bar, start, stop, rate, compression
) -> None:
    """Records sent no earlier than their due time (rate and/or time compression)."""
    produce, poll = producer.produce, producer.poll
    clock = time.perf_counter
    t0 = None
    n = 0
    last_poll = clock()
    for kinds, keys, values, ts in blocks:
        rejected = []
        done = 0
        for j, (kind, key, value, t) in enumerate(zip(kinds, keys, values, ts)):
            due = n / rate if rate is not None else 0.0
            if compression is not None:
                if t0 is None:
                    t0 = t
                due = max(due, (t - t0) / 1000.0 / compression)
            ahead = start + due - clock()
            if ahead > 0.001:
                poll(0)
                time.sleep(min(ahead, 0.25))
                while not stop.requested and (ahead := start + due - clock()) > 0.001:
                    time.sleep(min(ahead, 0.25))
            if stop.requested:
                break
            topic = topics[kind]
            try:
                produce(topic, value, key, timestamp=t)
            except Exception:  # noqa: BLE001 - BufferError / KafkaException, handled there
                if not _produce_slow(producer, topic, value, key, t, failures):
                    rejected.append(j)
            n += 1
            done = j + 1
            now = clock()
            if now - last_poll > 0.1:
                poll(0)
                last_poll = now
                bar.update(state.produced + state.sync_failed + done, start)
        _account(state, kinds[:done], keys[:done], values[:done], rejected)
        if stop.requested:
            break
    bar.update(state.produced + state.sync_failed, start, force=True)


def _warn_if_beyond_retention(settings: Settings, topics: list[str], first_ts: int) -> None:
    """Kafka's time-based retention looks at record timestamps (here: event times). Records
    older than a topic's retention.ms are deleted by the broker within minutes of being
    written, so say so loudly before sending traffic with old event times."""
    try:
        from confluent_kafka.admin import ConfigResource, ResourceType

        from ctrstream.kafka.clients import admin

        client = admin(settings)  # keep the handle alive until the futures are done
        futs = client.describe_configs(
            [ConfigResource(ResourceType.TOPIC, t) for t in topics], request_timeout=10
        )
        age_ms = time.time() * 1000 - first_ts
        for res, fut in futs.items():
            retention = int(fut.result(10)["retention.ms"].value)
            if 0 <= retention < age_ms + 3_600_000:
                log.warning(
                    "topic %s has retention.ms=%d but the records' event times start %.1f days ago: "
                    "the broker will delete them within minutes (time retention uses record "
                    "timestamps). Set retention.ms=-1 on the topic (kafka-configs --alter "
                    "--add-config retention.ms=-1) or use a recent --set start_ms=...",
                    res.name,
                    retention,
                    age_ms / 86_400_000,
                )
    except Exception as e:  # noqa: BLE001 - a check, never a reason to stop
        log.debug("could not check topic retention: %s", e)


def _close(producer: Producer, remaining: int) -> None:
    """Release the producer now (not at garbage collection), dropping what could not be sent."""
    try:
        if remaining:
            producer.purge()
            producer.poll(0)
        producer.close()
    except Exception as e:  # noqa: BLE001 - the summary is already complete
        log.debug("closing the producer: %s", e)


def _flush(producer: Producer, timeout: float) -> int:
    """Flush; returns how many records are still undelivered. A Ctrl-C during the flush stops
    waiting (those records are then reported as failed)."""
    try:
        return producer.flush(timeout)
    except KeyboardInterrupt:
        log.warning("flush aborted by Ctrl-C with %d records undelivered", len(producer))
        return len(producer)


class _Bar:
    """A rich progress bar with the live rate; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int | None, description: str):
        self.enabled = enabled
        self.total = total
        self.description = description
        self._last = 0.0

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                refresh_per_second=4,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(self.description, total=self.total, rate="")
        return self

    def update(self, n: int, start: float, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        el = now - start
        self.progress.update(self.task, completed=n, rate=f"{n / el:,.0f} rec/s" if el > 0 else "")

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
        return False
