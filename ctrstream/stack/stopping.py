"""A job's graceful stop: SIGTERM (and Ctrl-C) set one flag that the job's loops poll.

A Bytewax job's sources end their partitions when the flag is set (``raise StopIteration``),
so the dataflow completes: its last epoch closes and its final snapshot is written before the
process exits 0 (a restarted job resumes from that snapshot, nothing replayed). Python runs
the handler in the main thread, which Bytewax's workers give back to the interpreter between
batches, so a stop is seen within one poll.
"""

from __future__ import annotations

import signal
import threading
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


__all__ = ["request_stop", "stop_on_signals", "stop_requested"]
