"""Event schemas and the one codec every producer and consumer uses.

Wire format: UTF-8 JSON objects, one per Kafka record, decoded strictly with msgspec:
wrong types, missing fields, unknown schema versions and oversized
payloads are rejected with a precise reason (``DecodeError.reason``); nothing is guessed.

Kafka keys: both ``impressions`` and ``clicks`` are keyed by the **impression id** and
produced with the same partitioner (``murmur2_random``, the Java client's default), and the
two topics have the same partition count. A click therefore lands in the same partition
number as its impression, so a join keyed by impression id needs no repartitioning, and
event-time order per key is the order within one partition. The speed layer enforces the
contract: a record whose key is not its impression id (:func:`key_error`) or that is not in
its key's partition (:func:`partition_error`) is a dead letter, so deduplication per
partition holds whatever client produced it.
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
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# event times are milliseconds since the epoch before the year 10000 (what a date can show)
MAX_EVENT_TIME_MS = 253_402_300_800_000

DeviceType = Literal["mobile", "desktop", "tablet", "ctv"]


class Impression(msgspec.Struct, frozen=True, omit_defaults=True):
    """One ad shown to one user (the unit of prediction).

    The last three fields are optional (the forward-compatibility rule: same
    ``schema_version``) and written only when set (``omit_defaults``): the closed loop's ad
    server fills them; the open-loop generator leaves them at their defaults, so its records
    are the bytes they always were."""

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
    request_id: str = ""  # the ad request that showed it ("" : open-loop traffic)
    arm: str = ""  # the experiment arm that decided it ("" : none)
    price: float = 0.0  # what the advertiser pays if it is clicked (cost per click)


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


class Prediction(msgspec.Struct, frozen=True, omit_defaults=True):
    """One model's score of one impression. ``model_name`` (the published base name, e.g.
    ``ctr_lr``) and ``arm`` are optional (same ``schema_version``, written only when set): a
    prediction without a model name is calibrated under its version alone, as records written
    before the name existed are."""

    impression_id: str
    event_time_ms: int
    model_version: str
    raw_score: float
    calibrated_score: float
    degraded: bool
    model_name: str = ""  # the published base name of the model that scored it
    arm: str = ""  # the experiment arm it was scored for ("" : none)


class DeadLetter(msgspec.Struct, frozen=True):
    """One rejected record: why, where it came from, and its original key and value.

    On the ``dlq`` topic it follows Kafka Connect's dead-letter convention
    (:mod:`ctrstream.kafka.deadletters`): the record's value and key are the original ones,
    unchanged (a null value stays null), and the rest travels in ``__connect.errors.*``
    headers. ``job`` names the consuming job that rejected it (Connect's connector name),
    so one bad record read by several jobs has one dead letter per job."""

    reason: str
    source_topic: str
    partition: int
    offset: int
    original: bytes | None
    stage: str = "decode"
    key: bytes | None = None
    job: str = ""


class DecodeError(ValueError):
    """A record that cannot be decoded; ``reason`` says exactly why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _int_fields(struct: type) -> tuple[str, ...]:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return tuple(f.name for f in info.fields if isinstance(f.type, msgspec.inspect.IntType))


_INT_FIELDS = {Impression: _int_fields(Impression), Click: _int_fields(Click)}
_encoder = msgspec.json.Encoder()
_imp_decoder = msgspec.json.Decoder(Impression)
_click_decoder = msgspec.json.Decoder(Click)
_labeled_decoder = msgspec.json.Decoder(Labeled)
_pred_decoder = msgspec.json.Decoder(Prediction)


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
    if not 0 < ev.event_time_ms < MAX_EVENT_TIME_MS:
        raise DecodeError(
            f"invalid event_time_ms {ev.event_time_ms}: must be > 0 and < {MAX_EVENT_TIME_MS} "
            "(milliseconds since the epoch)"
        )
    if not ev.impression_id:
        raise DecodeError("invalid: impression_id is empty")
    if isinstance(ev, Click) and not ev.click_id:
        raise DecodeError("invalid: click_id is empty")
    for name in _INT_FIELDS[type(ev)]:
        v = getattr(ev, name)
        if not INT64_MIN <= v <= INT64_MAX:
            raise DecodeError(f"invalid: {name}={v} does not fit in a signed 64-bit integer")


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes | None) -> Any:
    """Decode and validate one record; ANY failure caused by its bytes is a ``DecodeError``
    with the reason (msgspec's own errors, and what escapes them: invalid UTF-8 inside a
    string raises ``UnicodeDecodeError``, a nesting too deep ``RecursionError``)."""
    if data is None:
        raise DecodeError("empty record: value is null")
    _check_size(data)
    try:
        ev = decoder.decode(data)
    except msgspec.ValidationError as e:
        raise DecodeError(f"invalid: {e}") from None
    except msgspec.DecodeError as e:
        raise DecodeError(f"malformed JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise DecodeError(f"malformed JSON: invalid UTF-8 at byte {e.start}: {e.reason}") from None
    except Exception as e:  # noqa: BLE001 - whatever a record's bytes raise, it is that record's
        raise DecodeError(f"malformed: {type(e).__name__}: {e}") from None
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


def check_labeled(lb: Labeled) -> None:
    """Raise ``ValueError`` with the reason when a decoded joined label cannot be used (a
    consumer of the labeled topic learns from, or measures on, valid labels only)."""
    if lb.clicked not in (0, 1):
        raise ValueError(f"invalid: clicked={lb.clicked!r} must be 0 or 1")
    if not lb.impression.impression_id:
        raise ValueError("invalid: impression_id is empty")


def bad_record_reason(e: Exception) -> str:
    """The dead-letter reason of a record whose decoding or checking raised ``e``."""
    if isinstance(e, msgspec.ValidationError):
        return f"invalid: {e}"
    if isinstance(e, msgspec.DecodeError | UnicodeDecodeError):
        return f"malformed JSON: {e}"
    if isinstance(e, ValueError):
        return str(e)
    return f"malformed: {type(e).__name__}: {e}"


def key_of(event: Impression | Click) -> bytes:
    """The Kafka key: the impression id (see the module docstring)."""
    return event.impression_id.encode()


def key_error(key: bytes | None, event: Impression | Click) -> str | None:
    """Why ``key`` breaks the key contract for ``event`` (None when it holds): the key of an
    impression or a click is its impression id, which is what keeps every copy of an event
    in one partition, where deduplication sees them."""
    want = key_of(event)
    if key == want:
        return None
    got = "no key" if key is None else f"key {key[:64]!r}"
    return (
        f"wrong key: {got}, expected the impression id {want!r} (the Kafka key of an "
        "impression or a click must be its impression id: produce it with that key)"
    )


# The Kafka producer partitioner that keeps a click in its impression's partition number.
PARTITIONER = "murmur2_random"

_M32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of ``data`` as an unsigned 32-bit integer (the Java client's
    ``Utils.murmur2``, which ``murmur2_random`` reproduces)."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & _M32
    n4 = length // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & _M32
        k ^= k >> 24
        k = (k * m) & _M32
        h = ((h * m) & _M32) ^ k
    tail = data[4 * n4 :]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & _M32
    h ^= h >> 13
    h = (h * m) & _M32
    h ^= h >> 15
    return h


def partition_for(key: bytes, n_partitions: int) -> int:
    """The partition ``PARTITIONER`` puts a record with ``key`` in (Java's default)."""
    return (murmur2(key) & 0x7FFFFFFF) % n_partitions


def partition_error(key: bytes, partition: int, n_partitions: int) -> str | None:
    """Why a record with ``key`` does not belong in ``partition`` (None when it does): every
    copy of an event, and a click with its impression, must meet in one partition."""
    want = partition_for(key, n_partitions)
    if want == partition:
        return None
    return (
        f"wrong partition: key {key[:64]!r} belongs in partition {want} of {n_partitions} "
        f"(Kafka's default murmur2 partitioner), not {partition}: produce with partitioner "
        f"{PARTITIONER} (kcat: -X partitioner={PARTITIONER})"
    )


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
