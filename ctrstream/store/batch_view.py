"""The batch view in Redis: writing a computed view under a version, the version lifecycle
(register, meta, pointer switch, clean-up) and every reader of it outside the prediction
path (reconciliation, tests).

The key and field formats are :mod:`ctrstream.store.layout`'s. A computed view is two Arrow
tables (``ctrstream.batch.views.compute_batch_view``): ``buckets`` (``entity, eid, res,
bucket, imps, clicks``: the closed buckets of every resolution) and ``longs`` (``entity,
eid, long_window, imps, clicks``). :func:`write_view_hashes` lays them out as

* one per-bucket hash per entity id and resolution (fields per event type and bucket),
* one long-window hash per entity id,
* one ``:sums`` hash per entity id - what serving reads: the long-window fields again and,
  per resolution, the **suffix sums** of the bucket counts (``layout.suffix_field``: the
  view's counts of buckets ``>= b``, for every ``b`` of ``features.view_buckets(cutoff,
  res)`` up to the entity's last non-empty bucket; later ones are 0, absent), so that the
  batch part of any window is two fields per count. Its fields are ordered long windows
  first, then the resolutions from the longest window down (a small hash is a list Redis
  scans, and the 24h sums are read by almost every request), buckets ascending.

The keys and fields are built by DuckDB (``layout.*_sql``), one entity at a time (every hash
belongs to one entity: DuckDB's list aggregation over a whole view cannot spill and its
memory grows with the view), each hash's whole ``HSET`` rendered as RESP by DuckDB too
(Python only hands the bytes on: per-hash lists and packing cost more than Redis's own work),
streamed out in batches and sent in pipelined chunks - Redis works through the chunks while
the next entity is rendered - over a :class:`ctrstream.store.resp.RespPipeline` per node
(one per master of a Redis Cluster, :class:`ctrstream.store.nodes.NodePipelines`), with
the cyclic GC paused (millions of small objects, no cycles).

The publication protocol - what makes a version safe to read (``ctrstream.batch.views``
runs it): :func:`register_version` before any key of the version is written (a publisher
that dies half way leaves a registered version without meta), :func:`write_view_hashes`,
:func:`write_meta` after every data key, then :func:`switch_pointer` (one ``SET``): a reader
that follows the pointer always finds a complete version. :func:`prune_versions` then deletes
versions without meta and complete ones beyond the newest ``keep``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.store.nodes import NodePipelines, scan_masters
from ctrstream.store.resp import encode
from ctrstream.store.scan import gc_paused, read_hashes, scan_keys, text

PIPELINE_CHUNK = 50_000  # commands per pipelined round trip
SEND_AHEAD = 8  # chunks rendered ahead of Redis at most (a chunk is ~10 MB)
GROUP_BATCH = 200_000  # hashes fetched from DuckDB at a time
DELETE_BATCH = 10_000  # keys per SCAN call and per UNLINK when a version is deleted
WRITE_TIMEOUT_S = 60.0  # without any progress on the bulk connection

BucketCells = dict[tuple[str, str, str], dict[tuple[str, int], int]]
"""{(entity, id, resolution name): {(event type, bucket): count}}"""


# --------------------------------------------------------------------------- versions


def new_version(cutoff_ms: int, created_ms: int | None = None) -> tuple[str, int]:
    """``(version, created_ms)`` of a new version of the view with this cut-off (created
    now unless given)."""
    created = int(time.time() * 1000) if created_ms is None else int(created_ms)
    return L.batch_version_id(cutoff_ms, created), created


def register_version(client: Any, version: str, created_ms: int) -> None:
    """Record ``version`` in the versions set (before any of its keys is written)."""
    client.zadd(L.BATCH_VERSIONS_KEY, {version: int(created_ms)})


def versions(client: Any) -> list[str]:
    """Every registered version, oldest first."""
    return [text(v) for v in client.zrange(L.BATCH_VERSIONS_KEY, 0, -1)]


def write_meta(
    client: Any,
    version: str,
    *,
    cutoff_ms: int,
    created_ms: int,
    fingerprint: str,
    keys: int,
    buckets: int,
    ttl_ms: int | None = None,
) -> None:
    """Write the meta hash of ``version`` (after every data key: it marks the version
    complete): cut-off, creation time, the feature declaration's fingerprint, the ``:sums``
    flag, the number of data keys and of bucket rows."""
    key = L.batch_meta_key(version)
    client.hset(
        key,
        mapping={
            "cutoff_ms": int(cutoff_ms),
            "created_ms": int(created_ms),
            "fingerprint": fingerprint,
            L.BATCH_SUMS_FLAG: 1,
            "keys": int(keys),
            "buckets": int(buckets),
        },
    )
    if ttl_ms:
        client.pexpire(key, int(ttl_ms))


def read_meta(client: Any, version: str) -> dict[str, str]:
    """The meta hash of ``version`` (empty when the version is incomplete or unknown)."""
    return {text(k): text(v) for k, v in client.hgetall(L.batch_meta_key(version)).items()}


def is_complete(client: Any, version: str) -> bool:
    """Whether ``version`` has its meta hash (every data key was written)."""
    return bool(client.exists(L.batch_meta_key(version)))


def switch_pointer(client: Any, version: str) -> None:
    """Serve ``version`` from now on (one ``SET`` of the pointer)."""
    client.set(L.BATCH_POINTER_KEY, version)


def served_version(client: Any) -> str | None:
    """The version the pointer names (None when no batch view is served)."""
    v = client.get(L.BATCH_POINTER_KEY)
    return None if v is None else text(v)


def clear_pointer(client: Any) -> None:
    """Serve no batch view (readers fall back to the speed view and the prior)."""
    client.delete(L.BATCH_POINTER_KEY)


def delete_version(client: Any, version: str) -> int:
    """Delete every key of ``version`` (SCAN on every master, one pipelined ``UNLINK`` per
    key to the node that serves it: a cluster refuses one UNLINK over keys of several slots)
    and unregister it; returns how many keys were deleted."""
    n = 0
    with NodePipelines(client, timeout=WRITE_TIMEOUT_S) as pipes:
        for key in scan_masters(client, L.batch_version_pattern(version), DELETE_BATCH):
            pipes.add(key, encode((b"UNLINK", key)))
            if len(pipes) >= DELETE_BATCH:
                n += sum(pipes.execute())
        n += sum(pipes.execute())
    client.zrem(L.BATCH_VERSIONS_KEY, version)
    return n


def prune_versions(client: Any, current: str, keep: int) -> list[str]:
    """Delete the versions other than ``current`` that are incomplete (a publisher died half
    way: always), and the complete ones beyond the newest ``keep - 1`` (readers may still be
    on the previous one). Returns the deleted versions, oldest first."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the version just published), got {keep}")
    others = [v for v in versions(client) if v != current]
    complete = [v for v in others if is_complete(client, v)]
    stale = [v for v in others if v not in complete]
    stale += complete[: max(0, len(complete) - (keep - 1))]
    for v in stale:
        delete_version(client, v)
    return stale


