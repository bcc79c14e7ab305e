"""Shared fixtures: one isolated real stack (Kafka KRaft, Redis, Triton) for the session.

The stack runs on free loopback ports under a temporary directory and is stopped by PID at
the end of the session. Tests get its ``Settings`` through the ``settings`` fixture and a
``CTRSTREAM_*`` environment for child processes through ``stack_env``.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from ctrstream.config import Settings
from ctrstream.stack.manager import Stack, isolated_stack, settings_env
from ctrstream.stack.services import pid_alive, wait_until
from ctrstream.store import batch_view as BV

OWNER_FILE = "owner.pid"  # the pytest process that started a session's stack


def _stop_stale_stacks(base: Path) -> None:
    """Stop servers left behind by an earlier test session that was killed hard (its
    fixture never tore down). Only stacks whose owning pytest process is gone, and only
    PIDs recorded in that stack's directory whose working directory is still inside it, are
    stopped: a concurrent live session's stack is never touched."""
    for pid_file in base.parent.glob("pytest-*/stack*/*.pid"):
        if base in pid_file.parents or pid_file.name == OWNER_FILE:
            continue
        try:
            owner = int((pid_file.parent / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # unknown owner: leave it alone
        if pid_alive(owner):
            continue
        try:
            pid = int(pid_file.read_text())
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (OSError, ValueError):
            continue
        if cwd.startswith(str(pid_file.parent)) and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            try:
                wait_until(
                    lambda pid=pid: not pid_alive(pid), 30, what=f"stale server {pid} to exit"
                )
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    _stop_stale_stacks(tmp_path_factory.getbasetemp())
    run_dir = tmp_path_factory.mktemp("stack")
    (run_dir / OWNER_FILE).write_text(str(os.getpid()))
    with isolated_stack(run_dir, log=lambda m: print(m)) as st:
        yield st


@pytest.fixture(scope="session")
def settings(stack) -> Settings:
    return stack.settings


@pytest.fixture(scope="session")
def stack_env(settings) -> dict[str, str]:
    """Environment for child processes (``ctrstream ...`` subprocesses) that talk to the stack."""
    return {**os.environ, **settings_env(settings)}


@pytest.fixture
def unique():
    """A short unique suffix for topic, group and key names, so tests never share state."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def fresh_topics(settings, unique):
    """Settings whose topics are new, unique and empty (same partition counts)."""
    from ctrstream.kafka.clients import ensure_topics

    t = settings.topics
    topics = t.model_copy(
        update={
            name: getattr(t, name).model_copy(update={"name": f"{getattr(t, name).name}-{unique}"})
            for name in ("impressions", "clicks", "labeled", "predictions", "dlq")
        }
    )
    s = settings.model_copy(update={"topics": topics})
    ensure_topics(s, s.topics.all())
    return s


@pytest.fixture
def r(settings):
    """A Redis client of the stack; the served batch view is restored after the test."""
    import redis

    client = redis.Redis.from_url(settings.redis.url)
    saved = BV.served_version(client)
    yield client
    if saved is None:
        BV.clear_pointer(client)
    else:
        BV.switch_pointer(client, saved)
    client.close()
