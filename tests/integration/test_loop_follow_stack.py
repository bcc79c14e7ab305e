"""The following loop against the real stack (Kafka, Redis, Triton): the default (the
champion A/A) serves; an experiment started in the registry mid-run takes the traffic from
the next step; stopped, it gets its final report and the default serves again; the clicks
reach Kafka at their own event time across both switches and no request's features are read
after an event at or after its time was produced; ``ctrstream loop run --follow`` killed
with SIGKILL resumes at its checkpoint's clock and ends with every step counted once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_closed_loop import SMALL, _experiment, _onnx

from ctrstream.events import decode_click, decode_impression
from ctrstream.experiments.design import Arm, Guardrails
from ctrstream.kafka.topics import read_topic
from ctrstream.loop import session
from ctrstream.loop.follow import FollowLoop, champion_default
from ctrstream.loop.ledger import ImpressionLog, RequestLog
from ctrstream.loop.runner import LoopConfig
from ctrstream.loop.wiring import Rankers, build_world

MIN = 60_000
WIDE = Guardrails(calibration_ratio=(0.01, 100.0), latency_p99_ms_max=60_000.0)


@pytest.fixture
def own(fresh_topics, tmp_path):
    """Settings of the stack with fresh topics and a registry of their own: a run directory
    whose entries link to the stack's (passwords, keys, nodes) except ``experiments``, so the
    loop follows only this test's experiments."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for p in fresh_topics.run_dir.iterdir():
        if p.name != "experiments":
            (run_dir / p.name).symlink_to(p)
    return fresh_topics.model_copy(update={"run_dir": run_dir})


@pytest.fixture(scope="module")
def champion(settings, tmp_path_factory):
    """Two published models: the champion and another one for experiment B."""
    from ctrstream.models.publish import publish

    tag = os.urandom(3).hex()
    d = tmp_path_factory.mktemp("follow-models")
    names = (f"ctr_folla{tag}", f"ctr_follb{tag}")
    for k, base in enumerate(names):
        publish(settings, _onnx(d / f"{base}.onnx", seed=k + 5), base)
    return names


def test_the_loop_follows_the_registry_across_switches(own, champion, unique):
    s = own
    a, b = champion
    default = champion_default(a, f"live-{unique}")
    default = _experiment(default.name, list(default.arms), "champion", guardrails=WIDE)
    world, start = build_world(s, scenario="steady", request_rate=4.0, overrides=SMALL)
    reads: list[tuple[int, int]] = []  # (features read at, latest event produced before)
    produced: list[tuple[str, int, int]] = []  # (topic, event time, the loop's clock then)
    holder: dict = {}

    def rankers(settings, exp, w):  # the real ad server, its feature reads watched
        rk = Rankers(settings, exp, w)
        real = rk.server.store.read_columns

        def read_columns(cols, t):
            reads.append((int(t), holder["loop"].emitter.max_event_ms))
            return real(cols, t)

        rk.server.store.read_columns = read_columns
        return rk

    loop = FollowLoop(
        s,
        world,
        LoopConfig(step_s=10.0, analyze_every_s=120.0, checkpoint_every=10),
        default=default,
        rankers=rankers,
    )
    holder["loop"] = loop
    real_produce = loop.emitter._produce

    def produce(topic, key, value, ts):
        produced.append((topic, int(ts), int(loop.clock_ms)))
        real_produce(topic, key, value, ts)

    loop.emitter._produce = produce
    try:
        loop.step_to(start + 3 * MIN)
        assert loop.serving == default.name
        # B starts in the registry: the next step is its
        t_b = loop.clock_ms
        exp_b = _experiment(
            f"b-{unique}",
            [
                Arm(name="b-model", kind="model", weight=0.5, model_name=b),
                Arm(name="b-prior", kind="prior", weight=0.5),
            ],
            "b-prior",
            guardrails=WIDE,
        )
        session.start(s, exp_b, t_b)
        loop.step_to(t_b + 10_000)
        assert loop.serving == exp_b.name
        loop.step_to(t_b + 4 * MIN)
        # B stops: its final report; the default serves from the next step
        t_stop = loop.clock_ms
        session.stop(s, exp_b.name)
        loop.step_to(t_stop + 10_000)
        assert loop.serving == default.name
        loop.step_to(t_stop + 2 * MIN)
        end = loop.clock_ms
    finally:
        loop.close()

    # what served when: Kafka's impressions, by the arm that decided each
    imps = [decode_impression(r.value) for r in read_topic(s, s.topics.impressions.name, 60)]
    assert len(imps) > 1_000
    champ_arms, b_arms = {"champion", "champion-b"}, {"b-model", "b-prior"}
    assert {i.arm for i in imps if i.event_time_ms < t_b} == champ_arms
    assert {i.arm for i in imps if t_b <= i.event_time_ms < t_stop} == b_arms
    assert {i.arm for i in imps if t_stop <= i.event_time_ms < end} == champ_arms
    assert [(x["experiment"], x["from_ms"], x["to_ms"]) for x in loop.segments] == [
        (default.name, start, t_b),
        (exp_b.name, t_b, t_stop),
        (default.name, t_stop, None),
    ]
    # B's final report; the default still registered and running
    rep = session.registry(s).load_report(exp_b.name)
    assert rep["final"]["ended_ms"] == t_stop
    assert {x["name"] for x in rep["arms"]} == b_arms
    assert session.registry(s).get(default.name).running

    # no request's features were read after an event at or after its time was produced
    assert reads and all(latest < t for t, latest in reads), [r for r in reads if r[1] >= r[0]]
    # every event produced at its own time: an impression in the step being decided, a
    # click once the clock has passed it (clicks are produced at a step's start, before t0)
    imp_topic, click_topic = s.topics.impressions.name, s.topics.clicks.name
    assert all(clock <= ts for topic, ts, clock in produced if topic == imp_topic)
    click_rows = [(ts, clock) for topic, ts, clock in produced if topic == click_topic]
    assert click_rows and all(ts < clock for ts, clock in click_rows)
    # clicks in Kafka, after their impressions; some of B's went out after the switch back
    by_id = {i.impression_id: i for i in imps}
    clicks = [decode_click(r.value) for r in read_topic(s, click_topic, 60)]
    assert clicks and all(c.event_time_ms > by_id[c.impression_id].event_time_ms for c in clicks)
    carried = [
        c for c in clicks if c.event_time_ms >= t_stop and by_id[c.impression_id].arm in b_arms
    ]
    assert carried, "no click decided under B was produced after the switch back"
    session.stop(s, default.name)


