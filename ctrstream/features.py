"""The feature declarations: the lambda contract.

Every windowed feature in ctrstream is declared here, once. The speed layer (Bytewax,
``ctrstream.streaming.features_flow``), the batch layer (DuckDB over the Parquet archive,
``ctrstream.batch.point_in_time``), the batch views, the online merge and the training set all
compute from these declarations; nothing else hard-codes an entity, a bucket size or a
window. Reconciliation is meaningful only because of this.

Semantics
---------
* **Entities** are tuples of event fields (``ad`` = ``(ad_id,)``, ``user_x_advertiser`` =
  ``(user_id, advertiser_id)`` ...). Impressions and clicks both carry every field used here.
* **Event types**: impressions (``i``) and clicks (``c``), counted at their own event time.
* **Resolutions**: each served window is ``n_buckets`` consecutive event-time buckets of
  ``bucket_ms``; bucket index ``b = event_time_ms // bucket_ms``.
* **Window value at time t** (what serving reads and what training reproduces): the sum over
  buckets ``b(t) - n_buckets + 1 .. b(t)``, i.e. the current, still open bucket plus the
  ``n_buckets - 1`` closed ones before it. For training (point-in-time), only events with
  ``event_time_ms < t`` count in the current bucket: strictly earlier events, same buckets.
* **Long windows** (``LONG_WINDOWS``) are computed by the batch layer only, over whole days up
  to the batch cut-off, and served from the batch view.
* **Smoothing**: rates use a Beta(alpha, beta) prior: ``(clicks + alpha) / (imps + alpha + beta)``.

Where the counts live in Redis (the speed view, the batch view, the pointer between them)
is the store's business: :mod:`ctrstream.store.layout`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Entity:
    name: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Resolution:
    name: str  # the window it serves, e.g. "1h"
    bucket_ms: int
    n_buckets: int

    @property
    def window_ms(self) -> int:
        return self.bucket_ms * self.n_buckets


@dataclass(frozen=True)
class LongWindow:
    name: str
    days: int


@dataclass(frozen=True)
class BetaPrior:
    mean: float
    strength: float

    @property
    def alpha(self) -> float:
        return self.mean * self.strength

    @property
    def beta(self) -> float:
        return (1.0 - self.mean) * self.strength


MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

ENTITIES: tuple[Entity, ...] = (
    Entity("ad", ("ad_id",)),
    Entity("campaign", ("campaign_id",)),
    Entity("advertiser", ("advertiser_id",)),
    Entity("user", ("user_id",)),
    Entity("site", ("site_id",)),
    Entity("user_x_advertiser", ("user_id", "advertiser_id")),
    Entity("user_x_ad", ("user_id", "ad_id")),
    Entity("site_x_category", ("site_id", "ad_category")),
)
ENTITY_BY_NAME = {e.name: e for e in ENTITIES}

EVENT_TYPES: tuple[str, ...] = ("i", "c")  # impressions, clicks

RESOLUTIONS: tuple[Resolution, ...] = (
    Resolution("5m", MINUTE_MS, 5),
    Resolution("1h", 5 * MINUTE_MS, 12),
    Resolution("24h", HOUR_MS, 24),
)
RESOLUTION_BY_NAME = {r.name: r for r in RESOLUTIONS}

LONG_WINDOWS: tuple[LongWindow, ...] = (LongWindow("7d", 7),)

PRIOR = BetaPrior(mean=0.02, strength=100.0)

# Every bucket boundary of every resolution is a multiple of this: batch cut-offs are
# aligned to it so that a bucket is never split between the batch and the speed view.
CUTOFF_ALIGN_MS = max(r.bucket_ms for r in RESOLUTIONS)


# --------------------------------------------------------------------------- ids and buckets


def entity_id(entity: Entity, event: Any) -> str:
    """The id of ``entity`` for one event (object with attributes, or a mapping)."""
    if isinstance(event, dict):
        return ":".join(str(event[f]) for f in entity.fields)
    return ":".join(str(getattr(event, f)) for f in entity.fields)


def bucket_of(event_time_ms: Any, res: Resolution) -> Any:
    """Bucket index of an event time (scalar or numpy array)."""
    return event_time_ms // res.bucket_ms


def window_buckets(t_ms: int, res: Resolution) -> range:
    """Buckets whose sum is the window value at time ``t_ms`` (current bucket included)."""
    b = t_ms // res.bucket_ms
    return range(b - res.n_buckets + 1, b + 1)


def align_cutoff(t_ms: int) -> int:
    """The latest batch cut-off at or before ``t_ms`` (a bucket boundary of every resolution)."""
    return (t_ms // CUTOFF_ALIGN_MS) * CUTOFF_ALIGN_MS


# --------------------------------------------------------------------------- the batch view


def view_buckets(cutoff_ms: int, res: Resolution) -> range:
    """The buckets of ``res`` a batch view with cut-off ``cutoff_ms`` holds: closed by the
    cut-off and inside the resolution's window before it."""
    end = cutoff_ms // res.bucket_ms
    return range(end - res.n_buckets, end)


