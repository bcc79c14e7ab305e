"""Sweep 4: batch inference against online inference - predictions precomputed every N hours
and served from Redis, against scoring every request online with fresh features.

The set-up (``params`` of the result says the values of a run):

* **one model** (``kind``) trained on ``train_hours`` of rows before the evaluation start
  ``E`` (the end of the day after the history day by default), on the join's labels
  (:func:`~ctrstream.study.data.labels_within` at the scenario's attribution window), only
  rows whose labels are final at ``E`` (``t + window < E``). Both arms serve this model, so
  the difference between them is the age of the *features and context* a prediction was made
  with, and which pairs have one - not the model's age (sweep 2 measures that);
* **batch inference, every N hours** (``every_h``, default 1, 6 and 24): at each precompute
  time ``P = E + kN`` the candidate pairs are **the (user, ad) pairs with an impression in
  the ``lookback_h`` hours before P** (default a day: the pairs an ad server saw recently,
  retargeted ads included, which a user is shown again and again). Each pair is scored with
  the context of its latest impression before P (site, device, country, position) at hour
  ``P``, and the window counts at P (every event before P, exactly as the batch layer's
  point-in-time join computes them). The predictions are written to Redis
  (:class:`ctrstream.store.predictions.PredictionStore`, one namespace per precompute run,
  TTL N hours), and every request (an evaluated impression) in ``[P, P + N)`` reads its pair
  from Redis in micro-batches;
* **a miss** (no precomputed pair) falls back to **online scoring** (the main rows:
  quality of what a deployment with both paths serves, and the online computations the
  misses still cost); the table also gives NE with the cheaper fallback of the **ad's
  prior** (its smoothed CTR over the lookback, from the clicks seen by P) and NE on the hit
  rows only (batch against online on the same rows, with a bootstrap interval: the pure cost
  of a prediction's age);
* **online inference**: every request scored with the window counts at its own time
  (strictly earlier events: :func:`~ctrstream.study.data.dense_at` with no lag).

Evaluation: NE and AUC against whether the impression was clicked at all, next to the
oracle's on the same rows (:func:`~ctrstream.study.data.quality`).

Compute and latency (measured on this run's Redis, ``latency_batch`` consecutive requests a
micro-batch, ``latency_batches`` of them from the first hour of the evaluation):

* batch read: :meth:`PredictionStore.get_many` of the micro-batch's pairs (one round trip,
  one ``HMGET`` per user);
* online scoring: the serving path's feature read of the micro-batch's eight entities per
  row (:class:`ctrstream.store.reader.FeatureStore`, ``mode="lambda"``, the Lua read script:
  one round trip), from the lambda views as serving finds them - a batch view cut at the
  start of the slice's hour and the speed view since, both written to Redis first (only the
  entities the micro-batches read, with a short TTL) - then the dense and sparse inputs
  (``features.dense_from_counts``, ``features.sparse_ids``) and the model's forward pass in
  this process (PyTorch on CPU, one thread; Triton's hop is
  ``docs/inference-benchmark.md``'s). What is
  not in it: the HTTP framework, the calibrator, candidate generation.

A request here is one served impression, a single (user, ad) pair; a real request scores its
tens of candidates, which the generated traffic does not record - the counts of computations
are per served pair.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ctrstream import features as F
from ctrstream.batch.point_in_time import bucket_counts, point_in_time_counts
from ctrstream.config import Settings
from ctrstream.study.data import (
    HOUR_MS,
    StudyData,
    bootstrap_ne_diff,
    dense_at,
    fit,
    labels_within,
    predict,
    quality,
)

SWEEP = "batch_inference"
GET_CHUNK = 20_000  # requests per get_many when serving the whole evaluation span
LATENCY_VIEW_TTL_MS = 600_000  # the latency slice's throw-away views live 10 minutes
PIT_CHUNK = 600_000  # pairs per point-in-time call: a default round in one (~0.3 GB counts)

DEFAULTS: dict[str, Any] = dict(
    every_h=(1, 6, 24),
    lookback_h=24.0,
    train_hours=24.0,
    eval_hours=24.0,
    latency_batch=100,
    latency_batches=300,
    n_boot=200,
)
QUICK: dict[str, Any] = dict(
    every_h=(1, 3, 6),
    lookback_h=12.0,
    train_hours=6.0,
    eval_hours=6.0,
    latency_batch=100,
    latency_batches=50,
    n_boot=100,
)


# --------------------------------------------------------------------------- candidates


def candidate_pairs(data: StudyData, at_ms: int, lookback_ms: int) -> np.ndarray:
    """The precompute rule: one row index per (user, ad) pair with an impression in
    ``[at_ms - lookback_ms, at_ms)`` - the pair's latest impression there (its context is
    what the pair is scored with). Sorted by row index."""
    rows = data.rows_between(at_ms - lookback_ms, at_ms)
    if not len(rows):
        return rows
    u = data.impressions.column("user_id").to_numpy()[rows].astype(np.int64)
    a = data.impressions.column("ad_id").to_numpy()[rows].astype(np.int64)
    # the last occurrence of each pair: unique over the reversed rows
    key = np.stack([u[::-1], a[::-1]], axis=1)
    _, first_rev = np.unique(key, axis=0, return_index=True)
    return np.sort(rows[::-1][first_rev])


def _pairs(data: StudyData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    imps = data.impressions
    return (
        imps.column("user_id").to_numpy()[rows].astype(np.int64),
        imps.column("ad_id").to_numpy()[rows].astype(np.int64),
    )


def precompute_inputs(
    data: StudyData, rows: np.ndarray, at_ms: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(sparse, dense)`` of the pairs of ``rows`` scored at ``at_ms``: each row's context
    with its event time set to ``at_ms`` (hour of day, windows anchored there), the windows
    counting every event before ``at_ms``."""
    q = data.impressions.take(pa.array(rows))
    q = q.set_column(
        q.schema.get_field_index("event_time_ms"),
        "event_time_ms",
        pa.array(np.full(len(rows), at_ms, dtype=np.int64)),
    )
    dense = F.dense_from_counts(point_in_time_counts(data.impressions, data.clicks, q))
    cols = {
        name: q.column(name).to_numpy(zero_copy_only=False)
        for name in F.SPARSE_FIELDS
        if name != "hour"
    } | {"event_time_ms": np.full(len(rows), at_ms, dtype=np.int64)}
    return F.sparse_ids(cols), dense


