"""The archiver: Kafka ``impressions`` and ``clicks`` -> the immutable Parquet master dataset.

Layout
------
``{data_dir}/archive/{kind}/date=YYYY-MM-DD/hour=HH/part-{created_ms}-{uuid}.parquet`` with
``kind`` in ``impressions``/``clicks``, partitioned by the **event** hour (UTC) of each
record, so a late event lands in the partition of its event time, never of its arrival.
Columns are the fields of ``ctrstream.events.Impression`` / ``Click`` (the partition values
live only in the path; an optional field - one with a default, such as an impression's
``request_id``, ``arm`` and ``price`` - is a column like the others, and :func:`read_events`
gives files written before it existed its default: :func:`conform`), then ``extra`` (:data:`EXTRA_COLUMN`): the fields a newer producer
sent that these types do not know, as a JSON object of their original values (null when
there are none; ``ctrstream.events.unknown_fields``). That is the compatibility rule's
archive half (``schemas/README.md``): a record of a newer producer is accepted and nothing of
it is dropped, so a later batch job that knows the new field can read it back; the batch
layer's readers (:func:`read_events`) ignore the column. Files are never modified after they
appear.

Guarantees
----------
* **Durable before committed.** A micro-batch is written as one file per (kind, event hour)
  to a hidden temp name in the target directory, fsynced, renamed into place and the
  directory fsynced; only then are the batch's Kafka offsets committed (synchronously). A
  crash at any point therefore loses nothing: whatever was not committed is re-delivered.
* **Each record once, at read time.** A crash between the rename and the commit re-delivers
  records that are already on disk, and the source traffic itself may carry duplicates, so
  the files may hold a record more than once. :func:`read_events` deduplicates by event id
  (``impression_id`` / ``click_id``; among copies the earliest event time wins), and every
  batch-layer reader goes through it.
* **Bad input is a dead letter**: a record that does not decode (whatever its bytes raise)
  or whose Kafka key is not its impression id (the key contract of ``ctrstream.events``) is
  written to ``dlq`` (connector name ``archive``, ``ctrstream.kafka.deadletters``) and
  counted (``undecodable``, ``wrong_key``), never archived; the dead letters are
  acknowledged before the batch's offsets are committed (at least once). Control records
  (watermark heartbeats, ``ctrstream.kafka.heartbeats``) are no events: skipped and counted
  (``control``; the speed layer verifies them and dead-letters forged ones).
* **Rebalances** flush and commit the buffered batch before partitions are revoked, so
  several archivers can share the consumer group. With ``--instance-id`` (Kafka static
  membership) a restarted archiver takes its partitions back at once instead of waiting for
  the crashed member's session (``--session-timeout-ms``, default 10 s) to expire.

Run it with ``ctrstream archive`` (forever; SIGTERM / Ctrl-C flush, commit and exit) or
``ctrstream archive --until-idle 5`` (stop once nothing arrived for 5 s, for demos and tests).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrstream.config import Settings
from ctrstream.events import (
    Click,
    DecodeError,
    Impression,
    decode_click,
    decode_impression,
    key_error,
    unknown_fields,
)
from ctrstream.features import HOUR_MS
from ctrstream.kafka.deadletters import dead_letter
from ctrstream.kafka.heartbeats import is_control

log = logging.getLogger("ctrstream.archive")

KINDS = ("impressions", "clicks")
EVENT_CLASS = {"impressions": Impression, "clicks": Click}
ID_FIELD = {"impressions": "impression_id", "clicks": "click_id"}
_DECODE: dict[str, Callable[[bytes | None], Impression | Click]] = {
    "impressions": decode_impression,
    "clicks": decode_click,
}

DEFAULT_GROUP = "ctrstream-archive"


# test hook: exit abruptly after the n-th flush wrote its files but before it committed
CRASH_ENV = "CTRSTREAM_ARCHIVE_CRASH_AFTER_FLUSH"


def _arrow_type(t) -> pa.DataType:
    ti = msgspec.inspect
    if isinstance(t, ti.IntType):
        return pa.int64()
    if isinstance(t, ti.StrType):
        return pa.string()
    if isinstance(t, ti.LiteralType):
        kinds = {type(v) for v in t.values}
        return pa.string() if kinds == {str} else pa.int64()
    if isinstance(t, ti.FloatType):
        return pa.float64()
    raise TypeError(f"no Parquet type for event field type {t!r}")


def arrow_schema(kind: str) -> pa.Schema:
    """The Parquet schema of one kind: the event struct's fields, in declaration order."""
    info = msgspec.inspect.type_info(EVENT_CLASS[kind])
    if not isinstance(info, msgspec.inspect.StructType):
        raise TypeError(f"the {kind} event type is not a msgspec Struct: {info!r}")
    return pa.schema([pa.field(f.name, _arrow_type(f.type)) for f in info.fields])


