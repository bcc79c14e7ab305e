"""The closed loop that follows the experiments' registry: one world, one event-time clock,
and at every step the experiment the registry says runs.

Which experiment serves
-----------------------
At each step's start the loop reads the registry's running experiments
(:class:`ctrstream.experiments.registry.Registry`, the one the controller and ``ctrstream
experiment start|stop`` write):

* the **newest** running experiment (the latest ``started_at_ms``, then the name) other than
  the default decides every request of the step, with its own arms, split, shadows and
  guardrails (:class:`~ctrstream.loop.runner.ClosedLoop` runs its step);
* **older** running experiments wait: not served, their loop state checkpointed; the newest
  one's stop hands the traffic back to them (their evidence does not grow meanwhile);
* **none** running: the ``default`` experiment serves. :func:`champion_default` is the usual
  one: the champion split A/A with itself (every request ranked by the champion; the split is
  a free A/A check). It is registered under its name like any experiment, so its decision log,
  ledger and report live where the monitor, the controller's gate and ``ctrstream experiment
  report`` look. Its model arms without a version follow the champion: at every entry into the
  default they are resolved to the newest version Triton serves, and a version other than the
  registered one restarts the default (the old one's final report written, its folder archived
  by the registry). With no default the loop raises :class:`FollowError` saying what to do.

One experiment at a time rather than users split between several: the controller runs one
at a time (its shadow A/A with the challenger scoring every request, then its champion /
challenger experiment), and a split would make each experiment's traffic share depend on what
else happens to run.

A switch
--------
The world, the clock and the shared :class:`~ctrstream.loop.emitter.Emitter` carry over: the
clicks already decided but not yet due stay pending and go to Kafka at their own event time,
whoever serves then, and the emitter's leakage guard (nothing produced at or after a request's
time before its features are read) holds across switches. The experiment left behind, when it
was stopped, gets its final analysis (:meth:`ClosedLoop.finish`: its decided clicks credited,
its ledger checkpointed, ``report.json`` with a ``final`` entry); when it only waits, its state
is checkpointed. The experiment taken up resumes from its own checkpoint or starts fresh.

Checkpoint and kill -9
----------------------
Every ``checkpoint_every`` steps and at every switch: the served experiment's state (its loop
folder, as :class:`ClosedLoop` writes it), then ``world.npz`` and ``pending-clicks.npz`` and
last ``follow-state.json`` (clock, steps, the served experiment, the segments served) in
``state_dir``. A restarted loop resumes at that clock with the same world and pending clicks,
and serves what the registry says then (an experiment stopped while the loop was down gets its
final report first). The steps after the checkpoint are decided again with the same ids, as
:class:`ClosedLoop`'s resume does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.config import Settings
from ctrstream.loop import session
from ctrstream.loop.emitter import Emitter
from ctrstream.loop.runner import ClosedLoop, LoopConfig, LoopSummary, load_world, save_world

log = logging.getLogger("ctrstream.loop")

STATE_FILE = "follow-state.json"


class FollowError(RuntimeError):
    """The following loop cannot serve: what is wrong and what to do."""


def champion_default(model: str, name: str = "live", *, version: int | None = None) -> Any:
    """The default experiment of a following loop: ``model``'s champion (the newest version
    Triton serves, or ``version``) split A/A with itself (arms ``champion`` and
    ``champion-b``, half the users each): every request is ranked by the champion."""
    from ctrstream.experiments.design import Arm, Experiment

    arms = tuple(
        Arm(name=a, kind="model", weight=0.5, model_name=model, model_version=version)
        for a in ("champion", "champion-b")
    )
    return Experiment(name=name, salt=name, arms=arms, control="champion").validate()


DEFAULT_CHAMPION = "ctr_lr"  # the controller's champion model unless told otherwise


def follow_default(settings: Settings, name: str | None, champion: str | None) -> Any:
    """The default of ``ctrstream loop run --follow``: ``champion``'s champion split A/A
    with itself under ``name`` (default ``live``); without ``champion``, the definition of
    the running experiment ``name`` when there is one, else :data:`DEFAULT_CHAMPION`'s
    champion; no ``name`` and no ``champion``: no default (``None``)."""
    from ctrstream.experiments.registry import UnknownExperiment

    if champion:
        return champion_default(champion, name or "live")
    if not name:
        return None
    try:
        rec = session.registry(settings).get(name)
        if rec.running:
            return rec.experiment
    except UnknownExperiment:
        pass
    return champion_default(DEFAULT_CHAMPION, name)


@dataclass
class FollowSummary(LoopSummary):
    """A :class:`LoopSummary` of the following loop, with what served when: one segment per
    experiment served (``experiment``, ``started_at_ms``, ``default``, ``from_ms``, ``to_ms``:
    ``None`` while it serves)."""

    segments: list[dict[str, Any]] = field(default_factory=list)
    switches: int = 0


@dataclass
class _Served:
    name: str
    started_at_ms: int
    default: bool
    loop: ClosedLoop
    rankers: Any

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.started_at_ms)


def _no_decide(batch: Any, arm: np.ndarray) -> Any:
    raise RuntimeError("a finished experiment's loop does not decide")


class FollowLoop:
    """The following closed loop (see the module docstring).

    ``world``: a :class:`ctrstream.simulation.world.World` (fresh at its ``start_ms``; a
    checkpoint in ``state_dir`` replaces its state); ``cfg``: the steps, pacing, looks and
    checkpoints (:class:`LoopConfig`); ``default``: the experiment served when none runs
    (:func:`champion_default`), ``None``: the newest running one or a :class:`FollowError`.
    ``state_dir``: the loop's own checkpoint (default ``<run_dir>/loop-follow``); ``emitter``:
    the Kafka producer side (tests pass one over a fake producer); ``rankers``: builds an
    experiment's rankers, ``rankers(settings, experiment, world)`` with ``.decide``,
    ``.online`` and ``.close()`` (default :class:`ctrstream.loop.wiring.Rankers`); ``pin``:
    resolve the default's model versions on Triton and pin them (off where no Triton is)."""

    def __init__(
        self,
        settings: Settings,
        world: Any,
        cfg: LoopConfig | None = None,
        *,
        default: Any = None,
        state_dir: Path | None = None,
        emitter: Emitter | None = None,
        rankers: Callable[[Settings, Any, Any], Any] | None = None,
        pin: bool = True,
    ):
        from ctrstream.loop.metrics import loop_metrics

        self.settings = settings
        self.world = world
        self.cfg = cfg or LoopConfig()
        self.default = default.validate() if default is not None else None
        self.registry = session.registry(settings)
        self.state_dir = Path(state_dir or settings.run_dir / "loop-follow")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.emitter = emitter or Emitter(settings)
        if rankers is None:
            from ctrstream.loop.wiring import Rankers

            rankers = Rankers
        self._make_rankers = rankers
        self.pin = pin
        self.clock_ms: int | None = None
        self.steps = 0
        self.switches = 0
        self.current: _Served | None = None
        self.segments: list[dict[str, Any]] = []
        self._was_serving: dict[str, Any] | None = None  # from the checkpoint, until switched
        self.lateness_s = 0.0
        self.m = loop_metrics()
        self.resumed = self._resume()
        if self.clock_ms is None:  # a fresh loop starts where the world starts
            self.clock_ms = int(world.start_ms)

    # ------------------------------------------------------------------ state

    @property
    def _state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _resume(self) -> bool:
        if not self._state_file.exists():
            return False
        meta = json.loads(self._state_file.read_text())
        self.clock_ms = int(meta["clock_ms"])
        self.steps = int(meta["steps"])
        self.switches = int(meta.get("switches", 0))
        self.emitter.sent = dict(meta["sent"])
        self.segments = list(meta.get("segments", []))
        self._was_serving = meta.get("serving")
        load_world(self.state_dir, self.world, self.emitter)
        log.info(
            "the following loop resumed at event time %d (serving %s)",
            self.clock_ms,
            (self._was_serving or {}).get("name"),
        )
        return True

    def checkpoint(self) -> None:
        """The served experiment's state, then the world, the pending clicks and the loop's
        own state (``follow-state.json`` replaced last: a crash leaves the previous one)."""
        if self.clock_ms is None:
            return
        if self.current is not None:
            self.current.loop.clock_ms = self.clock_ms
            self.current.loop.checkpoint()  # flushes the emitter too
        else:
            self.emitter.flush()
        save_world(self.state_dir, self.world, self.emitter)
        cur = self.current
        meta = {
            "clock_ms": self.clock_ms,
            "steps": self.steps,
            "switches": self.switches,
            "sent": self.emitter.sent,
            "serving": None
            if cur is None
            else {"name": cur.name, "started_at_ms": cur.started_at_ms, "default": cur.default},
            "segments": self.segments,
        }
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(self._state_file)

    # ------------------------------------------------------------------ what serves

    def _choose(self) -> Any:
        """The registry's record to serve now, or None for the default."""
        dname = self.default.name if self.default is not None else None
        running = [r for r in self.registry.running() if r.experiment.name != dname]
        if running:
            return max(running, key=lambda r: (r.started_at_ms, r.experiment.name))
        if self.default is None:
            raise FollowError(
                f"no experiment runs in {self.registry.root} and the loop has no default: "
                "start one (`ctrstream experiment start NAME --arm ...`) or give the loop a "
                "default (`ctrstream loop run --follow --experiment NAME --champion BASE`)"
            )
        return None

    def _resolve_default(self) -> Any:
        exp = self.default
        assert exp is not None
        if self.pin and any(a.kind == "model" for a in exp.arms):
            exp = session.resolve_versions(self.settings, exp)
        return exp

    def _default_record(self) -> Any:
        """The default's registry record, registered (again) when it is absent, stopped, or
        its definition moved (the champion's newest version changed)."""
        from ctrstream.experiments.registry import UnknownExperiment

        assert self.default is not None and self.clock_ms is not None
        exp = self._resolve_default()
        try:
            rec = self.registry.get(exp.name)
        except UnknownExperiment:
            rec = None
        if rec is not None and rec.running and rec.experiment == exp:
            return rec
        if rec is not None:
            if rec.running:
                why = "the default moved on (the champion's version or its definition changed)"
                self.registry.stop(exp.name, why, at_ms=self.clock_ms)
            log.info("default %s was stopped (%s): started again", exp.name, rec.reason)
            # its final report before the registry archives its folder
            cur = self.current
            if cur is not None and cur.key == (exp.name, int(rec.started_at_ms)):
                self._leave(cur)
                self.current = None
            else:
                self._finish_offline(exp.name, int(rec.started_at_ms))
        return self.registry.start(exp, self.clock_ms)

    def _open(self, rec: Any, default: bool) -> _Served:
        name = rec.experiment.name
        rankers = self._make_rankers(self.settings, rec.experiment, self.world)
        loop = ClosedLoop(
            self.settings,
            self.world,
            rankers.decide,
            rec.experiment,
            self.registry,
            session.state_dir(self.settings, name),
            self.cfg,
            emitter=self.emitter,
            online=rankers.online,
            owns_world=False,
        )
        assert self.clock_ms is not None
        if loop.resume():
            if int(loop.clock_ms or 0) > self.clock_ms:
                log.warning(
                    "experiment %s's checkpoint is at %d, after the loop's clock %d (a crash "
                    "between the two checkpoints): its steps after %d are counted again",
                    name,
                    loop.clock_ms,
                    self.clock_ms,
                    self.clock_ms,
                )
        else:
            loop.next_look_ms = self.clock_ms + int(self.cfg.analyze_every_s * 1000)
        loop.clock_ms = self.clock_ms
        return _Served(name, int(rec.started_at_ms), default, loop, rankers)

    def _finish_offline(self, name: str, started_at_ms: int) -> None:
        """The final report of a stopped experiment that is not loaded (it stopped while it
        waited, or while the loop was down)."""
        from ctrstream.experiments.registry import UnknownExperiment

        try:
            rec = self.registry.get(name)
        except UnknownExperiment:
            return
        folder = session.state_dir(self.settings, name)
        if rec.running or int(rec.started_at_ms) != started_at_ms:
            return
        if not (folder / "loop-state.json").exists() or (folder / "final").exists():
            return  # never served, or its final report is written
        loop = ClosedLoop(
            self.settings,
            self.world,
            _no_decide,
            rec.experiment,
            self.registry,
            folder,
            self.cfg,
            emitter=self.emitter,
            owns_world=False,
        )
        loop.resume()
        assert self.clock_ms is not None
        loop.finish(max(self.clock_ms, int(loop.clock_ms or 0)))

    def _leave(self, served: _Served) -> None:
        """Stop serving ``served``: its final report when it stopped, else a checkpoint."""
        from ctrstream.experiments.registry import UnknownExperiment

        assert self.clock_ms is not None
        served.loop.clock_ms = self.clock_ms
        try:
            rec = self.registry.get(served.name)
            running = rec.running and int(rec.started_at_ms) == served.started_at_ms
        except UnknownExperiment:
            rec, running = None, False
        try:
            if running:
                served.loop.checkpoint()
            elif rec is not None and int(rec.started_at_ms) == served.started_at_ms:
                rep = served.loop.finish(self.clock_ms)
                log.info(
                    "experiment %s stopped (%s): its final report is written (%d comparisons)",
                    served.name,
                    rec.reason,
                    len(rep.comparisons),
                )
        finally:
            served.rankers.close()
        self.m["serving"].labels(served.name).set(0)
        for seg in reversed(self.segments):
            if seg["experiment"] == served.name and seg["to_ms"] is None:
                seg["to_ms"] = self.clock_ms
                break

    def _follow(self) -> None:
        """Switch to what the registry says serves now (a no-op while it is unchanged)."""
        rec = self._choose()
        cur = self.current
        if rec is None:  # the default
            assert self.default is not None
            if cur is not None and cur.default:
                still = self.registry.get(cur.name)
                if still.running and int(still.started_at_ms) == cur.started_at_ms:
                    return
            rec = self._default_record()
            cur = self.current  # _default_record may have left a moved default
        if cur is not None and cur.key == (rec.experiment.name, int(rec.started_at_ms)):
            return
        if cur is not None:
            self._leave(cur)
            self.current = None
        elif self._was_serving is not None:  # resumed: what served before the kill
            was = self._was_serving
            if (was["name"], int(was["started_at_ms"])) != (
                rec.experiment.name,
                int(rec.started_at_ms),
            ):
                self._finish_offline(was["name"], int(was["started_at_ms"]))
                for seg in reversed(self.segments):
                    if seg["experiment"] == was["name"] and seg["to_ms"] is None:
                        seg["to_ms"] = self.clock_ms
                        break
        is_default = self.default is not None and rec.experiment.name == self.default.name
        resumed_same = self._was_serving is not None and (
            self._was_serving["name"],
            int(self._was_serving["started_at_ms"]),
        ) == (rec.experiment.name, int(rec.started_at_ms))
        self._was_serving = None
        self.current = self._open(rec, is_default)
        self.m["serving"].labels(rec.experiment.name).set(1)
        if not resumed_same:
            self.switches += 1
            self.m["switches"].inc()
            self.segments.append(
                {
                    "experiment": rec.experiment.name,
                    "started_at_ms": int(rec.started_at_ms),
                    "default": is_default,
                    "from_ms": self.clock_ms,
                    "to_ms": None,
                }
            )
            log.info("event time %s: experiment %s serves", self.clock_ms, rec.experiment.name)
            self.checkpoint()  # a switch is checkpointed at once

    @property
    def serving(self) -> str | None:
        """The name of the experiment served at the last step (None before the first)."""
        return self.current.name if self.current is not None else None

    # ------------------------------------------------------------------ steps

    def _step(self, t0: int, t1: int) -> dict[str, int]:
        try:
            self._follow()
        except FollowError:
            if self.current is not None:  # it stopped and nothing follows: its final report
                self._leave(self.current)
                self.current = None
            self.checkpoint()
            raise
        cur = self.current
        assert cur is not None
        loop = cur.loop
        got = loop.step(t0, t1)
        loop.clock_ms = t1
        loop.steps += 1
        self.clock_ms = t1
        self.steps += 1
        assert loop.next_look_ms is not None
        if t1 >= loop.next_look_ms:
            loop.look(t1)
            loop.ledger.snapshot_series(t1)
            every = max(1, int(self.cfg.analyze_every_s * 1000))
            while loop.next_look_ms <= t1:
                loop.next_look_ms += every
        if self.steps % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        return got

    def step_to(self, t_ms: int, *, stop: Callable[[], bool] = lambda: False) -> dict[str, int]:
        """Advance event time to ``t_ms`` step by step, serving at each step what the registry
        says runs then; returns the requests, impressions and predictions of these steps.
        ``stop()`` true ends it early at a step's end. Paced to wall time when ``cfg``'s
        ``compression`` is set."""
        assert self.clock_ms is not None
        step_ms = max(1, int(self.cfg.step_s * 1000))
        totals = {"requests": 0, "impressions": 0, "predictions": 0}
        w0, e0 = time.monotonic(), self.clock_ms
        self.lateness_s = 0.0
        while self.clock_ms < t_ms and not stop():
            t0, t1 = self.clock_ms, min(int(t_ms), self.clock_ms + step_ms)
            got = self._step(t0, t1)
            for k in totals:
                totals[k] += got.get(k, 0)
            self.m["event_time"].labels("follow").set(t1 / 1000.0)
            if self.cfg.compression:
                due = w0 + (t1 - e0) / 1000.0 / self.cfg.compression
                ahead = due - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing event time to wall time, not synchronization
                else:
                    self.lateness_s = max(self.lateness_s, -ahead)
            if self.cfg.progress is not None:
                self.cfg.progress(
                    {"t_ms": t1, "end_ms": int(t_ms), "serving": self.serving, **totals}
                )
        return totals

    def run(
        self,
        start_ms: int,
        end_ms: int,
        *,
        stop: Callable[[], bool] = lambda: False,
        final: bool = False,
    ) -> FollowSummary:
        """Run event time ``[clock or start_ms, end_ms)`` (a resumed loop continues at its
        clock), then checkpoint. The clicks decided but not yet due stay pending (in the
        checkpoint: the next run produces them at their time); with ``final`` the run is the
        world's end: every pending click is produced now and the served experiment's ledger
        credits them before its last look."""
        resumed = self.resumed
        if not resumed and self.steps == 0:
            self.clock_ms = int(start_ms)
        assert self.clock_ms is not None
        e0, s0 = self.clock_ms, self.steps
        sent0 = dict(self.emitter.sent)
        w0 = time.monotonic()
        decide0 = self.current.loop.stage_s["decide"] if self.current else 0.0
        totals = self.step_to(end_ms, stop=stop)
        if final and self.clock_ms >= end_ms:
            self.emitter.clicks_due(np.iinfo(np.int64).max)
            if self.current is not None:
                loop = self.current.loop
                loop._credit_metrics(*loop.ledger.drain())
        if self.current is not None and self.clock_ms > e0:
            self.current.loop.ledger.snapshot_series(self.clock_ms)
            self.current.loop.look(self.clock_ms)
        self.checkpoint()
        stage = dict(self.current.loop.stage_s) if self.current else {}
        return FollowSummary(
            started_ms=e0,
            ended_ms=self.clock_ms,
            steps=self.steps - s0,
            requests=totals["requests"],
            impressions=totals["impressions"],
            clicks=int(self.emitter.sent["clicks"] - sent0.get("clicks", 0)),
            predictions=totals["predictions"],
            wall_s=time.monotonic() - w0,
            decide_s=stage.get("decide", 0.0) - decide0,
            resumed=resumed,
            lateness_s=getattr(self, "lateness_s", 0.0),
            stage_s={k: round(v, 2) for k, v in stage.items()},
            segments=[dict(s) for s in self.segments],
            switches=self.switches,
        )

    def close(self) -> None:
        """Checkpoint and release the served experiment's rankers (the loop can be built
        again on the same ``state_dir`` to continue)."""
        try:
            self.checkpoint()
        finally:
            if self.current is not None:
                self.current.rankers.close()
                self.current = None


