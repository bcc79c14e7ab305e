"""Synthetic ad traffic with a hidden ground-truth click model.

The marketplace
---------------
Users, ads and sites have heavy-tailed (Zipf-Mandelbrot) popularity: the id is the
popularity rank (id 0 is the most popular). Advertisers own campaigns, campaigns own ads;
each advertiser has a main ad category. Users have two interest categories, a main device
and a country. Traffic follows a diurnal shape (UTC). A share of impressions
(``retarget_rate``) shows the user one of three retargeted ads from their interest
categories, so the same user sees the same ad/advertiser repeatedly.

The truth (never in the events)
-------------------------------
Each impression's true click probability is ``sigmoid(logit)`` with

* main effects: user, ad, site, position, device, country, hour of day;
* interactions: user interest x ad category (``interest_logit``), site x category (low-rank);
* recency effects that only windowed features can capture:

  - **ad fatigue**: ``- fatigue_ad * log1p(n_user_ad) - fatigue_advertiser * log1p(n_user_adv)``
    where ``n_*`` are the user's impressions of that ad / advertiser in the previous
    ``fatigue_window_s`` (strictly earlier events);
  - **trending ads**: ads go through hidden "hot" episodes (``+heat_logit``), and
    ``+ trend_strength * clip(log(ad recent CTR / ad long-run CTR), -1, 1)``, the recent CTR
    being the ad's clicks / impressions with event time in the previous ``trend_window_s``
    (clicks counted at their own event time, strictly before the impression's minute);
* drift (scenario ``drift``): ``+ drift_logit`` for one campaign from ``drift_at`` on.

The intercept is solved so the mean true probability equals ``base_ctr``. Whether an
impression is clicked is one Bernoulli draw from that probability; the click arrives after a
log-normal delay (median ``click_delay_median_s``) inside the attribution window, except a
``late_click_fraction`` that arrives after it (independent of the probability, so the chance
of a click *attributed within the window* is ``p_click * (1 - late_click_fraction)``).

The oracle table holds ``impression_id`` and ``p_click`` (the true probability of a click).

Determinism
-----------
Everything derives from ``numpy.random.default_rng`` streams seeded by the scenario seed;
the same scenario gives byte-identical tables, records and files (for a given numpy /
pyarrow version).

Replay order (:meth:`Traffic.records`)
--------------------------------------
Impressions and clicks merged by event time (an impression before a click of the same
millisecond). In the ``dirty`` scenario, records that are the last event of their key
(unclicked impressions and clicks) are duplicated (a copy 1 ms - 2 s later), displaced out of
order (1 s .. ``out_of_order_max_s`` later, within allowed lateness) or made late
(``allowed_lateness_s`` + 1..10 min later), so event-time order per key is preserved; and
malformed records with keys ``malformed-<kind>-<n>`` are inserted (see ``Traffic.malformed``
for each one's expected decode-error reason).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctrstream.events import MAX_EVENT_BYTES, SCHEMA_VERSION, Click, Impression
from ctrstream.simulation.scenarios import (  # re-exported: __all__
    MALFORMED_KINDS,
    SCENARIOS,
    Scenario,
    load_scenario,
)

__all__ = [
    "Scenario",
    "load_scenario",
    "generate",
    "Traffic",
    "write_traffic",
    "read_traffic",
    "SCENARIOS",
    "MALFORMED_KINDS",
    "EXPECTED_REASON",
]

DEVICES = ("mobile", "desktop", "tablet", "ctv")
DEVICE_WEIGHTS = np.array([0.6, 0.3, 0.07, 0.03])
DEVICE_LOGIT = np.array([0.1, 0.0, 0.05, -0.4])
COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "CA", "ES", "IT", "MX", "AU")
COUNTRY_WEIGHTS = np.array([0.3, 0.08, 0.08, 0.07, 0.12, 0.07, 0.06, 0.05, 0.05, 0.05, 0.04, 0.03])

IMPRESSION_FIELDS: tuple[str, ...] = Impression.__struct_fields__
CLICK_FIELDS: tuple[str, ...] = Click.__struct_fields__
_STRING_FIELDS = {"impression_id", "click_id", "device_type", "country"}

IMPRESSION_SCHEMA = pa.schema(
    [(f, pa.string() if f in _STRING_FIELDS else pa.int64()) for f in IMPRESSION_FIELDS]
)
CLICK_SCHEMA = pa.schema(
    [(f, pa.string() if f in _STRING_FIELDS else pa.int64()) for f in CLICK_FIELDS]
)
ORACLE_SCHEMA = pa.schema([("impression_id", pa.string()), ("p_click", pa.float64())])
MALFORMED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("topic", pa.string()),
        ("kind", pa.string()),
        ("reason", pa.string()),
        ("timestamp_ms", pa.int64()),
        ("value", pa.binary()),
    ]
)

# What ctrstream.events' decoders say about each kind of injected malformed record
# (``DecodeError.reason`` starts with this).
EXPECTED_REASON = {
    "bad_json": "malformed JSON",
    "wrong_type": "invalid: Expected `int`, got `str`",
    "missing_field": "invalid: Object missing required field",
    "oversized": "oversized",
}

TOPIC_KINDS = ("impressions", "clicks")
MINUTE_MS = 60_000
_ENCODER = msgspec.json.Encoder()  # same configuration as ctrstream.events.encode
_TREND_PRIOR_RECENT = 50.0  # smoothing (pseudo-impressions) of the ad's recent CTR
_TREND_PRIOR_LONG = 200.0


# --------------------------------------------------------------------------- sampling helpers


def _zipf_cdf(n: int, exponent: float, offset: float) -> np.ndarray:
    w = 1.0 / (np.arange(n, dtype=np.float64) + offset) ** exponent
    c = np.cumsum(w)
    return c / c[-1]


def zipf_probabilities(n: int, exponent: float, offset: float) -> np.ndarray:
    """Popularity of ids 0..n-1 (what the tests compare realized frequencies with)."""
    w = 1.0 / (np.arange(n, dtype=np.float64) + offset) ** exponent
    return w / w.sum()


def _sample_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _categorical(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """``n`` iid draws from ``probs`` (multinomial counts in a random order: the same
    distribution as per-draw inverse-CDF sampling, much faster for many categories)."""
    counts = rng.multinomial(n, probs)
    return rng.permutation(np.repeat(np.arange(len(probs)), counts))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _recent_counts(key: np.ndarray, t: np.ndarray, window_ms: int, span_ms: int) -> np.ndarray:
    """For each event (time-sorted arrays), how many earlier events with the same key fall in
    ``[t - window_ms, t)`` (earlier = before it in the time-sorted order)."""
    n = len(key)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(key, kind="stable")  # keeps time order within a key
    ks = key[order]
    ts = t[order]
    g = np.concatenate(([0], np.cumsum(ks[1:] != ks[:-1])))
    stride = np.int64(span_ms + window_ms + 1)
    comb = g.astype(np.int64) * stride + ts
    first = np.searchsorted(comb, comb - window_ms, side="left")
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n, dtype=np.int64) - first
    return out


def _solve_intercept(x: np.ndarray, target: float) -> float:
    step = max(1, len(x) // 200_000)
    xs = x[::step]
    b = float(np.log(target / (1 - target)) - np.mean(xs))
    for _ in range(30):
        s = _sigmoid(b + xs)
        f = float(s.mean()) - target
        fp = float((s * (1 - s)).mean())
        b -= f / fp
        if abs(f) < 1e-10:
            break
    return b


def _ids(prefix: str, idx: np.ndarray) -> pa.Array:
    digits = pc.utf8_lpad(
        pc.cast(pa.array(idx, type=pa.int64()), pa.string()), width=9, padding="0"
    )
    return pc.binary_join_element_wise(prefix, digits, "")


def _dict_strings(codes: np.ndarray, values: tuple[str, ...]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(values)).cast(
        pa.string()
    )


# --------------------------------------------------------------------------- the marketplace


@dataclass
class _Market:
    ad_campaign: np.ndarray
    campaign_advertiser: np.ndarray
    ad_category: np.ndarray
    user_eff: np.ndarray
    ad_eff: np.ndarray
    site_eff: np.ndarray
    country_eff: np.ndarray
    user_interest: np.ndarray  # (n_users, 2)
    user_device: np.ndarray
    user_country: np.ndarray
    user_retarget: np.ndarray  # (n_users, 3) ad ids
    site_latent: np.ndarray
    cat_latent: np.ndarray
    ad_cdf: np.ndarray
    user_p: np.ndarray
    site_p: np.ndarray


def _market(sc: Scenario, rng: np.random.Generator) -> _Market:
    A, C, N, U, S, K = (
        sc.n_advertisers,
        sc.n_campaigns,
        sc.n_ads,
        sc.n_users,
        sc.n_sites,
        sc.n_categories,
    )
    campaign_advertiser = rng.permutation(np.concatenate([np.arange(A), rng.integers(0, A, C - A)]))
    ad_campaign = rng.permutation(np.concatenate([np.arange(C), rng.integers(0, C, N - C)]))
    cat_cdf = _zipf_cdf(K, 0.7, 1.0)
    adv_cat = _sample_cdf(cat_cdf, rng.random(A))
    ad_cat = np.where(
        rng.random(N) < 0.8, adv_cat[campaign_advertiser[ad_campaign]], rng.integers(0, K, N)
    )
    user_eff = rng.normal(0, sc.user_sigma, U)
    ad_eff = rng.normal(0, sc.ad_sigma, N)
    site_eff = rng.normal(0, sc.site_sigma, S)
    country_eff = rng.normal(0, sc.country_sigma, len(COUNTRIES))
    interest = _sample_cdf(cat_cdf, rng.random((U, 2)))
    user_device = _sample_cdf(np.cumsum(DEVICE_WEIGHTS) / DEVICE_WEIGHTS.sum(), rng.random(U))
    user_country = _sample_cdf(np.cumsum(COUNTRY_WEIGHTS) / COUNTRY_WEIGHTS.sum(), rng.random(U))
    d = 3
    site_latent = rng.normal(0, 1, (S, d))
    cat_latent = rng.normal(0, 1, (K, d)) * (sc.site_category_scale / np.sqrt(d))
    ad_cdf = _zipf_cdf(N, sc.ad_zipf, sc.ad_zipf_offset)

    # retargeted ads: 3 per user, drawn by popularity within the user's interest categories
    want_cat = interest[:, [0, 1, 0]]
    u_draw = rng.random((U, 3))
    retarget = _sample_cdf(ad_cdf, u_draw)  # fallback for empty categories
    ad_w = 1.0 / (np.arange(N, dtype=np.float64) + sc.ad_zipf_offset) ** sc.ad_zipf
    flat_cat, flat_u = want_cat.ravel(), u_draw.ravel()
    flat = retarget.ravel()
    order = np.argsort(flat_cat, kind="stable")
    bounds = np.searchsorted(flat_cat[order], np.arange(K + 1))
    for c in range(K):
        ads_c = np.flatnonzero(ad_cat == c)
        sel = order[bounds[c] : bounds[c + 1]]
        if len(ads_c) == 0 or len(sel) == 0:
            continue
        cdf = np.cumsum(ad_w[ads_c])
        cdf /= cdf[-1]
        flat[sel] = ads_c[_sample_cdf(cdf, flat_u[sel])]
    retarget = flat.reshape(U, 3)

    return _Market(
        ad_campaign=ad_campaign,
        campaign_advertiser=campaign_advertiser,
        ad_category=ad_cat,
        user_eff=user_eff,
        ad_eff=ad_eff,
        site_eff=site_eff,
        country_eff=country_eff,
        user_interest=interest,
        user_device=user_device,
        user_country=user_country,
        user_retarget=retarget,
        site_latent=site_latent,
        cat_latent=cat_latent,
        ad_cdf=ad_cdf,
        user_p=zipf_probabilities(U, sc.user_zipf, sc.user_zipf_offset),
        site_p=zipf_probabilities(S, sc.site_zipf, sc.site_zipf_offset),
    )


def _event_times(sc: Scenario, rng: np.random.Generator, n: int) -> np.ndarray:
    """Sorted event times (ms offsets from start) with the diurnal intensity."""
    span = sc.span_ms
    n_min = -(-span // MINUTE_MS)
    edges = np.minimum(np.arange(n_min + 1, dtype=np.int64) * MINUTE_MS, span)
    mid_hour = ((sc.start_ms + (edges[:-1] + edges[1:]) / 2) / 3_600_000.0) % 24
    lam = 1 + sc.diurnal_amplitude * np.cos(2 * np.pi * (mid_hour - sc.diurnal_peak_hour) / 24)
    mass = lam * (edges[1:] - edges[:-1])
    cdf = np.concatenate(([0.0], np.cumsum(mass)))
    cdf /= cdf[-1]
    u = np.sort(rng.random(n))
    t = np.interp(u, cdf, edges.astype(np.float64))
    return np.minimum(t.astype(np.int64), span - 1)


def _click_delays_ms(sc: Scenario, rng: np.random.Generator, n: int) -> np.ndarray:
    window = sc.attribution_window_s
    mu, sigma = np.log(sc.click_delay_median_s), sc.click_delay_sigma
    d = np.exp(mu + sigma * rng.standard_normal(n))
    bad = np.flatnonzero(d >= window)
    while len(bad):  # truncate to the attribution window by redrawing
        d[bad] = np.exp(mu + sigma * rng.standard_normal(len(bad)))
        bad = bad[d[bad] >= window]
    late = rng.random(n) < sc.late_click_fraction
    extra = np.exp(np.log(sc.late_click_extra_median_s) + rng.standard_normal(n))
    d = np.where(late, window + extra, d)
    return np.maximum(1, np.round(d * 1000.0)).astype(np.int64)


def _heat(
    sc: Scenario, rng: np.random.Generator, ad: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, int]:
    """Whether each impression's ad is in a hidden trending episode at its time."""
    n_ads, span = sc.n_ads, sc.span_ms
    med = sc.heat_duration_median_s * 1000.0
    mean_dur = med * np.exp(0.5 * 0.5**2)
    lead = 2 * med
    expected = sc.heat_fraction * n_ads * (span + lead) / mean_dur
    k = int(rng.poisson(expected)) if sc.heat_fraction > 0 and sc.heat_logit != 0 else 0
    if k == 0:
        return np.zeros(len(ad), dtype=bool), 0
    ep_ad = rng.integers(0, n_ads, k)
    ep_start = (rng.random(k) * (span + lead) - lead).astype(np.int64)
    ep_end = ep_start + (med * np.exp(0.5 * rng.standard_normal(k))).astype(np.int64)
    off = np.int64(lead + 1)
    stride = np.int64(span + lead + 2)
    ep_key = ep_ad.astype(np.int64) * stride + (ep_start + off)
    o = np.argsort(ep_key, kind="stable")
    ep_key, ep_ad, ep_end = ep_key[o], ep_ad[o], ep_end[o]
    imp_key = ad.astype(np.int64) * stride + (t + off)
    j = np.searchsorted(ep_key, imp_key, side="right") - 1
    jj = np.maximum(j, 0)
    hot = (j >= 0) & (ep_ad[jj] == ad) & (t < ep_end[jj])
    return hot, k


