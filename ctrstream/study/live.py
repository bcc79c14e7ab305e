"""The live point of the feature-staleness curve: the real speed layer at its measured freshness.

The staleness sweep (:mod:`.staleness`) serves stale features exactly, with the batch layer's
point-in-time machinery (``point_in_time_counts(..., visible_until_ms=t - lag)``). This sweep
checks one point of that curve against the running system: a slice of the study's traffic
is replayed through Kafka into the real ``features`` dataflow (Bytewax) and Redis, and at
each sampled impression's moment its features are read through the store's reader, as
serving reads them. Then:

* the **measured freshness** of every read: how far the newest event visible in Redis lags
  the request's time (in event time, and in wall time through the replay's known time
  compression);
* the live features against the point-in-time ones **at the lag each read actually had**
  and at lag 0: the share of rows (and of entity windows) that match exactly;
* the NE and AUC of one model scored on the live features, on the point-in-time features at
  each read's measured lag, at the median measured lag (the staleness curve's point) and at
  lag 0, each next to the oracle's on the same rows.

The slice (``choose_slice``)
----------------------------
``minutes`` of event time starting at an hour boundary ``T`` (by default the hour at 5/6 of
the data's span: noon of the third day for the ``freshness`` scenario, inside the staleness
sweep's evaluation day). A batch view with cut-off ``T`` is computed from every event before
``T`` and published (restricted to the entities the sampled rows read, which is exact for
those reads); the replay then sends ``lead_s`` of event time before ``T`` at once (it warms
the dataflow up; the lambda merge takes every bucket that ends by ``T`` from the batch view,
so these events never count twice) and the slice itself paced at ``compression`` x real
time. Because ``T`` is on a bucket boundary of every resolution and the slice stays on
``T``'s day, the lambda read (batch view before ``T``, speed view from ``T`` on) of a fully
caught-up speed layer equals ``point_in_time_counts`` over the whole data exactly.

The freshness of a read (``probes``, per shard)
-----------------------------------------------
The dataflow keeps its counts in ``N_SHARDS`` shards (by entity id), and each shard flushes
to Redis on its own timer: at any moment each shard has its own horizon, and one read sees
each of its entities up to that entity's shard's horizon. Probes are replayed impressions
that are alone in their (user, 1-minute bucket) cell of the speed view - or (user x
advertiser, ...) or (user x ad, ...) - so that cell is non-zero exactly when the probe has
been counted there (as in :class:`ctrstream.demo.freshness.FreshnessProbe`); the cell's
shard is known (``features_flow.shard_of``), so they measure every shard, most impressions
several. Just before each feature read the
probes already sent are checked (one pipelined read): per shard, the newest visible one gives
``seen_ms``; just after the read, the oldest one still invisible gives ``unseen_ms``. What
the read saw of a shard is visible until ``h = max(seen_ms + 1, T)`` (the batch view holds
everything before ``T``; speed-view events before ``T`` are not read) and the measured lag
is ``t - h``. The read's features must then lie between the point-in-time counts visible
until ``h`` and those visible until ``unseen_ms``, each entity at its shard's horizon
(the events in between are non-probes whose visibility is not observed), window by window:
``share_within_bracket``; rows whose bracket holds none of their events have one right
value: ``share_equal_when_unambiguous``; and every read equals the counts visible until
``h`` (or until the newest probes visible just after the read, when a flush landed during
it) unless an unobserved event fell in between: ``share_equal_at_measured_lag``. The lag's
resolution is the probes' spacing per shard (a few tenths of a second of event time at the
``freshness`` scenario's density): the measured lag is an upper bound by up to that much.

In event time the measured lag is the wall-clock freshness times the replay's compression;
at real-time pace the speed layer would lag by the wall-clock freshness itself
(``measured_wall_freshness_ms_*``).

What it needs
-------------
A running Kafka and Redis (``settings``; e.g. :func:`start_stack`'s, or the test suite's
isolated stack): the sweep creates its own topics (``impressions-live-<id>``, ...), owns the
logical Redis database ``redis_db`` of that Redis (flushed first) and runs the ``features``
dataflow as a child process against them, stopped by PID at the end. With
``settings=None`` it starts an isolated Kafka + Redis in a temporary directory and stops it
at the end. The replay's timing makes the result depend on the machine's load: it is not
deterministic, unlike the other sweeps; the checks say whether it held.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrstream import events as E
from ctrstream import features as F
from ctrstream.batch.point_in_time import point_in_time_counts
from ctrstream.batch.views import compute_batch_view, write_batch_view
from ctrstream.config import Settings
from ctrstream.stack.manager import Stack, isolated_settings, settings_env
from ctrstream.stack.services import PortInUseError, pid_alive
from ctrstream.store.connection import redis_client
from ctrstream.store.reader import FeatureStore
from ctrstream.store.speed_view import Cell, read_speed_cells
from ctrstream.study.data import (
    HOUR_MS,
    StudyData,
    bootstrap_ne_diff,
    dense_at,
    fit,
    labels_within,
    predict,
    quality,
)

SWEEP = "live"
MINUTE_MS = 60_000
REDIS_DB = 9  # the logical database of the stack's Redis this sweep owns by default
PROBE_RES = F.RESOLUTIONS[0]  # the finest resolution: a probe's cell is its 1-minute bucket
DEFAULTS: dict[str, Any] = {
    "minutes": 10.0,  # event time replayed (after the lead-in)
    "compression": 10.0,  # event time runs this many times faster than wall time
    "lead_s": 30.0,  # event seconds before the cut-off sent at once to warm the dataflow
    "max_reads": 5000,  # sampled impressions read live (evenly spaced over the slice)
    "train_hours": 24.0,  # the model's training rows: this long before the cut-off
    "at_fraction": 5 / 6,  # the slice starts at the hour boundary at this fraction of the span
    "flush_interval_ms": None,  # the dataflow's flush interval (None: the settings')
    "start_timeout_s": 180.0,  # how long the dataflow may take to show its first counts
}
QUICK: dict[str, Any] = {"minutes": 3.0, "max_reads": 600, "train_hours": 6.0}

Record = tuple[str, bytes, bytes, int]  # (topic kind, key, value, event time ms)


# --------------------------------------------------------------------------- the stack


def start_stack(run_dir: Path, log: Callable[[str], None] = print, attempts: int = 3) -> Stack:
    """Start an isolated Kafka + Redis (free loopback ports, everything under ``run_dir``)
    and return it; stop it with :func:`stop_stack` (by PID). Triton is not started: this
    sweep does not score through it."""
    for attempt in range(1, attempts + 1):
        stack = Stack(isolated_settings(Path(run_dir)))
        try:
            stack.up(log=log, only=["kafka", "redis"])
            return stack
        except PortInUseError as e:  # a free port was taken before the service bound it
            if attempt == attempts:
                raise
            log(f"{e} - starting the isolated stack again on other free ports")
    raise AssertionError("unreachable")


def stop_stack(stack: Stack, log: Callable[[str], None] = lambda m: None) -> None:
    """Stop a stack :func:`start_stack` started (each service by its PID)."""
    stack.down(log=log)


@contextmanager
def isolated_stack(log: Callable[[str], None] = print) -> Iterator[Settings]:
    """An isolated Kafka + Redis in a temporary directory for the duration of the block."""
    with tempfile.TemporaryDirectory(prefix="ctr-study-live-") as d:
        stack = start_stack(Path(d) / "stack", log=log)
        try:
            yield stack.settings
        finally:
            stop_stack(stack, log=log)


def live_settings(settings: Settings, redis_db: int, tag: str) -> Settings:
    """``settings`` with topics of their own (``<name>-live-<tag>``) and the Redis database
    ``redis_db``."""
    t = settings.topics
    topics = t.model_copy(
        update={
            name: getattr(t, name).model_copy(update={"name": f"{getattr(t, name).name}-{tag}"})
            for name in ("impressions", "clicks", "labeled", "predictions", "dlq")
        }
    )
    return settings.model_copy(
        update={"topics": topics, "redis": settings.redis.model_copy(update={"db": redis_db})}
    )


class FeaturesJob:
    """The speed layer's ``features`` dataflow as a child process (no recovery directory),
    stopped by its PID. Its output goes to a temporary file, shown when it fails."""

    def __init__(self, settings: Settings, flush_interval_ms: int | None = None):
        env = {
            **os.environ,
            **settings_env(settings),
            "CTRSTREAM_METRICS_PORT": "0",
            "CTRSTREAM_FLUSH_INTERVAL_MS": str(flush_interval_ms or settings.flush_interval_ms),
            "PYTHONUNBUFFERED": "1",
        }
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "ctrstream.streaming.features_flow:get_flow()"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def check(self) -> None:
        """Raise when the job has exited (it runs until stopped)."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"the features dataflow exited with code {self.proc.returncode}:\n{self.tail()}"
            )

    def tail(self, n: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None and pid_alive(self.proc.pid):
            self.proc.terminate()  # SIGTERM to this child's PID
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# --------------------------------------------------------------------------- the slice


@dataclass
class Slice:
    """What is replayed and read: the cut-off ``T`` (batch view before it, speed view from
    it), the replayed event-time range ``[lead_ms, end_ms)``, the rows read live (indices of
    the study's rows, in time order) and the records in send order."""

    cutoff_ms: int
    end_ms: int
    lead_ms: int
    reads: np.ndarray
    records: list[Record] = field(repr=False)
    read_at: dict[int, int] = field(repr=False)  # record index -> row read just before it
    # record index -> the impression's probe cells: (speed-view cell, the shard that counts it)
    probe_at: dict[int, list[tuple[Cell, int]]] = field(repr=False)


def choose_slice(
    data: StudyData,
    minutes: float,
    lead_s: float,
    max_reads: int,
    at_fraction: float = DEFAULTS["at_fraction"],
    cutoff_ms: int | None = None,
) -> Slice:
    """The slice to replay (see the module docstring); ``cutoff_ms`` overrides the start."""
    if minutes <= 0 or lead_s < 0 or max_reads < 1:
        raise ValueError(
            f"minutes must be > 0 ({minutes}), lead_s >= 0 ({lead_s}), max_reads >= 1 ({max_reads})"
        )
    first_t, last_t = int(data.t[0]), int(data.t[-1])
    if cutoff_ms is not None and F.align_cutoff(int(cutoff_ms)) != int(cutoff_ms):
        raise ValueError(f"cutoff_ms {cutoff_ms} is not on a {F.CUTOFF_ALIGN_MS} ms boundary")
    start = (
        int(cutoff_ms)
        if cutoff_ms is not None
        else F.align_cutoff(first_t + int(at_fraction * (last_t - first_t)))
    )
    end = start + int(minutes * MINUTE_MS)
    if not first_t < start < end <= last_t:
        raise ValueError(
            f"the slice [{start}, {end}) is not inside the data's event time "
            f"[{first_t}, {last_t}]: choose a smaller minutes or another at_fraction / cutoff_ms"
        )
    if (end - 1) // F.DAY_MS != start // F.DAY_MS:
        raise ValueError(
            "the slice crosses midnight, where the long windows need a batch view of the new "
            "day: choose a start earlier in the day or fewer minutes"
        )
    T = start
    lead = T - int(lead_s * 1000)
    rows = data.rows_between(T, end)
    if len(rows) == 0:
        raise ValueError(f"no impression in the slice [{T}, {end}): choose more minutes")
    if len(rows) > max_reads:
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, max_reads).astype(np.int64))]

    imps = _between(data.impressions, lead, end)
    clks = _between(data.clicks, lead, end)
    ev_t = np.concatenate(
        [imps.column("event_time_ms").to_numpy(), clks.column("event_time_ms").to_numpy()]
    ).astype(np.int64)
    kind = np.concatenate([np.zeros(imps.num_rows, np.int8), np.ones(clks.num_rows, np.int8)])
    order = np.lexsort((kind, ev_t))  # event-time order; an impression before a click at a tie
    imp_rows = imps.to_pylist()
    clk_rows = clks.to_pylist()
    # the study's row of each replayed impression (the impressions table is the rows' order)
    first = int(np.searchsorted(data.t, lead, side="left"))
    read_set = set(rows.tolist())
    probes = _probe_cells(imps)
    records: list[Record] = []
    read_at: dict[int, int] = {}
    probe_at: dict[int, list[tuple[Cell, int]]] = {}
    for j in order.tolist():
        if j < len(imp_rows):
            ev: Any = msgspec.convert(imp_rows[j], E.Impression)
            row = first + j
            if row in read_set:
                read_at[len(records)] = row
            if probes[j]:
                probe_at[len(records)] = probes[j]
            records.append(("impressions", E.key_of(ev), E.encode(ev), ev.event_time_ms))
        else:
            ev = msgspec.convert(clk_rows[j - len(imp_rows)], E.Click)
            records.append(("clicks", E.key_of(ev), E.encode(ev), ev.event_time_ms))
    if len(read_at) != len(rows):
        raise AssertionError("the study's rows and the replayed impressions disagree")
    return Slice(T, end, lead, rows, records, read_at, probe_at)


