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
* drift (scenario ``drift``): ``+ drift_logit`` for one campaign from ``drift_at`` on;
* taste (scenario ``taste_shift``): ``+ taste_logit * z[device, category]``, a centred
  interaction (zero mean per device and per category) redrawn at ``drift_at``
  (:func:`taste_term`).

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

Replay order (:meth:`Traffic.records`; the plan: :mod:`ctrstream.simulation.dirty`)
-----------------------------------------------------------------------------------
Impressions and clicks merged by event time (an impression before a click of the same
millisecond). In the ``dirty`` scenario, records that are the last event of their key
(unclicked impressions and clicks) are duplicated (a copy 1 ms - 2 s later), displaced out of
order (1 s .. ``out_of_order_max_s`` later, within allowed lateness) or made late
(``allowed_lateness_s`` + 1..10 min later), so event-time order per key is preserved; and
malformed records with keys ``malformed-<kind>-<n>`` are inserted (see ``Traffic.malformed``
for each one's expected decode-error reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrstream.events import SCHEMA_VERSION
from ctrstream.simulation.records import (
    CLICK_SCHEMA,
    EXPECTED_REASON,
    IMPRESSION_SCHEMA,
    ORACLE_SCHEMA,
)
from ctrstream.simulation.scenarios import (  # re-exported: __all__
    MALFORMED_KINDS,
    SCENARIOS,
    Scenario,
    load_scenario,
)
from ctrstream.simulation.traffic import Traffic, read_traffic, write_traffic

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

MINUTE_MS = 60_000
DAY_MS = 86_400_000
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


def _heat_episodes(
    sc: Scenario, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hidden trending episodes of the scenario's span: ``(ad, start, end)`` with times as
    offsets from ``sc.start_ms`` (starts in ``[-lead, span)``, lead = 2 median durations)."""
    n_ads, span = sc.n_ads, sc.span_ms
    med = sc.heat_duration_median_s * 1000.0
    mean_dur = med * np.exp(0.5 * 0.5**2)
    lead = 2 * med
    expected = sc.heat_fraction * n_ads * (span + lead) / mean_dur
    k = int(rng.poisson(expected)) if _heat_on(sc) else 0
    if k == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    ep_ad = rng.integers(0, n_ads, k)
    ep_start = (rng.random(k) * (span + lead) - lead).astype(np.int64)
    ep_end = ep_start + (med * np.exp(0.5 * rng.standard_normal(k))).astype(np.int64)
    return ep_ad, ep_start, ep_end


def _heat_on(sc: Scenario) -> bool:
    return sc.heat_fraction > 0 and sc.heat_logit != 0


def _heat_rate_per_ms(sc: Scenario) -> float:
    """Expected episode starts per ms of event time (``heat_fraction`` of the ads hot at once)."""
    med = sc.heat_duration_median_s * 1000.0
    mean_dur = med * np.exp(0.5 * 0.5**2)
    return sc.heat_fraction * sc.n_ads / mean_dur


def _hot(
    ep_ad: np.ndarray, ep_start: np.ndarray, ep_end: np.ndarray, ad: np.ndarray, t: np.ndarray
) -> np.ndarray:
    """Whether each (ad, time) is in a trending episode: the ad's latest episode that started at
    or before ``t`` has not ended (``t < end``). Times on any common scale."""
    if len(ep_ad) == 0 or len(ad) == 0:
        return np.zeros(len(ad), dtype=bool)
    lo = min(int(ep_start.min()), int(t.min()))
    off = np.int64(1 - lo)
    stride = np.int64(max(int(ep_start.max()), int(t.max())) - lo + 2)
    ep_key = ep_ad.astype(np.int64) * stride + (ep_start + off)
    o = np.argsort(ep_key, kind="stable")
    ep_key, ep_ad, ep_end = ep_key[o], ep_ad[o], ep_end[o]
    imp_key = ad.astype(np.int64) * stride + (t + off)
    j = np.searchsorted(ep_key, imp_key, side="right") - 1
    jj = np.maximum(j, 0)
    return (j >= 0) & (ep_ad[jj] == ad) & (t < ep_end[jj])


def _hour_term(sc: Scenario, abs_t: np.ndarray) -> np.ndarray:
    hour = (abs_t // 3_600_000) % 24
    return sc.hour_amplitude * np.cos(2 * np.pi * (hour - 21) / 24.0)


def _interest_match(mk: _Market, user: np.ndarray, category: np.ndarray) -> np.ndarray:
    return (mk.user_interest[user, 0] == category) | (mk.user_interest[user, 1] == category)


def _site_category(mk: _Market, site: np.ndarray, category: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", mk.site_latent[site], mk.cat_latent[category])


def _fatigue_term(sc: Scenario, n_user_ad: np.ndarray, n_user_adv: np.ndarray) -> np.ndarray:
    return sc.fatigue_ad * np.log1p(n_user_ad) + sc.fatigue_advertiser * np.log1p(n_user_adv)


def _base_logit(
    sc: Scenario,
    mk: _Market,
    *,
    user: np.ndarray,
    ad: np.ndarray,
    site: np.ndarray,
    position: np.ndarray,
    device: np.ndarray,
    country: np.ndarray,
    category: np.ndarray,
    abs_t: np.ndarray,
    hot: np.ndarray,
    n_user_ad: np.ndarray,
    n_user_adv: np.ndarray,
) -> np.ndarray:
    """The hidden logit without the intercept, drift and trend: main effects (user, ad, site,
    position, device, country, hour), user interest x ad category, site x category, heat and
    fatigue. The one formula of the truth: the open-loop generator and the closed-loop world
    (:mod:`ctrstream.simulation.world`) both call it."""
    x = (
        mk.user_eff[user]
        + mk.ad_eff[ad]
        + mk.site_eff[site]
        + np.asarray(sc.position_logit)[position]
        + DEVICE_LOGIT[device]
        + mk.country_eff[country]
        + _hour_term(sc, abs_t)
    )
    x += sc.interest_logit * _interest_match(mk, user, category)
    x += _site_category(mk, site, category)
    x += sc.heat_logit * hot
    x -= _fatigue_term(sc, n_user_ad, n_user_adv)
    if sc.taste_logit > 0:
        x += taste_term(sc, device, category, abs_t)
    if sc.ad_walk_sigma_per_day > 0:
        x += _ad_walk(sc, ad, abs_t)
    return x


def taste_shift_time_ms(sc: Scenario) -> int:
    """When the taste interaction is redrawn: ``drift_at`` of the scenario's span."""
    return int(sc.start_ms + round(sc.drift_at * sc.span_ms))


def taste_matrices(sc: Scenario) -> tuple[np.ndarray, np.ndarray]:
    """The taste interaction before and after the shift, each ``(devices, categories)``:
    standard normal draws from their own stream (``[seed, 0x7A57]``, so that the term leaves
    every other draw as is), centred per device and per category (double centring): the
    mean taste of every category and of every device is 0, so the windowed rates of ads,
    campaigns, advertisers and sites do not move when it is redrawn."""
    rng = np.random.default_rng([sc.seed, 0x7A57])
    out = []
    for _ in range(2):
        z = rng.normal(0.0, 1.0, (len(DEVICES), sc.n_categories))
        z = z - z.mean(axis=0, keepdims=True) - z.mean(axis=1, keepdims=True) + z.mean()
        out.append(z)
    return out[0], out[1]


def taste_term(
    sc: Scenario, device: np.ndarray, category: np.ndarray, abs_t: np.ndarray
) -> np.ndarray:
    """``taste_logit * z[device, category]``, ``z`` the matrix before or after the shift at
    each row's time (:func:`taste_matrices`, :func:`taste_shift_time_ms`)."""
    before, after = taste_matrices(sc)
    d = np.asarray(device, dtype=np.int64)
    c = np.asarray(category, dtype=np.int64)
    shifted = np.asarray(abs_t) >= taste_shift_time_ms(sc)
    return sc.taste_logit * np.where(shifted, after[d, c], before[d, c])


def _ad_walk(sc: Scenario, ad: np.ndarray, abs_t: np.ndarray) -> np.ndarray:
    """Each ad's random-walk term at ``abs_t``: Gaussian steps at knots ``ad_walk_step_s``
    apart from ``start_ms`` (0 at the start, std ``ad_walk_sigma_per_day`` after a day),
    linear between knots and constant outside the scenario's span. The steps come from their
    own stream (``[seed, 0xA7]``), so the term is a pure function of (scenario, ad, time)."""
    step_ms = sc.ad_walk_step_s * 1000.0
    n_knots = int(np.ceil(sc.span_ms / step_ms)) + 1
    rng = np.random.default_rng([sc.seed, 0xA7])
    scale = sc.ad_walk_sigma_per_day * np.sqrt(step_ms / DAY_MS)
    steps = rng.normal(0.0, scale, (sc.n_ads, n_knots - 1))
    knots = np.concatenate([np.zeros((sc.n_ads, 1)), np.cumsum(steps, axis=1)], axis=1)
    pos = np.clip((np.asarray(abs_t, dtype=np.float64) - sc.start_ms) / step_ms, 0, n_knots - 1)
    if n_knots == 1:
        return knots[ad, 0]
    k0 = np.minimum(pos.astype(np.int64), n_knots - 2)
    frac = pos - k0
    return knots[ad, k0] * (1.0 - frac) + knots[ad, k0 + 1] * frac


def _drift_mask(
    campaign: np.ndarray, abs_t: np.ndarray, drift_campaign: int | None, drift_time: int | None
) -> np.ndarray:
    """Where the drift term (``+ drift_logit``) applies: the drifting campaign from its time on."""
    if drift_campaign is None or drift_time is None:
        return np.zeros(len(campaign), dtype=bool)
    return (campaign == drift_campaign) & (abs_t >= drift_time)


def _trend_term(
    strength: float,
    prior: np.ndarray,
    win_c: np.ndarray,
    win_i: np.ndarray,
    cum_c: np.ndarray,
    cum_i: np.ndarray,
) -> np.ndarray:
    """``strength * clip(log(recent CTR / long-run CTR), -1, 1)`` from the ad's clicks and
    impressions in the trend window / since the start (arrays gathered per impression), both
    rates smoothed towards the ad's ``prior`` CTR."""
    recent = (win_c + _TREND_PRIOR_RECENT * prior) / (win_i + _TREND_PRIOR_RECENT)
    long_run = (cum_c + _TREND_PRIOR_LONG * prior) / (cum_i + _TREND_PRIOR_LONG)
    return strength * np.clip(np.log(recent / long_run), -1.0, 1.0)


def _ad_prior(n_ads: int, ad: np.ndarray, base_p: np.ndarray, ad_eff: np.ndarray, b0: float):
    """Each ad's expected CTR without the trend term (its mean true p over the traffic; for an
    ad without impressions, ``sigmoid(b0 + ad effect)``): what the trend's rates shrink to."""
    n_per_ad = np.bincount(ad, minlength=n_ads)
    return np.where(
        n_per_ad > 0,
        np.bincount(ad, weights=base_p, minlength=n_ads) / np.maximum(n_per_ad, 1),
        _sigmoid(b0 + ad_eff),
    )


@dataclass
class _OpenLoop:
    """The open-loop traffic's draws and hidden logit, before its clicks are simulated."""

    mk: _Market
    t: np.ndarray  # offsets from start, sorted
    abs_t: np.ndarray
    user: np.ndarray
    site: np.ndarray
    position: np.ndarray
    device: np.ndarray
    country: np.ndarray
    ad: np.ndarray
    campaign: np.ndarray
    advertiser: np.ndarray
    category: np.ndarray
    episodes: tuple[
        np.ndarray, np.ndarray, np.ndarray
    ]  # heat episodes (ad, start, end), offsets from start
    hot: np.ndarray
    match: np.ndarray
    n_user_ad: np.ndarray
    n_user_adv: np.ndarray
    intercept: float
    logit: np.ndarray  # intercept and drift included, trend not
    drift_campaign: int | None
    drift_time: int | None


def _open_loop(sc: Scenario, rng: np.random.Generator) -> _OpenLoop:
    """Draw the market and the impressions and compute their hidden logit (the rng stream of
    :func:`generate` up to the clicks; :class:`ctrstream.simulation.world.World` replays it to
    share the market, the heat episodes, the intercept and the drifting campaign)."""
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

    # ---- the hidden logit
    episodes = _heat_episodes(sc, rng)
    hot = _hot(*episodes, ad, t)
    fw = int(sc.fatigue_window_s * 1000)
    n_user_ad = _recent_counts(user.astype(np.int64) * sc.n_ads + ad, t, fw, span)
    n_user_adv = _recent_counts(user.astype(np.int64) * sc.n_advertisers + advertiser, t, fw, span)
    x = _base_logit(
        sc,
        mk,
        user=user,
        ad=ad,
        site=site,
        position=position,
        device=device,
        country=country,
        category=category,
        abs_t=abs_t,
        hot=hot,
        n_user_ad=n_user_ad,
        n_user_adv=n_user_adv,
    )
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
        logit += sc.drift_logit * _drift_mask(campaign, abs_t, drift_campaign, drift_time)
    return _OpenLoop(
        mk=mk,
        t=t,
        abs_t=abs_t,
        user=user,
        site=site,
        position=position,
        device=device,
        country=country,
        ad=ad,
        campaign=campaign,
        advertiser=advertiser,
        category=category,
        episodes=episodes,
        hot=hot,
        match=_interest_match(mk, user, category),
        n_user_ad=n_user_ad,
        n_user_adv=n_user_adv,
        intercept=b0,
        logit=logit,
        drift_campaign=drift_campaign,
        drift_time=drift_time,
    )


# --------------------------------------------------------------------------- generation


def generate(scenario: Scenario) -> Traffic:
    """Generate the traffic of a scenario (deterministic per scenario, seed included)."""
    sc = scenario.validate()
    rng = np.random.default_rng([sc.seed, 0xC7])
    ol = _open_loop(sc, rng)
    mk, n, t, abs_t, ad = ol.mk, sc.events, ol.t, ol.abs_t, ol.ad
    user, site, position, device, country = ol.user, ol.site, ol.position, ol.device, ol.country
    campaign, advertiser, category = ol.campaign, ol.advertiser, ol.category
    hot, match, n_user_ad, n_user_adv = ol.hot, ol.match, ol.n_user_ad, ol.n_user_adv
    b0, logit, n_episodes = ol.intercept, ol.logit, len(ol.episodes[0])
    drift_campaign, drift_time = ol.drift_campaign, ol.drift_time

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
        site_category=_site_category(mk, site, category),
        fatigue=-_fatigue_term(sc, n_user_ad, n_user_adv),
        trend=trend,
    )
    if sc.ad_walk_sigma_per_day > 0:  # only then: the truth of other scenarios stays as it was
        tr.truth["ad_walk"] = _ad_walk(sc, ad, abs_t)
    if sc.taste_logit > 0:  # likewise
        tr.truth["taste"] = taste_term(sc, device, category, abs_t)
        tr.meta["taste_shift_time_ms"] = taste_shift_time_ms(sc)
    return tr


def _simulate_clicks(sc: Scenario, mk: _Market, ad, t, logit, u_click, delay, b0) -> np.ndarray:
    n, n_ads = len(ad), sc.n_ads
    n_min = -(-sc.span_ms // MINUTE_MS)
    minute = t // MINUTE_MS
    bounds = np.searchsorted(minute, np.arange(n_min + 1))
    click_minute = (t + delay) // MINUTE_MS
    # the ad's expected CTR without the trend term: both rates are smoothed towards it
    prior = _ad_prior(n_ads, ad, _sigmoid(logit), mk.ad_eff, b0)
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
            trend = _trend_term(strength, prior[a], win_c[a], win_i[a], cum_c[a], cum_i[a])
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
