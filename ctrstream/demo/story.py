"""The demo's life of the system after the first model: the offline loop and the decay monitor
running next to the closed loop (``ctrstream.demo.run``'s live phase).

While the closed loop serves, at every ``tick_s`` of its event time :meth:`Story.tick`:

* stops the demo's opening experiment once it has run ``experiment_h`` (the champion then
  serves alone, as in production between experiments);
* advances the controller (``ctrstream.controller``, in this process) until it waits: its
  clock is the archive's latest event time (the ``archive`` job runs beside it), its decay
  alarm the monitor's state in the store (the ``monitor`` job runs beside it, with the
  closed loop's decision logs as the oracle). A step that trains blocks the tick: the
  world's event time stands still meanwhile, so every run of one seed tells the same story
  whatever the machine's speed (the jobs catch up in the meantime);
* says when the loop may end: ``after_h`` of event time after the controller's first cycle
  finished (promoted or rolled back), at the latest at the live phase's end.

Every decision the controller takes is printed as it is taken; the report's timeline
(``ctrstream.demo.timeline``) reads them back from the audit log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOUR_MS = 3_600_000


@dataclass
class StoryConfig:
    """The story's knobs (``ctrstream demo --help``; docs/demo.md says why each default)."""

    experiment_h: float = 0.5  # the opening experiment's event time, from the cut-off
    tick_s: float = 300.0  # event time between two looks of the controller
    after_h: float = 0.15  # event time served after the controller's first cycle ended
    # the alarm's cycle trains on this much event time of labelled rows after the alarm (it
    # starts an attribution window after that, at the first cut-off that far after the alarm)
    alarm_min_train_h: float = 0.5
    warmup_h: float = 0.25  # first hours of the training window: feature history only
    # two arms: an even split gives the test the most power for the users it has
    share: float = 0.5  # the challenger's share in the controller's experiment
    # the controller's experiment decides on CTR: under the second-price auction revenue per
    # request is not monotone in ranking quality (docs/online-experiments.md, docs/demo.md)
    primary_metric: str = "ctr"
    alpha: float = 0.05
    shadow_min_s: float = 300.0
    shadow_max_s: float = 1800.0
    experiment_min_run_s: float = 900.0
    experiment_max_s: float = 1800.0
    monitor_window_min: float = 30.0
    # the baseline is the version's first hour: its first half-hour alone (the opening
    # experiment's 35 %) was low and noisy, and a window's noise over it raised a false alarm
    monitor_baseline_min: float = 60.0
    # the challenger learns from about half an hour of rows: one epoch is a handful of
    # gradient steps; its validation loss was lowest after 6 passes and rose from the 7th
    # (overfitting: docs/demo.md)
    challenger_epochs: int = 6

    def validate(self, drift_after_h: float | None) -> None:
        """Fail before the demo starts on settings the story cannot run with (ValueError,
        saying which option): the controller's, the challenger's epochs, and the market's
        shift, which must come after the monitor's baseline: before it, the decay monitor has
        nothing to compare the served version's gap with (``None``: a market that does not
        shift)."""
        self.controller_config(Path("."))
        if self.challenger_epochs < 1:
            raise ValueError(
                f"--challenger-epochs {self.challenger_epochs}: the challenger needs at least "
                "one pass over its rows"
            )
        if drift_after_h is not None and drift_after_h * 60 < self.monitor_baseline_min:
            raise ValueError(
                f"the market shifts {drift_after_h:g} h into the closed loop, before the decay "
                f"monitor's {self.monitor_baseline_min:g}-minute baseline ends: give a larger "
                "--drift-after-h"
            )

    def controller_config(self, folder: Path) -> Any:
        """The controller's settings for the story (``ctrstream.controller.ControllerConfig``)."""
        from ctrstream.controller.cycle import ControllerConfig
        from ctrstream.experiments.design import Guardrails

        return ControllerConfig(
            folder=folder,
            model="ctr_deep",
            prefix="ctl",
            interval_h=24.0,  # no scheduled cycle within the demo: the alarm's is the story
            train_window_h=6.0,
            alarm_min_train_h=self.alarm_min_train_h,
            share=self.share,
            shadow_min_s=self.shadow_min_s,
            shadow_max_s=self.shadow_max_s,
            experiment_max_s=self.experiment_max_s,
            min_run_s=self.experiment_min_run_s,
            alpha=self.alpha,
            primary_metric=self.primary_metric,
            # a micro-batched ad server on the shared 2-core machine answers in about a
            # second (the opening experiment's guardrail, ctrstream.demo.run)
            guardrails=Guardrails(latency_p99_ms_max=5_000.0),
        ).validate()


