"""The controller's state machine on a fake stack (``tests/controller_world.py``): a cycle
that promotes, one rolled back by a guardrail, one rolled back by the sequential test, a
failed gate, and ``kill -9`` at every step: the resumed controller finishes the cycle with
no side effect doubled and no decision lost or logged twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from controller_world import CLOCK, FakeOps, World, config, drive

from ctrstream.controller.audit import AuditLog
from ctrstream.controller.cycle import KILL_ENV, STEPS, Controller
from ctrstream.controller.gate import GateRule, offline_gate

WORLD = Path(__file__).resolve().parents[1] / "controller_world.py"

PROMOTED = [
    "cycle_started",
    "archive_caught_up",
    "view_switched",
    "reconciled",
    "trained",
    "gate_passed",
    "challenger_published",
    "shadow_started",
    "shadow_passed",
    "experiment_started",
    "experiment_decided",
    "promoted",
    "cycle_finished",
]


def kinds(folder: Path) -> list[str]:
    return [r["kind"] for r in AuditLog(folder / "controller" / "audit.jsonl").records()]


def check_promoted(folder: Path) -> None:
    """One cycle, promoted once: the audit log and the served state."""
    recs = AuditLog(folder / "controller" / "audit.jsonl").records()
    assert [r["kind"] for r in recs] == PROMOTED
    assert len({r["key"] for r in recs}) == len(recs)
    w = World(folder).load()
    assert w["view_builds"] == 1 and w["trains"] == 1
    assert w["published"] == [
        ["ctr_lr_challenger", "c1-challenger", 1],
        ["ctr_lr", "c1-promoted", 2],
    ]
    assert w["served"]["ctr_lr"] == 2
    assert w["pins"] == {}  # the cycle's pins are gone
    assert w["calibrators"] == [["ctr_lr_challenger", 1, "ctr_lr", 2]]
    ops = FakeOps(folder)
    assert [r.status for r in ops.registry.list()] == ["stopped", "stopped"]
    assert recs[0]["why"].startswith("decay alarm")
    assert recs[-2]["data"] == {"version": 2, "calibrator_followed": True}


def test_a_better_challenger_is_promoted(tmp_path):
    ctl = drive(tmp_path, "up")
    check_promoted(tmp_path)
    assert (
        ctl.state.cycle is None
        and ctl.state.history[0]["cutoff_ms"] == ctl.state.history[0]["cutoff_ms"]
    )
    # nothing is due again: the alarm was handled and the next cut-off is the same
    assert ctl.step() == "idle"
    # a new controller on the same folder resumes without writing anything
    Controller(config(tmp_path), FakeOps(tmp_path))
    check_promoted(tmp_path)


@pytest.mark.parametrize("verdict", ["down", "guardrail"])
def test_a_worse_or_guardrail_breaking_challenger_is_rolled_back(tmp_path, verdict):
    ctl = drive(tmp_path, verdict)
    got = kinds(tmp_path)
    assert got == PROMOTED[:-2] + ["rolled_back", "cycle_finished"]
    w = World(tmp_path).load()
    assert w["served"]["ctr_lr"] == 1  # the champion never stopped serving
    assert [p[1] for p in w["published"]] == ["c1-challenger"]
    assert w["pins"] == {} and w["calibrators"] == []
    why = ctl.state.history[0]["done"]["verdict"]["why"]
    assert ("guardrail" in why) if verdict == "guardrail" else ("decided down" in why)


def test_a_failed_gate_publishes_nothing(tmp_path):
    World(tmp_path).update(gate_pass=False)
    drive(tmp_path)
    assert kinds(tmp_path) == PROMOTED[:5] + ["gate_failed", "cycle_finished"]
    assert World(tmp_path).load()["published"] == []


def test_a_broken_shadow_is_rolled_back_before_any_traffic(tmp_path):
    from controller_world import loop_shadow_report

    ops = FakeOps(tmp_path)
    ctl = Controller(config(tmp_path), ops)
    assert ctl.run_until_waiting() == "wait:shadow_verdict"
    loop_shadow_report(ops.registry, ctl.state.cycle.done["shadow"]["data"]["experiment"], 3.0)
    assert ctl.run_until_waiting() == "idle"
    assert kinds(tmp_path) == PROMOTED[:8] + ["shadow_failed", "rolled_back", "cycle_finished"]
    assert [r.status for r in ops.registry.list()] == ["stopped"]  # the experiment never started


def test_no_champion_fails_the_gate_and_publishes_nothing(tmp_path):
    World(tmp_path).update(served={})
    drive(tmp_path)
    assert kinds(tmp_path) == PROMOTED[:5] + ["gate_failed", "cycle_finished"]
    assert World(tmp_path).load()["published"] == []


def test_every_decision_is_counted_in_prometheus(tmp_path):
    from prometheus_client import REGISTRY

    from ctrstream.controller.metrics import count_decision

    def value(kind: str) -> float:
        v = REGISTRY.get_sample_value("ctrstream_controller_decisions_total", {"kind": kind})
        return v or 0.0

    before = {k: value(k) for k in set(PROMOTED)}
    ctl = Controller(config(tmp_path), FakeOps(tmp_path), on_decision=count_decision)
    for _ in range(40):
        if ctl.step() == "wait:shadow_verdict":
            break
    assert value("shadow_started") == before["shadow_started"] + 1
    assert value("gate_passed") == before["gate_passed"] + 1
    assert REGISTRY.get_sample_value("ctrstream_controller_cycle_event_time_ms") == (
        ctl.state.cycle.cutoff_ms
    )


def test_the_service_loop_retries_a_failed_step_and_stops_when_told(tmp_path):
    """``Controller.run``: a step that raises (Redis away) is retried at the next poll."""
    import threading
    import time

    class Flaky(FakeOps):
        failures = 1

        def switch_view(self, cutoff_ms: int) -> dict:
            if Flaky.failures:
                Flaky.failures -= 1
                raise ConnectionError("redis is away")
            return super().switch_view(cutoff_ms)

    ctl = Controller(config(tmp_path), Flaky(tmp_path))
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,), kwargs={"poll_s": 0.01}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while "shadow_started" not in kinds(tmp_path):
        assert time.monotonic() < deadline, kinds(tmp_path)
        assert t.is_alive()
        stop.wait(0.01)
    stop.set()
    t.join(timeout=10)
    assert not t.is_alive() and Flaky.failures == 0
    assert kinds(tmp_path) == PROMOTED[:8] and World(tmp_path).load()["view_builds"] == 1


def test_the_schedule_starts_a_cycle_after_interval_hours_of_event_time(tmp_path):
    w = World(tmp_path)
    w.update(decay=None)
    ctl = Controller(config(tmp_path), FakeOps(tmp_path))
    assert ctl.step() == "idle"  # the schedule starts now
    w.update(clock=CLOCK + 5 * 3_600_000)
    assert ctl.step() == "idle"
    w.update(clock=CLOCK + 6 * 3_600_000)
    assert ctl.step() == "started"
    assert ctl.state.cycle.reason.startswith("schedule: 6 h")


def test_a_torn_audit_line_is_dropped_and_rewritten_from_the_checkpoint(tmp_path):
    drive(tmp_path)
    log = tmp_path / "controller" / "audit.jsonl"
    data = log.read_bytes()
    log.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 1] + b'{"key": "c1:fin')
    Controller(config(tmp_path), FakeOps(tmp_path))
    check_promoted(tmp_path)


# every step at every point: ``-m slow`` (two interpreter starts per point); the default run
# kills at the points where a side effect and its record part: the trigger, the publishes,
# the experiments started and stopped, the verdict, the promotion, the end of the cycle
EVERY_KILL = [("start", "checkpoint"), ("start", "audit"), ("act", "published")] + [
    (s, p) for s in STEPS for p in ("effect", "checkpoint", "audit")
]
KILLS = [
    ("start", "checkpoint"),
    ("view", "effect"),
    ("publish_challenger", "effect"),
    ("shadow", "checkpoint"),
    ("experiment", "effect"),
    ("verdict", "checkpoint"),
    ("act", "published"),
    ("act", "effect"),
    ("act", "checkpoint"),
    ("finish", "checkpoint"),
]
KILL_PARAMS = [
    pytest.param(s, p, id=f"{s}:{p}", marks=() if (s, p) in KILLS else pytest.mark.slow)
    for s, p in EVERY_KILL
]


@pytest.mark.parametrize("step,point", KILL_PARAMS)
def test_kill_9_anywhere_resumes_the_cycle_without_doubles_or_losses(tmp_path, step, point):
    env = {**os.environ, KILL_ENV: f"{step}:{point}"}
    cmd = [sys.executable, str(WORLD), str(tmp_path)]
    first = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert first.returncode == -signal.SIGKILL, first.stderr.decode()[-2000:]
    env.pop(KILL_ENV)
    second = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    check_promoted(tmp_path)


# ----------------------------------------------------------------------------- the gate


def _rows(n: int = 20_000, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.beta(1, 30, n)
    return p, (rng.random(n) < p).astype(np.int8)


def test_the_gate_passes_a_better_challenger_and_fails_a_broken_one():
    p, y = _rows()
    rng = np.random.default_rng(4)
    noisy = np.clip(p * np.exp(rng.normal(0, 0.6, len(p))), 1e-6, 0.9)  # a worse champion
    good = offline_gate(y, p, noisy, oracle=p)
    assert good.passed and good.ne_diff < 0 and good.slice == "all"
    assert good.oracle is not None and "oracle NE" in good.why
    broken = offline_gate(y, np.full(len(p), 0.3), p)
    assert not broken.passed and "calibration" in broken.why and "worse by" in broken.why
    few = offline_gate(y[:100], p[:100], p[:100], rule=GateRule(min_rows=500))
    assert not few.passed and "too few" in few.why


def test_the_gate_judges_on_the_exploration_slice_when_it_is_large_enough():
    p, y = _rows()
    explored = np.zeros(len(p), dtype=bool)
    explored[::5] = True
    # the champion is excellent on what it chose to show and broken on the explored slice
    champ = np.where(explored, np.clip(p * 3, 0, 0.9), p)
    res = offline_gate(y, p, champ, explored=explored)
    assert res.slice == "exploration" and res.rows == explored.sum() and res.passed
    unfair = offline_gate(y, p * 1.0, champ)  # on every row the champion looks closer
    assert unfair.slice == "all"
    tiny = np.zeros(len(p), dtype=bool)
    tiny[:10] = True
    assert offline_gate(y, p, champ, explored=tiny).slice == "all"


# ------------------------------------------------------------------ the decay alarm's cycle

HOUR = 3_600_000


def _first_cycle(ctl: Controller) -> None:
    while "train" not in (ctl.state.cycle.done if ctl.state.cycle else {}):
        status = ctl.step()
        assert status != "idle" and not status.startswith("wait"), status


def test_an_alarm_cycle_trains_on_the_rows_from_the_alarm_on(tmp_path):
    """The hours before the alarm are the market that no longer is: the early retrain's rows
    start at the alarm's since_ms (the window starts a warm-up before it, feature history
    only); a scheduled cycle keeps the sliding window."""
    from ctrstream.features import align_cutoff

    since = CLOCK - 3 * HOUR
    World(tmp_path).update(decay={"version": "1", "alarm": True, "since_ms": since,
                                  "reason": "ne gap", "ne_gap": 0.05})  # fmt: skip
    ops = FakeOps(tmp_path)
    ops.warmup_ms = HOUR // 2  # type: ignore[attr-defined]
    ctl = Controller(config(tmp_path), ops)
    _first_cycle(ctl)
    cutoff = align_cutoff(CLOCK - ops.allowed_lateness_ms)
    c = ctl.state.cycle
    assert c.train_from_ms == since and c.cutoff_ms == cutoff
    assert c.done["train"]["data"]["window_ms"] == [since - HOUR // 2, cutoff]
    assert f"rows from the decay alarm at {since} on" in c.done["train"]["why"]
    # the window never grows past the sliding one: an old alarm trains on the window
    c.train_from_ms = cutoff - 10 * HOUR
    assert ctl.train_window(c) == (cutoff - 6 * HOUR, cutoff)
    # a scheduled cycle: the sliding window, whatever the warm-up
    w = tmp_path / "sched"
    w.mkdir()
    World(w).update(decay=None)
    ctl = Controller(config(w), FakeOps(w))
    ctl.request_cycle()
    _first_cycle(ctl)
    assert ctl.state.cycle.train_from_ms is None
    assert ctl.state.cycle.done["train"]["data"]["window_ms"] == [cutoff - 6 * HOUR, cutoff]


def test_an_alarm_waits_for_a_cut_off_with_rows_after_it(tmp_path):
    """An alarm raised after the latest cut-off has no row to learn the new market from: its
    cycle starts once a cut-off is alarm_min_train_h after it (not marked handled before)."""
    since = CLOCK - 600_000
    w = World(tmp_path)
    w.update(decay={"version": "1", "alarm": True, "since_ms": since,
                    "reason": "ne gap", "ne_gap": 0.05})  # fmt: skip
    ctl = Controller(config(tmp_path), FakeOps(tmp_path))
    assert ctl.step() == "idle" and ctl.state.handled_alarm_since_ms is None
    w.update(clock=CLOCK + HOUR)  # the cut-off is at the alarm's hour: still too close
    assert ctl.step() == "idle"
    w.update(clock=CLOCK + 2 * HOUR)
    assert ctl.step() == "started"
    assert ctl.state.cycle.reason == f"decay alarm raised at event time {since}"
    assert ctl.state.cycle.train_from_ms == since == ctl.state.handled_alarm_since_ms
    with pytest.raises(ValueError, match="alarm-min-train-h"):
        replace(config(tmp_path), alarm_min_train_h=7.0).validate()


def test_an_alarm_waits_for_labelled_rows_after_it(tmp_path):
    """The training set holds only impressions whose attribution window closed: a cut-off an
    hour after the alarm is not enough while the clock is less than a window past it (the
    cycle would train on the rows before the alarm, the old market); it starts once the
    labels are complete alarm_min_train_h after the alarm."""
    minute = 60_000
    since = CLOCK - 65 * minute
    w = World(tmp_path)
    w.update(clock=CLOCK + 5 * minute,
             decay={"version": "1", "alarm": True, "since_ms": since,
                    "reason": "ne gap", "ne_gap": 0.05})  # fmt: skip
    ops = FakeOps(tmp_path)
    ops.label_window_ms = 30 * minute  # type: ignore[attr-defined]
    ctl = Controller(config(tmp_path), ops)
    # the cut-off (CLOCK) is 65 minutes after the alarm, the labels only 40 minutes
    assert ctl.step() == "idle" and ctl.state.handled_alarm_since_ms is None
    w.update(clock=CLOCK + 24 * minute)
    assert ctl.step() == "idle"
    w.update(clock=CLOCK + 25 * minute)  # labels complete an hour after the alarm
    assert ctl.step() == "started"
    assert ctl.state.cycle.cutoff_ms == CLOCK and ctl.state.cycle.train_from_ms == since
    # without a label window (an Operations that does not say it) the cut-off alone decides
    w2 = tmp_path / "no-window"
    w2.mkdir()
    World(w2).update(clock=CLOCK + 5 * minute,
                     decay={"version": "1", "alarm": True, "since_ms": since,
                            "reason": "ne gap", "ne_gap": 0.05})  # fmt: skip
    assert Controller(config(w2), FakeOps(w2)).step() == "started"


def test_the_controller_reads_the_monitors_decay_state_from_the_store():
    from ctrstream.controller.decay import alarm_since, read_decay_state
    from ctrstream.store.monitor import write_decay_state

    class Client(dict):
        def set(self, k, v):
            self[k] = v

    r = Client()
    assert read_decay_state(r) is None
    state = {"version": "ctr_lr@2", "alarm": True, "since_ms": 5, "reason": "gap", "ne_gap": 0.1}
    write_decay_state(r, state)
    assert read_decay_state(r) == state and alarm_since(read_decay_state(r)) == 5


def test_the_gate_scores_the_models_with_the_monitors_offline_comparison():
    """One implementation of the comparison: the gate's NE, AUC, calibration and gap to the
    oracle are ctrstream.monitoring.offline.compare's on the judged rows, the exploration
    slice weighted by 1 / propensity; its paired NE difference is their NEs' difference."""
    from ctrstream.monitoring.offline import compare

    p, y = _rows()
    rng = np.random.default_rng(7)
    explored = rng.random(len(p)) < 0.3
    prop = np.where(explored, rng.choice([0.1, 0.5, 1.0], len(p)), 1.0)
    champ = np.clip(p * np.exp(rng.normal(0, 0.3, len(p))), 1e-6, 0.9)
    res = offline_gate(y, p, champ, oracle=p, explored=explored, propensity=prop)
    ref = compare(
        {"challenger": p, "champion": champ}, y, explored=explored, propensity=prop, reference=p
    )["exploration"]
    assert res.slice == "exploration"
    for mine, theirs in ((res.challenger, ref["challenger"]), (res.champion, ref["champion"])):
        assert mine["ne"] == pytest.approx(theirs["ne"])
        assert mine["auc"] == pytest.approx(theirs["auc"])
        assert mine["calibration"] == pytest.approx(theirs["ratio"])
        assert mine["ne_gap"] == pytest.approx(theirs["ne_gap"])
    assert res.ne_diff == pytest.approx(res.challenger["ne"] - res.champion["ne"])
    assert res.ne_diff_lo < res.ne_diff < res.ne_diff_hi
    unweighted = offline_gate(y, p, champ, oracle=p, explored=explored)
    assert unweighted.challenger["ne"] != pytest.approx(res.challenger["ne"])
    everything = offline_gate(y, p, champ)  # no exploration flags: every row, unweighted
    assert everything.challenger["ne"] == pytest.approx(compare({"c": p}, y)["all"]["c"]["ne"])


