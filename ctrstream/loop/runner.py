"""The closed loop: the world asks, the ad server decides, the world answers.

One step covers ``step_s`` seconds of event time, ``[t0, t0 + step)``:

1. the clicks the world decided earlier whose event time is before ``t0`` go to Kafka, and
   the ledger credits them (an experiment sees a click when it happens, not when decided);
2. the world's requests of the step; each user's arm (``assign``: a salted hash); requests
   of a stopped arm are served by the control and not counted;
3. the ad server ranks the whole batch: one feature read at each request's event time, one
   Triton call per model, calibration, the auction - **before** any event of the step is
   produced, and the guard below checks that nothing at or after the batch's first request
   time has ever been produced (features cannot see the future, however far the
   time-compressed world runs ahead);
4. the world decides clicks for what was shown (the true probability at the shown slot);
   impressions (request id, arm, slot, price) and predictions (model name, version, arm) go
   to Kafka; clicks wait for their time;
5. online arms (:class:`~ctrstream.loop.online_arm.OnlineArm`) are handed every shown
   impression's model inputs and outcome, and at the next steps' starts learn from those
   whose attribution window has closed;
6. the ledger and the per-arm metrics record it; every ``analyze_every_s`` of event time the
   experiment is analysed (always-valid test, guardrails) and its state saved; every
   ``checkpoint_every`` steps the loop's own state is checkpointed (world, ledger, pending
   clicks, online learners, clock) so a restarted ad server continues the same experiment.

After a kill -9 the loop resumes at its last checkpoint and decides the steps after it
again, with the same ids (the speed layer deduplicates the copies in Kafka, the ledger and
the decision log hold each step once). Those steps' features may then include the first
attempt's events of the same steps, which the guard cannot see (it knows what this process
produced): ``checkpoint_every`` bounds how many steps that can affect.

Time compression: with ``compression`` set, the loop paces event time to wall time
(``compression`` event seconds per wall second) and says so when it cannot keep up; without
it the loop runs as fast as it can.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctrstream.config import Settings
from ctrstream.events import SCHEMA_VERSION, Click, Impression, Prediction
from ctrstream.loop.emitter import Emitter, _Pending
from ctrstream.loop.ledger import ImpressionLog, Ledger, RequestLog
from ctrstream.loop.metrics import loop_metrics
from ctrstream.loop.online_arm import OnlineArm

log = logging.getLogger("ctrstream.loop")


class LeakageError(RuntimeError):
    """An event at or after a request's time was produced before its features were read."""


@dataclass
class LoopConfig:
    step_s: float = 5.0  # event time per micro-batch of requests
    compression: float | None = None  # event seconds per wall second; None: as fast as it can
    analyze_every_s: float = 300.0  # event time between two looks of the sequential test
    checkpoint_every: int = 20  # steps between two checkpoints of the loop's state
    progress: Callable[[dict], None] | None = None


@dataclass
class LoopSummary:
    started_ms: int
    ended_ms: int
    steps: int
    requests: int
    impressions: int
    clicks: int
    predictions: int
    wall_s: float
    decide_s: float  # wall time inside the ad server
    resumed: bool = False
    lateness_s: float = 0.0  # how far behind the pacing the loop fell (compression set)
    stage_s: dict[str, float] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.requests / max(self.wall_s, 1e-9)

    @property
    def impressions_per_s(self) -> float:
        return self.impressions / max(self.wall_s, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            requests_per_s=round(self.requests_per_s, 1),
            impressions_per_s=round(self.impressions_per_s, 1),
            event_time_compression=round(
                (self.ended_ms - self.started_ms) / 1000 / max(self.wall_s, 1e-9), 1
            ),
        )
        return d


