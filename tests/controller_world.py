"""A fake stack for the controller's unit tests: every side effect of
:class:`ctrstream.controller.cycle.Operations` recorded in one JSON file (the "world"), each
idempotent as the real ones are, and the closed loop's part (the experiments' verdicts)
written to a real experiments registry. Run as a script it drives one cycle to its end,
doing the loop's part whenever the controller waits: the crash test runs it under
``CTRSTREAM_CONTROLLER_KILL_AT`` (it dies there), then again (it resumes)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ctrstream.controller.cycle import Controller, ControllerConfig
from ctrstream.controller.gate import GateRule
from ctrstream.experiments.analysis import ComparisonState, SequentialState
from ctrstream.experiments.registry import Registry

T0 = 1_733_000_400_000  # an aligned hour
CLOCK = T0 + 7 * 3_600_000


class World:
    """The fake stack's state (one JSON file, rewritten atomically)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "world.json"
        if not self.path.exists():
            self.save(
                {
                    "clock": CLOCK,
                    "decay": {
                        "version": "1",
                        "alarm": True,
                        "since_ms": CLOCK - 3 * 3_600_000,  # 2 h before the cut-off
                        "reason": "ne gap",
                        "ne_gap": 0.05,
                    },
                    "view_cutoff": None,
                    "view_builds": 0,
                    "trains": 0,
                    "gate_pass": True,
                    "published": [],  # [base, tag, version]
                    "pins": {},
                    "calibrators": [],
                    "served": {"ctr_lr": 1},
                }
            )

    def load(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.path.read_text())
        return out

    def save(self, d: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, self.path)

    def update(self, **kw: Any) -> None:
        self.save(self.load() | kw)


class FakeOps:
    allowed_lateness_ms = 60_000

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.world = World(folder)
        self.registry = Registry(self.folder / "experiments")

    def event_time_ms(self) -> int | None:
        return int(self.world.load()["clock"])

    def decay_state(self) -> dict | None:
        d: dict | None = self.world.load()["decay"]
        return d

    def archive_complete_for(self, cutoff_ms: int) -> tuple[bool, str]:
        return self.world.load()["clock"] >= cutoff_ms + self.allowed_lateness_ms, "archive"

    def switch_view(self, cutoff_ms: int) -> dict:
        w = self.world.load()
        if w["view_cutoff"] == cutoff_ms:
            return {"version": f"v{cutoff_ms}", "already": True}
        self.world.update(view_cutoff=cutoff_ms, view_builds=w["view_builds"] + 1)
        return {"version": f"v{cutoff_ms}"}

    def reconcile(self) -> dict:
        return {"cells_compared": 10, "cells_differing": 0, "explained": True}

    def train(self, folder: Path, start_ms: int, end_ms: int) -> dict:
        done = Path(folder) / "trained.json"
        if done.exists():
            out: dict = json.loads(done.read_text())
            return out
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.world.update(trains=self.world.load()["trains"] + 1)
        res = {"onnx": str(Path(folder) / "model.onnx"), "evaluation": {"model": {"ne": 0.9}}}
        done.write_text(json.dumps(res))
        return res

    def champion(self, base: str) -> dict | None:
        v = self.world.load()["served"].get(base)
        return None if v is None else {"model": base, "version": v, "onnx": f"{base}/{v}"}

    def gate(self, trained: dict, champion: dict | None, rule: GateRule) -> dict:
        ok = bool(self.world.load()["gate_pass"])
        return {"passed": ok, "why": "fake gate " + ("passed" if ok else "failed")}

    def publish(self, onnx: str, base: str, tag: str) -> dict:
        w = self.world.load()
        for b, t, v in w["published"]:
            if b == base and t == tag:
                return {"version": v, "already": True}
        v = 1 + max([w["served"].get(base, 0)] + [v for b, _, v in w["published"] if b == base])
        w["published"].append([base, tag, v])
        w["served"][base] = v
        self.world.save(w)
        return {"version": v, "already": False}

    def pin(self, base: str, versions: list[int], owner: str) -> None:
        w = self.world.load()
        w["pins"].setdefault(owner, {})[base] = versions
        self.world.save(w)

    def unpin(self, owner: str) -> None:
        w = self.world.load()
        w["pins"].pop(owner, None)
        self.world.save(w)

    def degrade(self, onnx: str, folder: Path, factor: float) -> str:
        w = self.world.load()
        w.setdefault("degraded", []).append([onnx, factor])
        self.world.save(w)
        return str(Path(folder) / "model.onnx")

    def follow_calibrator(self, a: str, av: int, b: str, bv: int) -> bool:
        w = self.world.load()
        if [a, av, b, bv] not in w["calibrators"]:
            w["calibrators"].append([a, av, b, bv])
        self.world.save(w)
        return True


def config(folder: Path) -> ControllerConfig:
    return ControllerConfig(folder=Path(folder) / "controller", shadow_min_s=0.0, interval_h=6.0)


def loop_shadow_report(reg: Registry, name: str, calibration: float = 1.02) -> None:
    """What the closed loop writes while the shadow runs: a report with the shadow arm."""
    reg.save_report(
        name,
        {
            "arms": [
                {
                    "name": "challenger",
                    "clicks": 500,
                    "metrics": {"calibration": {"value": calibration}},
                }
            ],
            "breached_arms": [],
            "breaches": [],
        },
    )


def loop_decides(reg: Registry, name: str, direction: str = "up") -> None:
    """What the closed loop's sequential test writes when it decides."""
    st = SequentialState()
    st.comparisons[st.key("challenger", "champion", "revenue_per_request")] = ComparisonState(
        looks=5,
        p_value=0.001,
        lo=0.05,
        hi=math.inf,
        decided_at_ms=CLOCK,
        decided_elapsed_s=1800.0,
        direction=direction,
    )
    reg.record_decision(name, st)


def drive(folder: Path, verdict: str = "up", max_steps: int = 60) -> Controller:
    """Run the controller to the end of one cycle, playing the loop's part when it waits."""
    ops = FakeOps(folder)
    ctl = Controller(config(folder), ops)
    for _ in range(max_steps):
        status = ctl.step()
        if status == "wait:shadow_verdict":
            loop_shadow_report(ops.registry, ctl.state.cycle.done["shadow"]["data"]["experiment"])
        elif status == "wait:verdict":
            name = ctl.state.cycle.done["experiment"]["data"]["experiment"]
            if verdict == "guardrail":
                ops.registry.stop_arm(name, "challenger", "arm challenger: error rate 5% > 1%")
            else:
                loop_decides(ops.registry, name, verdict)
        elif status == "idle" and ctl.state.cycles_finished >= 1:
            return ctl
    raise AssertionError(f"the cycle did not finish in {max_steps} steps: {ctl.state}")


if __name__ == "__main__":
    drive(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "up")
