"""``ctrstream reconcile``: compare a landed batch view with the speed view; the batch wins.

What is compared
----------------
For every resolution of ``ctrstream.features.RESOLUTIONS`` the **overlap** is the bucket
range both views cover and both consider closed:

* the batch view ``bv:{version}:{entity}:{id}:{res}`` covers buckets from its oldest bucket
  up to the cut-off (``bv:{version}:meta`` ``cutoff_ms``; a bucket is closed when its end is
  ``<= cutoff_ms``);
* the speed view ``sv:{entity}:{id}:{day}`` (one hash per entity and event day -
  ``layout.speed_key`` / ``layout.speed_day``, days since the epoch, UTC - holding the
  buckets of that day of every resolution, fields ``{res}:i{bucket}`` / ``{res}:c{bucket}``,
  ``layout.speed_field``; an entity's day hashes are merged into its buckets per
  resolution) covers buckets from its oldest bucket on. Its day hashes are never pruned but
  expire (``layout.speed_hash_ttl_ms`` after their last new hour), so it is sure to hold
  only the newest ``layout.speed_keep_buckets`` buckets of each resolution: the overlap
  starts no earlier than that many buckets before the high-water. A bucket is closed in it
  once its end is ``<= speed high-water - allowed lateness`` (the high-water is the start of
  the newest bucket the speed view holds: the speed layer's event time has reached at least
  that);

``closed_before_ms`` narrows it further. Inside the overlap every bucket either view holds
is compared, per entity id and resolution, cell by cell (impressions and clicks: batch
fields ``i{bucket}`` / ``c{bucket}`` against speed fields ``{res}:i{bucket}`` /
``{res}:c{bucket}``; an absent cell counts as 0). A bucket is *equal* when both cells
agree, *differing* when both views hold it and a cell differs, *missing in speed* /
*missing in batch* when only one view holds it (with a non-zero count).

Reasons
-------
Each differing cell gets a reason, with the evidence behind it:

* ``late`` - the dead-letter topic holds late events (reason ``late: ...``, beyond the
  allowed lateness; the original bytes are decoded to find their entities and bucket) for
  this cell, at least as many distinct event ids as the batch has over the speed view. Late
  copies of an event the speed layer had already counted change nothing, which is why the
  difference may be smaller than the number of late records.
* ``late+lost_update`` - late events explain part of it, the rest as below.
* ``lost_update`` - the speed view is lower and no late event is known: a speed-layer
  update was lost (crash before flush, restart without recovery). ``missing_key`` - the
  speed view has no hash for the entity and the event day of the cell's bucket at all
  (``sv:{entity}:{id}:{day}`` absent or empty, so no resolution holds any bucket of that
  day: never written - a crash - or TTL-expired), while another day's hash of the same
  entity may well exist; a day hash that exists but lacks the cell is a ``lost_update``.
* ``duplicates`` - the speed view is higher and the archive (deduplicated) agrees with the
  batch view: the speed layer counted a copy twice.
* ``archive_lag`` - the speed view is higher and the archive *now* holds what the speed
  view counted: the batch view was built before the archive caught up.
* ``unexplained`` - none of the above fits (the speed view is higher and there is no
  archive to check against).

Malformed dead letters (decode failures) are counted by reason in the report; neither view
counts them, so they never make a difference.

The batch wins
--------------
After the comparison every differing or missing cell of the speed view is overwritten with
the batch value in the day hash of its bucket (``layout.speed_key(entity, id,
layout.speed_day(bucket, res))``; one ``HSET`` of absolute values per day hash, all
resolutions at once - running it twice changes nothing), cells the batch view does not hold
are deleted from it (``HDEL``), and a hash created this way gets the speed view's hash TTL
(``layout.speed_hash_ttl_ms``, ``PEXPIRE ... NX``: sent for every repaired hash, it never
changes the TTL the speed layer set, but also covers a hash that expired between the read
and the repair). Only closed buckets of the overlap are touched, which the speed layer never
writes again.

Outputs: a :class:`Report` (``report.to_dict()``, ``report.markdown()``), written to
``{data_dir}/reports/reconcile-{version}.json`` and ``.md``, kept in Redis under
``reconcile:{version}`` (JSON) and ``reconcile:last``, and exported as Prometheus metrics.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.kafka.deadletters import read_dead_letters

log = logging.getLogger("ctrstream.reconcile")

FIELD_RE = re.compile(rb"^([ic])(-?\d+)$")  # batch view: {type}{bucket}
SPEED_FIELD_RE = re.compile(rb"^([^:]+):([ic])(-?\d+)$")  # speed view: {res}:{type}{bucket}
SPEED_PREFIX = L.SPEED_PREFIX
_RES_BY_BYTES = {r.name.encode(): r.name for r in F.RESOLUTIONS}
_ET_BY_BYTES = {t.encode(): t for t in F.EVENT_TYPES}
REASONS = ("late", "late+lost_update", "lost_update", "missing_key", "duplicates",
           "archive_lag", "unexplained")
SCAN_COUNT = 5000
CHUNK = 20_000


@dataclass
class Difference:
    entity: str
    eid: str
    res: str
    bucket: int
    event_type: str
    batch: int | None
    speed: int | None
    diff: int  # batch - speed (absent = 0)
    reason: str
    late_events: int = 0
    detail: str = ""

    @property
    def bucket_start_ms(self) -> int:
        return self.bucket * F.RESOLUTION_BY_NAME[self.res].bucket_ms


@dataclass
class Report:
    version: str
    cutoff_ms: int
    overlap: dict  # res -> [first bucket, end bucket) compared
    buckets_compared: int = 0
    buckets_equal: int = 0
    buckets_differing: int = 0
    missing_in_speed: int = 0
    missing_in_batch: int = 0
    cells_compared: int = 0
    cells_differing: int = 0
    reasons: dict = field(default_factory=dict)  # reason -> cells
    by_entity: dict = field(default_factory=dict)  # entity/res -> differing cells
    dlq: dict = field(default_factory=dict)  # late / malformed counts by reason
    differences: list = field(default_factory=list)  # every differing cell (capped in output)
    largest: list = field(default_factory=list)  # the largest absolute differences
    applied_cells: int = 0
    applied: bool = False
    seconds: float = 0.0
    created_ms: int = 0

    @property
    def explained(self) -> bool:
        return self.reasons.get("unexplained", 0) == 0

    def to_dict(self, max_differences: int = 1000) -> dict:
        d = asdict(self)
        d["differences"] = [asdict(x) for x in self.differences[:max_differences]]
        d["differences_total"] = len(self.differences)
        d["largest"] = [asdict(x) for x in self.largest]
        d["explained"] = self.explained
        return d

    def markdown(self) -> str:
        lines = [f"# Reconciliation of batch view `{self.version}`", "",
                 f"cut-off {self.cutoff_ms} ({_iso(self.cutoff_ms)}); overlap compared: "
                 + ", ".join(f"{r} buckets {a}..{b - 1}" for r, (a, b) in self.overlap.items()
                             if b > a), "",
                 "| buckets | count |", "|---|---:|",
                 f"| compared | {self.buckets_compared} |", f"| equal | {self.buckets_equal} |",
                 f"| differing | {self.buckets_differing} |",
                 f"| missing in speed view | {self.missing_in_speed} |",
                 f"| missing in batch view | {self.missing_in_batch} |", "",
                 f"{self.cells_differing} of {self.cells_compared} cells differ; "
                 + ("every difference is explained." if self.explained
                    else f"**{self.reasons.get('unexplained', 0)} unexplained**."), ""]
        if self.reasons:
            lines += ["| reason | cells |", "|---|---:|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(self.reasons.items(), key=lambda x: -x[1])]
            lines.append("")
        if self.dlq:
            lines.append("Dead letters read: " + ", ".join(f"{k}: {v}" for k, v in
                                                           sorted(self.dlq.items())))
            lines.append("")
        if self.largest:
            lines += ["Largest differences:", "",
                      "| entity | id | res | bucket start | cell | batch | speed | reason |",
                      "|---|---|---|---|---|---:|---:|---|"]
            for x in self.largest:
                lines.append(f"| {x.entity} | {x.eid} | {x.res} | {_iso(x.bucket_start_ms)} | "
                             f"{x.event_type} | {x.batch} | {x.speed} | {x.reason}"
                             f"{' (' + x.detail + ')' if x.detail else ''} |")
            lines.append("")
        lines.append(f"Batch values written to the speed view: {self.applied_cells} cells"
                     + ("" if self.applied else " (dry run: nothing written)") + ".")
        return "\n".join(lines) + "\n"


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


# --------------------------------------------------------------------------- reading the views

def _parse_key(rest: str) -> tuple[str, str, str] | None:
    """Batch view ``{entity}:{id}:{res}`` -> parts (ids of crossed entities contain ``:``)."""
    try:
        entity, tail = rest.split(":", 1)
        eid, res = tail.rsplit(":", 1)
    except ValueError:
        return None
    if entity not in F.ENTITY_BY_NAME or res not in F.RESOLUTION_BY_NAME:
        return None
    return entity, eid, res


def _parse_speed_key(rest: str) -> tuple[str, str, int] | None:
    """Speed view ``{entity}:{id}:{day}`` -> ``(entity, id, day)`` (``layout.speed_entity_of``;
    the id of a crossed entity contains ``:``), None for any other key under ``sv:``."""
    try:
        entity, eid, day = L.speed_entity_of(SPEED_PREFIX + rest)
    except ValueError:
        return None
    if not eid or entity not in F.ENTITY_BY_NAME:
        return None
    return entity, eid, day


@contextmanager
def _gc_paused():
    """Millions of small dicts: the cyclic GC would re-traverse all of them on every gen-2
    collection (most of the time went there); nothing built here forms a cycle."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc_was:
            gc.enable()