# --------------------------------------------------------------------------- dense features


def dense_feature_names() -> list[str]:
    """Names of the dense model inputs, in tensor order."""
    names = []
    for e in ENTITIES:
        for r in RESOLUTIONS:
            names += [
                f"{e.name}_{r.name}_log_imps",
                f"{e.name}_{r.name}_log_clicks",
                f"{e.name}_{r.name}_ctr",
            ]
        for w in LONG_WINDOWS:
            names += [
                f"{e.name}_{w.name}_log_imps",
                f"{e.name}_{w.name}_log_clicks",
                f"{e.name}_{w.name}_ctr",
            ]
    return names


N_WINDOWS = len(RESOLUTIONS) + len(LONG_WINDOWS)
N_DENSE = len(ENTITIES) * N_WINDOWS * 3


def smoothed_ctr(imps: Any, clicks: Any, prior: BetaPrior = PRIOR) -> np.ndarray:
    return (np.asarray(clicks, dtype=np.float64) + prior.alpha) / (
        np.asarray(imps, dtype=np.float64) + prior.alpha + prior.beta
    )


_DENSE_BLOCK_ROWS = 65_536


def dense_from_counts(counts: np.ndarray) -> np.ndarray:
    """Turn window counts into the dense model input.

    ``counts`` has shape ``(rows, len(ENTITIES), N_WINDOWS, 2)`` - impressions then clicks
    for each entity and window (``RESOLUTIONS`` then ``LONG_WINDOWS``). Returns float32
    ``(rows, N_DENSE)`` in ``dense_feature_names()`` order. Training and serving both call
    this, so the transformation cannot drift between them.
    """
    counts = np.asarray(counts)
    n = counts.shape[0]
    out = np.empty((n, len(ENTITIES), N_WINDOWS, 3), dtype=np.float32)
    # in blocks of rows: the float64 temporaries of a whole training set (several GB at
    # millions of rows) never exist at once
    for lo in range(0, n, _DENSE_BLOCK_ROWS):
        block = np.asarray(counts[lo : lo + _DENSE_BLOCK_ROWS], dtype=np.float64)
        imps, clicks = block[..., 0], block[..., 1]
        dst = out[lo : lo + _DENSE_BLOCK_ROWS]
        dst[..., 0] = np.log1p(imps)
        dst[..., 1] = np.log1p(clicks)
        dst[..., 2] = smoothed_ctr(imps, clicks)
    return out.reshape(n, N_DENSE)


def smoothed_rates(counts: np.ndarray, prior: BetaPrior = PRIOR) -> np.ndarray:
    """Beta-smoothed CTR of every window: ``counts[..., 0]`` imps, ``[..., 1]`` clicks."""
    counts = np.asarray(counts)
    return smoothed_ctr(counts[..., 0], counts[..., 1], prior)


