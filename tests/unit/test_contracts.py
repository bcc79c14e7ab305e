"""The topics' contracts: the committed JSON Schemas are the types', and the compatibility
rule (schemas/README.md) holds both ways - a consumer reads a newer producer's record with
fields it does not know, a newer consumer reads an older record, and a new required field
needs a new schema_version."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from ctrstream import events as E
from ctrstream.cli.schemas import schema_changes, write_schemas

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"

V1 = E.Impression(
    schema_version=1,
    impression_id="imp-1",
    event_time_ms=1_700_000_000_000,
    user_id=1,
    ad_id=2,
    campaign_id=3,
    advertiser_id=4,
    site_id=5,
    ad_category=6,
    device_type="mobile",
    country="DE",
    position=0,
)


def _newer_producer_record(**extra: object) -> bytes:
    """A record of a newer producer: the v1 fields plus fields v1 does not know."""
    return E.encode(V1)[:-1] + b"," + msgspec.json.encode(extra)[1:]


def test_the_committed_schemas_are_the_types():
    differ, problems = schema_changes(SCHEMAS)
    assert not differ, (
        f"{differ} differ from ctrstream.events' types: run `ctrstream schemas write` "
        f"and commit schemas/ (compatibility problems: {problems})"
    )
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(E.json_schemas())
    readme = (SCHEMAS / "README.md").read_text()
    for name in E.json_schemas():
        assert name in readme
    assert "__connect.errors." in readme  # the dead letters' headers are described there


def test_a_stale_schema_file_is_found(tmp_path):
    write_schemas(tmp_path)
    assert schema_changes(tmp_path) == ([], [])
    doc = json.loads((tmp_path / "clicks.schema.json").read_text())
    doc["$defs"]["Click"]["description"] = "edited by hand"
    (tmp_path / "clicks.schema.json").write_text(json.dumps(doc))
    assert schema_changes(tmp_path) == (["clicks.schema.json"], [])  # compatible, but stale


def test_a_v1_consumer_accepts_a_newer_producers_record_and_keeps_the_extra_fields():
    data = _newer_producer_record(placement="feed", bid={"cpm": 1.5, "cur": "EUR"})
    ev = E.decode_impression(data)
    assert ev == V1
    assert E.unknown_fields(ev, data) == b'{"placement":"feed","bid":{"cpm":1.5,"cur":"EUR"}}'
    # verbatim: the producer's own spelling of the values, whitespace included
    spaced = E.encode(V1)[:-1] + b', "score" : 1.50e0 }'
    assert E.unknown_fields(E.decode_impression(spaced), spaced) == b'{"score":1.50e0}'
    # ctrstream's own records (and a foreign client's spacing of them) have none
    assert E.unknown_fields(V1, E.encode(V1)) is None
    pretty = msgspec.json.format(E.encode(V1), indent=2)
    assert E.unknown_fields(E.decode_impression(pretty), pretty) is None


def test_the_speed_layers_batch_codec_accepts_a_newer_producers_record():
    from ctrstream.streaming.features_flow import Codec

    values = [E.encode(V1), _newer_producer_record(placement="feed")]
    rows, ids, ok, errors = Codec("impressions").decode(values, [b"imp-1", b"imp-1"])
    assert errors == [] and ok.tolist() == [0, 1] and ids == ["imp-1", "imp-1"]
    # and the closed loop's impressions (request id, arm, price set): the same counted row
    closed = msgspec.structs.replace(V1, request_id="q-1", arm="lr", price=0.3)
    rows2, _, ok2, errors2 = Codec("impressions").decode([E.encode(closed)], [b"imp-1"])
    assert errors2 == [] and ok2.tolist() == [0] and rows2.tolist() == rows[:1].tolist()


class ImpressionNext(msgspec.Struct, frozen=True):
    """The next version of Impression's type with an optional field (a default)."""

    schema_version: int
    impression_id: str
    event_time_ms: int
    user_id: int
    ad_id: int
    campaign_id: int
    advertiser_id: int
    site_id: int
    ad_category: int
    device_type: E.DeviceType
    country: str
    position: int
    request_id: str = ""
    arm: str = ""
    price: float = 0.0
    placement: str = "unknown"


class ImpressionRequired(msgspec.Struct, frozen=True):
    """A next version that makes the new field required."""

    schema_version: int
    impression_id: str
    event_time_ms: int
    user_id: int
    ad_id: int
    campaign_id: int
    advertiser_id: int
    site_id: int
    ad_category: int
    device_type: E.DeviceType
    country: str
    position: int
    placement: str
    request_id: str = ""
    arm: str = ""
    price: float = 0.0


def _schema(struct: type, version: int) -> dict:
    doc = msgspec.json.schema(struct)
    doc["$defs"]["Impression"] = doc["$defs"].pop(struct.__name__)
    return {"x-ctrstream-schema-version": version, **doc}


