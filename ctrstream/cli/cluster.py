"""A Bytewax dataflow as a cluster of processes: its recovery store and its supervision.

A Bytewax cluster is ``P`` processes of ``W`` worker threads, wired with ``-i/-a`` (one
process per index; ``docs/bytewax-cluster.md``). Two things make it a unit here:

**The recovery store** (:func:`prepare_store`). Bytewax keeps a flow's snapshots in a fixed
set of SQLite *recovery partitions* (``part-<n>.sqlite3``); their count is set once by
``init_db_dir`` and a resume needs every one of them reachable by some worker of the
cluster. This module creates one partition per worker (``P x W``: every worker snapshots
into its own file). On one host every process shares one directory, which holds them all;
with one process per host (``-i k``) each host's directory holds that process's share
(partitions ``n`` with ``n % P == k``), so the hosts together hold every partition and no
file is shared over a network. A marker file (:data:`LAYOUT_FILE`) records the layout the
store was written by; resuming it with another process or worker count is refused with a
message that says what to do (:class:`LayoutError`): in multi-host mode another process
count would leave partitions on hosts that no longer run, and this project's exactly-once
tests cover a fixed layout.

**Supervision** (:func:`supervise`). Bytewax's rule is that one dead process stops its
cluster: the others cannot go on without its workers' share of the partitions and keys.
The launcher watches every process it started; when one exits non-zero (or is killed) it
stops the others by PID (``SIGTERM``, then ``SIGKILL`` after a grace period) and returns
non-zero, naming the process that died, so that a supervisor restarts the whole cluster,
which resumes from its last snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

LAYOUT_FILE = "ctrstream-cluster.json"
PART_GLOB = "part-*.sqlite3"


class LayoutError(ValueError):
    """A recovery store cannot be used with the requested cluster layout."""


@dataclass(frozen=True)
class Layout:
    """``processes`` processes of ``workers`` workers each. ``process_id`` is None when this
    launcher starts every process on this host (``-p``), else the index of the one process
    it starts (``-i``), the others running on the hosts of ``addresses``."""

    processes: int = 1
    workers: int = 1
    process_id: int | None = None
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.processes < 1 or self.workers < 1:
            raise LayoutError(
                f"a cluster needs at least one process and one worker, got -p {self.processes} "
                f"-w {self.workers}"
            )
        if self.process_id is not None and not self.addresses:
            raise LayoutError(
                "-i/--process-id needs -a/--addresses: 'host:port;host:port' of every process "
                "of the cluster, the same list on every host"
            )
        if self.process_id is None:
            if self.addresses:
                raise LayoutError("-a/--addresses needs -i/--process-id (this host's index)")
            return
        if len(self.addresses) != self.processes:
            raise LayoutError(
                f"-a lists {len(self.addresses)} address(es) but the cluster has "
                f"{self.processes} process(es): give one host:port per process, "
                "separated by ';', the same list on every host"
            )
        if not 0 <= self.process_id < self.processes:
            raise LayoutError(
                f"-i {self.process_id} is not a process of this cluster: use 0 to "
                f"{self.processes - 1} (this host's position in -a)"
            )

    @classmethod
    def from_options(
        cls, processes: int, workers: int, process_id: int | None, addresses: str | None
    ) -> Layout:
        """The layout of ``-p/-w`` or ``-i/-a`` (``-a "h0:port;h1:port"``: its length is the
        process count, ``-p`` may be left out)."""
        addrs = tuple(a.strip() for a in (addresses or "").split(";") if a.strip())
        if addrs and processes > 1 and processes != len(addrs):
            raise LayoutError(
                f"-p {processes} but -a lists {len(addrs)} address(es): leave -p out with -a "
                "(the address list is the cluster)"
            )
        return cls(len(addrs) or processes, workers, process_id, addrs)

    @property
    def partitions(self) -> int:
        """Recovery partitions of the whole cluster: one per worker."""
        return self.processes * self.workers

    def local_partitions(self) -> list[int]:
        """The partitions this host's recovery directory holds."""
        if self.process_id is None:
            return list(range(self.partitions))
        return [n for n in range(self.partitions) if n % self.processes == self.process_id]

    def local_processes(self) -> list[int]:
        """The process indexes this launcher starts."""
        return list(range(self.processes)) if self.process_id is None else [self.process_id]

    def describe(self) -> str:
        return f"{self.processes} process(es) x {self.workers} worker(s)"

    def record(self) -> dict:
        return {
            "processes": self.processes,
            "workers": self.workers,
            "partitions": self.partitions,
            "process_id": self.process_id,
            "local_partitions": self.local_partitions(),
        }


