"""Event schemas and the one codec every producer and consumer uses.

Wire format: UTF-8 JSON objects, one per Kafka record, decoded strictly with msgspec:
wrong types, missing fields, unknown schema versions and oversized
payloads are rejected with a precise reason (``DecodeError.reason``); nothing is guessed.

Kafka keys: both ``impressions`` and ``clicks`` are keyed by the **impression id** and
produced with the same partitioner (``murmur2_random``, the Java client's default), and the
two topics have the same partition count. A click therefore lands in the same partition
number as its impression, so a join keyed by impression id needs no repartitioning, and
event-time order per key is the order within one partition.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

# The compatibility rule of the event topics (schemas/README.md): forward compatibility in
# Kafka's terms. A consumer accepts a record of a newer producer that has fields it does not
# know (they are ignored by the speed layer and kept verbatim by the archive, see
# :func:`unknown_fields`); a new field a consumer must have is a new ``schema_version``, and
# a version a consumer does not support is a dead letter. The JSON Schemas in ``schemas/``
# are generated from the structs below (:func:`json_schemas`, ``ctrstream schemas write``).
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})
MAX_EVENT_BYTES = 4096

DeviceType = Literal["mobile", "desktop", "tablet", "ctv"]


class Impression(msgspec.Struct, frozen=True):
    """One ad shown to one user (the unit of prediction)."""

    schema_version: int
    impression_id: str
    event_time_ms: int
    user_id: int
    ad_id: int
    campaign_id: int
    advertiser_id: int
    site_id: int
    ad_category: int
    device_type: DeviceType
    country: str
    position: int  # ad slot position on the page, 0 = top


class Click(msgspec.Struct, frozen=True):
    """A click on an earlier impression; repeats the ids the speed layer counts by."""

    schema_version: int
    click_id: str
    impression_id: str
    event_time_ms: int
    user_id: int
    ad_id: int
    campaign_id: int
    advertiser_id: int
    site_id: int
    ad_category: int


class Labeled(msgspec.Struct, frozen=True):
    """One impression with its outcome, emitted when its attribution window closes."""

    impression: Impression
    clicked: int  # 0/1
    click_delay_ms: int | None  # None when not clicked


class Prediction(msgspec.Struct, frozen=True):
    impression_id: str
    event_time_ms: int
    model_version: str
    raw_score: float
    calibrated_score: float
    degraded: bool


class DeadLetter(msgspec.Struct, frozen=True):
    """What the dead-letter topic carries: the reason and where the record came from.

    The original bytes travel as the Kafka record's value is not JSON-safe, so they are
    kept base64-encoded in ``original`` (msgspec encodes ``bytes`` as base64).
    """

    reason: str
    source_topic: str
    partition: int
    offset: int
    original: bytes
    stage: str = "decode"


class DecodeError(ValueError):
    """A record that cannot be decoded; ``reason`` says exactly why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_encoder = msgspec.json.Encoder()
_imp_decoder = msgspec.json.Decoder(Impression)
_click_decoder = msgspec.json.Decoder(Click)
_labeled_decoder = msgspec.json.Decoder(Labeled)
_pred_decoder = msgspec.json.Decoder(Prediction)
_dlq_decoder = msgspec.json.Decoder(DeadLetter)


def encode(event: msgspec.Struct) -> bytes:
    return _encoder.encode(event)


def _check_size(data: bytes) -> None:
    if len(data) > MAX_EVENT_BYTES:
        raise DecodeError(f"oversized: {len(data)} bytes > limit {MAX_EVENT_BYTES}")


def _check_version(ev: Impression | Click) -> None:
    if ev.schema_version not in SUPPORTED_VERSIONS:
        raise DecodeError(
            f"unknown schema_version {ev.schema_version}; supported: {sorted(SUPPORTED_VERSIONS)}"
        )
    if ev.event_time_ms <= 0:
        raise DecodeError(f"invalid event_time_ms {ev.event_time_ms}: must be > 0")


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes | None) -> Any:
    if data is None:
        raise DecodeError("empty record: value is null")
    _check_size(data)
    try:
        ev = decoder.decode(data)
    except msgspec.ValidationError as e:
        raise DecodeError(f"invalid: {e}") from None
    except msgspec.DecodeError as e:
        raise DecodeError(f"malformed JSON: {e}") from None
    _check_version(ev)
    return ev


