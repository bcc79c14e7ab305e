"""The following loop (ctrstream.loop.follow) without servers: the real world, the real
registry and ledger, a fake ad server (each request's first candidates) and a fake Kafka
producer that records every record with its event time and the loop's clock when produced.

What it checks: the default serves when no experiment runs; an experiment started in the
registry serves from the next step; the newest running experiment decides and an older one
waits; a stopped experiment gets its final report and the traffic goes back; clicks reach
Kafka at their own event time across switches (never before the clock passed them); no
default and nothing running is a clear error; a loop rebuilt on its checkpoint (a kill -9)
continues the clock and decides exactly what a straight run decides."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from ctrstream.config import Settings
from ctrstream.events import decode_click, decode_impression
from ctrstream.experiments.design import Arm, Experiment, Guardrails
from ctrstream.experiments.registry import Registry
from ctrstream.loop.emitter import Emitter
from ctrstream.loop.follow import FollowError, FollowLoop, champion_default
from ctrstream.loop.runner import LoopConfig

MIN = 60_000
SMALL = dict(
    events=20_000,
    hours=2.0,
    seed=11,
    n_users=2_000,
    n_ads=200,
    n_campaigns=40,
    n_advertisers=10,
    n_sites=50,
    candidates_per_request=8,
)


class FakeProducer:
    """Records (topic, key, value, timestamp, the loop's clock when produced)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes, int, int | None]] = []
        self.clock: list[int | None] = [None]

    def produce(self, topic, value, key, timestamp):
        self.records.append((topic, key, value, int(timestamp), self.clock[0]))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


class FakeRankers:
    """Each request's first n_slots candidates in order, priced at half the bid."""

    calls: list[tuple[str, int]] = []  # (experiment, first request time) per decide

    def __init__(self, settings, exp, world) -> None:
        self.exp = exp
        self.online: dict = {}
        self.deciding = [a.name for a in exp.arms if a.deciding]
        self.closed = False

    def decide(self, b, arm_of_request):
        from ctrstream.serving.adserver import Decisions

        FakeRankers.calls.append((self.exp.name, int(b.event_time_ms.min())))
        pos = np.arange(b.n_candidates) - b.cand_offsets[b.cand_request]
        ci = np.flatnonzero(pos < b.n_slots[b.cand_request])
        ri = b.cand_request[ci]
        k, n = len(ci), len(b.request_id)
        names = np.asarray(self.deciding, dtype=object)[arm_of_request]
        filled = np.bincount(ri, minlength=n).astype(np.int64)
        return Decisions(
            request_index=ri,
            candidate_index=ci,
            arm=names[ri],
            slot=pos[ci].astype(np.int64),
            price=b.cand_bid[ci] * 0.5,
            pctr0=np.full(k, 0.02),
            pctr_raw=np.full(k, 0.02),
            pctr=np.full(k, 0.02),
            model_name=np.full(k, "prior", dtype=object),
            model_version=np.full(k, "", dtype=object),
            propensity=np.ones(k),
            explored=np.zeros(k, bool),
            new_ad=np.zeros(k, bool),
            degraded=np.zeros(k, bool),
            request_arm=names,
            request_slots=b.n_slots,
            request_filled=filled,
            request_latency_ms=np.full(n, 1.0),
            request_degraded=np.zeros(n, bool),
        )

    def close(self) -> None:
        self.closed = True


def _exp(name: str) -> Experiment:
    wide = Guardrails(calibration_ratio=(0.01, 100.0), latency_p99_ms_max=60_000.0)
    return Experiment(
        name=name,
        salt=name,
        arms=(Arm("a", "prior", 0.5), Arm("b", "oracle", 0.5)),
        control="a",
        guardrails=wide,
    ).validate()


@pytest.fixture
def env(tmp_path):
    s = Settings(run_dir=tmp_path / "run")
    return SimpleNamespace(settings=s, registry=Registry.of(s), folder=tmp_path / "follow")


def _loop(env, default=None, producer=None, **cfg):
    from ctrstream.loop.wiring import build_world

    world, start = build_world(env.settings, scenario="steady", request_rate=3.0, overrides=SMALL)
    producer = producer or FakeProducer()
    emitter = Emitter(env.settings, producer=producer)
    loop = FollowLoop(
        env.settings,
        world,
        LoopConfig(
            step_s=10.0,
            analyze_every_s=cfg.pop("analyze_every_s", 120.0),
            checkpoint_every=cfg.pop("checkpoint_every", 6),
        ),
        default=default,
        state_dir=env.folder,
        emitter=emitter,
        rankers=FakeRankers,
        pin=False,
    )
    return loop, start, producer


def _tick(loop, producer, to_ms: int) -> None:
    """step_to one step at a time, telling the fake producer the clock (when each record
    was produced)."""
    step = int(loop.cfg.step_s * 1000)
    while loop.clock_ms < to_ms:
        producer.clock[0] = loop.clock_ms
        loop.step_to(min(to_ms, loop.clock_ms + step))


def _served_by(producer, settings):
    """{impression time: arm} of every produced impression."""
    topic = settings.topics.impressions.name
    return [
        (decode_impression(v).event_time_ms, decode_impression(v).arm)
        for t, _, v, _, _ in producer.records
        if t == topic
    ]


def test_the_default_then_a_started_experiment_then_back(env):
    FakeRankers.calls.clear()
    loop, start, prod = _loop(env, default=_exp("live"))
    s = env.settings
    _tick(loop, prod, start + 3 * MIN)
    assert loop.serving == "live"
    assert env.registry.get("live").running  # the default is registered, like any experiment
    # B starts in the registry mid-run: it serves from the next step
    t_b = loop.clock_ms
    env.registry.start(_exp("b-exp"), t_b)
    _tick(loop, prod, t_b + 10_000)
    assert loop.serving == "b-exp"
    assert {e for e, t in FakeRankers.calls if t >= t_b} == {"b-exp"}
    assert {e for e, t in FakeRankers.calls if t < t_b} == {"live"}
    _tick(loop, prod, t_b + 5 * MIN)
    # B stops: its final report, and the default serves again from the next step
    t_stop = loop.clock_ms
    env.registry.stop("b-exp", "operator", at_ms=t_stop)
    _tick(loop, prod, t_stop + 3 * MIN)
    assert loop.serving == "live"
    assert {e for e, t in FakeRankers.calls if t >= t_stop} == {"live"}
    rep = env.registry.load_report("b-exp")
    assert rep is not None and rep["final"]["ended_ms"] == t_stop
    assert [a["name"] for a in rep["arms"]] == ["a", "b"]
    final = s.run_dir / "experiments" / "b-exp" / "loop" / "final" / "experiment.md"
    assert final.exists()
    # the segments: live, b-exp, live (the same incarnation of live resumed)
    segs = [(x["experiment"], x["from_ms"], x["to_ms"]) for x in loop.segments]
    assert segs == [
        ("live", start, t_b),
        ("b-exp", t_b, t_stop),
        ("live", t_stop, None),
    ]
    # every impression at its request's time, never before the clock reached it; every
    # click at its own event time, produced once the clock passed it (across both switches)
    imps = [r for r in prod.records if r[0] == s.topics.impressions.name]
    clicks = [r for r in prod.records if r[0] == s.topics.clicks.name]
    assert imps and clicks
    assert all(clock <= ts for _, _, _, ts, clock in imps)
    assert all(ts < clock for _, _, _, ts, clock in clicks)  # due before the step's start
    decided = {decode_impression(v).impression_id: decode_impression(v) for _, _, v, _, _ in imps}
    for _, _, v, ts, _ in clicks:
        c = decode_click(v)
        assert c.event_time_ms == ts > decided[c.impression_id].event_time_ms
    # clicks decided under b-exp went to Kafka after the switch back, at their own time
    late = [
        c
        for c in (decode_click(v) for _, _, v, ts, _ in clicks)
        if c.event_time_ms >= t_stop
        and decided[c.impression_id].arm in ("a", "b")
        and t_b <= decided[c.impression_id].event_time_ms < t_stop
    ]
    assert late  # the pending clicks were carried over the switch
    loop.close()


def test_the_newest_running_experiment_decides_and_an_older_one_waits(env):
    FakeRankers.calls.clear()
    loop, start, prod = _loop(env, default=_exp("live"))
    env.registry.start(_exp("old"), start)
    _tick(loop, prod, start + 2 * MIN)
    assert loop.serving == "old"
    t_new = loop.clock_ms
    env.registry.start(_exp("new"), t_new)
    _tick(loop, prod, t_new + 2 * MIN)
    assert loop.serving == "new"
    t_stop = loop.clock_ms
    env.registry.stop("new", "done", at_ms=t_stop)
    _tick(loop, prod, t_stop + 2 * MIN)
    assert loop.serving == "old"  # the older one takes the traffic back, not the default
    assert env.registry.load_report("new")["final"]["ended_ms"] == t_stop
    led = json.loads(
        (env.settings.run_dir / "experiments" / "old" / "loop" / "loop-state.json").read_text()
    )
    assert led["clock_ms"] <= loop.clock_ms
    assert not any(e == "live" for e, _ in FakeRankers.calls)  # something ran all along
    loop.close()


def test_no_default_and_nothing_running_is_a_clear_error(env):
    loop, start, prod = _loop(env, default=None)
    with pytest.raises(FollowError, match="experiment start"):
        loop.step_to(start + 10_000)
    env.registry.start(_exp("only"), start)
    loop.step_to(start + 30_000)
    assert loop.serving == "only"
    env.registry.stop("only", "done", at_ms=loop.clock_ms)
    with pytest.raises(FollowError, match="no experiment runs"):
        loop.step_to(loop.clock_ms + 10_000)
    # its final report was written before the error
    assert env.registry.load_report("only")["final"]["ended_ms"] == loop.clock_ms


def test_a_loop_rebuilt_on_its_checkpoint_continues_like_a_straight_run(env, tmp_path):
    """A kill -9 after a checkpoint: the rebuilt loop resumes at the checkpoint's clock with
    the same world, pending clicks and served experiment, decides the same requests and ends
    with the same ledger as a loop that was never killed."""
    # the straight run, in its own run directory
    straight = SimpleNamespace(
        settings=Settings(run_dir=tmp_path / "straight"),
        folder=tmp_path / "straight-follow",
    )
    straight.registry = Registry.of(straight.settings)
    for e in (env, straight):
        e.registry.start(_exp("k"), 0)
    a, start, pa = _loop(straight, default=_exp("live"), checkpoint_every=4)
    _tick(a, pa, start + 20 * MIN)

    b, _, pb = _loop(env, default=_exp("live"), checkpoint_every=4)
    _tick(b, pb, start + 11 * MIN)  # 66 steps: the last checkpoint at 64 steps
    ckpt = json.loads((env.folder / "follow-state.json").read_text())
    assert ckpt["clock_ms"] == start + 64 * 10_000 and ckpt["serving"]["name"] == "k"
    del b  # killed: nothing closed, nothing checkpointed after step 64

    c, _, pc = _loop(env, default=_exp("live"), checkpoint_every=4)
    assert c.resumed and c.clock_ms == ckpt["clock_ms"] and c.steps == 64
    _tick(c, pc, start + 20 * MIN)
    assert c.steps == a.steps == 120  # no step done twice in the count
    assert c.serving == a.serving == "k"
    assert len(c.segments) == len(a.segments) == 1
    # the resumed run decided the same requests after the checkpoint as the straight one
    after = ckpt["clock_ms"]
    want = [x for x in _served_by(pa, straight.settings) if x[0] >= after]
    got = [x for x in _served_by(pc, env.settings) if x[0] >= after]
    assert got == want and got
    # and the ledgers agree (the killed steps counted once)
    assert c.current.loop.ledger.totals() == a.current.loop.ledger.totals()
    c.close()
    a.close()


def test_the_champion_default_and_a_default_that_moved_on(env):
    """champion_default: the champion split A/A with itself. A default whose definition
    changed (the champion's newest version moved) is stopped with its final report and
    registered again; the loop keeps serving it."""
    d = champion_default("ctr_lr", "live")
    assert [(a.name, a.model_name, a.model_version, a.weight) for a in d.arms] == [
        ("champion", "ctr_lr", None, 0.5),
        ("champion-b", "ctr_lr", None, 0.5),
    ]
    assert d.control == "champion" and d.name == d.salt == "live"

    loop, start, prod = _loop(env, default=_exp("live"))
    _tick(loop, prod, start + 2 * MIN)
    first = env.registry.get("live")
    t_b = loop.clock_ms
    env.registry.start(_exp("b-exp"), t_b)
    _tick(loop, prod, t_b + MIN)
    moved = dataclasses.replace(_exp("live"), min_run_s=60.0)
    loop._resolve_default = lambda: moved  # the champion moved while b-exp ran
    t_stop = loop.clock_ms
    env.registry.stop("b-exp", "promoted", at_ms=t_stop)
    _tick(loop, prod, t_stop + MIN)
    now = env.registry.get("live")
    assert loop.serving == "live" and now.running and now.experiment == moved
    assert now.started_at_ms == t_stop != first.started_at_ms
    archived = list((env.registry.root / ".archive").glob("live-*"))
    assert len(archived) == 1
    rep = json.loads((archived[0] / "report.json").read_text())
    assert rep["final"]["ended_ms"] == t_stop
    assert [x["experiment"] for x in loop.segments] == ["live", "b-exp", "live"]
    loop.close()
