"""The speed view's writer, without a server: the commands it renders with numpy are exactly
hiredis' packing of the HSET / PEXPIRE the layout defines, one HSET per hash (in the grouped
layout: per root id and day, the root's crosses included), every HSET before any PEXPIRE,
for ids and counts of every digit length, crossed ids and the negative numbers that take the
per-hash path - in both layouts (``layout.SPEED_LAYOUTS``)."""

from __future__ import annotations

from collections import defaultdict

import hiredis
import numpy as np
import pytest

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.store.speed_view import SpeedCells, render_speed_cells, renew_resolution

TTL = 90_061_000
RENEW = renew_resolution(0)
LAYOUTS = [L.speed_layout(n) for n in L.SPEED_LAYOUTS]
ENT = {e.name: k for k, e in enumerate(F.ENTITIES)}


def _commands(payload: bytes) -> list[list[bytes]]:
    """The commands of a payload, each checked to be hiredis' packing byte for byte."""
    reader = hiredis.Reader()
    reader.feed(payload)
    out = []
    while (cmd := reader.gets()) is not False:
        out.append(cmd)
    assert b"".join(hiredis.pack_command(tuple(c)) for c in out) == payload
    return out


def _expected(
    cells: list[SpeedCells], sl: L.SpeedLayout
) -> tuple[dict[str, dict[str, str]], set[str]]:
    """What the layout says the cells are: {hash key: {field: value}}, and the keys whose
    TTL is renewed."""
    hashes: dict[str, dict[str, str]] = defaultdict(dict)
    renewed = set()
    for c in cells:
        ent = F.ENTITIES[c.entity]
        for k in range(len(c)):
            res = F.RESOLUTIONS[int(c.res[k])]
            b = int(c.bucket[k])
            eid = F.entity_id(ent, {f: int(p[k]) for f, p in zip(ent.fields, c.id_parts)})
            key, fi = sl.cell_address(ent.name, eid, res.name, "i", b)
            hashes[key][fi] = str(int(c.imps[k]))
            if c.clicks[k] or not sl.sparse_clicks:  # sparse: a click count of 0 is not written
                hashes[key][sl.field(ent.name, eid, res.name, "c", b)] = str(int(c.clicks[k]))
            if c.new[k] and c.res[k] == RENEW:
                renewed.add(key)
    return hashes, renewed


def _check(cells: list[SpeedCells], sl: L.SpeedLayout) -> None:
    payload, n = render_speed_cells(cells, TTL, speed_layout=sl)
    cmds = _commands(payload)
    assert len(cmds) == n
    names = [c[0] for c in cmds]
    k = names.count(b"HSET")
    assert names == [b"HSET"] * k + [b"PEXPIRE"] * (n - k)  # every HSET before any PEXPIRE
    got: dict[str, dict[str, str]] = {}
    for c in cmds[:k]:
        key = c[1].decode()
        assert key not in got  # one HSET per day hash
        got[key] = {f.decode(): v.decode() for f, v in zip(c[2::2], c[3::2])}
        assert len(got[key]) == (len(c) - 2) // 2  # no field twice
    want, renewed = _expected(cells, sl)
    assert got == want
    assert sorted(c[1].decode() for c in cmds[k:]) == sorted(renewed)
    assert all(c[2] == str(TTL).encode() and len(c) == 3 for c in cmds[k:])


