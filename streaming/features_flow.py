"""The speed layer's ``features`` dataflow: Kafka -> per-entity bucket counts -> Redis.

Run it with ``ctrstream speed features`` (or ``python -m bytewax.run
"ctrstream.streaming.features_flow:get_flow()" -r DIR -s SECS -b 0``). Everything it counts comes
from :mod:`ctrstream.features` (entities, resolutions); how the counts lie in Redis (keys,
fields, TTLs) is :mod:`ctrstream.store.speed_view`'s.

Design
------
**Source = one Bytewax partition per Kafka topic-partition** (``impressions:0`` ...
``clicks:3``, :class:`KafkaEventsSource`). Each partition reads micro-batches
(``consume(num_messages=N)``) at an offset kept in its Bytewax snapshot and does, per batch
and vectorized where it matters:

1. **decode** with the shared strict codec (one msgspec call for the whole batch; on any
   failure - whatever exception a record's bytes raise - the batch falls back to
   record-by-record decoding so every bad record gets its exact ``DecodeError.reason``).
   Failures go to ``dlq`` (stage ``decode``), and so does an event whose Kafka key is not
   its impression id or that is not in its key's murmur2 partition (stage ``key``: the key
   contract of :mod:`ctrstream.events`, which keeps every copy of an event in one partition
   for step 3).
2. **watermark, future and lateness, per Kafka partition**: ``watermark = max event time
   seen in this partition - allowed_lateness``. An event more than ``max_event_ahead_s``
   ahead of the max event time before it is a dead letter (stage ``future``) and does not
   move it (a partition's first event is bounded by the other partitions of this process
   and, live, by the wall clock; a real gap larger than the bound is announced by a
   heartbeat). An event older than the watermark *before it* is
   late -> ``dlq`` (reason ``late: ...``, stage ``lateness``). Because it depends only on
   the order of records inside one partition (and on in-band signed heartbeats, see
   :mod:`ctrstream.kafka.heartbeats`; a rejected one moves nothing and goes to ``dlq``, stage
   ``control``), the decision is the same on every replay: this is what makes the Redis
   result identical after a crash (the first-event bound is the exception: it is taken
   once, and a snapshot keeps its outcome).
3. **dedup**: impressions by ``impression_id``, clicks by ``click_id``. Both topics are keyed
   by impression id, so all copies of an event are in the same partition, in order; the
   partition keeps the set of ids whose event time is still at or after its watermark
   (bounded: ``allowed_lateness`` x rate), indexed by coarse time slots and evicted when the
   watermark passes them. A copy of an evicted id is older than the watermark, so it is late
   anyway: no event is ever counted twice.
4. **shuffle by entity shard**: for every entity in ``features.ENTITIES`` the entity id is
   packed into one int64 (crossed ids: 31 bits per part) and hashed to one of ``N_SHARDS``
   shards; the partition emits one item per shard carrying numpy arrays (entity, id, event
   time) plus its watermark.

**Shards** (:class:`ShardLogic`, ``stateful_batch`` keyed by shard) hold one table per
``(entity, resolution, bucket)`` (sorted int64 ids with impression/click counts, numpy
``searchsorted`` merges) and a dirty mask. Every ``flush_interval_ms`` they hand the
changed cells (absolute values; ids unpacked into their parts; whether it is the cell's first
write) to the speed view's writer (:class:`FeatureWriter` ->
:class:`ctrstream.store.speed_view.SpeedViewWriter`), which renders them with numpy into one
pipeline of native commands - one per changed entity id and event day, plus a TTL renewal
when a day gets a new bucket of the longest-lived resolution - and sends it from a writer
thread while the job goes on. A bucket is **closed** when the global
watermark (minimum over all Kafka partitions) passes its end: it gets its final write and
its table is freed. No accepted event can fall into a closed bucket: an accepted event is
at or after its partition's watermark, which is at or after the global one.

**Exactly-once effect on Redis**: offsets, dedup sets and tables are in the same Bytewax
snapshot; after ``kill -9`` the job restarts from the last snapshot, re-reads the same
records, takes the same decisions and re-writes the same absolute values. Each shard's
snapshot first waits until Redis has acknowledged every write queued before it, so a
snapshot never marks as written a cell that Redis has not got. (The ``dlq``
topic is at-least-once: a replay may repeat dead letters written after the snapshot.)

**Redis going away** does not stop the job: the writer sends a flush again with back-off
until Redis takes it (the job waits, the backlog stays in Kafka), and when Redis comes back
without writes it had acknowledged, every shard re-writes its open cells from its state and
reports the closed buckets it can no longer re-write (:class:`FeatureWriter`,
``ShardLogic._check_loss``; docs/faults.md).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from ctrstream import events as E
from ctrstream import features as F
from ctrstream.config import Settings, get_settings
from ctrstream.kafka import heartbeats as HB
from ctrstream.kafka.deadletters import DlqWriter, dead_letter
from ctrstream.kafka.heartbeats import NO_TIME
from ctrstream.kafka.partition import PartitionReader
from ctrstream.stack.stopping import stop_on_signals, stop_requested
from ctrstream.store.resp import Backoff
from ctrstream.store.speed_view import SpeedCells, SpeedViewWriter, WriterLoss
from ctrstream.streaming import speed_metrics as M

log = logging.getLogger("ctrstream.speed.features")

FLOW = "features"
KINDS = ("impressions", "clicks")
# Shards of the per-entity state: the unit of parallelism across workers (at most N_SHARDS
# workers share the work) and of per-flush numpy overhead (each shard pays it): 4 measured
# 1.3x faster than 16 with one worker (300k events). Fixed for the life of a recovery
# directory (shard keys are in the snapshots): `ctrstream speed` records it there and
# refuses a different value.
N_SHARDS = int(os.environ.get("CTRSTREAM_SPEED_SHARDS", "4"))
BATCH = int(os.environ.get("CTRSTREAM_SPEED_BATCH", "20000"))
EMPTY_POLL = timedelta(milliseconds=5)
# how often an idle shard wakes to see whether Redis lost writes (FeatureWriter.losses)
LOSS_CHECK = timedelta(seconds=1)

ENTITY_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(f for e in F.ENTITIES for f in e.fields))
INT_FIELDS: tuple[str, ...] = ("schema_version", "event_time_ms") + ENTITY_FIELDS
_COL = {f: i for i, f in enumerate(INT_FIELDS)}
_SUPPORTED = np.array(sorted(E.SUPPORTED_VERSIONS), dtype=np.int64)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _pack_bits(n_fields: int) -> int:
    return 63 // n_fields if n_fields > 1 else 64


# --------------------------------------------------------------------------- decoding


class Codec:
    """Decodes a micro-batch of one topic into an int64 column matrix + ids.

    Any failure of a record's bytes is that record's dead letter, never the batch's: the
    one msgspec call for the whole batch falls back to record-by-record decoding on ANY
    exception, and the per-record codec turns whatever the bytes raise into a
    ``DecodeError``. A decoded event whose Kafka key is not its impression id is a dead
    letter too (stage ``key``, :func:`ctrstream.events.key_error`)."""

    def __init__(self, kind: str):
        struct = E.Impression if kind == "impressions" else E.Click
        self.list_decoder = msgspec.json.Decoder(list[struct])  # type: ignore[valid-type]  # a type chosen at run time: msgspec builds the decoder from it
        self.one = E.decode_impression if kind == "impressions" else E.decode_click
        self.cols = operator.attrgetter(*INT_FIELDS)
        self.id_of = operator.attrgetter("impression_id" if kind == "impressions" else "click_id")
        self.iid_of = operator.attrgetter("impression_id")

    def decode(
        self, values: list, keys: list
    ) -> tuple[np.ndarray, list[str], np.ndarray, list[tuple[int, str, str]]]:
        """Returns (rows[n_ok, len(INT_FIELDS)], ids[n_ok], ok_index[n_ok],
        errors[(index, reason, stage)])."""
        n = len(values)
        evs = None
        if n and None not in values and max(map(len, values)) <= E.MAX_EVENT_BYTES:
            try:
                evs = self.list_decoder.decode(b"[" + b",".join(values) + b"]")
                if len(evs) != n:
                    evs = None
            except Exception:  # noqa: BLE001 - any failure: record by record, each its reason
                evs = None
        if evs is not None:
            try:
                rows = np.array(list(map(self.cols, evs)), dtype=np.int64).reshape(
                    n, len(INT_FIELDS)
                )
            except (OverflowError, ValueError, TypeError):
                evs = None
        if evs is None:
            return self._slow(values, keys)
        ok = np.ones(n, dtype=bool)
        errors: list[tuple[int, str, str]] = []
        ids = list(map(self.id_of, evs))
        iids = ids if self.id_of == self.iid_of else list(map(self.iid_of, evs))
        t = rows[:, 1]
        bad = ~np.isin(rows[:, 0], _SUPPORTED) | (t <= 0) | (t >= E.MAX_EVENT_TIME_MS)
        if "" in ids or "" in iids:
            bad |= np.array([not a or not b for a, b in zip(ids, iids)], dtype=bool)
        if bad.any():
            for i in np.flatnonzero(bad).tolist():
                try:
                    self.one(values[i])
                except E.DecodeError as e:
                    errors.append((i, e.reason, "decode"))
                    ok[i] = False
        want = list(map(str.encode, iids))
        if keys != want:  # one comparison in C when every key keeps the contract
            for i, (k, w) in enumerate(zip(keys, want)):
                if k != w and ok[i]:
                    errors.append((i, E.key_error(k, evs[i]) or "wrong key", "key"))
                    ok[i] = False
        idx = np.flatnonzero(ok)
        if len(idx) != n:
            rows = rows[idx]
            ids = [ids[i] for i in idx.tolist()]
        return rows, ids, idx, errors

    def _slow(self, values: list, keys: list):
        rows, ids, idx, errors = [], [], [], []
        for i, v in enumerate(values):
            try:
                ev = self.one(v)
                row = self.cols(ev)
                np.array(row, dtype=np.int64)  # range check
            except E.DecodeError as e:
                errors.append((i, e.reason, "decode"))
                continue
            except OverflowError:
                errors.append((i, "invalid: an integer field does not fit in int64", "decode"))
                continue
            reason = E.key_error(keys[i], ev)
            if reason is not None:
                errors.append((i, reason, "key"))
                continue
            rows.append(row)
            ids.append(self.id_of(ev))
            idx.append(i)
        arr = np.array(rows, dtype=np.int64).reshape(len(rows), len(INT_FIELDS))
        return arr, ids, np.array(idx, dtype=np.int64), errors


_M32 = np.uint64(0xFFFFFFFF)
_MURMUR_M = np.uint64(0x5BD1E995)


def murmur2_partitions(keys: list[bytes], n_partitions: int) -> np.ndarray:
    """``events.partition_for`` of many keys at once: Kafka's murmur2, vectorized over the
    keys of each length (uint64 arithmetic masked to 32 bits)."""
    out = np.empty(len(keys), np.int64)
    lens = np.fromiter(map(len, keys), np.int64, len(keys))
    for length in np.unique(lens).tolist():
        idx = np.flatnonzero(lens == length)
        buf = np.frombuffer(b"".join([keys[i] for i in idx.tolist()]), np.uint8)
        buf = buf.reshape(len(idx), length)
        h = np.full(len(idx), (0x9747B28C ^ length) & 0xFFFFFFFF, np.uint64)
        n4 = length // 4
        if n4:
            words = np.ascontiguousarray(buf[:, : 4 * n4]).view("<u4").astype(np.uint64)
            for i in range(n4):
                k = (words[:, i] * _MURMUR_M) & _M32
                k ^= k >> np.uint64(24)
                k = (k * _MURMUR_M) & _M32
                h = ((h * _MURMUR_M) & _M32) ^ k
        tail = buf[:, 4 * n4 :].astype(np.uint64)
        if tail.shape[1] == 3:
            h ^= tail[:, 2] << np.uint64(16)
        if tail.shape[1] >= 2:
            h ^= tail[:, 1] << np.uint64(8)
        if tail.shape[1]:
            h ^= tail[:, 0]
            h = (h * _MURMUR_M) & _M32
        h ^= h >> np.uint64(13)
        h = (h * _MURMUR_M) & _M32
        h ^= h >> np.uint64(15)
        out[idx] = ((h & np.uint64(0x7FFFFFFF)) % np.uint64(n_partitions)).astype(np.int64)
    return out


def id_range_errors(rows: np.ndarray) -> list[tuple[int, str]]:
    """Rows whose entity ids cannot be packed into the speed layer's int64 keys."""
    errors = []
    for ent in F.ENTITIES:
        if len(ent.fields) == 1:
            continue
        lim = 1 << _pack_bits(len(ent.fields))
        for f in ent.fields:
            col = rows[:, _COL[f]]
            for i in np.flatnonzero((col < 0) | (col >= lim)).tolist():
                errors.append(
                    (
                        i,
                        f"invalid: {f}={int(col[i])} outside [0, 2^{_pack_bits(len(ent.fields))}) "
                        f"required by the speed layer for entity {ent.name}",
                    )
                )
    return errors


