"""``ctrstream run`` unattended: the whole closed-loop system (speed layer, archive,
calibrator, API, decay monitor, controller, the ad server's loop following the registry)
started as one command against the session's stack, left alone for two batch cycles of the
controller, then stopped with SIGTERM.

Each outcome is caused by the set-up, not by luck:

* **cycle 1 promotes.** The champion serving when the run starts is a random-weight LR (a
  model the market has left behind: it ranks the ads at random); the challenger is trained
  on the run's own first hour of traffic. The offline gate passes it, its shadow is
  calibrated, and the experiment (half of the users each, decided on CTR, where a trained
  ranking's lift over a random one is large) decides up: the challenger is published as the
  champion's version 2 and its calibrator follows.
* **cycle 2 rolls back.** ``CTRSTREAM_CONTROLLER_DEGRADE_CYCLE=2`` (the controller's test
  hook, ``ctrstream.controller.hooks``): cycle 2's challenger is tried online as a copy that
  predicts four times its clicks; the shadow measures it outside the calibration guardrail
  and the cycle is rolled back. Version 2 never stops serving.

What is checked: the controller's audit log (both cycles, every decision once), Triton's
served versions and the version the ad server's decision log shows before and after the
promotion, the calibrator of version 2, every job up with no restart, ``ctrstream run
status``, the controller's Prometheus counters, and a clean stop on SIGTERM. The test
prints the run's timeline (event time of each decision, wall time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import test_run_supervisor as trs

from ctrstream.controller.audit import AuditLog
from ctrstream.controller.hooks import DEGRADE_ENV
from ctrstream.stack.procs import kill_hard, start_job, wait_until
from ctrstream.stack.scrape import scrape_or_empty
from ctrstream.stack.services import free_port

CTRSTREAM = str(Path(sys.executable).parent / "ctrstream")
HOUR_MS = 3_600_000
# a small market with enough traffic that an hour of event time trains a model and that a
# large CTR lift decides within tens of minutes: ~11,000 requests and ~25,000 impressions an
# hour of event time
MARKET = dict(
    events=50_000,
    hours=2.0,
    seed=21,
    n_users=3_000,
    n_ads=400,
    n_campaigns=80,
    n_advertisers=20,
    n_sites=100,
    candidates_per_request=20,
)
COMPRESSION = 60  # event seconds per wall second: an hour of event time a minute
WAIT_S = 720  # wall seconds the two cycles may take on the loaded 2-core machine


def _random_lr(path: Path, seed: int) -> Path:
    """An LR whose weights are random (a random ranking), its bias at a 2 % click rate."""
    import torch

    from ctrstream.models.export import export_onnx
    from ctrstream.models.nets import HashedLogisticRegression

    torch.manual_seed(seed)
    m = HashedLogisticRegression()
    with torch.no_grad():
        m.weights.weight.normal_(0, 0.2)
        m.dense.weight.normal_(0, 0.2)
    export_onnx(m.eval(), path)
    return path


def run_env(s, run_dir: Path) -> dict[str, str]:
    """The environment of the run: the stack's settings with the run's own directories
    (``test_run_supervisor._env``), Triton's model-control key (the controller publishes),
    and the test hook that degrades cycle 2's challenger."""
    from ctrstream.config import triton_control_key

    key = triton_control_key(s)
    assert key, "the session's stack has no Triton control key"
    return trs._env(s, run_dir) | {"CTRSTREAM_TRITON__CONTROL_KEY": key, DEGRADE_ENV: "2"}


def controller_args(prefix: str) -> list[str]:
    """The controller's settings for a run of a few minutes (each an argument of
    ``ctrstream controller``, given as ``ctrstream run --job-arg controller=ARG``)."""
    args = [
        f"--prefix={prefix}",
        "--interval-h=1",  # a cycle every hour of event time
        "--train-window-h=1",  # trained on the last hour ...
        "--warmup-h=0.25",  # ... less its first quarter (feature history only)
        "--epochs=2",
        "--share=0.5",
        "--shadow-min-s=300",
        "--shadow-max-s=3600",
        "--min-run-s=600",
        "--experiment-max-s=7200",
        "--min-users-per-arm=100",
        "--primary-metric=ctr",
        # the ranking latency of a batch on the loaded 2-core test machine is not what the
        # run is about: the guardrail that matters here is calibration
        "--latency-p99-ms-max=60000",
        "--poll-s=1",
        "--no-read-dlq",
    ]
    return [x for a in args for x in ("--job-arg", f"controller={a}")]