def test_a_stop_ends_the_step_in_progress_and_starts_no_other(tmp_path):
    """SIGTERM (``stop`` set) while a step runs: that step finishes and is checkpointed, the
    service loop returns without starting the next one (a long training step after it would
    outlast the supervisor's stop timeout), and a new controller resumes at the next step."""
    import threading

    stop = threading.Event()

    class Stopped(FakeOps):
        def switch_view(self, cutoff_ms: int) -> dict:
            stop.set()  # the signal arrives while the view is built
            return super().switch_view(cutoff_ms)

    ctl = Controller(config(tmp_path), Stopped(tmp_path))
    t = threading.Thread(target=ctl.run, args=(stop,), kwargs={"poll_s": 0.01}, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    assert kinds(tmp_path) == PROMOTED[:3]  # started, archive caught up, view switched
    assert World(tmp_path).load()["trains"] == 0
    again = Controller(config(tmp_path), FakeOps(tmp_path))
    assert again.step() == "reconcile"


# ---------------------------------------------------------------- the test hook (hooks.py)


def test_the_degrade_hook_tries_that_cycles_challenger_as_its_over_predicting_copy(
    tmp_path, monkeypatch
):
    """CTRSTREAM_CONTROLLER_DEGRADE_CYCLE=1: the copy is what is published for the trial
    (and what a promotion would publish), the audit record says it is the test hook; a
    shadow that then measures the copy's calibration rolls the cycle back."""
    from controller_world import loop_shadow_report

    from ctrstream.controller.hooks import DEGRADE_ENV, DEGRADE_FACTOR_ENV

    monkeypatch.setenv(DEGRADE_ENV, "1")
    monkeypatch.setenv(DEGRADE_FACTOR_ENV, "3")
    ops = FakeOps(tmp_path)
    ctl = Controller(config(tmp_path), ops)
    assert ctl.run_until_waiting() == "wait:shadow_verdict"
    pub = ctl.state.cycle.done["publish_challenger"]
    copy = str(tmp_path / "controller" / "cycle-1" / "degraded" / "model.onnx")
    assert pub["data"]["onnx"] == copy and pub["data"]["degraded_factor"] == 3.0
    assert DEGRADE_ENV in pub["why"]
    w = World(tmp_path).load()
    assert w["degraded"] == [[str(tmp_path / "controller" / "cycle-1" / "model.onnx"), 3.0]]
    loop_shadow_report(ops.registry, ctl.state.cycle.done["shadow"]["data"]["experiment"], 2.9)
    assert ctl.run_until_waiting() == "idle"
    assert kinds(tmp_path) == PROMOTED[:8] + ["shadow_failed", "rolled_back", "cycle_finished"]
    assert World(tmp_path).load()["served"]["ctr_lr"] == 1


def test_the_degrade_hook_leaves_other_cycles_alone_and_a_promotion_publishes_the_tried_file(
    tmp_path, monkeypatch
):
    from ctrstream.controller.hooks import DEGRADE_ENV

    monkeypatch.setenv(DEGRADE_ENV, "2")
    ctl = drive(tmp_path, "up")
    check_promoted(tmp_path)
    assert "degraded" not in World(tmp_path).load()
    pub = ctl.state.history[0]["done"]["publish_challenger"]
    assert pub["data"]["onnx"].endswith("cycle-1/model.onnx")
    assert "degraded_factor" not in pub["data"]


@pytest.mark.parametrize(
    "env",
    [{"CTRSTREAM_CONTROLLER_DEGRADE_CYCLE": "two"}, {"CTRSTREAM_CONTROLLER_DEGRADE_FACTOR": "1"}],
)
def test_a_bad_degrade_hook_value_fails_the_start_saying_what_to_give(tmp_path, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="CTRSTREAM_CONTROLLER_DEGRADE"):
        Controller(config(tmp_path), FakeOps(tmp_path))


def test_the_over_predicting_copy_scores_factor_times_the_model_capped(tmp_path):
    import torch

    from ctrstream import features
    from ctrstream.controller.hooks import CAP, overpredicting_onnx
    from ctrstream.models.export import export_onnx
    from ctrstream.models.nets import HashedLogisticRegression
    from ctrstream.models.onnx_runtime import ort_predict, ort_session

    torch.manual_seed(0)
    m = HashedLogisticRegression()
    with torch.no_grad():
        m.weights.weight.normal_(0, 1.0)
        m.dense.weight.normal_(0, 1.0)
    src = tmp_path / "model.onnx"
    export_onnx(m.eval(), src)
    dst = overpredicting_onnx(src, tmp_path / "degraded" / "model.onnx", 4.0)
    rng = np.random.default_rng(0)
    x = {
        features.INPUT_SPARSE: rng.integers(0, 1000, (256, features.N_SPARSE)).astype(np.int64),
        features.INPUT_DENSE: rng.normal(0, 1, (256, features.N_DENSE)).astype(np.float32),
    }
    p = np.asarray(ort_predict(ort_session(str(src)), x)).reshape(-1)
    q = np.asarray(ort_predict(ort_session(str(dst)), x)).reshape(-1)
    np.testing.assert_allclose(q, np.minimum(4.0 * p, CAP), rtol=1e-5)
    assert (q < 1).all() and (q > p).any()
    again = overpredicting_onnx(src, tmp_path / "again.onnx", 4.0)
    assert again.read_bytes() == dst.read_bytes()  # deterministic: a redo writes the same


def test_the_controller_config_refuses_bad_experiment_settings(tmp_path):
    from ctrstream.controller.cycle import ControllerConfig

    for kw, match in (
        ({"alpha": 0.7}, "alpha"),
        ({"min_users_per_arm": 1}, "min-users-per-arm"),
        ({"primary_metric": "clicks"}, "primary-metric"),
        ({"min_shadow_clicks": 0}, "min-shadow-clicks"),
    ):
        with pytest.raises(ValueError, match=match):
            ControllerConfig(folder=tmp_path, **kw).validate()