# --------------------------------------------------------------------------- Traffic


class Traffic:
    """Generated (or recorded) traffic: clean event tables, the oracle, and the replay plan."""

    def __init__(
        self,
        scenario: Scenario,
        impressions: pa.Table,
        clicks: pa.Table,
        oracle: pa.Table,
        meta: dict | None = None,
    ):
        self.scenario = scenario
        self.impressions = impressions
        self.clicks = clicks
        self.oracle = oracle
        self.meta = dict(meta or {})
        # per-impression terms of the hidden logit (numpy arrays in impression order: logit,
        # user, ad, site, heat, interest, site_category, fatigue, trend; intercept): set by
        # ``generate`` only, kept in memory, never written (bench/ne_gap.py decomposes with it)
        self.truth: dict | None = None
        self._plan_cache: _Plan | None = None
        self._enc_cols: tuple | None = None

    def __repr__(self) -> str:
        return (
            f"Traffic(scenario={self.scenario.name!r}, impressions={self.impressions.num_rows}, "
            f"clicks={self.clicks.num_rows}, records={self.n_records})"
        )

    # -- the replay plan ------------------------------------------------------------------
    @property
    def _plan(self) -> _Plan:
        if self._plan_cache is None:
            self._plan_cache = _make_plan(self)
        return self._plan_cache

    @property
    def injected(self) -> dict:
        """Counts of what the dirty scenario injected (all zero for clean traffic)."""
        return self._plan.injected

    @property
    def malformed(self) -> pa.Table:
        """The injected malformed records: key, topic, kind, expected reason, timestamp, value."""
        return self._plan.malformed

    @property
    def n_records(self) -> int:
        return len(self._plan.order)

    def __len__(self) -> int:
        return self.n_records

    def record_blocks(self, block: int = 65_536) -> Iterator[tuple[list, list, list, list]]:
        """The replay stream in blocks of parallel lists: (topic kinds, keys, values, timestamps)."""
        plan = self._plan
        imp_cols, imp_keys, clk_cols, clk_keys = self._encoding_columns()
        kind_names = np.array(TOPIC_KINDS + ("?",), dtype=object)
        mal_topic = np.array(
            [TOPIC_KINDS.index(t) for t in plan.malformed["topic"].to_pylist()], dtype=np.int8
        )
        mal_vals = np.array(plan.malformed["value"].to_pylist() + [b""], dtype=object)[:-1]
        mal_keys = np.array(
            [k.encode() for k in plan.malformed["key"].to_pylist()] + [b""], dtype=object
        )[:-1]
        for lo in range(0, len(plan.order), block):
            sel = plan.order[lo : lo + block]
            src, idx = plan.src_kind[sel], plan.src_idx[sel]
            m = len(sel)
            values = np.empty(m, dtype=object)
            keys = np.empty(m, dtype=object)
            topic = src.copy()
            for s, cols, key_arr, cls in (
                (0, imp_cols, imp_keys, Impression),
                (1, clk_cols, clk_keys, Click),
            ):
                mask = src == s
                if not mask.any():
                    continue
                rows = idx[mask]
                values[mask] = _as_object(_encode_rows(cols, rows, cls))
                keys[mask] = key_arr[rows]
            mask = src == 2
            if mask.any():
                rows = idx[mask]
                values[mask] = mal_vals[rows]
                keys[mask] = mal_keys[rows]
                topic[mask] = mal_topic[rows]
            yield (
                kind_names[topic].tolist(),
                keys.tolist(),
                values.tolist(),
                plan.timestamp[sel].tolist(),
            )

    def records(self, block: int = 65_536) -> Iterator[tuple[str, bytes, bytes, int]]:
        """(topic kind, key, value, Kafka timestamp ms) in replay order, injections included."""
        for kinds, keys, values, ts in self.record_blocks(block):
            yield from zip(kinds, keys, values, ts)

    def encoded(self, kind: str, block: int = 65_536) -> Iterator[list[bytes]]:
        """The clean events of one table, encoded, in blocks (table order)."""
        imp_cols, _, clk_cols, _ = self._encoding_columns()
        cols, cls, n = (
            (imp_cols, Impression, self.impressions.num_rows)
            if kind == "impressions"
            else (clk_cols, Click, self.clicks.num_rows)
        )
        for lo in range(0, n, block):
            yield _encode_rows(cols, np.arange(lo, min(n, lo + block)), cls)

    def _encoding_columns(self):
        if self._enc_cols is None:

            def cols(table: pa.Table, fields):
                out = []
                for f in fields:
                    col = table.column(f).combine_chunks()
                    out.append(col if f in _STRING_FIELDS else col.to_numpy())
                return out

            imp_keys = np.array(
                self.impressions.column("impression_id")
                .combine_chunks()
                .cast(pa.binary())
                .to_pylist()
                + [b""],
                dtype=object,
            )[:-1]
            clk_keys = np.array(
                self.clicks.column("impression_id").combine_chunks().cast(pa.binary()).to_pylist()
                + [b""],
                dtype=object,
            )[:-1]
            self._enc_cols = (
                cols(self.impressions, IMPRESSION_FIELDS),
                imp_keys,
                cols(self.clicks, CLICK_FIELDS),
                clk_keys,
            )
        return self._enc_cols


