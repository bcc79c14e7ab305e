"""The compatibility rule against real Kafka (schemas/README.md): the archive and the speed
layer's reference accept a newer producer's records with fields they do not know, the
archive keeps those fields verbatim in its ``extra`` column, and a record of an unknown
schema version is rejected."""

from __future__ import annotations

import json

import msgspec
import pyarrow.parquet as pq

from ctrstream import events as E
from ctrstream.batch.archive import EXTRA_COLUMN, list_files, read_events, run_archiver
from ctrstream.kafka.clients import make_producer
from ctrstream.kafka.topics import read_topic
from ctrstream.streaming.reference import reference_features

T0 = 1_700_000_000_000


def _imp(i: int) -> E.Impression:
    return E.Impression(
        schema_version=1,
        impression_id=f"evo-{i}",
        event_time_ms=T0 + i * 1_000,
        user_id=i,
        ad_id=i % 4,
        campaign_id=1,
        advertiser_id=1,
        site_id=2,
        ad_category=3,
        device_type="tablet",
        country="SE",
        position=1,
    )


def _with(ev: msgspec.Struct, extra: bytes) -> bytes:
    """``ev`` as a newer producer writes it: the known fields, then ``extra`` (JSON members)."""
    return E.encode(ev)[:-1] + b"," + extra + b"}"


def test_newer_producers_records_are_accepted_and_archived_with_their_extra_fields(
    fresh_topics, tmp_path, unique
):
    s = fresh_topics
    imps = [_imp(i) for i in range(20)]
    newer = _imp(100)
    newer_extra = b'"placement": "feed", "bid":{"cpm":1.25,"cur":"EUR"}'
    click = E.Click(
        schema_version=1,
        click_id="evo-click",
        impression_id=newer.impression_id,
        event_time_ms=newer.event_time_ms + 500,
        user_id=newer.user_id,
        ad_id=newer.ad_id,
        campaign_id=1,
        advertiser_id=1,
        site_id=2,
        ad_category=3,
    )
    click_extra = b'"surface":"app"'
    # a new required field under a new version: no consumer of version 1 takes it
    v2 = _with(_imp(200), b'"placement":"feed"').replace(
        b'"schema_version":1', b'"schema_version":2'
    )
    p = make_producer(s)
    ti, tc = s.topics.impressions.name, s.topics.clicks.name
    for ev in imps:
        p.produce(ti, key=E.key_of(ev), value=E.encode(ev))
    p.produce(ti, key=E.key_of(newer), value=_with(newer, newer_extra))
    p.produce(ti, key=b"evo-200", value=v2)
    p.produce(tc, key=E.key_of(click), value=_with(click, click_extra))
    assert p.flush(30) == 0

    # the speed layer's rule (its reference decodes exactly as the jobs do)
    recs = {k: read_topic(s, getattr(s.topics, k).name) for k in ("impressions", "clicks")}
    ref = reference_features(s, recs)
    assert ref.stats["counted_i"] == len(imps) + 1 and ref.stats["counted_c"] == 1
    assert list(ref.dead.values()) == [("decode", "unknown schema_version 2; supported: [1]")]

    stats = run_archiver(s, data_dir=tmp_path, until_idle_s=1.0, group_id=f"evo-{unique}")
    assert stats.records == {"impressions": len(imps) + 1, "clicks": 1}
    assert stats.extra == {"impressions": 1, "clicks": 1}
    assert stats.undecodable == {"impressions": 1, "clicks": 0}  # the v2 record

    # the files keep the unknown fields verbatim; the batch layer reads the known ones
    for kind, ev_id, want in (
        (
            "impressions",
            newer.impression_id,
            {"placement": "feed", "bid": {"cpm": 1.25, "cur": "EUR"}},
        ),
        ("clicks", click.click_id, {"surface": "app"}),
    ):
        rows = [r for f in list_files(tmp_path, kind) for r in pq.read_table(f).to_pylist()]
        id_field = "impression_id" if kind == "impressions" else "click_id"
        extras = {r[id_field]: r[EXTRA_COLUMN] for r in rows}
        assert json.loads(extras.pop(ev_id)) == want
        assert all(x is None for x in extras.values())  # the v1 producer's records
        got = read_events(tmp_path, kind)
        assert EXTRA_COLUMN not in got.column_names
        assert ev_id in got.column(id_field).to_pylist()
    raw = [
        r[EXTRA_COLUMN]
        for f in list_files(tmp_path, "impressions")
        for r in pq.read_table(f).to_pylist()
        if r[EXTRA_COLUMN]
    ]
    assert raw == ['{"placement":"feed","bid":{"cpm":1.25,"cur":"EUR"}}']
