"""The speed layer's ``join`` dataflow: impressions x clicks -> ``labeled`` (exactly once).

Run it with ``ctrstream speed join`` (or ``python -m bytewax.run
"ctrstream.streaming.join_flow:get_flow()" -r DIR -s SECS -b 0``).

Design
------
**No shuffle.** ``impressions`` and ``clicks`` are keyed by impression id with the same
partitioner and partition count (``ctrstream.events``), so a click is in the same
partition number as its impression. The source has one Bytewax partition per partition
number ``p``; it reads ``impressions[p]`` and ``clicks[p]`` in micro-batches and joins
them locally. Its whole state (offsets, pending impressions, dedup sets) is its Bytewax
snapshot.

**Event time.** Each topic-partition has the features flow's watermark (max event time
seen - allowed lateness; heartbeats count); the pair's watermark ``W`` is the smaller of the
two. Records older than their partition's watermark are late: the ``features`` flow already
sends those to ``dlq``, so the join only drops (and counts) them. A record the join cannot
use at all is its own dead letter (connector name ``join``), written in the transaction of
the micro-batch that read it: one that does not decode (whatever its bytes raise), one whose
key is not its impression id or that is not in its key's partition (stage ``key``), one further ahead of its partition's max event
time than ``max_event_ahead_s`` (stage ``future``; it does not move the watermark, see
``ctrstream.config``), and a heartbeat whose time is out of range.

* An impression waits (id, event time, raw bytes, earliest click delay) until
  ``W > impression time + attribution window``; then one ``Labeled`` is emitted
  (key = impression id; ``clicked`` 0/1; ``click_delay_ms`` of the earliest click) and the
  impression is replaced by a small tombstone kept for ``allowed lateness`` more, then freed.
  Duplicate impressions (same id) are dropped.
* A click joins its pending impression when ``0 <= delay <= window`` (earliest delay wins,
  duplicates and repeat clicks change nothing). A click with ``delay > window`` (or whose
  impression is tombstoned) goes to ``dlq`` (stage ``join``, reason ``click after the
  attribution window ...``); a click with no impression by the time ``W`` passes its event
  time is an **orphan** (``dlq``, reason ``orphan: ...``). No accepted click can arrive
  after its impression was emitted while still inside the window: it would be at or after
  its partition's watermark, which is at or after ``W``.

**Exactly once on ``labeled`` across crashes** (transactions + a fence):
every output of a partition (labels and its dead letters) is produced by a transactional
producer (``transactional.id`` per partition) in one transaction per micro-batch, together
with a *fence* record ``{"w": W}`` in the ``<labeled>.join-fence`` topic. Emission is eager,
so what a partition has emitted when it commits is exactly "every label with impression
time + window < W and every click dead letter with click time < W". After ``kill -9``,
the restarted job restores the last Bytewax snapshot (older), aborts the dead producer's
open transaction (``init_transactions``), reads its last committed fence ``F`` and
suppresses every output whose time is below ``F``: those were committed before the crash.
The fence also records the next input offsets of the pair at the commit: a record's own dead
letter (written with the batch that read it) below them was committed before the crash.
Everything else is emitted (again or for the first time) exactly when it would have been.
Readers of ``labeled`` must use ``isolation.level=read_committed``.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ctrstream import events as E
from ctrstream.config import Settings, Topic, get_settings
from ctrstream.kafka import heartbeats as HB
from ctrstream.kafka.clients import ensure_topics, producer_config
from ctrstream.kafka.deadletters import dead_letter, dead_letter_headers, producer_overrides
from ctrstream.kafka.heartbeats import NO_TIME
from ctrstream.kafka.partition import PartitionReader
from ctrstream.stack.stopping import stop_on_signals, stop_requested
from ctrstream.streaming import speed_metrics as M

log = logging.getLogger("ctrstream.speed.join")

FLOW = "join"
BATCH = int(os.environ.get("CTRSTREAM_SPEED_BATCH", "20000"))
EMPTY_POLL = timedelta(milliseconds=5)


def fence_topic(settings: Settings) -> str:
    return f"{settings.topics.labeled.name}.join-fence"


@dataclass(frozen=True)
class Fence:
    """What a join partition had committed: every timed output below ``w``, and the dead
    letters of the records before offsets ``oi`` (impressions) and ``oc`` (clicks)."""

    w: int = NO_TIME
    oi: int = -1
    oc: int = -1


def read_fences(settings: Settings, timeout: float = 30.0) -> dict[str, Fence]:
    """The last committed fence of every join partition."""
    topic = fence_topic(settings)
    c = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": "ctrstream-join-fence-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    deadline = time.monotonic() + timeout
    try:
        tp = TopicPartition(topic, 0)
        while True:
            try:
                lo, hi = c.get_watermark_offsets(tp, timeout=timeout)
                break
            except KafkaException as e:
                # a fence topic created a moment ago may not be in this client's metadata yet
                if (
                    e.args[0].code()
                    not in (KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART)
                    or time.monotonic() > deadline
                ):
                    raise
                time.sleep(0.1)
        out: dict[str, Fence] = {}
        if hi <= lo:
            return out
        tp.offset = lo
        c.assign([tp])
        while True:
            pos = c.position([TopicPartition(topic, 0)])[0].offset
            if pos >= hi:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: at {pos} of {hi}")
            for m in c.consume(1000, timeout=0.2):
                key, value = m.key(), m.value()
                if m.error() is None and key:
                    assert value is not None  # the join writes every fence with a value
                    f = json.loads(value)
                    out[key.decode()] = Fence(f["w"], f.get("oi", -1), f.get("oc", -1))
        return out
    finally:
        c.close()


class _JoinPartition(StatefulSourcePartition):
    def __init__(
        self,
        settings: Settings,
        partition: int,
        state: dict | None,
        part_max: dict[tuple[int, int], int] | None = None,
    ):
        st = state or {}
        self.s = settings
        self.p = partition
        self.key = f"p{partition}"
        self.window = int(settings.attribution_window_s * 1000)
        self.lateness = int(settings.allowed_lateness_s * 1000)
        self.ahead = int(settings.max_event_ahead_s * 1000)
        self.n_parts = settings.topics.impressions.partitions  # = clicks' (JoinSource checks)
        # (topic 0 impressions / 1 clicks, partition) -> max event time, for this process's
        # partitions: what bounds a partition's first event
        self.part_max = part_max if part_max is not None else {}
        # this micro-batch's own dead letters (undecodable, wrong key, future), committed
        # with it
        self.now_dead: list[E.DeadLetter] = []
        ti, tc = settings.topics.impressions.name, settings.topics.clicks.name
        self.ti, self.tc = ti, tc
        group = "ctrstream-speed-join"
        self.ri = PartitionReader(settings, ti, partition, st.get("oi"), group)
        self.rc = PartitionReader(settings, tc, partition, st.get("oc"), group)
        self.max_i = st.get("max_i", NO_TIME)
        self.max_c = st.get("max_c", NO_TIME)
        # impression id -> [event time, raw bytes, earliest valid click delay or None]
        self.pending: dict[str, list] = st.get("pending", {})
        self.due: list[tuple[int, str]] = list(st.get("due", []))  # heap of (t + window, id)
        self.tomb: dict[str, int] = st.get("tomb", {})  # emitted impression id -> event time
        self.tomb_due: list[tuple[int, str]] = list(st.get("tomb_due", []))
        self.clicks_seen: dict[str, int] = st.get("clicks_seen", {})  # click id -> event time
        self.clicks_due: list[tuple[int, str]] = list(st.get("clicks_due", []))
        # click outputs waiting for W to pass the click time: heap (t, seq, imp id|None, reason|None, record)
        self.orphans: dict[str, list] = st.get(
            "orphans", {}
        )  # imp id -> [(t, topic, part, off, raw)]
        self.orphan_due: list[tuple[int, str]] = list(st.get("orphan_due", []))
        self.dead_due: list[tuple[int, int, E.DeadLetter]] = list(st.get("dead_due", []))
        self.seq = st.get("seq", 0)
        self.awake: datetime | None = None
        fence = read_fences(settings).get(self.key, Fence())
        self.fence = fence.w
        self.fence_oi, self.fence_oc = fence.oi, fence.oc
        conf = producer_config(
            settings,
            **{
                "transactional.id": f"ctrstream-join-{settings.topics.labeled.name}-{partition}",
                "linger.ms": 5,
                "transaction.timeout.ms": 60_000,
                **producer_overrides(settings),
            },
        )
        self.producer = Producer(conf)
        self.producer.init_transactions(60)
        self.labeled_topic = settings.topics.labeled.name
        self.dlq_topic = settings.topics.dlq.name
        self.fence_topic = fence_topic(settings)
        self.m_pending = M.JOIN_PENDING.labels(str(partition))
        self.m_in_i = M.EVENTS_IN.labels(FLOW, ti)
        self.m_in_c = M.EVENTS_IN.labels(FLOW, tc)
        self.m_late_i = M.LATE.labels(FLOW, ti)
        self.m_late_c = M.LATE.labels(FLOW, tc)
        self.m_dup_i = M.DUPLICATES.labels(FLOW, ti)
        self.m_dup_c = M.DUPLICATES.labels(FLOW, tc)
        self.m_ctl_i = {o: M.CONTROL.labels(FLOW, ti, o) for o in HB.OUTCOMES}
        self.m_ctl_c = {o: M.CONTROL.labels(FLOW, tc, o) for o in HB.OUTCOMES}
        self.secret = HB.load_control_secret(settings)

    def snapshot(self) -> dict:
        return {
            "oi": self.ri.checkpoint(),  # also committed to the group, for lag tools
            "oc": self.rc.checkpoint(),
            "max_i": self.max_i,
            "max_c": self.max_c,
            "pending": {k: list(v) for k, v in self.pending.items()},
            "due": list(self.due),
            "tomb": dict(self.tomb),
            "tomb_due": list(self.tomb_due),
            "clicks_seen": dict(self.clicks_seen),
            "clicks_due": list(self.clicks_due),
            "orphans": {k: list(v) for k, v in self.orphans.items()},
            "orphan_due": list(self.orphan_due),
            "dead_due": list(self.dead_due),
            "seq": self.seq,
        }

    def next_awake(self):
        return self.awake

    def close(self):
        self.ri.close()
        self.rc.close()

    def watermark(self) -> int:
        if self.max_i == NO_TIME or self.max_c == NO_TIME:
            return NO_TIME
        return min(self.max_i, self.max_c) - self.lateness

    def next_batch(self):
        if stop_requested():  # SIGTERM: end here, the final snapshot follows
            raise StopIteration
        mi = self.ri.poll(BATCH)
        mc = self.rc.poll(BATCH)
        if not mi and not mc:
            self.awake = datetime.now(UTC) + EMPTY_POLL
            return []
        self.awake = None
        if mi:
            self._impressions(mi)
        if mc:
            self._clicks(mc)
        n = self._emit()
        self.m_pending.set(len(self.pending))
        return [n] if n else []

    def _reject(self, m, reason: str, stage: str) -> None:
        """``m``'s own dead letter, unless it was committed before a crash (fence offsets)."""
        fence = self.fence_oi if m.topic() == self.ti else self.fence_oc
        if m.offset() < fence:
            return
        self.now_dead.append(
            dead_letter(
                reason,
                m.topic(),
                m.partition(),
                m.offset(),
                m.value(),
                stage,
                key=m.key(),
                job=FLOW,
            )
        )

    def _limit(self, topic_idx: int, current: int) -> int:
        """The latest event time an event of this pair's ``topic_idx`` topic may have."""
        if current != NO_TIME:
            return current + self.ahead
        others = [t for k, t in self.part_max.items() if k != (topic_idx, self.p) and t != NO_TIME]
        wall = int(time.time() * 1000) + self.ahead
        return min(wall, max(others) + self.ahead) if others else wall

    def _future(self, m, t: int, current: int, topic_idx: int) -> bool:
        if t <= self._limit(topic_idx, current):
            return False
        self._reject(
            m,
            f"future: event_time_ms {t} is more than {self.ahead} ms ahead of the watermark of "
            f"{m.topic()}[{m.partition()}] (max_event_ahead_s; a real gap in event time is "
            "announced by a watermark heartbeat)",
            "future",
        )
        return True

    def _impressions(self, msgs):
        self.m_in_i.inc(len(msgs))
        late = dup = 0
        for m in msgs:
            v = m.value()
            h, self.max_i = self._admit(m, E.decode_impression, self.ti, self.max_i, self.m_ctl_i)
            if h is None:
                continue
            t = h.event_time_ms
            if self._future(m, t, self.max_i, 0):
                continue
            if self.max_i != NO_TIME and t < self.max_i - self.lateness:
                late += 1
                continue
            if t > self.max_i:
                self.max_i = t
            iid = h.impression_id
            if iid in self.pending or iid in self.tomb:
                dup += 1
                continue
            rec = [t, v, None]
            self.pending[iid] = rec
            heapq.heappush(self.due, (t + self.window, iid))
            for click in self.orphans.pop(iid, ()):  # clicks that came before their impression
                self._attach(rec, click)
        self.part_max[(0, self.p)] = self.max_i
        if late:
            self.m_late_i.inc(late)
        if dup:
            self.m_dup_i.inc(dup)

    def _clicks(self, msgs):
        self.m_in_c.inc(len(msgs))
        late = dup = 0
        for m in msgs:
            v = m.value()
            h, self.max_c = self._admit(m, E.decode_click, self.tc, self.max_c, self.m_ctl_c)
            if h is None:
                continue
            t = h.event_time_ms
            if self._future(m, t, self.max_c, 1):
                continue
            if self.max_c != NO_TIME and t < self.max_c - self.lateness:
                late += 1
                continue
            if t > self.max_c:
                self.max_c = t
            if h.click_id in self.clicks_seen:
                dup += 1
                continue
            self.clicks_seen[h.click_id] = t
            heapq.heappush(self.clicks_due, (t, h.click_id))
            click = (t, m.partition(), m.offset(), v, m.key())
            iid = h.impression_id
            rec = self.pending.get(iid)
            if rec is not None:
                self._attach(rec, click)
            elif iid in self.tomb:
                self._dead(
                    click,
                    f"click after the attribution window: impression {iid} at "
                    f"{self.tomb[iid]} was labeled when its window of "
                    f"{self.window} ms closed",
                )
            else:
                self.orphans.setdefault(iid, []).append(click)
                heapq.heappush(self.orphan_due, (t, iid))
        self.part_max[(1, self.p)] = self.max_c
        if late:
            self.m_late_c.inc(late)
        if dup:
            self.m_dup_c.inc(dup)

    def _admit(self, m, decode, topic: str, max_t: int, counters: dict) -> tuple[Any, int]:
        """(the event record ``m`` holds or None, the max event time after it): an
        undecodable record or one that breaks the key contract is dead-lettered, a control
        record is checked as a heartbeat (a genuine one moves the max event time)."""
        try:
            ev = decode(m.value())
        except E.DecodeError as e:
            if HB.is_control(m.key(), m.headers()):  # a heartbeat, genuine or not
                ht = self._heartbeat(m, topic, max_t, counters)
                return None, max_t if ht is None else ht
            self._reject(m, e.reason, "decode")
            return None, max_t
        reason = E.key_error(m.key(), ev) or E.partition_error(m.key(), self.p, self.n_parts)
        if reason is not None:
            self._reject(m, reason, "key")
            return None, max_t
        return ev, max_t

    def _heartbeat(self, m, topic: str, max_t: int, counters: dict) -> int | None:
        """The event time of control record ``m`` when it is a genuine heartbeat beyond
        ``max_t``; None for anything else. Rejected ones (unsigned, forged, malformed,
        replayed) are counted and dead-lettered (stage ``control``), as the features flow
        does, and move nothing."""
        v = HB.verify(self.secret, topic, self.p, m.value(), m.headers())
        if v.time is None:
            counters[v.outcome].inc()
            self._reject(m, v.reason, "control")
            return None
        if v.time <= max_t:
            counters["replayed"].inc()
            self._reject(m, HB.replayed_reason(v.time, max_t, topic, self.p), "control")
            return None
        counters["accepted"].inc()
        return v.time

    def _attach(self, rec, click):
        delay = click[0] - rec[0]
        if delay < 0:
            self._dead(click, f"invalid: click at {click[0]} is {-delay} ms before its impression")
        elif delay > self.window:
            self._dead(
                click, f"click after the attribution window: delay {delay} ms > {self.window} ms"
            )
        elif rec[2] is None or delay < rec[2]:
            rec[2] = delay

    def _dead(self, click, reason: str):
        t, part, off, raw, *rest = click  # (t, partition, offset, value, key)
        key = rest[0] if rest else None
        self.seq += 1
        heapq.heappush(
            self.dead_due,
            (t, self.seq, dead_letter(reason, self.tc, part, off, raw, "join", key=key, job=FLOW)),
        )

    def _emit(self) -> int:
        """Everything whose time is below the watermark goes out, in one transaction."""
        W = self.watermark()
        labels, dead = [], self.now_dead
        self.now_dead = []
        while W != NO_TIME and self.due and self.due[0][0] < W:
            end, iid = heapq.heappop(self.due)
            t, raw, delay = self.pending.pop(iid)
            self.tomb[iid] = t
            heapq.heappush(self.tomb_due, (end + self.lateness, iid))
            if end < self.fence:  # committed before a crash
                continue
            clicked = 0 if delay is None else 1
            labels.append(
                (
                    iid.encode(),
                    b'{"impression":'
                    + raw
                    + b',"clicked":%d,"click_delay_ms":%s}'
                    % (clicked, b"null" if delay is None else str(delay).encode()),
                    clicked,
                )
            )
        while W != NO_TIME and self.orphan_due and self.orphan_due[0][0] < W:
            _t, iid = heapq.heappop(self.orphan_due)
            for click in self.orphans.pop(iid, ()):
                self._dead(
                    click,
                    f"orphan: no impression {iid} seen within the attribution "
                    f"window (watermark {W})",
                )
        while W != NO_TIME and self.dead_due and self.dead_due[0][0] < W:
            t, _seq, rec = heapq.heappop(self.dead_due)
            if t >= self.fence:
                dead.append(rec)
        while W != NO_TIME and self.tomb_due and self.tomb_due[0][0] < W:
            self.tomb.pop(heapq.heappop(self.tomb_due)[1], None)
        wm_c = self.max_c - self.lateness
        while self.max_c != NO_TIME and self.clicks_due and self.clicks_due[0][0] < wm_c:
            self.clicks_seen.pop(heapq.heappop(self.clicks_due)[1], None)
        if not labels and not dead:
            return 0
        p = self.producer
        p.begin_transaction()
        for key, value, _c in labels:
            self._produce(self.labeled_topic, key, value)
        for dl in dead:
            self._produce(self.dlq_topic, dl.key, dl.original, headers=dead_letter_headers(dl))
        # what is committed now: timed outputs below W, own dead letters below the offsets
        self.fence = max(self.fence, W)
        self.fence_oi = max(self.fence_oi, self.ri.next_offset or 0)
        self.fence_oc = max(self.fence_oc, self.rc.next_offset or 0)
        fence = {"w": self.fence, "oi": self.fence_oi, "oc": self.fence_oc}
        self._produce(self.fence_topic, self.key.encode(), json.dumps(fence).encode(), partition=0)
        p.commit_transaction(60)
        n1 = sum(c for _k, _v, c in labels)
        if n1:
            M.LABELED.labels("1").inc(n1)
        if len(labels) - n1:
            M.LABELED.labels("0").inc(len(labels) - n1)
        for dl in dead:
            M.DLQ.labels(FLOW, dl.source_topic, dl.stage).inc()
        return len(labels)

    def _produce(self, topic, key, value, partition=None, headers=None):
        kw: dict = {} if partition is None else {"partition": partition}
        if headers is not None:
            kw["headers"] = headers
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, **kw)
                return
            except BufferError:
                self.producer.poll(0.05)