def _change_advice(recovery_dir: Path, had: dict) -> str:
    return (
        f"Resume it with the layout it was written by (-p {had.get('processes')} "
        f"-w {had.get('workers')}"
        + (f", -i {had['process_id']}" if had.get("process_id") is not None else "")
        + "). To change the layout, stop the cluster and start it with a new --recovery-dir "
        "(or move this one away): without a snapshot the flows read their topics from the "
        "beginning, the features flow re-writes every cell with absolute values and the join "
        "suppresses every label its fences show as committed, so the result is the same; it "
        "costs a replay of the retained topics (docs/bytewax-cluster.md)."
    )


def prepare_store(recovery_dir: Path, layout: Layout) -> bool:
    """Create the recovery store of ``layout`` in ``recovery_dir`` if it has none (True), or
    check that the store there was written by the same layout (False); raises
    :class:`LayoutError` when it was not."""
    recovery_dir = Path(recovery_dir)
    marker = recovery_dir / LAYOUT_FILE
    parts = sorted(recovery_dir.glob(PART_GLOB)) if recovery_dir.is_dir() else []
    if marker.exists():
        try:
            had = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise LayoutError(
                f"the recovery store's layout file {marker} cannot be read ({e}): restore it, "
                "or start with a new --recovery-dir"
            ) from None
        if (had.get("processes"), had.get("workers"), had.get("process_id")) != (
            layout.processes,
            layout.workers,
            layout.process_id,
        ):
            was = f"{had.get('processes')} process(es) x {had.get('workers')} worker(s)"
            if had.get("process_id") is not None:
                was += f" (this host process {had['process_id']})"
            now = layout.describe()
            if layout.process_id is not None:
                now += f" (this host process {layout.process_id})"
            raise LayoutError(
                f"the recovery store {recovery_dir} was written by a cluster of {was}; this "
                f"command asks for {now}. " + _change_advice(recovery_dir, had)
            )
        if not parts:
            raise LayoutError(
                f"the recovery store {recovery_dir} records a layout but holds no recovery "
                f"partition ({PART_GLOB}): restore its files from a backup, or start with a "
                "new --recovery-dir (the flows then replay their topics)"
            )
        return False
    if parts:
        # a store from before the layout file: adopt it when its partitions fit this layout
        if len(parts) not in (layout.processes, layout.partitions) or layout.process_id is not None:
            raise LayoutError(
                f"the recovery store {recovery_dir} holds {len(parts)} partition(s) and no "
                f"layout file; this command asks for {layout.describe()}. Resume it with the "
                "process count it was written by, or start with a new --recovery-dir"
            )
        marker.write_text(json.dumps({**layout.record(), "adopted_partitions": len(parts)}))
        return False
    recovery_dir.mkdir(parents=True, exist_ok=True)
    from bytewax.recovery import init_db_dir

    # every partition is created (Bytewax records the count in each), this host keeps its share
    with tempfile.TemporaryDirectory(dir=recovery_dir, prefix=".init-") as tmp:
        init_db_dir(Path(tmp), layout.partitions)
        for n in layout.local_partitions():
            shutil.move(str(Path(tmp) / f"part-{n}.sqlite3"), recovery_dir / f"part-{n}.sqlite3")
    marker.write_text(json.dumps(layout.record()))
    return True