def ad_prior(data: StudyData, at_ms: int, lookback_ms: int, window_ms: int) -> np.ndarray:
    """Per ad id, its smoothed CTR over the impressions of ``[at_ms - lookback_ms, at_ms)``
    with the clicks labelled by ``at_ms`` (within the attribution window and before it): the
    cheap fallback for a request with no precomputed pair."""
    rows = data.rows_between(at_ms - lookback_ms, at_ms)
    ads = data.impressions.column("ad_id").to_numpy()[rows].astype(np.int64)
    d = data.delay_ms[rows]
    seen = (d >= 0) & (d <= window_ms) & (data.t[rows] + d < at_ms)
    n = int(data.impressions.column("ad_id").to_numpy().max()) + 1
    imps = np.bincount(ads, minlength=n).astype(np.float64)
    clicks = np.bincount(ads, weights=seen.astype(np.float64), minlength=n)
    return F.smoothed_ctr(imps, clicks)


# --------------------------------------------------------------------------- latency


def _percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    a = np.asarray(seconds) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _only(table: pa.Table, keep: dict[str, set[str]]) -> pa.Table:
    """The rows of a counts table (columns ``entity``, ``eid``, ...) of the entities in
    ``keep`` (entity name -> ids)."""
    ent = table.column("entity").to_numpy(zero_copy_only=False)
    eid = table.column("eid").to_numpy(zero_copy_only=False)
    mask = np.fromiter(
        (i in keep.get(e, ()) for e, i in zip(ent.tolist(), eid.tolist())),
        dtype=bool,
        count=len(ent),
    )
    return table.filter(pa.array(mask))


