"""A plain, record-by-record reference of what the speed layer must produce.

Used by the tests and the benchmark to check the dataflows: it reads the topics back from
Kafka (partition, offset, key, value) and applies the declared rules one record at a time,
with no batching, sharding or numpy, so that it shares no code path with the dataflow except
the codec and ``ctrstream.features``:

* genuine heartbeat records (``ctrstream.kafka.heartbeats.verify``) beyond their
  partition's greatest event time advance its watermark; other control records are dead
  (stage ``control``, the outcome as reason); undecodable records are dead, and so are
  events whose key is not their impression id or that are not in their key's partition;
* per Kafka partition, an event more than ``max_event_ahead_s`` ahead of the max event time
  before it is dead (``future``) and does not move it (a partition's first event is not
  bounded here: the job bounds it by its other partitions, an order this reference does not
  model - tests keep such records out of first place);
* per Kafka partition, an event older than ``max event time seen before it - allowed
  lateness`` is late;
* the first copy of an impression id (click id) counts, later copies are duplicates;
* a counted event adds 1 to ``i``/``c`` of its bucket of every resolution of every entity.

Its result is in neutral cells, ``(entity, id, resolution, event type, bucket) -> count``,
the form in which ``ctrstream.store.speed_view.read_speed_view`` returns what the speed
layer wrote.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ctrstream import events as E
from ctrstream import features as F
from ctrstream.config import Settings
from ctrstream.kafka import heartbeats as HB
from ctrstream.kafka.topics import Record


@dataclass
class Reference:
    # (entity, id, resolution name, event type, bucket) -> n
    cells: dict[tuple[str, str, str, str, int], int] = field(default_factory=dict)
    dead: dict[tuple[str, int, int], tuple[str, str]] = field(
        default_factory=dict
    )  # -> (stage, reason)
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
    ahead = int(settings.max_event_ahead_s * 1000)
    counts: Counter = Counter()
    ref = Reference()
    secret: bytes | None = None
    for kind, recs in records.items():
        etype = "i" if kind == "impressions" else "c"
        decode = E.decode_impression if kind == "impressions" else E.decode_click
        by_part: dict[int, list[Record]] = defaultdict(list)
        for r in recs:
            by_part[r.partition].append(r)
        for rs in by_part.values():
            rs.sort(key=lambda r: r.offset)
            max_t = None
            seen: set[str] = set()
            for r in rs:
                ref.stats["records"] += 1
                where = (r.topic, r.partition, r.offset)
                try:
                    ev = decode(r.value)
                except E.DecodeError as e:
                    if not HB.is_control(r.key, r.headers):
                        ref.dead[where] = ("decode", e.reason)
                        ref.stats["decode_errors"] += 1
                        continue
                    if secret is None:
                        secret = HB.load_control_secret(settings)
                    v = HB.verify(secret, r.topic, r.partition, r.value, r.headers)
                    if v.time is not None and (max_t is None or v.time > max_t):
                        max_t = v.time
                        ref.stats["heartbeats"] += 1
                        continue
                    outcome = v.outcome if v.time is None else "replayed"
                    ref.dead[where] = ("control", outcome)
                    ref.stats[f"control_{outcome}"] += 1
                    continue
                reason = E.key_error(r.key, ev) or E.partition_error(
                    r.key or b"", r.partition, getattr(settings.topics, kind).partitions
                )
                if reason is not None:
                    ref.dead[where] = ("key", reason)
                    ref.stats["wrong_key"] += 1
                    continue
                t = ev.event_time_ms
                if max_t is not None and t > max_t + ahead:
                    ref.dead[where] = ("future", "future")
                    ref.stats["future"] += 1
                    continue
                if max_t is not None and t < max_t - lateness:
                    ref.dead[where] = ("lateness", "late")
                    ref.stats["late"] += 1
                    continue
                max_t = t if max_t is None else max(max_t, t)
                eid_ = ev.impression_id if isinstance(ev, E.Impression) else ev.click_id
                if eid_ in seen:
                    ref.stats["duplicates"] += 1
                    continue
                seen.add(eid_)
                ref.counted[kind].append(ev)
                ref.stats[f"counted_{etype}"] += 1
                for ent in F.ENTITIES:
                    sid = F.entity_id(ent, ev)
                    for res in F.RESOLUTIONS:
                        counts[(ent.name, sid, res.name, etype, int(F.bucket_of(t, res)))] += 1
    ref.cells = dict(counts)
    return ref
