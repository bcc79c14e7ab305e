"""The continuous learner as an experiment arm of the closed loop against the real stack: an
``online`` arm warm-started from the torch checkpoint of the model a frozen arm serves learns
from the shown impressions whose attribution window has closed, ranks with what it learned,
is reported like any other arm, and a restarted loop resumes its learner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ctrstream import features as F
from ctrstream.experiments.design import Arm, Experiment, Guardrails
from ctrstream.loop import session
from ctrstream.loop.ledger import ImpressionLog
from ctrstream.loop.runner import LoopConfig
from ctrstream.loop.wiring import build_loop, build_world

# the small market of the closed-loop tests
SMALL = dict(
    events=20_000,
    hours=2.0,
    seed=11,
    n_users=3_000,
    n_ads=400,
    n_campaigns=80,
    n_advertisers=20,
    n_sites=100,
    candidates_per_request=20,
)
WINDOW_S = 60.0  # a short attribution window: labels are final within the test's run


def _net(seed: int):
    from ctrstream.models.nets import HashedLogisticRegression

    torch.manual_seed(seed)
    m = HashedLogisticRegression()
    with torch.no_grad():
        m.weights.weight.normal_(0, 0.3)
        m.dense.weight.normal_(0, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def base_model(settings, tmp_path_factory):
    """A published model (random weights, far from calibrated) and its torch checkpoint:
    what the frozen arm serves and what the online arm starts from."""
    from ctrstream.models.export import export_onnx
    from ctrstream.models.publish import publish
    from ctrstream.models.training import save_checkpoint

    d = tmp_path_factory.mktemp("online-arm")
    base = f"ctr_online{os.urandom(3).hex()}"
    net = _net(seed=0)
    export_onnx(net, d / f"{base}.onnx")
    publish(settings, d / f"{base}.onnx", base)
    return base, save_checkpoint(net, d / "checkpoint.pt"), net


def _rows(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    sparse = np.arange(F.N_SPARSE) * F.HASH_BUCKETS + rng.integers(0, 50, (n, F.N_SPARSE))
    dense = rng.lognormal(0, 1, (n, F.N_DENSE)).astype(np.float32)
    return sparse.astype(np.int64), dense


def test_an_online_arm_learns_in_the_loop_is_reported_and_resumes(fresh_topics, base_model, unique):
    s = fresh_topics.model_copy(update={"attribution_window_s": WINDOW_S})
    base, ckpt, net = base_model
    arms = [
        Arm(name="frozen", kind="model", weight=0.5, model_name=base),
        Arm(name="online", kind="online", weight=0.5, model_name=str(ckpt)),
    ]
    wide = Guardrails(calibration_ratio=(0.001, 1000.0), latency_p99_ms_max=60_000.0)
    exp = Experiment(
        name=f"online-{unique}",
        salt="online-arm",  # a fixed split: the world and the nets are seeded too
        arms=tuple(arms),
        control="frozen",
        min_run_s=300.0,
        min_users_per_arm=100,
        guardrails=wide,
    )
    world, start = build_world(s, scenario="steady", request_rate=4.0, overrides=SMALL)
    exp = session.start(s, exp, start)
    end = start + 15 * 60_000
    loop, rankers = build_loop(s, exp.name, world, LoopConfig(step_s=10.0), fresh=True)
    try:
        summary = loop.run(start, end)
    finally:
        rankers.close()
    arm = rankers.online["online"]
    learner = arm.learner

    # it learned every shown impression (all arms') whose window closed before the last step
    folder = session.state_dir(s, exp.name)
    log = ImpressionLog.read(folder / "impressions")
    cols = {c: log.column(c).to_numpy(zero_copy_only=False) for c in log.column_names}
    t = cols["event_time_ms"]
    last_step = end - 10_000
    assert summary.impressions == len(t) > 3_000
    assert learner.n_seen == int((t <= last_step - WINDOW_S * 1000).sum()) > 2_000
    assert arm.pending == len(t) - learner.n_seen
    assert loop.stage_s["learn"] > 0
    # and ranks with what it learned: its scores moved away from the base model's
    sparse, dense = _rows()
    p0 = net(torch.from_numpy(sparse), torch.from_numpy(dense)).detach().numpy().ravel()
    assert np.abs(learner.predict_many(sparse, dense) - p0).max() > 0.05
    on = cols["arm"] == "online"
    versions = cols["model_version"][on]
    assert versions[0] == "online-0" and versions[-1] == f"online-{learner.n_steps}"
    steps = np.array([int(v.split("-")[1]) for v in versions])
    assert (np.diff(steps[np.argsort(t[on], kind="stable")]) >= 0).all()
    # the frozen base predicts well above the true click probabilities; the learner, on its
    # own impressions of the last third of the run, much closer to them
    late = t >= start + 10 * 60_000
    fr = (cols["arm"] == "frozen") & late

    def off(sel: np.ndarray) -> float:
        return abs(float(np.log(cols["raw_score"][sel].mean() / cols["p_true"][sel].mean())))

    assert off(on & late) < off(fr) - 0.5, (off(on & late), off(fr))
    assert not (cols["degraded"][on]).all()

    # the loop's analysis reports it like any other arm
    doc = session.report(s, exp.name)
    by_arm = {a["name"]: a for a in doc["arms"]}
    assert by_arm["online"]["kind"] == "online" and by_arm["frozen"]["kind"] == "model"
    assert by_arm["online"]["impressions"] == int((on & cols["counted"]).sum()) > 1_000
    assert any(c["treatment"] == "online" for c in doc["comparisons"])
    q = doc["prediction_quality"]["online"]
    assert q["impressions"] == by_arm["online"]["impressions"]
    assert q["rmse_vs_true_p"] < doc["prediction_quality"]["frozen"]["rmse_vs_true_p"]

    # a restarted loop resumes the learner where the checkpoint left it, and goes on learning
    world2, _ = build_world(s, scenario="steady", request_rate=4.0, overrides=SMALL)
    loop2, rankers2 = build_loop(s, exp.name, world2, LoopConfig(step_s=10.0))
    try:
        arm2 = rankers2.online["online"]
        assert arm2.learner.n_seen == learner.n_seen and arm2.pending == arm.pending
        assert arm2.learned_until_ms == arm.learned_until_ms
        np.testing.assert_allclose(
            arm2.learner.predict_many(sparse, dense), learner.predict_many(sparse, dense)
        )
        loop2.run(start, end + 3 * 60_000)
    finally:
        rankers2.close()
    assert arm2.learner.n_seen > learner.n_seen
    session.stop(s, exp.name)


def test_a_killed_loop_resumes_its_online_arm(
    fresh_topics, base_model, unique, stack_env, tmp_path
):
    """``ctrstream loop run`` with an online arm is killed (SIGKILL) after a checkpoint and
    started again: the learner continues from the checkpoint (net, optimizer, pending rows),
    so the decisions, the scores and the learner's step counts equal those of a run that was
    never interrupted."""
    from ctrstream.stack.manager import settings_env

    s = fresh_topics.model_copy(update={"attribution_window_s": WINDOW_S})
    base, ckpt, _ = base_model
    arms = (
        Arm(name="frozen", kind="model", weight=0.5, model_name=base),
        Arm(name="online", kind="online", weight=0.5, model_name=str(ckpt)),
    )
    wide = Guardrails(calibration_ratio=(0.001, 1000.0), latency_p99_ms_max=60_000.0)
    exps = [
        Experiment(
            name=f"{k}-{unique}", salt="online-kill", arms=arms, control="frozen", guardrails=wide
        )
        for k in ("okill", "ostraight")
    ]
    killed, straight = exps
    env = {**stack_env, **settings_env(s), "PYTHONUNBUFFERED": "1"}
    world, start = build_world(s, scenario="steady", request_rate=4.0, overrides=SMALL)
    for exp in exps:
        session.start(s, exp, start)
    argv = [
        sys.executable,
        "-m",
        "ctrstream",
        "loop",
        "run",
        "--scenario",
        "steady",
        "--request-rate",
        "4",
        "--duration-s",
        "900",
        "--step-s",
        "10",
        "--checkpoint-every",
        "10",
        "--overrides",
        json.dumps(SMALL),
        "--experiment",
        killed.name,
    ]
    folder = session.state_dir(s, killed.name)
    state = folder / "loop-state.json"
    with open(tmp_path / "first.log", "w") as logf:
        p = subprocess.Popen(argv, env=env, stdout=logf, stderr=logf)
        deadline = time.monotonic() + 120
        while not (state.exists() and json.loads(state.read_text())["steps"] >= 20):
            assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no second checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    mid = json.loads(state.read_text())["steps"]
    assert mid < 90, "the loop had finished before it was killed"
    assert (folder / "online-online.pt").exists()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["resumed"] is True
    # the uninterrupted run, in this process
    loop, rankers = build_loop(s, straight.name, world, LoopConfig(step_s=10), fresh=True)
    try:
        loop.run(start, start + 900_000)
    finally:
        rankers.close()
    keep = ["impression_id", "ad_id", "slot", "arm", "clicked", "model_version"]
    got, want = (
        ImpressionLog.read(session.state_dir(s, e.name) / "impressions").sort_by("impression_id")
        for e in exps
    )
    assert got.num_rows == want.num_rows > 3_000
    assert got.select(keep).equals(want.select(keep))
    on = want.column("arm").to_numpy(zero_copy_only=False) == "online"
    assert len(set(want.column("model_version").to_numpy(zero_copy_only=False)[on])) > 20
    np.testing.assert_allclose(
        got.column("raw_score").to_numpy(), want.column("raw_score").to_numpy(), rtol=1e-5
    )
    for exp in exps:
        session.stop(s, exp.name)