def _scan_keys(r, prefix: str, match: str, parse) -> list[tuple[bytes, tuple]]:
    """(key, parsed key) of every key SCAN finds for ``match`` that ``parse`` accepts (the
    part after ``prefix``)."""
    keys = []
    for k in r.scan_iter(match=match, count=SCAN_COUNT):
        parsed = parse(k.decode()[len(prefix):])
        if parsed:
            keys.append((k, parsed))
    return keys


def _read_hashes(r, keys: list[tuple[bytes, tuple]], settings=None):
    """HGETALL of every key of ``keys`` (pairs from :func:`_scan_keys`), pipelined in chunks;
    yields (parsed key, iterable of (field, value) bytes). A hash that expired between the
    SCAN and its read comes back empty. With ``settings`` the HGETALLs go through the speed
    layer's RESP writer (hiredis-parsed replies, no redis-py objects per command: millions
    of hashes in seconds)."""
    fast = None
    if settings is not None:
        from ctrstream.store.resp import RespPipeline, encode

        fast = RespPipeline(settings, timeout=60.0)
    try:
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i:i + CHUNK]
            if fast is not None:
                replies = fast.execute_replies([encode((b"HGETALL", k)) for k, _ in chunk])
                hashes = [zip(h[0::2], h[1::2]) for h in replies]
            else:
                pipe = r.pipeline(transaction=False)
                for k, _ in chunk:
                    pipe.hgetall(k)
                hashes = [h.items() for h in pipe.execute()]
            for (_, parsed), h in zip(chunk, hashes):
                yield parsed, h
    finally:
        if fast is not None:
            fast.close()