def pack_ids(rows: np.ndarray, ent: F.Entity) -> np.ndarray:
    if len(ent.fields) == 1:
        return rows[:, _COL[ent.fields[0]]].copy()
    bits = _pack_bits(len(ent.fields))
    out = np.zeros(len(rows), dtype=np.int64)
    for f in ent.fields:
        out = (out << bits) | rows[:, _COL[f]]
    return out


def unpack_parts(eids: np.ndarray, ent: F.Entity) -> list[np.ndarray]:
    """The id columns of packed ids (one array per field of the entity)."""
    if len(ent.fields) == 1:
        return [eids]
    bits = _pack_bits(len(ent.fields))
    mask = (1 << bits) - 1
    return [(eids >> (bits * (len(ent.fields) - 1 - k))) & mask for k in range(len(ent.fields))]


def unpack_ids(eids: np.ndarray, ent: F.Entity) -> list[str]:
    """The ``features.entity_id`` strings of packed ids."""
    parts = [p.tolist() for p in unpack_parts(eids, ent)]
    if len(parts) == 1:
        return list(map(str, parts[0]))
    return [":".join(map(str, p)) for p in zip(*parts)]


def shard_of(eids: np.ndarray, ent_idx: int, n_shards: int) -> np.ndarray:
    h = eids.astype(np.uint64) ^ np.uint64((ent_idx + 1) * 0x5851F42D4C957F2D & (2**64 - 1))
    with np.errstate(over="ignore"):
        h = (h * _GOLDEN) >> np.uint64(40)
    return (h % np.uint64(n_shards)).astype(np.int64)


