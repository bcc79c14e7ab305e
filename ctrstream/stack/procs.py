"""Child jobs (Bytewax dataflows, the API server, ...) started and stopped by PID."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
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


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when the
    process that started it dies, however it dies (``kill -9`` included), so a supervisor's
    children never outlive it holding its ports (Linux ``prctl(PR_SET_PDEATHSIG)``; None
    elsewhere). Call it in the thread that starts the child and keeps living: the signal
    follows that thread's exit."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded before the fork
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before prctl: die now
            os._exit(1)

    return preexec


def kill_hard(proc: subprocess.Popen) -> None:
    """``kill -9`` the job's whole process group (crash tests)."""
    stop_job(proc, timeout=0.1, sig=signal.SIGKILL)


__all__ = ["die_with_parent", "start_job", "stop_job", "kill_hard", "pid_alive", "wait_until"]