def _scan_view(r, prefix: str, settings=None, res: str | None = None) -> dict[tuple[str, str, str], dict]:
    """Every batch-view hash under ``prefix`` (of resolution ``res`` only, when given) parsed
    into {(entity, eid, res): {(type, bucket): count}}. A hash that expired between the SCAN
    and its read is left out (it is missing, not empty). ``settings``: see
    :func:`_read_hashes`."""
    keys = _scan_keys(r, prefix, prefix + "*" + (f":{res}" if res else ""), _parse_key)
    out = {}
    with _gc_paused():
        for parsed, h in _read_hashes(r, keys, settings):
            cells = {}
            for f, v in h:
                m = FIELD_RE.match(f)
                if m:
                    cells[(m.group(1).decode(), int(m.group(2)))] = int(v)
            if cells:
                out[parsed] = cells
    return out


def _scan_speed_view(r, settings=None) -> tuple[dict[str, dict], set[tuple[str, str, int]]]:
    """The whole speed view - one SCAN of ``sv:*`` and one HGETALL per day hash, which holds
    every resolution's buckets of that day - split by the fields' ``{res}:`` prefix and
    merged over an entity's day hashes into {res: {(entity, eid, res): {(type, bucket):
    count}}} (the shape :func:`_scan_view` gives per resolution), and the set of
    (entity, eid, day) whose day hash has any cell at all. A hash that expired between the
    SCAN and its read is left out."""
    keys = _scan_keys(r, SPEED_PREFIX, SPEED_PREFIX + "*", _parse_speed_key)
    out: dict[str, dict] = {res.name: {} for res in F.RESOLUTIONS}
    present: set[tuple[str, str, int]] = set()
    match = SPEED_FIELD_RE.match
    with _gc_paused():
        for (entity, eid, day), h in _read_hashes(r, keys, settings):
            by_res: dict[str, dict] = {}
            for f, v in h:
                m = match(f)
                if m is None:
                    continue
                res = _RES_BY_BYTES.get(m.group(1))
                if res is None:
                    continue
                cells = by_res.get(res)
                if cells is None:
                    cells = by_res[res] = {}
                cells[(_ET_BY_BYTES[m.group(2)], int(m.group(3)))] = int(v)
            if by_res:
                present.add((entity, eid, day))
                for res, cells in by_res.items():
                    view, ident = out[res], (entity, eid, res)
                    merged = view.get(ident)
                    if merged is None:
                        view[ident] = cells
                    else:  # another day of the same entity: distinct buckets
                        merged.update(cells)
    return out, present


