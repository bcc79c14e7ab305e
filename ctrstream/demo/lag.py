"""The lag of each stage behind the replay, sampled while the demo's replay phases run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import TopicPartition

from ctrstream.config import Settings, Topic
from ctrstream.kafka.clients import make_consumer
from ctrstream.stack.scrape import scrape_or_empty

SCORER = "scorer"
SPEED_STAGES = {"speed layer (features)": "speed-features", "speed layer (join)": "speed-join"}


class LagMonitor:
    """Consumer lag of each stage, sampled every ``interval`` s while a replay phase runs.

    Lag = records in the stage's input topics (Kafka high watermarks) minus records the stage
    has read (``ctrstream_speed_events_in_total`` of its metrics endpoint); for the scorer,
    live impressions appended to Kafka minus predictions written. The stage is scraped before
    Kafka is asked, so a sample never under-states the lag. ``summary()`` gives, per phase and
    stage, the largest lag, the lag when the replay ended, and how long after the end of the
    replay the stage had read everything (the time it trailed the replay).

    ``ports``: each job's metrics port (``speed-features``, ``speed-join``);
    ``running(job)``: whether the job's process is alive (a job that is running but whose
    endpoint is not up yet has read nothing so far)."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        ports: dict[str, int],
        running: Callable[[str], bool],
        interval: float = 0.25,
    ):
        self.settings, self.ports, self.running, self.interval = settings, ports, running, interval
        self.consumer = make_consumer(settings, group)
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []  # {"t": s since t0, "phase": name, stage: lag, ...}
        self.phases: dict[
            str, dict[str, float]
        ] = {}  # name -> {"start", "replay_end", "end"} (s since t0)
        self.phase: str | None = None
        self.scorer: tuple[int, int] | None = None  # (impressions before the live replay, expected)
        self.up: set[str] = set()  # stages whose metrics endpoint answered once
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="demo-lag", daemon=True)
        self.thread.start()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _end(self, topic: Topic) -> int:
        return sum(
            max(0, self.consumer.get_watermark_offsets(TopicPartition(topic.name, p), timeout=5)[1])
            for p in range(topic.partitions)
        )

    def impressions_end(self) -> int:
        with self.lock:
            return self._end(self.settings.topics.impressions)

    def sample(self) -> None:
        with self.lock:
            phase = self.phase
            if phase is None:
                return
            topics = self.settings.topics
            t = self._now()
            read: dict[str, float | None] = {}
            for stage, job in SPEED_STAGES.items():
                n = scrape_or_empty(self.ports[job]).get("ctrstream_speed_events_in_total")
                if n is not None:
                    self.up.add(stage)
                elif stage not in self.up and self.running(job):
                    n = 0  # started, metrics endpoint not up yet: it has read nothing so far
                read[stage] = n  # None: a scrape failed (busy); no sample rather than a wrong one
            row: dict[str, Any] = {"t": t, "phase": phase}
            if self.scorer is not None:
                base, expected = self.scorer
                preds = self._end(topics.predictions)
                live = min(max(0, self._end(topics.impressions) - base), expected)
                row[SCORER] = max(0, live - preds)
            written = self._end(topics.impressions) + self._end(topics.clicks)
            for stage, n in read.items():
                if n is not None:
                    row[stage] = max(0, written - int(n))
            self.samples.append(row)

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a missed sample is not a reason to stop the demo
                pass

    def begin(self, phase: str) -> None:
        with self.lock:
            self.phases[phase] = {"start": self._now()}
            self.phase = phase

    def replay_ended(self, phase: str) -> None:
        self.phases[phase]["replay_end"] = self._now()

    def end(self, phase: str) -> None:
        try:
            self.sample()
        except Exception:  # noqa: BLE001 - a missed last sample is not a reason to stop the demo
            pass
        with self.lock:
            self.phases[phase]["end"] = self._now()
            self.phase = None
            if phase == "live":
                self.scorer = None

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
        with self.lock:
            self.consumer.close()

    def summary(self) -> dict[str, Any]:
        """``rows`` (one per phase and stage) and ``series`` (per phase: seconds since the
        phase began, replay end, and each stage's lag samples) for the report."""
        rows: list[dict[str, Any]] = []
        series: dict[str, Any] = {}
        for phase, info in self.phases.items():
            samples = [s for s in self.samples if s["phase"] == phase]
            end = info.get("replay_end")
            ser: dict[str, Any] = {
                "replay_end": None if end is None else end - info["start"],
                "stages": {},
            }
            for stage in (*SPEED_STAGES, SCORER):
                pts = [(s["t"], s[stage]) for s in samples if stage in s]
                if not pts:
                    continue
                ser["stages"][stage] = ([t - info["start"] for t, _ in pts], [v for _, v in pts])
                after = [(t, v) for t, v in pts if end is not None and t >= end]
                caught = next((round(t - end, 2) for t, v in after if v == 0), None)
                rows.append(
                    {
                        "stage": stage,
                        "phase": phase,
                        "samples": len(pts),
                        "max lag (records)": max(v for _, v in pts),
                        "lag at replay end": after[0][1] if after else None,
                        "final lag": pts[-1][1],
                        "caught up (s after replay)": caught,
                    }
                )
            series[phase] = ser
        return {"rows": rows, "series": series, "interval_s": self.interval}
