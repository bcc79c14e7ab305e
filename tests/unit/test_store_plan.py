"""The read plan's keys and parents, the rate helpers and the invalidation key mapping,
without servers."""

from __future__ import annotations

import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.features import historical_ctr, smoothed_rates
from ctrstream.store import layout as L

T = 1_750_000_000_000 + 37 * F.MINUTE_MS + 12_345  # an arbitrary event time (15:43 UTC)


def test_rate_helpers():
    counts = np.zeros((2, len(F.ENTITIES), F.N_WINDOWS, 2))
    counts[0, 0, 2] = [1000, 100]  # ad: 24h window has the most impressions
    counts[0, 0, 0] = [10, 10]
    rates = smoothed_rates(counts)
    assert rates.shape == (2, len(F.ENTITIES), F.N_WINDOWS)
    assert rates[1, 0, 0] == pytest.approx(F.PRIOR.mean)
    h = historical_ctr(counts)
    assert h[0] == pytest.approx((100 + F.PRIOR.alpha) / (1000 + F.PRIOR.strength))
    assert h[1] == pytest.approx(F.PRIOR.mean)


def test_keys_of_columns_are_the_entity_ids_of_the_rows():
    """Keys built per distinct field value (the API's path) = ``features.entity_id`` per row."""
    from ctrstream.serving.assembly import entity_ids, request_columns
    from ctrstream.store.plan import keys_of_columns, keys_of_rows, parents_of_keys

    rng = np.random.default_rng(1)
    cands = [
        {
            "ad_id": int(a),
            "campaign_id": int(a) // 3,
            "advertiser_id": int(a) // 7,
            "ad_category": int(a) % 4,
        }
        for a in rng.integers(0, 40, 120)
    ]
    cols = request_columns(
        17, {"site_id": 3, "device_type": "ctv", "country": "US", "position": 1}, cands, T
    )
    ids = entity_ids(cols)
    names = [e.name for e in F.ENTITIES]
    for keys, inv, parents in (keys_of_columns(cols), keys_of_rows(ids)):
        assert len(set(keys)) == len(keys)
        got = np.array(keys, dtype=object)[inv]
        want = np.array([[f"{n}:{i}" for n, i in zip(names, row)] for row in ids], dtype=object)
        assert (got == want).all()
        np.testing.assert_array_equal(
            np.sort(parents, axis=1), np.sort(parents_of_keys(keys), axis=1)
        )
        assert (parents < np.arange(len(keys))[:, None]).all()  # parents come first


def test_invalidation_reports_map_day_hashes_to_entity_keys():
    """A reported speed-view key (one hash per entity and day) invalidates its entity key;
    keys outside the layout are ignored, never misread."""
    day = T // F.DAY_MS
    assert L.speed_entity_key_of(L.speed_key("ad", "4", day).encode()) == "ad:4"
    assert (
        L.speed_entity_key_of(L.speed_key("user_x_ad", "17:4", day + 1).encode())
        == "user_x_ad:17:4"
    )
    assert (
        L.speed_entity_key_of(f"{L.SPEED_PREFIX}ad:4:5m".encode()) is None
    )  # the old per-resolution layout
    assert L.speed_entity_key_of(f"{L.SPEED_PREFIX}ad".encode()) is None
    assert L.speed_key("ad", "4", day).startswith(L.SPEED_PREFIX)
    # the grouped layout: a report of a root's hash names the root, whose cached crosses the
    # cache drops with it
    g = L.speed_layout("grouped")
    assert g.root_of_key(g.key("site_x_category", "3:7", day).encode()) == "site:3"
    assert g.root_of_key(g.key("ad", "4", day).encode()) == "ad:4"
    assert g.root_of_key(L.speed_key("ad", "4", day).encode()) is None
    assert not (L.TRACKING_PREFIX + "x:1").startswith(L.SPEED_PREFIX)
