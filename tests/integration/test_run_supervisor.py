"""``ctrstream run`` against the real stack: every job comes up; a ``kill -9`` of a job is
restarted and counted; a two-process Bytewax job that loses one process is restarted as a
unit; SIGTERM stops every job cleanly (each exits 0, having checkpointed) and the run exits 0;
with ``--span`` the run ends by itself once the driver is done and the consumers caught up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import test_closed_loop

from ctrstream.stack.manager import settings_env
from ctrstream.stack.procs import kill_hard, start_job, wait_until
from ctrstream.stack.scrape import scrape_or_empty
from ctrstream.stack.services import free_port

CTRSTREAM = str(Path(sys.executable).parent / "ctrstream")
models = test_closed_loop.models  # the closed loop's published models (a fixture)


def _free_block(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    for _ in range(50):
        base = free_port()
        if base + n >= 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def _env(s, run_dir: Path) -> dict[str, str]:
    """The stack's settings for child processes, with this run's own run and data
    directories (the state file, recovery stores, archive) and Redis database."""
    password = s.redis.password or (s.run_dir / "redis.password").read_text().strip()
    return {
        **os.environ,
        **settings_env(s),
        "CTRSTREAM_RUN_DIR": str(run_dir),
        "CTRSTREAM_DATA_DIR": str(run_dir / "data"),
        "CTRSTREAM_REDIS__DB": "5",
        "CTRSTREAM_REDIS__PASSWORD": password,
        "CTRSTREAM_CONTROL_SECRET_FILE": str(s.control_secret_path),
        "CTRSTREAM_METRICS_PORT": "0",
    }


def _state(run_dir: Path) -> dict:
    try:
        doc = json.loads((run_dir / "run" / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {j["name"]: j for j in doc["jobs"]}


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(c) for c in text.split()]


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped by its new parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _status(env: dict) -> dict:
    res = subprocess.run(
        [CTRSTREAM, "run", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return {j["name"]: j for j in json.loads(res.stdout)["jobs"]}


def test_run_supervises_restarts_and_stops_cleanly(fresh_topics, tmp_path):
    s = fresh_topics
    run_dir = tmp_path / "run"
    env = _env(s, run_dir)
    base = _free_block(12)
    api_port = free_port()
    argv = [
        CTRSTREAM, "run", "--until-stopped", "--events", "3000", "--seed", "5",
        "--speed-processes", "2", "--metrics-base", str(base), "--api-port", str(api_port),
        "--backoff-base", "0.5", "--stop-timeout", "90",
    ]  # fmt: skip
    log = tmp_path / "run.log"
    sup = start_job(argv, env=env, log_path=log)
    try:
        services = {"speed-features", "speed-join", "archive", "score", "calibrate", "serve"}

        # every job comes up: running, and serving its metrics (the API on its own port)
        def all_up():
            st = _state(run_dir)
            if not services <= {n for n, j in st.items() if j["state"] == "running"}:
                return False
            for name in services:
                port = api_port if name == "serve" else st[name]["metrics_port"]
                for k in range(st[name]["processes"] if name.startswith("speed") else 1):
                    if not scrape_or_empty(port + k):
                        return False
            return st

        st = wait_until(all_up, 180, interval=0.5, what=f"every job up (log {log})")
        m = scrape_or_empty(base)
        assert all(m[f"ctrstream_job_up{{job={n}}}"] == 1 for n in services), m
        # every endpoint, in the stack's Prometheus' file discovery while the run runs: the
        # supervisor, 2 per speed flow
        targets = run_dir / "prometheus" / "targets" / "run.json"
        groups = json.loads(targets.read_text())
        n_targets = {g["labels"]["service"]: len(g["targets"]) for g in groups}
        assert n_targets == {"supervisor": 1, **{n: 1 for n in services}} | {
            "speed-features": 2,
            "speed-join": 2,
        }
        # the replay drives the run and finishes; the consumers catch up (run status' lag)
        wait_until(
            lambda: _state(run_dir)["replay"]["state"] == "done", 120, interval=0.5,
            what=f"the replay to finish (log {log})",
        )  # fmt: skip

        def caught_up():
            lags = {n: j["lag"] for n, j in _status(env).items() if j["lag"] is not None}
            return {"speed-features", "speed-join", "archive"} <= set(lags) and not any(
                lags.values()
            )

        wait_until(caught_up, 120, interval=1.0, what="consumer lag 0 in `ctrstream run status`")

        # kill -9 of one job: restarted (after its backoff) and counted
        old = st["archive"]["pid"]
        os.kill(old, signal.SIGKILL)
        st = wait_until(
            lambda: (x := _state(run_dir))["archive"]["restarts"] == 1
            and x["archive"]["state"] == "running" and x,
            60, interval=0.2, what="archive restarted",
        )  # fmt: skip
        assert st["archive"]["pid"] not in (None, old)
        wait_until(
            lambda: scrape_or_empty(base).get("ctrstream_job_restarts_total{job=archive}") == 1,
            10, what="the restart counted in the supervisor's metrics",
        )  # fmt: skip

        # one process of the two-process Bytewax job killed: the whole cluster is restarted
        leader = st["speed-features"]["pid"]
        procs = _children(leader)
        assert len(procs) == 2, procs
        os.kill(procs[0], signal.SIGKILL)
        st = wait_until(
            lambda: (x := _state(run_dir))["speed-features"]["restarts"] == 1
            and x["speed-features"]["state"] == "running" and x,
            60, interval=0.2, what="speed-features restarted as a unit",
        )  # fmt: skip
        # nothing of the old cluster runs on
        wait_until(
            lambda: not _running(procs[1]) and not _running(leader), 10,
            what="the old cluster's processes gone",
        )  # fmt: skip
        wait_until(
            lambda: len(_children(_state(run_dir)["speed-features"]["pid"])) == 2, 30,
            what="the new cluster's two processes",
        )  # fmt: skip
        assert _state(run_dir)["speed-join"]["restarts"] == 0  # the other flow untouched
        port = _state(run_dir)["speed-features"]["metrics_port"]
        wait_until(
            lambda: scrape_or_empty(port) and scrape_or_empty(port + 1), 60,
            what="the new cluster serving its metrics",
        )  # fmt: skip
        # the restarted cluster resumes from its snapshot and catches up again
        wait_until(caught_up, 120, interval=1.0, what="lag 0 after the restarts")

        # SIGTERM: every job checkpoints and exits 0, the run exits 0
        t_stop = time.time()
        os.kill(sup.pid, signal.SIGTERM)
        rc = sup.wait(150)
        text = log.read_text()
        assert rc == 0, text[-4000:]
        st = _state(run_dir)
        for name in services - {"serve"}:  # each stopped on its own, having checkpointed
            assert st[name]["state"] == "stopped" and st[name]["last_exit"] == 0, st[name]
        # uvicorn drains and re-raises the SIGTERM it caught (Job.clean_exits)
        assert st["serve"]["state"] == "stopped" and st["serve"]["last_exit"] in (0, -15)
        assert st["replay"]["state"] == "done"
        for flow in ("features", "join"):  # the final snapshot was written on the way out
            stores = list((run_dir / "speed-recovery" / flow).glob("*.sqlite3"))
            assert stores and max(p.stat().st_mtime for p in stores) >= t_stop - 1, flow
        assert list((run_dir / "score-recovery").glob("*.sqlite3"))
        assert list((run_dir / "data" / "archive").rglob("*.parquet"))
        # and nothing is left running, nor scraped
        assert not any(_running(p) for p in _children(sup.pid))
        assert not targets.exists()
    finally:
        if sup.poll() is None:
            kill_hard(sup)


def test_a_bounded_span_ends_the_run_by_itself(fresh_topics, tmp_path):
    s = fresh_topics
    run_dir = tmp_path / "run"
    env = _env(s, run_dir)
    base = _free_block(4)
    argv = [
        CTRSTREAM, "run", "--span", "30m", "--events", "500", "--seed", "2",
        "--only", "speed-features,archive,replay", "--metrics-base", str(base),
        "--drain-s", "60",
    ]  # fmt: skip
    log = tmp_path / "run.log"
    sup = start_job(argv, env=env, log_path=log)
    try:
        rc = sup.wait(150)
        assert rc == 0, log.read_text()[-4000:]
        st = _state(run_dir)
        assert set(st) == {"speed-features", "archive", "replay"}
        assert st["replay"]["state"] == "done" and st["replay"]["argv"][-2:] != ["--hours", "6"]
        assert "--hours" in st["replay"]["argv"] and "0.5" in st["replay"]["argv"]
        assert st["archive"]["state"] == "stopped" and st["archive"]["last_exit"] == 0
        assert "the run is over" in log.read_text()
    finally:
        if sup.poll() is None:
            kill_hard(sup)


def test_the_closed_loop_checkpoints_on_sigterm_and_resumes(
    fresh_topics, models, unique, stack_env, tmp_path
):
    """The ad server's loop (the closed loop's driver) asked to stop with SIGTERM ends at
    its step, writes its checkpoint and exits 0; started again, it resumes there."""
    from test_closed_loop import SMALL, _experiment

    from ctrstream.experiments.design import Arm
    from ctrstream.kafka.topics import read_topic
    from ctrstream.loop import session
    from ctrstream.loop.wiring import build_world

    s = fresh_topics
    env = {**stack_env, **settings_env(s), "PYTHONUNBUFFERED": "1"}
    arms = [
        Arm(name="a", kind="model", weight=0.5, model_name=models[0]),
        Arm(name="prior", kind="prior", weight=0.5),
    ]
    exp = _experiment(f"term-{unique}", arms, "a")
    _world, start = build_world(s, scenario="steady", request_rate=4.0, overrides=SMALL)
    session.start(s, exp, start)
    argv = [
        CTRSTREAM, "loop", "run", "--experiment", exp.name, "--request-rate", "4",
        "--duration-s", "3600", "--step-s", "10", "--compression", "60",
        "--checkpoint-every", "100000", "--overrides", json.dumps(SMALL),
    ]  # fmt: skip
    state = session.state_dir(s, exp.name) / "loop-state.json"
    log = tmp_path / "loop.log"
    p = start_job(argv, env=env, log_path=log)
    try:
        wait_until(
            lambda: read_topic(s, s.topics.impressions.name, timeout=2), 120, interval=0.5,
            what=f"the loop's first impressions (log {log})",
        )  # fmt: skip
        assert not state.exists()  # no periodic checkpoint: the one on SIGTERM is the test
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            kill_hard(p)
    steps = json.loads(state.read_text())["steps"]
    assert 0 < steps < 360, steps  # stopped in the middle, at a step's end
    again = subprocess.run(  # the same loop again (ending at once): it resumes
        [*argv, "--duration-s", "0.001"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["resumed"] is True
    session.stop(s, exp.name)


def test_a_closed_loop_run_over_a_span(fresh_topics, models, unique, stack_env, tmp_path):
    """``ctrstream run --mode closed``: the experiment's loop drives the world through the ad
    server for the span at the set compression, the decay monitor and the controller beside
    it; the run ends by itself, every job clean."""
    from test_closed_loop import SMALL, _experiment

    from ctrstream.experiments.design import Arm
    from ctrstream.kafka.topics import read_topic
    from ctrstream.loop import session
    from ctrstream.loop.wiring import build_world

    s = fresh_topics
    run_dir = tmp_path / "run"
    env = _env(s, run_dir)
    arms = [
        Arm(name="a", kind="model", weight=0.5, model_name=models[0]),
        Arm(name="prior", kind="prior", weight=0.5),
    ]
    exp = _experiment(f"run-{unique}", arms, "a")
    _world, start = build_world(s, scenario="steady", overrides=SMALL)
    # the following loop serves the newest running experiment of the registry: the session's
    # earlier tests' experiments still running there would take this run's traffic
    for rec in session.registry(s).running():
        session.stop(s, rec.experiment.name, "an earlier test's experiment")
    session.start(s, exp, start)  # started (its models pinned) in the stack's run directory
    # this run's own directory (state, recovery stores) sees the stack's experiments
    run_dir.mkdir()
    (run_dir / "experiments").symlink_to(s.run_dir / "experiments", target_is_directory=True)
    base = _free_block(8)
    sets = [x for k, v in SMALL.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    argv = [
        CTRSTREAM, "run", "--mode", "closed", "--experiment", exp.name, "--span", "10m",
        "--compression", "300", *sets,
        "--only", "speed-features,archive,calibrate,monitor,controller,loop",
        "--metrics-base", str(base), "--drain-s", "60",
    ]  # fmt: skip
    log = tmp_path / "run.log"
    sup = start_job(argv, env=env, log_path=log)
    try:
        rc = sup.wait(240)
        assert rc == 0, log.read_text()[-4000:]
        st = _state(run_dir)
        assert st["loop"]["state"] == "done" and st["loop"]["last_exit"] == 0
        assert "--overrides" in st["loop"]["argv"] and "600" in st["loop"]["argv"]
        # the decay monitor (its positions committed) and the controller (its checkpoint)
        # stop on SIGTERM with exit 0 too
        for name in ("speed-features", "archive", "calibrate", "monitor", "controller"):
            assert st[name]["state"] == "stopped" and st[name]["last_exit"] == 0, st[name]
            assert st[name]["restarts"] == 0, (name, log.read_text()[-4000:])
        assert json.loads((session.state_dir(s, exp.name) / "loop-state.json").read_text())
        assert read_topic(s, s.topics.impressions.name, timeout=5)
        assert list((run_dir / "data" / "archive").rglob("*.parquet"))
    finally:
        if sup.poll() is None:
            kill_hard(sup)
        session.stop(s, exp.name)