@dataclass
class Story:
    """Drives the controller next to the closed loop (see the module doc)."""

    settings: Any
    cfg: StoryConfig
    folder: Path  # the controller's state and audit log
    t_split: int  # the first model's cut-off: the closed loop starts there
    opening: str | None  # the opening experiment's name (stopped after experiment_h)
    log: Callable[[str], None] = print
    # called at every tick: the demo restarts a job that died (as `ctrstream run` would)
    keepalive: Callable[[], None] | None = None
    controller: Any = None
    next_tick_ms: int | None = None
    end_after_ms: int | None = None  # the loop may end here (set once a cycle finished)
    opening_stopped_ms: int | None = None
    statuses: list[dict] = field(default_factory=list)
    controller_s: float = 0.0  # wall seconds the controller's steps took
    _printed: int = 0

    def start(self) -> None:
        from ctrstream.controller.cycle import Controller
        from ctrstream.controller.operations import StackOperations

        c = self.cfg
        ops = StackOperations(
            self.settings, kind="deep", epochs=c.challenger_epochs, warmup_hours=c.warmup_h
        )
        self.controller = Controller(c.controller_config(self.folder), ops)
        self.next_tick_ms = self.t_split + int(c.tick_s * 1000)

    @property
    def audit_path(self) -> Path:
        return self.folder / "audit.jsonl"

    def _print_new_decisions(self) -> None:
        recs = self.controller.audit.records()
        for r in recs[self._printed :]:
            self.log(
                f"controller c{r.get('cycle')} {r['kind']} at event time "
                f"{_clock(r.get('at_ms'))}: {r.get('why', '')}"
            )
        self._printed = len(recs)

    def tick(self, t_ms: int) -> None:
        """Called after every step of the loop with its event time (see the module doc)."""
        if self.next_tick_ms is None or t_ms < self.next_tick_ms:
            return
        self.next_tick_ms = t_ms + int(self.cfg.tick_s * 1000)
        if self.keepalive is not None:
            self.keepalive()
        if (
            self.opening is not None
            and self.opening_stopped_ms is None
            and t_ms >= self.t_split + int(self.cfg.experiment_h * HOUR_MS)
        ):
            from ctrstream.loop import session

            session.stop(self.settings, self.opening, "the demo's opening experiment ended")
            self.opening_stopped_ms = t_ms
            self.log(f"opening experiment {self.opening} stopped at {_clock(t_ms)}")
        w0 = time.monotonic()
        status = self.controller.run_until_waiting(stop=threading.Event())
        self.controller_s += time.monotonic() - w0
        st = self.controller.state
        self.statuses.append({"t_ms": t_ms, "status": status, "cycles": st.cycles_finished})
        self._print_new_decisions()
        if self.end_after_ms is None and st.cycles_finished >= 1:
            self.end_after_ms = t_ms + int(self.cfg.after_h * HOUR_MS)
            self.log(
                f"the controller's first cycle ended at {_clock(t_ms)}: serving "
                f"{self.cfg.after_h:g} h more"
            )

    def done(self, t_ms: int) -> bool:
        return self.end_after_ms is not None and t_ms >= self.end_after_ms

    def experiment_names(self) -> list[str]:
        """The experiments the controller started (shadow and experiment of every cycle)."""
        names = []
        for r in self.controller.audit.records():
            if r["kind"] in ("shadow_started", "experiment_started"):
                data = r.get("data") or {}
                name = data.get("name") or data.get("experiment")
                if name:
                    names.append(str(name))
        return names

    def summary(self) -> dict:
        st = self.controller.state
        return {
            "audit": str(self.audit_path),
            "cycles_finished": st.cycles_finished,
            "cycle_in_progress": None if st.cycle is None else st.cycle.number,
            "opening_stopped_ms": self.opening_stopped_ms,
            "controller_s": round(self.controller_s, 1),
            "experiments": self.experiment_names(),
            "last_status": self.statuses[-1] if self.statuses else None,
        }


def _clock(t_ms: int | None) -> str:
    return "-" if t_ms is None else time.strftime("%H:%M", time.gmtime(t_ms / 1000))


def drift_at_for(history_h: float, drift_after_h: float, hours: float) -> float:
    """The scenario's ``drift_at`` (fraction of its span) that puts the market's shift
    ``drift_after_h`` hours into the closed loop, which starts after ``history_h``."""
    at = (history_h + drift_after_h) / hours
    if not 0 < at < 1:
        raise ValueError(
            f"the drift at {history_h + drift_after_h:g} h is outside the scenario's "
            f"{hours:g} h: give more --hours or a smaller --drift-after-h"
        )
    return at


__all__ = ["Story", "StoryConfig", "drift_at_for"]
