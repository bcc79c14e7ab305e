"""The demo's story driver (``ctrstream.demo.story``) on a fake controller: when it looks,
when the loop may end, the job keep-alive, and where the scenario's drift goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ctrstream.demo.story import Story, StoryConfig, drift_at_for

MIN = 60_000
T0 = 1_767_600_000_000


@dataclass
class _State:
    cycles_finished: int = 0
    cycle: object = None


@dataclass
class _Audit:
    recs: list = field(default_factory=list)

    def records(self) -> list:
        return list(self.recs)


class _Controller:
    """Finishes its first cycle at the third look; logs one decision per look."""

    def __init__(self) -> None:
        self.state = _State()
        self.audit = _Audit()
        self.looks = 0

    def run_until_waiting(self, stop=None) -> str:
        self.looks += 1
        self.audit.recs.append({"kind": "k", "cycle": 1, "at_ms": T0, "why": f"look {self.looks}"})
        if self.looks == 3:
            self.audit.recs.append(
                {
                    "kind": "shadow_started",
                    "cycle": 1,
                    "at_ms": T0,
                    "why": "",
                    "data": {"experiment": "ctl-1-x-shadow"},
                }
            )
            self.state.cycles_finished = 1
        return "wait:shadow"


def _story(**kw) -> tuple[Story, list[str], list[int]]:
    said: list[str] = []
    alive: list[int] = []
    st = Story(
        settings=None,
        cfg=StoryConfig(tick_s=300.0, after_h=0.25, **kw),
        folder=Path("unused"),
        t_split=T0,
        opening=None,
        log=said.append,
        keepalive=lambda: alive.append(1),
    )
    st.controller = _Controller()
    st.next_tick_ms = T0 + 5 * MIN
    return st, said, alive


def test_the_controller_is_looked_at_every_tick_and_the_loop_ends_after_its_cycle():
    st, said, alive = _story()
    for t in range(T0 + MIN, T0 + 60 * MIN, MIN):  # the loop's one-minute steps
        st.tick(t)
        if st.done(t):
            break
    # looks at 5, 10, 15 min (the cycle ends at the third), then 15 min more of serving
    assert st.controller.looks == 6 and len(alive) == 6
    assert st.end_after_ms == T0 + 30 * MIN and t == T0 + 30 * MIN
    assert [s["t_ms"] for s in st.statuses][:3] == [T0 + 5 * MIN, T0 + 10 * MIN, T0 + 15 * MIN]
    assert sum("controller c1 k" in s for s in said) == 6  # each decision printed once
    assert st.experiment_names() == ["ctl-1-x-shadow"]
    summary = st.summary()
    assert summary["cycles_finished"] == 1 and summary["experiments"] == ["ctl-1-x-shadow"]


def test_no_cycle_no_end():
    st, _, _ = _story()
    st.controller.run_until_waiting = lambda stop=None: "idle"
    for t in range(T0 + MIN, T0 + 120 * MIN, MIN):
        st.tick(t)
        assert not st.done(t)


def test_drift_at_puts_the_shift_into_the_closed_loop():
    assert drift_at_for(3.0, 0.5, 6.0) == pytest.approx(3.5 / 6)
    with pytest.raises(ValueError, match="outside the scenario"):
        drift_at_for(3.0, 3.0, 6.0)


def test_the_story_configures_the_controller_and_checks_its_timing():
    """The controller's experiment decides on CTR at an even split by default; a shift before
    the monitor's baseline ends, a bad metric or no epochs fail before the demo starts."""
    cfg = StoryConfig()
    cc = cfg.controller_config(Path("ctl"))
    assert cc.primary_metric == "ctr" and cc.share == 0.5 and cc.alpha == 0.05
    assert cc.alarm_min_train_h == cfg.alarm_min_train_h and cc.model == "ctr_deep"
    assert cc.shadow_min_s == cfg.shadow_min_s and cc.min_run_s == cfg.experiment_min_run_s
    cfg.validate(1.0)  # the baseline is the first hour: a shift at 1 h is after it
    with pytest.raises(ValueError, match="before the decay monitor's 60-minute baseline"):
        cfg.validate(0.5)
    cfg.validate(None)  # a market that does not shift
    with pytest.raises(ValueError, match="primary-metric"):
        StoryConfig(primary_metric="clicks").validate(1.0)
    with pytest.raises(ValueError, match="challenger-epochs"):
        StoryConfig(challenger_epochs=0).validate(1.0)