class ClosedLoop:
    """Runs one experiment's closed loop (see the module docstring).

    ``world``: a :class:`ctrstream.simulation.world.World`; ``decide``: the ad server's
    ``decide(batch, arm_of_request) -> Decisions`` for this experiment's rankers;
    ``experiment``/``registry``: the definition and the file store of its state;
    ``state_dir``: where the loop checkpoints; ``online``: the online arms' learners by arm
    name (``decide`` must then return ``Decisions.inputs``); ``owns_world``: false when the
    world, the pending clicks and the emitter are shared with other experiments' loops
    (:class:`ctrstream.loop.follow.FollowLoop` checkpoints those itself; this loop then
    checkpoints only the experiment's own state: ledger, logs, online learners, its clock)."""

    def __init__(
        self,
        settings: Settings,
        world: Any,
        decide: Callable[[Any, np.ndarray], Any],
        experiment: Any,
        registry: Any,
        state_dir: Path,
        cfg: LoopConfig | None = None,
        emitter: Emitter | None = None,
        online: dict[str, OnlineArm] | None = None,
        *,
        owns_world: bool = True,
    ):
        from ctrstream.experiments.assignment import assign

        self.settings = settings
        self.world = world
        self.decide = decide
        self.exp = experiment
        self.registry = registry
        self.cfg = cfg or LoopConfig()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.emitter = emitter or Emitter(settings)
        self.owns_world = owns_world
        self.online: dict[str, OnlineArm] = dict(online or {})
        self._assign = assign
        self.deciding = [a.name for a in experiment.arms if not a.shadow]
        self.shadows = [a.name for a in experiment.arms if a.shadow]
        self.model_arms = [a.name for a in experiment.arms if a.kind == "model" and not a.shadow]
        self.control = self.deciding.index(experiment.control)
        self.ledger = Ledger(tuple(self.deciding), tuple(self.shadows), int(world.scenario.n_users))
        self.log = ImpressionLog(self.state_dir / "impressions")
        self.request_log = RequestLog(self.state_dir / "requests")
        self.clock_ms: int | None = None
        self.next_look_ms: int | None = None
        self._record: Any = None  # the experiment's state, re-read every step
        self.steps = 0
        self.m = loop_metrics()
        self.stage_s = {"world": 0.0, "decide": 0.0, "kafka": 0.0, "ledger": 0.0, "analyze": 0.0}
        if self.online:
            self.stage_s["learn"] = 0.0

    # ------------------------------------------------------------------ state

    @property
    def _ckpt(self) -> Path:
        return self.state_dir / "loop-state.json"

    def _online_path(self, arm: str) -> Path:
        return self.state_dir / f"online-{arm}.pt"

    def resume(self) -> bool:
        """Continue from the last checkpoint, if any; returns whether one was found."""
        if not self._ckpt.exists():
            return False
        meta = json.loads(self._ckpt.read_text())
        self.clock_ms = int(meta["clock_ms"])
        self.next_look_ms = int(meta["next_look_ms"])
        self.steps = int(meta["steps"])
        self.log.prune_after(self.clock_ms)
        self.request_log.prune_after(self.clock_ms)
        self.ledger = Ledger.load(self.state_dir / "ledger.npz")
        if self.owns_world:
            self.emitter.sent = dict(meta["sent"])
            load_world(self.state_dir, self.world, self.emitter)
        for a, arm in self.online.items():
            path = self._online_path(a)
            if not path.exists():
                raise RuntimeError(
                    f"the loop's checkpoint in {self.state_dir} has no state of the online arm "
                    f"{a} ({path.name}): it was written without it; start the loop fresh"
                )
            arm.load(path)
        log.info("resumed the loop of %s at event time %d", self.exp.name, self.clock_ms)
        return True

    def checkpoint(self) -> None:
        """World, ledger, pending clicks, online learners (net, optimizers, the rows waiting
        for their labels) and clock, written so a crash leaves the previous checkpoint or this
        one (the clock file is replaced last)."""
        assert self.clock_ms is not None
        self.emitter.flush()
        self.log.flush(self.clock_ms)
        self.request_log.flush(self.clock_ms)
        self.ledger.save(self.state_dir / "ledger.npz")
        if self.owns_world:
            save_world(self.state_dir, self.world, self.emitter)
        for a, arm in self.online.items():
            arm.save(self._online_path(a))
        meta = {
            "clock_ms": self.clock_ms,
            "next_look_ms": self.next_look_ms,
            "steps": self.steps,
            "sent": self.emitter.sent,
        }
        tmp_json = self._ckpt.with_suffix(".tmp")
        tmp_json.write_text(json.dumps(meta))
        tmp_json.replace(self._ckpt)

    # ------------------------------------------------------------------ one step

    def _arms(self, user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the arm that decides, the arm it is counted in or -1) per request."""
        arm = np.asarray(self._assign(user, self.exp), dtype=np.int64)
        stopped = self._record.stopped_arms
        counted = arm.copy()
        if stopped:
            for k, name in enumerate(self.deciding):
                if name in stopped:
                    sel = arm == k
                    arm[sel] = self.control
                    counted[sel] = -1
        return arm, counted

    def step(self, t0: int, t1: int) -> dict[str, int]:
        m, name = self.m, self.exp.name
        self._record = self.registry.get(name)  # arms stopped since the last step
        if self.online:
            cl = time.perf_counter()
            for oa in self.online.values():  # the labels final at t0, before deciding
                oa.advance(t0)
            self.stage_s["learn"] += time.perf_counter() - cl
        c0 = time.perf_counter()
        self.emitter.clicks_due(t0)
        self._credit_metrics(*self.ledger.credit_due(t0))
        batch = self.world.requests(t0, t1)
        c1 = time.perf_counter()
        n = len(batch.request_id)
        if n == 0:
            self.stage_s["world"] += c1 - c0
            return {"requests": 0, "impressions": 0}
        first = int(batch.event_time_ms.min())
        if self.emitter.max_event_ms >= first:
            raise LeakageError(
                f"an event at {self.emitter.max_event_ms} was produced before the features of "
                f"a request at {first} were read"
            )
        arm, counted_arm = self._arms(batch.user_id)
        d = self.decide(batch, arm)
        c2 = time.perf_counter()
        for stage, sec in getattr(d, "timings", {}).items():
            if stage != "feature_reads":
                key = f"adserver.{stage}"
                self.stage_s[key] = self.stage_s.get(key, 0.0) + sec
        shown = _shown(batch, d)
        out = self.world.show(batch, shown)
        c3 = time.perf_counter()
        imps, preds, clicks = _events(batch, d, shown, out, self.model_arms)
        self.log.add(_log_rows(batch, d, shown, out, counted_arm >= 0))
        self.request_log.add(
            {
                "request_id": batch.request_id.astype(str),
                "event_time_ms": batch.event_time_ms,
                "user_id": batch.user_id,
                "arm": np.asarray(self.deciding, dtype=object)[arm].astype(str),
                "counted": counted_arm >= 0,
                "slots": batch.n_slots,
                "filled": d.request_filled,
                "latency_ms": d.request_latency_ms,
                "degraded": d.request_degraded,
            }
        )
        self.emitter.impressions(imps)
        self.emitter.predictions(preds)
        self.emitter.schedule_clicks(clicks)
        c4 = time.perf_counter()
        # the ledger and the metrics
        req_counted = counted_arm >= 0
        self.ledger.record_requests(
            batch.user_id,
            counted_arm,
            batch.n_slots,
            d.request_filled,
            d.request_latency_ms,
            d.request_degraded.astype(np.int64),
            d.request_degraded.astype(np.int64),
        )
        r = d.request_index
        imp_counted = req_counted[r]
        shadow_pred = [d.shadows[s].pctr for s in self.shadows]
        self.ledger.record_impressions(
            batch.user_id[r],
            arm[r],
            imp_counted,
            d.price,
            out.p_true,
            d.pctr,
            shadow_pred,
            out.clicked,
            out.click_time_ms,
        )
        for k, a in enumerate(self.deciding):
            rs = (arm == k) & req_counted
            if not rs.any():
                continue
            isel = (arm[r] == k) & imp_counted
            m["requests"].labels(name, a).inc(int(rs.sum()))
            m["slots"].labels(name, a).inc(int(batch.n_slots[rs].sum()))
            m["impressions"].labels(name, a).inc(int(isel.sum()))
            m["expected_clicks"].labels(name, a).inc(float(out.p_true[isel].sum()))
            m["expected_revenue"].labels(name, a).inc(
                float((out.p_true[isel] * d.price[isel]).sum())
            )
            m["predicted_clicks"].labels(name, a).inc(float(d.pctr[isel].sum()))
            m["errors"].labels(name, a).inc(int(d.request_degraded[rs].sum()))
            hist = m["latency"].labels(name, a)
            for v in (d.request_latency_ms[rs] / 1000.0).tolist():
                hist.observe(v)
        m["event_time"].labels(name).set(t1 / 1000.0)
        c5 = time.perf_counter()
        if self.online:  # every shown impression, learned from once its label is final
            if d.inputs is None:
                raise RuntimeError(
                    "the loop has online arms but decide returned no model inputs: call the "
                    "ad server's decide with keep_inputs=True"
                )
            t_imp = batch.event_time_ms[r]
            sparse, dense = d.inputs
            for oa in self.online.values():
                oa.observe(t_imp, sparse, dense, out.clicked, out.click_time_ms)
            self.stage_s["learn"] += time.perf_counter() - c5
        self.stage_s["world"] += (c1 - c0) + (c3 - c2)
        self.stage_s["decide"] += c2 - c1
        self.stage_s["kafka"] += c4 - c3
        self.stage_s["ledger"] += c5 - c4
        return {"requests": n, "impressions": len(imps), "predictions": len(preds)}

    def _credit_metrics(self, users: np.ndarray, prices: np.ndarray) -> None:
        """The per-arm click and revenue counters for clicks the ledger just credited."""
        if not len(users):
            return
        arm = self.ledger.arm_of_user[users]
        for k, a in enumerate(self.deciding):
            sel = arm == k
            if sel.any():
                self.m["clicks"].labels(self.exp.name, a).inc(int(sel.sum()))
                self.m["revenue"].labels(self.exp.name, a).inc(float(prices[sel].sum()))

    def look(self, now_ms: int) -> Any:
        """Analyse the experiment now: the sequential test, the guardrails, its saved state."""
        from ctrstream.loop.analysis import analyze_ledger

        c0 = time.perf_counter()
        rep = analyze_ledger(self.exp, self.ledger, self.registry, now_ms)
        stopped = self.registry.get(self.exp.name).stopped_arms
        for a in self.deciding:
            self.m["arm_running"].labels(self.exp.name, a).set(0 if a in stopped else 1)
        for c in rep.comparisons:
            if c.metric == self.exp.primary_metric:
                self.m["decided"].labels(self.exp.name, c.treatment).set(1 if c.decided else 0)
        self.stage_s["analyze"] += time.perf_counter() - c0
        return rep

    def finish(self, now_ms: int) -> Any:
        """The experiment's last analysis when it stopped while the world goes on (a following
        loop serves the next one): every click it decided is credited (decided, not yet all
        due: the shared emitter still produces each at its own event time), its state is
        checkpointed, and the analysis is saved as its report (``report.json`` in the
        registry, with a ``final`` entry) and as ``final/experiment.{json,md}`` beside the
        loop's state. Returns the report."""
        from ctrstream.loop.analysis import analyze_ledger

        self.clock_ms = int(now_ms)
        self._credit_metrics(*self.ledger.drain())
        self.ledger.snapshot_series(self.clock_ms)
        self.checkpoint()
        rep = analyze_ledger(self.exp, self.ledger, self.registry, self.clock_ms, act=False)
        doc = rep.to_dict()
        doc["final"] = {"ended_ms": self.clock_ms, "steps": self.steps}
        self.registry.save_report(self.exp.name, doc)
        out = self.state_dir / "final"
        out.mkdir(parents=True, exist_ok=True)
        (out / "experiment.json").write_text(json.dumps(doc, indent=2, default=str))
        (out / "experiment.md").write_text(rep.markdown())
        for a in self.deciding:
            self.m["arm_running"].labels(self.exp.name, a).set(0)
        return rep

    # ------------------------------------------------------------------ the run

    def run(self, start_ms: int, end_ms: int, *, stop: Callable[[], bool] = lambda: False):
        """Run event time ``[clock or start_ms, end_ms)``, then credit every pending click and
        analyse once more. Returns a :class:`LoopSummary`."""
        resumed = self.clock_ms is not None
        if self.clock_ms is None:
            self.clock_ms = int(start_ms)
            self.next_look_ms = int(start_ms + self.cfg.analyze_every_s * 1000)
        assert self.next_look_ms is not None
        step_ms = max(1, int(self.cfg.step_s * 1000))
        w0 = time.monotonic()
        e0 = self.clock_ms
        totals = {"requests": 0, "impressions": 0, "predictions": 0}
        lateness = 0.0
        while self.clock_ms < end_ms and not stop():
            if not self.registry.get(self.exp.name).running:
                log.info("experiment %s was stopped: the loop ends", self.exp.name)
                break
            t0, t1 = self.clock_ms, min(end_ms, self.clock_ms + step_ms)
            got = self.step(t0, t1)
            for k in totals:
                totals[k] += got.get(k, 0)
            self.clock_ms = t1
            self.steps += 1
            if t1 >= self.next_look_ms:
                self.look(t1)
                self.ledger.snapshot_series(t1)
                self.next_look_ms += int(self.cfg.analyze_every_s * 1000)
            if self.steps % self.cfg.checkpoint_every == 0:
                self.checkpoint()
            if self.cfg.compression:
                due = w0 + (t1 - e0) / 1000.0 / self.cfg.compression
                ahead = due - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing event time to wall time, not synchronization
                else:
                    lateness = max(lateness, -ahead)
            if self.cfg.progress is not None:
                self.cfg.progress({"t_ms": t1, "end_ms": end_ms, **totals})
        if self.clock_ms >= end_ms or not stop():
            # the run is over: every decided click happens (its event time passes)
            self.emitter.clicks_due(np.iinfo(np.int64).max)
            self._credit_metrics(*self.ledger.drain())
        # stopped early (SIGTERM): the pending clicks stay in the checkpoint, for the resume
        self.ledger.snapshot_series(self.clock_ms)
        self.checkpoint()
        self.look(self.clock_ms)
        wall = time.monotonic() - w0
        return LoopSummary(
            started_ms=e0,
            ended_ms=self.clock_ms,
            steps=self.steps,
            requests=totals["requests"],
            impressions=totals["impressions"],
            clicks=int(sum(v["clicks"] for v in self.ledger.totals().values())),
            predictions=totals["predictions"],
            wall_s=wall,
            decide_s=self.stage_s["decide"],
            resumed=resumed,
            lateness_s=lateness,
            stage_s={k: round(v, 2) for k, v in self.stage_s.items()},
        )


