"""Feature assembly: one ad request -> exactly the model's input tensors.

A request is a user, a context (site, device, country, position, event time) and candidate
ads. Every candidate becomes one row with the columns of an impression
(``ctrstream.events.Impression``); from those columns:

* ``sparse`` = ``features.sparse_ids(columns)`` - the function the training set calls;
* ``dense``  = ``features.dense_from_counts(counts)`` where ``counts`` are the lambda-merged
  window counts of every entity of the row at the event time
  (``ctrstream.store.reader``, ``read_columns``: the entity ids of ``features.entity_id``,
  built per distinct value rather than per row), in the layout the batch layer's training
  set uses.

Nothing here re-implements a feature: ids, windows and transformations all come from
``ctrstream.features``, so training and serving cannot drift apart (``tests/test_assembly.py``
checks it against a brute-force count over raw events).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ctrstream import features as F
from ctrstream.store.reader import FeatureRead

CANDIDATE_FIELDS = ("ad_id", "campaign_id", "advertiser_id", "ad_category")
CONTEXT_FIELDS = ("site_id", "device_type", "country", "position")


@dataclass
class Assembled:
    sparse: np.ndarray  # int64 (rows, N_SPARSE)
    dense: np.ndarray  # float32 (rows, N_DENSE)
    counts: np.ndarray  # int64 (rows, len(ENTITIES), N_WINDOWS, 2)
    read: FeatureRead
    degraded: bool = False  # the feature store was unreachable: counts are all zero
    error: str | None = None


def request_columns(user_id: int, context: dict, candidates, t_ms: int) -> dict[str, np.ndarray]:
    """Impression columns, one row per candidate. ``candidates`` is a list of mappings or a
    dict of arrays with ``CANDIDATE_FIELDS``; ``context`` a mapping with ``CONTEXT_FIELDS``."""
    if isinstance(candidates, dict):
        cols = {f: np.asarray(candidates[f], dtype=np.int64) for f in CANDIDATE_FIELDS}
    else:
        arr = np.array([[c[f] for f in CANDIDATE_FIELDS] for c in candidates], dtype=np.int64)
        arr = arr.reshape(-1, len(CANDIDATE_FIELDS))
        cols = {f: arr[:, k] for k, f in enumerate(CANDIDATE_FIELDS)}
    n = len(cols["ad_id"])
    cols["user_id"] = np.full(n, int(user_id), dtype=np.int64)
    cols["site_id"] = np.full(n, int(context["site_id"]), dtype=np.int64)
    cols["position"] = np.full(n, int(context["position"]), dtype=np.int64)
    cols["device_type"] = np.full(n, str(context["device_type"]), dtype=object)
    cols["country"] = np.full(n, str(context["country"]), dtype=object)
    cols["event_time_ms"] = np.full(n, int(t_ms), dtype=np.int64)
    return cols


def entity_ids(columns: dict) -> np.ndarray:
    """``(rows, len(ENTITIES))`` object array of entity ids, exactly ``features.entity_id``."""
    as_text: dict[str, np.ndarray] = {}
    out = []
    for e in F.ENTITIES:
        parts = []
        for f in e.fields:
            if f not in as_text:
                as_text[f] = np.asarray(columns[f]).astype(str).astype(object)
            parts.append(as_text[f])
        ids = parts[0]
        for p in parts[1:]:
            ids = ids + ":" + p
        out.append(ids)
    return np.stack(out, axis=1)


def finish(
    columns: dict, read: FeatureRead, degraded: bool = False, error: str | None = None
) -> Assembled:
    sparse = F.sparse_ids(columns)
    dense = F.dense_from_counts(read.counts)
    return Assembled(sparse, dense, read.counts, read, degraded, error)


def empty_read(rows: int, t_ms: int) -> FeatureRead:
    """All-zero counts: what assembly serves when the feature store is out of reach."""
    return FeatureRead(
        np.zeros((rows, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.int64),
        int(t_ms),
        None,
        None,
        None,
    )


@dataclass
class TimedCounts:
    """Window counts of rows at their own event times (:func:`counts_at_event_times`)."""

    counts: np.ndarray  # int64 (rows, len(ENTITIES), N_WINDOWS, 2)
    degraded: np.ndarray  # bool (rows,) the store was out of reach for the row: zero counts
    error: str | None = None  # the first failure, when any
    reads: int = 0  # store calls made


ENTITY_FIELDS = tuple(dict.fromkeys(f for e in F.ENTITIES for f in e.fields))


def counts_at_event_times(store, columns: dict) -> TimedCounts:
    """The window counts of every row (event columns with ``event_time_ms``) **as of its own
    event time**, with one store read per distinct event-time minute (a
    ``ctrstream.store.reader.FeatureStore``, ``read_columns``).

    Every bucket boundary is a whole minute and a window's value at ``t`` depends on ``t``
    only through its buckets, so the rows of one minute share one read; it is made at the
    earliest event time of those rows (never later than any of them). A failed read (Redis
    down) gives those rows all-zero counts (every rate is the prior), flagged in
    ``degraded``: it never raises for the store. The streaming scorer and the ad server
    read their batches through it."""
    t = np.asarray(columns["event_time_ms"], dtype=np.int64)
    n = len(t)
    counts = np.zeros((n, len(F.ENTITIES), F.N_WINDOWS, 2), dtype=np.int64)
    degraded = np.zeros(n, dtype=bool)
    error: str | None = None
    minute = t // F.MINUTE_MS
    uniq, inv = np.unique(minute, return_inverse=True)
    by_minute = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[by_minute], np.arange(len(uniq) + 1))
    cols = {f: np.asarray(columns[f]) for f in ENTITY_FIELDS}
    for k in range(len(uniq)):
        sel = by_minute[bounds[k] : bounds[k + 1]]
        t_read = int(t[sel].min())
        try:
            counts[sel] = store.read_columns({f: c[sel] for f, c in cols.items()}, t_read).counts
        except Exception as e:  # noqa: BLE001 - Redis down: prior-only features, flagged
            counts[sel] = empty_read(len(sel), t_read).counts
            degraded[sel] = True
            error = error or f"feature store unavailable: {type(e).__name__}: {e}"
    return TimedCounts(counts, degraded, error, len(uniq))


def _timed(read: FeatureRead, t1: float, t2: float) -> None:
    """Stage timings: building the entity keys counts as assembly, the read as redis."""
    keys = read.timings.pop("keys", 0.0)
    read.timings.update(redis=(t2 - t1) - keys, assembly=keys + (time.perf_counter() - t2))


def assemble(store, columns: dict, t_ms: int) -> Assembled:
    """Synchronous assembly with a ``ctrstream.store.reader.FeatureStore``. Redis errors
    propagate (batch jobs should see them); the API uses :func:`assemble_async`."""
    t1 = time.perf_counter()
    read = store.read_columns(columns, t_ms)
    t2 = time.perf_counter()
    out = finish(columns, read)
    _timed(read, t1, t2)
    return out


async def assemble_async(store, columns: dict, t_ms: int) -> Assembled:
    """Assembly for the API: never raises for a Redis failure - the counts are then zero
    (every rate is the prior) and the result is flagged ``degraded`` with the error."""
    t1 = time.perf_counter()
    try:
        read = await store.read_columns(columns, t_ms)
        degraded, error = False, None
    except Exception as e:  # noqa: BLE001 - any Redis failure degrades, never fails the request
        read = empty_read(len(columns["ad_id"]), t_ms)
        degraded, error = True, f"feature store unavailable: {type(e).__name__}: {e}"
    t2 = time.perf_counter()
    out = finish(columns, read, degraded, error)
    _timed(read, t1, t2)
    return out


__all__ = [
    "Assembled",
    "request_columns",
    "entity_ids",
    "assemble",
    "assemble_async",
    "empty_read",
    "finish",
    "counts_at_event_times",
    "TimedCounts",
    "CANDIDATE_FIELDS",
    "CONTEXT_FIELDS",
]