def historical_ctr(counts: np.ndarray, entity: str = "ad", prior: BetaPrior = PRIOR) -> np.ndarray:
    """Per row, the smoothed CTR of ``entity`` over its window with the most impressions
    (the prior mean where there are none): the fallback score when the model is out of reach.
    ``counts`` is ``(rows, len(ENTITIES), N_WINDOWS, 2)``."""
    k = [e.name for e in ENTITIES].index(entity)
    c = np.asarray(counts)[:, k]  # (rows, N_WINDOWS, 2)
    best = np.argmax(c[..., 0], axis=1)
    pick = c[np.arange(len(c)), best]
    return smoothed_ctr(pick[:, 0], pick[:, 1], prior)


# --------------------------------------------------------------------------- sparse features

SPARSE_FIELDS: tuple[str, ...] = (
    "user_id",
    "ad_id",
    "campaign_id",
    "advertiser_id",
    "site_id",
    "ad_category",
    "device_type",
    "country",
    "position",
    "hour",
)
N_SPARSE = len(SPARSE_FIELDS)
HASH_BUCKETS = 1 << 15  # per field; ids of field k land in [k*HASH_BUCKETS, (k+1)*HASH_BUCKETS)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _hash_ints(values: np.ndarray, salt: int) -> np.ndarray:
    """Stable, vectorized hash of int64 ids into [0, HASH_BUCKETS) (multiplicative hashing)."""
    v = np.asarray(values).astype(np.uint64) ^ np.uint64(salt * 0x5851F42D4C957F2D & (2**64 - 1))
    with np.errstate(over="ignore"):
        h = (v * _GOLDEN) >> np.uint64(64 - 15)
    return h.astype(np.int64) & (HASH_BUCKETS - 1)


def _string_codes(values: Any) -> np.ndarray:
    import zlib

    arr = np.asarray(values, dtype=object)
    uniq, inv = np.unique(arr.astype(str), return_inverse=True)
    codes = np.array([zlib.crc32(u.encode()) for u in uniq], dtype=np.int64)
    return codes[inv]


def sparse_ids(columns: dict) -> np.ndarray:
    """Hashed sparse model input ``(rows, N_SPARSE)`` int64 from event columns.

    ``columns`` maps every name in ``SPARSE_FIELDS`` except ``hour`` to an array, plus
    ``event_time_ms`` (``hour`` = hour of day of the event time, UTC). String fields
    (device_type, country) are hashed by CRC32 of their text. Training and serving both call
    this function.
    """
    hour = (np.asarray(columns["event_time_ms"], dtype=np.int64) // HOUR_MS) % 24
    out = np.empty((len(hour), N_SPARSE), dtype=np.int64)
    for k, name in enumerate(SPARSE_FIELDS):
        col = hour if name == "hour" else columns[name]
        arr = np.asarray(col)
        if arr.dtype.kind in "OUS":
            arr = _string_codes(arr)
        out[:, k] = _hash_ints(arr.astype(np.int64), k) + k * HASH_BUCKETS
    return out


# --------------------------------------------------------------------------- model I/O contract
# Every published model (LR baseline and deep model, ONNX and Triton) takes these tensors.
INPUT_SPARSE = "sparse_ids"  # INT64 [batch, N_SPARSE]
INPUT_DENSE = "dense"  # FP32 [batch, N_DENSE]
OUTPUT_PROB = "prob"  # FP32 [batch, 1], the click probability (before online calibration)


def declaration() -> dict:
    return {
        "entities": [asdict(e) for e in ENTITIES],
        "event_types": list(EVENT_TYPES),
        "resolutions": [asdict(r) for r in RESOLUTIONS],
        "long_windows": [asdict(w) for w in LONG_WINDOWS],
        "prior": asdict(PRIOR),
        "sparse_fields": list(SPARSE_FIELDS),
        "hash_buckets": HASH_BUCKETS,
    }


def fingerprint() -> str:
    """A short hash of the declarations; model cards and batch views carry it."""
    blob = json.dumps(declaration(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