def _between(table: pa.Table, lo: int, hi: int) -> pa.Table:
    t = table.column("event_time_ms")
    return table.filter(pc.and_(pc.greater_equal(t, lo), pc.less(t, hi)))


PROBE_ENTITIES = tuple(e for e in F.ENTITIES if "user_id" in e.fields)  # ids with few events


def _probe_cells(imps: pa.Table) -> list[list[tuple[Cell, int]]]:
    """Per replayed impression, its probe cells: for each entity of ``PROBE_ENTITIES``
    whose (id, probe-resolution bucket) cell holds this impression alone among those
    replayed, that cell and its shard (one per shard: the user, user x advertiser and user x
    ad of one impression are usually in different shards, so each impression probes up to
    three shards)."""
    cols = {f: imps.column(f).to_numpy().astype(np.int64) for f in _entity_fields()}
    b = F.bucket_of(imps.column("event_time_ms").to_numpy().astype(np.int64), PROBE_RES)
    shards = entity_shards(cols)
    out: list[list[tuple[Cell, int]]] = [[] for _ in range(imps.num_rows)]
    taken: list[set[int]] = [set() for _ in range(imps.num_rows)]
    for e in PROBE_ENTITIES:
        k = F.ENTITIES.index(e)
        key = np.stack([cols[f] for f in e.fields] + [b], axis=1)
        _, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
        for j in np.flatnonzero(cnt[inv.ravel()] == 1).tolist():
            sh = int(shards[j, k])
            if sh in taken[j]:
                continue
            taken[j].add(sh)
            eid = F.entity_id(e, {f: int(cols[f][j]) for f in e.fields})
            out[j].append(((e.name, eid, PROBE_RES.name, "i", int(b[j])), sh))
    return out