def _bucket_span(view: dict) -> dict[str, tuple[int, int]]:
    """Per resolution: (min bucket, max bucket) held by a view."""
    span = {}
    for (_, _, res), cells in view.items():
        for (_, b) in cells:
            lo, hi = span.get(res, (b, b))
            span[res] = (min(lo, b), max(hi, b))
    return span


# --------------------------------------------------------------------------- the dead letters

def late_cells(settings, letters) -> tuple[dict, Counter]:
    """Distinct late events per cell {(entity, eid, res, type, bucket): n}, and the counts of
    every dead letter by kind (``late``, ``late_duplicate_copy``, malformed reasons ...)."""
    from ctrstream.events import decode_click, decode_impression

    kinds = Counter()
    seen: set[tuple[str, str]] = set()
    cells: dict = defaultdict(int)
    topics = {settings.topics.impressions.name: ("i", decode_impression),
              settings.topics.clicks.name: ("c", decode_click)}
    for dl in letters:
        label = dl.reason.split(":", 1)[0].strip() or "unknown"
        if not dl.reason.startswith("late"):
            kinds[f"{dl.stage}:{label}"] += 1
            continue
        if dl.source_topic not in topics:
            kinds[f"late:{dl.source_topic}"] += 1
            continue
        et, decode = topics[dl.source_topic]
        try:
            ev = decode(dl.original)
        except Exception:  # noqa: BLE001
            kinds["late:undecodable"] += 1
            continue
        eid_ = ev.impression_id if et == "i" else ev.click_id
        if (et, eid_) in seen:  # the dlq is at-least-once; one copy per event id
            kinds["late:repeated_dead_letter"] += 1
            continue
        seen.add((et, eid_))
        kinds["late"] += 1
        for ent in F.ENTITIES:
            ident = F.entity_id(ent, ev)
            for res in F.RESOLUTIONS:
                cells[(ent.name, ident, res.name, et, F.bucket_of(ev.event_time_ms, res))] += 1
    return dict(cells), kinds


# --------------------------------------------------------------------------- the archive check

