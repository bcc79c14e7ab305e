"""Child jobs (Bytewax dataflows, the API server, ...) started and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from ctrstream.stack.services import pid_alive, wait_until


def start_job(
    argv: list[str],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start ``argv`` in its own process group, output to ``log_path`` (or inherited)."""
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if out:
            out.close()


def stop_job(
    proc: subprocess.Popen, timeout: float = 20.0, sig: int = signal.SIGTERM
) -> int | None:
    """Signal the job's process group, wait for it to exit (SIGKILL after ``timeout``)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # children in the group that outlived the leader (bytewax -p spawns processes)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.returncode


def kill_hard(proc: subprocess.Popen) -> None:
    """``kill -9`` the job's whole process group (crash tests)."""
    stop_job(proc, timeout=0.1, sig=signal.SIGKILL)


__all__ = ["start_job", "stop_job", "kill_hard", "pid_alive", "wait_until"]
