"""The point-in-time training set out of core: time-ordered chunks, carried window state, shards.

``point_in_time.training_set`` holds every event and every row's window counts at once
(about 2 GB per million impressions). :func:`training_set_chunked` computes the same rows,
bit for bit, one event-time chunk ``[a, b)`` at a time, and writes each chunk as a shard
(:mod:`ctrstream.batch.shards`):

* **Carried state, not events.** Between chunks it keeps, per entity and per *granule* (each
  resolution's bucket size, and whole UTC days for the long windows), the aggregated counts
  ``(entity id, bucket) -> (impressions, clicks)`` of every event before ``a`` in the buckets
  a later row can still reach (a resolution's last ``n_buckets - 1`` buckets and the current,
  partly filled one; the longest long window's days and the current day); older buckets are
  dropped as ``a`` moves on. Its size is bounded by the number of distinct (entity id,
  bucket) pairs inside the longest window, not by the events.
* **Why any chunk edge is exact.** A row at ``t >= a`` asks each window for the events in
  ``[lo, hi)`` where ``lo`` (and ``hi`` for the long windows) is a bucket boundary of the
  window's granule (``point_in_time.window_bounds``). The events before ``a`` are carried
  as one count per bucket, placed at the bucket's start: a bucket starts at or after ``lo``
  exactly when all of it does, and it starts before ``hi`` (``hi = t >= a`` for resolutions;
  a whole day before ``day(t)`` for the long windows) exactly when its events before ``a``
  are before ``hi``. So a row's window is (carried counts of the buckets starting in
  ``[lo, hi)``) + (the chunk's own events in ``[lo, hi)``), the latter by
  ``point_in_time.point_in_time_counts`` over the chunk's events - whatever the chunk's
  length or alignment (a bucket split by the chunk edge is carried with the part before it).
* **Labels** by the same DuckDB range join as the in-memory build, per chunk, over the
  clicks in ``[a, min(b, end) + attribution window]``, with DuckDB's ``memory_limit`` and a
  spill ``temp_directory``.
* **Reading.** Each chunk reads only its own events from the archive
  (``archive.read_events``: the hour partitions that overlap it), deduplicated by event id
  within the chunk. Copies of one event carry the same event time (a re-delivered record,
  the generator's duplicates), so they fall in one chunk and this is the in-memory
  deduplication; copies with *different* event times in different chunks would each be
  counted (the in-memory build keeps the earliest), and a click timed before its
  impression's chunk is not attributed (the in-memory build attributes it).

Memory: one chunk's events and rows (``chunk_ms``; by default sized for about
:data:`CHUNK_ROWS` impressions) plus the carried state. Measured: docs/out-of-core.md.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctrstream import features as F
from ctrstream.batch import shards
from ctrstream.batch.archive import list_files, list_partitions, max_event_time, read_events
from ctrstream.batch.point_in_time import (
    _count_fields,
    _entity_keys,
    lookback_start,
    point_in_time_counts,
    window_bounds,
)

CHUNK_ROWS = 250_000  # impressions per chunk when chunk_ms is not given
DEFAULT_MEMORY_LIMIT = "2GB"  # DuckDB's, for the label join (it spills beyond it)

# granules of the carried state: each resolution's bucket size, then whole days (every long
# window); window w of window_bounds() uses granule _GRANULE_OF[w]
_GRANULES: tuple[int, ...] = tuple(r.bucket_ms for r in F.RESOLUTIONS) + (F.DAY_MS,)
_GRANULE_OF: tuple[int, ...] = tuple(range(len(F.RESOLUTIONS))) + (len(F.RESOLUTIONS),) * len(
    F.LONG_WINDOWS
)
_MAX_DAYS = max((w.days for w in F.LONG_WINDOWS), default=0)


def _keep_from(a_ms: int, g: int) -> int:
    """The oldest bucket of granule ``g`` a row at ``t >= a_ms`` can count."""
    if g < len(F.RESOLUTIONS):
        r = F.RESOLUTIONS[g]
        return a_ms // r.bucket_ms - r.n_buckets + 1
    return a_ms // F.DAY_MS - _MAX_DAYS


class WindowState:
    """The carried counts: per entity and granule, a table of the entity's fields,
    ``bucket``, ``imps``, ``clicks`` (one row per (id, bucket) with events before the
    current chunk), its rows ordered by bucket."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, int], pa.Table] = {}

    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables.values())

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())

    def add(self, imps: pa.Table, clks: pa.Table, a_ms: int, b_ms: int) -> None:
        """Add the events of chunk ``[a_ms, b_ms)`` and drop the buckets no row at or after
        ``b_ms`` can count."""
        both = pa.concat_tables([imps.select(_count_fields()), clks.select(_count_fields())])
        t = both.column("event_time_ms").to_numpy().astype(np.int64)
        is_click = np.concatenate(
            [np.zeros(imps.num_rows, np.int64), np.ones(clks.num_rows, np.int64)]
        )
        for e in F.ENTITIES:
            cols = list(e.fields)
            for g, gms in enumerate(_GRANULES):
                old = self.tables.get((e.name, g))
                new = None
                if len(t):
                    ev = pa.table(
                        {f: both.column(f).cast(pa.int64()) for f in cols}
                        | {"bucket": t // gms, "imps": 1 - is_click, "clicks": is_click}
                    )
                    new = _group(ev, cols)
                if old is not None and old.num_rows and new is not None:
                    # only the buckets from a's on can hold events of both (a split bucket)
                    split = int(np.searchsorted(old.column("bucket").to_numpy(), a_ms // gms))
                    if split < old.num_rows:
                        new = _group(pa.concat_tables([old.slice(split), new]), cols)
                    old = old.slice(0, split)
                merged = (
                    new
                    if old is None or old.num_rows == 0
                    else (old if new is None else pa.concat_tables([old, new]))
                )
                if merged is None:
                    continue
                b = merged.column("bucket").to_numpy()
                first = int(np.searchsorted(b, _keep_from(b_ms, g)))
                self.tables[(e.name, g)] = merged.slice(first).combine_chunks()

    def counts(self, query: pa.Table) -> np.ndarray:
        """The carried part of every window of every query row (all at or after the
        current chunk's start): ``(rows, len(ENTITIES), N_WINDOWS, 2)``."""
        n = query.num_rows
        out = np.zeros((n, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.float64)
        if n == 0:
            return out
        qt = query.column("event_time_ms").to_numpy().astype(np.int64)
        bounds = window_bounds(qt)
        for k, e in enumerate(F.ENTITIES):
            for g, gms in enumerate(_GRANULES):
                st = self.tables.get((e.name, g))
                wins = [w for w in range(F.N_WINDOWS) if _GRANULE_OF[w] == g]
                if st is None or st.num_rows == 0 or not wins:
                    continue
                s_t = st.column("bucket").to_numpy().astype(np.int64) * gms
                base = min(int(s_t.min()), min(int(bounds[w][0].min()) for w in wins))
                top = max(int(s_t.max()), max(int(bounds[w][1].max()) for w in wins))
                span = top - base + 2
                s_key, q_key = _entity_keys(e, st, query, limit=(2**62) // span)
                comp = s_key * span + (s_t - base)
                order = np.argsort(comp, kind="stable")
                comp = comp[order]
                cum_i = np.concatenate([[0], np.cumsum(st.column("imps").to_numpy()[order])])
                cum_c = np.concatenate([[0], np.cumsum(st.column("clicks").to_numpy()[order])])
                qbase = q_key * span - base
                for w in wins:
                    lo, hi = bounds[w]
                    i_lo = np.searchsorted(comp, qbase + lo, side="left")
                    i_hi = np.searchsorted(comp, qbase + hi, side="left")
                    out[:, k, w, 0] = cum_i[i_hi] - cum_i[i_lo]
                    out[:, k, w, 1] = cum_c[i_hi] - cum_c[i_lo]
        return out


def _group(ev: pa.Table, cols: list[str]) -> pa.Table:
    """Sum ``imps``, ``clicks`` per (fields, bucket), rows ordered by bucket."""
    g = ev.group_by(cols + ["bucket"]).aggregate([("imps", "sum"), ("clicks", "sum")])
    g = g.rename_columns([c.removesuffix("_sum") for c in g.column_names])
    return g.select(cols + ["bucket", "imps", "clicks"]).sort_by("bucket")


# --------------------------------------------------------------------------- chunks


def chunk_grid(first_ms: int, end_ms: int, chunk_ms: int) -> list[tuple[int, int]]:
    """``[a, b)`` chunks covering ``[first_ms, end_ms)``: edges at multiples of ``chunk_ms``."""
    if chunk_ms < 1:
        raise ValueError(f"chunk_ms must be a positive number of ms, got {chunk_ms}")
    out = []
    a = first_ms
    while a < end_ms:
        b = min(end_ms, (a // chunk_ms + 1) * chunk_ms)
        out.append((a, b))
        a = b
    return out


def auto_chunk_ms(data_dir: Path | str, lo_ms: int, hi_ms: int, rows: int | None = None) -> int:
    """A chunk length (whole minutes, at most a day) that holds about ``rows`` impressions
    (default :data:`CHUNK_ROWS`) at the archive's mean density over ``[lo_ms, hi_ms)``
    (Parquet metadata only)."""
    rows = CHUNK_ROWS if rows is None else rows
    files = list_files(data_dir, "impressions", lo_ms, hi_ms)
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    span = max(1, hi_ms - lo_ms)
    if n <= rows:
        return F.DAY_MS
    ms = int(span * rows / n) // F.MINUTE_MS * F.MINUTE_MS
    return int(min(F.DAY_MS, max(F.MINUTE_MS, ms)))


def _label_join(con: Any, query: pa.Table, clks: pa.Table, W: int) -> tuple[np.ndarray, np.ndarray]:
    n = query.num_rows
    q_ids = pa.table(
        {
            "qid": np.arange(n, dtype=np.int64),
            "impression_id": query.column("impression_id"),
            "event_time_ms": query.column("event_time_ms"),
        }
    )
    con.register("q", q_ids)
    con.register("clk", clks.select(["impression_id", "event_time_ms"]))
    try:
        lab = con.execute(f"""
            SELECT q.qid, min(c.event_time_ms) - q.event_time_ms AS delay
            FROM q JOIN clk c ON c.impression_id = q.impression_id
                 AND c.event_time_ms <= q.event_time_ms + {int(W)}
            GROUP BY q.qid, q.event_time_ms""").fetchnumpy()
    finally:
        con.unregister("q")
        con.unregister("clk")
    label = np.zeros(n, dtype=np.int8)
    delay = np.full(n, -1, dtype=np.int64)
    label[lab["qid"]] = 1
    delay[lab["qid"]] = lab["delay"]
    return label, delay


def iter_training_chunks(
    data_dir: Path | str,
    start_ms: int | None = None,
    end_ms: int | None = None,
    attribution_window_ms: int = 1_800_000,
    chunk_ms: int | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    temp_dir: Path | str | None = None,
    stats: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``point_in_time.training_set(data_dir, start_ms, end_ms,
    attribution_window_ms)``, one chunk at a time in event-time order, with the same arrays
    (``counts`` included). ``stats`` (a dict, optional) receives ``chunks``, ``chunk_ms``
    and ``state_rows_max`` / ``state_mb_max`` (the carried state's peak)."""
    import duckdb

    W = int(attribution_window_ms)
    max_t = max_event_time(data_dir)
    if max_t is None:
        return
    label_end = max_t - W + 1  # exclusive: labels complete for t <= max_t - W
    end = label_end if end_ms is None else min(int(end_ms), label_end)
    if start_ms is not None:
        first = lookback_start(int(start_ms))
    else:
        parts = [p for k in ("impressions", "clicks") for p in list_partitions(data_dir, k)]
        if not parts:
            return
        first = min(h for h, _ in parts) * F.HOUR_MS
    if end <= first:
        return
    q_lo = first if start_ms is None else int(start_ms)
    if chunk_ms is None:
        chunk_ms = auto_chunk_ms(data_dir, q_lo, end)
    grid = chunk_grid(first, end, int(chunk_ms))
    st: dict = stats if stats is not None else {}
    st.update(chunks=len(grid), chunk_ms=int(chunk_ms), state_rows_max=0, state_mb_max=0.0)

    own_tmp = None
    if temp_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="ctrstream-pit-")
        temp_dir = own_tmp.name
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"SET temp_directory = '{Path(temp_dir)}'")
        state = WindowState()
        for a, b in grid:
            imps = read_events(data_dir, "impressions", a, b)
            has_rows = b > q_lo
            clk_hi = b + W + 1 if has_rows else b
            clks_all = read_events(data_dir, "clicks", a, clk_hi)
            clks = clks_all.filter(pc.less(clks_all.column("event_time_ms"), b))
            if has_rows:
                t_imp = imps.column("event_time_ms")
                query = imps.filter(pc.greater_equal(t_imp, q_lo)) if q_lo > a else imps
                if query.num_rows:
                    yield _rows(con, query, imps, clks, clks_all, state, W)
            state.add(imps, clks, a, b)
            st["state_rows_max"] = max(st["state_rows_max"], state.rows())
            st["state_mb_max"] = max(st["state_mb_max"], round(state.nbytes() / 1e6, 1))
    finally:
        con.close()
        if own_tmp is not None:
            own_tmp.cleanup()


def _rows(
    con: Any,
    query: pa.Table,
    imps: pa.Table,
    clks: pa.Table,
    clks_label: pa.Table,
    state: WindowState,
    W: int,
) -> dict[str, np.ndarray]:
    label, delay = _label_join(con, query, clks_label, W)
    counts = point_in_time_counts(imps, clks, query)
    counts += state.counts(query)
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


def training_set_chunked(
    data_dir: Path | str,
    out_dir: Path | str,
    start_ms: int | None = None,
    end_ms: int | None = None,
    attribution_window_ms: int = 1_800_000,
    chunk_ms: int | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    temp_dir: Path | str | None = None,
    stats: dict | None = None,
) -> dict[str, Any]:
    """Build the point-in-time training set of the archive under ``data_dir`` chunk by
    chunk into the shard directory ``out_dir`` (new or empty) and return its manifest
    (:mod:`ctrstream.batch.shards`). Same rows and values as
    ``point_in_time.training_set(data_dir, start_ms, end_ms, attribution_window_ms)``; one
    shard per chunk with rows. ``chunk_ms``: chunk length (default: about
    :data:`CHUNK_ROWS` impressions per chunk); ``memory_limit`` / ``temp_dir``: DuckDB's
    memory limit and spill directory for the label join."""
    writer = shards.ShardWriter(
        out_dir, attribution_window_ms=attribution_window_ms, start_ms=start_ms, end_ms=end_ms
    )
    for rows in iter_training_chunks(
        data_dir,
        start_ms,
        end_ms,
        attribution_window_ms,
        chunk_ms=chunk_ms,
        memory_limit=memory_limit,
        temp_dir=temp_dir,
        stats=stats,
    ):
        rows.pop("counts")
        writer.write(rows)
    return writer.close()


__all__ = [
    "CHUNK_ROWS",
    "WindowState",
    "auto_chunk_ms",
    "chunk_grid",
    "iter_training_chunks",
    "training_set_chunked",
]