def _speed_cells_of(table: pa.Table) -> list:
    """The speed view's cells of a bucket-counts table (``bucket_counts``' columns)."""
    from ctrstream.store.speed_view import SpeedCells

    ent = table.column("entity").to_numpy(zero_copy_only=False)
    eid = table.column("eid").to_numpy(zero_copy_only=False)
    res = table.column("res").to_numpy(zero_copy_only=False)
    bucket = table.column("bucket").to_numpy().astype(np.int64)
    imps = table.column("imps").to_numpy().astype(np.int64)
    clicks = table.column("clicks").to_numpy().astype(np.int64)
    res_idx = {r.name: i for i, r in enumerate(F.RESOLUTIONS)}
    out = []
    for k, e in enumerate(F.ENTITIES):
        sel = np.flatnonzero(ent == e.name)
        if not len(sel):
            continue
        parts = np.array([s.split(":") for s in eid[sel]], dtype=np.int64).reshape(
            len(sel), len(e.fields)
        )
        out.append(
            SpeedCells(
                k,
                [parts[:, j] for j in range(len(e.fields))],
                np.array([res_idx[r] for r in res[sel]], dtype=np.int64),
                bucket[sel],
                imps[sel],
                clicks[sel],
                np.zeros(len(sel), bool),
            )
        )
    return out


