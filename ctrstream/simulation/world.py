"""The closed-loop world: it emits ad requests, and whoever decides (the ad server) chooses
what is shown; the world then says how likely each shown ad was to be clicked and whether it
was.

One truth with the open-loop generator
--------------------------------------
The world replays the generator's random stream of its *reference* scenario (the history's
scenario, or the world's own) up to the clicks (:func:`ctrstream.simulation.generator._open_loop`),
so it has the same market (users, ads, sites, effects, interests, retargeted ads), the same
heat episodes over the reference span, the same intercept (the history's
``meta["intercept"]`` when given), the same drifting campaign and the same per-ad prior of
the trend term. A shown ad's true probability is the generator's formula
(:func:`~ctrstream.simulation.generator._base_logit` + intercept + drift, then
:func:`~ctrstream.simulation.generator._trend_term`) at its slot (``position`` = slot index),
with the state of the closed loop:

* fatigue: the user's impressions of the ad / advertiser with event time in
  ``[t - fatigue_window_s, t)`` - the history's before ``start_ms``, then what the closed loop
  showed (impressions of the same request, all at its time, do not count for each other);
* trend: the ad's impressions and the clicks that landed in the previous ``trend_window_s``
  complete minutes (minute grid of the reference scenario) and since the start;
* heat: the reference span's episodes, then episodes drawn per hour of event time after it
  (seeded per hour, the generator's rate and durations).

What the closed loop adds (:class:`Marketplace`): bids per click per campaign (log-normal),
targeting (a share of campaigns target a few countries / devices), and new ads that enter the
market during the run. None of it changes the open-loop traffic.

Determinism
-----------
Requests are drawn per minute of event time from ``default_rng([seed, _REQUEST_STREAM,
minute])``, so a window's requests do not depend on how the event time was cut into windows;
request ids count requests from ``start_ms``. Clicks and their delays come from a counter-based
hash of (seed, request number, slot), so they do not depend on the batching either.
:meth:`World.state` / :meth:`World.load_state` checkpoint everything that is not derived
from the constructor's arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from ctrstream.simulation.generator import (
    COUNTRIES,
    COUNTRY_WEIGHTS,
    DEVICE_WEIGHTS,
    DEVICES,
    MINUTE_MS,
    _ad_prior,
    _base_logit,
    _drift_mask,
    _heat_on,
    _heat_rate_per_ms,
    _hot,
    _Market,
    _open_loop,
    _sample_cdf,
    _sigmoid,
    _trend_term,
)
from ctrstream.simulation.scenarios import Scenario
from ctrstream.simulation.traffic import Traffic

__all__ = ["Marketplace", "RequestBatch", "Shown", "Outcome", "World"]

# seeds of the world's own random streams (the generator's is [seed, 0xC7])
_MARKET_STREAM = 0xAD5E
_REQUEST_STREAM = 0x5EC
_HEAT_STREAM = 0x4EA7
_CLICK_SALT = 0xC11C4
_HEAT_BLOCK_MS = 3_600_000  # heat episodes after the reference span are drawn per hour
_STATE_FORMAT = 1

# the fields that determine the market (_market): a history must share them with the world
_MARKET_FIELDS = (
    "seed",
    "n_users",
    "n_ads",
    "n_campaigns",
    "n_advertisers",
    "n_sites",
    "n_categories",
    "user_zipf",
    "user_zipf_offset",
    "ad_zipf",
    "ad_zipf_offset",
    "site_zipf",
    "site_zipf_offset",
    "user_sigma",
    "ad_sigma",
    "site_sigma",
    "country_sigma",
    "site_category_scale",
)


# --------------------------------------------------------------------------- data types


@dataclass
class Marketplace:
    """What an auction needs, per campaign / ad (arrays by id)."""

    bid_cpc: np.ndarray  # float64 (n_campaigns,) bid per click
    ad_campaign: np.ndarray  # int64 (n_ads,)
    campaign_advertiser: np.ndarray  # int64 (n_campaigns,)
    ad_category: np.ndarray  # int64 (n_ads,)
    # targeting, per campaign: bit c set = targets COUNTRIES[c] / DEVICES[c] (all bits: any)
    target_countries: np.ndarray  # int64 (n_campaigns,)
    target_devices: np.ndarray  # int64 (n_campaigns,)
    ad_created_ms: np.ndarray  # int64 (n_ads,) when the ad enters the market (0: always there)

    def eligible(
        self, ad: np.ndarray, country: np.ndarray, device: np.ndarray, t_ms: np.ndarray
    ) -> np.ndarray:
        """Whether each ad may be shown to a request of that country / device code at t_ms:
        its campaign targets both, and the ad has entered the market."""
        camp = self.ad_campaign[ad]
        one = np.int64(1)
        return (
            ((self.target_countries[camp] >> country) & one).astype(bool)
            & ((self.target_devices[camp] >> device) & one).astype(bool)
            & (self.ad_created_ms[ad] <= t_ms)
        )


@dataclass
class RequestBatch:
    """The requests with event time in ``[t0_ms, t1_ms)``, sorted by time; request i's
    candidates are ``cand_*[cand_offsets[i]:cand_offsets[i + 1]]``."""

    t0_ms: int
    t1_ms: int
    request_id: np.ndarray  # object (n,) "q{seed}-{number:012d}"
    request_seq: np.ndarray  # int64 (n,) the number in the id (requests since start_ms)
    event_time_ms: np.ndarray  # int64 (n,)
    user_id: np.ndarray  # int64 (n,)
    site_id: np.ndarray  # int64 (n,)
    device_type: np.ndarray  # object (n,) DEVICES names
    country: np.ndarray  # object (n,) COUNTRIES names
    device_code: np.ndarray  # int64 (n,) index into DEVICES
    country_code: np.ndarray  # int64 (n,) index into COUNTRIES
    n_slots: np.ndarray  # int64 (n,) 1..Scenario.max_slots
    cand_offsets: np.ndarray  # int64 (n + 1,)
    cand_request: np.ndarray  # int64 (total,) the request of each candidate
    cand_ad_id: np.ndarray  # int64 (total,)
    cand_campaign_id: np.ndarray  # int64 (total,)
    cand_advertiser_id: np.ndarray  # int64 (total,)
    cand_ad_category: np.ndarray  # int64 (total,)
    cand_bid: np.ndarray  # float64 (total,) the campaign's bid per click
    cand_new: np.ndarray  # bool (total,) created less than Scenario.new_ad_window_s ago

    def __len__(self) -> int:
        return len(self.request_seq)

    @property
    def n_candidates(self) -> int:
        return len(self.cand_ad_id)


@dataclass
class Shown:
    """What the ad server decided for one :class:`RequestBatch` (one row per impression)."""

    request_index: np.ndarray  # int64 (k,) index into the batch
    candidate_index: np.ndarray  # int64 (k,) global index into the batch's cand_* arrays
    slot: np.ndarray  # int64 (k,) 0 = top
    impression_id: np.ndarray  # object (k,) f"{request_id}-{slot}"

    @classmethod
    def of(cls, batch: RequestBatch, candidate_index: np.ndarray, slot: np.ndarray) -> Shown:
        """The impressions of the given candidates at the given slots (ids derived)."""
        ci = np.asarray(candidate_index, dtype=np.int64)
        sl = np.asarray(slot, dtype=np.int64)
        ri = batch.cand_request[ci]
        ids = np.empty(len(ci), dtype=object)
        ids[:] = [f"{q}-{s}" for q, s in zip(batch.request_id[ri].tolist(), sl.tolist())]
        return cls(request_index=ri, candidate_index=ci, slot=sl, impression_id=ids)


@dataclass
class Outcome:
    """The world's answer for a :class:`Shown` (same row order)."""

    p_true: np.ndarray  # float64 (k,) true click probability at the shown slot
    clicked: np.ndarray  # bool (k,)
    click_time_ms: np.ndarray  # int64 (k,) event time of the click, -1 if not clicked


