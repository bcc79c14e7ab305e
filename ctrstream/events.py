"""Event schemas and the one codec every producer and consumer uses.

Wire format: UTF-8 JSON objects, one per Kafka record, decoded strictly with msgspec:
wrong types, missing fields, unknown fields, unknown schema versions and oversized
payloads are rejected with a precise reason (``DecodeError.reason``); nothing is guessed.

Kafka keys: both ``impressions`` and ``clicks`` are keyed by the **impression id** and
produced with the same partitioner (``murmur2_random``, the Java client's default), and the
two topics have the same partition count. A click therefore lands in the same partition
number as its impression, so a join keyed by impression id needs no repartitioning, and
event-time order per key is the order within one partition.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})
MAX_EVENT_BYTES = 4096

DeviceType = Literal["mobile", "desktop", "tablet", "ctv"]


class Impression(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
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


class Click(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
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
