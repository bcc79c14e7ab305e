"""The Bytewax cluster launcher (``ctrstream.cli.cluster``): the recovery store's layout and
the supervision of a cluster's processes as one unit (no servers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctrstream.cli.cluster import (
    LAYOUT_FILE,
    Layout,
    LayoutError,
    Member,
    bytewax_commands,
    prepare_store,
    supervise,
)


def parts(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("part-*.sqlite3"))


def test_one_host_store_has_one_partition_per_worker(tmp_path):
    d = tmp_path / "rec"
    assert prepare_store(d, Layout(processes=2, workers=2))
    assert parts(d) == [f"part-{n}.sqlite3" for n in range(4)]
    rec = json.loads((d / LAYOUT_FILE).read_text())
    assert (rec["processes"], rec["workers"], rec["partitions"]) == (2, 2, 4)
    assert not prepare_store(d, Layout(processes=2, workers=2))  # resumed as it is


def test_each_host_keeps_its_share_of_the_partitions(tmp_path):
    addrs = ("h0:2101", "h1:2101", "h2:2101")
    shares = []
    for k in range(3):
        d = tmp_path / f"host{k}"
        prepare_store(d, Layout(3, 2, k, addrs))
        shares.append(parts(d))
    assert shares == [
        ["part-0.sqlite3", "part-3.sqlite3"],
        ["part-1.sqlite3", "part-4.sqlite3"],
        ["part-2.sqlite3", "part-5.sqlite3"],
    ]
    assert not any(list((tmp_path / f"host{k}").glob(".init-*")) for k in range(3))


@pytest.mark.parametrize(
    "later",
    [Layout(processes=1, workers=1), Layout(processes=3, workers=1), Layout(2, 2)],
)
def test_a_changed_layout_is_refused_with_what_to_do(tmp_path, later):
    d = tmp_path / "rec"
    prepare_store(d, Layout(processes=2, workers=1))
    with pytest.raises(LayoutError) as e:
        prepare_store(d, later)
    msg = str(e.value)
    assert "2 process(es) x 1 worker(s)" in msg and later.describe() in msg
    assert "-p 2 -w 1" in msg and "new --recovery-dir" in msg
    assert parts(d) == ["part-0.sqlite3", "part-1.sqlite3"]  # nothing touched


def test_another_host_index_over_a_store_is_refused(tmp_path):
    addrs = ("h0:1", "h1:1")
    d = tmp_path / "rec"
    prepare_store(d, Layout(2, 1, 0, addrs))
    with pytest.raises(LayoutError, match="-i 0"):
        prepare_store(d, Layout(2, 1, 1, addrs))


def test_a_store_without_partitions_is_refused(tmp_path):
    d = tmp_path / "rec"
    prepare_store(d, Layout(2, 1))
    for p in d.glob("part-*"):
        p.unlink()
    with pytest.raises(LayoutError, match="no recovery partition"):
        prepare_store(d, Layout(2, 1))


def test_a_store_from_before_the_layout_file_is_adopted_when_it_fits(tmp_path):
    from bytewax.recovery import init_db_dir

    d = tmp_path / "rec"
    d.mkdir()
    init_db_dir(d, 2)  # what `speed -p 2` created before the layout file
    assert not prepare_store(d, Layout(processes=2, workers=1))
    assert json.loads((d / LAYOUT_FILE).read_text())["processes"] == 2
    e = tmp_path / "rec3"
    e.mkdir()
    init_db_dir(e, 3)
    with pytest.raises(LayoutError, match="3 partition"):
        prepare_store(e, Layout(processes=2, workers=1))


def test_options_are_checked():
    assert Layout.from_options(1, 2, 1, "a:1; b:2").processes == 2
    with pytest.raises(LayoutError, match="needs -a"):
        Layout.from_options(1, 1, 0, None)
    with pytest.raises(LayoutError, match="0 to 1"):
        Layout.from_options(1, 1, 2, "a:1;b:2")
    with pytest.raises(LayoutError, match="leave -p out"):
        Layout.from_options(3, 1, 0, "a:1;b:2")
    with pytest.raises(LayoutError, match="needs -i"):
        Layout(2, 1, None, ("a:1", "b:2"))
    with pytest.raises(LayoutError, match="at least one"):
        Layout(0, 1)


def test_commands_wire_the_processes():
    one = bytewax_commands("m:get_flow()", Layout(), Path("/r"), 3)
    assert (
        len(one) == 1 and "-i" not in one[0] and one[0][-6:] == ["-r", "/r", "-s", "3", "-b", "0"]
    )
    two = bytewax_commands("m:get_flow()", Layout(2, 1), None, addresses=["x:1", "x:2"])
    assert [c[-4:] for c in two] == [["-i", "0", "-a", "x:1;x:2"], ["-i", "1", "-a", "x:1;x:2"]]
    host1 = bytewax_commands("m:get_flow()", Layout(2, 4, 1, ("h0:1", "h1:1")))
    assert len(host1) == 1 and host1[0][-4:] == ["-i", "1", "-a", "h0:1;h1:1"]
    assert host1[0][host1[0].index("-w") + 1] == "4"


def _sleeper(name: str, code: str = "import time; time.sleep(60)") -> Member:
    return Member(name, subprocess.Popen([sys.executable, "-c", code]))


def _gone_within(m: Member, seconds: float) -> bool:
    try:
        m.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_one_dead_process_stops_the_cluster_and_is_named():
    members = [_sleeper("features[0]"), _sleeper("features[1]"), _sleeper("join[0]")]
    lines: list[str] = []
    os.kill(members[1].proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    rc = supervise(members, lines.append, grace_s=5)
    assert rc == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 5  # SIGTERM was enough
    assert all(m.proc.poll() is not None for m in members)
    died = [ln for ln in lines if "features[1]" in ln and "SIGKILL" in ln]
    assert died and f"pid {members[1].proc.pid}" in died[0]


def test_a_process_that_ignores_sigterm_gets_sigkill_after_the_grace():
    ignore = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    stubborn = Member(
        "score[1]",
        subprocess.Popen([sys.executable, "-c", ignore], stdout=subprocess.PIPE, text=True),
    )
    assert stubborn.proc.stdout is not None and stubborn.proc.stdout.readline() == "ready\n"
    failing = _sleeper("score[0]", "import sys; sys.exit(3)")
    lines: list[str] = []
    rc = supervise([failing, stubborn], lines.append, grace_s=0.5)
    assert rc == 3 and "exited with 3" in lines[0]
    assert stubborn.proc.returncode == -signal.SIGKILL


def test_a_cluster_that_finishes_exits_zero():
    members = [_sleeper(f"features[{k}]", "pass") for k in range(2)]
    assert supervise(members, print) == 0
    assert all(_gone_within(m, 1) for m in members)
