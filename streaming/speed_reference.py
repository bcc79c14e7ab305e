"""A plain, record-by-record reference of what the speed layer must produce.

Used by the tests and the benchmark to check the dataflows: it reads the topics back from
Kafka (partition, offset, key, value) and applies the declared rules one record at a time,
with no batching, sharding or numpy, so that it shares no code path with the dataflow except
the codec and ``ctrstream.features``:

* heartbeat records advance their partition's watermark; undecodable records are dead;
* per Kafka partition, an event older than ``max event time seen before it - allowed
  lateness`` is late;
* the first copy of an impression id (click id) counts, later copies are duplicates;
* a counted event adds 1 to ``i``/``c`` of its bucket of every resolution of every entity.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition

from ctrstream import features as F
from ctrstream.config import Settings
from streaming import events as E
from streaming.speed_kafka import heartbeat_time


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


def read_topic(settings: Settings, topic: str, timeout: float = 30.0,
               isolation: str = "read_committed") -> list[Record]:
    """Every record of ``topic`` up to its current end, in (partition, offset) order."""
    import time

    c = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers,
                  "group.id": "ctrstream-speed-reference", "enable.auto.commit": False,
                  "isolation.level": isolation})
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
                # a transaction marker occupies an offset: track the position, not the count
                pos[m.partition()] = m.offset() + 1
                out.append(Record(topic, m.partition(), m.offset(), m.key(), m.value(),
                                  m.timestamp()[1]))
            for p in pos:  # read_committed skips control records: use the consumer position
                if pos[p] < ends[p]:
                    got = c.position([TopicPartition(topic, p)])[0].offset
                    if got >= 0:
                        pos[p] = max(pos[p], got)
        out.sort(key=lambda r: (r.partition, r.offset))
        return out
    finally:
        c.close()


@dataclass
class Reference:
    cells: dict[tuple[str, str], int] = field(default_factory=dict)  # (redis key, field) -> n
    dead: dict[tuple[str, int, int], tuple[str, str]] = field(default_factory=dict)  # -> (stage, reason)
    stats: Counter = field(default_factory=Counter)
    counted: dict[str, list] = field(default_factory=lambda: {"impressions": [], "clicks": []})


def reference_labels(ref: Reference, window_ms: int) -> dict[str, tuple[int, int | None]]:
    """impression id -> (clicked, earliest click delay) the join must emit for ``ref``."""
    t_of = {i.impression_id: i.event_time_ms for i in ref.counted["impressions"]}
    best: dict[str, int] = {}
    for c in ref.counted["clicks"]:
        t = t_of.get(c.impression_id)
        if t is not None and 0 <= c.event_time_ms - t <= window_ms:
            d = c.event_time_ms - t
            best[c.impression_id] = min(d, best.get(c.impression_id, d))
    return {i: ((1, best[i]) if i in best else (0, None)) for i in t_of}


def reference_features(settings: Settings, records: dict[str, list[Record]]) -> Reference:
    """``records`` maps "impressions"/"clicks" to their records (any partition order)."""
    lateness = int(settings.allowed_lateness_s * 1000)
    counts: Counter = Counter()
    ref = Reference()
    for kind, recs in records.items():
        etype = "i" if kind == "impressions" else "c"
        decode = E.decode_impression if kind == "impressions" else E.decode_click
        by_part: dict[int, list[Record]] = defaultdict(list)
        for r in recs:
            by_part[r.partition].append(r)
        for part, rs in by_part.items():
            rs.sort(key=lambda r: r.offset)
            max_t = None
            seen: set[str] = set()
            for r in rs:
                ref.stats["records"] += 1
                if r.value is None and heartbeat_time(r.key) is not None:
                    ht = heartbeat_time(r.key)
                    max_t = ht if max_t is None else max(max_t, ht)
                    ref.stats["heartbeats"] += 1
                    continue
                try:
                    ev = decode(r.value)
                except E.DecodeError as e:
                    ref.dead[(r.topic, r.partition, r.offset)] = ("decode", e.reason)
                    ref.stats["decode_errors"] += 1
                    continue
                t = ev.event_time_ms
                if max_t is not None and t < max_t - lateness:
                    ref.dead[(r.topic, r.partition, r.offset)] = ("lateness", "late")
                    ref.stats["late"] += 1
                    continue
                max_t = t if max_t is None else max(max_t, t)
                eid_ = ev.impression_id if kind == "impressions" else ev.click_id
                if eid_ in seen:
                    ref.stats["duplicates"] += 1
                    continue
                seen.add(eid_)
                ref.counted[kind].append(ev)
                ref.stats[f"counted_{etype}"] += 1
                for ent in F.ENTITIES:
                    sid = F.entity_id(ent, ev)
                    for res in F.RESOLUTIONS:
                        b = int(F.bucket_of(t, res))
                        counts[(F.speed_key(ent.name, sid, F.speed_day(b, res)),
                                F.speed_field(res.name, etype, b))] += 1
    ref.cells = dict(counts)
    return ref


def read_speed_view(r) -> dict[tuple[str, str], int]:
    """Every non-zero (key, field) of the speed view in a Redis client's database."""
    out = {}
    keys = list(r.scan_iter(match="sv:*", count=10_000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.hgetall(k)
    for k, h in zip(keys, pipe.execute()):
        k = k.decode() if isinstance(k, bytes) else k
        for f, v in h.items():
            f = f.decode() if isinstance(f, bytes) else f
            v = int(v)
            if v:
                out[(k, f)] = v
    return out
