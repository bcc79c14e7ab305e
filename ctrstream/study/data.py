"""What every sweep of the freshness study shares: the generated traffic with its truth, the
point-in-time features at a chosen staleness, labels at a chosen attribution window, model
fitting on chosen rows, and the evaluation next to the oracle with bootstrap intervals.

Labels: a model is *trained* on what the join would label (a click within the attribution
window, :func:`labels_within`); every model is *evaluated* on whether the impression was
clicked at all (``StudyData.clicked``), the event the oracle's probability describes, so a
short attribution window shows up as the bias it causes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ctrstream import features as F
from ctrstream import metrics as M
from ctrstream.batch.archive import dedupe
from ctrstream.batch.point_in_time import point_in_time_counts
from ctrstream.simulation.generator import generate
from ctrstream.simulation.scenarios import Scenario
from ctrstream.simulation.traffic import Traffic

HOUR_MS = 3_600_000
DAY_MS = F.DAY_MS


@dataclass
class StudyData:
    """One scenario's traffic, every impression a row (sorted by event time).

    ``clicked``: the impression was clicked at all (any delay); ``delay_ms``: its first
    click's delay (-1 when not clicked); ``oracle_p``: the true click probability;
    ``sparse``: the model's sparse inputs; ``history_end_ms``: the end of the first day
    (history only: no row before it is trained on or evaluated)."""

    scenario: Scenario
    traffic: Traffic
    impressions: pa.Table
    clicks: pa.Table
    t: np.ndarray
    clicked: np.ndarray
    delay_ms: np.ndarray
    oracle_p: np.ndarray
    sparse: np.ndarray
    history_end_ms: int
    _dense_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.t)

    def rows_between(self, lo_ms: int, hi_ms: int) -> np.ndarray:
        """Indices of the rows with ``lo_ms <= t < hi_ms`` (a contiguous range)."""
        a, b = np.searchsorted(self.t, [lo_ms, hi_ms], side="left")
        return np.arange(int(a), int(b))


def load_study_data(scenario: Scenario, history_hours: float = 24.0) -> StudyData:
    """Generate ``scenario`` and lay it out for the sweeps."""
    tr = generate(scenario)
    imps = dedupe("impressions", tr.impressions)  # sorted by (event_time_ms, impression_id)
    clks = dedupe("clicks", tr.clicks)
    ids = imps.column("impression_id").to_numpy(zero_copy_only=False)
    t = imps.column("event_time_ms").to_numpy().astype(np.int64)

    # the first click per impression (the generator clicks each impression at most once)
    c_ids = clks.column("impression_id").to_numpy(zero_copy_only=False)
    c_t = clks.column("event_time_ms").to_numpy().astype(np.int64)
    pos = {k: i for i, k in enumerate(ids)}
    rows = np.fromiter((pos[k] for k in c_ids), dtype=np.int64, count=len(c_ids))
    delay = np.full(len(t), -1, dtype=np.int64)
    first = np.full(len(t), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, rows, c_t)
    hit = first != np.iinfo(np.int64).max
    delay[hit] = first[hit] - t[hit]

    o_ids = tr.oracle.column("impression_id").to_numpy(zero_copy_only=False)
    o_p = tr.oracle.column("p_click").to_numpy()
    o_pos = np.fromiter((pos[k] for k in o_ids), dtype=np.int64, count=len(o_ids))
    oracle_p = np.empty(len(t))
    oracle_p[o_pos] = o_p

    cols = {
        name: imps.column(name).to_numpy(zero_copy_only=False)
        for name in F.SPARSE_FIELDS
        if name != "hour"  # derived from the event time
    } | {"event_time_ms": t}
    return StudyData(
        scenario=scenario,
        traffic=tr,
        impressions=imps,
        clicks=clks,
        t=t,
        clicked=hit.astype(np.int8),
        delay_ms=delay,
        oracle_p=oracle_p,
        sparse=F.sparse_ids(cols),
        history_end_ms=int(scenario.start_ms + round(history_hours * HOUR_MS)),
    )


def labels_within(data: StudyData, window_ms: int, idx: np.ndarray | None = None) -> np.ndarray:
    """The join's label with an attribution window of ``window_ms``: clicked within it."""
    d = data.delay_ms if idx is None else data.delay_ms[idx]
    return ((d >= 0) & (d <= int(window_ms))).astype(np.int8)


