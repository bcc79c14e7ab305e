"""The ad server: decides what a micro-batch of ad requests is shown.

:meth:`AdServer.decide` takes a batch of requests (the fields of
``ctrstream.simulation.world.RequestBatch``: any object with them, :class:`RequestBatchLike`),
the deciding arm of every request and one :class:`Ranker` per arm, and:

1. builds one row per candidate with the request's context at the **reference position 0**
   (position is a model input, so the score of a row is the position-normalized pCTR0);
2. reads the window counts of all rows with **one store read per event-time minute**, each
   as of the request's own event time
   (:func:`ctrstream.serving.assembly.counts_at_event_times`, shared with the streaming
   scorer);
3. scores the rows of each arm's requests with **one call per model** (Triton through a
   ``ctrstream.serving.triton_client.Scorer``; ``prior``: the ad's smoothed CTR from the
   dense features; ``oracle``: the world's true probability) and calibrates them;
4. runs the auction (:func:`ctrstream.serving.auction.auction`) of every request at once, each
   with its own arm's pCTR0 (the auction of one request never looks at another's);
5. scores the **shown** impressions again at their real slot (one small call per model): the
   pCTR that calibration learns from and that "predicted / observed" compares;
6. lets every **shadow** ranker score every request the same way (its pCTR0 for all rows,
   its own auction's top choice per slot, its pCTR for the impressions actually shown); a
   shadow runs after the deciding arms and never feeds back into them, so it never changes
   what is shown.

It knows nothing of experiments: the caller (the closed loop, ``ctrstream.loop``) assigns the
arms and builds the rankers. When Triton is out of reach a model's scores are the fallback
(the ad's smoothed CTR) and when Redis is, the counts are zero (every rate is the prior):
``decide`` never raises for either and flags the impressions and requests ``degraded``.

Latency per request: the batch's shared stages (feature read, auction) plus its arm's own
scoring and calibration (shadows excluded: they would not delay a real answer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from ctrstream import features as F
from ctrstream.serving.assembly import counts_at_event_times
from ctrstream.serving.auction import (
    AuctionConfig,
    AuctionResult,
    auction,
    explore_mask,
    n_uniforms,
    request_uniforms,
)
from ctrstream.serving.triton_client import ScoreResult, fallback_scores

log = logging.getLogger("ctrstream.adserver")

Kind = Literal["model", "prior", "oracle"]
ScoreFn = Callable[[np.ndarray, np.ndarray], ScoreResult]  # (sparse, dense) -> scores
CalibrateFn = Callable[[np.ndarray, str, dict], np.ndarray]  # (raw, model_version, context)
# (batch, global candidate indices, slots) -> the true click probability there
TruthFn = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]


class RequestBatchLike(Protocol):
    """What :meth:`AdServer.decide` reads of a batch (``ctrstream.simulation.world.
    RequestBatch``): per request, then per candidate (request ``i``'s candidates are
    ``[cand_offsets[i], cand_offsets[i + 1])``)."""

    request_id: np.ndarray
    event_time_ms: np.ndarray
    user_id: np.ndarray
    site_id: np.ndarray
    device_type: np.ndarray
    country: np.ndarray
    n_slots: np.ndarray
    cand_offsets: np.ndarray
    cand_ad_id: np.ndarray
    cand_campaign_id: np.ndarray
    cand_advertiser_id: np.ndarray
    cand_ad_category: np.ndarray
    cand_bid: np.ndarray
    cand_new: np.ndarray


@dataclass
class Ranker:
    """One way to produce pCTR for candidate rows (one arm, deciding or shadow).

    ``model``: ``score`` (e.g. a ``Scorer`` of one model version: ``scorer.score``) and
    optionally ``calibrate`` (e.g. ``lambda raw, v, ctx: client.calibrate(raw, v, ctx)``);
    ``prior``: nothing (the ad's smoothed CTR); ``oracle``: ``truth`` (the world's
    ``true_p``)."""

    name: str
    kind: Kind
    score: ScoreFn | None = None
    calibrate: CalibrateFn | None = None
    truth: TruthFn | None = None
    model_name: str = ""  # the label of a model's scores when its ScoreResult has none
    # rankers with the same non-empty key give the same scores (one model version, one
    # calibrator): a shadow reuses the rows a deciding arm with its key already scored
    key: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("model", "prior", "oracle"):
            raise ValueError(
                f"ranker {self.name!r}: kind must be model, prior or oracle, not {self.kind!r}"
            )
        if self.kind == "model" and self.score is None:
            raise ValueError(f"ranker {self.name!r}: a model ranker needs a score callable")
        if self.kind == "oracle" and self.truth is None:
            raise ValueError(f"ranker {self.name!r}: an oracle ranker needs a truth callable")


def model_ranker(name: str, scorer: Any, calibrator: Any = None) -> Ranker:
    """A model ranker from a ``Scorer`` (its ``score``) and an optional ``CalibratorClient``
    (the calibrator of the scorer's model name and the answering version)."""
    cal: CalibrateFn | None = None
    if calibrator is not None:
        served = str(getattr(scorer, "model_name", ""))

        def cal(raw: np.ndarray, version: str, context: dict) -> np.ndarray:
            return calibrator.calibrate(raw, version, context, model_name=served)

    version = getattr(scorer, "model_version", None)
    served = str(getattr(scorer, "model_name", ""))
    return Ranker(
        name,
        "model",
        scorer.score,
        cal,
        model_name=served,
        key=f"{served}@{version}" if version is not None and calibrator is not None else "",
    )


@dataclass
class Scored:
    """The pCTR of some rows from one ranker."""

    raw: np.ndarray  # float64 (rows,)
    calibrated: np.ndarray  # float64 (rows,)
    model_name: str
    model_version: str
    degraded: bool
    error: str | None = None


@dataclass
class ShadowDecisions:
    """What a shadow ranker would have done, and what it predicts for what was shown."""

    name: str
    model_name: str
    model_version: str
    pctr_raw: np.ndarray  # float64 (k,) its raw pCTR of each shown impression at its slot
    pctr: np.ndarray  # float64 (k,) calibrated
    top_candidate: np.ndarray  # int64 (n, max slots) its own winner per slot (-1: none)
    top_pctr0: np.ndarray  # float64 (n, max slots) its pCTR0 of those winners (nan: none)
    degraded: bool


@dataclass
class Decisions:
    """What :meth:`AdServer.decide` decided for one batch."""

    # per impression (k,), sorted by request then slot
    request_index: np.ndarray  # int64 index of the request in the batch
    candidate_index: np.ndarray  # int64 global index into the batch's cand_* arrays
    arm: np.ndarray  # object: the deciding arm's name
    slot: np.ndarray  # int64, 0 = top
    price: np.ndarray  # float64 cost per click
    pctr0: np.ndarray  # float64 the calibrated pCTR at position 0 it was ranked by
    pctr_raw: np.ndarray  # float64 the raw pCTR at its slot
    pctr: np.ndarray  # float64 the calibrated pCTR at its slot
    model_name: np.ndarray  # object ("prior", "oracle" for those kinds)
    model_version: np.ndarray  # object ("" when degraded or not a model)
    propensity: np.ndarray  # float64 P(candidate in slot | exploration branch)
    explored: np.ndarray  # bool
    new_ad: np.ndarray  # bool: shown by new-ad exploration
    degraded: np.ndarray  # bool: its features or its model's scores were the fallback
    # per request (n,)
    request_arm: np.ndarray  # object
    request_slots: np.ndarray  # int64 slots asked
    request_filled: np.ndarray  # int64 slots filled
    request_latency_ms: np.ndarray  # float64
    request_degraded: np.ndarray  # bool
    # per shadow ranker
    shadows: dict[str, ShadowDecisions] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the batch
    # with decide(keep_inputs=True): every impression's model inputs at its slot, (sparse
    # (k, N_SPARSE), dense (k, N_DENSE)) - what a learner of the shown impressions needs
    inputs: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.request_index)


