"""The traffic's tables and records: their schemas, and events encoded as the codec does.

Shared by the generator, the replay plan (:mod:`ctrstream.simulation.dirty`) and the
traffic container (:mod:`ctrstream.simulation.traffic`).
"""

from __future__ import annotations

import msgspec
import numpy as np
import pyarrow as pa

from ctrstream.events import Click, Impression


def _required(struct: type[msgspec.Struct]) -> tuple[str, ...]:
    """The fields of ``struct`` without a default, in order: the open-loop traffic's columns
    (optional fields, such as an impression's ``request_id``/``arm``/``price`` that the
    closed loop fills, stay at their defaults and are not written)."""
    n = len(struct.__struct_fields__) - len(struct.__struct_defaults__)
    return struct.__struct_fields__[:n]


IMPRESSION_FIELDS: tuple[str, ...] = _required(Impression)
CLICK_FIELDS: tuple[str, ...] = _required(Click)
_STRING_FIELDS = {"impression_id", "click_id", "device_type", "country"}

IMPRESSION_SCHEMA = pa.schema(
    [(f, pa.string() if f in _STRING_FIELDS else pa.int64()) for f in IMPRESSION_FIELDS]
)
CLICK_SCHEMA = pa.schema(
    [(f, pa.string() if f in _STRING_FIELDS else pa.int64()) for f in CLICK_FIELDS]
)
ORACLE_SCHEMA = pa.schema([("impression_id", pa.string()), ("p_click", pa.float64())])
MALFORMED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("topic", pa.string()),
        ("kind", pa.string()),
        ("reason", pa.string()),
        ("timestamp_ms", pa.int64()),
        ("value", pa.binary()),
    ]
)

# What ctrstream.events' decoders say about each kind of injected malformed record
# (``DecodeError.reason`` starts with this).
EXPECTED_REASON = {
    "bad_json": "malformed JSON",
    "wrong_type": "invalid: Expected `int`, got `str`",
    "missing_field": "invalid: Object missing required field",
    "oversized": "oversized",
}

TOPIC_KINDS = ("impressions", "clicks")

TOPIC_KINDS = ("impressions", "clicks")
_ENCODER = msgspec.json.Encoder()  # same configuration as ctrstream.events.encode


def as_object(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def encode_rows(cols: list, rows: np.ndarray, cls) -> list[bytes]:
    """msgspec-encode the given rows of a table (columns pre-extracted), without a Python loop."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        lists = [
            c[lo:hi].to_pylist() if isinstance(c, pa.Array) else c[lo:hi].tolist() for c in cols
        ]
    else:
        idx = pa.array(rows)
        lists = [
            c.take(idx).to_pylist() if isinstance(c, pa.Array) else c[rows].tolist() for c in cols
        ]
    return list(map(_ENCODER.encode, map(cls, *lists)))
