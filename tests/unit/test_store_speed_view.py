"""The speed view's writer, without a server: the commands it renders with numpy are exactly
hiredis' packing of the HSET / PEXPIRE the layout defines, one HSET per day hash, every HSET
before any PEXPIRE, for ids and counts of every digit length, crossed ids and the negative
numbers that take the per-hash path."""

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


def _commands(payload: bytes) -> list[list[bytes]]:
    """The commands of a payload, each checked to be hiredis' packing byte for byte."""
    reader = hiredis.Reader()
    reader.feed(payload)
    out = []
    while (cmd := reader.gets()) is not False:
        out.append(cmd)
    assert b"".join(hiredis.pack_command(tuple(c)) for c in out) == payload
    return out


def _expected(cells: list[SpeedCells]) -> tuple[dict[str, dict[str, str]], set[str]]:
    """What the layout says the cells are: {day hash key: {field: value}}, and the keys
    whose TTL is renewed."""
    hashes: dict[str, dict[str, str]] = defaultdict(dict)
    renewed = set()
    for c in cells:
        ent = F.ENTITIES[c.entity]
        for k in range(len(c)):
            res = F.RESOLUTIONS[int(c.res[k])]
            b = int(c.bucket[k])
            eid = F.entity_id(ent, {f: int(p[k]) for f, p in zip(ent.fields, c.id_parts)})
            key = L.speed_key(ent.name, eid, L.speed_day(b, res))
            hashes[key][L.speed_field(res.name, "i", b)] = str(int(c.imps[k]))
            hashes[key][L.speed_field(res.name, "c", b)] = str(int(c.clicks[k]))
            if c.new[k] and c.res[k] == RENEW:
                renewed.add(key)
    return hashes, renewed


def _check(cells: list[SpeedCells]) -> None:
    payload, n = render_speed_cells(cells, TTL)
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
    want, renewed = _expected(cells)
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


def test_rendered_commands_are_hiredis_packing_of_the_layout():
    rng = np.random.default_rng(7)
    crossed = [k for k, e in enumerate(F.ENTITIES) if len(e.fields) > 1]
    single = [k for k, e in enumerate(F.ENTITIES) if len(e.fields) == 1]
    cells = [
        _random_cells(rng, single[0], 400, 10**12),
        _random_cells(rng, single[1], 300, 7),  # few ids: many cells per day hash
        _random_cells(rng, crossed[0], 400, 1 << 31),
    ]
    _check(cells)
    _check(cells[:1])


def test_negative_ids_take_the_packed_path_with_the_same_commands():
    rng = np.random.default_rng(3)
    single = next(k for k, e in enumerate(F.ENTITIES) if len(e.fields) == 1)
    crossed = next(k for k, e in enumerate(F.ENTITIES) if len(e.fields) > 1)
    _check(
        [
            _random_cells(rng, single, 200, 1000, negative=True),
            _random_cells(rng, crossed, 200, 1000, negative=True),
            _random_cells(rng, single, 50, 1000),
        ]
    )


def test_one_hset_per_day_hash_with_every_resolution():
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
    cmds = _commands(render_speed_cells([cells], TTL, renew_res=2)[0])
    assert [c[:2] for c in cmds] == [
        [b"HSET", L.speed_key("ad", "42", day0).encode()],
        [b"HSET", L.speed_key("ad", "42", day0 + 1).encode()],
        [b"PEXPIRE", L.speed_key("ad", "42", day0 + 1).encode()],
    ]
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
