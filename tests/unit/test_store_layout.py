"""The store's layout module is the one place that builds and parses keys and fields, and
the Lua read script assembles none; its SQL twins (the batch view's writer builds keys and
fields in DuckDB) give the same strings as the Python builders (no server needed)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import duckdb
import pytest

from ctrstream import features as F
from ctrstream.store import layout as L
from ctrstream.store.plan import NO_VIEW, ScriptPlan, View, keys_of_rows

ROOT = Path(__file__).resolve().parents[2]
T = 1_750_000_000_000 + 37 * F.MINUTE_MS


@pytest.mark.parametrize("entity, eid", [("ad", "4"), ("user_x_ad", "17:4"), ("site", "0")])
def test_keys_round_trip(entity, eid):
    day = T // F.DAY_MS
    key = L.speed_key(entity, eid, day)
    assert L.speed_entity_of(key) == (entity, eid, day)
    assert L.speed_entity_key_of(key.encode()) == L.entity_key(entity, eid)
    assert L.split_entity_key(L.entity_key(entity, eid)) == (entity, eid)
    assert L.speed_keys([L.entity_key(entity, eid)], day) == [key]
    assert key.encode().startswith(L.speed_key_head(entity))
    for res in F.RESOLUTIONS:
        assert L.parse_batch_key("v1", L.batch_key("v1", entity, eid, res.name)) == (
            entity,
            eid,
            res.name,
        )
    assert L.parse_batch_key("v1", L.batch_sums_key("v1", entity, eid)) is None
    assert L.parse_batch_key("v2", L.batch_key("v1", entity, eid, "5m")) is None
    assert L.batch_sums_keys("v1", [L.entity_key(entity, eid)]) == [
        L.batch_sums_key("v1", entity, eid)
    ]


def test_fields_round_trip():
    assert L.parse_speed_field(L.speed_field("1h", "c", 123).encode()) == ("1h", "c", 123)
    assert L.parse_batch_field(L.batch_field("i", -7).encode()) == ("i", -7)
    assert L.parse_speed_field(b"i7d") is None and L.parse_batch_field(b"5m:i1") is None


def test_tracking_heartbeats_sort_after_the_speed_view():
    assert not L.TRACKING_PREFIX.startswith(L.SPEED_PREFIX)
    assert L.TRACKING_PREFIX > L.SPEED_PREFIX  # reported after the writes executed with them


def test_read_script_assembles_no_key_and_no_field():
    """Every ``redis.call`` of read.lua reads a key passed in ``KEYS`` with fields passed in
    ``ARGV`` (so the script can run where its keys live together: a cluster slot)."""
    lua = resources.files("ctrstream.store").joinpath("read.lua").read_text()
    code = "\n".join(line.split("--", 1)[0] for line in lua.splitlines())
    calls = re.findall(r"\b(?:redis\.call|call)\(\s*'(\w+)'\s*,\s*([^,)]+)", code)
    assert calls, "no redis.call found: did the script's structure change?"
    for command, key in calls:
        assert key.strip().startswith("KEYS["), f"{command} of a key that is not in KEYS: {key}"
    # no key prefix of the layout is spelled in the script
    for prefix in (L.SPEED_PREFIX, L.BATCH_PREFIX, L.BATCH_POINTER_KEY, L.CAL_PREFIX):
        assert prefix not in code, prefix


@pytest.mark.parametrize("layout_name", L.SPEED_LAYOUTS)
def test_script_plan_lists_every_key_of_a_read_in_keys(layout_name):
    """``KEYS`` holds the pointer, then per entity its batch keys and its speed day keys -
    exactly the keys the pipeline reference reads, for every kind of view; in the grouped
    layout ``ARGV`` ends with every entity's field prefix (its root's hash)."""
    sl = L.speed_layout(layout_name)
    ids = [["4", "2", "1", "17", "3", "17:1", "17:4", "3:5"]]
    keys, _, parents = keys_of_rows(ids)
    for view in (
        NO_VIEW,
        View("v", "v", F.align_cutoff(T - 5 * F.HOUR_MS), True),
        View("v", "v", F.align_cutoff(T - 5 * F.HOUR_MS), False),
    ):
        plan = ScriptPlan("lambda", view, T, sl)
        script_keys, args, order = plan.call(keys, parents)
        per = plan.n_batch_keys + len(plan.days)
        assert script_keys[0] == L.BATCH_POINTER_KEY and len(script_keys) == 1 + per * len(keys)
        for n, k in enumerate(keys[i] for i in order.tolist()):
            ent, eid = L.split_entity_key(k)
            mine = script_keys[1 + n * per : 1 + (n + 1) * per]
            assert mine[plan.n_batch_keys :] == [sl.key(ent, eid, d) for d in plan.days]
            if view.sums:
                assert mine[:1] == [L.batch_sums_key("v", ent, eid)]
            elif view.version:
                assert mine[: -len(plan.days)] == [
                    L.batch_key("v", ent, eid, r.name) for r in F.RESOLUTIONS
                ] + [L.batch_long_key("v", ent, eid)]
        assert args[1] == (view.pointer or "")
        ordered = [keys[i] for i in order.tolist()]
        if sl.grouped:
            assert args[-len(keys) - 1 :] == [len(keys)] + [
                sl.field_prefix(*L.split_entity_key(k)) for k in ordered
            ]
            assert (
                "sv:{user:17}:" in script_keys[1 + ordered.index("user_x_ad:17:4") * per + per - 1]
            )
            assert args[-len(keys) + ordered.index("user_x_ad:17:4")] == "ua:4:"
        else:
            assert args[-1] == 0


@pytest.mark.parametrize("layout_name", L.SPEED_LAYOUTS)
@pytest.mark.parametrize(
    "entity, eid", [("ad", "4"), ("user_x_ad", "17:4"), ("site_x_category", "3:7"), ("user", "0")]
)
def test_speed_layout_cells_round_trip(layout_name, entity, eid):
    """Every cell's (key, field) parses back to the cell; the key carries the root entity key
    as a hash tag in the grouped layout; invalidation reports map a key to its root."""
    sl = L.speed_layout(layout_name)
    b = T // F.MINUTE_MS
    key, fld = sl.cell_address(entity, eid, "5m", "c", b)
    root, rid, day = sl.parse_key(key)
    assert day == T // F.DAY_MS and sl.root_key(root, rid, day) == key
    assert sl.parse_field(root, rid, fld.encode()) == (entity, eid, "5m", "c", b)
    assert sl.root_of_key(key.encode()) == sl.root_entity_key(L.entity_key(entity, eid))
    assert sl.keys([L.entity_key(entity, eid)], day) == [key]
    if sl.grouped:
        assert key == f"sv:{{{L.entity_key(root, rid)}}}:{day}"
        assert root == {"user_x_ad": "user", "site_x_category": "site"}.get(entity, entity)
    else:
        assert key == L.speed_key(entity, eid, day) and fld == L.speed_field("5m", "c", b)
    other = L.speed_layout("entity" if sl.grouped else "grouped")
    assert other.parse_key(key) is None  # never misread as the other layout's
    with pytest.raises(ValueError, match="CTRSTREAM_SPEED__LAYOUT"):
        L.speed_layout("nope")


def test_sql_builders_equal_the_python_builders():
    version = "1767571200000-1767574800123"
    rows = [
        ("ad", "17", "5m", 29_459_520),
        ("user_x_ad", "17:4", "24h", 490_992),
        ("site", "0", "1h", -3),
    ]
    con = duckdb.connect()
    try:
        con.execute(
            "CREATE TABLE t (entity VARCHAR, eid VARCHAR, res VARCHAR, bucket BIGINT, "
            "long_window VARCHAR)"
        )
        con.executemany(
            "INSERT INTO t VALUES (?, ?, ?, ?, ?)", [(*r, F.LONG_WINDOWS[0].name) for r in rows]
        )
        lit = L.sql_literal
        got = con.execute(f"""SELECT
            {L.batch_key_sql(version, "entity", "eid", "res")},
            {L.batch_key_sql(version, "entity", "eid", lit(L.LONG_SUFFIX))},
            {L.batch_key_sql(version, "entity", "eid", lit(L.SUMS_SUFFIX))},
            {L.batch_field_sql("i", "bucket")}, {L.batch_field_sql("c", "bucket")},
            {L.long_field_sql("i", "long_window")}, {L.long_field_sql("c", "long_window")},
            {L.suffix_field_sql("res", "i", "bucket")}, {L.suffix_field_sql("res", "c", "bucket")}
            FROM t""").fetchall()
    finally:
        con.close()
    w = F.LONG_WINDOWS[0]
    want = [
        (
            L.batch_key(version, e, i, r),
            L.batch_long_key(version, e, i),
            L.batch_sums_key(version, e, i),
            L.batch_field("i", b),
            L.batch_field("c", b),
            L.long_field("i", w),
            L.long_field("c", w),
            L.suffix_field(r, "i", b),
            L.suffix_field(r, "c", b),
        )
        for e, i, r, b in rows
    ]
    assert got == want
    assert L.sql_literal("it's") == "'it''s'"


def test_batch_keys_parse_back():
    v = L.batch_version_id(1_767_571_200_000, 1_767_574_800_123)
    assert ":" not in v
    for e, i in (("ad", "17"), ("user_x_ad", "17:4")):
        assert L.parse_batch_key(v, L.batch_key(v, e, i, "1h")) == (e, i, "1h")
        assert L.batch_entity_of(v, L.batch_key(v, e, i, "1h")) == (e, i, "1h")
        assert L.batch_entity_of(v, L.batch_long_key(v, e, i)) == (e, i, L.LONG_SUFFIX)
        assert L.batch_entity_of(v, L.batch_sums_key(v, e, i)) == (e, i, L.SUMS_SUFFIX)
        assert L.parse_batch_key(v, L.batch_sums_key(v, e, i)) is None
    assert L.batch_entity_of(v, L.batch_meta_key(v)) is None
    assert L.batch_entity_of(v, L.batch_key("other", "ad", "1", "1h")) is None
    assert L.batch_entity_of(v, L.batch_key(v, "nope", "1", "1h")) is None
    assert L.speed_field(*("5m", "i"), 3) == L.speed_field_head("5m", "i") + "3"


def test_prediction_keys_round_trip():
    """Precomputed predictions: one hash per namespace and user, one field per ad; a
    namespace that would break parsing or SCAN patterns is refused."""
    key = L.prediction_key("ctr_deep-1-r3", 17)
    assert key.startswith(L.PREDICTION_PREFIX)
    assert L.parse_prediction_key(key) == ("ctr_deep-1-r3", "17")
    assert key == L.prediction_key_head("ctr_deep-1-r3") + "17"
    assert re.fullmatch(L.prediction_pattern("ctr_deep-1-r3").replace("*", ".*"), key)
    assert not L.prediction_key("ctr_deep-1-r3", 17).startswith(L.prediction_key_head("ctr_deep-1"))
    assert L.prediction_field(4) == "4"
    for other in (L.speed_key("user", "17", 3), L.batch_sums_key("v", "ad", "4"), "pp:x"):
        assert L.parse_prediction_key(other) is None
    for bad in ("", "a:b", "a*", "a?", "[a]", "a\\b"):
        with pytest.raises(ValueError, match="namespace"):
            L.prediction_key(bad, 1)
    assert not L.PREDICTION_PREFIX.startswith((L.SPEED_PREFIX, L.BATCH_PREFIX, L.CAL_PREFIX))
