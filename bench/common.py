"""Shared output for every benchmark: a printed table, a JSON file and the device it ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers (``1e6`` allowed)."""
    import argparse

    try:
        vals = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def results_dir() -> Path:
    """Where benchmarks write: ``settings.results_dir`` (``bench/results`` under the current
    directory unless ``CTRSTREAM_RESULTS_DIR`` says otherwise)."""
    from ctrstream.config import get_settings

    return get_settings().results_dir


def device_info() -> dict:
    """What the numbers were measured on: CPU model and count, and the GPU when there is one."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def rss_kb(pid: int, field: str = "VmHWM") -> int:
    """A process's memory from /proc in KiB: ``VmHWM`` its peak RSS, ``VmRSS`` the current
    one (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(rows[0].keys()) if rows else []
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in columns])
    # wide enough for every column when the output is a file or a CI log
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def write_results(
    name: str, rows: list[dict], meta: dict | None = None, out_dir: Path | None = None
) -> Path:
    """Write ``{name}.json`` (rows + device + parameters) and return its path."""
    out_dir = Path(out_dir or results_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device_info(),
        "meta": meta or {},
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


def process_cpu_s(pid: int, descendants: bool = True) -> float:
    """User + system CPU seconds of a process and (by default) its descendants, such as
    Triton's backend stubs (Linux /proc; 0 when it is gone)."""
    total = 0.0
    stack = [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            if descendants:
                for task in Path(f"/proc/{p}/task").iterdir():
                    stack += [int(k) for k in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total
