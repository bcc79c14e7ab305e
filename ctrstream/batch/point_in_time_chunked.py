"""The point-in-time training set out of core: time-ordered chunks, carried window state, shards.

``point_in_time.training_set`` holds every event and every row's window counts at once
(about 2 GB per million impressions). :func:`training_set_chunked` computes the same rows,
bit for bit, one event-time chunk ``[a, b)`` at a time, and writes each chunk as a shard
(:mod:`ctrstream.batch.shards`):

* **Carried state, not events.** Between chunks it keeps, per entity and per *granule* (each
  resolution's bucket size, and whole UTC days for the long windows), the aggregated counts
  ``(entity key, bucket) -> (impressions, clicks)`` of every event before ``a`` in the buckets
  a later row can still reach (a resolution's last ``n_buckets - 1`` buckets and the current,
  partly filled one; the longest long window's days and the current day); older buckets are
  dropped as ``a`` moves on. Its size is bounded by the number of distinct (entity id,
  bucket) pairs inside the longest window, not by the events. It is kept as flat numpy
  arrays sorted by (key, bucket) - 24 bytes a pair - so a chunk adds and drops pairs and
  answers every row's windows in linear passes and binary searches, never re-sorting it.
  An entity's key packs its fields' stable codes (:class:`FieldCodes`), so any int64 ids
  key it exactly.
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
    lookback_start,
    point_in_time_counts,
    training_rows,
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


_CODE_BITS = 31  # bits of one field's code in a two-field key (two codes fill 62 bits)


class FieldCodes:
    """Stable dense codes of one id field's values: a value's code is fixed the first time
    it is seen (``0, 1, 2, ...`` in order of appearance), whatever the value's magnitude or
    sign, so that an entity of two fields packs into one int64 key that names the same
    entity in every chunk. Memory: two int64 per distinct value of the field seen in the
    build (never dropped: an archive with hundreds of millions of distinct users would
    notice)."""

    def __init__(self) -> None:
        self.values = np.empty(0, np.int64)  # sorted
        self.codes = np.empty(0, np.int64)  # the code of values[i]

    def encode(self, col: np.ndarray) -> np.ndarray:
        """The codes of ``col``'s values; unseen values get the next codes."""
        uniq, inv = np.unique(np.asarray(col, dtype=np.int64), return_inverse=True)
        pos = np.searchsorted(self.values, uniq)
        found = pos < len(self.values)
        found[found] = self.values[pos[found]] == uniq[found]
        codes = np.empty(len(uniq), np.int64)
        codes[found] = self.codes[pos[found]]
        fresh = ~found
        n_new = int(fresh.sum())
        if n_new:
            if len(self.values) + n_new > 1 << _CODE_BITS:
                raise ValueError(
                    f"more than {1 << _CODE_BITS:,} distinct values of one id field: the "
                    "chunked build cannot key them; build in memory (ctrstream train "
                    "--in-memory) or split the archive by time"
                )
            codes[fresh] = len(self.values) + np.arange(n_new, dtype=np.int64)
            at = pos[fresh]
            self.values = np.insert(self.values, at, uniq[fresh])
            self.codes = np.insert(self.codes, at, codes[fresh])
        return codes[inv.reshape(-1)]


