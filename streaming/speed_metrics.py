"""Prometheus metrics of the speed-layer dataflows.

The HTTP endpoint is started once per process on ``settings.metrics_port`` (0: disabled).
With several processes on one host (``-p N``, or both flows under one ``ctrstream speed``)
process ``k`` serves on ``metrics_port + k`` (``CTRSTREAM_SPEED_PROCESS_INDEX``, set by
``ctrstream speed``: the features flow's processes first, then the join's).
"""

from __future__ import annotations

import os
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS_IN = Counter(
    "ctrstream_speed_events_in_total",
    "Records read from Kafka (events, malformed records and heartbeats)",
    ["flow", "topic"],
)
ACCEPTED = Counter(
    "ctrstream_speed_events_accepted_total",
    "Events counted (decoded, on time, not a duplicate)",
    ["flow", "topic"],
)
DUPLICATES = Counter(
    "ctrstream_speed_duplicates_total", "Duplicate events counted once", ["flow", "topic"]
)
DLQ = Counter(
    "ctrstream_speed_dlq_total",
    "Records routed to the dead-letter topic",
    ["flow", "topic", "stage"],
)
CONTROL = Counter(
    "ctrstream_speed_control_records_total",
    "Control records (watermark heartbeats) by outcome: accepted, or rejected as unsigned, "
    "forged, malformed or replayed (those go to the dead-letter topic, stage control)",
    ["flow", "topic", "outcome"],
)
LATE = Counter(
    "ctrstream_speed_late_total", "Events later than the allowed lateness", ["flow", "topic"]
)
LAG = Gauge(
    "ctrstream_speed_consumer_lag",
    "High watermark minus next offset",
    ["flow", "topic", "partition"],
)
WATERMARK = Gauge(
    "ctrstream_speed_watermark_ms",
    "Event-time watermark of a partition",
    ["flow", "topic", "partition"],
)
FLUSH_SECONDS = Histogram(
    "ctrstream_speed_flush_seconds",
    "Latency of one Redis pipeline flush",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
FLUSH_CELLS = Counter("ctrstream_speed_flushed_cells_total", "Feature cells written to Redis")
FRESHNESS = Histogram(
    "ctrstream_speed_feature_freshness_seconds",
    "Kafka append time of a counted event to its value being visible in Redis",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
STATE_CELLS = Gauge(
    "ctrstream_speed_state_cells", "Open (entity, resolution, bucket) cells", ["shard"]
)
REDIS_RETRIES = Counter(
    "ctrstream_speed_redis_retries_total",
    "Failed attempts to send a flush to Redis (connection lost, refused or timed out, or Redis "
    "still loading its data); the flush is sent again after a back-off wait",
)
REDIS_LOSSES = Counter(
    "ctrstream_speed_redis_losses_total",
    "Times Redis came back without writes it had acknowledged (its writer marker behind)",
)
REDIS_REWRITTEN_CELLS = Counter(
    "ctrstream_speed_redis_rewritten_cells_total",
    "Open cells re-written from the job's state after Redis lost acknowledged writes",
)
REDIS_UNREPAIRED_CELLS = Counter(
    "ctrstream_speed_redis_unrepaired_cells_total",
    "Cells of buckets already closed (no longer in the job's state) that Redis may have lost "
    "and the job cannot re-write (reconciliation or a replay repairs them)",
)
JOIN_PENDING = Gauge(
    "ctrstream_speed_join_pending_impressions",
    "Impressions waiting for their attribution window to close",
    ["partition"],
)
LABELED = Counter("ctrstream_speed_labeled_total", "Labeled impressions emitted", ["clicked"])

_started = False
_lock = threading.Lock()


def serve(port: int, host: str = "127.0.0.1") -> int | None:
    """Start the metrics endpoint of this process once on ``host``; returns the port (None:
    disabled)."""
    global _started
    if not port:
        return None
    with _lock:
        if _started:
            return None
        _started = True
    port = port + int(os.environ.get("CTRSTREAM_SPEED_PROCESS_INDEX", "0"))
    start_http_server(port, addr=host)
    return port
