"""The controller's state machine: one cycle of the offline loop at a time, every step's
outcome checkpointed before the next step starts, every decision in the audit log.

A cycle's steps, in order (each returns an outcome, or "wait" while what it needs is not
there yet - the archive behind the cut-off, an experiment still undecided):

``archive`` -> ``view`` -> ``reconcile`` -> ``train`` -> ``gate`` -> ``publish_challenger`` ->
``shadow`` -> ``shadow_verdict`` -> ``experiment`` -> ``verdict`` -> ``act`` -> ``finish``

A failed gate skips to ``finish`` (nothing was published); a failed shadow skips the
experiment and rolls back. ``act`` carries out the verdict: **promote** (publish the
challenger as the champion's new version: the zero-failure switch; its calibrator's
parameters follow to the new version; the experiment stops and the pins go) or **roll back**
(the experiment stops, the pins go; the champion never stopped serving).

Crash safety (``docs/controller.md``). A step's side effect is idempotent or checked first
(a view already served at the cut-off is not rebuilt, a trained folder is reused, a version
published with the cycle's tag is found and not published again, an experiment that exists
is not started again, stopping a stopped one is skipped); then its outcome is written to the
checkpoint; then to the audit log. On start, :meth:`Controller.resume` writes to the audit
log any outcome the checkpoint has and the log lacks, so a ``kill -9`` anywhere loses no
decision and doubles none: the audit log is derived from the checkpoint, and a decision
(the trigger, the verdicts) is checkpointed before the side effect that carries it out.

``CTRSTREAM_CONTROLLER_KILL_AT=<step>:<point>`` (``point``: ``effect`` after the side
effect, ``checkpoint`` after the checkpoint, ``audit`` after the audit record; ``start``
for the trigger; ``act:published`` between the promotion's publish and its other effects) makes the controller ``SIGKILL`` itself there: the crash test's
hook. ``CTRSTREAM_CONTROLLER_DEGRADE_CYCLE=<N>`` tries cycle N's challenger online as an
over-predicting copy (:mod:`ctrstream.controller.hooks`): the unattended run's rollback.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ctrstream import features as F
from ctrstream.controller import checkpoint as C
from ctrstream.controller.audit import AuditLog
from ctrstream.controller.decay import alarm_since
from ctrstream.controller.gate import GateRule
from ctrstream.controller.hooks import DEGRADE_ENV, degrade_factor, degraded_cycle
from ctrstream.experiments.design import PRIMARY_METRICS, Arm, Experiment, Guardrails
from ctrstream.experiments.registry import Registry, UnknownExperiment

log = logging.getLogger("ctrstream.controller")

STEPS: tuple[str, ...] = (
    "archive",
    "view",
    "reconcile",
    "train",
    "gate",
    "publish_challenger",
    "shadow",
    "shadow_verdict",
    "experiment",
    "verdict",
    "act",
    "finish",
)
KILL_ENV = "CTRSTREAM_CONTROLLER_KILL_AT"
HOUR_MS = 3_600_000


class Operations(Protocol):
    """Every side effect of a cycle (:class:`ctrstream.controller.operations.StackOperations`
    against a stack). Each is idempotent or says what it finds done."""

    registry: Registry
    allowed_lateness_ms: int
    # optional ``warmup_ms``: the first event time of a training window that is feature
    # history only, not trained on (0 when absent); optional ``label_window_ms``: how long
    # after an impression its label is complete (the attribution window: the training set
    # holds only rows at least that old, 0 when absent)

    def event_time_ms(self) -> int | None:
        """The controller's clock: the latest archived event time (None: empty archive)."""

    def decay_state(self) -> dict | None: ...

    def archive_complete_for(self, cutoff_ms: int) -> tuple[bool, str]: ...

    def switch_view(self, cutoff_ms: int) -> dict: ...

    def reconcile(self) -> dict: ...

    def train(self, folder: Path, start_ms: int, end_ms: int) -> dict:
        """Train the challenger into ``folder`` (reused when it holds a finished run):
        ``{"onnx": path, "evaluation": {...}, ...}``."""

    def champion(self, base: str) -> dict | None:
        """``{"model", "version", "onnx"}`` of the version serving unpinned requests."""

    def gate(self, trained: dict, champion: dict | None, rule: GateRule) -> dict:
        """:func:`ctrstream.controller.gate.offline_gate` on the trained validation rows."""

    def publish(self, onnx: str, base: str, tag: str) -> dict:
        """Publish ``onnx`` as a new version of ``base`` unless a version tagged ``tag`` is
        served already: ``{"version", "already"}``."""

    def pin(self, base: str, versions: list[int], owner: str) -> None: ...

    def unpin(self, owner: str) -> None: ...

    def follow_calibrator(
        self, from_model: str, from_version: int, to_model: str, to_version: int
    ) -> bool: ...

    def degrade(self, onnx: str, folder: Path, factor: float) -> str:
        """The test hook's over-predicting copy of ``onnx`` in ``folder`` (its path;
        :mod:`ctrstream.controller.hooks`)."""