def _audit(run_dir: Path) -> list[dict]:
    path = run_dir / "controller" / "audit.jsonl"
    return AuditLog(path).records() if path.exists() else []


def _finished_cycles(run_dir: Path) -> int:
    return sum(1 for r in _audit(run_dir) if r["kind"] == "cycle_finished")


def _served_versions(run_dir: Path) -> list[tuple[int, str, str]]:
    """(event time, arm, model version) of every impression in the ad server's decision
    logs, in event time order."""
    import pyarrow.parquet as pq

    rows: list[tuple[int, str, str]] = []
    for p in sorted((run_dir / "experiments").rglob("impressions-*.parquet")):
        if ".archive" in p.parts:
            continue
        t = pq.read_table(p, columns=["event_time_ms", "arm", "model_name", "model_version"])
        rows += zip(
            t.column("event_time_ms").to_pylist(),
            t.column("arm").to_pylist(),
            t.column("model_version").to_pylist(),
            strict=True,
        )
    return sorted(rows)


def _timeline(recs: list[dict], t0: int, wall0: float) -> str:
    lines = []
    for r in recs:
        at = r.get("at_ms")
        when = "-" if at is None else f"{(at - t0) / 60_000:6.1f} min"
        wall = (r["wall_ms"] / 1000.0 - wall0) if r.get("wall_ms") else float("nan")
        lines.append(
            f"c{r['cycle']} {r['kind']:<22} event +{when}  wall +{wall:5.0f} s  {r['why'][:110]}"
        )
    return "\n".join(lines)