def entity_shards(columns: dict[str, Any]) -> np.ndarray:
    """``(rows, len(ENTITIES))``: the speed layer's shard of each row's entities (each shard
    flushes to Redis on its own timer, so freshness is measured per shard). ``columns``: the
    entity fields per row (fields an entity does not use may be left out)."""
    from ctrstream.streaming.features_flow import INT_FIELDS, N_SHARDS, pack_ids, shard_of

    n = len(next(iter(columns.values())))
    mat = np.stack(
        [
            np.asarray(columns[f], dtype=np.int64) if f in columns else np.zeros(n, np.int64)
            for f in INT_FIELDS
        ],
        axis=1,
    )
    out = np.full((n, len(F.ENTITIES)), -1, dtype=np.int64)
    for k, e in enumerate(F.ENTITIES):
        if all(f in columns for f in e.fields):
            out[:, k] = shard_of(pack_ids(mat, e), k, N_SHARDS)
    return out


def n_shards() -> int:
    from ctrstream.streaming.features_flow import N_SHARDS

    return N_SHARDS


def publish_view(settings: Settings, data: StudyData, sl: Slice) -> dict:
    """Compute the batch view with cut-off ``sl.cutoff_ms`` from every event before it and
    publish it, restricted to the entities the rows read live touch (exact for those
    reads: a read only looks up its own entities)."""
    buckets, longs = compute_batch_view(data.impressions, data.clicks, sl.cutoff_ms)
    q = data.impressions.take(pa.array(sl.reads))
    want = pa.array(
        sorted(
            {
                f"{e.name}\x00{F.entity_id(e, r)}"
                for r in q.select(list(_entity_fields())).to_pylist()
                for e in F.ENTITIES
            }
        )
    )

    def keep(t: pa.Table) -> pa.Table:
        key = pc.binary_join_element_wise(t.column("entity"), t.column("eid"), "\x00")
        return t.filter(pc.is_in(key, value_set=want))

    return write_batch_view(settings, keep(buckets), keep(longs), sl.cutoff_ms)