def _random_cells(
    rng: np.random.Generator, entity: int, n: int, id_hi: int, negative: bool = False
) -> SpeedCells:
    ent = F.ENTITIES[entity]
    n_ids = max(1, n // 4)
    ids = [rng.integers(-id_hi if negative else 0, id_hi, n_ids) for _ in ent.fields]
    pick = rng.integers(0, n_ids, n)
    res = rng.integers(0, len(F.RESOLUTIONS), n)
    t = 1_767_571_200_000 + rng.integers(-3 * F.HOUR_MS, 3 * F.HOUR_MS, n)  # around midnight
    bucket = t // np.array([r.bucket_ms for r in F.RESOLUTIONS])[res]
    # a cell at most once per (id, res, bucket), as the speed layer's tables give them
    cell = np.stack([*[p[pick] for p in ids], res, bucket])
    _, first = np.unique(cell, axis=1, return_index=True)
    sel = np.sort(first)
    digits = rng.integers(1, 12, len(sel))
    return SpeedCells(
        entity,
        [p[pick][sel] for p in ids],
        res[sel],
        bucket[sel],
        rng.integers(0, 10**digits),
        rng.integers(0, 10 ** (digits // 2 + 1)),
        rng.random(len(sel)) < 0.5,
    )


@pytest.mark.parametrize("sl", LAYOUTS, ids=str)
def test_rendered_commands_are_hiredis_packing_of_the_layout(sl):
    rng = np.random.default_rng(7)
    crossed = [k for k, e in enumerate(F.ENTITIES) if len(e.fields) > 1]
    single = [k for k, e in enumerate(F.ENTITIES) if len(e.fields) == 1]
    cells = [
        _random_cells(rng, single[0], 400, 10**12),
        _random_cells(rng, single[1], 300, 7),  # few ids: many cells per day hash
        _random_cells(rng, crossed[0], 400, 1 << 31),
    ]
    _check(cells, sl)
    _check(cells[:1], sl)
    # a root and its crosses with shared root ids (few users: many cells per root hash)
    group = [_random_cells(rng, ENT[e], 300, 5) for e in ("user_x_ad", "user", "user_x_advertiser")]
    _check(group, sl)
    _check([*group, _random_cells(rng, ENT["site_x_category"], 200, 4)], sl)


@pytest.mark.parametrize("sl", LAYOUTS, ids=str)
def test_negative_ids_take_the_packed_path_with_the_same_commands(sl):
    rng = np.random.default_rng(3)
    single = next(k for k, e in enumerate(F.ENTITIES) if len(e.fields) == 1)
    crossed = next(k for k, e in enumerate(F.ENTITIES) if len(e.fields) > 1)
    _check(
        [
            _random_cells(rng, single, 200, 1000, negative=True),
            _random_cells(rng, crossed, 200, 1000, negative=True),
            _random_cells(rng, single, 50, 1000),
        ],
        sl,
    )
    _check(
        [
            _random_cells(rng, ENT["user"], 100, 5, negative=True),
            _random_cells(rng, ENT["user_x_ad"], 100, 5),
        ],
        sl,
    )


@pytest.mark.parametrize("sl", LAYOUTS, ids=str)
def test_one_hset_per_day_hash_with_every_resolution(sl):
    """Cells of one entity id on one day, of every resolution, go into one HSET; the next
    day's cells into another; only new cells of the longest-lived resolution renew a TTL."""
    day0 = 20_000
    hour = day0 * 24 + 23
    res = np.array([0, 1, 2, 2])
    bucket = np.array([hour * 60 + 5, hour * 12 + 1, hour, hour + 1])
    cells = SpeedCells(
        0,
        [np.array([42] * 4)],
        res,
        bucket,
        np.array([1, 2, 3, 4]),
        np.array([0, 0, 1, 0]),
        np.array([True, True, False, True]),
    )
    cmds = _commands(render_speed_cells([cells], TTL, renew_res=2, speed_layout=sl)[0])
    assert [c[:2] for c in cmds] == [
        [b"HSET", sl.key("ad", "42", day0).encode()],
        [b"HSET", sl.key("ad", "42", day0 + 1).encode()],
        [b"PEXPIRE", sl.key("ad", "42", day0 + 1).encode()],
    ]
    if sl.sparse_clicks:  # the click counts of 0 are not written
        assert len(cmds[0]) == 2 + 2 * 3 + 2 and len(cmds[1]) == 2 + 2
    else:
        assert len(cmds[0]) == 2 + 3 * 4 and len(cmds[1]) == 2 + 4


def test_bad_cells_are_refused_with_a_clear_message():
    one = np.array([1])
    with pytest.raises(ValueError, match="entity index"):
        SpeedCells(99, [one], one, one, one, one, one > 0)
    with pytest.raises(ValueError, match="id part"):
        SpeedCells(0, [one, one], one, one, one, one, one > 0)
    with pytest.raises(ValueError, match="differ in length"):
        SpeedCells(0, [one], one, np.array([1, 2]), one, one, one > 0)
    assert render_speed_cells(
        [SpeedCells(0, [one[:0]], one[:0], one[:0], one[:0], one[:0], one[:0] > 0)], TTL
    ) == (b"", 0)


def _one(entity: str, ids: list[int], res: int, bucket: int, new: bool) -> SpeedCells:
    one = np.array([1])
    return SpeedCells(
        ENT[entity], [np.array([i]) for i in ids], one * res, one * bucket, one * 3, one, one == new
    )


def test_grouped_layout_puts_a_users_crosses_in_the_users_hash():
    """One HSET per user and day for the user and every cross of the user, each cross's
    fields named by the rest of its id; ads, campaigns and advertisers keep their own
    hashes (their counts are shared by many users, never copied); the key carries the root
    entity key as a Redis Cluster hash tag."""
    sl = L.speed_layout("grouped")
    hour = 20_000 * 24 + 5
    cells = [
        _one("user_x_ad", [17, 4], 2, hour, False),
        _one("user", [17], 2, hour, False),
        _one("user_x_advertiser", [17, 9], 2, hour, False),
        _one("ad", [4], 2, hour, False),
        _one("site_x_category", [3, 11], 2, hour, False),
        _one("site", [3], 2, hour, False),
    ]
    cmds = _commands(render_speed_cells(cells, TTL, renew_res=2, speed_layout=sl)[0])
    by_key = {c[1].decode(): [f.decode() for f in c[2::2]] for c in cmds}
    assert sorted(by_key) == ["sv:{ad:4}:20000", "sv:{site:3}:20000", "sv:{user:17}:20000"]
    assert sorted(by_key["sv:{user:17}:20000"]) == sorted(
        [f"ua:4:24h:{t}{hour}" for t in "ic"]
        + [f"24h:{t}{hour}" for t in "ic"]
        + [f"uv:9:24h:{t}{hour}" for t in "ic"]
    )
    assert sorted(by_key["sv:{site:3}:20000"]) == sorted(
        [f"sc:11:24h:{t}{hour}" for t in "ic"] + [f"24h:{t}{hour}" for t in "ic"]
    )
    assert by_key["sv:{ad:4}:20000"] == [f"24h:i{hour}", f"24h:c{hour}"]
    # a click count of 0 is not written in the grouped layout (an absent field reads 0)
    one = np.array([1])
    no_click = SpeedCells(ENT["ad"], [one * 4], one * 2, one * hour, one * 3, one * 0, one == 0)
    got = _commands(render_speed_cells([no_click], TTL, renew_res=2, speed_layout=sl)[0])
    assert got == [[b"HSET", b"sv:{ad:4}:20000", f"24h:i{hour}".encode(), b"3"]]
    # the layout parses back what it wrote: a cross's field under its root is the cross's cell
    assert sl.parse_field("user", "17", b"ua:4:24h:i%d" % hour) == (
        "user_x_ad",
        "17:4",
        "24h",
        "i",
        hour,
    )
    assert sl.parse_field("ad", "4", b"ua:4:24h:i1") is None  # not a member of ad's hash
    assert sl.parse_key("sv:{user_x_ad:17:4}:20000") is None  # a member is never a root
    assert L.speed_layout("entity").parse_key("sv:{user:17}:20000") is None


def test_a_new_bucket_of_a_cross_renews_its_roots_ttl():
    """The root hash's TTL is renewed when any member gets a new bucket of the longest-lived
    resolution - once per hash and flush - and not for new buckets of shorter ones."""
    sl = L.speed_layout("grouped")
    hour = 20_000 * 24 + 5
    cmds = _commands(
        render_speed_cells(
            [
                _one("user", [17], 2, hour, False),
                _one("user_x_ad", [17, 4], 2, hour, True),  # new: renews user 17's hash
                _one("user_x_ad", [17, 5], 2, hour, True),
                _one("user_x_ad", [18, 4], 0, hour * 60, True),  # a new 5m bucket: does not
            ],
            TTL,
            renew_res=2,
            speed_layout=sl,
        )[0]
    )
    assert [c[1].decode() for c in cmds if c[0] == b"PEXPIRE"] == ["sv:{user:17}:20000"]
    assert [c[1].decode() for c in cmds if c[0] == b"HSET"] == [
        "sv:{user:17}:20000",
        "sv:{user:18}:20000",
    ]