def _archive_counts(data_dir, cells: list[tuple], settings) -> dict | None:
    """Counts the (deduplicated) archive holds now for the given cells, or None when there is
    no archive. ``cells`` are (entity, eid, res, type, bucket)."""
    if data_dir is None or not cells:
        return None
    try:
        from ctrstream.batch.archive import archive_root, read_events
        from ctrstream.batch.point_in_time import bucket_counts
    except ImportError:
        return None
    if not Path(archive_root(data_dir)).exists():
        return None
    lo = min(b * F.RESOLUTION_BY_NAME[r].bucket_ms for _, _, r, _, b in cells)
    hi = max((b + 1) * F.RESOLUTION_BY_NAME[r].bucket_ms for _, _, r, _, b in cells)
    imps = read_events(data_dir, "impressions", lo, hi)
    clks = read_events(data_dir, "clicks", lo, hi)
    bc = bucket_counts(imps, clks, until_ms=hi, since_ms=lo).to_pydict()
    want = set(cells)
    out = {}
    for ent, eid, res, b, ni, nc in zip(bc["entity"], bc["eid"], bc["res"], bc["bucket"],
                                       bc["imps"], bc["clicks"]):
        for et, n in (("i", ni), ("c", nc)):
            k = (ent, eid, res, et, b)
            if k in want:
                out[k] = int(n)
    return {k: out.get(k, 0) for k in cells}


# --------------------------------------------------------------------------- Prometheus

_METRICS = None


def _metrics():
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter as PCounter, Gauge

        _METRICS = {
            "buckets": Gauge("ctrstream_reconcile_buckets",
                             "buckets of the last reconciliation by outcome", ["outcome"]),
            "cells": Gauge("ctrstream_reconcile_differing_cells",
                           "differing cells of the last reconciliation by reason", ["reason"]),
            "applied": PCounter("ctrstream_reconcile_applied_cells_total",
                                "speed-view cells overwritten with batch values"),
            "runs": PCounter("ctrstream_reconcile_runs_total", "reconciliations run"),
        }
    return _METRICS


# --------------------------------------------------------------------------- reconcile

def _compare_views(r, version, settings, cutoff, lateness, closed_before_ms, late, report,
                   diffs, writes, missing_keys) -> None:
    """Compare the batch and speed views one resolution at a time, the finest first: its
    newest bucket start is the speed layer's high-water (every event is counted at every
    resolution, and the finest bucket starts latest). The speed view is read once (one hash
    per entity and day holds every resolution; the finest resolution's buckets dominate it
    anyway), each resolution's part dropped once compared; the batch view one resolution at
    a time. Fills ``diffs``, ``writes`` ({(entity, eid, day): ({field: value} to set,
    [fields] to delete)}, all resolutions of a day hash together) and ``missing_keys``
    ((entity, eid, day) of compared buckets with no speed hash for that day); fills
    ``report``."""
    speed_all, speed_present = _scan_speed_view(r, settings)
    high = 0
    for res in sorted(F.RESOLUTIONS, key=lambda x: x.bucket_ms):
        batch = _scan_view(r, f"bv:{version}:", settings, res.name)
        speed = speed_all.pop(res.name)
        bspan, sspan = _bucket_span(batch), _bucket_span(speed)
        if res.name in sspan:
            high = max(high, sspan[res.name][1] * res.bucket_ms)
        if res.name not in bspan or res.name not in sspan:
            report.overlap[res.name] = (0, 0)
            continue
        # the speed view is sure to hold only the newest speed_keep_buckets buckets (older
        # day hashes expire): never compare beyond that
        lo = max(bspan[res.name][0], sspan[res.name][0],
                 sspan[res.name][1] - L.speed_keep_buckets(res, lateness) + 1)
        end_ms = min(cutoff, high - lateness)
        if closed_before_ms is not None:
            end_ms = min(end_ms, closed_before_ms)
        hi = end_ms // res.bucket_ms  # buckets b with (b+1)*size <= end
        report.overlap[res.name] = (lo, hi)
        if hi <= lo:
            continue
        for ident in set(batch) | set(speed):
            entity, eid, _ = ident
            bc, sc = batch.get(ident, {}), speed.get(ident)
            s_cells = sc or {}
            buckets = {b for (_, b) in bc if lo <= b < hi} | {b for (_, b) in s_cells if lo <= b < hi}
            if not buckets:
                continue
            for b in buckets:
                day = L.speed_day(b, res)
                if (entity, eid, day) not in speed_present:
                    missing_keys.add((entity, eid, day))
                report.buckets_compared += 1
                in_b = any((t, b) in bc for t in F.EVENT_TYPES)
                in_s = any((t, b) in s_cells for t in F.EVENT_TYPES)
                bucket_differs = False
                for t in F.EVENT_TYPES:
                    report.cells_compared += 1
                    bv, sv = bc.get((t, b)), s_cells.get((t, b))
                    d = (bv or 0) - (sv or 0)
                    if d == 0:
                        continue
                    bucket_differs = True
                    nl = late.get((entity, eid, res.name, t, b), 0)
                    diffs.append(Difference(entity, eid, res.name, b, t, bv, sv, d, "", nl))
                    # the repair goes to the hash of the bucket's day
                    sets, dels = writes.get((entity, eid, day)) or \
                        writes.setdefault((entity, eid, day), ({}, []))
                    if bv is None:
                        dels.append(L.speed_field(res.name, t, b))
                    else:
                        sets[L.speed_field(res.name, t, b)] = bv
                if not bucket_differs:
                    report.buckets_equal += 1
                elif in_b and not in_s:
                    report.missing_in_speed += 1
                elif in_s and not in_b:
                    report.missing_in_batch += 1
                else:
                    report.buckets_differing += 1
        del batch, speed