def _entity_fields() -> tuple[str, ...]:
    return tuple(dict.fromkeys(f for e in F.ENTITIES for f in e.fields))


# --------------------------------------------------------------------------- the replay


@dataclass
class LiveReads:
    """Per row read live (and per shard of the speed layer, the last axis): the counts read,
    the newest probe visible just before the read (``seen_ms``, -1: none yet) and just after
    (``seen_after_ms``), the oldest probe still invisible just after it (``unseen_ms``; the
    request's time when none), the read's wall latency and how late (wall) the replay was
    at that record."""

    counts: np.ndarray
    seen_ms: np.ndarray
    seen_after_ms: np.ndarray
    unseen_ms: np.ndarray
    read_ms: np.ndarray
    behind_s: np.ndarray
    replay_s: float
    warmup_s: float


class _Probes:
    """The probes sent so far and which of them the speed view shows (visibility only
    grows, so the ones before ``first_unseen`` are never asked again)."""

    def __init__(self, client: Any):
        self.client = client
        self.times: list[int] = []
        self.cells: list[Cell] = []
        self.visible: list[bool] = []
        self.first_unseen = 0

    def add(self, t_ms: int, cell: Cell) -> None:
        self.times.append(t_ms)
        self.cells.append(cell)
        self.visible.append(False)

    def check(self) -> tuple[int | None, int | None]:
        """(event time of the newest visible probe, of the oldest invisible one)."""
        lo = self.first_unseen
        if lo < len(self.cells):
            values = read_speed_cells(self.client, self.cells[lo:])
            for k, v in enumerate(values, start=lo):
                if v >= 1:
                    self.visible[k] = True
            while self.first_unseen < len(self.cells) and self.visible[self.first_unseen]:
                self.first_unseen += 1
        seen = [self.times[k] for k in range(lo, len(self.cells)) if self.visible[k]]
        newest = max(seen) if seen else (self.times[lo - 1] if lo > 0 else None)
        oldest = self.times[self.first_unseen] if self.first_unseen < len(self.times) else None
        return newest, oldest