SCHEMAS = {k: arrow_schema(k) for k in KINDS}


def field_defaults(kind: str) -> dict[str, object]:
    """The optional fields of one kind's event struct and their defaults."""
    info = msgspec.inspect.type_info(EVENT_CLASS[kind])
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.name: f.default for f in info.fields if f.default is not msgspec.NODEFAULT}


DEFAULTS = {k: field_defaults(k) for k in KINDS}


def conform(kind: str, table: pa.Table) -> pa.Table:
    """``table`` with exactly the kind's columns, in order and cast to its schema: an
    optional column it lacks (a table made before the field existed, the open-loop
    generator's) is added with its default, and nulls in an optional column (a file written
    before the field existed) become the default."""
    schema = SCHEMAS[kind]
    n = table.num_rows
    for name, default in DEFAULTS[kind].items():
        ftype = schema.field(name).type
        i = table.schema.get_field_index(name)
        if i < 0:
            table = table.append_column(
                pa.field(name, ftype), pa.repeat(pa.scalar(default, type=ftype), n)
            )
        elif table.column(i).null_count:
            col = table.column(i).cast(ftype).fill_null(pa.scalar(default, type=ftype))
            table = table.set_column(i, pa.field(name, ftype), col)
    return table.select(schema.names).cast(schema)


EXTRA_COLUMN = "extra"
# what the archiver writes: the event fields, then the unknown fields of newer producers
FILE_SCHEMAS = {k: SCHEMAS[k].append(pa.field(EXTRA_COLUMN, pa.string())) for k in KINDS}


def archive_root(data_dir: Path | str) -> Path:
    return Path(data_dir) / "archive"


def partition_dir(data_dir: Path | str, kind: str, hour: int) -> Path:
    """Directory of event hour ``hour`` (= event_time_ms // HOUR_MS)."""
    d = datetime.fromtimestamp(hour * HOUR_MS / 1000, tz=UTC)
    return archive_root(data_dir) / kind / f"date={d:%Y-%m-%d}" / f"hour={d:%H}"


def _hour_of_dir(date_dir: str, hour_dir: str) -> int | None:
    try:
        d = datetime.strptime(
            date_dir.removeprefix("date=") + hour_dir.removeprefix("hour="), "%Y-%m-%d%H"
        ).replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(d.timestamp() * 1000) // HOUR_MS


def list_partitions(data_dir: Path | str, kind: str) -> list[tuple[int, Path]]:
    """(event hour, directory) of every partition of ``kind``, oldest first."""
    root = archive_root(data_dir) / kind
    out: list[tuple[int, Path]] = []
    if not root.is_dir():
        return out
    for date_dir in root.iterdir():
        if not date_dir.is_dir() or not date_dir.name.startswith("date="):
            continue
        for hour_dir in date_dir.iterdir():
            h = _hour_of_dir(date_dir.name, hour_dir.name)
            if h is not None and hour_dir.is_dir():
                out.append((h, hour_dir))
    return sorted(out)


