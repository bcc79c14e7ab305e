"""How far from the oracle can a learner get? Decompose the NE gap of a scenario.

The oracle's probabilities use every hidden term of the click model
(``ctrstream.simulation.generator``, whose ``Traffic.truth`` holds each term per impression). This
report replaces one hidden term at a time by the best a learner could know about it and
prints the NE of that "oracle minus a term" on the validation rows ``ctrstream train``
uses (the last 10 % of the labeled event-time span), relative to the oracle's NE:

* user effect - marginalised over its prior N(0, user_sigma^2), and the exact Bayes
  posterior from the user's earlier impressions (every other term known): the most a
  model can learn about a user from their own history;
* heat episodes - marginalised over the share of hot impressions;
* user interest x ad category - marginalised given the ad category and whether the user
  saw the ad/advertiser in the last hour (what user_x_ad / user_x_advertiser windows show);
* trend, fatigue, site x category - dropped (these are learnable from the declared
  windows and ids; dropping them shows how much signal they carry);
* all three hidden per-user/per-episode terms at once: the floor under any model's gap.

Run: ``.venv/bin/python -m ctrstream.bench.ne_gap '{"events": 1000000, "seed": 1}'`` (a JSON object
of scenario overrides; ``"name"`` picks the preset). See docs/training.md.
"""

import sys
import time

import numpy as np

from ctrstream.metrics import entropy, log_loss
from ctrstream.simulation.generator import generate, load_scenario


def sig(x):
    return 1 / (1 + np.exp(-x))


def labels_of(tr):
    n = tr.impressions.num_rows
    ids = np.array(
        [int(s.split("-")[1]) for s in tr.clicks.column("impression_id").to_pylist()],
        dtype=np.int64,
    )
    ct = tr.clicks.column("event_time_ms").to_numpy()
    it = tr.impressions.column("event_time_ms").to_numpy()
    ok = ct - it[ids] <= tr.scenario.attribution_window_s * 1000
    y = np.zeros(n, np.int8)
    y[ids[ok]] = 1
    return y, it


def truth_of(tr) -> dict:
    """The per-impression terms of the hidden logit (``Traffic.truth``, set by ``generate``)."""
    if tr.truth is None:
        raise ValueError("this traffic carries no truth: generate() it, do not read it from disk")
    return tr.truth


def user_posterior_p(tr, y, grid=41):
    """p with the user effect replaced by its posterior from the user's earlier impressions
    (every other component known)."""
    T = truth_of(tr)
    sc = tr.scenario
    l_wo = T["logit"] - T["user"]
    g = (
        np.linspace(-4 * sc.user_sigma, 4 * sc.user_sigma, grid)
        if sc.user_sigma > 0
        else np.zeros(1)
    )
    lw = -0.5 * (g / max(sc.user_sigma, 1e-9)) ** 2
    user = tr.impressions.column("user_id").to_numpy()
    it = tr.impressions.column("event_time_ms").to_numpy()
    order = np.lexsort((it, user))
    u_s = user[order]
    first = np.r_[True, u_s[1:] != u_s[:-1]]
    pg = sig(l_wo[order, None] + g[None, :])  # (n, grid)
    ys = y[order, None]
    ll = ys * np.log(pg) + (1 - ys) * np.log1p(-pg)
    cum = np.cumsum(ll, axis=0)
    excl = cum - ll
    grp_start = np.maximum.accumulate(np.where(first, np.arange(len(u_s)), 0))
    prior_ll = excl - excl[grp_start]
    w = prior_ll + lw[None, :]
    w -= w.max(axis=1, keepdims=True)
    w = np.exp(w)
    w /= w.sum(axis=1, keepdims=True)
    p_s = (w * pg).sum(axis=1)
    p = np.empty_like(p_s)
    p[order] = p_s
    return p


def marg(logit, sigma, k=21):
    # E over N(0, sigma^2) of sig(logit + u) by Gauss-Hermite
    x, wts = np.polynomial.hermite_e.hermegauss(k)
    wts = wts / wts.sum()
    return (sig(logit[:, None] + sigma * x[None, :]) * wts[None, :]).sum(1)