def save_world(folder: Path, world: Any, emitter: Emitter) -> None:
    """The world's state and the clicks decided but not yet due, each file replaced
    atomically (``world.npz``, ``pending-clicks.npz``)."""
    tmp = folder / "world.tmp.npz"
    np.savez(tmp, allow_pickle=False, **world.state())
    tmp.replace(folder / "world.npz")
    tmp = folder / "pending-clicks.tmp.npz"
    np.savez(tmp, allow_pickle=False, **emitter.pending.arrays())
    tmp.replace(folder / "pending-clicks.npz")


def load_world(folder: Path, world: Any, emitter: Emitter) -> None:
    """What :func:`save_world` wrote, back into ``world`` and ``emitter``."""
    with np.load(folder / "world.npz", allow_pickle=False) as z:
        world.load_state({k: z[k] for k in z.files})
    with np.load(folder / "pending-clicks.npz", allow_pickle=False) as z:
        emitter.pending = _Pending.from_arrays({k: z[k] for k in z.files})


# --------------------------------------------------------------------------- batch -> events


def _shown(batch: Any, d: Any) -> Any:
    from ctrstream.simulation.world import Shown

    return Shown.of(batch, d.candidate_index, d.slot)


def _log_rows(batch: Any, d: Any, shown: Any, out: Any, counted: np.ndarray) -> dict:
    """The decision log's rows of one batch (``counted``: per request, whether its arm is
    counted by the experiment - false once a guardrail stopped its arm)."""
    r, c = d.request_index, d.candidate_index
    return {
        "impression_id": shown.impression_id.astype(str),
        "request_id": batch.request_id[r].astype(str),
        "event_time_ms": batch.event_time_ms[r],
        "user_id": batch.user_id[r],
        "ad_id": batch.cand_ad_id[c],
        "arm": d.arm.astype(str),
        "counted": counted[r],
        "slot": d.slot,
        "price": d.price,
        "model_name": d.model_name.astype(str),
        "model_version": d.model_version.astype(str),
        "raw_score": d.pctr_raw,
        "calibrated_score": d.pctr,
        "pctr0": d.pctr0,
        "propensity": d.propensity,
        "explored": d.explored,
        "degraded": d.degraded,
        "p_true": out.p_true,
        "clicked": out.clicked,
        "click_time_ms": out.click_time_ms,
    }


