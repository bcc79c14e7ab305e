"""A job's graceful stop: SIGTERM (and Ctrl-C) set one flag that the job's loops poll - or,
for a driver that unwinds instead (the demo), :func:`sigterm_exits`.

A Bytewax job's sources end their partitions when the flag is set (``raise StopIteration``),
so the dataflow completes: its last epoch closes and its final snapshot is written before the
process exits 0 (a restarted job resumes from that snapshot, nothing replayed). Python runs
the handler in the main thread, which Bytewax's workers give back to the interpreter between
batches, so a stop is seen within one poll.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_STOP = threading.Event()


def _on_signal(_signum: int, _frame: FrameType | None) -> None:
    _STOP.set()


def stop_on_signals(*signals: int) -> None:
    """Make ``signals`` (default SIGTERM and SIGINT) request a graceful stop (main thread)."""
    for sig in signals or (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)


def stop_requested() -> bool:
    """True once a stop was requested."""
    return _STOP.is_set()


def request_stop() -> None:
    """Request the stop from code (tests, a caller that owns the job's lifetime)."""
    _STOP.set()


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While it is open, ``SIGTERM`` raises ``SystemExit(143)`` in the main thread, so that the
    caller's ``finally`` runs (the demo stops its jobs and its private stack: a plain SIGTERM
    would end the process and leave them running). The previous handler comes back on exit;
    outside the main thread it does nothing (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


__all__ = ["request_stop", "sigterm_exits", "stop_on_signals", "stop_requested"]
