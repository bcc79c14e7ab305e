"""The stack's real Prometheus (Debian's ``prometheus``, started by ``stack up``): it is up on
127.0.0.1, has loaded the alert rules, scrapes Triton and itself, and scrapes the jobs
registered in its target folder (``ctrstream.stack.prometheus.write_targets``) - here the
prediction API and the calibrator, a Redis-side job - without a restart, and its rules see a
job that stops. ``stack up/status/
down`` start, show and stop it by PID.

Everything is polled through Prometheus's HTTP API with a deadline; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from ctrstream.stack import prometheus as P
from ctrstream.stack.procs import start_job, stop_job
from ctrstream.stack.services import free_port, pid_alive, wait_until

# a first scrape waits for the target file to be read (inotify) and one scrape interval (5 s)
DEADLINE_S = 60.0


def _get(settings, path: str, **params: str) -> dict:
    url = f"{settings.prometheus.url}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]


def _targets(settings) -> list[dict]:
    return _get(settings, "/api/v1/targets", state="active")["activeTargets"]


def test_prometheus_is_up_with_the_rules_and_scrapes_triton(stack, settings):
    status = {s.name: s for s in stack.status()}
    assert status["prometheus"].healthy and status["prometheus"].pid
    assert status["prometheus"].address == f"http://127.0.0.1:{settings.prometheus.port}"
    rules = _get(settings, "/api/v1/rules", type="alert")
    loaded = {r["name"] for g in rules["groups"] for r in g["rules"]}
    doc = yaml.safe_load(P.RULES.read_text())
    assert loaded == {r["alert"] for g in doc["groups"] for r in g["rules"]}

    def scraped() -> dict[str, str] | None:
        got = {t["labels"]["job"]: t["health"] for t in _targets(settings)}
        return got if got.get("triton") == "up" and got.get("prometheus") == "up" else None

    wait_until(scraped, DEADLINE_S, interval=0.5, what="Prometheus to scrape Triton and itself")


def test_prometheus_scrapes_the_jobs_registered_while_it_runs(
    settings, stack_env, tmp_path, unique
):
    api_port, cal_port = free_port(), free_port()
    env = {**stack_env, "CTRSTREAM_METRICS_PORT": "0"}
    api = start_job(
        [sys.executable, "-m", "ctrstream", "serve", "--port", str(api_port)],
        env=env,
        log_path=tmp_path / "serve.log",
    )
    # the calibrator: a Redis-side job (its checkpoint is in Redis), metrics on its own port
    calibrate = start_job(
        [sys.executable, "-m", "ctrstream", "calibrate"],
        env={**stack_env, "CTRSTREAM_METRICS_PORT": str(cal_port)},
        log_path=tmp_path / "calibrate.log",
    )
    group = f"test-{unique}"
    try:
        api_url = f"http://127.0.0.1:{api_port}"

        def serving() -> bool:
            assert api.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert calibrate.poll() is None, (tmp_path / "calibrate.log").read_text()[-2000:]
            for port in (api_port, cal_port):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                    pass
            return True

        wait_until(serving, DEADLINE_S, interval=0.2, what="the API and the calibrator")
        # one invalid request: the API counts it (outcome=invalid), Prometheus must see it
        req = urllib.request.Request(
            api_url + "/v1/predict", data=b"nope", headers={"content-type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 422

        P.write_targets(
            settings,
            group,
            [("serve", f"127.0.0.1:{api_port}"), ("calibrate", f"127.0.0.1:{cal_port}")],
        )

        def up() -> dict[str, dict] | None:
            got = {
                t["labels"].get("service"): t
                for t in _targets(settings)
                if t["labels"]["job"] == P.SCRAPE_JOB
            }
            ok = all(got.get(n, {}).get("health") == "up" for n in ("serve", "calibrate"))
            return got if ok else None

        got = wait_until(up, DEADLINE_S, interval=0.5, what="Prometheus to scrape both jobs")
        assert got["serve"]["scrapeUrl"] == f"{api_url}/metrics"

        def counted() -> bool:
            res = _get(
                settings,
                "/api/v1/query",
                query='ctrstream_api_requests_total{service="serve", outcome="invalid"}',
            )["result"]
            return bool(res) and float(res[0]["value"][1]) >= 1

        wait_until(counted, DEADLINE_S, interval=0.5, what="the API's counter in Prometheus")
        res = _get(settings, "/api/v1/query", query='up{service="calibrate"}')["result"]
        assert res and res[0]["value"][1] == "1"

        # the calibrator stops: its scrape fails and the rules see it (pending for 1 m)
        stop_job(calibrate)

        def alerting() -> bool:
            alerts = _get(settings, "/api/v1/alerts")["alerts"]
            return any(
                a["labels"]["alertname"] == "CtrstreamTargetDown"
                and a["labels"].get("service") == "calibrate"
                and a["state"] in ("pending", "firing")
                for a in alerts
            )

        wait_until(alerting, DEADLINE_S, interval=0.5, what="CtrstreamTargetDown for calibrate")

        # unregistered: Prometheus drops the targets
        assert P.remove_targets(settings, group)

        def dropped() -> bool:
            services = {t["labels"].get("service") for t in _targets(settings)}
            return not services & {"serve", "calibrate"}

        wait_until(dropped, DEADLINE_S, interval=0.5, what="Prometheus to drop the targets")
    finally:
        P.remove_targets(settings, group)
        for proc in (api, calibrate):
            stop_job(proc)


def test_stack_up_status_and_down_run_prometheus_by_pid(tmp_path):
    """``ctrstream stack up --only prometheus`` in its own run directory: its data is there,
    ``status`` shows it ready, ``down`` stops its PID."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CTRSTREAM_")},
        "CTRSTREAM_RUN_DIR": str(tmp_path / "run"),
        "CTRSTREAM_PROMETHEUS__PORT": str(free_port()),
        "CTRSTREAM_CACHE_DIR": os.environ.get("CTRSTREAM_CACHE_DIR", ".cache"),
        "COLUMNS": "200",  # one table row per line
    }

    def ctrstream(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ctrstream", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    res = ctrstream("stack", "up", "--only", "prometheus")
    assert res.returncode == 0, res.stdout + res.stderr
    pid_file = tmp_path / "run" / "prometheus.pid"
    pid = int(pid_file.read_text())
    try:
        assert pid_alive(pid)
        assert (tmp_path / "run" / "prometheus" / "data").is_dir()
        res = ctrstream("stack", "status")
        line = next(row for row in res.stdout.splitlines() if "prometheus" in row)
        assert "ready" in line and str(pid) in line, res.stdout
    finally:
        res = ctrstream("stack", "down")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "prometheus stopped" in " ".join(res.stdout.split()), res.stdout
    assert not pid_alive(pid) and not pid_file.exists()
