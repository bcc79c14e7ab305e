"""The local run and the container deployment cannot drift apart: docker-compose.yml names
the same jobs, with the same commands, environment and metrics ports, as
``ctrstream/stack/jobs.py`` (what ``ctrstream run`` supervises)."""

from __future__ import annotations

import importlib.util

from test_compose import COMPOSE, _load_yaml

from ctrstream.stack.jobs import COMPOSE_VALUES, all_jobs, render_job


def _installed(job) -> bool:
    return job.needs is None or importlib.util.find_spec(job.needs) is not None


def test_compose_runs_the_same_jobs_and_commands_as_ctrstream_run():
    services = _load_yaml(COMPOSE)["services"]
    for job in filter(_installed, all_jobs()):
        assert job.name in services, f"docker-compose.yml has no service {job.name!r}"
        svc = services[job.name]
        want = list(render_job(job, COMPOSE_VALUES).argv)
        got = svc["command"]
        if job.role == "service":
            assert got == want, f"{job.name}: compose runs {got}, ctrstream run {want}"
            assert svc.get("restart", "unless-stopped") == "unless-stopped", job.name
            assert "profiles" not in svc, f"{job.name} runs always, in compose too"
        else:  # a driver: its command plus the run's rate and span
            assert got[: len(want)] == want, f"{job.name}: compose runs {got}, not {want}..."
            assert svc["restart"] == "on-failure", job.name
        env = svc.get("environment", {})
        for k, v in job.env.items():
            assert env.get(k) == v, (job.name, k)
        label = svc.get("labels", {}).get("ctrstream.metrics-port")
        if job.api_metrics:
            assert label == COMPOSE_VALUES["api_port"], job.name
        elif job.metrics_ports:
            assert label == env["CTRSTREAM_METRICS_PORT"] == "9100", job.name


def test_every_always_on_ctrstream_service_is_a_job():
    """The other way round: a job added to compose only would run there and not locally."""
    services = _load_yaml(COMPOSE)["services"]
    names = {j.name for j in all_jobs()}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if not cmd or cmd[0] != "ctrstream" or svc.get("restart") == "no":
            continue  # infrastructure, one-shots (the control secret, the batch profile)
        assert name in names, f"compose runs {name} ({cmd}), ctrstream run does not"