def dense_at(
    data: StudyData,
    idx: np.ndarray,
    visible_until_ms: np.ndarray | None = None,
    key: str | None = None,
) -> np.ndarray:
    """The dense model inputs of rows ``idx`` with windows that count only the events before
    ``visible_until_ms`` (one per row; None = fresh: strictly earlier events, what the
    serving path reads with no lag). ``key`` caches the result under that name."""
    if key is not None and key in data._dense_cache:
        return data._dense_cache[key]
    query = data.impressions.take(pa.array(idx))
    counts = point_in_time_counts(data.impressions, data.clicks, query, visible_until_ms)
    dense = F.dense_from_counts(counts)
    if key is not None:
        data._dense_cache[key] = dense
    return dense


def fit(
    kind: str,
    sparse: np.ndarray,
    dense: np.ndarray,
    labels: np.ndarray,
    t: np.ndarray,
    seed: int = 0,
    **train_kwargs,
):
    """A model of ``kind`` ("lr" | "deep") trained on exactly these rows (the training loop
    of ``ctrstream train``, one epoch, its defaults); returns the module."""
    from ctrstream.models.training import train

    ds = {"event_time_ms": t, "label": labels, "sparse": sparse, "dense": dense}
    # train() holds out its last rows for validation; a sliver here (the study evaluates
    # on its own rows), so nearly every given row is trained on
    net, _ = train(ds, kind, seed=seed, progress=False, val_fraction=0.001, **train_kwargs)
    return net


def predict(net, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
    from ctrstream.models.training import predict as _predict

    return _predict(net, sparse, dense)


def quality(p: np.ndarray, data: StudyData, idx: np.ndarray) -> dict:
    """NE and AUC of ``p`` on rows ``idx`` against whether they were clicked, next to the
    oracle's on the same rows, and the gap ``ne / oracle_ne - 1``."""
    y = data.clicked[idx]
    o = data.oracle_p[idx]
    ne, o_ne = M.normalized_entropy(p, y), M.normalized_entropy(o, y)
    return dict(
        rows=int(len(idx)),
        clicks=int(y.sum()),
        ne=ne,
        auc=M.auc(p, y),
        oracle_ne=o_ne,
        oracle_auc=M.auc(o, y),
        ne_gap=ne / o_ne - 1.0,
        calibration=M.calibration_ratio(p, y),
    )


def bootstrap_ne_diff(
    p_a: np.ndarray,
    p_b: np.ndarray,
    y: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """``NE(a) - NE(b)`` on the same rows and its ``1 - alpha`` percentile bootstrap
    interval (rows resampled with replacement, both predictions together): (diff, lo, hi).
    Resamples without a click (or without a non-click) are skipped; with very few clicks the
    interval is wide, and NaN when no resample had both."""
    p_a, p_b, y = np.asarray(p_a), np.asarray(p_b), np.asarray(y, dtype=np.float64)
    diff = M.normalized_entropy(p_a, y) - M.normalized_entropy(p_b, y)
    rng = np.random.default_rng(seed)
    n = len(y)
    eps = 1e-12
    ll_a = -(y * np.log(np.clip(p_a, eps, 1)) + (1 - y) * np.log(np.clip(1 - p_a, eps, 1)))
    ll_b = -(y * np.log(np.clip(p_b, eps, 1)) + (1 - y) * np.log(np.clip(1 - p_b, eps, 1)))
    out = np.full(n_boot, np.nan)
    for k in range(n_boot):
        i = rng.integers(0, n, n)
        ctr = y[i].mean()
        if not 0.0 < ctr < 1.0:  # no click (or no non-click) drawn: NE is undefined there
            continue
        h = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
        out[k] = (ll_a[i].mean() - ll_b[i].mean()) / h
    if np.isnan(out).all():
        return float(diff), float("nan"), float("nan")
    lo, hi = np.nanquantile(out, [alpha / 2, 1 - alpha / 2])
    return float(diff), float(lo), float(hi)


__all__ = [
    "HOUR_MS",
    "DAY_MS",
    "StudyData",
    "load_study_data",
    "labels_within",
    "dense_at",
    "fit",
    "predict",
    "quality",
    "bootstrap_ne_diff",
]