def replay_and_read(
    settings: Settings,
    data: StudyData,
    sl: Slice,
    compression: float,
    job: FeaturesJob,
    start_timeout_s: float = DEFAULTS["start_timeout_s"],
    log: Callable[[str], None] = print,
) -> LiveReads:
    """Send the lead-in at once, wait until the dataflow shows its newest probe, then send
    the slice paced at ``compression`` x real time and read each sampled row's features
    (the store's lambda reader, at the row's time) just before its impression is sent."""
    from ctrstream.kafka.clients import make_producer

    if compression <= 0:
        raise ValueError(f"compression must be > 0, not {compression}")
    client = redis_client(settings, timeout_s=30.0)
    store = FeatureStore(client)
    S = n_shards()
    probes = [_Probes(client) for _ in range(S)]
    producer = make_producer(settings)
    topics = {
        "impressions": settings.topics.impressions.name,
        "clicks": settings.topics.clicks.name,
    }
    fields = list(_entity_fields())
    q = data.impressions.take(pa.array(sl.reads)).select(fields)
    cols = {f: q.column(f).to_numpy() for f in fields}
    pos = {int(r): k for k, r in enumerate(sl.reads)}
    n = len(sl.reads)
    counts = np.zeros((n, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.int64)
    seen = np.full((n, S), -1, dtype=np.int64)
    seen_after = np.full((n, S), -1, dtype=np.int64)
    unseen = np.full((n, S), -1, dtype=np.int64)
    read_ms = np.zeros(n)
    behind = np.zeros(n)

    def send(i: int) -> None:
        kind, key, value, ts = sl.records[i]
        while True:
            try:
                producer.produce(topics[kind], value, key, timestamp=ts)
                break
            except BufferError:
                producer.poll(0.05)
        for cell, shard in sl.probe_at.get(i, ()):
            probes[shard].add(ts, cell)

    try:
        first = next(i for i, r in enumerate(sl.records) if r[3] >= sl.cutoff_ms)
        w0 = time.monotonic()
        for i in range(first):
            send(i)
        if producer.flush(60):
            raise RuntimeError("Kafka did not acknowledge the lead-in within 60 s")
        deadline = time.monotonic() + start_timeout_s
        while any(p.times and p.check()[1] is not None for p in probes):
            job.check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the features dataflow did not count the lead-in within "
                    f"{start_timeout_s:g} s:\n{job.tail()}"
                )
            time.sleep(0.05)
        warmup_s = time.monotonic() - w0
        log(f"live: dataflow caught up with the lead-in after {warmup_s:.1f} s; replaying")

        t_first = sl.records[first][3]
        start = time.perf_counter()
        last_poll = start
        for i in range(first, len(sl.records)):
            ts = sl.records[i][3]
            due = start + (ts - t_first) / 1000.0 / compression
            ahead = due - time.perf_counter()
            if ahead > 0.001:
                producer.poll(0)
                time.sleep(ahead)
            row = sl.read_at.get(i)
            if row is not None:
                k = pos[row]
                behind[k] = max(0.0, time.perf_counter() - due)
                before = [p.check()[0] for p in probes]
                r0 = time.perf_counter()
                fr = store.read_columns({f: cols[f][k : k + 1] for f in fields}, ts)
                read_ms[k] = (time.perf_counter() - r0) * 1000
                after = [p.check() for p in probes]
                counts[k] = fr.counts[0]
                for j in range(S):
                    b = before[j]
                    seen[k, j] = -1 if b is None else b
                    newest, oldest = after[j]
                    seen_after[k, j] = -1 if newest is None else newest
                    unseen[k, j] = ts if oldest is None else oldest
            send(i)
            now = time.perf_counter()
            if now - last_poll > 0.1:
                producer.poll(0)
                job.check()
                last_poll = now
        replay_s = time.perf_counter() - start
        if producer.flush(60):
            raise RuntimeError("Kafka did not acknowledge the slice within 60 s")
    finally:
        client.close()
    return LiveReads(counts, seen, seen_after, unseen, read_ms, behind, replay_s, warmup_s)