def reconcile(settings, data_dir=None, version: str | None = None, *, apply: bool = True,
              closed_before_ms: int | None = None, read_dlq: bool = True, write: bool = True,
              redis_client=None, n_largest: int = 10) -> Report:
    """Compare batch view ``version`` (default: the served one, ``bv:current``) with the speed
    view over their closed overlap, explain every difference, and (``apply``) let the batch
    values win in the speed view. Returns the :class:`Report` (also written, see module doc)."""
    import redis

    t0 = time.monotonic()
    data_dir = Path(data_dir) if data_dir is not None else settings.data_dir
    r = redis_client or redis.Redis.from_url(settings.redis.url)
    if version is None:
        v = r.get(L.BATCH_POINTER_KEY)
        if not v:
            raise RuntimeError(f"no batch view is served ({L.BATCH_POINTER_KEY} is not set): "
                               "publish one first (`ctrstream publish-batch-view` / "
                               "ctrstream.batch.views.publish_batch_view) or pass --version")
        version = v.decode()
    meta = {k.decode(): v.decode() for k, v in r.hgetall(L.batch_meta_key(version)).items()}
    if "cutoff_ms" not in meta:
        raise RuntimeError(f"batch view {version!r} has no {L.batch_meta_key(version)} cutoff_ms")
    cutoff = int(meta["cutoff_ms"])

    lateness = int(settings.allowed_lateness_s * 1000)
    report = Report(version=version, cutoff_ms=cutoff, overlap={},
                    created_ms=int(time.time() * 1000))
    late, kinds = late_cells(settings, read_dead_letters(settings)) if read_dlq else ({}, Counter())
    report.dlq = dict(kinds)

    diffs: list[Difference] = []
    writes: dict[tuple[str, str, int], tuple[dict, list]] = {}  # (entity, eid, day) -> (sets, dels)
    missing_keys: set[tuple[str, str, int]] = set()  # (entity, eid, day) without a speed hash
    with _gc_paused():  # no cycles here, and millions of live objects
        _compare_views(r, version, settings, cutoff, lateness, closed_before_ms, late, report,
                       diffs, writes, missing_keys)
    report.overlap = {res.name: report.overlap[res.name] for res in F.RESOLUTIONS}

    # reasons
    need_archive = [(x.entity, x.eid, x.res, x.event_type, x.bucket) for x in diffs if x.diff < 0]
    archive = _archive_counts(data_dir, need_archive, settings) if need_archive else None
    for x in diffs:
        key_missing = (x.entity, x.eid,
                       L.speed_day(x.bucket, F.RESOLUTION_BY_NAME[x.res])) in missing_keys
        if x.diff > 0:
            if x.late_events >= x.diff:
                x.reason = "late"
                x.detail = (f"{x.late_events} late event(s) in the dlq"
                            + (f", {x.late_events - x.diff} of them copies of counted events"
                               if x.late_events > x.diff else ""))
            elif x.late_events > 0:
                x.reason = "late+lost_update"
                x.detail = f"{x.late_events} late, {x.diff - x.late_events} lost"
            elif key_missing:
                x.reason = "missing_key"
                x.detail = ("no speed-view hash for the bucket's day: never written (crash) "
                            "or TTL-expired")
            else:
                x.reason = "lost_update"
                x.detail = "speed view lower, no late event: update lost (crash before flush)"
        else:
            a = archive.get((x.entity, x.eid, x.res, x.event_type, x.bucket)) if archive else None
            if a is None:
                x.reason = "unexplained"
                x.detail = "speed view higher; no archive to check against"
            elif a == (x.speed or 0):
                x.reason = "archive_lag"
                x.detail = f"archive now holds {a}: batch built before it caught up"
            elif a == (x.batch or 0):
                x.reason = "duplicates"
                x.detail = f"deduplicated archive holds {a}: speed view counted copies"
            else:
                x.reason = "unexplained"
                x.detail = f"archive holds {a}"
    report.differences = diffs
    report.cells_differing = len(diffs)
    report.reasons = dict(Counter(x.reason for x in diffs))
    report.by_entity = dict(Counter(f"{x.entity}/{x.res}" for x in diffs))
    report.largest = sorted(diffs, key=lambda x: (-abs(x.diff), x.entity, x.eid, x.bucket))[:n_largest]

    if apply and writes:
        ttl = L.speed_hash_ttl_ms(lateness)
        items = list(writes.items())
        for i in range(0, len(items), CHUNK):
            pipe = r.pipeline(transaction=False)
            for (entity, eid, day), (sets, dels) in items[i:i + CHUNK]:
                key = L.speed_key(entity, eid, day)
                if sets:
                    pipe.hset(key, mapping=sets)
                if dels:
                    pipe.hdel(key, *dels)
                # a hash this created (absent, or expired since it was read) gets the
                # speed view's TTL; NX leaves the TTL of an existing hash as it is
                pipe.execute_command("PEXPIRE", key, ttl, "NX")
            pipe.execute()
        report.applied_cells = sum(len(s) + len(d) for s, d in writes.values())
    report.applied = apply
    report.seconds = time.monotonic() - t0

    g = _metrics()
    g["runs"].inc()
    for outcome, v in (("compared", report.buckets_compared), ("equal", report.buckets_equal),
                       ("differing", report.buckets_differing),
                       ("missing_in_speed", report.missing_in_speed),
                       ("missing_in_batch", report.missing_in_batch)):
        g["buckets"].labels(outcome).set(v)
    for reason in REASONS:
        g["cells"].labels(reason).set(report.reasons.get(reason, 0))
    g["applied"].inc(report.applied_cells)

    if write:
        doc = json.dumps(report.to_dict(), indent=2, default=str)
        out = data_dir / "reports"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"reconcile-{version}.json").write_text(doc)
        (out / f"reconcile-{version}.md").write_text(report.markdown())
        summary = report.to_dict(max_differences=50)
        r.set(f"reconcile:{version}", json.dumps(summary, default=str))
        r.set("reconcile:last", version)
    log.info("reconciled batch view %s: %d buckets compared, %d differing, %d/%d missing "
             "(speed/batch), reasons %s, %d cells written", version, report.buckets_compared,
             report.buckets_differing, report.missing_in_speed, report.missing_in_batch,
             report.reasons, report.applied_cells)
    return report


def watch(settings, data_dir=None, interval_s: float = 5.0, stop=None, **kw) -> None:
    """Reconcile every batch view as it lands (each new value of ``bv:current``)."""
    import redis

    r = redis.Redis.from_url(settings.redis.url)
    last = r.get("reconcile:last")
    while not (stop and stop()):
        cur = r.get(L.BATCH_POINTER_KEY)
        if cur and cur != last:
            reconcile(settings, data_dir, cur.decode(), redis_client=r, **kw)
            last = cur
        time.sleep(interval_s)