def report(sc):
    t0 = time.time()
    tr = generate(sc)
    T = truth_of(tr)
    y, it = labels_of(tr)
    n = len(y)
    t1 = it.max() - sc.attribution_window_s * 1000
    lab = it <= t1
    lo = it.min()
    cut = lo + (t1 - lo) * 0.9
    v = lab & (it >= cut)
    H = entropy(y[v].mean())

    def ne(p):
        return log_loss(p[v], y[v]) / H

    L = T["logit"]
    p_or = sig(L)
    res = {}
    res["oracle"] = ne(p_or)
    res["- user effect (marginalised over prior)"] = ne(marg(L - T["user"], sc.user_sigma))
    res["- user effect (posterior from earlier imps)"] = ne(user_posterior_p(tr, y))
    hs = (T["heat"] != 0).mean()
    lh = L - T["heat"]
    res[f"- heat (marginalised, P(hot)={hs:.3f})"] = ne(
        (1 - hs) * sig(lh) + hs * sig(lh + sc.heat_logit)
    )
    res["- trend term (dropped)"] = ne(sig(L - T["trend"]))
    res["- fatigue (dropped)"] = ne(sig(L - T["fatigue"]))
    res["- interest (dropped)"] = ne(sig(L - T["interest"]))
    res["- site x category (dropped)"] = ne(sig(L - T["site_category"]))
    l2 = L - T["user"] - T["heat"]
    pm = (1 - hs) * marg(l2, sc.user_sigma) + hs * marg(l2 + sc.heat_logit, sc.user_sigma)
    res["- user and heat (marginalised)"] = ne(pm)
    # interest marginalised given observables: P(match | category, recent user x ad/adv exposure)
    cat = tr.impressions.column("ad_category").to_numpy()
    grp = cat * 2 + (T["fatigue"] != 0)
    match = (T["interest"] != 0).astype(float)
    q = (
        np.bincount(grp, match, minlength=grp.max() + 1)
        / np.maximum(np.bincount(grp, minlength=grp.max() + 1), 1)
    )[grp]
    li = L - T["interest"]
    res["- interest (marginalised | category, exposure)"] = ne(
        (1 - q) * sig(li) + q * sig(li + sc.interest_logit)
    )
    l3 = L - T["user"] - T["heat"] - T["interest"]
    pm3 = sum(
        wi * marg(l3 + dh + di, sc.user_sigma)
        for wi, dh, di in (
            ((1 - hs) * (1 - q), 0, 0),
            (hs * (1 - q), sc.heat_logit, 0),
            ((1 - hs) * q, 0, sc.interest_logit),
            (hs * q, sc.heat_logit, sc.interest_logit),
        )
    )
    res["- user, heat, interest (all marginalised)"] = ne(pm3)
    # users' history
    user = tr.impressions.column("user_id").to_numpy()
    order = np.lexsort((it, user))
    us = user[order]
    first = np.r_[True, us[1:] != us[:-1]]
    idx = np.arange(n)
    gs = np.maximum.accumulate(np.where(first, idx, 0))
    prev = np.empty(n, np.int64)
    prev[order] = idx - gs
    print(
        f"{sc.name} events={sc.events} hours={sc.hours} n_users={sc.n_users} user_sigma={sc.user_sigma}  val rows={v.sum()} ctr={y[v].mean():.4f} gen {time.time() - t0:.0f}s"
    )
    print(
        f"  val rows: median earlier imps of the user {np.median(prev[v]):.0f}, share with 0: {(prev[v] == 0).mean():.3f}, <5: {(prev[v] < 5).mean():.3f}"
    )
    print_ne(res, 50)
    return res


def print_ne(res: dict, width: int) -> None:
    """One line per predictor: its NE and its gap to the oracle's (``res["oracle"]``)."""
    for k, x in res.items():
        print(f"  {k:{width}s} NE {x:.4f}  ({x / res['oracle'] - 1:+.2%} vs oracle)")


def main(report_fn) -> None:
    """``python -m bench.X '{"events": ..., "seed": ..., "name": "steady", ...}'``."""
    import json

    kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    report_fn(load_scenario(kw.pop("name", "steady"), **kw))


if __name__ == "__main__":
    main(report)