def test_a_killed_following_loop_resumes_its_clock(own, champion, unique, stack_env, tmp_path):
    """``ctrstream loop run --follow`` killed (SIGKILL) after a checkpoint and started again:
    it resumes at the checkpoint's clock with the same served experiment and ends at the same
    event time, each step counted once (the steps redone after the kill carry the same ids:
    every request once in the decision log)."""
    from ctrstream.stack.manager import settings_env

    s = own
    a, _ = champion
    name = f"live-{unique}"
    env = {**stack_env, **settings_env(s), "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable, "-m", "ctrstream", "loop", "run", "--follow", "--experiment", name,
        "--champion", a, "--scenario", "steady", "--request-rate", "4", "--duration-s", "900",
        "--step-s", "10", "--checkpoint-every", "10", "--overrides", json.dumps(SMALL),
    ]  # fmt: skip
    state = s.run_dir / "loop-follow" / "follow-state.json"
    log = tmp_path / "first.log"
    with open(log, "w") as logf:
        p = subprocess.Popen(argv, env=env, stdout=logf, stderr=logf)
        try:
            deadline = time.monotonic() + 120
            while not (state.exists() and json.loads(state.read_text())["steps"] >= 20):
                assert p.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no second checkpoint within 120 s"
                time.sleep(0.05)  # polling the checkpoint file, with a deadline
            os.kill(p.pid, signal.SIGKILL)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    mid = json.loads(state.read_text())
    assert 20 <= mid["steps"] < 90, "the loop had finished before it was killed"
    assert mid["serving"]["name"] == name
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["resumed"] is True
    assert summary["started_ms"] == mid["clock_ms"]  # the clock continues at the checkpoint
    assert summary["steps"] == 90 - mid["steps"]  # no step done twice
    assert summary["ended_ms"] - summary["started_ms"] == (90 - mid["steps"]) * 10_000
    end = json.loads(state.read_text())
    assert end["steps"] == 90 and end["clock_ms"] == summary["ended_ms"]
    assert [x["experiment"] for x in end["segments"]] == [name]  # one incarnation, resumed
    folder = session.state_dir(s, name)
    assert json.loads((folder / "loop-state.json").read_text())["steps"] == 90
    reqs = RequestLog.read(folder / "requests")
    ids = reqs.column("request_id").to_pylist()
    assert len(ids) == len(set(ids)) > 1_000  # every request logged once
    times = np.asarray(reqs.column("event_time_ms").to_numpy())
    assert times.max() < summary["ended_ms"]
    decisions = ImpressionLog.read(folder / "impressions")
    iids = decisions.column("impression_id").to_pylist()
    assert len(iids) == len(set(iids))
    session.stop(s, name)