# --------------------------------------------------------------------------- writing


def write_view_hashes(
    client: Any,
    version: str,
    buckets: pa.Table,
    longs: pa.Table,
    cutoff_ms: int,
    ttl_ms: int | None = None,
) -> int:
    """Write every data hash of ``version`` (see the module docstring) over raw pipelined
    connections to the client's server and database (on a Redis Cluster, one per master:
    each hash to the node that serves its slot); returns how many hashes. ``ttl_ms``: every
    hash expires after that long (benchmarks; default: never)."""
    for name, table, columns in (
        ("buckets", buckets, ("entity", "eid", "res", "bucket", "imps", "clicks")),
        ("longs", longs, ("entity", "eid", "long_window", "imps", "clicks")),
    ):
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(
                f"the {name} table lacks column(s) {missing}: it needs {list(columns)} "
                "(as ctrstream.batch.views.compute_batch_view returns them)"
            )
    ttl = str(int(ttl_ms)).encode() if ttl_ms else None
    keys_written = 0
    # Redis works through the chunks while the next entity's are rendered: they are sent in
    # order on one thread (DuckDB and the socket release the GIL), at most SEND_AHEAD queued
    with (
        NodePipelines(client, timeout=WRITE_TIMEOUT_S) as pipes,
        gc_paused(),
        ThreadPoolExecutor(1, thread_name_prefix="view-write") as sender,
    ):
        in_flight: deque[Future[list[Any]]] = deque()

        def send() -> None:
            in_flight.append(sender.submit(pipes.send, pipes.take(), False, True))
            while len(in_flight) > SEND_AHEAD or (in_flight and in_flight[0].done()):
                in_flight.popleft().result()  # a failed chunk raises here

        for g in _grouped_commands(buckets, longs, version, int(cutoff_ms)):
            keys, commands = g["key"], g["cmd"]
            keys_written += len(keys)
            for i in range(0, len(keys), PIPELINE_CHUNK):
                part = keys[i : i + PIPELINE_CHUNK]
                pipes.add_many(zip(part, commands[i : i + PIPELINE_CHUNK]))
                if ttl:
                    pipes.add_many((k, encode((b"PEXPIRE", k, ttl))) for k in part)
                if len(pipes) >= PIPELINE_CHUNK:
                    send()
        send()
        while in_flight:
            in_flight.popleft().result()
    return keys_written