def list_files(
    data_dir: Path | str, kind: str, start_ms: int | None = None, end_ms: int | None = None
) -> list[Path]:
    """Published part files of the partitions that overlap ``[start_ms, end_ms)``."""
    files = []
    for h, d in list_partitions(data_dir, kind):
        if start_ms is not None and (h + 1) * HOUR_MS <= start_ms:
            continue
        if end_ms is not None and h * HOUR_MS >= end_ms:
            continue
        files += sorted(d.glob("part-*.parquet"))
    return files


# --------------------------------------------------------------------------- reading


def empty_table(kind: str) -> pa.Table:
    return SCHEMAS[kind].empty_table()


def fetch_arrow(con, sql: str) -> pa.Table:
    """Run ``sql`` on a DuckDB connection and return a pyarrow Table (DuckDB 1.x and 2.x)."""
    rel = con.sql(sql)
    fn = getattr(rel, "to_arrow_table", None) or rel.arrow
    return fn()


def dedupe(
    kind: str, table: pa.Table, start_ms: int | None = None, end_ms: int | None = None
) -> pa.Table:
    """``table`` restricted to ``[start_ms, end_ms)``, each event id once (the copy with the
    earliest event time wins), sorted by (event_time_ms, id), conformed to the kind's schema
    (:func:`conform`: optional columns it lacks get their defaults).

    Vectorized in Arrow/numpy: one sort, a dictionary encoding of the ids and
    ``np.unique(..., return_index=True)`` for the first copy (about 3 s per million rows on
    two cores; DuckDB's ``QUALIFY row_number() OVER (PARTITION BY id ...)`` measured 7-9 s).
    """
    import pyarrow.compute as pc

    table = conform(kind, table)
    t = table.column("event_time_ms")
    mask = None
    if start_ms is not None:
        mask = pc.greater_equal(t, int(start_ms))
    if end_ms is not None:
        m2 = pc.less(t, int(end_ms))
        mask = m2 if mask is None else pc.and_(mask, m2)
    if mask is not None:
        table = table.filter(mask)
    table = table.combine_chunks()
    if table.num_rows == 0:
        return table
    idf = ID_FIELD[kind]
    order = pc.sort_indices(
        table, sort_keys=[("event_time_ms", "ascending"), (idf, "ascending")]
    ).to_numpy()
    codes = pc.dictionary_encode(table.column(idf)).combine_chunks().indices.to_numpy()
    _, first = np.unique(codes[order], return_index=True)
    if len(first) < len(order):
        order = order[np.sort(first)]
    return table.take(pa.array(order))


def read_events(
    data_dir: Path | str, kind: str, start_ms: int | None = None, end_ms: int | None = None
) -> pa.Table:
    """Events of ``kind`` with ``start_ms <= event_time_ms < end_ms`` (either bound optional),
    each event id once, sorted by (event_time_ms, id). Columns: the event struct's fields.
    Only the hour partitions that overlap the range are read."""
    import pyarrow.dataset as ds

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: choose one of {KINDS}")
    files = list_files(data_dir, kind, start_ms, end_ms)
    if not files:
        return empty_table(kind)
    flt = None
    if start_ms is not None:
        flt = ds.field("event_time_ms") >= int(start_ms)
    if end_ms is not None:
        f2 = ds.field("event_time_ms") < int(end_ms)
        flt = f2 if flt is None else flt & f2
    table = ds.dataset([str(f) for f in files], schema=SCHEMAS[kind], format="parquet").to_table(
        filter=flt
    )
    return dedupe(kind, table)


def max_event_time(data_dir: Path | str, kinds=KINDS) -> int | None:
    """The latest event time in the archive (reads only the newest partition of each kind)."""
    best = None
    for kind in kinds:
        parts = list_partitions(data_dir, kind)
        for _h, d in reversed(parts):
            files = sorted(d.glob("part-*.parquet"))
            if not files:
                continue
            m = max(
                pq.read_table(f, columns=["event_time_ms"]).column(0).to_numpy().max()
                for f in files
            )
            best = int(m) if best is None else max(best, int(m))
            break
    return best


