"""The closed loop's optional impression fields (``request_id``, ``arm``, ``price``) are real
columns of the master dataset: written by the archiver, read back by ``read_events``, with
their defaults for files and tables made before the fields existed."""

from __future__ import annotations

import msgspec
import pyarrow as pa

from ctrstream.batch.archive import (
    DEFAULTS,
    FILE_SCHEMAS,
    SCHEMAS,
    conform,
    read_events,
    to_table,
    write_partitioned,
)
from ctrstream.events import Impression

T0 = 1_700_000_000_000


def _imp(k: int, **extra) -> Impression:
    return Impression(
        schema_version=1,
        impression_id=f"imp-{k}",
        event_time_ms=T0 + k,
        user_id=k,
        ad_id=2,
        campaign_id=3,
        advertiser_id=4,
        site_id=5,
        ad_category=6,
        device_type="mobile",
        country="DE",
        position=k % 3,
        **extra,
    )


def test_the_optional_fields_are_columns_with_their_types():
    assert DEFAULTS["impressions"] == {"request_id": "", "arm": "", "price": 0.0}
    assert DEFAULTS["clicks"] == {}
    schema = SCHEMAS["impressions"]
    assert schema.names[-3:] == ["request_id", "arm", "price"]
    assert schema.field("price").type == pa.float64()
    assert schema.field("arm").type == pa.string()
    assert FILE_SCHEMAS["impressions"].names[-1] == "extra"  # unknown fields only


def test_closed_loop_impressions_round_trip_and_old_files_read_as_defaults(tmp_path):
    closed = [
        _imp(k, request_id=f"q-{k}", arm="lr" if k % 2 else "deep", price=0.1 * k) for k in range(4)
    ]
    write_partitioned(tmp_path, "impressions", to_table("impressions", closed, [None] * 4))
    # a file of an archiver that predates the fields: no such columns at all
    old = to_table("impressions", [_imp(k) for k in range(10, 13)], [None] * 3)
    old = old.drop_columns(["request_id", "arm", "price"])
    assert "arm" not in old.schema.names
    write_partitioned(tmp_path, "impressions", old)
    got = {r["impression_id"]: r for r in read_events(tmp_path, "impressions").to_pylist()}
    assert len(got) == 7
    for ev in closed:
        assert got[ev.impression_id] == msgspec.structs.asdict(ev)
    for k in range(10, 13):
        r = got[f"imp-{k}"]
        assert (r["request_id"], r["arm"], r["price"]) == ("", "", 0.0)


def test_conform_adds_missing_optional_columns_and_fills_nulls():
    rows = [msgspec.structs.asdict(_imp(k)) for k in range(3)]
    for r in rows:
        del r["request_id"], r["arm"], r["price"]
    t = conform("impressions", pa.Table.from_pylist(rows))
    assert t.schema == SCHEMAS["impressions"]
    assert t.column("arm").to_pylist() == ["", "", ""]
    nulls = pa.Table.from_pylist(
        [{**rows[0], "request_id": None, "arm": "x", "price": None}], schema=SCHEMAS["impressions"]
    )
    r = conform("impressions", nulls).to_pylist()[0]
    assert (r["request_id"], r["arm"], r["price"]) == ("", "x", 0.0)