# --------------------------------------------------------------------------- state helpers


class _WindowLog:
    """Events (key, time) for counting, per query (key, t), the events with time in
    ``[t - window_ms, t)``: one sorted int64 array of ``key * stride + (time - base)``."""

    def __init__(self, window_ms: int, n_keys: int, base_ms: int):
        bits = max(1, math.ceil(math.log2(n_keys + 1)))
        self.stride = np.int64(1) << np.int64(62 - bits)
        if int(self.stride) < 4 * window_ms:
            raise ValueError(
                f"the market is too large for the fatigue window ({n_keys} keys): reduce "
                "n_users, n_ads or fatigue_window_s"
            )
        self.window = int(window_ms)
        self.base = int(base_ms) - self.window
        self.comb = np.zeros(0, dtype=np.int64)

    def _fit(self, t_min: int, t_max: int) -> None:
        """Re-base the encoding when times leave ``[base, base + stride)``."""
        if t_min >= self.base and t_max - self.base < int(self.stride) - 1:
            return
        keys, times = self.entries()
        lo = min(t_min, int(times.min()) if len(times) else t_min)
        hi = max(t_max, int(times.max()) if len(times) else t_max)
        if hi - lo >= int(self.stride) - 1:  # drop what no query in [t_min, ...) can count
            keep = times >= t_min - self.window
            keys, times = keys[keep], times[keep]
            lo = min(t_min - self.window, int(times.min()) if len(times) else t_min)
            if hi - lo >= int(self.stride) - 1:
                raise ValueError("fatigue window log: times span more than the encoding allows")
        self.base = lo
        self.comb = np.sort(keys * self.stride + (times - self.base))

    def add(self, key: np.ndarray, t: np.ndarray) -> None:
        if len(key) == 0:
            return
        self._fit(int(t.min()), int(t.max()))
        new = np.sort(key.astype(np.int64) * self.stride + (t - self.base))
        self.comb = np.insert(self.comb, np.searchsorted(self.comb, new), new)

    def count(self, key: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Per query, the logged events of its key with time in ``[t - window, t)``."""
        if len(key) == 0 or len(self.comb) == 0:
            return np.zeros(len(key), dtype=np.int64)
        self._fit(int(t.min()) - self.window, int(t.max()))
        k = key.astype(np.int64) * self.stride
        hi = np.searchsorted(self.comb, k + (t - self.base), side="left")
        lo = np.searchsorted(self.comb, k + (t - self.window - self.base), side="left")
        return (hi - lo).astype(np.int64)

    def prune(self, before_ms: int) -> None:
        """Forget events older than ``before_ms`` (no query at or after it counts them)."""
        if len(self.comb):
            self.comb = self.comb[(self.comb % self.stride) + self.base >= before_ms]

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        return self.comb // self.stride, self.comb % self.stride + self.base

    def load(self, key: np.ndarray, t: np.ndarray) -> None:
        self.comb = np.zeros(0, dtype=np.int64)
        self.add(np.asarray(key, dtype=np.int64), np.asarray(t, dtype=np.int64))


class _TrendState:
    """Per ad, the impressions and the landed clicks per minute (minute grid from
    ``grid0_ms``); totals of the minutes before ``closed`` are folded into ``cum_*``."""

    def __init__(self, n_ads: int, window_min: int, grid0_ms: int):
        self.n_ads = n_ads
        self.win = window_min
        self.grid0 = grid0_ms
        self.imp: dict[int, list[np.ndarray]] = {}
        self.clk: dict[int, list[np.ndarray]] = {}
        self.cum_i = np.zeros(n_ads)
        self.cum_c = np.zeros(n_ads)
        self.closed = -(2**62)
        self._cache: tuple[int, tuple[np.ndarray, ...]] | None = None

    def minute(self, t_ms: np.ndarray | int) -> np.ndarray:
        return (np.asarray(t_ms, dtype=np.int64) - self.grid0) // MINUTE_MS

    def _put(self, book: dict[int, list[np.ndarray]], minute: np.ndarray, ad: np.ndarray) -> None:
        if len(ad) == 0:
            return
        o = np.argsort(minute, kind="stable")
        m, a = minute[o], ad[o].astype(np.int64)
        done = m < self.closed  # a late call for minutes already folded: into the totals too
        if done.any():
            cum = self.cum_i if book is self.imp else self.cum_c
            cum += np.bincount(a[done], minlength=self.n_ads)
        starts = np.flatnonzero(np.concatenate(([True], m[1:] != m[:-1])))
        for s, e in zip(starts.tolist(), np.append(starts[1:], len(m)).tolist()):
            book.setdefault(int(m[s]), []).append(a[s:e])
        if self._cache is not None and int(m[0]) < self._cache[0]:
            self._cache = None

    def add_impressions(self, minute: np.ndarray, ad: np.ndarray) -> None:
        self._put(self.imp, minute, ad)

    def add_clicks(self, minute: np.ndarray, ad: np.ndarray) -> None:
        self._put(self.clk, minute, ad)

    def _count(self, book: dict[int, list[np.ndarray]], lo: int, hi: int) -> np.ndarray:
        parts = [a for m, v in book.items() if lo <= m < hi for a in v]
        if not parts:
            return np.zeros(self.n_ads)
        return np.bincount(np.concatenate(parts), minlength=self.n_ads).astype(np.float64)

    def fold(self, k: int) -> None:
        """Minutes before ``k`` are complete: fold them into the totals, drop what no window
        at ``k`` or later needs."""
        first = self.closed == -(2**62)
        lo = min(list(self.imp) + list(self.clk) + [k]) if first else self.closed
        if k <= lo and not first:
            return
        self.cum_i += self._count(self.imp, lo, k)
        self.cum_c += self._count(self.clk, lo, k)
        self.closed = k
        for book in (self.imp, self.clk):
            for m in [m for m in book if m < k - self.win]:
                del book[m]
        self._cache = None

    def arrays(self, k: int) -> tuple[np.ndarray, ...]:
        """(window impressions, window clicks, total impressions, total clicks) per ad as
        seen by an impression in minute ``k`` (never before the folded minutes)."""
        k = max(int(k), self.closed)
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        win_i = self._count(self.imp, k - self.win, k)
        win_c = self._count(self.clk, k - self.win, k)
        cum_i = self.cum_i + self._count(self.imp, self.closed, k)
        cum_c = self.cum_c + self._count(self.clk, self.closed, k)
        out = (win_i, win_c, cum_i, cum_c)
        self._cache = (k, out)
        return out

    def flat(self, book: dict[int, list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        ms = [np.full(len(a), m, dtype=np.int64) for m, v in book.items() for a in v]
        ads = [a for v in book.values() for a in v]
        if not ads:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(ms), np.concatenate(ads)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (uint64 in, uint64 out, wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _normal(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _first_valid(mat: np.ndarray, valid: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Per row, the first ``quota`` valid entries that are the first occurrence of their value
    among the row's valid entries (a mask over ``mat``)."""
    n, m = mat.shape
    if m == 0:
        return np.zeros((n, 0), dtype=bool)
    keyed = np.where(valid, mat, -1 - np.arange(m, dtype=np.int64)[None, :])
    order = np.argsort(keyed, axis=1, kind="stable")
    s = np.take_along_axis(keyed, order, axis=1)
    first_sorted = np.ones((n, m), dtype=bool)
    first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
    first = np.empty((n, m), dtype=bool)
    np.put_along_axis(first, order, first_sorted, axis=1)
    first &= valid
    return first & (np.cumsum(first, axis=1) <= quota[:, None])


def _bitmask_top(rng: np.random.Generator, weights: np.ndarray, n: int, k: int) -> np.ndarray:
    """n bitmasks of k distinct categories drawn by weight (without replacement)."""
    k = min(k, len(weights))
    g = np.log(weights / weights.sum())[None, :] - np.log(-np.log(rng.random((n, len(weights)))))
    top = np.argsort(-g, axis=1)[:, :k]
    return (np.int64(1) << top.astype(np.int64)).sum(axis=1).astype(np.int64)


# --------------------------------------------------------------------------- the world


class World:
    """The closed-loop world (see the module docstring)."""

    def __init__(
        self,
        scenario: Scenario,
        start_ms: int,
        *,
        history: Traffic | None = None,
        request_rate: float | None = None,
    ):
        """``start_ms``: where the closed loop begins; ``history`` (the open-loop traffic
        before it; its events at or after ``start_ms`` are ignored) warms the state (fatigue
        counts, trend windows, heat episodes); ``request_rate``: requests per second of event
        time on average over a span like the reference scenario's (default: the scenario's
        impression rate / mean slots per request); the diurnal shape is the generator's."""
        sc = scenario.validate()
        ref = sc if history is None else history.scenario
        if history is not None:
            diff = [f for f in _MARKET_FIELDS if getattr(ref, f) != getattr(sc, f)]
            if diff:
                raise ValueError(
                    "the history was generated with another market ("
                    + ", ".join(f"{f}: {getattr(ref, f)} vs {getattr(sc, f)}" for f in diff)
                    + "); give World the history's scenario, with closed-loop fields overridden"
                )
        if sc.targeted_countries > len(COUNTRIES) or sc.targeted_devices > len(DEVICES):
            raise ValueError(
                f"targeted_countries must be <= {len(COUNTRIES)} and targeted_devices "
                f"<= {len(DEVICES)}"
            )
        if request_rate is not None and not request_rate > 0:
            raise ValueError(f"request_rate must be > 0 requests/s (got {request_rate})")
        self.scenario = sc
        self.reference = ref
        self.start_ms = int(start_ms)

        ol = _open_loop(ref, np.random.default_rng([ref.seed, 0xC7]))
        self._mk: _Market = ol.mk
        b0 = ol.intercept
        if history is not None:
            if "intercept" in history.meta:
                b0 = float(history.meta["intercept"])
            elif history.truth is not None and "intercept" in history.truth:
                b0 = float(history.truth["intercept"])
        self.intercept = float(b0)
        self.prior = _ad_prior(ref.n_ads, ol.ad, _sigmoid(ol.logit), self._mk.ad_eff, ol.intercept)
        self.drift_campaign: int | None = None
        self.drift_time_ms: int | None = None
        if sc.drift_logit != 0:
            self.drift_campaign = (
                int(sc.drift_campaign)
                if sc.drift_campaign is not None
                else int(np.argmax(np.bincount(ol.campaign, minlength=ref.n_campaigns)))
            )
            self.drift_time_ms = int(ref.start_ms + round(sc.drift_at * ref.span_ms))

        # heat: the reference span's episodes, then per-hour blocks after it
        ep_ad, ep_start, ep_end = ol.episodes
        self._ep = [
            ep_ad.astype(np.int64),
            ep_start.astype(np.int64) + ref.start_ms,
            ep_end.astype(np.int64) + ref.start_ms,
        ]
        med = sc.heat_duration_median_s * 1000.0
        lookback = int(med * math.exp(0.5 * 8.0))  # 8 sigma: no episode lasts longer
        self._heat_block_next = max(0, (self.start_ms - lookback - ref.end_ms) // _HEAT_BLOCK_MS)
        self._heat_until = ref.end_ms + self._heat_block_next * _HEAT_BLOCK_MS

        self.market = self._draw_marketplace()

        # requests: per-minute intensity of the generator's diurnal shape
        w = np.asarray(sc.slot_count_weights, dtype=np.float64)
        self._slot_cdf = np.cumsum(w) / w.sum()
        mean_slots = float((w * np.arange(1, len(w) + 1)).sum() / w.sum())
        self.request_rate = (
            float(request_rate)
            if request_rate is not None
            else sc.events / (sc.span_ms / 1000.0) / mean_slots
        )
        span = ref.span_ms
        n_min = -(-span // MINUTE_MS)
        edges = np.minimum(np.arange(n_min + 1, dtype=np.int64) * MINUTE_MS, span)
        self._lam_norm = float(
            (self._diurnal(ref.start_ms + (edges[:-1] + edges[1:]) / 2) * np.diff(edges)).sum()
            / span
        )
        self._user_cdf = np.cumsum(self._mk.user_p)
        self._site_cdf = np.cumsum(self._mk.site_p)
        self._dev_cdf = np.cumsum(DEVICE_WEIGHTS) / DEVICE_WEIGHTS.sum()
        self._new_ads = np.flatnonzero(self.market.ad_created_ms > 0)
        self._minute_cache: tuple[int, dict[str, np.ndarray]] | None = None

        # the state
        self._fw = int(sc.fatigue_window_s * 1000)
        self._fat_ad = _WindowLog(self._fw, sc.n_users * sc.n_ads, self.start_ms)
        self._fat_adv = _WindowLog(self._fw, sc.n_users * sc.n_advertisers, self.start_ms)
        self._trend = _TrendState(
            sc.n_ads, max(1, int(round(sc.trend_window_s / 60.0))), ref.start_ms
        )
        self._next_t0 = self.start_ms
        self._next_seq = 0
        self._pruned_at = self.start_ms
        if history is not None:
            self._warm(history)
        self._trend.fold(int(self._trend.minute(self.start_ms)))

    # ------------------------------------------------------------------ construction parts

    def _draw_marketplace(self) -> Marketplace:
        sc, mk = self.scenario, self._mk
        rng = np.random.default_rng([sc.seed, _MARKET_STREAM])
        C, N = sc.n_campaigns, sc.n_ads
        bid = sc.bid_median * np.exp(sc.bid_sigma * rng.standard_normal(C))
        all_c = np.int64((1 << len(COUNTRIES)) - 1)
        all_d = np.int64((1 << len(DEVICES)) - 1)
        tc = np.where(
            rng.random(C) < sc.country_targeting_share,
            _bitmask_top(rng, COUNTRY_WEIGHTS, C, sc.targeted_countries),
            all_c,
        )
        td = np.where(
            rng.random(C) < sc.device_targeting_share,
            _bitmask_top(rng, DEVICE_WEIGHTS, C, sc.targeted_devices),
            all_d,
        )
        created = np.zeros(N, dtype=np.int64)
        n_new = int(round(sc.new_ad_fraction * N))
        new = rng.choice(N, n_new, replace=False)
        window = int(sc.new_ad_window_s * 1000)  # some are new from the start on
        created[new] = (
            self.start_ms - window + (rng.random(n_new) * (sc.span_ms + window)).astype(np.int64)
        )
        return Marketplace(
            bid_cpc=bid,
            ad_campaign=mk.ad_campaign.astype(np.int64),
            campaign_advertiser=mk.campaign_advertiser.astype(np.int64),
            ad_category=mk.ad_category.astype(np.int64),
            target_countries=tc.astype(np.int64),
            target_devices=td.astype(np.int64),
            ad_created_ms=created,
        )

    def _warm(self, history: Traffic) -> None:
        """The history's events before ``start_ms`` as the state the closed loop starts from."""
        imps = history.impressions
        t = imps.column("event_time_ms").to_numpy()
        keep = t < self.start_ms
        t = t[keep]
        user = imps.column("user_id").to_numpy()[keep]
        ad = imps.column("ad_id").to_numpy()[keep]
        adv = imps.column("advertiser_id").to_numpy()[keep]
        self._trend.add_impressions(self._trend.minute(t), ad)
        recent = t >= self.start_ms - self._fw
        self._fat_ad.add(user[recent] * self.scenario.n_ads + ad[recent], t[recent])
        self._fat_adv.add(user[recent] * self.scenario.n_advertisers + adv[recent], t[recent])
        clicks = history.clicks
        if clicks.num_rows:
            ids = imps.column("impression_id").filter(keep)
            shown = pc.is_in(clicks.column("impression_id"), value_set=ids.combine_chunks())
            ct = clicks.column("event_time_ms").to_numpy()
            ca = clicks.column("ad_id").to_numpy()
            sel = shown.to_numpy(zero_copy_only=False)
            self._trend.add_clicks(self._trend.minute(ct[sel]), ca[sel])

    def _diurnal(self, abs_ms: np.ndarray | float) -> np.ndarray:
        sc = self.scenario
        hour = (np.asarray(abs_ms, dtype=np.float64) / 3_600_000.0) % 24
        return 1 + sc.diurnal_amplitude * np.cos(2 * np.pi * (hour - sc.diurnal_peak_hour) / 24)

    # ------------------------------------------------------------------ heat

    def _heat_cover(self, t_max: int) -> None:
        """Draw the per-hour heat episode blocks up to ``t_max`` (deterministic per block)."""
        sc, ref = self.scenario, self.reference
        while self._heat_until <= t_max:
            b = self._heat_block_next
            lo = ref.end_ms + b * _HEAT_BLOCK_MS
            if _heat_on(sc):
                rng = np.random.default_rng([sc.seed, _HEAT_STREAM, b])
                k = int(rng.poisson(_heat_rate_per_ms(sc) * _HEAT_BLOCK_MS))
                med = sc.heat_duration_median_s * 1000.0
                a = rng.integers(0, sc.n_ads, k).astype(np.int64)
                s = lo + (rng.random(k) * _HEAT_BLOCK_MS).astype(np.int64)
                e = s + (med * np.exp(0.5 * rng.standard_normal(k))).astype(np.int64)
                self._ep = [np.concatenate((x, y)) for x, y in zip(self._ep, (a, s, e))]
            self._heat_block_next = b + 1
            self._heat_until = lo + _HEAT_BLOCK_MS

    def _hot(self, ad: np.ndarray, t: np.ndarray) -> np.ndarray:
        if len(t) == 0:
            return np.zeros(0, dtype=bool)
        self._heat_cover(int(t.max()))
        return _hot(self._ep[0], self._ep[1], self._ep[2], ad, t)

    # ------------------------------------------------------------------ requests

    def _minute_requests(self, minute: int) -> dict[str, np.ndarray]:
        """All requests of one absolute minute of event time (before filtering to a window)."""
        if self._minute_cache is not None and self._minute_cache[0] == minute:
            return self._minute_cache[1]
        sc, mk, mp = self.scenario, self._mk, self.market
        rng = np.random.default_rng([sc.seed, _REQUEST_STREAM, minute])
        m0 = minute * MINUTE_MS
        lam = float(self._diurnal(m0 + MINUTE_MS / 2))
        n = int(rng.poisson(self.request_rate / 1000.0 * MINUTE_MS * lam / self._lam_norm))
        t = m0 + np.sort(rng.integers(0, MINUTE_MS, n))
        user = _sample_cdf(self._user_cdf, rng.random(n)).astype(np.int64)
        site = _sample_cdf(self._site_cdf, rng.random(n)).astype(np.int64)
        device = np.where(
            rng.random(n) < 0.85, mk.user_device[user], _sample_cdf(self._dev_cdf, rng.random(n))
        ).astype(np.int64)
        country = mk.user_country[user].astype(np.int64)
        n_slots = 1 + _sample_cdf(self._slot_cdf, rng.random(n)).astype(np.int64)

        # candidates: new ads first (new_ad_share of them), then the user's retargeted ads
        # and ads drawn by popularity; distinct, eligible, established ads only in the rest
        K = sc.candidates_per_request
        want_new = np.floor(K * sc.new_ad_share + rng.random(n)).astype(np.int64)
        window = int(sc.new_ad_window_s * 1000)
        cr = mp.ad_created_ms[self._new_ads]
        pool = self._new_ads[(cr < m0 + MINUTE_MS) & (cr + window > m0)]
        tt = t[:, None]

        def is_new(a: np.ndarray) -> np.ndarray:
            c = mp.ad_created_ms[a]
            return (c > 0) & (c <= tt) & (tt - c < window)

        def ok(a: np.ndarray) -> np.ndarray:
            return mp.eligible(a, country[:, None], device[:, None], tt)

        # the new ads: a uniform draw without replacement among the request's eligible ones
        elig = ok(pool[None, :]) & is_new(pool[None, :])
        keys = np.where(elig, rng.random((n, len(pool))), 2.0)
        pick = np.argsort(keys, axis=1)[:, : min(len(pool), int(math.ceil(K * sc.new_ad_share)))]
        new_mat = pool[pick]
        new_take = np.take_along_axis(elig, pick, axis=1) & (
            np.arange(pick.shape[1])[None, :] < want_new[:, None]
        )
        got_new = new_take.sum(axis=1)
        rest_quota = K - got_new
        rest = np.concatenate(
            [mk.user_retarget[user].astype(np.int64), self._popular(rng, n, 2 * K + 10)], axis=1
        )
        for top_up in range(8):  # rows short of eligible ads draw more (rare)
            rest_take = _first_valid(rest, ok(rest) & ~is_new(rest), rest_quota)
            if top_up == 7 or (rest_take.sum(axis=1) >= rest_quota).all():
                break
            rest = np.concatenate([rest, self._popular(rng, n, 2 * K)], axis=1)
        mat = np.concatenate([new_mat, rest], axis=1)
        take = np.concatenate([new_take, rest_take], axis=1)
        counts = take.sum(axis=1)
        cand = mat[take]  # row-major: per request, new ads first
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        cand_req = np.repeat(np.arange(n, dtype=np.int64), counts)
        c_t = t[cand_req]
        created = mp.ad_created_ms[cand]
        out = dict(
            t=t,
            user=user,
            site=site,
            device=device,
            country=country,
            n_slots=n_slots,
            offsets=offsets,
            cand=cand,
            cand_new=(created > 0) & (c_t - created < window),
        )
        self._minute_cache = (minute, out)
        return out

    def _popular(self, rng: np.random.Generator, n: int, m: int) -> np.ndarray:
        return _sample_cdf(self._mk.ad_cdf, rng.random((n, m))).astype(np.int64)

    def requests(self, t0_ms: int, t1_ms: int) -> RequestBatch:
        """The requests with event time in ``[t0_ms, t1_ms)``: windows must be consecutive
        (the first starts at ``start_ms``, each next one where the previous ended)."""
        t0, t1 = int(t0_ms), int(t1_ms)
        if t0 != self._next_t0:
            raise ValueError(
                f"request windows must be consecutive: the next one starts at {self._next_t0} "
                f"(got t0_ms={t0})"
            )
        if t1 < t0:
            raise ValueError(f"t1_ms {t1} is before t0_ms {t0}")
        parts = []
        for minute in range(t0 // MINUTE_MS, -(-t1 // MINUTE_MS)):
            r = self._minute_requests(minute)
            lo, hi = np.searchsorted(r["t"], [t0, t1], side="left")
            if hi > lo:
                parts.append((r, int(lo), int(hi)))
        mp = self.market
        seq0 = self._next_seq

        def cat(key: str) -> np.ndarray:
            if not parts:
                return np.zeros(0, dtype=np.int64)
            return np.concatenate([r[key][lo:hi] for r, lo, hi in parts])

        cand_parts, counts = [], []
        for r, lo, hi in parts:
            off = r["offsets"]
            cand_parts.append((r["cand"][off[lo] : off[hi]], r["cand_new"][off[lo] : off[hi]]))
            counts.append(np.diff(off[lo : hi + 1]))
        t = cat("t")
        n = len(t)
        cnt = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
        cand = np.concatenate([c for c, _ in cand_parts]) if parts else np.zeros(0, np.int64)
        cand_new = np.concatenate([c for _, c in cand_parts]) if parts else np.zeros(0, bool)
        seq = np.arange(seq0, seq0 + n, dtype=np.int64)
        rid = np.empty(n, dtype=object)
        rid[:] = [f"q{self.scenario.seed}-{q:012d}" for q in seq.tolist()]
        device, country = cat("device"), cat("country")
        campaign = mp.ad_campaign[cand]
        self._next_t0, self._next_seq = t1, seq0 + n
        return RequestBatch(
            t0_ms=t0,
            t1_ms=t1,
            request_id=rid,
            request_seq=seq,
            event_time_ms=t,
            user_id=cat("user"),
            site_id=cat("site"),
            device_type=np.asarray(DEVICES, dtype=object)[device],
            country=np.asarray(COUNTRIES, dtype=object)[country],
            device_code=device,
            country_code=country,
            n_slots=cat("n_slots"),
            cand_offsets=np.concatenate(([0], np.cumsum(cnt))).astype(np.int64),
            cand_request=np.repeat(np.arange(n, dtype=np.int64), cnt),
            cand_ad_id=cand,
            cand_campaign_id=campaign,
            cand_advertiser_id=mp.campaign_advertiser[campaign],
            cand_ad_category=mp.ad_category[cand],
            cand_bid=mp.bid_cpc[campaign],
            cand_new=cand_new.astype(bool),
        )

    # ------------------------------------------------------------------ the truth

    def _logit(
        self, batch: RequestBatch, ci: np.ndarray, slot: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The logit without the trend term for candidates at slots (fatigue from the logged
        impressions), with each row's ad and event time."""
        sc = self.scenario
        if len(ci) and (ci.min() < 0 or ci.max() >= batch.n_candidates):
            raise ValueError(f"candidate_index out of range [0, {batch.n_candidates})")
        if len(slot) and (slot.min() < 0 or slot.max() >= sc.max_slots):
            raise ValueError(f"slot out of range [0, max_slots = {sc.max_slots})")
        r = batch.cand_request[ci]
        user = batch.user_id[r]
        ad = batch.cand_ad_id[ci]
        adv = batch.cand_advertiser_id[ci]
        t = batch.event_time_ms[r]
        x = _base_logit(
            sc,
            self._mk,
            user=user,
            ad=ad,
            site=batch.site_id[r],
            position=slot,
            device=batch.device_code[r],
            country=batch.country_code[r],
            category=batch.cand_ad_category[ci],
            abs_t=t,
            hot=self._hot(ad, t),
            n_user_ad=self._fat_ad.count(user * sc.n_ads + ad, t),
            n_user_adv=self._fat_adv.count(user * sc.n_advertisers + adv, t),
        )
        logit = x + self.intercept
        if self.drift_campaign is not None:
            mask = _drift_mask(
                batch.cand_campaign_id[ci], t, self.drift_campaign, self.drift_time_ms
            )
            logit += sc.drift_logit * mask
        return logit, ad, t

    def _p(self, logit: np.ndarray, ad: np.ndarray, minute: np.ndarray) -> np.ndarray:
        """sigmoid(logit + trend) with the trend state as it is now, per minute."""
        if self.scenario.trend_strength == 0:
            return _sigmoid(logit)
        p = np.empty(len(logit))
        for k in np.unique(minute).tolist():
            sel = np.flatnonzero(minute == k)
            win_i, win_c, cum_i, cum_c = self._trend.arrays(k)
            a = ad[sel]
            trend = _trend_term(
                self.scenario.trend_strength,
                self.prior[a],
                win_c[a],
                win_i[a],
                cum_c[a],
                cum_i[a],
            )
            p[sel] = _sigmoid(logit[sel] + trend)
        return p

    def true_p(
        self, batch: RequestBatch, candidate_index: np.ndarray, slot: np.ndarray | int
    ) -> np.ndarray:
        """The true click probability of candidates at slots (``slot`` broadcasts; 0 = the
        reference position) with the state as committed so far (nothing changes): what the
        oracle arm ranks by."""
        ci = np.asarray(candidate_index, dtype=np.int64)
        sl = np.broadcast_to(np.asarray(slot, dtype=np.int64), ci.shape)
        logit, ad, t = self._logit(batch, ci, sl)
        return self._p(logit, ad, self._trend.minute(t))

    def show(self, batch: RequestBatch, shown: Shown) -> Outcome:
        """Commit the shown impressions (in event time order): log them for fatigue and trend,
        draw their clicks from the true probability at their slot, with the scenario's click
        delays (late clicks included); the clicks count for the trend from the minute they
        land in."""
        sc = self.scenario
        ci = np.asarray(shown.candidate_index, dtype=np.int64)
        sl = np.asarray(shown.slot, dtype=np.int64)
        ri = np.asarray(shown.request_index, dtype=np.int64)
        k = len(ci)
        if not (len(sl) == k and len(ri) == k):
            raise ValueError("Shown: request_index, candidate_index and slot differ in length")
        if k == 0:
            return Outcome(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
        if ci.min() < 0 or ci.max() >= batch.n_candidates:
            raise ValueError(f"Shown: candidate_index out of range [0, {batch.n_candidates})")
        if not np.array_equal(batch.cand_request[ci], ri):
            raise ValueError("Shown: request_index is not the request of candidate_index")
        if sl.min() < 0 or (sl >= batch.n_slots[ri]).any():
            raise ValueError("Shown: a slot is outside its request's slots [0, n_slots)")
        if len(np.unique(ri * (sc.max_slots + 1) + sl)) < k or len(np.unique(ci)) < k:
            raise ValueError("Shown: a slot of a request or a candidate is shown twice")

        r_seq = batch.request_seq[ri]
        t = batch.event_time_ms[ri]
        order = np.lexsort((sl, ri, t))
        user = batch.user_id[ri]
        ad = batch.cand_ad_id[ci]
        # fatigue: log first, the counts then include earlier impressions of this batch
        self._fat_ad.add(user * sc.n_ads + ad, t)
        self._fat_adv.add(user * sc.n_advertisers + batch.cand_advertiser_id[ci], t)
        logit, _, _ = self._logit(batch, ci, sl)

        u_click = self._uniform(r_seq, sl, 0)
        minute = self._trend.minute(t)
        p = np.empty(k)
        click_t = np.full(k, -1, dtype=np.int64)
        ts = t[order]
        ms = minute[order]
        starts = np.flatnonzero(np.concatenate(([True], ms[1:] != ms[:-1])))
        for s, e in zip(starts.tolist(), np.append(starts[1:], k).tolist()):
            rows = order[s:e]
            m = int(ms[s])
            self._trend.fold(m)
            p[rows] = self._p(logit[rows], ad[rows], minute[rows])
            hit = rows[u_click[rows] < p[rows]]
            if len(hit):
                click_t[hit] = t[hit] + self._delays_ms(r_seq[hit], sl[hit])
                self._trend.add_clicks(self._trend.minute(click_t[hit]), ad[hit])
            self._trend.add_impressions(minute[rows], ad[rows])
        clicked = click_t >= 0
        if int(ts[0]) - self._pruned_at > self._fw // 4:
            self._fat_ad.prune(int(ts[0]) - self._fw)
            self._fat_adv.prune(int(ts[0]) - self._fw)
            self._pruned_at = int(ts[0])
        return Outcome(p_true=p, clicked=clicked, click_time_ms=click_t)

    # ------------------------------------------------------------------ click draws

    def _uniform(self, seq: np.ndarray, slot: np.ndarray, stream: int) -> np.ndarray:
        """Uniforms in (0, 1) from a hash of (seed, request number, slot, stream)."""
        key = (seq.astype(np.uint64) * np.uint64(64) + slot.astype(np.uint64)) * np.uint64(
            256
        ) + np.uint64(stream)
        salt = _mix64(np.array([self.scenario.seed ^ _CLICK_SALT], dtype=np.uint64))[0]
        h = _mix64(_mix64(key ^ salt))
        return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)

    def _delays_ms(self, seq: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """The generator's click delays (log-normal inside the attribution window, redrawn
        when past it; a late share after it), drawn from the per-impression hash."""
        sc = self.scenario
        n = len(seq)
        window = sc.attribution_window_s
        mu, sigma = np.log(sc.click_delay_median_s), sc.click_delay_sigma
        d = np.exp(mu + sigma * _normal(self._uniform(seq, slot, 4), self._uniform(seq, slot, 5)))
        bad = np.flatnonzero(d >= window)
        attempt = 1
        while len(bad):
            a, b = 4 + 2 * attempt, 5 + 2 * attempt
            if b > 255:
                d[bad] = window * 0.5  # unreachable for any sane scenario
                break
            z = _normal(
                self._uniform(seq[bad], slot[bad], a), self._uniform(seq[bad], slot[bad], b)
            )
            d[bad] = np.exp(mu + sigma * z)
            bad = bad[d[bad] >= window]
            attempt += 1
        late = self._uniform(seq, slot, 1) < sc.late_click_fraction
        z_extra = _normal(self._uniform(seq, slot, 2), self._uniform(seq, slot, 3))
        extra = np.exp(np.log(sc.late_click_extra_median_s) + z_extra)
        d = np.where(late, window + extra, d)
        return np.maximum(1, np.round(d * 1000.0)).astype(np.int64) if n else d.astype(np.int64)

    # ------------------------------------------------------------------ checkpoints

    def _fingerprint(self) -> np.ndarray:
        return np.array(
            [float(self.scenario.seed), float(self.start_ms), self.intercept, self.request_rate]
        )

    def state(self) -> dict[str, np.ndarray]:
        """A checkpoint as plain arrays (``np.savez``; load with ``allow_pickle=False``)."""
        ka, ta = self._fat_ad.entries()
        kv, tv = self._fat_adv.entries()
        im, ia = self._trend.flat(self._trend.imp)
        cm, ca = self._trend.flat(self._trend.clk)
        return {
            "format": np.array([_STATE_FORMAT], dtype=np.int64),
            "fingerprint": self._fingerprint(),
            "cursor": np.array(
                [self._next_t0, self._next_seq, self._pruned_at, self._trend.closed],
                dtype=np.int64,
            ),
            "fatigue_ad_key": ka,
            "fatigue_ad_t": ta,
            "fatigue_adv_key": kv,
            "fatigue_adv_t": tv,
            "trend_cum_i": self._trend.cum_i.copy(),
            "trend_cum_c": self._trend.cum_c.copy(),
            "trend_imp_minute": im,
            "trend_imp_ad": ia,
            "trend_clk_minute": cm,
            "trend_clk_ad": ca,
        }

    def load_state(self, d: dict[str, np.ndarray]) -> None:
        """Continue from a :meth:`state` checkpoint of a world built with the same arguments."""
        missing = [k for k in self.state() if k not in d]
        if missing:
            raise ValueError(f"not a World checkpoint: missing {missing}")
        if int(np.asarray(d["format"])[0]) != _STATE_FORMAT:
            raise ValueError(f"World checkpoint format {d['format']} (this code reads 1)")
        if not np.array_equal(np.asarray(d["fingerprint"]), self._fingerprint()):
            raise ValueError(
                "the checkpoint is of another world (seed, start_ms, intercept or request rate "
                f"differ: {np.asarray(d['fingerprint']).tolist()} vs "
                f"{self._fingerprint().tolist()}); build World with the same arguments"
            )
        cur = np.asarray(d["cursor"], dtype=np.int64)
        self._next_t0, self._next_seq, self._pruned_at = int(cur[0]), int(cur[1]), int(cur[2])
        self._fat_ad.load(d["fatigue_ad_key"], d["fatigue_ad_t"])
        self._fat_adv.load(d["fatigue_adv_key"], d["fatigue_adv_t"])
        tr = _TrendState(self._trend.n_ads, self._trend.win, self._trend.grid0)
        tr.cum_i = np.asarray(d["trend_cum_i"], dtype=np.float64).copy()
        tr.cum_c = np.asarray(d["trend_cum_c"], dtype=np.float64).copy()
        tr._put(tr.imp, np.asarray(d["trend_imp_minute"]), np.asarray(d["trend_imp_ad"]))
        tr._put(tr.clk, np.asarray(d["trend_clk_minute"]), np.asarray(d["trend_clk_ad"]))
        tr.closed = int(cur[3])
        tr._cache = None
        self._trend = tr
        self._minute_cache = None
