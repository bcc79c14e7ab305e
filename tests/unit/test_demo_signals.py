"""The demo stops its jobs and its private stack on SIGTERM: the signal becomes SystemExit(143)
in the main thread, so run_demo's ``finally`` runs."""

from __future__ import annotations

import os
import signal

import pytest

from ctrstream.stack.stopping import sigterm_exits


def test_sigterm_raises_system_exit_and_the_finally_runs() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(SystemExit) as exc, sigterm_exits():
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line
            raise AssertionError("SIGTERM did not interrupt the demo")
        finally:
            cleaned.append(True)
    assert exc.value.code == 128 + signal.SIGTERM
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before  # the old handler is back
