"""Small impression and click tables for the batch layer's tests (unit and integration):
ties, repeat clicks, same-millisecond clicks, clicks beyond the attribution window and
exact duplicates. Importable by every test module (``tests/`` is on the path: its
``conftest.py`` lives there)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrstream import features as F
from ctrstream.batch.archive import conform

T0 = 1_700_000_000_000
W = 1_800_000


def make_traffic(
    n_imps=800,
    seed=0,
    start_ms=T0,
    span_ms=9 * F.DAY_MS,
    n_users=12,
    n_ads=8,
    ctr=0.2,
    dup_frac=0.03,
):
    """Small impressions/clicks tables with ties, repeat clicks, same-ms clicks, clicks beyond
    the attribution window and exact duplicates (re-delivery)."""
    rng = np.random.default_rng(seed)
    t = start_ms + rng.integers(0, span_ms, n_imps)
    t[1::40] = t[0::40][: len(t[1::40])]  # exact-time ties
    ad = rng.integers(0, n_ads, n_imps)
    imps = {
        "schema_version": np.ones(n_imps, dtype=np.int64),
        "impression_id": np.array([f"i{seed}-{k}" for k in range(n_imps)], dtype=object),
        "event_time_ms": t,
        "user_id": rng.integers(0, n_users, n_imps),
        "ad_id": ad,
        "campaign_id": ad // 2,
        "advertiser_id": ad // 4,
        "site_id": rng.integers(0, 4, n_imps),
        "ad_category": ad % 3,
        "device_type": rng.choice(["mobile", "desktop"], n_imps).astype(object),
        "country": rng.choice(["US", "DE"], n_imps).astype(object),
        "position": rng.integers(0, 3, n_imps),
    }
    clicked = np.flatnonzero(rng.random(n_imps) < ctr)
    delay = rng.integers(0, 2 * W, len(clicked))  # about half beyond the attribution window
    delay[::7] = 0  # clicked in the same millisecond
    clk = {
        "schema_version": np.ones(len(clicked), dtype=np.int64),
        "click_id": np.array([f"c{seed}-{k}" for k in range(len(clicked))], dtype=object),
        "impression_id": imps["impression_id"][clicked],
        "event_time_ms": t[clicked] + delay,
    }
    for f in ("user_id", "ad_id", "campaign_id", "advertiser_id", "site_id", "ad_category"):
        clk[f] = imps[f][clicked]
    # the open-loop fields; conform gives the optional ones (request_id, arm, price) defaults
    it = conform("impressions", pa.table(imps))
    ct = conform("clicks", pa.table(clk))
    again = ct.take(np.arange(0, ct.num_rows, 4))  # a second click on the same impression
    again = again.set_column(
        1, "click_id", pa.array([f"d{seed}-{k}" for k in range(again.num_rows)])
    )
    again = again.set_column(3, "event_time_ms", pc.add(again.column("event_time_ms"), 1000))
    ct = pa.concat_tables([ct, again])
    nd = max(1, int(n_imps * dup_frac))
    it = pa.concat_tables([it, it.take(rng.integers(0, it.num_rows, nd))])
    ct = pa.concat_tables([ct, ct.take(rng.integers(0, ct.num_rows, max(1, nd // 3)))])
    return it, ct


def unique_events(it: pa.Table, ct: pa.Table):
    """(impressions, clicks) as lists of dicts, first copy of each id (brute force)."""
    imps, clks = {}, {}
    for r in it.to_pylist():
        if (
            r["impression_id"] not in imps
            or r["event_time_ms"] < imps[r["impression_id"]]["event_time_ms"]
        ):
            imps[r["impression_id"]] = r
    for r in ct.to_pylist():
        if r["click_id"] not in clks or r["event_time_ms"] < clks[r["click_id"]]["event_time_ms"]:
            clks[r["click_id"]] = r
    return list(imps.values()), list(clks.values())
