"""How close to the oracle can a learner get on the rows ``ctrstream train`` evaluates?

``bench/ne_gap.py`` treats the ad, site and site x category terms of the click model as
learnable and removes only the per-user / per-episode terms. But those terms are learnable
only as well as the training rows determine them: an ad with 300 impressions has about 6
clicks. This report builds the rows exactly as ``ctrstream train`` does (point-in-time
training set, 1 h warm-up, last 10 % of event time = validation) and scores the validation
rows with predictors that know the click model's *form* and every other term, but have to
*estimate* one group of terms from the training rows:

* ad effect - per ad, the MAP under its true prior N(0, ad_sigma^2), all else known;
* site effect - the same per site;
* site effect + site x category - per site, the MAP of the site effect and its 3 latent
  factors (the category factors are given, which a learner would also have to estimate);
* user + heat + interest marginalised, as in ``bench/ne_gap.py`` (not learnable);
* all of the above at once: an estimate of the floor under any model's NE gap. It is
  optimistic where the form is given (the category factors, the trend and fatigue terms are
  exact) and pessimistic where the model has more (windows keep counting after the split;
  recent ad windows reveal heat episodes).

Run: ``.venv/bin/python -m ctrstream.bench.ne_floor '{"events": 500000, "seed": 1}'`` (scenario
overrides as JSON; ``"name"`` picks the preset; about 10 s at 500k, 20 s at 1M).
See docs/training.md.
"""

from __future__ import annotations

import numpy as np

from ctrstream.batch.pipeline import drop_warmup
from ctrstream.batch.point_in_time import training_set
from ctrstream.bench.ne_gap import main, marg, print_ne, sig, truth_of
from ctrstream.metrics import entropy, log_loss
from ctrstream.models.training import time_split
from ctrstream.simulation.generator import _market, generate


def map_fit(key, X, offset, y, prior_var, fit_rows, iters: int = 25) -> np.ndarray:
    """Per ``key``: the MAP ``w`` of ``logit = offset + X w`` with prior N(0, diag(prior_var)),
    fitted on ``fit_rows`` by Newton's method; returns ``X w`` for every row (0 for keys
    without a fitted row)."""
    k = X.shape[1]
    uk, inv = np.unique(key, return_inverse=True)
    W = np.zeros((len(uk), k))
    P = np.diag(1.0 / np.asarray(prior_var, dtype=np.float64))
    g, Xi, oi, yi = inv[fit_rows], X[fit_rows], offset[fit_rows], y[fit_rows]
    for _ in range(iters):
        p = sig(oi + np.einsum("ij,ij->i", Xi, W[g]))
        grad = np.zeros_like(W)
        np.add.at(grad, g, Xi * (yi - p)[:, None])
        grad -= W @ P
        H = np.zeros((len(uk), k, k))
        np.add.at(H, g, (p * (1 - p))[:, None, None] * Xi[:, :, None] * Xi[:, None, :])
        H += P
        W += np.linalg.solve(H, grad[:, :, None])[:, :, 0]
    return np.einsum("ij,ij->i", X, W[inv])


def report(sc, warmup_hours: float = 1.0, val_fraction: float = 0.1) -> dict:
    tr = generate(sc)
    T = truth_of(tr)
    ds = training_set(tr, None, None, int(sc.attribution_window_s * 1000))
    ds = drop_warmup(ds, int(warmup_hours * 3_600_000))
    row = np.array([int(s.split("-")[1]) for s in ds["impression_id"]])  # generator index
    y = ds["label"].astype(np.float64)
    fit, val, _ = time_split(ds["event_time_ms"], val_fraction)
    H = entropy(y[val].mean())

    def ne(p):
        return log_loss(p[val], y[val]) / H

    def term(k):
        return np.asarray(T[k])[row]

    L = term("logit")
    col = lambda f: tr.impressions.column(f).to_numpy()[row]  # noqa: E731 - a one-line column getter next to its three uses
    ad, site, cat = col("ad_id"), col("site_id"), col("ad_category")
    mk = _market(sc, np.random.default_rng([sc.seed, 0xC7]))  # generate()'s first draws
    cat_f = mk.cat_latent[cat]
    assert np.allclose(np.einsum("ij,ij->i", mk.site_latent[site], cat_f), term("site_category"))
    ones = np.ones((len(y), 1))

    res = {"oracle": ne(sig(L))}
    off_ad = L - term("ad")
    est_ad = map_fit(ad, ones, off_ad, y, [sc.ad_sigma**2], fit)
    res["ad effect estimated (MAP)"] = ne(sig(off_ad + est_ad))
    off_site = L - term("site")
    res["site effect estimated (MAP)"] = ne(
        sig(off_site + map_fit(site, ones, off_site, y, [sc.site_sigma**2], fit))
    )
    off_sc = L - term("site") - term("site_category")
    est_sc = map_fit(
        site,
        np.column_stack([ones, cat_f]),
        off_sc,
        y,
        [sc.site_sigma**2] + [1.0] * cat_f.shape[1],
        fit,
    )
    res["site + site x category estimated (MAP)"] = ne(sig(off_sc + est_sc))

    # user, heat, interest marginalised (as bench/ne_gap.py), optionally with the estimates
    hs = (term("heat") != 0).mean()
    grp = cat * 2 + (term("fatigue") != 0)
    match = (term("interest") != 0).astype(np.float64)
    q = (np.bincount(grp, match) / np.maximum(np.bincount(grp), 1))[grp]

    def marginalised(l3):
        return sum(
            w * marg(l3 + dh + di, sc.user_sigma)
            for w, dh, di in (
                ((1 - hs) * (1 - q), 0, 0),
                (hs * (1 - q), sc.heat_logit, 0),
                ((1 - hs) * q, 0, sc.interest_logit),
                (hs * q, sc.heat_logit, sc.interest_logit),
            )
        )

    l3 = L - term("user") - term("heat") - term("interest")
    res["user + heat + interest marginalised"] = ne(marginalised(l3))
    res["all: marginalised + ad, site, site x category estimated"] = ne(
        marginalised(l3 - term("ad") + est_ad - term("site") - term("site_category") + est_sc)
    )
    print(
        f"{sc.name} events={sc.events} seed={sc.seed}: validation {len(val):,} rows, "
        f"{int(y[val].sum())} clicks (the rows and split of `ctrstream train`)"
    )
    print_ne(res, 56)
    return res


if __name__ == "__main__":
    main(report)