# --------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_partitioned(data_dir: Path | str, kind: str, table: pa.Table) -> list[Path]:
    """Write ``table`` as one new part file per event hour, atomically (temp name in the same
    directory, fsync, rename, fsync the directory). Returns the published paths."""
    if table.num_rows == 0:
        return []
    hours = table.column("event_time_ms").to_numpy() // HOUR_MS
    order = np.argsort(hours, kind="stable")
    sorted_hours = hours[order]
    cuts = np.flatnonzero(np.diff(sorted_hours)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(order)]])
    created = int(time.time() * 1000)
    out, dirs = [], set()
    for s, e in zip(starts, ends):
        hour = int(sorted_hours[s])
        part = table.take(pa.array(order[s:e]))
        d = partition_dir(data_dir, kind, hour)
        d.mkdir(parents=True, exist_ok=True)
        name = f"part-{created}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = d / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(part, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, d / name)
        dirs.add(d)
        out.append(d / name)
    for d in dirs:
        _fsync_dir(d)
        _fsync_dir(d.parent)
    return out


def to_table(kind: str, events: list, extras: list[bytes | None] | None = None) -> pa.Table:
    """Decoded event structs -> a pyarrow Table with the kind's schema; with ``extras`` (one
    per event: its unknown fields as JSON, or None) the file schema, ``extra`` column last."""
    schema = SCHEMAS[kind] if extras is None else FILE_SCHEMAS[kind]
    if not events:
        return schema.empty_table()
    cols = list(zip(*(msgspec.structs.astuple(ev) for ev in events)))
    arrays = [pa.array(c, type=f.type) for c, f in zip(cols, SCHEMAS[kind])]
    if extras is not None:
        arrays.append(
            pa.array([None if x is None else x.decode() for x in extras], type=pa.string())
        )
    return pa.Table.from_arrays(arrays, schema=schema)


# --------------------------------------------------------------------------- the consumer


@dataclass
class ArchiveStats:
    records: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    undecodable: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    wrong_key: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    control: dict = field(default_factory=lambda: {k: 0 for k in KINDS})  # heartbeats skipped
    # records of a newer producer, archived with their unknown fields in the extra column
    extra: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    files: int = 0
    flushes: int = 0
    seconds: float = 0.0  # wall time of the run (group join and idle wait included)
    active_s: float = 0.0  # first record received -> last flush done

    def as_dict(self) -> dict:
        d = asdict(self)
        total = (
            sum(self.records.values())
            + sum(self.undecodable.values())
            + sum(self.wrong_key.values())
        )
        d["records_per_s"] = round(total / self.active_s, 1) if self.active_s > 0 else None
        return d


_metrics = None


def _get_metrics():
    global _metrics
    if _metrics is None:
        from prometheus_client import Counter, Histogram

        _metrics = {
            "records": Counter("ctrstream_archive_records", "records archived", ["kind"]),
            "undecodable": Counter("ctrstream_archive_undecodable", "records skipped", ["kind"]),
            "extra": Counter(
                "ctrstream_archive_unknown_fields",
                "records archived with fields these types do not know (kept in extra)",
                ["kind"],
            ),
            "files": Counter("ctrstream_archive_files", "part files published"),
            "flush": Histogram("ctrstream_archive_flush_seconds", "write+fsync+commit time"),
        }
    return _metrics


