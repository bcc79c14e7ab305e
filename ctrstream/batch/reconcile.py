"""``ctrstream reconcile``: compare a landed batch view with the speed view; the batch wins.

What is compared
----------------
For every resolution of ``ctrstream.features.RESOLUTIONS`` the **overlap** is the bucket
range both views cover and both consider closed:

* the batch view (version ``version``, :mod:`ctrstream.store.batch_view`) covers buckets
  from its oldest bucket up to its cut-off (the version's meta ``cutoff_ms``; a bucket is
  closed when its end is ``<= cutoff_ms``);
* the speed view (:mod:`ctrstream.store.speed_view`: one hash per entity id and event day -
  days since the epoch, UTC, ``layout.speed_day`` - holding the buckets of that day of every
  resolution; an entity's day hashes are merged into its buckets per resolution) covers
  buckets from its oldest bucket on. Its day hashes are never pruned but expire
  (``layout.speed_hash_ttl_ms`` after their last new hour), so it is sure to hold only the
  newest ``layout.speed_keep_buckets`` buckets of each resolution: the overlap starts no
  earlier than that many buckets before the high-water. A bucket is closed in it once its
  end is ``<= speed high-water - allowed lateness`` (the high-water is the start of the
  newest bucket the speed view holds: the speed layer's event time has reached at least
  that);

``closed_before_ms`` narrows it further. Inside the overlap every bucket either view holds
is compared, per entity id and resolution, cell by cell (impressions and clicks; an absent
cell counts as 0). A bucket is *equal* when both cells agree, *differing* when both views
hold it and a cell differs, *missing in speed* / *missing in batch* when only one view holds
it (with a non-zero count).

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
  (absent or empty, so no resolution holds any bucket of that day: never written - a crash
  - or TTL-expired), while another day's hash of the same entity may well exist; a day hash
  that exists but lacks the cell is a ``lost_update``.
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
the batch value in the day hash of its bucket, and cells the batch view does not hold are
deleted from it (``speed_view.repair_speed_cells``: absolute values, so running it twice
changes nothing; a day hash it creates gets the speed view's hash TTL, an existing one
keeps its own). Only closed buckets of the overlap are touched, which the speed layer never
writes again.

Outputs: a :class:`Report` (``report.to_dict()``, ``report.markdown()``), written to
``{data_dir}/reports/reconcile-{version}.json`` and ``.md``, kept in Redis
(``ctrstream.store.reports``), and exported as Prometheus metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctrstream import features as F
from ctrstream.events import Click, Impression, decode_click, decode_impression
from ctrstream.kafka.deadletters import read_dead_letters
from ctrstream.store import batch_view as BV
from ctrstream.store import layout as L
from ctrstream.store import reports
from ctrstream.store import speed_view as SV
from ctrstream.store.connection import redis_client as open_redis
from ctrstream.store.scan import gc_paused

log = logging.getLogger("ctrstream.reconcile")

REASONS = (
    "late",
    "late+lost_update",
    "lost_update",
    "missing_key",
    "duplicates",
    "archive_lag",
    "unexplained",
)
REDIS_TIMEOUT_S = 120.0  # the reconciler's redis-py client (scans of whole views)


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
        lines = [
            f"# Reconciliation of batch view `{self.version}`",
            "",
            f"cut-off {self.cutoff_ms} ({_iso(self.cutoff_ms)}); overlap compared: "
            + ", ".join(f"{r} buckets {a}..{b - 1}" for r, (a, b) in self.overlap.items() if b > a),
            "",
            "| buckets | count |",
            "|---|---:|",
            f"| compared | {self.buckets_compared} |",
            f"| equal | {self.buckets_equal} |",
            f"| differing | {self.buckets_differing} |",
            f"| missing in speed view | {self.missing_in_speed} |",
            f"| missing in batch view | {self.missing_in_batch} |",
            "",
            f"{self.cells_differing} of {self.cells_compared} cells differ; "
            + (
                "every difference is explained."
                if self.explained
                else f"**{self.reasons.get('unexplained', 0)} unexplained**."
            ),
            "",
        ]
        if self.reasons:
            lines += ["| reason | cells |", "|---|---:|"]
            lines += [
                f"| {k} | {v} |" for k, v in sorted(self.reasons.items(), key=lambda x: -x[1])
            ]
            lines.append("")
        if self.dlq:
            lines.append(
                "Dead letters read: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.dlq.items()))
            )
            lines.append("")
        if self.largest:
            lines += [
                "Largest differences:",
                "",
                "| entity | id | res | bucket start | cell | batch | speed | reason |",
                "|---|---|---|---|---|---:|---:|---|",
            ]
            for x in self.largest:
                lines.append(
                    f"| {x.entity} | {x.eid} | {x.res} | {_iso(x.bucket_start_ms)} | "
                    f"{x.event_type} | {x.batch} | {x.speed} | {x.reason}"
                    f"{' (' + x.detail + ')' if x.detail else ''} |"
                )
            lines.append("")
        lines.append(
            f"Batch values written to the speed view: {self.applied_cells} cells"
            + ("" if self.applied else " (dry run: nothing written)")
            + "."
        )
        return "\n".join(lines) + "\n"


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


# --------------------------------------------------------------------------- the views


def _bucket_span(view: dict) -> dict[str, tuple[int, int]]:
    """Per resolution: (min bucket, max bucket) held by a view."""
    span: dict[str, tuple[int, int]] = {}
    for (_, _, res), cells in view.items():
        for _, b in cells:
            lo, hi = span.get(res, (b, b))
            span[res] = (min(lo, b), max(hi, b))
    return span


# --------------------------------------------------------------------------- the dead letters


def late_cells(settings, letters) -> tuple[dict, Counter]:
    """Distinct late events per cell {(entity, eid, res, type, bucket): n}, and the counts of
    every dead letter by kind (``late``, ``late_duplicate_copy``, malformed reasons ...)."""
    kinds: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    cells: dict = defaultdict(int)
    topics: dict[str, tuple[str, Callable[[bytes], Impression | Click]]] = {
        settings.topics.impressions.name: ("i", decode_impression),
        settings.topics.clicks.name: ("c", decode_click),
    }
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
        except Exception:  # noqa: BLE001 - an undecodable dead letter is counted, not fatal
            kinds["late:undecodable"] += 1
            continue
        eid_ = ev.impression_id if isinstance(ev, Impression) else ev.click_id
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
    for ent, eid, res, b, ni, nc in zip(
        bc["entity"], bc["eid"], bc["res"], bc["bucket"], bc["imps"], bc["clicks"]
    ):
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
        from prometheus_client import Counter as PCounter
        from prometheus_client import Gauge

        _METRICS = {
            "buckets": Gauge(
                "ctrstream_reconcile_buckets",
                "buckets of the last reconciliation by outcome",
                ["outcome"],
            ),
            "cells": Gauge(
                "ctrstream_reconcile_differing_cells",
                "differing cells of the last reconciliation by reason",
                ["reason"],
            ),
            "applied": PCounter(
                "ctrstream_reconcile_applied_cells_total",
                "speed-view cells overwritten with batch values",
            ),
            "runs": PCounter("ctrstream_reconcile_runs_total", "reconciliations run"),
        }
    return _METRICS


# --------------------------------------------------------------------------- reconcile


def _compare_views(
    r, version, cutoff, lateness, closed_before_ms, late, report, diffs, writes, missing_keys, sl
) -> None:
    """Compare the batch and speed views one resolution at a time, the finest first: its
    newest bucket start is the speed layer's high-water (every event is counted at every
    resolution, and the finest bucket starts latest). The speed view is read once (one hash
    per entity and day holds every resolution; the finest resolution's buckets dominate it
    anyway), each resolution's part dropped once compared; the batch view one resolution at
    a time. Fills ``diffs``, ``writes`` ({cell: the batch value, None to delete the cell},
    cells as ``speed_view.Cell``) and ``missing_keys`` ((entity, eid, day) of compared
    buckets with no speed hash for that day - in the grouped layout: no cell of the entity in
    its root's hash of that day); fills ``report``. ``sl``: the speed view's layout."""
    speed_all, speed_present = SV.scan_speed_view(r, sl)
    high = 0
    for res in sorted(F.RESOLUTIONS, key=lambda x: x.bucket_ms):
        batch = BV.scan_batch_view(r, version, res.name)
        speed = speed_all.pop(res.name)
        bspan, sspan = _bucket_span(batch), _bucket_span(speed)
        if res.name in sspan:
            high = max(high, sspan[res.name][1] * res.bucket_ms)
        if res.name not in bspan or res.name not in sspan:
            report.overlap[res.name] = (0, 0)
            continue
        # the speed view is sure to hold only the newest speed_keep_buckets buckets (older
        # day hashes expire): never compare beyond that
        lo = max(
            bspan[res.name][0],
            sspan[res.name][0],
            sspan[res.name][1] - L.speed_keep_buckets(res, lateness) + 1,
        )
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
            buckets = {b for (_, b) in bc if lo <= b < hi} | {
                b for (_, b) in s_cells if lo <= b < hi
            }
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
                    writes[(entity, eid, res.name, t, b)] = bv  # None: delete the cell
                if not bucket_differs:
                    report.buckets_equal += 1
                elif in_b and not in_s:
                    report.missing_in_speed += 1
                elif in_s and not in_b:
                    report.missing_in_batch += 1
                else:
                    report.buckets_differing += 1
        del batch, speed


def reconcile(
    settings,
    data_dir=None,
    version: str | None = None,
    *,
    apply: bool = True,
    closed_before_ms: int | None = None,
    read_dlq: bool = True,
    write: bool = True,
    redis_client=None,
    n_largest: int = 10,
) -> Report:
    """Compare batch view ``version`` (default: the served one) with the speed
    view over their closed overlap, explain every difference, and (``apply``) let the batch
    values win in the speed view. Returns the :class:`Report` (also written, see module doc)."""
    t0 = time.monotonic()
    data_dir = Path(data_dir) if data_dir is not None else settings.data_dir
    r = redis_client or open_redis(settings, timeout_s=REDIS_TIMEOUT_S)
    if version is None:
        version = BV.served_version(r)
        if not version:
            raise RuntimeError(
                "no batch view is served (no version behind the pointer): "
                "publish one first (`ctrstream batch-views` / "
                "ctrstream.batch.views.publish_batch_view) or pass --version"
            )
    meta = BV.read_meta(r, version)
    if "cutoff_ms" not in meta:
        raise RuntimeError(
            f"batch view {version!r} has no cutoff_ms in its meta: it is "
            "unknown or was not completely written (publish it again)"
        )
    cutoff = int(meta["cutoff_ms"])

    lateness = int(settings.allowed_lateness_s * 1000)
    report = Report(
        version=version, cutoff_ms=cutoff, overlap={}, created_ms=int(time.time() * 1000)
    )
    late, kinds = late_cells(settings, read_dead_letters(settings)) if read_dlq else ({}, Counter())
    report.dlq = dict(kinds)

    diffs: list[Difference] = []
    writes: dict[SV.Cell, int | None] = {}  # cell -> the batch value (None: delete it)
    missing_keys: set[SV.DayHash] = set()  # (entity, eid, day) without a speed hash
    with gc_paused():  # no cycles here, and millions of live objects
        _compare_views(
            r,
            version,
            cutoff,
            lateness,
            closed_before_ms,
            late,
            report,
            diffs,
            writes,
            missing_keys,
            L.speed_layout(settings.speed.layout),
        )
    report.overlap = {res.name: report.overlap[res.name] for res in F.RESOLUTIONS}

    # reasons
    need_archive = [(x.entity, x.eid, x.res, x.event_type, x.bucket) for x in diffs if x.diff < 0]
    archive = _archive_counts(data_dir, need_archive, settings) if need_archive else None
    for x in diffs:
        key_missing = (
            x.entity,
            x.eid,
            L.speed_day(x.bucket, F.RESOLUTION_BY_NAME[x.res]),
        ) in missing_keys
        if x.diff > 0:
            if x.late_events >= x.diff:
                x.reason = "late"
                x.detail = f"{x.late_events} late event(s) in the dlq" + (
                    f", {x.late_events - x.diff} of them copies of counted events"
                    if x.late_events > x.diff
                    else ""
                )
            elif x.late_events > 0:
                x.reason = "late+lost_update"
                x.detail = f"{x.late_events} late, {x.diff - x.late_events} lost"
            elif key_missing:
                x.reason = "missing_key"
                x.detail = (
                    "no speed-view hash for the bucket's day: never written (crash) or TTL-expired"
                )
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
    report.largest = sorted(diffs, key=lambda x: (-abs(x.diff), x.entity, x.eid, x.bucket))[
        :n_largest
    ]

    if apply and writes:
        report.applied_cells = SV.repair_speed_cells(
            r, writes, L.speed_hash_ttl_ms(lateness), L.speed_layout(settings.speed.layout)
        )
    report.applied = apply
    report.seconds = time.monotonic() - t0

    g = _metrics()
    g["runs"].inc()
    for outcome, v in (
        ("compared", report.buckets_compared),
        ("equal", report.buckets_equal),
        ("differing", report.buckets_differing),
        ("missing_in_speed", report.missing_in_speed),
        ("missing_in_batch", report.missing_in_batch),
    ):
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
        reports.save_reconcile_report(r, version, report.to_dict(max_differences=50))
    log.info(
        "reconciled batch view %s: %d buckets compared, %d differing, %d/%d missing "
        "(speed/batch), reasons %s, %d cells written",
        version,
        report.buckets_compared,
        report.buckets_differing,
        report.missing_in_speed,
        report.missing_in_batch,
        report.reasons,
        report.applied_cells,
    )
    return report


def watch(settings, data_dir=None, interval_s: float = 5.0, stop=None, **kw) -> None:
    """Reconcile every batch view as it lands (each newly served version)."""
    r = open_redis(settings, timeout_s=REDIS_TIMEOUT_S)
    last = reports.last_reconciled_version(r)
    while not (stop and stop()):
        cur = BV.served_version(r)
        if cur and cur != last:
            reconcile(settings, data_dir, cur, redis_client=r, **kw)
            last = cur
        time.sleep(interval_s)
