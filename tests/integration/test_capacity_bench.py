"""`ctrstream bench capacity` end to end on a small replay: its own Kafka and Redis, one Redis
and a 3-master Redis Cluster, the memory phase, then `--plan` over its results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FROM_OTHER_BENCHMARKS = ("replay.json", "api.json", "inference.json", "memory.json", "engines.json")


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctrstream", "bench", "capacity", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CTRSTREAM_METRICS_PORT": "0"},
    )


@pytest.mark.timeout(600)
def test_capacity_benchmark_measures_per_master_and_feeds_the_plan(tmp_path):
    out = tmp_path / "results"
    got = run(
        ["--events", "3000", "--masters", "1,2,3", "--processes", "1", "--memory-sample", "200",
         "--out", str(out)],
        timeout=540,
    )  # fmt: skip
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads((out / "capacity.json").read_text())["rows"]}
    produced = rows["kafka produce"]["records"]
    assert rows["kafka consume"]["records"] == produced > 3000
    assert rows["kafka produce"]["broker_us_per_record"] > 0
    single, cluster = rows["speed m=1 p=1"], rows["speed m=3 p=1"]
    for row in (single, cluster):
        assert row["events"] == produced and row["events_per_s"] > 0
        assert row["job_us_per_event"] > 0 and row["redis_cpu_us_per_event"] > 0
    assert len(single["masters_detail"]) == 1 and len(cluster["masters_detail"]) == 3
    shares = [d["share"] for d in cluster["masters_detail"]]
    assert sum(shares) == pytest.approx(1.0) and min(shares) > 0.2  # the slots spread the writes
    # every cell written once on either topology: the same keys (a marker per master aside)
    assert cluster["keys_written"] - single["keys_written"] in range(0, 4)
    assert "at least 3 masters" in rows["speed m=2"]["missing"]

    mem = json.loads((out / "capacity-memory.json").read_text())["rows"]
    speed = {r["family"]: r for r in mem if r["view"] == "speed"}
    assert "user" in speed and all(r["bytes_mean"] > 0 for r in speed.values())
    assert any(r["view"] == "speed-fit" for r in mem)
    assert {r["family"] for r in mem if r["view"] == "batch"} >= {"user", "ad"}
    server = next(r for r in mem if r["view"] == "server")
    assert server["per_million_events"] > 0 and server["overhead"] > 0

    for name in FROM_OTHER_BENCHMARKS:
        shutil.copy(REPO / "bench" / "results" / name, out / name)
    doc = tmp_path / "capacity.md"
    doc.write_text((REPO / "docs" / "capacity.md").read_text())
    got = run(["--plan", "--results", str(out), "--doc", str(doc)], timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    plan = json.loads((out / "capacity-plan.json").read_text())
    assert plan["inputs"]["speed_job_us"]["value"] == pytest.approx(single["job_us_per_event"])
    assert "redis_write_us_cluster" in plan["inputs"]
    assert "Bytewax features job" in doc.read_text()
