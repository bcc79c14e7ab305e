"""The controller against the real stack (Redis, Triton; the session's): three cycles of the
offline loop on a Parquet archive of generated traffic, each a scenario built to cause one
outcome, the closed loop's part (the shadow's report, the sequential test's decision, a
guardrail) written to the experiments registry as the loop writes it:

1. a champion that is a random-weight LR and a challenger trained on the archive: the gate
   passes, shadow, experiment, the test decides up -> **promoted**. This cycle runs as
   ``ctrstream controller --once`` subprocesses and is killed with SIGKILL between the
   promotion's publish and the rest of it: the resumed controller does not publish again,
   the audit log has one promotion, Triton serves the promoted version, its calibrator
   followed;
2. a normal challenger whose experiment arm breaks a guardrail -> **rolled back**: the
   champion still serves;
3. a deliberately broken challenger (random weights) -> **gate failed**, nothing published.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as grpcclient
from controller_world import loop_decides, loop_shadow_report

from ctrstream.batch.archive import write_partitioned
from ctrstream.controller.audit import AuditLog
from ctrstream.controller.checkpoint import load
from ctrstream.controller.cycle import KILL_ENV, Controller, ControllerConfig
from ctrstream.controller.operations import TAG_FIELD, StackOperations
from ctrstream.experiments.registry import Registry
from ctrstream.models.export import export_onnx
from ctrstream.models.nets import HashedLogisticRegression
from ctrstream.models.publish import (
    loaded_versions,
    publish,
    read_served,
    served_model_name,
    versions_on_disk,
)
from ctrstream.simulation.generator import generate
from ctrstream.simulation.scenarios import load_scenario
from ctrstream.store import batch_view as BV
from ctrstream.store.calibration import CalibrationStore
from ctrstream.store.connection import redis_client
from ctrstream.store.layout import calibrator_id

START = 1_924_992_000_000  # 2031-01-01: buckets no other test writes
HOUR = 3_600_000
PLATT = {
    "model_version": "1",
    "method": "platt",
    "n_seen": 500,
    "platt": {
        "intercept": -0.1,
        "w_logit": 0.9,
        "z_ref": -3.5,
        "context": {},
        "context_names": [],
        "context_mean": {},
    },
}


def _random_lr(path: Path, seed: int, scale: float = 0.5) -> Path:
    import torch

    torch.manual_seed(seed)
    m = HashedLogisticRegression()
    with torch.no_grad():
        m.weights.weight.normal_(0, scale)
        m.dense.weight.normal_(0, scale)
    export_onnx(m.eval(), path)
    return path


def _archive(data: Path, traffic, lo_h: float, hi_h: float) -> None:
    """Archive the traffic's events of [lo_h, hi_h) hours after START."""
    for kind, table in (("impressions", traffic.impressions), ("clicks", traffic.clicks)):
        t = table.column("event_time_ms")
        keep = pc.and_(
            pc.greater_equal(t, START + int(lo_h * HOUR)), pc.less(t, START + int(hi_h * HOUR))
        )
        write_partitioned(data, kind, table.filter(keep))


@pytest.fixture(scope="module")
def traffic():
    sc = load_scenario("steady", events=60_000, hours=11.0, seed=11, start_ms=START)
    return generate(sc)


@pytest.fixture
def view_pointer_restored(settings):
    """The cycles switch the session Redis's batch-view pointer to their 2031 cut-offs, which
    would make every later test of the session read its (earlier) features from that view:
    the pointer is put back as it was."""
    r = redis_client(settings)
    before = BV.served_version(r)
    yield
    if before is None:
        BV.clear_pointer(r)
    else:
        BV.switch_pointer(r, before)
    r.close()