def bytewax_commands(
    target: str,
    layout: Layout,
    recovery_dir: Path | None = None,
    snapshot_s: float = 5.0,
    addresses: Sequence[str] | None = None,
) -> list[list[str]]:
    """The ``python -m bytewax.run`` command line of each process this launcher starts.
    ``addresses`` (``-p`` on one host) are the loopback addresses of the processes, picked
    by the caller; with ``-i`` they are the layout's."""
    base = [sys.executable, "-m", "bytewax.run", target, "-w", str(layout.workers)]
    if recovery_dir is not None:
        base += ["-r", str(recovery_dir), "-s", str(max(1, round(snapshot_s))), "-b", "0"]
    addrs = list(layout.addresses or addresses or [])
    if layout.processes <= 1 and layout.process_id is None:
        return [base]
    if len(addrs) != layout.processes:
        raise LayoutError(f"{layout.processes} processes need {layout.processes} addresses")
    return [base + ["-i", str(k), "-a", ";".join(addrs)] for k in layout.local_processes()]


@dataclass
class Member:
    """One started process of a cluster: its name in messages (``features[1]``) and handle."""

    name: str
    proc: subprocess.Popen


def start_member(
    name: str, argv: list[str], env: dict[str, str], log: Callable[[str], None] = print
) -> Member:
    """Start one cluster process; it dies with this launcher, even with ``kill -9`` (none
    outlives it holding its ports: a restart right away binds the same ones)."""
    from ctrstream.stack.procs import die_with_parent

    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
    log(f"{name} pid {proc.pid}: {' '.join(argv)}")
    return Member(name, proc)


def exit_description(code: int) -> str:
    """``exited with 3`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


def supervise(
    members: list[Member],
    log: Callable[[str], None] = print,
    grace_s: float = 10.0,
    poll_s: float = 0.1,
) -> int:
    """Wait for every member; the first that exits non-zero stops the cluster.

    The others get ``SIGTERM`` (by PID), then ``SIGKILL`` after ``grace_s``. Returns 0 when
    every member exited 0, else a non-zero code: the failed member's exit code, or
    ``128 + signal`` when it was killed (a shell's convention). ``SIGTERM``/``SIGINT`` to
    this launcher are passed on to every member (a clean stop: exit codes as they come).
    """
    live = list(members)
    rc = 0
    stop_deadline: float | None = None
    requested = False  # a stop asked for by a signal to this launcher: exits are expected

    def stop_all(sig: int) -> None:
        for m in live:
            if m.proc.poll() is None:
                try:
                    os.kill(m.proc.pid, sig)
                except ProcessLookupError:
                    pass

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_deadline, requested
        requested = True
        stop_all(signum)
        if stop_deadline is None:
            stop_deadline = time.monotonic() + grace_s

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while live:
            for m in list(live):
                code = m.proc.poll()
                if code is None:
                    continue
                live.remove(m)
                if code != 0 and rc == 0:
                    rc = code if code > 0 else 128 - code
                    if requested:
                        continue
                    others = ", ".join(f"{o.name} (pid {o.proc.pid})" for o in live) or "none"
                    log(
                        f"cluster process {m.name} (pid {m.proc.pid}) {exit_description(code)}: "
                        f"stopping the cluster (the others: {others}); restart it whole, it "
                        "resumes from its last snapshot"
                    )
                    stop_all(signal.SIGTERM)
                    stop_deadline = time.monotonic() + grace_s
            if live and stop_deadline is not None and time.monotonic() > stop_deadline:
                stop_all(signal.SIGKILL)
                stop_deadline = time.monotonic() + grace_s
            if live:
                time.sleep(poll_s)
    finally:
        for m in live:  # this launcher itself is going: take every member with it
            if m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(10)
        for s, h in old.items():
            signal.signal(s, h)
    return rc
