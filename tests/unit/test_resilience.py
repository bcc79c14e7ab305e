"""The local Redis password in the settings, the writer's back-off, and a supervisor's
children dying with it (no servers)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

from ctrstream.config import REDIS_PASSWORD_FILE, Settings
from ctrstream.stack.procs import wait_until
from ctrstream.stack.services import ensure_redis_password, pid_alive
from ctrstream.store.resp import Backoff


def test_password_generated_once_owner_only_and_read_through_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("CTRSTREAM_REDIS__PASSWORD", raising=False)
    s = Settings(run_dir=tmp_path)
    assert s.redis.password is None  # no stack here yet
    pw = ensure_redis_password(s)
    path = tmp_path / REDIS_PASSWORD_FILE
    assert len(pw) >= 32 and s.redis.password == pw and f":{pw}@" in s.redis.url
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_redis_password(Settings(run_dir=tmp_path)) == pw  # kept, not regenerated
    assert Settings(run_dir=tmp_path).redis.password == pw  # every client reads it
    assert pw not in json.dumps(Settings(run_dir=tmp_path).dump())  # `config show` masks it
    monkeypatch.setenv("CTRSTREAM_REDIS__PASSWORD", "given")
    assert Settings(run_dir=tmp_path).redis.password == "given"  # the environment wins
    other = tmp_path / "other"
    assert ensure_redis_password(Settings(run_dir=other)) == "given"
    assert not (other / REDIS_PASSWORD_FILE).exists()  # a given password is not written


def test_backoff_doubles_to_its_cap_with_jitter():
    b = Backoff(first_s=0.1, max_s=1.0)
    for attempt, full in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (60, 1.0)]:
        for _ in range(20):
            assert full / 2 <= b.delay(attempt) <= full


def test_children_die_with_their_parent_killed_hard(tmp_path):
    """A process started with ``die_with_parent`` does not outlive its parent's kill -9."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import subprocess, sys, time
                from ctrstream.stack.procs import die_with_parent
                child = subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(120)"],
                    preexec_fn=die_with_parent(),
                )
                open({str(pid_file)!r}, "w").write(str(child.pid))
                time.sleep(120)
                """
            ),
        ],
        start_new_session=True,
    )
    try:
        child = wait_until(
            lambda: pid_file.exists() and pid_file.read_text() and int(pid_file.read_text()),
            30,
            what="the child to start",
        )
        assert pid_alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not pid_alive(child), 10, what="the child to die with its parent")
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait(10)


def test_the_local_redis_keeps_an_append_only_file_unless_told_not_to(tmp_path, monkeypatch):
    from ctrstream.stack import provision
    from ctrstream.stack.services import RedisService

    monkeypatch.setattr(provision, "redis_server", lambda: "redis-server")

    def aof(**env: str) -> tuple[str, str]:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        argv, _ = RedisService(Settings(run_dir=tmp_path)).command()
        return argv[argv.index("--appendonly") + 1], argv[argv.index("--appendfsync") + 1]

    assert aof() == ("yes", "everysec")
    assert aof(CTRSTREAM_REDIS__APPENDONLY="false") == ("no", "everysec")