def _as_object(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _encode_rows(cols: list, rows: np.ndarray, cls) -> list[bytes]:
    """msgspec-encode the given rows of a table (columns pre-extracted), without a Python loop."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        lists = [
            c[lo:hi].to_pylist() if isinstance(c, pa.Array) else c[lo:hi].tolist() for c in cols
        ]
    else:
        idx = pa.array(rows)
        lists = [
            c.take(idx).to_pylist() if isinstance(c, pa.Array) else c[rows].tolist() for c in cols
        ]
    return list(map(_ENCODER.encode, map(cls, *lists)))


# --------------------------------------------------------------------------- generation


def generate(scenario: Scenario) -> Traffic:
    """Generate the traffic of a scenario (deterministic per scenario, seed included)."""
    sc = scenario.validate()
    rng = np.random.default_rng([sc.seed, 0xC7])
    mk = _market(sc, rng)
    n = sc.events
    span = sc.span_ms

    t = _event_times(sc, rng, n)  # offsets from start, sorted
    user = _categorical(rng, mk.user_p, n)
    site = _categorical(rng, mk.site_p, n)
    pw = np.asarray(sc.position_weights, dtype=np.float64)
    position = _sample_cdf(np.cumsum(pw) / pw.sum(), rng.random(n))
    device = np.where(
        rng.random(n) < 0.85,
        mk.user_device[user],
        _sample_cdf(np.cumsum(DEVICE_WEIGHTS) / DEVICE_WEIGHTS.sum(), rng.random(n)),
    )
    country = mk.user_country[user]
    retarget = rng.random(n) < sc.retarget_rate
    slot = rng.integers(0, 3, n)
    ad = np.where(retarget, mk.user_retarget[user, slot], _sample_cdf(mk.ad_cdf, rng.random(n)))
    campaign = mk.ad_campaign[ad]
    advertiser = mk.campaign_advertiser[campaign]
    category = mk.ad_category[ad]
    abs_t = t + sc.start_ms
    hour = (abs_t // 3_600_000) % 24

    # ---- the hidden logit
    x = (
        mk.user_eff[user]
        + mk.ad_eff[ad]
        + mk.site_eff[site]
        + np.asarray(sc.position_logit)[position]
        + DEVICE_LOGIT[device]
        + mk.country_eff[country]
        + sc.hour_amplitude * np.cos(2 * np.pi * (hour - 21) / 24.0)
    )
    match = (mk.user_interest[user, 0] == category) | (mk.user_interest[user, 1] == category)
    x += sc.interest_logit * match
    x += np.einsum("ij,ij->i", mk.site_latent[site], mk.cat_latent[category])
    hot, n_episodes = _heat(sc, rng, ad, t)
    x += sc.heat_logit * hot
    fw = int(sc.fatigue_window_s * 1000)
    n_user_ad = _recent_counts(user.astype(np.int64) * sc.n_ads + ad, t, fw, span)
    n_user_adv = _recent_counts(user.astype(np.int64) * sc.n_advertisers + advertiser, t, fw, span)
    x -= sc.fatigue_ad * np.log1p(n_user_ad) + sc.fatigue_advertiser * np.log1p(n_user_adv)
    b0 = _solve_intercept(x, sc.base_ctr)
    logit = x + b0

    drift_campaign, drift_time = None, None
    if sc.drift_logit != 0:
        drift_campaign = (
            int(sc.drift_campaign)
            if sc.drift_campaign is not None
            else int(np.argmax(np.bincount(campaign, minlength=sc.n_campaigns)))
        )
        drift_time = int(sc.start_ms + round(sc.drift_at * span))
        logit += sc.drift_logit * ((campaign == drift_campaign) & (abs_t >= drift_time))

    # ---- clicks, minute by minute (the trending term depends on earlier clicks)
    u_click = rng.random(n)
    delay = _click_delays_ms(sc, rng, n)
    p = _simulate_clicks(sc, mk, ad, t, logit, u_click, delay, b0)
    clicked = np.flatnonzero(u_click < p)
    click_t = abs_t[clicked] + delay[clicked]
    o = np.argsort(click_t, kind="stable")
    clicked, click_t = clicked[o], click_t[o]

    # ---- tables
    imp_ids = _ids(f"i{sc.seed}-", np.arange(n))
    imps = pa.Table.from_arrays(
        [
            pa.array(np.full(n, SCHEMA_VERSION, dtype=np.int64)),
            imp_ids,
            pa.array(abs_t),
            pa.array(user.astype(np.int64)),
            pa.array(ad.astype(np.int64)),
            pa.array(campaign.astype(np.int64)),
            pa.array(advertiser.astype(np.int64)),
            pa.array(site.astype(np.int64)),
            pa.array(category.astype(np.int64)),
            _dict_strings(device, DEVICES),
            _dict_strings(country, COUNTRIES),
            pa.array(position.astype(np.int64)),
        ],
        schema=IMPRESSION_SCHEMA,
    )
    m = len(clicked)
    ci = pa.array(clicked)
    clicks = pa.Table.from_arrays(
        [
            pa.array(np.full(m, SCHEMA_VERSION, dtype=np.int64)),
            _ids(f"c{sc.seed}-", clicked),
            imp_ids.take(ci),
            pa.array(click_t),
            *[
                imps.column(f).combine_chunks().take(ci)
                for f in (
                    "user_id",
                    "ad_id",
                    "campaign_id",
                    "advertiser_id",
                    "site_id",
                    "ad_category",
                )
            ],
        ],
        schema=CLICK_SCHEMA,
    )
    oracle = pa.Table.from_arrays([imp_ids, pa.array(p)], schema=ORACLE_SCHEMA)
    meta = {
        "intercept": b0,
        "heat_episodes": n_episodes,
        "impressions": n,
        "clicks": m,
        "mean_p_click": float(p.mean()),
        "realized_ctr": m / n,
        "late_clicks": int((delay[clicked] > sc.attribution_window_s * 1000).sum()),
        "drift_campaign": drift_campaign,
        "drift_time_ms": drift_time,
        "mean_fatigue_ad_count": float(n_user_ad.mean()),
        "hot_share": float(hot.mean()),
        "start_ms": sc.start_ms,
        "end_ms": sc.end_ms,
    }
    tr = Traffic(sc, imps, clicks, oracle, meta)
    with np.errstate(divide="ignore"):
        trend = np.log(p) - np.log1p(-p) - logit
    tr.truth = dict(
        logit=logit + trend,
        intercept=b0,
        user=mk.user_eff[user],
        ad=mk.ad_eff[ad],
        site=mk.site_eff[site],
        heat=sc.heat_logit * hot,
        interest=sc.interest_logit * match.astype(np.float64),
        site_category=np.einsum("ij,ij->i", mk.site_latent[site], mk.cat_latent[category]),
        fatigue=-(
            sc.fatigue_ad * np.log1p(n_user_ad) + sc.fatigue_advertiser * np.log1p(n_user_adv)
        ),
        trend=trend,
    )
    return tr


def _simulate_clicks(sc: Scenario, mk: _Market, ad, t, logit, u_click, delay, b0) -> np.ndarray:
    n, n_ads = len(ad), sc.n_ads
    n_min = -(-sc.span_ms // MINUTE_MS)
    minute = t // MINUTE_MS
    bounds = np.searchsorted(minute, np.arange(n_min + 1))
    click_minute = (t + delay) // MINUTE_MS
    # the ad's expected CTR without the trend term: both rates are smoothed towards it
    base_p = _sigmoid(logit)
    n_per_ad = np.bincount(ad, minlength=n_ads)
    prior = np.where(
        n_per_ad > 0,
        np.bincount(ad, weights=base_p, minlength=n_ads) / np.maximum(n_per_ad, 1),
        _sigmoid(b0 + mk.ad_eff),
    )
    win = max(1, int(round(sc.trend_window_s / 60.0)))
    win_i = np.zeros(n_ads)
    win_c = np.zeros(n_ads)
    cum_i = np.zeros(n_ads)
    cum_c = np.zeros(n_ads)
    pending: dict[int, list[np.ndarray]] = {}
    landed: dict[int, np.ndarray] = {}
    empty = np.zeros(0, dtype=ad.dtype)
    p = np.empty(n)
    strength = sc.trend_strength
    for k in range(n_min):
        if k >= 1:  # minute k-1 is complete: count its impressions and the clicks that landed in it
            ai = ad[bounds[k - 1] : bounds[k]]
            parts = pending.pop(k - 1, None)
            ac = np.concatenate(parts) if parts else empty
            landed[k - 1] = ac
            np.add.at(win_i, ai, 1.0)
            np.add.at(cum_i, ai, 1.0)
            np.add.at(win_c, ac, 1.0)
            np.add.at(cum_c, ac, 1.0)
            old = k - 1 - win
            if old >= 0:
                np.subtract.at(win_i, ad[bounds[old] : bounds[old + 1]], 1.0)
                np.subtract.at(win_c, landed.pop(old), 1.0)
        lo, hi = bounds[k], bounds[k + 1]
        if lo == hi:
            continue
        a = ad[lo:hi]
        if strength != 0:
            m = prior[a]
            recent = (win_c[a] + _TREND_PRIOR_RECENT * m) / (win_i[a] + _TREND_PRIOR_RECENT)
            long_run = (cum_c[a] + _TREND_PRIOR_LONG * m) / (cum_i[a] + _TREND_PRIOR_LONG)
            trend = strength * np.clip(np.log(recent / long_run), -1.0, 1.0)
            pk = _sigmoid(logit[lo:hi] + trend)
        else:
            pk = _sigmoid(logit[lo:hi])
        p[lo:hi] = pk
        hit = np.flatnonzero(u_click[lo:hi] < pk)
        if len(hit):
            cm = click_minute[lo:hi][hit]
            ca = a[hit]
            keep = cm < n_min
            cm, ca = cm[keep], ca[keep]
            if len(cm):
                o = np.argsort(cm, kind="stable")
                cm, ca = cm[o], ca[o]
                starts = np.flatnonzero(np.concatenate(([True], cm[1:] != cm[:-1])))
                for s, e in zip(starts, np.append(starts[1:], len(cm))):
                    pending.setdefault(int(cm[s]), []).append(ca[s:e])
    return p


# --------------------------------------------------------------------------- dirty injections


@dataclass
class _Plan:
    order: np.ndarray  # positions into the concatenated record arrays, in replay order
    src_kind: np.ndarray  # 0 impression row, 1 click row, 2 malformed row
    src_idx: np.ndarray
    timestamp: np.ndarray  # Kafka record timestamp (event time; arrival time for malformed)
    injected: dict
    malformed: pa.Table = field(default_factory=lambda: MALFORMED_SCHEMA.empty_table())


def _make_plan(tr: Traffic) -> _Plan:
    sc = tr.scenario
    n_i, n_c = tr.impressions.num_rows, tr.clicks.num_rows
    imp_t = tr.impressions.column("event_time_ms").to_numpy()
    clk_t = tr.clicks.column("event_time_ms").to_numpy()
    src_kind = [np.zeros(n_i, np.int8), np.ones(n_c, np.int8)]
    src_idx = [np.arange(n_i), np.arange(n_c)]
    ts = [imp_t, clk_t]
    pos = [imp_t, clk_t]
    counts = {"duplicates": 0, "out_of_order": 0, "late": 0}
    by_topic = {
        k: {"clean": n, "duplicates": 0, "out_of_order": 0, "late": 0, "malformed": 0}
        for k, n in zip(TOPIC_KINDS, (n_i, n_c))
    }
    mal_counts = {k: 0 for k in MALFORMED_KINDS}
    malformed = MALFORMED_SCHEMA.empty_table()
    n_clean = n_i + n_c
    dirty = sc.duplicate_rate or sc.out_of_order_rate or sc.late_event_rate or sc.malformed_rate
    if dirty and n_clean:
        rng = np.random.default_rng([sc.seed, 0xD1])
        all_t = np.concatenate([imp_t, clk_t])
        t_lo, t_hi = int(all_t.min()), int(all_t.max())
        clicked = pc.is_in(
            tr.impressions.column("impression_id"),
            value_set=tr.clicks.column("impression_id").combine_chunks(),
        ).to_numpy(zero_copy_only=False)
        # candidates: records that are the last event of their key (order per key is kept)
        cand = np.concatenate([np.flatnonzero(~clicked), n_i + np.arange(n_c)])
        cand = cand[rng.permutation(len(cand))]
        lateness = int(sc.allowed_lateness_s * 1000)
        late_disp = lateness + rng.integers(60_000, 600_000, len(cand))
        late_ok = all_t[cand] + late_disp + 60_000 <= t_hi
        n_late = min(int(round(sc.late_event_rate * n_clean)), int(late_ok.sum()))
        late_sel = cand[late_ok][:n_late]
        late_d = late_disp[late_ok][:n_late]
        rest = cand[~np.isin(cand, late_sel)]
        n_ooo = min(int(round(sc.out_of_order_rate * n_clean)), len(rest))
        ooo_sel = rest[:n_ooo]
        ooo_d = rng.integers(1_000, int(sc.out_of_order_max_s * 1000) + 1, n_ooo)
        n_dup = min(int(round(sc.duplicate_rate * n_clean)), len(rest) - n_ooo)
        dup_sel = rest[n_ooo : n_ooo + n_dup]
        dup_d = rng.integers(1, 2_001, n_dup)
        disp = np.zeros(n_clean, dtype=np.int64)
        disp[late_sel] = late_d
        disp[ooo_sel] = ooo_d
        pos = [imp_t + disp[:n_i], clk_t + disp[n_i:]]
        for name, sel in (("late", late_sel), ("out_of_order", ooo_sel), ("duplicates", dup_sel)):
            counts[name] = len(sel)
            by_topic["impressions"][name] = int((sel < n_i).sum())
            by_topic["clicks"][name] = int((sel >= n_i).sum())
        # duplicates: exact copies, shortly after the original
        dup_kind = (dup_sel >= n_i).astype(np.int8)
        dup_idx = np.where(dup_kind == 1, dup_sel - n_i, dup_sel)
        src_kind.append(dup_kind)
        src_idx.append(dup_idx)
        ts.append(all_t[dup_sel])
        pos.append(all_t[dup_sel] + dup_d)
        # malformed records
        malformed = _malformed(tr, sc, rng, n_clean, t_lo, t_hi)
        for k in MALFORMED_KINDS:
            mal_counts[k] = int(pc.sum(pc.equal(malformed["kind"], k)).as_py() or 0)
        for tk in TOPIC_KINDS:
            by_topic[tk]["malformed"] = int(pc.sum(pc.equal(malformed["topic"], tk)).as_py() or 0)
        nm = malformed.num_rows
        mts = malformed["timestamp_ms"].to_numpy()
        src_kind.append(np.full(nm, 2, np.int8))
        src_idx.append(np.arange(nm))
        ts.append(mts)
        pos.append(mts)
    src_kind_a = np.concatenate(src_kind)
    src_idx_a = np.concatenate(src_idx).astype(np.int64)
    ts_a = np.concatenate(ts).astype(np.int64)
    pos_a = np.concatenate(pos).astype(np.int64)
    order = np.lexsort((np.arange(len(pos_a)), pos_a))
    for tk in TOPIC_KINDS:
        b = by_topic[tk]
        b["records"] = b["clean"] + b["duplicates"] + b["malformed"]
    injected = {
        **counts,
        "malformed": mal_counts,
        "malformed_total": sum(mal_counts.values()),
        "by_topic": by_topic,
        "records": int(len(order)),
    }
    return _Plan(
        order=order,
        src_kind=src_kind_a,
        src_idx=src_idx_a,
        timestamp=ts_a,
        injected=injected,
        malformed=malformed,
    )


_INT_FIELDS_IMP = [
    f for f in IMPRESSION_FIELDS if f not in _STRING_FIELDS and f != "schema_version"
]
_INT_FIELDS_CLK = [f for f in CLICK_FIELDS if f not in _STRING_FIELDS and f != "schema_version"]


def _malformed(tr: Traffic, sc: Scenario, rng, n_clean: int, t_lo: int, t_hi: int) -> pa.Table:
    per_kind = int(round(sc.malformed_rate * n_clean))
    rows: dict[str, list] = {k: [] for k in MALFORMED_SCHEMA.names}
    imp_cols, _, clk_cols, _ = tr._encoding_columns()
    n_i, n_c = tr.impressions.num_rows, tr.clicks.num_rows
    for kind in MALFORMED_KINDS:
        for j in range(per_kind):
            topic = 1 if (n_c and rng.random() < 0.5) else 0
            if topic == 0:
                src = _encode_rows(imp_cols, np.array([rng.integers(0, n_i)]), Impression)[0]
                ints, pad_field = _INT_FIELDS_IMP, "country"
            else:
                src = _encode_rows(clk_cols, np.array([rng.integers(0, n_c)]), Click)[0]
                ints, pad_field = _INT_FIELDS_CLK, "click_id"
            doc = msgspec.json.decode(src)
            if kind == "bad_json":
                value = src[: int(rng.integers(1, len(src) - 1))]
            elif kind == "wrong_type":
                f = ints[int(rng.integers(0, len(ints)))]
                doc[f] = str(doc[f])
                value = msgspec.json.encode(doc)
            elif kind == "missing_field":
                f = list(doc)[int(rng.integers(1, len(doc)))]
                del doc[f]
                value = msgspec.json.encode(doc)
            else:  # oversized: schema-valid, only too big
                doc[pad_field] = doc[pad_field] + "x" * (
                    MAX_EVENT_BYTES + int(rng.integers(1, 512))
                )
                value = msgspec.json.encode(doc)
            rows["key"].append(f"malformed-{kind}-{j}")
            rows["topic"].append(TOPIC_KINDS[topic])
            rows["kind"].append(kind)
            rows["reason"].append(EXPECTED_REASON[kind])
            rows["timestamp_ms"].append(int(rng.integers(t_lo, t_hi + 1)))
            rows["value"].append(value)
    return pa.Table.from_pydict(rows, schema=MALFORMED_SCHEMA)


# --------------------------------------------------------------------------- files


def write_traffic(tr: Traffic, out_dir, jsonl: bool = False) -> Path:
    """Write impressions/clicks/oracle Parquet, scenario.json (scenario, meta, injected) and,
    when there are any, malformed.parquet; with ``jsonl`` also the clean events as JSONL."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = dict(compression="zstd", use_dictionary=True)
    pq.write_table(tr.impressions, out / "impressions.parquet", **opts)
    pq.write_table(tr.clicks, out / "clicks.parquet", **opts)
    pq.write_table(tr.oracle, out / "oracle.parquet", **opts)
    if tr.malformed.num_rows:
        pq.write_table(tr.malformed, out / "malformed.parquet", **opts)
    doc = {"format": 1, "scenario": tr.scenario.to_dict(), "meta": tr.meta, "injected": tr.injected}
    (out / "scenario.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if jsonl:
        for kind in TOPIC_KINDS:
            with open(out / f"{kind}.jsonl", "wb") as fh:
                for blk in tr.encoded(kind):
                    fh.write(b"\n".join(blk) + (b"\n" if blk else b""))
    return out


def read_traffic(out_dir) -> Traffic:
    """Read what :func:`write_traffic` wrote. The replay plan (dirty injections included) is
    recomputed from the tables and the scenario, so ``records()`` is identical."""
    d = Path(out_dir)
    missing = [f for f in ("impressions.parquet", "clicks.parquet") if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"{d} has no {', '.join(missing)}: not a traffic directory "
            "(write one with `ctrstream generate --out DIR`)"
        )
    imps = pq.read_table(d / "impressions.parquet").cast(IMPRESSION_SCHEMA)
    clicks = pq.read_table(d / "clicks.parquet").cast(CLICK_SCHEMA)
    oracle = (
        pq.read_table(d / "oracle.parquet").cast(ORACLE_SCHEMA)
        if (d / "oracle.parquet").exists()
        else ORACLE_SCHEMA.empty_table()
    )
    if (d / "scenario.json").exists():
        doc = json.loads((d / "scenario.json").read_text())
        sc = load_scenario(str(d / "scenario.json"))
        meta = doc.get("meta", {})
    else:
        sc = Scenario(name="recorded", events=max(1, imps.num_rows))
        meta = {}
    return Traffic(sc, imps, clicks, oracle, meta)