@dataclass(frozen=True)
class ControllerConfig:
    """The controller's settings (``ctrstream controller --help`` names each)."""

    folder: Path
    model: str = "ctr_lr"  # the champion's published base name
    interval_h: float = 6.0  # event time between two scheduled cycles
    train_window_h: float = 6.0  # the sliding training window, ending at the cut-off
    # a decay alarm's cycle trains on the rows from the alarm to the cut-off: it starts once
    # the cut-off is this much event time after the alarm
    alarm_min_train_h: float = 1.0
    share: float = 0.2  # the challenger's traffic share in the experiment
    shadow_min_s: float = 600.0  # event time the shadow arm scores before its verdict
    shadow_max_s: float = 7200.0  # no verdict by then: rolled back (not enough evidence)
    experiment_max_s: float = 6 * 3600.0  # undecided by then: rolled back (keep the champion)
    min_shadow_clicks: int = 50
    alpha: float = 0.05
    min_run_s: float = 900.0
    min_users_per_arm: int = 200
    primary_metric: str = "revenue_per_request"
    guardrails: Guardrails = field(default_factory=Guardrails)
    gate: GateRule = field(default_factory=GateRule)
    prefix: str = "ctl"

    @property
    def challenger_model(self) -> str:
        """The base name the challenger is published under while it is tried."""
        return f"{self.model}_challenger"

    def validate(self) -> ControllerConfig:
        if not self.interval_h > 0 or not self.train_window_h > 0:
            raise ValueError("controller: --interval-h and --train-window-h must be > 0 hours")
        if not 0 < self.alarm_min_train_h <= self.train_window_h:
            raise ValueError(
                f"controller: --alarm-min-train-h {self.alarm_min_train_h} must be > 0 and at "
                f"most --train-window-h {self.train_window_h}"
            )
        if not 0 < self.share < 1:
            raise ValueError(f"controller: --share {self.share} must be in (0, 1)")
        if self.shadow_max_s < self.shadow_min_s:
            raise ValueError("controller: --shadow-max-s must be >= --shadow-min-s")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"controller: --alpha {self.alpha} must be in (0, 0.5)")
        if self.min_users_per_arm < 2:
            raise ValueError("controller: --min-users-per-arm must be at least 2")
        if self.min_shadow_clicks < 1:
            raise ValueError("controller: --min-shadow-clicks must be at least 1")
        if self.primary_metric not in PRIMARY_METRICS:
            raise ValueError(
                f"controller: --primary-metric {self.primary_metric!r} is not one of "
                f"{PRIMARY_METRICS}"
            )
        self.guardrails.validate()
        self.gate.validate()
        return self


@dataclass
class Outcome:
    """What a step decided: ``kind`` (the audit record's and the metric's), why, and data."""

    kind: str
    why: str
    data: dict[str, Any] = field(default_factory=dict)


WAIT = None


def _kill_point(step: str, point: str) -> None:
    if os.environ.get(KILL_ENV) == f"{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


