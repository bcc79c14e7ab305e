"""Reconciliation: a batch view against a speed view with late events, a crash and a
duplicate; every difference is explained, and afterwards the views agree.

The batch view is computed by the batch layer's own code (``ctrstream.batch.point_in_time.
bucket_counts`` over the events, written in the batch view's layout) and the archive is written
with ``ctrstream.batch.archive.write_partitioned``; the speed view is counted here, independently,
from the events the speed layer would have accepted, then damaged the way a crash and a
duplicate damage it. Late events and malformed records go to the real dlq topic.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import redis

from ctrstream import features as F
from ctrstream.batch.reconcile import reconcile
from ctrstream.events import Click, Impression, encode
from ctrstream.kafka.deadletters import DlqWriter, dead_letter
from ctrstream.store import layout as L
from ctrstream.store.reports import last_reconciled_version, load_reconcile_report

MIDNIGHT = 1_767_571_200_000  # 2026-01-05 00:00 UTC
T0 = MIDNIGHT - F.HOUR_MS  # an hour boundary: the events (T0 .. T0 + 3 h) cross midnight
CUTOFF = T0 + 2 * F.HOUR_MS
DAY0, DAY1 = MIDNIGHT // F.DAY_MS - 1, MIDNIGHT // F.DAY_MS  # the speed view's two days


def _events(rng):
    imps, clicks = [], []
    n = 900
    times = np.sort(rng.integers(T0, T0 + 3 * F.HOUR_MS, n))
    for k, t in enumerate(times.tolist()):
        ad = int(rng.integers(0, 5))
        imp = Impression(
            schema_version=1,
            impression_id=f"imp-{k}",
            event_time_ms=t,
            user_id=int(rng.integers(0, 20)),
            ad_id=ad,
            campaign_id=ad,
            advertiser_id=ad % 2,
            site_id=int(rng.integers(0, 3)),
            ad_category=ad % 3,
            device_type="mobile",
            country="US",
            position=0,
        )
        imps.append(imp)
        if rng.random() < 0.15:
            clicks.append(
                Click(
                    schema_version=1,
                    click_id=f"clk-{k}",
                    impression_id=imp.impression_id,
                    event_time_ms=t + 5000,
                    user_id=imp.user_id,
                    ad_id=ad,
                    campaign_id=ad,
                    advertiser_id=imp.advertiser_id,
                    site_id=imp.site_id,
                    ad_category=imp.ad_category,
                )
            )
    return imps, clicks


def _count(events, et):
    """Independent counting: {(entity, eid, res, type, bucket): n}."""
    out = defaultdict(int)
    for ev in events:
        for ent in F.ENTITIES:
            eid = ":".join(str(getattr(ev, f)) for f in ent.fields)
            for res in F.RESOLUTIONS:
                out[(ent.name, eid, res.name, et, ev.event_time_ms // res.bucket_ms)] += 1
    return out


def _write_view(r, cells, address):
    """Cells {(entity, eid, res, type, bucket): n} as hashes: ``address(cell)`` is the cell's
    ``(key, field)``."""
    by_key = defaultdict(dict)
    for cell, n in cells.items():
        key, fld = address(cell)
        by_key[key][fld] = n
    pipe = r.pipeline(transaction=False)
    for k, m in by_key.items():
        pipe.hset(k, mapping=m)
    pipe.execute()


def _batch_layout(version):
    return lambda c: (L.batch_key(version, c[0], c[1], c[2]), L.batch_field(c[3], c[4]))


def _day(cell) -> int:
    """The event day of a cell's bucket: the day part of its speed-view key."""
    return L.speed_day(cell[4], F.RESOLUTION_BY_NAME[cell[2]])


def _address(cell) -> tuple[str, str]:
    """``(key, field)`` of a speed-view cell in the layout under test."""
    return L.speed_layout().cell_address(*cell)


def _speed_key(cell) -> str:
    return _address(cell)[0]


