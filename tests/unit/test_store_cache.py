"""The shared-entity cache's invalidation in the grouped layout: a report names the root
whose hash was written, and drops every cached entity whose cells live in that hash."""

from __future__ import annotations

import numpy as np

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.store.cache import SharedEntityCache


def _store(cache: SharedEntityCache, keys: list[str]) -> None:
    lk = cache.lookup(keys, ("w",), None)
    n = len(keys)
    cache.store(lk, keys, None, np.zeros((n, F.N_WINDOWS, 2), np.int64), np.zeros(n, np.int64))


def test_a_root_report_drops_its_cached_crosses():
    g = L.speed_layout("grouped")
    cache = SharedEntityCache(60.0, root_of=g.root_entity_key)
    keys = ["site:3", "site_x_category:3:7", "site_x_category:4:7", "ad:3"]
    _store(cache, keys)
    assert all(k in cache for k in keys)
    cache.invalidate([g.root_of_key(g.key("site", "3", 20_000).encode())])  # site 3's hash
    assert "site:3" not in cache and "site_x_category:3:7" not in cache
    assert "site_x_category:4:7" in cache and "ad:3" in cache
    # a read in flight when the root was reported does not store its member
    lk = cache.lookup(["site_x_category:4:7"], ("w",), None)
    cache.invalidate(["site:4"])
    cache.store(
        lk,
        ["site_x_category:4:7"],
        None,
        np.zeros((1, F.N_WINDOWS, 2), np.int64),
        np.zeros(1, np.int64),
    )
    assert "site_x_category:4:7" not in cache


def test_the_entity_layout_invalidates_entity_by_entity():
    e = L.speed_layout("entity")
    cache = SharedEntityCache(60.0, root_of=e.root_entity_key)
    _store(cache, ["site:3", "site_x_category:3:7"])
    cache.invalidate([e.root_of_key(e.key("site", "3", 20_000).encode())])
    assert "site:3" not in cache and "site_x_category:3:7" in cache