class _Carried:
    """The carried counts of one (entity, granule): one row per (key, bucket) with events
    before the current chunk, sorted by key, then bucket (24 bytes a row)."""

    __slots__ = ("key", "bucket", "imps", "clicks")

    def __init__(self) -> None:
        self.key = np.empty(0, np.int64)
        self.bucket = np.empty(0, np.int64)
        self.imps = np.empty(0, np.int32)
        self.clicks = np.empty(0, np.int32)

    def __len__(self) -> int:
        return len(self.key)

    def nbytes(self) -> int:
        return self.key.nbytes + self.bucket.nbytes + self.imps.nbytes + self.clicks.nbytes

    def _select(self, mask: np.ndarray) -> None:
        self.key, self.bucket = self.key[mask], self.bucket[mask]
        self.imps, self.clicks = self.imps[mask], self.clicks[mask]

    def add(
        self, key: np.ndarray, bucket: np.ndarray, click: np.ndarray, split: int, keep_from: int
    ) -> None:
        """Add events (``click``: 0 impression, 1 click) whose buckets are all ``>= split``
        (every carried row's bucket is ``<= split``: ``split`` holds the chunk's start and
        may have events on both sides), then drop the buckets before ``keep_from``."""
        imps = (1 - click).astype(np.int32)
        clicks = click.astype(np.int32)
        if len(self):
            cut = self.bucket >= split  # the split bucket: re-aggregated with the new events
            if cut.any():
                key = np.concatenate([self.key[cut], key])
                bucket = np.concatenate([self.bucket[cut], bucket])
                imps = np.concatenate([self.imps[cut], imps])
                clicks = np.concatenate([self.clicks[cut], clicks])
                self._select(~cut)
        if len(self):
            old = self.bucket >= keep_from
            if not old.all():
                self._select(old)
        new = bucket >= keep_from
        if not new.all():
            key, bucket, imps, clicks = key[new], bucket[new], imps[new], clicks[new]
        if not len(key):
            return
        # group the new rows by (key, bucket)
        order = np.lexsort((bucket, key))
        key, bucket = key[order], bucket[order]
        starts = np.flatnonzero(
            np.concatenate([[True], (key[1:] != key[:-1]) | (bucket[1:] != bucket[:-1])])
        )
        imps = np.add.reduceat(imps[order], starts).astype(np.int32)
        clicks = np.add.reduceat(clicks[order], starts).astype(np.int32)
        key, bucket = key[starts], bucket[starts]
        # every carried bucket is now before every new one: a key's new rows go after its
        # carried rows
        at = np.searchsorted(self.key, key, side="right")
        self.key = np.insert(self.key, at, key)
        self.bucket = np.insert(self.bucket, at, bucket)
        self.imps = np.insert(self.imps, at, imps)
        self.clicks = np.insert(self.clicks, at, clicks)

    def window_sums(
        self, q_key: np.ndarray, bounds: list[tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per ``(b_lo, b_hi)`` in ``bounds`` (bucket numbers, one pair per query row): the
        impressions and clicks of the rows of key ``q_key`` with ``b_lo <= bucket < b_hi``."""
        n = len(q_key)
        if not len(self):
            return [(np.zeros(n, np.int64), np.zeros(n, np.int64)) for _ in bounds]
        # rank of each row's key among the distinct keys (the rows are sorted by key)
        first = np.concatenate([[True], self.key[1:] != self.key[:-1]])
        rank = np.cumsum(first) - 1
        keys = self.key[first]
        base = int(self.bucket.min())
        span = int(self.bucket.max()) - base + 2
        comp = rank * span + (self.bucket - base)
        del rank
        cum_i = np.concatenate([[0], np.cumsum(self.imps, dtype=np.int64)])
        cum_c = np.concatenate([[0], np.cumsum(self.clicks, dtype=np.int64)])
        q = np.searchsorted(keys, q_key)
        found = q < len(keys)
        found[found] = keys[q[found]] == q_key[found]
        out = []
        for b_lo, b_hi in bounds:
            lo = q * span + np.clip(b_lo - base, 0, span - 1)
            hi = q * span + np.clip(b_hi - base, 0, span - 1)
            i_lo = np.searchsorted(comp, lo, side="left")
            i_hi = np.where(found, np.searchsorted(comp, hi, side="left"), i_lo)
            out.append((cum_i[i_hi] - cum_i[i_lo], cum_c[i_hi] - cum_c[i_lo]))
        return out


class WindowState:
    """The carried counts of every entity and granule (:class:`_Carried`), keyed by the
    entities' fields through :class:`FieldCodes`."""

    def __init__(self) -> None:
        wide = [e.name for e in F.ENTITIES if len(e.fields) * _CODE_BITS > 62]
        if wide:
            raise ValueError(
                f"entities {wide} declare more than {62 // _CODE_BITS} fields: the chunked "
                "build packs an entity's field codes into one int64 key"
            )
        self.fields = {f: FieldCodes() for e in F.ENTITIES for f in e.fields}
        self.tables: dict[tuple[str, int], _Carried] = {
            (e.name, g): _Carried() for e in F.ENTITIES for g in range(len(_GRANULES))
        }

    def rows(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tables.values()) + sum(
            c.values.nbytes + c.codes.nbytes for c in self.fields.values()
        )

    def keys(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Every entity's int64 key of ``table``'s rows (one code per field, packed)."""
        codes = {f: self.fields[f].encode(table.column(f).to_numpy()) for f in self.fields}
        out = {}
        for e in F.ENTITIES:
            key = codes[e.fields[0]]
            for f in e.fields[1:]:
                key = (key << _CODE_BITS) | codes[f]
            out[e.name] = key
        return out

    def add(self, imps: pa.Table, clks: pa.Table, a_ms: int, b_ms: int) -> None:
        """Add the events of chunk ``[a_ms, b_ms)`` and drop the buckets no row at or after
        ``b_ms`` can count."""
        both = pa.concat_tables([imps.select(_count_fields()), clks.select(_count_fields())])
        t = both.column("event_time_ms").to_numpy().astype(np.int64)
        click = np.concatenate([np.zeros(imps.num_rows, np.int8), np.ones(clks.num_rows, np.int8)])
        keys = self.keys(both)
        for e in F.ENTITIES:
            for g, gms in enumerate(_GRANULES):
                self.tables[(e.name, g)].add(
                    keys[e.name], t // gms, click, a_ms // gms, _keep_from(b_ms, g)
                )

    def counts(self, query: pa.Table) -> np.ndarray:
        """The carried part of every window of every query row (all at or after the
        current chunk's start): ``(rows, len(ENTITIES), N_WINDOWS, 2)``. A carried bucket
        counts in a window ``[lo, hi)`` when its start is in it."""
        n = query.num_rows
        out = np.zeros((n, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.float64)
        if n == 0:
            return out
        qt = query.column("event_time_ms").to_numpy().astype(np.int64)
        bounds = window_bounds(qt)
        keys = self.keys(query)
        for k, e in enumerate(F.ENTITIES):
            for g, gms in enumerate(_GRANULES):
                wins = [w for w in range(F.N_WINDOWS) if _GRANULE_OF[w] == g]
                if not wins:
                    continue
                # bucket b starts in [lo, hi) <=> ceil(lo / gms) <= b < ceil(hi / gms)
                bb = [(-(-bounds[w][0] // gms), -(-bounds[w][1] // gms)) for w in wins]
                sums = self.tables[(e.name, g)].window_sums(keys[e.name], bb)
                for w, (si, sc) in zip(wins, sums):
                    out[:, k, w, 0] = si
                    out[:, k, w, 1] = sc
        return out


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
    return training_rows(query, label, delay, counts)


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
