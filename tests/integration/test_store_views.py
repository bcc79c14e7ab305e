"""The store's view functions against the test stack's Redis: the speed view's writer and its
readers agree cell for cell, a repair is idempotent, a batch view written through the store
reads back cell for cell, reports round-trip - all in a Redis database other than 0, which
the raw pipelined connections must select too."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import redis

from ctrstream import features as F
from ctrstream.store import batch_view as BV
from ctrstream.store import layout as L
from ctrstream.store import speed_view as SV
from ctrstream.store.reports import (
    last_reconciled_version,
    load_reconcile_report,
    save_reconcile_report,
)

REDIS_DB = 12  # these tests own this logical database of the session's Redis
MIDNIGHT = 1_767_571_200_000  # 2026-01-05 00:00 UTC
DAY1 = MIDNIGHT // F.DAY_MS
AD, USER_X_AD = (F.ENTITIES.index(F.ENTITY_BY_NAME[n]) for n in ("ad", "user_x_ad"))
RES = {r.name: k for k, r in enumerate(F.RESOLUTIONS)}


@pytest.fixture(params=L.SPEED_LAYOUTS)
def db(settings, request, monkeypatch):
    """Settings and a client of this test's database, in each speed-view layout (the
    functions that take no layout follow ``CTRSTREAM_SPEED__LAYOUT``)."""
    monkeypatch.setenv("CTRSTREAM_SPEED__LAYOUT", request.param)
    s = settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"db": REDIS_DB}),
            "speed": settings.speed.model_copy(update={"layout": request.param}),
        }
    )
    r = redis.Redis.from_url(s.redis.url)
    r.flushdb()
    yield s, r
    r.flushdb()
    r.close()


def _cells() -> tuple[list[SV.SpeedCells], dict[SV.Cell, int]]:
    """Cells of a plain and a crossed entity around midnight, and what they hold."""
    b5 = MIDNIGHT // F.MINUTE_MS  # 5m resolution: 1-minute buckets
    b24 = MIDNIGHT // F.HOUR_MS
    ad = SV.SpeedCells(
        AD,
        [np.array([7, 7, 7, 8])],
        np.array([RES["5m"], RES["5m"], RES["24h"], RES["24h"]]),
        np.array([b5 - 1, b5, b24 - 1, b24]),
        np.array([3, 4, 120, 9]),
        np.array([0, 1, 2, 0]),
        np.array([True, True, True, False]),
    )
    ux = SV.SpeedCells(
        USER_X_AD,
        [np.array([17, 17]), np.array([4, 5])],
        np.array([RES["1h"], RES["1h"]]),
        np.array([b5 // 5, b5 // 5]),
        np.array([1, 2]),
        np.array([1, 0]),
        np.array([False, False]),
    )
    held = {}
    for c in (ad, ux):
        ent = F.ENTITIES[c.entity]
        for k in range(len(c)):
            eid = ":".join(str(int(p[k])) for p in c.id_parts)
            res = F.RESOLUTIONS[int(c.res[k])].name
            for t, n in (("i", int(c.imps[k])), ("c", int(c.clicks[k]))):
                if n:
                    held[(ent.name, eid, res, t, int(c.bucket[k]))] = n
    return [ad, ux], held


def test_written_cells_read_back_through_every_reader(db):
    s, r = db
    cells, held = _cells()
    with SV.SpeedViewWriter(s) as writer:
        assert writer.write(cells) > 0
    assert SV.read_speed_view(r) == held
    sl = L.speed_layout(s.speed.layout)
    # ad 7: two days, ad 8: one; user 17's crosses share the user's hash (grouped)
    assert SV.count_speed_hashes(r) == (
        {"ad": 3, "user": 1} if sl.grouped else {"ad": 3, "user_x_ad": 2}
    )
    some = sorted(held)[:3] + [("ad", "7", "5m", "i", 1)]
    assert SV.read_speed_cells(r, some) == [held[c] for c in some[:3]] + [0]
    assert SV.speed_hashes_exist(
        r, [("ad", "7", DAY1 - 1), ("ad", "7", DAY1), ("ad", "8", DAY1 - 1)]
    ) == [True, True, False]
    scan = SV.scan_speed_view(r)
    assert scan.present == {
        ("ad", "7", DAY1 - 1),
        ("ad", "7", DAY1),
        ("ad", "8", DAY1),
        ("user_x_ad", "17:4", DAY1),
        ("user_x_ad", "17:5", DAY1),
    }
    flat = {
        (e, i, res, t, b): n
        for res_cells in scan.cells.values()
        for (e, i, res), cs in res_cells.items()
        for (t, b), n in cs.items()
        if n
    }
    assert flat == held  # an entity's day hashes merged per resolution
    # only a hash that got a new cell of the longest-lived resolution has the TTL
    ttl = L.speed_hash_ttl_ms(int(s.allowed_lateness_s * 1000))
    assert 0 < r.pttl(sl.key("ad", "7", DAY1 - 1)) <= ttl  # a new 24h bucket
    assert r.pttl(sl.key("ad", "7", DAY1)) == -1  # new 5m buckets only
    assert r.pttl(sl.key("ad", "8", DAY1)) == -1  # a 24h bucket written before
    assert r.pttl(sl.key("user_x_ad", "17:4", DAY1)) == -1  # new 1h buckets only


def test_read_speed_view_refuses_what_is_not_of_the_layout(db):
    s, r = db
    sl = L.speed_layout(s.speed.layout)
    r.hset(*sl.cell_address("ad", "1", "5m", "i", 1), 1)
    r.hset(*sl.cell_address("user_x_ad", "2:3", "5m", "i", 1), 5)
    assert SV.read_speed_view(r) == {
        ("ad", "1", "5m", "i", 1): 1,
        ("user_x_ad", "2:3", "5m", "i", 1): 5,
    }
    r.hset(sl.key("ad", "1", 0), "junk", 1)
    with pytest.raises(ValueError, match="junk"):
        SV.read_speed_view(r)
    r.hdel(sl.key("ad", "1", 0), "junk")
    other = L.speed_layout("entity" if sl.grouped else "grouped")
    r.hset(*other.cell_address("ad", "1", "5m", "i", 2), 1)  # the other layout's key
    with pytest.raises(ValueError, match="not a hash of the"):
        SV.read_speed_view(r)


def test_a_repair_sets_and_deletes_cells_and_is_idempotent(db):
    s, r = db
    cells, held = _cells()
    with SV.SpeedViewWriter(s) as writer:
        writer.write(cells)
    ttl = L.speed_hash_ttl_ms(int(s.allowed_lateness_s * 1000))
    b5 = MIDNIGHT // F.MINUTE_MS
    repairs = {
        ("ad", "7", "5m", "i", b5): 40,  # overwrite, in the day after midnight
        ("ad", "7", "5m", "c", b5): None,  # delete
        ("ad", "9", "5m", "i", b5 - 1): 2,  # a day hash that does not exist
        ("user_x_ad", "17:9", "1h", "c", b5 // 5): 6,  # a cross of user 17 (grouped: its hash)
        ("user_x_ad", "17:4", "1h", "i", b5 // 5): None,
    }
    assert SV.repair_speed_cells(r, repairs, ttl) == 5
    want = dict(held)
    want[("ad", "7", "5m", "i", b5)] = 40
    del want[("ad", "7", "5m", "c", b5)]
    want[("ad", "9", "5m", "i", b5 - 1)] = 2
    want[("user_x_ad", "17:9", "1h", "c", b5 // 5)] = 6
    del want[("user_x_ad", "17:4", "1h", "i", b5 // 5)]
    assert SV.read_speed_view(r) == want
    sl = L.speed_layout(s.speed.layout)
    assert ttl - 60_000 < r.pttl(sl.key("ad", "9", DAY1 - 1)) <= ttl  # created: the TTL
    assert r.pttl(sl.key("ad", "8", DAY1)) == -1  # not repaired: untouched
    before = {k: r.pttl(k) for k in (sl.key("ad", "7", DAY1), sl.key("ad", "9", DAY1 - 1))}
    assert SV.repair_speed_cells(r, repairs, ttl) == 5
    assert SV.read_speed_view(r) == want  # twice: the same view
    after = {k: r.pttl(k) for k in before}
    assert all(before[k] - 5_000 <= after[k] <= before[k] for k in before)  # NX: TTLs kept


def test_a_batch_view_written_through_the_store_reads_back_cell_for_cell(db):
    _, r = db
    cutoff = F.align_cutoff(MIDNIGHT + 2 * F.HOUR_MS)
    h1 = F.RESOLUTION_BY_NAME["1h"]
    last = F.view_buckets(cutoff, h1).stop - 1
    rows = [
        ("ad", "7", "1h", last, 5, 1),
        ("ad", "7", "1h", last - 2, 3, 0),
        ("user_x_ad", "17:4", "24h", cutoff // F.HOUR_MS - 1, 2, 2),
    ]
    buckets = pa.table(
        {
            k: [row[j] for row in rows]
            for j, k in enumerate(("entity", "eid", "res", "bucket", "imps", "clicks"))
        }
    )
    longs = pa.table(
        {
            "entity": ["ad"],
            "eid": ["7"],
            "long_window": [F.LONG_WINDOWS[0].name],
            "imps": [50],
            "clicks": [4],
        }
    )
    version, created = BV.new_version(cutoff)
    BV.register_version(r, version, created)
    assert BV.write_view_hashes(r, version, buckets, longs, cutoff) == 5  # 3 per-bucket+long+2 sums
    assert not BV.is_complete(r, version)
    BV.write_meta(
        r,
        version,
        cutoff_ms=cutoff,
        created_ms=created,
        fingerprint=F.fingerprint(),
        keys=5,
        buckets=buckets.num_rows,
    )
    BV.switch_pointer(r, version)
    assert BV.served_version(r) == version and BV.is_complete(r, version)
    assert int(BV.read_meta(r, version)["cutoff_ms"]) == cutoff
    assert BV.scan_batch_view(r, version) == {
        ("ad", "7", "1h"): {("i", last): 5, ("c", last): 1, ("i", last - 2): 3, ("c", last - 2): 0},
        ("user_x_ad", "17:4", "24h"): {("i", rows[2][3]): 2, ("c", rows[2][3]): 2},
    }
    assert set(BV.scan_batch_view(r, version, "24h")) == {("user_x_ad", "17:4", "24h")}
    w = F.LONG_WINDOWS[0]
    assert BV.read_view_counts(r, version, "ad", "7", L.LONG_SUFFIX) == {
        L.long_field("i", w): 50,
        L.long_field("c", w): 4,
    }
    sums = BV.read_view_counts(r, version, "ad", "7", L.SUMS_SUFFIX)
    first = F.view_buckets(cutoff, h1).start
    assert (
        sums[L.suffix_field("1h", "i", first)] == 8 and sums[L.suffix_field("1h", "c", last)] == 1
    )
    assert sums[L.suffix_field("1h", "i", last - 1)] == 5 and L.long_field("i", w) in sums
    assert set(BV.read_version(r, version)) == {
        ("ad", "7", "1h"),
        ("ad", "7", L.LONG_SUFFIX),
        ("ad", "7", L.SUMS_SUFFIX),
        ("user_x_ad", "17:4", "24h"),
        ("user_x_ad", "17:4", L.SUMS_SUFFIX),
    }
    # a second version: the first stays with keep=2, goes with keep=1
    v2, c2 = BV.new_version(cutoff, created + 1)
    BV.register_version(r, v2, c2)
    BV.write_view_hashes(r, v2, buckets, longs, cutoff)
    BV.write_meta(r, v2, cutoff_ms=cutoff, created_ms=c2, fingerprint="x", keys=5, buckets=3)
    BV.switch_pointer(r, v2)
    assert BV.prune_versions(r, v2, keep=2) == [] and BV.versions(r) == [version, v2]
    assert BV.prune_versions(r, v2, keep=1) == [version] and BV.versions(r) == [v2]
    assert BV.read_version(r, version) == {}
    with pytest.raises(ValueError, match="keep"):
        BV.prune_versions(r, v2, keep=0)
    with pytest.raises(ValueError, match="lacks column"):
        BV.write_view_hashes(r, v2, buckets.drop(["imps"]), longs, cutoff)


def test_reconcile_reports_round_trip(db):
    _, r = db
    assert last_reconciled_version(r) is None and load_reconcile_report(r, "v1") is None
    save_reconcile_report(r, "v1", {"buckets_compared": 3, "when": MIDNIGHT})
    assert load_reconcile_report(r, "v1") == {"buckets_compared": 3, "when": MIDNIGHT}
    assert last_reconciled_version(r) == "v1"