def test_two_cycles_unattended_a_promotion_and_a_rollback(fresh_topics, settings, unique, tmp_path):
    from ctrstream.models.publish import (
        control_client,
        loaded_versions,
        publish,
        served_model_name,
        versions_on_disk,
    )
    from ctrstream.simulation.scenarios import load_scenario
    from ctrstream.store.calibration import CalibrationStore
    from ctrstream.store.connection import redis_client
    from ctrstream.store.layout import calibrator_id

    s = fresh_topics
    run_dir = tmp_path / "run"
    env = run_env(s, run_dir)
    base, prefix = f"ctr_u{unique}", f"u{unique}"
    served = served_model_name(s, base)
    publish(s, _random_lr(tmp_path / "champion.onnx", seed=3), base)  # v1: the weak champion
    t0 = int(load_scenario("steady", **MARKET).start_ms)

    ports = trs._free_block(16)
    api_port = free_port()
    sets = [x for k, v in MARKET.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    argv = [
        CTRSTREAM, "run", "--mode", "closed", "--experiment", "live", "--champion", base,
        "--span", "6h", "--compression", str(COMPRESSION), *sets,
        *controller_args(prefix),
        "--metrics-base", str(ports), "--api-port", str(api_port), "--stop-timeout", "90",
    ]  # fmt: skip
    log = tmp_path / "run.log"
    wall0 = time.time()
    sup = start_job(argv, env=env, log_path=log)
    try:

        def two_cycles() -> bool:
            if sup.poll() is not None:
                raise AssertionError(f"the run ended early ({sup.returncode}): {log.read_text()}")
            return _finished_cycles(run_dir) >= 2

        try:
            wait_until(two_cycles, WAIT_S, interval=2.0, what="two controller cycles")
        finally:
            print(_timeline(_audit(run_dir), t0, wall0))
        wall_cycles = time.time() - wall0

        # every job up, none restarted, as `ctrstream run status` shows it
        table = subprocess.run(
            [CTRSTREAM, "run", "status"], env=env, capture_output=True, text=True, timeout=60
        )
        print(table.stdout)
        assert table.returncode == 0, table.stdout + table.stderr
        st = trs._status(env)
        jobs = {"speed-features", "speed-join", "archive", "calibrate", "serve", "monitor"}
        jobs |= {"controller", "loop"}
        assert set(st) == jobs, st
        for name, j in st.items():
            assert j["state"] == "running" and j["restarts"] == 0, (name, j)
        assert st["controller"]["checkpoint_age_s"] is not None
        assert all(st[n]["lag"] is not None for n in ("speed-features", "archive", "monitor"))
        m = scrape_or_empty(st["controller"]["metrics_port"])
        assert m.get("ctrstream_controller_decisions_total{kind=promoted}") == 1, m
        assert m.get("ctrstream_controller_decisions_total{kind=rolled_back}") == 1, m

        # the audit log: cycle 1 promoted, cycle 2 (the degraded copy) rolled back
        recs = _audit(run_dir)
        by = {(r["cycle"], r["kind"]): r for r in recs}
        assert len({r["key"] for r in recs}) == len(recs)  # every decision once
        for kind in ("gate_passed", "shadow_passed", "experiment_decided", "promoted"):
            assert (1, kind) in by, (kind, _timeline(recs, t0, wall0))
        assert by[(1, "experiment_decided")]["data"]["decision"] == "promote"
        assert by[(1, "promoted")]["data"]["version"] == 2
        assert by[(1, "promoted")]["data"]["calibrator_followed"] is True
        assert by[(2, "challenger_published")]["data"]["degraded_factor"] == 4.0
        assert (2, "shadow_failed") in by and "calibration" in by[(2, "shadow_failed")]["why"]
        assert (2, "rolled_back") in by and (2, "experiment_started") not in by
        # the promotion went the right way: the challenger's own decisions were truly better
        # (the world's click probabilities, which no production system knows)
        exp1 = by[(1, "experiment_started")]["data"]["experiment"]
        rep = json.loads((run_dir / "experiments" / exp1 / "report.json").read_text())
        keep = ("lift", "lo", "hi", "p_value", "direction", "true_lift", "users")
        for c in rep["comparisons"]:
            print(f"cycle 1, challenger vs champion on {c['metric']}:", {k: c[k] for k in keep})
        ctr = next(c for c in rep["comparisons"] if c["metric"] == "ctr")
        assert ctr["true_lift"] is not None and ctr["true_lift"] > 0, ctr
        promoted_at = int(by[(1, "promoted")]["at_ms"])
        rolled_back_at = int(by[(2, "rolled_back")]["at_ms"])

        # Triton: version 2 of the champion serves; the challengers were their own model
        triton = control_client(s)
        assert versions_on_disk(s.triton.model_repository / served) == [1, 2]
        assert max(loaded_versions(triton, served)) == 2
        chal = served_model_name(s, f"{base}_challenger")
        assert versions_on_disk(s.triton.model_repository / chal) == [1, 2]
        # the calibrator followed: version 2 has parameters of its own id
        s5 = s.model_copy(
            update={
                "redis": s.redis.model_copy(
                    update={"db": 5, "password": env["CTRSTREAM_REDIS__PASSWORD"]}
                )
            }
        )
        cal = CalibrationStore(redis_client(s5))
        assert cal.params(calibrator_id(base, "2")), "the promoted version has no calibrator"

        # the ad server served v1 before the promotion, v2 after it, and still v2 after the
        # rollback (the champion never stopped serving)
        rows = [
            (t, a, v) for t, a, v in _served_versions(run_dir) if a in ("champion", "champion-b")
        ]
        before = {v for t, _, v in rows if t < promoted_at - 600_000}
        after = {v for t, _, v in rows if t > promoted_at + 600_000}
        assert before == {"1"}, before
        assert after == {"2"}, after
        assert {v for t, _, v in rows if t > rolled_back_at} <= {"2"}

        # SIGTERM: every job checkpoints and exits cleanly, the run exits 0
        os.kill(sup.pid, signal.SIGTERM)
        rc = sup.wait(180)
        assert rc == 0, log.read_text()[-4000:]
        st = trs._state(run_dir)
        for name, j in st.items():
            assert j["state"] in ("stopped", "done"), (name, j)
            assert j["restarts"] == 0, (name, j)
        print(
            f"two cycles in {wall_cycles:.0f} s of wall time; promoted at event "
            f"+{(promoted_at - t0) / 60_000:.0f} min, rolled back at "
            f"+{(rolled_back_at - t0) / 60_000:.0f} min"
        )
    finally:
        if sup.poll() is None:
            kill_hard(sup)
        out = subprocess.run(
            [CTRSTREAM, "controller", "--status"], env=env, capture_output=True, text=True
        )
        print(out.stdout[-3000:])