_ROW_FIELDS = ("user_id", "site_id", "device_type", "country", "event_time_ms")
_CAND_FIELDS = ("ad_id", "campaign_id", "advertiser_id", "ad_category")


def candidate_columns(batch: RequestBatchLike) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One row per candidate with its request's context at position 0 (impression columns),
    and the request index of every row."""
    off = np.asarray(batch.cand_offsets, dtype=np.int64)
    req_of = np.repeat(np.arange(len(off) - 1), np.diff(off))
    cols: dict[str, np.ndarray] = {}
    for f in _ROW_FIELDS:
        a = np.asarray(getattr(batch, f))
        cols[f] = a[req_of] if len(a) else a
    for f in _CAND_FIELDS:
        cols[f] = np.asarray(getattr(batch, f"cand_{f}"), dtype=np.int64)
    cols["position"] = np.zeros(len(req_of), dtype=np.int64)
    return cols, req_of


def _subset(cols: dict[str, np.ndarray], rows: np.ndarray, slot: np.ndarray) -> dict:
    out = {f: c[rows] for f, c in cols.items()}
    out["position"] = np.asarray(slot, dtype=np.int64)
    return out


class AdServer:
    """Ranks micro-batches of requests (see the module docstring).

    ``store``: a ``ctrstream.store.reader.FeatureStore`` (default: one on ``settings``'
    Redis, lambda-merged)."""

    def __init__(self, settings: Any, store: Any = None, auction_cfg: AuctionConfig | None = None):
        self.settings = settings
        if store is None:
            from ctrstream.store.connection import redis_client
            from ctrstream.store.reader import FeatureStore

            store = FeatureStore(redis_client(settings), mode="lambda")
        self.store = store
        self.cfg = auction_cfg or AuctionConfig()

    # ------------------------------------------------------------------ scoring

    def _score(
        self,
        rk: Ranker,
        batch: RequestBatchLike,
        cols: dict[str, np.ndarray],
        rows: np.ndarray,
        slot: np.ndarray,
        dense: np.ndarray,
    ) -> Scored:
        """The pCTR of candidate ``rows`` at ``slot`` by ``rk`` (one call of its model)."""
        k = len(rows)
        if rk.kind == "prior":  # the ad's smoothed CTR: no position effect
            p = fallback_scores(dense[rows]).astype(np.float64)
            return Scored(p, p, "prior", "", False)
        if rk.kind == "oracle":
            assert rk.truth is not None
            p = np.asarray(rk.truth(batch, rows, np.asarray(slot, np.int64)), np.float64)
            return Scored(p.reshape(k), p.reshape(k), "oracle", "", False)
        assert rk.score is not None
        sub = _subset(cols, rows, slot)
        try:
            res = rk.score(F.sparse_ids(sub), dense[rows])
        except Exception as e:  # noqa: BLE001 - a custom scorer failing degrades, never raises
            res = ScoreResult(fallback_scores(dense[rows]), "", True, rk.model_name, repr(e))
        raw = np.asarray(res.raw, dtype=np.float64).reshape(-1)
        name = res.model_name or rk.model_name
        if res.degraded or not res.model_version or rk.calibrate is None:
            return Scored(raw, raw, name, res.model_version or "", bool(res.degraded), res.error)
        try:
            cal = np.asarray(
                rk.calibrate(
                    raw,
                    res.model_version,
                    {"position": sub["position"], "device_type": sub["device_type"]},
                ),
                dtype=np.float64,
            ).reshape(-1)
            if cal.shape != raw.shape or not np.all(np.isfinite(cal)):
                raise ValueError(f"calibration returned {cal.shape} for {raw.shape}")
            cal = np.clip(cal, 0.0, 1.0)
        except Exception as e:  # noqa: BLE001 - no calibrator state, Redis down: identity
            log.debug("calibration of %s skipped: %s", name, e)
            cal = raw
        return Scored(raw, cal, name, res.model_version, False)

    # ------------------------------------------------------------------ deciding

    def decide(
        self,
        batch: RequestBatchLike,
        arm_of_request: np.ndarray | Sequence[str],
        rankers: dict[str, Ranker],
        shadows: Sequence[Ranker] = (),
        uniforms: np.ndarray | None = None,
        keep_inputs: bool = False,
    ) -> Decisions:
        """Decide what every request of ``batch`` shows (see the module docstring).

        ``arm_of_request``: per request, the deciding arm's name (a key of ``rankers``) or an
        integer index into ``list(rankers)``. ``uniforms``: ``(n, >= n_uniforms(max
        slots))`` pre-drawn uniforms (default: ``request_uniforms(batch.request_id)``).
        ``keep_inputs``: also return the shown impressions' model inputs at their slots
        (``Decisions.inputs``, for an online learner)."""
        t0 = time.perf_counter()
        n = len(np.asarray(batch.event_time_ms))
        arms = np.asarray(arm_of_request)
        if arms.shape != (n,):
            raise ValueError(
                f"arm_of_request must have one arm per request ({n}), not {arms.shape}"
            )
        if arms.dtype.kind in "iu":
            names = np.array(list(rankers), dtype=object)
            if n and (arms.min() < 0 or arms.max() >= len(names)):
                raise ValueError(f"arm_of_request indices must be in [0, {len(names)})")
            arms = names[arms] if n else np.zeros(0, dtype=object)
        arms = arms.astype(object)
        unknown = sorted(set(arms.tolist()) - set(rankers))
        if unknown:
            raise ValueError(f"arms {unknown} have no ranker (rankers: {sorted(rankers)})")
        n_slots = np.asarray(batch.n_slots, dtype=np.int64)
        s_max = int(n_slots.max()) if n else 0
        if uniforms is None:
            uniforms = request_uniforms(batch.request_id, n=n_uniforms(max(s_max, 1)))
        uniforms = np.asarray(uniforms, dtype=np.float64)

        cols, req_of = candidate_columns(batch)
        total = len(req_of)
        read = counts_at_event_times(self.store, cols)
        dense = F.dense_from_counts(read.counts)
        row_degraded = read.degraded
        t_feat = time.perf_counter()

        pctr0 = np.zeros(total)
        row_arm = arms[req_of] if total else np.zeros(0, dtype=object)
        arm_s: dict[str, float] = {}
        arm_meta: dict[str, Scored] = {}
        score_degraded = np.zeros(total, dtype=bool)
        zeros = np.zeros(total, dtype=np.int64)
        raw0 = np.zeros(total)
        for a in sorted(set(arms.tolist())):
            ta = time.perf_counter()
            rows = np.flatnonzero(row_arm == a)
            sc = self._score(rankers[a], batch, cols, rows, zeros[rows], dense)
            pctr0[rows] = sc.calibrated
            raw0[rows] = sc.raw
            score_degraded[rows] = sc.degraded
            arm_meta[a] = sc
            arm_s[a] = time.perf_counter() - ta
        ta = time.perf_counter()
        res: AuctionResult = auction(
            batch.cand_offsets,
            np.asarray(batch.cand_bid, dtype=np.float64),
            pctr0,
            n_slots,
            explore_mask(uniforms, self.cfg),
            uniforms,
            self.cfg,
            np.asarray(batch.cand_new, dtype=bool),
        )
        t_auction = time.perf_counter() - ta

        k = len(res)
        imp_arm = arms[res.request_index] if k else np.zeros(0, dtype=object)
        pctr_raw, pctr = np.zeros(k), np.zeros(k)
        model_name = np.full(k, "", dtype=object)
        model_version = np.full(k, "", dtype=object)
        imp_degraded = row_degraded[res.candidate_index] | score_degraded[res.candidate_index]
        for a in sorted(set(imp_arm.tolist())):
            ta = time.perf_counter()
            sel = np.flatnonzero(imp_arm == a)
            rk = rankers[a]
            if rk.kind == "prior":  # no position effect: its pCTR at any slot is its pCTR0
                sc = Scored(res.pctr0[sel], res.pctr0[sel], "prior", "", False)
            else:
                sc = self._score(rk, batch, cols, res.candidate_index[sel], res.slot[sel], dense)
            pctr_raw[sel], pctr[sel] = sc.raw, sc.calibrated
            model_name[sel] = sc.model_name or arm_meta[a].model_name
            model_version[sel] = sc.model_version
            imp_degraded[sel] |= sc.degraded
            arm_s[a] += time.perf_counter() - ta
        t_decided = time.perf_counter()

        shadow_out: dict[str, ShadowDecisions] = {}
        for rk in shadows:
            # the rows and shown impressions a deciding arm of the same key already scored
            same = [a for a in arm_meta if rk.key and rankers[a].key == rk.key]
            done0 = np.isin(row_arm, same) & ~score_degraded
            done_at = np.isin(imp_arm, same) & ~imp_degraded
            reuse = _Reuse(done0, raw0, pctr0, done_at, pctr_raw, pctr, arm_meta, same)
            shadow_out[rk.name] = self._shadow(rk, batch, cols, dense, uniforms, res, reuse)
        t_end = time.perf_counter()

        shared_s = (t_feat - t0) + t_auction
        latency = np.array([(shared_s + arm_s.get(a, 0.0)) * 1000.0 for a in arms.tolist()])
        req_degraded = np.zeros(n, dtype=bool)
        np.logical_or.at(req_degraded, req_of, row_degraded | score_degraded)
        inputs = None
        if keep_inputs:
            shown = _subset(cols, res.candidate_index, res.slot)
            inputs = (F.sparse_ids(shown), dense[res.candidate_index])
        return Decisions(
            request_index=res.request_index,
            candidate_index=res.candidate_index,
            arm=imp_arm,
            slot=res.slot,
            price=res.price,
            pctr0=res.pctr0,
            pctr_raw=pctr_raw,
            pctr=pctr,
            model_name=model_name,
            model_version=model_version,
            propensity=res.propensity,
            explored=res.explored,
            new_ad=res.new_ad,
            degraded=imp_degraded,
            request_arm=arms,
            request_slots=n_slots,
            request_filled=res.filled,
            request_latency_ms=latency.reshape(n),
            request_degraded=req_degraded,
            shadows=shadow_out,
            timings={
                "features": t_feat - t0,
                "score": sum(arm_s.values()),
                "auction": t_auction,
                "decide": t_decided - t0,
                "shadows": t_end - t_decided,
                "total": t_end - t0,
                "feature_reads": float(read.reads),
            },
            inputs=inputs,
        )

    def _shadow(
        self,
        rk: Ranker,
        batch: RequestBatchLike,
        cols: dict[str, np.ndarray],
        dense: np.ndarray,
        uniforms: np.ndarray,
        shown: AuctionResult,
        reuse: _Reuse,
    ) -> ShadowDecisions:
        """A shadow's ranking of every request (no exploration) and its pCTR of the shown
        impressions at their slots; rows a deciding arm of the same model version scored
        are reused, not scored again."""
        n_slots = np.asarray(batch.n_slots, dtype=np.int64)
        n = len(n_slots)
        s_max = int(n_slots.max()) if n else 0
        sc0 = reuse.merge(
            lambda rows: self._score(rk, batch, cols, rows, np.zeros(len(rows), np.int64), dense),
            reuse.done0,
            reuse.raw0,
            reuse.pctr0,
        )
        own = auction(
            batch.cand_offsets,
            np.asarray(batch.cand_bid, dtype=np.float64),
            sc0.calibrated,
            n_slots,
            np.zeros(n, dtype=bool),
            uniforms,
            self.cfg,
        )
        top = np.full((n, s_max), -1, dtype=np.int64)
        top_p = np.full((n, s_max), np.nan)
        top[own.request_index, own.slot] = own.candidate_index
        top_p[own.request_index, own.slot] = own.pctr0
        if rk.kind == "prior":
            at = Scored(
                sc0.raw[shown.candidate_index],
                sc0.calibrated[shown.candidate_index],
                "prior",
                "",
                False,
            )
        else:
            ci, sl = shown.candidate_index, shown.slot
            at = reuse.merge(
                lambda rows: self._score(rk, batch, cols, ci[rows], sl[rows], dense),
                reuse.done_at,
                reuse.raw_at,
                reuse.pctr_at,
            )
        return ShadowDecisions(
            name=rk.name,
            model_name=at.model_name or sc0.model_name,
            model_version=at.model_version or sc0.model_version,
            pctr_raw=at.raw,
            pctr=at.calibrated,
            top_candidate=top,
            top_pctr0=top_p,
            degraded=sc0.degraded or at.degraded,
        )


@dataclass
class _Reuse:
    """Scores a deciding arm of a shadow's model version already computed in this batch:
    per candidate row at position 0 (``done0``) and per shown impression (``done_at``)."""

    done0: np.ndarray
    raw0: np.ndarray
    pctr0: np.ndarray
    done_at: np.ndarray
    raw_at: np.ndarray
    pctr_at: np.ndarray
    meta: dict[str, Scored]
    arms: list[str]

    def merge(self, score: Any, done: np.ndarray, raw: np.ndarray, cal: np.ndarray) -> Scored:
        """The scores of every row: the reused ones, and ``score(rows)`` for the rest."""
        todo = np.flatnonzero(~done)
        out_raw, out_cal = raw.copy(), cal.copy()
        name = version = ""
        degraded = False
        if len(todo) or not self.arms:
            sc = score(todo)
            out_raw[todo], out_cal[todo] = sc.raw, sc.calibrated
            name, version, degraded = sc.model_name, sc.model_version, sc.degraded
        if self.arms:
            m = self.meta[self.arms[0]]
            name, version = name or m.model_name, version or m.model_version
        return Scored(out_raw, out_cal, name, version, degraded)


__all__ = [
    "AdServer",
    "Decisions",
    "Ranker",
    "RequestBatchLike",
    "Scored",
    "ShadowDecisions",
    "candidate_columns",
    "model_ranker",
]