def measure_latency(
    data: StudyData,
    net: Any,
    settings: Settings,
    namespace: str,
    rows: np.ndarray,
    batch: int,
    n_batches: int,
) -> dict[str, Any]:
    """p50/p99 of serving ``n_batches`` micro-batches of ``batch`` consecutive requests from
    ``rows`` both ways: the batch read of their precomputed pairs (``namespace``, already
    written) and online scoring (lambda feature read, inputs, model). The micro-batches
    are spread evenly over ``rows``."""
    from ctrstream.batch.views import compute_batch_view, write_batch_view
    from ctrstream.store.connection import redis_client
    from ctrstream.store.predictions import PredictionStore
    from ctrstream.store.reader import FeatureStore
    from ctrstream.store.speed_view import SpeedViewWriter

    n_batches = max(1, min(n_batches, len(rows) // batch))
    starts = np.linspace(0, len(rows) - batch, n_batches).astype(np.int64)
    mb = [rows[s : s + batch] for s in starts]
    every = np.concatenate(mb)
    imps = data.impressions
    cols = {
        name: imps.column(name).to_numpy(zero_copy_only=False)[every]
        for name in F.SPARSE_FIELDS
        if name != "hour"
    } | {"event_time_ms": data.t[every]}
    keep: dict[str, set[str]] = {}
    for e in F.ENTITIES:
        parts = [np.asarray(cols[f]).astype(np.int64).astype(str) for f in e.fields]
        ids = parts[0] if len(parts) == 1 else np.char.add(np.char.add(parts[0], ":"), parts[1])
        keep[e.name] = set(ids.tolist())
    # the lambda views these requests read, as the serving path finds them: a batch view cut
    # at the hour before the slice and the speed view since, of the entities read only
    cutoff = F.align_cutoff(int(data.t[every].min()))
    until = int(data.t[every].max()) + 1
    buckets, longs = compute_batch_view(data.impressions, data.clicks, cutoff)
    write_batch_view(
        settings, _only(buckets, keep), _only(longs, keep), cutoff, ttl_ms=LATENCY_VIEW_TTL_MS
    )
    speed = _only(bucket_counts(data.impressions, data.clicks, until, cutoff), keep)
    # a short TTL: the views are throw-away, and in a shared Redis must not outlive the run
    with SpeedViewWriter(settings, hash_ttl_ms=LATENCY_VIEW_TTL_MS) as writer:
        writer.write(_speed_cells_of(speed))
        writer.drain()

    client = redis_client(settings, timeout_s=10.0)
    reader = FeatureStore(client, mode="lambda")
    store = PredictionStore(settings)
    batch_s: list[float] = []
    online_s: list[float] = []
    read_s: list[float] = []
    model_s: list[float] = []
    users, ads = _pairs(data, every)
    # one thread for a micro-batch's forward pass, as a serving process scores a request: a
    # pool of intra-op threads costs more than it gains on 100 rows, and on a busy machine
    # its threads wait for cores (docs/freshness.md)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # one warm-up of each path (script load, connections, torch's first call)
        store.get_many(namespace, users[:batch], ads[:batch])
        reader.read_columns({k: v[:batch] for k, v in cols.items()}, int(data.t[mb[0][-1]]))
        for j in range(len(mb)):
            sl = slice(j * batch, (j + 1) * batch)
            t0 = time.perf_counter()
            store.get_many(namespace, users[sl], ads[sl])
            batch_s.append(time.perf_counter() - t0)

            part = {k: v[sl] for k, v in cols.items()}
            t0 = time.perf_counter()
            fr = reader.read_columns(part, int(data.t[mb[j][-1]]))
            t1 = time.perf_counter()
            dense = F.dense_from_counts(fr.counts)
            predict(net, F.sparse_ids(part), dense)
            t2 = time.perf_counter()
            read_s.append(t1 - t0)
            model_s.append(t2 - t1)
            online_s.append(t2 - t0)
    finally:
        torch.set_num_threads(threads)
        store.close()
        client.close()
    b50, b99 = _percentiles_ms(batch_s)
    o50, o99 = _percentiles_ms(online_s)
    r50, r99 = _percentiles_ms(read_s)
    m50, m99 = _percentiles_ms(model_s)
    return dict(
        micro_batch=batch,
        micro_batches=len(mb),
        batch_read_p50_ms=b50,
        batch_read_p99_ms=b99,
        online_p50_ms=o50,
        online_p99_ms=o99,
        online_feature_read_p50_ms=r50,
        online_feature_read_p99_ms=r99,
        online_inputs_and_model_p50_ms=m50,
        online_inputs_and_model_p99_ms=m99,
    )


# --------------------------------------------------------------------------- the sweep


def _opts(quick: bool, opts: dict[str, Any]) -> dict[str, Any]:
    base = dict(QUICK if quick else DEFAULTS)
    unknown = set(opts) - set(base)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} of the batch-inference sweep: use {sorted(base)}"
        )
    base.update(opts)
    every = tuple(int(n) for n in base["every_h"])
    if not every or min(every) <= 0:
        raise ValueError(f"every_h must be positive whole hours, got {base['every_h']!r}")
    base["every_h"] = every
    return base