class Controller:
    """The state machine over :class:`Operations` (see the module doc)."""

    def __init__(
        self,
        config: ControllerConfig,
        ops: Operations,
        on_decision: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config.validate()
        self.ops = ops
        self.folder = Path(config.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_path = self.folder / "state.json"
        self.audit = AuditLog(self.folder / "audit.jsonl", on_append=on_decision)
        self.state = C.load(self.state_path)
        # the test hook (ctrstream.controller.hooks): read once, a bad value fails the start
        self._degrade = (degraded_cycle(), degrade_factor())
        self._alarm_waiting: int | None = None  # the alarm whose cycle waits for rows after it
        self.resume()

    # ------------------------------------------------------------------ persistence

    def _save(self) -> None:
        C.save(self.state_path, self.state)

    def _audit(self, cycle: C.Cycle, step: str, outcome: dict[str, Any]) -> None:
        self.audit.append_once(
            f"c{cycle.number}:{step}",
            outcome["kind"],
            cycle=cycle.number,
            cutoff_ms=cycle.cutoff_ms,
            step=step,
            at_ms=outcome.get("at_ms"),
            why=outcome.get("why", ""),
            data=outcome.get("data", {}),
        )

    def _audit_start(self, cycle: C.Cycle) -> None:
        self.audit.append_once(
            f"c{cycle.number}:start",
            "cycle_started",
            cycle=cycle.number,
            cutoff_ms=cycle.cutoff_ms,
            step="start",
            at_ms=cycle.started_at_ms,
            why=cycle.reason,
            data={},
        )

    def resume(self) -> None:
        """Write to the audit log what the checkpoint decided and the log lacks (a crash
        between the two), oldest first."""
        cycles = [C.Cycle(**h) for h in self.state.history]
        if self.state.cycle is not None:
            cycles.append(self.state.cycle)
        for c in cycles:
            self._audit_start(c)
            for step in STEPS:
                if step in c.done:
                    self._audit(c, step, c.done[step])

    # ------------------------------------------------------------------ the schedule

    def _trigger(self, now_ms: int) -> tuple[str, int, int | None] | None:
        """(reason, cut-off, first event time to train on) of the cycle due at event time
        ``now_ms``, or None. The cut-off is the latest aligned one the archive is complete
        for; a cycle needs a cut-off after the last cycle's (nothing new to learn otherwise).
        A decay alarm's cycle trains on the rows from the alarm on (those before it are the
        market that no longer is): it waits until ``alarm_min_train_h`` of labelled rows after
        the alarm are there - the cut-off that far after the alarm, and the labels complete
        that far (``label_window_ms`` before the clock); the schedule and the operator's
        request still start theirs meanwhile."""
        st = self.state
        if st.schedule_from_ms is None:
            st.schedule_from_ms = now_ms  # the schedule starts when the controller first runs
            self._save()
        cutoff = F.align_cutoff(now_ms - int(getattr(self.ops, "allowed_lateness_ms", 0)))
        last = st.history[-1]["cutoff_ms"] if st.history else None
        if last is not None and cutoff <= last:
            return None
        if st.requested:
            reason, st.requested = st.requested, None
            return reason, cutoff, None
        since = alarm_since(self.ops.decay_state())
        if since is not None and (
            st.handled_alarm_since_ms is None or since > st.handled_alarm_since_ms
        ):
            # the training set ends at the cut-off and at the last labelled row, whichever
            # comes first (ctrstream.batch.point_in_time.training_set)
            labelled = min(cutoff, now_ms - int(getattr(self.ops, "label_window_ms", 0)))
            if labelled - since >= self.config.alarm_min_train_h * HOUR_MS:
                st.handled_alarm_since_ms = since
                return f"decay alarm raised at event time {since}", cutoff, since
            if self._alarm_waiting != since:  # said once per alarm, not at every poll
                self._alarm_waiting = since
                log.info(
                    "decay alarm at event time %d: its cycle waits for %g h of labelled rows "
                    "after it before a cut-off (now: cut-off %d, labels complete to %d)",
                    since,
                    self.config.alarm_min_train_h,
                    cutoff,
                    labelled,
                )
        if now_ms - st.schedule_from_ms >= self.config.interval_h * HOUR_MS:
            return (
                f"schedule: {self.config.interval_h:g} h of event time since {st.schedule_from_ms}",
                cutoff,
                None,
            )
        return None

    # ------------------------------------------------------------------ driving

    def request_cycle(self, reason: str = "requested by the operator") -> bool:
        """Start a cycle at the next step, whatever the schedule (still only with a cut-off
        after the last cycle's); False when a cycle is in progress already."""
        if self.state.cycle is not None:
            return False
        self.state.requested = reason
        self._save()
        return True

    def step(self) -> str:
        """Advance by one step: ``"idle"`` (no cycle due), ``"started"``, ``"wait:<step>"``,
        or the step just done."""
        now = self.ops.event_time_ms()
        st = self.state
        if st.cycle is None:
            if now is None:
                return "idle"
            due = self._trigger(now)
            if due is None:
                return "idle"
            reason, cutoff, train_from = due
            st.cycle = C.Cycle(
                number=st.cycles_finished + 1,
                cutoff_ms=cutoff,
                reason=reason,
                started_at_ms=now,
                train_from_ms=train_from,
            )
            self._save()
            _kill_point("start", "checkpoint")
            self._audit_start(st.cycle)
            _kill_point("start", "audit")
            from ctrstream.controller.metrics import set_cycle_time

            set_cycle_time(cutoff)
            return "started"
        cycle = st.cycle
        name = self._next_step(cycle)
        outcome = getattr(self, f"_step_{name}")(cycle, now)
        _kill_point(name, "effect")
        if outcome is WAIT:
            return f"wait:{name}"
        rec = {"kind": outcome.kind, "why": outcome.why, "at_ms": now, "data": outcome.data}
        cycle.done[name] = rec
        if name == "finish":
            st.history.append(_cycle_dict(cycle))
            st.history = st.history[-20:]
            st.cycles_finished = cycle.number
            st.schedule_from_ms = max(st.schedule_from_ms or 0, cycle.cutoff_ms)
            st.cycle = None
        self._save()
        _kill_point(name, "checkpoint")
        self._audit(cycle, name, rec)
        _kill_point(name, "audit")
        log.info("cycle %d: %s - %s", cycle.number, outcome.kind, outcome.why)
        return name

    def run_until_waiting(self, max_steps: int = 100, stop: threading.Event | None = None) -> str:
        """Steps until the controller is idle or waits, or ``stop`` is set (checked between
        steps: a stop ends the step in progress, checkpointed, and starts no other); returns
        the last status."""
        status = "idle"
        for _ in range(max_steps):
            if stop is not None and stop.is_set():
                return status
            status = self.step()
            if status == "idle" or status.startswith("wait:"):
                return status
        return status

    def run(self, stop: threading.Event, poll_s: float = 5.0) -> None:
        """Run until ``stop`` is set (SIGTERM: the step in progress ends and is checkpointed,
        no other starts): step while there is work, then wait ``poll_s``. A step that raises
        (Triton or Redis away) is logged and retried at the next poll: the checkpoint still
        names it, and each step is idempotent."""
        while not stop.is_set():
            try:
                self.run_until_waiting(stop=stop)
            except Exception:  # a failed step is retried at the next poll: each is idempotent
                log.exception("controller step failed; retrying in %.0f s", poll_s)
            stop.wait(poll_s)

    @staticmethod
    def _next_step(c: C.Cycle) -> str:
        skip: set[str] = set()
        if "gate" in c.done and c.done["gate"]["kind"] != "gate_passed":
            skip |= set(STEPS[STEPS.index("publish_challenger") : STEPS.index("finish")])
        if c.done.get("shadow_verdict", {}).get("kind") == "shadow_failed":
            skip |= {"experiment", "verdict"}
        for s in STEPS:
            if s not in c.done and s not in skip:
                return s
        raise AssertionError("a finished cycle has no next step")

    # ------------------------------------------------------------------ the steps

    def _names(self, c: C.Cycle) -> tuple[str, str, str]:
        """(shadow experiment, experiment, pin owner) of cycle ``c``."""
        base = f"{self.config.prefix}-{c.number}-{c.cutoff_ms // 1000}"
        return f"{base}-shadow", base, f"controller.{base}"

    def _step_archive(self, c: C.Cycle, now: int | None) -> Outcome | None:
        ok, why = self.ops.archive_complete_for(c.cutoff_ms)
        return Outcome("archive_caught_up", why) if ok else WAIT

    def _step_view(self, c: C.Cycle, now: int | None) -> Outcome:
        res = self.ops.switch_view(c.cutoff_ms)
        how = "already served" if res.get("already") else "built and switched"
        return Outcome("view_switched", f"batch view {res.get('version')} {how}", res)

    def _step_reconcile(self, c: C.Cycle, now: int | None) -> Outcome:
        res = self.ops.reconcile()
        return Outcome(
            "reconciled",
            f"{res.get('cells_differing', 0)} of {res.get('cells_compared', 0)} cells differed "
            f"({'all explained' if res.get('explained', True) else 'some unexplained'})",
            res,
        )

    def train_window(self, c: C.Cycle) -> tuple[int, int]:
        """``[start, end)`` event time of cycle ``c``'s training set: the sliding window
        ending at the cut-off; for a decay alarm's cycle no earlier than the alarm less the
        warm-up (feature history only), so that every row trained on is from the alarm on."""
        start = c.cutoff_ms - int(self.config.train_window_h * HOUR_MS)
        if c.train_from_ms is not None:
            warmup = int(getattr(self.ops, "warmup_ms", 0))
            start = max(start, c.train_from_ms - warmup)
        return start, c.cutoff_ms

    def _step_train(self, c: C.Cycle, now: int | None) -> Outcome:
        start, end = self.train_window(c)
        res = self.ops.train(self.folder / f"cycle-{c.number}", start, end)
        ev = res.get("evaluation", {})
        ne = (ev.get("model") or {}).get("ne")
        alarm = (
            ""
            if c.train_from_ms is None
            else f" (rows from the decay alarm at {c.train_from_ms} on)"
        )
        return Outcome(
            "trained",
            f"challenger trained on [{start}, {end}) event time{alarm}"
            + (f", validation NE {ne:.4f}" if ne is not None else ""),
            res | {"window_ms": [start, end]},
        )

    def _step_gate(self, c: C.Cycle, now: int | None) -> Outcome:
        champ = self.ops.champion(self.config.model)
        if champ is None:
            return Outcome(
                "gate_failed",
                f"no champion serves {self.config.model} to compare with and to fall back to: "
                "publish a first model (`ctrstream train`, then `ctrstream publish`)",
                {"passed": False, "champion": None},
            )
        res = self.ops.gate(c.done["train"]["data"], champ, self.config.gate)
        res["champion"] = champ
        return Outcome("gate_passed" if res["passed"] else "gate_failed", res["why"], res)

    def _step_publish_challenger(self, c: C.Cycle, now: int | None) -> Outcome:
        onnx = c.done["train"]["data"]["onnx"]
        cycle, factor = self._degrade
        degraded = cycle == c.number
        if degraded:  # the test hook: the copy tried online over-predicts (hooks.py)
            onnx = self.ops.degrade(onnx, self.folder / f"cycle-{c.number}" / "degraded", factor)
        res = self.ops.publish(onnx, self.config.challenger_model, f"c{c.number}-challenger")
        return Outcome(
            "challenger_published",
            f"{self.config.challenger_model} v{res['version']}"
            + (" (found published)" if res.get("already") else "")
            + (
                f" - TEST HOOK {DEGRADE_ENV}: an over-predicting copy (x{factor:g}) of the "
                "model the gate passed"
                if degraded
                else ""
            ),
            res | {"onnx": onnx} | ({"degraded_factor": factor} if degraded else {}),
        )

    def _arms(self, c: C.Cycle) -> tuple[Arm, Arm]:
        champ = c.done["gate"]["data"]["champion"]
        if champ is None:
            raise RuntimeError(
                f"no champion serves {self.config.model}: publish a first model "
                "(`ctrstream train` then `ctrstream publish`) before the controller runs"
            )
        chal_v = int(c.done["publish_challenger"]["data"]["version"])
        return (
            Arm("champion", "model", 1.0 - self.config.share, self.config.model, champ["version"]),
            Arm("challenger", "model", self.config.share, self.config.challenger_model, chal_v),
        )

    def _experiment(self, name: str, arms: tuple[Arm, ...]) -> Experiment:
        cfg = self.config
        return Experiment(
            name=name,
            salt=name,
            arms=arms,
            control="champion",
            alpha=cfg.alpha,
            min_run_s=cfg.min_run_s,
            min_users_per_arm=cfg.min_users_per_arm,
            primary_metric=cfg.primary_metric,
            guardrails=cfg.guardrails,
        ).validate()

    def _start(self, exp: Experiment, at_ms: int) -> bool:
        """Start ``exp`` unless it exists (started before a crash); returns whether it did."""
        try:
            self.ops.registry.get(exp.name)
            return False
        except UnknownExperiment:
            self.ops.registry.start(exp, at_ms)
            return True

    def _stop(self, name: str, reason: str, at_ms: int | None) -> None:
        try:
            rec = self.ops.registry.get(name)
        except UnknownExperiment:
            return
        if rec.running:
            self.ops.registry.stop(name, reason, at_ms=at_ms)

    def _step_shadow(self, c: C.Cycle, now: int | None) -> Outcome:
        shadow, _, owner = self._names(c)
        champ, chal = self._arms(c)
        self.ops.pin(champ.model_name or "", [int(champ.model_version or 0)], owner)
        self.ops.pin(chal.model_name or "", [int(chal.model_version or 0)], owner)
        aa = replace(champ, name="champion-b", weight=self.config.share)
        exp = self._experiment(
            shadow,
            (
                replace(champ, weight=1 - self.config.share),
                aa,
                replace(chal, weight=0.0, shadow=True),
            ),
        )
        started = self._start(exp, int(now or c.cutoff_ms))
        return Outcome(
            "shadow_started",
            f"experiment {shadow}: challenger v{chal.model_version} scores every request "
            f"next to champion v{champ.model_version}" + ("" if started else " (found started)"),
            {"experiment": shadow},
        )

    def _step_shadow_verdict(self, c: C.Cycle, now: int | None) -> Outcome | None:
        shadow, _, _ = self._names(c)
        rec = self.ops.registry.get(shadow)
        elapsed = max(0.0, ((now or 0) - rec.started_at_ms) / 1000.0)
        if not rec.running:
            return Outcome("shadow_failed", f"shadow experiment stopped: {rec.reason}")
        rep = self.ops.registry.load_report(shadow) or {}
        if "challenger" in (rep.get("breached_arms") or []):
            msgs = [b["message"] for b in rep.get("breaches", []) if b.get("arm") == "challenger"]
            return Outcome("shadow_failed", "; ".join(msgs), {"elapsed_s": elapsed})
        arm = next((a for a in rep.get("arms", []) if a.get("name") == "challenger"), None)
        clicks = int(arm["clicks"]) if arm else 0
        if arm and elapsed >= self.config.shadow_min_s and clicks >= self.config.min_shadow_clicks:
            cal = (arm.get("metrics", {}).get("calibration") or {}).get("value")
            lo, hi = self.config.guardrails.calibration_ratio
            if cal is not None and not lo <= cal <= hi:
                return Outcome(
                    "shadow_failed",
                    f"shadow calibration {cal:.3f} outside [{lo}, {hi}] over {clicks} clicks",
                    {"elapsed_s": elapsed, "calibration": cal},
                )
            return Outcome(
                "shadow_passed",
                f"shadow calibration {cal if cal is None else round(cal, 3)} over {clicks} "
                f"clicks after {elapsed:.0f} s, no guardrail broken",
                {"elapsed_s": elapsed, "calibration": cal, "clicks": clicks},
            )
        if elapsed >= self.config.shadow_max_s:
            return Outcome(
                "shadow_failed",
                f"no shadow verdict after {elapsed:.0f} s ({clicks} clicks, needs "
                f"{self.config.min_shadow_clicks}): not enough evidence",
                {"elapsed_s": elapsed, "clicks": clicks},
            )
        return WAIT

    def _step_experiment(self, c: C.Cycle, now: int | None) -> Outcome:
        shadow, name, _ = self._names(c)
        at = int(now or c.cutoff_ms)
        self._stop(shadow, "shadow passed: the challenger moves to the experiment", at)
        exp = self._experiment(name, self._arms(c))
        started = self._start(exp, at)
        return Outcome(
            "experiment_started",
            f"experiment {name}: challenger at {self.config.share:.0%} of the users"
            + ("" if started else " (found started)"),
            {"experiment": name},
        )

    def _step_verdict(self, c: C.Cycle, now: int | None) -> Outcome | None:
        _, name, _ = self._names(c)
        rec = self.ops.registry.get(name)
        elapsed = max(0.0, ((now or 0) - rec.started_at_ms) / 1000.0)
        if "challenger" in rec.stopped_arms:
            why = rec.stopped_arms["challenger"].get("reason", "")
            return Outcome("experiment_decided", f"guardrail: {why}", {"decision": "rollback"})
        if not rec.running:
            return Outcome(
                "experiment_decided",
                f"experiment stopped ({rec.status}): {rec.reason}",
                {"decision": "rollback"},
            )
        rep = self.ops.registry.load_report(name) or {}
        if "challenger" in (rep.get("breached_arms") or []):
            msgs = [b["message"] for b in rep.get("breaches", []) if b.get("arm") == "challenger"]
            return Outcome(
                "experiment_decided", "guardrail: " + "; ".join(msgs), {"decision": "rollback"}
            )
        key = rec.state.key("challenger", "champion", self.config.primary_metric)
        cs = rec.state.comparisons.get(key)
        if cs is not None and cs.direction is not None:
            decision = "promote" if cs.direction == "up" else "rollback"
            return Outcome(
                "experiment_decided",
                f"the sequential test decided {cs.direction} on {self.config.primary_metric} "
                f"(p {cs.p_value:.3g} after {cs.decided_elapsed_s} s), guardrails held",
                {"decision": decision, "p_value": cs.p_value, "elapsed_s": elapsed},
            )
        if elapsed >= self.config.experiment_max_s:
            return Outcome(
                "experiment_decided",
                f"undecided after {elapsed:.0f} s of event time: the champion stays",
                {"decision": "rollback", "elapsed_s": elapsed},
            )
        return WAIT

    def _step_act(self, c: C.Cycle, now: int | None) -> Outcome:
        shadow, name, owner = self._names(c)
        at = now
        verdict = c.done.get("verdict") or c.done.get("shadow_verdict") or {}
        decision = verdict.get("data", {}).get("decision", "rollback")
        if c.done.get("shadow_verdict", {}).get("kind") == "shadow_failed":
            decision = "rollback"
        if decision == "promote":
            chal = c.done["publish_challenger"]["data"]
            # what was tried is what is promoted (the hook's copy, when it was one)
            onnx = chal.get("onnx") or c.done["train"]["data"]["onnx"]
            res = self.ops.publish(onnx, self.config.model, f"c{c.number}-promoted")
            _kill_point("act", "published")
            followed = self.ops.follow_calibrator(
                self.config.challenger_model,
                int(chal["version"]),
                self.config.model,
                int(res["version"]),
            )
            self._stop(name, f"promoted: {verdict.get('why', '')}", at)
            self.ops.unpin(owner)
            from ctrstream.controller.metrics import set_served_version

            set_served_version(self.config.model, int(res["version"]))
            return Outcome(
                "promoted",
                f"{self.config.model} v{res['version']} serves (challenger "
                f"v{chal['version']}): {verdict.get('why', '')}"
                + ("; its calibrator followed" if followed else ""),
                {"version": res["version"], "calibrator_followed": followed},
            )
        for exp in (shadow, name):
            self._stop(exp, f"rolled back: {verdict.get('why', '')}", at)
        self.ops.unpin(owner)
        return Outcome("rolled_back", f"the champion stays: {verdict.get('why', '')}", {})

    def _step_finish(self, c: C.Cycle, now: int | None) -> Outcome:
        last = [s for s in STEPS if s in c.done][-1]
        return Outcome("cycle_finished", f"cycle {c.number} ended at {last}", {"last": last})


def _cycle_dict(c: C.Cycle) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(c)


__all__ = ["STEPS", "KILL_ENV", "Controller", "ControllerConfig", "Operations", "Outcome"]
