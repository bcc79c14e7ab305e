"""Batch features over the archive: the same declarations as the speed layer, in DuckDB.

Why DuckDB (and where not)
--------------------------
The batch layer's aggregation work is relational: group events by (entity, bucket) for the
bucket counts and the batch views, sum whole days for the long windows, attribute clicks to
impressions with a range join for the labels. DuckDB does these in one vectorized,
multi-threaded engine that reads pyarrow tables (and Parquet) without copies, from SQL that is
generated from ``ctrstream.features`` - no entity, bucket size or window is written here.
Polars would do as well for the group-bys but has no range join; pandas is row-slow; Spark is
a cluster for a laptop-sized job.

The point-in-time windows are the exception, chosen by measurement: DuckDB window functions
with per-row frame bounds (``RANGE BETWEEN <expr> PRECEDING AND 1 PRECEDING``) fall back to
per-row aggregation on large partitions (a 5-site entity over 1M events took 65 s) and an
ASOF join with 5 probes per impression took 5-7 s per entity on this 2-core machine. The
windows are instead evaluated as differences of prefix counts: events are sorted once per
entity by (entity key, time), and each window ``[lo, hi)`` is
``cum[searchsorted(hi)] - cum[searchsorted(lo)]`` - a handful of vectorized numpy calls per
entity (no Python loop over events), about 1 s per entity for 1M events.

Point-in-time semantics (what training reproduces of the serving path)
---------------------------------------------------------------------
* **Resolution windows** - the value at time ``t`` for resolution ``r`` sums buckets
  ``features.window_buckets(t, r)`` counting only events with ``event_time_ms < t``:
  events in ``[(t // r.bucket_ms - r.n_buckets + 1) * r.bucket_ms, t)``. Strictly earlier,
  so the impression itself, its own click and every later event never count.
* **Long windows** (``features.LONG_WINDOWS``) - whole UTC days: the value at ``t`` of a
  window of ``d`` days counts events in ``[day(t) - d days, day(t))`` where
  ``day(t) = t // DAY_MS * DAY_MS`` (see :func:`long_window_range`). It does not move
  within a day, so the batch view with cut-off ``T`` serves exactly the training value for
  every ``t`` on the day of ``T`` (``day(t) == day(T)``; the batch view computes the long
  windows at its cut-off with this same function). After midnight, until a batch view with a
  cut-off on the new day lands, serving reads the previous day's value: a staleness of the
  serving path, documented in ``ctrstream.batch.views``.
* **Labels** - an impression is clicked (label 1) when a click for its ``impression_id``
  has ``click.event_time_ms <= impression.event_time_ms + attribution window``; repeated
  clicks count once (the first gives ``click_delay_ms``; -1 when not clicked). Only
  impressions with ``event_time_ms <= max archived event time - attribution window`` are
  labeled (their labels are final).
* **Duplicates** - impressions and clicks are deduplicated by event id (earliest event time
  wins), as :func:`ctrstream.batch.archive.read_events` does, before anything is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa

from ctrstream import features as F
from ctrstream.batch import archive
from ctrstream.batch.archive import (
    KINDS,
    dedupe,
    empty_table,
    fetch_arrow,
    max_event_time,
    read_events,
)

DAY_MS = F.DAY_MS

# a time in ms: one int, or an int64 array of them (the training set's query times)
Time = TypeVar("Time", int, np.ndarray)


# --------------------------------------------------------------------------- window ranges

# bucket counts: one row per (entity, id, resolution, bucket) with events
BUCKET_COUNTS_SCHEMA = pa.schema(
    [
        ("entity", pa.string()),
        ("eid", pa.string()),
        ("res", pa.string()),
        ("bucket", pa.int64()),
        ("imps", pa.int64()),
        ("clicks", pa.int64()),
    ]
)
# long-window counts: one row per (entity, id, long window) with events
LONG_COUNTS_SCHEMA = pa.schema(
    [
        ("entity", pa.string()),
        ("eid", pa.string()),
        ("long_window", pa.string()),
        ("imps", pa.int64()),
        ("clicks", pa.int64()),
    ]
)


def align_day(t_ms: Time) -> Time:
    """Start (UTC midnight) of the day of ``t_ms``."""
    return (t_ms // DAY_MS) * DAY_MS


def long_window_range(t_ms: Time, window: F.LongWindow) -> tuple[Time, Time]:
    """``[lo, hi)`` event-time range the long window's value at ``t_ms`` counts."""
    hi = align_day(t_ms)
    return hi - window.days * DAY_MS, hi


