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
(:func:`compute_batch_view`) and runs the publication (:func:`write_batch_view`):

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

import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from ctrstream import features as F
from ctrstream.batch.archive import max_event_time, read_events
from ctrstream.batch.point_in_time import (
    _bucket_counts,
    _connect,
    long_window_counts,
    long_window_range,
)
from ctrstream.config import Settings
from ctrstream.store import batch_view as BV
from ctrstream.store.batch_view import read_view_counts
from ctrstream.store.connection import redis_client

REDIS_TIMEOUT_S = 120.0  # the publisher's redis-py client (scans and deletes of whole versions)


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
) -> dict:
    """Compute the batch view with cut-off ``cutoff_ms`` (default: :func:`default_cutoff`)
    from the archive, write it under a new version, serve it (the pointer), and delete
    versions beyond the newest ``keep``. Returns ``version, cutoff_ms, keys_written,
    buckets, long_ids, deleted_versions, seconds``."""
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
    lo = view_window_start(T)
    imps = read_events(data_dir, "impressions", lo, T)
    clks = read_events(data_dir, "clicks", lo, T)
    buckets, longs = compute_batch_view(imps, clks, T)
    return write_batch_view(settings, buckets, longs, T, keep=keep, r=r, t0=t0)


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
    t0 = t0 or time.perf_counter()
    if keep < 1:
        raise ValueError("keep must be >= 1 (the version just published)")
    r = r or redis_client(settings, timeout_s=REDIS_TIMEOUT_S)
    version, created = BV.new_version(cutoff_ms)
    BV.register_version(r, version, created)
    keys_written = BV.write_view_hashes(r, version, buckets, longs, int(cutoff_ms), ttl_ms)
    # meta last, then the pointer: a reader that follows the pointer sees a complete version
    BV.write_meta(
        r,
        version,
        cutoff_ms=int(cutoff_ms),
        created_ms=created,
        fingerprint=F.fingerprint(),
        keys=keys_written,
        buckets=buckets.num_rows,
        ttl_ms=ttl_ms,
    )
    BV.switch_pointer(r, version)
    deleted = BV.prune_versions(r, version, keep)
    return {
        "version": version,
        "cutoff_ms": int(cutoff_ms),
        "keys_written": keys_written + 1,
        "buckets": buckets.num_rows,
        "long_ids": longs.num_rows,
        "deleted_versions": deleted,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# read_view_counts is the store's (ctrstream.store.batch_view); it is offered here too, next
# to the writer, for callers of the batch layer
__all__ = [
    "compute_batch_view",
    "default_cutoff",
    "publish_batch_view",
    "read_view_counts",
    "view_window_start",
    "write_batch_view",
]
