"""The closed loop's events into Kafka: impressions and predictions as they are decided,
clicks when their event time has passed.

The records are the open loop's (``ctrstream.events``): an impression keyed by its id, with
the request id, the arm and the price the advertiser pays if it is clicked; a click keyed by
its impression id; a prediction per shown impression and scoring model (the deciding arm's
and every shadow's), keyed by impression id, carrying the model name, version and arm - the
calibrate job learns each model's calibrator from these. Record timestamps are event times.
The producer is the shared idempotent one; ids are deterministic, so a batch produced again
after a crash is deduplicated by the speed layer like any other copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Producer

from ctrstream.config import Settings
from ctrstream.events import Click, Impression, Prediction, encode
from ctrstream.kafka.clients import producer_config


class EmitError(RuntimeError):
    pass


@dataclass
class _Pending:
    """Clicks decided by the world, not yet due: sorted by event time."""

    t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    values: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value), t-order

    def add(self, t: np.ndarray, records: list[tuple[bytes, bytes]]) -> None:
        if not len(t):
            return
        allt = np.concatenate([self.t, t])
        o = np.argsort(allt, kind="stable")
        both = self.values + records
        self.t = allt[o]
        self.values = [both[i] for i in o]

    def arrays(self) -> dict[str, np.ndarray]:
        """The pending clicks as plain arrays (a checkpoint: data, never code)."""
        keys = [k for k, _ in self.values]
        vals = [v for _, v in self.values]
        return {
            "t": self.t,
            "key_len": np.array([len(k) for k in keys], dtype=np.int64),
            "keys": np.frombuffer(b"".join(keys), dtype=np.uint8),
            "value_len": np.array([len(v) for v in vals], dtype=np.int64),
            "values": np.frombuffer(b"".join(vals), dtype=np.uint8),
        }

    @staticmethod
    def _split(blob: np.ndarray, lens: np.ndarray) -> list[bytes]:
        data = blob.tobytes()
        ends = np.cumsum(lens)
        return [data[e - n : e] for e, n in zip(ends.tolist(), lens.tolist())]

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> _Pending:
        keys = cls._split(a["keys"], a["key_len"])
        vals = cls._split(a["values"], a["value_len"])
        return cls(np.asarray(a["t"], dtype=np.int64).copy(), list(zip(keys, vals)))

    def take(self, before_ms: int) -> tuple[np.ndarray, list[tuple[bytes, bytes]]]:
        k = int(np.searchsorted(self.t, before_ms, side="left"))
        t, v = self.t[:k], self.values[:k]
        self.t, self.values = self.t[k:], self.values[k:]
        return t, v


class Emitter:
    def __init__(self, settings: Settings, producer: Producer | None = None):
        self.settings = settings
        self.errors: list[str] = []
        self.producer = producer or Producer(
            producer_config(settings, on_delivery=self._on_delivery)
        )
        self.pending = _Pending()
        self.sent = {"impressions": 0, "clicks": 0, "predictions": 0}
        self.max_event_ms = -1  # the latest event time produced (the no-leakage guard)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def _produce(self, topic: str, key: bytes, value: bytes, ts: int) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, timestamp=int(ts))
                return
            except BufferError:
                self.producer.poll(0.05)

    def impressions(self, imps: list[Impression]) -> None:
        topic = self.settings.topics.impressions.name
        for i in imps:
            self._produce(topic, i.impression_id.encode(), encode(i), i.event_time_ms)
            self.max_event_ms = max(self.max_event_ms, i.event_time_ms)
        self.sent["impressions"] += len(imps)
        self.producer.poll(0)

    def predictions(self, preds: list[Prediction]) -> None:
        topic = self.settings.topics.predictions.name
        for p in preds:
            self._produce(topic, p.impression_id.encode(), encode(p), p.event_time_ms)
        self.sent["predictions"] += len(preds)
        self.producer.poll(0)

    def schedule_clicks(self, clicks: list[Click]) -> None:
        t = np.array([c.event_time_ms for c in clicks], dtype=np.int64)
        self.pending.add(t, [(c.impression_id.encode(), encode(c)) for c in clicks])

    def clicks_due(self, before_ms: int) -> int:
        """Produce every scheduled click with event time before ``before_ms``."""
        t, recs = self.pending.take(before_ms)
        topic = self.settings.topics.clicks.name
        for ts, (k, v) in zip(t.tolist(), recs):
            self._produce(topic, k, v, ts)
            self.max_event_ms = max(self.max_event_ms, ts)
        self.sent["clicks"] += len(recs)
        self.producer.poll(0)
        return len(recs)

    def next_click_ms(self) -> int | None:
        return int(self.pending.t[0]) if len(self.pending.t) else None

    def flush(self, timeout_s: float = 60.0) -> None:
        left = self.producer.flush(timeout_s)
        if left or self.errors:
            raise EmitError(
                f"{left} records not acknowledged by Kafka within {timeout_s:g} s and "
                f"{len(self.errors)} failed ({self.errors[:3]}): is the broker up "
                f"({self.settings.kafka.bootstrap_servers})? `ctrstream stack status` says"
            )


__all__ = ["Emitter", "EmitError"]