# --------------------------------------------------------------------------- the sweep


def run(
    data: StudyData,
    *,
    kind: str = "deep",
    seed: int = 0,
    quick: bool = False,
    log: Callable[[str], None] = print,
    settings: Settings | None = None,
    redis_db: int = REDIS_DB,
    net: Any = None,
    **opts: Any,
) -> dict:
    """The live point (module docstring). ``settings``: a running Kafka + Redis (None: an
    isolated one is started and stopped); ``redis_db``: the logical database of its Redis
    the sweep owns (flushed first); ``net``: the model to score with (None: one of ``kind``
    trained on the ``train_hours`` before the cut-off, fresh features, the join's labels).
    ``opts``: any of ``DEFAULTS`` (``quick`` takes ``QUICK``'s values unless given), and
    ``cutoff_ms`` (the slice's start, on an hour boundary)."""
    unknown = set(opts) - set(DEFAULTS) - {"cutoff_ms"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **(QUICK if quick else {}), **opts}
    if settings is None:
        with isolated_stack(log=log) as s:
            return run(
                data,
                kind=kind,
                seed=seed,
                quick=quick,
                log=log,
                settings=s,
                redis_db=redis_db,
                net=net,
                **opts,
            )
    from ctrstream.kafka.clients import ensure_topics

    t_start = time.monotonic()
    sl = choose_slice(
        data, p["minutes"], p["lead_s"], p["max_reads"], p["at_fraction"], p.get("cutoff_ms")
    )
    log(
        f"live: slice of {p['minutes']:g} min from {sl.cutoff_ms} ({len(sl.records):,} records, "
        f"{len(sl.reads):,} reads, {sum(map(len, sl.probe_at.values())):,} probes) at "
        f"{p['compression']:g}x"
    )
    if net is None:
        window_ms = int(data.scenario.attribution_window_s * 1000)
        tr = data.rows_between(sl.cutoff_ms - int(p["train_hours"] * HOUR_MS), sl.cutoff_ms)
        tr = tr[data.t[tr] < sl.cutoff_ms - window_ms]  # labels final by the cut-off
        if len(tr) < 1000:
            raise ValueError(
                f"only {len(tr)} rows to train on before the cut-off: give more train_hours "
                "or a later cut-off (or pass net=)"
            )
        t0 = time.monotonic()
        net = fit(
            kind,
            data.sparse[tr],
            dense_at(data, tr),
            labels_within(data, window_ms, tr),
            data.t[tr],
            seed=seed,
        )
        log(f"live: {kind} model trained on {len(tr):,} rows in {time.monotonic() - t0:.1f} s")

    s = live_settings(settings, redis_db, f"live-{uuid.uuid4().hex[:8]}")
    ensure_topics(s, [s.topics.impressions, s.topics.clicks, s.topics.dlq])
    r = redis_client(s, timeout_s=60.0)
    try:
        r.flushdb()  # the sweep owns this logical database
        view = publish_view(s, data, sl)
    finally:
        r.close()
    log(f"live: batch view at the cut-off published ({view['keys_written']:,} keys)")
    job = FeaturesJob(s, p["flush_interval_ms"])
    try:
        reads = replay_and_read(s, data, sl, p["compression"], job, p["start_timeout_s"], log)
    finally:
        job.stop()
        _delete_topics(s, log)
    log(f"live: {len(sl.reads):,} reads in a {reads.replay_s:.1f} s replay")
    result = compare(data, sl, reads, net, p["compression"])
    result["params"] = {
        **{k: v for k, v in p.items() if k != "cutoff_ms"},
        "kind": kind,
        "seed": seed,
        "quick": quick,
        "cutoff_ms": sl.cutoff_ms,
        "end_ms": sl.end_ms,
        "records": len(sl.records),
        "reads": len(sl.reads),
        "probes": sum(map(len, sl.probe_at.values())),
        "flush_interval_ms": p["flush_interval_ms"] or settings.flush_interval_ms,
        "batch_view_keys": view["keys_written"],
        "warmup_s": round(reads.warmup_s, 2),
        "replay_s": round(reads.replay_s, 2),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    return result


def _delete_topics(settings: Settings, log: Callable[[str], None]) -> None:
    from ctrstream.kafka.clients import admin

    names = [settings.topics.impressions.name, settings.topics.clicks.name]
    names.append(settings.topics.dlq.name)
    try:
        client = admin(settings)  # kept alive until the futures are done
        for f in client.delete_topics(names, operation_timeout=30).values():
            f.result(30)
    except Exception as e:  # noqa: BLE001 - clean-up of throw-away topics, never fatal
        log(f"live: could not delete the sweep's topics: {e}")


def _pit_by_shard(
    data: StudyData, idx: np.ndarray, vis: np.ndarray, shards: np.ndarray
) -> np.ndarray:
    """Point-in-time counts of rows ``idx`` where entity ``k`` of row ``i`` counts the
    events visible until ``vis[i, shards[i, k]]`` (its shard's horizon)."""
    n, S = vis.shape
    q = data.impressions.take(pa.array(np.tile(idx, S)))
    t = data.t[idx]
    allc = point_in_time_counts(
        data.impressions,
        data.clicks,
        q,
        np.concatenate([np.minimum(vis[:, s], t) for s in range(S)]),
    )
    out = np.empty((n, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.float64)
    for s in range(S):
        part = allc[s * n : (s + 1) * n]
        m = shards == s
        out[m] = part[m]
    return out


def compare(data: StudyData, sl: Slice, live: LiveReads, net: Any, compression: float) -> dict:
    """The live reads against the point-in-time counts; NE of ``net`` on each (the
    sweep's dict without ``params``)."""
    idx = sl.reads
    n = len(idx)
    t = data.t[idx]
    q = data.impressions.take(pa.array(idx))
    shards = entity_shards({f: q.column(f).to_numpy() for f in _entity_fields()})
    # what a read sees of each shard: the batch view (every event before the cut-off) and
    # the speed view up to the shard's newest visible probe (speed-view events before the
    # cut-off are not read)
    T = sl.cutoff_ms
    seen = np.maximum(live.seen_ms + 1, T)
    seen_after = np.maximum(live.seen_after_ms + 1, T)
    unseen = np.maximum(live.unseen_ms, seen_after)  # before the oldest invisible probe
    lag_rs = t[:, None] - seen  # (read, shard)
    median_lag = int(np.median(lag_rs))
    pit = {
        "seen": _pit_by_shard(data, idx, seen, shards),
        # ... and just after the read (a flush may land during it)
        "seen_after": _pit_by_shard(data, idx, seen_after, shards),
        "unseen": _pit_by_shard(data, idx, unseen, shards),
    }
    one = {
        "fresh": t,  # lag 0: strictly earlier events (visible until t)
        "median": t - median_lag,  # the staleness curve's point: one lag for every row
        "batch": np.full(n, T),  # the batch view alone (no speed layer)
    }
    qq = data.impressions.take(pa.array(np.tile(idx, len(one))))
    vis = np.concatenate([np.minimum(v, t) for v in one.values()])
    pit_all = point_in_time_counts(data.impressions, data.clicks, qq, vis)
    pit |= {k: pit_all[j * n : (j + 1) * n] for j, k in enumerate(one)}
    got = live.counts.astype(np.float64)

    def row_eq(a: np.ndarray) -> np.ndarray:
        return (a == got).all(axis=(1, 2, 3))

    exact_fresh = row_eq(pit["fresh"])
    exact_seen = row_eq(pit["seen"]) | row_eq(pit["seen_after"])
    in_bracket = ((pit["seen"] <= got) & (got <= pit["unseen"])).all(axis=(1, 2, 3))
    # rows whose bracket holds no unobserved event of theirs: the live read has one right value
    tight = (pit["seen"] == pit["unseen"]).all(axis=(1, 2, 3))
    from_speed = ~row_eq(pit["batch"])  # rows whose live read holds speed-layer counts
    ent_fresh = (pit["fresh"] == got).all(axis=(2, 3)).mean()
    ent_seen = (pit["seen"] == got).all(axis=(2, 3)).mean()
    y = data.clicked[idx]
    sparse = data.sparse[idx]
    preds = {
        "live": predict(net, sparse, F.dense_from_counts(got)),
        "pit_measured": predict(net, sparse, F.dense_from_counts(pit["seen"])),
        "pit_median_lag": predict(net, sparse, F.dense_from_counts(pit["median"])),
        "pit_fresh": predict(net, sparse, F.dense_from_counts(pit["fresh"])),
    }
    matches = {
        "live": 1.0,
        "pit_measured": float(exact_seen.mean()),
        "pit_median_lag": float(row_eq(pit["median"]).mean()),
        "pit_fresh": float(exact_fresh.mean()),
    }
    lags = {
        "live": median_lag,
        "pit_measured": median_lag,
        "pit_median_lag": median_lag,
        "pit_fresh": 0,
    }
    rows = []
    for name, pr in preds.items():
        qd = quality(pr, data, idx)
        diff, lo, hi = bootstrap_ne_diff(pr, preds["live"], y)
        rows.append(
            {
                "features": name,
                "lag_s": lags[name] / 1000,
                "rows_equal_to_live": matches[name],
                **qd,
                "ne_minus_live": diff,
                "ne_minus_live_lo": lo,
                "ne_minus_live_hi": hi,
            }
        )
    wall = lag_rs / 1000 / compression
    headline = {
        "measured_lag_s_p50": median_lag / 1000,
        "measured_lag_s_p90": float(np.percentile(lag_rs, 90)) / 1000,
        "measured_lag_s_max": float(lag_rs.max()) / 1000,
        "measured_wall_freshness_ms_p50": float(np.median(wall) * 1000),
        "measured_wall_freshness_ms_p90": float(np.percentile(wall, 90) * 1000),
        "share_equal_at_measured_lag": float(exact_seen.mean()),
        "share_within_bracket": float(in_bracket.mean()),
        "share_unambiguous": float(tight.mean()),
        "share_equal_when_unambiguous": float(exact_seen[tight].mean()) if tight.any() else None,
        "share_equal_at_lag_0": float(exact_fresh.mean()),
        "share_with_speed_layer_counts": float(from_speed.mean()),
        "entity_share_equal_at_measured_lag": float(ent_seen),
        "entity_share_equal_at_lag_0": float(ent_fresh),
        "ne_live": rows[0]["ne"],
        "ne_pit_measured": rows[1]["ne"],
        "ne_pit_median_lag": rows[2]["ne"],
        "ne_pit_fresh": rows[3]["ne"],
        "oracle_ne": rows[0]["oracle_ne"],
        "read_ms_p50": float(np.median(live.read_ms)),
        "read_ms_p99": float(np.percentile(live.read_ms, 99)),
        "replay_behind_s_p99": float(np.percentile(live.behind_s, 99)),
    }
    # tolerances: a shard's flush can catch its source partitions a few events apart (Kafka
    # partitions are read independently), which no probe of another partition sees
    checks = {
        "live_equals_pit_when_unambiguous": (headline["share_equal_when_unambiguous"] or 0) >= 0.9,
        "live_within_probe_bracket": headline["share_within_bracket"] >= 0.9,
        "live_equals_pit_at_measured_lag": headline["share_equal_at_measured_lag"] >= 0.8,
        "lag_matters": headline["share_equal_at_lag_0"] < headline["share_equal_at_measured_lag"],
    }
    return {
        "sweep": SWEEP,
        "params": {},
        "rows": rows,
        "headline": headline,
        "checks": checks,
        "lag_ms": lag_rs.tolist(),  # per read, per shard of the speed layer
        "t_ms": t.tolist(),
    }


def plot(result: dict, path: Path) -> Path:
    """Left: each read's measured lag over the slice (event seconds). Right: the NE of one
    model on the live features and on the point-in-time ones (oracle dashed)."""
    from ctrstream.plots import pyplot, save

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t = np.asarray(result["t_ms"], dtype=np.float64)
    lag = np.asarray(result["lag_ms"], dtype=np.float64) / 1000
    for j in range(lag.shape[1]):
        a.plot((t - t[0]) / 1000, lag[:, j], ".", ms=2, label=f"shard {j}")
    h = result["headline"]
    a.axhline(h["measured_lag_s_p50"], color="k", lw=0.8, ls="--", label="median")
    a.set_xlabel("event time into the slice (s)")
    a.set_ylabel("measured lag (event s)")
    a.set_title(
        f"speed layer freshness at {result['params'].get('compression', '?')}x "
        f"(wall p50 {h['measured_wall_freshness_ms_p50']:.0f} ms)"
    )
    a.legend(fontsize=8)
    rows = result["rows"]
    names = [r["features"] for r in rows]
    b.bar(names, [r["ne"] for r in rows])
    b.axhline(rows[0]["oracle_ne"], color="k", ls="--", lw=0.8, label="oracle")
    lo = min(min(r["ne"] for r in rows), rows[0]["oracle_ne"])
    hi = max(r["ne"] for r in rows)
    b.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    b.set_ylabel("NE (same rows)")
    b.set_title(
        f"equal to live: {h['share_equal_at_measured_lag']:.1%} at measured lag, "
        f"{h['share_equal_at_lag_0']:.1%} at lag 0",
        fontsize=9,
    )
    b.legend(fontsize=8)
    return save(fig, path)


__all__ = [
    "DEFAULTS",
    "QUICK",
    "REDIS_DB",
    "FeaturesJob",
    "LiveReads",
    "Slice",
    "choose_slice",
    "compare",
    "isolated_stack",
    "live_settings",
    "plot",
    "publish_view",
    "replay_and_read",
    "run",
    "start_stack",
    "stop_stack",
]