def decode_impression(data: bytes | None) -> Impression:
    return _decode(_imp_decoder, data)


def decode_click(data: bytes | None) -> Click:
    return _decode(_click_decoder, data)


def decode_labeled(data: bytes) -> Labeled:
    return _labeled_decoder.decode(data)


def decode_prediction(data: bytes) -> Prediction:
    return _pred_decoder.decode(data)


def decode_dead_letter(data: bytes) -> DeadLetter:
    return _dlq_decoder.decode(data)


def key_of(event: Impression | Click) -> bytes:
    """The Kafka key: the impression id (see the module docstring)."""
    return event.impression_id.encode()


# The Kafka producer partitioner that keeps a click in its impression's partition number.
PARTITIONER = "murmur2_random"


# --------------------------------------------------------------------------- contracts

# the record type of every topic that carries JSON records (the dead letters carry the
# original bytes, with the error in headers: described in schemas/README.md)
TOPIC_RECORDS: dict[str, type[msgspec.Struct]] = {
    "impressions": Impression,
    "clicks": Click,
    "labeled": Labeled,
    "predictions": Prediction,
}
# the event records that carry a ``schema_version`` (the others follow the events' version)
VERSIONED = frozenset({"impressions", "clicks"})
_SCHEMA_VERSION_KEY = "x-ctrstream-schema-version"


def json_schema(topic: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) of ``topic``'s records, generated from its struct, with the
    schema version it describes in ``x-ctrstream-schema-version``."""
    struct = TOPIC_RECORDS[topic]
    doc = msgspec.json.schema(struct)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:ctrstream:schema:{topic}",
        "title": f"ctrstream {topic} record",
        _SCHEMA_VERSION_KEY: SCHEMA_VERSION,
        **doc,
    }


def json_schemas() -> dict[str, str]:
    """File name -> text of every topic's JSON Schema (what ``schemas/`` holds)."""
    return {
        f"{topic}.schema.json": json.dumps(json_schema(topic), indent=2, sort_keys=False) + "\n"
        for topic in TOPIC_RECORDS
    }


def _objects(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: d for name, d in doc.get("$defs", {}).items() if d.get("type") == "object"}


def compatibility_problems(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why ``new`` (a topic's JSON Schema) breaks the compatibility rule against ``old``;
    empty when it does not. Under one ``schema_version`` a change may only add optional
    fields (a default) or document: adding a required field, removing or retyping a field,
    or making an optional field required needs a new version (consumers that do not know it
    dead-letter its records instead of misreading them)."""
    if new.get(_SCHEMA_VERSION_KEY) != old.get(_SCHEMA_VERSION_KEY):
        return []  # a new version may change anything; old consumers dead-letter it
    problems = []
    before, after = _objects(old), _objects(new)
    for name, o in before.items():
        n = after.get(name)
        if n is None:
            problems.append(f"{name}: removed")
            continue
        op, np_ = o.get("properties", {}), n.get("properties", {})
        oreq, nreq = set(o.get("required", ())), set(n.get("required", ()))
        for f in op:
            if f not in np_:
                problems.append(f"{name}.{f}: removed")
            elif op[f] != np_[f]:
                problems.append(f"{name}.{f}: type changed from {op[f]} to {np_[f]}")
        for f in sorted(nreq - oreq):
            what = "new required field" if f not in op else "field made required"
            problems.append(f"{name}.{f}: {what}")
    return [
        f"{p} without a new schema_version (now {new.get(_SCHEMA_VERSION_KEY)})" for p in problems
    ]


_raw_object = msgspec.json.Decoder(dict[str, msgspec.Raw])


def unknown_fields(event: msgspec.Struct, data: bytes) -> bytes | None:
    """The fields of ``data`` (the bytes ``event`` was decoded from) that ``event``'s type
    does not know, as a JSON object of their original JSON values, or None when there are
    none. Cheap for the common record: re-encoding the known fields is the shortest form of
    them, so a record no longer than that has no other field."""
    if len(data) <= len(_encoder.encode(event)):
        return None
    doc = _raw_object.decode(data)
    known = event.__struct_fields__
    extra = {k: v for k, v in doc.items() if k not in known}
    return _encoder.encode(extra) if extra else None
