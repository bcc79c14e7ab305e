"""Feature freshness as the demo measures it: Kafka to Redis, for sampled impressions."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from confluent_kafka import TopicPartition

from ctrstream import features as F
from ctrstream.config import Settings
from ctrstream.kafka.clients import make_consumer, topic_end_offsets
from ctrstream.store.connection import redis_client
from ctrstream.store.speed_view import Cell, read_speed_cells


class FreshnessProbe:
    """Feature freshness as the demo can measure it on a time-compressed replay: the wall
    time from a sampled impression becoming readable in Kafka (seen by a consumer of the
    impressions topic) to its count being visible in Redis (the impression count of its user
    and 1-minute bucket in the speed view >= 1, polled every ``poll_s``).

    The probes are impressions of the scenario itself (nothing extra is produced): ones that
    are alone in their (user, 1-minute bucket) cell over the whole stream, so their cell
    appears in Redis only because of them. The speed layer's own freshness histogram
    (now - Kafka timestamp) is useless here: the replay's Kafka timestamps are historical,
    time-compressed event times."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        tr: Any,
        lo: int | None,
        hi: int | None,
        n_probes: int,
        poll_s: float = 0.005,
    ):
        self.poll_s = poll_s
        self.probes = self._select(tr, lo, hi, n_probes)
        self.arrived: dict[bytes, float] = {}
        self.visible: dict[bytes, float] = {}
        topic = settings.topics.impressions.name
        self.consumer = make_consumer(settings, group, **{"fetch.wait.max.ms": 10})
        self.consumer.assign(
            [TopicPartition(topic, p, off) for p, off in topic_end_offsets(settings, topic).items()]
        )
        self.redis = redis_client(settings, timeout_s=30.0)
        self.stop_event = threading.Event()
        self.threads = [
            threading.Thread(target=f, name=f"demo-fresh-{f.__name__}", daemon=True)
            for f in (self._consume, self._poll)
        ]
        for t in self.threads:
            t.start()

    @staticmethod
    def _select(tr: Any, lo: int | None, hi: int | None, n: int) -> dict[bytes, Cell]:
        imps = tr.impressions
        t = imps.column("event_time_ms").to_numpy()
        u = imps.column("user_id").to_numpy().astype(np.int64)
        res = F.RESOLUTIONS[0]
        b = F.bucket_of(t, res).astype(np.int64)
        b0, nb = int(b.min()), int(b.max() - b.min()) + 1
        cell = (u - int(u.min())) * nb + (b - b0)
        _, inv, cnt = np.unique(cell, return_inverse=True, return_counts=True)
        ok = cnt[inv] == 1
        if lo is not None:
            ok &= t >= lo
        if hi is not None:
            ok &= t < hi
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(t[idx], kind="stable")]
        if len(idx) > n:
            idx = idx[np.unique(np.linspace(0, len(idx) - 1, n).astype(int))]
        ids = imps.column("impression_id").take(idx).to_pylist()
        user = F.ENTITY_BY_NAME["user"]
        return {
            i.encode(): (
                user.name,
                F.entity_id(user, {"user_id": int(u[k])}),
                res.name,
                "i",
                int(b[k]),
            )
            for i, k in zip(ids, idx.tolist())
        }

    def _consume(self) -> None:
        while not self.stop_event.is_set():
            msgs = self.consumer.consume(num_messages=1000, timeout=0.05)
            now = time.monotonic()
            for m in msgs:
                k = m.key() if m.error() is None else None
                if k in self.probes and k not in self.arrived:
                    self.arrived[k] = now

    def _poll(self) -> None:
        while not self.stop_event.is_set():
            pending = [k for k in list(self.arrived) if k not in self.visible]
            if pending:
                values = read_speed_cells(self.redis, [self.probes[k] for k in pending])
                now = time.monotonic()
                for k, v in zip(pending, values):
                    if v >= 1:
                        self.visible[k] = now
            time.sleep(self.poll_s)

    def close(self) -> None:
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=10)
        self.consumer.close()
        self.redis.close()

    def finish(self, grace_s: float = 5.0) -> dict[str, Any]:
        """Stop (after at most ``grace_s`` for the probes already in Kafka to show up)."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and len(self.visible) < len(self.arrived):
            time.sleep(0.05)
        self.close()
        lat = np.array([self.visible[k] - self.arrived[k] for k in self.visible], dtype=float)
        lat = np.maximum(lat, 0.0)
        out: dict[str, Any] = {
            "probes": len(self.probes),
            "seen in Kafka": len(self.arrived),
            "visible in Redis": len(lat),
            "poll_s": self.poll_s,
            "latencies": lat.tolist(),
        }
        if len(lat):
            out.update(
                {
                    "p50 s": float(np.percentile(lat, 50)),
                    "p95 s": float(np.percentile(lat, 95)),
                    "max s": float(lat.max()),
                }
            )
        return out