def resolution_range(t_ms: Time, res: F.Resolution) -> tuple[Time, Time]:
    """``[lo, hi)`` event-time range of the point-in-time value of ``res`` at ``t_ms``."""
    return (t_ms // res.bucket_ms - res.n_buckets + 1) * res.bucket_ms, t_ms


def lookback_start(t_ms: int) -> int:
    """The earliest event time any window value at ``t_ms`` can count."""
    los = [resolution_range(t_ms, r)[0] for r in F.RESOLUTIONS]
    los += [long_window_range(t_ms, w)[0] for w in F.LONG_WINDOWS]
    return min(los)


# --------------------------------------------------------------------------- SQL pieces


def eid_sql(entity: F.Entity, alias: str = "") -> str:
    """SQL for ``features.entity_id`` (fields as text joined with ``:``)."""
    p = f"{alias}." if alias else ""
    return " || ':' || ".join(f"CAST({p}{f} AS VARCHAR)" for f in entity.fields)


def _connect(threads: int | None = None):
    import duckdb

    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def _as_tables(source, start_ms=None, end_imp_ms=None, end_clk_ms=None):
    """(impressions, clicks) deduplicated pyarrow tables from an archive directory, a
    ``(impressions, clicks)`` pair or an object with ``.impressions`` / ``.clicks``."""
    if isinstance(source, (str, Path)):
        return (
            read_events(source, "impressions", start_ms, end_imp_ms),
            read_events(source, "clicks", start_ms, end_clk_ms),
        )
    if hasattr(source, "impressions") and hasattr(source, "clicks"):
        imps, clks = source.impressions, source.clicks
    else:
        imps, clks = source
    return (
        dedupe("impressions", _cast(imps, "impressions"), start_ms, end_imp_ms),
        dedupe("clicks", _cast(clks, "clicks"), start_ms, end_clk_ms),
    )


def _cast(table: pa.Table | None, kind: str) -> pa.Table:
    if table is None:
        return empty_table(kind)
    return archive.conform(kind, table)


# --------------------------------------------------------------------------- bucket counts


def bucket_counts(
    events_i: pa.Table, events_c: pa.Table, until_ms: int, since_ms: int | None = None, con=None
) -> pa.Table:
    """Absolute impression/click counts per (entity, resolution, bucket) from the events
    with ``since_ms <= event_time_ms < until_ms`` (events deduplicated by id) - the values
    the speed view holds in the cells ``(entity, eid, res, i|c, bucket)`` of the hash of the
    bucket's event day (``layout.SpeedLayout.cell_address``).

    Returns columns ``entity, eid, res, bucket, imps, clicks`` (buckets with no event are
    absent), sorted by entity, eid, res, bucket.
    """
    own = con is None
    con = con or _connect()
    try:
        imps = dedupe("impressions", _cast(events_i, "impressions"), since_ms, until_ms)
        clks = dedupe("clicks", _cast(events_c, "clicks"), since_ms, until_ms)
        return _bucket_counts(con, imps, clks, {r.name: None for r in F.RESOLUTIONS})
    finally:
        if own:
            con.close()


def _bucket_counts(con, imps: pa.Table, clks: pa.Table, min_bucket: dict) -> pa.Table:
    """Bucket counts of already filtered, deduplicated events; ``min_bucket[res]`` (or None)
    drops older buckets."""
    con.register("_bi", imps)
    con.register("_bc", clks)
    parts = []
    for e in F.ENTITIES:
        for r in F.RESOLUTIONS:
            b = f"event_time_ms // {r.bucket_ms}"
            lo = min_bucket.get(r.name)
            cond = f"WHERE {b} >= {int(lo)}" if lo is not None else ""
            parts.append(
                f"SELECT '{e.name}' AS entity, {eid_sql(e)} AS eid, '{r.name}' AS res, "
                f"{b} AS bucket, sum(1 - c) AS imps, sum(c) AS clicks FROM _ev {cond} "
                f"GROUP BY ALL"
            )
    sql = (
        "WITH _ev AS (SELECT *, 0 AS c FROM (SELECT {cols} FROM _bi) "
        "UNION ALL SELECT *, 1 AS c FROM (SELECT {cols} FROM _bc)) "
    ).format(cols=", ".join(_count_fields()))
    sql += " UNION ALL ".join(parts) + " ORDER BY entity, eid, res, bucket"
    out = fetch_arrow(con, sql)
    con.unregister("_bi")
    con.unregister("_bc")
    return out.cast(BUCKET_COUNTS_SCHEMA)


def _count_fields() -> list[str]:
    fields = sorted({f for e in F.ENTITIES for f in e.fields})
    return fields + ["event_time_ms"]


def long_window_counts(
    events_i: pa.Table, events_c: pa.Table, at_ms: int, con=None, dedupe: bool = True
) -> pa.Table:
    """Long-window counts per entity id at time ``at_ms`` (:func:`long_window_range`).
    Returns columns ``entity, eid, long_window, imps, clicks`` (ids with no event absent)."""
    own = con is None
    con = con or _connect()
    try:
        imps, clks = _cast(events_i, "impressions"), _cast(events_c, "clicks")
        if dedupe:  # the flag shadows the function: archive.dedupe
            imps, clks = archive.dedupe("impressions", imps), archive.dedupe("clicks", clks)
        con.register("_li", imps)
        con.register("_lc", clks)
        cols = ", ".join(_count_fields())
        parts = []
        for w in F.LONG_WINDOWS:
            lo, hi = long_window_range(at_ms, w)
            for e in F.ENTITIES:
                parts.append(
                    f"SELECT '{e.name}' AS entity, {eid_sql(e)} AS eid, '{w.name}' AS long_window, "
                    f"sum(1 - c) AS imps, sum(c) AS clicks FROM _ev "
                    f"WHERE event_time_ms >= {lo} AND event_time_ms < {hi} GROUP BY ALL"
                )
        sql = (
            f"WITH _ev AS (SELECT {cols}, 0 AS c FROM _li UNION ALL "
            f"SELECT {cols}, 1 AS c FROM _lc) "
            + " UNION ALL ".join(parts)
            + " ORDER BY entity, eid, long_window"
        )
        out = fetch_arrow(con, sql)
        con.unregister("_li")
        con.unregister("_lc")
        return out.cast(LONG_COUNTS_SCHEMA)
    finally:
        if own:
            con.close()


# --------------------------------------------------------------------------- training set


def window_bounds(t_ms: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[lo, hi)`` arrays of every served window at times ``t_ms``, in dense_from_counts
    order (``RESOLUTIONS`` then ``LONG_WINDOWS``)."""
    t = np.asarray(t_ms, dtype=np.int64)
    out = [resolution_range(t, r) for r in F.RESOLUTIONS]
    out += [long_window_range(t, w) for w in F.LONG_WINDOWS]
    return out


def _entity_keys(entity: F.Entity, *tables: pa.Table, limit: int = 2**62) -> list[np.ndarray]:
    """Non-negative int64 key of ``entity`` for the rows of each table (same key = same
    entity id), below ``limit``: the fields' offsets combined arithmetically when the ranges
    allow, dense codes (``np.unique``) otherwise."""
    sizes = [t.num_rows for t in tables]
    key, size = None, 1
    for f in entity.fields:
        col = np.concatenate([t.column(f).to_numpy() for t in tables]).astype(np.int64)
        lo, hi = (int(col.min()), int(col.max())) if len(col) else (0, 0)
        if (hi - lo + 1) * size < limit:
            codes, n = col - lo, hi - lo + 1
        else:
            uniq, codes = np.unique(col, return_inverse=True)
            n = len(uniq)
        if key is not None and n * size >= limit:
            uniq, key = np.unique(key, return_inverse=True)
            size = len(uniq)
        key = codes if key is None else key * n + codes
        size *= n
    if key is None:
        raise ValueError(f"entity {entity.name!r} declares no fields: nothing to key it by")
    if size >= limit:
        _, key = np.unique(key, return_inverse=True)
    return np.split(np.asarray(key, dtype=np.int64), np.cumsum(sizes)[:-1])


def point_in_time_counts(
    imps: pa.Table,
    clks: pa.Table,
    query: pa.Table,
    visible_until_ms: np.ndarray | None = None,
    entities: Sequence[int] | None = None,
) -> np.ndarray:
    """Window counts ``(rows of query, len(ENTITIES), N_WINDOWS, 2)`` that the serving path
    reads at each query row's ``event_time_ms``, from deduplicated impressions and clicks.
    Only events inside each window's ``[lo, hi)`` count (``hi = t`` for resolutions: strictly
    earlier events). ``query`` needs the entity fields and ``event_time_ms``.

    ``visible_until_ms`` (one time per query row) serves stale features: the windows stay
    anchored at the row's time but count only events before ``min(hi, visible_until)`` -
    what a store that has seen nothing newer serves (a speed layer lagging by ``lag`` is
    ``t - lag``; the batch view alone is the last cut-off before ``t``).

    ``entities``: the indexes into ``ENTITIES`` to count (default all; the others stay 0) -
    the Spark engine counts one entity per partitioning, where only that entity's ids are
    complete."""
    n = query.num_rows
    counts = np.zeros((n, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.float64)
    if n == 0:
        return counts
    qt = query.column("event_time_ms").to_numpy().astype(np.int64)
    bounds = window_bounds(qt)
    if visible_until_ms is not None:
        vis = np.asarray(visible_until_ms, dtype=np.int64)
        if vis.shape != qt.shape:
            raise ValueError(
                f"visible_until_ms has {vis.shape} times for {n} query rows: give one per row"
            )
        bounds = [(lo, np.maximum(lo, np.minimum(hi, vis))) for lo, hi in bounds]
    ev_t = np.concatenate(
        [imps.column("event_time_ms").to_numpy(), clks.column("event_time_ms").to_numpy()]
    ).astype(np.int64)
    is_click = np.concatenate([np.zeros(imps.num_rows, np.int64), np.ones(clks.num_rows, np.int64)])
    base = min(
        int(ev_t.min()) if len(ev_t) else int(qt.min()), min(int(lo.min()) for lo, _ in bounds)
    )
    top = max(
        int(ev_t.max()) if len(ev_t) else 0, int(qt.max()), max(int(hi.max()) for _, hi in bounds)
    )
    span = top - base + 2
    both = pa.concat_tables([imps.select(_count_fields()), clks.select(_count_fields())])
    for k, e in enumerate(F.ENTITIES):
        if entities is not None and k not in entities:
            continue
        ev_key, q_key = _entity_keys(e, both, query, limit=(2**62) // span)
        comp = ev_key * span + (ev_t - base)
        order = np.argsort(comp, kind="stable")
        comp = comp[order]
        cum_c = np.concatenate([[0], np.cumsum(is_click[order])])
        # probe in (key, time) order: sorted probes make searchsorted cache-friendly (~20x)
        qorder = np.argsort(q_key * span + (qt - base), kind="stable")
        qbase = q_key[qorder] * span - base
        buf = np.empty((n, F.N_WINDOWS, 2), dtype=np.float64)
        for w, (lo, hi) in enumerate(bounds):
            i_lo = np.searchsorted(comp, qbase + lo[qorder], side="left")
            i_hi = np.searchsorted(comp, qbase + hi[qorder], side="left")
            clicks = cum_c[i_hi] - cum_c[i_lo]
            buf[:, w, 0] = (i_hi - i_lo) - clicks
            buf[:, w, 1] = clicks
        inverse = np.empty(n, dtype=np.int64)
        inverse[qorder] = np.arange(n)
        counts[:, k] = buf[inverse]
    return counts


def training_set(
    data_dir_or_tables,
    start_ms: int | None = None,
    end_ms: int | None = None,
    attribution_window_ms: int = 1_800_000,
) -> dict:
    """Point-in-time correct, labeled training examples.

    ``data_dir_or_tables``: the data directory holding ``archive/`` (str or Path), a pair
    ``(impressions, clicks)`` of pyarrow Tables, or an object with ``.impressions`` and
    ``.clicks`` (the generator's traffic). Labeled rows are the impressions with
    ``start_ms <= event_time_ms < end_ms`` (bounds optional) whose labels are complete
    (``event_time_ms <= max event time - attribution_window_ms``), sorted by
    (event_time_ms, impression_id).

    Returns numpy arrays: ``impression_id`` (object, str), ``event_time_ms`` (int64),
    ``label`` (int8 0/1), ``click_delay_ms`` (int64, -1 when not clicked), ``counts``
    (float64, ``(rows, len(ENTITIES), N_WINDOWS, 2)``), ``dense`` (float32,
    ``features.dense_from_counts(counts)``), ``sparse`` (int64, ``features.sparse_ids``).
    """
    W = int(attribution_window_ms)
    from_archive = isinstance(data_dir_or_tables, (str, Path))
    if from_archive:
        max_t = max_event_time(data_dir_or_tables)
    else:
        imps, clks = _as_tables(data_dir_or_tables)
        tmax = [t.column("event_time_ms").to_numpy().max() for t in (imps, clks) if t.num_rows]
        max_t = int(max(tmax)) if tmax else None
    if max_t is None:
        return _empty_result()
    label_end = max_t - W + 1  # exclusive: labels complete for t <= max_t - W
    end = label_end if end_ms is None else min(int(end_ms), label_end)
    if from_archive:
        hist = None if start_ms is None else lookback_start(int(start_ms))
        imps = read_events(data_dir_or_tables, "impressions", hist, end)
        clks = read_events(data_dir_or_tables, "clicks", hist, end + W + 1)
    import pyarrow.compute as pc

    t_imp = imps.column("event_time_ms")
    qmask = pc.less(t_imp, end)
    if start_ms is not None:
        qmask = pc.and_(qmask, pc.greater_equal(t_imp, int(start_ms)))
    query = imps.filter(qmask)  # already sorted by (event_time_ms, impression_id)
    n = query.num_rows
    if n == 0:
        return _empty_result()

    # labels: the first click per impression within the attribution window (DuckDB range join)
    con = _connect()
    try:
        q_ids = pa.table(
            {
                "qid": np.arange(n, dtype=np.int64),
                "impression_id": query.column("impression_id"),
                "event_time_ms": query.column("event_time_ms"),
            }
        )
        con.register("q", q_ids)
        con.register("clk", clks.select(["impression_id", "event_time_ms"]))
        lab = con.execute(f"""
            SELECT q.qid, min(c.event_time_ms) - q.event_time_ms AS delay
            FROM q JOIN clk c ON c.impression_id = q.impression_id
                 AND c.event_time_ms <= q.event_time_ms + {W}
            GROUP BY q.qid, q.event_time_ms""").fetchnumpy()
    finally:
        con.close()
    label = np.zeros(n, dtype=np.int8)
    delay = np.full(n, -1, dtype=np.int64)
    label[lab["qid"]] = 1
    delay[lab["qid"]] = lab["delay"]

    # windows count only events before `end` (every later event is after every query time)
    before = lambda t: t.filter(pc.less(t.column("event_time_ms"), end))  # noqa: E731 - one filter, applied to both tables on the next line
    counts = point_in_time_counts(before(imps), before(clks), query)

    return training_rows(query, label, delay, counts)


def training_rows(
    query: pa.Table, label: np.ndarray, delay: np.ndarray, counts: np.ndarray
) -> dict[str, np.ndarray]:
    """The training set's arrays for the impressions ``query`` given their labels, click
    delays and window counts: ``dense`` and ``sparse`` by the functions serving calls."""
    t = query.column("event_time_ms").to_numpy().astype(np.int64)
    cols = {
        name: query.column(name).to_numpy(zero_copy_only=False)
        for name in F.SPARSE_FIELDS
        if name != "hour"
    }
    cols["event_time_ms"] = t
    return {
        "impression_id": query.column("impression_id").to_numpy(zero_copy_only=False),
        "event_time_ms": t,
        "label": label,
        "click_delay_ms": delay,
        "counts": counts,
        "dense": F.dense_from_counts(counts),
        "sparse": F.sparse_ids(cols),
    }


def _empty_result() -> dict:
    counts = np.zeros((0, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.float64)
    return {
        "impression_id": np.array([], dtype=object),
        "event_time_ms": np.array([], dtype=np.int64),
        "label": np.array([], dtype=np.int8),
        "click_delay_ms": np.array([], dtype=np.int64),
        "counts": counts,
        "dense": F.dense_from_counts(counts),
        "sparse": np.zeros((0, F.N_SPARSE), dtype=np.int64),
    }


__all__ = [
    "align_day",
    "long_window_range",
    "resolution_range",
    "lookback_start",
    "eid_sql",
    "window_bounds",
    "point_in_time_counts",
    "bucket_counts",
    "long_window_counts",
    "training_set",
    "training_rows",
    "KINDS",
]