class JoinSource(FixedPartitionedSource):
    def __init__(self, settings: Settings):
        self.s = settings
        n_i, n_c = settings.topics.impressions.partitions, settings.topics.clicks.partitions
        if n_i != n_c:
            raise ValueError(
                f"impressions has {n_i} partitions and clicks {n_c}: the join needs "
                "the same count (see ctrstream.events)"
            )
        self.n = n_i
        self.part_max: dict[tuple[int, int], int] = {}  # shared by this process's partitions

    def list_parts(self):
        return [f"p{p}" for p in range(self.n)]

    def build_part(self, step_id, for_part, resume_state):
        M.serve(self.s.metrics_port, self.s.metrics_host)
        return _JoinPartition(self.s, int(for_part[1:]), resume_state, self.part_max)


class _NullPartition(StatelessSinkPartition):
    def write_batch(self, items):
        pass


class _NullSink(DynamicSink):
    def build(self, step_id, worker_index, worker_count):
        return _NullPartition()


def ensure_fence_topic(settings: Settings) -> None:
    from confluent_kafka.admin import NewTopic

    from ctrstream.kafka.clients import admin

    name = fence_topic(settings)
    client = admin(settings)
    if name in client.list_topics(timeout=30).topics:
        return
    rf = settings.kafka.replication_factor  # the fence must outlive a broker, as labeled does
    new = NewTopic(name, 1, rf, config={"cleanup.policy": "compact"})
    fut = client.create_topics([new])[name]
    try:
        fut.result(30)
    except KafkaException as e:
        if "TOPIC_ALREADY_EXISTS" not in str(e):
            raise


def build_flow(settings: Settings) -> Dataflow:
    ensure_topics(settings, [settings.topics.labeled, settings.topics.dlq])
    ensure_fence_topic(settings)
    flow = Dataflow("ctrstream_join")
    counts = op.input("kafka", flow, JoinSource(settings))
    op.output("done", counts, _NullSink())
    return flow


def get_flow(stop_at_end: bool = False) -> Dataflow:
    """Entry point for ``python -m bytewax.run "ctrstream.streaming.join_flow:get_flow()"``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop_on_signals()  # SIGTERM / Ctrl-C: the sources end, the last epoch is snapshotted
    return build_flow(get_settings())


__all__ = ["build_flow", "get_flow", "fence_topic", "read_fences", "Topic"]