@pytest.fixture(autouse=True, params=L.SPEED_LAYOUTS)
def layout_name(request, monkeypatch):
    """Every test in both speed-view layouts (the settings given to ``reconcile`` and the
    functions without settings follow it)."""
    monkeypatch.setenv("CTRSTREAM_SPEED__LAYOUT", request.param)
    return request.param


def _in_layout(settings, name):
    return settings.model_copy(update={"speed": settings.speed.model_copy(update={"layout": name})})


def _in_overlap(cell):
    ent, eid, res, et, b = cell
    return (b + 1) * F.RESOLUTION_BY_NAME[res].bucket_ms <= CUTOFF


@pytest.fixture
def rds(settings):
    r = redis.Redis.from_url(settings.redis.url)
    for k in r.scan_iter(match=L.SPEED_PATTERN, count=5000):  # this test owns the speed view
        r.delete(k)
    yield r
    r.close()


def test_reconcile_explains_every_difference_and_batch_wins(
    fresh_topics, rds, tmp_path, unique, layout_name
):
    from ctrstream.batch.archive import to_table, write_partitioned
    from ctrstream.batch.point_in_time import bucket_counts

    s = _in_layout(fresh_topics, layout_name)
    sl = L.speed_layout(layout_name)
    rng = np.random.default_rng(4)
    imps, clicks = _events(rng)

    # late: 6 impressions before the cut-off the speed layer sent to the dlq (never counted),
    # plus a late *copy* of an impression it had counted on time (changes nothing)
    late_idx = [
        int(i)
        for i in rng.choice(
            np.flatnonzero(
                [
                    (T0 + 20 * 60_000 <= e.event_time_ms < CUTOFF - 10 * 60_000) and e.user_id != 3
                    for e in imps
                ]
            ),
            6,
            replace=False,
        )
    ]
    late = [imps[i] for i in late_idx]
    accepted = [e for i, e in enumerate(imps) if i not in set(late_idx)]
    late_copy = next(e for e in accepted if e.event_time_ms < CUTOFF - F.HOUR_MS and e.user_id != 3)

    # the archive holds every event (and a duplicate copy), the batch view is built from it
    write_partitioned(tmp_path, "impressions", to_table("impressions", imps + [late_copy]))
    write_partitioned(tmp_path, "clicks", to_table("clicks", clicks))
    bc = bucket_counts(
        to_table("impressions", imps + [late_copy]), to_table("clicks", clicks), until_ms=CUTOFF
    ).to_pydict()
    version = f"v{unique}"
    batch = {}
    for ent, eid, res, b, ni, nc in zip(
        bc["entity"], bc["eid"], bc["res"], bc["bucket"], bc["imps"], bc["clicks"]
    ):
        batch[(ent, eid, res, "i", b)] = ni
        batch[(ent, eid, res, "c", b)] = nc
    _write_view(rds, batch, _batch_layout(version))
    rds.hset(
        L.batch_meta_key(version),
        mapping={"cutoff_ms": CUTOFF, "created_ms": 1, "fingerprint": F.fingerprint()},
    )

    # the speed view: what the speed layer accepted, counted independently ...
    speed = _count(accepted, "i")
    speed.update(_count(clicks, "c"))
    _write_view(rds, speed, _address)
    # an entity's buckets of the overlap lie in two day hashes, each holding every resolution
    for day in (DAY0, DAY1):
        fields = rds.hkeys(sl.key("ad", "0", day))
        assert {f.split(b":")[0].decode() for f in fields} == set(F.RESOLUTION_BY_NAME)
    no_day = L.SPEED_PREFIX + L.entity_key("ad", "0")  # no hash without its day
    assert not rds.exists(no_day) and not rds.exists(no_day + L.SPEED_DAY_SEP + "5m")
    # ... then a crash lost one whole day hash (user 3, the day before midnight: every
    # resolution - and in the grouped layout every cross of user 3 too; its hash of the day
    # after stays) and one update (ad 0, 5m, before midnight) ...
    lost_key = sl.key("user", "3", DAY0)
    lost_cells = {c for c, n in batch.items() if n and _in_overlap(c) and _speed_key(c) == lost_key}
    assert {c[2] for c in lost_cells} == set(F.RESOLUTION_BY_NAME)
    assert {c[0] for c in lost_cells} == (
        {"user", "user_x_ad", "user_x_advertiser"} if sl.grouped else {"user"}
    ) and all(c[1].split(":")[0] == "3" for c in lost_cells)
    kept_key = sl.key("user", "3", DAY1)
    kept = {
        c
        for c, n in batch.items()
        if c[:2] == ("user", "3") and n and _in_overlap(c) and _day(c) == DAY1
    }
    assert kept and rds.hlen(kept_key) > 0
    rds.delete(lost_key)
    late_cells = {c for e in late for c in _count([e], "i") if _in_overlap(c)}
    stale = next(
        c
        for c, n in sorted(batch.items())
        if c[:4] == ("ad", "0", "5m", "i")
        and n >= 2
        and c not in late_cells
        and _in_overlap(c)
        and _day(c) == DAY0
    )
    rds.hset(*_address(stale), batch[stale] - 2)
    # ... and a copy was counted twice (a site, 24h, after midnight)
    dup = next(
        c
        for c in sorted(batch)
        if c[0] == "site"
        and c[2:4] == ("24h", "i")
        and _in_overlap(c)
        and c not in late_cells
        and _day(c) == DAY1
    )
    rds.hset(*_address(dup), batch[dup] + 1)

    dlq = DlqWriter(s)
    for k, e in enumerate(late + [late_copy]):
        dlq.write(
            [
                dead_letter(
                    f"late: event_time_ms {e.event_time_ms} is 120000 ms behind the watermark",
                    s.topics.impressions.name,
                    0,
                    k,
                    encode(e),
                    "lateness",
                    key=e.impression_id.encode(),
                    job="features",
                )
            ]
        )
    for k in range(2):  # malformed records: counted, never a difference
        dlq.write(
            [
                dead_letter(
                    "malformed JSON: truncated",
                    s.topics.impressions.name,
                    0,
                    100 + k,
                    b'{"impression_id": ',
                    "decode",
                    job="features",
                )
            ]
        )
    # the dlq is at-least-once: a repeated dead letter must not count twice
    dlq.write(
        [
            dead_letter(
                "late: again",
                s.topics.impressions.name,
                0,
                0,
                encode(late[0]),
                "lateness",
                job="features",
            )
        ]
    )
    dlq.flush()

    rep = reconcile(s, tmp_path, version)
    print("\n" + rep.markdown())

    expected = {c: "late" for c in late_cells}
    expected.update({c: "missing_key" for c in lost_cells})
    expected[stale] = "lost_update"
    expected[dup] = "duplicates"
    got = {(x.entity, x.eid, x.res, x.event_type, x.bucket): x.reason for x in rep.differences}
    assert got == expected
    assert rep.explained and "unexplained" not in rep.reasons
    assert rep.reasons["late"] == len(late_cells)
    assert rep.dlq["late"] == 7 and rep.dlq["decode:malformed JSON"] == 2
    assert rep.dlq["late:repeated_dead_letter"] == 1
    # buckets the batch holds and the (damaged) speed view has no cell of at all: the lost
    # hash's, and those whose only events were late
    speed_buckets = {c[:3] + (c[4],) for c in speed if _speed_key(c) != lost_key}
    missing = {c[:3] + (c[4],) for c, n in batch.items() if n and _in_overlap(c)} - speed_buckets
    assert rep.missing_in_speed == len(missing) > len({(c[2], c[4]) for c in lost_cells})
    assert rep.missing_in_batch == 0
    assert (
        rep.buckets_compared
        == rep.buckets_equal + rep.buckets_differing + rep.missing_in_speed + rep.missing_in_batch
    )
    # the late copy's cells hold a late event but no difference
    copy_cell = ("ad", str(late_copy.ad_id), "24h", "i", late_copy.event_time_ms // F.HOUR_MS)
    assert copy_cell not in got or got[copy_cell] == "late"
    assert rep.largest[0].diff == max(abs(x.diff) for x in rep.differences)
    assert rep.applied_cells == len(expected)

    # reports on disk and in Redis
    doc = json.loads((tmp_path / "reports" / f"reconcile-{version}.json").read_text())
    assert doc["cells_differing"] == len(expected) and doc["explained"]
    assert (
        (tmp_path / "reports" / f"reconcile-{version}.md")
        .read_text()
        .startswith("# Reconciliation")
    )
    assert load_reconcile_report(rds, version)["buckets_compared"] == rep.buckets_compared
    assert last_reconciled_version(rds) == version

    # batch won: a second pass finds the views equal; the restored day hash holds every
    # resolution's lost cells (and only cells of its day) and has the speed view's hash TTL;
    # the repairs went to the hash of their bucket's day; a hash nothing was repaired in
    # (user 3 after midnight) got no command at all - it still has no TTL, which the
    # repair's PEXPIRE NX would have given it; nothing outside the overlap was touched
    again = reconcile(s, tmp_path, version, write=False)
    assert again.cells_differing == 0 and again.buckets_equal == again.buckets_compared
    assert again.buckets_compared == rep.buckets_compared
    assert all(int(rds.hget(*_address(c))) == batch[c] for c in lost_cells)
    assert rds.hlen(lost_key) == len(lost_cells)
    hash_ttl = L.speed_hash_ttl_ms(int(s.allowed_lateness_s * 1000))
    assert hash_ttl - 60_000 < rds.pttl(lost_key) <= hash_ttl
    assert rds.pttl(kept_key) == -1
    assert all(int(rds.hget(*_address(c))) == batch[c] for c in kept)
    assert all(_speed_key(c) == kept_key for c in kept)
    for c in (stale, dup):
        assert int(rds.hget(*_address(c))) == batch[c]
        other = sl.key(c[0], c[1], DAY0 + DAY1 - _day(c))
        assert not rds.hexists(other, _address(c)[1])
    after_cut = [c for c in speed if c[:2] == ("user", "5") and not _in_overlap(c)]
    assert {c[2] for c in after_cut} == set(F.RESOLUTION_BY_NAME) and all(
        int(rds.hget(*_address(c))) == speed[c] for c in after_cut
    )

    from prometheus_client import REGISTRY

    assert (
        REGISTRY.get_sample_value("ctrstream_reconcile_buckets", {"outcome": "compared"})
        == again.buckets_compared
    )
    assert (
        REGISTRY.get_sample_value("ctrstream_reconcile_differing_cells", {"reason": "late"}) == 0
    )  # the last run's


def test_reconcile_speed_higher_without_archive_is_unexplained(
    settings, rds, tmp_path, unique, layout_name
):
    """No archive to check against: a speed view above the batch cannot be explained, and
    the report says so instead of guessing; a dry run writes nothing."""
    settings = _in_layout(settings, layout_name)
    sl = L.speed_layout(layout_name)
    version = f"w{unique}"
    b = T0 // F.MINUTE_MS
    rds.hset(
        L.batch_key(version, "ad", "1", "5m"),
        mapping={L.batch_field("i", b): 3, L.batch_field("c", b): 1},
    )
    rds.hset(L.batch_meta_key(version), mapping={"cutoff_ms": CUTOFF})
    res = F.RESOLUTION_BY_NAME["5m"]
    assert (L.speed_day(b, res), L.speed_day(b + 200, res)) == (DAY0, DAY1)
    rds.hset(
        sl.key("ad", "1", DAY0),
        mapping={L.speed_field("5m", "i", b): 4, L.speed_field("5m", "c", b): 1},
    )
    # the speed layer's high-water: in the next day's hash
    rds.hset(sl.key("ad", "1", DAY1), L.speed_field("5m", "i", b + 200), 9)
    rep = reconcile(settings, tmp_path, version, apply=False, read_dlq=False, write=False)
    assert rep.buckets_compared == 1 and rep.buckets_differing == 1
    assert [(x.reason, x.diff) for x in rep.differences] == [("unexplained", -1)]
    assert not rep.explained
    assert int(rds.hget(sl.key("ad", "1", DAY0), L.speed_field("5m", "i", b))) == 4


def test_reconcile_merges_day_hashes_and_repairs_each_bucket_in_its_day(
    settings, rds, tmp_path, unique, layout_name
):
    """A crossed entity (id with ``:``) whose buckets straddle midnight: its two day hashes
    are merged into one entity per resolution; a missing day hash is ``missing_key`` for the
    buckets of that day only, a cell missing from a day hash that exists a ``lost_update``;
    each repair lands in the hash of its bucket's day."""
    settings = _in_layout(settings, layout_name)
    sl = L.speed_layout(layout_name)
    version = f"x{unique}"
    res = F.RESOLUTION_BY_NAME["1h"]  # 5-minute buckets
    first = MIDNIGHT // res.bucket_ms - 2  # 23:50, 23:55 | 00:00, 00:05
    buckets = range(first, first + 4)
    eid = "17:4"
    rds.hset(
        L.batch_key(version, "user_x_ad", eid, "1h"),
        mapping={L.batch_field(t, b): 2 + k for k, b in enumerate(buckets) for t in F.EVENT_TYPES},
    )
    rds.hset(L.batch_meta_key(version), mapping={"cutoff_ms": CUTOFF})
    before, after = sl.key("user_x_ad", eid, DAY0), sl.key("user_x_ad", eid, DAY1)

    def fld(t: str, b: int) -> str:
        return sl.field("user_x_ad", eid, "1h", t, b)

    # before midnight: one bucket right, the other lost one cell; after midnight: the day
    # hash of the same entity that held buckets 3 and 4 is gone (grouped: the entity's
    # cells in user 17's hash of that day). The high-water: 5m, 01:30
    rds.hset(before, mapping={fld("i", first): 2, fld("c", first): 2, fld("i", first + 1): 3})
    rds.pexpire(before, 3_600_000)  # the TTL the speed layer gave it
    hw = sl.key("user", "17", DAY1)
    rds.hset(hw, L.speed_field("5m", "i", (MIDNIGHT + 90 * F.MINUTE_MS) // F.MINUTE_MS), 1)
    rep = reconcile(settings, tmp_path, version, read_dlq=False, write=False)
    got = sorted((x.bucket, x.event_type, x.reason, x.diff) for x in rep.differences)
    assert got == [
        (first + 1, "c", "lost_update", 3),
        (first + 2, "c", "missing_key", 4),
        (first + 2, "i", "missing_key", 4),
        (first + 3, "c", "missing_key", 5),
        (first + 3, "i", "missing_key", 5),
    ]
    assert rep.overlap["1h"][0] <= first and rep.overlap["1h"][1] >= first + 4
    assert (
        rep.buckets_compared,
        rep.buckets_equal,
        rep.buckets_differing,
        rep.missing_in_speed,
    ) == (4, 1, 1, 2)
    assert rep.applied_cells == 5
    want = {b: 2 + k for k, b in enumerate(buckets)}
    for key, bs in ((before, buckets[:2]), (after, buckets[2:])):
        root, rid, _ = sl.parse_key(key)
        mine = {
            f.decode(): int(v)
            for f, v in rds.hgetall(key).items()
            if sl.parse_field(root, rid, f)[0] == "user_x_ad"
        }
        assert mine == {fld(t, b): want[b] for b in bs for t in F.EVENT_TYPES}
    hash_ttl = L.speed_hash_ttl_ms(int(settings.allowed_lateness_s * 1000))
    assert hash_ttl - 60_000 < rds.pttl(after) <= hash_ttl  # created by the repair
    assert 0 < rds.pttl(before) <= 3_600_000  # NX: the speed layer's TTL stays as it was
    again = reconcile(settings, tmp_path, version, read_dlq=False, write=False)
    assert again.cells_differing == 0 and again.buckets_equal == again.buckets_compared == 4
