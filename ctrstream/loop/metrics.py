"""Prometheus metrics of the closed loop, labelled by experiment and arm.

Counters follow Prometheus' naming habits (``_total``, base units: seconds, the currency of
the bids for revenue); a dashboard derives CTR as ``rate(clicks) / rate(impressions)`` and
revenue per request as ``rate(revenue) / rate(requests)`` per arm. The simulator-only truth
(expected clicks and revenue from the true click probability) is exported beside them with
``expected`` in the name, so an alert or a panel can compare an arm with its truth.
"""

from __future__ import annotations

from typing import Any

_M: dict[str, Any] | None = None


def loop_metrics() -> dict[str, Any]:
    """The process' metric objects (created once; the default registry)."""
    global _M
    if _M is None:
        from prometheus_client import Counter, Gauge, Histogram

        labels = ["experiment", "arm"]
        _M = {
            "requests": Counter("ctrstream_loop_requests_total", "ad requests decided", labels),
            "slots": Counter("ctrstream_loop_slots_total", "ad slots asked for", labels),
            "impressions": Counter("ctrstream_loop_impressions_total", "ads shown", labels),
            "clicks": Counter(
                "ctrstream_loop_clicks_total", "clicks credited (event time passed)", labels
            ),
            "revenue": Counter(
                "ctrstream_loop_revenue_total", "what advertisers paid for clicks", labels
            ),
            "expected_clicks": Counter(
                "ctrstream_loop_expected_clicks_total",
                "sum of the true click probability of the shown ads (simulator truth)",
                labels,
            ),
            "expected_revenue": Counter(
                "ctrstream_loop_expected_revenue_total",
                "sum of true probability x price of the shown ads (simulator truth)",
                labels,
            ),
            "predicted_clicks": Counter(
                "ctrstream_loop_predicted_clicks_total",
                "sum of the deciding model's calibrated pCTR at the shown slot",
                labels,
            ),
            "errors": Counter(
                "ctrstream_loop_request_errors_total", "requests answered degraded", labels
            ),
            "latency": Histogram(
                "ctrstream_loop_ranking_seconds",
                "ranking latency per request (its batch's time, features to auction)",
                labels,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            ),
            "event_time": Gauge(
                "ctrstream_loop_event_time_seconds", "the loop's event-time clock", ["experiment"]
            ),
            "arm_running": Gauge(
                "ctrstream_loop_arm_running", "1 while the arm decides, 0 once stopped", labels
            ),
            "serving": Gauge(
                "ctrstream_loop_serving",
                "1 for the experiment the following loop serves now, 0 once it left it",
                ["experiment"],
            ),
            "switches": Counter(
                "ctrstream_loop_switches_total",
                "experiments the following loop switched to (the registry's running one)",
            ),
            "decided": Gauge(
                "ctrstream_experiment_decided",
                "1 once the sequential test decided this arm against the control",
                labels,
            ),
        }
    return _M


__all__ = ["loop_metrics"]