def _events(
    batch: Any, d: Any, shown: Any, out: Any, model_arms: list[str]
) -> tuple[list[Impression], list[Prediction], list[Click]]:
    from ctrstream.serving.triton_client import base_model_name

    r, c = d.request_index, d.candidate_index
    t = batch.event_time_ms[r].tolist()
    user = batch.user_id[r].tolist()
    site = batch.site_id[r].tolist()
    dev = batch.device_type[r].tolist()
    country = batch.country[r].tolist()
    rid = batch.request_id[r].tolist()
    ad = batch.cand_ad_id[c].tolist()
    camp = batch.cand_campaign_id[c].tolist()
    adv = batch.cand_advertiser_id[c].tolist()
    cat = batch.cand_ad_category[c].tolist()
    slot = d.slot.tolist()
    price = d.price.tolist()
    arm = d.arm.tolist()
    iid = shown.impression_id.tolist()
    imps = [
        Impression(
            schema_version=SCHEMA_VERSION,
            impression_id=iid[k],
            event_time_ms=t[k],
            user_id=user[k],
            ad_id=ad[k],
            campaign_id=camp[k],
            advertiser_id=adv[k],
            site_id=site[k],
            ad_category=cat[k],
            device_type=dev[k],
            country=country[k],
            position=slot[k],
            request_id=rid[k],
            arm=arm[k],
            price=price[k],
        )
        for k in range(len(iid))
    ]
    preds: list[Prediction] = []
    names = [base_model_name(str(x)) for x in d.model_name.tolist()]
    versions = d.model_version.tolist()
    raw, cal, deg = d.pctr_raw.tolist(), d.pctr.tolist(), d.degraded.tolist()
    is_model = np.isin(d.arm, model_arms).tolist()
    for k in range(len(iid)):
        if not is_model[k] or not versions[k]:  # prior, oracle, fallback: nothing to calibrate
            continue
        preds.append(
            Prediction(
                impression_id=iid[k],
                event_time_ms=t[k],
                model_version=str(versions[k]),
                raw_score=raw[k],
                calibrated_score=cal[k],
                degraded=bool(deg[k]),
                model_name=names[k],
                arm=arm[k],
            )
        )
    hit = np.flatnonzero(out.clicked)
    ct = out.click_time_ms.tolist()
    clicks = [
        Click(
            schema_version=SCHEMA_VERSION,
            click_id=f"c{iid[k]}",
            impression_id=iid[k],
            event_time_ms=ct[k],
            user_id=user[k],
            ad_id=ad[k],
            campaign_id=camp[k],
            advertiser_id=adv[k],
            site_id=site[k],
            ad_category=cat[k],
        )
        for k in hit.tolist()
    ]
    return imps, preds, clicks


__all__ = ["ClosedLoop", "LoopConfig", "LoopSummary", "LeakageError"]