def run_follow(
    settings: Settings,
    *,
    default: Any = None,
    traffic: Any = None,
    scenario: str = "steady",
    start_ms: int | None = None,
    duration_s: float = 3600.0,
    step_s: float = 5.0,
    compression: float | None = None,
    request_rate: float | None = None,
    fresh: bool = False,
    checkpoint_every: int = 20,
    overrides: dict | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> FollowSummary:
    """``ctrstream loop run --follow``: the following loop for ``duration_s`` of event time
    from the world's start (a restarted loop resumes at its checkpoint and ends at the same
    time); ``stop()`` true ends it early at a step's end, checkpointed."""
    import shutil

    from ctrstream.loop.wiring import build_world

    world, start = build_world(
        settings,
        traffic=traffic,
        scenario=scenario,
        start_ms=start_ms,
        request_rate=request_rate,
        overrides=overrides,
    )
    cfg = LoopConfig(step_s=step_s, compression=compression, checkpoint_every=checkpoint_every)
    folder = settings.run_dir / "loop-follow"
    if fresh and folder.exists():
        shutil.rmtree(folder)
    loop = FollowLoop(settings, world, cfg, default=default, state_dir=folder)
    try:
        return loop.run(start, start + int(duration_s * 1000), stop=stop)
    finally:
        loop.close()


__all__ = [
    "DEFAULT_CHAMPION",
    "FollowError",
    "FollowLoop",
    "FollowSummary",
    "champion_default",
    "follow_default",
    "run_follow",
]
