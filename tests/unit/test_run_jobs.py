"""``ctrstream run``'s job list, the supervisor's backoff and the run's arguments (no
servers). The supervisor itself against real jobs: tests/integration/test_run_supervisor.py;
the same jobs in docker-compose.yml: tests/unit/test_run_compose.py."""

from __future__ import annotations

import signal

import pytest

from ctrstream.cli.run import (
    assign_ports,
    driver_args,
    job_args,
    parse_span,
    scenario_sets,
    with_champion,
)
from ctrstream.stack.jobs import PLACEHOLDERS, all_jobs, jobs_for, render, render_job
from ctrstream.stack.supervisor import Supervisor, backoff_s, last_checkpoint


def test_backoff_doubles_from_the_base_up_to_the_cap():
    assert backoff_s(0) == 0.0
    assert [backoff_s(n, 1.0, 60.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_s(3, 0.5, 10.0) == 2.0
    assert backoff_s(10_000, 1.0, 30.0) == 30.0  # no overflow however long it fails
    with pytest.raises(ValueError):
        backoff_s(1, -1.0, 10.0)


def test_each_mode_runs_the_lambda_jobs_and_one_driver():
    common = {"speed-features", "speed-join", "archive", "calibrate", "serve"}
    open_ = {j.name for j in jobs_for("open")}
    closed = {j.name for j in jobs_for("closed")}
    assert open_ == common | {"score", "replay"}
    assert closed == common | {"loop", "monitor", "controller"}
    for mode in ("open", "closed"):
        drivers = [j for j in jobs_for(mode) if j.role == "driver"]
        assert len(drivers) == 1, mode
        assert jobs_for(mode)[-1].role == "driver"  # started last, after its consumers
    with pytest.raises(ValueError, match="open or closed"):
        jobs_for("sideways")  # type: ignore[arg-type]


def test_job_definitions_are_complete():
    jobs = all_jobs()
    assert len({j.name for j in jobs}) == len(jobs)
    for j in jobs:
        assert j.argv[0] == "ctrstream", j.name
        assert (j.group is None) == (not j.topics), j.name  # a lag needs both
        for text in (*j.argv, j.checkpoint or ""):
            names = {p.split("}")[0] for p in text.split("{")[1:]}
            assert names <= set(PLACEHOLDERS), (j.name, text)
        assert not (j.api_metrics and j.metrics_ports), j.name
    # the consumers that keep Kafka positions in a group say which, for the lag
    by = {j.name: j for j in jobs}
    assert by["archive"].group == "ctrstream-archive"
    assert by["speed-features"].group == "ctrstream-speed-features"
    assert by["speed-join"].group == "ctrstream-speed-join"
    assert by["replay"].stop_signal == signal.SIGINT  # the replay flushes on Ctrl-C


def test_a_multi_process_speed_job_is_one_unit_with_one_port_per_process():
    by = {j.name: j for j in all_jobs(speed_processes=2)}
    for name in ("speed-features", "speed-join"):
        assert by[name].processes == 2 and by[name].metrics_ports == 2
        assert by[name].argv[-2:] == ("-p", "2")
    assert "-p" not in {a for a in all_jobs()[0].argv}
    with pytest.raises(ValueError):
        all_jobs(speed_processes=0)
    sup, ports = assign_ports(jobs_for("open", 2), 9100)
    assert sup == 9100
    assert ports["speed-features"] == 9101 and ports["speed-join"] == 9103  # 2 each
    assert "serve" not in ports and "replay" not in ports  # the API serves on its own port
    assert len(set(ports.values())) == len(ports)


def test_render_fills_every_placeholder_or_says_which_is_missing():
    values = {
        "run_dir": "/r",
        "data_dir": "/d",
        "api_host": "h",
        "api_port": "1",
        "experiment": "e",
    }
    for j in all_jobs():
        r = render_job(j, values)
        assert not any("{" in a for a in r.argv), r.argv
    loop = next(j for j in all_jobs() if j.name == "loop")
    assert render_job(loop, values, ("--compression", "60")).argv[-3:] == (
        "e",
        "--compression",
        "60",
    )
    with pytest.raises(ValueError, match="experiment"):
        render("--experiment {experiment}", {"run_dir": "/r"})
    # the run's own arguments are appended as they are (JSON has braces)
    assert render_job(loop, values, ("--overrides", '{"n_users": 5}')).argv[-1] == '{"n_users": 5}'


def test_span_and_driver_arguments():
    assert parse_span("6h") == 6 * 3600
    assert parse_span("90m") == 5400
    assert parse_span("30s") == 30
    assert parse_span("2") == 7200  # a bare number is hours
    for bad in ("", "-1h", "0", "6 hours", "h"):
        with pytest.raises(ValueError, match="--span"):
            parse_span(bad)
    assert driver_args("open", 1800, 500.0, None, "steady", 1000, 3) == (
        "--scenario",
        "steady",
        "--hours",
        "0.5",
        "--events",
        "1000",
        "--seed",
        "3",
        "--rate",
        "500",
    )
    assert driver_args("closed", 600, None, 60.0, "drift", None, None) == (
        "--scenario",
        "drift",
        "--duration-s",
        "600",
        "--compression",
        "60",
    )
    with pytest.raises(ValueError, match="--compression"):
        driver_args("closed", 600, 100.0, None, "steady", None, None)
    # scenario fields: the replay's --set, the loop's --overrides
    sets = scenario_sets(["n_users=500", "name=x"])
    assert sets == {"n_users": 500, "name": "x"}
    assert driver_args("open", None, None, None, "steady", None, None, sets)[2:] == (
        "--set",
        "n_users=500",
        "--set",
        'name="x"',
    )
    closed = driver_args("closed", None, None, None, "steady", None, None, sets)
    assert closed[2:4] == ("--overrides", '{"n_users": 500, "name": "x"}')
    assert float(closed[closed.index("--duration-s") + 1]) > 365 * 86400  # until stopped
    with pytest.raises(ValueError, match="KEY=VALUE"):
        scenario_sets(["n_users"])


def test_job_arguments_go_to_the_named_job_in_order():
    names = {"controller", "monitor", "loop"}
    got = job_args(
        ["controller=--interval-h=1", "monitor=--min-clicks=50", "controller=--now"], names
    )
    assert got == {"controller": ("--interval-h=1", "--now"), "monitor": ("--min-clicks=50",)}
    assert job_args(None, names) == {}
    # the value may hold '=' itself (only the first one separates the job)
    assert job_args(["controller=--primary-metric=ctr"], names)["controller"] == (
        "--primary-metric=ctr",
    )
    # --champion: the loop's default and the controller's base, before their --job-args
    both = with_champion(got, "ctr_x", names)
    assert both["controller"] == ("--base=ctr_x", "--interval-h=1", "--now")
    assert both["loop"] == ("--champion=ctr_x",) and both["monitor"] == got["monitor"]
    assert with_champion(got, "ctr_x", {"loop"}) == got | {"loop": ("--champion=ctr_x",)}
    assert with_champion(got, None, names) == got
    with pytest.raises(ValueError, match="no job 'score'"):
        job_args(["score=--x"], names)
    for bad in ("controller", "=--x", "controller="):
        with pytest.raises(ValueError, match="JOB=ARG"):
            job_args([bad], names)


def test_the_supervisor_refuses_two_jobs_of_one_name(tmp_path):
    j = all_jobs()[0]
    with pytest.raises(ValueError, match="unique"):
        Supervisor([j, j], env={}, state_dir=tmp_path)


def test_last_checkpoint_is_the_newest_file_under_the_path(tmp_path):
    import os

    d = tmp_path / "rec"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_text("x")
    (d / "sub" / "b").write_text("y")
    os.utime(d / "a", (1000, 1000))
    os.utime(d / "sub" / "b", (5000, 5000))
    os.utime(d / "sub", (10, 10))
    os.utime(d, (10, 10))
    assert last_checkpoint(str(d)) == 5000
    assert last_checkpoint(str(tmp_path / "missing")) is None
    assert last_checkpoint("redis:calibrate") is None
    assert last_checkpoint(None) is None


def _py(code: str) -> tuple[str, ...]:
    """A job's command line running ``code`` in this interpreter (no servers)."""
    import sys
    from pathlib import Path

    return (Path(sys.executable).name, "-c", code)


_SERVICE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "while True: time.sleep(0.05)\n"
)


def test_the_supervisor_restarts_a_failing_job_with_backoff_and_stops_all_cleanly(tmp_path):
    """A job that keeps failing is restarted after growing delays and counted; a driver that
    finishes is done; the run stops every job with its signal, each exits 0: exit code 0."""
    import json
    import time

    from ctrstream.stack.jobs import Job

    jobs = [
        Job(name="crashy", argv=_py("import sys; sys.exit(3)")),
        Job(name="steady", argv=_py(_SERVICE)),
        Job(name="drive", argv=_py("pass"), role="driver"),
    ]

    def finished(units) -> bool:
        u = next(x for x in units if x.job.name == "crashy")
        return u.restarts >= 3 and u.state == "backoff"

    sup = Supervisor(
        jobs,
        env={},
        state_dir=tmp_path,
        backoff_base_s=0.1,
        backoff_max_s=0.4,
        tick_s=0.01,
        finished=finished,
        echo=lambda m: None,
    )
    t0 = time.monotonic()
    assert sup.run() == 0
    assert time.monotonic() - t0 < 30
    by = {u.job.name: u for u in sup.units}
    assert by["crashy"].restarts == 3 and by["crashy"].last_exit == 3
    assert by["steady"].restarts == 0 and by["steady"].state == "stopped"
    assert by["steady"].last_exit == 0
    assert by["drive"].state == "done" and by["drive"].restarts == 0
    # each restart waited its backoff after the exit was seen: 0.1, 0.2, then the 0.4 cap
    h = by["crashy"].history
    assert len(h) == 4 and all(r["exit"] == 3 for r in h)
    waits = [b["started_at"] - a["ended_at"] for a, b in zip(h, h[1:], strict=False)]
    assert [round(w, 1) >= want for w, want in zip(waits, (0.1, 0.2, 0.4), strict=True)] == [
        True
    ] * 3, waits
    state = json.loads((tmp_path / "state.json").read_text())
    assert {j["name"]: j["restarts"] for j in state["jobs"]} == {
        "crashy": 3,
        "steady": 0,
        "drive": 0,
    }


def test_a_job_that_ignores_its_stop_signal_is_killed_and_the_run_fails(tmp_path):
    from ctrstream.stack.jobs import Job

    stubborn = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    sup = Supervisor(
        [Job(name="stubborn", argv=_py(stubborn))],
        env={},
        state_dir=tmp_path,
        stop_timeout_s=1.0,
        tick_s=0.01,
        finished=lambda units: "ready" in (tmp_path / "logs" / "stubborn.log").read_text(),
        echo=lambda m: None,
    )
    assert sup.run() == 1
    u = sup.units[0]
    assert u.state == "failed" and u.last_exit == -9


def test_scrape_targets_one_per_process_and_the_api_on_its_port(tmp_path):
    import json

    from ctrstream.config import Settings
    from ctrstream.stack.prometheus import TARGET_GROUP, targets_dir, write_targets
    from ctrstream.stack.supervisor import Unit, scrape_targets

    units = [
        Unit(next(j for j in all_jobs(2) if j.name == "speed-join"), 9103),
        Unit(next(j for j in all_jobs() if j.name == "serve")),
        Unit(next(j for j in all_jobs() if j.name == "replay")),
    ]
    targets = scrape_targets(units, 8080, "127.0.0.1")
    assert targets == [
        ("speed-join", "127.0.0.1:9103"),
        ("speed-join", "127.0.0.1:9104"),
        ("serve", "127.0.0.1:8080"),
    ]
    # what `ctrstream run` hands the stack's Prometheus (its file discovery's folder)
    s = Settings(run_dir=tmp_path)
    path = write_targets(s, TARGET_GROUP, targets)
    assert path == targets_dir(s) / "run.json"
    doc = json.loads(path.read_text())
    assert doc[0] == {
        "targets": ["127.0.0.1:9103", "127.0.0.1:9104"],
        "labels": {"service": "speed-join"},
    }


def test_the_monitor_and_the_controller_read_the_closed_loops_decision_log(tmp_path):
    """The monitor's --oracle in a closed run is the registry's folder (`ctrstream run`
    creates it before the jobs start: a missing path is an error for the monitor) and holds
    the decision log of every experiment the following loop serves; the controller's
    exploration slice reads the same parts, an archived experiment's included."""
    import numpy as np

    from ctrstream.config import Settings
    from ctrstream.controller.operations import decision_log_slice
    from ctrstream.loop import session
    from ctrstream.loop.ledger import IMPRESSION_LOG_COLUMNS, ImpressionLog, RequestLog
    from ctrstream.monitoring.job import OracleSource

    s = Settings(run_dir=tmp_path / "run", data_dir=tmp_path / "data")
    (s.run_dir / "experiments" / "exp1").mkdir(parents=True)  # `ctrstream run`, a start
    monitor = next(j for j in jobs_for("closed") if j.name == "monitor")
    values = {"run_dir": str(s.run_dir), "data_dir": str(s.data_dir), "api_host": "h"}
    argv = render_job(monitor, values | {"api_port": "1", "experiment": "exp1"}).argv
    oracle = OracleSource(argv[argv.index("--oracle") + 1])  # no error before the loop runs
    assert oracle.refresh() == 0
    log = ImpressionLog(session.state_dir(s, "exp1") / "impressions")
    cols = {c: np.zeros(2) for c in IMPRESSION_LOG_COLUMNS}
    cols |= {
        "impression_id": np.array(["i1", "i2"]),
        "explored": np.array([True, False]),
        "p_true": np.array([0.25, 0.5]),
        "propensity": np.array([0.5, 1.0]),
    }
    log.add(cols)
    log.flush(1_000)
    RequestLog(session.state_dir(s, "exp1") / "requests")  # its parts have no impression ids
    assert oracle.refresh() == 2 and list(oracle.lookup(["i2", "i1"])) == [0.5, 0.25]
    assert decision_log_slice(s.run_dir) == {"i1": (True, 0.25, 0.5), "i2": (False, 0.5, 1.0)}
    # an experiment's folder archived by the registry (the loop's default restarted on a
    # promotion): its decision log is still the truth of the impressions it served
    old = s.run_dir / "experiments" / ".archive" / "live-1" / "loop" / "impressions"
    log2 = ImpressionLog(old)
    cols2 = cols | {"impression_id": np.array(["i3", "i4"])}
    log2.add(cols2)
    log2.flush(2_000)
    assert set(decision_log_slice(s.run_dir)) == {"i1", "i2", "i3", "i4"}
    assert oracle.refresh() == 4
