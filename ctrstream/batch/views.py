"""Batch views: the archive's closed buckets and long windows, published to Redis by version.

What a batch view with cut-off ``T`` holds (``T == features.align_cutoff(T)``)
-----------------------------------------------------------------------------
* ``bv:{version}:{entity}:{eid}:{res}`` - fields ``i{bucket}`` / ``c{bucket}`` with the
  absolute impression / click counts of every bucket of ``res`` that is **closed by T and
  still inside the resolution's window before T**: bucket ``b`` with
  ``T - res.window_ms <= b * bucket_ms`` and ``(b + 1) * bucket_ms <= T``. Serving at any
  ``t >= T`` needs at most these (its window's buckets before ``T``); the buckets from ``T``
  on come from the speed view. Both fields are written for every bucket with any event (a
  missing field reads as 0).
* ``bv:{version}:{entity}:{eid}:long`` - fields ``i7d`` / ``c7d`` (one pair per
  ``features.LONG_WINDOWS``): the long-window value at ``T`` as
  ``ctrstream.batch.point_in_time.long_window_range`` defines it, events in
  ``[day(T) - days, day(T))``. Identical to the training value for every ``t`` on the day of
  ``T``; a view from an earlier day serves that day's value until the next view lands.
* ``bv:{version}:{entity}:{eid}:sums`` - what serving reads (one ``HMGET`` per entity): the
  long-window fields again and, per resolution, the **suffix sums** of the bucket counts above,
  ``{res}:i{b}`` / ``{res}:c{b}`` = sum over the view's buckets ``>= b``
  (``layout.suffix_field``), for every ``b`` of ``features.view_buckets(T, res)`` up to the
  entity's last non-empty bucket (later ones are 0: absent). The batch part of a window
  (buckets ``lo..hi``) is ``S[lo] - S[hi + 1]``: 2 fields per count, whatever the number of
  buckets. The per-bucket hashes stay (reconciliation compares them cell by cell).
* ``bv:{version}:meta`` - ``cutoff_ms``, ``created_ms``, ``fingerprint``
  (``features.fingerprint()``), ``sums`` = 1 (the view carries the ``:sums`` hashes; readers
  fall back to the per-bucket hashes without it) plus ``keys``/``buckets`` counts: written **after** every data
  key of the version, then ``bv:current`` is switched with one ``SET``. A reader that reads
  the pointer and then the version therefore always sees a complete version.
* Versions: ``{cutoff_ms}-{created_ms}`` (sortable, no ``:``). Each is registered in the
  ZSET ``bv:versions`` (score created_ms) **before** its keys are written, so a publisher that
  dies half way leaves a registered, pointer-less version that the next publish deletes.
  After a switch the newest ``keep`` complete versions (default 2: the new one and the one
  readers may still be reading) are kept; older ones and versions without meta (a publisher
  that died half way) are deleted (SCAN + UNLINK).

Cut-off default (``ctrstream batch-views`` without ``--cutoff-ms``): the latest aligned
cut-off the archive is complete for, ``align_cutoff(max archived event time - allowed
lateness)``: later buckets may still receive late events.

Concurrent publishers are not coordinated (run one batch-view job at a time).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pyarrow as pa

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.config import Settings
from ctrstream.batch.archive import max_event_time, read_events
from ctrstream.batch.point_in_time import (
    _bucket_counts, _connect, long_window_counts, long_window_range,
)

VERSIONS_KEY = "bv:versions"
PIPELINE_CHUNK = 50_000  # commands per pipelined round trip
GROUP_BATCH = 200_000  # hashes fetched from DuckDB at a time


def redis_client(settings: Settings):
    import redis

    return redis.Redis.from_url(settings.redis.url)


def default_cutoff(settings: Settings, data_dir: Path | str) -> int:
    """The latest aligned cut-off the archive is complete for (see the module docstring)."""
    t = max_event_time(data_dir)
    if t is None:
        raise ValueError(f"the archive under {Path(data_dir) / 'archive'} is empty: run "
                         "`ctrstream archive` first")
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
    keep = lambda t: t.filter(pc.less(t.column("event_time_ms"), T))  # noqa: E731
    imps, clks = keep(imps), keep(clks)
    con = _connect()
    try:
        min_bucket = {r.name: (T - r.window_ms) // r.bucket_ms for r in F.RESOLUTIONS}
        buckets = _bucket_counts(con, imps, clks, min_bucket)
        longs = long_window_counts(imps, clks, T, con=con, dedupe=False)
    finally:
        con.close()
    return buckets, longs


def _grouped_fields(buckets: pa.Table, longs: pa.Table, version: str, cutoff_ms: int):
    """Batches of {key, f (fields), v (values)} per Redis hash, built by DuckDB (one Python
    step per key): the per-bucket hashes, the long-window hashes and the ``:sums`` hashes
    (suffix sums)."""
    import pyarrow.compute as pc

    # One entity at a time: every hash belongs to one entity, and DuckDB's list aggregation
    # over all 2.6M hashes of the 1M-impression demo peaked at ~10 GB (it cannot spill);
    # per entity it is a fraction of that.
    for ent in F.ENTITIES:
        yield from _grouped_fields_of(buckets.filter(pc.equal(buckets["entity"], ent.name)),
                                      longs.filter(pc.equal(longs["entity"], ent.name)),
                                      version, cutoff_ms)


def _grouped_fields_of(buckets: pa.Table, longs: pa.Table, version: str, cutoff_ms: int):
    if buckets.num_rows == 0 and longs.num_rows == 0:
        return
    con = _connect()
    con.execute("SET preserve_insertion_order = false")
    try:
        con.register("b", buckets)
        con.register("l", longs)
        bkey = f"'bv:{version}:' || entity || ':' || eid || ':' || res"
        lkey = f"'bv:{version}:' || entity || ':' || eid || ':long'"
        skey = f"'bv:{version}:' || entity || ':' || eid || ':sums'"
        ti, tc = F.EVENT_TYPES  # field names as features.field / long_field / suffix_field
        # field order of a :sums hash (a small hash is a list Redis scans): long windows, then
        # the resolutions from the longest window down (the 24h sums are read by almost every
        # request, the 5m ones only when the cut-off is minutes old), buckets ascending
        by_window = sorted(F.RESOLUTIONS, key=lambda r: -r.window_ms)
        spans = ", ".join(f"('{r.name}', {F.view_buckets(cutoff_ms, r).start}, "
                          f"{F.view_buckets(cutoff_ms, r).stop}, {1 + by_window.index(r)})"
                          for r in F.RESOLUTIONS)
        sql = f"""
            WITH vb AS (SELECT * FROM (VALUES {spans}) t(res, lo, hi, ord)),
            held AS (SELECT b.* FROM b JOIN vb USING (res) WHERE bucket >= lo AND bucket < hi),
            dense AS (
                SELECT g.entity, g.eid, g.res, unnest(range(vb.lo, g.last + 1)) AS bucket
                FROM (SELECT entity, eid, res, max(bucket) AS last FROM held GROUP BY ALL) g
                JOIN vb USING (res)),
            suffix AS (
                SELECT d.entity, d.eid, d.res, d.bucket,
                       CAST(sum(coalesce(h.imps, 0)) OVER w AS BIGINT) AS si,
                       CAST(sum(coalesce(h.clicks, 0)) OVER w AS BIGINT) AS sc
                FROM dense d LEFT JOIN held h USING (entity, eid, res, bucket)
                WINDOW w AS (PARTITION BY d.entity, d.eid, d.res ORDER BY d.bucket DESC
                             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)),
            pairs AS (
                SELECT {skey} AS key, 0 AS ord, 0 AS bucket, '{ti}' || long_window AS fi,
                       '{tc}' || long_window AS fc, imps AS vi, clicks AS vc FROM l
                UNION ALL
                SELECT {skey} AS key, vb.ord, bucket, res || ':{ti}' || CAST(bucket AS VARCHAR),
                       res || ':{tc}' || CAST(bucket AS VARCHAR), si, sc FROM suffix JOIN vb USING (res))
            SELECT {bkey} AS key,
                   flatten(list(['{ti}' || CAST(bucket AS VARCHAR), '{tc}' || CAST(bucket AS VARCHAR)])) AS f,
                   flatten(list([imps, clicks])) AS v
            FROM b GROUP BY key
            UNION ALL
            SELECT {lkey} AS key,
                   flatten(list(['{ti}' || long_window, '{tc}' || long_window])) AS f,
                   flatten(list([imps, clicks])) AS v
            FROM l GROUP BY key
            UNION ALL
            SELECT key, flatten(list([fi, fc] ORDER BY ord, bucket)) AS f,
                   flatten(list([vi, vc] ORDER BY ord, bucket)) AS v
            FROM pairs GROUP BY key"""
        rel = con.sql(sql)
        reader = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
        # stream the hashes in batches: as Python lists the whole view took GBs
        for batch in reader(GROUP_BATCH):
            yield batch.to_pydict()
    finally:
        con.close()


def _delete_version(r, version: str) -> int:
    n = 0
    batch = []
    for key in r.scan_iter(match=f"bv:{version}:*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            n += r.unlink(*batch)
            batch = []
    if batch:
        n += r.unlink(*batch)
    r.zrem(VERSIONS_KEY, version)
    return n


def publish_batch_view(settings: Settings, data_dir: Path | str | None = None,
                       cutoff_ms: int | None = None, keep: int = 2, r=None) -> dict:
    """Compute the batch view with cut-off ``cutoff_ms`` (default: :func:`default_cutoff`)
    from the archive, write it under a new version, switch ``bv:current`` to it, and delete
    versions beyond the newest ``keep``. Returns ``version, cutoff_ms, keys_written,
    buckets, long_ids, deleted_versions, seconds``."""
    t0 = time.perf_counter()
    data_dir = Path(data_dir or settings.data_dir)
    T = default_cutoff(settings, data_dir) if cutoff_ms is None else int(cutoff_ms)
    if T != F.align_cutoff(T):
        raise ValueError(f"cut-off {T} is not aligned to {F.CUTOFF_ALIGN_MS} ms "
                         f"(features.align_cutoff gives {F.align_cutoff(T)})")
    if keep < 1:
        raise ValueError("keep must be >= 1 (the version just published)")
    lo = view_window_start(T)
    imps = read_events(data_dir, "impressions", lo, T)
    clks = read_events(data_dir, "clicks", lo, T)
    buckets, longs = compute_batch_view(imps, clks, T)
    return write_batch_view(settings, buckets, longs, T, keep=keep, r=r, t0=t0)


def _write_hashes(settings: Settings, buckets: pa.Table, longs: pa.Table, version: str,
                  cutoff_ms: int, ttl_ms: int | None) -> int:
    """Write every hash of a version; returns how many."""
    # Millions of hashes: RESP packed by hiredis (C) and streamed in pipelined chunks through
    # the speed layer's writer (redis-py spends ~40 us of Python per pipelined HSET; this ~3).
    from ctrstream.store.resp import RespPipeline, encode

    pipe = RespPipeline(settings, timeout=60.0)
    ttl = str(int(ttl_ms)).encode() if ttl_ms else None
    try:
        cmds: list[bytes] = []
        keys_written = 0
        for g in _grouped_fields(buckets, longs, version, cutoff_ms):
            keys_written += len(g["key"])
            for key, fields, values in zip(g["key"], g["f"], g["v"]):
                args = [None] * (2 * len(fields))
                args[0::2], args[1::2] = fields, values
                cmds.append(encode((b"HSET", key, *args)))
                if ttl:
                    cmds.append(encode((b"PEXPIRE", key, ttl)))
                if len(cmds) >= PIPELINE_CHUNK:
                    pipe.execute(cmds)
                    cmds = []
        pipe.execute(cmds)
    finally:
        pipe.close()
    return keys_written


def write_batch_view(settings: Settings, buckets: pa.Table, longs: pa.Table, cutoff_ms: int,
                     keep: int = 2, r=None, t0: float | None = None,
                     ttl_ms: int | None = None) -> dict:
    """Write computed view tables under a new version and switch the pointer to it.
    ``buckets``: ``entity, eid, res, bucket, imps, clicks``; ``longs``: ``entity, eid,
    long_window, imps, clicks`` (as :func:`compute_batch_view` returns them). ``ttl_ms``:
    expire every key of the version after that long (benchmarks; default: never)."""
    t0 = t0 or time.perf_counter()
    r = r or redis_client(settings)
    created = int(time.time() * 1000)
    version = f"{int(cutoff_ms)}-{created}"
    r.zadd(VERSIONS_KEY, {version: created})

    # millions of small lists below: keep the cyclic GC from re-traversing them all the time
    # (nothing here forms a cycle)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        keys_written = _write_hashes(settings, buckets, longs, version, int(cutoff_ms), ttl_ms)
    finally:
        if gc_was:
            gc.enable()

    # meta last, then the pointer: a reader that follows the pointer sees a complete version
    r.hset(L.batch_meta_key(version), mapping={
        "cutoff_ms": int(cutoff_ms), "created_ms": created, "fingerprint": F.fingerprint(),
        L.BATCH_SUMS_FLAG: 1, "keys": keys_written, "buckets": buckets.num_rows})
    if ttl_ms:
        r.pexpire(L.batch_meta_key(version), int(ttl_ms))
    r.set(L.BATCH_POINTER_KEY, version)

    # clean-up: versions without meta (a publisher died half way) always go; of the complete
    # ones, the newest keep - 1 besides the new one stay (readers may still be on them)
    deleted = []
    others = [v.decode() if isinstance(v, bytes) else v for v in r.zrange(VERSIONS_KEY, 0, -1)]
    others = [v for v in others if v != version]
    complete = [v for v in others if r.exists(L.batch_meta_key(v))]
    stale = [v for v in others if v not in complete]
    stale += complete[:max(0, len(complete) - (keep - 1))]
    for v in stale:
        _delete_version(r, v)
        deleted.append(v)
    return {"version": version, "cutoff_ms": int(cutoff_ms), "keys_written": keys_written + 1,
            "buckets": buckets.num_rows, "long_ids": longs.num_rows,
            "deleted_versions": deleted, "seconds": round(time.perf_counter() - t0, 3)}


def read_view_counts(r, version: str, entity: str, eid: str, res: str) -> dict[str, int]:
    """The fields of one batch-view hash as ints (for reconciliation and tests); ``res`` is a
    resolution name, ``long`` or ``sums``."""
    h = r.hgetall(L.batch_long_key(version, entity, eid) if res == "long"
                  else L.batch_sums_key(version, entity, eid) if res == "sums"
                  else L.batch_key(version, entity, eid, res))
    return {k.decode(): int(v) for k, v in h.items()}


__all__ = ["publish_batch_view", "write_batch_view", "compute_batch_view", "default_cutoff",
           "view_window_start", "read_view_counts", "VERSIONS_KEY"]
