"""Batch views: the archive's closed buckets and long windows, computed and published by version.

What a batch view with cut-off ``T`` holds (``T == features.align_cutoff(T)``)
-----------------------------------------------------------------------------
* per entity id and resolution ``res``, the absolute impression / click counts of every
  bucket of ``res`` that is **closed by T and still inside the resolution's window before
  T**: bucket ``b`` with ``T - res.window_ms <= b * bucket_ms`` and ``(b + 1) * bucket_ms <=
  T``. Serving at any ``t >= T`` needs at most these (its window's buckets before ``T``);
  the buckets from ``T`` on come from the speed view. Both counts are kept for every bucket
  with any event (a missing count reads as 0).
* per entity id, the long-window values at ``T`` (one pair per ``features.LONG_WINDOWS``) as
  ``ctrstream.batch.point_in_time.long_window_range`` defines them, events in
  ``[day(T) - days, day(T))``. Identical to the training value for every ``t`` on the day of
  ``T``; a view from an earlier day serves that day's value until the next view lands.
* what serving reads per entity in one round trip: the long windows again and, per
  resolution, the **suffix sums** of the bucket counts, so that the batch part of any window
  costs two values per count whatever the number of buckets.

How it lies in Redis (hashes, suffix sums, meta, versions, pointer) is
:mod:`ctrstream.store.batch_view`'s; this module computes the view from the archive
(:func:`compute_batch_view` from tables in memory; :func:`iter_batch_view`, what
:func:`publish_batch_view` uses, bounded in memory: DuckDB over the Parquet files with a
memory limit and a spill directory, the view produced and written one entity partition at a
time) and runs the publication (:func:`write_batch_view`):

* Versions: ``{cutoff_ms}-{created_ms}``. Each is **registered before its hashes are
  written**, so a publisher that dies half way leaves a registered, pointer-less version
  that the next publish deletes; its meta (cut-off, creation time,
  ``features.fingerprint()``, counts) is written **after** every hash, then the served
  pointer is switched with one ``SET``: a reader that reads the pointer and then the version
  always sees a complete version.
* After a switch the newest ``keep`` complete versions (default 2: the new one and the one
  readers may still be reading) are kept; older ones and versions without meta are deleted.

Cut-off default (``ctrstream batch-views`` without ``--cutoff-ms``): the latest aligned
cut-off the archive is complete for, ``align_cutoff(max archived event time - allowed
lateness)``: later buckets may still receive late events.

Concurrent publishers are not coordinated (run one batch-view job at a time).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ctrstream import features as F
from ctrstream.batch.archive import ID_FIELD, KINDS, list_files, max_event_time
from ctrstream.batch.point_in_time import (
    BUCKET_COUNTS_SCHEMA,
    LONG_COUNTS_SCHEMA,
    _bucket_counts,
    _connect,
    _count_fields,
    eid_sql,
    long_window_counts,
    long_window_range,
)
from ctrstream.config import Settings
from ctrstream.store import batch_view as BV
from ctrstream.store.batch_view import read_view_counts
from ctrstream.store.connection import redis_client

REDIS_TIMEOUT_S = 120.0  # the publisher's redis-py client (scans and deletes of whole versions)
DEFAULT_MEMORY_LIMIT = "2GB"  # DuckDB's, for the bounded build (it spills beyond it)
PART_ROWS = 20_000  # bucket rows per part of the bounded build (what the writer groups at once)
PART_BATCH = 100_000  # rows read from DuckDB at a time
_COUNT_FIELDS = [f for f in _count_fields() if f != "event_time_ms"]


def default_cutoff(settings: Settings, data_dir: Path | str) -> int:
    """The latest aligned cut-off the archive is complete for (see the module docstring)."""
    t = max_event_time(data_dir)
    if t is None:
        raise ValueError(
            f"the archive under {Path(data_dir) / 'archive'} is empty: run "
            "`ctrstream archive` first"
        )
    return F.align_cutoff(t - int(settings.allowed_lateness_s * 1000))


def view_window_start(cutoff_ms: int) -> int:
    """The earliest event time a batch view with this cut-off counts."""
    los = [cutoff_ms - r.window_ms for r in F.RESOLUTIONS]
    los += [long_window_range(cutoff_ms, w)[0] for w in F.LONG_WINDOWS]
    return min(los)


def compute_batch_view(imps: pa.Table, clks: pa.Table, cutoff_ms: int) -> tuple[pa.Table, pa.Table]:
    """(bucket counts, long-window counts) a view with cut-off ``cutoff_ms`` serves, from
    deduplicated events (see the module docstring for which buckets)."""
    import pyarrow.compute as pc

    T = int(cutoff_ms)
    keep = lambda t: t.filter(pc.less(t.column("event_time_ms"), T))  # noqa: E731 - one filter, applied to both tables on the next line
    imps, clks = keep(imps), keep(clks)
    con = _connect()
    try:
        min_bucket = {r.name: (T - r.window_ms) // r.bucket_ms for r in F.RESOLUTIONS}
        buckets = _bucket_counts(con, imps, clks, min_bucket)
        longs = long_window_counts(imps, clks, T, con=con, dedupe=False)
    finally:
        con.close()
    return buckets, longs


def publish_batch_view(
    settings: Settings,
    data_dir: Path | str | None = None,
    cutoff_ms: int | None = None,
    keep: int = 2,
    r: Any = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    temp_dir: Path | str | None = None,
) -> dict:
    """Compute the batch view with cut-off ``cutoff_ms`` (default: :func:`default_cutoff`)
    from the archive, write it under a new version, serve it (the pointer), and delete
    versions beyond the newest ``keep``. Returns ``version, cutoff_ms, keys_written,
    buckets, long_ids, deleted_versions, seconds``.

    Bounded in memory (:func:`iter_batch_view`): DuckDB reads the archive's Parquet files
    itself under ``memory_limit`` (spilling to ``temp_dir``, default a temporary directory),
    and the view is computed and written one entity partition at a time."""
    t0 = time.perf_counter()
    data_dir = Path(data_dir or settings.data_dir)
    T = default_cutoff(settings, data_dir) if cutoff_ms is None else int(cutoff_ms)
    if F.align_cutoff(T) != T:
        raise ValueError(
            f"cut-off {T} is not aligned to {F.CUTOFF_ALIGN_MS} ms "
            f"(features.align_cutoff gives {F.align_cutoff(T)})"
        )
    if keep < 1:
        raise ValueError("keep must be >= 1 (the version just published)")
    parts = iter_batch_view(data_dir, T, memory_limit=memory_limit, temp_dir=temp_dir)
    return _publish(settings, parts, T, keep=keep, r=r, t0=t0)


def write_batch_view(
    settings: Settings,
    buckets: pa.Table,
    longs: pa.Table,
    cutoff_ms: int,
    keep: int = 2,
    r: Any = None,
    t0: float | None = None,
    ttl_ms: int | None = None,
) -> dict:
    """Write computed view tables under a new version and switch the pointer to it.
    ``buckets``: ``entity, eid, res, bucket, imps, clicks``; ``longs``: ``entity, eid,
    long_window, imps, clicks`` (as :func:`compute_batch_view` returns them). ``r``: a
    redis-py client (default: one for ``settings``). ``ttl_ms``: expire every key of the
    version after that long (benchmarks; default: never)."""
    if keep < 1:
        raise ValueError("keep must be >= 1 (the version just published)")
    return _publish(settings, [(buckets, longs)], cutoff_ms, keep, r, t0, ttl_ms)


def _publish(
    settings: Settings,
    parts: Iterable[tuple[pa.Table, pa.Table]],
    cutoff_ms: int,
    keep: int = 2,
    r: Any = None,
    t0: float | None = None,
    ttl_ms: int | None = None,
) -> dict:
    """The publication protocol over a view given in parts (``(buckets, longs)`` pairs,
    each entity id's rows in one part): register, write every part's hashes, meta, pointer,
    prune."""
    t0 = t0 or time.perf_counter()
    r = r or redis_client(settings, timeout_s=REDIS_TIMEOUT_S)
    version, created = BV.new_version(cutoff_ms)
    BV.register_version(r, version, created)
    keys_written = n_buckets = n_longs = 0
    for buckets, longs in parts:
        keys_written += BV.write_view_hashes(r, version, buckets, longs, int(cutoff_ms), ttl_ms)
        n_buckets += buckets.num_rows
        n_longs += longs.num_rows
    # meta last, then the pointer: a reader that follows the pointer sees a complete version
    BV.write_meta(
        r,
        version,
        cutoff_ms=int(cutoff_ms),
        created_ms=created,
        fingerprint=F.fingerprint(),
        keys=keys_written,
        buckets=n_buckets,
        ttl_ms=ttl_ms,
    )
    BV.switch_pointer(r, version)
    deleted = BV.prune_versions(r, version, keep)
    return {
        "version": version,
        "cutoff_ms": int(cutoff_ms),
        "keys_written": keys_written + 1,
        "buckets": n_buckets,
        "long_ids": n_longs,
        "deleted_versions": deleted,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# --------------------------------------------------------------------------- bounded build


def _dedupe_sql(kind: str, files: list[Path], lo: int, hi: int, flag: int) -> str:
    """The events of ``kind`` in ``[lo, hi)`` from the Parquet files, each event id once
    with the fields of its earliest copy (``archive.dedupe``'s rule), click flag ``flag``."""
    fields = _COUNT_FIELDS
    idf = ID_FIELD[kind]
    paths = ", ".join(_sql_str(str(f)) for f in files)
    picks = ", ".join(f"arg_min({f}, event_time_ms) AS {f}" for f in fields)
    return (
        f"SELECT {picks}, min(event_time_ms) AS event_time_ms, {flag} AS c "
        f"FROM read_parquet([{paths}], union_by_name = true) "
        f"WHERE event_time_ms >= {int(lo)} AND event_time_ms < {int(hi)} GROUP BY {idf}"
    )


def _sql_str(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def iter_batch_view(
    data_dir: Path | str,
    cutoff_ms: int,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    temp_dir: Path | str | None = None,
    part_rows: int | None = None,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """The batch view with cut-off ``cutoff_ms`` (the tables of :func:`compute_batch_view`
    over the archive's deduplicated events) in parts: ``(buckets, longs)`` of one entity
    and one hash partition of its ids at a time, so that every id's rows are in one part.

    Memory stays bounded whatever the archive's size: DuckDB reads the Parquet files itself
    into an on-disk database in a temporary directory (under ``temp_dir``), deduplicates by
    event id there, and works under ``memory_limit`` (spilling beyond it); per entity, one
    query groups the counts and orders them by partition, and its result is read in
    batches. A part holds about ``part_rows`` (default :data:`PART_ROWS`) bucket rows: the
    store's writer groups one part at a time and its memory grows with the part."""
    import duckdb

    T = int(cutoff_ms)
    lo = view_window_start(T)
    files = {k: list_files(data_dir, k, lo, T) for k in KINDS}
    if not any(files.values()):
        return
    part_rows = PART_ROWS if part_rows is None else max(1, int(part_rows))
    with tempfile.TemporaryDirectory(prefix="ctrstream-view-", dir=temp_dir) as tmp:
        con = duckdb.connect(str(Path(tmp) / "view.duckdb"))
        try:
            con.execute(f"SET memory_limit = {_sql_str(memory_limit)}")
            con.execute(f"SET temp_directory = {_sql_str(str(Path(tmp) / 'spill'))}")
            con.execute("SET preserve_insertion_order = false")
            sel = [
                _dedupe_sql(k, files[k], lo, T, flag) for flag, k in enumerate(KINDS) if files[k]
            ]
            con.execute("CREATE TABLE ev AS " + " UNION ALL ".join(sel)).fetchall()
            for e in F.ENTITIES:
                fields = ", ".join(e.fields)
                est = con.execute(
                    f"SELECT approx_count_distinct(hash({fields}, event_time_ms // {F.HOUR_MS})) "
                    "FROM ev"
                ).fetchall()[0][0]
                parts = max(1, -(-int(est or 0) // part_rows))
                yield from _entity_parts(con, e, T, parts)
        finally:
            con.close()


def _entity_parts(con: Any, e: F.Entity, T: int, parts: int) -> Iterator[tuple[pa.Table, pa.Table]]:
    """One entity's (buckets, longs), partition by partition (``hash(fields) % parts``).

    Each window's counts are grouped by the entity's integer fields into a table of the
    on-disk database, one ``INSERT`` at a time (DuckDB's aggregate spills; several at once
    in one query, grouped by the text id, ran out of its memory limit at 32M impressions),
    then read back ordered by partition (an external sort) with the text id made per row."""
    import numpy as np
    import pyarrow.compute as pc

    fields = ", ".join(e.fields)
    con.execute(
        f"CREATE OR REPLACE TABLE agg AS SELECT CAST(0 AS UBIGINT) AS p, 0 AS kind, {fields}, "
        "'' AS res, CAST(NULL AS BIGINT) AS bucket, CAST(0 AS HUGEINT) AS imps, "
        "CAST(0 AS HUGEINT) AS clicks FROM ev LIMIT 0"
    )
    p_sql = f"hash({fields}) % {parts}"
    for r in F.RESOLUTIONS:
        b = f"event_time_ms // {r.bucket_ms}"
        con.execute(
            f"INSERT INTO agg SELECT {p_sql}, 0, {fields}, '{r.name}', {b}, sum(1 - c), "
            f"sum(c) FROM ev WHERE {b} >= {(T - r.window_ms) // r.bucket_ms} "
            f"GROUP BY {fields}, {b}"
        )
    for w in F.LONG_WINDOWS:
        wlo, whi = long_window_range(T, w)
        con.execute(
            f"INSERT INTO agg SELECT {p_sql}, 1, {fields}, '{w.name}', NULL, sum(1 - c), "
            f"sum(c) FROM ev WHERE event_time_ms >= {wlo} AND event_time_ms < {whi} "
            f"GROUP BY {fields}"
        )
    rel = con.sql(
        f"SELECT p, kind, {eid_sql(e)} AS eid, res, bucket, CAST(imps AS BIGINT) AS imps, "
        "CAST(clicks AS BIGINT) AS clicks FROM agg ORDER BY p"
    )
    reader = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
    pending: list[pa.Table] = []

    def emit() -> tuple[pa.Table, pa.Table]:
        t = pa.concat_tables(pending)
        pending.clear()
        t = t.append_column("entity", pa.repeat(pa.scalar(e.name), t.num_rows))
        kind = t.column("kind")
        bt = t.filter(pc.equal(kind, 0)).select(
            ["entity", "eid", "res", "bucket", "imps", "clicks"]
        )
        lt = t.filter(pc.equal(kind, 1)).select(["entity", "eid", "res", "imps", "clicks"])
        lt = lt.rename_columns(["entity", "eid", "long_window", "imps", "clicks"])
        return bt.cast(BUCKET_COUNTS_SCHEMA), lt.cast(LONG_COUNTS_SCHEMA)

    current = None
    for batch in reader(PART_BATCH):
        table = pa.Table.from_batches([batch])
        p = table.column("p").to_numpy()
        cuts = np.flatnonzero(np.diff(p)) + 1
        for s, x in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(p)]])):
            if current is not None and p[s] != current and pending:
                yield emit()
            current = p[s]
            pending.append(table.slice(int(s), int(x - s)))
    if pending:
        yield emit()


# read_view_counts is the store's (ctrstream.store.batch_view); it is offered here too, next
# to the writer, for callers of the batch layer
__all__ = [
    "compute_batch_view",
    "default_cutoff",
    "iter_batch_view",
    "publish_batch_view",
    "read_view_counts",
    "view_window_start",
    "write_batch_view",
]