def run(
    data: StudyData,
    *,
    kind: str = "deep",
    seed: int = 0,
    quick: bool = False,
    log: Callable[[str], None] = print,
    redis: Settings | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """The batch-inference sweep (see the module docstring); the sweep contract's dict.

    ``redis``: the :class:`~ctrstream.config.Settings` of a running Redis to use (its
    ``redis`` section; the sweep writes its own prediction namespaces there and deletes them,
    and for the latency measurement writes throw-away speed-view cells and a batch-view
    version of the slice's entities with a 10-minute TTL *and switches the batch-view
    pointer to it*: give a Redis no live system serves, e.g. a database of its own) - None
    starts a private one (:func:`ctrstream.stack.manager.isolated_redis`) for the run and
    stops it.
    ``opts``: ``every_h``, ``lookback_h``, ``train_hours``, ``eval_hours``,
    ``latency_batch``, ``latency_batches``, ``n_boot`` (defaults :data:`DEFAULTS`, or
    :data:`QUICK` with ``quick``)."""
    if redis is None:
        from ctrstream.stack.manager import isolated_redis

        with isolated_redis(log=log) as settings:
            return run(data, kind=kind, seed=seed, quick=quick, log=log, redis=settings, **opts)
    if not isinstance(redis, Settings):
        raise TypeError(
            f"redis must be ctrstream.config.Settings of a running Redis (or None to start "
            f"one), got {type(redis).__name__}"
        )
    from ctrstream.store.predictions import PredictionStore

    with PredictionStore(redis) as store:
        return sweep(
            data, store, kind=kind, seed=seed, quick=quick, log=log, settings=redis, **opts
        )


class PredictionStoreLike(Protocol):
    """What the sweep needs of a prediction store (:class:`PredictionStore`'s methods)."""

    def put_many(
        self, namespace: str, users: np.ndarray, ads: np.ndarray, p: np.ndarray, ttl_ms: int
    ) -> int: ...

    def get_many(self, namespace: str, users: np.ndarray, ads: np.ndarray) -> np.ndarray: ...

    def clear(self, namespace: str) -> int: ...

    def memory_used_bytes(self) -> int: ...


def sweep(
    data: StudyData,
    store: PredictionStoreLike,
    *,
    kind: str = "deep",
    seed: int = 0,
    quick: bool = False,
    log: Callable[[str], None] = print,
    settings: Settings | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """:func:`run` against a given prediction store (the unit tests give an in-memory one).
    ``settings``: the Redis of the online arm's latency measurement (lambda feature reads;
    the same caveats as :func:`run`'s ``redis``); None, or ``latency_batches=0``, measures no latency (the rows' ``p50_ms`` /
    ``p99_ms`` are NaN)."""
    o = _opts(quick, opts)
    t_start = time.perf_counter()
    window_ms = int(data.scenario.attribution_window_s * 1000)
    lookback_ms = int(round(o["lookback_h"] * HOUR_MS))
    every = o["every_h"]
    step_h = math.gcd(*every)
    e0 = data.history_end_ms + int(round(o["train_hours"] * HOUR_MS))
    e1 = min(e0 + int(round(o["eval_hours"] * HOUR_MS)), int(data.t[-1]) + 1)
    ev = data.rows_between(e0, e1)
    tr = data.rows_between(e0 - int(round(o["train_hours"] * HOUR_MS)), e0 - window_ms)
    if not len(ev) or not len(tr):
        raise ValueError(
            f"the data has no rows to {'evaluate' if not len(ev) else 'train'} on: "
            f"training ends at {e0} ms and the data at {int(data.t[-1])} ms; give a longer "
            "scenario or shorter train_hours / eval_hours"
        )

    # the model both arms serve, and the online arm's scores
    t0 = time.perf_counter()
    y_tr = labels_within(data, window_ms, tr)
    net = fit(
        kind,
        data.sparse[tr],
        dense_at(data, tr, key=f"{SWEEP}:train:{e0}:{len(tr)}"),
        y_tr,
        data.t[tr],
        seed=seed,
    )
    p_online = predict(net, data.sparse[ev], dense_at(data, ev, key=f"{SWEEP}:eval:{e0}:{e1}"))
    log(
        f"batch inference: {kind} trained on {len(tr):,} rows, online scores of {len(ev):,} "
        f"requests in {time.perf_counter() - t0:.1f}s"
    )

    y_ev = data.clicked[ev]
    users_ev, ads_ev = _pairs(data, ev)
    n_rounds = -(-(e1 - e0) // (step_h * HOUR_MS))
    p_batch = {n: np.full(len(ev), np.nan) for n in every}
    p_prior = {n: np.full(len(ev), np.nan) for n in every}
    age_ms = {n: np.full(len(ev), -1, dtype=np.int64) for n in every}
    pairs = dict.fromkeys(every, 0)
    mem_per_round: list[int] = []
    pairs_per_round: list[int] = []
    timing = dict(features_s=0.0, model_s=0.0, write_s=0.0, read_s=0.0)
    round_trip_ok = True
    membership_ok = True
    latency: dict[str, Any] = {}
    tag = f"bi{seed}-{int(time.time() * 1000)}"  # this run's namespaces

    for k in range(n_rounds):
        at = e0 + k * step_h * HOUR_MS
        serving = [n for n in every if (k * step_h) % n == 0]
        if not serving:
            continue
        rows = candidate_pairs(data, at, lookback_ms)
        t0 = time.perf_counter()
        sp_parts, de_parts = [], []
        for c in range(0, len(rows), PIT_CHUNK):
            sp, de = precompute_inputs(data, rows[c : c + PIT_CHUNK], at)
            sp_parts.append(sp)
            de_parts.append(de)
        t1 = time.perf_counter()
        p = (
            predict(net, np.concatenate(sp_parts), np.concatenate(de_parts))
            if len(rows)
            else np.zeros(0)
        )
        del sp_parts, de_parts
        t2 = time.perf_counter()
        u, a = _pairs(data, rows)
        ns = f"{tag}-r{k}"
        try:  # the run's namespace is deleted even when the sweep fails half way
            mem0 = store.memory_used_bytes()
            store.put_many(ns, u, a, p, ttl_ms=max(serving) * HOUR_MS)
            mem_per_round.append(store.memory_used_bytes() - mem0)
            pairs_per_round.append(len(rows))
            t3 = time.perf_counter()
            timing["features_s"] += t1 - t0
            timing["model_s"] += t2 - t1
            timing["write_s"] += t3 - t2
            prior = ad_prior(data, at, lookback_ms, window_ms)
            # what the batch arm knows in memory, to check the store's answers against
            want = dict(zip(zip(u.tolist(), a.tolist()), p.astype(np.float32).tolist()))
            for n in serving:
                pairs[n] += len(rows)
                sel = np.flatnonzero((data.t[ev] >= at) & (data.t[ev] < at + n * HOUR_MS))
                t4 = time.perf_counter()
                got = (
                    np.concatenate(
                        [
                            store.get_many(
                                ns, users_ev[sel[c : c + GET_CHUNK]], ads_ev[sel[c : c + GET_CHUNK]]
                            )
                            for c in range(0, len(sel), GET_CHUNK)
                        ]
                    )
                    if len(sel)
                    else np.zeros(0)
                )
                timing["read_s"] += time.perf_counter() - t4
                p_batch[n][sel] = got
                hit = ~np.isnan(got)
                age_ms[n][sel[hit]] = data.t[ev][sel[hit]] - at
                p_prior[n][sel] = prior[ads_ev[sel]]
                expect = np.array(
                    [
                        want.get(pr, np.nan)
                        for pr in zip(users_ev[sel].tolist(), ads_ev[sel].tolist())
                    ]
                )
                membership_ok &= bool(np.array_equal(np.isnan(expect), ~hit))
                # the store keeps float32 probabilities: compare at that precision
                round_trip_ok &= bool(
                    np.array_equal(got[hit].astype(np.float32), expect[hit].astype(np.float32))
                )
            if k == 0 and settings is not None and o["latency_batches"] > 0:
                lat_rows = ev[data.t[ev] < at + HOUR_MS]
                latency = measure_latency(
                    data, net, settings, ns, lat_rows, o["latency_batch"], o["latency_batches"]
                )
        finally:
            store.clear(ns)
        log(
            f"batch inference: precompute at +{k * step_h} h: {len(rows):,} pairs "
            f"(cadences {serving})"
        )

    # ------------------------------------------------------------------ the table
    q_on = quality(p_online, data, ev)
    rows_out: list[dict[str, Any]] = [
        dict(
            arm="online",
            every_h=0,
            **{k: q_on[k] for k in ("ne", "auc", "oracle_ne", "oracle_auc", "ne_gap")},
            ne_diff=0.0,
            ne_diff_lo=0.0,
            ne_diff_hi=0.0,
            ne_prior_fallback=q_on["ne"],
            ne_diff_hits=0.0,
            ne_diff_hits_lo=0.0,
            ne_diff_hits_hi=0.0,
            miss_share=0.0,
            mean_age_min=0.0,
            batch_predictions=0,
            online_predictions=int(len(ev)),
            predictions_per_request=1.0,
            used_share=1.0,
            p50_ms=latency.get("online_p50_ms", float("nan")),
            p99_ms=latency.get("online_p99_ms", float("nan")),
        )
    ]
    for n in every:
        hit = ~np.isnan(p_batch[n])
        served = np.where(hit, p_batch[n], p_online)
        with_prior = np.where(hit, p_batch[n], p_prior[n])
        q = quality(served, data, ev)
        q_prior = quality(with_prior, data, ev)
        diff, lo, hi = bootstrap_ne_diff(served, p_online, y_ev, n_boot=o["n_boot"], seed=seed)
        if hit.sum() and y_ev[hit].any():
            dh, lh, hh = bootstrap_ne_diff(
                p_batch[n][hit], p_online[hit], y_ev[hit], n_boot=o["n_boot"], seed=seed
            )
        else:
            dh = lh = hh = float("nan")
        misses = int((~hit).sum())
        rows_out.append(
            dict(
                arm=f"batch every {n} h",
                every_h=n,
                **{k: q[k] for k in ("ne", "auc", "oracle_ne", "oracle_auc", "ne_gap")},
                ne_diff=diff,
                ne_diff_lo=lo,
                ne_diff_hi=hi,
                ne_prior_fallback=q_prior["ne"],
                ne_diff_hits=dh,
                ne_diff_hits_lo=lh,
                ne_diff_hits_hi=hh,
                miss_share=misses / len(ev),
                mean_age_min=float(age_ms[n][hit].mean() / 60_000) if hit.any() else float("nan"),
                batch_predictions=int(pairs[n]),
                online_predictions=misses,
                predictions_per_request=(pairs[n] + misses) / len(ev),
                used_share=float(hit.sum() / pairs[n]) if pairs[n] else 0.0,
                p50_ms=latency.get("batch_read_p50_ms", float("nan")),
                p99_ms=latency.get("batch_read_p99_ms", float("nan")),
            )
        )

    n_pairs = int(sum(pairs_per_round))
    mem = int(max(mem_per_round)) if mem_per_round else 0
    by_n = {r["every_h"]: r for r in rows_out}
    headline: dict[str, Any] = (
        {f"ne_lost_every_{n}h": by_n[n]["ne_diff"] for n in every}
        | {f"ne_lost_on_hits_every_{n}h": by_n[n]["ne_diff_hits"] for n in every}
        | {
            f"ne_lost_prior_fallback_every_{n}h": by_n[n]["ne_prior_fallback"] - q_on["ne"]
            for n in every
        }
        | {
            "miss_share": by_n[max(every)]["miss_share"],
            "online_ne": q_on["ne"],
            "oracle_ne": q_on["oracle_ne"],
            "redis_mb_per_precompute": mem / 1e6,
            "redis_bytes_per_pair": mem / max(1, pairs_per_round[int(np.argmax(mem_per_round))])
            if mem_per_round
            else float("nan"),
            "precompute_us_per_pair": 1e6
            * (timing["features_s"] + timing["model_s"])
            / max(1, n_pairs),
            "write_us_per_pair": 1e6 * timing["write_s"] / max(1, n_pairs),
        }
        | {k: v for k, v in latency.items() if k.endswith("_ms")}
    )
    if latency:
        headline["latency_speedup_p50"] = latency["online_p50_ms"] / latency["batch_read_p50_ms"]
    log(f"batch inference: done in {time.perf_counter() - t_start:.0f}s")
    return dict(
        sweep=SWEEP,
        params=dict(
            kind=kind,
            seed=seed,
            every_h=list(every),
            lookback_h=o["lookback_h"],
            train_hours=o["train_hours"],
            eval_hours=(e1 - e0) / HOUR_MS,
            eval_start_ms=e0,
            attribution_window_s=data.scenario.attribution_window_s,
            train_rows=int(len(tr)),
            requests=int(len(ev)),
            candidate_rule=f"(user, ad) pairs with an impression in the {o['lookback_h']:g} h "
            "before the precompute, scored with their latest impression's context",
            miss_fallback="online scoring (ne, ne_diff); the ad's prior (ne_prior_fallback)",
            latency=latency | {"micro_batch_rows": o["latency_batch"]},
            seconds={k: round(v, 2) for k, v in timing.items()}
            | {"total": round(time.perf_counter() - t_start, 1)},
            n_boot=o["n_boot"],
        ),
        rows=rows_out,
        headline=headline,
        checks=dict(
            store_round_trip=round_trip_ok,
            misses_are_pairs_not_precomputed=membership_ok,
        ),
    )


# --------------------------------------------------------------------------- the plot


def plot(result: dict[str, Any], path: Path) -> Path:
    """Three panels: NE lost against online scoring per precompute cadence (with the miss
    fallback to online scoring, on the hit rows only, and with the prior fallback), the share
    of requests with no precomputed pair, and the micro-batch latency of each arm."""
    from ctrstream.plots import pyplot, save

    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = [r for r in result["rows"] if r["every_h"] > 0]
    online = next(r for r in result["rows"] if r["every_h"] == 0)
    x = np.arange(len(batch))
    labels = [f"{r['every_h']} h" for r in batch]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.2))
    for off, key, lo, hi, name in (
        (-0.2, "ne_diff", "ne_diff_lo", "ne_diff_hi", "misses scored online"),
        (0.2, "ne_diff_hits", "ne_diff_hits_lo", "ne_diff_hits_hi", "hit requests only"),
    ):
        v = np.array([r[key] for r in batch]) * 100
        err = np.array([[r[key] - r[lo], r[hi] - r[key]] for r in batch]).T * 100
        ax[0].bar(x + off, v, width=0.4, yerr=err, capsize=3, label=name)
    ax[0].plot(
        x,
        [(r["ne_prior_fallback"] - online["ne"]) * 100 for r in batch],
        "kD",
        label="misses get the ad's prior",
    )
    ax[0].axhline(0, color="grey", lw=0.8)
    ax[0].set_xticks(x, labels)
    ax[0].set_xlabel("precompute every")
    ax[0].set_ylabel("NE - NE(online), points of %")
    ax[0].set_title("quality lost by batch inference")
    ax[0].legend(fontsize=8)
    ax[1].bar(x, [100 * r["miss_share"] for r in batch], color="tab:red")
    ax[1].set_xticks(x, labels)
    ax[1].set_ylabel("% of requests with no precomputed pair")
    ax[1].set_title("misses")
    names = ["online"] + [f"batch {r['every_h']} h" for r in batch]
    lat = [online] + batch
    xl = np.arange(len(lat))
    ax[2].bar(xl - 0.2, [r["p50_ms"] for r in lat], width=0.4, label="p50")
    ax[2].bar(xl + 0.2, [r["p99_ms"] for r in lat], width=0.4, label="p99")
    ax[2].set_xticks(xl, names, rotation=20)
    ax[2].set_ylabel("ms per micro-batch")
    mb = result["params"].get("latency", {}).get("micro_batch_rows", "?")
    ax[2].set_title(f"serving a micro-batch of {mb} requests")
    ax[2].legend(fontsize=8)
    return save(fig, path)


__all__ = [
    "DEFAULTS",
    "QUICK",
    "SWEEP",
    "ad_prior",
    "candidate_pairs",
    "measure_latency",
    "plot",
    "precompute_inputs",
    "run",
    "sweep",
]