def test_a_newer_consumer_reads_a_v1_record_with_the_new_optional_fields_default():
    ev = msgspec.json.decode(E.encode(V1), type=ImpressionNext)
    assert ev.placement == "unknown" and ev.impression_id == V1.impression_id
    assert E.compatibility_problems(E.json_schema("impressions"), _schema(ImpressionNext, 1)) == []


def test_a_new_required_field_needs_a_new_schema_version():
    old = E.json_schema("impressions")
    problems = E.compatibility_problems(old, _schema(ImpressionRequired, 1))
    assert problems == [
        "Impression.placement: new required field without a new schema_version (now 1)"
    ]
    # a v1 record misses it: under the old version number, a newer consumer would reject
    # every record of every older producer
    with pytest.raises(msgspec.ValidationError, match="placement"):
        msgspec.json.decode(E.encode(V1), type=ImpressionRequired)
    # removing or retyping a field breaks older consumers the same way
    fewer = json.loads(json.dumps(old))
    del fewer["$defs"]["Impression"]["properties"]["position"]
    assert "Impression.position: removed" in E.compatibility_problems(old, fewer)[0]
    # with a new version the change is allowed: consumers that only know version 1 reject
    # the new version's records with their reason (the speed layer dead-letters them)
    assert E.compatibility_problems(old, _schema(ImpressionRequired, 2)) == []
    v2 = msgspec.json.encode(
        ImpressionRequired(**{**msgspec.structs.asdict(V1), "placement": "feed"})
    ).replace(b'"schema_version":1', b'"schema_version":2')
    with pytest.raises(E.DecodeError, match="unknown schema_version 2"):
        E.decode_impression(v2)


def test_schemas_write_refuses_a_breaking_change(tmp_path):
    from typer.testing import CliRunner

    from ctrstream.cli.app import build_app

    write_schemas(tmp_path)
    # the committed schema of a type that had no `position` yet: the types now add it
    doc = json.loads((tmp_path / "impressions.schema.json").read_text())
    del doc["$defs"]["Impression"]["properties"]["position"]
    doc["$defs"]["Impression"]["required"].remove("position")
    (tmp_path / "impressions.schema.json").write_text(json.dumps(doc))
    app = build_app()
    res = CliRunner().invoke(app, ["schemas", "write", "--dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "new required field" in res.output and "SCHEMA_VERSION" in res.output
    res = CliRunner().invoke(app, ["schemas", "check", "--dir", str(tmp_path)])
    assert res.exit_code == 1
    res = CliRunner().invoke(app, ["schemas", "write", "--dir", str(tmp_path), "--allow-breaking"])
    assert res.exit_code == 0
    assert schema_changes(tmp_path) == ([], [])


# ------------------------------------------------------------------ the closed loop's fields


def test_the_closed_loops_optional_fields_round_trip_and_old_records_still_decode():
    closed = E.Impression(
        **{
            **msgspec.structs.asdict(V1),
            "request_id": "q7-000000000001",
            "arm": "lr",
            "price": 0.42,
        }
    )
    assert E.decode_impression(E.encode(closed)) == closed
    # an open-loop record is the bytes it always was: the defaults are not written
    assert b"request_id" not in E.encode(V1) and b"arm" not in E.encode(V1)
    old = (
        b'{"schema_version":1,"impression_id":"imp-1","event_time_ms":1700000000000,'
        b'"user_id":1,"ad_id":2,"campaign_id":3,"advertiser_id":4,"site_id":5,'
        b'"ad_category":6,"device_type":"mobile","country":"DE","position":0}'
    )
    assert E.encode(V1) == old
    ev = E.decode_impression(old)
    assert (ev.request_id, ev.arm, ev.price) == ("", "", 0.0)
    assert E.unknown_fields(closed, E.encode(closed)) is None  # known fields, not extras
    # the labeled record carries them with its impression
    lab = E.Labeled(impression=closed, clicked=1, click_delay_ms=5)
    assert E.decode_labeled(E.encode(lab)).impression == closed


def test_a_prediction_with_and_without_a_model_name_and_arm():
    base = dict(
        impression_id="imp-1",
        event_time_ms=1_700_000_000_000,
        model_version="3",
        raw_score=0.1,
        calibrated_score=0.12,
        degraded=False,
    )
    old = E.Prediction(**base)
    assert b"model_name" not in E.encode(old)  # the record it always was
    assert E.decode_prediction(E.encode(old)) == old and old.model_name == old.arm == ""
    named = E.Prediction(**base, model_name="ctr_lr", arm="lr")
    assert E.decode_prediction(E.encode(named)) == named
    assert (
        E.compatibility_problems(
            json.loads((SCHEMAS / "predictions.schema.json").read_text()),
            E.json_schema("predictions"),
        )
        == []
    )