def test_promotion_rollback_and_a_failed_gate_with_a_kill_9(
    settings, stack_env, tmp_path, unique, traffic, view_pointer_restored
):
    data = tmp_path / "data"
    oracle = tmp_path / "oracle.parquet"
    pq.write_table(traffic.oracle, oracle)
    _archive(data, traffic, 0, 7)
    base, prefix = f"ctr_ctl{unique}", f"ctl{unique}"
    served = served_model_name(settings, base)
    chal_served = served_model_name(settings, f"{base}_challenger")
    publish(settings, _random_lr(tmp_path / "champion.onnx", seed=1), base)  # v1: weak
    folder = tmp_path / "controller"
    reg = Registry.of(settings)
    triton = grpcclient.InferenceServerClient(settings.triton.grpc_url)
    cal = CalibrationStore.from_settings(settings)

    # ---- cycle 1, as the `ctrstream controller` command, killed in the promotion
    env = {**stack_env, "CTRSTREAM_DATA_DIR": str(data)}
    cmd = [
        sys.executable,
        "-m",
        "ctrstream",
        "controller",
        "--once",
        "--base",
        base,
        "--prefix",
        prefix,
        "--oracle",
        str(oracle),
        "--folder",
        str(folder),
        "--no-read-dlq",
        "--shadow-min-s",
        "0",
        "--min-run-s",
        "0",
        "--epochs",
        "2",
    ]

    def once(*extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
        e = {**env, KILL_ENV: kill} if kill else env
        return subprocess.run([*cmd, *extra], env=e, capture_output=True, text=True, timeout=300)

    p = once("--now")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["status"] == "wait:shadow_verdict", p.stderr[-3000:]
    cycle = load(folder / "state.json").cycle
    assert cycle is not None and cycle.cutoff_ms == START + 6 * HOUR
    assert cycle.done["gate"]["kind"] == "gate_passed", cycle.done["gate"]
    chal_v = cycle.done["publish_challenger"]["data"]["version"]
    assert loaded_versions(triton, served) == [1]  # the challenger is not the champion's
    assert chal_v in loaded_versions(triton, chal_served)
    loop_shadow_report(reg, cycle.done["shadow"]["data"]["experiment"])
    p = once()
    assert json.loads(p.stdout)["status"] == "wait:verdict", p.stderr[-3000:]
    name = load(folder / "state.json").cycle.done["experiment"]["data"]["experiment"]
    loop_decides(reg, name, "up")
    cal.publish_params(calibrator_id(f"{base}_challenger", str(chal_v)), PLATT)
    t0 = time.monotonic()
    p = once(kill="act:published")
    t_killed = time.monotonic() - t0
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert versions_on_disk(settings.triton.model_repository / served) == [1, 2]
    t0 = time.monotonic()
    p = once()  # resumes: finds v2 published, does the rest of the promotion
    t_resumed = time.monotonic() - t0
    assert p.returncode == 0 and json.loads(p.stdout)["status"] == "idle", p.stderr[-3000:]
    print(f"kill -9 in the promotion: killed run {t_killed:.1f} s, resumed run {t_resumed:.1f} s")
    assert versions_on_disk(settings.triton.model_repository / served) == [1, 2]  # no double
    assert max(loaded_versions(triton, served)) == 2
    card = json.loads((settings.triton.model_repository / served / "2" / "card.json").read_text())
    assert card[TAG_FIELD] == "c1-promoted"
    assert cal.params(calibrator_id(base, "2")) == PLATT  # the calibrator followed
    recs = AuditLog(folder / "audit.jsonl").records()
    kinds = [r["kind"] for r in recs]
    assert kinds.count("promoted") == 1 and kinds[-1] == "cycle_finished"
    assert kinds.count("challenger_published") == 1
    assert not any(
        f"controller.{prefix}" in o for o in read_served(settings)["pins"].get(served, {})
    )
    assert not reg.get(name).running

    # ---- cycle 2, in process: the challenger's arm breaks a guardrail -> rolled back
    _archive(data, traffic, 7, 9)
    s2 = settings.model_copy(update={"data_dir": data})
    cfg = ControllerConfig(
        folder=folder, model=base, prefix=prefix, shadow_min_s=0.0, min_run_s=0.0
    )
    ops = StackOperations(s2, oracle_path=oracle, epochs=2, read_dlq=False)
    ctl = Controller(cfg, ops)
    assert ctl.request_cycle("test: cycle 2")
    assert ctl.run_until_waiting() == "wait:shadow_verdict"
    loop_shadow_report(reg, ctl.state.cycle.done["shadow"]["data"]["experiment"])
    assert ctl.run_until_waiting() == "wait:verdict"
    name2 = ctl.state.cycle.done["experiment"]["data"]["experiment"]
    reg.stop_arm(name2, "challenger", "arm challenger: error rate 4.00% > 1.00% over 900 requests")
    assert ctl.run_until_waiting() == "idle"
    last = ctl.state.history[-1]
    assert (
        last["done"]["act"]["kind"] == "rolled_back" and "error rate" in last["done"]["act"]["why"]
    )
    assert max(loaded_versions(triton, served)) == 2  # the champion kept serving

    # ---- cycle 3: a deliberately broken challenger fails the offline gate
    _archive(data, traffic, 9, 11)

    class Broken(StackOperations):
        def train(self, folder: Path, start_ms: int, end_ms: int) -> dict:
            res = super().train(folder, start_ms, end_ms)
            _random_lr(Path(res["onnx"]), seed=5, scale=2.0)
            return res

    before = versions_on_disk(settings.triton.model_repository / chal_served)
    ctl = Controller(cfg, Broken(s2, oracle_path=oracle, epochs=2, read_dlq=False))
    assert ctl.request_cycle("test: cycle 3")
    assert ctl.run_until_waiting() == "idle"
    gate = ctl.state.history[-1]["done"]["gate"]
    assert gate["kind"] == "gate_failed", gate
    assert versions_on_disk(settings.triton.model_repository / chal_served) == before
    assert max(loaded_versions(triton, served)) == 2

    kinds = [r["kind"] for r in AuditLog(folder / "audit.jsonl").records()]
    assert kinds.count("cycle_started") == 3 and kinds.count("cycle_finished") == 3
    assert kinds.count("promoted") == 1 and kinds.count("rolled_back") == 1
    assert kinds.count("gate_failed") == 1
    triton.close()