def group_order(eid: np.ndarray, major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """An order of the rows sorted by ``(major, minor, eid)`` (rows with equal keys in any
    order). ``major`` and ``minor`` take few distinct values (entity index, bucket or day),
    so they are combined into one small integer that a stable radix sort orders in linear
    time after one unstable sort of ``eid``: 5x faster than ``np.lexsort`` of the three
    (measured on 40,000 rows), which was the features job's largest single cost."""
    if len(eid) == 0:
        return np.zeros(0, np.int64)
    lo = int(minor.min())
    span = int(minor.max()) - lo + 1
    g = major.astype(np.int64) * span + (minor - lo)
    if int(g.max()) < (1 << 15):
        g = g.astype(np.int16)  # numpy sorts 16-bit integers with a radix sort
    first = np.argsort(eid)
    return first[np.argsort(g[first], kind="stable")]


# --------------------------------------------------------------------------- source


@dataclass
class Delta:
    """What one source partition sends one shard for one micro-batch."""

    part: int  # global index of the Kafka partition
    wm: int  # that partition's watermark after this batch
    etype: int  # 0 impressions, 1 clicks
    ent: np.ndarray  # int8 entity index
    eid: np.ndarray  # int64 packed entity id
    t: np.ndarray  # int64 event time
    ts_first: int  # Kafka timestamp of the batch's first and last record
    ts_last: int


class _EventsPartition(StatefulSourcePartition):
    def __init__(
        self, cfg: FlowConfig, kind: str, partition: int, part_idx: int, state: dict | None
    ):
        s = cfg.settings
        state = state or {}
        self.cfg, self.kind, self.partition, self.part_idx = cfg, kind, partition, part_idx
        self.topic = getattr(s.topics, kind).name
        self.n_partitions = getattr(s.topics, kind).partitions
        self.etype = F.EVENT_TYPES.index("i" if kind == "impressions" else "c")
        self.codec = Codec(kind)
        self.reader = PartitionReader(
            s, self.topic, partition, state.get("offset"), group=f"ctrstream-speed-{FLOW}"
        )
        self.max_t = state.get("max_t", NO_TIME)
        if self.max_t != NO_TIME:
            cfg.part_max[part_idx] = self.max_t
        self.slots: dict[int, list[str]] = {g: list(v) for g, v in state.get("slots", {}).items()}
        self.seen: set[str] = set().union(*self.slots.values()) if self.slots else set()
        self.awake: datetime | None = None
        self.lateness = cfg.lateness_ms
        self.ahead = int(s.max_event_ahead_s * 1000)
        self.slot_ms = max(1000, self.lateness // 4)
        self.dlq = cfg.dlq_writer()
        self.end = self.reader.high_watermark() if cfg.stop_at_end else None
        self.started = False
        lbl = (FLOW, self.topic)
        self.m_in, self.m_ok, self.m_dup, self.m_late = (
            M.EVENTS_IN.labels(*lbl),
            M.ACCEPTED.labels(*lbl),
            M.DUPLICATES.labels(*lbl),
            M.LATE.labels(*lbl),
        )
        self.m_dlq_late = M.DLQ.labels(FLOW, self.topic, "lateness")
        self.m_control = {o: M.CONTROL.labels(FLOW, self.topic, o) for o in HB.OUTCOMES}
        self.secret = cfg.control_secret()
        self.m_lag = M.LAG.labels(FLOW, self.topic, str(partition))
        self.m_wm = M.WATERMARK.labels(FLOW, self.topic, str(partition))
        self.last_gauge = 0.0

    def next_awake(self):
        return self.awake

    def snapshot(self) -> dict:
        return {
            "offset": self.reader.checkpoint(),  # also committed to the group, for lag tools
            "max_t": self.max_t,
            "slots": {g: list(v) for g, v in self.slots.items()},
        }

    def close(self):
        self.reader.close()
        self.dlq.flush()

    def _at_end(self) -> bool:
        return self.end is not None and (self.reader.next_offset or 0) >= self.end

    def next_batch(self):
        if self._at_end() or stop_requested():  # SIGTERM: end here, the final snapshot follows
            self.dlq.flush()
            raise StopIteration
        msgs = self.reader.poll(BATCH)
        now = time.monotonic()
        if now - self.last_gauge > 1.0:
            self.last_gauge = now
            lag = self.reader.lag()
            if lag is not None:
                self.m_lag.set(lag)
        if not msgs:
            self.awake = datetime.now(UTC) + EMPTY_POLL
            return []
        self.awake = None
        if not self.started and self.cfg.stop_at_end:
            self.started = True
            # one write per line: the worker threads of `-w N` share stdout, and print()
            # writes the text and its newline separately (the bench parses these lines)
            sys.stdout.write(
                json.dumps(
                    {
                        "speed": "source_start",
                        "part": f"{self.kind}:{self.partition}",
                        "t": time.time(),
                    }
                )
                + "\n"
            )
            sys.stdout.flush()
        return self.process(msgs)

    # -- the per-batch work (vectorized) --
    def _dead(self, msg, reason: str, stage: str) -> E.DeadLetter:
        return dead_letter(
            reason,
            self.topic,
            self.partition,
            msg.offset(),
            msg.value(),
            stage,
            key=msg.key(),
            job=FLOW,
        )

    def first_limit(self) -> int | None:
        """The latest event time a partition's first event may have (see
        ``Settings.max_event_ahead_s``): ahead of the other partitions' watermarks in this
        process and, in a live stream, of the wall clock; None when neither is known."""
        limits = []
        others = [t for k, t in self.cfg.part_max.items() if k != self.part_idx and t != NO_TIME]
        if others:
            limits.append(max(others) + self.ahead)
        if not self.cfg.stop_at_end:
            limits.append(int(time.time() * 1000) + self.ahead)
        return min(limits) if limits else None

    def future_mask(self, t_all: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Which candidate events are further ahead of their partition's watermark (the max
        event time before them, heartbeats included) than the bound. Such an event does not
        move the watermark, so the check is sequential: the first one past the bound is
        taken out and the running maximum recomputed (one pass per future event)."""
        fut = np.zeros(len(t_all), dtype=bool)
        if not len(t_all):
            return fut
        first = self.first_limit() if self.max_t == NO_TIME else None
        no_limit = np.iinfo(np.int64).max
        t = t_all.copy()
        while True:
            prev = np.maximum.accumulate(np.concatenate(([self.max_t], t)))[:-1]
            limit = np.where(
                prev == NO_TIME, no_limit if first is None else first, prev + self.ahead
            )
            over = cand & ~fut & (t > limit)
            if not over.any():
                return fut
            i = int(np.argmax(over))
            fut[i] = True
            t[i] = NO_TIME

    # -- the per-batch work (vectorized) --
    def process(self, msgs: list) -> list:
        n = len(msgs)
        self.m_in.inc(n)
        values = [m.value() for m in msgs]
        t_all = np.full(n, NO_TIME, dtype=np.int64)
        dead: list[E.DeadLetter] = []
        by_stage: dict[str, int] = {}
        keys = [m.key() for m in msgs]
        # Control records (heartbeats) never decode as events, so they are looked for among
        # the records the codec rejects: the common batch without one pays nothing.
        rows, ids, ok, errors = self.codec.decode(values, keys)
        ok = ok.astype(np.int64)
        beats: list[int] = []  # genuine heartbeats, checked for replay once max_t is known
        for gi, reason, stage in errors:
            m = msgs[gi]
            if stage == "decode" and HB.is_control(keys[gi], m.headers()):
                v = HB.verify(self.secret, self.topic, self.partition, values[gi], m.headers())
                if v.time is not None:
                    t_all[gi] = v.time
                    beats.append(gi)
                    continue
                self.m_control[v.outcome].inc()
                reason, stage = v.reason, "control"
            dead.append(self._dead(m, reason, stage))
            by_stage[stage] = by_stage.get(stage, 0) + 1
        # events not in their key's partition (a foreign partitioner): the contract of
        # ctrstream.events, without which copies of an event would escape deduplication
        if len(ok):
            okeys = [keys[i] for i in ok.tolist()]
            wrong = murmur2_partitions(okeys, self.n_partitions) != self.partition
            if wrong.any():
                for j in np.flatnonzero(wrong).tolist():
                    gi = int(ok[j])
                    why = E.partition_error(okeys[j], self.partition, self.n_partitions)
                    dead.append(self._dead(msgs[gi], why or "wrong partition", "key"))
                by_stage["key"] = by_stage.get("key", 0) + int(wrong.sum())
                keep = np.flatnonzero(~wrong)
                rows, ok = rows[keep], ok[keep]
                ids = [ids[i] for i in keep.tolist()]
        # entity ids the speed layer cannot key
        rng = id_range_errors(rows) if len(rows) else []
        if rng:
            drop = np.zeros(len(rows), dtype=bool)
            for i, reason in rng:
                if not drop[i]:
                    drop[i] = True
                    dead.append(self._dead(msgs[int(ok[i])], reason, "decode"))
                    by_stage["decode"] = by_stage.get("decode", 0) + 1
            keep = np.flatnonzero(~drop)
            rows, ok = rows[keep], ok[keep]
            ids = [ids[i] for i in keep.tolist()]
        t_all[ok] = rows[:, 1]
        # events too far ahead of the watermark: dead letters that do not move it
        cand = np.zeros(n, dtype=bool)
        cand[ok] = True
        fut_all = self.future_mask(t_all, cand)
        if fut_all.any():
            for gi in np.flatnonzero(fut_all).tolist():
                dead.append(
                    self._dead(
                        msgs[gi],
                        f"future: event_time_ms {int(t_all[gi])} is more than "
                        f"{self.ahead} ms ahead of the watermark of "
                        f"{self.topic}[{self.partition}] (max_event_ahead_s; a real gap in "
                        "event time is announced by a watermark heartbeat)",
                        "future",
                    )
                )
            by_stage["future"] = by_stage.get("future", 0) + int(fut_all.sum())
            t_all[fut_all] = NO_TIME
            keep = np.flatnonzero(~fut_all[ok])
            rows, ok = rows[keep], ok[keep]
            ids = [ids[i] for i in keep.tolist()]
        # lateness against this partition's watermark (max event time before the record)
        cm = np.maximum.accumulate(np.concatenate(([self.max_t], t_all)))
        prev_max = cm[:-1]
        self.max_t = int(cm[-1])
        self.cfg.part_max[self.part_idx] = self.max_t
        for gi in beats:
            if t_all[gi] > prev_max[gi]:
                self.m_control["accepted"].inc()
                continue
            self.m_control["replayed"].inc()
            reason = HB.replayed_reason(
                int(t_all[gi]), int(prev_max[gi]), self.topic, self.partition
            )
            dead.append(self._dead(msgs[gi], reason, "control"))
            by_stage["control"] = by_stage.get("control", 0) + 1
        late_all = t_all < prev_max - self.lateness
        late = late_all[ok]
        if late.any():
            for j in np.flatnonzero(late).tolist():
                gi = int(ok[j])
                wm = int(prev_max[gi]) - self.lateness
                dead.append(
                    self._dead(
                        msgs[gi],
                        f"late: event_time_ms {int(t_all[gi])} is {wm - int(t_all[gi])} ms behind the "
                        f"watermark {wm} of {self.topic}[{self.partition}] (allowed lateness "
                        f"{self.lateness} ms)",
                        "lateness",
                    )
                )
            keep = np.flatnonzero(~late)
            rows, ok = rows[keep], ok[keep]
            ids = [ids[i] for i in keep.tolist()]
        n_late = int(late.sum())
        # dedup (first copy wins), then remember the new ids by time slot
        seen = self.seen
        dup: np.ndarray = (
            np.array([x in seen or seen.add(x) for x in ids], dtype=bool)  # type: ignore[func-returns-value]  # set.add inside `or`: each id tested and remembered in one pass
            if ids
            else np.zeros(0, bool)
        )
        n_dup = int(dup.sum())
        new = np.flatnonzero(~dup)
        if n_dup:
            rows = rows[new]
            ids = [ids[i] for i in new.tolist()]
        if ids:
            slot = rows[:, 1] // self.slot_ms
            order = np.argsort(slot, kind="stable")
            us, starts = np.unique(slot[order], return_index=True)
            bounds = np.append(starts, len(order))
            olist = order.tolist()
            for k, g in enumerate(us.tolist()):
                self.slots.setdefault(g, []).extend(
                    ids[i] for i in olist[bounds[k] : bounds[k + 1]]
                )
        wm = self.max_t - self.lateness if self.max_t != NO_TIME else NO_TIME
        for g in [g for g in self.slots if (g + 1) * self.slot_ms <= wm]:
            seen.difference_update(self.slots.pop(g))
        # metrics + dead letters
        self.m_ok.inc(len(rows))
        if n_dup:
            self.m_dup.inc(n_dup)
        for stage, k in by_stage.items():
            M.DLQ.labels(FLOW, self.topic, stage).inc(k)
        if n_late:
            self.m_late.inc(n_late)
            self.m_dlq_late.inc(n_late)
        if wm != NO_TIME:
            self.m_wm.set(wm)
        if dead:
            self.dlq.write(dead)
        return self.to_shards(rows, wm, msgs[0].timestamp()[1], msgs[-1].timestamp()[1])

    def to_shards(self, rows: np.ndarray, wm: int, ts_first: int, ts_last: int) -> list:
        S = self.cfg.n_shards
        if len(rows):
            ents, eids, ts, shards = [], [], [], []
            t = rows[:, 1]
            for k, ent in enumerate(F.ENTITIES):
                e = pack_ids(rows, ent)
                eids.append(e)
                ents.append(np.full(len(rows), k, dtype=np.int8))
                ts.append(t)
                shards.append(shard_of(e, k, S))
            sh = np.concatenate(shards)
            order = np.argsort(sh, kind="stable")
            ent_a, eid_a, t_a = (
                np.concatenate(ents)[order],
                np.concatenate(eids)[order],
                np.concatenate(ts)[order],
            )
            bounds = np.searchsorted(sh[order], np.arange(S + 1))
        else:
            ent_a = np.zeros(0, np.int8)
            eid_a = t_a = np.zeros(0, np.int64)
            bounds = np.zeros(S + 1, dtype=np.int64)
        out = []
        for s in range(S):
            a, b = int(bounds[s]), int(bounds[s + 1])
            out.append(
                (
                    shard_key(s),
                    Delta(
                        self.part_idx,
                        wm,
                        self.etype,
                        ent_a[a:b],
                        eid_a[a:b],
                        t_a[a:b],
                        ts_first,
                        ts_last,
                    ),
                )
            )
        return out


def shard_key(s: int) -> str:
    return f"shard{s:02d}"


class KafkaEventsSource(FixedPartitionedSource):
    """Both event topics, one Bytewax partition per Kafka topic-partition."""

    def __init__(self, cfg: FlowConfig):
        self.cfg = cfg
        self.parts = cfg.parts

    def list_parts(self):
        return list(self.parts)

    def build_part(self, step_id, for_part, resume_state):
        M.serve(self.cfg.settings.metrics_port, self.cfg.settings.metrics_host)
        kind, p = for_part.split(":")
        return _EventsPartition(self.cfg, kind, int(p), self.parts.index(for_part), resume_state)


# --------------------------------------------------------------------------- shards


class Table:
    """Counts of one (entity, resolution, bucket): sorted packed ids -> [imps, clicks]."""

    __slots__ = ("keys", "cnt", "dirty", "new", "pend")

    def __init__(self):
        self.keys = np.zeros(0, np.int64)
        self.cnt = np.zeros((0, 2), np.int64)
        self.dirty = np.zeros(0, bool)
        self.new = np.zeros(0, bool)  # never written to Redis by this table yet
        self.pend: list[tuple[int, np.ndarray, np.ndarray]] = []

    def add(self, etype: int, u: np.ndarray, c: np.ndarray) -> None:
        keys = self.keys
        if len(keys):
            pos = np.searchsorted(keys, u)
            found = pos < len(keys)
            found[found] = keys[pos[found]] == u[found]
            if found.any():
                p = pos[found]
                self.cnt[p, etype] += c[found]
                self.dirty[p] = True
            if not found.all():
                self.pend.append((etype, u[~found], c[~found]))
        else:
            self.pend.append((etype, u, c))

    def compact(self) -> None:
        if not self.pend:
            return
        u = np.concatenate([p[1] for p in self.pend])
        c = np.concatenate([p[2] for p in self.pend])
        et = np.concatenate([np.full(len(p[1]), p[0], np.int8) for p in self.pend])
        self.pend = []
        uk, inv = np.unique(u, return_inverse=True)
        add = np.zeros((len(uk), 2), np.int64)
        np.add.at(add, (inv, et), c)
        pos = np.searchsorted(self.keys, uk)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == uk[found]
        if found.any():  # ids that arrived in two batches before one compaction
            self.cnt[pos[found]] += add[found]
            self.dirty[pos[found]] = True
        nf = np.flatnonzero(~found)
        if not len(nf):
            return
        # merge the new ids into the sorted arrays: one position mask for all four (np.insert
        # per array recomputed it four times)
        n = len(self.keys) + len(nf)
        is_new = np.zeros(n, bool)
        is_new[pos[nf] + np.arange(len(nf))] = True
        old = ~is_new
        keys = np.empty(n, np.int64)
        keys[old], keys[is_new] = self.keys, uk[nf]
        cnt = np.empty((n, 2), np.int64)
        cnt[old], cnt[is_new] = self.cnt, add[nf]
        dirty = is_new.copy()
        dirty[old] = self.dirty
        new = is_new.copy()
        new[old] = self.new
        self.keys, self.cnt, self.dirty, self.new = keys, cnt, dirty, new

    def __len__(self):
        return len(self.keys)

    def __getstate__(self):
        self.compact()
        return (self.keys, self.cnt, self.dirty)

    def __setstate__(self, st):
        self.keys, self.cnt, self.dirty = st
        self.new = np.ones(len(self.keys), bool)  # restored: renew TTLs on the next write
        self.pend = []


@dataclass
class FlushItem:
    ent: np.ndarray
    res: np.ndarray
    bucket: np.ndarray
    eid: np.ndarray
    cnt: np.ndarray  # [n, 2] absolute impressions, clicks
    new: (
        np.ndarray
    )  # bool: the cell's first write (a new bucket of the longest resolution renews its hash's TTL)
    ts_first: int | None  # oldest / newest Kafka timestamp of the events it makes visible
    ts_last: int | None


class ShardLogic(StatefulBatchLogic):
    def __init__(self, cfg: FlowConfig, shard: str, state: dict | None):
        self.cfg = cfg
        self.shard = shard
        state = state or {}
        self.wms: list[int] = list(state.get("wms", [NO_TIME] * len(cfg.parts)))
        self.tables: dict[tuple[int, int, int], Table] = state.get("tables", {})
        self.anomalies = 0
        self.next_flush: datetime | None = None
        self.ts_first: int | None = None
        self.ts_last: int | None = None
        self.interval = timedelta(milliseconds=cfg.settings.flush_interval_ms)
        self.g_cells = M.STATE_CELLS.labels(shard)
        self.touched: set[tuple[int, int, int]] = set(self.tables)
        if self.tables:  # restored: re-write what may not have reached Redis
            self.next_flush = datetime.now(UTC)
        # Redis losses (FeatureWriter.losses): how many this shard has handled, the first
        # and last payload that wrote each table, and the tables closed since (first and
        # last payload, key, cells, wall time) - what a loss can take that the state no
        # longer holds. Not snapshotted: a loss concerns the payloads of this process.
        self.losses_seen = 0
        self.writes: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.closed_log: list[tuple[int, int, tuple[int, int, int], int, float]] = []
        self._prune_at = 1024
        self._flushed: list[tuple[int, int, int]] = []
        self._closed: list[tuple[tuple[int, int, int], int]] = []
        # the writer whose payloads the restored state was written with, and the last one
        # Redis had acknowledged at that snapshot: checked at the first activation, so that
        # a Redis that lost data while the job was down is found too
        self.restored_from: dict | None = state.get("redis")

    def watermark(self) -> int:
        return min(self.wms)

    def on_batch(self, values: list[Delta]):
        self._check_loss()
        # The events of a delta are at or after its partition's watermark *before* that
        # micro-batch (a later event of the same batch may move it past them), so they are
        # checked against the watermark known before this call; the new one applies after.
        by_type: dict[int, list[Delta]] = {}
        for d in values:
            if len(d.eid):
                by_type.setdefault(d.etype, []).append(d)
                self.ts_first = (
                    d.ts_first if self.ts_first is None else min(self.ts_first, d.ts_first)
                )
                self.ts_last = d.ts_last if self.ts_last is None else max(self.ts_last, d.ts_last)
        W = self.watermark()
        for etype, ds in by_type.items():
            ent = np.concatenate([d.ent for d in ds]).astype(np.int64)
            eid = np.concatenate([d.eid for d in ds])
            t = np.concatenate([d.t for d in ds])
            for r, res in enumerate(F.RESOLUTIONS):
                self._merge(etype, r, ent, eid, t // res.bucket_ms, res, W)
        for d in values:
            if d.wm > self.wms[d.part]:
                self.wms[d.part] = d.wm
        W = self.watermark()
        if self.next_flush is None and (by_type or self._closable(W)):
            self.next_flush = datetime.now(UTC) + self.interval
        return [], StatefulBatchLogic.RETAIN

    def _merge(self, etype, r, ent, eid, b, res, W):
        order = group_order(eid, ent, b)
        ent, eid, b = ent[order], eid[order], b[order]
        n = len(eid)
        cell_start = np.ones(n, bool)
        grp_start = np.ones(n, bool)
        grp_start[1:] = (ent[1:] != ent[:-1]) | (b[1:] != b[:-1])
        cell_start[1:] = grp_start[1:] | (eid[1:] != eid[:-1])
        cs = np.flatnonzero(cell_start)
        counts = np.diff(np.append(cs, n))
        c_ent, c_b, c_eid = ent[cs], b[cs], eid[cs]
        gs = np.flatnonzero(grp_start[cs])
        ge = np.append(gs[1:], len(cs))
        for a, z in zip(gs.tolist(), ge.tolist()):
            key = (int(c_ent[a]), r, int(c_b[a]))
            if (key[2] + 1) * res.bucket_ms <= W and key not in self.tables:
                # cannot happen (see the module docstring); never write a partial bucket
                self.anomalies += int(counts[a:z].sum())
                log.error(
                    "shard %s: %d events for closed bucket %s dropped",
                    self.shard,
                    int(counts[a:z].sum()),
                    key,
                )
                continue
            tab = self.tables.get(key)
            if tab is None:
                tab = self.tables[key] = Table()
            tab.add(etype, c_eid[a:z], counts[a:z])
            self.touched.add(key)

    def _closable(self, W: int) -> bool:
        return any((k[2] + 1) * F.RESOLUTIONS[k[1]].bucket_ms <= W for k in self.tables)

    def notify_at(self):
        if self.next_flush is None and self.cfg.has_writer():
            return datetime.now(UTC) + LOSS_CHECK  # an idle shard still sees a Redis loss
        return self.next_flush

    def on_notify(self):
        self._check_loss()
        self._write(self.flush())
        return [], StatefulBatchLogic.RETAIN

    def on_eof(self):
        self._check_loss()
        self._write(self.flush())
        self.cfg.drain()  # a finite run ends with everything in Redis
        self._check_loss()  # a loss found while draining: re-write, and wait again
        if self.touched:
            self._write(self.flush())
            self.cfg.drain()
        return [], StatefulBatchLogic.RETAIN

    def _write(self, items: list) -> None:
        seq = self.cfg.writer().write(items) if items else None
        if seq is not None:
            for key in self._flushed:
                self.writes[key] = (self.writes.get(key, (seq, seq))[0], seq)
        now = time.time()
        for key, n in self._closed:
            # never written by this process (restored from a snapshot, written before): 0, 0
            first, last = self.writes.pop(key, (0, 0))
            self.closed_log.append((first, last, key, n, now))
        self._flushed, self._closed = [], []
        if len(self.closed_log) > self._prune_at:
            # a closed bucket's hash expires in Redis a TTL after its last write: past that,
            # a loss of it is no loss
            ttl_s = self.cfg.writer().view.hash_ttl_ms / 1000
            self.closed_log = [c for c in self.closed_log if now - c[4] < ttl_s]
            self._prune_at = 2 * len(self.closed_log) + 1024

    def _check_loss(self) -> None:
        """Redis lost writes it had acknowledged (:class:`WriterLoss`): mark every open cell
        dirty, so the next flush re-writes it from the state (absolute values), and report
        the cells of buckets closed since the last payload Redis still holds - the state no
        longer has them - in the log, the metrics and a line of the job's output. The first
        call after a restore also checks the previous run's writer marker: a Redis that lost
        data while the job was down is repaired and reported the same way."""
        if self.restored_from is not None:
            marker, acked = self.restored_from["marker"], int(self.restored_from["acked"])
            held = self.cfg.writer().view.held_seq(marker)
            self.restored_from = None
            if held < acked:
                M.REDIS_LOSSES.inc()
                self._repair(held, acked, None)
        losses = self.cfg.writer_losses()
        if len(losses) <= self.losses_seen:
            return
        new = losses[self.losses_seen :]
        self.losses_seen = len(losses)
        held = min(loss.held_seq for loss in new)
        acked = max(loss.acked_seq for loss in new)
        # the payloads after `held` up to `acked` are gone (later ones are still to be sent);
        # with nothing held, so may be what earlier processes wrote (payload 0)
        lost = [
            (key, n)
            for first, last, key, n, _ in self.closed_log
            if first <= acked and (last > held or held == 0)
        ]
        self._repair(held, acked, lost)

    def _repair(
        self, held: int, acked: int, lost: list[tuple[tuple[int, int, int], int]] | None
    ) -> None:
        """Re-write every open cell; report ``lost`` (None: the loss is of the payloads of the
        process that wrote the restored snapshot, and which closed buckets they held is not
        known here - every bucket closed before that snapshot may be affected)."""
        n_open = 0
        for key, tab in self.tables.items():
            tab.compact()
            tab.dirty[:] = True
            tab.new[:] = True  # a re-created day hash gets its TTL again
            n_open += len(tab)
            self.touched.add(key)
        n_lost = sum(n for _, n in lost or [])
        M.REDIS_REWRITTEN_CELLS.inc(n_open)
        if n_lost:
            M.REDIS_UNREPAIRED_CELLS.inc(n_lost)
        report = {
            "speed": "redis_loss",
            "shard": self.shard,
            "held_seq": held,
            "acked_seq": acked,
            "rewritten_cells": n_open,
            "unrepaired_buckets": None if lost is None else len(lost),
            "unrepaired_cells": None if lost is None else n_lost,
            "buckets": [
                [F.ENTITIES[e].name, F.RESOLUTIONS[r].name, b] for (e, r, b), _ in lost or []
            ],
            "before_restart": lost is None,
        }
        if lost is None:
            log.error(
                "shard %s: Redis lost writes of the job's previous run (it holds payloads up "
                "to %d of %d acknowledged before the snapshot this run resumed from): "
                "re-writing %d open cells from the state; buckets closed before that "
                "snapshot cannot be re-written and may be incomplete (reconcile them with the "
                "batch layer, or replay)",
                self.shard,
                held,
                acked,
                n_open,
            )
        else:
            (log.error if n_lost else log.warning)(
                "shard %s: Redis lost writes it had acknowledged (it holds payloads up to %d "
                "of %d): re-writing %d open cells from the state; %d cells of %d closed "
                "buckets are no longer in the state and cannot be re-written (reconcile them "
                "with the batch layer, or replay)",
                self.shard,
                held,
                acked,
                n_open,
                n_lost,
                len(lost),
            )
        sys.stdout.write(json.dumps(report) + "\n")  # one write: workers share stdout
        sys.stdout.flush()
        self.next_flush = datetime.now(UTC)

    def flush(self) -> list:
        self.next_flush = None
        W = self.watermark()
        parts = []
        closed = []
        cells = 0
        for key in self.touched:  # only a table that got events since the last flush is dirty
            tab = self.tables.get(key)
            if tab is None:
                continue
            tab.compact()
            idx = np.flatnonzero(tab.dirty)
            if len(idx):
                parts.append((key, tab.keys[idx], tab.cnt[idx], tab.new[idx]))
                self._flushed.append(key)
                tab.dirty[idx] = False
                tab.new[idx] = False
        self.touched = set()
        for key, tab in self.tables.items():
            cells += len(tab)
            if (key[2] + 1) * F.RESOLUTIONS[key[1]].bucket_ms <= W:
                closed.append(key)
        for key in closed:
            n = len(self.tables.pop(key))
            cells -= n
            self._closed.append((key, n))
        self.g_cells.set(cells)
        if not parts:
            return []
        ns = [len(p[1]) for p in parts]
        item = FlushItem(
            ent=np.repeat([p[0][0] for p in parts], ns),
            res=np.repeat([p[0][1] for p in parts], ns),
            bucket=np.repeat([p[0][2] for p in parts], ns),
            eid=np.concatenate([p[1] for p in parts]),
            cnt=np.concatenate([p[2] for p in parts]),
            new=np.concatenate([p[3] for p in parts]),
            ts_first=self.ts_first,
            ts_last=self.ts_last,
        )
        self.ts_first = self.ts_last = None
        return [item]

    def snapshot(self) -> dict:
        import copy

        # Cells flushed before this snapshot are recorded as written (not dirty): wait until
        # Redis has acknowledged them. A crash before that resumes from the previous
        # snapshot, which still has them dirty or not yet counted.
        self.cfg.drain()
        for tab in self.tables.values():
            tab.compact()
        state = {
            "wms": list(self.wms),
            "tables": {k: copy.deepcopy(t) for k, t in self.tables.items()},
        }
        if self.restored_from is not None:  # not checked yet: still what the state rests on
            state["redis"] = dict(self.restored_from)
        elif self.cfg.has_writer():
            view = self.cfg.writer().view
            if view.acked_seq:
                state["redis"] = {"marker": view.marker, "acked": view.acked_seq}
        return state


# --------------------------------------------------------------------------- Redis sink


class FeatureWriter:
    """Hands the shards' flushes to the speed view's writer
    (:class:`ctrstream.store.speed_view.SpeedViewWriter`: one ``HSET`` per changed entity id
    and event day, a TTL renewal with each new bucket of the longest-lived resolution,
    rendered with numpy and sent by a writer thread while the job goes on), as cells per
    entity with the packed ids unpacked into their parts, and feeds the flush metrics once
    Redis has acknowledged a flush. :meth:`drain` (called by every shard's ``snapshot``)
    waits for the acknowledgements. One writer per process, shared by its workers' shards.

    Redis going away does not stop the job: the writer sends a flush again after a back-off
    wait until Redis takes it (each failed attempt logged and counted in
    ``ctrstream_speed_redis_retries_total``), the flushes behind it wait in order, and a
    snapshot waits for them all. When Redis comes back without writes it had acknowledged
    (restarted without its data), :attr:`losses` grows and every shard re-writes its open
    cells (``ShardLogic._check_loss``)."""

    def __init__(self, settings: Settings, max_pending: int = 2):
        self.view = SpeedViewWriter(
            settings,
            max_pending=max_pending,
            marker=f"{FLOW}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            backoff=Backoff(),
            on_retry=self._on_retry,
            on_loss=self._on_loss,
        )
        self.losses = self.view.losses

    @staticmethod
    def _on_retry(attempt: int, error: BaseException, wait_s: float) -> None:
        M.REDIS_RETRIES.inc()
        log.warning(
            "writing to Redis failed (attempt %d: %s); the flush is kept and sent again in %.2f s",
            attempt,
            error,
            wait_s,
        )

    @staticmethod
    def _on_loss(loss: WriterLoss) -> None:
        M.REDIS_LOSSES.inc()
        log.error(
            "Redis (run_id %s, was %s) holds this job's writes up to payload %d of %d it had "
            "acknowledged: it lost data; the shards re-write their open cells",
            loss.run_id_after,
            loss.run_id_before,
            loss.held_seq,
            loss.acked_seq,
        )

    def write(self, items: list) -> int | None:
        """Hand ``items`` (:class:`FlushItem`) to the writer; returns before Redis answers,
        with the number of the payload that carries them (None: nothing to write)."""
        t0 = time.perf_counter()
        ts = [t for it in items if it.ts_first is not None for t in (it.ts_first, it.ts_last)]
        its = [it for it in items if len(it.eid)]
        if not its:
            return None
        ent = np.concatenate([it.ent for it in its]).astype(np.int8)
        order = np.argsort(ent, kind="stable")  # the cells of one entity adjacent (radix sort)
        ent = ent[order]
        res = np.concatenate([it.res for it in its])[order]
        bucket = np.concatenate([it.bucket for it in its])[order]
        eid = np.concatenate([it.eid for it in its])[order]
        cnt = np.concatenate([it.cnt for it in its])[order]
        new = np.concatenate([it.new for it in its])[order]
        bounds = np.flatnonzero(np.r_[True, ent[1:] != ent[:-1], True])
        cells = []
        for a, z in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            e = int(ent[a])
            cells.append(
                SpeedCells(
                    e,
                    unpack_parts(eid[a:z], F.ENTITIES[e]),
                    res[a:z],
                    bucket[a:z],
                    cnt[a:z, 0],
                    cnt[a:z, 1],
                    new[a:z],
                )
            )
        n_cells = len(eid)

        def done():  # in the writer thread, once Redis acknowledged every command
            now_ms = time.time() * 1000
            M.FLUSH_CELLS.inc(n_cells)
            M.FLUSH_SECONDS.observe(time.perf_counter() - t0)
            for t in ts:
                if t and t > 0:
                    M.FRESHNESS.observe(max(0.0, (now_ms - t) / 1000))

        return self.view.write_seq(cells, done=done)

    def drain(self) -> None:
        """Return once Redis has acknowledged everything written so far (raises its error)."""
        self.view.drain()

    def close(self) -> None:
        self.view.close()


# --------------------------------------------------------------------------- the flow


@dataclass
class FlowConfig:
    settings: Settings
    n_shards: int = N_SHARDS
    stop_at_end: bool = False

    @property
    def lateness_ms(self) -> int:
        return int(self.settings.allowed_lateness_s * 1000)

    @property
    def parts(self) -> list[str]:
        return [
            f"{kind}:{p}"
            for kind in KINDS
            for p in range(getattr(self.settings.topics, kind).partitions)
        ]

    # the max event time of every source partition of this process (global index -> time):
    # what bounds a partition's first event (_EventsPartition.first_limit)
    part_max: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    _writer: FeatureWriter | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def dlq_writer(self) -> DlqWriter:
        return DlqWriter(self.settings)

    def control_secret(self) -> bytes:
        """The key that heartbeats are verified with (a clear error when it is missing)."""
        return HB.load_control_secret(self.settings)

    def writer(self) -> FeatureWriter:
        """This process's Redis writer (created on first use; its workers share it)."""
        with self._lock:
            if self._writer is None:
                self._writer = FeatureWriter(self.settings)
            return self._writer

    def drain(self) -> None:
        if self._writer is not None:
            self._writer.drain()

    def has_writer(self) -> bool:
        return self._writer is not None

    def writer_losses(self) -> list[WriterLoss]:
        """The Redis losses this process's writer has seen (:class:`FeatureWriter`)."""
        return [] if self._writer is None else self._writer.losses


def build_flow(settings: Settings, stop_at_end: bool = False, n_shards: int = N_SHARDS) -> Dataflow:
    cfg = FlowConfig(settings, n_shards=n_shards, stop_at_end=stop_at_end)
    flow = Dataflow("ctrstream_features")
    deltas = op.input("kafka", flow, KafkaEventsSource(cfg))
    # The shards write Redis themselves (FeatureWriter): a write must be acknowledged before
    # the snapshot of the state that produced it, and only the stateful step's own snapshot
    # can wait for that. The step emits nothing; Bytewax wants an output step all the same.
    written = op.stateful_batch("shards", deltas, _builder(cfg))
    op.output("none", written, _Nothing())
    return flow


class _Nothing(DynamicSink):
    """The flow's formal output: the shards write Redis themselves and emit no items."""

    def build(self, step_id, worker_index, worker_count):
        return _NothingPartition()


class _NothingPartition(StatelessSinkPartition):
    def write_batch(self, items: list) -> None:
        if items:
            raise AssertionError(f"the features shards emitted {len(items)} items")


def _builder(cfg: FlowConfig):
    # stateful_batch passes only the resume state; the shard key is not given to the
    # builder, and the logic does not need it except for its metric label.
    counter = iter(range(1 << 30))

    def build(resume):
        return ShardLogic(cfg, f"{os.getpid()}-{next(counter)}", resume)

    return build


def get_flow(stop_at_end: bool = False) -> Dataflow:
    """Entry point for ``python -m bytewax.run "ctrstream.streaming.features_flow:get_flow()"``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop_on_signals()  # SIGTERM / Ctrl-C: the sources end, the last epoch is snapshotted
    return build_flow(get_settings(), stop_at_end=stop_at_end)