class Archiver:
    """Consumes both topics in micro-batches and publishes them to the archive."""

    def __init__(
        self,
        settings: Settings,
        data_dir: Path | str | None = None,
        group_id: str = DEFAULT_GROUP,
        batch_records: int = 200_000,
        max_batch_s: float = 5.0,
        instance_id: str | None = None,
        session_timeout_ms: int = 10_000,
    ):
        from ctrstream.kafka.clients import make_consumer
        from ctrstream.kafka.deadletters import DlqWriter

        self.settings = settings
        self.data_dir = Path(data_dir or settings.data_dir)
        self.batch_records = batch_records
        self.max_batch_s = max_batch_s
        self.topic_kind = {
            settings.topics.impressions.name: "impressions",
            settings.topics.clicks.name: "clicks",
        }
        extra: dict[str, int | str] = {"session.timeout.ms": session_timeout_ms}
        if instance_id:  # static membership: a restarted archiver gets its partitions back at once
            extra["group.instance.id"] = instance_id
        self.consumer = make_consumer(settings, group_id, **extra)
        self.dlq = DlqWriter(settings)
        self.stats = ArchiveStats()
        self.metrics = _get_metrics()
        self._buf: dict[str, list] = {k: [] for k in KINDS}
        self._extra: dict[str, list[bytes | None]] = {k: [] for k in KINDS}  # per buffered event
        self._offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset
        self._buffered = 0
        self._batch_started: float | None = None
        self._crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        self._assigned = False
        self._assigned_at: float | None = None
        self._first_record_at: float | None = None
        self.stop_requested = False

    # -- batching
    def _add(self, msg) -> None:
        topic = msg.topic()
        kind = self.topic_kind[topic]
        self._offsets[(topic, msg.partition())] = msg.offset() + 1
        value = msg.value()
        try:
            ev = _DECODE[kind](value)
            stage, reason = "key", key_error(msg.key(), ev)
        except DecodeError as e:
            if is_control(msg.key(), msg.headers()):  # a watermark heartbeat: no event
                self.stats.control[kind] += 1
                return
            stage, reason = "decode", e.reason
        if reason is not None:
            (self.stats.undecodable if stage == "decode" else self.stats.wrong_key)[kind] += 1
            self.metrics["undecodable"].labels(kind).inc()
            self.dlq.write(
                [
                    dead_letter(
                        reason,
                        topic,
                        msg.partition(),
                        msg.offset(),
                        value,
                        stage,
                        key=msg.key(),
                        job="archive",
                    )
                ]
            )
            return
        extra = unknown_fields(ev, value)
        if extra is not None:
            self.stats.extra[kind] += 1
            self.metrics["extra"].labels(kind).inc()
        self._buf[kind].append(ev)
        self._extra[kind].append(extra)
        self._buffered += 1

    def flush(self) -> None:
        """Publish the buffered batch, then commit its offsets."""
        if not self._offsets:
            return
        from confluent_kafka import TopicPartition

        t0 = time.perf_counter()
        for kind in KINDS:
            if self._buf[kind]:
                table = to_table(kind, self._buf[kind], self._extra[kind])
                files = write_partitioned(self.data_dir, kind, table)
                self.stats.files += len(files)
                self.metrics["files"].inc(len(files))
                self.stats.records[kind] += len(self._buf[kind])
                self.metrics["records"].labels(kind).inc(len(self._buf[kind]))
        self.stats.flushes += 1
        if self._first_record_at is not None:
            self.stats.active_s = time.monotonic() - self._first_record_at
        if self._crash_after and self.stats.flushes >= self._crash_after:
            log.warning("%s reached: exiting after the write, before the commit", CRASH_ENV)
            os._exit(99)
        self.dlq.flush()  # the batch's dead letters are acknowledged before its offsets
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._offsets.items()]
        self.consumer.commit(offsets=offsets, asynchronous=False)
        self._buf = {k: [] for k in KINDS}
        self._extra = {k: [] for k in KINDS}
        self._offsets.clear()
        self._buffered = 0
        self._batch_started = None
        self.metrics["flush"].observe(time.perf_counter() - t0)

    def _on_revoke(self, consumer, partitions) -> None:
        # flush everything (also other partitions' records: harmless, and simpler)
        self.flush()
        self._assigned = False

    def _on_assign(self, consumer, partitions) -> None:
        self._assigned = True
        self._assigned_at = time.monotonic()

    def caught_up(self) -> bool:
        """Whether this consumer has read every assigned partition to its high watermark."""
        assignment = self.consumer.assignment()
        if not assignment:
            return False
        from confluent_kafka import KafkaException

        try:  # with nothing consumed yet the position is unknown: the committed offset counts
            committed = {
                (c.topic, c.partition): c.offset
                for c in self.consumer.committed(assignment, timeout=5)
            }
        except KafkaException as e:
            log.warning("cannot read the committed offsets: %s", e)
            return False
        for tp in self.consumer.position(assignment):
            try:
                low, high = self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            except KafkaException as e:  # broker unreachable or metadata stale: not known
                log.warning("cannot read the watermarks of %s[%d]: %s", tp.topic, tp.partition, e)
                return False
            if tp.offset < 0 and committed.get((tp.topic, tp.partition), -1) >= 0:
                tp.offset = committed[(tp.topic, tp.partition)]
            pos = tp.offset if tp.offset >= 0 else low
            if pos < high:
                return False
        return True

    # -- main loop
    def run(
        self, until_idle_s: float | None = None, max_records: int | None = None
    ) -> ArchiveStats:
        topics = list(self.topic_kind)
        self._assigned, self._assigned_at = False, None
        self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        t_start = time.monotonic()
        last_msg = 0.0
        seen = 0
        try:
            while not self.stop_requested:
                want = max(1, min(10_000, self.batch_records - self._buffered))
                msgs = self.consumer.consume(num_messages=want, timeout=0.2)
                now = time.monotonic()
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.fatal():
                            raise RuntimeError(f"Kafka consumer failed: {err}")
                        log.warning("Kafka consumer error (retrying): %s", err)
                        continue
                    if self._batch_started is None:
                        self._batch_started = now
                    if self._first_record_at is None:
                        self._first_record_at = now
                    self._add(msg)
                    seen += 1
                if msgs:
                    last_msg = now
                if self._offsets and (
                    self._buffered >= self.batch_records
                    or not msgs
                    or now - (self._batch_started or now) >= self.max_batch_s
                ):
                    self.flush()
                if max_records is not None and seen >= max_records:
                    break
                # --until-idle: assigned, nothing new for until_idle_s, at the high watermarks
                if (
                    until_idle_s is not None
                    and not msgs
                    and self._assigned
                    and now - max(last_msg, self._assigned_at or now) >= until_idle_s
                    and self.caught_up()
                ):
                    break
            self.flush()
        except BaseException:
            # nothing unwritten may be committed by the revoke callback that close() runs:
            # drop the buffer, Kafka re-delivers it to the next run
            self._buf = {k: [] for k in KINDS}
            self._extra = {k: [] for k in KINDS}
            self._offsets.clear()
            self._buffered = 0
            raise
        finally:
            self.stats.seconds = time.monotonic() - t_start
            self.consumer.close()
        return self.stats


def run_archiver(
    settings: Settings,
    data_dir: Path | str | None = None,
    until_idle_s: float | None = None,
    group_id: str = DEFAULT_GROUP,
    batch_records: int = 200_000,
    max_batch_s: float = 5.0,
    instance_id: str | None = None,
    session_timeout_ms: int = 10_000,
    handle_signals: bool = False,
) -> ArchiveStats:
    """Run the archiver in this process (``handle_signals``: SIGTERM/SIGINT stop it cleanly)."""
    arch = Archiver(
        settings,
        data_dir,
        group_id=group_id,
        batch_records=batch_records,
        max_batch_s=max_batch_s,
        instance_id=instance_id,
        session_timeout_ms=session_timeout_ms,
    )
    if handle_signals:

        def _stop(signum, frame):
            log.info("signal %d: flushing, committing and stopping", signum)
            arch.stop_requested = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    return arch.run(until_idle_s=until_idle_s)