def _grouped_commands(
    buckets: pa.Table, longs: pa.Table, version: str, cutoff_ms: int
) -> Iterator[dict[str, list[bytes]]]:
    """Batches of {key, cmd (the hash's whole ``HSET`` in RESP)}, one row per hash, one
    entity at a time."""
    import pyarrow.compute as pc

    for ent in F.ENTITIES:
        yield from _grouped_commands_of(
            buckets.filter(pc.equal(buckets["entity"], ent.name)),
            longs.filter(pc.equal(longs["entity"], ent.name)),
            version,
            cutoff_ms,
        )


def _resp_bulk_sql(expr: str) -> str:
    """A RESP bulk string of the VARCHAR ``expr`` as a SQL expression:
    ``$<bytes>\\r\\n<expr>\\r\\n``."""
    return f"'$' || CAST(strlen({expr}) AS VARCHAR) || {_CRLF} || {expr} || {_CRLF}"


_CRLF = "(chr(13) || chr(10))"


def _grouped_commands_of(
    buckets: pa.Table, longs: pa.Table, version: str, cutoff_ms: int
) -> Iterator[dict[str, list[bytes]]]:
    if buckets.num_rows == 0 and longs.num_rows == 0:
        return
    import duckdb

    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = false")
    try:
        con.register("b", buckets)
        con.register("l", longs)
        lit = L.sql_literal
        bkey = L.batch_key_sql(version, "entity", "eid", "res")
        lkey = L.batch_key_sql(version, "entity", "eid", lit(L.LONG_SUFFIX))
        skey = L.batch_key_sql(version, "entity", "eid", lit(L.SUMS_SUFFIX))
        ti, tc = F.EVENT_TYPES
        bulk = _resp_bulk_sql
        by_window = sorted(F.RESOLUTIONS, key=lambda r: -r.window_ms)
        spans = ", ".join(
            f"({lit(r.name)}, {F.view_buckets(cutoff_ms, r).start}, "
            f"{F.view_buckets(cutoff_ms, r).stop}, {1 + by_window.index(r)})"
            for r in F.RESOLUTIONS
        )
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
                SELECT {bkey} AS key, 0 AS ord, bucket,
                       {L.batch_field_sql(ti, "bucket")} AS fi,
                       {L.batch_field_sql(tc, "bucket")} AS fc, imps AS vi, clicks AS vc
                FROM b
                UNION ALL
                SELECT {lkey} AS key, 0 AS ord, 0 AS bucket,
                       {L.long_field_sql(ti, "long_window")} AS fi,
                       {L.long_field_sql(tc, "long_window")} AS fc, imps AS vi, clicks AS vc
                FROM l
                UNION ALL
                SELECT {skey} AS key, 0 AS ord, 0 AS bucket,
                       {L.long_field_sql(ti, "long_window")} AS fi,
                       {L.long_field_sql(tc, "long_window")} AS fc, imps AS vi, clicks AS vc
                FROM l
                UNION ALL
                SELECT {skey} AS key, vb.ord, bucket, {L.suffix_field_sql("res", ti, "bucket")},
                       {L.suffix_field_sql("res", tc, "bucket")}, si, sc
                FROM suffix JOIN vb USING (res)),
            frags AS (
                SELECT key, ord, bucket,
                       {bulk("fi")} || {bulk("CAST(vi AS VARCHAR)")} ||
                       {bulk("fc")} || {bulk("CAST(vc AS VARCHAR)")} AS frag
                FROM pairs)
            SELECT encode(key) AS key,
                   encode('*' || CAST(2 + 4 * count(*) AS VARCHAR) || {_CRLF}
                          || {bulk("'HSET'")} || {bulk("key")}
                          || string_agg(frag, '' ORDER BY ord, bucket)) AS cmd
            FROM frags GROUP BY key"""
        rel = con.sql(sql)
        reader = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
        # streamed in batches: the whole view as Python bytes would take GBs
        for batch in reader(GROUP_BATCH):
            yield batch.to_pydict()
    finally:
        con.close()


# --------------------------------------------------------------------------- reading


def read_view_counts(client: Any, version: str, entity: str, eid: str, res: str) -> dict[str, int]:
    """The fields of one batch-view hash as ints; ``res`` is a resolution name,
    ``layout.LONG_SUFFIX`` (``long``) or ``layout.SUMS_SUFFIX`` (``sums``)."""
    h = client.hgetall(
        L.batch_long_key(version, entity, eid)
        if res == L.LONG_SUFFIX
        else L.batch_sums_key(version, entity, eid)
        if res == L.SUMS_SUFFIX
        else L.batch_key(version, entity, eid, res)
    )
    return {text(k): int(v) for k, v in h.items()}


def read_version(client: Any, version: str) -> dict[tuple[str, str, str], dict[str, int]]:
    """Every data hash of ``version``: {(entity, id, part): {field: count}} with ``part`` a
    resolution name, ``long`` or ``sums`` (tests compare whole views with it). Strict: a key
    of the version that is neither its meta hash nor a data hash raises ValueError."""
    meta = L.batch_meta_key(version)

    def strict(key: str) -> tuple[str, str, str] | None:
        if key == meta:
            return None
        parsed = L.batch_entity_of(version, key)
        if parsed is None:
            raise ValueError(
                f"{key!r} is a key of batch view {version!r} but not one of its "
                "hashes (layout.batch_key / batch_long_key / batch_sums_key)"
            )
        return parsed

    keys = scan_keys(client, L.batch_version_pattern(version), strict)
    return {parsed: {text(f): int(v) for f, v in h} for parsed, h in read_hashes(client, keys)}


def scan_batch_view(client: Any, version: str, res: str | None = None) -> BucketCells:
    """Every per-bucket hash of ``version`` (of resolution ``res`` only, when given) as
    {(entity, id, res): {(event type, bucket): count}}: one SCAN and one bulk HGETALL per
    hash (:mod:`ctrstream.store.scan`). A hash that expired between the SCAN and its read is
    left out (it is missing, not empty)."""
    match = L.batch_version_pattern(version) + (f"{L.BATCH_RES_SEP}{res}" if res else "")
    keys = scan_keys(client, match, lambda k: L.parse_batch_key(version, k))
    out: BucketCells = {}
    field = L.BATCH_FIELD_RE.match
    with gc_paused():
        for parsed, h in read_hashes(client, keys):
            cells = {}
            for f, v in h:
                m = field(f)
                if m:
                    cells[(m.group(1).decode(), int(m.group(2)))] = int(v)
            if cells:
                out[parsed] = cells
    return out
